//! P3 GPU benchmark: one DPO optimizer step of a randomly initialised Pythia-shaped GPT-NeoX.
//!
//! A step is what `overopt daa` does per optimizer step with cached reference log-probs and
//! one micro-batch: the policy's forward and backward pass over chosen and rejected (one
//! concatenated batch of 2 x batch sequences of `seq` tokens), the DPO loss of
//! `overopt::train::loss`, global grad-norm clipping and an RMSProp update
//! (`overopt::train::optim`). Master weights, gradients and optimizer state are f32; with
//! `--autocast bf16` (the default) the matmuls run in bf16.
//!
//! Prints one `RESULT key=value ...` line at the end (parsed by `bench/gpu.sh`) and exits
//! with status 0 on success, 2 when the step failed (e.g. out of memory), 1 on a usage error
//! or when no CUDA device is available.
//!
//! Weights are initialised without device random numbers (a seeded normal block made on the
//! CPU, tiled over each tensor): the benchmark does not need curand at run time.

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, Optimizer, VarBuilder, VarMap};
use clap::Parser;
use overopt::data::PrefExample;
use overopt::model::{GptNeoX, GptNeoXConfig, OpPath, profile};
use overopt::train::SpecialTokens;
use overopt::train::daa::{DaaConfig, ReferenceSource, daa_micro};
use overopt::train::loss::Objective;
use overopt::train::optim::{RmsProp, RmsPropConfig};
use rand::{Rng, SeedableRng};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "DPO optimizer-step benchmark on a random Pythia-shaped GPT-NeoX")]
struct Args {
    /// Model shape: tiny (for CPU tests), 1b, 1.4b, 2.8b, 6.9b.
    #[arg(long, default_value = "1b")]
    shape: String,
    /// Preference pairs per step (the policy sees 2 x batch sequences).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens per sequence (prompt half, response half incl. EOS).
    #[arg(long, default_value_t = 512)]
    seq: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Matmul dtype: bf16 (autocast, f32 master weights) or off (all f32).
    #[arg(long, default_value = "bf16")]
    autocast: String,
    /// Run on the CPU (for tests; the MFU then means nothing).
    #[arg(long)]
    cpu: bool,
    /// Instead of the training step, time its components one by one at the step's shapes
    /// (a bf16 matmul, the linear layers and the MLP with their backward passes, the attention,
    /// layer norm, the head with the label log-probs, an elementwise add): where the step's
    /// time goes. `--steps` repetitions each, after one untimed.
    #[arg(long)]
    components: bool,
    /// Instead of timing, check the step's values: one forward and backward pass of the DPO
    /// loss on ragged batches (padding, prompts of several lengths) on this device, on every
    /// training op path, with and without checkpointing, in f32 and with bf16 autocast, each
    /// against the same step on the CPU in f32 with basic ops only (the path the HF parity
    /// tests pin). Prints `PARITY ...` lines and exits 2 when a difference exceeds its
    /// tolerance. Use a small shape (`--shape tiny`).
    #[arg(long)]
    parity: bool,
    /// Only compile the crate's own CUDA kernels with NVRTC (no GPU needed) and report each
    /// module; exits 2 when one does not compile. Needs a build with `--features cuda`.
    #[arg(long)]
    nvrtc_check: bool,
    /// Shorthand for `--cpu --shape tiny --batch 2 --seq 32 --warmup 1 --steps 2`.
    #[arg(long)]
    tiny: bool,
    /// On the CPU, also print the sizes of each phase's buffers of at least 64 KiB, largest
    /// total first (which tensors the step writes most).
    #[arg(long)]
    buffer_sizes: bool,
    /// Also time named sections of the timed steps (`overopt::model::profile`: layer norms,
    /// linear layers, attention, ... of the layer nodes, the head, the log-probs, the
    /// optimizer), each between two device synchronisations, and print one `PROFILE` line per
    /// section: its own time per step (nested sections excluded) and its share of the profiled
    /// step. The synchronisations slow the step: its RESULT line carries `profile=1` and is
    /// not a P3 measurement.
    #[arg(long)]
    profile: bool,
    /// Fewer (or more) layers than the shape has, e.g. to measure one layer's memory on the CPU.
    #[arg(long)]
    layers: Option<usize>,
    /// Another vocabulary size than the shape's (e.g. to leave the head out of a CPU measurement).
    #[arg(long)]
    vocab: Option<usize>,
    /// Op path of the training graph: differentiable (the default: on CUDA and under autocast
    /// each layer one node with a hand-written backward pass, the head's recomputing layer norm
    /// and log-probs), layer (layer nodes on any device and dtype), recompute (one node per
    /// recomputing op: attention, layer norm, linear layers, ...), or composite (basic ops
    /// only, every intermediate kept), for A/B runs.
    #[arg(long, default_value = "differentiable")]
    op_path: String,
    /// Activation checkpointing per layer (each layer's forward pass runs again in the backward
    /// pass; the graph keeps one residual stream per layer).
    #[arg(long)]
    checkpoint: bool,
    /// What the CUDA device does with freed memory: keep (the crate's default: the memory pool
    /// keeps it for the next allocations, no per-buffer events) or default (the driver's
    /// defaults: freed memory goes back to the device at every synchronisation), for an A/B.
    #[arg(long, default_value = "keep")]
    cuda_alloc: String,
    /// Peak dense bf16 throughput of the accelerator in TFLOP/s (H200 SXM: 989).
    #[arg(long, default_value_t = 989.0)]
    peak_tflops: f64,
}

