//! Ops of the training graph whose backward pass recomputes what it needs, on any device.
//!
//! candle's autograd keeps every intermediate tensor of a composite op until the whole
//! backward pass is over (its sorted node list holds them all). On the CUDA path, which has
//! neither [`super::fused`]'s CPU kernels nor [`super::hand`], that is most of the memory of
//! a training step: per layer and attention call, the scores in the compute dtype, their f32
//! copy, the scaled and masked scores, the softmax's shifted scores, exponentials and
//! probabilities, and their cast back; per layer norm, about eight copies of the residual
//! stream; at the head, several f32 copies of the logits (batch x tokens x vocab).
//!
//! Each op here runs its forward pass on detached inputs (so candle's fast kernels without a
//! backward, `softmax_last_dim` and `layer_norm`, may be used and every temporary is freed at
//! once) and enters candle's graph as one custom op that keeps only its inputs and output
//! (a linear layer with its bias is one such op too: the composite kept the product before
//! the bias add as well).
//! Its backward pass recomputes the few intermediates it needs (the attention probabilities,
//! the normalized rows, the softmax over the vocabulary) from the inputs, with candle ops, so
//! it runs on whatever device the tensors are on. This is what PyTorch's fused attention and
//! `torch.autograd.Function` with recomputation do.
//!
//! The model uses them on [`super::OpPath::Differentiable`] wherever the fused CPU kernels do
//! not apply (CUDA, or dtypes other than f32), and everywhere on [`super::OpPath::Recompute`];
//! [`super::OpPath::Composite`] keeps the plain composition of basic ops, to compare with.
//! tests/fused_ops.rs compares values and gradients with that composition, op by op, and
//! tests/gpt_neox_parity.rs the whole model (with HF's gradients, and under bf16 autocast).

use super::nvrtc::Source;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, MetalStorage,
    Result, Shape, Storage, Tensor, WithDType,
};
use std::sync::{Arc, Mutex};

