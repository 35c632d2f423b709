//! Scoring: summed log-probabilities of responses given prompts (SPEC section 1).
//!
//! A sequence is prompt ++ response (++ EOS). Logits are cast to f32 before `log_softmax`;
//! the log-prob of token t+1 is read at position t (shift by one); prompt tokens and padding
//! are masked, so only response tokens (and the appended EOS) are scored.

use super::gpt_neox::{GptNeoX, OpPath, check_tokens};
use crate::data::validate::Limits;
use anyhow::{Result, bail};
use candle_core::{D, DType, Device, Tensor};

/// A right-padded batch of prompt + response sequences.
#[derive(Debug, Clone)]
pub struct SeqBatch {
    /// (b, T) token ids, right-padded.
    pub input_ids: Tensor,
    /// (b, T) 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// (b, T-1) the token each position predicts.
    pub targets: Tensor,
    /// (b, T-1) f32, 1 where the predicted token belongs to the response.
    pub label_mask: Tensor,
    /// Number of scored (response) tokens per row.
    pub n_response_tokens: Vec<usize>,
    /// The largest token id of the batch, its row and position: checked against the model's
    /// vocabulary on the host before scoring (a GPU's embedding lookup and gather do not check).
    pub max_token: (u32, usize, usize),
}

/// What `model` accepts as examples: token ids below its vocabulary, sequences within its
/// positions ([`crate::data::validate`] checks data sets against it before training).
pub fn limits(model: &GptNeoX) -> Limits {
    Limits {
        vocab: model.config().vocab_size,
        max_positions: model.config().max_position_embeddings,
    }
}

/// A scored row needs a prompt token (the first response token is predicted from it) and a
/// response token (EOS included when appended). The last guard: training data is checked
/// when it is loaded ([`crate::data::validate`]), where the example is named by its file and
/// line; here only the batch row is known, so callers add which examples the batch holds.
fn check_row(row: usize, prompt_len: usize, response_len: usize) -> Result<()> {
    if prompt_len == 0 {
        bail!(
            "batch row {row}: empty prompt (at least one token, e.g. BOS, is needed to score the first response token)"
        );
    }
    if response_len == 0 {
        bail!("batch row {row}: empty response and no EOS appended (nothing to score)");
    }
    Ok(())
}

/// Build a batch from token ids. With `append_eos`, EOS is appended to every response (the
/// reference code's rule for training and scoring); without it the responses are scored as
/// they are (for model samples, which carry their own EOS when they ended).
pub fn collate(
    prompts: &[&[u32]],
    responses: &[&[u32]],
    append_eos: Option<u32>,
    pad_id: u32,
    device: &Device,
) -> Result<SeqBatch> {
    if prompts.len() != responses.len() {
        bail!(
            "{} prompts but {} responses",
            prompts.len(),
            responses.len()
        );
    }
    if prompts.is_empty() {
        bail!("cannot score an empty batch");
    }
    let seqs: Vec<(Vec<u32>, usize)> = prompts
        .iter()
        .zip(responses)
        .map(|(p, r)| {
            let mut s = p.to_vec();
            s.extend_from_slice(r);
            if let Some(e) = append_eos {
                s.push(e);
            }
            (s, p.len())
        })
        .collect();
    for (i, (s, pl)) in seqs.iter().enumerate() {
        check_row(i, *pl, s.len() - pl)?;
    }
    let b = seqs.len();
    let t = seqs.iter().map(|(s, _)| s.len()).max().unwrap();
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0u8; b * t];
    let mut targets = vec![pad_id; b * (t - 1)];
    let mut lmask = vec![0f32; b * (t - 1)];
    let mut n_resp = Vec::with_capacity(b);
    for (i, (s, pl)) in seqs.iter().enumerate() {
        for (j, &tok) in s.iter().enumerate() {
            ids[i * t + j] = tok;
            mask[i * t + j] = 1;
            if j >= 1 {
                targets[i * (t - 1) + j - 1] = tok;
                if j >= *pl {
                    lmask[i * (t - 1) + j - 1] = 1.0;
                }
            }
        }
        n_resp.push(s.len() - pl);
    }
    let max_token = seqs
        .iter()
        .enumerate()
        .flat_map(|(i, (s, _))| s.iter().enumerate().map(move |(j, &t)| (t, i, j)))
        .fold((0, 0, 0), |m, x| if x.0 > m.0 { x } else { m });
    Ok(SeqBatch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        attention_mask: Tensor::from_vec(mask, (b, t), device)?,
        targets: Tensor::from_vec(targets, (b, t - 1), device)?,
        label_mask: Tensor::from_vec(lmask, (b, t - 1), device)?,
        n_response_tokens: n_resp,
        max_token,
    })
}

