//! A GPT-NeoX layer over the two streams of shared-prefix scoring as ONE node of candle's
//! graph, with its backward pass written out with candle ops (so it runs on any device).
//!
//! candle's autograd makes, for every edge of its graph, a zero-filled gradient buffer and an
//! addition into it (`GradStore::or_insert`, then `add`), besides the op's own gradient: about
//! three buffers where one would do. Measured on the CPU (`overopt-gpu-bench --cpu`, which
//! counts the buffers each phase allocates), that bookkeeping was most of what the CUDA step's
//! backward pass allocated and wrote per layer. Here the layer's forward pass runs outside the
//! graph on detached tensors and the whole layer enters the graph as one node, whose input and
//! output are the two residual streams packed as rows, (prompt rows + response rows, hidden).
//! The backward pass computes each gradient once, in place of the graph's walk:
//!
//! - it keeps only the attention's inputs (queries, keys and values per stream, rotated; the
//!   response stream's keys and values after their prompt's), its output before the dense
//!   layer, and the MLP's pre-activation (plus, with a sequential residual, the stream between
//!   the two halves); the layer norms' outputs, the GELU and the attention probabilities are
//!   recomputed in the backward pass;
//! - the linear layers run once over the rows of both streams (the graph ran them per stream);
//! - the bf16 copies of the weights (autocast) are made again in the backward pass rather than
//!   kept.
//!
//! A custom op hands gradients only to its inputs, so the parameters' gradients go to a sink
//! (the model's stash, collected by [`super::GptNeoX::backward`], as with checkpointing).
//! tests/gpt_neox_parity.rs compares log-probs and every gradient with the per-op graph.

use super::bias_add::matmul_bias;
use super::profile;
use super::recompute::{
    attention_grads, attention_values, column_sums, gelu_erf_grad_any, heads_part,
    layer_norm_grads, layer_norm_values, rope_halves, rope_head_dims, with_backward,
};
use candle_core::{D, DType, Result, Tensor};
use std::sync::{Arc, Mutex};

/// The number of parameter tensors of a layer, in the order of [`Params`].
pub(crate) const N_PARAMS: usize = 12;

/// Indices into a layer's parameters: the two layer norms (weight, bias), then the QKV, dense,
/// MLP-in and MLP-out linear layers (weight (out, in), bias).
const LN1: usize = 0;
const LN2: usize = 2;
const QKV: usize = 4;
const DENSE: usize = 6;
const FC_IN: usize = 8;
const FC_OUT: usize = 10;

/// A layer's parameters, in the order above.
pub(crate) type Params = [Tensor; N_PARAMS];

/// The shape of a layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub n_heads: usize,
    pub head_size: usize,
    /// Rotated dims per head (rotate-half layout), None for no rotary embedding.
    pub rotary: Option<usize>,
    pub eps: f64,
    /// GPT-NeoX's parallel residual (attention and MLP both read the layer's input).
    pub parallel: bool,
    /// The matmuls' dtype (autocast), or the parameters' own.
    pub compute: DType,
}

/// The constants of one forward pass shared by every layer: `n` prompts of `pm` rows, `m`
/// responses of `rm` rows, response `r` continuing prompt `rows[r]`; rotary tables (b, 1, t,
/// nd) in the compute dtype and f32 additive attention biases per stream (prompts: (n, 1, pm,
/// pm); responses over [their prompt | themselves]: (m, 1, rm, pm + rm)).
#[derive(Debug, Clone)]
pub(crate) struct Streams {
    pub n: usize,
    pub pm: usize,
    pub m: usize,
    pub rm: usize,
    pub rows: Tensor,
    pub cos_sin: [(Tensor, Tensor); 2],
    pub bias: [Tensor; 2],
    /// The one-op data movement around the attention ([`super::qkv_heads`]), where it applies
    /// (made for this pass's streams and the layers' dims and compute dtype).
    pub plan: Option<super::qkv_heads::Plan>,
}

impl Streams {
    fn prompt_rows(&self) -> usize {
        self.n * self.pm
    }

    fn response_rows(&self) -> usize {
        self.m * self.rm
    }
}

/// What the forward pass keeps for the backward pass.
#[derive(Clone)]
struct Saved {
    /// The attention's inputs per stream (see [`attention_inputs`]), compute dtype.
    heads: [[Tensor; 3]; 2],
    /// The attention's output before the dense layer, (rows, hidden), compute dtype.
    att: Tensor,
    /// The MLP's input projection before the GELU, (rows, 4 hidden), compute dtype.
    pre: Tensor,
    /// Sequential residual only: the stream after the attention, (rows, hidden).
    mid: Option<Tensor>,
}

