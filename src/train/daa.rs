//! DAA training (DPO / IPO / SLiC / R-DPO) from a policy and a frozen reference.
//!
//! By default the reference log-probs of the whole preference set are computed once before
//! training and cached on disk, keyed by everything they depend on (a hash of the reference
//! weights and of the data, the reference's storage and compute dtypes, the EOS and PAD ids:
//! see [`reference_cache_file`]), so a step costs one policy forward+backward over chosen
//! and rejected (concatenated in one batch). `online_reference = true` recomputes them every
//! step, as the reference code does.

use super::loss::{Objective, daa_loss};
use super::optim::RmsPropConfig;
use super::sft::SpecialTokens;
use super::trainer::{LoopConfig, MicroOutput, TrainOutcome, run_epoch};
use crate::data::PrefExample;
use crate::data::validate::{check_all, check_pref};
use crate::model::score::{collate, limits, sequence_logps, shared_prefix_logps};
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
    let n_examples = || {
        let list: Vec<String> = idx.iter().map(|i| (i + 1).to_string()).collect();
        format!(
            "scoring examples {} (1-based, in batch-row order: rows 0..{n} their chosen responses, rows {n}..{} their rejected)",
            list.join(", "),
            2 * n
        )
    };
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
        let batch = collate(&p, &r, Some(tokens.eos), tokens.pad, model.device())
            .with_context(n_examples)?;
        (
            sequence_logps(model, &batch).with_context(n_examples)?,
            batch.n_response_tokens,
        )
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
        shared_prefix_logps(model, &prompts, &responses, Some(tokens.eos), tokens.pad)
            .with_context(n_examples)?
    };
    Ok((
        lp.narrow(0, 0, n)?,
        lp.narrow(0, n, n)?,
        lens[..n].to_vec(),
        lens[n..].to_vec(),
    ))
}

/// The name of the cache file of `reference`'s log-probs of `data` (as
/// [`reference_logps`] computes them, with `reference`'s inference copy): it names
/// everything the values depend on, the reference weights and the data (hashes), the
/// storage dtype and the compute dtype (autocast) of the reference, and the EOS appended to
/// every response and the PAD id of the batches:
/// `ref-logps-<weights>-<data>-<dtype>-<compute dtype>-eos<id>-pad<id>.json`. Files of the
/// earlier naming (weights and data only) never match, so they are recomputed, not misread.
pub fn reference_cache_file(
    reference: &GptNeoX,
    data: &[PrefExample],
    tokens: SpecialTokens,
) -> Result<String> {
    Ok(format!(
        "ref-logps-{}-{}-{}-{}-eos{}-pad{}.json",
        &crate::model::load::weights_hash(reference)?[..16],
        &data_hash(data)[..16],
        reference.dtype().as_str(),
        reference.compute_dtype().as_str(),
        tokens.eos,
        tokens.pad
    ))
}

