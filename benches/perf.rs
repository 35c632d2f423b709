//! CPU throughput of the teach-scale hot paths, for `bench/run.sh` (which runs the PyTorch /
//! transformers reference of `bench/torch_ref.py` on the same shapes and compares).
//!
//! `cargo bench --profile dev --bench perf -- <command> [options]` (the dev profile reuses the
//! debug build, whose dependencies are at opt-level 3). Commands:
//! - `data --out F`: write the shared workload (model configs, DAA batches, sampling prompts)
//!   as JSON, so both sides run exactly the same shapes;
//! - `p1 --data F [--out R]`: one DAA (DPO) optimizer step per size: policy forward + backward
//!   over chosen and rejected (each prompt once: `train::daa::pair_logps`), cached reference
//!   log-probs, DPO loss,
//!   grad-norm clipping, RMSProp, exactly as `train::trainer::run_epoch` does it;
//! - `p2 --data F [--out R]`: batched top-k sampling with a KV cache (`model::generate`);
//! - `gemm --data F [--out R]`: `x @ w^T` on the linear layers' shapes, overopt's kernel
//!   (`model::gemm`) and candle's matmul side by side, GFLOP/s.
//!
//! Results are JSON lines (`R`, default stdout). Threads: RAYON_NUM_THREADS.

use anyhow::{Context, Result, anyhow, bail};
use candle_core::{DType, Device};
use candle_nn::Optimizer;
use overopt::data::PrefExample;
use overopt::data::synthetic::{EOS, PAD, Task};
use overopt::model::GptNeoXConfig;
use overopt::model::generate::{SampleConfig, generate};
use overopt::model::load;
use overopt::sweep::teach::TeachConfig;
use overopt::train::daa::{DaaConfig, ReferenceSource, daa_micro, reference_logps};
use overopt::train::loss::Objective;
use overopt::train::optim::{GradAccum, RmsProp, RmsPropConfig};
use overopt::train::{SpecialTokens, optim::named_vars};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::time::Instant;

const TOKENS: SpecialTokens = SpecialTokens { eos: EOS, pad: PAD };

#[derive(Serialize, Deserialize)]
struct SizeData {
    name: String,
    /// The HF config.json of the model (`GptNeoXConfig::to_hf_json`).
    config: serde_json::Value,
    n_params: usize,
}

