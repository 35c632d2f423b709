//! A linear layer's forward product with its bias added in place: `x @ w^T`, then `+= b` on
//! the product's own buffer, instead of `broadcast_add`'s second buffer as large as the
//! output. At the P3 shape that second buffer was half of what the layer nodes' four linear
//! layers wrote in the forward pass (`overopt-gpu-bench --profile`, section
//! `fwd.layer.linear`).
//!
//! In place only on the product the function itself made (nobody else holds its storage),
//! when it is not part of candle's graph (the recomputing ops and the layer nodes run their
//! forward passes on detached tensors), f32 or bf16, on the CPU (a loop) or on CUDA (one
//! kernel compiled by NVRTC, [`SOURCE`]). Elsewhere (f16, a tracked product, NVRTC failed,
//! `OVEROPT_NO_FUSED=1`) it is `broadcast_add`. Rounding: f32 adds as candle's op does; bf16
//! adds in f32 and rounds once to nearest even, as candle's CPU op (the `half` crate) does.

use super::fused::{contiguous_range, with_f32_reader};
use super::nvrtc::Source;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, D, DType, InplaceOp2, Layout, Result, Tensor, WithDType};

/// `x @ wt + b` for `x` (rows, in), `wt` (in, out) (a weight's transpose) and `b` (out).
pub(crate) fn matmul_bias(x: &Tensor, wt: &Tensor, b: &Tensor) -> Result<Tensor> {
    let y = x.matmul(wt)?;
    if usable(&y, b) {
        y.inplace_op2(b, &BiasAdd)?;
        Ok(y)
    } else {
        y.broadcast_add(b)
    }
}

/// Whether `y += b` can run in place (see the module docs).
fn usable(y: &Tensor, b: &Tensor) -> bool {
    super::fused::enabled()
        && matches!(y.dtype(), DType::F32 | DType::BF16)
        && b.dtype() == y.dtype()
        && b.rank() == 1
        && y.rank() >= 1
        && y.dim(D::Minus1).ok() == Some(b.dim(0).unwrap_or(0))
        && y.is_contiguous()
        && b.is_contiguous()
        && !y.track_op()
        && y.device().same_device(b.device())
        && super::nvrtc::ready(y.device(), &SOURCE)
}

struct BiasAdd;

impl InplaceOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add-in-place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let name = self.name();
        let (a, e) = contiguous_range(l1, name)?;
        let cols = l2.dims().iter().product::<usize>().max(1);
        with_f32_reader(s2, l2, name, |b| match s1 {
            CpuStorage::F32(y) => {
                for (i, v) in y[a..e].iter_mut().enumerate() {
                    *v += b(i % cols);
                }
                Ok(())
            }
            CpuStorage::BF16(y) => {
                for (i, v) in y[a..e].iter_mut().enumerate() {
                    // The f32 sum, rounded once (an f32 is exact as an f64).
                    *v = WithDType::from_f64((v.to_f32() + b(i % cols)) as f64);
                }
                Ok(())
            }
            _ => candle_core::bail!("{name}: expects an f32 or bf16 product"),
        })?
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        cuda::run(self.name(), (s1, l1), (s2, l2))
    }
}

/// The CUDA kernels: the CPU loop, element by element (one thread per element).
pub(crate) const SOURCE: Source = Source {
    module: "overopt_bias_add",
    text: r#"
extern "C" __global__ void overopt_bias_add_f32(
    float *y, const float *b, unsigned int n, unsigned int cols) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[i] = y[i] + b[i % cols];
}
extern "C" __global__ void overopt_bias_add_bf16(
    unsigned short *y, const unsigned short *b, unsigned int n, unsigned int cols) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[i] = overopt_f32_to_bf16(overopt_bf16_to_f32(y[i]) + overopt_bf16_to_f32(b[i % cols]));
}
"#,
};

#[cfg(feature = "cuda")]
mod cuda {
    use crate::model::nvrtc;
    use candle_core::cuda_backend::CudaStorageSlice as S;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
    use candle_core::{CudaStorage, Layout, Result, backend::BackendStorage};

