//! `overopt`: reproduce "Scaling Laws for Reward Model Overoptimization in Direct Alignment
//! Algorithms" (Rafailov et al., 2024) with candle.
//!
//! Modules in pipeline order; no stage imports a later one:
//! `data` -> `model` -> `train` -> `eval` -> `analysis` -> `plots`, plus `toy_mdp` and the
//! sweep runner on top, and `notebook`, the notebooks' facade, above everything. `hub`
//! (cache-first hub access) and `util` sit below every stage.

pub mod analysis;
pub mod cli;
pub mod data;
pub mod eval;
pub mod hub;
pub mod model;
pub mod notebook;
pub mod plots;
pub mod sweep;
pub mod toy_mdp;
pub mod train;
pub mod util;

pub use candle_core;
pub use candle_nn;

/// Parse a device name: `cpu`, `cuda` or `cuda:N`.
pub fn device(name: &str) -> anyhow::Result<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n = s
                .strip_prefix("cuda:")
                .map(|x| x.parse::<usize>())
                .transpose()
                .map_err(|_| anyhow::anyhow!("bad device {s:?}: expected cuda:N"))?
                .unwrap_or(0);
            cuda_device(n, CudaAlloc::Keep)
        }
        s => anyhow::bail!("unknown device {s:?}: expected cpu, cuda or cuda:N"),
    }
}

/// What a CUDA device does with the memory its tensors free (see [`cuda_device`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaAlloc {
    /// Keep it in the device's stream-ordered memory pool for the next allocations (what
    /// PyTorch's caching allocator does), and create no CUDA events per buffer. The default.
    Keep,
    /// The driver's defaults: the pool hands freed memory back to the device at every
    /// synchronisation, and every buffer gets two events. For A/B comparisons.
    DriverDefault,
}

impl CudaAlloc {
    /// `keep` or `default`.
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        match name {
            "keep" => Ok(CudaAlloc::Keep),
            "default" => Ok(CudaAlloc::DriverDefault),
            s => anyhow::bail!("unknown CUDA allocation mode {s:?}: expected keep or default"),
        }
    }
}

/// CUDA device `ordinal`, set up for training.
///
/// candle allocates every tensor with `cuMemAllocAsync` from the device's memory pool, whose
/// release threshold is 0 by default: at every synchronisation (each `to_scalar`, each
/// `synchronize`) the pool returns all freed memory to the device, and the next pass maps it
/// again. With [`CudaAlloc::Keep`] the threshold is raised so the pool keeps what it holds, and
/// the per-buffer events that cudarc creates for synchronisation between streams are not made
/// (candle runs each device on one stream, where cudarc never uses them). These are speed
/// settings: when the driver refuses them, a warning names the failure on stderr and the
/// device is returned with the driver's defaults. On a build without the `cuda` feature this
/// is candle's error for a missing CUDA backend.
pub fn cuda_device(ordinal: usize, alloc: CudaAlloc) -> anyhow::Result<candle_core::Device> {
    let dev = candle_core::Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let (candle_core::Device::Cuda(d), CudaAlloc::Keep) = (&dev, alloc)
        && let Err(e) = keep_freed_memory(d)
    {
        eprintln!(
            "warning: cuda:{ordinal}: could not make the memory pool keep freed memory ({e}); \
             using the driver's defaults"
        );
    }
    #[cfg(not(feature = "cuda"))]
    let _ = alloc;
    Ok(dev)
}

/// Raise the release threshold of the device's current memory pool to the maximum and stop
/// creating per-buffer events; see [`cuda_device`].
#[cfg(feature = "cuda")]
fn keep_freed_memory(d: &candle_core::CudaDevice) -> anyhow::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ctx = d.cuda_stream().context().clone();
    ctx.bind_to_thread()?;
    if ctx.has_async_alloc() {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold: u64 = u64::MAX;
        // SAFETY: `pool` is written by the driver; the attribute takes a u64, passed by pointer.
        unsafe {
            sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()).result()?;
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .result()?;
        }
    }
    // SAFETY: candle issues all work of this device on its one stream, so the events that
    // order buffers between streams are never waited on (cudarc only uses them once a second
    // stream is created, which the crate never does).
    unsafe { d.disable_event_tracking() };
    Ok(())
}

/// Parse a dtype name: f32, bf16 or f16.
pub fn dtype(name: &str) -> anyhow::Result<candle_core::DType> {
    match name {
        "f32" | "float32" => Ok(candle_core::DType::F32),
        "bf16" | "bfloat16" => Ok(candle_core::DType::BF16),
        "f16" | "float16" => Ok(candle_core::DType::F16),
        s => anyhow::bail!("unknown dtype {s:?}: expected f32, bf16 or f16"),
    }
}

/// The variables of a `VarMap`, sorted by name (a stable order for initialisation and
/// optimizer state).
pub fn sorted_vars(varmap: &candle_nn::VarMap) -> Vec<(String, candle_core::Var)> {
    let data = varmap.data().lock().unwrap();
    let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Compile every CUDA kernel of the crate with NVRTC (no GPU or driver needed): the module
/// names and the size of their PTX, or the first compiler error. `bench/build-gpu.sh` runs it
/// (`overopt-gpu-bench --nvrtc-check`) so that a kernel that does not compile is found when the
/// binary is built, not on a lent GPU.
#[cfg(feature = "cuda")]
pub fn compile_cuda_kernels() -> anyhow::Result<Vec<(&'static str, usize)>> {
    [
        model::recompute::GELU_SOURCE,
        model::layer_norm_grad::SOURCE,
        model::attention_softmax::SOURCE,
        model::bias_add::SOURCE,
        model::qkv_heads::SOURCE,
        train::rmsprop_fused::SOURCE,
    ]
    .iter()
    .map(|s| Ok((s.module, model::nvrtc::compile(s)?.len())))
    .collect()
}
