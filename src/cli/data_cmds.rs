//! `overopt export-tldr`: the TL;DR sets of a paper-scale data config as the JSON-lines files
//! that `overopt sft` / `overopt daa` read (the `data.train` paths of artifact/configs/paper).
//!
//! The held-out files have different uses. `sft-eval.jsonl` (the SFT set's evaluation split)
//! holds the evaluation prompts with their human-written reference summaries as `response`:
//! the policy samples from those prompts and the judge compares each sample with that
//! reference (`[eval] prompt_file` of artifact/configs/paper/grid.toml). `prefs-eval.jsonl`
//! (the comparisons' evaluation split) holds preference pairs, which have no reference summary;
//! it is for the held-out DAA loss, implicit-reward accuracy and E[r(x, y_w)].

use crate::data::tldr::{self, Loaded, Split, TldrConfig};
use crate::hub::HubAccess;
use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::{Path, PathBuf};

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

/// What one exported file holds.
#[derive(Debug, Serialize)]
struct FileSummary {
    file: String,
    records: usize,
    /// Rows dropped on purpose (preference rows without a post).
    skipped: usize,
    /// Parquet files read, as paths inside the dataset repository.
    read: Vec<String>,
}

fn write_split<T: Serialize>(out: &Path, name: &str, loaded: &Loaded<T>) -> Result<FileSummary> {
    let path = out.join(name);
    tldr::write_jsonl(&path, &loaded.records)?;
    let read = loaded
        .files
        .iter()
        .map(|p| {
            // `.../snapshots/<commit>/<config>/<split>/NNNN.parquet` -> `<config>/<split>/NNNN...`
            let parts: Vec<_> = p.iter().map(|c| c.to_string_lossy().into_owned()).collect();
            match parts.iter().position(|c| c == "snapshots") {
                Some(i) if i + 2 < parts.len() => parts[i + 2..].join("/"),
                _ => p.display().to_string(),
            }
        })
        .collect();
    Ok(FileSummary {
        file: name.to_string(),
        records: loaded.records.len(),
        skipped: loaded.skipped,
        read,
    })
}

/// Export the four sets of `cfg` into `out` through `hub`; returns the manifest it wrote.
pub fn export_tldr(cfg: &TldrConfig, hub: &HubAccess, out: &Path) -> Result<serde_json::Value> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut files = Vec::new();
    for (name, split) in [
        ("sft-train.jsonl", Split::Train),
        ("sft-eval.jsonl", Split::Eval),
    ] {
        let loaded = tldr::load_sft_records(cfg, split, hub)
            .with_context(|| format!("the SFT set ({})", cfg.sft.repo))?;
        files.push(write_split(out, name, &loaded)?);
    }
    for (name, split) in [
        ("prefs-train.jsonl", Split::Train),
        ("prefs-eval.jsonl", Split::Eval),
    ] {
        let loaded = tldr::load_pref_records(cfg, split, hub)
            .with_context(|| format!("the preference set ({})", cfg.prefs.repo))?;
        files.push(write_split(out, name, &loaded)?);
    }
    let manifest = serde_json::json!({
        "config": cfg,
        "files": files,
    });
    crate::util::write_atomic(
        &out.join("export.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    Ok(manifest)
}

pub fn export(a: ExportArgs) -> Result<()> {
    let cfg = TldrConfig::from_file(&a.data)?;
    let hub = HubAccess::from_env();
    let manifest = export_tldr(&cfg, &hub, &a.out)?;
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
