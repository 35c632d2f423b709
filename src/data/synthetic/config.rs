//! Every knob of the teach-scale task, with the defaults of `paper/TEACH-TASK.md`.
//!
//! In TOML each group is a table (`[post]`, `[gold]`, ...); a missing table or key takes its
//! default, an unknown key is an error that names it.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// The whole task: vocabulary, posts, summaries, reference noise, gold reward and labeler.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskConfig {
    /// Seed of the task's "world": the fixed importance of every fact token. Data sets take
    /// their own seeds, so one world can hold many independent data sets.
    pub seed: u64,
    pub vocab: VocabConfig,
    pub post: PostConfig,
    pub summary: SummaryConfig,
    pub reference: ReferenceConfig,
    pub gold: GoldConfig,
    pub labeler: LabelerConfig,
}

/// Vocabulary layout: three special tokens (EOS/BOS, PAD, the "TL;DR:" separator), then the
/// fact tokens, then the filler tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VocabConfig {
    /// Number of fact tokens (each gets a fixed importance).
    pub n_facts: usize,
    /// Number of filler tokens (carry no information).
    pub n_fillers: usize,
}

impl Default for VocabConfig {
    fn default() -> Self {
        Self {
            n_facts: 40,
            n_fillers: 10,
        }
    }
}

/// Shape of a post: its length and how many distinct facts it holds (both uniform, inclusive).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostConfig {
    pub min_len: usize,
    pub max_len: usize,
    pub min_facts: usize,
    pub max_facts: usize,
}

impl Default for PostConfig {
    fn default() -> Self {
        Self {
            min_len: 10,
            max_len: 20,
            min_facts: 4,
            max_facts: 8,
        }
    }
}

/// What a summary is for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SummaryConfig {
    /// A good summary names this many of the post's most important facts.
    pub top_facts: usize,
    /// Most tokens a response may have, the EOS included (sample with this many new tokens).
    pub max_tokens: usize,
}

impl Default for SummaryConfig {
    fn default() -> Self {
        Self {
            top_facts: 3,
            max_tokens: 10,
        }
    }
}

/// Noise in the reference summaries, as fractions of ALL references (the rest are perfect).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReferenceConfig {
    /// Fraction that add 1..=`max_extra` other post tokens (fillers or lesser facts).
    pub frac_extra: f64,
    /// Fraction that swap one top fact for a lesser fact of the post.
    pub frac_swap: f64,
    /// Fraction that drop one top fact.
    pub frac_drop: f64,
    pub max_extra: usize,
}

impl Default for ReferenceConfig {
    fn default() -> Self {
        Self {
            frac_extra: 0.2,
            frac_swap: 0.1,
            frac_drop: 0.1,
            max_extra: 2,
        }
    }
}

/// Weights of the gold reward (see `docs/teach_task.md` for the formula).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GoldConfig {
    /// Reward for covering all top facts (each covered top fact earns coverage / top_facts).
    pub coverage: f64,
    /// Penalty per summary token absent from the post.
    pub hallucination: f64,
    /// Penalty per repeated token (each occurrence after a token's first).
    pub repetition: f64,
    /// Summary tokens allowed before the length penalty starts.
    pub length_budget: usize,
    /// Penalty per token beyond `length_budget`.
    pub over_budget: f64,
    /// Penalty when the response has no EOS within `summary.max_tokens`.
    pub unterminated: f64,
}

impl Default for GoldConfig {
    fn default() -> Self {
        Self {
            coverage: 1.0,
            hallucination: 0.5,
            repetition: 0.3,
            length_budget: 3,
            over_budget: 0.1,
            unterminated: 1.0,
        }
    }
}

/// The simulated labeler: Bradley-Terry on gold + length_bias * length + noise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LabelerConfig {
    /// Reward per summary token that the gold reward does not share (verbosity bias).
    pub length_bias: f64,
    /// Standard deviation of the Gaussian noise added to each candidate's labeler reward.
    pub noise_sd: f64,
    /// Bradley-Terry temperature: P(a chosen) = sigmoid((r_a - r_b) / temperature); 0 picks
    /// the higher reward (a fair coin on ties).
    pub temperature: f64,
}

impl Default for LabelerConfig {
    fn default() -> Self {
        Self {
            length_bias: 0.2,
            noise_sd: 0.05,
            temperature: 0.1,
        }
    }
}

fn finite_nonneg(x: f64, key: &str) -> Result<()> {
    if !x.is_finite() || x < 0.0 {
        bail!("task config: `{key}` must be a finite number >= 0, got {x}");
    }
    Ok(())
}