/// Receives a layer's parameter gradients (in the order of [`Params`], their dtypes).
pub(crate) type Sink = Arc<dyn Fn(Vec<Tensor>) -> Result<()> + Send + Sync>;

/// The layer `w` over the packed streams `x` (rows, hidden) as one node of candle's graph (see
/// the module docs); returns the packed output streams. When `x` is not tracked the layer
/// runs without a node: the caller must not use this when some parameter is tracked but `x`
/// is not (the parameters' gradients would be lost).
pub(crate) fn layer(
    x: &Tensor,
    w: &Params,
    streams: &Arc<Streams>,
    dims: Dims,
    sink: Sink,
) -> Result<Tensor> {
    let rows = streams.prompt_rows() + streams.response_rows();
    if x.rank() != 2 || x.dim(0)? != rows || x.dim(1)? != dims.n_heads * dims.head_size {
        candle_core::bail!(
            "layer node: packed streams {:?}, expected ({rows}, {})",
            x.dims(),
            dims.n_heads * dims.head_size
        );
    }
    let w: Params = w.clone().map(|t| t.detach());
    let saved: Arc<Mutex<Option<Saved>>> = Arc::default();
    let (w_bwd, s_bwd, saved_bwd) = (w.clone(), streams.clone(), saved.clone());
    let poisoned = || candle_core::Error::Msg("layer node: a forward pass panicked".into());
    with_backward(
        "layer-node",
        &[x],
        |a| {
            let (y, kept) = sec("fwd.layer.other", &a[0], || {
                forward(&a[0], &w, streams, &dims)
            })?;
            *saved.lock().map_err(|_| poisoned())? = Some(kept);
            Ok(y)
        },
        move |a, g| {
            let kept = saved_bwd
                .lock()
                .map_err(|_| poisoned())?
                .clone()
                .ok_or_else(|| candle_core::Error::Msg("layer node: nothing saved".into()))?;
            let (dx, dw) = sec("bwd.layer.other", g, || {
                backward(&a[0], &w_bwd, &s_bwd, &dims, &kept, g)
            })?;
            sink(dw)?;
            Ok(vec![Some(dx)])
        },
    )
}

/// [`profile::section`] on the device of `t`.
fn sec<T>(name: &'static str, t: &Tensor, f: impl FnOnce() -> Result<T>) -> Result<T> {
    profile::section(name, t.device(), f)
}

/// `x @ w^T + b` over rows, in the compute dtype.
fn linear(x: &Tensor, w: &Params, i: usize, cd: DType) -> Result<Tensor> {
    sec("fwd.layer.linear", x, || {
        let wt = w[i].to_dtype(cd)?;
        matmul_bias(&x.to_dtype(cd)?, &wt.t()?, &w[i + 1].to_dtype(cd)?)
    })
}

/// Queries, keys and values (b, heads, t, head_size) of one stream's QKV rows (b x t, 3
/// hidden), the first rotary dims of queries and keys rotated.
fn stream_qkv(
    qkv: &Tensor,
    (b, t): (usize, usize),
    cos_sin: &(Tensor, Tensor),
    d: &Dims,
) -> Result<[Tensor; 3]> {
    let qkv = qkv.reshape((b, t, 3 * d.n_heads * d.head_size))?;
    let part = |p| heads_part(&qkv, d.n_heads, p);
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    Ok(match d.rotary {
        None => [q, k, v],
        Some(nd) => {
            let (c, s, _) = rope_halves(&cos_sin.0, &cos_sin.1, nd, qkv.dtype())?;
            [
                rope_head_dims(&q, &c, &s, nd)?,
                rope_head_dims(&k, &c, &s, nd)?,
                v,
            ]
        }
    })
}

/// Each stream's queries, keys and values; the response stream's keys and values are those of
/// its prompt followed by its own.
fn attention_inputs(qkv: &Tensor, s: &Streams, d: &Dims) -> Result<[[Tensor; 3]; 2]> {
    let np = s.prompt_rows();
    let [qp, kp, vp] = stream_qkv(&qkv.narrow(0, 0, np)?, (s.n, s.pm), &s.cos_sin[0], d)?;
    let [qr, kr, vr] = stream_qkv(
        &qkv.narrow(0, np, s.response_rows())?,
        (s.m, s.rm),
        &s.cos_sin[1],
        d,
    )?;
    let k_all = Tensor::cat(&[&kp.index_select(&s.rows, 0)?, &kr], 2)?;
    let v_all = Tensor::cat(&[&vp.index_select(&s.rows, 0)?, &vr], 2)?;
    Ok([[qp, kp, vp], [qr, k_all, v_all]])
}

