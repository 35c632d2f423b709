//! Batched sampling with a KV cache from left-padded prompts.
//!
//! Matches the reference code's evaluation sampling: temperature 1, HF's default top-k 50, a
//! maximum TOTAL length that counts the prompt, stop at EOS. The length limit applies per
//! prompt (its own length plus its generated tokens), not to the padded batch as HF's
//! `generate` does, so that a sample never depends on the other prompts of its batch. Each prompt has its own
//! random stream derived from (seed, prompt index), so a sample does not depend on which other
//! prompts share its batch.

use super::gpt_neox::{GptNeoX, KvCache, position_ids_from_mask};
use anyhow::{Result, bail};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampleConfig {
    /// 0 means greedy decoding.
    pub temperature: f64,
    /// Keep only the k most likely tokens (ties at the k-th logit kept); None for no filter.
    pub top_k: Option<usize>,
    /// Maximum total length: prompt + generated tokens, per prompt.
    pub max_length: usize,
    pub seed: u64,
    /// Prompts per forward batch.
    pub batch_size: usize,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: Some(50),
            max_length: 512,
            seed: 0,
            batch_size: 64,
        }
    }
}

/// One generated continuation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// Generated tokens, including the EOS when the sample ended with one.
    pub tokens: Vec<u32>,
    /// Log-prob of each generated token under the sampling model's unmodified distribution
    /// (temperature 1, no top-k): the quantity the KL estimate needs.
    pub logps: Vec<f32>,
    /// True when the sample ended with EOS (false: cut by max_length).
    pub finished: bool,
}

/// log softmax(row)[tok], without building the whole row.
fn log_softmax_at(row: &[f32], tok: usize) -> f32 {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
    row[tok] - lse
}

