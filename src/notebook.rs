//! The notebooks' facade (notebooks/*.ipynb, run in the evcxr Jupyter kernel).
//!
//! A notebook cell should be a few lines: pick the profile, load or train, show a table or a
//! figure, state a verdict. Everything else lives here, where it is compiled once with the
//! crate, tested like the rest of it, and shared by every notebook:
//!
//! - [`profile`] / [`profile_for`]: which configuration a notebook runs. The environment
//!   decides first: `OVEROPT_NOTEBOOK_PROFILE=smoke` is the tiny configuration the test suite
//!   runs ([`smoke_config`]); `OVEROPT_SCALE=teach|paper` picks a scale; otherwise the scale a
//!   notebook's first cell names (teach by default: `artifact/configs/teach/teach.toml`).
//!   `OVEROPT_RESULTS` overrides the results directory, `OVEROPT_CONFIG` the teach TOML.
//! - [`load_or_run`]: the results table of a profile. Finished runs in the results directory
//!   are reused; missing ones are trained (progress lines stream to the cell). Results made
//!   with another configuration are refused, not mixed in.
//! - [`toy_mdp`]: the toy MDP of section 4 (seconds; rerun every time).
//! - Section tables as [`Markdown`] (rendered by evcxr as `text/markdown`), claim verdicts
//!   ([`claims`], [`verdicts_md`]) and the sentinel [`done`] that the notebook runner looks for.
//!
//! Errors are [`Error`]: its `Display` starts with `Error:` and carries the whole cause chain,
//! because evcxr prints a `?` error with `Display` and nothing else (the runner looks for it).

use crate::analysis::claims::{Thresholds, evaluate_all_with};
use crate::analysis::fits::{FitOptions, Form, fit_table};
use crate::analysis::length::length_fits;
use crate::analysis::metrics::{Metric, metric_correlations, signed_sqrt_neg};
use crate::analysis::table::{STANDARD_OBJECTIVES, fkey};
use crate::sweep::teach::RunSpec;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

pub use crate::analysis::fits::FitGroup;
pub use crate::analysis::length::LengthFit;
pub use crate::analysis::metrics::MetricCorrelation;
pub use crate::analysis::{ResultRow, SampleRow, ToyMdpSummary, Verdict, VerdictKind};
pub use crate::plots::{Figure, Table};
pub use crate::sweep::teach::{Teach, TeachConfig};
pub use crate::toy_mdp::{ToyMdpConfig, ToyMdpReport};
pub use polars::prelude::DataFrame;

/// Environment variable that selects the profile (`smoke`, `teach`, `paper`); the test suite
/// sets `smoke`.
pub const PROFILE_ENV: &str = "OVEROPT_NOTEBOOK_PROFILE";
/// Environment variable that selects the scale (`teach`, `paper`).
pub const SCALE_ENV: &str = "OVEROPT_SCALE";
/// Environment variable that overrides the results directory.
pub const RESULTS_ENV: &str = "OVEROPT_RESULTS";
/// Environment variable that overrides the teach configuration file.
pub const CONFIG_ENV: &str = "OVEROPT_CONFIG";
/// The line the last cell of every notebook prints: `NOTEBOOK OK: <name>`.
pub const SENTINEL: &str = "NOTEBOOK OK:";

