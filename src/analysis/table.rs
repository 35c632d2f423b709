//! Row types shared by the sweep (which writes them) and the analysis (which reads them).
//!
//! Conventions:
//! - `objective` is lower case: `dpo`, `ipo`, `slic`, `rdpo` (length-regularized DPO) or `sft`.
//! - The SFT policy (the reference, before any DAA step) is one row per (size, seed) with
//!   `objective = "sft"`, `beta = 0.0`, `checkpoint = 0.0`. Its `kl` should be 0 (the analysis
//!   treats the SFT policy as d = 0 whatever the estimate says). Its DAA-only metrics
//!   (`heldout_loss`, `implicit_accuracy`, `chosen_reward`) may be NaN.
//! - `checkpoint` is the fraction of the DAA epoch seen: 0.25, 0.5, 0.75, 1.0. "End of epoch"
//!   is `checkpoint >= 1 - 1e-6`.
//! - Non-finite floats are written as JSON `null` and read back as NaN, so a metric that could
//!   not be computed stays in the table as a visible gap instead of failing the whole file.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Objective name of the SFT policy rows.
pub const SFT: &str = "sft";
/// The three objectives of the paper's main grid; claims C1-C5, C7-C9 are about these.
pub const STANDARD_OBJECTIVES: [&str; 3] = ["dpo", "ipo", "slic"];
/// Checkpoints at or above this fraction count as the end of the epoch.
pub const END_OF_EPOCH: f64 = 1.0 - 1e-6;

/// Serialize non-finite f64 as null; read null back as NaN.
pub mod f64_or_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f64(*x)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// One evaluated policy: an (objective, beta, size, checkpoint, seed) cell of the sweep, or the
/// SFT policy of a (size, seed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRow {
    /// `dpo`, `ipo`, `slic`, `rdpo` or `sft`.
    pub objective: String,
    /// The DAA beta; 0.0 for SFT rows.
    #[serde(with = "f64_or_null")]
    pub beta: f64,
    /// Model size label, e.g. `small` / `medium` / `large` or `1b`.
    pub size: String,
    /// Parameter count; orders the sizes.
    pub n_params: u64,
    /// Fraction of the DAA epoch seen (0 for the SFT policy).
    #[serde(with = "f64_or_null")]
    pub checkpoint: f64,
    pub seed: u64,
    /// KL(pi || pi_ref) estimated on policy samples (sum over tokens, mean over samples).
    #[serde(with = "f64_or_null")]
    pub kl: f64,
    /// Standard error of `kl`.
    #[serde(with = "f64_or_null")]
    pub kl_se: f64,
    /// Win rate against the reference summaries (ties count 0.5).
    #[serde(with = "f64_or_null")]
    pub win_rate: f64,
    /// Lower end of the 95% interval of `win_rate`.
    #[serde(with = "f64_or_null")]
    pub win_rate_lo: f64,
    /// Upper end of the 95% interval of `win_rate`.
    #[serde(with = "f64_or_null")]
    pub win_rate_hi: f64,
    /// Mean length of the policy samples (tokens).
    #[serde(with = "f64_or_null")]
    pub mean_length: f64,
    /// Mean DAA loss (of this row's objective and beta) on held-out preference pairs.
    #[serde(with = "f64_or_null")]
    pub heldout_loss: f64,
    /// Fraction of held-out pairs whose implicit reward ranks chosen strictly above rejected.
    #[serde(with = "f64_or_null")]
    pub implicit_accuracy: f64,
    /// Mean implicit reward beta * log(pi / pi_ref) of the chosen response on held-out pairs.
    #[serde(with = "f64_or_null")]
    pub chosen_reward: f64,
    /// Hash of the configuration that produced the row.
    pub config_hash: String,
    /// Length-corrected win rate (Fig. 3 left), when computed; see
    /// `analysis::length::length_controlled_win_rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length_corrected_win_rate: Option<f64>,
}

impl ResultRow {
    pub fn is_sft(&self) -> bool {
        self.objective == SFT
    }

    pub fn is_end_of_epoch(&self) -> bool {
        self.checkpoint >= END_OF_EPOCH
    }
}

/// One held-out policy sample, for the length regression of section 3.3 (Fig. 3 right).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRow {
    pub objective: String,
    #[serde(with = "f64_or_null")]
    pub beta: f64,
    pub size: String,
    #[serde(with = "f64_or_null")]
    pub checkpoint: f64,
    pub seed: u64,
    /// log pi(y|x) - log pi_ref(y|x) of the sample (summed over its tokens; no beta).
    #[serde(with = "f64_or_null")]
    pub log_ratio: f64,
    /// Length of the sample in tokens.
    pub length: usize,
}

/// The end state of one toy-MDP run (section 4), as the analysis needs it for claim C9.
///
/// The toy-MDP module fills it from its own output: after DAA training, with exact trajectory
/// probabilities of the tree MDP,
/// - `ood_mass`: total probability of the trajectories that are none of the SFT
///   demonstrations (never seen in the data);
/// - `preferred_mass`: probability of the preferred trajectory of the single preference;
/// - `top_ood_trajectory`: the out-of-distribution trajectory with the most probability,
///   written as its actions, e.g. `a1,a1,a1`;
/// - `sft_ood_mass` (optional): the OOD mass of the SFT policy before the DAA, so that the
///   analysis measures the mass the DAA moved; when absent it is taken as 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToyMdpSummary {
    pub objective: String,
    #[serde(with = "f64_or_null")]
    pub beta: f64,
    pub seed: u64,
    #[serde(with = "f64_or_null")]
    pub ood_mass: f64,
    #[serde(with = "f64_or_null")]
    pub preferred_mass: f64,
    pub top_ood_trajectory: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sft_ood_mass: Option<f64>,
}

/// Read result rows from a JSON-lines file (errors name the file and line).
pub fn read_result_rows(path: &Path) -> Result<Vec<ResultRow>> {
    crate::util::read_jsonl(path)
}

/// Read sample rows from a JSON-lines file.
pub fn read_sample_rows(path: &Path) -> Result<Vec<SampleRow>> {
    crate::util::read_jsonl(path)
}

/// Read toy-MDP summaries from a JSON-lines file.
pub fn read_toy_rows(path: &Path) -> Result<Vec<ToyMdpSummary>> {
    crate::util::read_jsonl(path)
}

/// Key of a float used for grouping (beta, checkpoint): rounded to 1e-9.
pub(crate) fn fkey(x: f64) -> i64 {
    (x * 1e9).round() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> ResultRow {
        ResultRow {
            objective: "dpo".into(),
            beta: 0.1,
            size: "small".into(),
            n_params: 30_000,
            checkpoint: 1.0,
            seed: 0,
            kl: 1.5,
            kl_se: 0.1,
            win_rate: 0.4,
            win_rate_lo: 0.37,
            win_rate_hi: 0.43,
            mean_length: 5.0,
            heldout_loss: 0.6,
            implicit_accuracy: 0.7,
            chosen_reward: -0.3,
            config_hash: "abc".into(),
            length_corrected_win_rate: None,
        }
    }

    #[test]
    fn nan_round_trips_as_null() {
        let mut r = row();
        r.heldout_loss = f64::NAN;
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains("\"heldout_loss\":null"), "{s}");
        assert!(!s.contains("length_corrected_win_rate"), "{s}");
        let back: ResultRow = serde_json::from_str(&s).unwrap();
        assert!(back.heldout_loss.is_nan());
        assert_eq!(back.win_rate, 0.4);
        assert_eq!(back.length_corrected_win_rate, None);
    }
}
