//! The training loop shared by SFT and DAA: seeded data order, gradient accumulation,
//! RMSProp, checkpoints at fractions of the epoch, a JSONL metrics log, progress output,
//! resume from the last checkpoint, and a stop on a non-finite loss or gradient.

use super::checkpoint::{self, CheckpointMeta};
use super::optim::{GradAccum, RmsProp, RmsPropConfig, named_vars};
use crate::model::LoadedModel;
use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use candle_nn::Optimizer;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Settings of the loop (the `[train]` table of a config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopConfig {
    /// Examples per optimizer step (micro_batch_size x accumulation steps).
    pub batch_size: usize,
    /// Examples per forward/backward pass.
    pub micro_batch_size: usize,
    /// Seed of the data order.
    #[serde(default)]
    pub seed: u64,
    /// Checkpoints at these fractions of the epoch.
    #[serde(default = "default_checkpoints")]
    pub checkpoints: Vec<f64>,
    /// Print a progress line every this many steps when not on a terminal (0: never).
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// Resume from the last checkpoint in the output directory if there is one.
    #[serde(default = "default_true")]
    pub resume: bool,
    /// Show an interactive progress bar when stderr is a terminal.
    #[serde(default = "default_true")]
    pub progress_bar: bool,
}

fn default_checkpoints() -> Vec<f64> {
    vec![0.25, 0.5, 0.75, 1.0]
}
fn default_log_every() -> usize {
    10
}
fn default_true() -> bool {
    true
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            batch_size: 128,
            micro_batch_size: 16,
            seed: 0,
            checkpoints: default_checkpoints(),
            log_every: default_log_every(),
            resume: true,
            progress_bar: true,
        }
    }
}

impl LoopConfig {
    pub fn validate(&self) -> Result<()> {
        if self.micro_batch_size == 0 || self.batch_size == 0 {
            bail!("train: `batch_size` and `micro_batch_size` must be positive");
        }
        if !self.batch_size.is_multiple_of(self.micro_batch_size) {
            bail!(
                "train: `batch_size` ({}) must be a multiple of `micro_batch_size` ({})",
                self.batch_size,
                self.micro_batch_size
            );
        }
        for &f in &self.checkpoints {
            if !(f > 0.0 && f <= 1.0) {
                bail!("train: `checkpoints` must be fractions in (0, 1], got {f}");
            }
        }
        Ok(())
    }

    pub fn accumulation_steps(&self) -> usize {
        self.batch_size / self.micro_batch_size
    }
}

/// What a micro-batch contributed: the loss tensor (to differentiate, already the MEAN over
/// the micro-batch) and named scalar metrics (averaged over micro-batches in the log).
pub struct MicroOutput {
    pub loss: Tensor,
    pub metrics: Vec<(&'static str, f64)>,
}

/// One logged optimizer step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    pub step: usize,
    pub examples_seen: usize,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub examples_per_s: f64,
    #[serde(flatten)]
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

/// The result of a training run.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub checkpoints: Vec<(usize, PathBuf)>,
    pub total_steps: usize,
    /// Step the run resumed from (0 for a fresh run).
    pub resumed_from: usize,
    pub last: Option<StepLog>,
}

/// Steps at which checkpoints are written: round(f * total), at least 1, deduplicated.
pub fn checkpoint_steps(fractions: &[f64], total: usize) -> Vec<usize> {
    let mut s: Vec<usize> = fractions
        .iter()
        .map(|f| ((f * total as f64).round() as usize).clamp(1, total.max(1)))
        .collect();
    s.sort();
    s.dedup();
    s
}

/// The data order of an epoch: a seeded permutation of 0..n.
pub fn epoch_order(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    idx
}

