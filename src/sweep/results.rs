//! Per-run result files of a sweep (`OUT/results/<run>.json`, one per evaluated policy,
//! written when the run is complete) and their assembly into the tables; shared by the teach
//! and the paper-scale sweeps.

use crate::analysis::table::{ResultRow, SampleRow};
use crate::eval::policy::PolicyEval;
use crate::train::loss::Objective;
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Everything evaluated for one policy: table rows (one per checkpoint) and sample rows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResults {
    pub rows: Vec<ResultRow>,
    pub samples: Vec<SampleRow>,
    pub seconds: f64,
}

/// One DAA run of the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub objective: String,
    pub beta: f64,
    pub size: String,
    pub seed: u64,
    /// R-DPO length coefficient (0 otherwise).
    pub alpha: f64,
}

impl RunSpec {
    pub fn id(&self) -> String {
        let a = if self.objective == "rdpo" {
            format!("-a{}", self.alpha)
        } else {
            String::new()
        };
        format!(
            "{}-b{}{a}-{}-s{}",
            self.objective, self.beta, self.size, self.seed
        )
    }

    pub fn objective(&self) -> Result<Objective> {
        Objective::from_name(&self.objective, self.alpha)
    }

    /// The SFT policy of a size, as the table names it (objective `sft`, beta 0, seed 0).
    pub fn sft(size: &str) -> RunSpec {
        RunSpec {
            objective: "sft".into(),
            beta: 0.0,
            size: size.into(),
            seed: 0,
            alpha: 0.0,
        }
    }
}

impl RunResults {
    /// Add one evaluated checkpoint (`ck`: fraction of the epoch, 0 for an SFT policy) of
    /// `run`: its table row and its sample rows.
    pub fn add(&mut self, e: &PolicyEval, run: &RunSpec, n_params: usize, ck: f64, hash: &str) {
        let (o, b, s, seed) = (
            run.objective.as_str(),
            run.beta,
            run.size.as_str(),
            run.seed,
        );
        self.rows
            .push(result_row(e, o, b, s, n_params as u64, ck, seed, hash));
        self.samples.extend(sample_rows(e, o, b, s, ck, seed));
    }

    /// Record the time since `t0` and write the results to `path` atomically; returns a line
    /// that sums up the last row.
    pub fn finish(&mut self, path: &Path, t0: std::time::Instant) -> Result<String> {
        self.seconds = t0.elapsed().as_secs_f64();
        crate::util::write_atomic(path, serde_json::to_string(self)?.as_bytes())?;
        let id = path.file_stem().unwrap_or_default().to_string_lossy();
        Ok(match self.rows.last() {
            Some(last) => format!(
                "{id}: kl {:.2} win {:.3} length {:.2} ({:.0} s)",
                last.kl, last.win_rate, last.mean_length, self.seconds
            ),
            None => format!("{id}: no rows ({:.0} s)", self.seconds),
        })
    }
}

/// The first 16 hex digits of the SHA-256 of some settings' JSON text.
pub fn short_hash(settings: &serde_json::Value) -> String {
    crate::util::sha256_hex(settings.to_string().as_bytes())[..16].to_string()
}

pub fn read_results(path: &Path) -> Result<RunResults> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: corrupt results file", path.display()))
}

/// The `*.json` result files in `dir`, in name order (none when it does not exist).
pub fn result_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    files.sort();
    Ok(files)
}

/// Concatenate result files, refusing two rows of one policy (objective, beta, size,
/// checkpoint, seed) from different files: e.g. results left from an earlier configuration,
/// or R-DPO runs that differ only in alpha, which the table cannot tell apart.
pub fn merge_results(
    files: Vec<(PathBuf, RunResults)>,
) -> Result<(Vec<ResultRow>, Vec<SampleRow>)> {
    let mut seen: BTreeMap<(String, u64, String, u64, u64), PathBuf> = BTreeMap::new();
    let mut rows = vec![];
    let mut samples = vec![];
    for (f, r) in files {
        for row in &r.rows {
            let key = (
                row.objective.clone(),
                row.beta.to_bits(),
                row.size.clone(),
                row.checkpoint.to_bits(),
                row.seed,
            );
            if let Some(first) = seen.get(&key).filter(|first| **first != f) {
                bail!(
                    "{} and {} both hold results of {} beta={} size={} checkpoint={} seed={} \
                     (config_hash {}): results of an earlier configuration, or runs that differ \
                     only in a setting the table has no column for (e.g. R-DPO's alpha); move \
                     one of them out of the results folder",
                    first.display(),
                    f.display(),
                    row.objective,
                    row.beta,
                    row.size,
                    row.checkpoint,
                    row.seed,
                    row.config_hash
                );
            }
            seen.insert(key, f.clone());
        }
        rows.extend(r.rows);
        samples.extend(r.samples);
    }
    Ok((rows, samples))
}

/// Read every `*.json` result file in `dir` (e.g. written by separate jobs) in name order,
/// without a configuration to check them against (see [`Teach::collect`] for that); two
/// files with rows of the same policy are an error.
pub fn collect_results(dir: &Path) -> Result<(Vec<ResultRow>, Vec<SampleRow>)> {
    let files = result_files(dir)?
        .into_iter()
        .map(|f| read_results(&f).map(|r| (f, r)))
        .collect::<Result<Vec<_>>>()?;
    merge_results(files)
}

/// The error for an output of another configuration found in a sweep's directory.
pub fn stale(what: &Path, detail: &str) -> anyhow::Error {
    anyhow!(
        "{} was made with another configuration ({detail}); it is kept as it is: delete it \
         (and what was computed from it) or run into a fresh --out directory",
        what.display()
    )
}

/// Read an existing results file, refusing one whose rows carry another config hash.
pub fn existing_results(path: &Path, want_hash: &str) -> Result<RunResults> {
    let res = read_results(path)?;
    if let Some(r) = res.rows.iter().find(|r| r.config_hash != want_hash) {
        return Err(stale(
            path,
            &format!(
                "config_hash {} where this configuration gives {want_hash}",
                r.config_hash
            ),
        ));
    }
    Ok(res)
}

/// The table row of one evaluated checkpoint.
#[allow(clippy::too_many_arguments)]
fn result_row(
    e: &PolicyEval,
    objective: &str,
    beta: f64,
    size: &str,
    n_params: u64,
    ck: f64,
    seed: u64,
    hash: &str,
) -> ResultRow {
    ResultRow {
        objective: objective.into(),
        beta,
        size: size.into(),
        n_params,
        checkpoint: ck,
        seed,
        kl: e.kl,
        kl_se: e.kl_se,
        win_rate: e.win_rate,
        win_rate_lo: e.win_rate_lo,
        win_rate_hi: e.win_rate_hi,
        mean_length: e.mean_length,
        heldout_loss: e.heldout_loss,
        implicit_accuracy: e.implicit_accuracy,
        chosen_reward: e.chosen_reward,
        config_hash: hash.into(),
        length_corrected_win_rate: None,
    }
}

fn sample_rows(
    e: &PolicyEval,
    objective: &str,
    beta: f64,
    size: &str,
    ck: f64,
    seed: u64,
) -> Vec<SampleRow> {
    e.samples
        .iter()
        .map(|s| SampleRow {
            objective: objective.into(),
            beta,
            size: size.into(),
            checkpoint: ck,
            seed,
            log_ratio: s.log_ratio,
            length: s.length,
        })
        .collect()
}