/// Per-position log-probs of the targets, (b, T-1) f32, zero outside the response.
/// Differentiable when the model is.
pub fn token_logps(model: &GptNeoX, batch: &SeqBatch) -> Result<Tensor> {
    let ((t, r, j), vocab) = (batch.max_token, model.config().vocab_size);
    if t as usize >= vocab {
        bail!("batch row {r}: token {t} at position {j} is beyond the vocabulary of {vocab}");
    }
    let logits = model.forward(&batch.input_ids, Some(&batch.attention_mask), None)?;
    let t = logits.dim(1)?;
    let picked = label_logps(
        &logits.narrow(1, 0, t - 1)?,
        &batch.targets,
        model.op_path(),
    )?;
    Ok(picked.mul(&batch.label_mask)?)
}

/// Log-probs of `targets` (.., u32) under `logits` (.., vocab): log_softmax over the vocabulary
/// in f32 (logits are cast first), read at the targets, (..) f32. On the CPU in f32 (except on
/// [`OpPath::Composite`] and [`OpPath::Recompute`]) with [`super::fused`]'s log-softmax;
/// composite ops on [`OpPath::Composite`]; elsewhere [`super::recompute::label_logps`], whose
/// graph node keeps the logits only.
fn label_logps(logits: &Tensor, targets: &Tensor, path: OpPath) -> Result<Tensor> {
    super::profile::section("fwd.logps", logits.device(), || {
        label_logps_on(logits, targets, path)
    })
}

fn label_logps_on(logits: &Tensor, targets: &Tensor, path: OpPath) -> Result<Tensor> {
    let pick = |logp: Tensor| -> Result<Tensor> {
        Ok(logp
            .gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
            .squeeze(D::Minus1)?)
    };
    // The fused kernels take the f32 cast of the logits: usable on the CPU.
    let fused = logits.device().is_cpu() && super::fused::usable(&[]);
    Ok(match path {
        OpPath::Composite => pick(candle_nn::ops::log_softmax(
            &logits.to_dtype(DType::F32)?,
            D::Minus1,
        )?)?,
        OpPath::Differentiable | OpPath::Fused if fused => pick(super::fused::log_softmax_last(
            &logits.to_dtype(DType::F32)?,
        )?)?,
        _ => super::recompute::label_logps(logits, targets)?,
    })
}

/// Summed log-probs of several responses to shared prompts, each prompt run through the
/// model once ([`GptNeoX::forward_shared_prefix`]): `responses` are (prompt index, tokens).
/// Returns (m,) f32 log-probs and the scored tokens per response (EOS included when
/// appended). The same values as [`collate`] + [`sequence_logps`] over `prompt ++ response`
/// rows; differentiable when the model is.
///
/// On the CPU in f32 the hand-written forward and backward of [`super::hand`] compute it (one
/// node of candle's graph, no padding); elsewhere candle's graph of
/// [`GptNeoX::forward_shared_prefix`]. [`shared_prefix_logps_via`] chooses explicitly.
pub fn shared_prefix_logps(
    model: &GptNeoX,
    prompts: &[&[u32]],
    responses: &[(usize, &[u32])],
    append_eos: Option<u32>,
    pad_id: u32,
) -> Result<(Tensor, Vec<usize>)> {
    let hand = super::hand::usable(model);
    shared_prefix_logps_via(model, prompts, responses, append_eos, pad_id, hand)
}