/// (b, heads, t, head_size) as rows (b x t, hidden).
fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, hs) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b * t, h * hs))
}

/// Rows (b x t, hidden) of `x` from `start` as (b, heads, t, head_size).
fn split_heads(x: &Tensor, start: usize, (b, t): (usize, usize), d: &Dims) -> Result<Tensor> {
    x.narrow(0, start, b * t)?
        .reshape((b, t, d.n_heads, d.head_size))?
        .transpose(1, 2)?
        .contiguous()
}

fn scale(d: &Dims) -> f64 {
    1.0 / (d.head_size as f64).sqrt()
}

fn forward(x: &Tensor, w: &Params, s: &Streams, d: &Dims) -> Result<(Tensor, Saved)> {
    let (md, cd) = (x.dtype(), d.compute);
    let ln = |x: &Tensor, i: usize| {
        sec("fwd.layer.layer_norm", x, || {
            layer_norm_values(x, &w[i], &w[i + 1], d.eps)
        })
    };
    let h1 = ln(x, LN1)?;
    let qkv = linear(&h1, w, QKV, cd)?;
    let heads = sec("fwd.layer.qkv_heads_rope", x, || match &s.plan {
        Some(plan) => super::qkv_heads::split(&qkv, plan),
        None => attention_inputs(&qkv, s, d),
    })?;
    let [[qp, kp, vp], [qr, kr, vr]] = &heads;
    let values = sec("fwd.layer.attention", x, || {
        Ok([
            attention_values(qp, kp, vp, &s.bias[0], scale(d))?,
            attention_values(qr, kr, vr, &s.bias[1], scale(d))?,
        ])
    })?;
    let att = Tensor::cat(&[&merge_heads(&values[0])?, &merge_heads(&values[1])?], 0)?;
    let o = linear(&att, w, DENSE, cd)?.to_dtype(md)?;
    let mid = (!d.parallel).then(|| x + &o).transpose()?;
    let h2 = ln(mid.as_ref().unwrap_or(x), LN2)?;
    let pre = linear(&h2, w, FC_IN, cd)?;
    let act = sec("fwd.layer.gelu", x, || pre.gelu_erf())?;
    let mlp = linear(&act, w, FC_OUT, cd)?.to_dtype(md)?;
    let y = match &mid {
        None => ((x + o)? + mlp)?,
        Some(h) => (h + mlp)?,
    };
    Ok((
        y,
        Saved {
            heads,
            att,
            pre,
            mid,
        },
    ))
}

/// The gradient (rows, 3 hidden) of the QKV projection from that of the attention's output
/// `datt` (rows, hidden), given the attention's inputs `heads`: attention backward per stream,
/// the response stream's gradients of its prompt's keys and values added to the prompt's, the
/// rotations undone.
fn qkv_grad(heads: &[[Tensor; 3]; 2], datt: &Tensor, s: &Streams, d: &Dims) -> Result<Tensor> {
    let [[qp, kp, vp], [qr, k_all, v_all]] = heads;
    let np = s.prompt_rows();
    let gp = split_heads(datt, 0, (s.n, s.pm), d)?;
    let gr = split_heads(datt, np, (s.m, s.rm), d)?;
    let ((dqp, dkp, dvp), (dqr, dk_all, dv_all)) = sec("bwd.layer.attention", datt, || {
        Ok((
            attention_grads(qp, kp, vp, &s.bias[0], scale(d), &gp)?,
            attention_grads(qr, k_all, v_all, &s.bias[1], scale(d), &gr)?,
        ))
    })?;
    let grads = [[dqp, dkp, dvp], [dqr, dk_all, dv_all]];
    match &s.plan {
        Some(plan) => super::qkv_heads::join_grads(&grads, plan),
        None => join_head_grads(grads, s, d),
    }
}

