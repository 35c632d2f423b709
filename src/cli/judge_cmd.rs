//! `overopt judge`: win rates of candidate summaries against reference summaries.

use crate::eval::judge::{Judge, JudgeItem, OpenAiJudge, OpenAiJudgeConfig, VerdictStatus};
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct JudgeArgs {
    /// JSON lines {"prompt", "candidate", "reference"} with an optional "id" (string or number;
    /// default: the record's 0-based index). Ids must be unique; they seed the order.
    #[arg(long)]
    pub input: PathBuf,
    /// Verdicts, one JSON line per input record, in input order.
    #[arg(long)]
    pub output: PathBuf,
    /// Summary JSON; default: the output path with its extension replaced by `.summary.json`.
    /// The summary is also printed on standard output.
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// TOML file of judge settings (the fields of OpenAiJudgeConfig); flags override it. The API
    /// key comes from this file's `api_key` or the environment (OPENAI_API_KEY), never a flag.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// OpenAI-compatible base URL (requests go to {base_url}/chat/completions); default:
    /// $OPENAI_BASE_URL, else https://api.openai.com/v1.
    #[arg(long)]
    pub base_url: Option<String>,
    /// Judge model (default gpt-4-turbo-2024-04-09, the paper's).
    #[arg(long)]
    pub model: Option<String>,
    /// Folder of cached replies; a re-run with the same folder makes no request for a cached
    /// comparison. Default: the config's `cache_dir`, else the output path with its extension
    /// replaced by `.cache` (so an interrupted or partly failed run resumes without paying twice).
    #[arg(long, conflicts_with = "no_cache")]
    pub cache_dir: Option<PathBuf>,
    /// Keep no cache of replies.
    #[arg(long)]
    pub no_cache: bool,
    /// Text file with the judging prompt in your own wording (e.g. the DPO paper's, word for
    /// word), with the placeholders {post}, {summary_a} and {summary_b}; default: the crate's.
    #[arg(long)]
    pub prompt_template: Option<PathBuf>,
    /// Proxy URL for the requests; "none" for none. Default: the config's `proxy`, else the
    /// environment's https_proxy / http_proxy / all_proxy (not for loopback hosts or no_proxy).
    #[arg(long)]
    pub proxy: Option<String>,
    /// The request field of the reply's token limit: max_tokens (GPT-4, most servers) or
    /// max_completion_tokens (OpenAI's newer models).
    #[arg(long)]
    pub token_limit_param: Option<String>,
    /// Finish with success even when comparisons failed. Without it, the verdicts and the
    /// summary are still written, then the command fails, naming the first error.
    #[arg(long)]
    pub allow_failed: bool,
    /// Requests in flight at most.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Seed of the per-comparison order.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Price per 1000 prompt tokens, for the reported cost.
    #[arg(long)]
    pub price_prompt_per_1k: Option<f64>,
    /// Price per 1000 completion tokens, for the reported cost.
    #[arg(long)]
    pub price_completion_per_1k: Option<f64>,
}

#[derive(Deserialize)]
struct InputLine {
    #[serde(default)]
    id: Option<serde_json::Value>,
    prompt: String,
    candidate: String,
    reference: String,
}

fn summary_path(output: &Path) -> PathBuf {
    output.with_extension("summary.json")
}

fn default_cache_dir(output: &Path) -> PathBuf {
    output.with_extension("cache")
}

