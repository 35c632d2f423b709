//! `overopt reproduce`, and the job-array entry points `overopt sweep` / `overopt collect` /
//! `overopt compare`.

use crate::analysis::table::{ResultRow, SampleRow};
use crate::sweep::paper::Paper;
use crate::sweep::teach::RunSpec;
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
    /// Output directory; the results table is OUT/results.parquet. Default: out/<scale> (at
    /// paper scale the run configurations' `runs/paper/...` paths are re-rooted there).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only DAA runs whose id contains one of these strings (repeatable).
    #[arg(long)]
    pub only: Vec<String>,
    /// Stages run at a time, each an `overopt sweep` process with CPUs / jobs threads
    /// (0: one per CPU). 1 runs everything in this process.
    #[arg(long, default_value_t = 0)]
    pub jobs: usize,
}

/// The sweep of a scale: the teach pipeline or the paper-scale grid.
enum Scale {
    Teach(Teach),
    Paper(Paper),
}

fn check_scale(scale: &str) -> Result<()> {
    if scale != "teach" && scale != "paper" {
        bail!("unknown --scale {scale:?}: expected teach or paper");
    }
    Ok(())
}

fn teach_config(scale: &str, config: &Option<PathBuf>) -> Result<TeachConfig> {
    check_scale(scale)?;
    if scale == "paper" {
        bail!("--scale paper has a grid file, not a teach configuration");
    }
    TeachConfig::from_file(&config_path(scale, config))
}

/// The configuration file: the given one, else artifact/configs/teach/teach.toml or
/// artifact/configs/paper/grid.toml.
fn config_path(scale: &str, config: &Option<PathBuf>) -> PathBuf {
    config.clone().unwrap_or_else(|| match scale {
        "paper" => PathBuf::from("artifact/configs/paper/grid.toml"),
        _ => PathBuf::from(format!("artifact/configs/{scale}/{scale}.toml")),
    })
}

/// The sweep of `scale` into `out` (default: out/<scale>, where the notebooks look).
fn open_scale(scale: &str, config: &Option<PathBuf>, out: &Option<PathBuf>) -> Result<Scale> {
    check_scale(scale)?;
    let out = out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("out/{scale}")));
    if scale == "paper" {
        return Ok(Scale::Paper(Paper::new(&config_path(scale, config), &out)?));
    }
    Ok(Scale::Teach(Teach::new(
        teach_config(scale, config)?,
        &out,
    )?))
}

impl Scale {
    fn out(&self) -> &Path {
        match self {
            Scale::Teach(t) => &t.out,
            Scale::Paper(p) => &p.out,
        }
    }

