//! The crate's own CUDA kernels: CUDA C sources compiled at run time by NVRTC (which candle's
//! CUDA backend already loads), once per process and source, and launched on candle's stream.
//!
//! Every source is compiled without contracting products and sums into fused multiply-adds and
//! with IEEE division and square root, so a kernel rounds where its CPU twin (a plain loop in
//! Rust) rounds. The sources are plain C: [`host_program`] compiles one for the CPU with a
//! stand-in for CUDA's thread indices, which lets the unit tests compare each kernel with its
//! CPU twin on a machine without a GPU.

/// A kernel source: its module name (the key of candle's module cache) and its CUDA C text.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // `module` is read by the CUDA code only
pub(crate) struct Source {
    pub module: &'static str,
    pub text: &'static str,
}

/// Helpers every source may use: bf16 (as its 16 bits) to and from f32, rounding to nearest
/// even as candle's (the `half` crate's) conversion does; NaN stays NaN.
#[cfg_attr(not(any(feature = "cuda", test)), allow(dead_code))]
pub(crate) const PRELUDE: &str = r#"
__device__ __forceinline__ float overopt_bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}
__device__ __forceinline__ unsigned short overopt_f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
"#;

/// A C++ program for the CPU made of [`PRELUDE`], `src` and `driver` (a `main`), with
/// stand-ins for what CUDA C provides: the thread indices, `__global__`, `__device__`,
/// `__forceinline__`, the bit casts, and for kernels whose threads cooperate, `__shared__`
/// (one static array, which the threads of a block share) and `__syncthreads()` (a barrier of
/// the block's threads). The driver either sets the indices itself before each call (one call
/// per index, for kernels whose threads do not cooperate) or runs a block with
/// `overopt_run_block(block, threads, [&] { kernel(...); })`, each thread of the block a
/// thread of the CPU. Compile it with `-ffp-contract=off` to round as the kernels do.
#[cfg(test)]
pub(crate) fn host_program(src: &Source, driver: &str) -> String {
    format!(
        "#include <cmath>\n#include <cstdio>\n#include <cstring>\n#include <vector>\n\
         #include <thread>\n#include <mutex>\n#include <condition_variable>\n\
         struct Index {{ unsigned int x; }};\n\
         static Index blockIdx, blockDim;\nstatic thread_local Index threadIdx;\n\
         #define __global__\n#define __device__\n#define __forceinline__ inline\n\
         #define __shared__ static\n\
         static inline float __uint_as_float(unsigned int b) {{ float x; std::memcpy(&x, &b, 4); return x; }}\n\
         static inline unsigned int __float_as_uint(float x) {{ unsigned int b; std::memcpy(&b, &x, 4); return b; }}\n\
         {BLOCKS}\n{PRELUDE}\n{}\n{driver}\n",
        src.text
    )
}

/// The host stand-ins of a block's shared barrier and of a block's launch (see
/// [`host_program`]).
#[cfg(test)]
const BLOCKS: &str = r#"
static std::mutex overopt_m;
static std::condition_variable overopt_cv;
static unsigned int overopt_waiting = 0, overopt_generation = 0, overopt_threads = 1;
static void __syncthreads() {
  std::unique_lock<std::mutex> l(overopt_m);
  unsigned int gen = overopt_generation;
  if (++overopt_waiting == overopt_threads) {
    overopt_waiting = 0;
    overopt_generation++;
    overopt_cv.notify_all();
  } else {
    overopt_cv.wait(l, [&] { return gen != overopt_generation; });
  }
}
template <class F> static void overopt_run_block(unsigned int block, unsigned int threads, F f) {
  blockIdx.x = block;
  blockDim.x = threads;
  overopt_threads = threads;
  std::vector<std::thread> ts;
  for (unsigned int t = 0; t < threads; t++) ts.emplace_back([=] { threadIdx.x = t; f(); });
  for (auto &t : ts) t.join();
}
"#;

/// The bits of the values of `t` as the kernels' test drivers read and print them: the 16 of
/// each bf16, the 32 of each f32 (other dtypes: of their f32 values).
#[cfg(test)]
pub(crate) fn value_bits(t: &candle_core::Tensor) -> Vec<u32> {
    let v = t
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .unwrap();
    let bf16 = t.dtype() == candle_core::DType::BF16;
    v.iter()
        .map(|x| if bf16 { x.to_bits() >> 16 } else { x.to_bits() })
        .collect()
}