/// Draw one token from `logits` with temperature and top-k; greedy when temperature is 0.
pub fn pick_token(logits: &[f32], temperature: f64, top_k: Option<usize>, rng: &mut StdRng) -> u32 {
    if temperature <= 0.0 {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let threshold = match top_k {
        Some(k) if k < logits.len() && k > 0 => {
            let mut v = logits.to_vec();
            let idx = logits.len() - k;
            let (_, kth, _) = v.select_nth_unstable_by(idx, |a, b| a.total_cmp(b));
            *kth
        }
        _ => f32::NEG_INFINITY,
    };
    let t = temperature as f32;
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = logits
        .iter()
        .map(|&x| {
            if x >= threshold {
                ((x - m) / t).exp()
            } else {
                0.0
            }
        })
        .collect();
    let total: f32 = weights.iter().sum();
    let mut u = rng.random::<f32>() * total;
    for (i, w) in weights.iter().enumerate() {
        if *w > 0.0 {
            if u < *w {
                return i as u32;
            }
            u -= w;
        }
    }
    // Rounding left `u` past the end: the last token with weight.
    weights.iter().rposition(|w| *w > 0.0).unwrap_or(0) as u32
}

/// Sample one continuation per prompt. `eos_id` ends a sample; `pad_id` fills left padding.
pub fn generate(
    model: &GptNeoX,
    prompts: &[Vec<u32>],
    cfg: &SampleConfig,
    eos_id: u32,
    pad_id: u32,
) -> Result<Vec<Sample>> {
    let inf = model.inference_copy()?;
    let mut out = Vec::with_capacity(prompts.len());
    for (chunk_i, chunk) in prompts.chunks(cfg.batch_size.max(1)).enumerate() {
        let first = chunk_i * cfg.batch_size.max(1);
        out.extend(generate_batch(&inf, chunk, first, cfg, eos_id, pad_id)?);
    }
    Ok(out)
}

/// The model side of sampling: candle's graph with its KV cache, or the hand-written CPU
/// decoder ([`super::hand::Decoder`]).
enum Steps {
    Graph {
        cache: KvCache,
        full_mask: Tensor,
        next_pos: Vec<u32>,
    },
    Hand(Box<super::hand::Decoder>),
}

impl Steps {
    /// Prefill on candle's graph: left-padded prompts; returns the state and the logits at
    /// each prompt's last token, (b, vocab) row-major.
    fn graph(
        model: &GptNeoX,
        prompts: &[Vec<u32>],
        capacity: usize,
        pad_id: u32,
    ) -> Result<(Self, Vec<f32>)> {
        let dev = model.device().clone();
        let b = prompts.len();
        let p = prompts.iter().map(|x| x.len()).max().unwrap_or(0);
        let mut ids = vec![pad_id; b * p];
        let mut mask = vec![0u8; b * p];
        for (i, pr) in prompts.iter().enumerate() {
            let off = p - pr.len();
            for (j, &t) in pr.iter().enumerate() {
                ids[i * p + off + j] = t;
                mask[i * p + off + j] = 1;
            }
        }
        let input = Tensor::from_vec(ids, (b, p), &dev)?;
        let full_mask = Tensor::from_vec(mask, (b, p), &dev)?;
        let pos = position_ids_from_mask(&full_mask)?;
        let next_pos: Vec<u32> = pos.narrow(1, p - 1, 1)?.flatten_all()?.to_vec1::<u32>()?;
        let mut cache = KvCache::with_capacity(model.config().num_hidden_layers, capacity);
        let logits = model.forward_cached_last(&input, &full_mask, &pos, &mut cache)?;
        let logits = logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let state = Steps::Graph {
            cache,
            full_mask,
            next_pos,
        };
        Ok((state, logits))
    }

    /// Feed `next` to the rows that go on: `keep` are their indices in the previous running
    /// batch, `active` their prompt indices. Returns their next-token logits.
    fn step(
        &mut self,
        model: &GptNeoX,
        keep: &[usize],
        active: &[usize],
        next: Vec<u32>,
    ) -> Result<Vec<f32>> {
        match self {
            Steps::Hand(dec) => Ok(dec.step(active, &next)?),
            Steps::Graph {
                cache,
                full_mask,
                next_pos,
            } => {
                let dev = model.device().clone();
                if keep.len() != next_pos.len() {
                    let idx = Tensor::from_vec(
                        keep.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                        keep.len(),
                        &dev,
                    )?;
                    cache.select_rows(&idx)?;
                    *full_mask = full_mask.contiguous()?.index_select(&idx, 0)?;
                    *next_pos = keep.iter().map(|&r| next_pos[r]).collect();
                }
                for x in next_pos.iter_mut() {
                    *x += 1;
                }
                let n = keep.len();
                let step_ids = Tensor::from_vec(next, (n, 1), &dev)?;
                let step_pos = Tensor::from_vec(next_pos.clone(), (n, 1), &dev)?;
                *full_mask =
                    Tensor::cat(&[&*full_mask, &Tensor::ones((n, 1), DType::U8, &dev)?], 1)?;
                let logits = model.forward_cached_last(&step_ids, full_mask, &step_pos, cache)?;
                Ok(logits
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?)
            }
        }
    }
}

fn generate_batch(
    model: &GptNeoX,
    prompts: &[Vec<u32>],
    first_index: usize,
    cfg: &SampleConfig,
    eos_id: u32,
    pad_id: u32,
) -> Result<Vec<Sample>> {
    let b = prompts.len();
    let p = prompts.iter().map(|x| x.len()).max().unwrap_or(0);
    if prompts.iter().any(|x| x.is_empty()) {
        bail!("cannot sample from an empty prompt");
    }
    if p >= cfg.max_length {
        bail!(
            "prompt length {p} leaves no room under max_length {}",
            cfg.max_length
        );
    }
    let max_new: Vec<usize> = prompts.iter().map(|x| cfg.max_length - x.len()).collect();
    let mut rngs: Vec<StdRng> = (0..b)
        .map(|i| {
            let idx = (first_index + i) as u64;
            StdRng::seed_from_u64(cfg.seed ^ idx.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        })
        .collect();
    // Positions the cache will hold: the prompt plus one per decode step.
    let steps = max_new.iter().copied().max().unwrap_or(0);
    let (mut state, mut logits) = if super::hand::usable(model) {
        let refs: Vec<&[u32]> = prompts.iter().map(|x| x.as_slice()).collect();
        let (dec, logits) = super::hand::Decoder::new(model, &refs, p + steps)?;
        (Steps::Hand(Box::new(dec)), logits)
    } else {
        Steps::graph(model, prompts, p + steps, pad_id)?
    };
    let vocab = model.config().vocab_size;
    let mut samples: Vec<Sample> = (0..b)
        .map(|_| Sample {
            tokens: vec![],
            logps: vec![],
            finished: false,
        })
        .collect();
    // Rows of the running batch -> index of their prompt.
    let mut active: Vec<usize> = (0..b).collect();
    for _step in 0..steps {
        let mut next = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        for (r, &i) in active.iter().enumerate() {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let tok = pick_token(row, cfg.temperature, cfg.top_k, &mut rngs[i]);
            let lp = log_softmax_at(row, tok as usize);
            samples[i].tokens.push(tok);
            samples[i].logps.push(lp);
            if tok == eos_id {
                samples[i].finished = true;
            } else if samples[i].tokens.len() < max_new[i] {
                keep.push(r);
                next.push(tok);
            }
        }
        if keep.is_empty() {
            break;
        }
        active = keep.iter().map(|&r| active[r]).collect();
        logits = state.step(model, &keep, &active, next)?;
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_never_picks_outside_the_top() {
        let logits: Vec<f32> = (0..100).map(|i| i as f32 * 0.01).collect();
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..2000 {
            let t = pick_token(&logits, 1.0, Some(5), &mut rng);
            assert!(t >= 95, "{t}");
        }
        assert_eq!(pick_token(&logits, 0.0, Some(5), &mut rng), 99);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([0, ln 3]) = [0.25, 0.75]
        let logits = [0.0f32, 3f32.ln()];
        let mut rng = StdRng::seed_from_u64(7);
        let n = 20000;
        let ones = (0..n)
            .filter(|_| pick_token(&logits, 1.0, None, &mut rng) == 1)
            .count();
        let frac = ones as f64 / n as f64;
        // 5 standard errors
        assert!(
            (frac - 0.75).abs() < 5.0 * (0.75f64 * 0.25 / n as f64).sqrt(),
            "{frac}"
        );
    }
}
