//! The toy tree MDP of the paper's section 4 / Appendix E, and Appendix D in numbers.
//!
//! A GRU policy over the action history is behaviour-cloned on three demonstrations
//! `(a0,a0,a0)`, `(a1,a1,a0)`, `(a2,a2,a2)`, then trained with DPO / IPO / SLiC on the single
//! preference `(a1,a1,a0) > (a0,a0,a0)` with the SFT policy as the reference. The exact
//! probability of every one of the 27 trajectories is tracked over training and summarised as
//! mass on the preferred, the dispreferred, the third demonstration and the 24
//! out-of-distribution (OOD) trajectories, over many seeds (claim C9). See docs/toy_mdp.md.
//!
//! [`run_section`] runs everything and writes the CSV tables; [`ToyMdpReport`] is its summary.

pub mod appendix_d;
pub mod mdp;
pub mod policy;
pub mod train;

pub use mdp::{Group, GroupMass, N_TRAJ, State, Trajectory, all_trajectories, top_ood};
pub use policy::{GruPolicy, PolicyConfig, TreeEval};
pub use train::{DaaConfig, SftConfig, Snapshot, TrainTrace, daa, sft};

use crate::train::loss::Objective;
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Thresholds of the C9 verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct C9Thresholds {
    /// An objective moves "substantial" OOD mass when the median end-of-training OOD mass over
    /// all its runs (every beta and seed) is at least this.
    pub substantial_ood: f64,
    /// Seeds whose end OOD mass is below this are left out when asking WHERE the OOD mass goes.
    pub locate_min_ood: f64,
    /// DPO seeds disagree on HOW MUCH goes OOD at a beta when max - min of their OOD mass is
    /// at least this.
    pub spread: f64,
}

impl Default for C9Thresholds {
    fn default() -> Self {
        Self {
            substantial_ood: 0.1,
            locate_min_ood: 0.05,
            spread: 0.2,
        }
    }
}

/// Settings of the whole section. Defaults are the settings the docs report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ToyMdpConfig {
    /// Seeds: each seed initialises its own policy, runs SFT once, and every objective x beta
    /// starts from that SFT policy (which is also its reference).
    pub seeds: Vec<u64>,
    /// Objective names (`dpo`, `ipo`, `ipo_paper`, `slic`; `rdpo` equals DPO here since both
    /// trajectories have 3 actions).
    pub objectives: Vec<String>,
    /// The paper's betas.
    pub betas: Vec<f64>,
    pub policy: PolicyConfig,
    pub sft: SftConfig,
    pub daa: DaaConfig,
    /// Log the trajectory probabilities every this many steps (and at the first and last).
    pub log_every: usize,
    /// Betas at which Appendix D's soft value is evaluated.
    pub appendix_d_betas: Vec<f64>,
    pub c9: C9Thresholds,
}

impl Default for ToyMdpConfig {
    fn default() -> Self {
        Self {
            seeds: (0..8).collect(),
            objectives: vec!["dpo".into(), "ipo".into(), "slic".into()],
            betas: vec![0.01, 0.1, 0.5],
            policy: PolicyConfig::default(),
            sft: SftConfig::default(),
            daa: DaaConfig::default(),
            log_every: 10,
            appendix_d_betas: vec![1.0, 0.5, 0.1, 0.05, 0.01, 0.001],
            c9: C9Thresholds::default(),
        }
    }
}

impl ToyMdpConfig {
    /// Parse the objective names, naming the culprit on error.
    pub fn parsed_objectives(&self) -> Result<Vec<Objective>> {
        self.objectives
            .iter()
            .map(|n| {
                Objective::from_name(n, 0.0)
                    .with_context(|| format!("toy_mdp config key objectives: {n:?}"))
            })
            .collect()
    }

