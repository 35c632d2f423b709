//! Fused CPU kernels WITH a backward pass, for the training path on CPU in f32.
//!
//! candle's own fused `layer_norm` / `softmax_last_dim` have no backward, and the compositions
//! of basic ops that do (see `gpt_neox`) make a dozen full-size temporaries per call, each of
//! which the backward pass visits again (and candle's gradient store zero-fills one buffer per
//! operand). These custom ops do the forward in one pass over each row and the backward in
//! one more, with gradients written out by hand. Besides layer norm and the softmaxes: the
//! split of the fused QKV projection into heads with the rotary embedding, the linear layer
//! (matmul with [`super::gemm`]'s kernels, and its bias, in one node) and bias + exact GELU.
//! For inference only (no backward): the attention of a decode step over the KV cache.
//!
//! Only contiguous f32 tensors on the CPU are handled: [`usable`] says when; other devices and
//! dtypes keep the composite path. tests/fused_ops.rs compares values and gradients with the
//! composite.

use super::gemm::{self, MatRef};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Storage, Tensor,
};

/// False when `OVEROPT_NO_FUSED` is set: the crate's fused kernels (these, and the fused
/// RMSProp update of `train`) are then off everywhere.
pub fn enabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !*OFF.get_or_init(|| std::env::var_os("OVEROPT_NO_FUSED").is_some())
}

/// True when the fused kernels apply: every tensor is f32 on the CPU (and the environment
/// variable `OVEROPT_NO_FUSED` is unset: a switch to measure or cross-check the composite path).
pub fn usable(ts: &[&Tensor]) -> bool {
    enabled()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let (a, b) = contiguous_range(l, op)?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// `f` given a reader of the contiguous elements of an f32 or bf16 storage as f32 (element i of
/// the layout's range), without a widened copy: for the CPU twins of the crate's CUDA kernels,
/// which read either dtype.
pub(crate) fn with_f32_reader<R>(
    s: &CpuStorage,
    l: &Layout,
    op: &str,
    f: impl FnOnce(&dyn Fn(usize) -> f32) -> R,
) -> Result<R> {
    let (a, b) = contiguous_range(l, op)?;
    match s {
        CpuStorage::F32(v) => {
            let v = &v[a..b];
            Ok(f(&|i| v[i]))
        }
        CpuStorage::BF16(v) => {
            let v = &v[a..b];
            Ok(f(&|i| v[i].to_f32()))
        }
        _ => candle_core::bail!("{op}: expects an f32 or bf16 tensor"),
    }
}

/// The element range of a contiguous layout, or an error naming `op`.
pub(crate) fn contiguous_range(l: &Layout, op: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: expects a contiguous tensor")))
}

fn last_dim(l: &Layout) -> Result<usize> {
    match l.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => candle_core::bail!("fused op: empty last dimension"),
    }
}

/// The f32 values of a CPU tensor's storage at `l`, borrowed (see [`cpu_values`]).
pub(crate) fn cpu_slice<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => slice(c, l, "fused backward"),
        _ => candle_core::bail!("fused backward: expects a CPU tensor"),
    }
}

/// `cpu_values!(t, v)` binds `v: &[f32]` to the values of `t` (made contiguous, a no-op for
/// the contiguous tensors the ops produce) without copying them into a new vector.
macro_rules! cpu_values {
    ($t:expr, $v:ident) => {
        let c = $t.contiguous()?;
        let (guard, layout) = c.storage_and_layout();
        let $v = $crate::model::fused::cpu_slice(&guard, layout)?;
    };
}
pub(crate) use cpu_values;

