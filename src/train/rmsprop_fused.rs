//! RMSProp's update of one f32 parameter as two in-place passes, on the CPU and on CUDA.
//!
//! The composite update of [`super::optim::RmsProp::step_with`] is about ten candle ops per
//! parameter (scale by the clip factor, square, two scalings, add, sqrt, add eps, divide,
//! scale by the learning rate, subtract, and `Var::set`'s copy), each reading its inputs and
//! writing a new buffer as large as the parameter. Here:
//!
//! 1. `square_avg <- square_avg * alpha + (g * g) * (1 - alpha)`, in place;
//! 2. `param <- param - (g / (sqrt(square_avg) + eps)) * lr`, in place,
//!
//! with `g` the gradient times the clip factor when clipping applies. Every operation rounds
//! to f32 as candle's op of the composite does (its scalar ops are `x * mul + add` with
//! `add = 0`, kept here; the CUDA kernels are compiled without contracting products and sums
//! into fused multiply-adds), so the values are the composite's, bit for bit (on the CPU the
//! unit test `fused_update_is_the_composite_bit_for_bit` of `optim` checks it, and
//! tests/train_fixtures.rs pins the update against torch's RMSprop).
//!
//! CUDA: the kernels are compiled once per process from [`SOURCE`] by NVRTC
//! ([`crate::model::nvrtc`]). `OVEROPT_NO_FUSED=1` switches them off with the CPU
//! loops, as it does the model's fused kernels.

use crate::model::fused::{contiguous_range as range, slice};
use crate::model::nvrtc::Source;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

/// The scalars of one step, as candle's scalar ops of the composite see them (f32).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Coeffs {
    /// The clip factor, when clipping applies (factor < 1).
    pub clip: Option<f32>,
    pub alpha: f32,
    pub one_minus_alpha: f32,
    pub eps: f32,
    pub lr: f32,
}

impl Coeffs {
    /// From the f64 settings, rounded as candle's `affine` rounds its scalars.
    pub fn new(clip: Option<f64>, alpha: f64, eps: f64, lr: f64) -> Self {
        Self {
            clip: clip.map(|c| c as f32),
            alpha: alpha as f32,
            one_minus_alpha: (1.0 - alpha) as f32,
            eps: eps as f32,
            lr: lr as f32,
        }
    }

    /// The gradient as the update sees it.
    #[inline]
    fn grad(&self, g: f32) -> f32 {
        match self.clip {
            Some(c) => g * c + 0.0,
            None => g,
        }
    }
}

/// Whether the fused update applies: the parameter, its state and its gradient are f32,
/// contiguous and of one shape, on the CPU or a CUDA device where NVRTC compiled the kernels,
/// and the fused kernels are on.
pub(crate) fn usable(p: &Tensor, sq: &Tensor, g: &Tensor) -> bool {
    crate::model::fused::enabled()
        && [p, sq, g]
            .iter()
            .all(|t| t.dtype() == DType::F32 && t.is_contiguous() && t.dims() == p.dims())
        && crate::model::nvrtc::ready(p.device(), &SOURCE)
}

/// One update of `p` and `sq` by `g` in place (the caller checked [`usable`]).
pub(crate) fn update(p: &Tensor, sq: &Tensor, g: &Tensor, k: Coeffs) -> Result<()> {
    sq.inplace_op2(g, &SquareAvg(k))?;
    p.inplace_op3(sq, g, &Param(k))
}

struct SquareAvg(Coeffs);

impl InplaceOp2 for SquareAvg {
    fn name(&self) -> &'static str {
        "rmsprop-square-avg"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (a1, b1) = range(l1, self.name())?;
        let g = slice(s2, l2, self.name())?;
        let CpuStorage::F32(sq) = s1 else {
            candle_core::bail!("{}: square_avg is not f32", self.name())
        };
        let k = self.0;
        for (s, &g) in sq[a1..b1].iter_mut().zip(g) {
            let g = k.grad(g);
            *s = (*s * k.alpha + 0.0) + ((g * g) * k.one_minus_alpha + 0.0);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        let k = self.0;
        let scalars = [k.alpha, k.one_minus_alpha];
        cuda::run(
            "overopt_rmsprop_square_avg",
            (s1, l1),
            &[(s2, l2)],
            k.clip,
            scalars,
        )
    }
}

struct Param(Coeffs);

impl InplaceOp3 for Param {
    fn name(&self) -> &'static str {
        "rmsprop-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let name = self.name();
        let (a1, b1) = range(l1, name)?;
        let (sq, g) = (slice(s2, l2, name)?, slice(s3, l3, name)?);
        let CpuStorage::F32(p) = s1 else {
            candle_core::bail!("{name}: the parameter is not f32")
        };
        let k = self.0;
        for ((p, &s), &g) in p[a1..b1].iter_mut().zip(sq).zip(g) {
            let denom = s.sqrt() * 1.0 + k.eps;
            *p -= (k.grad(g) / denom) * k.lr + 0.0;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        let k = self.0;
        let srcs = [(s2, l2), (s3, l3)];
        cuda::run(
            "overopt_rmsprop_param",
            (s1, l1),
            &srcs,
            k.clip,
            [k.eps, k.lr],
        )
    }
}

/// The CUDA source of both passes: the CPU loops above, element by element (compiled as
/// [`crate::model::nvrtc`] compiles every source: no fused multiply-adds, IEEE division and
/// square root). A unit test compiles it as C++ for the CPU and compares it with the loops, so
/// it is checked without a GPU.
pub(crate) const SOURCE: Source = Source {
    module: "overopt_rmsprop",
    text: r#"
extern "C" __global__ void overopt_rmsprop_square_avg(
    float *sq, const float *g, unsigned int n, unsigned int use_clip, float clip,
    float alpha, float one_minus_alpha) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = use_clip ? g[i] * clip + 0.0f : g[i];
    sq[i] = (sq[i] * alpha + 0.0f) + ((gi * gi) * one_minus_alpha + 0.0f);
}

