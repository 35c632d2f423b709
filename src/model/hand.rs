//! A hand-written forward and backward pass of GPT-NeoX for scoring and training on the CPU
//! in f32: summed log-probabilities of continuations of shared prompts (the quantity every
//! trainer and scorer of this crate needs) and their gradient with respect to every parameter.
//!
//! Why: with candle's autograd each graph node costs, besides its own work, a zero-filled
//! gradient buffer and an addition per operand, and each layer is a dozen nodes; on the teach
//! models that bookkeeping, the copies between layouts and the padding were more than half of
//! a DPO step (docs/perf.md). Here the whole model is ONE node of candle's graph, a custom op
//! over the parameters concatenated into one vector, so the loss, the optimizer and the
//! trainers keep using candle unchanged while the model's forward and backward run as plain
//! loops and [`super::gemm`] products over packed buffers:
//!
//! - tokens are packed without padding: each prompt's tokens, then the input tokens of each of
//!   its continuations, prompt by prompt. A continuation token attends to its prompt's tokens
//!   and to its own earlier tokens, exactly the keys it would see in a `prompt ++
//!   continuation` row; nothing is computed for padding;
//! - the logits are computed only where a log-prob is read: at each prompt's last token (the
//!   first token of its continuations) and at each continuation input token;
//! - work is split over threads by row blocks (products), by rows (layer norm, GELU) and by
//!   prompt (attention: a prompt and its continuations only see each other); each result is
//!   summed by one thread in a fixed order, so values do not depend on the thread count.
//!
//! [`super::score::shared_prefix_logps`] uses it whenever [`usable`] says so; the candle graph
//! computes the same function (tests/gpt_neox_parity.rs checks values and every parameter's
//! gradient against it, both residual layouts). `OVEROPT_NO_HAND=1` switches it off.

use super::fused::{
    cpu_values, dot, fast_exp, gelu, gelu_grad, layer_norm_bwd_row, rotate_half, rotate_half_bwd,
    row_stats, slice, x_wt, x_wt_bwd,
};
use super::gemm::{self, MatRef};
use super::gpt_neox::GptNeoX;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;
use std::sync::Mutex;

/// True when the hand-written path applies to `model`: f32 parameters on the CPU, no
/// autocast, the default op path, no activation checkpointing (which is candle's graph's), and
/// neither `OVEROPT_NO_HAND` nor `OVEROPT_NO_FUSED` set.
pub fn usable(model: &GptNeoX) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !*OFF.get_or_init(|| std::env::var_os("OVEROPT_NO_HAND").is_some())
        && super::fused::usable(&[])
        && model.device().is_cpu()
        && model.dtype() == DType::F32
        && model.compute_dtype() == DType::F32
        && matches!(
            model.op_path(),
            super::OpPath::Differentiable | super::OpPath::Fused
        )
        && !model.checkpointing()
}

/// Summed log-probs (m,) of `responses` (prompt index, tokens to score: the response with its
/// EOS, each non-empty) given `prompts` (each non-empty), differentiable with respect to the
/// model's parameters when they are variables. The caller checks the rows (see
/// [`super::score::shared_prefix_logps`]).
pub fn shared_prefix_logps(
    model: &GptNeoX,
    prompts: &[&[u32]],
    responses: &[(usize, &[u32])],
) -> Result<Tensor> {
    let (dims, spans, flat) = flat_parameters(model)?;
    let plan = Plan::new(prompts, responses, &dims)?;
    let save = flat.track_op();
    flat.apply_op1(HandOp {
        dims,
        spans,
        plan,
        save,
        saved: Mutex::new(None),
    })
}

/// The model's shapes, where each parameter lives in the concatenation, and the
/// concatenation itself (a node of candle's graph when the parameters are variables).
fn flat_parameters(model: &GptNeoX) -> Result<(Dims, Spans, Tensor)> {
    let dims = Dims::of(model)?;
    let params = model.named_parameters();
    let spans = Spans::of(&dims, &params)?;
    let flat = params
        .iter()
        .map(|(_, t)| t.flatten_all())
        .collect::<Result<Vec<_>>>()?;
    Ok((dims, spans, Tensor::cat(&flat, 0)?))
}

/// Shapes and constants of the model.
struct Dims {
    hidden: usize,
    heads: usize,
    head_size: usize,
    inter: usize,
    vocab: usize,
    layers: usize,
    eps: f64,
    parallel: bool,
    max_pos: usize,
    rot: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Dims {
    fn of(model: &GptNeoX) -> Result<Self> {
        let c = model.config();
        let (cos, sin) = model.rotary_values()?;
        Ok(Self {
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            head_size: c.head_size(),
            inter: c.intermediate_size,
            vocab: c.vocab_size,
            layers: c.num_hidden_layers,
            eps: c.layer_norm_eps,
            parallel: c.use_parallel_residual,
            max_pos: c.max_position_embeddings,
            rot: c.rotary_ndims(),
            cos,
            sin,
        })
    }

    /// The rotary tables at position `p`.
    fn table(&self, p: usize) -> (&[f32], &[f32]) {
        let r = p * self.rot..(p + 1) * self.rot;
        (&self.cos[r.clone()], &self.sin[r])
    }
}

/// Where a parameter lives in the concatenated vector: (offset, length).
#[derive(Clone, Copy, Debug)]
struct Span(usize, usize);

impl Span {
    fn of<'a>(&self, v: &'a [f32]) -> &'a [f32] {
        &v[self.0..self.0 + self.1]
    }

    fn of_mut<'a>(&self, v: &'a mut [f32]) -> &'a mut [f32] {
        &mut v[self.0..self.0 + self.1]
    }
}

/// A layer norm's weight and bias, or a linear layer's weight and bias.
#[derive(Clone, Copy, Debug)]
struct Pair {
    w: Span,
    b: Span,
}

#[derive(Debug)]
struct LayerSpans {
    ln1: Pair,
    ln2: Pair,
    qkv: Pair,
    dense: Pair,
    fc: Pair,
    out: Pair,
}

/// The parameters' places in the concatenation of [`GptNeoX::named_parameters`].
#[derive(Debug)]
struct Spans {
    embed: Span,
    layers: Vec<LayerSpans>,
    lnf: Pair,
    head: Span,
    total: usize,
}

impl Spans {
    fn of(d: &Dims, params: &[(String, Tensor)]) -> Result<Self> {
        let mut off = 0;
        let mut it = params.iter();
        let mut next = |name: &str, len: usize| -> Result<Span> {
            match it.next() {
                Some((n, t)) if n == name && t.elem_count() == len => {
                    off += len;
                    Ok(Span(off - len, len))
                }
                Some((n, t)) => bail!(
                    "hand-written path: parameter {n} ({} values) where {name} ({len}) was expected",
                    t.elem_count()
                ),
                None => bail!("hand-written path: parameter {name} missing"),
            }
        };
        let (h, i3, f) = (d.hidden, 3 * d.hidden, d.inter);
        let embed = next("gpt_neox.embed_in.weight", d.vocab * h)?;
        let mut layers = vec![];
        for l in 0..d.layers {
            let p = format!("gpt_neox.layers.{l}");
            let mut pair = |name: &str, w: usize, b: usize| -> Result<Pair> {
                Ok(Pair {
                    w: next(&format!("{p}.{name}.weight"), w)?,
                    b: next(&format!("{p}.{name}.bias"), b)?,
                })
            };
            layers.push(LayerSpans {
                ln1: pair("input_layernorm", h, h)?,
                ln2: pair("post_attention_layernorm", h, h)?,
                qkv: pair("attention.query_key_value", i3 * h, i3)?,
                dense: pair("attention.dense", h * h, h)?,
                fc: pair("mlp.dense_h_to_4h", f * h, f)?,
                out: pair("mlp.dense_4h_to_h", h * f, h)?,
            });
        }
        let lnf = Pair {
            w: next("gpt_neox.final_layer_norm.weight", h)?,
            b: next("gpt_neox.final_layer_norm.bias", h)?,
        };
        let head = next("embed_out.weight", d.vocab * h)?;
        if let Some((n, _)) = it.next() {
            bail!("hand-written path: unexpected parameter {n}");
        }
        Ok(Self {
            embed,
            layers,
            lnf,
            head,
            total: off,
        })
    }
}

