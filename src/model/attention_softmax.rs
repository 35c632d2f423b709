//! The attention's masked softmax and its backward pass as one op each, for the recomputing
//! attention ([`super::recompute::attention`]) and the layer nodes.
//!
//! With candle ops the probabilities were four ops over the scores (the cast of the scores to
//! f32, the scale, the bias add, the softmax) and the softmax's backward pass six (the cast of
//! dP to f32, P dP, the row sums, the difference, the product, the scale, the cast back), each
//! writing a tensor as large as the scores. Here each is one CUDA block per row (or a row loop
//! on the CPU) writing one tensor: P in f32, and dS in the dtype of dP.

use super::nvrtc::Source;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

/// The CUDA kernels. `probs`: row r of the scores (rows = b h t, n keys) in f32 or bf16 (as its
/// 16 bits), the bias row (r / (h t)) t + r % t of the f32 bias (b, 1, t, n): P = softmax(s
/// scale + bias) in f32. `grad`: P (f32) and dP (f32 or bf16): dS = P (dP - sum(P dP)) scale,
/// in the dtype of dP.
pub(crate) const SOURCE: Source = Source {
    module: "overopt_attention_softmax",
    text: r#"
__device__ float overopt_sm_reduce(float v, float *red, int is_max) {
    unsigned int t = threadIdx.x;
    red[t] = v;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) red[t] = is_max ? fmaxf(red[t], red[t + s]) : red[t] + red[t + s];
        __syncthreads();
    }
    float r = red[0];
    __syncthreads();
    return r;
}
__device__ float overopt_sm_ld(const float *f, const unsigned short *b, unsigned long long i) {
    return f ? f[i] : overopt_bf16_to_f32(b[i]);
}
__device__ void overopt_sm_probs_row(const float *sf, const unsigned short *sb,
        const float *bias, float *p, unsigned int heads, unsigned int t_len, unsigned int n,
        float scale) {
    __shared__ float red[1024];
    unsigned long long r = blockIdx.x;
    unsigned long long base = r * n;
    unsigned long long brow = (r / ((unsigned long long)heads * t_len)) * t_len + r % t_len;
    const float *br = bias + brow * n;
    unsigned int t = threadIdx.x, nt = blockDim.x;
    float m = __uint_as_float(0xff800000u); /* -infinity */
    for (unsigned int i = t; i < n; i += nt) {
        float v = overopt_sm_ld(sf, sb, base + i) * scale + br[i];
        p[base + i] = v;
        m = fmaxf(m, v);
    }
    m = overopt_sm_reduce(m, red, 1);
    float s = 0.0f;
    for (unsigned int i = t; i < n; i += nt) {
        float e = expf(p[base + i] - m);
        p[base + i] = e;
        s += e;
    }
    s = overopt_sm_reduce(s, red, 0);
    for (unsigned int i = t; i < n; i += nt) p[base + i] = p[base + i] / s;
}
extern "C" __global__ void overopt_attention_probs_f32(const float *s, const float *bias,
        float *p, unsigned int heads, unsigned int t_len, unsigned int n, float scale) {
    overopt_sm_probs_row(s, 0, bias, p, heads, t_len, n, scale);
}
extern "C" __global__ void overopt_attention_probs_bf16(const unsigned short *s,
        const float *bias, float *p, unsigned int heads, unsigned int t_len, unsigned int n,
        float scale) {
    overopt_sm_probs_row(0, s, bias, p, heads, t_len, n, scale);
}
__device__ void overopt_sm_grad_row(const float *p, const float *df, const unsigned short *db,
        float *of, unsigned short *ob, unsigned int n, float scale) {
    __shared__ float red[1024];
    unsigned long long base = (unsigned long long)blockIdx.x * n;
    unsigned int t = threadIdx.x, nt = blockDim.x;
    float s = 0.0f;
    for (unsigned int i = t; i < n; i += nt) s += p[base + i] * overopt_sm_ld(df, db, base + i);
    float dot = overopt_sm_reduce(s, red, 0);
    for (unsigned int i = t; i < n; i += nt) {
        float v = p[base + i] * (overopt_sm_ld(df, db, base + i) - dot) * scale;
        if (of) of[base + i] = v; else ob[base + i] = overopt_f32_to_bf16(v);
    }
}
extern "C" __global__ void overopt_attention_softmax_grad_f32(const float *p, const float *dp,
        float *ds, unsigned int n, float scale) {
    overopt_sm_grad_row(p, dp, 0, ds, 0, n, scale);
}
extern "C" __global__ void overopt_attention_softmax_grad_bf16(const float *p,
        const unsigned short *dp, unsigned short *ds, unsigned int n, float scale) {
    overopt_sm_grad_row(p, 0, dp, 0, ds, n, scale);
}
"#,
};

