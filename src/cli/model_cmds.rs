//! `overopt score` and `overopt sample`.

use crate::data::tokenizer::Tok;
use crate::model::generate::{SampleConfig, generate};
use crate::model::load;
use crate::model::score::score_pairs;
use anyhow::{Context, Result};
use clap::Args;
use serde::Deserialize;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A model directory in the HF layout, or a hub id such as EleutherAI/pythia-1b.
    #[arg(long)]
    pub model: String,
    /// Hub revision (branch, tag or commit) when --model is a hub id.
    #[arg(long)]
    pub revision: Option<String>,
    /// Tokenizer file; by default the model's tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
}

impl ModelArgs {
    fn load(&self) -> Result<(load::LoadedModel, Tok)> {
        load::load_with_tokenizer(
            &self.model,
            self.revision.as_deref(),
            self.tokenizer.as_deref(),
            &self.dtype,
            &self.device,
            "pass --tokenizer",
        )
    }
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSON lines with "prompt" and "response".
    #[arg(long)]
    pub input: PathBuf,
    /// Output file (JSON lines); standard output by default.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

#[derive(Deserialize)]
struct PairLine {
    prompt: String,
    response: String,
}

#[derive(Deserialize)]
struct PromptLine {
    prompt: String,
}

/// Write the output through `write`: to `path` atomically (a temporary file in the same folder,
/// fsynced, then renamed, so an interrupted run never leaves a truncated file that looks
/// complete), or to standard output.
fn write_out(
    path: &Option<PathBuf>,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    match path {
        Some(p) => crate::util::write_atomic_with(p, |w| write(w)),
        None => {
            let mut out = std::io::stdout().lock();
            write(&mut out)?;
            out.flush()?;
            Ok(())
        }
    }
}

pub fn score(a: ScoreArgs) -> Result<()> {
    let lines: Vec<PairLine> = crate::util::read_jsonl(&a.input)?;
    let (lm, tok) = a.model.load()?;
    let mut prompts = Vec::with_capacity(lines.len());
    let mut responses = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        prompts.push(
            tok.encode(&l.prompt)
                .with_context(|| format!("{}: record {}", a.input.display(), i + 1))?,
        );
        responses.push(
            tok.encode(&l.response)
                .with_context(|| format!("{}: record {}", a.input.display(), i + 1))?,
        );
    }
    let scores = score_pairs(
        &lm.model,
        &prompts,
        &responses,
        Some(tok.eos_id),
        tok.pad_id,
        a.model.batch_size,
    )?;
    write_out(&a.output, |out| {
        for (logp, n) in scores {
            writeln!(out, "{}", serde_json::json!({"logp": logp, "n_tokens": n}))?;
        }
        Ok(())
    })
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSON lines with "prompt".
    #[arg(long)]
    pub prompts: PathBuf,
    /// Maximum total length (prompt + response) in tokens.
    #[arg(long, default_value_t = 512)]
    pub max_length: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampling temperature; 0 for greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Top-k filter; 0 disables it.
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    #[arg(long)]
    pub output: Option<PathBuf>,
}

pub fn sample(a: SampleArgs) -> Result<()> {
    let lines: Vec<PromptLine> = crate::util::read_jsonl(&a.prompts)?;
    let (lm, tok) = a.model.load()?;
    let prompts = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            tok.encode(&l.prompt)
                .with_context(|| format!("{}: record {}", a.prompts.display(), i + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    let cfg = SampleConfig {
        temperature: a.temperature,
        top_k: (a.top_k > 0).then_some(a.top_k),
        max_length: a.max_length,
        seed: a.seed,
        batch_size: a.model.batch_size,
    };
    let samples = generate(&lm.model, &prompts, &cfg, tok.eos_id, tok.pad_id)?;
    write_out(&a.output, |out| {
        for (l, s) in lines.iter().zip(samples) {
            let text = tok.decode(&s.tokens)?;
            writeln!(
                out,
                "{}",
                serde_json::json!({"prompt": l.prompt, "response": text, "tokens": s.tokens, "logps": s.logps, "finished": s.finished})
            )?;
        }
        Ok(())
    })
}