/// A notebook error: `Display` is `Error: ` followed by the whole cause chain.
pub struct Error(anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Error {
    fn from(e: E) -> Self {
        Error(e.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error: {:#}", self.0)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Error {
    /// The underlying error.
    pub fn into_anyhow(self) -> anyhow::Error {
        self.0
    }
}

/// Result of the facade's functions.
pub type Result<T> = std::result::Result<T, Error>;

macro_rules! nb_bail {
    ($($t:tt)*) => { return Err(Error(anyhow::anyhow!($($t)*))) };
}

/// Markdown text that evcxr renders as `text/markdown` when it is a cell's last expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Markdown(pub String);

impl Markdown {
    /// Called by evcxr for a cell's final value: one `text/markdown` block.
    pub fn evcxr_display(&self) {
        println!(
            "EVCXR_BEGIN_CONTENT text/markdown\n{}\nEVCXR_END_CONTENT",
            self.0
        );
    }

    /// Join several blocks with a blank line (a cell shows only its last markdown block).
    pub fn join(parts: impl IntoIterator<Item = Markdown>) -> Markdown {
        Markdown(
            parts
                .into_iter()
                .map(|m| m.0)
                .collect::<Vec<_>>()
                .join("\n\n"),
        )
    }
}

impl fmt::Display for Markdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which configuration a notebook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// The test suite's tiny configuration: seconds, checks the mechanics, not the claims.
    Smoke,
    /// The synthetic teach task of `artifact/configs/teach/teach.toml` (CPU, minutes).
    Teach,
    /// Pythia + TL;DR + a GPT-4 judge: needs a CUDA GPU, the hub and a judge endpoint.
    Paper,
}

impl Scale {
    pub fn name(self) -> &'static str {
        match self {
            Scale::Smoke => "smoke",
            Scale::Teach => "teach",
            Scale::Paper => "paper",
        }
    }

    pub fn from_name(s: &str) -> Result<Scale> {
        match s.trim().to_ascii_lowercase().as_str() {
            "smoke" => Ok(Scale::Smoke),
            "teach" | "" => Ok(Scale::Teach),
            "paper" => Ok(Scale::Paper),
            other => nb_bail!("unknown scale or profile {other:?}: expected smoke, teach or paper"),
        }
    }
}

/// The configuration a notebook runs, and where its results live.
#[derive(Debug, Clone)]
pub struct Profile {
    pub scale: Scale,
    /// The teach-pipeline configuration (`None` at paper scale).
    pub teach: Option<TeachConfig>,
    /// The toy MDP settings (section 4; the same at every scale except smoke).
    pub toy: ToyMdpConfig,
    /// Results directory (`results/`, `models/`, tables).
    pub out_dir: PathBuf,
    /// Where the configuration came from, for the reader.
    pub source: String,
}

/// The crate's root directory (where Cargo.toml is), fixed when the crate is compiled.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

/// The profile chosen by the environment, teach scale when it says nothing.
pub fn profile() -> Result<Profile> {
    profile_for("teach")
}

/// The profile chosen by the environment (`OVEROPT_NOTEBOOK_PROFILE`, then `OVEROPT_SCALE`),
/// else `default_scale` (`teach` or `paper`, as a notebook's first cell says).
pub fn profile_for(default_scale: &str) -> Result<Profile> {
    let (scale, why) = if let Some(p) = env_nonempty(PROFILE_ENV) {
        (Scale::from_name(&p)?, format!("{PROFILE_ENV}={p}"))
    } else if let Some(s) = env_nonempty(SCALE_ENV) {
        (Scale::from_name(&s)?, format!("{SCALE_ENV}={s}"))
    } else {
        (
            Scale::from_name(default_scale)?,
            "the notebook's setting".to_string(),
        )
    };
    let mut p = profile_named(scale)?;
    p.source = format!("{} (chosen by {why})", p.source);
    Ok(p)
}

/// The profile of a scale, with the environment's overrides of the results directory and the
/// teach configuration file.
pub fn profile_named(scale: Scale) -> Result<Profile> {
    let root = repo_root();
    let out_default = match scale {
        Scale::Smoke => root.join("out").join("notebook-smoke"),
        Scale::Teach => root.join("out").join("teach"),
        Scale::Paper => root.join("out").join("paper"),
    };
    let out_dir = env_nonempty(RESULTS_ENV)
        .map(PathBuf::from)
        .unwrap_or(out_default);
    let (teach, toy, source) = match scale {
        Scale::Smoke => (
            Some(smoke_config()?),
            smoke_toy_config(),
            "smoke profile (artifact/configs/teach/smoke.toml; the toy MDP with 4 seeds and \
             fewer steps)"
                .to_string(),
        ),
        Scale::Teach => {
            let path = env_nonempty(CONFIG_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("artifact/configs/teach/teach.toml"));
            let cfg = TeachConfig::from_file(&path)?;
            let shown = path
                .strip_prefix(&root)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| path.display().to_string());
            (
                Some(cfg),
                ToyMdpConfig::default(),
                format!("teach scale ({shown})"),
            )
        }
        Scale::Paper => (
            None,
            ToyMdpConfig::default(),
            "paper scale (Pythia 1B/2.8B/6.9B, TL;DR, GPT-4 judge)".to_string(),
        ),
    };
    Ok(Profile {
        scale,
        teach,
        toy,
        out_dir,
        source,
    })
}

/// The teach configuration of the smoke profile: `artifact/configs/teach/smoke.toml`, the whole
/// teach pipeline in miniature (two tiny sizes, two betas, DPO and IPO, R-DPO, a few SFT steps
/// and evaluation prompts). It checks that every notebook runs end to end; its numbers mean
/// nothing.
pub fn smoke_config() -> Result<TeachConfig> {
    Ok(TeachConfig::from_file(
        &repo_root().join("artifact/configs/teach/smoke.toml"),
    )?)
}

/// The toy MDP in the smoke profile: 4 seeds, fewer steps.
pub fn smoke_toy_config() -> ToyMdpConfig {
    let mut c = ToyMdpConfig {
        seeds: (0..4).collect(),
        ..ToyMdpConfig::default()
    };
    c.sft.steps = 60;
    c.daa.steps = 100;
    c
}

impl Profile {
    /// A short description for the first cells.
    pub fn describe(&self) -> Markdown {
        let mut s = format!(
            "**Profile:** `{}`, {}.  \n**Results directory:** `{}`",
            self.scale.name(),
            self.source,
            self.shown_out_dir()
        );
        if let Some(c) = &self.teach {
            let sizes: Vec<String> = c
                .sizes
                .iter()
                .map(|s| {
                    format!(
                        "{} ({} layers x {})",
                        s.name, s.num_hidden_layers, s.hidden_size
                    )
                })
                .collect();
            s.push_str(&format!(
                "\n\n| setting | value |\n|---|---|\n| sizes | {} |\n| objectives | {} |\n| betas | {} |\n| R-DPO | {} |\n| SFT | {} examples, batch {}, lr {} |\n| preference pairs | {} train, {} held out, from the {} SFT model |\n| DAA | lr {}, batch {}, one epoch, checkpoints {:?} |\n| evaluation | {} prompts x {} samples, exact gold judge |",
                sizes.join(", "),
                c.daa.objectives.join(", "),
                fmt_list(&c.daa.betas),
                c.rdpo
                    .as_ref()
                    .map(|r| format!("size {}, alpha {}, betas {}", r.size, r.alpha, fmt_list(&r.betas)))
                    .unwrap_or_else(|| "none".into()),
                c.sft.examples,
                c.sft.batch_size,
                c.sft.lr,
                c.pairs.n_train,
                c.pairs.n_heldout,
                c.pairs.source_size,
                c.daa.lr,
                c.daa.batch_size,
                c.daa.checkpoints,
                c.eval.n_prompts,
                c.eval.samples_per_prompt,
            ));
        } else {
            s.push_str(
                "\n\nPaper scale trains Pythia 1B / 2.8B / 6.9B on TL;DR and judges with GPT-4: \
                 it needs CUDA GPUs (`--features cuda`), the Hugging Face hub and an \
                 OpenAI-compatible judge endpoint. The notebooks only READ paper-scale results \
                 (`results.parquet` in the results directory, e.g. copied from a GPU machine); \
                 they never start paper-scale training.",
            );
        }
        Markdown(s)
    }

    /// The toy MDP settings (section 4), for the toy notebook's first cells.
    pub fn describe_toy(&self) -> Markdown {
        let c = &self.toy;
        Markdown(format!(
            "**Profile:** `{}`, {}.  \n**Toy MDP output:** `{}/toy_mdp`\n\n| setting | value |\n|---|---|\n| seeds | {} |\n| objectives | {} |\n| betas | {} |\n| policy | GRU, embedding {}, hidden {} |\n| SFT | {} full-batch steps, lr {} |\n| DAA | {} full-batch steps, lr {} |",
            self.scale.name(),
            self.source,
            self.shown_out_dir(),
            c.seeds.len(),
            c.objectives.join(", "),
            fmt_list(&c.betas),
            c.policy.embed_dim,
            c.policy.hidden,
            c.sft.steps,
            c.sft.optim.lr,
            c.daa.steps,
            c.daa.optim.lr,
        ))
    }

    /// The results directory, relative to the repository when inside it.
    pub fn shown_out_dir(&self) -> String {
        let root = repo_root();
        self.out_dir
            .strip_prefix(&root)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| self.out_dir.display().to_string())
    }
}