/// [`shared_prefix_logps`] with the implementation chosen: `hand` for [`super::hand`] (CPU,
/// f32 only), otherwise candle's graph.
pub fn shared_prefix_logps_via(
    model: &GptNeoX,
    prompts: &[&[u32]],
    responses: &[(usize, &[u32])],
    append_eos: Option<u32>,
    pad_id: u32,
    hand: bool,
) -> Result<(Tensor, Vec<usize>)> {
    let dev = model.device();
    let full: Vec<Vec<u32>> = responses
        .iter()
        .map(|(_, r)| {
            let mut s = r.to_vec();
            s.extend(append_eos);
            s
        })
        .collect();
    for (r, (s, (i, _))) in full.iter().zip(responses).enumerate() {
        match prompts.get(*i) {
            None => bail!(
                "batch row {r}: refers to prompt {i}, but the batch has {} prompts",
                prompts.len()
            ),
            Some(p) => check_row(r, p.len(), s.len())?,
        }
    }
    // The responses with EOS are the targets too.
    let vocab = model.config().vocab_size;
    check_tokens("batch prompt", prompts.iter().copied(), vocab)?;
    check_tokens("batch row", full.iter().map(|s| s.as_slice()), vocab)?;
    let lens = full.iter().map(|s| s.len()).collect();
    if hand {
        let rows: Vec<(usize, &[u32])> = full
            .iter()
            .zip(responses)
            .map(|(s, (i, _))| (*i, s.as_slice()))
            .collect();
        return Ok((
            super::hand::shared_prefix_logps(model, prompts, &rows)?,
            lens,
        ));
    }
    // Each response is scored from its prompt's last position (first token) and from its
    // own tokens but the last (the rest).
    let inputs: Vec<(usize, &[u32])> = full
        .iter()
        .zip(responses)
        .map(|(s, (i, _))| (*i, &s[..s.len() - 1]))
        .collect();
    let (first_logits, rest_logits) = model.forward_shared_prefix(prompts, &inputs, pad_id)?;
    let m = responses.len();
    let rows = Tensor::from_vec(
        responses.iter().map(|(i, _)| *i as u32).collect::<Vec<_>>(),
        m,
        dev,
    )?;
    let first_tok = Tensor::from_vec(full.iter().map(|s| s[0]).collect::<Vec<_>>(), m, dev)?;
    let path = model.op_path();
    let mut total = label_logps(&first_logits.index_select(&rows, 0)?, &first_tok, path)?;
    if let Some(rest) = rest_logits {
        let rm = rest.dim(1)?;
        let mut targets = vec![pad_id; m * rm];
        let mut mask = vec![0f32; m * rm];
        for (r, s) in full.iter().enumerate() {
            for (j, &tok) in s[1..].iter().enumerate() {
                targets[r * rm + j] = tok;
                mask[r * rm + j] = 1.0;
            }
        }
        let targets = Tensor::from_vec(targets, (m, rm), dev)?;
        let picked = label_logps(&rest, &targets, path)?;
        let mask = Tensor::from_vec(mask, (m, rm), dev)?;
        total = (total + picked.mul(&mask)?.sum(1)?)?;
    }
    Ok((total, lens))
}

/// Summed response log-probs, (b,) f32. Differentiable when the model is.
pub fn sequence_logps(model: &GptNeoX, batch: &SeqBatch) -> Result<Tensor> {
    Ok(token_logps(model, batch)?.sum(1)?)
}

/// Summed log-probs of many (prompt, response) pairs in micro-batches of `batch_size`,
/// without gradients; EOS appended to each response when `append_eos` is set.
pub fn score_pairs(
    model: &GptNeoX,
    prompts: &[Vec<u32>],
    responses: &[Vec<u32>],
    append_eos: Option<u32>,
    pad_id: u32,
    batch_size: usize,
) -> Result<Vec<(f64, usize)>> {
    let inf = model.inference_copy()?;
    let mut out = Vec::with_capacity(prompts.len());
    for start in (0..prompts.len()).step_by(batch_size.max(1)) {
        let end = (start + batch_size.max(1)).min(prompts.len());
        let p: Vec<&[u32]> = prompts[start..end].iter().map(|x| x.as_slice()).collect();
        let r: Vec<(usize, &[u32])> = responses[start..end]
            .iter()
            .enumerate()
            .map(|(k, x)| (k, x.as_slice()))
            .collect();
        let (lp, n_tokens) = shared_prefix_logps(&inf, &p, &r, append_eos, pad_id)?;
        out.extend(
            lp.to_vec1::<f32>()?
                .into_iter()
                .map(|x| x as f64)
                .zip(n_tokens),
        );
    }
    Ok(out)
}
