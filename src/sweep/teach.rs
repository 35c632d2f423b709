//! The teach-scale pipeline: synthetic task -> three tiny GPT-NeoX models -> SFT -> preference
//! pairs from the SFT model's own samples, labelled by a biased Bradley-Terry labeler -> the
//! DAA grid (objectives x betas x sizes, 4 checkpoints each) -> evaluation of every checkpoint
//! with the exact gold judge -> one results table.
//!
//! Every stage writes its outputs atomically and is skipped when they exist, so a killed sweep
//! resumes where it stopped; each DAA run's evaluated rows land in `results/<run>.json` only
//! when the run is complete, and the table is assembled from those files.

pub use super::results::{RunResults, RunSpec, collect_results};
use super::results::{merge_results, result_files, short_hash};
use crate::analysis::table::{ResultRow, SampleRow};
use crate::data::synthetic::{PrefPair, Task, TaskConfig};
use crate::data::{PrefExample, SftExample};
use crate::eval::policy::{EvalConfig, PolicyEval, evaluate_policy};
use crate::model::GptNeoXConfig;
use crate::model::generate::{SampleConfig, generate};
use crate::model::load::{self, LoadedModel};
use crate::train::checkpoint;
use crate::train::loss::Objective;
use crate::train::optim::RmsPropConfig;
use crate::train::{DaaConfig, LoopConfig, SpecialTokens, train_daa, train_sft};
use anyhow::{Context, Result, anyhow, bail};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A teaching model size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizeSpec {
    pub name: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftStage {
    /// Fresh (post, reference) examples, one pass.
    pub examples: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub data_seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairStage {
    /// The SFT model whose samples become the candidates (as in TL;DR, one policy's samples
    /// serve every model size).
    pub source_size: String,
    /// Prompts offered; pairs with identical responses are dropped.
    pub prompts: usize,
    pub n_train: usize,
    pub n_heldout: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaaStage {
    pub objectives: Vec<String>,
    pub betas: Vec<f64>,
    pub lr: f64,
    /// Scale the learning rate by (reference width / width), reference width = the first
    /// size's hidden size (TEACH-TASK: with a fixed rate larger models moved further).
    #[serde(default)]
    pub lr_inverse_width: bool,
    pub batch_size: usize,
    pub micro_batch_size: usize,
    /// Warmup as a fraction of the epoch's steps.
    pub warmup_frac: f64,
    #[serde(default = "default_checkpoints")]
    pub checkpoints: Vec<f64>,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
}

fn default_checkpoints() -> Vec<f64> {
    vec![0.25, 0.5, 0.75, 1.0]
}
fn default_seeds() -> Vec<u64> {
    vec![0]
}

/// Length-regularized DPO runs (section 3.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RdpoStage {
    pub size: String,
    pub alpha: f64,
    pub betas: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalStage {
    pub n_prompts: usize,
    pub samples_per_prompt: usize,
    pub seed: u64,
    pub prompt_seed: u64,
}

/// The whole teach-scale configuration (artifact/configs/teach/teach.toml).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeachConfig {
    #[serde(default)]
    pub task: TaskConfig,
    pub sizes: Vec<SizeSpec>,
    pub model_seed: u64,
    pub sft: SftStage,
    pub pairs: PairStage,
    pub daa: DaaStage,
    #[serde(default)]
    pub rdpo: Option<RdpoStage>,
    pub eval: EvalStage,
}

impl TeachConfig {
    pub fn from_toml(text: &str, ctx: &str) -> Result<Self> {
        let c: TeachConfig =
            toml::from_str(text).with_context(|| format!("{ctx}: invalid teach configuration"))?;
        c.validate().with_context(|| ctx.to_string())?;
        Ok(c)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Check every setting before anything runs; errors name the key (`daa.batch_size`).
    pub fn validate(&self) -> Result<()> {
        fn positive(key: &str, v: usize) -> Result<()> {
            if v == 0 {
                bail!("`{key}` must be positive, got 0");
            }
            Ok(())
        }
        fn positive_f(key: &str, v: f64) -> Result<()> {
            if !(v.is_finite() && v > 0.0) {
                bail!("`{key}` must be a positive number, got {v}");
            }
            Ok(())
        }
        fn distinct<T: PartialEq + std::fmt::Debug>(key: &str, v: &[T]) -> Result<()> {
            if v.is_empty() {
                bail!("`{key}` is empty");
            }
            if let Some((i, x)) = v.iter().enumerate().find(|(i, x)| v[..*i].contains(x)) {
                bail!("`{key}` lists {x:?} twice (entry {})", i + 1);
            }
            Ok(())
        }
        if self.sizes.is_empty() {
            bail!("`sizes` is empty");
        }
        let names: Vec<&String> = self.sizes.iter().map(|s| &s.name).collect();
        distinct("sizes.name", &names)?;
        for s in &self.sizes {
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                bail!(
                    "`sizes.name` {:?}: use letters, digits and _ (it is part of run ids and paths)",
                    s.name
                );
            }
            for (k, v) in [
                ("hidden_size", s.hidden_size),
                ("num_hidden_layers", s.num_hidden_layers),
                ("num_attention_heads", s.num_attention_heads),
                ("intermediate_size", s.intermediate_size),
            ] {
                positive(&format!("sizes.{k}` of size `{}", s.name), v)?;
            }
        }
        let st = &self.sft;
        positive("sft.examples", st.examples)?;
        positive("sft.batch_size", st.batch_size)?;
        positive_f("sft.lr", st.lr)?;
        if st.examples < st.batch_size {
            bail!(
                "`sft.examples` ({}) make no full batch of `sft.batch_size` ({})",
                st.examples,
                st.batch_size
            );
        }
        let pc = &self.pairs;
        self.size(&pc.source_size).context("`pairs.source_size`")?;
        positive("pairs.prompts", pc.prompts)?;
        positive("pairs.n_train", pc.n_train)?;
        positive("pairs.n_heldout", pc.n_heldout)?;
        let d = &self.daa;
        distinct("daa.objectives", &d.objectives)?;
        for o in &d.objectives {
            Objective::from_name(o, 0.0).context("`daa.objectives`")?;
        }
        distinct("daa.betas", &d.betas)?;
        for &b in &d.betas {
            positive_f("daa.betas", b)?;
        }
        distinct("daa.seeds", &d.seeds)?;
        positive_f("daa.lr", d.lr)?;
        if !(d.warmup_frac.is_finite() && (0.0..1.0).contains(&d.warmup_frac)) {
            bail!("`daa.warmup_frac` must be in [0, 1), got {}", d.warmup_frac);
        }
        LoopConfig {
            batch_size: d.batch_size,
            micro_batch_size: d.micro_batch_size,
            seed: 0,
            checkpoints: d.checkpoints.clone(),
            log_every: 0,
            resume: true,
            progress_bar: false,
        }
        .validate()
        .map_err(|e| anyhow!("{}", e.to_string().replace("train: `", "`daa.")))?;
        distinct("daa.checkpoints", &d.checkpoints)?;
        if pc.n_train < d.batch_size {
            bail!(
                "`pairs.n_train` ({}) make no full batch of `daa.batch_size` ({})",
                pc.n_train,
                d.batch_size
            );
        }
        if let Some(r) = &self.rdpo {
            self.size(&r.size).context("`rdpo.size`")?;
            if !r.alpha.is_finite() {
                bail!("`rdpo.alpha` must be a number, got {}", r.alpha);
            }
            distinct("rdpo.betas", &r.betas)?;
            for &b in &r.betas {
                positive_f("rdpo.betas", b)?;
            }
        }
        positive("eval.n_prompts", self.eval.n_prompts)?;
        positive("eval.samples_per_prompt", self.eval.samples_per_prompt)?;
        let ids: Vec<String> = self.runs().iter().map(RunSpec::id).collect();
        if let Some((i, id)) = ids
            .iter()
            .enumerate()
            .find(|(i, id)| ids[..*i].contains(id))
        {
            bail!(
                "two runs of the grid have the id {id} (run {}): make their betas differ",
                i + 1
            );
        }
        Ok(())
    }

    pub fn size(&self, name: &str) -> Result<&SizeSpec> {
        self.sizes.iter().find(|s| s.name == name).ok_or_else(|| {
            anyhow!(
                "unknown size {name:?} (sizes: {:?})",
                self.sizes.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
    }

    /// The GPT-NeoX config of a size for this task's vocabulary.
    pub fn model_config(&self, task: &Task, s: &SizeSpec) -> Result<GptNeoXConfig> {
        let prompt_max = 2 + self.task.post.max_len;
        let v = serde_json::json!({
            "model_type": "gpt_neox",
            "vocab_size": task.vocab_size(),
            "hidden_size": s.hidden_size,
            "num_hidden_layers": s.num_hidden_layers,
            "num_attention_heads": s.num_attention_heads,
            "intermediate_size": s.intermediate_size,
            "max_position_embeddings": (prompt_max + task.max_response_tokens() + 8).next_power_of_two(),
            "rotary_pct": 0.25,
            "rotary_emb_base": 10000,
            "use_parallel_residual": true,
            "bos_token_id": crate::data::synthetic::EOS,
            "eos_token_id": crate::data::synthetic::EOS,
            "pad_token_id": crate::data::synthetic::PAD,
            "initializer_range": 0.02,
        });
        GptNeoXConfig::from_json_str(&v.to_string(), &format!("size {}", s.name))
    }

    /// Every DAA run of the grid, in a fixed order.
    pub fn runs(&self) -> Vec<RunSpec> {
        let mut out = vec![];
        for seed in &self.daa.seeds {
            for s in &self.sizes {
                for o in &self.daa.objectives {
                    for &b in &self.daa.betas {
                        out.push(RunSpec {
                            objective: o.clone(),
                            beta: b,
                            size: s.name.clone(),
                            seed: *seed,
                            alpha: 0.0,
                        });
                    }
                }
            }
            if let Some(r) = &self.rdpo {
                for &b in &r.betas {
                    out.push(RunSpec {
                        objective: "rdpo".into(),
                        beta: b,
                        size: r.size.clone(),
                        seed: *seed,
                        alpha: r.alpha,
                    });
                }
            }
        }
        out
    }
}

const TOKENS: SpecialTokens = SpecialTokens {
    eos: crate::data::synthetic::EOS,
    pad: crate::data::synthetic::PAD,
};

/// The teach pipeline bound to an output directory.
pub struct Teach {
    pub cfg: TeachConfig,
    pub task: Task,
    pub out: PathBuf,
    pub device: Device,
    /// Print progress lines.
    pub verbose: bool,
}

fn sft_examples(task: &Task, n: usize, seed: u64) -> Vec<SftExample> {
    task.sft_examples(n, seed)
        .iter()
        .map(|e| {
            let (prompt, response) = task.sft_ids(e);
            SftExample { prompt, response }
        })
        .collect()
}

impl Teach {
    pub fn new(cfg: TeachConfig, out: &Path) -> Result<Self> {
        let task = Task::new(cfg.task.clone())?;
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        Ok(Self {
            cfg,
            task,
            out: out.to_path_buf(),
            device: Device::Cpu,
            verbose: true,
        })
    }

    fn say(&self, msg: &str) {
        if self.verbose {
            println!("{msg}");
        }
    }

    /// Hash of the settings that determine the results of a policy of size `size` (the SFT
    /// policy when `run` is None, else that DAA run).
    pub fn config_hash(&self, size: &str, run: Option<&RunSpec>) -> String {
        let daa = run.map(|_| self.daa_settings());
        let pair_size = self.cfg.size(&self.cfg.pairs.source_size).ok();
        let v = serde_json::json!({"task": self.cfg.task, "size": self.cfg.size(size).ok(), "model_seed": self.cfg.model_seed,
            "sft": self.cfg.sft, "pairs": self.cfg.pairs, "pair_source": pair_size, "eval": self.cfg.eval,
            "daa": daa, "run": run});
        short_hash(&v)
    }

    /// The DAA settings shared by every run of the grid that change a run's result (not the
    /// grid's lists: a run stays valid when betas or seeds are added).
    fn daa_settings(&self) -> serde_json::Value {
        let d = &self.cfg.daa;
        serde_json::json!({"lr": d.lr, "lr_inverse_width": d.lr_inverse_width, "batch": d.batch_size,
            "warmup": d.warmup_frac, "checkpoints": d.checkpoints, "width0": self.cfg.sizes[0].hidden_size})
    }

    /// Hash of the settings that determine the SFT model of a size.
    fn sft_hash(&self, size: &str) -> String {
        let v = serde_json::json!({"task": self.cfg.task, "size": self.cfg.size(size).ok(),
            "model_seed": self.cfg.model_seed, "sft": self.cfg.sft});
        short_hash(&v)
    }

    /// Hash of the settings that determine the preference pairs.
    fn pairs_hash(&self) -> String {
        let v = serde_json::json!({"task": self.cfg.task, "model_seed": self.cfg.model_seed,
            "sft": self.cfg.sft, "pairs": self.cfg.pairs,
            "pair_source": self.cfg.size(&self.cfg.pairs.source_size).ok()});
        short_hash(&v)
    }

    /// The config hash each result file of this grid must carry, by run id (`sft-SIZE` for
    /// the SFT evaluations, then every DAA run).
    pub fn expected_hashes(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for s in &self.cfg.sizes {
            m.insert(format!("sft-{}", s.name), self.config_hash(&s.name, None));
        }
        for r in self.cfg.runs() {
            m.insert(r.id(), self.config_hash(&r.size, Some(&r)));
        }
        m
    }

    fn stale(&self, what: &Path, detail: &str) -> anyhow::Error {
        super::results::stale(what, detail)
    }

    fn existing_results(&self, path: &Path, want_hash: &str) -> Result<RunResults> {
        super::results::existing_results(path, want_hash)
    }

    fn sft_dir(&self, size: &str) -> PathBuf {
        self.out.join("models").join(format!("sft-{size}"))
    }

    /// The SFT model of a size: trained on first use, then loaded from its final checkpoint.
    pub fn sft_model(&self, size: &str) -> Result<LoadedModel> {
        let dir = self.sft_dir(size);
        let spec = self.cfg.size(size)?;
        let mcfg = self.cfg.model_config(&self.task, spec)?;
        let st = &self.cfg.sft;
        let total = st.examples / st.batch_size;
        let run_config =
            serde_json::json!({"sft": self.cfg.sft, "config_hash": self.sft_hash(size)});
        if let Some((step, d)) = checkpoint::list(&dir)?.pop()
            && step == total
        {
            let meta = checkpoint::read_meta(&d)?;
            if let Some(diff) = crate::train::config_difference(&meta.config, &run_config) {
                return Err(self.stale(&dir, &diff));
            }
            // A kill between the last checkpoint and the tokenizer leaves it out.
            let tok = d.join("tokenizer.json");
            if !tok.is_file() {
                self.task.save_tokenizer(&tok)?;
            }
            return load::load(d.to_str().unwrap(), None, DType::F32, &self.device);
        }
        let t0 = Instant::now();
        self.say(&format!(
            "sft {size}: {} parameters, {} steps of {}",
            mcfg.n_params(),
            total,
            st.batch_size
        ));
        let lm = load::fresh(&mcfg, DType::F32, &self.device, self.cfg.model_seed)?;
        let data = sft_examples(&self.task, st.examples, st.data_seed);
        let lc = LoopConfig {
            batch_size: st.batch_size,
            micro_batch_size: st.batch_size,
            seed: st.data_seed,
            checkpoints: vec![0.5, 1.0],
            log_every: (total / 5).max(1),
            resume: true,
            progress_bar: false,
        };
        let opt = RmsPropConfig {
            lr: st.lr,
            warmup_steps: st.warmup_steps,
            ..RmsPropConfig::default()
        };
        train_sft(&lm, &data, TOKENS, &lc, &opt, &dir, &run_config)?;
        self.task
            .save_tokenizer(&checkpoint::checkpoint_dir(&dir, total).join("tokenizer.json"))?;
        self.say(&format!(
            "sft {size}: done in {:.0} s",
            t0.elapsed().as_secs_f64()
        ));
        Ok(lm)
    }

    fn pairs_path(&self, split: &str) -> PathBuf {
        self.out.join("data").join(format!("pairs_{split}.jsonl"))
    }

    /// The record of which configuration made the pairs (written before them).
    fn pairs_meta_path(&self) -> PathBuf {
        self.out.join("data").join("pairs.json")
    }

    /// Preference pairs (train, held-out) from the source SFT model's samples.
    pub fn pairs(&self) -> Result<(Vec<PrefPair>, Vec<PrefPair>)> {
        let (tr, he) = (self.pairs_path("train"), self.pairs_path("heldout"));
        let want = self.pairs_hash();
        let meta_path = self.pairs_meta_path();
        if tr.is_file() && he.is_file() {
            let made_by = std::fs::read_to_string(&meta_path)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["config_hash"].as_str().map(str::to_string));
            if made_by.as_deref() != Some(want.as_str()) {
                let detail = match made_by {
                    Some(h) => format!(
                        "config_hash {h} in {} where this configuration gives {want}",
                        meta_path.display()
                    ),
                    None => format!(
                        "{} is missing or unreadable, so its configuration is unknown",
                        meta_path.display()
                    ),
                };
                return Err(self.stale(&tr, &detail));
            }
            return Ok((crate::util::read_jsonl(&tr)?, crate::util::read_jsonl(&he)?));
        }
        let pc = &self.cfg.pairs;
        let src = self.sft_model(&pc.source_size)?;
        let t0 = Instant::now();
        let posts = self.task.posts(pc.prompts, pc.seed);
        let prompts: Vec<Vec<u32>> = posts
            .iter()
            .flat_map(|p| {
                let ids = self.task.prompt_ids(p);
                [ids.clone(), ids]
            })
            .collect();
        let max_len =
            prompts.iter().map(|p| p.len()).max().unwrap_or(0) + self.task.max_response_tokens();
        let sc = SampleConfig {
            temperature: 1.0,
            top_k: None,
            max_length: max_len,
            seed: pc.seed,
            batch_size: 256,
        };
        let samples = generate(&src.model, &prompts, &sc, TOKENS.eos, TOKENS.pad)?;
        let cands = posts.iter().enumerate().map(|(i, p)| {
            (
                p.clone(),
                samples[2 * i].tokens.clone(),
                samples[2 * i + 1].tokens.clone(),
            )
        });
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(pc.seed ^ 0x5eed);
        let (pairs, stats) = self.task.preference_pairs(cands, &mut rng);
        if pairs.len() < pc.n_train + pc.n_heldout {
            bail!(
                "only {} distinct pairs from {} prompts; need {} train + {} held-out: raise `pairs.prompts`",
                pairs.len(),
                pc.prompts,
                pc.n_train,
                pc.n_heldout
            );
        }
        let train = pairs[..pc.n_train].to_vec();
        let held = pairs[pc.n_train..pc.n_train + pc.n_heldout].to_vec();
        crate::util::write_atomic(
            &self.out.join("data/pair_stats.json"),
            serde_json::to_string_pretty(&stats)?.as_bytes(),
        )?;
        // The record first, then the pairs: a reader that sees both pair files sees it too.
        crate::util::write_atomic(
            &meta_path,
            serde_json::json!({"config_hash": want})
                .to_string()
                .as_bytes(),
        )?;
        crate::util::write_atomic(&he, crate::util::to_jsonl(&held)?.as_bytes())?;
        crate::util::write_atomic(&tr, crate::util::to_jsonl(&train)?.as_bytes())?;
        self.say(&format!(
            "pairs: {} kept of {} ({} identical), chosen has higher gold in {:.2}, chosen longer in {:.2} ({:.0} s)",
            stats.kept, stats.offered, stats.dropped_identical, stats.chosen_higher_gold, stats.chosen_longer,
            t0.elapsed().as_secs_f64()
        ));
        Ok((train, held))
    }

    fn to_examples(&self, pairs: &[PrefPair]) -> Vec<PrefExample> {
        pairs
            .iter()
            .map(|p| {
                let (prompt, chosen, rejected) = self.task.pair_ids(p);
                PrefExample {
                    prompt,
                    chosen,
                    rejected,
                }
            })
            .collect()
    }

    /// Held-out evaluation prompts (posts with their reference summaries).
    pub fn eval_set(&self) -> Vec<crate::data::synthetic::SftExample> {
        self.task
            .sft_examples(self.cfg.eval.n_prompts, self.cfg.eval.prompt_seed)
    }

    fn eval_config(&self, prompts: &[Vec<u32>]) -> EvalConfig {
        EvalConfig {
            samples_per_prompt: self.cfg.eval.samples_per_prompt,
            seed: self.cfg.eval.seed,
            temperature: 1.0,
            top_k: Some(50),
            max_length: prompts.iter().map(|p| p.len()).max().unwrap_or(0)
                + self.task.max_response_tokens(),
            batch_size: 256,
        }
    }

    /// Evaluate one policy checkpoint against the SFT reference.
    pub fn evaluate(
        &self,
        policy: &LoadedModel,
        reference: &LoadedModel,
        objective: Option<(Objective, f64)>,
        held: &[PrefExample],
    ) -> Result<PolicyEval> {
        let set = self.eval_set();
        let prompts: Vec<Vec<u32>> = set.iter().map(|e| self.task.prompt_ids(&e.post)).collect();
        let mut judge = |samples: &[(usize, &[u32])]| {
            Ok(samples
                .iter()
                .map(|&(i, s)| self.task.gold_win(&set[i].post, s, &set[i].reference))
                .collect())
        };
        evaluate_policy(
            &policy.model,
            &reference.model,
            &prompts,
            held,
            objective,
            &self.eval_config(&prompts),
            TOKENS,
            &mut judge,
        )
    }

    fn results_path(&self, id: &str) -> PathBuf {
        self.out.join("results").join(format!("{id}.json"))
    }

    /// The SFT policy of a size evaluated like every checkpoint (checkpoint 0 rows).
    pub fn run_sft_eval(&self, size: &str) -> Result<RunResults> {
        let id = format!("sft-{size}");
        let path = self.results_path(&id);
        let hash = self.config_hash(size, None);
        if path.is_file() {
            return self.existing_results(&path, &hash);
        }
        let t0 = Instant::now();
        let sft = self.sft_model(size)?;
        let e = self.evaluate(&sft, &sft, None, &[])?;
        let mut res = RunResults::default();
        res.add(
            &e,
            &RunSpec::sft(size),
            sft.model.config().n_params(),
            0.0,
            &hash,
        );
        self.say(&res.finish(&path, t0)?);
        Ok(res)
    }

    /// Train and evaluate one DAA run (skipped when its results exist).
    pub fn run_daa(&self, run: &RunSpec) -> Result<RunResults> {
        let id = run.id();
        let path = self.results_path(&id);
        if path.is_file() {
            return self.existing_results(&path, &self.config_hash(&run.size, Some(run)));
        }
        let t0 = Instant::now();
        let (train, held) = self.pairs()?;
        let (train, held) = (self.to_examples(&train), self.to_examples(&held));
        let sft = self.sft_model(&run.size)?;
        let reference = load::deep_copy(&sft)?;
        let spec = self.cfg.size(&run.size)?;
        let d = &self.cfg.daa;
        let lr = if d.lr_inverse_width {
            d.lr * self.cfg.sizes[0].hidden_size as f64 / spec.hidden_size as f64
        } else {
            d.lr
        };
        let total = train.len() / d.batch_size;
        let opt = RmsPropConfig {
            lr,
            warmup_steps: ((total as f64) * d.warmup_frac).round() as usize,
            ..RmsPropConfig::default()
        };
        let lc = LoopConfig {
            batch_size: d.batch_size,
            micro_batch_size: d.micro_batch_size,
            seed: run.seed,
            checkpoints: d.checkpoints.clone(),
            log_every: 0,
            resume: true,
            progress_bar: false,
        };
        let obj = run.objective()?;
        let daa = DaaConfig {
            objective: obj,
            beta: run.beta,
            online_reference: false,
            reference_cache: Some(self.out.join("ref-cache")),
        };
        let run_dir = self.out.join("runs").join(&id);
        let hash = self.config_hash(&run.size, Some(run));
        let out = train_daa(
            &sft,
            &reference.model,
            &train,
            TOKENS,
            &daa,
            &lc,
            &opt,
            &run_dir,
            &serde_json::json!({"run": run, "daa": self.daa_settings(), "config_hash": hash}),
        )?;
        let n = sft.model.config().n_params();
        let mut res = RunResults::default();
        for (_, dir) in &out.checkpoints {
            let meta = checkpoint::read_meta(dir)?;
            let policy = load::load(dir.to_str().unwrap(), None, DType::F32, &self.device)?;
            let e = self.evaluate(&policy, &reference, Some((obj, run.beta)), &held)?;
            let ck = (meta.fraction * 1e6).round() / 1e6;
            res.add(&e, run, n, ck, &hash);
        }
        self.say(&res.finish(&path, t0)?);
        Ok(res)
    }

    /// Run everything (SFT of every size, pairs, SFT evaluations, the DAA grid) and assemble
    /// the tables. `only` restricts the DAA grid to runs whose id contains one of the strings.
    pub fn run_all(&self, only: &[String]) -> Result<(Vec<ResultRow>, Vec<SampleRow>)> {
        for s in &self.cfg.sizes {
            self.sft_model(&s.name)?;
        }
        self.pairs()?;
        for s in &self.cfg.sizes {
            self.run_sft_eval(&s.name)?;
        }
        for run in self.cfg.runs() {
            if only.is_empty() || only.iter().any(|o| run.id().contains(o.as_str())) {
                self.run_daa(&run)?;
            }
        }
        self.collect()
    }

    /// The finished result files of this grid (one per run id, each checked against this
    /// configuration: one made with other settings is an error), and the result files of runs
    /// outside the grid (e.g. of a larger grid in the same directory).
    pub fn grid_results(&self) -> Result<(Vec<(PathBuf, RunResults)>, Vec<PathBuf>)> {
        let want = self.expected_hashes();
        let mut outside = vec![];
        let mut kept = vec![];
        for f in result_files(&self.out.join("results"))? {
            let id = f.file_stem().map(|s| s.to_string_lossy().into_owned());
            match id.as_deref().and_then(|id| want.get(id)) {
                Some(h) => kept.push((f.clone(), self.existing_results(&f, h)?)),
                None => outside.push(f),
            }
        }
        Ok((kept, outside))
    }

    /// Assemble the finished result files of this grid into the tables ([`Teach::grid_results`];
    /// files of runs outside the grid are left out, and listed on stderr).
    pub fn collect(&self) -> Result<(Vec<ResultRow>, Vec<SampleRow>)> {
        let (kept, outside) = self.grid_results()?;
        if !outside.is_empty() {
            eprintln!(
                "collect: left out {} result file(s) of runs outside this grid: {}",
                outside.len(),
                outside
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        merge_results(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOKE: &str = include_str!("../../artifact/configs/teach/smoke.toml");

    /// The error of the smoke configuration with `from` replaced by `to`.
    fn error_with(from: &str, to: &str) -> String {
        assert!(SMOKE.contains(from), "{from}");
        let text = SMOKE.replacen(from, to, 1);
        format!(
            "{:#}",
            TeachConfig::from_toml(&text, "smoke.toml").unwrap_err()
        )
    }

    #[test]
    fn configurations_are_checked_key_by_key_before_anything_runs() {
        TeachConfig::from_toml(SMOKE, "smoke.toml").unwrap();
        TeachConfig::from_toml(
            include_str!("../../artifact/configs/teach/teach.toml"),
            "teach.toml",
        )
        .unwrap();
        for (from, to, want) in [
            (
                "batch_size = 64",
                "batch_size = 0",
                "`sft.batch_size` must be positive",
            ),
            (
                "examples = 1024",
                "examples = 10",
                "`sft.examples` (10) make no full batch",
            ),
            (
                "lr = 3e-3",
                "lr = -3e-3",
                "`sft.lr` must be a positive number",
            ),
            (
                "batch_size = 32",
                "batch_size = 0",
                "`daa.batch_size` and `micro_batch_size`",
            ),
            (
                "micro_batch_size = 16",
                "micro_batch_size = 12",
                "`daa.batch_size` (32) must be a multiple",
            ),
            (
                "checkpoints = [0.5, 1.0]",
                "checkpoints = [0.0, 1.5]",
                "`daa.checkpoints` must be fractions",
            ),
            (
                "checkpoints = [0.5, 1.0]",
                "checkpoints = [0.5, 0.5]",
                "`daa.checkpoints` lists 0.5 twice",
            ),
            (
                "n_train = 128",
                "n_train = 16",
                "`pairs.n_train` (16) make no full batch of `daa.batch_size` (32)",
            ),
            (
                "betas = [0.1, 1.0]",
                "betas = [0.1, 0.10]",
                "`daa.betas` lists 0.1 twice",
            ),
            ("betas = [0.1, 1.0]", "betas = []", "`daa.betas` is empty"),
            (
                "objectives = [\"dpo\", \"ipo\"]",
                "objectives = []",
                "`daa.objectives` is empty",
            ),
            ("seeds = [0]", "seeds = []", "`daa.seeds` is empty"),
            (
                "lr = 1e-3",
                "lr = -1e-3",
                "`daa.lr` must be a positive number",
            ),
            (
                "warmup_frac = 0.25",
                "warmup_frac = -3",
                "`daa.warmup_frac` must be in [0, 1)",
            ),
            (
                "betas = [0.1]\n",
                "betas = [-0.1]\n",
                "`rdpo.betas` must be a positive number",
            ),
            (
                "name = \"s\"",
                "name = \"xs\"",
                "`sizes.name` lists \"xs\" twice",
            ),
            (
                "name = \"s\"",
                "name = \"s-1\"",
                "use letters, digits and _",
            ),
            (
                "n_prompts = 16",
                "n_prompts = 0",
                "`eval.n_prompts` must be positive",
            ),
        ] {
            let e = error_with(from, to);
            assert!(e.contains(want), "{from} -> {to}: {e}");
            assert!(e.contains("smoke.toml"), "{e}");
        }
    }
}