fn fmt_list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The evaluated sweep: every result row and every held-out sample row.
#[derive(Debug, Clone, Default)]
pub struct Results {
    pub rows: Vec<ResultRow>,
    pub samples: Vec<SampleRow>,
    pub out_dir: PathBuf,
    /// DAA / SFT-evaluation runs found finished in the results directory.
    pub reused: usize,
    /// Runs trained and evaluated by this call.
    pub trained: usize,
    pub seconds: f64,
}

impl Results {
    /// The results table as a polars DataFrame (the columns of `results.parquet`).
    pub fn frame(&self) -> Result<DataFrame> {
        Ok(crate::sweep::tables::results_frame(&self.rows)?)
    }

    /// End-of-epoch rows and the SFT rows.
    pub fn end_of_epoch(&self) -> Vec<ResultRow> {
        self.rows
            .iter()
            .filter(|r| r.is_sft() || r.is_end_of_epoch())
            .cloned()
            .collect()
    }

    /// One line for the reader: what was reused, what was trained.
    pub fn summary(&self) -> String {
        format!(
            "{} result rows, {} sample rows in {}: {} runs reused, {} trained now ({:.1} s)",
            self.rows.len(),
            self.samples.len(),
            self.out_dir.display(),
            self.reused,
            self.trained,
            self.seconds
        )
    }

    /// Sizes in the rows, smallest model first.
    pub fn sizes(&self) -> Vec<String> {
        sizes_by_params(&self.rows)
    }
}

fn sizes_by_params(rows: &[ResultRow]) -> Vec<String> {
    let mut m: BTreeMap<String, u64> = BTreeMap::new();
    for r in rows {
        m.entry(r.size.clone()).or_insert(r.n_params);
    }
    let mut v: Vec<(String, u64)> = m.into_iter().collect();
    v.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
    v.into_iter().map(|x| x.0).collect()
}

/// Refuse results made with another configuration (they would be mixed into the tables);
/// the number of this grid's runs already finished.
fn check_stale(t: &Teach) -> Result<usize> {
    match t.grid_results() {
        Ok((kept, _)) => Ok(kept.len()),
        Err(e) => Err(Error(e.context(format!(
            "results in {} cannot be reused; delete the directory or set {RESULTS_ENV} to a \
             fresh one",
            t.out.display()
        )))),
    }
}

