//! `overopt reproduce`, and the job-array entry points `overopt sweep` / `overopt collect` /
//! `overopt compare`.

use crate::analysis::table::ResultRow;
use crate::sweep::teach::{Teach, TeachConfig};
use crate::toy_mdp::{ToyMdpConfig, run_section};
use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::{Path, PathBuf};

/// Sections of the paper that `reproduce` knows.
pub const SECTIONS: [&str; 7] = [
    "all",
    "overoptimization",
    "scaling-laws",
    "length",
    "reward-metrics",
    "likelihoods",
    "toy-mdp",
];

#[derive(Args, Debug)]
pub struct ReproduceArgs {
    /// Section to reproduce: all, overoptimization, scaling-laws, length, reward-metrics,
    /// likelihoods, toy-mdp.
    #[arg(long, default_value = "all")]
    pub section: String,
    /// teach (embedded synthetic task, CPU, offline) or paper (Pythia + TL;DR + GPT-4 judge).
    #[arg(long, default_value = "teach")]
    pub scale: String,
    /// Configuration file; defaults to artifact/configs/<scale>/<scale>.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output directory; the results table is OUT/results.parquet.
    #[arg(long, default_value = "out/teach")]
    pub out: PathBuf,
    /// Only DAA runs whose id contains one of these strings (repeatable).
    #[arg(long)]
    pub only: Vec<String>,
}

fn teach_config(scale: &str, config: &Option<PathBuf>) -> Result<TeachConfig> {
    if scale != "teach" {
        bail!(
            "--scale {scale}: only the teach scale runs through `reproduce` so far; paper-scale runs use `overopt sft` / `overopt daa` with the configs in artifact/configs/paper"
        );
    }
    let path = config
        .clone()
        .unwrap_or_else(|| PathBuf::from("artifact/configs/teach/teach.toml"));
    TeachConfig::from_file(&path)
}

fn run_toy(out: &Path) -> Result<crate::toy_mdp::ToyMdpReport> {
    let path = Path::new("artifact/configs/teach/toy_mdp.toml");
    let cfg = if path.is_file() {
        let text = std::fs::read_to_string(path)?;
        toml::from_str::<ToyMdpConfig>(&text)
            .with_context(|| format!("{}: invalid toy MDP configuration", path.display()))?
    } else {
        ToyMdpConfig::default()
    };
    let report = run_section(&cfg, &out.join("toy_mdp"))?;
    println!(
        "toy-mdp: {} (C9: {})",
        out.join("toy_mdp").display(),
        report.c9.verdict
    );
    Ok(report)
}

pub fn run(a: ReproduceArgs) -> Result<()> {
    if !SECTIONS.contains(&a.section.as_str()) {
        bail!(
            "unknown --section {:?}; expected one of {SECTIONS:?}",
            a.section
        );
    }
    let t0 = std::time::Instant::now();
    let toy = if a.section == "all" || a.section == "toy-mdp" {
        Some(run_toy(&a.out)?)
    } else {
        None
    };
    let (rows, samples) = if a.section != "toy-mdp" {
        let cfg = teach_config(&a.scale, &a.config)?;
        let t = Teach::new(cfg, &a.out)?;
        let (rows, samples) = t.run_all(&a.only)?;
        crate::sweep::tables::write_tables(&a.out, &rows, &samples)?;
        println!(
            "reproduce: {} result rows, {} sample rows",
            rows.len(),
            samples.len()
        );
        (rows, samples)
    } else {
        (vec![], vec![])
    };
    let report = crate::plots::write_report(&a.out, &rows, &samples, toy.as_ref())?;
    println!(
        "reproduce: {} figures in {}",
        report.figures.len(),
        a.out.join("figures").display()
    );
    for v in &report.verdicts {
        println!("{}", v.summary);
    }
    println!(
        "reproduce: done in {:.0} s; outputs in {}",
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[arg(long, default_value = "teach")]
    pub scale: String,
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value = "out/teach")]
    pub out: PathBuf,
    /// Print the id of every DAA run, one per line (for a scheduler's job array).
    #[arg(long)]
    pub list: bool,
    /// Run the shared stages every job needs (SFT of each size, preference pairs, SFT
    /// evaluations). Run once before the array.
    #[arg(long)]
    pub prepare: bool,
    /// Run one DAA run by id, or by its 0-based index in `--list` (e.g. $SLURM_ARRAY_TASK_ID).
    #[arg(long)]
    pub run: Option<String>,
}

