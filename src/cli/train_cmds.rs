//! `overopt sft --config F` and `overopt daa --config F` ([`crate::train::run`]).

use crate::train::config::RunConfig;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The run configuration (TOML).
    #[arg(long)]
    pub config: PathBuf,
}

pub fn sft(a: TrainArgs) -> Result<()> {
    let cfg = RunConfig::from_file(&a.config)?;
    let out = crate::train::run::sft(&cfg, &a.config)?;
    println!(
        "sft: {} steps, checkpoints in {}",
        out.total_steps,
        cfg.out_dir.display()
    );
    Ok(())
}

pub fn daa(a: TrainArgs) -> Result<()> {
    let cfg = RunConfig::from_file(&a.config)?;
    let out = crate::train::run::daa(&cfg, &a.config)?;
    println!(
        "daa: {} steps, checkpoints in {}",
        out.total_steps,
        cfg.out_dir.display()
    );
    Ok(())
}