/// Gradients of the inputs from (detached inputs, detached output gradient).
type Backward = dyn Fn(&[Tensor], &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync;

/// The graph node of a recomputed op: the output computed outside the graph (handed over
/// once, when candle runs the op's forward) and the backward function.
struct Recomputed {
    name: &'static str,
    out: Mutex<Option<Tensor>>,
    bwd: Box<Backward>,
}

impl Recomputed {
    fn take(&self) -> Result<Tensor> {
        let mut out = self.out.lock().map_err(|_| {
            candle_core::Error::Msg(format!("{}: a forward pass panicked", self.name))
        })?;
        out.take().ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: forward pass run twice", self.name))
        })
    }

    /// A copy of the output's storage, which `pick` takes from the device's variant.
    fn out_storage<S: BackendStorage>(
        &self,
        device: &str,
        pick: fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let out = self.take()?;
        let (s, l) = out.storage_and_layout();
        match pick(&s) {
            Some(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            None => candle_core::bail!("{}: output is not on {device}", self.name),
        }
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        self.out_storage("the CPU", |s| match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        self.out_storage("a CUDA device", |s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn grads(&self, args: &[&Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let args: Vec<Tensor> = args.iter().map(|t| t.detach()).collect();
        let g = (self.bwd)(&args, &grad.detach())?;
        if g.len() != args.len() {
            candle_core::bail!(
                "{}: backward gave {} gradients for {} inputs",
                self.name,
                g.len(),
                args.len()
            );
        }
        for (i, (g, a)) in g.iter().zip(&args).enumerate() {
            if let Some(g) = g
                && (g.dims() != a.dims() || g.dtype() != a.dtype())
            {
                candle_core::bail!(
                    "{}: gradient of input {i} is {:?} {:?}, the input {:?} {:?}",
                    self.name,
                    g.dims(),
                    g.dtype(),
                    a.dims(),
                    a.dtype()
                );
            }
        }
        Ok(g)
    }
}

impl CustomOp1 for Recomputed {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        candle_core::bail!("{}: no metal support", self.name)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.grads(&[arg], grad)?.pop().flatten())
    }
}

impl CustomOp3 for Recomputed {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self.grads(&[a, b, c], grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
    }
}

/// `fwd` of one or three `inputs`, computed on detached copies, as one node of candle's graph
/// whose backward is `bwd(detached inputs, output gradient)`. When no input is tracked the
/// output is returned as it is (no node).
pub(crate) fn with_backward(
    name: &'static str,
    inputs: &[&Tensor],
    fwd: impl FnOnce(&[Tensor]) -> Result<Tensor>,
    bwd: impl Fn(&[Tensor], &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Result<Tensor> {
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    let out = fwd(&detached)?;
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(out);
    }
    // The node's output is a copy of the whole storage: make it exactly the output's values.
    let out = if out.is_contiguous() && out.layout().start_offset() == 0 {
        out
    } else {
        out.force_contiguous()?
    };
    let op = Recomputed {
        name,
        out: Mutex::new(Some(out)),
        bwd: Box::new(bwd),
    };
    match inputs {
        [a] => a.apply_op1_arc(Arc::new(Box::new(op))),
        [a, b, c] => a.apply_op3_arc(b, c, Arc::new(Box::new(op))),
        _ => candle_core::bail!("{name}: takes one or three inputs, got {}", inputs.len()),
    }
}

/// The sums over the rows of `x` (rows, cols), (cols), in the dtype of `x`: a product with a row
/// of ones, which the matmul kernels accumulate in f32 (candle's CUDA `sum(0)` accumulates in
/// the tensor's dtype, bf16 included, and reads the rows with a stride).
pub(crate) fn column_sums(x: &Tensor) -> Result<Tensor> {
    let (rows, _) = x.dims2()?;
    Tensor::ones((1, rows), x.dtype(), x.device())?
        .matmul(&x.contiguous()?)?
        .squeeze(0)
}

/// The attention probabilities softmax(q k^T * scale + bias) in f32, (b, h, t, t_k): one op
/// after the product ([`super::attention_softmax`]) where it applies, candle ops otherwise.
fn probs(q: &Tensor, k: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let raw = q.contiguous()?.matmul(&k.contiguous()?.t()?)?;
    if super::attention_softmax::probs_usable(&raw, bias) {
        return super::attention_softmax::probs(&raw, bias, scale);
    }
    let raw = raw.to_dtype(DType::F32)?;
    candle_nn::ops::softmax_last_dim(&raw.affine(scale, 0.0)?.broadcast_add(bias)?)
}

/// softmax(q k^T * scale + bias) v for queries `q` (b, h, t, hs) over keys and values
/// (b, h, t_k, hs), with the additive f32 `bias` (b, 1, t, t_k) (a constant: no gradient).
/// The matmuls run in the dtype of `q`, `k`, `v`; the scores and softmax in f32, as in the
/// composite. The graph keeps q, k, v and the output; the backward pass recomputes the
/// probabilities.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let bias_b = bias.detach();
    with_backward(
        "recompute-attention",
        &[q, k, v],
        |a| attention_values(&a[0], &a[1], &a[2], bias, scale),
        move |a, g| {
            let (dq, dk, dv) = attention_grads(&a[0], &a[1], &a[2], &bias_b, scale, g)?;
            Ok(vec![Some(dq), Some(dk), Some(dv)])
        },
    )
}

/// The forward pass of [`attention`], without a graph.
pub(crate) fn attention_values(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    probs(q, k, bias, scale)?
        .to_dtype(v.dtype())?
        .matmul(&v.contiguous()?)
}

/// The gradients (dq, dk, dv) of [`attention`] for the output gradient `g`, the probabilities
/// recomputed: dV = P^T dO, dS = P (dP - rowsum(P dP)) * scale with dP = dO V^T, dQ = dS K,
/// dK = dS^T Q.
pub(crate) fn attention_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    g: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g = g.contiguous()?;
    let p = probs(q, k, bias, scale)?;
    // Transposed operands are read through their strides (no copies): the matmuls take a
    // contiguous tensor's last two dimensions swapped.
    let dv = p.to_dtype(v.dtype())?.t()?.matmul(&g)?;
    let dp = g.matmul(&v.contiguous()?.t()?)?;
    // Softmax backward: p * (dp - sum_k p dp), scaled; one op where it applies.
    let ds = if super::attention_softmax::grad_usable(&p, &dp) && dp.dtype() == q.dtype() {
        super::attention_softmax::grad(&p, &dp, scale)?
    } else {
        let dp = dp.to_dtype(DType::F32)?;
        let dot = (&p * &dp)?.sum_keepdim(D::Minus1)?;
        (p * dp.broadcast_sub(&dot)?)?
            .affine(scale, 0.0)?
            .to_dtype(q.dtype())?
    };
    let dq = ds.matmul(&k.contiguous()?)?;
    let dk = ds.t()?.matmul(&q.contiguous()?)?;
    Ok((dq, dk, dv))
}

/// `x @ weight^T + bias` for `x` (.., in), `weight` (out, in), `bias` (out): one matmul over
/// all rows. The graph keeps x, weight, bias and the output (the composite also kept the
/// product before the bias add, as large as the output).
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (out_f, in_f) = weight.dims2()?;
    if x.dim(D::Minus1)? != in_f || bias.dims() != [out_f] {
        candle_core::bail!(
            "linear: input {:?}, weight {:?} and bias {:?} do not fit together",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    let rows = x.elem_count() / in_f.max(1);
    let mut out_dims = x.dims().to_vec();
    *out_dims
        .last_mut()
        .expect("checked: x has a last dimension") = out_f;
    let x_dims = x.dims().to_vec();
    with_backward(
        "recompute-linear",
        &[x, weight, bias],
        |a| {
            super::bias_add::matmul_bias(&a[0].reshape((rows, in_f))?, &a[1].t()?, &a[2])?
                .reshape(out_dims)
        },
        move |a, g| {
            let (x, w) = (a[0].reshape((rows, in_f))?, &a[1]);
            let g = g.reshape((rows, out_f))?.contiguous()?;
            let dx = g.matmul(&w.contiguous()?)?.reshape(x_dims.as_slice())?;
            let dw = g.t()?.matmul(&x)?;
            let db = column_sums(&g)?;
            Ok(vec![Some(dx), Some(dw), Some(db)])
        },
    )
}

/// Part `part` (0 queries, 1 keys, 2 values) of the fused projection `qkv` (b, t, heads x
/// 3 x head_size: per head [q | k | v]) as (b, heads, t, head_size), with the rotary embedding
/// (rotate-half layout) on the first `ndims` dims of each head when `rotate`; `cos` and `sin`
/// are the model's tables (b, 1, t, ndims), whose two halves are equal (a constant: no
/// gradient).
///
/// The graph keeps `qkv` (which the projection's node keeps anyway) and the output; the
/// composite also kept the rotated half, its negation, both products and the rotated part
/// before it was joined to the rest of the head. The rotation runs in candle's `rope` kernel,
/// forward and backward: the gradient of a rotation is the rotation by the opposite angle,
/// `rope(g, cos, -sin)`.
pub fn split_heads_rotary(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    n_heads: usize,
    part: usize,
    rotate: Option<usize>,
) -> Result<Tensor> {
    let (b, t, width) = qkv.dims3()?;
    let hs = width / (3 * n_heads).max(1);
    if part > 2 || hs == 0 || width != 3 * n_heads * hs {
        candle_core::bail!(
            "split-heads-rotary: part {part} of qkv {:?} with {n_heads} heads",
            qkv.dims()
        );
    }
    // The halves (b, t, ndims / 2) that candle's rope kernel reads, in the dtype of qkv.
    let tables = match rotate {
        None => None,
        Some(nd) => {
            if nd % 2 != 0 || nd > hs || cos.dims() != [b, 1, t, nd] || sin.dims() != cos.dims() {
                candle_core::bail!(
                    "split-heads-rotary: rotary tables {:?} / {:?} for {nd} of {hs} dims of qkv {:?}",
                    cos.dims(),
                    sin.dims(),
                    qkv.dims()
                );
            }
            let (c, s, neg_s) = rope_halves(cos, sin, nd, qkv.dtype())?;
            Some((nd, c, s, neg_s))
        }
    };
    let fwd_tables = tables.clone();
    with_backward(
        "recompute-split-heads-rotary",
        &[qkv],
        move |a| {
            let x = heads_part(&a[0], n_heads, part)?;
            match &fwd_tables {
                None => Ok(x),
                Some((nd, c, s, _)) => rope_head_dims(&x, c, s, *nd),
            }
        },
        move |a, g| {
            let g = g.contiguous()?;
            let g = match &tables {
                None => g,
                Some((nd, c, _, neg_s)) => rope_head_dims(&g, c, neg_s, *nd)?,
            };
            let d = Tensor::zeros((b, t, n_heads, 3 * hs), g.dtype(), g.device())?;
            d.slice_set(&g.transpose(1, 2)?.contiguous()?, D::Minus1, part * hs)?;
            Ok(vec![Some(d.reshape(a[0].dims())?)])
        },
    )
}

/// Part `part` (0 queries, 1 keys, 2 values) of the fused projection `qkv` (b, t, heads x 3 x
/// head_size, per head [q | k | v]) as a contiguous (b, heads, t, head_size).
pub(crate) fn heads_part(qkv: &Tensor, n_heads: usize, part: usize) -> Result<Tensor> {
    let (b, t, width) = qkv.dims3()?;
    let hs = width / (3 * n_heads).max(1);
    qkv.reshape((b, t, n_heads, 3 * hs))?
        .narrow(D::Minus1, part * hs, hs)?
        .transpose(1, 2)?
        .contiguous()
}

/// The halves (b, t, nd / 2) of the rotary tables `cos`, `sin` (b, 1, t, nd) that candle's
/// `rope` kernel reads, in `dtype`, and the negated sine (the inverse rotation).
pub(crate) fn rope_halves(
    cos: &Tensor,
    sin: &Tensor,
    nd: usize,
    dtype: DType,
) -> Result<(Tensor, Tensor, Tensor)> {
    let half = |x: &Tensor| {
        x.detach()
            .squeeze(1)?
            .narrow(D::Minus1, 0, nd / 2)?
            .to_dtype(dtype)?
            .contiguous()
    };
    let (c, s) = (half(cos)?, half(sin)?);
    let neg_s = s.neg()?;
    Ok((c, s, neg_s))
}

/// `x` (b, heads, t, hs) with its first `nd` dims of each head rotated by the half tables
/// (b, t, nd / 2) `c`, `s` in candle's `rope` kernel (rotate-half layout).
pub(crate) fn rope_head_dims(x: &Tensor, c: &Tensor, s: &Tensor, nd: usize) -> Result<Tensor> {
    let hs = x.dim(D::Minus1)?;
    let r = candle_nn::rotary_emb::rope(&x.narrow(D::Minus1, 0, nd)?.contiguous()?, c, s)?;
    if nd == hs {
        Ok(r)
    } else {
        Tensor::cat(&[&r, &x.narrow(D::Minus1, nd, hs - nd)?], D::Minus1)
    }
}

/// The exact GELU, `x (1 + erf(x / sqrt 2)) / 2`, in the dtype of `x` (candle's kernel). The
/// graph keeps `x`, as the composite did; the backward pass is [`gelu_erf_grad_any`]: one op
/// where its kernel runs, where candle's backward of its GELU makes about a dozen buffers as
/// large as `x`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    with_backward(
        "recompute-gelu-erf",
        &[x],
        |a| a[0].gelu_erf(),
        |a, g| Ok(vec![Some(gelu_erf_grad_any(&a[0], g)?)]),
    )
}