    /// Check the settings; errors name the key.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(!self.seeds.is_empty(), "toy_mdp config key seeds: empty");
        let mut seeds = self.seeds.clone();
        seeds.sort();
        seeds.dedup();
        anyhow::ensure!(
            seeds.len() == self.seeds.len(),
            "toy_mdp config key seeds: {:?} repeats a seed",
            self.seeds
        );
        anyhow::ensure!(!self.betas.is_empty(), "toy_mdp config key betas: empty");
        for &b in self.betas.iter().chain(&self.appendix_d_betas) {
            anyhow::ensure!(
                b > 0.0 && b.is_finite(),
                "toy_mdp config keys betas / appendix_d_betas: {b} is not a positive number"
            );
        }
        anyhow::ensure!(
            self.log_every > 0,
            "toy_mdp config key log_every: must be positive"
        );
        for (k, lr) in [
            ("sft.optim.lr", self.sft.optim.lr),
            ("daa.optim.lr", self.daa.optim.lr),
        ] {
            anyhow::ensure!(
                lr > 0.0 && lr.is_finite(),
                "toy_mdp config key {k}: {lr} is not a positive number"
            );
        }
        self.parsed_objectives()?;
        Ok(())
    }
}

/// Median, min, max and mean of a sample (all NaN when empty).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Dist {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
}

impl Dist {
    pub fn of(xs: &[f64]) -> Dist {
        let n = xs.len();
        if n == 0 {
            return Dist {
                n,
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                mean: f64::NAN,
            };
        }
        let mut v = xs.to_vec();
        v.sort_by(f64::total_cmp);
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            0.5 * (v[n / 2 - 1] + v[n / 2])
        };
        Dist {
            n,
            median,
            min: v[0],
            max: v[n - 1],
            mean: v.iter().sum::<f64>() / n as f64,
        }
    }
}

/// The SFT policy of one seed.
#[derive(Debug, Clone, Serialize)]
pub struct SftSummary {
    pub seed: u64,
    pub steps: usize,
    pub final_loss: f64,
    pub mass: GroupMass,
    /// Mass on the three demonstrations together.
    pub in_distribution: f64,
}

/// One DAA run (objective, beta, seed) at the end of training.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub objective: String,
    pub beta: f64,
    pub seed: u64,
    pub final_loss: f64,
    /// Implicit-reward margin `beta * h` of the final policy.
    pub reward_margin: f64,
    /// Group masses of the reference (SFT) policy and at the end of training.
    pub sft_mass: GroupMass,
    pub end_mass: GroupMass,
    /// Largest OOD mass at any step, and that step.
    pub peak_ood: f64,
    pub peak_ood_step: usize,
    /// The OOD trajectory holding the most mass at the end, and its probability.
    pub top_ood: Trajectory,
    pub top_ood_prob: f64,
    /// OOD mass on trajectories that start with the preferred prefix `a1 a1`.
    pub ood_on_preferred_prefix: f64,
    /// Largest |sum of probabilities - 1| over every step of this run.
    pub max_prob_sum_error: f64,
}

/// How many seeds put their top OOD trajectory on `trajectory`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrajCount {
    pub trajectory: Trajectory,
    pub seeds: usize,
}

fn count_trajs(ts: impl IntoIterator<Item = Trajectory>) -> Vec<TrajCount> {
    let mut out: Vec<TrajCount> = vec![];
    for t in ts {
        match out.iter_mut().find(|c| c.trajectory == t) {
            Some(c) => c.seeds += 1,
            None => out.push(TrajCount {
                trajectory: t,
                seeds: 1,
            }),
        }
    }
    out.sort_by(|a, b| b.seeds.cmp(&a.seeds).then(a.trajectory.cmp(&b.trajectory)));
    out
}

/// A trajectory with a probability (here: mean over seeds).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrajMass {
    pub trajectory: Trajectory,
    pub mass: f64,
}