fn kernel_dtype(t: &Tensor) -> bool {
    matches!(t.dtype(), DType::F32 | DType::BF16)
}

/// Whether [`probs`] takes scores `s` (b, h, t, n) in f32 or bf16 and the f32 `bias` (b, 1, t,
/// n), on a device where its kernel runs.
pub(crate) fn probs_usable(s: &Tensor, bias: &Tensor) -> bool {
    match (s.dims(), bias.dims()) {
        (&[b, _, t, n], &[bb, 1, bt, bn]) => {
            b == bb
                && t == bt
                && n == bn
                && n > 0
                && kernel_dtype(s)
                && bias.dtype() == DType::F32
                && super::nvrtc::ready(s.device(), &SOURCE)
        }
        _ => false,
    }
}

/// softmax(s scale + bias) over the last dimension, in f32 (see [`probs_usable`]).
pub(crate) fn probs(s: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (_, h, t, _) = s.dims4()?;
    s.contiguous()?.apply_op2_no_bwd(
        &bias.contiguous()?,
        &Probs {
            heads: h,
            t_len: t,
            scale: scale as f32,
        },
    )
}

/// Whether [`grad`] takes the f32 probabilities `p` and their gradient `dp` (same shape, f32 or
/// bf16), on a device where its kernel runs.
pub(crate) fn grad_usable(p: &Tensor, dp: &Tensor) -> bool {
    p.dtype() == DType::F32
        && kernel_dtype(dp)
        && p.dims() == dp.dims()
        && p.rank() >= 1
        && p.elem_count() > 0
        && super::nvrtc::ready(p.device(), &SOURCE)
}

/// The gradient of the scores before the scale, dS = P (dP - sum(P dP)) scale over the last
/// dimension, in the dtype of `dp` (see [`grad_usable`]).
pub(crate) fn grad(p: &Tensor, dp: &Tensor, scale: f64) -> Result<Tensor> {
    p.contiguous()?.apply_op2_no_bwd(
        &dp.contiguous()?,
        &Grad {
            scale: scale as f32,
        },
    )
}

/// The rows (all but the last dimension) and the row length of a layout, as the kernels'
/// counts.
#[cfg(feature = "cuda")]
fn rows_and_len(l: &Layout, op: &str) -> Result<(u32, u32)> {
    let n = *l.shape().dims().last().unwrap_or(&1);
    Ok((
        super::nvrtc::len(op, l.shape().elem_count() / n.max(1))?,
        super::nvrtc::len(op, n)?,
    ))
}

struct Probs {
    heads: usize,
    t_len: usize,
    scale: f32,
}

struct Grad {
    scale: f32,
}

/// The CPU twin of a row of the probabilities kernel (the same f32 operations; the sum
/// sequential).
fn probs_row(s: impl Fn(usize) -> f32, bias: &[f32], scale: f32, p: &mut [f32]) {
    let mut m = f32::NEG_INFINITY;
    for (i, v) in p.iter_mut().enumerate() {
        *v = s(i) * scale + bias[i];
        m = m.max(*v);
    }
    let mut sum = 0f32;
    for v in p.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    for v in p.iter_mut() {
        *v /= sum;
    }
}