/// Pythia shapes (hidden, layers, heads, intermediate, vocab).
fn shape(name: &str) -> Result<(usize, usize, usize, usize, usize)> {
    Ok(match name {
        "tiny" => (64, 2, 4, 256, 512),
        "1b" => (2048, 16, 8, 8192, 50304),
        "1.4b" => (2048, 24, 16, 8192, 50304),
        "2.8b" => (2560, 32, 32, 10240, 50304),
        "6.9b" => (4096, 32, 32, 16384, 50432),
        s => bail!("unknown --shape {s:?}: expected tiny, 1b, 1.4b, 2.8b or 6.9b"),
    })
}

fn config(name: &str, layers: Option<usize>, vocab: Option<usize>) -> Result<GptNeoXConfig> {
    let (h, l, nh, inter, v) = shape(name)?;
    let (l, vocab) = (layers.unwrap_or(l), vocab.unwrap_or(v));
    let text = format!(
        r#"{{"model_type":"gpt_neox","vocab_size":{vocab},"hidden_size":{h},
        "num_hidden_layers":{l},"num_attention_heads":{nh},"intermediate_size":{inter},
        "max_position_embeddings":2048,"rotary_pct":0.25,"rotary_emb_base":10000,
        "layer_norm_eps":1e-5,"use_parallel_residual":true,"hidden_act":"gelu",
        "bos_token_id":0,"eos_token_id":0,"initializer_range":0.02}}"#
    );
    GptNeoXConfig::from_json_str(&text, name)
}

/// A VarMap-backed builder that initialises on the device without device RNG: `Randn` draws
/// from a seeded standard-normal block (made on the CPU, uploaded once), tiled over the
/// tensor from a per-name offset.
struct TiledInit {
    map: VarMap,
    block: Tensor,
    tile: usize,
}

impl TiledInit {
    const TILE: usize = 1 << 20;
    const SLACK: usize = 1 << 12;

    fn new(dev: &Device, seed: u64) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = rand_distr::StandardNormal;
        let v: Vec<f32> = (0..Self::TILE + Self::SLACK)
            .map(|_| rng.sample::<f32, _>(normal))
            .collect();
        let n = v.len();
        Ok(Self {
            map: VarMap::new(),
            block: Tensor::from_vec(v, n, dev)?,
            tile: Self::TILE,
        })
    }

    fn normal(&self, shape: &Shape, name: &str) -> candle_core::Result<Tensor> {
        let n = shape.elem_count();
        let off = name
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
            % Self::SLACK;
        let t = if n <= self.tile {
            self.block.narrow(0, off, n)?
        } else {
            let reps = n.div_ceil(self.tile);
            self.block
                .narrow(0, off, self.tile)?
                .unsqueeze(0)?
                .broadcast_as((reps, self.tile))?
                .contiguous()?
                .flatten_all()?
                .narrow(0, 0, n)?
        };
        t.reshape(shape)
    }
}

impl SimpleBackend for TiledInit {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(v) = self.map.data().lock().unwrap().get(name) {
            return Ok(v.as_tensor().clone());
        }
        let t = match h {
            Init::Const(c) => (Tensor::ones(&s, DType::F32, dev)? * c)?,
            Init::Randn { mean, stdev } => ((self.normal(&s, name)? * stdev)? + mean)?,
            other => candle_core::bail!("{name}: unsupported init {other:?}"),
        };
        let var = Var::from_tensor(&t.to_dtype(dtype)?)?;
        self.map
            .data()
            .lock()
            .unwrap()
            .insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: get_unchecked is not supported")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.data().lock().unwrap().contains_key(name)
    }
}

/// The process's heap in use and its peak, counted by the global allocator: on the CPU the
/// memory of tensors exactly (candle's CPU storage is heap vectors), whatever the machine.
/// It also counts the buffers of at least [`BIG`] bytes and their bytes: on the CPU nearly
/// every one is the output of one tensor op, so per step they stand for the kernels a device
/// would launch and the memory they would write (a stand-in a CPU run can measure).
struct CountingAlloc {
    now: AtomicUsize,
    peak: AtomicUsize,
    big_count: AtomicUsize,
    big_bytes: AtomicUsize,
}

/// The least size of a buffer counted by [`CountingAlloc`]'s buffer counters: the tensors of
/// the benchmark's shapes, not the small vectors of candle's bookkeeping.
const BIG: usize = 64 << 10;

/// The sizes of the last buffers of at least [`BIG`] bytes, the i-th counted one at i modulo
/// the length (for `--buffer-sizes`; the allocator itself must not allocate).
static SIZES: [AtomicUsize; 1 << 14] = [const { AtomicUsize::new(0) }; 1 << 14];

/// `--buffer-sizes`: the buffers counted between two readings of [`CountingAlloc::buffers`]
/// (`from`, `to`), by size, largest total first: "34 x 6.28 MB, ..." (the `top` largest).
fn size_histogram(from: usize, to: usize, top: usize) -> String {
    let span = (to - from).min(SIZES.len());
    let mut by_size = std::collections::BTreeMap::new();
    for i in to - span..to {
        *by_size
            .entry(SIZES[i % SIZES.len()].load(Ordering::Relaxed))
            .or_insert(0usize) += 1;
    }
    let mut v: Vec<(usize, usize)> = by_size.into_iter().collect();
    v.sort_by_key(|&(size, n)| std::cmp::Reverse(size * n));
    let mut out: Vec<String> = v
        .iter()
        .take(top)
        .map(|(size, n)| format!("{n} x {:.2} MB", *size as f64 / 1e6))
        .collect();
    if v.len() > top {
        out.push(format!("{} other sizes", v.len() - top));
    }
    if span < to - from {
        out.push(format!("(the last {span} of {} only)", to - from));
    }
    out.join(", ")
}

