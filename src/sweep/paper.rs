//! The paper-scale sweep (SPEC section 1): TL;DR -> SFT of each Pythia size -> the DAA grid
//! (objectives x betas x sizes, 4 checkpoints each) -> evaluation of every checkpoint (samples
//! on held-out prompts, KL to the SFT reference, the API judge against the human-written
//! reference summary, held-out DAA metrics) -> the same results table as the teach scale.
//!
//! It reads the grid file (artifact/configs/paper/grid.toml, [`PaperGrid`]) and the single-run
//! configurations it names, and runs them with the code of `overopt sft` / `overopt daa`
//! ([`crate::train::run`]). Paths in the grid and the run configurations that start with the
//! grid's `out_root` (runs/paper) are re-rooted to the sweep's output folder (the command line's
//! default is out/paper, where the notebooks read), so one grid serves any OUT.
//! The sweep sets, per run: the SFT run's `out_dir` (OUT/<model>/sft), and the DAA run's
//! `out_dir` (OUT/<model>/<objective>/beta-<beta>), `daa.objective`, `daa.beta`, and the policy's
//! and reference's `source` (the final SFT checkpoint).
//!
//! As in the teach sweep, every stage is skipped when its outputs exist and were made with the
//! same settings (an output of other settings is an error naming it), each evaluated run lands
//! in `OUT/results/<run>.json` only when complete, and the judge's replies are cached
//! (`OUT/judge-cache`), so an interrupted sweep resumes and pays the API only for what is
//! missing. The verdicts of every evaluation are kept in `OUT/judge/<run>/`.

use super::results::{
    RunResults, RunSpec, existing_results, merge_results, result_files, short_hash,
};
use crate::analysis::table::{ResultRow, SampleRow};
use crate::data::tldr::TldrConfig;
use crate::data::tokenizer::Tok;
use crate::data::validate::Limits;
use crate::data::{PrefExample, truncate_pair};
use crate::eval::judge::openai::{OpenAiJudge, OpenAiJudgeConfig};
use crate::eval::judge::{Judge, JudgeItem, JudgeSummary, VerdictStatus};
use crate::eval::policy::{EvalConfig, PolicyEval, evaluate_policy};
use crate::model::load::LoadedModel;
use crate::model::score::limits;
use crate::train::SpecialTokens;
use crate::train::checkpoint;
use crate::train::config::RunConfig;
use crate::train::loss::Objective;
use crate::train::run::{self as runs, PrefLine, SftLine};
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The schema name the grid file must carry.
pub const GRID_SCHEMA: &str = "overopt-paper-grid/1";

/// One model size of the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridModel {
    pub name: String,
    /// The hub id (documentation: the SFT configuration's `[model] source` is what is loaded).
    pub source: String,
    #[serde(default)]
    pub revision: Option<String>,
    /// The commit `revision` pointed to when the grid was written (documentation).
    #[serde(default)]
    pub commit_prefix: Option<String>,
    /// Parameter count as the hub reports it (documentation; the table counts the loaded model).
    pub params: u64,
    /// The SFT and DAA run configurations, relative to the grid file's folder.
    pub sft: PathBuf,
    pub daa: PathBuf,
}

fn default_heldout_pairs() -> usize {
    1024
}
fn default_eval_batch() -> usize {
    16
}

/// How every checkpoint is evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridEval {
    /// JSON lines with `prompt` and `response` (the reference summary): the first `prompts`
    /// records are the evaluation prompts.
    pub prompt_file: PathBuf,
    pub prompts: usize,
    pub temperature: f64,
    /// 0 disables the top-k filter.
    pub top_k: usize,
    /// Prompt + sample, in tokens.
    pub max_length: usize,
    pub samples_per_prompt: usize,
    /// Sampling seed, the same at every checkpoint.
    pub seed: u64,
    /// The judge model.
    pub judge: String,
    /// Preference pairs (JSON lines `prompt`, `chosen`, `rejected`) for the held-out DAA loss,
    /// implicit-reward accuracy and E[r(x, y_w)]: the first `heldout_pairs` records. Default:
    /// `prefs-eval.jsonl` next to `prompt_file`.
    #[serde(default)]
    pub heldout_file: Option<PathBuf>,
    #[serde(default = "default_heldout_pairs")]
    pub heldout_pairs: usize,
    /// Sequences per sampling / scoring batch.
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
}