/// One objective x beta over seeds: distributions of the end-of-training group masses.
#[derive(Debug, Clone, Serialize)]
pub struct CellSummary {
    pub objective: String,
    pub beta: f64,
    pub preferred: Dist,
    pub dispreferred: Dist,
    pub third_demo: Dist,
    pub ood: Dist,
    pub peak_ood: Dist,
    /// The step of each seed's OOD peak.
    pub peak_ood_step: Dist,
    /// End OOD mass on trajectories starting `a1 a1` (the preferred prefix).
    pub ood_on_preferred_prefix: Dist,
    /// End preferred mass minus SFT preferred mass (what the preferred trajectory gains).
    pub preferred_gain: Dist,
    /// Top OOD trajectory per seed, counted.
    pub top_ood: Vec<TrajCount>,
    /// The three OOD trajectories with the largest mean end mass over seeds.
    pub ood_by_trajectory: Vec<TrajMass>,
    /// At `s9` (prefix a1 a1): seeds whose largest logit is an action no demonstration takes
    /// there (not a0), and the median soft value minus the data action's Q at beta_train
    /// (`-beta log pi(a0 | a1 a1)`).
    pub s9_argmax_ood_seeds: usize,
    pub s9_soft_minus_data: Dist,
}

/// Per objective, for C9.
#[derive(Debug, Clone, Serialize)]
pub struct C9Objective {
    pub objective: String,
    /// End OOD mass over all betas and seeds.
    pub ood: Dist,
    /// End OOD mass minus the SFT policy's OOD mass, over all betas and seeds.
    pub ood_increase: Dist,
    /// Largest OOD mass reached during training, over all betas and seeds.
    pub peak_ood: Dist,
    /// (beta, median end OOD mass over seeds, median peak OOD mass over seeds).
    pub median_ood_by_beta: Vec<(f64, f64, f64)>,
    /// Median END OOD mass >= `substantial_ood`.
    pub substantial: bool,
    /// Median PEAK OOD mass during training >= `substantial_ood`.
    pub substantial_during_training: bool,
}

/// DPO at one beta: do the seeds disagree?
#[derive(Debug, Clone, Serialize)]
pub struct DpoSeedSpread {
    pub beta: f64,
    pub preferred: Dist,
    pub third_demo: Dist,
    pub ood: Dist,
    /// Top OOD trajectory of the seeds with OOD mass >= `locate_min_ood`.
    pub top_ood: Vec<TrajCount>,
    /// Seeds with OOD mass >= `locate_min_ood`.
    pub located_seeds: usize,
    /// More than one distinct top OOD trajectory among the located seeds.
    pub disagree_where: bool,
    /// max - min OOD mass over seeds >= `spread`.
    pub disagree_how_much: bool,
    /// max - min over seeds of the preferred, third-demonstration or OOD mass >= `spread`: the
    /// seeds split the probability differently.
    pub split_differs: bool,
}

/// The C9 verdict with its evidence.
#[derive(Debug, Clone, Serialize)]
pub struct C9Summary {
    pub thresholds: C9Thresholds,
    pub per_objective: Vec<C9Objective>,
    pub every_objective_substantial: bool,
    pub every_objective_substantial_during_training: bool,
    pub dpo: Vec<DpoSeedSpread>,
    /// At some beta the DPO seeds disagree on where the OOD mass goes, or split the mass
    /// between preferred / third demonstration / OOD differently.
    pub dpo_seeds_disagree: bool,
    /// C9 at the end of training: every objective substantial AND the DPO seeds disagree.
    pub holds: bool,
    /// The same with the peak OOD mass during training in place of the end mass.
    pub holds_during_training: bool,
    pub verdict: String,
}

/// Appendix D: an example soft-value table and the tie to the trained policies.
#[derive(Debug, Clone, Serialize)]
pub struct AppendixDSummary {
    /// Which run and state the example table reads its Q-values from: the run with the most
    /// OOD mass behind the preferred prefix `a1 a1`, at `s9`.
    pub example: String,
    /// The example's soft value vs hard max over `appendix_d_betas`.
    pub example_table: Vec<appendix_d::StateValueRow>,
}

/// Everything [`run_section`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct ToyMdpReport {
    pub config: ToyMdpConfig,
    pub num_params: usize,
    pub sft: Vec<SftSummary>,
    /// Mass on the three demonstrations after SFT, over seeds.
    pub sft_in_distribution: Dist,
    pub runs: Vec<RunSummary>,
    pub cells: Vec<CellSummary>,
    pub appendix_d: AppendixDSummary,
    pub c9: C9Summary,
    /// Largest |sum of the 27 probabilities - 1| over every step of every run (SFT included).
    pub max_prob_sum_error: f64,
    pub files: Vec<PathBuf>,
    pub wall_seconds: f64,
}

