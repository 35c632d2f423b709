//! `overopt reproduce`: run what a paper section needs and write its tables, figures and
//! claim verdicts.

use crate::sweep::teach::{Teach, TeachConfig};
use anyhow::{Result, bail};
use clap::Args;
use std::path::PathBuf;

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

pub fn run(a: ReproduceArgs) -> Result<()> {
    if a.scale != "teach" {
        bail!(
            "--scale {}: only the teach scale is wired into `reproduce` so far",
            a.scale
        );
    }
    let path = a
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("artifact/configs/teach/teach.toml"));
    let cfg = TeachConfig::from_file(&path)?;
    let t = Teach::new(cfg, &a.out)?;
    let t0 = std::time::Instant::now();
    let (rows, samples) = t.run_all(&a.only)?;
    crate::sweep::tables::write_tables(&a.out, &rows, &samples)?;
    println!(
        "reproduce: {} result rows, {} sample rows in {} ({:.0} s)",
        rows.len(),
        samples.len(),
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