/// [`super::qkv_heads::join_grads`] with candle ops: the gradient (rows, 3 hidden) of the QKV
/// projection from those of the attention's inputs.
fn join_head_grads(grads: [[Tensor; 3]; 2], s: &Streams, d: &Dims) -> Result<Tensor> {
    let [[dqp, dkp, dvp], [dqr, dk_all, dv_all]] = grads;
    let to_prompts = |own: &Tensor, all: &Tensor| {
        own.index_add(&s.rows, &all.narrow(2, 0, s.pm)?.contiguous()?, 0)
    };
    let (dkp, dvp) = (to_prompts(&dkp, &dk_all)?, to_prompts(&dvp, &dv_all)?);
    let own = |all: &Tensor| all.narrow(2, s.pm, s.rm);
    let (dkr, dvr) = (own(&dk_all)?, own(&dv_all)?);
    let join = |dq: Tensor, dk: Tensor, dv: &Tensor, cos_sin: &(Tensor, Tensor)| {
        let (dq, dk) = match d.rotary {
            None => (dq, dk),
            Some(nd) => {
                let (c, _, neg_s) = rope_halves(&cos_sin.0, &cos_sin.1, nd, dq.dtype())?;
                let back = |g: &Tensor| rope_head_dims(&g.contiguous()?, &c, &neg_s, nd);
                (back(&dq)?, back(&dk)?)
            }
        };
        // Per head [q | k | v], as the projection lays them out.
        merge_heads(&Tensor::cat(&[&dq, &dk, dv], D::Minus1)?)
    };
    Tensor::cat(
        &[
            &join(dqp, dkp, &dvp, &s.cos_sin[0])?,
            &join(dqr, dkr, &dvr, &s.cos_sin[1])?,
        ],
        0,
    )
}

/// The backward pass of a linear layer `i` (input `x`, output gradient `g`, both rows in the
/// compute dtype): the gradient of the input, and of the weight and bias in their own dtypes.
fn linear_grads(
    x: &Tensor,
    g: &Tensor,
    w: &Params,
    i: usize,
    cd: DType,
) -> Result<(Tensor, Tensor, Tensor)> {
    sec("bwd.layer.linear", g, || {
        let dx = g.matmul(&w[i].to_dtype(cd)?)?;
        let dw = g.t()?.matmul(&x.to_dtype(cd)?)?.to_dtype(w[i].dtype())?;
        let db = column_sums(g)?.to_dtype(w[i + 1].dtype())?;
        Ok((dx, dw, db))
    })
}