#[global_allocator]
static HEAP: CountingAlloc = CountingAlloc {
    now: AtomicUsize::new(0),
    peak: AtomicUsize::new(0),
    big_count: AtomicUsize::new(0),
    big_bytes: AtomicUsize::new(0),
};

impl CountingAlloc {
    fn add(&self, n: usize) {
        let now = self.now.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
        if n >= BIG {
            let i = self.big_count.fetch_add(1, Ordering::Relaxed);
            SIZES[i % SIZES.len()].store(n, Ordering::Relaxed);
            self.big_bytes.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// (buffers of at least [`BIG`] bytes, their bytes) allocated so far.
    fn buffers(&self) -> (usize, usize) {
        (
            self.big_count.load(Ordering::Relaxed),
            self.big_bytes.load(Ordering::Relaxed),
        )
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters only
// observe the sizes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            self.add(l.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            self.add(l.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        self.now.fetch_sub(l.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            self.now.fetch_sub(l.size(), Ordering::Relaxed);
            self.add(new);
        }
        q
    }
}

/// Memory in use, in bytes: on a CUDA device the device's (total - free), on the CPU the
/// process's heap.
#[allow(unused_variables)]
fn mem_used(dev: &Device) -> Option<usize> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        return d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| total - free);
    }
    dev.is_cpu().then(|| HEAP.now.load(Ordering::Relaxed))
}

/// The peak of [`mem_used`]: sampled between phases on a CUDA device, every allocation counted
/// on the CPU.
struct Peak(usize);

impl Peak {
    fn sample(&mut self, dev: &Device) {
        if let Some(u) = mem_used(dev) {
            self.0 = self.0.max(u);
        }
        if dev.is_cpu() {
            self.0 = self.0.max(HEAP.peak.load(Ordering::Relaxed));
        }
    }
}

fn device(cpu: bool, alloc: &str) -> Result<Device> {
    let alloc = overopt::CudaAlloc::parse(alloc)?;
    if cpu {
        return Ok(Device::Cpu);
    }
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "no CUDA: this binary was built without `--features cuda`; rebuild with \
             `cargo build --release --features cuda --bin overopt-gpu-bench` or pass --cpu"
        );
    }
    overopt::cuda_device(0, alloc).context(
        "no usable CUDA device 0 (is the driver loaded and are libcudart/libcublas/libnvrtc on \
         LD_LIBRARY_PATH?)",
    )
}

/// The device's name in the benchmark's output (it uses CUDA device 0).
fn dev_name(dev: &Device) -> &'static str {
    if dev.is_cpu() { "cpu" } else { "cuda:0" }
}

