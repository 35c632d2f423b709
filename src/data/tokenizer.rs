//! One tokenization path for both scales: a `tokenizers` tokenizer read from `tokenizer.json`
//! (Pythia's BPE at paper scale, a word-level vocabulary at teach scale).

use anyhow::{Context, Result, anyhow};
use std::path::Path;

/// A tokenizer plus the special ids the pipeline needs.
#[derive(Clone)]
pub struct Tok {
    inner: tokenizers::Tokenizer,
    pub eos_id: u32,
    pub pad_id: u32,
}

impl std::fmt::Debug for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tok")
            .field("vocab_size", &self.vocab_size())
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// Names under which tokenizers commonly store their end-of-sequence token.
const EOS_NAMES: [&str; 4] = ["<|endoftext|>", "</s>", "[EOS]", "<eos>"];
const PAD_NAMES: [&str; 3] = ["<|padding|>", "[PAD]", "<pad>"];

impl Tok {
    /// Wrap a tokenizer. The EOS id is `eos_id` if given (from the model config), else found
    /// by its usual names. PAD is the tokenizer's own padding token where it has one (Pythia's
    /// `<|padding|>`, id 1), else EOS; padding is masked by position, never by id, so either
    /// choice gives the same scores.
    pub fn new(inner: tokenizers::Tokenizer, eos_id: Option<u32>, ctx: &str) -> Result<Self> {
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let eos_id = eos_id.or_else(|| find(&EOS_NAMES)).ok_or_else(|| {
            anyhow!("{ctx}: no end-of-sequence token (tried {EOS_NAMES:?}) and none given")
        })?;
        let pad_id = find(&PAD_NAMES).unwrap_or(eos_id);
        Ok(Self {
            inner,
            eos_id,
            pad_id,
        })
    }

    pub fn from_file(path: &Path, eos_id: Option<u32>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        Self::new(inner, eos_id, &path.display().to_string())
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("cannot tokenize {text:?}: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, dropping special tokens (EOS, padding).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("cannot decode {ids:?}: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let s = self
            .inner
            .to_string(true)
            .map_err(|e| anyhow!("cannot serialize tokenizer: {e}"))?;
        crate::util::write_atomic(path, s.as_bytes()).context("cannot save tokenizer")
    }
}