/// `g * gelu'(x)` elementwise (f32 or bf16, computed in f32, rounded once to the dtype):
/// `gelu'(x) = (1 + erf(x / sqrt 2)) / 2 + x exp(-x^2 / 2) / sqrt(2 pi)`. On the CPU a loop
/// (the fused kernels' GELU derivative), on CUDA one kernel ([`GELU_SOURCE`]).
pub fn gelu_erf_grad(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    if x.dims() != g.dims() || x.dtype() != g.dtype() {
        candle_core::bail!(
            "gelu-erf-grad: input {:?} {:?} and gradient {:?} {:?} differ",
            x.dims(),
            x.dtype(),
            g.dims(),
            g.dtype()
        );
    }
    x.contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &GeluErfGrad)
}

/// [`gelu_erf_grad`] where its kernel can run (f32 or bf16, on the CPU, or on CUDA when NVRTC
/// compiled it); elsewhere (f16, another device, NVRTC failed) the same formula with candle
/// ops, in f32 (rounded once to the dtype of `g`).
pub(crate) fn gelu_erf_grad_any(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    if matches!(x.dtype(), DType::F32 | DType::BF16)
        && super::nvrtc::ready(x.device(), &GELU_SOURCE)
    {
        return gelu_erf_grad(x, g);
    }
    let u = x.to_dtype(DType::F32)?;
    let cdf = ((u.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)? * 0.5)?;
    let pdf = (u.sqr()? * -0.5)?.exp()?.affine(
        0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2,
        0.0,
    )?;
    ((cdf + (u * pdf)?)? * g.to_dtype(DType::F32)?)?.to_dtype(g.dtype())
}