/// The packed token layout of a batch.
struct Plan {
    tokens: Vec<u32>,
    pos: Vec<usize>,
    /// Token ranges of the groups (a prompt and its continuations).
    groups: Vec<(usize, usize)>,
    /// Per token, the key tokens it attends to: up to two (start, len) ranges.
    keys: Vec<[(usize, usize); 2]>,
    /// Prefix sums of the key counts (T + 1): where each token's probabilities are stored.
    key_off: Vec<usize>,
    /// Tokens whose logits are read.
    head_rows: Vec<usize>,
    /// (head row, target token, response) per scored token.
    picks: Vec<(usize, u32, usize)>,
    responses: usize,
}

impl Plan {
    fn new(prompts: &[&[u32]], responses: &[(usize, &[u32])], d: &Dims) -> Result<Self> {
        let n = prompts.len();
        let mut by_prompt: Vec<Vec<usize>> = vec![vec![]; n];
        for (r, (i, s)) in responses.iter().enumerate() {
            if *i >= n {
                bail!("hand-written path: response {r} continues prompt {i} of {n}");
            }
            if s.is_empty() {
                bail!("hand-written path: response {r} has no token to score");
            }
            by_prompt[*i].push(r);
        }
        let mut p = Plan {
            tokens: vec![],
            pos: vec![],
            groups: vec![],
            keys: vec![],
            key_off: vec![0],
            head_rows: vec![],
            picks: vec![],
            responses: responses.len(),
        };
        let vocab = d.vocab as u32;
        let check = |t: u32| -> Result<u32> {
            if t >= vocab {
                bail!("token id {t} is outside the vocabulary of {vocab}");
            }
            Ok(t)
        };
        let push = |p: &mut Plan, tok: u32, pos: usize, keys: [(usize, usize); 2]| {
            p.tokens.push(tok);
            p.pos.push(pos);
            p.keys.push(keys);
            let last = *p.key_off.last().unwrap_or(&0);
            p.key_off.push(last + keys[0].1 + keys[1].1);
        };
        for (i, prompt) in prompts.iter().enumerate() {
            if prompt.is_empty() {
                bail!("hand-written path: prompt {i} is empty");
            }
            let start = p.tokens.len();
            let pl = prompt.len();
            for (q, &t) in prompt.iter().enumerate() {
                push(&mut p, check(t)?, q, [(start, q + 1), (0, 0)]);
            }
            let last_row = p.head_rows.len();
            p.head_rows.push(start + pl - 1);
            for &r in &by_prompt[i] {
                let s = responses[r].1;
                if pl + s.len() - 1 > d.max_pos {
                    bail!(
                        "sequence of {} tokens is beyond max_position_embeddings {}",
                        pl + s.len() - 1,
                        d.max_pos
                    );
                }
                p.picks.push((last_row, check(s[0])?, r));
                let rs = p.tokens.len();
                for (j, &t) in s[..s.len() - 1].iter().enumerate() {
                    push(&mut p, check(t)?, pl + j, [(start, pl), (rs, j + 1)]);
                    p.picks.push((p.head_rows.len(), check(s[j + 1])?, r));
                    p.head_rows.push(rs + j);
                }
            }
            p.groups.push((start, p.tokens.len()));
        }
        if let Some(&mx) = p.pos.iter().max()
            && mx >= d.max_pos
        {
            bail!(
                "position {mx} is beyond max_position_embeddings {}",
                d.max_pos
            );
        }
        Ok(p)
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }
}

/// True when the CPU has AVX2 and FMA (checked once).
fn has_avx2() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `simd_fn! { fn name(args) -> R { body } }` defines `name` twice over: compiled for AVX2 +
/// FMA, used when the CPU has them, and for the crate's baseline target (SSE2 on x86-64).
/// The per-row loops of this module are plain Rust that the compiler vectorizes; the wider
/// instructions change no result (no reassociation is allowed).
macro_rules! simd_fn {
    ($(#[$m:meta])* fn $name:ident($($a:ident : $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn body($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                if has_avx2() {
                    // SAFETY: the CPU has the features `wide` is compiled for.
                    return unsafe { wide($($a),*) };
                }
            }
            body($($a),*)
        }
    };
}

simd_fn! {
    /// `out = gelu(u)` elementwise.
    fn gelu_slice(u: &[f32], out: &mut [f32]) {
        for (y, &x) in out.iter_mut().zip(u) {
            *y = gelu(x);
        }
    }
}

simd_fn! {
    /// `g *= gelu'(u)` elementwise.
    fn gelu_grad_mul(u: &[f32], g: &mut [f32]) {
        for (y, &x) in g.iter_mut().zip(u) {
            *y *= gelu_grad(x);
        }
    }
}

simd_fn! {
    /// Layer norm of a row `x` into its normalized values `xn` and the output `y`; returns
    /// 1/std.
    fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f64, xn: &mut [f32], y: &mut [f32]) -> f32 {
        let (mean, rs) = row_stats(x, eps);
        for j in 0..x.len() {
            xn[j] = (x[j] - mean) * rs;
            y[j] = xn[j] * w[j] + b[j];
        }
        rs
    }
}

/// Values (at least) a per-row loop must cover before it is split over threads: waking the
/// pool costs tens of microseconds on a small virtual machine, more than a small loop.
/// `OVEROPT_PAR_MIN` overrides it (for measurements).
fn par_min() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("OVEROPT_PAR_MIN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1 << 15)
    })
}

/// Rows per task when per-row loops are split over threads (a fixed size: sums over rows are
/// then made in the same order whatever the thread count).
const ROWS: usize = 32;

/// Apply `f(first_row, rows)` to consecutive blocks of `width`-wide rows of `out`, in parallel
/// when the kernels may use several threads.
fn row_blocks<F>(out: &mut [f32], width: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    let chunk = ROWS * width.max(1);
    if gemm::parallel_ok() && out.len() >= par_min() {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i * ROWS, c));
    } else {
        out.chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i * ROWS, c));
    }
}

/// A block of rows for [`layer_norm`]: normalized values, outputs, 1/std per row.
type RowBlock<'a> = ((&'a mut [f32], &'a mut [f32]), &'a mut [f32]);

/// A look at each layer's keys and values for [`layers_fwd`]: (layer, k, v).
type SeeKv<'a> = dyn FnMut(usize, &[f32], &[f32]) + 'a;

/// A layer's attention for [`layer_fwd`]: (q, k, v) -> (output, probabilities).
type Attend<'a> = dyn FnMut(&[f32], &[f32], &[f32]) -> (Vec<f32>, Vec<f32>) + 'a;

/// Layer norm of every row of `x` (rows, d): the normalized rows, 1/std per row, the output.
struct Norm {
    xn: Vec<f32>,
    rstd: Vec<f32>,
    y: Vec<f32>,
}

fn layer_norm(x: &[f32], d: usize, w: &[f32], b: &[f32], eps: f64) -> Norm {
    let rows = x.len() / d;
    let mut xn = vec![0f32; x.len()];
    let mut rstd = vec![0f32; rows];
    let mut y = vec![0f32; x.len()];
    let per_row = |r: usize, xn: &mut [f32], y: &mut [f32]| -> f32 {
        layer_norm_row(&x[r * d..(r + 1) * d], w, b, eps, xn, y)
    };
    let chunk = ROWS * d;
    let body = |(i, ((xc, yc), rc)): (usize, RowBlock)| {
        for (k, ((xr, yr), rr)) in xc
            .chunks_mut(d)
            .zip(yc.chunks_mut(d))
            .zip(rc.iter_mut())
            .enumerate()
        {
            *rr = per_row(i * ROWS + k, xr, yr);
        }
    };
    if gemm::parallel_ok() && x.len() >= par_min() {
        xn.par_chunks_mut(chunk)
            .zip(y.par_chunks_mut(chunk))
            .zip(rstd.par_chunks_mut(ROWS))
            .enumerate()
            .for_each(body);
    } else {
        xn.chunks_mut(chunk)
            .zip(y.chunks_mut(chunk))
            .zip(rstd.chunks_mut(ROWS))
            .enumerate()
            .for_each(body);
    }
    Norm { xn, rstd, y }
}