/// The results of a profile: finished runs in its results directory are reused, missing ones
/// trained and evaluated (progress lines stream to the cell), and the tables
/// (`results.parquet`, `results.csv`, `samples.parquet`) rewritten. Rows of runs outside the
/// profile's grid that sit in the same directory are left out.
///
/// At paper scale nothing is trained: `results.parquet` must be in the results directory.
pub fn load_or_run(p: &Profile) -> Result<Results> {
    let t0 = Instant::now();
    let Some(cfg) = &p.teach else {
        let path = p.out_dir.join("results.parquet");
        if !path.is_file() {
            nb_bail!(
                "paper scale: no {} . Paper-scale runs need CUDA GPUs, the Hugging Face hub \
                 (Pythia, TL;DR) and a judge endpoint, and are not started from a notebook; \
                 run `overopt reproduce --scale paper` (it writes out/paper), copy a paper-scale \
                 results directory here, or set {RESULTS_ENV}",
                path.display()
            );
        }
        let rows = crate::sweep::tables::read_results_parquet(&path)?;
        return Ok(Results {
            reused: rows.len(),
            rows,
            samples: vec![],
            out_dir: p.out_dir.clone(),
            trained: 0,
            seconds: t0.elapsed().as_secs_f64(),
        });
    };
    let t = Teach::new(cfg.clone(), &p.out_dir)?;
    let reused = check_stale(&t)?;
    // Only this grid's runs: Teach::collect leaves out the others in the directory.
    let (rows, samples) = t.run_all(&[])?;
    crate::sweep::tables::write_tables(&p.out_dir, &rows, &samples)?;
    Ok(Results {
        rows,
        samples,
        out_dir: p.out_dir.clone(),
        reused,
        trained: t.expected_hashes().len().saturating_sub(reused),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Part of a profile's grid: the SFT models it needs, the preference pairs, the SFT policy of
/// `size` evaluated, and the DAA runs of `objective` at `size` (every beta), in the profile's
/// results directory, so that [`load_or_run`] later reuses them. Rows of that part only.
pub fn load_or_run_subset(p: &Profile, objective: &str, size: &str) -> Result<Results> {
    let t0 = Instant::now();
    let Some(cfg) = &p.teach else {
        let mut r = load_or_run(p)?;
        r.rows
            .retain(|x| x.size == size && (x.is_sft() || x.objective == objective));
        return Ok(r);
    };
    let t = Teach::new(cfg.clone(), &p.out_dir)?;
    cfg.size(size)?;
    let runs: Vec<RunSpec> = cfg
        .runs()
        .into_iter()
        .filter(|r| r.objective == objective && r.size == size)
        .collect();
    if runs.is_empty() {
        nb_bail!(
            "no {objective} runs at size {size} in this profile (objectives {:?}, sizes {:?})",
            cfg.daa.objectives,
            cfg.sizes.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
    }
    let reused_before = check_stale(&t)?;
    t.sft_model(&cfg.pairs.source_size)?;
    t.sft_model(size)?;
    t.pairs()?;
    let mut res = t.run_sft_eval(size)?;
    for r in &runs {
        let x = t.run_daa(r)?;
        res.rows.extend(x.rows);
        res.samples.extend(x.samples);
    }
    let reused_after = check_stale(&t)?;
    Ok(Results {
        rows: res.rows,
        samples: res.samples,
        out_dir: p.out_dir.clone(),
        reused: (runs.len() + 1).saturating_sub(reused_after - reused_before),
        trained: reused_after - reused_before,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The synthetic task in examples: `n` held-out posts with their reference summary (and how
/// it departs from the perfect one), the perfect summary, and the gold reward of each.
pub fn task_examples(p: &Profile, n: usize) -> Result<Markdown> {
    let Some(cfg) = &p.teach else {
        nb_bail!("the synthetic task exists at the smoke and teach scales only");
    };
    let task = crate::data::synthetic::Task::new(cfg.task.clone())?;
    let mut s = String::from(
        "| post | reference (kind) | gold | perfect summary | gold |\n|---|---|---|---|---|\n",
    );
    for ex in task.sft_examples(n, cfg.eval.prompt_seed) {
        let perfect = task.perfect_summary(&ex.post);
        s.push_str(&format!(
            "| {} | {} ({:?}) | {:.2} | {} | {:.2} |\n",
            md_cell(&task.text(&ex.post.tokens)),
            md_cell(&task.text(&ex.reference)),
            ex.kind,
            task.gold_words(&ex.post, &ex.reference),
            md_cell(&task.text(&perfect)),
            task.gold_words(&ex.post, &perfect),
        ));
    }
    Ok(Markdown(s))
}

/// `n` training preference pairs (sampled from the source SFT model, labelled by the biased
/// labeler) with the gold reward of both responses; trains what they need when missing.
pub fn pair_examples(p: &Profile, n: usize) -> Result<Markdown> {
    let Some(cfg) = &p.teach else {
        nb_bail!("the synthetic task exists at the smoke and teach scales only");
    };
    let t = Teach::new(cfg.clone(), &p.out_dir)?;
    let (train, _) = t.pairs()?;
    let mut s = String::from(
        "| post | chosen | rejected | gold chosen | gold rejected |\n|---|---|---|---|---|\n",
    );
    for pair in train.iter().take(n) {
        let (_, chosen, rejected) = t.task.pair_text(pair);
        let post = t.task.text(&pair.post.tokens);
        s.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.2} |\n",
            md_cell(&post),
            md_cell(&chosen),
            md_cell(&rejected),
            pair.gold_chosen,
            pair.gold_rejected
        ));
    }
    let stats = t.out.join("data/pair_stats.json");
    if let Ok(text) = std::fs::read_to_string(&stats)
        && let Ok(st) = serde_json::from_str::<crate::data::synthetic::PairStats>(&text)
    {
        s.push_str(&format!(
                "\n{} pairs kept of {} offered; the chosen response has the higher gold reward in {:.0}% of them and is the longer one in {:.0}% (the labeler's verbosity bias).",
                st.kept,
                st.offered,
                100.0 * st.chosen_higher_gold,
                100.0 * st.chosen_longer
            ));
    }
    Ok(Markdown(s))
}

/// Run the toy MDP section (section 4, Appendices D and E) into `OUT/toy_mdp`.
pub fn toy_mdp(p: &Profile) -> Result<ToyMdpReport> {
    Ok(crate::toy_mdp::run_section(
        &p.toy,
        &p.out_dir.join("toy_mdp"),
    )?)
}

/// The toy runs as the claim analysis reads them (one per objective, beta, seed).
pub fn toy_summaries(r: &ToyMdpReport) -> Vec<ToyMdpSummary> {
    crate::plots::toy_summaries(r)
}

/// The figure called `name` among `figs` (e.g. one of `plots::toy_mdp_figures`); the error
/// lists the names there are.
pub fn pick(figs: &[Figure], name: &str) -> Result<Figure> {
    match figs.iter().find(|f| f.name == name) {
        Some(f) => Ok(f.clone()),
        None => nb_bail!(
            "no figure {name:?}; there are: {}",
            figs.iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Verdicts C1..C9 with the default thresholds (C9 needs the toy summaries; pass `&[]` to
/// leave it unevaluated).
pub fn claims(r: &Results, toy: &[ToyMdpSummary]) -> Vec<Verdict> {
    evaluate_all_with(&r.rows, &r.samples, toy, &Thresholds::default())
}

/// The verdicts with the given ids (e.g. `["C1", "C2"]`) as a table with their summaries.
pub fn verdicts_md(verdicts: &[Verdict], ids: &[&str]) -> Markdown {
    let mut s = String::from("| claim | verdict | evidence |\n|---|---|---|\n");
    for v in verdicts
        .iter()
        .filter(|v| ids.is_empty() || ids.contains(&v.id.as_str()))
    {
        let mark = match v.verdict {
            VerdictKind::Holds => "**holds**",
            VerdictKind::Fails => "**fails**",
            VerdictKind::NotEvaluated => "*not evaluated*",
        };
        s.push_str(&format!(
            "| {} | {mark} | {} |\n",
            v.id,
            md_cell(&v.summary)
        ));
    }
    Markdown(s)
}

/// One verdict as plain lines (for `println!`): id, verdict, summary and rule.
pub fn verdict_text(verdicts: &[Verdict], id: &str) -> String {
    match verdicts.iter().find(|v| v.id == id) {
        Some(v) => format!(
            "{}: {}\n  {}\n  rule: {}",
            v.id,
            v.verdict.as_str(),
            v.summary,
            v.rule
        ),
        None => format!("{id}: no such claim"),
    }
}

/// What a profile's scale means for the verdicts: a paragraph for the reader.
pub fn scale_note(p: &Profile, verdicts: &[Verdict], ids: &[&str]) -> Markdown {
    let picked: Vec<&Verdict> = verdicts
        .iter()
        .filter(|v| ids.contains(&v.id.as_str()))
        .collect();
    let list = |k: VerdictKind| {
        picked
            .iter()
            .filter(|v| v.verdict == k)
            .map(|v| v.id.as_str())
            .collect::<Vec<_>>()
    };
    let (h, f, n) = (
        list(VerdictKind::Holds),
        list(VerdictKind::Fails),
        list(VerdictKind::NotEvaluated),
    );
    let join = |v: &[&str]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    let mut s = format!(
        "At the `{}` profile: holds: {}; fails: {}; not evaluated: {}.",
        p.scale.name(),
        join(&h),
        join(&f),
        join(&n)
    );
    if p.scale == Scale::Smoke {
        s.push_str(
            " The smoke profile (two tiny models, two betas, a few training steps) exists to \
             check that this notebook runs; its verdicts say nothing about the paper.",
        );
    }
    Markdown(s)
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn f3(x: f64) -> String {
    if x.is_finite() {
        // No "-0.000" for estimates a hair below zero (the SFT policy's KL).
        let x = if x.abs() < 5e-4 { 0.0 } else { x };
        format!("{x:.3}")
    } else {
        "-".into()
    }
}

fn f2(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "-".into()
    }
}

/// Rows averaged over seeds, keyed (objective, size, beta, checkpoint).
fn by_cell(rows: &[ResultRow]) -> BTreeMap<(String, String, i64, i64), Vec<&ResultRow>> {
    let mut m: BTreeMap<(String, String, i64, i64), Vec<&ResultRow>> = BTreeMap::new();
    for r in rows {
        m.entry((
            r.objective.clone(),
            r.size.clone(),
            fkey(r.beta),
            fkey(r.checkpoint),
        ))
        .or_default()
        .push(r);
    }
    m
}

fn mean_of(rs: &[&ResultRow], f: impl Fn(&ResultRow) -> f64) -> f64 {
    rs.iter().map(|r| f(r)).sum::<f64>() / rs.len().max(1) as f64
}

fn objective_order(o: &str) -> usize {
    match o {
        "sft" => 0,
        "dpo" => 1,
        "ipo" => 2,
        "slic" => 3,
        "rdpo" => 4,
        _ => 5,
    }
}

/// Section 3.1 / Fig. 1: the end-of-epoch policies (and the SFT policy of each size):
/// KL, sqrt(KL), win rate with its 95% interval, mean length. Seeds averaged.
pub fn end_of_epoch_table(r: &Results) -> Markdown {
    let sizes = r.sizes();
    let rows = r.end_of_epoch();
    let cells = by_cell(&rows);
    let mut keys: Vec<_> = cells.keys().cloned().collect();
    keys.sort_by(|a, b| {
        let sa = sizes.iter().position(|s| *s == a.1);
        let sb = sizes.iter().position(|s| *s == b.1);
        objective_order(&a.0)
            .cmp(&objective_order(&b.0))
            .then(a.0.cmp(&b.0))
            .then(sa.cmp(&sb))
            .then(a.2.cmp(&b.2))
    });
    let mut s = String::from(
        "| objective | size | beta | KL | sqrt(KL) | win rate [95% CI] | mean length |\n|---|---|---|---|---|---|---|\n",
    );
    for k in keys {
        let rs = &cells[&k];
        let kl = mean_of(rs, |x| x.kl);
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} [{}, {}] | {} |\n",
            k.0,
            k.1,
            if k.0 == "sft" {
                "-".into()
            } else {
                format!("{}", rs[0].beta)
            },
            f3(kl),
            f3(kl.max(0.0).sqrt()),
            f3(mean_of(rs, |x| x.win_rate)),
            f3(mean_of(rs, |x| x.win_rate_lo)),
            f3(mean_of(rs, |x| x.win_rate_hi)),
            f2(mean_of(rs, |x| x.mean_length)),
        ));
    }
    Markdown(s)
}

/// Fig. 2 / Appendix C: win rate and sqrt(KL) at each checkpoint, one line per
/// (objective, size, beta). Entries are `win (d)`.
pub fn intra_epoch_table(r: &Results) -> Markdown {
    let daa: Vec<ResultRow> = r.rows.iter().filter(|x| !x.is_sft()).cloned().collect();
    let cells = by_cell(&daa);
    let cks: BTreeSet<i64> = cells.keys().map(|k| k.3).collect();
    let mut lines: BTreeMap<(usize, String, usize, i64), Vec<String>> = BTreeMap::new();
    let sizes = r.sizes();
    for ((o, sz, b, c), rs) in &cells {
        let pos = sizes.iter().position(|s| s == sz).unwrap_or(usize::MAX);
        let col = cks.iter().position(|x| x == c).unwrap_or(0);
        let e = lines
            .entry((objective_order(o), format!("{o}|{sz}"), pos, *b))
            .or_insert_with(|| vec!["-".to_string(); cks.len()]);
        let kl = mean_of(rs, |x| x.kl);
        e[col] = format!(
            "{} ({})",
            f3(mean_of(rs, |x| x.win_rate)),
            f2(kl.max(0.0).sqrt())
        );
    }
    let mut s = String::from("| objective | size | beta |");
    for c in &cks {
        s.push_str(&format!(" {:.0}% |", *c as f64 / 1e7));
    }
    s.push_str("\n|---|---|---|");
    for _ in &cks {
        s.push_str("---|");
    }
    s.push('\n');
    for ((_, os, _, b), v) in lines {
        let (o, sz) = os.split_once('|').unwrap_or((&os, ""));
        s.push_str(&format!(
            "| {o} | {sz} | {} | {} |\n",
            b as f64 / 1e9,
            v.join(" | ")
        ));
    }
    Markdown(s)
}

/// Section 3.2: fits of the win-rate gain over the SFT policy against d = sqrt(KL), per
/// (objective, size) and pooled, every checkpoint.
pub fn fit_groups(r: &Results) -> Vec<FitGroup> {
    fit_table(
        &r.rows,
        None,
        &FitOptions {
            n_boot: 200,
            ..FitOptions::default()
        },
    )
}

/// The fit table: RMSE of R(d) = d(alpha - b ln d), of a KL + c KL^2 and of a d + c d^2, the
/// ratios claim C5 reads, and R(d)'s coefficients and peak.
pub fn fit_table_md(groups: &[FitGroup]) -> Markdown {
    let mut s = String::from(
        "| objective | size | points | RMSE R(d) | RMSE quad KL | RMSE quad d | R / quad KL | quad d / R | alpha | b | peak d |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for g in groups {
        let rm = |f: Form| g.get(f).map_or(f64::NAN, |x| x.rmse);
        let (r, qk, qd) = (rm(Form::LogD), rm(Form::QuadKl), rm(Form::QuadD));
        let logd = g.get(Form::LogD);
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            g.objective,
            g.size,
            g.n,
            f3(r),
            f3(qk),
            f3(qd),
            f2(r / qk),
            f2(qd / r),
            f3(logd.map_or(f64::NAN, |x| x.coef[0])),
            f3(logd.map_or(f64::NAN, |x| x.coef[1])),
            f2(logd.and_then(|x| x.peak_d()).unwrap_or(f64::NAN)),
        ));
    }
    Markdown(s)
}

/// Section 3.3, Fig. 3 left: standard vs length-regularized DPO at the R-DPO size, end of
/// epoch: KL, win rate and mean length per beta.
pub fn rdpo_table(r: &Results) -> Markdown {
    let rd: Vec<&ResultRow> = r.rows.iter().filter(|x| x.objective == "rdpo").collect();
    let Some(size) = rd.first().map(|x| x.size.clone()) else {
        return Markdown(
            "No R-DPO rows in these results (the configuration has no `[rdpo]`).".into(),
        );
    };
    let rows: Vec<ResultRow> = r
        .end_of_epoch()
        .into_iter()
        .filter(|x| x.size == size && (x.objective == "dpo" || x.objective == "rdpo" || x.is_sft()))
        .collect();
    let cells = by_cell(&rows);
    let mut s = format!(
        "Size `{size}`, end of epoch.\n\n| objective | beta | KL | win rate | mean length |\n|---|---|---|---|---|\n"
    );
    let mut keys: Vec<_> = cells.keys().cloned().collect();
    keys.sort_by(|a, b| {
        objective_order(&a.0)
            .cmp(&objective_order(&b.0))
            .then(a.2.cmp(&b.2))
    });
    for k in keys {
        let rs = &cells[&k];
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            k.0,
            if k.0 == "sft" {
                "-".into()
            } else {
                format!("{}", rs[0].beta)
            },
            f3(mean_of(rs, |x| x.kl)),
            f3(mean_of(rs, |x| x.win_rate)),
            f2(mean_of(rs, |x| x.mean_length)),
        ));
    }
    Markdown(s)
}

/// Section 3.3: the regression of log(pi/pi_ref)(y|x) on |y| over policy samples, one fit per
/// (objective, size, beta, checkpoint, seed).
pub fn length_fit_rows(r: &Results) -> Vec<LengthFit> {
    length_fits(&r.samples)
}

/// Fig. 3 right as a table: R^2 of the length regression, DPO / IPO / SLiC averaged, per size
/// (rows, smallest first) and beta (columns), end of epoch and all checkpoints.
pub fn length_r2_table(r: &Results, fits: &[LengthFit]) -> Markdown {
    let sizes = r.sizes();
    let betas: BTreeSet<i64> = fits
        .iter()
        .filter(|f| STANDARD_OBJECTIVES.contains(&f.objective.as_str()))
        .map(|f| fkey(f.beta))
        .collect();
    let mut s = String::from("| size | checkpoints |");
    for b in &betas {
        s.push_str(&format!(" beta {} |", *b as f64 / 1e9));
    }
    s.push_str("\n|---|---|");
    for _ in &betas {
        s.push_str("---|");
    }
    s.push('\n');
    for size in &sizes {
        for (label, end_only) in [("end of epoch", true), ("all", false)] {
            s.push_str(&format!("| {size} | {label} |"));
            for b in &betas {
                let v: Vec<f64> = fits
                    .iter()
                    .filter(|f| {
                        &f.size == size
                            && fkey(f.beta) == *b
                            && STANDARD_OBJECTIVES.contains(&f.objective.as_str())
                            && (!end_only || f.checkpoint >= crate::analysis::table::END_OF_EPOCH)
                            && f.r2.is_finite()
                    })
                    .map(|f| f.r2)
                    .collect();
                let m = if v.is_empty() {
                    f64::NAN
                } else {
                    v.iter().sum::<f64>() / v.len() as f64
                };
                s.push_str(&format!(" {} |", f3(m)));
            }
            s.push('\n');
        }
    }
    Markdown(s)
}

/// Section 3.4: Spearman correlation of implicit-reward accuracy and of held-out DAA loss with
/// win rate, per (objective, size) and pooled; 95% bootstrap intervals.
pub fn metric_rows(r: &Results) -> Vec<MetricCorrelation> {
    metric_correlations(&r.rows, 500, 0)
}

/// The metric correlations of `metrics` as a table.
pub fn metric_table(cs: &[MetricCorrelation], metrics: &[Metric]) -> Markdown {
    let mut s = String::from(
        "| objective | size | metric | points | Spearman rho [95% CI] | Pearson r |\n|---|---|---|---|---|---|\n",
    );
    for c in cs.iter().filter(|c| metrics.contains(&c.metric)) {
        let (rho, r) = match &c.corr {
            Some(k) => (
                format!(
                    "{} [{}, {}]",
                    f2(k.spearman),
                    f2(k.spearman_lo),
                    f2(k.spearman_hi)
                ),
                f2(k.pearson),
            ),
            None => (
                format!(
                    "- ({})",
                    md_cell(c.problem.as_deref().unwrap_or("undefined"))
                ),
                "-".into(),
            ),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {rho} | {r} |\n",
            c.objective,
            c.size,
            c.metric.name(),
            c.n
        ));
    }
    Markdown(s)
}

/// The metrics of section 3.4 (Fig. 4).
pub const FIG4_METRICS: [Metric; 2] = [Metric::ImplicitAccuracy, Metric::HeldoutLoss];
/// The metric of section 3.5 (Fig. 5).
pub const FIG5_METRICS: [Metric; 1] = [Metric::SqrtNegChosenReward];

/// Section 3.5 / Fig. 5: per end-of-epoch policy, E[r(x, y_w)] on held-out pairs, the x axis
/// sqrt(-E[r]) (signed when E[r] > 0), sqrt(KL) and win rate.
pub fn likelihood_table(r: &Results) -> Markdown {
    let rows: Vec<ResultRow> = r
        .end_of_epoch()
        .into_iter()
        .filter(|x| STANDARD_OBJECTIVES.contains(&x.objective.as_str()))
        .collect();
    let cells = by_cell(&rows);
    let sizes = r.sizes();
    let mut keys: Vec<_> = cells.keys().cloned().collect();
    keys.sort_by(|a, b| {
        objective_order(&a.0)
            .cmp(&objective_order(&b.0))
            .then(
                sizes
                    .iter()
                    .position(|s| *s == a.1)
                    .cmp(&sizes.iter().position(|s| *s == b.1)),
            )
            .then(a.2.cmp(&b.2))
    });
    let mut s = String::from(
        "| objective | size | beta | E[r(x, y_w)] | sqrt(-E[r]) | sqrt(KL) | win rate |\n|---|---|---|---|---|---|---|\n",
    );
    for k in keys {
        let rs = &cells[&k];
        let e = mean_of(rs, |x| x.chosen_reward);
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            k.0,
            k.1,
            rs[0].beta,
            f3(e),
            f3(signed_sqrt_neg(e)),
            f3(mean_of(rs, |x| x.kl).max(0.0).sqrt()),
            f3(mean_of(rs, |x| x.win_rate)),
        ));
    }
    Markdown(s)
}