/// Mean and 1/sqrt(var + eps) of a row (population variance, as torch's layer norm).
pub(crate) fn row_stats(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

/// Backward of layer norm for one row: `xn` the normalized row, `rstd` 1/sqrt(var + eps),
/// `g` the gradient of the output, `w` the weight. ADDS the input gradient to `dx` and the
/// row's weight and bias gradients to `dw`, `db` (f64 accumulators over rows).
pub(crate) fn layer_norm_bwd_row(
    xn: &[f32],
    rstd: f32,
    g: &[f32],
    w: &[f32],
    dx: &mut [f32],
    dw: &mut [f64],
    db: &mut [f64],
) {
    let d = xn.len();
    let (mut m1, mut m2) = (0f64, 0f64);
    for j in 0..d {
        let gw = (g[j] * w[j]) as f64;
        m1 += gw;
        m2 += gw * xn[j] as f64;
        dw[j] += (g[j] * xn[j]) as f64;
        db[j] += g[j] as f64;
    }
    let (m1, m2) = ((m1 / d as f64) as f32, (m2 / d as f64) as f32);
    for j in 0..d {
        dx[j] += rstd * (g[j] * w[j] - m1 - xn[j] * m2);
    }
}

/// The rotary embedding of one head, rotate-half layout: the first `c.len()` dims of `src`
/// rotated by the tables `c`, `s` at its position, the rest copied, into `dst`.
#[inline(always)]
pub(crate) fn rotate_half(src: &[f32], c: &[f32], s: &[f32], dst: &mut [f32]) {
    let nd = c.len();
    let half = nd / 2;
    for j in 0..half {
        let (x1, x2) = (src[j], src[j + half]);
        dst[j] = x1 * c[j] - x2 * s[j];
        dst[j + half] = x2 * c[j + half] + x1 * s[j + half];
    }
    dst[nd..].copy_from_slice(&src[nd..]);
}

/// The backward of [`rotate_half`]: the gradient `g` of its output, written to `dst`.
#[inline(always)]
pub(crate) fn rotate_half_bwd(g: &[f32], c: &[f32], s: &[f32], dst: &mut [f32]) {
    let nd = c.len();
    let half = nd / 2;
    // y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
    for j in 0..half {
        let (g1, g2) = (g[j], g[j + half]);
        dst[j] = g1 * c[j] + g2 * s[j + half];
        dst[j + half] = g2 * c[j + half] - g1 * s[j];
    }
    dst[nd..].copy_from_slice(&g[nd..]);
}

struct LayerNormOp {
    eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "overopt-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let b = slice(s3, l3, self.name())?;
        let d = last_dim(l1)?;
        if w.len() != d || b.len() != d {
            candle_core::bail!(
                "layer norm: weight {} / bias {} for rows of {d}",
                w.len(),
                b.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let (mean, rstd) = row_stats(xr, self.eps);
            for j in 0..d {
                yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        cpu_values!(x, xv);
        cpu_values!(grad, gv);
        cpu_values!(w, wv);
        let mut dx = vec![0f32; xv.len()];
        let mut dw = vec![0f64; d];
        let mut db = vec![0f64; d];
        let mut xn = vec![0f32; d];
        for ((xr, gr), dxr) in xv
            .chunks_exact(d)
            .zip(gv.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
        {
            let (mean, rstd) = row_stats(xr, self.eps);
            for (n, &x) in xn.iter_mut().zip(xr) {
                *n = (x - mean) * rstd;
            }
            layer_norm_bwd_row(&xn, rstd, gr, wv, dxr, &mut dw, &mut db);
        }
        let dev = x.device();
        let to32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<_>>();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(to32(dw), w.shape(), dev)?),
            Some(Tensor::from_vec(to32(db), w.shape(), dev)?),
        ))
    }
}

/// Layer norm over the last dimension, `(x - mean) / sqrt(var + eps) * weight + bias`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormOp { eps },
    )
}