/// The CUDA kernels of [`gelu_erf_grad`], f32 and bf16 (as its 16 bits): the CPU loop's
/// expression, in the same order (a unit test compiles it as C++ and compares).
pub(crate) const GELU_SOURCE: Source = Source {
    module: "overopt_gelu",
    text: r#"
__device__ __forceinline__ float overopt_gelu_grad(float u) {
    return 0.5f * (1.0f + erff(u * 0.70710677f)) + u * expf(-0.5f * u * u) * 0.3989423f;
}
extern "C" __global__ void overopt_gelu_erf_grad_f32(
    const float *x, const float *g, float *dx, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    dx[i] = g[i] * overopt_gelu_grad(x[i]);
}
extern "C" __global__ void overopt_gelu_erf_grad_bf16(
    const unsigned short *x, const unsigned short *g, unsigned short *dx, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float u = overopt_bf16_to_f32(x[i]);
    dx[i] = overopt_f32_to_bf16(overopt_bf16_to_f32(g[i]) * overopt_gelu_grad(u));
}
"#,
};

struct GeluErfGrad;

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn grad<T: WithDType>(x: &[T], g: &[T]) -> Vec<T> {
            x.iter()
                .zip(g)
                .map(|(&x, &g)| {
                    let (x, g) = (x.to_f64() as f32, g.to_f64() as f32);
                    T::from_f64((g * super::fused::gelu_grad(x)) as f64)
                })
                .collect()
        }
        let (r1, r2) = (
            super::fused::contiguous_range(l1, self.name())?,
            super::fused::contiguous_range(l2, self.name())?,
        );
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                CpuStorage::F32(grad(&x[r1.0..r1.1], &g[r2.0..r2.1]))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(g)) => {
                CpuStorage::BF16(grad(&x[r1.0..r1.1], &g[r2.0..r2.1]))
            }
            _ => candle_core::bail!("{}: expects f32 or bf16, got {:?}", self.name(), s1.dtype()),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use super::nvrtc;
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::CudaStorageSlice as S;
        use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
        let dev = s1.device();
        /// `kernel` on the elements of `x` and `g` that their layouts cover: a new buffer.
        fn grad<T: DeviceRepr>(
            dev: &candle_core::CudaDevice,
            kernel: &str,
            (x, g): (&CudaSlice<T>, &CudaSlice<T>),
            (l1, l2): (&Layout, &Layout),
        ) -> Result<CudaSlice<T>> {
            let (x, g) = (nvrtc::view(x, l1, kernel)?, nvrtc::view(g, l2, kernel)?);
            let n = nvrtc::len(kernel, x.len())?;
            let func = nvrtc::func(dev, &GELU_SOURCE, kernel)?;
            // SAFETY: the kernel writes all n elements.
            let mut out = unsafe { dev.alloc::<T>(n as usize)? };
            let stream = dev.cuda_stream();
            let mut args = stream.launch_builder(&func);
            args.arg(&x);
            args.arg(&g);
            args.arg(&mut out);
            args.arg(&n);
            nvrtc::launch(args, n)?;
            Ok(out)
        }
        let (kf, kb) = ("overopt_gelu_erf_grad_f32", "overopt_gelu_erf_grad_bf16");
        let slice = match (&s1.slice, &s2.slice) {
            (S::F32(x), S::F32(g)) => S::F32(grad(dev, kf, (x, g), (l1, l2))?),
            (S::BF16(x), S::BF16(g)) => S::BF16(grad(dev, kb, (x, g), (l1, l2))?),
            _ => candle_core::bail!("{}: expects f32 or bf16, got {:?}", self.name(), s1.dtype()),
        };
        let storage = CudaStorage {
            slice,
            device: dev.clone(),
        };
        Ok((storage, l1.shape().clone()))
    }
}