/// Section 4: end-of-training mass per objective and beta (median [min, max] over seeds).
pub fn toy_cells_table(r: &ToyMdpReport) -> Markdown {
    let d = |x: &crate::toy_mdp::Dist| format!("{} [{}, {}]", f2(x.median), f2(x.min), f2(x.max));
    let mut s = format!(
        "{} seeds; after SFT the three demonstrations hold {} of the mass (median).\n\n| objective | beta | preferred | dispreferred | third demo | OOD (end) | OOD peak | top OOD trajectories (seeds) |\n|---|---|---|---|---|---|---|---|\n",
        r.config.seeds.len(),
        f3(r.sft_in_distribution.median)
    );
    for c in &r.cells {
        let top: Vec<String> = c
            .top_ood
            .iter()
            .map(|t| format!("{} x{}", t.trajectory, t.seeds))
            .collect();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            c.objective,
            c.beta,
            d(&c.preferred),
            d(&c.dispreferred),
            d(&c.third_demo),
            d(&c.ood),
            d(&c.peak_ood),
            top.join(", ")
        ));
    }
    Markdown(s)
}

/// Appendix D: the example state's soft value beta*logsumexp(Q/beta) against max Q.
pub fn appendix_d_table(r: &ToyMdpReport) -> Markdown {
    let mut s = format!(
        "{}\n\n| beta | soft value | max Q | soft - max | max Q of a data action | soft - data |\n|---|---|---|---|---|---|\n",
        md_cell(&r.appendix_d.example)
    );
    for row in &r.appendix_d.example_table {
        s.push_str(&format!(
            "| {} | {:.4} | {:.4} | {:.1e} | {:.4} | {:.4} |\n",
            row.beta_eval,
            row.soft_value,
            row.hard_max,
            row.soft_minus_max,
            row.max_data_q,
            row.soft_minus_data
        ));
    }
    Markdown(s)
}