pub fn run(args: JudgeArgs) -> Result<()> {
    let mut cfg: OpenAiJudgeConfig = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", p.display()))?
        }
        None => OpenAiJudgeConfig::default(),
    };
    if let Some(v) = &args.base_url {
        cfg.base_url = Some(v.clone());
    }
    if let Some(v) = &args.model {
        cfg.model = v.clone();
    }
    if let Some(v) = &args.cache_dir {
        cfg.cache_dir = Some(v.clone());
    }
    if args.no_cache {
        cfg.cache_dir = None;
    } else if cfg.cache_dir.is_none() {
        cfg.cache_dir = Some(default_cache_dir(&args.output));
    }
    if let Some(v) = &args.prompt_template {
        cfg.prompt_template = Some(v.clone());
    }
    if let Some(v) = &args.proxy {
        cfg.proxy = Some(v.clone());
    }
    if let Some(v) = &args.token_limit_param {
        cfg.token_limit_param = v.clone();
    }
    if let Some(v) = args.concurrency {
        cfg.concurrency = v;
    }
    if let Some(v) = args.seed {
        cfg.seed = v;
    }
    if let Some(v) = args.price_prompt_per_1k {
        cfg.price_prompt_per_1k = v;
    }
    if let Some(v) = args.price_completion_per_1k {
        cfg.price_completion_per_1k = v;
    }

    let lines: Vec<InputLine> = crate::util::read_jsonl(&args.input)?;
    let items = lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let id = match l.id {
                None | Some(serde_json::Value::Null) => i.to_string(),
                Some(serde_json::Value::String(s)) => s,
                Some(serde_json::Value::Number(n)) => n.to_string(),
                Some(other) => {
                    return Err(anyhow!(
                        "{}: record {}: id must be a string or a number, got {other}",
                        args.input.display(),
                        i + 1
                    ));
                }
            };
            Ok(JudgeItem {
                id,
                prompt: l.prompt,
                candidate: l.candidate,
                reference: l.reference,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let judge = OpenAiJudge::new(cfg)?;
    let report = judge
        .judge(&items)
        .with_context(|| format!("judging {}", args.input.display()))?;
    crate::util::write_atomic(
        &args.output,
        crate::util::to_jsonl(&report.verdicts)?.as_bytes(),
    )?;

    let s = &report.summary;
    let out = serde_json::json!({
        "input": args.input,
        "verdicts": args.output,
        "judge_model": judge.config().model,
        "base_url": judge.base_url(),
        "seed": judge.config().seed,
        "temperature": judge.config().temperature,
        "max_tokens": judge.config().max_tokens,
        "token_limit_param": judge.config().token_limit_param,
        "prompt_template": judge.config().prompt_template,
        "proxy": judge.proxy().map(|(url, from)| serde_json::json!({"url": url, "from": from})),
        "cache_dir": judge.config().cache_dir,
        "summary": s,
    });
    let text = serde_json::to_string_pretty(&out)?;
    let spath = args
        .summary
        .clone()
        .unwrap_or_else(|| summary_path(&args.output));
    crate::util::write_atomic(&spath, format!("{text}\n").as_bytes())?;
    println!("{text}");
    if s.unparseable > 0 {
        eprintln!(
            "warning: {} of {} replies had no readable `Preferred:` line; they are left out of the \
             win rate (their texts are in {})",
            s.unparseable,
            s.n,
            args.output.display()
        );
    }
    if s.failed > 0 {
        let first = report
            .verdicts
            .iter()
            .find(|v| v.status == VerdictStatus::Failed)
            .map(|v| format!("item {}: {}", v.id, v.error.as_deref().unwrap_or("")))
            .unwrap_or_default();
        let retry = match &judge.config().cache_dir {
            Some(d) => format!(
                "a re-run with the same cache ({}) asks only these again",
                d.display()
            ),
            None => "without a cache, a re-run asks every comparison again".to_string(),
        };
        let msg = format!(
            "{} of {} comparisons failed (first: {first}); they are left out of the win rate; \
             verdicts and summary are written to {} and {}; {retry}",
            s.failed,
            s.n,
            args.output.display(),
            spath.display()
        );
        if !args.allow_failed {
            bail!("{msg} (--allow-failed accepts a partial result)");
        }
        eprintln!("warning: {msg}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_summary_path() {
        assert_eq!(
            summary_path(Path::new("out/v.jsonl")),
            PathBuf::from("out/v.summary.json")
        );
        assert_eq!(
            summary_path(Path::new("v")),
            PathBuf::from("v.summary.json")
        );
        assert_eq!(
            default_cache_dir(Path::new("out/v.jsonl")),
            PathBuf::from("out/v.cache")
        );
    }
}