/// Layer norm over the last dimension of `x` with `weight` and `bias` (the dtype of `x`),
/// statistics in f32. The graph keeps x, weight, bias and the output; the backward pass
/// recomputes the normalized rows.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    with_backward(
        "recompute-layer-norm",
        &[x, weight, bias],
        |a| layer_norm_values(&a[0], &a[1], &a[2], eps),
        move |a, g| {
            let (w, b) = (&a[1], &a[2]);
            let (dx, dw, db) = layer_norm_grads(&a[0], w, g, eps)?;
            Ok(vec![
                Some(dx),
                Some(dw.to_dtype(w.dtype())?),
                Some(db.to_dtype(b.dtype())?),
            ])
        },
    )
}

/// The forward pass of [`layer_norm`], without a graph: candle's kernel in f32, the output in
/// the dtype of `x`.
pub(crate) fn layer_norm_values(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    candle_nn::ops::layer_norm(&f(x)?.contiguous()?, &f(weight)?, &f(bias)?, eps as f32)?
        .to_dtype(x.dtype())
}

/// The gradients of [`layer_norm`] for the output gradient `g`, the normalized rows
/// recomputed: dx (the dtype of `x`), and the f32 gradients of the weight and the bias. One op
/// ([`super::layer_norm_grad`]) where it applies (f32 input and weight, an f32 or bf16
/// gradient), candle ops otherwise.
pub(crate) fn layer_norm_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    if super::layer_norm_grad::usable(x, w, g) {
        return super::layer_norm_grad::grads(x, w, g, eps);
    }
    layer_norm_grads_composite(x, w, g, eps)
}