/// The CPU twin of a row of the gradient kernel.
/// `T` values are the f32 results rounded once (through f64, exactly; nearest even for bf16).
fn grad_row<T: WithDType>(p: &[f32], dp: impl Fn(usize) -> f32, scale: f32, out: &mut [T]) {
    let dot: f32 = p.iter().enumerate().map(|(i, &pi)| pi * dp(i)).sum();
    for (i, (o, &pi)) in out.iter_mut().zip(p).enumerate() {
        *o = T::from_f64((pi * (dp(i) - dot) * scale) as f64);
    }
}

/// [`grad_row`] over every row of `p` (rows of `n`).
fn grad_rows<T: WithDType>(p: &[f32], n: usize, dp: &dyn Fn(usize) -> f32, scale: f32) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); p.len()];
    for (r, (pr, o)) in p.chunks(n).zip(out.chunks_mut(n)).enumerate() {
        grad_row(pr, |i| dp(r * n + i), scale, o);
    }
    out
}

impl CustomOp2 for Probs {
    fn name(&self) -> &'static str {
        "attention-probs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let bias = super::fused::slice(s2, l2, self.name())?;
        let n = *l1.shape().dims().last().unwrap_or(&1);
        let ht = self.heads * self.t_len;
        let mut out = vec![0f32; l1.shape().elem_count()];
        super::fused::with_f32_reader(s1, l1, self.name(), |s| {
            for (r, p) in out.chunks_mut(n).enumerate() {
                let br = ((r / ht) * self.t_len + r % self.t_len) * n;
                probs_row(|i| s(r * n + i), &bias[br..br + n], self.scale, p);
            }
        })?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::nvrtc;
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::CudaStorageSlice as S;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let name = self.name();
        let (rows, n) = rows_and_len(l1, name)?;
        let (heads, t_len) = (
            nvrtc::len(self.name(), self.heads)?,
            nvrtc::len(self.name(), self.t_len)?,
        );
        let dev = s1.device();
        let S::F32(bias) = &s2.slice else {
            candle_core::bail!("{}: expects an f32 bias", self.name())
        };
        let bias = nvrtc::view(bias, l2, name)?;
        // SAFETY: the kernel writes all rows n elements.
        let mut out = unsafe { dev.alloc::<f32>(rows as usize * n as usize)? };
        let stream = dev.cuda_stream();
        macro_rules! launch {
            ($kernel:expr, $s:expr) => {{
                let func = nvrtc::func(dev, &SOURCE, $kernel)?;
                let s = $s;
                let mut args = stream.launch_builder(&func);
                args.arg(&s);
                args.arg(&bias);
                args.arg(&mut out);
                args.arg(&heads);
                args.arg(&t_len);
                args.arg(&n);
                args.arg(&self.scale);
                nvrtc::launch_rows(args, rows)?;
            }};
        }
        match &s1.slice {
            S::F32(s) => launch!("overopt_attention_probs_f32", nvrtc::view(s, l1, name)?),
            S::BF16(s) => launch!("overopt_attention_probs_bf16", nvrtc::view(s, l1, name)?),
            _ => candle_core::bail!("{}: expects f32 or bf16 scores", self.name()),
        }
        let storage = candle_core::CudaStorage {
            slice: S::F32(out),
            device: dev.clone(),
        };
        Ok((storage, l1.shape().clone()))
    }
}