/// The kernels of a source compiled for the CPU with a test driver (see [`host_program`]),
/// run on inputs written as its drivers read them.
#[cfg(test)]
pub(crate) struct HostKernels {
    dir: tempfile::TempDir,
    program: String,
}

#[cfg(test)]
impl HostKernels {
    pub fn new(src: &Source, driver: &str) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            program: host_program(src, driver),
        }
    }

    /// The driver's output for a first line `header` followed by `values`, one hexadecimal
    /// number per line, each output line read as one hexadecimal number.
    pub fn run(&self, header: &str, values: impl IntoIterator<Item = u32>) -> Vec<u32> {
        use std::fmt::Write as _;
        let mut input = format!("{header}\n");
        for v in values {
            writeln!(input, "{v:x}").unwrap();
        }
        run_host_program(self.dir.path(), &self.program, &input)
            .lines()
            .map(|l| u32::from_str_radix(l.trim(), 16).unwrap())
            .collect()
    }
}

/// Compile `program` (from [`host_program`]) with the C++ compiler (`$CXX`, else `c++`) into
/// `dir` and run it with `input` on its standard input; its standard output.
#[cfg(test)]
pub(crate) fn run_host_program(dir: &std::path::Path, program: &str, input: &str) -> String {
    use std::process::{Command, Stdio};
    let (src, exe) = (dir.join("kernel.cpp"), dir.join("kernel"));
    std::fs::write(&src, program).unwrap();
    let cc = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cc)
        .args(["-std=c++17", "-O2", "-ffp-contract=off", "-pthread", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("{cc} (the C++ compiler, $CXX) did not run: {e}"));
    assert!(
        out.status.success(),
        "{cc} failed on the kernel source:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = Command::new(&exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the host program failed: {:?}",
        out.status
    );
    String::from_utf8(out.stdout).unwrap()
}

#[cfg(feature = "cuda")]
pub(crate) use cuda::{compile, func, launch, launch_rows, len, view, view_mut};

/// The threads of a block of the kernels that give each row a block (a power of two, for their
/// tree reductions, and at most the 1024 of their shared arrays).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) const ROW_THREADS: u32 = 256;