fn keep_log_until(path: &Path, step: usize) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path)?;
    let mut kept = String::new();
    for line in text.lines() {
        if let Ok(l) = serde_json::from_str::<StepLog>(line)
            && l.step <= step
        {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    crate::util::write_atomic(path, kept.as_bytes())
}

/// Keys of a run configuration that do not change what a run computes (logging, resuming,
/// where it writes, which device it runs on): a run may resume with them changed.
pub const NON_DETERMINING_KEYS: [&str; 5] =
    ["log_every", "progress_bar", "resume", "out_dir", "device"];

/// The differences between two run configurations that change what the run computes (keys
/// in [`NON_DETERMINING_KEYS`] are skipped at any depth), as `path: old vs new`, the first
/// three joined by "; " (and how many more); `None` when they agree.
pub fn config_difference(old: &serde_json::Value, new: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    if NON_DETERMINING_KEYS.contains(&k.as_str()) {
                        continue;
                    }
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    let null = Value::Null;
                    walk(
                        &p,
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
                for (i, (a, b)) in x.iter().zip(y).enumerate() {
                    walk(&format!("{path}[{i}]"), a, b, out);
                }
            }
            (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => {}
            _ if a == b => {}
            _ => out.push(format!(
                "{}: {a} in the checkpoint vs {b} now",
                if path.is_empty() {
                    "(whole configuration)"
                } else {
                    path
                }
            )),
        }
    }
    let mut out = vec![];
    walk("", old, new, &mut out);
    (!out.is_empty()).then(|| {
        let more = out.len().saturating_sub(3);
        let mut s = out.into_iter().take(3).collect::<Vec<_>>().join("; ");
        if more > 0 {
            s.push_str(&format!("; and {more} more"));
        }
        s
    })
}