/// The toy module's own C9 verdict (end of training and peak during training), per objective.
pub fn toy_c9_md(r: &ToyMdpReport) -> Markdown {
    let c = &r.c9;
    let mut s = String::from(
        "| objective | median end OOD | median OOD increase | median peak OOD | substantial at end | during training |\n|---|---|---|---|---|---|\n",
    );
    for o in &c.per_objective {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            o.objective,
            f3(o.ood.median),
            f3(o.ood_increase.median),
            f3(o.peak_ood.median),
            if o.substantial { "yes" } else { "no" },
            if o.substantial_during_training {
                "yes"
            } else {
                "no"
            },
        ));
    }
    s.push_str(&format!(
        "\nDPO seeds disagree at some beta: **{}**. C9 at the end of training: **{}**; with the peak OOD mass during training: **{}**.  \n{}",
        if c.dpo_seeds_disagree { "yes" } else { "no" },
        if c.holds { "holds" } else { "fails" },
        if c.holds_during_training { "holds" } else { "fails" },
        md_cell(&c.verdict)
    ));
    Markdown(s)
}

/// Print the sentinel the notebook runner requires from every notebook's last cell.
pub fn done(name: &str) {
    println!("{SENTINEL} {name}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(obj: &str, size: &str, beta: f64, ck: f64, kl: f64, win: f64) -> ResultRow {
        ResultRow {
            objective: obj.into(),
            beta,
            size: size.into(),
            n_params: if size == "a" { 10 } else { 20 },
            checkpoint: ck,
            seed: 0,
            kl,
            kl_se: 0.1,
            win_rate: win,
            win_rate_lo: win - 0.05,
            win_rate_hi: win + 0.05,
            mean_length: 4.0,
            heldout_loss: 0.6,
            implicit_accuracy: 0.6,
            chosen_reward: -0.2,
            config_hash: "h".into(),
            length_corrected_win_rate: None,
        }
    }

    fn results() -> Results {
        let mut rows = vec![
            row("sft", "a", 0.0, 0.0, 0.0, 0.3),
            row("sft", "b", 0.0, 0.0, 0.0, 0.35),
        ];
        for (i, b) in [0.1, 1.0].iter().enumerate() {
            for ck in [0.5, 1.0] {
                rows.push(row("dpo", "b", *b, ck, 2.0 - i as f64, 0.4));
                rows.push(row("dpo", "a", *b, ck, 3.0 - i as f64, 0.38));
            }
        }
        Results {
            rows,
            ..Default::default()
        }
    }

    #[test]
    fn smoke_config_is_valid_and_small() {
        let c = smoke_config().unwrap();
        assert!(c.sizes.len() == 2 && c.daa.betas.len() == 2);
        // Every DAA run has at least one optimizer step per checkpoint.
        let steps = c.pairs.n_train / c.daa.batch_size;
        assert!(steps >= c.daa.checkpoints.len(), "{steps} steps");
        assert!(c.rdpo.is_some(), "notebook 03 shows R-DPO");
        smoke_toy_config().validate().unwrap();
    }

    #[test]
    fn teach_profile_reads_the_artifact_config() {
        let p = profile_named(Scale::Teach).unwrap();
        let c = p.teach.as_ref().unwrap();
        assert_eq!(c.sizes.len(), 3);
        assert!(p.describe().0.contains("| betas |"));
        let paper = profile_named(Scale::Paper).unwrap();
        assert!(paper.teach.is_none());
        assert!(paper.describe().0.contains("CUDA"));
        assert!(p.describe_toy().0.contains("| seeds | 8 |"));
    }

    #[test]
    fn scale_names_parse_and_unknown_is_an_error() {
        assert_eq!(Scale::from_name("SMOKE").unwrap(), Scale::Smoke);
        assert_eq!(Scale::from_name("paper").unwrap(), Scale::Paper);
        let e = Scale::from_name("huge").unwrap_err().to_string();
        assert!(e.starts_with("Error: ") && e.contains("huge"), "{e}");
    }

    #[test]
    fn errors_display_with_prefix_and_chain() {
        let e: Error = anyhow::anyhow!("inner").context("outer").into();
        assert_eq!(e.to_string(), "Error: outer: inner");
    }

    #[test]
    fn paper_scale_without_results_says_what_it_needs() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = profile_named(Scale::Paper).unwrap();
        p.out_dir = dir.path().to_path_buf();
        let e = load_or_run(&p).unwrap_err().to_string();
        assert!(e.contains("results.parquet") && e.contains("GPU"), "{e}");
    }

    #[test]
    fn stale_results_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = Teach::new(smoke_config().unwrap(), dir.path()).unwrap();
        assert_eq!(check_stale(&t).unwrap(), 0);
        let mut r = row("sft", "xs", 0.0, 0.0, 0.0, 0.3);
        r.config_hash = t.config_hash("xs", None);
        let res = crate::sweep::teach::RunResults {
            rows: vec![r.clone()],
            samples: vec![],
            seconds: 0.0,
        };
        let p = dir.path().join("results/sft-xs.json");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, serde_json::to_string(&res).unwrap()).unwrap();
        assert_eq!(check_stale(&t).unwrap(), 1);
        r.config_hash = "something else".into();
        let res = crate::sweep::teach::RunResults {
            rows: vec![r],
            samples: vec![],
            seconds: 0.0,
        };
        std::fs::write(&p, serde_json::to_string(&res).unwrap()).unwrap();
        let e = check_stale(&t).unwrap_err().to_string();
        assert!(
            e.contains("another configuration") && e.contains("sft-xs"),
            "{e}"
        );
    }

    #[test]
    fn tables_list_every_cell() {
        let r = results();
        let t = end_of_epoch_table(&r).0;
        // header + separator + 2 SFT + 4 DPO end-of-epoch cells
        assert_eq!(t.lines().count(), 8, "{t}");
        assert!(t.lines().nth(2).unwrap().starts_with("| sft | a |"), "{t}");
        let i = intra_epoch_table(&r).0;
        assert!(i.contains("50% | 100%"), "{i}");
        assert_eq!(i.lines().count(), 6, "{i}");
        let l = likelihood_table(&r).0;
        assert!(l.contains("0.447"), "{l}"); // sqrt(0.2)
        assert!(rdpo_table(&r).0.contains("No R-DPO rows"));
    }

    #[test]
    fn verdict_tables_and_notes() {
        let r = results();
        let v = claims(&r, &[]);
        assert_eq!(v.len(), 9);
        let md = verdicts_md(&v, &["C1", "C9"]).0;
        assert_eq!(md.lines().count(), 4, "{md}");
        let p = profile_named(Scale::Smoke).unwrap();
        let n = scale_note(&p, &v, &["C1"]).0;
        assert!(n.contains("smoke"), "{n}");
        assert!(verdict_text(&v, "C9").starts_with("C9: "));
    }

    #[test]
    fn pick_finds_a_figure_by_name_or_lists_them() {
        let figs = vec![crate::plots::fig1_end_of_epoch(&results().rows)];
        let name = figs[0].name.clone();
        assert_eq!(pick(&figs, &name).unwrap().name, name);
        let e = pick(&figs, "nope").unwrap_err().to_string();
        assert!(
            e.starts_with("Error: no figure") && e.contains(&name),
            "{e}"
        );
    }

    #[test]
    fn markdown_display_is_one_block() {
        let m = Markdown::join([Markdown("a".into()), Markdown("b".into())]);
        assert_eq!(m.0, "a\n\nb");
    }
}
