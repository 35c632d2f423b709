//! `overopt export-tldr`: the TL;DR sets of a paper-scale data config as the JSON-lines files
//! that `overopt sft` / `overopt daa` read (the `data.train` paths of artifact/configs/paper).
//!
//! The held-out files have different uses. `sft-eval.jsonl` (the SFT set's evaluation split)
//! holds the evaluation prompts with their human-written reference summaries as `response`:
//! the policy samples from those prompts and the judge compares each sample with that
//! reference (`[eval] prompt_file` of artifact/configs/paper/grid.toml). `prefs-eval.jsonl`
//! (the comparisons' evaluation split) holds preference pairs, which have no reference summary;
//! it is for the held-out DAA loss, implicit-reward accuracy and E[r(x, y_w)].

use crate::data::tldr::{self, TldrConfig};
use crate::hub::HubAccess;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The TL;DR data config (`overopt::data::tldr::TldrConfig`, e.g.
    /// artifact/configs/paper/data.toml).
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: sft-train.jsonl, sft-eval.jsonl (evaluation prompts with their reference
    /// summaries), prefs-train.jsonl, prefs-eval.jsonl (held-out pairs) and export.json (counts
    /// and the parquet files read).
    #[arg(long, default_value = "runs/paper/data")]
    pub out: PathBuf,
}

pub fn export(a: ExportArgs) -> Result<()> {
    let cfg = TldrConfig::from_file(&a.data)?;
    let hub = HubAccess::from_env();
    let manifest = tldr::export(&cfg, &hub, &a.out)?;
    for f in manifest["files"].as_array().into_iter().flatten() {
        println!(
            "export-tldr: {} {} records ({} skipped) from {} parquet file(s)",
            a.out.join(f["file"].as_str().unwrap_or("?")).display(),
            f["records"],
            f["skipped"],
            f["read"].as_array().map_or(0, Vec::len)
        );
    }
    Ok(())
}