/// Backward of [`layer_norm`]: ADDS the input gradient to `dx`, writes the weight and bias
/// gradients. Per block of rows the weight and bias sums are kept apart and then added in
/// block order (the same order for any thread count).
fn layer_norm_bwd(n: &Norm, g: &[f32], w: &[f32], dx: &mut [f32], dw: &mut [f32], db: &mut [f32]) {
    let d = w.len();
    let block_body = |first: usize, dxc: &mut [f32]| -> (Vec<f64>, Vec<f64>) {
        let (mut sw, mut sb) = (vec![0f64; d], vec![0f64; d]);
        for (k, dxr) in dxc.chunks_mut(d).enumerate() {
            let r = first + k;
            let span = r * d..(r + 1) * d;
            layer_norm_bwd_row(
                &n.xn[span.clone()],
                n.rstd[r],
                &g[span],
                w,
                dxr,
                &mut sw,
                &mut sb,
            );
        }
        (sw, sb)
    };
    let block = |first: usize, dxc: &mut [f32]| -> (Vec<f64>, Vec<f64>) { block_body(first, dxc) };
    let chunk = ROWS * d;
    let parts: Vec<(Vec<f64>, Vec<f64>)> = if gemm::parallel_ok() && dx.len() >= par_min() {
        dx.par_chunks_mut(chunk)
            .enumerate()
            .map(|(i, c)| block(i * ROWS, c))
            .collect()
    } else {
        dx.chunks_mut(chunk)
            .enumerate()
            .map(|(i, c)| block(i * ROWS, c))
            .collect()
    };
    let (mut sw, mut sb) = (vec![0f64; d], vec![0f64; d]);
    for (pw, pb) in parts {
        for j in 0..d {
            sw[j] += pw[j];
            sb[j] += pb[j];
        }
    }
    for j in 0..d {
        dw[j] = sw[j] as f32;
        db[j] = sb[j] as f32;
    }
}

/// `x @ w^T + b` for x (rows, k), w (n, k).
fn linear(x: &[f32], w: &[f32], b: &[f32], k: usize) -> Vec<f32> {
    let n = b.len();
    x_wt(x, w, (x.len() / k, k, n), Some(b))
}

/// Backward of [`linear`] given the output gradient `g` (rows, n): writes the weight and bias
/// gradients and returns the input gradient (rows, k).
fn linear_bwd(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    k: usize,
    dw: &mut [f32],
    db: &mut [f32],
) -> Vec<f32> {
    let n = db.len();
    x_wt_bwd(x, w, g, (x.len() / k, k, n), dw, Some(db))
}

/// What the backward pass needs of one layer.
struct LayerSave {
    n1: Norm,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    a: Vec<f32>,
    n2: Norm,
    u: Vec<f32>,
    g: Vec<f32>,
}

/// What the backward pass needs of the forward.
struct Saved {
    layers: Vec<LayerSave>,
    nf: Norm,
    /// softmax of the logits at the head rows (S, vocab).
    probs: Vec<f32>,
}

/// Split `buf` (rows of `width`) into the groups' row ranges.
fn group_slices<'a>(
    mut buf: &'a mut [f32],
    width: usize,
    groups: &[(usize, usize)],
) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(groups.len());
    for &(s, e) in groups {
        let (head, rest) = std::mem::take(&mut buf).split_at_mut((e - s) * width);
        out.push(head);
        buf = rest;
    }
    out
}

/// Run `f(group index, slices)` for every group, in parallel when allowed and `work` (about
/// the values touched) is large enough.
fn for_groups<T: Send, F>(items: Vec<T>, work: usize, f: F)
where
    F: Fn(usize, T) + Sync + Send,
{
    if gemm::parallel_ok() && items.len() > 1 && work >= par_min() {
        items.into_par_iter().enumerate().for_each(|(i, t)| f(i, t));
    } else {
        items.into_iter().enumerate().for_each(|(i, t)| f(i, t));
    }
}

/// Softmax of each head's scores in place (`pr`: heads x nk), summed in key order.
#[inline(always)]
fn softmax_heads(pr: &mut [f32], nk: usize) {
    for ph in pr.chunks_exact_mut(nk) {
        let mx = ph.iter().fold(f32::NEG_INFINITY, |m, &p| m.max(p));
        // The exponentials in a loop of their own (it vectorizes), then their sum in order.
        for p in ph.iter_mut() {
            *p = fast_exp(*p - mx);
        }
        let mut sum = 0f32;
        for p in ph.iter() {
            sum += *p;
        }
        let inv = 1.0 / sum;
        for p in ph.iter_mut() {
            *p *= inv;
        }
    }
}

/// One token's attention inputs: its query `q` (hidden wide, head `h` at `h * hs`), the keys
/// and values `kv`, whose key `j` is the hidden-wide row starting at `at(j)` in `kv.0` /
/// `kv.1`, and the scale of the scores.
struct Query<'a, F: Fn(usize) -> usize> {
    hs: usize,
    q: &'a [f32],
    kv: (&'a [f32], &'a [f32]),
    at: F,
    scale: f32,
}

/// The scores of keys `from..nk` for every head of token `t`: `pr[h * nk + j]` (heads x nk)
/// = `score(query of head h, key j of head h) * scale`.
#[inline(always)]
fn scores_from<F: Fn(usize) -> usize>(
    t: &Query<F>,
    pr: &mut [f32],
    from: usize,
    score: impl Fn(&[f32], &[f32]) -> f32,
) {
    let (hs, hd) = (t.hs, t.q.len());
    let nk = pr.len() / (hd / hs);
    for j in from..nk {
        let kr = &t.kv.0[(t.at)(j)..][..hd];
        for (h, (qh, kh)) in t.q.chunks_exact(hs).zip(kr.chunks_exact(hs)).enumerate() {
            pr[h * nk + j] = score(qh, kh) * t.scale;
        }
    }
}

/// Attention of token `t` over `nk` keys, every head (see [`Query`]). Writes the probabilities to `pr` (heads x nk) and ADDS the output to `out` (hidden): the
/// scores are [`dot`] of a head's query and key times `scale`, [`softmax_heads`] makes them
/// probabilities, and each head's values are added to its output in key order. This is the
/// version in plain loops, for the CPUs and head sizes that [`attend_heads`] does not write
/// with vector instructions.
#[inline(always)]
fn attend_heads_portable<F: Fn(usize) -> usize>(t: &Query<F>, pr: &mut [f32], out: &mut [f32]) {
    let (hs, hd) = (t.hs, t.q.len());
    let nk = pr.len() / (hd / hs);
    scores_from(t, pr, 0, dot);
    softmax_heads(pr, nk);
    for j in 0..nk {
        let vr = &t.kv.1[(t.at)(j)..][..hd];
        for (h, (o, x)) in out
            .chunks_exact_mut(hs)
            .zip(vr.chunks_exact(hs))
            .enumerate()
        {
            let p = pr[h * nk + j];
            for (o, &x) in o.iter_mut().zip(x) {
                *o += p * x;
            }
        }
    }
}

