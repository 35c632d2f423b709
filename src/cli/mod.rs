//! The `overopt` command line. Each subcommand is a thin layer over library calls.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod data_cmds;
mod judge_cmd;
pub(crate) mod model_cmds;
mod reproduce;
mod train_cmds;

#[derive(Parser, Debug)]
#[command(
    name = "overopt",
    version,
    about = "Reward model over-optimization in Direct Alignment Algorithms"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Summed log-probs of responses: reads JSON lines {"prompt", "response"}, writes
    /// {"logp", "n_tokens"} per line (EOS appended to each response and scored).
    Score(model_cmds::ScoreArgs),
    /// Sample continuations of prompts: reads JSON lines {"prompt"}, writes
    /// {"prompt", "response", "tokens", "logps", "finished"} per line.
    Sample(model_cmds::SampleArgs),
    /// Supervised fine-tuning from a TOML run configuration (one epoch, checkpoints, resume).
    Sft(train_cmds::TrainArgs),
    /// DPO / IPO / SLiC / R-DPO training from a TOML run configuration with a [daa] table.
    Daa(train_cmds::TrainArgs),
    /// Reproduce the paper's sections: train, evaluate, and write the results table, figures
    /// and claim verdicts (teach scale, CPU, offline by default).
    Reproduce(reproduce::ReproduceArgs),
    /// The teach grid as independent jobs: --list the runs, --prepare the shared stages, --run
    /// one (by id or index: a scheduler array task). Each job writes its own result file.
    Sweep(reproduce::SweepArgs),
    /// Merge the per-run result files of a sweep into OUT/results.parquet (+ CSV).
    Collect(reproduce::CollectArgs),
    /// Compare a results table with an expected one, within tolerances.
    Compare(reproduce::CompareArgs),
    /// Judge candidate summaries against reference summaries with an OpenAI-compatible judge:
    /// reads JSON lines {"prompt", "candidate", "reference"} (optional "id"), writes one verdict
    /// line per input and a summary JSON (win rate, interval, position bias, tokens, cost).
    Judge(judge_cmd::JudgeArgs),
    /// Export the TL;DR SFT and preference sets of a data config (hub parquet, cache first) as
    /// the JSON lines that `sft` / `daa` read: sft-train, sft-eval (evaluation prompts with
    /// their reference summaries), prefs-train, prefs-eval (held-out pairs).
    ExportTldr(data_cmds::ExportArgs),
}

pub fn main() -> Result<()> {
    run(Cli::parse())
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Score(a) => model_cmds::score(a),
        Command::Sample(a) => model_cmds::sample(a),
        Command::Sft(a) => train_cmds::sft(a),
        Command::Daa(a) => train_cmds::daa(a),
        Command::Judge(a) => judge_cmd::run(a),
        Command::Reproduce(a) => reproduce::run(a),
        Command::Sweep(a) => reproduce::sweep(a),
        Command::Collect(a) => reproduce::collect(a),
        Command::Compare(a) => reproduce::compare(a),
        Command::ExportTldr(a) => data_cmds::export(a),
    }
}