    fn collect(&self) -> Result<(Vec<ResultRow>, Vec<SampleRow>)> {
        match self {
            Scale::Teach(t) => t.collect(),
            Scale::Paper(p) => p.collect(),
        }
    }
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
    let scale = open_scale(&a.scale, &a.config, &a.out)?;
    let out = scale.out().to_path_buf();
    let toy = if a.section == "all" || a.section == "toy-mdp" {
        Some(run_toy(&out)?)
    } else {
        None
    };
    let (rows, samples) = if a.section == "toy-mdp" {
        (vec![], vec![])
    } else if let Scale::Paper(p) = &scale {
        // One process: each stage uses the whole GPU.
        let (rows, samples) = p.run_all(&a.only)?;
        crate::sweep::tables::write_tables(&out, &rows, &samples)?;
        (rows, samples)
    } else {
        let cfg = teach_config(&a.scale, &a.config)?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let jobs = if a.jobs == 0 { cpus } else { a.jobs };
        let (rows, samples) = if jobs > 1 {
            let stages = crate::sweep::local::jobs(&cfg, &a.only)?;
            // The workers read the same configuration file (a relative default resolves in
            // this working directory, which they inherit).
            let config = config_path(&a.scale, &a.config);
            let exe = std::env::current_exe().context("cannot locate the overopt executable")?;
            println!(
                "reproduce: {} stages, {jobs} at a time, {} thread(s) each",
                stages.len(),
                (cpus / jobs).max(1)
            );
            crate::sweep::local::run(&exe, &config, &out, &stages, jobs, (cpus / jobs).max(1))?;
            scale.collect()?
        } else {
            Teach::new(cfg, &out)?.run_all(&a.only)?
        };
        crate::sweep::tables::write_tables(&out, &rows, &samples)?;
        (rows, samples)
    };
    if a.section != "toy-mdp" {
        println!(
            "reproduce: {} result rows, {} sample rows",
            rows.len(),
            samples.len()
        );
    }
    let report = crate::plots::write_report(&out, &rows, &samples, toy.as_ref())?;
    println!(
        "reproduce: {} figures in {}",
        report.figures.len(),
        out.join("figures").display()
    );
    for v in &report.verdicts {
        println!("{}", v.summary);
    }
    println!(
        "reproduce: done in {:.0} s; outputs in {}",
        t0.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct SweepArgs {
    /// teach or paper.
    #[arg(long, default_value = "teach")]
    pub scale: String,
    /// The teach configuration or the paper grid; default as for `reproduce`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output directory; default out/<scale>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the id of every DAA run, one per line (for a scheduler's job array).
    #[arg(long)]
    pub list: bool,
    /// Run the shared stages every job needs (teach: SFT of each size, preference pairs, SFT
    /// evaluations; paper: the TL;DR export, SFT of each model, SFT evaluations). Run once
    /// before the array.
    #[arg(long)]
    pub prepare: bool,
    /// Run one DAA run by id, or by its 0-based index in `--list` (e.g. $SLURM_ARRAY_TASK_ID).
    #[arg(long)]
    pub run: Option<String>,
    /// Run one shared stage (what `--prepare` runs, one piece at a time): teach `sft:SIZE`,
    /// `pairs` or `sft-eval:SIZE` (`reproduce --jobs` runs them side by side); paper `data`,
    /// `sft:MODEL` or `sft-eval:MODEL`.
    #[arg(long)]
    pub stage: Option<String>,
}

/// The run of `runs` named by `id`: its id, or its 0-based index in the list.
fn pick_run(runs: &[RunSpec], id: &str) -> Result<RunSpec> {
    match id.parse::<usize>() {
        Ok(i) => runs
            .get(i)
            .cloned()
            .with_context(|| format!("run index {i} out of range (0..{})", runs.len())),
        Err(_) => runs
            .iter()
            .find(|r| r.id() == id)
            .cloned()
            .with_context(|| format!("no run {id:?} in the grid (see --list)")),
    }
}

pub fn sweep(a: SweepArgs) -> Result<()> {
    let scale = open_scale(&a.scale, &a.config, &a.out)?;
    let runs = match &scale {
        Scale::Teach(t) => t.cfg.runs(),
        Scale::Paper(p) => p.runs()?,
    };
    if a.list {
        for r in &runs {
            println!("{}", r.id());
        }
        return Ok(());
    }
    match &scale {
        Scale::Teach(t) => {
            if a.prepare {
                for s in &t.cfg.sizes {
                    t.sft_model(&s.name)?;
                }
                t.pairs()?;
                for s in &t.cfg.sizes {
                    t.run_sft_eval(&s.name)?;
                }
            }
            if let Some(stage) = &a.stage {
                match stage.split_once(':') {
                    Some(("sft", size)) => {
                        t.sft_model(size)?;
                    }
                    Some(("sft-eval", size)) => {
                        t.run_sft_eval(size)?;
                    }
                    None if stage == "pairs" => {
                        t.pairs()?;
                    }
                    _ => bail!(
                        "unknown --stage {stage:?}: expected sft:SIZE, pairs or sft-eval:SIZE"
                    ),
                }
            }
            if let Some(id) = &a.run {
                t.run_daa(&pick_run(&runs, id)?)?;
            }
        }
        Scale::Paper(p) => {
            if a.prepare {
                p.prepare()?;
            }
            if let Some(stage) = &a.stage {
                match stage.split_once(':') {
                    Some(("sft", model)) => {
                        p.sft(model)?;
                    }
                    Some(("sft-eval", model)) => {
                        p.run_sft_eval(model)?;
                    }
                    None if stage == "data" => p.data()?,
                    _ => bail!(
                        "unknown --stage {stage:?}: expected data, sft:MODEL or sft-eval:MODEL"
                    ),
                }
            }
            if let Some(id) = &a.run {
                p.run_daa(&pick_run(&runs, id)?)?;
            }
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct CollectArgs {
    /// The sweep's output directory (its results/ folder holds one file per finished run);
    /// default out/<scale> (out/teach without --scale).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The scale of the sweep's configuration (with --config or alone: the configuration
    /// whose grid the results must match).
    #[arg(long)]
    pub scale: Option<String>,
    /// The sweep's configuration: only its grid's result files are collected, and one made
    /// with other settings is an error. Without --scale or --config every result file is
    /// collected as it is.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub fn collect(a: CollectArgs) -> Result<()> {
    let (out, (rows, samples)) = if a.scale.is_some() || a.config.is_some() {
        let scale = open_scale(a.scale.as_deref().unwrap_or("teach"), &a.config, &a.out)?;
        (scale.out().to_path_buf(), scale.collect()?)
    } else {
        let out = a.out.clone().unwrap_or_else(|| PathBuf::from("out/teach"));
        let tables = crate::sweep::teach::collect_results(&out.join("results"))?;
        (out, tables)
    };
    let dir = out.join("results");
    // Refuse before writing anything: with no per-run results the tables, claims and figures
    // would be overwritten by empty ones (e.g. when pointed at artifact/expected/teach, which
    // holds the finished tables but no results/ folder).
    if rows.is_empty() {
        bail!(
            "collect: no per-run results in {} (expected one <run>.json per finished run, as \
             `overopt sweep` or `overopt reproduce` write them); nothing written to {}",
            dir.display(),
            out.display()
        );
    }
    crate::sweep::tables::write_tables(&out, &rows, &samples)?;
    crate::plots::write_report(&out, &rows, &samples, None)?;
    println!(
        "collect: {} result rows into {}",
        rows.len(),
        out.join("results.parquet").display()
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
    /// Tolerance on win rates (absolute), the floor under the noise allowance.
    #[arg(long, default_value_t = 0.05)]
    pub win_tol: f64,
    /// Relative tolerance on KL (plus an absolute 0.05 nats), the floor under the noise
    /// allowance.
    #[arg(long, default_value_t = 0.25)]
    pub kl_rel_tol: f64,
    /// Noise allowance in standard errors: a difference also passes when it is within `z`
    /// combined standard errors of the two runs (KL: `kl_se`; win rate: its 95% interval
    /// / 3.92). A run on another machine, or after a change of floating-point summation
    /// order, draws different samples, so it differs from ours by about its sampling noise.
    /// 0 turns the allowance off.
    #[arg(long, default_value_t = 4.0)]
    pub z: f64,
    /// Only compare the rows of the actual table (a subset run, e.g. `--only`): expected rows
    /// missing from it are not differences.
    #[arg(long)]
    pub subset: bool,
}

/// Tolerances of [`compare_rows`].
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub win_abs: f64,
    pub kl_rel: f64,
    pub z: f64,
    pub subset: bool,
}

/// The standard error of a win rate, from its 95% interval (0 when the interval is missing):
/// the wider side's half-width, since an interval clipped to [0, 1] keeps its full width
/// only on the side away from the bound.
fn win_se(r: &ResultRow) -> f64 {
    let w = (r.win_rate_hi - r.win_rate).max(r.win_rate - r.win_rate_lo) / 1.96;
    if w.is_finite() { w.max(0.0) } else { 0.0 }
}

fn finite_or_zero(x: f64) -> f64 {
    if x.is_finite() { x } else { 0.0 }
}

/// Differences between two results tables, matched on (objective, beta, size, checkpoint,
/// seed). Returns one line per difference beyond tolerance, and per missing row. A value
/// passes when it is within the fixed tolerance OR within `z` combined standard errors.
pub fn compare_rows(expected: &[ResultRow], actual: &[ResultRow], tol: Tolerance) -> Vec<String> {
    let key = |r: &ResultRow| {
        format!(
            "{}/beta={}/{}/ckpt={:.3}/seed={}",
            r.objective, r.beta, r.size, r.checkpoint, r.seed
        )
    };
    let mut out = vec![];
    for e in expected {
        match actual.iter().find(|a| key(a) == key(e)) {
            None if tol.subset => {}
            None => out.push(format!("{}: missing from the actual table", key(e))),
            Some(a) => {
                let se = win_se(a).hypot(win_se(e));
                let allow = tol.win_abs.max(tol.z * se);
                if !((a.win_rate - e.win_rate).abs() <= allow) {
                    out.push(format!(
                        "{}: win_rate {:.4} vs expected {:.4} (allowed {allow:.4}: {} or {} x se {se:.4})",
                        key(e),
                        a.win_rate,
                        e.win_rate,
                        tol.win_abs,
                        tol.z
                    ));
                }
                let se = finite_or_zero(a.kl_se).hypot(finite_or_zero(e.kl_se));
                let allow = (tol.kl_rel * e.kl.abs() + 0.05).max(tol.z * se);
                if !((a.kl - e.kl).abs() <= allow) {
                    out.push(format!(
                        "{}: kl {:.4} vs expected {:.4} (allowed {allow:.4}: {} relative + 0.05 or {} x se {se:.4})",
                        key(e),
                        a.kl,
                        e.kl,
                        tol.kl_rel,
                        tol.z
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
    if x.is_empty() {
        bail!("{}: the actual table has no rows", a.actual.display());
    }
    let tol = Tolerance {
        win_abs: a.win_tol,
        kl_rel: a.kl_rel_tol,
        z: a.z,
        subset: a.subset,
    };
    let diffs = compare_rows(&e, &x, tol);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(objective: &str, beta: f64, kl: f64, kl_se: f64, win: f64, win_half: f64) -> ResultRow {
        ResultRow {
            objective: objective.into(),
            beta,
            size: "small".into(),
            n_params: 1000,
            checkpoint: 1.0,
            seed: 0,
            kl,
            kl_se,
            win_rate: win,
            win_rate_lo: win - win_half,
            win_rate_hi: win + win_half,
            mean_length: 4.0,
            heldout_loss: 0.6,
            implicit_accuracy: 0.7,
            chosen_reward: -0.1,
            config_hash: "h".into(),
            length_corrected_win_rate: None,
        }
    }

    const TOL: Tolerance = Tolerance {
        win_abs: 0.05,
        kl_rel: 0.25,
        z: 4.0,
        subset: false,
    };

    /// A win rate near 1 has its interval clipped at 1: the standard error comes from the
    /// side away from the bound, not from the clipped width.
    #[test]
    fn win_rate_standard_error_ignores_the_clipped_side() {
        let mut r = row("dpo", 0.1, 1.0, 0.1, 0.98, 0.04);
        r.win_rate_hi = 1.0;
        assert!((win_se(&r) - 0.04 / 1.96).abs() < 1e-12, "{}", win_se(&r));
        let mut low = row("dpo", 0.1, 1.0, 0.1, 0.01, 0.05);
        low.win_rate_lo = 0.0;
        assert!((win_se(&low) - 0.05 / 1.96).abs() < 1e-12);
        assert!((win_se(&row("dpo", 0.1, 1.0, 0.1, 0.5, 0.1)) - 0.1 / 1.96).abs() < 1e-12);
        // Within 4 standard errors of the clipped row's, outside 4 of the clipped width's.
        let tol = Tolerance {
            win_abs: 0.0,
            ..TOL
        };
        let mut a = r.clone();
        a.win_rate = 0.98 - 0.11;
        a.win_rate_lo = a.win_rate - 0.04;
        a.win_rate_hi = a.win_rate + 0.04;
        assert!(compare_rows(&[r], &[a], tol).is_empty());
    }

    #[test]
    fn collect_without_per_run_results_refuses_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // A folder like artifact/expected/teach: finished tables, no results/ folder.
        std::fs::write(dir.path().join("results.csv"), "kept\n").unwrap();
        let args = || CollectArgs {
            out: Some(dir.path().to_path_buf()),
            scale: None,
            config: None,
        };
        let err = collect(args()).unwrap_err().to_string();
        let results = dir.path().join("results");
        assert!(
            err.contains("no per-run results") && err.contains(&results.display().to_string()),
            "{err}"
        );
        // An empty results/ folder is refused the same way.
        std::fs::create_dir(&results).unwrap();
        let err = collect(args()).unwrap_err().to_string();
        assert!(err.contains("no per-run results"), "{err}");
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["results", "results.csv"]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("results.csv")).unwrap(),
            "kept\n"
        );
    }

    #[test]
    fn identical_tables_pass_and_missing_or_extra_rows_fail() {
        let e = vec![
            row("dpo", 0.1, 1.0, 0.05, 0.4, 0.06),
            row("ipo", 0.1, 0.5, 0.05, 0.45, 0.06),
        ];
        assert!(compare_rows(&e, &e, TOL).is_empty());
        let d = compare_rows(&e, &e[..1], TOL);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("ipo") && d[0].contains("missing"), "{d:?}");
        // --subset: a partial run is compared on its own rows only, but extra rows still fail.
        let subset = Tolerance {
            subset: true,
            ..TOL
        };
        assert!(compare_rows(&e, &e[..1], subset).is_empty());
        let extra = vec![e[0].clone(), row("slic", 0.1, 1.0, 0.05, 0.4, 0.06)];
        let d = compare_rows(&e, &extra, subset);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            d[0].contains("slic") && d[0].contains("not in the expected"),
            "{d:?}"
        );
    }

    #[test]
    fn differences_within_sampling_noise_pass_and_beyond_it_fail() {
        // KL: expected 0.2 +- 0.1, actual 0.6 +- 0.1: 0.4 apart is beyond 0.25 * 0.2 + 0.05 but
        // within 4 combined standard errors (4 * 0.141 = 0.566).
        let e = vec![row("dpo", 1.0, 0.2, 0.1, 0.4, 0.06)];
        let a = vec![row("dpo", 1.0, 0.6, 0.1, 0.4, 0.06)];
        assert!(compare_rows(&e, &a, TOL).is_empty());
        let strict = Tolerance { z: 0.0, ..TOL };
        let d = compare_rows(&e, &a, strict);
        assert!(d.len() == 1 && d[0].contains("kl 0.6000"), "{d:?}");
        // Far beyond the noise: fails whatever z.
        let a = vec![row("dpo", 1.0, 2.0, 0.1, 0.4, 0.06)];
        assert_eq!(compare_rows(&e, &a, TOL).len(), 1);
        // Win rate: half-width 0.06 -> se 0.0306, combined 0.0433, allowance 4 x = 0.173.
        let a = vec![row("dpo", 1.0, 0.2, 0.1, 0.55, 0.06)];
        assert!(compare_rows(&e, &a, TOL).is_empty());
        let a = vec![row("dpo", 1.0, 0.2, 0.1, 0.65, 0.06)];
        let d = compare_rows(&e, &a, TOL);
        assert!(d.len() == 1 && d[0].contains("win_rate"), "{d:?}");
        // A NaN never passes.
        let a = vec![row("dpo", 1.0, f64::NAN, 0.1, 0.4, 0.06)];
        assert_eq!(compare_rows(&e, &a, TOL).len(), 1);
    }
}
