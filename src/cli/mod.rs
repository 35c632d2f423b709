//! The `overopt` command line. Each subcommand is a thin layer over library calls.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod model_cmds;

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
}

pub fn main() -> Result<()> {
    run(Cli::parse())
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Score(a) => model_cmds::score(a),
        Command::Sample(a) => model_cmds::sample(a),
    }
}