fn run(a: &Args) -> Result<()> {
    if a.nvrtc_check {
        return nvrtc_check();
    }
    let dev = device(a.cpu, &a.cuda_alloc)?;
    let cfg = config(&a.shape, a.layers, a.vocab)?;
    let op_path = OpPath::parse(&a.op_path)?;
    if op_path == OpPath::Fused {
        bail!(
            "unknown op path for training \"fused\": its kernels have no backward pass; \
             expected differentiable, recompute or composite"
        );
    }
    let compute = match a.autocast.as_str() {
        "bf16" => DType::BF16,
        "off" | "f32" => DType::F32,
        s => bail!("unknown --autocast {s:?}: expected bf16 or off"),
    };
    if a.seq < 4 || a.seq > cfg.max_position_embeddings {
        bail!("--seq must be in 4..={}", cfg.max_position_embeddings);
    }
    if a.components {
        return components(a, &dev, &cfg, compute);
    }
    if a.parity {
        return parity(a, &dev, &cfg);
    }
    let mut peak = Peak(0);
    let base = mem_used(&dev).unwrap_or(0);
    let t_init = Instant::now();
    let (model, map) = new_model(&cfg, &dev, compute, op_path, a.checkpoint)?;
    let vars: Vec<Var> = overopt::sorted_vars(&map)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let n_params: usize = vars.iter().map(|v| v.elem_count()).sum();
    let n_embed_in = cfg.vocab_size * cfg.hidden_size;
    let mut opt = RmsProp::new(
        vars,
        RmsPropConfig {
            lr: 1e-6,
            warmup_steps: 0,
            ..RmsPropConfig::default()
        },
    )?;
    dev.synchronize()?;
    peak.sample(&dev);
    let init_s = t_init.elapsed().as_secs_f64();

    let (data, refs) = batch_data(&cfg, a.batch, a.seq, false);
    let tokens_per_step = 2 * a.batch * a.seq;
    // FLOPs of a training step: 6 N T for the matmuls with parameters (N excludes the input
    // embedding, a lookup) plus 12 L d s T for attention scores and values (fwd + bwd, the full
    // s x s square as computed, no causal saving).
    let n_matmul = n_params - n_embed_in;
    let flops_6nt = 6.0 * n_matmul as f64 * tokens_per_step as f64;
    let flops_attn = 12.0
        * cfg.num_hidden_layers as f64
        * cfg.hidden_size as f64
        * a.seq as f64
        * tokens_per_step as f64;
    println!(
        "overopt-gpu-bench: shape {} ({} layers, {} params, {} excl. input embedding), op path {:?}{}, device {}{}, autocast {:?}, batch {} pairs x seq {} = {} tokens/step",
        a.shape,
        cfg.num_hidden_layers,
        n_params,
        n_matmul,
        op_path,
        if a.checkpoint {
            " with checkpointing"
        } else {
            ""
        },
        dev_name(&dev),
        if a.cpu {
            String::new()
        } else {
            format!(" (freed memory: {})", a.cuda_alloc)
        },
        compute,
        a.batch,
        a.seq,
        tokens_per_step
    );
    println!("init {init_s:.2}s");
    profile::set_enabled(a.profile);
    if dev.is_cpu() {
        profile::set_counter(|| {
            let (buffers, bytes) = HEAP.buffers();
            profile::Allocated {
                buffers: buffers as u64,
                bytes: bytes as u64,
            }
        });
    }

    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    let total = a.warmup + a.steps;
    let (mut t_fwd, mut t_bwd, mut t_opt, mut t_step) = (0.0, 0.0, 0.0, 0.0);
    let mut last_loss = f64::NAN;
    let mut graph_bytes = 0usize;
    // Buffers allocated per phase (forward, backward, optimizer) in the last step: counted on
    // the CPU only (see `CountingAlloc`).
    let mut buffers = [(0usize, 0usize); 3];
    for s in 0..total {
        dev.synchronize()?;
        let before = mem_used(&dev);
        let b0 = HEAP.buffers();
        let t0 = Instant::now();
        let loss = profile::section("fwd.other", &dev, || dpo_loss(&model, &data, &refs))?;
        dev.synchronize()?;
        peak.sample(&dev);
        let t1 = Instant::now();
        let b1 = HEAP.buffers();
        // What the forward pass left allocated: the activations the graph keeps for backward.
        // The least over the steps after the first (when there are any): the first step also
        // makes one-off allocations (thread pools' and matmul kernels' buffers).
        if let (Some(b), Some(a)) = (before, mem_used(&dev)) {
            let kept = a.saturating_sub(b);
            graph_bytes = if s <= 1 { kept } else { graph_bytes.min(kept) };
        }
        let grads = profile::section("bwd.other", &dev, || model.backward(&loss))?;
        dev.synchronize()?;
        peak.sample(&dev);
        let t2 = Instant::now();
        let b2 = HEAP.buffers();
        let info = profile::section("optim.other", &dev, || {
            let g = opt.grads_of(&grads);
            drop(grads);
            opt.step_with(&g)
        })?;
        dev.synchronize()?;
        peak.sample(&dev);
        let t3 = Instant::now();
        let b3 = HEAP.buffers();
        for (i, (x, y)) in [(b0, b1), (b1, b2), (b2, b3)].into_iter().enumerate() {
            buffers[i] = (y.0 - x.0, y.1 - x.1);
            if a.buffer_sizes && dev.is_cpu() {
                let phase = ["fwd", "bwd", "optim"][i];
                println!("  buffer sizes ({phase}): {}", size_histogram(x.0, y.0, 16));
            }
        }
        last_loss = loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        let step_s = (t3 - t0).as_secs_f64();
        println!(
            "{} step {}: {:.3}s (fwd {:.3}s, bwd {:.3}s, optim {:.3}s) loss {:.4} grad_norm {:.3}",
            if s < a.warmup { "warmup" } else { "timed" },
            s + 1,
            step_s,
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
            last_loss,
            info.grad_norm
        );
        if dev.is_cpu() {
            let [f, b, o] = buffers.map(|(n, bytes)| format!("{n} ({:.3} GiB)", gib(bytes)));
            println!(
                "  buffers of >= {} KiB allocated: fwd {f}, bwd {b}, optim {o}",
                BIG >> 10
            );
        }
        if !last_loss.is_finite() || !info.grad_norm.is_finite() {
            bail!(
                "non-finite loss {last_loss} or grad norm {}",
                info.grad_norm
            );
        }
        if s + 1 == a.warmup {
            profile::take(); // the warm-up steps' sections
        }
        if s >= a.warmup {
            t_fwd += (t1 - t0).as_secs_f64();
            t_bwd += (t2 - t1).as_secs_f64();
            t_opt += (t3 - t2).as_secs_f64();
            t_step += step_s;
        }
    }
    let n = a.steps.max(1) as f64;
    let step_s = if a.steps == 0 { f64::NAN } else { t_step / n };
    if a.profile {
        print_profile(&profile::take(), n, step_s, dev.is_cpu());
    }
    let ex_s = a.batch as f64 / step_s;
    let tflops = flops_6nt / step_s / 1e12;
    let mfu = tflops / a.peak_tflops;
    let mfu_attn = (flops_6nt + flops_attn) / step_s / 1e12 / a.peak_tflops;
    let peak_gib = if peak.0 > 0 {
        format!("{:.2}", peak.0 as f64 / (1u64 << 30) as f64)
    } else {
        "na".to_string()
    };
    println!(
        "mean of {} timed steps: {:.3}s/step (fwd {:.3}, bwd {:.3}, optim {:.3}), {:.2} examples/s, {:.0} tokens/s",
        a.steps,
        step_s,
        t_fwd / n,
        t_bwd / n,
        t_opt / n,
        ex_s,
        tokens_per_step as f64 / step_s
    );
    println!(
        "FLOPs/step = 6*N*T = 6 * {n_matmul} * {tokens_per_step} = {:.3e} (+ attention 12*L*d*s*T = {:.3e}); {:.1} TFLOP/s; MFU {:.4} of {} TFLOP/s ({:.4} incl. attention)",
        flops_6nt, flops_attn, tflops, mfu, a.peak_tflops, mfu_attn
    );
    println!(
        "{} memory in use: peak {} GiB (before the model: {:.2} GiB); kept by the graph after the forward pass: {:.3} GiB",
        if a.cpu { "heap" } else { "device" },
        peak_gib,
        gib(base),
        gib(graph_bytes)
    );
    println!(
        "RESULT impl=overopt shape={} ok=1 batch={} seq={} step_s={:.4} examples_per_s={:.3} tflops={:.2} mfu={:.4} mfu_attn={:.4} peak_mem_gib={} graph_gib={:.6} buffers={} buffer_gib={} loss={:.4} op_path={} checkpoint={} cuda_alloc={} profile={}",
        a.shape,
        a.batch,
        a.seq,
        step_s,
        ex_s,
        tflops,
        mfu,
        mfu_attn,
        peak_gib,
        gib(graph_bytes),
        if dev.is_cpu() {
            buffers.iter().map(|b| b.0).sum::<usize>().to_string()
        } else {
            "na".into()
        },
        if dev.is_cpu() {
            format!("{:.4}", gib(buffers.iter().map(|b| b.1).sum()))
        } else {
            "na".into()
        },
        last_loss,
        a.op_path,
        u8::from(a.checkpoint),
        a.cuda_alloc,
        u8::from(a.profile)
    );
    Ok(())
}