struct SoftmaxOp {
    log: bool,
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        if self.log {
            "overopt-log-softmax"
        } else {
            "overopt-softmax"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let d = last_dim(l)?;
        let mut out = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let m = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (y, &v) in yr.iter_mut().zip(xr) {
                *y = (v - m).exp();
                sum += *y;
            }
            if self.log {
                let lse = sum.ln();
                for (y, &v) in yr.iter_mut().zip(xr) {
                    *y = v - m - lse;
                }
            } else {
                let inv = 1.0 / sum;
                yr.iter_mut().for_each(|y| *y *= inv);
            }
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = res.dim(D::Minus1)?;
        cpu_values!(res, yv);
        cpu_values!(grad, gv);
        let mut dx = vec![0f32; yv.len()];
        for ((yr, gr), dr) in yv
            .chunks_exact(d)
            .zip(gv.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
        {
            if self.log {
                // y = log p: dx = g - p * sum(g)
                let s: f32 = gr.iter().sum();
                for j in 0..d {
                    dr[j] = gr[j] - yr[j].exp() * s;
                }
            } else {
                // y = p: dx = p * (g - sum(g * p))
                let s: f32 = gr.iter().zip(yr).map(|(g, y)| g * y).sum();
                for j in 0..d {
                    dr[j] = yr[j] * (gr[j] - s);
                }
            }
        }
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxOp { log: false })
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxOp { log: true })
}

