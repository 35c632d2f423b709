//! TOML run configurations for `overopt sft` and `overopt daa`. Unknown keys are rejected
//! with their name.

use super::daa::DaaConfig;
use super::optim::RmsPropConfig;
use super::trainer::LoopConfig;
use anyhow::{Context, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A model directory in the HF layout, or a hub id.
    pub source: String,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default = "default_dtype")]
    pub dtype: String,
    #[serde(default = "default_device")]
    pub device: String,
    /// Tokenizer file; by default the model's tokenizer.json.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Mixed precision: `"bf16"` (or `"f16"`) runs the matmuls in that dtype while the
    /// weights, gradients and optimizer state stay in `dtype` (see
    /// [`crate::model::GptNeoX::with_compute_dtype`]); `"off"` (the default) does not.
    #[serde(default)]
    pub autocast: Autocast,
    /// Activation checkpointing per layer (see [`crate::model::GptNeoX::with_checkpointing`]):
    /// the training step keeps one residual stream per layer instead of every layer's
    /// intermediates, for about one more forward pass of compute. For models whose activations
    /// do not fit; off by default (and not written out when off).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub checkpoint_layers: bool,
}

/// The `autocast` setting of a model; unknown names are rejected by serde with the list of
/// accepted ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Autocast {
    #[default]
    Off,
    Bf16,
    F16,
}

impl Autocast {
    /// The compute dtype, or None when off.
    pub fn dtype(self) -> Option<DType> {
        match self {
            Autocast::Off => None,
            Autocast::Bf16 => Some(DType::BF16),
            Autocast::F16 => Some(DType::F16),
        }
    }
}

fn default_dtype() -> String {
    "f32".into()
}
fn default_device() -> String {
    "cpu".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// JSON lines: {"prompt", "response"} for SFT, {"prompt", "chosen", "rejected"} for DAA.
    pub train: PathBuf,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    #[serde(default = "default_max_prompt_length")]
    pub max_prompt_length: usize,
}

fn default_max_length() -> usize {
    512
}
fn default_max_prompt_length() -> usize {
    256
}

/// A whole training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub out_dir: PathBuf,
    pub model: ModelSpec,
    pub data: DataSpec,
    #[serde(default)]
    pub train: LoopConfig,
    #[serde(default)]
    pub optim: RmsPropConfig,
    /// Only for `overopt daa`.
    #[serde(default)]
    pub daa: Option<DaaConfig>,
    /// The frozen reference for `overopt daa` (default: the model itself, i.e. the SFT policy).
    #[serde(default)]
    pub reference: Option<ModelSpec>,
}

impl RunConfig {
    pub fn from_toml(text: &str, ctx: &str) -> Result<Self> {
        let cfg: RunConfig =
            toml::from_str(text).with_context(|| format!("{ctx}: invalid run configuration"))?;
        cfg.train.validate().with_context(|| ctx.to_string())?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_toml(&text, &path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = r#"
out_dir = "runs/x"
[model]
source = "EleutherAI/pythia-1b"
autocast = "bf16"
[data]
train = "pairs.jsonl"
[train]
batch_size = 128
micro_batch_size = 16
[optim]
lr = 5e-7
warmup_steps = 150
[daa]
objective = { name = "dpo", label_smoothing = 0.0 }
beta = 0.1
"#;

    #[test]
    fn parses_and_rejects_unknown_keys() {
        let c = RunConfig::from_toml(CFG, "c.toml").unwrap();
        assert_eq!(c.train.accumulation_steps(), 8);
        assert_eq!(c.optim.max_grad_norm, Some(10.0));
        assert_eq!(c.daa.unwrap().beta, 0.1);
        assert_eq!(c.model.autocast.dtype(), Some(DType::BF16));
        assert_eq!(c.reference, None);
        assert!(!c.model.checkpoint_layers);
        let off = RunConfig::from_toml(&CFG.replace("autocast = \"bf16\"\n", ""), "c.toml");
        assert_eq!(off.unwrap().model.autocast, Autocast::Off);
        let ck = CFG.replace(
            "autocast = \"bf16\"",
            "autocast = \"bf16\"\ncheckpoint_layers = true",
        );
        let ck = RunConfig::from_toml(&ck, "c.toml").unwrap();
        assert!(ck.model.checkpoint_layers);
        // Off is the default and is not written out (run records of earlier runs stay the same).
        let written = serde_json::to_string(&c.model).unwrap();
        assert!(!written.contains("checkpoint"), "{written}");
        assert!(
            serde_json::to_string(&ck.model)
                .unwrap()
                .contains("\"checkpoint_layers\":true")
        );
        let bad = CFG.replace("autocast = \"bf16\"", "autocast = \"fp8\"");
        let e = format!("{:#}", RunConfig::from_toml(&bad, "c.toml").unwrap_err());
        assert!(
            e.contains("c.toml")
                && e.contains("autocast")
                && e.contains("fp8")
                && e.contains("bf16"),
            "{e}"
        );
        let bad = CFG.replace("warmup_steps = 150", "warmup_steps = 150\nwarmup = 3");
        let e = format!("{:#}", RunConfig::from_toml(&bad, "c.toml").unwrap_err());
        assert!(
            e.contains("c.toml") && e.contains("unknown field `warmup`"),
            "{e}"
        );
        let bad = CFG.replace("micro_batch_size = 16", "micro_batch_size = 48");
        let e = format!("{:#}", RunConfig::from_toml(&bad, "c.toml").unwrap_err());
        assert!(e.contains("micro_batch_size"), "{e}");
    }
}