/// `--profile`'s table: per phase (forward, backward, optimizer), its sections by time, then
/// each phase's and the whole step's total. `steps`: the timed steps the sections ran in.
/// On the CPU (`counted`) also each section's buffers of at least [`BIG`] bytes and their MiB.
fn print_profile(sections: &[profile::Section], steps: f64, step_s: f64, counted: bool) {
    let ms = |t: std::time::Duration| t.as_secs_f64() * 1e3 / steps;
    let total: f64 = sections.iter().map(|s| ms(s.time)).sum();
    println!(
        "profile of the timed steps: each section's own time per step (sections nested in it \
         excluded), timed between device synchronisations{}; `*.other` is what its phase ran \
         outside the named sections (on the default path: candle's graph of the embedding, \
         the head's matmul and the loss, and its gradient bookkeeping)",
        if counted {
            ", and the buffers of at least 64 KiB it allocated (MiB)"
        } else {
            ""
        }
    );
    let line = |name: &str, t: f64, calls: f64, alloc: (u64, u64)| {
        let buffers = if counted {
            format!(
                " buffers={:.0} buffer_mib={:.1}",
                alloc.0 as f64 / steps,
                alloc.1 as f64 / steps / (1u64 << 20) as f64
            )
        } else {
            String::new()
        };
        println!(
            "PROFILE impl=overopt name={name} ms_per_step={t:.3} calls_per_step={calls:.0} share={:.4}{buffers}",
            t / total.max(f64::MIN_POSITIVE)
        )
    };
    let sum = |of: &[&profile::Section]| {
        of.iter().fold((0.0, (0, 0)), |(t, (n, b)), s| {
            (
                t + ms(s.time),
                (n + s.allocated.buffers, b + s.allocated.bytes),
            )
        })
    };
    for phase in ["fwd", "bwd", "optim"] {
        let mut of_phase: Vec<_> = sections
            .iter()
            .filter(|s| s.name.split('.').next() == Some(phase))
            .collect();
        of_phase.sort_by_key(|s| std::cmp::Reverse(s.time));
        for s in &of_phase {
            let alloc = (s.allocated.buffers, s.allocated.bytes);
            line(s.name, ms(s.time), s.calls as f64 / steps, alloc);
        }
        let (t, alloc) = sum(&of_phase);
        line(&format!("{phase}_total"), t, 0.0, alloc);
    }
    let (_, alloc) = sum(&sections.iter().collect::<Vec<_>>());
    line("step_total", total, 0.0, alloc);
    println!(
        "profiled step {:.1} ms; the sections add up to {total:.1} ms",
        step_s * 1e3
    );
}

/// `--nvrtc-check`: compile the crate's CUDA kernels, one `NVRTC module=... ptx_bytes=...` line
/// each.
fn nvrtc_check() -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        for (module, bytes) in overopt::compile_cuda_kernels()? {
            println!("NVRTC module={module} ptx_bytes={bytes} ok=1");
        }
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    bail!("--nvrtc-check: this binary was built without `--features cuda`")
}

/// Special tokens of the benchmark's random data.
const TOKENS: SpecialTokens = SpecialTokens { eos: 0, pad: 1 };

/// DPO with beta 0.1, reference log-probs cached (as `overopt daa` runs it).
fn daa_config() -> DaaConfig {
    DaaConfig {
        objective: Objective::Dpo {
            label_smoothing: 0.0,
        },
        beta: 0.1,
        online_reference: false,
        reference_cache: None,
    }
}

/// The DPO loss of the whole batch `data` with the cached reference log-probs `refs`: the
/// forward pass of a step, as `overopt daa` runs it for one micro-batch.
fn dpo_loss(model: &GptNeoX, data: &[PrefExample], refs: &[(f32, f32)]) -> Result<Tensor> {
    let idx: Vec<usize> = (0..data.len()).collect();
    let out = daa_micro(
        model,
        data,
        &idx,
        TOKENS,
        &daa_config(),
        ReferenceSource::Cached(refs),
    )?;
    Ok(out.loss)
}