/// The attention of one token over its keys, every head ([`attend_heads_portable`] says
/// what it computes): with AVX2 and a head size that is a multiple of 8, written with vector
/// instructions (the compiler left these short loops scalar); the same bits either way
/// (tested).
fn attend_heads<F: Fn(usize) -> usize>(t: &Query<F>, pr: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if t.hs.is_multiple_of(8) && has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA; every access is bounds-checked by slicing.
        unsafe { avx::attend_heads(t, pr, out) };
        return;
    }
    attend_heads_portable(t, pr, out)
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::{Query, scores_from, softmax_heads};
    use std::arch::x86_64::*;

    // The helpers below are safe functions that use AVX intrinsics: they are only called
    // from `attend_heads` (compiled for AVX2 + FMA, entered when the CPU has them) and are
    // inlined there.

    /// The eight partial sums of [`super::dot`] of two rows of a multiple of 8 values (the
    /// first added to +0, as `dot` starts).
    #[inline(always)]
    fn partial_sums(a: &[f32], b: &[f32]) -> __m256 {
        // SAFETY: AVX is enabled where this is inlined; loads read chunks of eight values.
        unsafe {
            let mut acc = _mm256_setzero_ps();
            for (a, b) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
                let (a, b) = (_mm256_loadu_ps(a.as_ptr()), _mm256_loadu_ps(b.as_ptr()));
                acc = _mm256_add_ps(acc, _mm256_mul_ps(a, b));
            }
            acc
        }
    }

    /// [`super::dot`] of two rows of a multiple of 8 values: the partial sums added in order.
    #[inline(always)]
    fn dot8(a: &[f32], b: &[f32]) -> f32 {
        let mut t = [0f32; 8];
        // SAFETY: as above; `t` holds eight values.
        unsafe { _mm256_storeu_ps(t.as_mut_ptr(), partial_sums(a, b)) };
        t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7]
    }

    /// Lane `k` of the result = the lanes of `v[k]` added in order, as in [`dot8`]: an 8 x 8
    /// transpose, then seven additions of whole vectors.
    #[inline(always)]
    fn lane_sums8(v: &[__m256; 8]) -> __m256 {
        // SAFETY: AVX is enabled where this is inlined.
        unsafe {
            let t0 = _mm256_unpacklo_ps(v[0], v[1]);
            let t1 = _mm256_unpackhi_ps(v[0], v[1]);
            let t2 = _mm256_unpacklo_ps(v[2], v[3]);
            let t3 = _mm256_unpackhi_ps(v[2], v[3]);
            let t4 = _mm256_unpacklo_ps(v[4], v[5]);
            let t5 = _mm256_unpackhi_ps(v[4], v[5]);
            let t6 = _mm256_unpacklo_ps(v[6], v[7]);
            let t7 = _mm256_unpackhi_ps(v[6], v[7]);
            // s0: element 0 of rows 0-3 | element 4 of rows 0-3; s1: elements 1 | 5, ...
            let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            // c[e]: element e of the eight rows.
            let c = [
                _mm256_permute2f128_ps::<0x20>(s0, s4),
                _mm256_permute2f128_ps::<0x20>(s1, s5),
                _mm256_permute2f128_ps::<0x20>(s2, s6),
                _mm256_permute2f128_ps::<0x20>(s3, s7),
                _mm256_permute2f128_ps::<0x31>(s0, s4),
                _mm256_permute2f128_ps::<0x31>(s1, s5),
                _mm256_permute2f128_ps::<0x31>(s2, s6),
                _mm256_permute2f128_ps::<0x31>(s3, s7),
            ];
            let mut sum = c[0];
            for x in &c[1..] {
                sum = _mm256_add_ps(sum, *x);
            }
            sum
        }
    }

    /// [`super::attend_heads_portable`] for a head size `hs` that is a multiple of 8: the
    /// scores of eight keys at a time (one vector of eight dot products), the output 64
    /// values at a time held in registers over the keys.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_heads<F: Fn(usize) -> usize>(
        t: &Query<F>,
        pr: &mut [f32],
        out: &mut [f32],
    ) {
        let (hs, hd, keys) = (t.hs, t.q.len(), t.kv.0);
        assert!(hs % 8 == 0 && out.len() == hd);
        let nk = pr.len() / (hd / hs);
        let full = nk / 8 * 8;
        let mut rows = [&keys[..0]; 8];
        let mut acc = [_mm256_setzero_ps(); 8];
        for j0 in (0..full).step_by(8) {
            for (i, r) in rows.iter_mut().enumerate() {
                *r = &keys[(t.at)(j0 + i)..][..hd];
            }
            for (h, qh) in t.q.chunks_exact(hs).enumerate() {
                for (a, r) in acc.iter_mut().zip(&rows) {
                    *a = partial_sums(qh, &r[h * hs..][..hs]);
                }
                let s = _mm256_mul_ps(lane_sums8(&acc), _mm256_set1_ps(t.scale));
                let dst = &mut pr[h * nk + j0..][..8];
                // SAFETY: `dst` holds eight values.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), s) };
            }
        }
        // A closure, not the function item: the item's call went through a shim that was
        // not inlined, which left the intrinsics as calls.
        #[allow(clippy::redundant_closure)]
        scores_from(t, pr, full, |a, b| dot8(a, b));
        softmax_heads(pr, nk);
        let mut c0 = 0;
        while c0 < hd {
            if hd - c0 >= 64 {
                accumulate::<8>(c0, hs, nk, pr, t.kv.1, &t.at, out);
                c0 += 64;
            } else {
                accumulate::<1>(c0, hs, nk, pr, t.kv.1, &t.at, out);
                c0 += 8;
            }
        }
    }

    /// `out[c0 .. c0 + 8 NV] += sum_j p(head, j) v_j[c0 ..]`, added key by key.
    #[inline(always)]
    fn accumulate<const NV: usize>(
        c0: usize,
        hs: usize,
        nk: usize,
        pr: &[f32],
        vals: &[f32],
        at: &impl Fn(usize) -> usize,
        out: &mut [f32],
    ) {
        // SAFETY: AVX is enabled where this is inlined; loads and stores stay within slices
        // of eight values.
        unsafe {
            let span = &mut out[c0..][..8 * NV];
            let mut o = [_mm256_setzero_ps(); NV];
            let mut rows = [&pr[..0]; NV];
            for i in 0..NV {
                o[i] = _mm256_loadu_ps(span[8 * i..][..8].as_ptr());
                rows[i] = &pr[(c0 + 8 * i) / hs * nk..][..nk];
            }
            for j in 0..nk {
                let vr = &vals[at(j) + c0..][..8 * NV];
                for i in 0..NV {
                    let x = _mm256_loadu_ps(vr[8 * i..][..8].as_ptr());
                    o[i] = _mm256_add_ps(o[i], _mm256_mul_ps(_mm256_set1_ps(rows[i][j]), x));
                }
            }
            for i in 0..NV {
                _mm256_storeu_ps(span[8 * i..][..8].as_mut_ptr(), o[i]);
            }
        }
    }
}

/// Causal attention over the packed tokens: returns the output (T, hidden) and the
/// probabilities (per token and head, over its keys).
fn attention(d: &Dims, plan: &Plan, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (hd, heads) = (d.hidden, d.heads);
    let t_all = plan.len();
    let mut a = vec![0f32; t_all * hd];
    let mut probs = vec![0f32; plan.key_off[t_all] * heads];
    let groups = &plan.groups;
    let pg: Vec<(usize, usize)> = groups
        .iter()
        .map(|&(s, e)| (plan.key_off[s] * heads, plan.key_off[e] * heads))
        .collect();
    let items: Vec<_> = group_slices(&mut a, hd, groups)
        .into_iter()
        .zip(group_slices(&mut probs, 1, &pg))
        .collect();
    for_groups(items, plan.key_off[t_all] * hd, |gi, (ag, pgs)| {
        let (gs, ge) = groups[gi];
        let p0 = plan.key_off[gs] * heads;
        for t in gs..ge {
            let pr = &mut pgs[plan.key_off[t] * heads - p0..plan.key_off[t + 1] * heads - p0];
            attend_token(d, plan, (q, k, v), t, pr, &mut ag[(t - gs) * hd..][..hd]);
        }
    });
    (a, probs)
}

