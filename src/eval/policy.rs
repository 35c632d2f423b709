//! Evaluation of a policy checkpoint (SPEC section 1): samples at temperature 1 on held-out
//! prompts, the KL(pi || pi_ref) estimate with its standard error, the win rate against the
//! reference summaries with a 95% interval, mean sample length, and the held-out DAA metrics
//! (loss, implicit-reward accuracy, expected implicit reward of the chosen response), plus the
//! per-sample implicit log-ratio and length for the length regression.

use crate::data::PrefExample;
use crate::model::GptNeoX;
use crate::model::generate::{SampleConfig, generate};
use crate::model::score::shared_prefix_logps;
use crate::train::SpecialTokens;
use crate::train::daa::pair_logps;
use crate::train::loss::{Objective, margin, pair_loss};
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Samples per held-out prompt.
    #[serde(default = "one")]
    pub samples_per_prompt: usize,
    /// Sampling seed: the same at every checkpoint, so checkpoints are compared on the same
    /// random numbers.
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default = "default_top_k")]
    pub top_k: Option<usize>,
    /// Maximum total length (prompt + response), per prompt.
    pub max_length: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn one() -> usize {
    1
}
fn default_temperature() -> f64 {
    1.0
}
fn default_top_k() -> Option<usize> {
    Some(50)
}
fn default_batch() -> usize {
    64
}

/// One evaluated sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleStat {
    pub prompt: usize,
    /// log pi(y|x) - log pi_ref(y|x) of the sample as generated (a single-sample KL estimate).
    pub log_ratio: f64,
    /// Generated tokens, EOS excluded.
    pub length: usize,
    /// Judge outcome against the reference: 1 win, 0.5 tie, 0 loss.
    pub win: f64,
}

/// The metrics of one checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyEval {
    pub kl: f64,
    pub kl_se: f64,
    pub win_rate: f64,
    pub win_rate_lo: f64,
    pub win_rate_hi: f64,
    pub mean_length: f64,
    /// Held-out DAA loss, implicit-reward accuracy and mean implicit reward of the chosen
    /// response (NaN when no objective is given, e.g. for the SFT policy itself).
    pub heldout_loss: f64,
    pub implicit_accuracy: f64,
    pub chosen_reward: f64,
    pub n_samples: usize,
    pub samples: Vec<SampleStat>,
}

/// Mean and standard error.
pub fn mean_se(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    if x.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = x.iter().sum::<f64>() / n;
    if x.len() < 2 {
        return (m, f64::NAN);
    }
    let v = x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, (v / n).sqrt())
}

/// Scores every sample, given as (prompt index, sample tokens), against its prompt's reference
/// summary: 1 win, 0.5 tie, 0 loss, in order.
pub type SampleJudge<'a> = dyn FnMut(&[(usize, &[u32])]) -> Result<Vec<f64>> + 'a;

/// Held-out DAA metrics of `policy` against `reference` on preference pairs.
pub fn heldout_metrics(
    policy: &GptNeoX,
    reference: &GptNeoX,
    pairs: &[PrefExample],
    objective: Objective,
    beta: f64,
    tokens: SpecialTokens,
    batch_size: usize,
) -> Result<(f64, f64, f64)> {
    let (mut loss, mut acc, mut rw_sum) = (0.0, 0.0, 0.0);
    let all: Vec<usize> = (0..pairs.len()).collect();
    for chunk in all.chunks(batch_size.max(1)) {
        let (pw, pl, lw, ll) = pair_logps(policy, pairs, chunk, tokens)?;
        let (rw, rl, _, _) = pair_logps(reference, pairs, chunk, tokens)?;
        let (pw, pl) = (pw.to_vec1::<f32>()?, pl.to_vec1::<f32>()?);
        let (rw, rl) = (rw.to_vec1::<f32>()?, rl.to_vec1::<f32>()?);
        for i in 0..chunk.len() {
            let h = margin(pw[i] as f64, pl[i] as f64, rw[i] as f64, rl[i] as f64);
            loss += pair_loss(objective, beta, h, lw[i] as f64, ll[i] as f64);
            let r_w = beta * (pw[i] - rw[i]) as f64;
            let r_l = beta * (pl[i] - rl[i]) as f64;
            acc += f64::from(u8::from(r_w > r_l));
            rw_sum += r_w;
        }
    }
    let n = pairs.len().max(1) as f64;
    Ok((loss / n, acc / n, rw_sum / n))
}