/// Output file names under `out_dir`.
pub const GROUPS_CSV: &str = "toy_mdp_groups.csv";
pub const TRAJECTORIES_CSV: &str = "toy_mdp_trajectories.csv";
pub const RUNS_CSV: &str = "toy_mdp_runs.csv";
pub const APPENDIX_D_CSV: &str = "toy_mdp_appendix_d.csv";
pub const REPORT_JSON: &str = "toy_mdp_report.json";

fn ood_on_prefix(probs: &[f64], prefix: [usize; 2]) -> f64 {
    all_trajectories()
        .iter()
        .filter(|t| t.group() == Group::Ood && t.0[..2] == prefix)
        .map(|t| probs[t.index()])
        .sum()
}

/// Run SFT and every objective x beta x seed, write the CSV tables (and the report as JSON)
/// under `out_dir`, and return the report.
///
/// Files: `toy_mdp_groups.csv` (objective, beta, seed, step, group, mass; SFT progress as
/// objective `sft` with an empty beta), `toy_mdp_trajectories.csv` (per run and trajectory:
/// SFT and end probability), `toy_mdp_runs.csv` (one row per run), `toy_mdp_appendix_d.csv`
/// (soft value vs hard max at the demonstration-path states of every trained policy),
/// `toy_mdp_report.json`.
pub fn run_section(cfg: &ToyMdpConfig, out_dir: &Path) -> Result<ToyMdpReport> {
    let t0 = std::time::Instant::now();
    cfg.validate()?;
    let objectives = cfg.parsed_objectives()?;
    let dev = Device::Cpu;
    let data = appendix_d::data_actions();

    let mut groups_csv = String::from("objective,beta,seed,step,group,mass\n");
    let mut traj_csv =
        String::from("objective,beta,seed,trajectory,group,prob_sft,prob_end,log_ratio\n");
    let mut runs_csv = String::from(
        "objective,beta,seed,final_loss,reward_margin,preferred,dispreferred,third_demo,ood,\
         sft_ood,peak_ood,peak_ood_step,top_ood,top_ood_prob,ood_on_preferred_prefix\n",
    );
    let mut appd_csv = String::from(
        "objective,beta,seed,state,prefix,beta_eval,q_a0,q_a1,q_a2,soft_value,hard_max,\
         soft_minus_max,max_data_q,soft_minus_data,argmax_action,argmax_in_data\n",
    );
    let push_groups = |csv: &mut String, obj: &str, beta: &str, seed: u64, snaps: &[Snapshot]| {
        for s in snaps {
            let m = GroupMass::from_probs(&s.probs);
            for g in Group::ALL {
                let _ = writeln!(
                    csv,
                    "{obj},{beta},{seed},{},{},{:.9}",
                    s.step,
                    g.name(),
                    m.get(g)
                );
            }
        }
    };

    let mut sfts = vec![];
    let mut runs = vec![];
    let mut end_probs: Vec<Vec<f64>> = vec![];
    // per run (same order as `runs`): the s9 row at beta_train, and s9's logits
    let mut s9: Vec<appendix_d::StateValueRow> = vec![];
    let mut s9_logits: Vec<[f64; 3]> = vec![];
    let mut max_err = 0f64;
    let mut num_params = 0;

    for &seed in &cfg.seeds {
        let base = GruPolicy::new(&cfg.policy, seed, &dev)?;
        num_params = base.num_params();
        let tr = sft(&base, &cfg.sft, cfg.log_every)
            .with_context(|| format!("toy_mdp SFT, seed {seed}"))?;
        max_err = max_err.max(tr.max_sum_error);
        push_groups(&mut groups_csv, "sft", "", seed, &tr.snapshots);
        let sft_probs = tr.final_probs().to_vec();
        let sft_mass = GroupMass::from_probs(&sft_probs);
        sfts.push(SftSummary {
            seed,
            steps: cfg.sft.steps,
            final_loss: tr.final_loss,
            mass: sft_mass,
            in_distribution: sft_mass.in_distribution(),
        });
        let ref_logp = tr
            .final_eval
            .traj_logp
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;

        for (oi, &obj) in objectives.iter().enumerate() {
            let on = cfg.objectives[oi].as_str();
            for &beta in &cfg.betas {
                let pol = base.deep_clone()?;
                let tr = daa(&pol, &ref_logp, obj, beta, &cfg.daa, cfg.log_every)
                    .with_context(|| format!("toy_mdp {on} beta {beta} seed {seed}"))?;
                max_err = max_err.max(tr.max_sum_error);
                push_groups(&mut groups_csv, on, &beta.to_string(), seed, &tr.snapshots);
                let end = tr.final_probs().to_vec();
                end_probs.push(end.clone());
                for t in all_trajectories() {
                    let (ps, pe) = (sft_probs[t.index()], end[t.index()]);
                    let _ = writeln!(
                        traj_csv,
                        "{on},{beta},{seed},{t},{},{ps:.9e},{pe:.9e},{:.6}",
                        t.group().name(),
                        pe.ln() - ps.ln()
                    );
                }
                let end_mass = GroupMass::from_probs(&end);
                let (top, top_p) = top_ood(&end);
                let stats = tr.final_stats.unwrap_or_default();
                let run = RunSummary {
                    objective: on.to_string(),
                    beta,
                    seed,
                    final_loss: tr.final_loss,
                    reward_margin: stats.reward_margin,
                    sft_mass,
                    end_mass,
                    peak_ood: tr.peak_ood.1,
                    peak_ood_step: tr.peak_ood.0,
                    top_ood: top,
                    top_ood_prob: top_p,
                    ood_on_preferred_prefix: ood_on_prefix(&end, [1, 1]),
                    max_prob_sum_error: tr.max_sum_error,
                };
                let _ = writeln!(
                    runs_csv,
                    "{on},{beta},{seed},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{},{top},{top_p:.6},{:.6}",
                    run.final_loss,
                    run.reward_margin,
                    end_mass.preferred,
                    end_mass.dispreferred,
                    end_mass.third_demo,
                    end_mass.ood,
                    sft_mass.ood,
                    run.peak_ood,
                    run.peak_ood_step,
                    run.ood_on_preferred_prefix
                );
                runs.push(run);

                for (prefix, acts) in &data {
                    let logits = tr.final_eval.state_logits(prefix)?;
                    let rows =
                        appendix_d::state_rows(prefix, logits, acts, beta, &cfg.appendix_d_betas);
                    for r in &rows {
                        let _ = writeln!(
                            appd_csv,
                            "{on},{beta},{seed},{},{},{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6e},{:.6},{:.6},a{},{}",
                            r.state,
                            r.prefix,
                            r.beta_eval,
                            r.q[0],
                            r.q[1],
                            r.q[2],
                            r.soft_value,
                            r.hard_max,
                            r.soft_minus_max,
                            r.max_data_q,
                            r.soft_minus_data,
                            r.argmax_action,
                            r.argmax_in_data
                        );
                    }
                    if prefix.as_slice() == [1, 1] {
                        let at_train = appendix_d::state_rows(prefix, logits, acts, beta, &[beta]);
                        s9.push(at_train[0].clone());
                        s9_logits.push(logits);
                    }
                }
            }
        }
    }

    // per objective x beta
    let mut cells = vec![];
    for on in &cfg.objectives {
        for &beta in &cfg.betas {
            let sel: Vec<usize> = (0..runs.len())
                .filter(|&i| &runs[i].objective == on && runs[i].beta == beta)
                .collect();
            let rs: Vec<&RunSummary> = sel.iter().map(|&i| &runs[i]).collect();
            let d = |f: &dyn Fn(&RunSummary) -> f64| {
                Dist::of(&rs.iter().map(|r| f(r)).collect::<Vec<_>>())
            };
            let s9r: Vec<&appendix_d::StateValueRow> = sel.iter().map(|&i| &s9[i]).collect();
            let mut by_traj: Vec<TrajMass> = all_trajectories()
                .into_iter()
                .filter(|t| t.group() == Group::Ood)
                .map(|t| TrajMass {
                    trajectory: t,
                    mass: sel.iter().map(|&i| end_probs[i][t.index()]).sum::<f64>()
                        / sel.len().max(1) as f64,
                })
                .collect();
            by_traj.sort_by(|a, b| b.mass.total_cmp(&a.mass));
            by_traj.truncate(3);
            cells.push(CellSummary {
                objective: on.clone(),
                beta,
                preferred: d(&|r| r.end_mass.preferred),
                dispreferred: d(&|r| r.end_mass.dispreferred),
                third_demo: d(&|r| r.end_mass.third_demo),
                ood: d(&|r| r.end_mass.ood),
                peak_ood: d(&|r| r.peak_ood),
                peak_ood_step: d(&|r| r.peak_ood_step as f64),
                ood_on_preferred_prefix: d(&|r| r.ood_on_preferred_prefix),
                preferred_gain: d(&|r| r.end_mass.preferred - r.sft_mass.preferred),
                top_ood: count_trajs(rs.iter().map(|r| r.top_ood)),
                ood_by_trajectory: by_traj,
                s9_argmax_ood_seeds: s9r.iter().filter(|r| !r.argmax_in_data).count(),
                s9_soft_minus_data: Dist::of(
                    &s9r.iter().map(|r| r.soft_minus_data).collect::<Vec<_>>(),
                ),
            });
        }
    }

    let c9 = c9_summary(cfg, &runs);
    let appendix = match (0..runs.len()).max_by(|&a, &b| {
        runs[a]
            .ood_on_preferred_prefix
            .total_cmp(&runs[b].ood_on_preferred_prefix)
            .then(b.cmp(&a))
    }) {
        Some(i) => {
            let r = &runs[i];
            AppendixDSummary {
                example: format!(
                    "{} beta {} seed {}: state s9 (prefix a1a1), {:.3} of the mass on OOD trajectories a1a1a1 / a1a1a2",
                    r.objective, r.beta, r.seed, r.ood_on_preferred_prefix
                ),
                example_table: appendix_d::state_rows(
                    &[1, 1],
                    s9_logits[i],
                    &[0],
                    r.beta,
                    &cfg.appendix_d_betas,
                ),
            }
        }
        None => AppendixDSummary {
            example: "no runs".into(),
            example_table: vec![],
        },
    };
    let sft_in = Dist::of(&sfts.iter().map(|s| s.in_distribution).collect::<Vec<_>>());

    let files: Vec<PathBuf> = [
        GROUPS_CSV,
        TRAJECTORIES_CSV,
        RUNS_CSV,
        APPENDIX_D_CSV,
        REPORT_JSON,
    ]
    .iter()
    .map(|f| out_dir.join(f))
    .collect();
    for (path, body) in files
        .iter()
        .zip([&groups_csv, &traj_csv, &runs_csv, &appd_csv])
    {
        crate::util::write_atomic(path, body.as_bytes())?;
    }
    let mut report = ToyMdpReport {
        config: cfg.clone(),
        num_params,
        sft: sfts,
        sft_in_distribution: sft_in,
        runs,
        cells,
        appendix_d: appendix,
        c9,
        max_prob_sum_error: max_err,
        files: files.clone(),
        wall_seconds: 0.0,
    };
    report.wall_seconds = t0.elapsed().as_secs_f64();
    let json = serde_json::to_string_pretty(&report)?;
    crate::util::write_atomic(&files[4], json.as_bytes())?;
    Ok(report)
}

