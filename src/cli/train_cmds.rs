//! `overopt sft --config F` and `overopt daa --config F`.

use crate::data::tokenizer::Tok;
use crate::data::{PrefExample, SftExample, truncate_pair, truncate_pref};
use crate::model::load;
use crate::train::config::{ModelSpec, RunConfig};
use crate::train::{SpecialTokens, train_daa, train_sft};
use anyhow::{Context, Result, anyhow};
use clap::Args;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The run configuration (TOML).
    #[arg(long)]
    pub config: PathBuf,
}

fn load_model(spec: &ModelSpec) -> Result<(load::LoadedModel, Tok)> {
    let (mut lm, tok) = super::model_cmds::load_with_tokenizer(
        &spec.source,
        spec.revision.as_deref(),
        spec.tokenizer.as_deref(),
        &spec.dtype,
        &spec.device,
        "set model.tokenizer",
    )?;
    if let Some(cd) = spec.autocast.dtype() {
        lm.model = lm.model.with_compute_dtype(cd);
    }
    lm.model = lm.model.with_checkpointing(spec.checkpoint_layers);
    Ok((lm, tok))
}

#[derive(Deserialize)]
struct SftLine {
    prompt: String,
    response: String,
}

#[derive(Deserialize)]
struct PrefLine {
    prompt: String,
    chosen: String,
    rejected: String,
}

pub fn sft(a: TrainArgs) -> Result<()> {
    let cfg = RunConfig::from_file(&a.config)?;
    let (lm, tok) = load_model(&cfg.model)?;
    let lines: Vec<SftLine> = crate::util::read_jsonl(&cfg.data.train)?;
    let data = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let ctx = || format!("{}: record {}", cfg.data.train.display(), i + 1);
            let (p, r) = truncate_pair(
                &tok.encode(&l.prompt).with_context(ctx)?,
                &tok.encode(&l.response).with_context(ctx)?,
                cfg.data.max_length,
                cfg.data.max_prompt_length,
            );
            Ok(SftExample {
                prompt: p,
                response: r,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let tokens = SpecialTokens {
        eos: tok.eos_id,
        pad: tok.pad_id,
    };
    let out = train_sft(
        &lm,
        &data,
        tokens,
        &cfg.train,
        &cfg.optim,
        &cfg.out_dir,
        &serde_json::to_value(&cfg)?,
    )?;
    tok.save(&cfg.out_dir.join("tokenizer.json"))?;
    for (_, dir) in &out.checkpoints {
        tok.save(&dir.join("tokenizer.json"))?;
    }
    println!(
        "sft: {} steps, checkpoints in {}",
        out.total_steps,
        cfg.out_dir.display()
    );
    Ok(())
}

pub fn daa(a: TrainArgs) -> Result<()> {
    let cfg = RunConfig::from_file(&a.config)?;
    let daa = cfg.daa.clone().ok_or_else(|| {
        anyhow!(
            "{}: a [daa] table (objective, beta) is required",
            a.config.display()
        )
    })?;
    let (policy, tok) = load_model(&cfg.model)?;
    let reference = match &cfg.reference {
        Some(spec) => load_model(spec)?.0,
        None => load::deep_copy(&policy)?,
    };
    let lines: Vec<PrefLine> = crate::util::read_jsonl(&cfg.data.train)?;
    let data = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let ctx = || format!("{}: record {}", cfg.data.train.display(), i + 1);
            let ex = PrefExample {
                prompt: tok.encode(&l.prompt).with_context(ctx)?,
                chosen: tok.encode(&l.chosen).with_context(ctx)?,
                rejected: tok.encode(&l.rejected).with_context(ctx)?,
            };
            Ok(truncate_pref(
                &ex,
                cfg.data.max_length,
                cfg.data.max_prompt_length,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let tokens = SpecialTokens {
        eos: tok.eos_id,
        pad: tok.pad_id,
    };
    let out = train_daa(
        &policy,
        &reference.model,
        &data,
        tokens,
        &daa,
        &cfg.train,
        &cfg.optim,
        &cfg.out_dir,
        &serde_json::to_value(&cfg)?,
    )?;
    for (_, dir) in &out.checkpoints {
        tok.save(&dir.join("tokenizer.json"))?;
    }
    println!(
        "daa: {} steps, checkpoints in {}",
        out.total_steps,
        cfg.out_dir.display()
    );
    Ok(())
}