struct MaskedSoftmaxOp {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmaxOp {
    fn name(&self) -> &'static str {
        "overopt-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let bias = slice(s2, l2, self.name())?;
        let (b, h, tq, tk) = l1.shape().dims4()?;
        let (bb, bh, bq, bk) = l2.shape().dims4()?;
        if bb != b || !(bh == 1 || bh == h) || bq != tq || bk != tk {
            candle_core::bail!(
                "masked softmax: bias {:?} does not broadcast to scores {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let mut out = vec![0f32; x.len()];
        for (r, (xr, yr)) in x.chunks_exact(tk).zip(out.chunks_exact_mut(tk)).enumerate() {
            let (bi, hi, qi) = (r / (h * tq), (r / tq) % h, r % tq);
            let br = ((bi * bh + if bh == 1 { 0 } else { hi }) * tq + qi) * tk;
            let mr = &bias[br..br + tk];
            let mut m = f32::NEG_INFINITY;
            for ((y, &v), &a) in yr.iter_mut().zip(xr).zip(mr) {
                *y = v * self.scale + a;
                m = m.max(*y);
            }
            let mut sum = 0f32;
            for y in yr.iter_mut() {
                *y = (*y - m).exp();
                sum += *y;
            }
            let inv = 1.0 / sum;
            yr.iter_mut().for_each(|y| *y *= inv);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = res.dim(D::Minus1)?;
        cpu_values!(res, yv);
        cpu_values!(grad, gv);
        let mut dx = vec![0f32; yv.len()];
        for ((yr, gr), dr) in yv
            .chunks_exact(d)
            .zip(gv.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
        {
            let s: f32 = gr.iter().zip(yr).map(|(g, y)| g * y).sum();
            for j in 0..d {
                dr[j] = self.scale * yr[j] * (gr[j] - s);
            }
        }
        // The bias is a constant mask: no gradient (and no zero-filled buffer for it).
        Ok((Some(Tensor::from_vec(dx, res.shape(), res.device())?), None))
    }
}

/// `softmax(scores * scale + bias)` over the last dimension, for attention: `scores`
/// (b, heads, q, k), `bias` (b, 1 or heads, q, k) an additive mask that gets NO gradient.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    scores.contiguous()?.apply_op2(
        &bias.contiguous()?,
        MaskedSoftmaxOp {
            scale: scale as f32,
        },
    )
}

/// One of q / k / v cut out of the fused QKV projection, moved to the heads-first layout and,
/// for q and k, rotated: replaces a reshape, a transpose, three narrows and the rotary
/// composite (narrows, a negation, two cats, broadcast products and a sum), each of which the
/// backward pass would visit with zero-filled gradient buffers of its own.
struct SplitHeadsOp {
    heads: usize,
    head_size: usize,
    /// 0 for q, 1 for k, 2 for v.
    part: usize,
    /// Rotated dims at the start of each head (rotate-half layout); 0: no rotation.
    ndims: usize,
}

impl SplitHeadsOp {
    /// (b, t) of `qkv` (b, t, heads * 3 * head_size), checking the tables (b, 1, t, ndims).
    fn dims(&self, qkv: &Layout, table: &Layout) -> Result<(usize, usize)> {
        let (b, t, w) = qkv.shape().dims3()?;
        if w != 3 * self.heads * self.head_size {
            candle_core::bail!(
                "split heads: width {w} is not 3 x {} heads x {}",
                self.heads,
                self.head_size
            );
        }
        let (tb, _, tt, tn) = table.shape().dims4()?;
        if self.ndims > 0 && (tb != b || tt != t || tn != self.ndims) {
            candle_core::bail!(
                "split heads: rotary tables {:?} for qkv {:?} and {} rotary dims",
                table.dims(),
                qkv.dims(),
                self.ndims
            );
        }
        Ok((b, t))
    }
}

impl CustomOp3 for SplitHeadsOp {
    fn name(&self) -> &'static str {
        "overopt-split-heads-rotary"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let cos = slice(s2, l2, self.name())?;
        let sin = slice(s3, l3, self.name())?;
        let (b, t) = self.dims(l1, l2)?;
        let (h, hs, nd) = (self.heads, self.head_size, self.ndims);
        let mut out = vec![0f32; b * h * t * hs];
        for bi in 0..b {
            for ti in 0..t {
                let row = (bi * t + ti) * 3 * h * hs;
                let c = &cos[(bi * t + ti) * nd..(bi * t + ti + 1) * nd];
                let s = &sin[(bi * t + ti) * nd..(bi * t + ti + 1) * nd];
                for hi in 0..h {
                    let src = &x[row + (hi * 3 + self.part) * hs..][..hs];
                    let dst = &mut out[((bi * h + hi) * t + ti) * hs..][..hs];
                    rotate_half(src, c, s, dst);
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, h, t, hs))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, _) = qkv.dims3()?;
        let (h, hs, nd) = (self.heads, self.head_size, self.ndims);
        cpu_values!(grad, g);
        cpu_values!(cos, cv);
        cpu_values!(sin, sv);
        let mut dx = vec![0f32; b * t * 3 * h * hs];
        for bi in 0..b {
            for ti in 0..t {
                let row = (bi * t + ti) * 3 * h * hs;
                let c = &cv[(bi * t + ti) * nd..(bi * t + ti + 1) * nd];
                let s = &sv[(bi * t + ti) * nd..(bi * t + ti + 1) * nd];
                for hi in 0..h {
                    let gr = &g[((bi * h + hi) * t + ti) * hs..][..hs];
                    let dst = &mut dx[row + (hi * 3 + self.part) * hs..][..hs];
                    rotate_half_bwd(gr, c, s, dst);
                }
            }
        }
        // The rotary tables are constants: no gradient.
        Ok((
            Some(Tensor::from_vec(dx, qkv.shape(), qkv.device())?),
            None,
            None,
        ))
    }
}

/// Part `part` (0: q, 1: k, 2: v) of the fused QKV projection `qkv` (b, t, heads * 3 *
/// head_size, each head laid out [q | k | v]) as (b, heads, t, head_size), with the rotary
/// embedding (rotate-half layout) applied to the first `ndims` dims of each head when `rotate`.
/// `cos` / `sin` (b, 1, t, ndims) are the tables at each position; they get no gradient.
pub fn split_heads_rotary(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    part: usize,
    rotate: bool,
) -> Result<Tensor> {
    let (_, _, w) = qkv.dims3()?;
    let head_size = w / (3 * heads.max(1));
    let ndims = if rotate { cos.dim(D::Minus1)? } else { 0 };
    if part > 2 || ndims > head_size || ndims % 2 != 0 {
        candle_core::bail!("split heads: part {part}, {ndims} rotary dims of {head_size}");
    }
    qkv.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        SplitHeadsOp {
            heads,
            head_size,
            part,
            ndims,
        },
    )
}

