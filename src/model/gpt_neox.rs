//! The GPT-NeoX (Pythia) architecture in candle, for training and inference.
//!
//! Parameter names follow Hugging Face transformers (`gpt_neox.layers.N.attention.query_key_value`
//! ...), so HF safetensors load directly and checkpoints written here load in transformers.
//!
//! The op paths compute the same function:
//! - [`OpPath::Differentiable`] (the default): every op has a backward pass. On the CPU in f32
//!   layer norm and the masked attention softmax are the single-pass kernels of
//!   [`super::fused`]; elsewhere (CUDA, other dtypes) layer norm and the attention are the
//!   ops of [`super::recompute`], which keep only their inputs and output in candle's graph and
//!   recompute the rest in the backward pass.
//!   In shared-prefix scoring (training) there, each layer is one node of the graph instead,
//!   with a hand-written backward pass ([`super::layer_node`]).
//! - [`OpPath::Recompute`]: the [`super::recompute`] ops on every device (to test and measure
//!   them on the CPU), one node per op.
//! - [`OpPath::Layer`]: the layers of shared-prefix scoring as [`super::layer_node`]s on every
//!   device (elsewhere as [`OpPath::Recompute`]).
//! - [`OpPath::Composite`]: layer norm, softmax and log-softmax written with basic candle ops,
//!   all of which have a backward pass and all of whose intermediates candle's graph keeps (the
//!   plain reference the other two are compared with).
//! - [`OpPath::Fused`]: candle's fused `layer_norm` and `softmax_last_dim` kernels, faster for
//!   sampling and scoring but WITHOUT a backward pass (gradients would silently stop). Only
//!   inference copies of a model ([`GptNeoX::inference_copy`]) use it.
//!
//! On the CPU in f32 every path uses [`super::fused`]'s QKV split with the rotary embedding,
//! its bias add and its bias + GELU (same function as the composite ops, fewer graph nodes and
//! temporaries).

use super::config::GptNeoXConfig;
use candle_core::{D, DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, Init, Linear, VarBuilder};

/// Which kernels the forward pass uses; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpPath {
    Differentiable,
    Recompute,
    Layer,
    Composite,
    Fused,
}

impl OpPath {
    /// Parse `differentiable`, `recompute`, `layer`, `composite` or `fused`.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "differentiable" => Self::Differentiable,
            "recompute" => Self::Recompute,
            "layer" => Self::Layer,
            "composite" => Self::Composite,
            "fused" => Self::Fused,
            s => candle_core::bail!(
                "unknown op path {s:?}: expected differentiable, recompute, layer, composite or fused"
            ),
        })
    }

    /// Whether a training op uses [`super::recompute`] for tensors `ts` (see the module docs).
    fn recomputes(self, ts: &[&Tensor]) -> bool {
        match self {
            Self::Recompute | Self::Layer => true,
            Self::Differentiable => !super::fused::usable(ts),
            Self::Composite | Self::Fused => false,
        }
    }
}

#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(size, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    fn forward(&self, x: &Tensor, path: OpPath) -> Result<Tensor> {
        match path {
            OpPath::Differentiable if super::fused::usable(&[x, &self.weight, &self.bias]) => {
                super::fused::layer_norm(x, &self.weight, &self.bias, self.eps)
            }
            OpPath::Differentiable | OpPath::Recompute | OpPath::Layer => {
                super::recompute::layer_norm(x, &self.weight, &self.bias, self.eps)
            }
            OpPath::Composite => {
                // Statistics in f32 whatever the model dtype, as torch does for half types.
                let dtype = x.dtype();
                let x = x.to_dtype(DType::F32)?;
                let n = x.dim(D::Minus1)? as f64;
                let mean = (x.sum_keepdim(D::Minus1)? / n)?;
                let xc = x.broadcast_sub(&mean)?;
                let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / n)?;
                let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
                xn.to_dtype(dtype)?
                    .broadcast_mul(&self.weight)?
                    .broadcast_add(&self.bias)
            }
            OpPath::Fused => candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            ),
        }
    }
}

fn linear(in_dim: usize, out_dim: usize, std: f64, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )?;
    let b = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
}

/// `x` (.., k) as a contiguous (rows, k) matrix, rows = all leading dims.
fn rows2d(x: &Tensor) -> Result<Tensor> {
    let k = x.dim(D::Minus1)?;
    x.contiguous()?.reshape((x.elem_count() / k.max(1), k))
}

/// `x @ weight^T` of a `Linear`, without its bias, as (rows, out) with rows = all leading dims.
fn matmul_weight(l: &Linear, x: &Tensor) -> Result<Tensor> {
    let x = rows2d(x)?;
    if super::fused::usable(&[&x, l.weight()]) {
        super::fused::matmul_wt(&x, l.weight())
    } else {
        x.matmul(&l.weight().t()?)
    }
}

/// The output shape of a `Linear` applied to `x`.
fn linear_out_dims(l: &Linear, x: &Tensor) -> Result<Vec<usize>> {
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = l.weight().dim(0)?;
    }
    Ok(dims)
}

/// The autocast dtype of a `Linear` call: `Some(cd)` when the matmul must run in `cd` (the
/// weight or the input is in another dtype), `None` otherwise.
fn autocast_to(l: &Linear, x: &Tensor, compute: Option<DType>) -> Option<DType> {
    compute.filter(|&cd| cd != l.weight().dtype() || cd != x.dtype())
}

/// `l` with its weight and bias cast to the autocast dtype `compute` (a differentiable cast), for
/// a forward pass that applies `l` more than once: every call then shares one cast, where
/// [`linear_fwd`] on the uncast layer would cast (and candle's graph keep) a copy of the
/// weights per call.
fn cast_linear(l: &Linear, compute: Option<DType>) -> Result<Linear> {
    match compute {
        Some(cd) if cd != l.weight().dtype() => Ok(Linear::new(
            l.weight().to_dtype(cd)?,
            l.bias().map(|b| b.to_dtype(cd)).transpose()?,
        )),
        _ => Ok(l.clone()),
    }
}

/// `x @ weight^T + bias` of a `Linear`. With an autocast dtype the input, weight and bias are
/// first cast to it (a differentiable cast, so gradients reach the master weights in their own
/// dtype; the output stays in the autocast dtype). On the CPU in f32 one node,
/// [`super::fused::linear`] (the matmul with [`super::gemm`]'s kernels; the bias gradient sums
/// rows in one contiguous pass, where candle's reduction of the broadcast walks the columns
/// with a stride); where `path` recomputes, [`super::recompute::linear`]; elsewhere candle's
/// `Linear::forward`.
fn linear_fwd(l: &Linear, x: &Tensor, compute: Option<DType>, path: OpPath) -> Result<Tensor> {
    let cast;
    let (l, x) = match autocast_to(l, x, compute) {
        Some(cd) => {
            cast = (cast_linear(l, Some(cd))?, x.to_dtype(cd)?);
            (&cast.0, &cast.1)
        }
        None => (l, x),
    };
    match l.bias() {
        Some(b) if path.recomputes(&[x, l.weight(), b]) => {
            super::recompute::linear(x, l.weight(), b)
        }
        Some(b) if super::fused::usable(&[x, l.weight(), b]) => {
            super::fused::linear(&rows2d(x)?, l.weight(), b)?.reshape(linear_out_dims(l, x)?)
        }
        None if super::fused::usable(&[x, l.weight()]) => {
            matmul_weight(l, x)?.reshape(linear_out_dims(l, x)?)
        }
        _ => l.forward(x),
    }
}

