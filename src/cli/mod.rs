//! The `overopt` command line. Each subcommand is a thin layer over library calls.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod judge_cmd;
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
    /// Judge candidate summaries against reference summaries with an OpenAI-compatible judge:
    /// reads JSON lines {"prompt", "candidate", "reference"} (optional "id"), writes one verdict
    /// line per input and a summary JSON (win rate, interval, position bias, tokens, cost).
    Judge(judge_cmd::JudgeArgs),
}

pub fn main() -> Result<()> {
    run(Cli::parse())
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Score(a) => model_cmds::score(a),
        Command::Sample(a) => model_cmds::sample(a),
        Command::Judge(a) => judge_cmd::run(a),
    }
}
