//! GPT-NeoX configuration as written by Hugging Face transformers (`config.json`).
//!
//! Both the classic Pythia keys (`rotary_pct`, `rotary_emb_base`) and the `rope_parameters`
//! form written by transformers 5 (`partial_rotary_factor`, `rope_theta`) are accepted. Keys the
//! model does not use are ignored; a missing required key or an impossible value is an error
//! that names the key.

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptNeoXConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    /// Fraction of each head's dimensions that receive rotary embeddings.
    pub rotary_pct: f64,
    pub rotary_emb_base: f64,
    pub layer_norm_eps: f64,
    pub use_parallel_residual: bool,
    pub hidden_act: String,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub initializer_range: f64,
}

fn req_usize(m: &Map<String, Value>, key: &str, ctx: &str) -> Result<usize> {
    let v = m
        .get(key)
        .ok_or_else(|| anyhow!("{ctx}: required field `{key}` is missing"))?;
    let n = v
        .as_u64()
        .ok_or_else(|| anyhow!("{ctx}: field `{key}` must be a positive integer, got {v}"))?;
    if n == 0 {
        bail!("{ctx}: field `{key}` must be positive, got 0");
    }
    Ok(n as usize)
}

fn opt_f64(m: &Map<String, Value>, key: &str, ctx: &str) -> Result<Option<f64>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| anyhow!("{ctx}: field `{key}` must be a number, got {v}")),
    }
}

fn opt_token(m: &Map<String, Value>, key: &str, ctx: &str) -> Result<Option<u32>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        // transformers allows a list of eos ids; the first one is the one generation uses.
        Some(Value::Array(a)) if !a.is_empty() => a[0]
            .as_u64()
            .map(|x| Some(x as u32))
            .ok_or_else(|| anyhow!("{ctx}: field `{key}` must hold token ids, got {}", a[0])),
        Some(v) => v
            .as_u64()
            .map(|x| Some(x as u32))
            .ok_or_else(|| anyhow!("{ctx}: field `{key}` must be a token id, got {v}")),
    }
}