/// `gelu(x @ weight^T + bias)` (exact GELU): on the CPU in f32 one fused op adds the bias and
/// applies the GELU, with a single-pass backward (candle's GELU backward makes about ten
/// full-size temporaries) unless `path` recomputes; elsewhere [`linear_fwd`], then the GELU
/// ([`super::recompute::gelu_erf`] where `path` recomputes: its backward is one op).
fn linear_gelu(l: &Linear, x: &Tensor, compute: Option<DType>, path: OpPath) -> Result<Tensor> {
    match l.bias() {
        Some(b)
            if autocast_to(l, x, compute).is_none()
                && !path.recomputes(&[x, l.weight(), b])
                && super::fused::usable(&[x, l.weight(), b]) =>
        {
            super::fused::bias_gelu(&matmul_weight(l, x)?, b)?.reshape(linear_out_dims(l, x)?)
        }
        _ => {
            let h = linear_fwd(l, x, compute, path)?;
            if path.recomputes(&[&h]) {
                super::recompute::gelu_erf(&h)
            } else {
                h.gelu_erf()
            }
        }
    }
}

/// Cos/sin tables of the rotary embedding for every position, shape (max_pos, rotary_ndims),
/// in the rotate-half layout: the frequencies repeated twice.
#[derive(Debug, Clone)]
struct Rotary {
    cos: Tensor,
    sin: Tensor,
    ndims: usize,
}

impl Rotary {
    fn new(cfg: &GptNeoXConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let ndims = cfg.rotary_ndims();
        let inv_freq: Vec<f32> = (0..ndims)
            .step_by(2)
            .map(|i| 1.0 / (cfg.rotary_emb_base.powf(i as f64 / ndims as f64)) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, ndims / 2), dev)?;
        let t = Tensor::arange(0u32, cfg.max_position_embeddings as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_position_embeddings, 1))?;
        let freqs = t.broadcast_mul(&inv_freq)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        Ok(Self {
            cos: emb.cos()?.to_dtype(dtype)?,
            sin: emb.sin()?.to_dtype(dtype)?,
            ndims,
        })
    }

    /// Tables gathered at `position_ids` (b, t), shaped (b, 1, t, ndims) to broadcast over heads.
    fn gather(&self, position_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = position_ids.dims2()?;
        let flat = position_ids.flatten_all()?;
        let cos = self
            .cos
            .index_select(&flat, 0)?
            .reshape((b, 1, t, self.ndims))?;
        let sin = self
            .sin
            .index_select(&flat, 0)?
            .reshape((b, 1, t, self.ndims))?;
        Ok((cos, sin))
    }

    /// Rotate the first `ndims` dims of each head of `x` (b, h, t, head_size), rotate-half layout.
    fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let hs = x.dim(D::Minus1)?;
        let x_rot = x.narrow(D::Minus1, 0, self.ndims)?;
        let half = self.ndims / 2;
        let x1 = x_rot.narrow(D::Minus1, 0, half)?;
        let x2 = x_rot.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let out = (x_rot.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?;
        if self.ndims == hs {
            Ok(out)
        } else {
            let x_pass = x.narrow(D::Minus1, self.ndims, hs - self.ndims)?;
            Tensor::cat(&[&out, &x_pass], D::Minus1)
        }
    }
}

/// Keys and values of one layer for the positions seen so far.
///
/// They live in preallocated buffers (b, heads, capacity, head_size): each step writes its new
/// positions in place and attention reads the filled prefix `..len`, so a decode step no
/// longer copies the whole cache (as a `Tensor::cat` per step would). The buffers grow (to
/// at least twice their size) when a step would overflow them. Writes are plain copies, so
/// no gradient flows through the cache: use it with inference copies only.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

impl LayerCache {
    /// Append `k`, `v` (b, heads, t_new, head_size) and return views of all cached keys and
    /// values, (b, heads, len, head_size).
    fn append(&mut self, k: &Tensor, v: &Tensor, capacity: usize) -> Result<(Tensor, Tensor)> {
        let (b, h, t_new, hs) = k.dims4()?;
        let need = self.len + t_new;
        let cap = match &self.k {
            Some(buf) => buf.dim(2)?,
            None => 0,
        };
        if need > cap
            || self
                .k
                .as_ref()
                .is_some_and(|buf| buf.dim(0).ok() != Some(b))
        {
            let new_cap = need.max(capacity).max(2 * cap);
            let grow = |old: &Option<Tensor>, like: &Tensor| -> Result<Tensor> {
                let buf = Tensor::zeros((b, h, new_cap, hs), like.dtype(), like.device())?;
                if let Some(old) = old
                    && self.len > 0
                {
                    buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            let nk = grow(&self.k, k)?;
            let nv = grow(&self.v, v)?;
            self.k = Some(nk);
            self.v = Some(nv);
        }
        let (kb, vb) = match (&self.k, &self.v) {
            (Some(kb), Some(vb)) => (kb, vb),
            _ => candle_core::bail!("kv cache: buffers missing after allocation"),
        };
        kb.slice_set(&k.detach().contiguous()?, 2, self.len)?;
        vb.slice_set(&v.detach().contiguous()?, 2, self.len)?;
        self.len = need;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }
}

/// A KV cache for generation, one entry per layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    capacity: usize,
}

impl KvCache {
    /// An empty cache whose buffers start small and grow as needed.
    pub fn new(n_layers: usize) -> Self {
        Self::with_capacity(n_layers, 0)
    }