/// The attention of token `t` over its keys, every head: the probabilities go to `pr`
/// (heads x keys), the output is ADDED to `out` (hidden).
fn attend_token(
    d: &Dims,
    plan: &Plan,
    (q, k, v): (&[f32], &[f32], &[f32]),
    t: usize,
    pr: &mut [f32],
    out: &mut [f32],
) {
    let (hd, hs) = (d.hidden, d.head_size);
    let scale = 1.0 / (hs as f32).sqrt();
    let keys = plan.keys[t];
    let (s0, l0, s1) = (keys[0].0, keys[0].1, keys[1].0);
    let query = Query {
        hs,
        q: &q[t * hd..][..hd],
        kv: (k, v),
        at: |j| (if j < l0 { s0 + j } else { s1 + j - l0 }) * hd,
        scale,
    };
    attend_heads(&query, pr, out);
}

/// [`attention`] for the query tokens `rows` only: their outputs, (rows.len(), hidden).
fn attention_rows(
    d: &Dims,
    plan: &Plan,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rows: &[usize],
) -> Vec<f32> {
    let hd = d.hidden;
    let mut a = vec![0f32; rows.len() * hd];
    row_blocks(&mut a, hd, |first, out| {
        let mut pr = vec![0f32; d.heads * (d.max_pos + 1)];
        for (ii, o) in out.chunks_mut(hd).enumerate() {
            let t = rows[first + ii];
            let n = (plan.key_off[t + 1] - plan.key_off[t]) * d.heads;
            attend_token(d, plan, (q, k, v), t, &mut pr[..n], o);
        }
    });
    a
}

/// Backward of [`attention`] given the output gradient `da`: (dq, dk, dv), (T, hidden) each,
/// with respect to the rotated queries and keys.
fn attention_bwd(
    d: &Dims,
    plan: &Plan,
    s: &LayerSave,
    da: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (hd, heads, hs) = (d.hidden, d.heads, d.head_size);
    let scale = 1.0 / (hs as f32).sqrt();
    let t_all = plan.len();
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; t_all * hd],
        vec![0f32; t_all * hd],
        vec![0f32; t_all * hd],
    );
    let groups = &plan.groups;
    let items: Vec<_> = group_slices(&mut dq, hd, groups)
        .into_iter()
        .zip(group_slices(&mut dk, hd, groups))
        .zip(group_slices(&mut dv, hd, groups))
        .collect();
    let (q, k, v) = (&s.q, &s.k, &s.v);
    for_groups(items, plan.key_off[t_all] * hd, |gi, ((dqg, dkg), dvg)| {
        let (gs, ge) = groups[gi];
        let mut dp = vec![0f32; d.max_pos + 1];
        for t in gs..ge {
            let keys = plan.keys[t];
            let nk = keys[0].1 + keys[1].1;
            for h in 0..heads {
                let pr = &s.probs[plan.key_off[t] * heads + h * nk..][..nk];
                let dat = &da[t * hd + h * hs..][..hs];
                let mut j = 0;
                let mut sum = 0f32;
                for &(st, len) in &keys {
                    for kt in st..st + len {
                        dp[j] = dot(dat, &v[kt * hd + h * hs..][..hs]);
                        sum += pr[j] * dp[j];
                        j += 1;
                    }
                }
                let qv = &q[t * hd + h * hs..][..hs];
                let mut j = 0;
                for &(st, len) in &keys {
                    for kt in st..st + len {
                        let ds = pr[j] * (dp[j] - sum) * scale;
                        let kl = (kt - gs) * hd + h * hs;
                        let kr = &k[kt * hd + h * hs..][..hs];
                        let dqt = &mut dqg[(t - gs) * hd + h * hs..][..hs];
                        for (o, &x) in dqt.iter_mut().zip(kr) {
                            *o += ds * x;
                        }
                        for (o, &x) in dkg[kl..kl + hs].iter_mut().zip(qv) {
                            *o += ds * x;
                        }
                        let p = pr[j];
                        for (o, &x) in dvg[kl..kl + hs].iter_mut().zip(dat) {
                            *o += p * x;
                        }
                        j += 1;
                    }
                }
            }
        }
    });
    (dq, dk, dv)
}

/// q, k, v (T, hidden) each from the fused projection (T, 3 hidden; per head [q | k | v]),
/// q and k rotated at each token's position.
fn split_heads(d: &Dims, pos: &[usize], qkv: &[f32]) -> [Vec<f32>; 3] {
    let (hd, heads, hs) = (d.hidden, d.heads, d.head_size);
    let mut out = [
        vec![0f32; qkv.len() / 3],
        vec![0f32; qkv.len() / 3],
        vec![0f32; qkv.len() / 3],
    ];
    for (part, o) in out.iter_mut().enumerate() {
        row_blocks(o, hd, |first, rows| {
            for (kk, row) in rows.chunks_mut(hd).enumerate() {
                let t = first + kk;
                let (c, s) = d.table(pos[t]);
                let (c, s) = if part < 2 { (c, s) } else { (&c[..0], &s[..0]) };
                for h in 0..heads {
                    let src = &qkv[t * 3 * hd + (h * 3 + part) * hs..][..hs];
                    rotate_half(src, c, s, &mut row[h * hs..(h + 1) * hs]);
                }
            }
        });
    }
    out
}

/// Backward of [`split_heads`]: the gradient of the fused projection (T, 3 hidden).
fn split_heads_bwd(d: &Dims, plan: &Plan, grads: [&[f32]; 3]) -> Vec<f32> {
    let (hd, heads, hs) = (d.hidden, d.heads, d.head_size);
    let mut out = vec![0f32; plan.len() * 3 * hd];
    row_blocks(&mut out, 3 * hd, |first, rows| {
        for (kk, row) in rows.chunks_mut(3 * hd).enumerate() {
            let t = first + kk;
            let (c, s) = d.table(plan.pos[t]);
            for (part, g) in grads.iter().enumerate() {
                let (c, s) = if part < 2 { (c, s) } else { (&c[..0], &s[..0]) };
                for h in 0..heads {
                    let gr = &g[t * hd + h * hs..][..hs];
                    rotate_half_bwd(gr, c, s, &mut row[(h * 3 + part) * hs..][..hs]);
                }
            }
        }
    });
    out
}

/// The embeddings of `tokens`, (T, hidden).
fn embed(d: &Dims, sp: &Spans, p: &[f32], tokens: &[u32]) -> Vec<f32> {
    let hd = d.hidden;
    let emb = sp.embed.of(p);
    let mut x = vec![0f32; tokens.len() * hd];
    for (row, &t) in x.chunks_exact_mut(hd).zip(tokens) {
        row.copy_from_slice(&emb[t as usize * hd..(t as usize + 1) * hd]);
    }
    x
}

/// One layer over tokens `x` (T, hidden) at positions `pos`; `attend(q, k, v)` returns the
/// attention output and the probabilities. Returns the layer's output and what its backward
/// needs. With `keep`, only those rows' outputs are wanted (all rows still give their keys
/// and values): `attend` returns the attention output of those rows only, and the output is
/// (keep.len(), hidden).
fn layer_fwd(
    d: &Dims,
    ls: &LayerSpans,
    p: &[f32],
    x: &[f32],
    pos: &[usize],
    keep: Option<&[usize]>,
    attend: &mut Attend,
) -> (Vec<f32>, LayerSave) {
    let hd = d.hidden;
    let n1 = layer_norm(x, hd, ls.ln1.w.of(p), ls.ln1.b.of(p), d.eps);
    let qkv = linear(&n1.y, ls.qkv.w.of(p), ls.qkv.b.of(p), hd);
    let [q, k, v] = split_heads(d, pos, &qkv);
    drop(qkv);
    let (a, probs) = attend(&q, &k, &v);
    // Past the keys and values, only the rows in `keep` (when given) go on.
    let kept;
    let x = match keep {
        Some(rows) => {
            kept = gather_rows(x, rows, hd);
            &kept[..]
        }
        None => x,
    };
    let o = linear(&a, ls.dense.w.of(p), ls.dense.b.of(p), hd);
    // Parallel residual: x + attn(ln1 x) + mlp(ln2 x); sequential: h = x + attn(ln1 x),
    // h + mlp(ln2 h).
    let mid: Vec<f32> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
    let n2 = layer_norm(
        if d.parallel { x } else { &mid },
        hd,
        ls.ln2.w.of(p),
        ls.ln2.b.of(p),
        d.eps,
    );
    let u = linear(&n2.y, ls.fc.w.of(p), ls.fc.b.of(p), hd);
    let mut g = vec![0f32; u.len()];
    row_blocks(&mut g, d.inter, |first, rows| {
        gelu_slice(&u[first * d.inter..][..rows.len()], rows);
    });
    let m = linear(&g, ls.out.w.of(p), ls.out.b.of(p), d.inter);
    let out = mid.iter().zip(&m).map(|(a, b)| a + b).collect();
    (
        out,
        LayerSave {
            n1,
            q,
            k,
            v,
            probs,
            a,
            n2,
            u,
            g,
        },
    )
}