/// Run one epoch over `n_examples` examples. `micro` computes the loss of a micro-batch given
/// the example indices. Checkpoints and `metrics.jsonl` go to `out_dir`; `run_config` is
/// stored in every checkpoint's metadata, and resuming from a checkpoint whose stored
/// configuration differs in a key that changes the run (see [`config_difference`]) is an error.
pub fn run_epoch(
    policy: &LoadedModel,
    n_examples: usize,
    cfg: &LoopConfig,
    optim: &RmsPropConfig,
    out_dir: &Path,
    run_config: &serde_json::Value,
    label: &str,
    micro: &mut dyn FnMut(&[usize]) -> Result<MicroOutput>,
) -> Result<TrainOutcome> {
    cfg.validate()?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let total = n_examples / cfg.batch_size;
    if total == 0 {
        bail!(
            "{label}: {n_examples} examples make no full batch of {}",
            cfg.batch_size
        );
    }
    let vars: Vec<_> = named_vars(&policy.varmap)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let mut opt = RmsProp::new(vars.clone(), optim.clone())?;
    let order = epoch_order(n_examples, cfg.seed);
    let ckpt_steps = checkpoint_steps(&cfg.checkpoints, total);
    let log_path = out_dir.join("metrics.jsonl");
    let mut start = 0;
    if cfg.resume
        && let Some((step, dir)) = checkpoint::list(out_dir)?.pop()
    {
        if let Some(diff) = config_difference(&checkpoint::read_meta(&dir)?.config, run_config) {
            bail!(
                "{}: checkpoint of a run with another configuration ({diff}); it is kept as it \
                 is: use another output directory, or delete this one to start over",
                dir.display()
            );
        }
        let meta = checkpoint::restore(&dir, &policy.varmap, &mut opt, policy.model.device())?;
        if meta.total_steps != total || meta.seed != cfg.seed {
            bail!(
                "{}: checkpoint of a different run (total steps {} vs {total}, seed {} vs {}); use another output directory",
                dir.display(),
                meta.total_steps,
                meta.seed,
                cfg.seed
            );
        }
        start = step;
    }
    keep_log_until(&log_path, start)?;
    if start == 0 {
        // A fresh run starts a fresh log.
        let _ = std::fs::remove_file(&log_path);
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let bar = if cfg.progress_bar && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} steps {msg} ({eta})",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        b.set_prefix(label.to_string());
        b.set_position(start as u64);
        Some(b)
    } else {
        None
    };
    let mut last = None;
    let mut accum = GradAccum::new(&vars);
    for step in start..total {
        let t0 = Instant::now();
        let mut loss_sum = 0.0;
        let mut msum: Vec<(&'static str, f64)> = vec![];
        let accn = cfg.accumulation_steps();
        for a in 0..accn {
            let lo = step * cfg.batch_size + a * cfg.micro_batch_size;
            let idx = &order[lo..lo + cfg.micro_batch_size];
            let out = micro(idx)?;
            let lv = out
                .loss
                .to_dtype(candle_core::DType::F32)?
                .to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                bail!(
                    "{label}: non-finite loss {lv} at step {} (micro-batch {a}, examples {:?}); the last good checkpoint is kept",
                    step + 1,
                    idx
                );
            }
            loss_sum += lv;
            let grads = policy.model.backward(&(out.loss / accn as f64)?)?;
            accum.add(&grads)?;
            for (k, v) in out.metrics {
                match msum.iter_mut().find(|(n, _)| *n == k) {
                    Some(e) => e.1 += v,
                    None => msum.push((k, v)),
                }
            }
        }
        let grads = accum.take();
        let norm = RmsProp::grad_norm(&grads)?;
        if !norm.is_finite() {
            bail!(
                "{label}: non-finite gradient norm at step {} (examples {:?}); the last good checkpoint is kept",
                step + 1,
                &order[step * cfg.batch_size..(step + 1) * cfg.batch_size]
            );
        }
        let info = opt.step_with(&grads)?;
        let dt = t0.elapsed().as_secs_f64();
        let mut metrics = serde_json::Map::new();
        for (k, v) in msum {
            metrics.insert(k.to_string(), serde_json::json!(v / accn as f64));
        }
        let entry = StepLog {
            step: step + 1,
            examples_seen: (step + 1) * cfg.batch_size,
            loss: loss_sum / accn as f64,
            grad_norm: info.grad_norm,
            lr: info.lr,
            examples_per_s: cfg.batch_size as f64 / dt.max(1e-9),
            metrics,
        };
        writeln!(log, "{}", serde_json::to_string(&entry)?)?;
        log.flush()?;
        match &bar {
            Some(b) => {
                b.set_position((step + 1) as u64);
                b.set_message(format!("loss {:.4}", entry.loss));
            }
            None => {
                if cfg.log_every > 0 && ((step + 1) % cfg.log_every == 0 || step + 1 == total) {
                    println!(
                        "{label}: step {}/{} loss {:.4} grad_norm {:.3} lr {:.2e} {:.1} ex/s",
                        step + 1,
                        total,
                        entry.loss,
                        entry.grad_norm,
                        entry.lr,
                        entry.examples_per_s
                    );
                }
            }
        }
        if ckpt_steps.contains(&(step + 1)) {
            let meta = CheckpointMeta {
                step: step + 1,
                total_steps: total,
                fraction: (step + 1) as f64 / total as f64,
                examples_seen: (step + 1) * cfg.batch_size,
                seed: cfg.seed,
                metrics: serde_json::to_value(&entry)?,
                config: run_config.clone(),
            };
            checkpoint::save(out_dir, &policy.model, &opt, &meta)?;
        }
        last = Some(entry);
    }
    if let Some(b) = bar {
        b.finish();
    }
    Ok(TrainOutcome {
        checkpoints: checkpoint::list(out_dir)?,
        total_steps: total,
        resumed_from: start,
        last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_differences_name_the_keys_that_change_a_run() {
        let old = serde_json::json!({"train": {"lr": 0.001, "batch_size": 32, "log_every": 5,
            "checkpoints": [0.5, 1.0]}, "out_dir": "a", "model": {"device": "cpu", "seed": 1}});
        assert_eq!(config_difference(&old, &old), None);
        // Logging, resuming, the output path and the device do not change the run; an integer
        // written as a float is the same number.
        let same = serde_json::json!({"train": {"lr": 0.001, "batch_size": 32.0, "log_every": 50,
            "resume": true, "checkpoints": [0.5, 1]}, "out_dir": "b", "model": {"device": "cuda", "seed": 1}});
        assert_eq!(config_difference(&old, &same), None);
        let changed = serde_json::json!({"train": {"lr": 0.002, "batch_size": 32,
            "checkpoints": [0.5, 0.75, 1.0]}, "model": {"device": "cpu", "seed": 2}});
        let d = config_difference(&old, &changed).unwrap();
        assert!(
            d.starts_with("model.seed: 1 in the checkpoint vs 2 now"),
            "{d}"
        );
        assert!(d.contains("train.checkpoints: [0.5,1.0]"), "{d}");
        assert!(d.contains("train.lr: 0.001"), "{d}");
        let many = serde_json::json!({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5});
        let d = config_difference(&many, &serde_json::json!({})).unwrap();
        assert!(d.ends_with("; and 2 more"), "{d}");
        let d = config_difference(&serde_json::json!(1), &serde_json::json!({"x": 1})).unwrap();
        assert!(d.starts_with("(whole configuration)"), "{d}");
    }

    #[test]
    fn checkpoint_steps_at_fractions() {
        assert_eq!(
            checkpoint_steps(&[0.25, 0.5, 0.75, 1.0], 125),
            vec![31, 63, 94, 125]
        );
        assert_eq!(checkpoint_steps(&[0.25, 0.5, 0.75, 1.0], 2), vec![1, 2]);
    }

    #[test]
    fn order_is_a_seeded_permutation() {
        let a = epoch_order(100, 1);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(100, 1));
        assert_ne!(a, epoch_order(100, 2));
    }
}