    /// An empty cache whose buffers are allocated for `capacity` positions up front (the
    /// prompt plus every generated token), so that no step reallocates them.
    pub fn with_capacity(n_layers: usize, capacity: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); n_layers],
            capacity,
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.layers.first().map(|l| l.len).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep only the batch rows in `rows` (to drop finished sequences).
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for l in &mut self.layers {
            if let Some(k) = &l.k {
                l.k = Some(k.index_select(rows, 0)?);
            }
            if let Some(v) = &l.v {
                l.v = Some(v.index_select(rows, 0)?);
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Attention {
    query_key_value: Linear,
    dense: Linear,
    n_heads: usize,
    head_size: usize,
}

impl Attention {
    fn new(cfg: &GptNeoXConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let std = cfg.initializer_range;
        Ok(Self {
            query_key_value: linear(h, 3 * h, std, vb.pp("query_key_value"))?,
            dense: linear(h, h, std, vb.pp("dense"))?,
            n_heads: cfg.num_attention_heads,
            head_size: cfg.head_size(),
        })
    }

    /// Queries, keys and values (b, heads, t, head_size) of `x` (b, t, hidden), rotary applied.
    fn project(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        cos_sin: &(Tensor, Tensor),
        path: OpPath,
        compute: Option<DType>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        // Per head, the fused projection is laid out [q | k | v], each head_size wide.
        let qkv = linear_fwd(&self.query_key_value, x, compute, path)?;
        let (cos, sin) = cos_sin;
        if super::fused::usable(&[&qkv, cos, sin]) {
            // One custom op per part (split, heads-first layout and rotary together); it has
            // a backward pass, so both op paths use it.
            let split = |part, rotate| {
                super::fused::split_heads_rotary(&qkv, cos, sin, self.n_heads, part, rotate)
            };
            Ok((split(0, true)?, split(1, true)?, split(2, false)?))
        } else if path.recomputes(&[&qkv, cos, sin]) {
            // Queries and keys as one node each, rotated in candle's rope kernel (forward and
            // backward); the values as a plain copy.
            let rotate = (rotary.ndims > 0).then_some(rotary.ndims);
            let split = |part| {
                super::recompute::split_heads_rotary(&qkv, cos, sin, self.n_heads, part, rotate)
            };
            let v = qkv
                .reshape((b, t, self.n_heads, 3 * self.head_size))?
                .narrow(D::Minus1, 2 * self.head_size, self.head_size)?
                .transpose(1, 2)?
                .contiguous()?;
            Ok((split(0)?, split(1)?, v))
        } else {
            let qkv = qkv
                .reshape((b, t, self.n_heads, 3 * self.head_size))?
                .transpose(1, 2)?; // (b, h, t, 3*hs)
            let q = qkv.narrow(D::Minus1, 0, self.head_size)?;
            let k = qkv.narrow(D::Minus1, self.head_size, self.head_size)?;
            let v = qkv
                .narrow(D::Minus1, 2 * self.head_size, self.head_size)?
                .contiguous()?;
            Ok((rotary.apply(&q, cos, sin)?, rotary.apply(&k, cos, sin)?, v))
        }
    }

    /// Attention of queries `q` (b, h, t, hs) over keys / values (b, h, t_k, hs) with the
    /// additive `bias` (b, 1, t, t_k), then the output projection: (b, t, hidden).
    /// `strided_keys`: `k` is a prefix view of a cache buffer (read through its strides).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        path: OpPath,
        strided_keys: bool,
        compute: Option<DType>,
    ) -> Result<Tensor> {
        let (b, _, t, _) = q.dims4()?;
        let scale = 1.0 / (self.head_size as f64).sqrt();
        let out = if path == OpPath::Fused && super::fused::usable(&[q, k, v, bias]) {
            // Inference on the CPU: one pass per (row, head), reading the cache in place.
            super::fused::attention_inference(q, k, v, bias, scale)?
        } else if !strided_keys && path.recomputes(&[q, k, v, bias]) {
            super::recompute::attention(q, k, v, bias, scale)?
        } else {
            self.attention_probs_v(q, k, v, bias, path, strided_keys, scale)?
        };
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, self.n_heads * self.head_size))?;
        linear_fwd(&self.dense, &out, compute, path)
    }

    /// softmax(q k^T * scale + bias) v with candle's matmuls, (b, h, t, hs).
    #[allow(clippy::too_many_arguments)]
    fn attention_probs_v(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        path: OpPath,
        strided_keys: bool,
        scale: f64,
    ) -> Result<Tensor> {
        let q = q.contiguous()?;
        // The cached keys are a prefix view of a larger buffer: the matmul reads them through
        // their strides; a transposed copy would cost as much as the cache itself each step.
        let kt = if strided_keys {
            k.t()?
        } else {
            k.t()?.contiguous()?
        };
        // Scores and softmax in f32, as HF does; `bias` is (b, 1, t, t_total) additive.
        let raw = q.matmul(&kt)?.to_dtype(DType::F32)?;
        let probs = match path {
            OpPath::Differentiable if super::fused::usable(&[&raw, bias]) => {
                super::fused::masked_softmax(&raw, bias, scale)?
            }
            OpPath::Differentiable | OpPath::Recompute | OpPath::Layer | OpPath::Composite => {
                candle_nn::ops::softmax(&(raw * scale)?.broadcast_add(bias)?, D::Minus1)?
            }
            OpPath::Fused => {
                candle_nn::ops::softmax_last_dim(&(raw * scale)?.broadcast_add(bias)?)?
            }
        };
        probs.to_dtype(v.dtype())?.matmul(v) // (b, h, t, hs)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        cos_sin: &(Tensor, Tensor),
        bias: &Tensor,
        cache: Option<(&mut LayerCache, usize)>,
        path: OpPath,
        compute: Option<DType>,
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(x, rotary, cos_sin, path, compute)?;
        let cached = cache.is_some();
        let (k, v) = match cache {
            None => (k, v),
            Some((c, capacity)) => c.append(&k, &v, capacity)?,
        };
        self.attend(&q, &k, &v, bias, path, cached, compute)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
}

impl Mlp {
    fn new(cfg: &GptNeoXConfig, vb: VarBuilder) -> Result<Self> {
        let std = cfg.initializer_range;
        Ok(Self {
            dense_h_to_4h: linear(
                cfg.hidden_size,
                cfg.intermediate_size,
                std,
                vb.pp("dense_h_to_4h"),
            )?,
            dense_4h_to_h: linear(
                cfg.intermediate_size,
                cfg.hidden_size,
                std,
                vb.pp("dense_4h_to_h"),
            )?,
        })
    }

    fn forward(&self, x: &Tensor, path: OpPath, compute: Option<DType>) -> Result<Tensor> {
        let h = linear_gelu(&self.dense_h_to_4h, x, compute, path)?;
        linear_fwd(&self.dense_4h_to_h, &h, compute, path)
    }
}

/// Tensors flattened and concatenated into one vector.
fn pack(ts: &[Tensor]) -> Result<Tensor> {
    let flat = ts
        .iter()
        .map(|t| t.flatten_all())
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&flat, 0)
}

/// Gradients of parameters of checkpointed layers, handed from the backward pass of each
/// layer's node to [`GptNeoX::backward`] (see [`Layer::checkpointed`]).
type Stash = std::sync::Arc<std::sync::Mutex<Vec<(Tensor, Tensor)>>>;

/// An error naming the first token of `rows` beyond the vocabulary: "`what` `row`: token ..
/// at position ..". Checked on the host before tokens are uploaded: a GPU's embedding lookup
/// and the log-probs' gather do not check their indices.
pub(crate) fn check_tokens<'a>(
    what: &str,
    rows: impl Iterator<Item = &'a [u32]>,
    vocab: usize,
) -> Result<()> {
    for (r, row) in rows.enumerate() {
        if let Some((j, t)) = row.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
            candle_core::bail!(
                "{what} {r}: token {t} at position {j} is beyond the vocabulary of {vocab}"
            );
        }
    }
    Ok(())
}