/// A randomly initialised model of `cfg` on `dev` with f32 master weights ([`TiledInit`]:
/// the same values on every device) and its variables.
fn new_model(
    cfg: &GptNeoXConfig,
    dev: &Device,
    compute: DType,
    op_path: OpPath,
    checkpoint: bool,
) -> Result<(GptNeoX, VarMap)> {
    let init = TiledInit::new(dev, 1)?;
    let map = init.map.clone();
    let vb = VarBuilder::from_backend(Box::new(init), DType::F32, dev.clone());
    let model = GptNeoX::new(cfg, vb)?
        .with_compute_dtype(compute)
        .with_op_path(op_path)
        .with_checkpointing(checkpoint);
    Ok((model, map))
}

/// `batch` preference pairs of random tokens and their (constant) reference log-probs, which
/// `overopt daa` precomputes. Not `ragged`: prompts of seq/2 tokens and responses filling the
/// rest with EOS appended, so every sequence is exactly `seq` tokens (no padding). `ragged`:
/// pair i's prompt and responses are shorter by a few tokens each, different per pair and
/// between chosen and rejected, so that the batch is padded.
fn batch_data(
    cfg: &GptNeoXConfig,
    batch: usize,
    seq: usize,
    ragged: bool,
) -> (Vec<PrefExample>, Vec<(f32, f32)>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let vocab = cfg.vocab_size as u32;
    let mut toks = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(2..vocab)).collect() };
    let pl = seq / 2;
    let rl = seq - pl - 1;
    let cut = |i: usize, k: usize, n: usize| if ragged { n - (i * k) % (n / 2) } else { n };
    let data = (0..batch)
        .map(|i| PrefExample {
            prompt: toks(cut(i, 3, pl)),
            chosen: toks(cut(i, 5, rl)),
            rejected: toks(cut(i, 2, rl)),
        })
        .collect();
    let refs = (0..batch).map(|i| (-2000.0 - i as f32, -2001.0)).collect();
    (data, refs)
}