/// e^x in f32 without a libm call, so that loops over it vectorize: Cody-Waite range
/// reduction (x = n ln 2 + r) and a degree-6 polynomial for e^r (Cephes' expf coefficients),
/// within 2 ulp of libm's `expf` on [-87, 88]; 0 below -87.3, +inf-free (clamped) above 88.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // Round to nearest through the 1.5 * 2^23 trick (no `round` call).
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.3);
    let shifted = xc * LOG2E + MAGIC;
    let n = shifted - MAGIC;
    let r = xc - n * C1 - n * C2;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5e-1;
    let er = p * r * r + r + 1.0;
    // 2^n from the integer in the low bits of `shifted` (bits 0x4B40_0000 + n): integer ops
    // only, no float-to-int conversion, so the loops stay vectorizable.
    let scale = f32::from_bits(
        shifted
            .to_bits()
            .wrapping_sub(0x4B40_0000)
            .wrapping_add(127)
            << 23,
    );
    let y = er * scale;
    if x < -87.3 { 0.0 } else { y }
}

/// erf(x) in f32 without a libm call (Abramowitz & Stegun 7.1.26 with [`fast_exp`]):
/// absolute error below 1e-6 (the formula's own bound is 1.5e-7; f32 arithmetic adds the
/// rest), against libm's erff (~6e-8).
#[inline(always)]
pub fn fast_erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let y = 1.0 - poly * fast_exp(-a * a);
    y.copysign(x)
}

/// gelu(u) = u/2 (1 + erf(u / sqrt 2)), the exact (erf) GELU, with [`fast_erf`].
#[inline(always)]
pub(crate) fn gelu(u: f32) -> f32 {
    0.5 * u * (1.0 + fast_erf(u * std::f32::consts::FRAC_1_SQRT_2))
}

/// d gelu / du = (1 + erf(u / sqrt 2)) / 2 + u exp(-u^2 / 2) / sqrt(2 pi).
#[inline(always)]
pub(crate) fn gelu_grad(u: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    0.5 * (1.0 + fast_erf(u * std::f32::consts::FRAC_1_SQRT_2))
        + u * fast_exp(-0.5 * u * u) * INV_SQRT_2PI
}

struct BiasGeluOp;

impl CustomOp2 for BiasGeluOp {
    fn name(&self) -> &'static str {
        "overopt-bias-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let b = slice(s2, l2, self.name())?;
        let d = last_dim(l1)?;
        if b.len() != d {
            candle_core::bail!("bias gelu: bias of {} for rows of {d}", b.len());
        }
        let mut out = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            for ((y, &v), &c) in yr.iter_mut().zip(xr).zip(b) {
                *y = gelu(v + c);
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        cpu_values!(x, xv);
        cpu_values!(bias, bv);
        cpu_values!(grad, gv);
        let mut dx = vec![0f32; xv.len()];
        let mut db = vec![0f32; d];
        for ((xr, gr), dr) in xv
            .chunks_exact(d)
            .zip(gv.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
        {
            for ((((dx, s), &g), &u), &c) in
                dr.iter_mut().zip(db.iter_mut()).zip(gr).zip(xr).zip(bv)
            {
                *dx = g * gelu_grad(u + c);
                *s += *dx;
            }
        }
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(db, bias.shape(), bias.device())?),
        ))
    }
}

/// `gelu(x + bias)` (the exact, erf GELU) with `bias` (d) added to every row of `x` (.., d).
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&bias.contiguous()?, BiasGeluOp)
}

/// `x @ w^T` for row-major x (rows, k) and w (n, k) into a new (rows, n) buffer; with `bias`
/// (n), every row starts from it and the product is accumulated onto it.
pub(crate) fn x_wt(
    x: &[f32],
    w: &[f32],
    (rows, k, n): (usize, usize, usize),
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut out = match bias {
        Some(b) => b.repeat(rows),
        None => vec![0f32; rows * n],
    };
    gemm::sgemm(
        MatRef::row_major(x, rows, k),
        MatRef::row_major(w, n, k).t(),
        &mut out,
        bias.is_some(),
    );
    out
}

/// `x @ w^T` for x (rows, k) and w (n, k), both contiguous, with [`super::gemm`]'s kernels.
struct MatmulWtOp;

impl MatmulWtOp {
    fn dims(lx: &Layout, lw: &Layout) -> Result<(usize, usize, usize)> {
        match (lx.dims(), lw.dims()) {
            (&[rows, k], &[n, kw]) if k == kw => Ok((rows, k, n)),
            (a, b) => candle_core::bail!("matmul x w^T: shapes {a:?} and {b:?} do not fit"),
        }
    }
}