impl GptNeoXConfig {
    /// Parse the text of an HF `config.json`; `ctx` names the file in errors.
    pub fn from_json_str(text: &str, ctx: &str) -> Result<Self> {
        let v: Value =
            serde_json::from_str(text).with_context(|| format!("{ctx}: not valid JSON"))?;
        let m = v
            .as_object()
            .ok_or_else(|| anyhow!("{ctx}: expected a JSON object"))?;
        if let Some(mt) = m.get("model_type").and_then(|x| x.as_str())
            && mt != "gpt_neox"
        {
            bail!("{ctx}: field `model_type` is {mt:?}, expected \"gpt_neox\"");
        }
        let vocab_size = req_usize(m, "vocab_size", ctx)?;
        let hidden_size = req_usize(m, "hidden_size", ctx)?;
        let num_hidden_layers = req_usize(m, "num_hidden_layers", ctx)?;
        let num_attention_heads = req_usize(m, "num_attention_heads", ctx)?;
        let intermediate_size = req_usize(m, "intermediate_size", ctx)?;
        let max_position_embeddings = req_usize(m, "max_position_embeddings", ctx)?;
        let rope = m.get("rope_parameters").and_then(|x| x.as_object());
        let rotary_pct = match opt_f64(m, "rotary_pct", ctx)? {
            Some(x) => x,
            None => match rope {
                Some(r) => opt_f64(r, "partial_rotary_factor", ctx)?.ok_or_else(|| {
                    anyhow!("{ctx}: required field `rope_parameters.partial_rotary_factor` (or `rotary_pct`) is missing")
                })?,
                None => bail!("{ctx}: required field `rotary_pct` (or `rope_parameters.partial_rotary_factor`) is missing"),
            },
        };
        let rotary_emb_base = match opt_f64(m, "rotary_emb_base", ctx)? {
            Some(x) => x,
            None => match rope {
                Some(r) => opt_f64(r, "rope_theta", ctx)?.ok_or_else(|| {
                    anyhow!("{ctx}: required field `rope_parameters.rope_theta` (or `rotary_emb_base`) is missing")
                })?,
                None => 10000.0,
            },
        };
        if let Some(r) = rope
            && let Some(t) = r.get("rope_type").and_then(|x| x.as_str())
            && t != "default"
        {
            bail!(
                "{ctx}: field `rope_parameters.rope_type` = {t:?} is not supported (only \"default\")"
            );
        }
        let layer_norm_eps = opt_f64(m, "layer_norm_eps", ctx)?.unwrap_or(1e-5);
        let use_parallel_residual = match m.get("use_parallel_residual") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => bail!("{ctx}: field `use_parallel_residual` must be a boolean, got {v}"),
        };
        let hidden_act = match m.get("hidden_act") {
            None => "gelu".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => bail!("{ctx}: field `hidden_act` must be a string, got {v}"),
        };
        if let Some(Value::Bool(true)) = m.get("tie_word_embeddings") {
            bail!(
                "{ctx}: field `tie_word_embeddings` = true is not supported (GPT-NeoX has an untied embed_out)"
            );
        }
        if let Some(Value::Bool(false)) = m.get("attention_bias") {
            bail!("{ctx}: field `attention_bias` = false is not supported");
        }
        let cfg = GptNeoXConfig {
            vocab_size,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            intermediate_size,
            max_position_embeddings,
            rotary_pct,
            rotary_emb_base,
            layer_norm_eps,
            use_parallel_residual,
            hidden_act,
            bos_token_id: opt_token(m, "bos_token_id", ctx)?,
            eos_token_id: opt_token(m, "eos_token_id", ctx)?,
            pad_token_id: opt_token(m, "pad_token_id", ctx)?,
            initializer_range: opt_f64(m, "initializer_range", ctx)?.unwrap_or(0.02),
        };
        cfg.validate(ctx)?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Check that the values describe a model that can exist.
    pub fn validate(&self, ctx: &str) -> Result<()> {
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "{ctx}: field `hidden_size` ({}) is not divisible by `num_attention_heads` ({})",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if !(self.rotary_pct > 0.0 && self.rotary_pct <= 1.0) {
            bail!(
                "{ctx}: field `rotary_pct` must be in (0, 1], got {}",
                self.rotary_pct
            );
        }
        if self.rotary_ndims() == 0 || !self.rotary_ndims().is_multiple_of(2) {
            bail!(
                "{ctx}: `rotary_pct` {} gives {} rotary dims per head of size {}; need an even positive number",
                self.rotary_pct,
                self.rotary_ndims(),
                self.head_size()
            );
        }
        if !(self.rotary_emb_base > 1.0) {
            bail!(
                "{ctx}: field `rotary_emb_base` must be > 1, got {}",
                self.rotary_emb_base
            );
        }
        if !(self.layer_norm_eps > 0.0) {
            bail!(
                "{ctx}: field `layer_norm_eps` must be > 0, got {}",
                self.layer_norm_eps
            );
        }
        if self.hidden_act != "gelu" {
            bail!(
                "{ctx}: field `hidden_act` = {:?} is not supported (Pythia uses exact \"gelu\")",
                self.hidden_act
            );
        }
        for (k, t) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if let Some(t) = t
                && t as usize >= self.vocab_size
            {
                bail!(
                    "{ctx}: field `{k}` = {t} is outside the vocabulary of {}",
                    self.vocab_size
                );
            }
        }
        Ok(())
    }

    pub fn head_size(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn rotary_ndims(&self) -> usize {
        (self.head_size() as f64 * self.rotary_pct) as usize
    }

    /// The classic HF `config.json` for this model, loadable by transformers
    /// (`GPTNeoXForCausalLM.from_pretrained`).
    pub fn to_hf_json(&self) -> Value {
        serde_json::json!({
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_emb_base,
            "layer_norm_eps": self.layer_norm_eps,
            "use_parallel_residual": self.use_parallel_residual,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": false,
            "attention_bias": true,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "classifier_dropout": 0.1,
            "use_cache": true,
            "torch_dtype": "float32",
        })
    }

    /// Number of parameters of the model this config describes.
    pub fn n_params(&self) -> usize {
        let h = self.hidden_size;
        let i = self.intermediate_size;
        let per_layer = 4 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h);
        2 * self.vocab_size * h + self.num_hidden_layers * per_layer + 2 * h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PYTHIA_70M: &str = r#"{
      "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
      "hidden_act": "gelu", "hidden_size": 512, "initializer_range": 0.02,
      "intermediate_size": 2048, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
      "model_type": "gpt_neox", "num_attention_heads": 8, "num_hidden_layers": 6,
      "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": false,
      "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": true,
      "use_parallel_residual": true, "vocab_size": 50304}"#;

    #[test]
    fn classic_pythia_config() {
        let c = GptNeoXConfig::from_json_str(PYTHIA_70M, "cfg").unwrap();
        assert_eq!(c.head_size(), 64);
        assert_eq!(c.rotary_ndims(), 16);
        assert_eq!(c.eos_token_id, Some(0));
        // Pythia-70m has 70,426,624 parameters.
        assert_eq!(c.n_params(), 70_426_624);
    }

    #[test]
    fn rope_parameters_form() {
        let text = PYTHIA_70M
            .replace("\"rotary_emb_base\": 10000, \"rotary_pct\": 0.25,", "\"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 500.0, \"partial_rotary_factor\": 0.5},");
        let c = GptNeoXConfig::from_json_str(&text, "cfg").unwrap();
        assert_eq!(c.rotary_pct, 0.5);
        assert_eq!(c.rotary_emb_base, 500.0);
    }

    #[test]
    fn missing_and_impossible_fields_are_named() {
        let text = PYTHIA_70M.replace("\"hidden_size\": 512,", "");
        let e = GptNeoXConfig::from_json_str(&text, "x.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.json") && e.contains("`hidden_size`"), "{e}");
        let text = PYTHIA_70M.replace("\"num_attention_heads\": 8", "\"num_attention_heads\": 7");
        let e = GptNeoXConfig::from_json_str(&text, "x.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
        let text = PYTHIA_70M.replace("\"rotary_pct\": 0.25", "\"rotary_pct\": 1.5");
        let e = GptNeoXConfig::from_json_str(&text, "x.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rotary_pct"), "{e}");
        let text = PYTHIA_70M.replace("\"vocab_size\": 50304", "\"vocab_size\": \"big\"");
        let e = GptNeoXConfig::from_json_str(&text, "x.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("vocab_size"), "{e}");
    }

    #[test]
    fn hf_json_round_trips() {
        let c = GptNeoXConfig::from_json_str(PYTHIA_70M, "cfg").unwrap();
        let back = GptNeoXConfig::from_json_str(&c.to_hf_json().to_string(), "rt").unwrap();
        assert_eq!(c, back);
    }
}