/// [`layer_norm_grads`] with candle ops (any dtype and device).
pub(crate) fn layer_norm_grads_composite(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = x.dim(D::Minus1)?;
    let rows = x.elem_count() / n.max(1);
    let x32 = x.to_dtype(DType::F32)?;
    let g32 = g.to_dtype(DType::F32)?;
    let mean = (x32.sum_keepdim(D::Minus1)? / n as f64)?;
    let xc = x32.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / n as f64)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    let xhat = xc.broadcast_mul(&rstd)?;
    let gw = g32.broadcast_mul(&w.to_dtype(DType::F32)?)?;
    let mean_gw = (gw.sum_keepdim(D::Minus1)? / n as f64)?;
    let mean_gwx = ((&gw * &xhat)?.sum_keepdim(D::Minus1)? / n as f64)?;
    let dx = (gw.broadcast_sub(&mean_gw)? - xhat.broadcast_mul(&mean_gwx)?)?
        .broadcast_mul(&rstd)?
        .to_dtype(x.dtype())?;
    let dw = column_sums(&(&g32 * &xhat)?.reshape((rows, n))?)?;
    let db = column_sums(&g32.reshape((rows, n))?)?;
    Ok((dx, dw, db))
}

/// Log-probabilities of `targets` (.., u32) under `logits` (.., vocab): log_softmax in f32,
/// picked at the targets, (..) f32. The graph keeps the logits only; the backward pass
/// recomputes the softmax over the vocabulary. Targets beyond the vocabulary are an error on
/// the CPU; on other devices the caller checks them on the host before they are uploaded
/// (as [`super::score`] does), since reading them back would wait for the device.
pub fn label_logps(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let vocab = logits.dim(D::Minus1)?;
    if targets.dims() != &logits.dims()[..logits.rank() - 1] {
        candle_core::bail!(
            "label log-probs: targets {:?} do not match logits {:?}",
            targets.dims(),
            logits.dims()
        );
    }
    // Read back only where that is free: on a GPU it would wait for all queued work.
    if targets.device().is_cpu()
        && let Some(&bad) = targets
            .flatten_all()?
            .to_vec1::<u32>()?
            .iter()
            .find(|&&t| t as usize >= vocab)
    {
        candle_core::bail!("label log-probs: target {bad} is beyond the vocabulary of {vocab}");
    }
    let idx = targets.unsqueeze(D::Minus1)?.contiguous()?;
    let idx_b = idx.clone();
    with_backward(
        "recompute-label-logps",
        &[logits],
        |a| {
            let x = a[0].to_dtype(DType::F32)?.contiguous()?;
            let max = x.max_keepdim(D::Minus1)?;
            let lse = (x
                .broadcast_sub(&max)?
                .exp()?
                .sum_keepdim(D::Minus1)?
                .log()?
                + max)?;
            (x.gather(&idx, D::Minus1)? - lse)?.squeeze(D::Minus1)
        },
        move |a, g| {
            super::profile::section("bwd.logps", g.device(), || {
                let x = a[0].to_dtype(DType::F32)?.contiguous()?;
                let p = candle_nn::ops::softmax_last_dim(&x)?;
                let g1 = g.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?.contiguous()?;
                // d/dx of x[t] - logsumexp(x) is onehot(t) - softmax(x).
                let d = p
                    .broadcast_mul(&g1.neg()?)?
                    .scatter_add(&idx_b, &g1, D::Minus1)?;
                Ok(vec![Some(d.to_dtype(a[0].dtype())?)])
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nvrtc::{HostKernels, value_bits};
    use candle_core::Device;

    /// Runs the kernel of [`GELU_SOURCE`] named by the first input word (`f32` or `bf16`) for
    /// every index on `n`, then `x` and `g` as hexadecimal bits (32 or 16 per value); prints
    /// `dx` the same way.
    const DRIVER: &str = r#"
int main() {
  char kind[8]; unsigned int n;
  if (std::scanf("%7s %u", kind, &n) != 2) return 2;
  bool bf16 = std::strcmp(kind, "bf16") == 0;
  std::vector<unsigned int> x(n), g(n);
  for (auto &v : x) if (std::scanf("%x", &v) != 1) return 2;
  for (auto &v : g) if (std::scanf("%x", &v) != 1) return 2;
  blockDim.x = 128;
  if (bf16) {
    std::vector<unsigned short> xs(x.begin(), x.end()), gs(g.begin(), g.end()), dx(n);
    for (unsigned int i = 0; i < n; i++) {
      blockIdx.x = i / 128; threadIdx.x = i % 128;
      overopt_gelu_erf_grad_bf16(xs.data(), gs.data(), dx.data(), n);
    }
    for (auto v : dx) std::printf("%x\n", (unsigned int)v);
  } else {
    std::vector<float> xs(n), gs(n), dx(n);
    for (unsigned int i = 0; i < n; i++) { xs[i] = __uint_as_float(x[i]); gs[i] = __uint_as_float(g[i]); }
    for (unsigned int i = 0; i < n; i++) {
      blockIdx.x = i / 128; threadIdx.x = i % 128;
      overopt_gelu_erf_grad_f32(xs.data(), gs.data(), dx.data(), n);
    }
    for (auto v : dx) std::printf("%x\n", __float_as_uint(v));
  }
  return 0;
}
"#;

    /// Column sums of a bf16 matrix with many rows are the exact (f64) sums rounded once, as
    /// an f32 accumulation gives: within 2^-8 relative (one bf16 rounding) of the largest sum.
    /// candle's `sum(0)` accumulates in bf16 and is printed for comparison.
    #[test]
    fn column_sums_accumulate_in_f32() {
        let dev = Device::Cpu;
        let (rows, cols) = (8192, 24);
        let x32 = (Tensor::randn(0f32, 1.0, (rows, cols), &dev).unwrap() + 0.25).unwrap();
        let x = x32.to_dtype(DType::BF16).unwrap();
        let exact: Vec<f64> = {
            let v = x.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            (0..cols)
                .map(|c| v.iter().map(|r| r[c] as f64).sum())
                .collect()
        };
        let scale = exact.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = |t: Tensor| -> f64 {
            let got = t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            got.iter()
                .zip(&exact)
                .fold(0f64, |m, (g, e)| m.max((*g as f64 - e).abs()))
                / scale
        };
        let ours = err(column_sums(&x).unwrap());
        let candle = err(x.sum(0).unwrap());
        eprintln!("column sums of {rows} bf16 rows: ours {ours:.2e}, candle sum(0) {candle:.2e}");
        assert!(ours <= 1.0 / 256.0, "column sums off by {ours} relative");
        assert_eq!(column_sums(&x).unwrap().dims(), [cols]);
    }

    /// The CUDA kernels of the GELU gradient, compiled for the CPU, against the CPU op: f32
    /// within 1e-6 (their erf and exp are the C library's, the loop's are the fused kernels'
    /// approximations), bf16 within one unit in the last place (the same f32 value rounded).
    #[test]
    fn gelu_grad_kernels_match_the_cpu_op() {
        let dev = Device::Cpu;
        let n = 2000;
        let x = (Tensor::randn(0f32, 3.0, n, &dev).unwrap())
            .contiguous()
            .unwrap();
        let g = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let kernels = HostKernels::new(&GELU_SOURCE, DRIVER);
        for dtype in [DType::F32, DType::BF16] {
            let (x, g) = (x.to_dtype(dtype).unwrap(), g.to_dtype(dtype).unwrap());
            let kind = if dtype == DType::F32 { "f32" } else { "bf16" };
            let values = [&x, &g].into_iter().flat_map(value_bits);
            let host: Vec<f32> = kernels
                .run(&format!("{kind} {n}"), values)
                .into_iter()
                .map(|b| f32::from_bits(if dtype == DType::F32 { b } else { b << 16 }))
                .collect();
            let cpu = gelu_erf_grad(&x, &g)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(host.len(), n);
            for (i, (h, c)) in host.iter().zip(&cpu).enumerate() {
                let tol = if dtype == DType::F32 {
                    1e-6
                } else {
                    c.abs() / 128.0
                };
                assert!((h - c).abs() <= tol, "{kind} {i}: kernel {h} vs loop {c}");
            }
        }
    }
}