impl CustomOp2 for MatmulWtOp {
    fn name(&self) -> &'static str {
        "overopt-matmul-wt"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Self::dims(l1, l2)?;
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let out = x_wt(x, w, dims, None);
        Ok((CpuStorage::F32(out), Shape::from((dims.0, dims.2))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, k) = x.dims2()?;
        let n = w.dim(0)?;
        cpu_values!(x, xv);
        cpu_values!(w, wv);
        cpu_values!(grad, gv);
        let mut dw = vec![0f32; n * k];
        let dx = x_wt_bwd(xv, wv, gv, (rows, k, n), &mut dw, None);
        Ok((
            Some(Tensor::from_vec(dx, (rows, k), x.device())?),
            Some(Tensor::from_vec(dw, (n, k), w.device())?),
        ))
    }
}

/// The backward of `x @ w^T` (+ a bias) for x (rows, k), w (n, k), given the output gradient
/// g (rows, n): writes dw = g^T x (n, k), with `db` the bias gradient (g's column sums, rows
/// in order), and returns dx = g w (rows, k). The two products are independent and of one
/// size: with several threads and enough work they run side by side, one thread each (the
/// same values: a product's sums do not depend on its thread count).
pub(crate) fn x_wt_bwd(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    (rows, k, n): (usize, usize, usize),
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) -> Vec<f32> {
    let weight = || {
        gemm::sgemm(
            MatRef::row_major(g, rows, n).t(),
            MatRef::row_major(x, rows, k),
            dw,
            false,
        );
        if let Some(db) = db {
            db.fill(0.0);
            for row in g.chunks_exact(n) {
                for (s, &v) in db.iter_mut().zip(row) {
                    *s += v;
                }
            }
        }
    };
    let input = || {
        let mut dx = vec![0f32; rows * k];
        gemm::sgemm(
            MatRef::row_major(g, rows, n),
            MatRef::row_major(w, n, k),
            &mut dx,
            false,
        );
        dx
    };
    if gemm::parallel_ok() && rows * n * k >= 1 << 19 {
        rayon::join(|| gemm::serial(weight), || gemm::serial(input)).1
    } else {
        weight();
        input()
    }
}

/// `x @ w^T + b` for x (rows, k), w (n, k), b (n): a linear layer with its bias in one node.
struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "overopt-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k, n) = MatmulWtOp::dims(l1, l2)?;
        let b = slice(s3, l3, self.name())?;
        if b.len() != n {
            candle_core::bail!("linear: bias of {} for {n} outputs", b.len());
        }
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let out = x_wt(x, w, (rows, k, n), Some(b));
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, k) = x.dims2()?;
        let n = w.dim(0)?;
        cpu_values!(x, xv);
        cpu_values!(w, wv);
        cpu_values!(grad, gv);
        let (mut dw, mut db) = (vec![0f32; n * k], vec![0f32; n]);
        let dx = x_wt_bwd(xv, wv, gv, (rows, k, n), &mut dw, Some(&mut db));
        Ok((
            Some(Tensor::from_vec(dx, (rows, k), x.device())?),
            Some(Tensor::from_vec(dw, (n, k), w.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// `x @ w^T + b` for x (rows, k), a weight w (n, k) and its bias b (n), with a backward pass;
/// f32 on the CPU ([`usable`]).
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearOp)
}

/// `x @ w^T` for x (rows, k) and a weight w (n, k), as a linear layer computes it, with a
/// backward pass; f32 on the CPU ([`usable`]).
pub fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, MatmulWtOp)
}

/// Dot product with eight independent partial sums (a plain iterator sum is a sequential
/// float reduction, which the compiler may not vectorize).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The values of a CPU f32 tensor with a contiguous last dimension (4-d): the storage, the
/// strides of the first three dimensions and the start offset.
fn strided4<'a>(s: &'a Storage, lay: &Layout) -> Result<(&'a [f32], [usize; 3], usize)> {
    let st = lay.stride();
    if st.len() != 4 || st[3] != 1 {
        candle_core::bail!("attention: keys / values need a contiguous last dimension");
    }
    let data = match s {
        Storage::Cpu(c) => c.as_slice::<f32>()?,
        _ => candle_core::bail!("attention: expects CPU tensors"),
    };
    Ok((data, [st[0], st[1], st[2]], lay.start_offset()))
}

