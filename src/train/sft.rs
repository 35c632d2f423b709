//! Supervised fine-tuning: loss = negative summed log-prob of the response (EOS appended),
//! mean over the batch (SPEC section 1).

use super::optim::RmsPropConfig;
use super::trainer::{LoopConfig, MicroOutput, TrainOutcome, run_epoch};
use crate::data::SftExample;
use crate::data::validate::{check_all, check_sft};
use crate::model::LoadedModel;
use crate::model::score::{limits, shared_prefix_logps};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Special token ids the trainers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialTokens {
    pub eos: u32,
    pub pad: u32,
}

/// Loss of one SFT micro-batch.
pub fn sft_micro(
    lm: &LoadedModel,
    data: &[SftExample],
    idx: &[usize],
    tokens: SpecialTokens,
) -> Result<MicroOutput> {
    let p: Vec<&[u32]> = idx.iter().map(|&i| data[i].prompt.as_slice()).collect();
    let r: Vec<(usize, &[u32])> = idx
        .iter()
        .enumerate()
        .map(|(k, &i)| (k, data[i].response.as_slice()))
        .collect();
    // The same values as scoring `prompt ++ response` rows (collate + sequence_logps); on
    // the CPU in f32 the hand-written path, without padding.
    let (lp, n_tokens) = shared_prefix_logps(&lm.model, &p, &r, Some(tokens.eos), tokens.pad)
        .with_context(|| format!("sft: scoring {}", batch_examples(idx)))?;
    let loss = lp.mean_all()?.neg()?;
    let ntok = n_tokens.iter().sum::<usize>() as f64;
    let nll = -(lp.sum_all()?.to_scalar::<f32>()? as f64);
    Ok(MicroOutput {
        loss,
        metrics: vec![("nll_per_token", nll / ntok.max(1.0))],
    })
}

/// Which training examples a micro-batch holds, for errors that only know the batch row:
/// "training examples 4, 9, 2 (1-based, in batch-row order)".
fn batch_examples(idx: &[usize]) -> String {
    let list: Vec<String> = idx.iter().map(|i| (i + 1).to_string()).collect();
    format!(
        "training examples {} (1-based, in batch-row order)",
        list.join(", ")
    )
}

/// Train `policy` on `data` for one epoch. Every example is checked against the model first
/// ([`crate::data::validate::check_sft`]), so a bad one stops the run before any step.
pub fn train_sft(
    policy: &LoadedModel,
    data: &[SftExample],
    tokens: SpecialTokens,
    loop_cfg: &LoopConfig,
    optim: &RmsPropConfig,
    out_dir: &Path,
    run_config: &serde_json::Value,
) -> Result<TrainOutcome> {
    let lim = limits(&policy.model);
    lim.check_special(tokens.eos, tokens.pad)
        .context("sft: special tokens")?;
    check_all("sft", data, |ex| check_sft(ex, &lim))?;
    run_epoch(
        policy,
        data.len(),
        loop_cfg,
        optim,
        out_dir,
        run_config,
        "sft",
        &mut |idx| sft_micro(policy, data, idx, tokens),
    )
}