impl CustomOp2 for Grad {
    fn name(&self) -> &'static str {
        "attention-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = super::fused::slice(s1, l1, self.name())?;
        let n = *l1.shape().dims().last().unwrap_or(&1);
        // dS in the dtype of dP.
        let out = super::fused::with_f32_reader(s2, l2, self.name(), |dp| match s2 {
            CpuStorage::BF16(_) => CpuStorage::BF16(grad_rows(p, n, dp, self.scale)),
            _ => CpuStorage::F32(grad_rows(p, n, dp, self.scale)),
        })?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::nvrtc;
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::CudaStorageSlice as S;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let name = self.name();
        let (rows, n) = rows_and_len(l1, name)?;
        let dev = s1.device();
        let S::F32(p) = &s1.slice else {
            candle_core::bail!("{name}: expects f32 probabilities")
        };
        let p = nvrtc::view(p, l1, name)?;
        /// `kernel` on p and `dp` (rows n elements each): a new buffer of the dtype of dp.
        fn launch<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
            dev: &candle_core::CudaDevice,
            kernel: &str,
            (p, dp): (
                &candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>,
                &candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>,
            ),
            (rows, n, scale): (u32, u32, f32),
        ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> {
            let func = nvrtc::func(dev, &SOURCE, kernel)?;
            // SAFETY: the kernel writes all rows n elements.
            let mut out = unsafe { dev.alloc::<T>(rows as usize * n as usize)? };
            let stream = dev.cuda_stream();
            let mut args = stream.launch_builder(&func);
            args.arg(p);
            args.arg(dp);
            args.arg(&mut out);
            args.arg(&n);
            args.arg(&scale);
            nvrtc::launch_rows(args, rows)?;
            Ok(out)
        }
        let dims = (rows, n, self.scale);
        let slice = match &s2.slice {
            S::F32(d) => S::F32(launch(
                dev,
                "overopt_attention_softmax_grad_f32",
                (&p, &nvrtc::view(d, l2, name)?),
                dims,
            )?),
            S::BF16(d) => S::BF16(launch(
                dev,
                "overopt_attention_softmax_grad_bf16",
                (&p, &nvrtc::view(d, l2, name)?),
                dims,
            )?),
            _ => candle_core::bail!("{}: expects an f32 or bf16 gradient", self.name()),
        };
        let storage = candle_core::CudaStorage {
            slice,
            device: dev.clone(),
        };
        Ok((storage, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nvrtc::{HostKernels, value_bits};
    use candle_core::{D, Device};

    /// Reads `kind` (f32 or bf16), b, h, t, n, threads, scale, then the scores (f32 or bf16
    /// bits), the bias (f32 bits) and dP (f32 or bf16 bits); runs the probabilities kernel and
    /// the gradient kernel on its own P, one block per row; prints P (f32 bits) then dS (f32 or
    /// bf16 bits).
    const DRIVER: &str = r#"
int main() {
  char kind[8]; unsigned int b, h, t, n, threads; float scale;
  if (std::scanf("%7s %u %u %u %u %u %f", kind, &b, &h, &t, &n, &threads, &scale) != 7) return 2;
  bool bf16 = std::strcmp(kind, "bf16") == 0;
  unsigned int rows = b * h * t;
  std::vector<float> sf(rows * n), bias(b * t * n), dpf(rows * n), p(rows * n), dsf(rows * n);
  std::vector<unsigned short> sb(rows * n), dpb(rows * n), dsb(rows * n);
  unsigned int x;
  for (unsigned int i = 0; i < rows * n; i++) {
    if (std::scanf("%x", &x) != 1) return 2;
    if (bf16) sb[i] = (unsigned short)x; else sf[i] = __uint_as_float(x);
  }
  for (auto &v : bias) { if (std::scanf("%x", &x) != 1) return 2; v = __uint_as_float(x); }
  for (unsigned int i = 0; i < rows * n; i++) {
    if (std::scanf("%x", &x) != 1) return 2;
    if (bf16) dpb[i] = (unsigned short)x; else dpf[i] = __uint_as_float(x);
  }
  for (unsigned int r = 0; r < rows; r++) {
    overopt_run_block(r, threads, [&] {
      if (bf16) overopt_attention_probs_bf16(sb.data(), bias.data(), p.data(), h, t, n, scale);
      else overopt_attention_probs_f32(sf.data(), bias.data(), p.data(), h, t, n, scale);
    });
  }
  for (unsigned int r = 0; r < rows; r++) {
    overopt_run_block(r, threads, [&] {
      if (bf16) overopt_attention_softmax_grad_bf16(p.data(), dpb.data(), dsb.data(), n, scale);
      else overopt_attention_softmax_grad_f32(p.data(), dpf.data(), dsf.data(), n, scale);
    });
  }
  for (auto v : p) std::printf("%x\n", __float_as_uint(v));
  for (unsigned int i = 0; i < rows * n; i++)
    std::printf("%x\n", bf16 ? (unsigned int)dsb[i] : __float_as_uint(dsf[i]));
  return 0;
}
"#;

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    /// Two batch rows with their own causal masks (a bias per batch row and query, shared by
    /// the heads), 3 heads, 70 keys (not a multiple of the block), f32 and bf16: the CPU ops
    /// against the composite of candle ops, and the CUDA kernels compiled for the CPU (each
    /// block's threads as CPU threads) against the CPU ops.
    #[test]
    fn kernels_the_cpu_ops_and_the_composite_agree() {
        let dev = Device::Cpu;
        let (b, h, t, n, threads) = (2usize, 3usize, 5usize, 70usize, 32u32);
        let scale = 0.125;
        let mut bias = vec![0f32; b * t * n];
        for bi in 0..b {
            for q in 0..t {
                // Row bi attends to its first 40 + 7 bi + q keys.
                for k in 40 + 7 * bi + q..n {
                    bias[(bi * t + q) * n + k] = f32::MIN;
                }
            }
        }
        let bias = Tensor::from_vec(bias, (b, 1, t, n), &dev).unwrap();
        let s32 = Tensor::randn(0f32, 6.0, (b, h, t, n), &dev).unwrap();
        let dp32 = Tensor::randn(0f32, 1.0, (b, h, t, n), &dev).unwrap();
        let kernels = HostKernels::new(&SOURCE, DRIVER);
        for dt in [DType::F32, DType::BF16] {
            let (s, dp) = (s32.to_dtype(dt).unwrap(), dp32.to_dtype(dt).unwrap());
            assert!(probs_usable(&s, &bias));
            let p = probs(&s, &bias, scale).unwrap();
            assert_eq!((p.dims(), p.dtype()), (s.dims(), DType::F32));
            let comp = candle_nn::ops::softmax_last_dim(
                &s.to_dtype(DType::F32)
                    .unwrap()
                    .affine(scale, 0.0)
                    .unwrap()
                    .broadcast_add(&bias)
                    .unwrap(),
            )
            .unwrap();
            let d = max_diff(&f32s(&p), &f32s(&comp));
            assert!(d < 1e-6, "{dt:?}: probabilities off the composite by {d}");
            // Masked keys get exactly 0.
            let pv = f32s(&p);
            assert_eq!(pv[n - 1], 0.0);
            assert!(grad_usable(&p, &dp));
            let ds = grad(&p, &dp, scale).unwrap();
            assert_eq!((ds.dims(), ds.dtype()), (s.dims(), dt));
            let dpf = dp.to_dtype(DType::F32).unwrap();
            let dot = (&p * &dpf).unwrap().sum_keepdim(D::Minus1).unwrap();
            let comp_ds = (&p * dpf.broadcast_sub(&dot).unwrap())
                .unwrap()
                .affine(scale, 0.0)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let scale_ds = f32s(&comp_ds).iter().fold(0f32, |m, v| m.max(v.abs()));
            let tol = if dt == DType::F32 { 1e-6 } else { 1.0 / 128.0 };
            let d = max_diff(&f32s(&ds), &f32s(&comp_ds));
            assert!(d <= tol * scale_ds, "{dt:?}: dS off the composite by {d}");

            let kind = if dt == DType::F32 { "f32" } else { "bf16" };
            let values = [&s, &bias, &dp].into_iter().flat_map(value_bits);
            let lines = kernels.run(&format!("{kind} {b} {h} {t} {n} {threads} {scale}"), values);
            let m = b * h * t * n;
            assert_eq!(lines.len(), 2 * m);
            let hp: Vec<f32> = lines[..m].iter().map(|&x| f32::from_bits(x)).collect();
            let hds: Vec<f32> = lines[m..]
                .iter()
                .map(|&x| f32::from_bits(if dt == DType::F32 { x } else { x << 16 }))
                .collect();
            let d = max_diff(&hp, &pv);
            assert!(
                d < 1e-6,
                "{kind}: kernel probabilities off the CPU op by {d}"
            );
            let d = max_diff(&hds, &f32s(&ds));
            assert!(
                d <= tol * scale_ds,
                "{kind}: kernel dS off the CPU op by {d}"
            );
        }
    }
}