/// Softmax attention for inference (no backward): `softmax(q k^T * scale + bias) v` per batch
/// row and head in one pass, for q (b, h, t, hs), k and v (b, h, L, hs) (any strides with a
/// contiguous last dimension, e.g. a prefix view of a KV-cache buffer) and an additive f32
/// `bias` (b, 1, t, L). Returns (b, h, t, hs). A decode step (t = 1) otherwise costs two
/// small matmul calls per (row, head).
pub fn attention_inference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, t, hs) = q.dims4()?;
    let l = k.dim(2)?;
    if k.dims() != [b, h, l, hs] || v.dims() != [b, h, l, hs] || bias.dims() != [b, 1, t, l] {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?}, bias {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims(),
            bias.dims()
        );
    }
    let q = q.contiguous()?;
    let bias = bias.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (bs, bl) = bias.storage_and_layout();
    let qv = cpu_slice(&qs, ql)?;
    let bv = cpu_slice(&bs, bl)?;
    let (kd, kst, ko) = strided4(&ks, kl)?;
    let (vd, vst, vo) = strided4(&vs, vl)?;
    let scale = scale as f32;
    let mut out = vec![0f32; b * h * t * hs];
    let row = |(bi, ob): (usize, &mut [f32])| {
        let mut p = vec![0f32; l];
        for hi in 0..h {
            let kb = ko + bi * kst[0] + hi * kst[1];
            let vb = vo + bi * vst[0] + hi * vst[1];
            for i in 0..t {
                let qr = &qv[((bi * h + hi) * t + i) * hs..][..hs];
                let br = &bv[(bi * t + i) * l..][..l];
                let mut mx = f32::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate() {
                    let kr = &kd[kb + j * kst[2]..][..hs];
                    *pj = dot(qr, kr) * scale + br[j];
                    mx = mx.max(*pj);
                }
                let mut sum = 0f32;
                for pj in p.iter_mut() {
                    *pj = fast_exp(*pj - mx);
                    sum += *pj;
                }
                let inv = 1.0 / sum;
                let o = &mut ob[(hi * t + i) * hs..][..hs];
                for (j, &pj) in p.iter().enumerate() {
                    let w = pj * inv;
                    let vr = &vd[vb + j * vst[2]..][..hs];
                    for (x, &y) in o.iter_mut().zip(vr) {
                        *x += w * y;
                    }
                }
            }
        }
    };
    let chunk = h * t * hs;
    if gemm::parallel_ok() && b * h * t * l * hs >= 1 << 16 {
        use rayon::prelude::*;
        out.par_chunks_mut(chunk).enumerate().for_each(row);
    } else {
        out.chunks_mut(chunk).enumerate().for_each(row);
    }
    Tensor::from_vec(out, (b, h, t, hs), q.device())
}

#[cfg(test)]
mod fast_math_tests {
    use super::{fast_erf, fast_exp};

    #[test]
    fn fast_exp_and_erf_track_libm() {
        let mut worst_exp = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (fast_exp(x) as f64, (x as f64).exp());
            worst_exp = worst_exp.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst_exp < 3e-7, "exp: worst relative error {worst_exp}");
        assert_eq!(fast_exp(-100.0), 0.0);
        assert!(fast_exp(100.0).is_finite());
        let mut worst_erf = 0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let want = libm::erf(x as f64);
            worst_erf = worst_erf.max((fast_erf(x) as f64 - want).abs());
            x += 0.000_37;
        }
        assert!(worst_erf < 1e-6, "erf: worst absolute error {worst_erf}");
        assert!(fast_erf(0.0).abs() < 1e-7);
        assert_eq!(fast_erf(-9.0), -1.0);
    }
}