pub fn sweep(a: SweepArgs) -> Result<()> {
    let cfg = teach_config(&a.scale, &a.config)?;
    let runs = cfg.runs();
    if a.list {
        for r in &runs {
            println!("{}", r.id());
        }
        return Ok(());
    }
    let t = Teach::new(cfg, &a.out)?;
    if a.prepare {
        for s in &t.cfg.sizes {
            t.sft_model(&s.name)?;
        }
        t.pairs()?;
        for s in &t.cfg.sizes {
            t.run_sft_eval(&s.name)?;
        }
    }
    if let Some(id) = &a.run {
        let spec = match id.parse::<usize>() {
            Ok(i) => runs
                .get(i)
                .cloned()
                .with_context(|| format!("run index {i} out of range (0..{})", runs.len()))?,
            Err(_) => runs
                .iter()
                .find(|r| &r.id() == id)
                .cloned()
                .with_context(|| format!("no run {id:?} in the grid (see --list)"))?,
        };
        t.run_daa(&spec)?;
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct CollectArgs {
    /// The sweep's output directory (its results/ folder holds one file per finished run).
    #[arg(long, default_value = "out/teach")]
    pub out: PathBuf,
}

pub fn collect(a: CollectArgs) -> Result<()> {
    let (rows, samples) = crate::sweep::teach::collect_results(&a.out.join("results"))?;
    crate::sweep::tables::write_tables(&a.out, &rows, &samples)?;
    crate::plots::write_report(&a.out, &rows, &samples, None)?;
    println!(
        "collect: {} result rows into {}",
        rows.len(),
        a.out.join("results.parquet").display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Expected results table (parquet), e.g. artifact/expected/teach/results.parquet.
    #[arg(long)]
    pub expected: PathBuf,
    /// Actual results table (parquet) of a fresh run.
    #[arg(long)]
    pub actual: PathBuf,
    /// Tolerance on win rates (absolute).
    #[arg(long, default_value_t = 0.05)]
    pub win_tol: f64,
    /// Relative tolerance on KL (plus an absolute 0.05 nats).
    #[arg(long, default_value_t = 0.25)]
    pub kl_rel_tol: f64,
}

/// Differences between two results tables, matched on (objective, beta, size, checkpoint,
/// seed). Returns one line per difference beyond tolerance, and per missing row.
pub fn compare_rows(
    expected: &[ResultRow],
    actual: &[ResultRow],
    win_tol: f64,
    kl_rel_tol: f64,
) -> Vec<String> {
    let key = |r: &ResultRow| {
        format!(
            "{}/beta={}/{}/ckpt={:.3}/seed={}",
            r.objective, r.beta, r.size, r.checkpoint, r.seed
        )
    };
    let mut out = vec![];
    for e in expected {
        match actual.iter().find(|a| key(a) == key(e)) {
            None => out.push(format!("{}: missing from the actual table", key(e))),
            Some(a) => {
                if !((a.win_rate - e.win_rate).abs() <= win_tol) {
                    out.push(format!(
                        "{}: win_rate {:.4} vs expected {:.4} (tolerance {win_tol})",
                        key(e),
                        a.win_rate,
                        e.win_rate
                    ));
                }
                if !((a.kl - e.kl).abs() <= kl_rel_tol * e.kl.abs() + 0.05) {
                    out.push(format!(
                        "{}: kl {:.4} vs expected {:.4} (relative tolerance {kl_rel_tol})",
                        key(e),
                        a.kl,
                        e.kl
                    ));
                }
            }
        }
    }
    for a in actual {
        if !expected.iter().any(|e| key(e) == key(a)) {
            out.push(format!("{}: not in the expected table", key(a)));
        }
    }
    out
}

pub fn compare(a: CompareArgs) -> Result<()> {
    let e = crate::sweep::tables::read_results_parquet(&a.expected)?;
    let x = crate::sweep::tables::read_results_parquet(&a.actual)?;
    let diffs = compare_rows(&e, &x, a.win_tol, a.kl_rel_tol);
    for d in &diffs {
        println!("{d}");
    }
    println!(
        "compare: {} rows expected, {} actual, {} differences beyond tolerance",
        e.len(),
        x.len(),
        diffs.len()
    );
    if !diffs.is_empty() {
        bail!("{} differences beyond tolerance", diffs.len());
    }
    Ok(())
}