/// Final layer norm and output projection of the rows `rows` of `x`: the norm and the logits
/// (rows, vocab).
fn head(d: &Dims, sp: &Spans, p: &[f32], x: &[f32], rows: &[usize]) -> (Norm, Vec<f32>) {
    let hd = d.hidden;
    let s_rows = rows.len();
    let xs = gather_rows(x, rows, hd);
    let nf = layer_norm(&xs, hd, sp.lnf.w.of(p), sp.lnf.b.of(p), d.eps);
    let mut logits = vec![0f32; s_rows * d.vocab];
    gemm::sgemm(
        MatRef::row_major(&nf.y, s_rows, hd),
        MatRef::row_major(sp.head.of(p), d.vocab, hd).t(),
        &mut logits,
        false,
    );
    (nf, logits)
}

/// Rows `rows` of `x` (rows of `width`), in that order.
fn gather_rows(x: &[f32], rows: &[usize], width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * width);
    for &t in rows {
        out.extend_from_slice(&x[t * width..(t + 1) * width]);
    }
    out
}

/// The layers over the packed tokens of `plan`. Returns the hidden states and, for each of
/// `plan.head_rows`, the row of them that holds it. With `keep_last` the last layer goes past
/// its keys and values for the head rows only. `kv(layer, k, v)` sees each layer's keys and
/// values, `save` each layer's saved activations.
fn layers_fwd(
    d: &Dims,
    sp: &Spans,
    p: &[f32],
    plan: &Plan,
    keep_last: bool,
    kv: &mut SeeKv,
    save: &mut dyn FnMut(LayerSave),
) -> (Vec<f32>, Vec<usize>) {
    let mut x = embed(d, sp, p, &plan.tokens);
    let mut rows = plan.head_rows.clone();
    let last = sp.layers.len().saturating_sub(1);
    for (l, ls) in sp.layers.iter().enumerate() {
        let keep = (keep_last && l == last).then_some(&plan.head_rows[..]);
        let (out, saved) = layer_fwd(d, ls, p, &x, &plan.pos, keep, &mut |q, k, v| {
            kv(l, k, v);
            match keep {
                None => attention(d, plan, q, k, v),
                Some(rows) => (attention_rows(d, plan, q, k, v, rows), vec![]),
            }
        });
        x = out;
        if keep.is_some() {
            rows = (0..rows.len()).collect();
        }
        save(saved);
    }
    (x, rows)
}

/// The forward pass: summed log-probs per response and, with `save`, what the backward needs.
/// Without `save` the last layer goes past its keys and values for the head rows only.
fn forward(d: &Dims, sp: &Spans, p: &[f32], plan: &Plan, save: bool) -> (Vec<f32>, Option<Saved>) {
    let mut saves = vec![];
    let (x, rows) = layers_fwd(d, sp, p, plan, !save, &mut |_, _, _| {}, &mut |s| {
        if save {
            saves.push(s)
        }
    });
    // Head rows only: final layer norm, output projection, log-softmax.
    let (nf, mut logits) = head(d, sp, p, &x, &rows);
    let vocab = d.vocab;
    // Log-softmax in place (as the candle path: max, exp, log of the sum).
    for row in logits.chunks_exact_mut(vocab) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|&v| (v - m).exp()).sum();
        let lse = sum.ln();
        row.iter_mut().for_each(|v| *v = *v - m - lse);
    }
    let mut lp = vec![0f32; plan.responses];
    for &(s, tgt, r) in &plan.picks {
        lp[r] += logits[s * vocab + tgt as usize];
    }
    let saved = save.then(|| {
        logits.iter_mut().for_each(|v| *v = v.exp());
        Saved {
            layers: saves,
            nf,
            probs: logits,
        }
    });
    (lp, saved)
}

/// [`linear_bwd`] of the linear layer `l` (its spans in the parameter vector `p`): its weight
/// and bias gradients go to their places in `grad`; returns the input gradient.
fn linear_grads(grad: &mut [f32], l: Pair, p: &[f32], x: &[f32], g: &[f32], k: usize) -> Vec<f32> {
    let (mut dw, mut db) = (vec![0f32; l.w.1], vec![0f32; l.b.1]);
    let dx = linear_bwd(x, l.w.of(p), g, k, &mut dw, &mut db);
    l.w.of_mut(grad).copy_from_slice(&dw);
    l.b.of_mut(grad).copy_from_slice(&db);
    dx
}

/// [`layer_norm_bwd`] of the layer norm `l`: ADDS the input gradient to `dx`, puts the weight
/// and bias gradients in `grad`.
fn norm_grads(grad: &mut [f32], l: Pair, p: &[f32], n: &Norm, g: &[f32], dx: &mut [f32]) {
    let (mut dw, mut db) = (vec![0f32; l.w.1], vec![0f32; l.b.1]);
    layer_norm_bwd(n, g, l.w.of(p), dx, &mut dw, &mut db);
    l.w.of_mut(grad).copy_from_slice(&dw);
    l.b.of_mut(grad).copy_from_slice(&db);
}

/// The backward pass: the gradient of `sum(dlp * logps)` with respect to the concatenated
/// parameters.
fn backward(d: &Dims, sp: &Spans, p: &[f32], plan: &Plan, sv: &Saved, dlp: &[f32]) -> Vec<f32> {
    let (hd, vocab) = (d.hidden, d.vocab);
    let mut grad = vec![0f32; sp.total];
    let s_rows = plan.head_rows.len();
    // d logp(target) / d logits = onehot(target) - softmax.
    let mut dl = vec![0f32; s_rows * vocab];
    let mut wsum = vec![0f32; s_rows];
    for &(s, tgt, r) in &plan.picks {
        dl[s * vocab + tgt as usize] += dlp[r];
        wsum[s] += dlp[r];
    }
    for ((row, pr), &w) in dl
        .chunks_exact_mut(vocab)
        .zip(sv.probs.chunks_exact(vocab))
        .zip(&wsum)
    {
        for (g, &q) in row.iter_mut().zip(pr) {
            *g -= w * q;
        }
    }
    gemm::sgemm(
        MatRef::row_major(&dl, s_rows, vocab).t(),
        MatRef::row_major(&sv.nf.y, s_rows, hd),
        sp.head.of_mut(&mut grad),
        false,
    );
    let mut dh = vec![0f32; s_rows * hd];
    gemm::sgemm(
        MatRef::row_major(&dl, s_rows, vocab),
        MatRef::row_major(sp.head.of(p), vocab, hd),
        &mut dh,
        false,
    );
    let mut dxs = vec![0f32; s_rows * hd];
    norm_grads(&mut grad, sp.lnf, p, &sv.nf, &dh, &mut dxs);
    let mut dx = vec![0f32; plan.len() * hd];
    for (row, &t) in dxs.chunks_exact(hd).zip(&plan.head_rows) {
        dx[t * hd..(t + 1) * hd].copy_from_slice(row);
    }
    for (ls, s) in sp.layers.iter().zip(&sv.layers).rev() {
        // MLP branch: its output gradient is dx.
        let mut dg = linear_grads(&mut grad, ls.out, p, &s.g, &dx, d.inter);
        row_blocks(&mut dg, d.inter, |first, rows| {
            gelu_grad_mul(&s.u[first * d.inter..][..rows.len()], rows);
        });
        let dh2 = linear_grads(&mut grad, ls.fc, p, &s.n2.y, &dg, hd);
        drop(dg);
        // The gradient reaching the attention output: dx (parallel) or dx plus the MLP
        // branch's layer norm (sequential, where that norm reads x + attn).
        let mut dmid = dx.clone();
        norm_grads(&mut grad, ls.ln2, p, &s.n2, &dh2, &mut dmid);
        let d_attn_out = if d.parallel { &dx } else { &dmid };
        let da = linear_grads(&mut grad, ls.dense, p, &s.a, d_attn_out, hd);
        let (dq, dk, dv) = attention_bwd(d, plan, s, &da);
        drop(da);
        let dqkv = split_heads_bwd(d, plan, [&dq, &dk, &dv]);
        drop((dq, dk, dv));
        let dh1 = linear_grads(&mut grad, ls.qkv, p, &s.n1.y, &dqkv, hd);
        // The input gradient: the residual (dmid already holds dx plus, in the parallel
        // layout, the MLP norm's part) plus the attention norm's part.
        norm_grads(&mut grad, ls.ln1, p, &s.n1, &dh1, &mut dmid);
        dx = dmid;
    }
    let ge = sp.embed.of_mut(&mut grad);
    for (row, &t) in dx.chunks_exact(hd).zip(&plan.tokens) {
        for (g, &v) in ge[t as usize * hd..(t as usize + 1) * hd]
            .iter_mut()
            .zip(row)
        {
            *g += v;
        }
    }
    grad
}

