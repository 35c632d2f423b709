//! Data: tokenization and the data sets of both scales.
pub mod synthetic;
pub mod tldr;
pub mod tokenizer;
pub mod validate;

use serde::{Deserialize, Serialize};

/// A supervised example in token ids: the model learns `response` given `prompt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftExample {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
}

/// A preference pair in token ids: `chosen` preferred over `rejected` for `prompt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefExample {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// The reference code's truncation rule. Lengths count the EOS the scorer appends to the
/// response. If prompt + response + EOS exceeds `max_length`, the prompt is cut to
/// `max_prompt_length` keeping its START; if still too long, the response is cut to
/// `max_length - max_prompt_length - 1` tokens (leaving room for EOS).
pub fn truncate_pair(
    prompt: &[u32],
    response: &[u32],
    max_length: usize,
    max_prompt_length: usize,
) -> (Vec<u32>, Vec<u32>) {
    let mut p = prompt.to_vec();
    let mut r = response.to_vec();
    if p.len() + r.len() + 1 > max_length {
        p.truncate(max_prompt_length);
    }
    if p.len() + r.len() + 1 > max_length {
        r.truncate(max_length.saturating_sub(max_prompt_length + 1));
    }
    (p, r)
}

/// Truncate a preference pair: the prompt is cut once for the LONGER of the two responses (as
/// the reference code does), then each response to fit.
pub fn truncate_pref(ex: &PrefExample, max_length: usize, max_prompt_length: usize) -> PrefExample {
    let longer = if ex.chosen.len() >= ex.rejected.len() {
        &ex.chosen
    } else {
        &ex.rejected
    };
    let (p, _) = truncate_pair(&ex.prompt, longer, max_length, max_prompt_length);
    let (_, c) = truncate_pair(&p, &ex.chosen, max_length, max_prompt_length);
    let (_, r) = truncate_pair(&p, &ex.rejected, max_length, max_prompt_length);
    PrefExample {
        prompt: p,
        chosen: c,
        rejected: r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_prompt_start_then_cuts_response() {
        let p: Vec<u32> = (0..300).collect();
        let r: Vec<u32> = (1000..1400).collect();
        let (tp, tr) = truncate_pair(&p, &r, 512, 256);
        assert_eq!(tp, (0..256).collect::<Vec<_>>());
        assert_eq!(tr.len(), 255);
        assert_eq!(tp.len() + tr.len() + 1, 512);
        // Short pairs are untouched.
        let (a, b) = truncate_pair(&p[..10], &r[..10], 512, 256);
        assert_eq!((a.len(), b.len()), (10, 10));
        // Cutting the prompt can be enough.
        let long: Vec<u32> = (0..450).collect();
        let (a, b) = truncate_pair(&long, &r[..100], 512, 256);
        assert_eq!((a.len(), b.len()), (256, 100));
    }
}