fn c9_summary(cfg: &ToyMdpConfig, runs: &[RunSummary]) -> C9Summary {
    let th = cfg.c9.clone();
    let dist = |rs: &[&RunSummary], f: &dyn Fn(&RunSummary) -> f64| {
        Dist::of(&rs.iter().map(|r| f(r)).collect::<Vec<_>>())
    };
    let per_objective: Vec<C9Objective> = cfg
        .objectives
        .iter()
        .map(|on| {
            let rs: Vec<&RunSummary> = runs.iter().filter(|r| &r.objective == on).collect();
            let ood = dist(&rs, &|r| r.end_mass.ood);
            let peak = dist(&rs, &|r| r.peak_ood);
            let by_beta = cfg
                .betas
                .iter()
                .map(|&b| {
                    let rb: Vec<&RunSummary> = rs.iter().copied().filter(|r| r.beta == b).collect();
                    (
                        b,
                        dist(&rb, &|r| r.end_mass.ood).median,
                        dist(&rb, &|r| r.peak_ood).median,
                    )
                })
                .collect();
            C9Objective {
                objective: on.clone(),
                substantial: ood.median >= th.substantial_ood,
                substantial_during_training: peak.median >= th.substantial_ood,
                ood_increase: dist(&rs, &|r| r.end_mass.ood - r.sft_mass.ood),
                ood,
                peak_ood: peak,
                median_ood_by_beta: by_beta,
            }
        })
        .collect();
    let every = !per_objective.is_empty() && per_objective.iter().all(|o| o.substantial);
    let every_peak =
        !per_objective.is_empty() && per_objective.iter().all(|o| o.substantial_during_training);
    let dpo: Vec<DpoSeedSpread> = cfg
        .betas
        .iter()
        .map(|&b| {
            let rs: Vec<&RunSummary> = runs
                .iter()
                .filter(|r| r.objective == "dpo" && r.beta == b)
                .collect();
            let pref = dist(&rs, &|r| r.end_mass.preferred);
            let third = dist(&rs, &|r| r.end_mass.third_demo);
            let ood = dist(&rs, &|r| r.end_mass.ood);
            let located: Vec<&&RunSummary> = rs
                .iter()
                .filter(|r| r.end_mass.ood >= th.locate_min_ood)
                .collect();
            let top = count_trajs(located.iter().map(|r| r.top_ood));
            let spread = |d: &Dist| rs.len() > 1 && d.max - d.min >= th.spread;
            DpoSeedSpread {
                beta: b,
                disagree_where: top.len() > 1,
                disagree_how_much: spread(&ood),
                split_differs: spread(&pref) || spread(&third) || spread(&ood),
                located_seeds: located.len(),
                top_ood: top,
                preferred: pref,
                third_demo: third,
                ood,
            }
        })
        .filter(|d| d.ood.n > 0)
        .collect();
    let disagree = dpo.iter().any(|d| d.disagree_where || d.split_differs);
    let holds = every && disagree;
    let holds_peak = every_peak && disagree;
    let mut verdict = format!(
        "C9 {} at the end of training, {} during training. ",
        if holds { "holds" } else { "does not hold" },
        if holds_peak { "holds" } else { "does not hold" },
    );
    let subs: Vec<String> = per_objective
        .iter()
        .map(|o| {
            format!(
                "{} end {:.2} [{:.2}, {:.2}], peak {:.2} [{:.2}, {:.2}]",
                o.objective,
                o.ood.median,
                o.ood.min,
                o.ood.max,
                o.peak_ood.median,
                o.peak_ood.min,
                o.peak_ood.max
            )
        })
        .collect();
    let _ = write!(
        verdict,
        "OOD mass, median [min, max] over betas and seeds: {}; 'substantial' means median >= {}: \
         at the end {} objective(s) qualify, at the peak {}. ",
        subs.join("; "),
        th.substantial_ood,
        per_objective.iter().filter(|o| o.substantial).count(),
        per_objective
            .iter()
            .filter(|o| o.substantial_during_training)
            .count(),
    );
    if dpo.is_empty() {
        verdict.push_str("DPO was not run, so seed disagreement was not measured.");
    } else {
        let parts: Vec<String> = dpo
            .iter()
            .map(|d| {
                let tops: Vec<String> = d.top_ood.iter().map(|c| format!("{}x{}", c.trajectory, c.seeds)).collect();
                format!(
                    "beta {}: preferred {:.2}..{:.2}, third demo {:.2}..{:.2}, OOD {:.2}..{:.2}, top OOD [{}]",
                    d.beta,
                    d.preferred.min,
                    d.preferred.max,
                    d.third_demo.min,
                    d.third_demo.max,
                    d.ood.min,
                    d.ood.max,
                    tops.join(" ")
                )
            })
            .collect();
        let _ = write!(
            verdict,
            "DPO seeds {} ({}).",
            if disagree { "disagree" } else { "agree" },
            parts.join("; ")
        );
    }
    C9Summary {
        thresholds: th,
        per_objective,
        every_objective_substantial: every,
        every_objective_substantial_during_training: every_peak,
        dpo,
        dpo_seeds_disagree: disagree,
        holds,
        holds_during_training: holds_peak,
        verdict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_toml_friendly_and_strict() {
        let cfg = ToyMdpConfig::default();
        let s = toml::to_string(&cfg).unwrap();
        let back: ToyMdpConfig = toml::from_str(&s).unwrap();
        assert_eq!(back, cfg);
        let partial: ToyMdpConfig = toml::from_str("seeds = [3]\n[daa]\nsteps = 5\n").unwrap();
        assert_eq!((partial.seeds.clone(), partial.daa.steps), (vec![3], 5));
        assert_eq!(partial.daa.optim, DaaConfig::default().optim);
        let e = toml::from_str::<ToyMdpConfig>("seedz = [1]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("seedz"), "{e}");
        let bad = ToyMdpConfig {
            objectives: vec!["dpo".into(), "kto".into()],
            ..ToyMdpConfig::default()
        };
        let e = format!("{:#}", bad.validate().unwrap_err());
        assert!(e.contains("objectives") && e.contains("kto"), "{e}");
        let dup = ToyMdpConfig {
            seeds: vec![1, 2, 1],
            ..ToyMdpConfig::default()
        };
        assert!(dup.validate().unwrap_err().to_string().contains("seeds"));
    }

    #[test]
    fn dist_statistics() {
        let d = Dist::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!(
            (d.n, d.median, d.min, d.max, d.mean),
            (4, 2.5, 1.0, 10.0, 4.0)
        );
        assert_eq!(Dist::of(&[5.0, 1.0, 2.0]).median, 2.0);
        assert!(Dist::of(&[]).median.is_nan());
    }

    #[test]
    fn tiny_section_runs_and_writes_tables() {
        let cfg = ToyMdpConfig {
            seeds: vec![0, 1],
            objectives: vec!["dpo".into(), "slic".into()],
            betas: vec![0.1],
            sft: SftConfig {
                steps: 5,
                ..SftConfig::default()
            },
            daa: DaaConfig {
                steps: 4,
                ..DaaConfig::default()
            },
            log_every: 2,
            ..ToyMdpConfig::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let rep = run_section(&cfg, dir.path()).unwrap();
        assert_eq!(rep.runs.len(), 4);
        assert_eq!(rep.cells.len(), 2);
        assert!(rep.max_prob_sum_error < 1e-9);
        let groups = std::fs::read_to_string(dir.path().join(GROUPS_CSV)).unwrap();
        // SFT: steps 0,2,4,5 ; DAA: steps 0,2,4 ; 4 groups each
        let n_rows = 2 * 4 * 4 + 4 * 3 * 4;
        assert_eq!(groups.lines().count(), 1 + n_rows, "{groups}");
        assert!(
            groups
                .lines()
                .nth(1)
                .unwrap()
                .starts_with("sft,,0,0,preferred,")
        );
        let traj = std::fs::read_to_string(dir.path().join(TRAJECTORIES_CSV)).unwrap();
        assert_eq!(traj.lines().count(), 1 + 4 * 27);
        let appd = std::fs::read_to_string(dir.path().join(APPENDIX_D_CSV)).unwrap();
        assert_eq!(appd.lines().count(), 1 + 4 * 7 * cfg.appendix_d_betas.len());
        let runs = std::fs::read_to_string(dir.path().join(RUNS_CSV)).unwrap();
        assert_eq!(runs.lines().count(), 5);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(REPORT_JSON)).unwrap())
                .unwrap();
        assert!(json["c9"]["verdict"].as_str().unwrap().starts_with("C9 "));
        assert_eq!(json["runs"][0]["top_ood"].as_str().unwrap().len(), 6);
    }
}
