//! The backward pass of layer norm as one op: per row, the statistics, the two row means the
//! input gradient needs, the input gradient and the per-element terms of the weight gradient,
//! in one pass of a CUDA block (or one loop on the CPU).
//!
//! Written with candle ops (`recompute::layer_norm_grads` without this op) it was about eleven
//! full-size f32 tensors per layer norm (centred rows, their squares, normalized rows, the
//! products with the weight and the gradient, ...), each its own kernel; here it is one kernel
//! writing two: dx, and g * xhat, whose column sums (with those of g) are the weight and bias
//! gradients.

use super::nvrtc::Source;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// The CUDA kernels, per row (`blockIdx.x`): x f32, g f32 or bf16 (as its 16 bits), w f32;
/// writes dx to `out[row n ..]` and g * xhat to `out[rows n + row n ..]`. Mean and variance in
/// two passes over the row; every sum is a tree over the block's threads.
pub(crate) const SOURCE: Source = Source {
    module: "overopt_layer_norm_grad",
    text: r#"
__device__ float overopt_block_sum(float v, float *red) {
    unsigned int t = threadIdx.x;
    red[t] = v;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) red[t] += red[t + s];
        __syncthreads();
    }
    float r = red[0];
    __syncthreads();
    return r;
}
__device__ float overopt_ln_g(const float *gf, const unsigned short *gb, unsigned long long i) {
    return gf ? gf[i] : overopt_bf16_to_f32(gb[i]);
}
__device__ void overopt_ln_grad_row(const float *x, const float *gf, const unsigned short *gb,
        const float *w, float *out, unsigned int rows, unsigned int n, float eps) {
    __shared__ float red[1024];
    unsigned long long base = (unsigned long long)blockIdx.x * n;
    unsigned int t = threadIdx.x, nt = blockDim.x;
    float s = 0.0f;
    for (unsigned int i = t; i < n; i += nt) s += x[base + i];
    float mean = overopt_block_sum(s, red) / (float)n;
    s = 0.0f;
    for (unsigned int i = t; i < n; i += nt) {
        float d = x[base + i] - mean;
        s += d * d;
    }
    float rstd = 1.0f / sqrtf(overopt_block_sum(s, red) / (float)n + eps);
    float sa = 0.0f, sb = 0.0f;
    float *gx = out + (unsigned long long)rows * n;
    for (unsigned int i = t; i < n; i += nt) {
        float xh = (x[base + i] - mean) * rstd;
        float g = overopt_ln_g(gf, gb, base + i);
        float gw = g * w[i];
        sa += gw;
        sb += gw * xh;
        gx[base + i] = g * xh;
    }
    float a = overopt_block_sum(sa, red) / (float)n;
    float b = overopt_block_sum(sb, red) / (float)n;
    for (unsigned int i = t; i < n; i += nt) {
        float xh = (x[base + i] - mean) * rstd;
        float gw = overopt_ln_g(gf, gb, base + i) * w[i];
        out[base + i] = rstd * (gw - a - xh * b);
    }
}
extern "C" __global__ void overopt_layer_norm_grad_f32(const float *x, const float *g,
        const float *w, float *out, unsigned int rows, unsigned int n, float eps) {
    overopt_ln_grad_row(x, g, 0, w, out, rows, n, eps);
}
extern "C" __global__ void overopt_layer_norm_grad_bf16(const float *x, const unsigned short *g,
        const float *w, float *out, unsigned int rows, unsigned int n, float eps) {
    overopt_ln_grad_row(x, 0, g, w, out, rows, n, eps);
}
"#,
};

/// Whether [`grads`] takes `x` (.., n) f32, `w` (n) f32 and `g` like `x` in f32 or bf16, on a
/// device where its kernel runs.
pub(crate) fn usable(x: &Tensor, w: &Tensor, g: &Tensor) -> bool {
    x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && matches!(g.dtype(), DType::F32 | DType::BF16)
        && g.dims() == x.dims()
        && x.rank() >= 1
        && w.dims() == [x.dims()[x.rank() - 1]]
        && x.elem_count() > 0
        && super::nvrtc::ready(x.device(), &SOURCE)
}