fn lock(stash: &Stash) -> Result<std::sync::MutexGuard<'_, Vec<(Tensor, Tensor)>>> {
    stash
        .lock()
        .map_err(|_| candle_core::Error::Msg("checkpointed layers: gradient stash poisoned".into()))
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    attention: Attention,
    mlp: Mlp,
    parallel: bool,
}

impl Layer {
    fn new(cfg: &GptNeoXConfig, vb: VarBuilder) -> Result<Self> {
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            input_layernorm: LayerNorm::new(cfg.hidden_size, eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: LayerNorm::new(
                cfg.hidden_size,
                eps,
                vb.pp("post_attention_layernorm"),
            )?,
            attention: Attention::new(cfg, vb.pp("attention"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            parallel: cfg.use_parallel_residual,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        cos_sin: &(Tensor, Tensor),
        bias: &Tensor,
        cache: Option<(&mut LayerCache, usize)>,
        path: OpPath,
        compute: Option<DType>,
    ) -> Result<Tensor> {
        let attn = self.attention.forward(
            &self.input_layernorm.forward(x, path)?,
            rotary,
            cos_sin,
            bias,
            cache,
            path,
            compute,
        )?;
        self.residual_mlp(x, &attn, path, compute)
    }

    /// The rest of the layer after attention: residual connection(s) and the MLP. The
    /// residual stream stays in the master dtype; branch outputs are cast back to it.
    fn residual_mlp(
        &self,
        x: &Tensor,
        attn: &Tensor,
        path: OpPath,
        compute: Option<DType>,
    ) -> Result<Tensor> {
        let dt = x.dtype();
        let attn = attn.to_dtype(dt)?;
        if self.parallel {
            let mlp = self
                .mlp
                .forward(
                    &self.post_attention_layernorm.forward(x, path)?,
                    path,
                    compute,
                )?
                .to_dtype(dt)?;
            (x + attn)? + mlp
        } else {
            let h = (x + attn)?;
            let mlp = self
                .mlp
                .forward(
                    &self.post_attention_layernorm.forward(&h, path)?,
                    path,
                    compute,
                )?
                .to_dtype(dt)?;
            h + mlp
        }
    }

    /// Every parameter tensor of the layer.
    fn params(&self) -> Vec<Tensor> {
        let a = &self.attention;
        let m = &self.mlp;
        let mut out = vec![
            self.input_layernorm.weight.clone(),
            self.input_layernorm.bias.clone(),
            self.post_attention_layernorm.weight.clone(),
            self.post_attention_layernorm.bias.clone(),
        ];
        for l in [
            &a.query_key_value,
            &a.dense,
            &m.dense_h_to_4h,
            &m.dense_4h_to_h,
        ] {
            out.push(l.weight().clone());
            out.extend(l.bias().cloned());
        }
        out
    }

    /// `f(self, x)` as one node of candle's graph that keeps only its input `x`: activation
    /// checkpointing. The forward pass runs without a graph. The backward pass runs `f` again
    /// with a graph of its own (over a copy of `x` and the layer's own parameters), and
    /// backpropagates the output gradient through it: the gradient of `x` goes on through the
    /// outer graph, the parameters' gradients into `stash`, which [`GptNeoX::backward`] adds
    /// to the gradients of the outer backward pass (a custom op of candle's graph can only hand
    /// gradients to its inputs, and a layer has twelve parameters).
    fn checkpointed<F>(&self, x: &Tensor, stash: &Stash, f: F) -> Result<Tensor>
    where
        F: Fn(&Layer, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
    {
        let params = self.params();
        if !x.track_op() {
            // No node (a custom op over an untracked input is none): without a graph, or, if
            // some parameter is tracked, with the plain graph, which gives it its gradient.
            return f(self, x);
        }
        // Detached parameters: no graph in the forward pass.
        let detached: Vec<Tensor> = params.iter().map(|t| t.detach()).collect();
        let f = std::sync::Arc::new(f);
        let (f_bwd, layer, stash) = (f.clone(), self.clone(), stash.clone());
        super::recompute::with_backward(
            "checkpointed-layer",
            &[x],
            move |a| f(&self.with_params(&detached)?, &a[0]),
            move |a, g| {
                let x = candle_core::Var::from_tensor(&a[0])?;
                let y = f_bwd(&layer, x.as_tensor())?;
                let grads = (y * g)?.sum_all()?.backward()?;
                let mut pending = lock(&stash)?;
                for p in params.iter().filter(|p| p.is_variable()) {
                    if let Some(gp) = grads.get(p) {
                        pending.push((p.clone(), gp.clone()));
                    }
                }
                let dx = match grads.get(x.as_tensor()) {
                    Some(d) => d.clone(),
                    None => x.zeros_like()?,
                };
                Ok(vec![Some(dx)])
            },
        )
    }

    /// Whether the layer can be one [`super::layer_node`] over an input that is tracked by the
    /// graph (`x_tracked`) or not: it has its twelve parameters, and every tracked parameter is
    /// a variable over a tracked input (the node hands the parameters' gradients aside, so they
    /// cannot flow on into a graph, and an untracked input makes no node).
    fn node_ready(&self, x_tracked: bool) -> bool {
        let params = self.params();
        params.len() == super::layer_node::N_PARAMS
            && params
                .iter()
                .all(|p| !p.track_op() || (x_tracked && p.is_variable()))
    }

    /// The layer over the packed streams `x` (prompt rows + response rows, hidden) as one
    /// [`super::layer_node`], the parameters' gradients going to `stash` (see
    /// [`Layer::node_ready`]).
    fn shared_node(
        &self,
        x: &Tensor,
        streams: &std::sync::Arc<super::layer_node::Streams>,
        dims: super::layer_node::Dims,
        stash: &Stash,
    ) -> Result<Tensor> {
        let params = self.params();
        let w = super::layer_node::Params::try_from(params.clone()).map_err(|p| {
            candle_core::Error::Msg(format!(
                "layer node: {} parameter tensors, expected 12",
                p.len()
            ))
        })?;
        let stash = stash.clone();
        let sink: super::layer_node::Sink = std::sync::Arc::new(move |grads: Vec<Tensor>| {
            let mut pending = lock(&stash)?;
            for (p, g) in params.iter().zip(grads) {
                if p.is_variable() {
                    pending.push((p.clone(), g));
                }
            }
            Ok(())
        });
        super::layer_node::layer(x, &w, streams, dims, sink)
    }

    /// The layer with the parameter tensors `p`, in the order of [`Layer::params`].
    fn with_params(&self, p: &[Tensor]) -> Result<Self> {
        let mut out = self.clone();
        let mut it = p.iter().cloned();
        let mut next = || {
            it.next()
                .ok_or_else(|| candle_core::Error::Msg("layer parameters: too few".into()))
        };
        (out.input_layernorm.weight, out.input_layernorm.bias) = (next()?, next()?);
        (
            out.post_attention_layernorm.weight,
            out.post_attention_layernorm.bias,
        ) = (next()?, next()?);
        let a = &mut out.attention;
        let m = &mut out.mlp;
        for l in [
            &mut a.query_key_value,
            &mut a.dense,
            &mut m.dense_h_to_4h,
            &mut m.dense_4h_to_h,
        ] {
            let w = next()?;
            let b = match l.bias() {
                Some(_) => Some(next()?),
                None => None,
            };
            *l = Linear::new(w, b);
        }
        Ok(out)
    }

    /// The layer with its linear layers cast to the autocast dtype once ([`cast_linear`]), for
    /// [`Layer::forward_shared`], which applies each of them to two streams.
    fn cast_linears(&self, compute: Option<DType>) -> Result<Self> {
        let mut l = self.clone();
        let a = &mut l.attention;
        a.query_key_value = cast_linear(&a.query_key_value, compute)?;
        a.dense = cast_linear(&a.dense, compute)?;
        l.mlp.dense_h_to_4h = cast_linear(&l.mlp.dense_h_to_4h, compute)?;
        l.mlp.dense_4h_to_h = cast_linear(&l.mlp.dense_4h_to_h, compute)?;
        Ok(l)
    }

    /// The layer over a prompt stream `xp` (n, Pm, hidden) and a response stream `xr`
    /// (m, Rm, hidden) whose row r continues prompt `rows[r]`: the response queries attend to
    /// their prompt's keys and values (computed once per prompt) and to their own.
    #[allow(clippy::too_many_arguments)]
    fn forward_shared(
        &self,
        xp: &Tensor,
        xr: &Tensor,
        rows: &Tensor,
        rotary: &Rotary,
        cos_sin: (&(Tensor, Tensor), &(Tensor, Tensor)),
        bias: (&Tensor, &Tensor),
        path: OpPath,
        compute: Option<DType>,
    ) -> Result<(Tensor, Tensor)> {
        let att = &self.attention;
        let hp = self.input_layernorm.forward(xp, path)?;
        let hr = self.input_layernorm.forward(xr, path)?;
        let (qp, kp, vp) = att.project(&hp, rotary, cos_sin.0, path, compute)?;
        let (qr, kr, vr) = att.project(&hr, rotary, cos_sin.1, path, compute)?;
        let k_all = Tensor::cat(&[&kp.contiguous()?.index_select(rows, 0)?, &kr], 2)?;
        let v_all = Tensor::cat(&[&vp.contiguous()?.index_select(rows, 0)?, &vr], 2)?;
        let ap = att.attend(&qp, &kp, &vp, bias.0, path, false, compute)?;
        let ar = att.attend(&qr, &k_all, &v_all, bias.1, path, false, compute)?;
        Ok((
            self.residual_mlp(xp, &ap, path, compute)?,
            self.residual_mlp(xr, &ar, path, compute)?,
        ))
    }
}

/// A GPT-NeoX causal language model (`GPTNeoXForCausalLM`).
#[derive(Debug, Clone)]
pub struct GptNeoX {
    embed_in: Embedding,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    embed_out: Linear,
    rotary: Rotary,
    cfg: GptNeoXConfig,
    path: OpPath,
    device: Device,
    dtype: DType,
    /// Autocast: the dtype of the matmuls when it differs from `dtype` (see
    /// [`GptNeoX::with_compute_dtype`]).
    compute_dtype: Option<DType>,
    /// Activation checkpointing per layer (see [`GptNeoX::with_checkpointing`]).
    checkpoint: bool,
    /// Parameter gradients of checkpointed layers not yet collected by [`GptNeoX::backward`].
    stash: Stash,
}

/// Additive attention bias (b, 1, q_len, k_len) in f32: 0 where a query may attend to a key,
/// a large negative number elsewhere. `key_mask` (b, k_len) is 1 for real tokens, 0 for padding;
/// the queries are the last `q_len` key positions (causal).
pub fn attention_bias(key_mask: &Tensor, q_len: usize) -> Result<Tensor> {
    let (b, k_len) = key_mask.dims2()?;
    let dev = key_mask.device();
    let offset = k_len - q_len;
    let causal: Vec<u8> = (0..q_len)
        .flat_map(|i| (0..k_len).map(move |j| u8::from(j <= i + offset)))
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, q_len, k_len), dev)?;
    let keys = key_mask.to_dtype(DType::U8)?.reshape((b, 1, 1, k_len))?;
    let allowed = causal.broadcast_mul(&keys)?; // (b,1,q,k) in {0,1}
    // A finite minimum keeps fully masked rows (left padding) free of NaN.
    let neg = Tensor::full(f32::MIN, (b, 1, q_len, k_len), dev)?;
    let zero = Tensor::zeros((b, 1, q_len, k_len), DType::F32, dev)?;
    allowed
        .broadcast_as((b, 1, q_len, k_len))?
        .where_cond(&zero, &neg)
}

/// Position ids from an attention mask: cumsum(mask) - 1, clamped at 0 (padding positions).
pub fn position_ids_from_mask(mask: &Tensor) -> Result<Tensor> {
    let rows = mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let (b, t) = mask.dims2()?;
    let mut out = Vec::with_capacity(b * t);
    for row in rows {
        let mut c = 0u32;
        for m in row {
            c += m.min(1);
            out.push(c.saturating_sub(1));
        }
    }
    Tensor::from_vec(out, (b, t), mask.device())
}

impl GptNeoX {
    /// Build the model from a `VarBuilder` whose names follow HF's layout (the root of the
    /// builder holds `gpt_neox.*` and `embed_out.*`). With `VarBuilder::from_varmap` this makes
    /// a fresh randomly initialised model (normal(0, initializer_range) weights, zero biases,
    /// unit layer norms, as HF initialises GPT-NeoX).
    pub fn new(cfg: &GptNeoXConfig, vb: VarBuilder) -> Result<Self> {
        let std = cfg.initializer_range;
        let base = vb.pp("gpt_neox");
        let emb = base.pp("embed_in").get_with_hints(
            (cfg.vocab_size, cfg.hidden_size),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        let embed_in = Embedding::new(emb, cfg.hidden_size);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, base.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(
            cfg.hidden_size,
            cfg.layer_norm_eps,
            base.pp("final_layer_norm"),
        )?;
        let w = vb.pp("embed_out").get_with_hints(
            (cfg.vocab_size, cfg.hidden_size),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        let embed_out = Linear::new(w, None);
        let rotary = Rotary::new(cfg, vb.dtype(), vb.device())?;
        Ok(Self {
            embed_in,
            layers,
            final_layer_norm,
            embed_out,
            rotary,
            cfg: cfg.clone(),
            path: OpPath::Differentiable,
            device: vb.device().clone(),
            dtype: vb.dtype(),
            compute_dtype: None,
            checkpoint: false,
            stash: Stash::default(),
        })
    }

    pub fn config(&self) -> &GptNeoXConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype of the matmuls: [`GptNeoX::dtype`] unless autocast is on.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype.unwrap_or(self.dtype)
    }

    /// Autocast-style mixed precision: keep the parameters (master weights, and with them the
    /// gradients and optimizer state) in the model dtype, but run every linear layer (and the
    /// attention matmuls and rotary embedding) in `dtype`, e.g. bf16. Weights are cast in the
    /// forward pass with a differentiable cast. The embedding lookup, the residual stream and
    /// layer norms stay in the model dtype; layer-norm statistics and the attention softmax
    /// are f32 as always; logits come out in `dtype` (scoring casts them to f32 before
    /// `log_softmax`). Passing the model dtype turns autocast off.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = (dtype != self.dtype).then_some(dtype);
        self
    }

    /// Activation checkpointing: in a forward pass with a graph (no KV cache), each layer is
    /// one node that keeps only its input and its parameters, and the backward pass runs the
    /// layer's forward pass again, one layer at a time: the memory of a training step's
    /// activations falls from every layer's intermediates to one residual stream per layer
    /// plus one layer's intermediates, for about one more forward pass of compute. Values and
    /// gradients are those without it.
    pub fn with_checkpointing(mut self, on: bool) -> Self {
        self.checkpoint = on;
        self
    }

    pub fn checkpointing(&self) -> bool {
        self.checkpoint
    }

    /// The gradients of `loss`: `loss.backward()`, plus the gradients of the parameters of
    /// layers that are one node of the graph (checkpointed layers, and the layer nodes of
    /// shared-prefix scoring, see [`OpPath`]), which those nodes hand over aside (a custom op can
    /// only pass gradients to its inputs). Use it instead of `loss.backward()` on a model that
    /// is trained; the two are the same where no layer is one node.
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        lock(&self.stash)?.clear();
        let mut grads = loss.backward()?;
        super::profile::section("bwd.collect_stash", &self.device, || {
            for (p, g) in lock(&self.stash)?.drain(..) {
                let sum = match grads.get(&p) {
                    Some(old) => (old + g)?,
                    None => g,
                };
                grads.insert(&p, sum);
            }
            Ok::<_, candle_core::Error>(())
        })?;
        Ok(grads)
    }

    /// An error when the parameter gradients that layer nodes handed aside in an earlier
    /// backward pass were never collected (`loss.backward()` called instead of
    /// [`GptNeoX::backward`]).
    fn check_stash(&self) -> Result<()> {
        if !lock(&self.stash)?.is_empty() {
            candle_core::bail!(
                "checkpointed layers or layer nodes: the parameter gradients of an earlier \
                 backward pass were never collected; with checkpointing or layer nodes use \
                 GptNeoX::backward(&loss), not loss.backward()"
            );
        }
        Ok(())
    }

    pub fn op_path(&self) -> OpPath {
        self.path
    }

    /// Choose the op path. Only use [`OpPath::Fused`] on a model that is never differentiated.
    pub fn with_op_path(mut self, path: OpPath) -> Self {
        self.path = path;
        self
    }

    /// Every parameter as (HF name, tensor).
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "gpt_neox.embed_in.weight".to_string(),
            self.embed_in.embeddings().clone(),
        )];
        let ln = |out: &mut Vec<(String, Tensor)>, p: &str, l: &LayerNorm| {
            out.push((format!("{p}.weight"), l.weight.clone()));
            out.push((format!("{p}.bias"), l.bias.clone()));
        };
        let lin = |out: &mut Vec<(String, Tensor)>, p: &str, l: &Linear| {
            out.push((format!("{p}.weight"), l.weight().clone()));
            if let Some(b) = l.bias() {
                out.push((format!("{p}.bias"), b.clone()));
            }
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("gpt_neox.layers.{i}");
            ln(
                &mut out,
                &format!("{p}.input_layernorm"),
                &layer.input_layernorm,
            );
            ln(
                &mut out,
                &format!("{p}.post_attention_layernorm"),
                &layer.post_attention_layernorm,
            );
            lin(
                &mut out,
                &format!("{p}.attention.query_key_value"),
                &layer.attention.query_key_value,
            );
            lin(
                &mut out,
                &format!("{p}.attention.dense"),
                &layer.attention.dense,
            );
            lin(
                &mut out,
                &format!("{p}.mlp.dense_h_to_4h"),
                &layer.mlp.dense_h_to_4h,
            );
            lin(
                &mut out,
                &format!("{p}.mlp.dense_4h_to_h"),
                &layer.mlp.dense_4h_to_h,
            );
        }
        ln(
            &mut out,
            "gpt_neox.final_layer_norm",
            &self.final_layer_norm,
        );
        lin(&mut out, "embed_out", &self.embed_out);
        out
    }

    /// A copy whose weights are detached from any autograd graph (sharing their storage, so it
    /// sees later optimizer updates) and that uses the fused inference kernels. Use it for
    /// sampling and scoring without gradients: no graph is kept alive across generation steps.
    pub fn inference_copy(&self) -> Result<Self> {
        let tensors = self
            .named_parameters()
            .into_iter()
            .map(|(n, t)| (n, t.detach()))
            .collect();
        let vb = VarBuilder::from_tensors(tensors, self.dtype, &self.device);
        Ok(Self::new(&self.cfg, vb)?
            .with_op_path(OpPath::Fused)
            .with_compute_dtype(self.compute_dtype()))
    }

    /// Logits (b, t, vocab) for every position of `input_ids` (b, t).
    ///
    /// `attention_mask` (b, t) is 1 for tokens and 0 for padding (right or left padding). With
    /// left padding pass `position_ids` from [`position_ids_from_mask`]; by default positions
    /// are 0..t.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let mask = match attention_mask {
            Some(m) => m.clone(),
            None => Tensor::ones((b, t), DType::U8, &self.device)?,
        };
        let pos = match position_ids {
            Some(p) => p.clone(),
            None => Tensor::arange(0u32, t as u32, &self.device)?
                .unsqueeze(0)?
                .broadcast_as((b, t))?
                .contiguous()?,
        };
        let bias = attention_bias(&mask, t)?;
        self.run(input_ids, &pos, &bias, None, false)
    }

    /// One generation step with a KV cache. `input_ids` (b, t_new) are the new tokens,
    /// `full_mask` (b, t_cached + t_new) the attention mask over all positions so far and
    /// `position_ids` (b, t_new) their positions. Returns logits (b, t_new, vocab).
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        full_mask: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (_, t_new) = input_ids.dims2()?;
        let bias = attention_bias(full_mask, t_new)?;
        self.run(input_ids, position_ids, &bias, Some(cache), false)
    }

    fn run(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        bias: &Tensor,
        mut cache: Option<&mut KvCache>,
        last_only: bool,
    ) -> Result<Tensor> {
        let max = self.cfg.max_position_embeddings;
        let (b, t) = input_ids.dims2()?;
        let n_pos = position_ids.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if n_pos >= max {
            candle_core::bail!("position {n_pos} is beyond max_position_embeddings {max}");
        }
        let compute = self.compute_dtype;
        let cos_sin = self.rotary_tables(position_ids)?;
        let checkpoint = self.checkpoint && cache.is_none();
        if checkpoint {
            self.check_stash()?;
        }
        let mut x = self.embed_in.forward(input_ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            if checkpoint {
                let (rot, cs, bias, path) = (
                    self.rotary.clone(),
                    cos_sin.clone(),
                    bias.clone(),
                    self.path,
                );
                x = layer.checkpointed(&x, &self.stash, move |l, x| {
                    l.forward(x, &rot, &cs, &bias, None, path, compute)
                })?;
                continue;
            }
            let lc = cache.as_deref_mut().map(|c| (&mut c.layers[i], c.capacity));
            x = layer.forward(&x, &self.rotary, &cos_sin, bias, lc, self.path, compute)?;
        }
        let x = if last_only { x.narrow(1, t - 1, 1)? } else { x };
        let logits = self.head(&x)?;
        debug_assert_eq!(logits.dim(0)?, b);
        Ok(logits)
    }

    /// The layers of [`GptNeoX::forward_shared_prefix`] over the prompt stream `xp` and the
    /// response stream `xr`, each layer checkpointed ([`Layer::checkpointed`]): the two streams
    /// travel packed in one vector, which is all the graph keeps per layer.
    fn shared_layers_checkpointed(
        &self,
        xp: &Tensor,
        xr: &Tensor,
        rows: &Tensor,
        cos_sin: (&(Tensor, Tensor), &(Tensor, Tensor)),
        bias: (&Tensor, &Tensor),
    ) -> Result<(Tensor, Tensor)> {
        let (dp, dr) = (xp.dims().to_vec(), xr.dims().to_vec());
        let np = xp.elem_count();
        let split = move |x: &Tensor| -> Result<(Tensor, Tensor)> {
            let n = x.elem_count();
            Ok((
                x.narrow(0, 0, np)?.reshape(dp.as_slice())?,
                x.narrow(0, np, n - np)?.reshape(dr.as_slice())?,
            ))
        };
        let mut x = pack(&[xp.clone(), xr.clone()])?;
        for layer in &self.layers {
            let (rows, rot) = (rows.clone(), self.rotary.clone());
            let (cs_p, cs_r) = (cos_sin.0.clone(), cos_sin.1.clone());
            let (bias_p, bias_r) = (bias.0.clone(), bias.1.clone());
            let (path, compute) = (self.path, self.compute_dtype);
            let split = split.clone();
            x = layer.checkpointed(&x, &self.stash, move |l, x| {
                let (xp, xr) = split(x)?;
                let (yp, yr) = l.cast_linears(compute)?.forward_shared(
                    &xp,
                    &xr,
                    &rows,
                    &rot,
                    (&cs_p, &cs_r),
                    (&bias_p, &bias_r),
                    path,
                    compute,
                )?;
                pack(&[yp, yr])
            })?;
        }
        split(&x)
    }

    /// Whether [`GptNeoX::forward_shared_prefix`] runs each layer as one [`super::layer_node`]:
    /// on [`OpPath::Layer`], and on [`OpPath::Differentiable`] where the fused CPU kernels do
    /// not apply (CUDA, other dtypes, autocast), unless checkpointing is on or some layer
    /// cannot be a node ([`Layer::node_ready`]).
    fn shared_as_nodes(&self, x_tracked: bool) -> bool {
        let nodes = match self.path {
            OpPath::Layer => true,
            OpPath::Differentiable => {
                self.compute_dtype.is_some() || !super::fused::usable(&[self.embed_out.weight()])
            }
            OpPath::Recompute | OpPath::Composite | OpPath::Fused => false,
        };
        nodes && !self.checkpoint && self.layers.iter().all(|l| l.node_ready(x_tracked))
    }

    /// The layers of [`GptNeoX::forward_shared_prefix`] over the prompt stream `xp` and the
    /// response stream `xr`, each one [`super::layer_node`] over the two packed as rows.
    fn shared_layers_as_nodes(
        &self,
        xp: &Tensor,
        xr: &Tensor,
        streams: &std::sync::Arc<super::layer_node::Streams>,
    ) -> Result<(Tensor, Tensor)> {
        let h = self.cfg.hidden_size;
        let dims = super::layer_node::Dims {
            n_heads: self.cfg.num_attention_heads,
            head_size: self.cfg.head_size(),
            rotary: (self.rotary.ndims > 0).then_some(self.rotary.ndims),
            eps: self.cfg.layer_norm_eps,
            parallel: self.cfg.use_parallel_residual,
            compute: self.compute_dtype.unwrap_or(self.dtype),
        };
        let (np, nr) = (xp.elem_count() / h, xr.elem_count() / h);
        let mut x = Tensor::cat(&[xp.reshape((np, h))?, xr.reshape((nr, h))?], 0)?;
        for layer in &self.layers {
            x = layer.shared_node(&x, streams, dims, &self.stash)?;
        }
        Ok((
            x.narrow(0, 0, np)?.reshape(xp.dims())?,
            x.narrow(0, np, nr)?.reshape(xr.dims())?,
        ))
    }

    /// The rotary tables at `position_ids`, in the matmuls' dtype.
    fn rotary_tables(&self, position_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = self.rotary.gather(position_ids)?;
        match self.compute_dtype {
            Some(cd) => Ok((cos.to_dtype(cd)?, sin.to_dtype(cd)?)),
            None => Ok((cos, sin)),
        }
    }

    /// The rotary tables as f32 values, (max_position_embeddings, rotary_ndims) each: cos and
    /// sin in the rotate-half layout (for the hand-written CPU path, [`super::hand`]).
    pub(crate) fn rotary_values(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let f = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        Ok((f(&self.rotary.cos)?, f(&self.rotary.sin)?))
    }

    /// Final layer norm and output projection: logits of hidden states `x` (.., hidden).
    fn head(&self, x: &Tensor) -> Result<Tensor> {
        self.head_with(&self.embed_out, x)
    }

    /// [`GptNeoX::head`] with the output projection `embed_out` (e.g. cast once).
    fn head_with(&self, embed_out: &Linear, x: &Tensor) -> Result<Tensor> {
        let x = self.final_layer_norm.forward(x, self.path)?;
        linear_fwd(embed_out, &x, self.compute_dtype, self.path)
    }

    /// Logits at the last position only, (b, vocab): cheaper output projection for sampling.
    pub fn forward_cached_last(
        &self,
        input_ids: &Tensor,
        full_mask: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (_, t_new) = input_ids.dims2()?;
        let bias = attention_bias(full_mask, t_new)?;
        self.run(input_ids, position_ids, &bias, Some(cache), true)?
            .i((.., 0, ..))
    }

    /// Logits for several continuations of shared prompts, each prompt run once.
    ///
    /// `prompts` (n, each non-empty); `continuations` (m) as (prompt index, tokens): row r
    /// continues prompt `continuations[r].0` with its tokens. Returns the logits at each
    /// prompt's last token (n, vocab): the distribution of every continuation's first token,
    /// and, when some continuation is non-empty, the logits at each continuation token
    /// (m, Rm, vocab), Rm the longest continuation (right-padded; padded positions carry no
    /// meaning). Equal to running `prompt ++ continuation` rows through [`GptNeoX::forward`],
    /// for about the cost of the prompts once plus the continuations: preference pairs
    /// (chosen and rejected after one prompt) then cost half as much where prompts dominate.
    pub fn forward_shared_prefix(
        &self,
        prompts: &[&[u32]],
        continuations: &[(usize, &[u32])],
        pad_id: u32,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dev = &self.device;
        let n = prompts.len();
        let m = continuations.len();
        if n == 0 || prompts.iter().any(|p| p.is_empty()) {
            candle_core::bail!("shared-prefix forward: prompts must be non-empty");
        }
        if let Some((i, _)) = continuations.iter().find(|(i, _)| *i >= n) {
            candle_core::bail!(
                "shared-prefix forward: continuation of prompt {i}, only {n} prompts"
            );
        }
        // On the host, where it is free (a GPU's embedding lookup does not check).
        let vocab = self.cfg.vocab_size;
        check_tokens(
            "shared-prefix forward: prompt",
            prompts.iter().copied(),
            vocab,
        )?;
        let conts = continuations.iter().map(|(_, c)| *c);
        check_tokens("shared-prefix forward: continuation", conts, vocab)?;
        let pm = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let rm = continuations
            .iter()
            .map(|(_, c)| c.len())
            .max()
            .unwrap_or(0);
        let longest = continuations
            .iter()
            .map(|(i, c)| prompts[*i].len() + c.len())
            .chain(prompts.iter().map(|p| p.len()))
            .max()
            .unwrap_or(0);
        if longest > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {longest} tokens is beyond max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        // Prompt stream: right-padded, causal (padding comes after every real token).
        let mut ids = vec![pad_id; n * pm];
        let mut mask = vec![0u8; n * pm];
        for (i, p) in prompts.iter().enumerate() {
            ids[i * pm..i * pm + p.len()].copy_from_slice(p);
            mask[i * pm..i * pm + p.len()].fill(1);
        }
        let pos_p: Vec<u32> = (0..n).flat_map(|_| 0..pm as u32).collect();
        let pos_p = Tensor::from_vec(pos_p, (n, pm), dev)?;
        let bias_p = attention_bias(&Tensor::from_vec(mask, (n, pm), dev)?, pm)?;
        let mut xp = self
            .embed_in
            .forward(&Tensor::from_vec(ids, (n, pm), dev)?)?;
        let last: Vec<u32> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| (i * pm + p.len() - 1) as u32)
            .collect();
        let last = Tensor::from_vec(last, n, dev)?;
        let cs_p = self.rotary_tables(&pos_p)?;
        if rm == 0 {
            for layer in &self.layers {
                xp = layer.forward(
                    &xp,
                    &self.rotary,
                    &cs_p,
                    &bias_p,
                    None,
                    self.path,
                    self.compute_dtype,
                )?;
            }
            let hidden = xp
                .reshape((n * pm, self.cfg.hidden_size))?
                .index_select(&last, 0)?;
            return Ok((self.head(&hidden)?, None));
        }
        // Continuation stream: right-padded; keys are [its prompt's Pm | its own Rm].
        let mut ids = vec![pad_id; m * rm];
        let mut pos = vec![0u32; m * rm];
        let neg = f32::MIN;
        let mut bias = vec![neg; m * rm * (pm + rm)];
        for (r, (i, c)) in continuations.iter().enumerate() {
            let pl = prompts[*i].len();
            ids[r * rm..r * rm + c.len()].copy_from_slice(c);
            for q in 0..rm {
                // Padded positions repeat the last real one (their outputs are never read;
                // an empty continuation after a prompt that fills the context gets the last
                // position there is).
                let p = pl + q.min(c.len().saturating_sub(1));
                pos[r * rm + q] = p.min(self.cfg.max_position_embeddings - 1) as u32;
                let row = &mut bias[(r * rm + q) * (pm + rm)..(r * rm + q + 1) * (pm + rm)];
                row[..pl].fill(0.0);
                row[pm..pm + q + 1].fill(0.0);
            }
        }
        let rows_host: Vec<u32> = continuations.iter().map(|(i, _)| *i as u32).collect();
        let rows = Tensor::from_vec(rows_host.clone(), m, dev)?;
        let bias_r = Tensor::from_vec(bias, (m, 1, rm, pm + rm), dev)?;
        let cs_r = self.rotary_tables(&Tensor::from_vec(pos, (m, rm), dev)?)?;
        let mut xr = self
            .embed_in
            .forward(&Tensor::from_vec(ids, (m, rm), dev)?)?;
        if self.shared_as_nodes(xp.track_op() || xr.track_op()) {
            self.check_stash()?;
            let plan = super::qkv_heads::Plan::new(
                (n, pm, m, rm),
                (&rows_host, &rows),
                (
                    self.cfg.num_attention_heads,
                    self.cfg.head_size(),
                    self.rotary.ndims,
                ),
                [&cs_p, &cs_r],
                self.compute_dtype.unwrap_or(self.dtype),
                dev,
            )?;
            let streams = std::sync::Arc::new(super::layer_node::Streams {
                n,
                pm,
                m,
                rm,
                rows,
                cos_sin: [cs_p, cs_r],
                bias: [bias_p, bias_r],
                plan,
            });
            (xp, xr) = self.shared_layers_as_nodes(&xp, &xr, &streams)?;
        } else if self.checkpoint {
            self.check_stash()?;
            (xp, xr) = self.shared_layers_checkpointed(
                &xp,
                &xr,
                &rows,
                (&cs_p, &cs_r),
                (&bias_p, &bias_r),
            )?;
        } else {
            for layer in &self.layers {
                (xp, xr) = layer.cast_linears(self.compute_dtype)?.forward_shared(
                    &xp,
                    &xr,
                    &rows,
                    &self.rotary,
                    (&cs_p, &cs_r),
                    (&bias_p, &bias_r),
                    self.path,
                    self.compute_dtype,
                )?;
            }
        }
        super::profile::section("fwd.head", dev, || {
            let hidden = xp
                .reshape((n * pm, self.cfg.hidden_size))?
                .index_select(&last, 0)?;
            let embed_out = cast_linear(&self.embed_out, self.compute_dtype)?;
            Ok((
                self.head_with(&embed_out, &hidden)?,
                Some(self.head_with(&embed_out, &xr)?),
            ))
        })
    }
}