#[derive(Serialize, Deserialize)]
struct Workload {
    eos: u32,
    pad: u32,
    sizes: Vec<SizeData>,
    /// P1: DPO beta, RMSProp settings, and the DAA batches (pairs) cycled through.
    beta: f64,
    lr: f64,
    alpha: f64,
    eps: f64,
    max_grad_norm: f64,
    batches: Vec<Vec<PrefExample>>,
    p1_warmup: usize,
    p1_steps: usize,
    /// P2: the model, equal-length prompts, new tokens per prompt (EOS never stops a row).
    p2_size: String,
    p2_prompts: Vec<Vec<u32>>,
    p2_new_tokens: usize,
    /// G: (rows, k, n) of `x (rows, k) @ w^T` products, the linear layers of the largest size.
    #[serde(default)]
    gemm_shapes: Vec<[usize; 3]>,
    p2_top_k: usize,
    p2_warmup: usize,
    p2_reps: usize,
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The linear layers of the largest teach size on 1024 token rows: QKV, attention output,
/// MLP in and out.
fn gemm_shapes(cfg: &TeachConfig) -> Vec<[usize; 3]> {
    let Some(s) = cfg.sizes.iter().max_by_key(|s| s.hidden_size) else {
        return vec![];
    };
    let (h, i) = (s.hidden_size, s.intermediate_size);
    vec![[1024, h, 3 * h], [1024, h, h], [1024, h, i], [1024, i, h]]
}

/// GFLOP/s of `x @ w^T` for one shape: overopt's kernel (the linear layers' op) and candle's
/// matmul (the `gemm` crate), median of 30 after 5 warm-up calls.
fn gemm_shape(shape: [usize; 3]) -> Result<(f64, f64)> {
    let [rows, k, n] = shape;
    let dev = Device::Cpu;
    let x = candle_core::Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
    let w = candle_core::Tensor::randn(0f32, 1.0, (n, k), &dev)?;
    let time = |f: &dyn Fn() -> candle_core::Result<candle_core::Tensor>| -> Result<f64> {
        let mut ts = vec![];
        for i in 0..35 {
            let t0 = Instant::now();
            f()?;
            if i >= 5 {
                ts.push(t0.elapsed().as_secs_f64());
            }
        }
        ts.sort_by(f64::total_cmp);
        Ok(2.0 * (rows * k * n) as f64 / ts[ts.len() / 2] / 1e9)
    };
    let ours = time(&|| overopt::model::fused::matmul_wt(&x, &w))?;
    let candle = time(&|| x.matmul(&w.t()?))?;
    Ok((ours, candle))
}

fn make_data(teach_path: &str) -> Result<Workload> {
    let cfg = TeachConfig::from_file(std::path::Path::new(teach_path))?;
    let task = Task::new(cfg.task.clone())?;
    let sizes = cfg
        .sizes
        .iter()
        .map(|s| {
            let m = cfg.model_config(&task, s)?;
            Ok(SizeData {
                name: s.name.clone(),
                config: m.to_hf_json(),
                n_params: m.n_params(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // DAA pairs shaped like the teach task's: a prompt and two noisy summaries of its post.
    let bs = cfg.daa.batch_size;
    let n_batches = 4;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let posts = task.posts(bs * n_batches, 10);
    let pairs: Vec<PrefExample> = posts
        .iter()
        .map(|p| PrefExample {
            prompt: task.prompt_ids(p),
            chosen: task.sample_reference(p, &mut rng).0,
            rejected: task.sample_reference(p, &mut rng).0,
        })
        .collect();
    let batches = pairs.chunks(bs).map(|c| c.to_vec()).collect();
    // Sampling prompts: the median teach prompt length, all equal so that both sides generate
    // exactly `new_tokens` per prompt.
    let n_prompts = cfg.eval.n_prompts;
    let plen = 2 + (cfg.task.post.min_len + cfg.task.post.max_len) / 2;
    let mut prompts = vec![];
    let mut seed = 100;
    while prompts.len() < n_prompts {
        for p in task.posts(4 * n_prompts, seed) {
            let ids = task.prompt_ids(&p);
            if ids.len() == plen && prompts.len() < n_prompts {
                prompts.push(ids);
            }
        }
        seed += 1;
    }
    Ok(Workload {
        eos: EOS,
        pad: PAD,
        sizes,
        beta: 0.1,
        lr: cfg.daa.lr,
        alpha: 0.99,
        eps: 1e-8,
        max_grad_norm: 10.0,
        batches,
        p1_warmup: env_usize("BENCH_P1_WARMUP", 3),
        p1_steps: env_usize("BENCH_P1_STEPS", 15),
        p2_size: cfg.pairs.source_size.clone(),
        p2_prompts: prompts,
        p2_new_tokens: env_usize("BENCH_P2_NEW_TOKENS", 16),
        gemm_shapes: gemm_shapes(&cfg),
        p2_top_k: 50,
        p2_warmup: 1,
        p2_reps: env_usize("BENCH_P2_REPS", 3),
    })
}

fn model_config(s: &SizeData) -> Result<GptNeoXConfig> {
    GptNeoXConfig::from_json_str(&s.config.to_string(), &format!("size {}", s.name))
}

/// Median seconds of (step, [forward + loss, backward, grad norm + optimizer]).
fn p1_size(w: &Workload, s: &SizeData) -> Result<(f64, Vec<f64>, Vec<f64>)> {
    let dev = Device::Cpu;
    let mcfg = model_config(s)?;
    let policy = load::fresh(&mcfg, DType::F32, &dev, 0)?;
    let reference = load::deep_copy(&policy)?;
    let data: Vec<PrefExample> = w.batches.iter().flatten().cloned().collect();
    let bs = w.batches[0].len();
    // Reference log-probs precomputed once (not timed), as `train_daa` does.
    let refs = reference_logps(&reference.model, &data, TOKENS, 2 * bs, None)?;
    let daa = DaaConfig {
        objective: Objective::Dpo {
            label_smoothing: 0.0,
        },
        beta: w.beta,
        online_reference: false,
        reference_cache: None,
    };
    let vars: Vec<_> = named_vars(&policy.varmap)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let ocfg = RmsPropConfig {
        lr: w.lr,
        alpha: w.alpha,
        eps: w.eps,
        warmup_steps: 0,
        max_grad_norm: Some(w.max_grad_norm),
    };
    let mut opt = RmsProp::new(vars.clone(), ocfg)?;
    let mut accum = GradAccum::new(&vars);
    let mut times = vec![];
    let mut phases = [vec![], vec![], vec![]];
    let mut losses = vec![];
    for step in 0..w.p1_warmup + w.p1_steps {
        let b = step % w.batches.len();
        let idx: Vec<usize> = (b * bs..(b + 1) * bs).collect();
        let t0 = Instant::now();
        // The body of `run_epoch` for one micro-batch per step.
        let out = daa_micro(
            &policy.model,
            &data,
            &idx,
            TOKENS,
            &daa,
            ReferenceSource::Cached(&refs),
        )?;
        let lv = out.loss.to_scalar::<f32>()? as f64;
        let t1 = Instant::now();
        let grads = (out.loss / 1.0)?.backward()?;
        let t2 = Instant::now();
        accum.add(&grads)?;
        let g = accum.take();
        let norm = RmsProp::grad_norm(&g)?;
        if !norm.is_finite() || !lv.is_finite() {
            bail!("non-finite loss {lv} or grad norm {norm}");
        }
        opt.step_with(&g)?;
        let dt = t0.elapsed().as_secs_f64();
        if step >= w.p1_warmup {
            times.push(dt);
            phases[0].push((t1 - t0).as_secs_f64());
            phases[1].push((t2 - t1).as_secs_f64());
            phases[2].push(t2.elapsed().as_secs_f64());
        }
        losses.push(lv);
    }
    let [f, b, o] = &mut phases;
    let phases = vec![median(f), median(b), median(o)];
    Ok((median(&mut times), losses, phases))
}

fn p2(w: &Workload) -> Result<(f64, usize)> {
    let dev = Device::Cpu;
    let s = w
        .sizes
        .iter()
        .find(|s| s.name == w.p2_size)
        .ok_or_else(|| anyhow!("no size {}", w.p2_size))?;
    let mcfg = model_config(s)?;
    let lm = load::fresh(&mcfg, DType::F32, &dev, 0)?;
    let plen = w.p2_prompts[0].len();
    if w.p2_prompts.iter().any(|p| p.len() != plen) {
        bail!("p2 prompts must have equal lengths");
    }
    let sc = SampleConfig {
        temperature: 1.0,
        top_k: Some(w.p2_top_k),
        max_length: plen + w.p2_new_tokens,
        seed: 0,
        batch_size: w.p2_prompts.len(),
    };
    // An EOS id outside the vocabulary: no row stops early, every prompt gets exactly
    // `p2_new_tokens` tokens (the reference side disables EOS too).
    let no_eos = mcfg.vocab_size as u32;
    let mut times = vec![];
    let mut n_tokens = 0;
    for rep in 0..w.p2_warmup + w.p2_reps {
        let t0 = Instant::now();
        let out = generate(&lm.model, &w.p2_prompts, &sc, no_eos, w.pad)?;
        let dt = t0.elapsed().as_secs_f64();
        n_tokens = out.iter().map(|s| s.tokens.len()).sum();
        if n_tokens != w.p2_prompts.len() * w.p2_new_tokens {
            bail!(
                "generated {n_tokens} tokens, expected {}",
                w.p2_prompts.len() * w.p2_new_tokens
            );
        }
        if rep >= w.p2_warmup {
            times.push(dt);
        }
    }
    Ok((median(&mut times), n_tokens))
}

fn main() -> Result<()> {
    // As the `overopt` binary does (and OVEROPT_BENCH_MALLOC=default to measure without).
    if std::env::var("OVEROPT_BENCH_MALLOC").as_deref() != Ok("default") {
        overopt::util::tune_allocator();
    }
    // `cargo bench` appends `--bench`; options are `--name value` pairs after the command.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let cmd = args.first().cloned().unwrap_or_default();
    let threads = candle_core::utils::get_num_threads();
    let mut out: Box<dyn Write> = match arg(&args, "--out") {
        Some(p) if cmd != "data" => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .with_context(|| format!("cannot open {p}"))?,
        ),
        _ => Box::new(std::io::stdout()),
    };
    let load_data = || -> Result<Workload> {
        let p = arg(&args, "--data").ok_or_else(|| anyhow!("--data FILE is required"))?;
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {p}"))?;
        serde_json::from_str(&text).with_context(|| format!("{p}: not a workload file"))
    };
    match cmd.as_str() {
        "data" => {
            let teach = arg(&args, "--teach")
                .unwrap_or_else(|| "artifact/configs/teach/teach.toml".to_string());
            let p = arg(&args, "--out").ok_or_else(|| anyhow!("data: --out FILE is required"))?;
            let w = make_data(&teach)?;
            overopt::util::write_atomic(
                std::path::Path::new(&p),
                serde_json::to_string(&w)?.as_bytes(),
            )?;
        }
        "p1" => {
            let w = load_data()?;
            let bs = w.batches[0].len();
            for s in &w.sizes {
                let (sec, losses, ph) = p1_size(&w, s)?;
                let line = serde_json::json!({"side": "overopt", "bench": "p1", "size": s.name,
                    "n_params": s.n_params, "batch": bs, "threads": threads,
                    "median_s": sec, "examples_per_s": bs as f64 / sec,
                    "first_loss": losses[0], "last_loss": losses[losses.len() - 1],
                    "forward_s": ph[0], "backward_s": ph[1], "optimizer_s": ph[2]});
                writeln!(out, "{line}")?;
                out.flush()?;
            }
        }
        "p2" => {
            let w = load_data()?;
            let (sec, n) = p2(&w)?;
            let line = serde_json::json!({"side": "overopt", "bench": "p2", "size": w.p2_size,
                "prompts": w.p2_prompts.len(), "prompt_len": w.p2_prompts[0].len(),
                "new_tokens": w.p2_new_tokens, "threads": threads, "median_s": sec,
                "tokens": n, "tokens_per_s": n as f64 / sec});
            writeln!(out, "{line}")?;
        }
        "gemm" => {
            let w = load_data()?;
            for &shape in &w.gemm_shapes {
                let (ours, candle) = gemm_shape(shape)?;
                let line = serde_json::json!({"side": "overopt", "bench": "gemm",
                    "size": format!("{}x{}x{}", shape[0], shape[1], shape[2]),
                    "threads": threads, "gflops": ours, "candle_gflops": candle,
                    "kernel": overopt::model::gemm::kernel_name()});
                writeln!(out, "{line}")?;
            }
        }
        c => bail!("unknown command {c:?}: expected data, p1, p2 or gemm"),
    }
    Ok(())
}
