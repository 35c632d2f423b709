//! A local job runner for the teach grid: the stages of [`super::teach::Teach`] as separate
//! `overopt sweep` processes, several at a time, in dependency order.
//!
//! The stages are the job-array entry points (`sweep --stage ...` / `sweep --run ID`), so a
//! local run and a cluster run do the same work and write the same files. On a small machine
//! this beats one process using every core: the teach models are so small that most of a
//! step is single-threaded work (per-row kernels, candle's autograd bookkeeping), so one
//! process on 2 threads is barely faster than on 1, while two 1-thread processes do twice the
//! work (docs/perf.md). Each worker gets `cpus / jobs` threads.
//!
//! A stage that fails stops the launch of new ones; the running ones finish, finished stages
//! keep their files (a rerun skips them), and the error names every failed stage.

use super::teach::TeachConfig;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

/// One stage: its name, the arguments that run it after `overopt sweep --config C --out O`,
/// and the stages it needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub name: String,
    pub args: Vec<String>,
    pub deps: Vec<usize>,
}

/// The stages of the grid, in the order they should start when ready: SFT of each size
/// (largest first, the longest), the preference pairs (after the SFT of their source size),
/// each SFT evaluation, then the DAA runs (largest sizes first), restricted to ids containing
/// one of `only` when it is not empty.
pub fn jobs(cfg: &TeachConfig, only: &[String]) -> Result<Vec<Job>> {
    // Job i < sizes.len() is the SFT of sizes[i], the largest (longest) first.
    let mut specs: Vec<_> = cfg.sizes.iter().collect();
    specs.sort_by_key(|s| std::cmp::Reverse(s.hidden_size * s.hidden_size * s.num_hidden_layers));
    let sizes: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let sft = |name: &str| -> Result<usize> {
        sizes
            .iter()
            .position(|s| *s == name)
            .with_context(|| format!("no size {name:?} in the grid"))
    };
    let job = |name: String, args: &[&str], deps: Vec<usize>| Job {
        name,
        args: args.iter().map(|s| s.to_string()).collect(),
        deps,
    };
    let mut out: Vec<Job> = sizes
        .iter()
        .map(|s| {
            job(
                format!("sft:{s}"),
                &["--stage", &format!("sft:{s}")],
                vec![],
            )
        })
        .collect();
    let pairs = out.len();
    out.push(job(
        "pairs".into(),
        &["--stage", "pairs"],
        vec![sft(&cfg.pairs.source_size)?],
    ));
    for (i, s) in sizes.iter().enumerate() {
        out.push(job(
            format!("sft-eval:{s}"),
            &["--stage", &format!("sft-eval:{s}")],
            vec![i, pairs],
        ));
    }
    // DAA runs by size, largest first (a stable sort keeps the grid's order within a size).
    let mut runs = vec![];
    for r in cfg.runs() {
        if only.is_empty() || only.iter().any(|o| r.id().contains(o.as_str())) {
            runs.push((sft(&r.size)?, r));
        }
    }
    runs.sort_by_key(|(d, _)| *d);
    for (d, r) in runs {
        let id = r.id();
        out.push(job(format!("daa:{id}"), &["--run", &id], vec![d, pairs]));
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Pending,
    Running,
    Done,
    Failed,
}

/// Run `jobs` with at most `workers` processes at a time, each `exe sweep --config CONFIG
/// --out OUT <args>` with `RAYON_NUM_THREADS=threads`. Output is inherited (stages print one
/// line per milestone, prefixed by what they are).
pub fn run(
    exe: &Path,
    config: &Path,
    out: &Path,
    jobs: &[Job],
    workers: usize,
    threads: usize,
) -> Result<()> {
    let workers = workers.max(1);
    let mut state = vec![State::Pending; jobs.len()];
    let mut running: Vec<(usize, Child)> = vec![];
    let mut failed: Vec<String> = vec![];
    loop {
        while failed.is_empty() && running.len() < workers {
            let ready = (0..jobs.len()).find(|&i| {
                state[i] == State::Pending && jobs[i].deps.iter().all(|&d| state[d] == State::Done)
            });
            let Some(i) = ready else { break };
            let child = Command::new(exe)
                .arg("sweep")
                .arg("--config")
                .arg(config)
                .arg("--out")
                .arg(out)
                .args(&jobs[i].args)
                .env("RAYON_NUM_THREADS", threads.max(1).to_string())
                .spawn()
                .with_context(|| {
                    format!("cannot start {} for stage {}", exe.display(), jobs[i].name)
                })?;
            state[i] = State::Running;
            running.push((i, child));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut still = vec![];
        for (i, mut child) in running {
            match child.try_wait()? {
                None => still.push((i, child)),
                Some(status) if status.success() => state[i] = State::Done,
                Some(status) => {
                    state[i] = State::Failed;
                    failed.push(format!("{} ({status})", jobs[i].name));
                }
            }
        }
        running = still;
    }
    if !failed.is_empty() {
        bail!(
            "stage(s) failed: {}; finished stages are kept, a rerun resumes",
            failed.join(", ")
        );
    }
    if let Some(i) = state.iter().position(|s| *s != State::Done) {
        bail!(
            "stage {} never became ready (a dependency is missing)",
            jobs[i].name
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TeachConfig {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("artifact/configs/teach/teach.toml"),
        )
        .unwrap();
        TeachConfig::from_toml(&text, "teach.toml").unwrap()
    }

    #[test]
    fn stages_come_in_dependency_order_largest_first() {
        let c = cfg();
        let js = jobs(&c, &[]).unwrap();
        let names: Vec<&str> = js.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(
            &names[..4],
            ["sft:large", "sft:medium", "sft:small", "pairs"]
        );
        assert_eq!(js[3].deps, vec![1], "pairs come from the medium SFT model");
        assert_eq!(js.len(), 3 + 1 + 3 + c.runs().len());
        for (i, j) in js.iter().enumerate() {
            assert!(
                j.deps.iter().all(|&d| d < i),
                "{} depends on a later stage",
                j.name
            );
        }
        assert!(names[7].starts_with("daa:") && names[7].contains("-large-"));
        assert!(names.last().unwrap().contains("-small-"));
        let only = jobs(&c, &["dpo-b0.3-small".into()]).unwrap();
        assert_eq!(only.len(), 8);
        assert_eq!(only[7].args, ["--run", "dpo-b0.3-small-s0"]);
    }

    #[test]
    fn a_failed_stage_stops_its_dependents_and_is_named() {
        // A stand-in executable: `sh -c SCRIPT sh sweep --config C --out O ARGS...` fails for
        // the stage "bad", succeeds otherwise, and logs what ran.
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let exe = dir.path().join("fake");
        std::fs::write(
            &exe,
            format!(
                "#!/bin/sh\nshift 5\necho \"$@\" >> {}\n[ \"$2\" != bad ]\n",
                log.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let j = |name: &str, deps: Vec<usize>| Job {
            name: name.into(),
            args: vec!["--stage".into(), name.into()],
            deps,
        };
        let ok = [j("a", vec![]), j("b", vec![0]), j("c", vec![0, 1])];
        run(&exe, Path::new("c.toml"), dir.path(), &ok, 2, 1).unwrap();
        let ran = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            ran.lines().collect::<Vec<_>>(),
            ["--stage a", "--stage b", "--stage c"]
        );
        std::fs::remove_file(&log).unwrap();
        let bad = [j("bad", vec![]), j("after", vec![0]), j("other", vec![])];
        let err = run(&exe, Path::new("c.toml"), dir.path(), &bad, 1, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad (exit status: 1)"), "{err}");
        let ran = std::fs::read_to_string(&log).unwrap();
        assert!(!ran.contains("after"), "{ran}");
    }
}