/// Whether the kernels of `src` can run on `dev`: always on the CPU (where their loops run); on
/// CUDA when NVRTC compiles `src` (tried once per process; a failure is reported once on
/// standard error, and the callers then take candle's composite ops instead).
pub(crate) fn ready(dev: &candle_core::Device, src: &Source) -> bool {
    match dev {
        candle_core::Device::Cpu => true,
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => cuda::compile(src).is_ok(),
        _ => {
            let _ = src;
            false
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{PRELUDE, Source};
    use candle_core::Layout;
    use candle_core::Result;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaSlice, CudaView, CudaViewMut, LaunchArgs, LaunchConfig,
    };
    use candle_core::cuda_backend::cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    /// The PTX of a module, or NVRTC's error.
    type Compiled = std::result::Result<Arc<str>, String>;

    /// The PTX of `src`, compiled once per process (later calls, one per launch, share it).
    pub fn compile(src: &Source) -> Result<Arc<str>> {
        static CACHE: OnceLock<Mutex<HashMap<&'static str, Compiled>>> = OnceLock::new();
        let mut cache = CACHE
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| candle_core::Error::Msg("nvrtc: a compilation panicked".into()))?;
        let entry = cache.entry(src.module).or_insert_with(|| {
            let out = compile_uncached(src);
            if let Err(e) = &out {
                eprintln!("warning: {e}; candle's composite ops are used instead");
            }
            out
        });
        entry.clone().map_err(candle_core::Error::Msg)
    }

    fn compile_uncached(src: &Source) -> Compiled {
        let opts = CompileOptions {
            fmad: Some(false),
            prec_div: Some(true),
            prec_sqrt: Some(true),
            ftz: Some(false),
            name: Some(format!("{}.cu", src.module)),
            ..Default::default()
        };
        compile_ptx_with_opts(format!("{PRELUDE}\n{}", src.text), opts)
            .map(|p| Arc::from(p.to_src()))
            .map_err(|e| format!("NVRTC could not compile {}: {e}", src.module))
    }

    /// `kernel` of `src`, loaded on `dev`; launch it on `dev.cuda_stream()` (candle's stream).
    pub fn func(dev: &CudaDevice, src: &Source, kernel: &str) -> Result<CudaFunction> {
        Ok(dev
            .get_or_load_custom_func(kernel, src.module, &compile(src)?)?
            .into_cuda_function())
    }

    /// The elements of `s` that the contiguous layout `l` covers (an error naming `op` when
    /// `l` is not contiguous): what a kernel reads.
    pub fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, op: &str) -> Result<CudaView<'a, T>> {
        let (a, e) = crate::model::fused::contiguous_range(l, op)?;
        Ok(s.slice(a..e))
    }

    /// [`view`] for a kernel that writes in place.
    pub fn view_mut<'a, T>(
        s: &'a mut CudaSlice<T>,
        l: &Layout,
        op: &str,
    ) -> Result<CudaViewMut<'a, T>> {
        let (a, e) = crate::model::fused::contiguous_range(l, op)?;
        Ok(s.slice_mut(a..e))
    }

    /// `n` as the kernels' element count.
    pub fn len(kernel: &str, n: usize) -> Result<u32> {
        u32::try_from(n)
            .map_err(|_| candle_core::Error::Msg(format!("{kernel}: {n} elements is beyond u32")))
    }

    /// Launch with one thread per element.
    pub fn launch(mut args: LaunchArgs<'_>, n: u32) -> Result<()> {
        // SAFETY: the caller passed the arguments in the kernel's order, with views holding
        // the `n` elements each kernel reads or writes.
        unsafe { args.launch(LaunchConfig::for_num_elems(n)) }
            .w()
            .map(|_| ())
    }

    /// Launch with one block of [`super::ROW_THREADS`] threads per row, for kernels whose
    /// threads reduce a row together.
    pub fn launch_rows(mut args: LaunchArgs<'_>, rows: u32) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (rows, 1, 1),
            block_dim: (super::ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller passed the arguments in the kernel's order, with views holding
        // the elements of `rows` rows that each kernel reads or writes.
        unsafe { args.launch(cfg) }.w().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use std::fmt::Write as _;

    /// The prelude's bf16 conversions against candle's, bit for bit: ties (both parities),
    /// values that round up into the next binade and to infinity, signed zeros, subnormals,
    /// infinities and NaN, and random values.
    #[test]
    fn bf16_conversions_round_as_candle_does() {
        const DRIVER: &str = r#"
int main() {
  unsigned int b;
  while (std::scanf("%x", &b) == 1) {
    unsigned short h = overopt_f32_to_bf16(__uint_as_float(b));
    std::printf("%x %x\n", (unsigned int)h, __float_as_uint(overopt_bf16_to_f32(h)));
  }
  return 0;
}
"#;
        let mut values: Vec<u32> = vec![
            0x3f80_8000, // 1 + half an ulp of bf16: a tie, even below
            0x3f81_8000, // a tie, odd below: rounds up
            0x3f80_7fff,
            0x3f80_8001,
            0x3fff_ffff, // rounds into the next binade
            0x7f7f_ffff, // the largest f32: rounds to infinity
            0x0000_0000,
            0x8000_0000,
            0x0000_8000, // subnormal tie
            0x0001_8000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0xbf3f_8000,
        ];
        let random = Tensor::randn(0f32, 1e3, 500, &Device::Cpu).unwrap();
        values.extend(random.to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()));
        let mut input = String::new();
        for v in &values {
            writeln!(input, "{v:x}").unwrap();
        }
        let src = Source {
            module: "test",
            text: "",
        };
        let dir = tempfile::tempdir().unwrap();
        let out = run_host_program(dir.path(), &host_program(&src, DRIVER), &input);
        let floats: Vec<f32> = values.iter().map(|&b| f32::from_bits(b)).collect();
        let want = Tensor::from_vec(floats, values.len(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for ((line, w), v) in out.lines().zip(&want).zip(&values) {
            let mut it = line.split(' ').map(|x| u32::from_str_radix(x, 16).unwrap());
            let (h, back) = (it.next().unwrap(), it.next().unwrap());
            if w.is_nan() {
                assert!(f32::from_bits(back).is_nan(), "{v:08x}: {line}");
            } else {
                assert_eq!(h, w.to_bits() >> 16, "{v:08x}: {line}");
                assert_eq!(back, w.to_bits(), "{v:08x}: {line}");
            }
        }
        assert_eq!(out.lines().count(), values.len());
    }
}