/// `--parity`: see [`Args::parity`].
fn parity(a: &Args, dev: &Device, cfg: &GptNeoXConfig) -> Result<()> {
    let (data, refs) = batch_data(cfg, a.batch, a.seq, true);
    // The loss and every parameter's gradient (f32, on the CPU) of one step.
    let step = |dev: &Device, compute, path, ckpt| -> Result<(f64, Vec<(String, Tensor)>)> {
        let (model, map) = new_model(cfg, dev, compute, path, ckpt)?;
        let loss_t = dpo_loss(&model, &data, &refs)?;
        let grads = model.backward(&loss_t)?;
        let loss = loss_t.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        let grads = overopt::sorted_vars(&map)
            .into_iter()
            .map(|(name, v)| {
                let g = grads
                    .get(v.as_tensor())
                    .with_context(|| format!("{name}: no gradient"))?;
                Ok((name, g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((loss, grads))
    };
    let (loss_ref, g_ref) = step(&Device::Cpu, DType::F32, OpPath::Composite, false)?;
    let name = dev_name(dev);
    let mut failed = Vec::new();
    let mut worst = 0f64;
    // bf16 keeps 8 significant bits (a relative rounding of 2^-9 per op); a few dozen ops deep,
    // differences of a few 1e-3 of a gradient's largest entry are rounding, 5e-2 is not.
    for (compute, tol) in [(DType::F32, 1e-4), (DType::BF16, 5e-2)] {
        for (path, ckpt) in [
            (OpPath::Differentiable, false),
            (OpPath::Recompute, false),
            (OpPath::Layer, false),
            (OpPath::Composite, false),
            (OpPath::Differentiable, true),
        ] {
            let (loss, grads) = step(dev, compute, path, ckpt)?;
            // Per parameter, the largest difference relative to the largest reference entry.
            let (mut grad_rel, mut at) = (0f64, String::new());
            for ((n, g), (_, r)) in grads.iter().zip(&g_ref) {
                let d = rel_diff(g, r)?;
                if d.is_nan() || d > grad_rel {
                    (grad_rel, at) = (d, n.clone());
                }
            }
            let loss_rel = (loss - loss_ref).abs() / loss_ref.abs().max(1e-30);
            let ok = loss_rel <= tol && grad_rel <= tol;
            worst = worst.max(grad_rel.max(loss_rel) / tol);
            let label = format!(
                "autocast={} op_path={} checkpoint={}",
                if compute == DType::F32 { "off" } else { "bf16" },
                format!("{path:?}").to_lowercase(),
                u8::from(ckpt)
            );
            println!(
                "PARITY device={name} {label} loss={loss:.6} loss_ref={loss_ref:.6} loss_rel={loss_rel:.2e} grad_rel={grad_rel:.2e} worst_param={at} tol={tol:.0e} ok={}",
                u8::from(ok)
            );
            if !ok {
                failed.push(label);
            }
        }
    }
    // The optimizer: two RMSProp updates (clipping on) of the same parameters by the same
    // gradients on this device (on CUDA the fused kernels) and on the CPU.
    let tol = 1e-5;
    let (param_rel, state_rel) = rmsprop_parity(dev, &g_ref)?;
    let ok = param_rel <= tol && state_rel <= tol;
    worst = worst.max(param_rel.max(state_rel) / tol);
    println!(
        "PARITY device={name} check=rmsprop steps=2 param_rel={param_rel:.2e} state_rel={state_rel:.2e} tol={tol:.0e} ok={}",
        u8::from(ok)
    );
    if !ok {
        failed.push("rmsprop update".into());
    }
    println!(
        "RESULT impl=overopt-parity shape={} ok={} device={name} worst_over_tol={worst:.3}",
        a.shape,
        u8::from(failed.is_empty())
    );
    if !failed.is_empty() {
        bail!(
            "parity: {} of 9 checks differ from the CPU f32 reference beyond tolerance: {}",
            failed.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

/// The largest difference of `x` from the reference `r` over the largest entry of `r` (f32,
/// on the CPU).
fn rel_diff(x: &Tensor, r: &Tensor) -> Result<f64> {
    let scale = r.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    Ok((x - r)?.abs()?.max_all()?.to_scalar::<f32>()? as f64 / scale.max(1e-30))
}

/// Two RMSProp steps with clipping from parameters shaped like `shapes` (values and gradients
/// drawn on the CPU) on `dev` and on the CPU: the largest difference of the parameters, and
/// of the squared averages, each over the largest CPU entry.
fn rmsprop_parity(dev: &Device, shapes: &[(String, Tensor)]) -> Result<(f64, f64)> {
    let draw = |std: f32| -> Result<Vec<Tensor>> {
        shapes
            .iter()
            .map(|(_, t)| Ok(Tensor::randn(0f32, std, t.dims(), &Device::Cpu)?))
            .collect()
    };
    let (p0, grads) = (draw(0.02)?, draw(1.0)?);
    let run = |d: &Device| -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let vars = p0
            .iter()
            .map(|p| Ok(Var::from_tensor(&p.to_device(d)?)?))
            .collect::<Result<Vec<_>>>()?;
        let g = grads
            .iter()
            .map(|g| Ok(Some(g.to_device(d)?)))
            .collect::<Result<Vec<_>>>()?;
        let cfg = RmsPropConfig {
            lr: 1e-3,
            warmup_steps: 0,
            max_grad_norm: Some(1.0),
            ..RmsPropConfig::default()
        };
        let mut opt = RmsProp::new(vars.clone(), cfg)?;
        for _ in 0..2 {
            opt.step_with(&g)?;
        }
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
        let params = vars
            .iter()
            .map(|v| cpu(v.as_tensor()))
            .collect::<candle_core::Result<_>>()?;
        let (state, _) = opt.state();
        let state = (0..vars.len())
            .map(|i| cpu(&state[&format!("square_avg.{i}")]))
            .collect::<candle_core::Result<_>>()?;
        Ok((params, state))
    };
    let ((p_dev, s_dev), (p_cpu, s_cpu)) = (run(dev)?, run(&Device::Cpu)?);
    let rel = |a: &[Tensor], b: &[Tensor]| -> Result<f64> {
        let mut worst = 0f64;
        for (x, y) in a.iter().zip(b) {
            let d = rel_diff(x, y)?;
            if d.is_nan() || d > worst {
                worst = d;
            }
        }
        Ok(worst)
    };
    Ok((rel(&p_dev, &p_cpu)?, rel(&s_dev, &s_cpu)?))
}

/// Seconds per call of `f` (device synchronised), over `reps` calls after one untimed, and
/// the buffers of at least [`BIG`] bytes (count, bytes) that the untimed call allocated (on
/// the CPU; see `CountingAlloc`).
fn time_per_call(
    dev: &Device,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, (usize, usize))> {
    let before = HEAP.buffers();
    f()?;
    dev.synchronize()?;
    let after = HEAP.buffers();
    let buffers = (after.0 - before.0, after.1 - before.1);
    let t = Instant::now();
    for _ in 0..reps.max(1) {
        f()?;
    }
    dev.synchronize()?;
    Ok((t.elapsed().as_secs_f64() / reps.max(1) as f64, buffers))
}

/// `--components`: the parts of a training step timed one by one at the step's shapes. Token
/// rows T as in the shared-prefix step (batch prompts of seq/2 tokens and 2 x batch responses
/// of seq/2), the attention of the responses (2 x batch rows, seq/2 queries over seq keys), the
/// head over the response tokens. Each line: `COMPONENT name=... ms=... tflops=... gbps=...`
/// (model FLOPs of the forward and backward matmuls; bytes of the tensors read and written
/// once, for the memory-bound parts).
fn components(a: &Args, dev: &Device, cfg: &GptNeoXConfig, cd: DType) -> Result<()> {
    use overopt::model::recompute;
    let (h, inter, nh, vocab) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.vocab_size,
    );
    let hs = h / nh;
    let (q_len, k_len) = (a.seq / 2, a.seq);
    let rows = 2 * a.batch;
    let t = a.batch * q_len + rows * q_len;
    let t_resp = rows * q_len;
    let f32v = |shape: &[usize]| -> Result<Var> {
        Ok(Var::from_tensor(
            &(Tensor::randn(0f32, 1.0, shape, &Device::Cpu)? * 0.02)?.to_device(dev)?,
        )?)
    };
    let reps = a.steps.max(1);
    println!(
        "overopt-gpu-bench --components: shape {} (hidden {h}, MLP {inter}, {nh} heads, vocab {vocab}), T = {t} token rows, attention {rows} x {nh} heads x {q_len} queries x {k_len} keys, compute {cd:?}, device {}, {reps} reps each",
        a.shape,
        dev_name(dev)
    );
    // On the CPU also the buffers one call allocates (forward and backward).
    let report = |name: &str, (s, (n, b)): (f64, (usize, usize)), flops: f64, bytes: f64| {
        let buffers = if dev.is_cpu() {
            format!(
                " buffers={n} buffer_mib={:.1}",
                b as f64 / (1u64 << 20) as f64
            )
        } else {
            String::new()
        };
        println!(
            "COMPONENT impl=overopt name={name} ms={:.3} tflops={:.2} gbps={:.1}{buffers}",
            s * 1e3,
            flops / s / 1e12,
            bytes / s / 1e9
        );
    };
    // The linear layer of the step's autocast path: input, weight and bias cast, then the
    // recomputing linear op.
    let linear = |x: &Tensor, w: &Var, b: &Var| -> Result<Tensor> {
        let c = |t: &Tensor| t.to_dtype(cd);
        Ok(recompute::linear(&c(x)?, &c(w)?, &c(b)?)?)
    };
    let backward_of = |y: &Tensor| -> Result<()> {
        y.to_dtype(DType::F32)?.sum_all()?.backward()?;
        Ok(())
    };

    let x = f32v(&[t, h])?;
    let w4 = f32v(&[inter, h])?;
    let (xb, wb) = (
        x.as_tensor().to_dtype(cd)?,
        w4.as_tensor().to_dtype(cd)?.t()?,
    );
    let s = time_per_call(dev, reps, || {
        xb.matmul(&wb)?;
        Ok(())
    })?;
    report("matmul_T_h_4h", s, 2.0 * (t * h * inter) as f64, 0.0);

    let (wqkv, bqkv) = (f32v(&[3 * h, h])?, f32v(&[3 * h])?);
    let s = time_per_call(dev, reps, || backward_of(&linear(&x, &wqkv, &bqkv)?))?;
    report("linear_qkv_fwd_bwd", s, 6.0 * (t * h * 3 * h) as f64, 0.0);

    let (b4, w_down, b_down) = (f32v(&[inter])?, f32v(&[h, inter])?, f32v(&[h])?);
    let s = time_per_call(dev, reps, || {
        let up = recompute::gelu_erf(&linear(&x, &w4, &b4)?)?;
        backward_of(&linear(&up, &w_down, &b_down)?)
    })?;
    report("mlp_fwd_bwd", s, 6.0 * (2 * t * h * inter) as f64, 0.0);

    let qv = |tl: usize| -> Result<Var> {
        Ok(Var::from_tensor(
            &f32v(&[rows, nh, tl, hs])?.as_tensor().to_dtype(cd)?,
        )?)
    };
    let (q, k, v) = (qv(q_len)?, qv(k_len)?, qv(k_len)?);
    let mask: Vec<f32> = (0..q_len * k_len)
        .map(|i| {
            let (qi, ki) = (i / k_len, i % k_len);
            if ki <= k_len - q_len + qi {
                0.0
            } else {
                f32::MIN
            }
        })
        .collect();
    let bias = Tensor::from_vec(mask, (1, 1, q_len, k_len), dev)?
        .broadcast_as((rows, 1, q_len, k_len))?
        .contiguous()?;
    let scale = 1.0 / (hs as f64).sqrt();
    let s = time_per_call(dev, reps, || {
        backward_of(&recompute::attention(&q, &k, &v, &bias, scale)?)
    })?;
    let attn_fwd = 4.0 * (rows * nh * q_len * k_len * hs) as f64;
    report("attention_fwd_bwd", s, 3.0 * attn_fwd, 0.0);

    let (lw, lb) = (f32v(&[h])?, f32v(&[h])?);
    let s = time_per_call(dev, reps, || {
        backward_of(&recompute::layer_norm(&x, &lw, &lb, 1e-5)?)
    })?;
    // Forward: read x, write y; backward: read x and dy, write dx (f32).
    report("layer_norm_fwd_bwd", s, 0.0, (5 * t * h * 4) as f64);

    let xr = f32v(&[t_resp, h])?;
    let w_out = f32v(&[vocab, h])?;
    let targets: Vec<u32> = (0..t_resp).map(|i| (i * 7919 % vocab) as u32).collect();
    let targets = Tensor::from_vec(targets, t_resp, dev)?;
    let s = time_per_call(dev, reps, || {
        let logits = xr
            .as_tensor()
            .to_dtype(cd)?
            .matmul(&w_out.as_tensor().to_dtype(cd)?.t()?)?;
        backward_of(&recompute::label_logps(&logits, &targets)?)
    })?;
    report(
        "head_logps_fwd_bwd",
        s,
        6.0 * (t_resp * h * vocab) as f64,
        0.0,
    );

    let y = x.as_tensor().affine(1.0, 1.0)?;
    let s = time_per_call(dev, reps, || {
        (x.as_tensor() + &y)?;
        Ok(())
    })?;
    report("add_f32_T_h", s, 0.0, (3 * t * h * 4) as f64);
    Ok(())
}

fn main() {
    let mut a = Args::parse();
    if a.tiny {
        a.cpu = true;
        a.shape = "tiny".into();
        a.batch = 2;
        a.seq = 32;
        a.warmup = 1;
        a.steps = 2;
    }
    if let Err(e) = run(&a) {
        let msg = format!("{e:#}");
        let oom = msg.contains("OUT_OF_MEMORY") || msg.to_lowercase().contains("out of memory");
        eprintln!("overopt-gpu-bench: {msg}");
        let one_line: String = msg
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .map(|c| if c.is_whitespace() { '_' } else { c })
            .take(160)
            .collect();
        println!(
            "RESULT impl=overopt shape={} ok=0 oom={} error={} op_path={} checkpoint={} cuda_alloc={}",
            a.shape,
            u8::from(oom),
            one_line,
            a.op_path,
            u8::from(a.checkpoint),
            a.cuda_alloc
        );
        let usage = [
            "no CUDA",
            "no usable CUDA",
            "unknown --",
            "unknown op path",
            "unknown CUDA allocation",
        ]
        .iter()
        .any(|m| msg.contains(m));
        std::process::exit(if usage { 1 } else { 2 });
    }
}