/// The whole model as one node of candle's graph: input the concatenated parameters, output
/// the summed log-probs (m,).
struct HandOp {
    dims: Dims,
    spans: Spans,
    plan: Plan,
    /// Keep the activations for a backward pass (the parameters are tracked).
    save: bool,
    saved: Mutex<Option<Saved>>,
}

impl CustomOp1 for HandOp {
    fn name(&self) -> &'static str {
        "overopt-hand-gpt-neox"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = slice(s, l, self.name())?;
        if p.len() != self.spans.total {
            bail!(
                "hand-written path: {} parameter values, expected {}",
                p.len(),
                self.spans.total
            );
        }
        let (lp, saved) = forward(&self.dims, &self.spans, p, &self.plan, self.save);
        if let Some(sv) = saved {
            *self
                .saved
                .lock()
                .map_err(|_| candle_core::Error::Msg("poisoned lock".into()))? = Some(sv);
        }
        Ok((CpuStorage::F32(lp), Shape::from(self.plan.responses)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let taken = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?
            .take();
        cpu_values!(arg, p);
        cpu_values!(grad, g);
        // A second backward over the same graph recomputes the activations.
        let saved = match taken {
            Some(s) => s,
            None => match forward(&self.dims, &self.spans, p, &self.plan, true).1 {
                Some(s) => s,
                None => bail!("hand-written path: no activations"),
            },
        };
        let flat = backward(&self.dims, &self.spans, p, &self.plan, &saved, g);
        Ok(Some(Tensor::from_vec(flat, arg.shape(), arg.device())?))
    }
}

/// Sampling on the hand-written path: a KV cache per layer, (rows, capacity, hidden) for keys
/// and values, filled in place; rows that stop are simply no longer stepped (nothing is
/// copied). [`super::generate`] uses it whenever [`usable`] says so.
pub struct Decoder {
    dims: Dims,
    spans: Spans,
    params: Vec<f32>,
    capacity: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Positions cached per row.
    len: Vec<usize>,
}

impl Decoder {
    /// Run `prompts` (each non-empty) through the model, caching room for `capacity`
    /// positions per row (at least the longest prompt). Returns the decoder and the logits at
    /// each prompt's last token, (rows, vocab) row-major.
    pub fn new(model: &GptNeoX, prompts: &[&[u32]], capacity: usize) -> Result<(Self, Vec<f32>)> {
        Self::with_prefill_chunks(model, prompts, capacity, PREFILL_TOKENS)
    }

    /// [`Decoder::new`] with the prefill run over consecutive prompts of at most
    /// `chunk_tokens` tokens together (one prompt at least): buffers that stay in the cache
    /// instead of one pass over every prompt token per operation; with several threads the
    /// chunks run side by side. The same values for any `chunk_tokens` (rows are independent).
    pub fn with_prefill_chunks(
        model: &GptNeoX,
        prompts: &[&[u32]],
        capacity: usize,
        chunk_tokens: usize,
    ) -> Result<(Self, Vec<f32>)> {
        let (dims, spans, flat) = flat_parameters(model)?;
        let params = flat.detach().to_vec1::<f32>()?;
        // Every prompt is checked (tokens, lengths) before anything runs.
        Plan::new(prompts, &[], &dims)?;
        let capacity = capacity.max(prompts.iter().map(|p| p.len()).max().unwrap_or(0));
        let hd = dims.hidden;
        let rows = prompts.len();
        let mut dec = Self {
            k: vec![vec![0f32; rows * capacity * hd]; dims.layers],
            v: vec![vec![0f32; rows * capacity * hd]; dims.layers],
            len: prompts.iter().map(|p| p.len()).collect(),
            dims,
            spans,
            params,
            capacity,
        };
        // Consecutive prompts up to `chunk_tokens` tokens.
        let mut chunks: Vec<(usize, usize)> = vec![];
        let (mut start, mut tokens) = (0, 0);
        for (i, pr) in prompts.iter().enumerate() {
            if i > start && tokens + pr.len() > chunk_tokens {
                chunks.push((start, i));
                (start, tokens) = (i, 0);
            }
            tokens += pr.len();
        }
        if start < rows {
            chunks.push((start, rows));
        }
        let (d, sp, p) = (&dec.dims, &dec.spans, &dec.params);
        let mut ks: Vec<&mut [f32]> = dec.k.iter_mut().map(|v| &mut v[..]).collect();
        let mut vs: Vec<&mut [f32]> = dec.v.iter_mut().map(|v| &mut v[..]).collect();
        let work: Vec<_> = chunks
            .iter()
            .map(|&(s, e)| {
                let take = (e - s) * capacity * hd;
                (&prompts[s..e], cut(&mut ks, 0, take), cut(&mut vs, 0, take))
            })
            .collect();
        let run = |(chunk, mut kc, mut vc): (&[&[u32]], Vec<&mut [f32]>, Vec<&mut [f32]>)| {
            prefill(d, sp, p, chunk, capacity, &mut kc, &mut vc)
        };
        let logits: Vec<Vec<f32>> = if work.len() > 1 && gemm::parallel_ok() {
            work.into_par_iter()
                .map(|w| gemm::serial(|| run(w)))
                .collect::<Result<_>>()?
        } else {
            work.into_iter().map(run).collect::<Result<_>>()?
        };
        Ok((dec, logits.concat()))
    }