/// The paper-scale grid file (artifact/configs/paper/grid.toml).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaperGrid {
    pub schema: String,
    /// The TL;DR data configuration ([`TldrConfig`]), relative to the grid file's folder.
    pub data: PathBuf,
    /// The output folder the run configurations' paths are written against.
    pub out_root: PathBuf,
    pub objectives: Vec<String>,
    /// Betas per objective.
    pub betas: BTreeMap<String, Vec<f64>>,
    pub models: Vec<GridModel>,
    pub eval: GridEval,
    /// Settings of the API judge ([`OpenAiJudgeConfig`]: base URL, prices, concurrency, a
    /// prompt template, ...); its model is `[eval] judge`. Default: the client's defaults, the
    /// key from `OPENAI_API_KEY`, the URL from `OPENAI_BASE_URL`.
    #[serde(default)]
    pub judge: Option<OpenAiJudgeConfig>,
}

impl PaperGrid {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let g: PaperGrid = toml::from_str(&text)
            .with_context(|| format!("{}: invalid paper grid", path.display()))?;
        g.validate().with_context(|| path.display().to_string())?;
        Ok(g)
    }

    /// Checks that need no file but the grid itself, each naming its key.
    pub fn validate(&self) -> Result<()> {
        if self.schema != GRID_SCHEMA {
            bail!("`schema` is {:?}; expected {GRID_SCHEMA:?}", self.schema);
        }
        if self.models.is_empty() {
            bail!("`models` is empty");
        }
        let mut names = std::collections::BTreeSet::new();
        for m in &self.models {
            if m.name.is_empty() || m.name.contains(['/', '\\']) || m.name.starts_with('.') {
                bail!("`models`: name {:?} is not a folder name", m.name);
            }
            if !names.insert(&m.name) {
                bail!("`models`: name {:?} appears twice", m.name);
            }
        }
        if self.objectives.is_empty() {
            bail!("`objectives` is empty");
        }
        for o in &self.objectives {
            Objective::from_name(o, 0.0).with_context(|| format!("`objectives`: {o:?}"))?;
            if o == "rdpo" {
                bail!("`objectives`: rdpo needs an alpha, which the paper grid has no key for");
            }
            let betas = self
                .betas
                .get(o)
                .ok_or_else(|| anyhow!("`betas.{o}` is missing"))?;
            if betas.is_empty() {
                bail!("`betas.{o}` is empty");
            }
            if let Some(b) = betas.iter().find(|b| !(b.is_finite() && **b > 0.0)) {
                bail!("`betas.{o}`: {b} is not a positive number");
            }
        }
        if let Some(k) = self.betas.keys().find(|k| !self.objectives.contains(k)) {
            bail!("`betas.{k}`: {k:?} is not in `objectives`");
        }
        let e = &self.eval;
        for (key, v) in [
            ("prompts", e.prompts),
            ("samples_per_prompt", e.samples_per_prompt),
            ("max_length", e.max_length),
            ("batch_size", e.batch_size),
        ] {
            if v == 0 {
                bail!("`eval.{key}` must be at least 1");
            }
        }
        if !(e.temperature.is_finite() && e.temperature >= 0.0) {
            bail!("`eval.temperature` must be >= 0, got {}", e.temperature);
        }
        if let Some(j) = &self.judge
            && j.model != OpenAiJudgeConfig::default().model
            && j.model != e.judge
        {
            bail!(
                "`judge.model` ({:?}) differs from `eval.judge` ({:?}): name the judge model in `eval.judge` only",
                j.model,
                e.judge
            );
        }
        Ok(())
    }

    pub fn model(&self, name: &str) -> Result<&GridModel> {
        self.models.iter().find(|m| m.name == name).ok_or_else(|| {
            anyhow!(
                "no model {name:?} in the grid (models: {})",
                self.models
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }
}

/// The paper-scale sweep bound to a grid file and an output folder.
pub struct Paper {
    pub grid: PaperGrid,
    /// The grid file (its folder resolves `data`, `sft`, `daa`).
    pub grid_path: PathBuf,
    pub out: PathBuf,
    /// Print progress lines.
    pub verbose: bool,
}

/// What a loaded checkpoint evaluates with.
struct EvalInputs {
    tok: Tok,
    prompts: Vec<Vec<u32>>,
    records: Vec<SftLine>,
    heldout: Vec<PrefExample>,
}

impl Paper {
    /// The sweep of the grid file `grid_path` into `out` (the grid's `out_root`, or any other
    /// folder: see the module documentation).
    pub fn new(grid_path: &Path, out: &Path) -> Result<Self> {
        let grid = PaperGrid::from_file(grid_path)?;
        let out = out.to_path_buf();
        let p = Self {
            grid,
            grid_path: grid_path.to_path_buf(),
            out,
            verbose: true,
        };
        // Read every run configuration now, so that a bad one stops the sweep before any work.
        for m in &p.grid.models {
            p.sft_config(&m.name)?;
        }
        for r in p.runs()? {
            p.daa_config(&r)?;
        }
        Ok(p)
    }

    fn say(&self, msg: &str) {
        if self.verbose {
            println!("{msg}");
        }
    }

    fn grid_dir(&self) -> &Path {
        self.grid_path.parent().unwrap_or(Path::new("."))
    }

    /// `p` with the grid's `out_root` replaced by the sweep's output folder.
    pub fn reroot(&self, p: &Path) -> PathBuf {
        match p.strip_prefix(&self.grid.out_root) {
            Ok(rest) => self.out.join(rest),
            Err(_) => p.to_path_buf(),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.out.join("data")
    }

    fn data_config(&self) -> Result<TldrConfig> {
        TldrConfig::from_file(&self.grid_dir().join(&self.grid.data))
    }

    /// The SFT run of a model as the sweep runs it.
    pub fn sft_config(&self, model: &str) -> Result<RunConfig> {
        let m = self.grid.model(model)?;
        let path = self.grid_dir().join(&m.sft);
        let mut c = RunConfig::from_file(&path)?;
        c.out_dir = self.out.join(model).join("sft");
        c.data.train = self.reroot(&c.data.train);
        if c.daa.is_some() {
            bail!(
                "{}: an SFT configuration has no [daa] table",
                path.display()
            );
        }
        Ok(c)
    }

    /// The final checkpoint of a model's SFT run, where its DAA runs start: a link to the SFT
    /// run's last checkpoint folder, made when the run completes.
    fn sft_final(&self, model: &str) -> PathBuf {
        self.out.join(model).join("sft").join("final")
    }

    /// A DAA run of the grid as the sweep runs it.
    pub fn daa_config(&self, run: &RunSpec) -> Result<RunConfig> {
        let m = self.grid.model(&run.size)?;
        let path = self.grid_dir().join(&m.daa);
        let mut c = RunConfig::from_file(&path)?;
        let mut daa = c
            .daa
            .clone()
            .ok_or_else(|| anyhow!("{}: a [daa] table is required", path.display()))?;
        daa.objective = run.objective()?;
        daa.beta = run.beta;
        daa.reference_cache = daa.reference_cache.map(|p| self.reroot(&p));
        c.daa = Some(daa);
        c.out_dir = self
            .out
            .join(&run.size)
            .join(&run.objective)
            .join(format!("beta-{}", run.beta));
        let sft = self.sft_final(&run.size).display().to_string();
        c.model.source = sft.clone();
        c.model.revision = None;
        let mut reference = c.reference.clone().unwrap_or_else(|| c.model.clone());
        reference.source = sft;
        reference.revision = None;
        c.reference = Some(reference);
        c.data.train = self.reroot(&c.data.train);
        Ok(c)
    }

    /// Every DAA run of the grid, in a fixed order: models, objectives, betas.
    pub fn runs(&self) -> Result<Vec<RunSpec>> {
        let mut out = vec![];
        for m in &self.grid.models {
            let seed = RunConfig::from_file(&self.grid_dir().join(&m.daa))?
                .train
                .seed;
            for o in &self.grid.objectives {
                for &beta in &self.grid.betas[o] {
                    out.push(RunSpec {
                        objective: o.clone(),
                        beta,
                        size: m.name.clone(),
                        seed,
                        alpha: 0.0,
                    });
                }
            }
        }
        Ok(out)
    }

    /// The judge settings the results depend on (not where or how fast it is asked).
    fn judge_config(&self) -> OpenAiJudgeConfig {
        let mut j = self.grid.judge.clone().unwrap_or_default();
        j.model = self.grid.eval.judge.clone();
        if j.cache_dir.is_none() {
            j.cache_dir = Some(self.out.join("judge-cache"));
        }
        j
    }

    /// Build the judge once to check its settings, and refuse to start without a key for
    /// OpenAI's API: the first verdict is asked for only after hours of training.
    pub fn check_judge(&self) -> Result<()> {
        let j = OpenAiJudge::new(self.judge_config())
            .with_context(|| format!("the judge of {}", self.grid_path.display()))?;
        if !j.has_api_key() && j.base_url() == crate::eval::judge::openai::DEFAULT_BASE_URL {
            bail!(
                "the judge ({}) needs an API key: set {} (or OPENAI_BASE_URL for another \
                 OpenAI-compatible server); nothing was started",
                j.base_url(),
                j.config().api_key_env
            );
        }
        Ok(())
    }

    fn judge_settings(&self) -> serde_json::Value {
        let j = self.judge_config();
        serde_json::json!({"model": j.model, "temperature": j.temperature, "max_tokens": j.max_tokens,
            "prompt_template": j.prompt_template.as_ref().map(|p| std::fs::read_to_string(p).unwrap_or_default()),
            "seed": j.seed})
    }

    /// The settings of a run that decide what it computes: without the keys that do not
    /// ([`crate::train::trainer::NON_DETERMINING_KEYS`]), and with paths inside the output
    /// folder written relative to it (`$OUT/...`), so that the hash does not depend on where
    /// the sweep writes.
    fn settings(&self, c: &RunConfig) -> Result<serde_json::Value> {
        use serde_json::Value;
        fn walk(v: Value, out: &str) -> Value {
            match v {
                Value::Object(m) => Value::Object(
                    m.into_iter()
                        .filter(|(k, _)| {
                            !crate::train::trainer::NON_DETERMINING_KEYS.contains(&k.as_str())
                        })
                        .map(|(k, v)| (k, walk(v, out)))
                        .collect(),
                ),
                Value::Array(a) => Value::Array(a.into_iter().map(|v| walk(v, out)).collect()),
                Value::String(s) => match Path::new(&s).strip_prefix(out) {
                    Ok(rest) => Value::String(format!("$OUT/{}", rest.display())),
                    Err(_) => Value::String(s),
                },
                v => v,
            }
        }
        Ok(walk(
            serde_json::to_value(c)?,
            &self.out.display().to_string(),
        ))
    }

    /// Hash of the settings that determine the results of a policy of `model` (its SFT policy
    /// when `run` is None, else that DAA run).
    pub fn config_hash(&self, model: &str, run: Option<&RunSpec>) -> Result<String> {
        let data = self.data_config()?;
        let sft = self.sft_config(model)?;
        let daa = run.map(|r| self.daa_config(r)).transpose()?;
        let v = serde_json::json!({"data": data, "sft": self.settings(&sft)?,
            "daa": daa.as_ref().map(|d| self.settings(d)).transpose()?,
            "eval": self.grid.eval, "judge": self.judge_settings(), "run": run});
        Ok(short_hash(&v))
    }

    /// The config hash each result file of this grid must carry, by run id.
    pub fn expected_hashes(&self) -> Result<BTreeMap<String, String>> {
        let mut m = BTreeMap::new();
        for g in &self.grid.models {
            m.insert(format!("sft-{}", g.name), self.config_hash(&g.name, None)?);
        }
        for r in self.runs()? {
            m.insert(r.id(), self.config_hash(&r.size, Some(&r))?);
        }
        Ok(m)
    }

    /// The TL;DR sets as JSON lines in OUT/data (exported from the hub cache, or the hub, on
    /// first use; `export.json`, written last, records the data configuration).
    pub fn data(&self) -> Result<()> {
        let cfg = self.data_config()?;
        let dir = self.data_dir();
        let manifest = dir.join("export.json");
        if manifest.is_file() {
            let text = std::fs::read_to_string(&manifest)
                .with_context(|| format!("cannot read {}", manifest.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: corrupt export manifest", manifest.display()))?;
            if v["config"] != serde_json::to_value(&cfg)? {
                return Err(super::results::stale(
                    &dir,
                    &format!(
                        "its export.json records another data configuration than {}",
                        self.grid_dir().join(&self.grid.data).display()
                    ),
                ));
            }
            return Ok(());
        }
        self.say(&format!("data: exporting TL;DR into {}", dir.display()));
        let hub = crate::hub::HubAccess::from_env();
        let m = crate::data::tldr::export(&cfg, &hub, &dir)?;
        for f in m["files"].as_array().into_iter().flatten() {
            self.say(&format!(
                "data: {} {} records",
                f["file"].as_str().unwrap_or("?"),
                f["records"]
            ));
        }
        Ok(())
    }

    /// Train a model's SFT run (resuming a partial one) and link its final checkpoint as
    /// OUT/<model>/sft/final; a finished run of the same settings is reused as it is.
    pub fn sft(&self, model: &str) -> Result<PathBuf> {
        let cfg = self.sft_config(model)?;
        let fin = self.sft_final(model);
        let settings = serde_json::to_value(&cfg)?;
        if let Some(target) = read_final(&fin)? {
            let meta = checkpoint::read_meta(&target)?;
            if let Some(diff) = crate::train::config_difference(&meta.config, &settings) {
                return Err(super::results::stale(&cfg.out_dir, &diff));
            }
            return Ok(fin);
        }
        self.data()?;
        let t0 = Instant::now();
        self.say(&format!(
            "sft {model}: training into {}",
            cfg.out_dir.display()
        ));
        let ctx = self.grid_dir().join(&self.grid.model(model)?.sft);
        let out = runs::sft(&cfg, &ctx)?;
        let (step, last) = out
            .checkpoints
            .last()
            .cloned()
            .ok_or_else(|| anyhow!("sft {model}: the run wrote no checkpoint"))?;
        if step != out.total_steps {
            bail!(
                "sft {model}: the last checkpoint is at step {step} of {}: set `train.checkpoints` to end with 1.0 in {}",
                out.total_steps,
                ctx.display()
            );
        }
        write_final(&fin, &last)?;
        self.say(&format!(
            "sft {model}: {} steps in {:.0} s",
            out.total_steps,
            t0.elapsed().as_secs_f64()
        ));
        Ok(fin)
    }

    /// The evaluation prompts, their records and the held-out pairs, tokenized for a model.
    fn eval_inputs(&self, tok: Tok, lim: Limits, run: &RunConfig) -> Result<EvalInputs> {
        let e = &self.grid.eval;
        let pf = self.reroot(&e.prompt_file);
        let mut records: Vec<(usize, SftLine)> = crate::util::read_jsonl_numbered(&pf)?;
        if records.len() < e.prompts {
            bail!(
                "{}: {} records, fewer than `eval.prompts` = {} of {}",
                pf.display(),
                records.len(),
                e.prompts,
                self.grid_path.display()
            );
        }
        records.truncate(e.prompts);
        let d = &run.data;
        let mut prompts = Vec::with_capacity(records.len());
        for (line, r) in &records {
            let p = runs::encode_field(&tok, "prompt", &r.prompt)
                .with_context(|| format!("{}: line {line}", pf.display()))?;
            let (p, _) = truncate_pair(&p, &[], e.max_length, d.max_prompt_length);
            if p.len() >= e.max_length.min(lim.max_positions) {
                bail!(
                    "{}: line {line}: the prompt is {} tokens, which leaves no room to sample within `eval.max_length` = {} (and the model's {} positions)",
                    pf.display(),
                    p.len(),
                    e.max_length,
                    lim.max_positions
                );
            }
            prompts.push(p);
        }
        let hf = match &e.heldout_file {
            Some(p) => self.reroot(p),
            None => pf.with_file_name("prefs-eval.jsonl"),
        };
        let mut pairs: Vec<(usize, PrefLine)> = crate::util::read_jsonl_numbered(&hf)?;
        pairs.truncate(e.heldout_pairs);
        let heldout = runs::examples(&hf, &pairs, |l| runs::pref_example(l, &tok, d, &lim))?;
        Ok(EvalInputs {
            tok,
            prompts,
            records: records.into_iter().map(|(_, r)| r).collect(),
            heldout,
        })
    }

    fn eval_config(&self) -> EvalConfig {
        let e = &self.grid.eval;
        EvalConfig {
            samples_per_prompt: e.samples_per_prompt,
            seed: e.seed,
            temperature: e.temperature,
            top_k: (e.top_k > 0).then_some(e.top_k),
            max_length: e.max_length,
            batch_size: e.batch_size,
        }
    }

    /// Evaluate one checkpoint: sample, judge every sample against its prompt's reference
    /// summary (the verdicts are written to OUT/judge/<label>.jsonl and its summary next to
    /// it), KL to the reference, held-out metrics.
    fn evaluate(
        &self,
        label: &str,
        policy: &LoadedModel,
        reference: &LoadedModel,
        objective: Option<(Objective, f64)>,
        inputs: &EvalInputs,
    ) -> Result<PolicyEval> {
        let judge = OpenAiJudge::new(self.judge_config())?;
        let tokens = SpecialTokens {
            eos: inputs.tok.eos_id,
            pad: inputs.tok.pad_id,
        };
        let verdict_path = self.out.join("judge").join(format!("{label}.jsonl"));
        let mut ask = |samples: &[(usize, &[u32])]| -> Result<Vec<f64>> {
            let per_prompt = self.grid.eval.samples_per_prompt;
            let items = samples
                .iter()
                .enumerate()
                .map(|(i, &(p, toks))| {
                    let toks = toks.strip_suffix(&[tokens.eos]).unwrap_or(toks);
                    let r = &inputs.records[p];
                    Ok(JudgeItem {
                        id: format!("{label}/p{p}/s{}", i % per_prompt),
                        prompt: r.prompt.clone(),
                        candidate: inputs.tok.decode(toks)?,
                        reference: r.response.clone(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let report = judge.judge(&items)?;
            write_verdicts(&verdict_path, &report.verdicts, &report.summary)?;
            let bad: Vec<_> = report
                .verdicts
                .iter()
                .filter(|v| v.status != VerdictStatus::Decided)
                .collect();
            if let Some(first) = bad.first() {
                bail!(
                    "judge: {} of {} comparisons of {label} failed or were unreadable (first: {}: {}); \
                     the verdicts are in {}, the replies that arrived are cached in {}, so a re-run asks \
                     only for the rest",
                    bad.len(),
                    items.len(),
                    first.id,
                    first.error.as_deref().unwrap_or("?"),
                    verdict_path.display(),
                    self.judge_config().cache_dir.unwrap_or_default().display()
                );
            }
            self.say(&format!(
                "judge {label}: {} comparisons, {} requests, {} cached, {} + {} tokens",
                items.len(),
                report.summary.requests,
                report.summary.cache_hits,
                report.summary.prompt_tokens,
                report.summary.completion_tokens
            ));
            Ok(report
                .verdicts
                .iter()
                .map(|v| v.candidate_score.unwrap_or(f64::NAN))
                .collect())
        };
        evaluate_policy(
            &policy.model,
            &reference.model,
            &inputs.prompts,
            &inputs.heldout,
            objective,
            &self.eval_config(),
            tokens,
            &mut ask,
        )
    }

    fn results_path(&self, id: &str) -> PathBuf {
        self.out.join("results").join(format!("{id}.json"))
    }

    /// A model's SFT policy evaluated like every checkpoint (the checkpoint-0 row).
    pub fn run_sft_eval(&self, model: &str) -> Result<RunResults> {
        let id = format!("sft-{model}");
        let path = self.results_path(&id);
        let hash = self.config_hash(model, None)?;
        if path.is_file() {
            return existing_results(&path, &hash);
        }
        self.check_judge()?;
        let t0 = Instant::now();
        self.sft(model)?;
        // Evaluated as the DAA runs' reference: the DAA configuration's reference settings.
        let run = self.daa_config(&self.first_run(model)?)?;
        let spec = run.reference.clone().unwrap_or_else(|| run.model.clone());
        let (sft, tok) = runs::load_model(&spec)?;
        let inputs = self.eval_inputs(tok, limits(&sft.model), &run)?;
        let e = self.evaluate(&id, &sft, &sft, None, &inputs)?;
        let mut res = RunResults::default();
        res.add(
            &e,
            &RunSpec::sft(model),
            sft.model.config().n_params(),
            0.0,
            &hash,
        );
        self.say(&res.finish(&path, t0)?);
        Ok(res)
    }

    fn first_run(&self, model: &str) -> Result<RunSpec> {
        self.runs()?
            .into_iter()
            .find(|r| r.size == model)
            .ok_or_else(|| anyhow!("no DAA run of {model} in the grid"))
    }

    /// Train and evaluate one DAA run (skipped when its results exist).
    pub fn run_daa(&self, run: &RunSpec) -> Result<RunResults> {
        let id = run.id();
        let path = self.results_path(&id);
        let hash = self.config_hash(&run.size, Some(run))?;
        if path.is_file() {
            return existing_results(&path, &hash);
        }
        self.check_judge()?;
        let t0 = Instant::now();
        self.sft(&run.size)?;
        let cfg = self.daa_config(run)?;
        let ctx = self.grid_dir().join(&self.grid.model(&run.size)?.daa);
        self.say(&format!("{id}: training into {}", cfg.out_dir.display()));
        let out = runs::daa(&cfg, &ctx)?;
        let ref_spec = cfg.reference.clone().unwrap_or_else(|| cfg.model.clone());
        let (reference, tok) = runs::load_model(&ref_spec)?;
        let inputs = self.eval_inputs(tok, limits(&reference.model), &cfg)?;
        let mut policy_spec = cfg.model.clone();
        let obj = run.objective()?;
        let mut res = RunResults::default();
        for (_, dir) in &out.checkpoints {
            let meta = checkpoint::read_meta(dir)?;
            let ck = (meta.fraction * 1e6).round() / 1e6;
            policy_spec.source = dir.display().to_string();
            let (policy, _) = runs::load_model(&policy_spec)?;
            let label = format!("{id}/ck-{ck}");
            let e = self.evaluate(&label, &policy, &reference, Some((obj, run.beta)), &inputs)?;
            res.add(&e, run, policy.model.config().n_params(), ck, &hash);
        }
        self.say(&res.finish(&path, t0)?);
        Ok(res)
    }

    /// The shared stages every run needs: the data, each model's SFT run and SFT evaluation.
    pub fn prepare(&self) -> Result<()> {
        self.check_judge()?;
        self.data()?;
        for m in &self.grid.models {
            self.sft(&m.name)?;
        }
        for m in &self.grid.models {
            self.run_sft_eval(&m.name)?;
        }
        Ok(())
    }

    /// Everything, then the tables. `only` restricts the DAA grid to runs whose id contains one
    /// of the strings.
    pub fn run_all(&self, only: &[String]) -> Result<(Vec<ResultRow>, Vec<SampleRow>)> {
        self.prepare()?;
        for run in self.runs()? {
            if only.is_empty() || only.iter().any(|o| run.id().contains(o.as_str())) {
                self.run_daa(&run)?;
            }
        }
        self.collect()
    }

    /// The finished result files of this grid, each checked against this configuration, and
    /// the tables made of them (files of runs outside the grid are left out and listed).
    pub fn collect(&self) -> Result<(Vec<ResultRow>, Vec<SampleRow>)> {
        let want = self.expected_hashes()?;
        let mut kept = vec![];
        let mut outside = vec![];
        for f in result_files(&self.out.join("results"))? {
            let id = f.file_stem().map(|s| s.to_string_lossy().into_owned());
            match id.as_deref().and_then(|id| want.get(id)) {
                Some(h) => kept.push((f.clone(), existing_results(&f, h)?)),
                None => outside.push(f.display().to_string()),
            }
        }
        if !outside.is_empty() {
            eprintln!(
                "collect: left out {} result file(s) of runs outside this grid: {}",
                outside.len(),
                outside.join(", ")
            );
        }
        merge_results(kept)
    }
}

/// The checkpoint that `final` (a symbolic link to the SFT run's last checkpoint folder) points
/// to, if it exists.
fn read_final(fin: &Path) -> Result<Option<PathBuf>> {
    match std::fs::read_link(fin) {
        Ok(target) => {
            let dir = fin.with_file_name(&target);
            if !dir.is_dir() {
                bail!(
                    "{} points to {}, which does not exist: delete {} to train the SFT run again",
                    fin.display(),
                    dir.display(),
                    fin.display()
                );
            }
            Ok(Some(dir))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read the link {}", fin.display())),
    }
}

/// Point `final` at `checkpoint` (a folder next to it), replacing it atomically.
fn write_final(fin: &Path, checkpoint: &Path) -> Result<()> {
    let name = checkpoint
        .file_name()
        .ok_or_else(|| anyhow!("checkpoint {} has no folder name", checkpoint.display()))?;
    let tmp = fin.with_file_name(format!(".final.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    #[cfg(unix)]
    std::os::unix::fs::symlink(name, &tmp)
        .with_context(|| format!("cannot create the link {}", tmp.display()))?;
    #[cfg(not(unix))]
    bail!("the paper sweep links its final SFT checkpoint, which needs a Unix file system");
    std::fs::rename(&tmp, fin).with_context(|| format!("cannot create {}", fin.display()))
}

fn write_verdicts(
    path: &Path,
    verdicts: &[crate::eval::judge::Verdict],
    summary: &JudgeSummary,
) -> Result<()> {
    crate::util::write_atomic_with(path, |w| {
        for v in verdicts {
            writeln!(w, "{}", serde_json::to_string(v)?)?;
        }
        Ok(())
    })?;
    crate::util::write_atomic(
        &path.with_extension("summary.json"),
        serde_json::to_string_pretty(summary)?.as_bytes(),
    )
}