    /// `y += b` over the contiguous range of `y`'s layout, `b` contiguous (cols).
    pub fn run(
        name: &str,
        (y, yl): (&mut CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
    ) -> Result<()> {
        let dev = y.device().clone();
        /// `kernel` on the elements of `y` and `b` that their layouts cover.
        fn go<T: DeviceRepr>(
            dev: &candle_core::CudaDevice,
            kernel: &str,
            (y, b): (&mut CudaSlice<T>, &CudaSlice<T>),
            (yl, bl): (&Layout, &Layout),
        ) -> Result<()> {
            let mut out = nvrtc::view_mut(y, yl, kernel)?;
            let bias = nvrtc::view(b, bl, kernel)?;
            let n = nvrtc::len(kernel, out.len())?;
            let cols = nvrtc::len(kernel, bias.len().max(1))?;
            let func = nvrtc::func(dev, &super::SOURCE, kernel)?;
            let stream = dev.cuda_stream();
            let mut args = stream.launch_builder(&func);
            args.arg(&mut out);
            args.arg(&bias);
            args.arg(&n);
            args.arg(&cols);
            nvrtc::launch(args, n)
        }
        let r = (yl, bl);
        match (&mut y.slice, &b.slice) {
            (S::F32(y), S::F32(b)) => go(&dev, "overopt_bias_add_f32", (y, b), r),
            (S::BF16(y), S::BF16(b)) => go(&dev, "overopt_bias_add_bf16", (y, b), r),
            _ => candle_core::bail!("{name}: expects f32 or bf16, got {:?}", y.dtype()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nvrtc::{self, value_bits};
    use candle_core::Device;

    /// The in-place add gives `broadcast_add`'s values bit for bit (f32 and bf16, a column
    /// count that is not a power of two); f16 and tracked products take `broadcast_add`.
    #[test]
    fn in_place_add_is_broadcast_add_bit_for_bit() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (37, 24), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (13, 24), &dev).unwrap();
        let b = (Tensor::randn(0f32, 1.0, 13, &dev).unwrap() * 30.0).unwrap();
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let c = |t: &Tensor| t.to_dtype(dt).unwrap();
            let (x, wt, b) = (c(&x), c(&w).t().unwrap(), c(&b));
            let want = x.matmul(&wt).unwrap().broadcast_add(&b).unwrap();
            let got = matmul_bias(&x, &wt, &b).unwrap();
            assert_eq!(got.dims(), [37, 13]);
            assert_eq!(value_bits(&got), value_bits(&want), "{dt:?}");
            assert_eq!(
                usable(&x.matmul(&wt).unwrap(), &b),
                dt != DType::F16,
                "{dt:?}"
            );
        }
        // A product in candle's graph is left alone (its bias would lose its gradient).
        let v = candle_core::Var::from_tensor(&x).unwrap();
        let tracked = v.as_tensor().matmul(&w.t().unwrap()).unwrap();
        assert!(!usable(&tracked, &b));
        let y = matmul_bias(v.as_tensor(), &w.t().unwrap(), &b).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(v.as_tensor()).is_some());
    }

    /// Runs the kernel named by the first input word (`f32` or `bf16`) for every index on `n`
    /// values of `y` and `cols` of `b`, as hexadecimal bits (32 or 16 per value); prints `y`.
    const DRIVER: &str = r#"
int main() {
  char kind[8]; unsigned int n, cols;
  if (std::scanf("%7s %u %u", kind, &n, &cols) != 3) return 2;
  bool bf16 = std::strcmp(kind, "bf16") == 0;
  std::vector<unsigned int> y(n), b(cols);
  for (auto &v : y) if (std::scanf("%x", &v) != 1) return 2;
  for (auto &v : b) if (std::scanf("%x", &v) != 1) return 2;
  std::vector<float> yf(n), bf(cols);
  std::vector<unsigned short> yh(n), bh(cols);
  for (unsigned int i = 0; i < n; i++) { yf[i] = __uint_as_float(y[i]); yh[i] = y[i]; }
  for (unsigned int i = 0; i < cols; i++) { bf[i] = __uint_as_float(b[i]); bh[i] = b[i]; }
  blockDim.x = 128;
  for (unsigned int i = 0; i < n; i++) {
    blockIdx.x = i / 128; threadIdx.x = i % 128;
    if (bf16) overopt_bias_add_bf16(yh.data(), bh.data(), n, cols);
    else overopt_bias_add_f32(yf.data(), bf.data(), n, cols);
  }
  for (unsigned int i = 0; i < n; i++)
    std::printf("%x\n", bf16 ? (unsigned int)yh[i] : __float_as_uint(yf[i]));
  return 0;
}
"#;

    /// The CUDA kernels, compiled for the CPU, give the CPU op's values bit for bit.
    #[test]
    fn cuda_kernels_compute_the_cpu_loop_bit_for_bit() {
        let kernels = nvrtc::HostKernels::new(&SOURCE, DRIVER);
        let dev = Device::Cpu;
        let (rows, cols) = (19, 11);
        for dt in [DType::F32, DType::BF16] {
            let draw = |std: f32, shape: &[usize]| {
                let t = Tensor::randn(0f32, std, shape, &dev).unwrap();
                t.to_dtype(dt).unwrap()
            };
            let (y, b) = (draw(3.0, &[rows, cols]), draw(50.0, &[cols]));
            let kind = if dt == DType::F32 { "f32" } else { "bf16" };
            let values = value_bits(&y).into_iter().chain(value_bits(&b));
            let host = kernels.run(&format!("{kind} {} {cols}", rows * cols), values);
            let want = y.copy().unwrap();
            want.inplace_op2(&b, &BiasAdd).unwrap();
            assert_eq!(host, value_bits(&want), "{kind}");
            // And the CPU op is the broadcast add.
            assert_eq!(
                value_bits(&want),
                value_bits(&y.broadcast_add(&b).unwrap()),
                "{kind}"
            );
        }
    }
}