    /// One decoding step: row `rows[i]` (an index into the prompts of [`Decoder::new`])
    /// continues with `tokens[i]`. Returns the next-token logits, (rows.len(), vocab).
    pub fn step(&mut self, rows: &[usize], tokens: &[u32]) -> Result<Vec<f32>> {
        let (d, sp, p) = (&self.dims, &self.spans, &self.params);
        let (hd, cap) = (d.hidden, self.capacity);
        if rows.len() != tokens.len() {
            bail!("decoder: {} rows but {} tokens", rows.len(), tokens.len());
        }
        for (&r, &t) in rows.iter().zip(tokens) {
            match self.len.get(r) {
                None => bail!("decoder: row {r} of {}", self.len.len()),
                Some(&n) if n >= cap || n >= d.max_pos => bail!(
                    "decoder: position {n} is beyond the cache ({cap}) or max_position_embeddings {}",
                    d.max_pos
                ),
                _ => {}
            }
            if t as usize >= d.vocab {
                bail!("token id {t} is outside the vocabulary of {}", d.vocab);
            }
        }
        let pos: Vec<usize> = rows.iter().map(|&r| self.len[r]).collect();
        // Rows are independent in a decoding step: with several threads, each takes a block
        // of rows through the whole model on its own (one task per step instead of one per
        // product; the same values, row by row). The blocks' cache rows must not overlap.
        let n = rows.len();
        let tasks = if gemm::parallel_ok() && rows.windows(2).all(|w| w[0] < w[1]) {
            gemm::threads().min(n / DECODE_ROWS).max(1)
        } else {
            1
        };
        let per = n.div_ceil(tasks);
        let mut blocks: Vec<DecodeBlock> = vec![];
        {
            let mut ks: Vec<&mut [f32]> = self.k.iter_mut().map(|v| &mut v[..]).collect();
            let mut vs: Vec<&mut [f32]> = self.v.iter_mut().map(|v| &mut v[..]).collect();
            let mut base = 0;
            for (c, r) in rows.chunks(per).enumerate() {
                // This block's cache: rows r[0] ..= r[last] (the rest of the rows before
                // it are dropped from the split).
                let (first, end) = (r[0], r[r.len() - 1] + 1);
                let (skip, take) = ((first - base) * cap * hd, (end - first) * cap * hd);
                let (kb, vb) = (cut(&mut ks, skip, take), cut(&mut vs, skip, take));
                base = end;
                let span = c * per..c * per + r.len();
                blocks.push(DecodeBlock {
                    k: kb,
                    v: vb,
                    first,
                    rows: r,
                    pos: &pos[span.clone()],
                    tokens: &tokens[span],
                });
            }
        }
        let run = |b: DecodeBlock| -> Vec<f32> { decode_rows(d, sp, p, cap, b) };
        let logits: Vec<Vec<f32>> = if blocks.len() > 1 {
            blocks
                .into_par_iter()
                .map(|b| gemm::serial(|| run(b)))
                .collect()
        } else {
            blocks.into_iter().map(run).collect()
        };
        for (&r, &n) in rows.iter().zip(&pos) {
            self.len[r] = n + 1;
        }
        Ok(logits.concat())
    }
}

/// Split `take` values off each buffer after skipping `skip`; the buffers keep the rest.
fn cut<'a>(bufs: &mut [&'a mut [f32]], skip: usize, take: usize) -> Vec<&'a mut [f32]> {
    bufs.iter_mut()
        .map(|b| {
            let (_, rest) = std::mem::take(b).split_at_mut(skip);
            let (mine, rest) = rest.split_at_mut(take);
            *b = rest;
            mine
        })
        .collect()
}

/// Tokens (at most, unless one prompt is longer) that [`Decoder::new`] runs through the
/// model together.
pub const PREFILL_TOKENS: usize = 256;

/// The prefill of consecutive prompts: their keys and values go to the cache rows `kc` /
/// `vc` (per layer, one row of `capacity` positions per prompt); returns the logits at each
/// prompt's last token. The last layer goes on for those tokens only.
fn prefill(
    d: &Dims,
    sp: &Spans,
    p: &[f32],
    prompts: &[&[u32]],
    capacity: usize,
    kc: &mut [&mut [f32]],
    vc: &mut [&mut [f32]],
) -> Result<Vec<f32>> {
    let hd = d.hidden;
    let plan = Plan::new(prompts, &[], d)?;
    let (x, rows) = layers_fwd(
        d,
        sp,
        p,
        &plan,
        true,
        &mut |l, k, v| {
            for (i, &(s, e)) in plan.groups.iter().enumerate() {
                let dst = i * capacity * hd..(i * capacity + e - s) * hd;
                kc[l][dst.clone()].copy_from_slice(&k[s * hd..e * hd]);
                vc[l][dst].copy_from_slice(&v[s * hd..e * hd]);
            }
        },
        &mut |_| {},
    );
    Ok(head(d, sp, p, &x, &rows).1)
}

/// Rows per task (at least) when a decoding step is split over threads.
const DECODE_ROWS: usize = 16;

/// A block of rows of a decoding step and their part of the KV cache (per layer, the cache
/// rows `first ..= rows.last()`).
struct DecodeBlock<'a> {
    k: Vec<&'a mut [f32]>,
    v: Vec<&'a mut [f32]>,
    first: usize,
    rows: &'a [usize],
    pos: &'a [usize],
    tokens: &'a [u32],
}

/// One decoding step for a block of rows: their keys and values go into the cache at their
/// positions; returns their next-token logits (rows, vocab).
fn decode_rows(d: &Dims, sp: &Spans, p: &[f32], cap: usize, b: DecodeBlock) -> Vec<f32> {
    let (hd, heads, hs) = (d.hidden, d.heads, d.head_size);
    let scale = 1.0 / (hs as f32).sqrt();
    let DecodeBlock {
        mut k,
        mut v,
        first,
        rows,
        pos,
        tokens,
    } = b;
    let mut x = embed(d, sp, p, tokens);
    for (l, ls) in sp.layers.iter().enumerate() {
        let (kc, vc) = (&mut *k[l], &mut *v[l]);
        (x, _) = layer_fwd(d, ls, p, &x, pos, None, &mut |q, kn, vn| {
            for (i, (&r, &n)) in rows.iter().zip(pos).enumerate() {
                let dst = ((r - first) * cap + n) * hd..((r - first) * cap + n + 1) * hd;
                kc[dst.clone()].copy_from_slice(&kn[i * hd..(i + 1) * hd]);
                vc[dst].copy_from_slice(&vn[i * hd..(i + 1) * hd]);
            }
            let (kc, vc) = (&*kc, &*vc);
            let mut a = vec![0f32; rows.len() * hd];
            row_blocks(&mut a, hd, |f0, out| {
                let mut pr = vec![0f32; cap * heads];
                for (ii, o) in out.chunks_mut(hd).enumerate() {
                    let i = f0 + ii;
                    let (r, n) = (rows[i] - first, pos[i] + 1);
                    let query = Query {
                        hs,
                        q: &q[i * hd..][..hd],
                        kv: (kc, vc),
                        at: |j| (r * cap + j) * hd,
                        scale,
                    };
                    attend_heads(&query, &mut pr[..n * heads], o);
                }
            });
            (a, vec![])
        });
    }
    let all: Vec<usize> = (0..rows.len()).collect();
    head(d, sp, p, &x, &all).1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in about [-1, 1].
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let h = (i ^ seed).wrapping_mul(0x9E37_79B9).rotate_left(13);
                (h % 20_011) as f32 / 10_005.5 - 1.0
            })
            .collect()
    }

    /// Both builds of the attention (vector instructions where the CPU has them, and the
    /// portable loops) against each other, bit for bit, over head sizes that take each
    /// path, keys in two spans as in the packed layout, and outputs added to what is there.
    #[test]
    fn attention_of_a_token_is_the_same_on_every_path() {
        for (hs, heads) in [
            (8, 4),
            (16, 4),
            (24, 3),
            (32, 2),
            (64, 2),
            (128, 1),
            (12, 3),
            (1, 5),
        ] {
            let hd = hs * heads;
            let rows = 40;
            let (q, k, v) = (values(hd, 1), values(rows * hd, 2), values(rows * hd, 3));
            for nk in [1, 7, 33] {
                // The first half of the keys from row 3 on, the rest from row 21 on.
                let l0 = nk / 2;
                let query = Query {
                    hs,
                    q: &q,
                    kv: (&k, &v),
                    at: |j: usize| (if j < l0 { 3 + j } else { 21 + j - l0 }) * hd,
                    scale: 1.0 / (hs as f32).sqrt(),
                };
                let start = values(hd, 4);
                let (mut pa, mut oa) = (vec![0f32; heads * nk], start.clone());
                let (mut pb, mut ob) = (vec![0f32; heads * nk], start.clone());
                attend_heads(&query, &mut pa, &mut oa);
                attend_heads_portable(&query, &mut pb, &mut ob);
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&pa), bits(&pb), "probabilities, hs {hs}, {nk} keys");
                assert_eq!(bits(&oa), bits(&ob), "output, hs {hs}, {nk} keys");
                // Probabilities sum to one per head; the output moved.
                for ph in pa.chunks(nk) {
                    assert!((ph.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                }
                assert_ne!(bits(&oa), bits(&start));
            }
        }
    }
}
