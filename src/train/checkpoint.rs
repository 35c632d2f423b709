//! Checkpoints: the model in the HF layout (model.safetensors + config.json, loadable by HF
//! transformers), the optimizer state, and JSON metadata, written atomically as a directory
//! (written under a temporary name, then renamed), so a killed run never leaves a half
//! checkpoint that looks complete.

use crate::model::GptNeoX;
use crate::model::load::save_hf;
use crate::train::optim::RmsProp;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Metadata written beside each checkpoint as `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    /// Fraction of the epoch completed (step / total_steps).
    pub fraction: f64,
    pub examples_seen: usize,
    pub seed: u64,
    /// Metrics of the last step before the checkpoint.
    pub metrics: serde_json::Value,
    /// The run's full configuration.
    pub config: serde_json::Value,
}

/// Directory name of the checkpoint at `step`: `step-000123`.
pub fn checkpoint_dir(out_dir: &Path, step: usize) -> PathBuf {
    out_dir.join(format!("step-{step:06}"))
}

/// Write a checkpoint atomically.
pub fn save(
    out_dir: &Path,
    model: &GptNeoX,
    opt: &RmsProp,
    meta: &CheckpointMeta,
) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(out_dir, meta.step);
    let tmp = out_dir.join(format!(".tmp-step-{:06}", meta.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    save_hf(model, &tmp)?;
    let (state, step) = opt.state();
    let state: HashMap<String, Tensor> = state.into_iter().map(|(k, v)| (k, v.detach())).collect();
    candle_core::safetensors::save(&state, tmp.join("optimizer.safetensors"))
        .with_context(|| format!("cannot write optimizer state in {}", tmp.display()))?;
    debug_assert_eq!(step, meta.step);
    crate::util::write_atomic(
        &tmp.join("meta.json"),
        serde_json::to_string_pretty(meta)?.as_bytes(),
    )?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move checkpoint to {}", final_dir.display()))?;
    Ok(final_dir)
}

/// Complete checkpoints under `out_dir`, sorted by step.
pub fn list(out_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = vec![];
    if !out_dir.is_dir() {
        return Ok(out);
    }
    for e in std::fs::read_dir(out_dir)? {
        let p = e?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(s) = name.strip_prefix("step-")
            && let Ok(step) = s.parse::<usize>()
            && p.join("meta.json").is_file()
        {
            out.push((step, p));
        }
    }
    out.sort();
    Ok(out)
}

pub fn read_meta(dir: &Path) -> Result<CheckpointMeta> {
    let p = dir.join("meta.json");
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid checkpoint metadata", p.display()))
}

/// Restore weights (into `varmap`) and optimizer state from a checkpoint directory.
pub fn restore(
    dir: &Path,
    varmap: &candle_nn::VarMap,
    opt: &mut RmsProp,
    device: &Device,
) -> Result<CheckpointMeta> {
    let meta = read_meta(dir)?;
    let tensors = crate::model::load::read_safetensors(&[dir.join("model.safetensors")], device)?;
    crate::model::load::assign_weights(varmap, &tensors)?;
    let st = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)
        .with_context(|| format!("cannot read optimizer state in {}", dir.display()))?;
    opt.load_state(&st, meta.step)?;
    if opt.steps_taken() != meta.step {
        bail!("{}: optimizer step mismatch", dir.display());
    }
    Ok(meta)
}