/// Reference log-probs (chosen, rejected) of every pair, computed in batches without
/// gradients with `reference`'s inference copy, cached in `cache_dir` when given (under
/// [`reference_cache_file`]).
pub fn reference_logps(
    reference: &GptNeoX,
    data: &[PrefExample],
    tokens: SpecialTokens,
    batch_size: usize,
    cache_dir: Option<&Path>,
) -> Result<Vec<(f32, f32)>> {
    // The copy that computes the values names the cache entry (it carries the compute dtype).
    let inf = reference.inference_copy()?;
    let key = match cache_dir {
        Some(d) => {
            let p = d.join(reference_cache_file(&inf, data, tokens)?);
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
    // Every pair is checked against both models before the reference pass and any step.
    let lim = limits(&policy.model).min(limits(reference));
    lim.check_special(tokens.eos, tokens.pad)
        .context("daa: special tokens")?;
    check_all("daa", data, |ex| check_pref(ex, &lim))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GptNeoXConfig;
    use candle_core::DType;

    const TOK: SpecialTokens = SpecialTokens { eos: 0, pad: 1 };

    fn tiny(dtype: DType) -> crate::model::LoadedModel {
        let cfg = GptNeoXConfig::from_json_str(
            r#"{"model_type":"gpt_neox","vocab_size":16,"hidden_size":8,"num_hidden_layers":1,
              "num_attention_heads":2,"intermediate_size":16,"max_position_embeddings":16,
              "rotary_pct":0.5,"rotary_emb_base":10000,"use_parallel_residual":true,
              "bos_token_id":0,"eos_token_id":0,"initializer_range":0.2}"#,
            "tiny",
        )
        .unwrap();
        crate::model::load::fresh(&cfg, dtype, &Device::Cpu, 3).unwrap()
    }

    fn pairs() -> Vec<PrefExample> {
        (0..3)
            .map(|i| PrefExample {
                prompt: vec![2 + i, 3],
                chosen: vec![5, 6 + i],
                rejected: vec![9],
            })
            .collect()
    }

    /// The cache entry changes with the reference's compute dtype (autocast), its storage
    /// dtype, the EOS and the PAD id, not only with the weights and the data.
    #[test]
    fn the_reference_cache_key_names_dtypes_and_special_tokens() {
        let data = pairs();
        let f32_model = tiny(DType::F32).model;
        let key = |m: &GptNeoX, t: SpecialTokens| reference_cache_file(m, &data, t).unwrap();
        let base = key(&f32_model, TOK);
        assert!(
            base.starts_with("ref-logps-") && base.ends_with("-f32-f32-eos0-pad1.json"),
            "{base}"
        );
        // Deterministic.
        assert_eq!(key(&f32_model, TOK), base);
        // The inference copy, which computes the values, carries the same key.
        assert_eq!(key(&f32_model.inference_copy().unwrap(), TOK), base);
        let bf16 = f32_model.clone().with_compute_dtype(DType::BF16);
        let autocast = key(&bf16, TOK);
        assert!(autocast.ends_with("-f32-bf16-eos0-pad1.json"), "{autocast}");
        assert_eq!(key(&bf16.inference_copy().unwrap(), TOK), autocast);
        let f16 = key(&f32_model.clone().with_compute_dtype(DType::F16), TOK);
        let eos = key(&f32_model, SpecialTokens { eos: 2, pad: 1 });
        let pad = key(&f32_model, SpecialTokens { eos: 0, pad: 0 });
        let stored = key(&tiny(DType::BF16).model, TOK);
        assert!(stored.contains("-bf16-bf16-"), "{stored}");
        let all = [&base, &autocast, &f16, &eos, &pad, &stored];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    /// A cache written in f32 is not reused by a bf16-autocast reference (nor the other way
    /// round), and a file of the earlier naming (weights and data only) is not read.
    #[test]
    fn reference_logps_do_not_reuse_another_dtypes_or_an_old_cache() {
        let data = pairs();
        let dir = tempfile::tempdir().unwrap();
        let m = tiny(DType::F32).model;
        let bf16 = m.clone().with_compute_dtype(DType::BF16);
        // An entry of the earlier naming holding wrong values of the right length.
        let old = dir.path().join(format!(
            "ref-logps-{}-{}.json",
            &crate::model::load::weights_hash(&m).unwrap()[..16],
            &data_hash(&data)[..16]
        ));
        std::fs::write(
            &old,
            serde_json::to_string(&vec![(1.0f32, 2.0f32); 3]).unwrap(),
        )
        .unwrap();
        let a = reference_logps(&m, &data, TOK, 2, Some(dir.path())).unwrap();
        assert!(a.iter().all(|(w, l)| *w < 0.0 && *l < 0.0), "{a:?}");
        let b = reference_logps(&bf16, &data, TOK, 2, Some(dir.path())).unwrap();
        assert_ne!(
            a, b,
            "bf16 log-probs must be computed, not read from the f32 entry"
        );
        // Three entries: the old one, f32 and bf16; each is reused by its own setting.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
        assert_eq!(
            reference_logps(&bf16, &data, TOK, 3, Some(dir.path())).unwrap(),
            b
        );
        assert_eq!(
            reference_logps(&m, &data, TOK, 3, Some(dir.path())).unwrap(),
            a
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }
}
