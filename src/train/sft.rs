//! Supervised fine-tuning: loss = negative summed log-prob of the response (EOS appended),
//! mean over the batch (SPEC section 1).

use super::optim::RmsPropConfig;
use super::trainer::{LoopConfig, MicroOutput, TrainOutcome, run_epoch};
use crate::data::SftExample;
use crate::model::LoadedModel;
use crate::model::score::shared_prefix_logps;
use anyhow::Result;
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
    let (lp, n_tokens) = shared_prefix_logps(&lm.model, &p, &r, Some(tokens.eos), tokens.pad)?;
    let loss = lp.mean_all()?.neg()?;
    let ntok = n_tokens.iter().sum::<usize>() as f64;
    let nll = -(lp.sum_all()?.to_scalar::<f32>()? as f64);
    Ok(MicroOutput {
        loss,
        metrics: vec![("nll_per_token", nll / ntok.max(1.0))],
    })
}

/// Train `policy` on `data` for one epoch.
pub fn train_sft(
    policy: &LoadedModel,
    data: &[SftExample],
    tokens: SpecialTokens,
    loop_cfg: &LoopConfig,
    optim: &RmsPropConfig,
    out_dir: &Path,
    run_config: &serde_json::Value,
) -> Result<TrainOutcome> {
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
