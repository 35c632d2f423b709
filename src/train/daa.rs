//! DAA training (DPO / IPO / SLiC / R-DPO) from a policy and a frozen reference.
//!
//! By default the reference log-probs of the whole preference set are computed once before
//! training and cached on disk, keyed by a hash of the reference weights and the data, so a
//! step costs one policy forward+backward over chosen and rejected (concatenated in one
//! batch). `online_reference = true` recomputes them every step, as the reference code does.

use super::loss::{Objective, daa_loss};
use super::optim::RmsPropConfig;
use super::sft::SpecialTokens;
use super::trainer::{LoopConfig, MicroOutput, TrainOutcome, run_epoch};
use crate::data::PrefExample;
use crate::model::score::{collate, sequence_logps, shared_prefix_logps};
use crate::model::{GptNeoX, LoadedModel};
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaaConfig {
    pub objective: Objective,
    pub beta: f64,
    /// Recompute reference log-probs every step instead of once up front.
    #[serde(default)]
    pub online_reference: bool,
    /// Where cached reference log-probs live (default: `<out_dir>/../ref-cache`).
    #[serde(default)]
    pub reference_cache: Option<PathBuf>,
}

/// Hash of a preference set's token ids.
pub fn data_hash(data: &[PrefExample]) -> String {
    let mut h = crate::util::Hasher::new();
    for ex in data {
        for part in [&ex.prompt, &ex.chosen, &ex.rejected] {
            let b: Vec<u8> = part.iter().flat_map(|x| x.to_le_bytes()).collect();
            h.update(&b);
        }
    }
    h.hex()
}

/// Policy (or reference) log-probs of chosen and rejected for the given examples: returns two
/// (n,) tensors and the response lengths (tokens incl. EOS).
///
/// Each prompt runs through the model once for both of its responses
/// ([`shared_prefix_logps`]); the same values as scoring `prompt ++ response` rows (chosen
/// and rejected concatenated in one batch, as the reference code does), which
/// `OVEROPT_NO_SHARED_PREFIX=1` switches back to (for A/B measurements).
pub fn pair_logps(
    model: &GptNeoX,
    data: &[PrefExample],
    idx: &[usize],
    tokens: SpecialTokens,
) -> Result<(Tensor, Tensor, Vec<usize>, Vec<usize>)> {
    static CONCAT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let n = idx.len();
    let concat = *CONCAT.get_or_init(|| std::env::var_os("OVEROPT_NO_SHARED_PREFIX").is_some());
    let (lp, lens) = if concat {
        let mut p: Vec<&[u32]> = Vec::with_capacity(2 * n);
        let mut r: Vec<&[u32]> = Vec::with_capacity(2 * n);
        for side in 0..2 {
            for &i in idx {
                p.push(&data[i].prompt);
                r.push(if side == 0 {
                    &data[i].chosen
                } else {
                    &data[i].rejected
                });
            }
        }
        let batch = collate(&p, &r, Some(tokens.eos), tokens.pad, model.device())?;
        (sequence_logps(model, &batch)?, batch.n_response_tokens)
    } else {
        let prompts: Vec<&[u32]> = idx.iter().map(|&i| data[i].prompt.as_slice()).collect();
        let responses: Vec<(usize, &[u32])> = (0..2)
            .flat_map(|side| {
                idx.iter().enumerate().map(move |(k, &i)| {
                    (
                        k,
                        if side == 0 {
                            &data[i].chosen[..]
                        } else {
                            &data[i].rejected[..]
                        },
                    )
                })
            })
            .collect();
        shared_prefix_logps(model, &prompts, &responses, Some(tokens.eos), tokens.pad)?
    };
    Ok((
        lp.narrow(0, 0, n)?,
        lp.narrow(0, n, n)?,
        lens[..n].to_vec(),
        lens[n..].to_vec(),
    ))
}