/// Evaluate `policy` (with `reference` for the KL and implicit rewards). `judge` is called
/// once, with every sample as (prompt index, sample tokens) in order, and returns each one's
/// score against its prompt's reference summary (1 win, 0.5 tie, 0 loss). `objective`
/// (with its beta) selects the held-out DAA loss; None leaves those metrics NaN.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_policy(
    policy: &GptNeoX,
    reference: &GptNeoX,
    prompts: &[Vec<u32>],
    pairs: &[PrefExample],
    objective: Option<(Objective, f64)>,
    cfg: &EvalConfig,
    tokens: SpecialTokens,
    judge: &mut SampleJudge,
) -> Result<PolicyEval> {
    if prompts.is_empty() {
        bail!("evaluation needs at least one prompt");
    }
    let pol = policy.inference_copy()?;
    let refm = reference.inference_copy()?;
    let k = cfg.samples_per_prompt.max(1);
    let expanded: Vec<Vec<u32>> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), k))
        .collect();
    let sc = SampleConfig {
        temperature: cfg.temperature,
        top_k: cfg.top_k,
        max_length: cfg.max_length,
        seed: cfg.seed,
        batch_size: cfg.batch_size,
    };
    let samples = generate(&pol, &expanded, &sc, tokens.eos, tokens.pad)?;
    let judged: Vec<(usize, &[u32])> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| (i / k, s.tokens.as_slice()))
        .collect();
    let wins = judge(&judged)?;
    if wins.len() != samples.len() {
        bail!(
            "the judge scored {} of {} samples",
            wins.len(),
            samples.len()
        );
    }
    // Reference log-probs of each sample exactly as generated (no EOS appended).
    let mut stats = Vec::with_capacity(samples.len());
    let idx: Vec<usize> = (0..samples.len()).collect();
    for chunk in idx.chunks(cfg.batch_size.max(1)) {
        // The samples of one prompt share its pass through the model.
        let first = chunk[0] / k;
        let p: Vec<&[u32]> = (first..=chunk[chunk.len() - 1] / k)
            .map(|j| prompts[j].as_slice())
            .collect();
        let r: Vec<(usize, &[u32])> = chunk
            .iter()
            .map(|&i| (i / k - first, samples[i].tokens.as_slice()))
            .collect();
        let ref_lp = shared_prefix_logps(&refm, &p, &r, None, tokens.pad)?
            .0
            .to_vec1::<f32>()?;
        for (j, &i) in chunk.iter().enumerate() {
            let s = &samples[i];
            let pol_lp: f64 = s.logps.iter().map(|&x| x as f64).sum();
            let length = s.tokens.len() - usize::from(s.finished);
            stats.push(SampleStat {
                prompt: i / k,
                log_ratio: pol_lp - ref_lp[j] as f64,
                length,
                win: wins[i],
            });
        }
    }
    let lr: Vec<f64> = stats.iter().map(|s| s.log_ratio).collect();
    let (kl, kl_se) = mean_se(&lr);
    // Win rate with a 95% interval clustered by prompt (samples of one prompt are correlated).
    let per_prompt: Vec<f64> = (0..prompts.len())
        .map(|p| stats[p * k..(p + 1) * k].iter().map(|s| s.win).sum::<f64>() / k as f64)
        .collect();
    let (win, win_se) = mean_se(&per_prompt);
    let half = 1.96 * if win_se.is_finite() { win_se } else { 0.0 };
    let mean_length = stats.iter().map(|s| s.length as f64).sum::<f64>() / stats.len() as f64;
    let (heldout_loss, implicit_accuracy, chosen_reward) = match objective {
        Some((obj, beta)) if !pairs.is_empty() => {
            heldout_metrics(&pol, &refm, pairs, obj, beta, tokens, cfg.batch_size)?
        }
        _ => (f64::NAN, f64::NAN, f64::NAN),
    };
    Ok(PolicyEval {
        kl,
        kl_se,
        win_rate: win,
        win_rate_lo: (win - half).max(0.0),
        win_rate_hi: (win + half).min(1.0),
        mean_length,
        heldout_loss,
        implicit_accuracy,
        chosen_reward,
        n_samples: stats.len(),
        samples: stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_standard_error() {
        let (m, se) = mean_se(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((se - (1.6666666666666667f64 / 4.0).sqrt()).abs() < 1e-12);
        assert!(mean_se(&[]).0.is_nan());
    }
}