fn backward(
    x: &Tensor,
    w: &Params,
    s: &Streams,
    d: &Dims,
    kept: &Saved,
    g: &Tensor,
) -> Result<(Tensor, Vec<Tensor>)> {
    let (md, cd) = (x.dtype(), d.compute);
    let param = |t: Tensor, i: usize| t.to_dtype(w[i].dtype());
    // MLP: y = .. + fc_out(gelu(fc_in(ln2(.))))
    let g_c = g.to_dtype(cd)?;
    let act = sec("bwd.layer.gelu", g, || kept.pre.gelu_erf())?;
    let (df, dw_out, db_out) = linear_grads(&act, &g_c, w, FC_OUT, cd)?;
    let dpre = sec("bwd.layer.gelu", g, || gelu_erf_grad_any(&kept.pre, &df))?;
    let ln2_in = kept.mid.as_ref().unwrap_or(x);
    let ln_values = |x: &Tensor, i: usize| {
        sec("bwd.layer.layer_norm_recompute", g, || {
            layer_norm_values(x, &w[i], &w[i + 1], d.eps)
        })
    };
    let ln_grads = |x: &Tensor, i: usize, dh: &Tensor| {
        sec("bwd.layer.layer_norm_grad", g, || {
            layer_norm_grads(x, &w[i], dh, d.eps)
        })
    };
    let h2 = ln_values(ln2_in, LN2)?;
    let (dh2, dw_in, db_in) = linear_grads(&h2, &dpre, w, FC_IN, cd)?;
    let (d_ln2, dw_ln2, db_ln2) = ln_grads(ln2_in, LN2, &dh2)?;
    // The attention branch's output gradient: that of y (parallel residual) or of the stream
    // between the two halves (sequential).
    let (d_res, g_att) = if d.parallel {
        ((g + d_ln2)?, g_c)
    } else {
        let dh = (g + d_ln2)?;
        let g_att = dh.to_dtype(cd)?;
        (dh, g_att)
    };
    let (datt, dw_dense, db_dense) = linear_grads(&kept.att, &g_att, w, DENSE, cd)?;
    let dqkv = sec("bwd.layer.qkv_heads_rope", g, || {
        qkv_grad(&kept.heads, &datt, s, d)
    })?;
    let h1 = ln_values(x, LN1)?;
    let (dh1, dw_qkv, db_qkv) = linear_grads(&h1, &dqkv, w, QKV, cd)?;
    let (d_ln1, dw_ln1, db_ln1) = ln_grads(x, LN1, &dh1)?;
    let dx = (d_res + d_ln1)?.to_dtype(md)?;
    let grads = vec![
        param(dw_ln1, LN1)?,
        param(db_ln1, LN1 + 1)?,
        param(dw_ln2, LN2)?,
        param(db_ln2, LN2 + 1)?,
        dw_qkv,
        db_qkv,
        dw_dense,
        db_dense,
        dw_in,
        db_in,
        dw_out,
        db_out,
    ];
    Ok((dx, grads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::qkv_heads::{Plan, join_grads, split};
    use candle_core::Device;

    /// Streams of 3 prompts (5 rows) and 4 responses (3 rows; prompt 1 has none, prompt 2
    /// two), random rotary tables whose halves are equal (as the model's), heads of 6 dims
    /// with `nd` rotated, in `dtype`; with the one-op plan.
    fn streams(dtype: DType, nd: usize) -> (Streams, Dims) {
        let dev = Device::Cpu;
        let (n, pm, m, rm, heads, hs) = (3, 5, 4, 3, 2, 6);
        let rows = vec![0u32, 2, 2, 0];
        let table = |b: usize, t: usize| {
            let half = Tensor::randn(0f32, 1.0, (b, 1, t, nd.max(2) / 2), &dev).unwrap();
            Tensor::cat(&[&half, &half], 3)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let cos_sin = [(table(n, pm), table(n, pm)), (table(m, rm), table(m, rm))];
        let rows = Tensor::from_vec(rows, m, &dev).unwrap();
        let plan = Plan::new(
            (n, pm, m, rm),
            (&rows.to_vec1::<u32>().unwrap(), &rows),
            (heads, hs, nd),
            [&cos_sin[0], &cos_sin[1]],
            dtype,
            &dev,
        )
        .unwrap();
        let bias =
            |b: usize, q: usize, k: usize| Tensor::zeros((b, 1, q, k), DType::F32, &dev).unwrap();
        let s = Streams {
            n,
            pm,
            m,
            rm,
            rows,
            cos_sin,
            bias: [bias(n, pm, pm), bias(m, rm, pm + rm)],
            plan,
        };
        let d = Dims {
            n_heads: heads,
            head_size: hs,
            rotary: (nd > 0).then_some(nd),
            eps: 1e-5,
            parallel: true,
            compute: dtype,
        };
        (s, d)
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        crate::model::nvrtc::value_bits(t)
    }

    /// The one-op split of the QKV projection and the one-op join of the attention's input
    /// gradients give the candle ops' values bit for bit: f32 and bf16, with 4 of 6 dims
    /// rotated and without a rotation.
    #[test]
    fn one_op_data_movement_is_the_candle_ops_bit_for_bit() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            for nd in [4, 0] {
                let (plain, d) = streams(dtype, nd);
                let plan = plain.plan.as_ref().expect("the plan applies on the CPU");
                let rows = plain.n * plain.pm + plain.m * plain.rm;
                let width = 3 * d.n_heads * d.head_size;
                let qkv = (Tensor::randn(0f32, 1.0, (rows, width), &dev).unwrap() * 3.0)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let want = attention_inputs(&qkv, &plain, &d).unwrap();
                let got = split(&qkv, plan).unwrap();
                for (i, (w, g)) in want.iter().flatten().zip(got.iter().flatten()).enumerate() {
                    assert_eq!(g.dims(), w.dims(), "{dtype:?} nd {nd}: input {i}");
                    assert_eq!(bits(g), bits(w), "{dtype:?} nd {nd}: input {i}");
                }
                let grads = want.clone().map(|s| {
                    s.map(|t| {
                        Tensor::randn(0f32, 1.0, t.dims(), &dev)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap()
                    })
                });
                let want = join_head_grads(grads.clone(), &plain, &d).unwrap();
                let got = join_grads(&grads, plan).unwrap();
                assert_eq!(got.dims(), [rows, width]);
                assert_eq!(bits(&got), bits(&want), "{dtype:?} nd {nd}: gradient");
            }
        }
    }

    /// f16 (no kernel) gets no plan: the layer nodes keep the candle ops.
    #[test]
    fn no_plan_for_f16() {
        assert!(streams(DType::F16, 4).0.plan.is_none());
    }
}