/// Reference log-probs (chosen, rejected) of every pair, computed in batches without
/// gradients, cached in `cache_dir` when given (keyed by reference weights and data).
pub fn reference_logps(
    reference: &GptNeoX,
    data: &[PrefExample],
    tokens: SpecialTokens,
    batch_size: usize,
    cache_dir: Option<&Path>,
) -> Result<Vec<(f32, f32)>> {
    let key = match cache_dir {
        Some(d) => {
            let key = format!(
                "{}-{}",
                &crate::model::load::weights_hash(reference)?[..16],
                &data_hash(data)[..16]
            );
            let p = d.join(format!("ref-logps-{key}.json"));
            if p.is_file() {
                let text = std::fs::read_to_string(&p)?;
                let v: Vec<(f32, f32)> = serde_json::from_str(&text)
                    .with_context(|| format!("{}: corrupt reference cache", p.display()))?;
                if v.len() == data.len() {
                    return Ok(v);
                }
            }
            Some(p)
        }
        None => None,
    };
    let inf = reference.inference_copy()?;
    let mut out = Vec::with_capacity(data.len());
    let all: Vec<usize> = (0..data.len()).collect();
    for chunk in all.chunks(batch_size.max(1)) {
        let (w, l, _, _) = pair_logps(&inf, data, chunk, tokens)?;
        out.extend(w.to_vec1::<f32>()?.into_iter().zip(l.to_vec1::<f32>()?));
    }
    if let Some(p) = key {
        crate::util::write_atomic(&p, serde_json::to_string(&out)?.as_bytes())?;
    }
    Ok(out)
}

/// Loss and statistics of one DAA micro-batch.
pub fn daa_micro(
    policy: &GptNeoX,
    data: &[PrefExample],
    idx: &[usize],
    tokens: SpecialTokens,
    cfg: &DaaConfig,
    reference: ReferenceSource<'_>,
) -> Result<MicroOutput> {
    let (pw, pl, lw, ll) = pair_logps(policy, data, idx, tokens)?;
    let dev = policy.device();
    let (rw, rl) = match reference {
        ReferenceSource::Cached(v) => {
            let w: Vec<f32> = idx.iter().map(|&i| v[i].0).collect();
            let l: Vec<f32> = idx.iter().map(|&i| v[i].1).collect();
            (
                Tensor::new(w.as_slice(), dev)?,
                Tensor::new(l.as_slice(), dev)?,
            )
        }
        ReferenceSource::Online(r) => {
            let (w, l, _, _) = pair_logps(r, data, idx, tokens)?;
            (w.detach(), l.detach())
        }
    };
    let lens = |v: &[usize], d: &Device| {
        Tensor::new(
            v.iter().map(|&x| x as f32).collect::<Vec<_>>().as_slice(),
            d,
        )
    };
    let (loss, s) = daa_loss(
        cfg.objective,
        cfg.beta,
        &pw,
        &pl,
        &rw,
        &rl,
        &lens(&lw, dev)?,
        &lens(&ll, dev)?,
    )?;
    Ok(MicroOutput {
        loss,
        metrics: vec![
            ("rewards_chosen", s.reward_chosen),
            ("rewards_rejected", s.reward_rejected),
            ("rewards_margin", s.reward_margin),
            ("rewards_accuracy", s.accuracy),
            ("logps_chosen", s.logp_chosen),
            ("logps_rejected", s.logp_rejected),
        ],
    })
}

/// Where the reference log-probs come from.
#[derive(Clone, Copy)]
pub enum ReferenceSource<'a> {
    Cached(&'a [(f32, f32)]),
    Online(&'a GptNeoX),
}

/// Train `policy` with a DAA for one epoch against the frozen `reference` (which must not share
/// weights with the policy: see [`crate::model::load::deep_copy`]).
#[allow(clippy::too_many_arguments)]
pub fn train_daa(
    policy: &LoadedModel,
    reference: &GptNeoX,
    data: &[PrefExample],
    tokens: SpecialTokens,
    cfg: &DaaConfig,
    loop_cfg: &LoopConfig,
    optim: &RmsPropConfig,
    out_dir: &Path,
    run_config: &serde_json::Value,
) -> Result<TrainOutcome> {
    if !(cfg.beta > 0.0 && cfg.beta.is_finite()) {
        bail!("daa: `beta` must be positive, got {}", cfg.beta);
    }
    let inf_ref = reference.inference_copy()?;
    let cached = if cfg.online_reference {
        None
    } else {
        let dir = cfg
            .reference_cache
            .clone()
            .unwrap_or_else(|| out_dir.parent().unwrap_or(Path::new(".")).join("ref-cache"));
        Some(reference_logps(
            reference,
            data,
            tokens,
            loop_cfg.micro_batch_size * 2,
            Some(&dir),
        )?)
    };
    let label = format!("{}(beta={})", cfg.objective.name(), cfg.beta);
    run_epoch(
        policy,
        data.len(),
        loop_cfg,
        optim,
        out_dir,
        run_config,
        &label,
        &mut |idx| {
            let src = match &cached {
                Some(v) => ReferenceSource::Cached(v),
                None => ReferenceSource::Online(&inf_ref),
            };
            daa_micro(&policy.model, data, idx, tokens, cfg, src)
        },
    )
}