extern "C" __global__ void overopt_rmsprop_param(
    float *p, const float *sq, const float *g, unsigned int n, unsigned int use_clip,
    float clip, float eps, float lr) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = use_clip ? g[i] * clip + 0.0f : g[i];
    float denom = sqrtf(sq[i]) * 1.0f + eps;
    p[i] = p[i] - ((gi / denom) * lr + 0.0f);
}
"#,
};

#[cfg(feature = "cuda")]
mod cuda {
    use crate::model::nvrtc;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::{CudaStorage, Layout, Result, backend::BackendStorage};

    /// Run `kernel` of [`super::SOURCE`] in place on `dst` with the read-only `srcs` (f32,
    /// contiguous, as many elements as `dst`), the clip factor and two more scalars.
    pub fn run(
        kernel: &str,
        (dst, dl): (&mut CudaStorage, &Layout),
        srcs: &[(&CudaStorage, &Layout)],
        clip: Option<f32>,
        scalars: [f32; 2],
    ) -> Result<()> {
        let stream = dst.device().cuda_stream();
        let func = nvrtc::func(dst.device(), &super::SOURCE, kernel)?;
        let views = srcs
            .iter()
            .map(|(s, l)| nvrtc::view(s.as_cuda_slice::<f32>()?, l, kernel))
            .collect::<Result<Vec<_>>>()?;
        let mut out = nvrtc::view_mut(dst.as_cuda_slice_mut::<f32>()?, dl, kernel)?;
        let n = nvrtc::len(kernel, out.len())?;
        let mut args = stream.launch_builder(&func);
        args.arg(&mut out);
        for v in &views {
            args.arg(v);
        }
        let (use_clip, clip) = (u32::from(clip.is_some()), clip.unwrap_or(1.0));
        candle_core::builder_arg!(args, n, use_clip, clip, scalars[0], scalars[1]);
        nvrtc::launch(args, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nvrtc;
    use candle_core::Device;
    use std::fmt::Write as _;

    /// Runs both kernels of [`SOURCE`] for every index on hexadecimal float bits read from
    /// standard input (`n use_clip clip alpha one_minus_alpha eps lr`, then `sq`, `g` and `p`,
    /// n values each) and prints the updated `sq` and `p`.
    const DRIVER: &str = r#"
static float f(unsigned int b) { return __uint_as_float(b); }
static std::vector<float> read(unsigned int n) {
  std::vector<float> v(n);
  for (auto &x : v) { unsigned int b; if (std::scanf("%x", &b) != 1) throw 1; x = f(b); }
  return v;
}
int main() {
  unsigned int n, use_clip, k[5];
  if (std::scanf("%u %u %x %x %x %x %x", &n, &use_clip, &k[0], &k[1], &k[2], &k[3], &k[4]) != 7)
    return 2;
  auto sq = read(n), g = read(n), p = read(n);
  blockDim.x = 128;
  for (unsigned int i = 0; i < n; i++) {
    blockIdx.x = i / 128; threadIdx.x = i % 128;
    overopt_rmsprop_square_avg(sq.data(), g.data(), n, use_clip, f(k[0]), f(k[1]), f(k[2]));
  }
  for (unsigned int i = 0; i < n; i++) {
    blockIdx.x = i / 128; threadIdx.x = i % 128;
    overopt_rmsprop_param(p.data(), sq.data(), g.data(), n, use_clip, f(k[0]), f(k[3]), f(k[4]));
  }
  for (float x : sq) std::printf("%x\n", __float_as_uint(x));
  for (float x : p) std::printf("%x\n", __float_as_uint(x));
  return 0;
}
"#;

    /// The CUDA kernels, compiled for the CPU (no contraction into fused multiply-adds, as
    /// NVRTC is told), give the CPU loops' values bit for bit, with and without clipping.
    #[test]
    fn cuda_kernels_compute_the_cpu_loops_bit_for_bit() {
        let kernels = nvrtc::HostKernels::new(&SOURCE, DRIVER);
        let dev = Device::Cpu;
        let n = 1000;
        let draw = |std: f32| {
            let v = Tensor::randn(0f32, std, n, &dev)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            v.into_iter()
                .enumerate()
                .map(|(i, x)| x * 10f32.powi((i % 11) as i32 - 5))
                .collect::<Vec<f32>>()
        };
        for clip in [None, Some(0.23)] {
            let sq0: Vec<f32> = draw(1.0).iter().map(|x| x.abs()).collect();
            let (g, p0) = (draw(1.0), draw(0.1));
            let k = Coeffs::new(clip, 0.99, 1e-8, 2e-3);
            let mut header = format!("{n} {}", u32::from(k.clip.is_some()));
            for x in [
                k.clip.unwrap_or(1.0),
                k.alpha,
                k.one_minus_alpha,
                k.eps,
                k.lr,
            ] {
                write!(header, " {:x}", x.to_bits()).unwrap();
            }
            let values = [&sq0, &g, &p0].into_iter().flatten().map(|x| x.to_bits());
            let host = kernels.run(&header, values);
            let t = |v: &Vec<f32>| Tensor::from_vec(v.clone(), n, &dev).unwrap();
            let (p, sq, g) = (t(&p0), t(&sq0), t(&g));
            update(&p, &sq, &g, k).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                t.to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(f32::to_bits)
                    .collect()
            };
            assert_eq!(host[..n], bits(&sq)[..], "square_avg, clip {clip:?}");
            assert_eq!(host[n..], bits(&p)[..], "param, clip {clip:?}");
        }
    }
}