impl TaskConfig {
    /// Parse TOML text; `ctx` (e.g. the file name) prefixes errors.
    pub fn from_toml(text: &str, ctx: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| anyhow::anyhow!("{ctx}: {e}"))?;
        cfg.validate().map_err(|e| anyhow::anyhow!("{ctx}: {e}"))?;
        Ok(cfg)
    }

    /// TOML text of this config (every key written out).
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }

    /// Check that the knobs describe a task the generator can produce. Errors name the key.
    pub fn validate(&self) -> Result<()> {
        let (v, p, s, r) = (&self.vocab, &self.post, &self.summary, &self.reference);
        if v.n_fillers == 0 {
            bail!("task config: `vocab.n_fillers` must be at least 1");
        }
        if s.top_facts == 0 {
            bail!("task config: `summary.top_facts` must be at least 1");
        }
        if p.min_facts > p.max_facts {
            bail!(
                "task config: `post.min_facts` ({}) exceeds `post.max_facts` ({})",
                p.min_facts,
                p.max_facts
            );
        }
        if p.min_facts <= s.top_facts {
            bail!(
                "task config: `post.min_facts` ({}) must exceed `summary.top_facts` ({}) so every \
                 post has a lesser fact",
                p.min_facts,
                s.top_facts
            );
        }
        if p.max_facts > v.n_facts {
            bail!(
                "task config: `post.max_facts` ({}) exceeds `vocab.n_facts` ({})",
                p.max_facts,
                v.n_facts
            );
        }
        if p.min_len > p.max_len {
            bail!(
                "task config: `post.min_len` ({}) exceeds `post.max_len` ({})",
                p.min_len,
                p.max_len
            );
        }
        if p.min_len < p.max_facts {
            bail!(
                "task config: `post.min_len` ({}) is below `post.max_facts` ({}): a post could not \
                 hold its facts",
                p.min_len,
                p.max_facts
            );
        }
        if s.max_tokens < s.top_facts + r.max_extra + 1 {
            bail!(
                "task config: `summary.max_tokens` ({}) must hold `summary.top_facts` ({}) + \
                 `reference.max_extra` ({}) + EOS",
                s.max_tokens,
                s.top_facts,
                r.max_extra
            );
        }
        for (x, key) in [
            (r.frac_extra, "reference.frac_extra"),
            (r.frac_swap, "reference.frac_swap"),
            (r.frac_drop, "reference.frac_drop"),
        ] {
            if !(0.0..=1.0).contains(&x) {
                bail!("task config: `{key}` must lie in [0, 1], got {x}");
            }
        }
        let total = r.frac_extra + r.frac_swap + r.frac_drop;
        if total > 1.0 + 1e-12 {
            bail!("task config: reference.frac_extra + frac_swap + frac_drop = {total} exceeds 1");
        }
        if r.frac_extra > 0.0 && r.max_extra == 0 {
            bail!(
                "task config: `reference.max_extra` must be at least 1 when `reference.frac_extra` > 0"
            );
        }
        if r.frac_drop > 0.0 && s.top_facts < 2 {
            bail!(
                "task config: `reference.frac_drop` > 0 needs `summary.top_facts` >= 2 (no empty references)"
            );
        }
        let g = &self.gold;
        finite_nonneg(g.coverage, "gold.coverage")?;
        finite_nonneg(g.hallucination, "gold.hallucination")?;
        finite_nonneg(g.repetition, "gold.repetition")?;
        finite_nonneg(g.over_budget, "gold.over_budget")?;
        finite_nonneg(g.unterminated, "gold.unterminated")?;
        let l = &self.labeler;
        if !l.length_bias.is_finite() {
            bail!(
                "task config: `labeler.length_bias` must be finite, got {}",
                l.length_bias
            );
        }
        finite_nonneg(l.noise_sd, "labeler.noise_sd")?;
        finite_nonneg(l.temperature, "labeler.temperature")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let c = TaskConfig::default();
        c.validate().unwrap();
        let text = c.to_toml().unwrap();
        assert_eq!(TaskConfig::from_toml(&text, "t").unwrap(), c);
    }

    #[test]
    fn partial_toml_keeps_defaults() {
        let c = TaskConfig::from_toml("seed = 7\n[labeler]\nlength_bias = 0.0\n", "t").unwrap();
        assert_eq!(c.seed, 7);
        assert_eq!(c.labeler.length_bias, 0.0);
        assert_eq!(c.labeler.noise_sd, LabelerConfig::default().noise_sd);
        assert_eq!(c.post, PostConfig::default());
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let e = TaskConfig::from_toml("[gold]\nhallucinaton = 1.0\n", "task.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("task.toml") && e.contains("hallucinaton"), "{e}");
        let e = TaskConfig::from_toml("[post]\nmin_facts = 3\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("post.min_facts"), "{e}");
        let e = TaskConfig::from_toml("[reference]\nfrac_extra = 0.9\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("exceeds 1"), "{e}");
        let e = TaskConfig::from_toml("[summary]\nmax_tokens = 5\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("summary.max_tokens"), "{e}");
        let e = TaskConfig::from_toml("[labeler]\ntemperature = -1.0\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("labeler.temperature"), "{e}");
    }
}