/// The gradients of layer norm over the last dimension of `x` with weight `w` for the output
/// gradient `g` (see [`usable`]): dx like `x`, and the f32 gradients of the weight and the bias.
pub(crate) fn grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / n;
    let out = x.contiguous()?.apply_op3_no_bwd(
        &g.contiguous()?,
        &w.contiguous()?,
        &LayerNormGrad { eps },
    )?;
    let dx = out.narrow(0, 0, 1)?.reshape(x.dims())?;
    let gx = out.narrow(0, 1, 1)?.reshape((rows, n))?;
    let dw = super::recompute::column_sums(&gx)?;
    let db = super::recompute::column_sums(&g.to_dtype(DType::F32)?.reshape((rows, n))?)?;
    Ok((dx, dw, db))
}

struct LayerNormGrad {
    eps: f64,
}

/// The CPU twin of one row of the kernels (sums in f64, sequential).
fn row_grad(
    x: &[f32],
    g: impl Fn(usize) -> f32,
    w: &[f32],
    eps: f64,
    dx: &mut [f32],
    gx: &mut [f32],
) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let rstd = 1.0 / (var + eps).sqrt();
    let (mut sa, mut sb) = (0f64, 0f64);
    for i in 0..x.len() {
        let xh = (x[i] as f64 - mean) * rstd;
        let gi = g(i) as f64;
        let gw = gi * w[i] as f64;
        sa += gw;
        sb += gw * xh;
        gx[i] = (gi * xh) as f32;
    }
    let (a, b) = (sa / n, sb / n);
    for i in 0..x.len() {
        let xh = (x[i] as f64 - mean) * rstd;
        let gw = g(i) as f64 * w[i] as f64;
        dx[i] = (rstd * (gw - a - xh * b)) as f32;
    }
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
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
        let x = super::fused::slice(s1, l1, self.name())?;
        let w = super::fused::slice(s3, l3, self.name())?;
        let n = w.len();
        let rows = x.len() / n;
        let mut out = vec![0f32; 2 * rows * n];
        let (dx, gx) = out.split_at_mut(rows * n);
        super::fused::with_f32_reader(s2, l2, self.name(), |g| {
            for r in 0..rows {
                let span = r * n..(r + 1) * n;
                let (dxr, gxr) = (&mut dx[span.clone()], &mut gx[span.clone()]);
                row_grad(&x[span], |i| g(r * n + i), w, self.eps, dxr, gxr);
            }
        })?;
        Ok((CpuStorage::F32(out), Shape::from((2, rows * n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::nvrtc;
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::CudaStorageSlice as S;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let name = self.name();
        let dev = s1.device();
        let (S::F32(x), S::F32(w)) = (&s1.slice, &s3.slice) else {
            candle_core::bail!("{name}: expects f32 input and weight")
        };
        let (x, w) = (nvrtc::view(x, l1, name)?, nvrtc::view(w, l3, name)?);
        let n = nvrtc::len(name, w.len())?;
        let rows = nvrtc::len(name, x.len() / n as usize)?;
        // SAFETY: the kernel writes all 2 rows n elements.
        let mut out = unsafe { dev.alloc::<f32>(2 * rows as usize * n as usize)? };
        let eps = self.eps as f32;
        let stream = dev.cuda_stream();
        // One launch: the kernel for the gradient's dtype, `g` its view.
        macro_rules! launch {
            ($kernel:expr, $g:expr) => {{
                let func = nvrtc::func(dev, &SOURCE, $kernel)?;
                let g = $g;
                let mut args = stream.launch_builder(&func);
                args.arg(&x);
                args.arg(&g);
                args.arg(&w);
                args.arg(&mut out);
                args.arg(&rows);
                args.arg(&n);
                args.arg(&eps);
                nvrtc::launch_rows(args, rows)?;
            }};
        }
        match &s2.slice {
            S::F32(g) => launch!("overopt_layer_norm_grad_f32", nvrtc::view(g, l2, name)?),
            S::BF16(g) => launch!("overopt_layer_norm_grad_bf16", nvrtc::view(g, l2, name)?),
            _ => candle_core::bail!("{}: expects an f32 or bf16 gradient", self.name()),
        }
        let storage = candle_core::CudaStorage {
            slice: S::F32(out),
            device: dev.clone(),
        };
        Ok((storage, Shape::from((2, rows as usize * n as usize))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nvrtc::{HostKernels, value_bits};
    use candle_core::Device;

    /// Runs the kernel named by the first input word (`f32` or `bf16`) on `rows` x `n` values,
    /// one block of `threads` per row: reads eps, x, g (as hexadecimal bits, 32 or 16 per
    /// value) and w; prints dx and g * xhat as f32 bits.
    const DRIVER: &str = r#"
int main() {
  char kind[8]; unsigned int rows, n, threads; float eps;
  if (std::scanf("%7s %u %u %u %f", kind, &rows, &n, &threads, &eps) != 5) return 2;
  bool bf16 = std::strcmp(kind, "bf16") == 0;
  std::vector<float> x(rows * n), w(n), out(2 * rows * n);
  std::vector<float> gf(rows * n);
  std::vector<unsigned short> gb(rows * n);
  unsigned int b;
  for (auto &v : x) { if (std::scanf("%x", &b) != 1) return 2; v = __uint_as_float(b); }
  for (unsigned int i = 0; i < rows * n; i++) {
    if (std::scanf("%x", &b) != 1) return 2;
    if (bf16) gb[i] = (unsigned short)b; else gf[i] = __uint_as_float(b);
  }
  for (auto &v : w) { if (std::scanf("%x", &b) != 1) return 2; v = __uint_as_float(b); }
  for (unsigned int r = 0; r < rows; r++) {
    overopt_run_block(r, threads, [&] {
      if (bf16) overopt_layer_norm_grad_bf16(x.data(), gb.data(), w.data(), out.data(), rows, n, eps);
      else overopt_layer_norm_grad_f32(x.data(), gf.data(), w.data(), out.data(), rows, n, eps);
    });
  }
  for (auto v : out) std::printf("%x\n", __float_as_uint(v));
  return 0;
}
"#;

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// Rows with an offset mean (so that a one-pass variance would lose digits), n not a
    /// multiple of the block, f32 and bf16 gradients: the CUDA kernels compiled for the CPU
    /// (each block's threads as CPU threads) against the CPU op, and the CPU op against the
    /// composite of candle ops, for dx and for the weight and bias gradients.
    #[test]
    fn kernels_the_cpu_op_and_the_composite_agree() {
        let dev = Device::Cpu;
        let (rows, n, threads) = (5usize, 300usize, 64u32);
        let eps = 1e-5;
        let x = (Tensor::randn(0f32, 2.0, (rows, n), &dev).unwrap() + 30.0).unwrap();
        let w = (Tensor::randn(0f32, 0.5, n, &dev).unwrap() + 1.0).unwrap();
        // Correlated with the normalized rows, so that both row means of dx matter.
        let g32 = (Tensor::randn(0f32, 1.0, (rows, n), &dev).unwrap()
            + ((&x - 30.0).unwrap() * 0.5).unwrap())
        .unwrap();
        let kernels = HostKernels::new(&SOURCE, DRIVER);
        for gd in [DType::F32, DType::BF16] {
            let g = g32.to_dtype(gd).unwrap();
            assert!(usable(&x, &w, &g));
            let (dx, dw, db) = grads(&x, &w, &g, eps).unwrap();
            let (cdx, cdw, cdb) =
                crate::model::recompute::layer_norm_grads_composite(&x, &w, &g, eps).unwrap();
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (what, a, b) in [("dx", &dx, &cdx), ("dw", &dw, &cdw), ("db", &db, &cdb)] {
                let d = max_rel(&v(a), &v(b));
                assert!(d < 1e-4, "{gd:?} {what}: CPU op vs composite {d}");
            }
            let kind = if gd == DType::F32 { "f32" } else { "bf16" };
            let values = [&x, &g, &w].into_iter().flat_map(value_bits);
            let out = kernels.run(&format!("{kind} {rows} {n} {threads} {eps}"), values);
            let host: Vec<f32> = out.into_iter().map(f32::from_bits).collect();
            assert_eq!(host.len(), 2 * rows * n);
            let cpu = x
                .apply_op3_no_bwd(&g, &w, &LayerNormGrad { eps })
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let (hd, hg) = host.split_at(rows * n);
            let (cd, cg) = cpu.split_at(rows * n);
            assert!(
                max_rel(hd, cd) < 1e-5,
                "{kind}: kernel dx {}",
                max_rel(hd, cd)
            );
            assert!(
                max_rel(hg, cg) < 1e-5,
                "{kind}: kernel g xhat {}",
                max_rel(hg, cg)
            );
        }
    }
}
