//! The teach grid run as separate processes through the job-array entry points (prepare,
//! one process per run index, collect) ends with the same results table as one process.

mod common;

use std::path::Path;
use std::process::Command;

fn overopt(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_overopt"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "overopt {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `overopt ARGS` fails; its stderr.
fn overopt_fails(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_overopt"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap();
    let text = common::output_text(&o);
    assert!(!o.status.success(), "overopt {args:?} should fail: {text}");
    text
}

/// The table as JSON (NaN, e.g. the SFT rows' held-out loss, serializes as null and so
/// compares equal).
fn table(dir: &Path) -> Vec<serde_json::Value> {
    let rows = overopt::sweep::tables::read_results_parquet(&dir.join("results.parquet")).unwrap();
    rows.iter()
        .map(|r| serde_json::to_value(r).unwrap())
        .collect()
}

/// `overopt compare --expected EXPECTED --actual ACTUAL` passes.
fn compare_passes(expected: &Path, actual: &Path) {
    overopt(&[
        "compare",
        "--expected",
        expected.to_str().unwrap(),
        "--actual",
        actual.to_str().unwrap(),
    ]);
}

/// DIR/results.parquet matches the committed smoke results.
fn matches_expected_smoke(dir: &Path) {
    let expected =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("artifact/expected/smoke/results.parquet");
    compare_passes(&expected, &dir.join("results.parquet"));
}

#[test]
fn job_array_matches_single_process_and_resumes() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("artifact/configs/teach/smoke.toml");
    let cfg = cfg.to_str().unwrap();
    let d = tempfile::tempdir().unwrap();
    let single = d.path().join("single");
    let jobs = d.path().join("jobs");
    let local = d.path().join("local");
    // The grid's table section, in one process (`--jobs 1`) or as `sweep` processes side by side.
    let reproduce = |out: &Path, jobs: &str| {
        overopt(&[
            "reproduce",
            "--section",
            "overoptimization",
            "--config",
            cfg,
            "--out",
            out.to_str().unwrap(),
            "--jobs",
            jobs,
        ])
    };
    reproduce(&single, "1");
    reproduce(&local, "2");
    let list = Command::new(env!("CARGO_BIN_EXE_overopt"))
        .args(["sweep", "--config", cfg, "--list"])
        .output()
        .unwrap();
    let ids: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(ids.len(), 2 * 2 * 2 + 1, "{ids:?}");
    let j = jobs.to_str().unwrap();
    overopt(&["sweep", "--config", cfg, "--out", j, "--prepare"]);
    // Out of order, by index and by id, as a scheduler might.
    for i in (0..ids.len()).rev() {
        if i % 2 == 0 {
            overopt(&[
                "sweep",
                "--config",
                cfg,
                "--out",
                j,
                "--run",
                &i.to_string(),
            ]);
        } else {
            overopt(&["sweep", "--config", cfg, "--out", j, "--run", &ids[i]]);
        }
    }
    overopt(&["collect", "--out", j]);
    let (a, b) = (table(&single), table(&jobs));
    assert_eq!(a.len(), 2 + 9 * 2, "2 SFT rows + 9 runs x 2 checkpoints");
    assert_eq!(a, b, "job array and single process differ");
    assert_eq!(
        table(&local),
        a,
        "reproduce --jobs 2 and a single process differ"
    );
    // Re-running the finished sweep skips everything and rewrites the same table.
    reproduce(&single, "1");
    assert_eq!(table(&single), a);
    // A lost run result is recomputed identically from its checkpoints' run directory.
    let victim = single.join("results").join(format!("{}.json", ids[3]));
    std::fs::remove_file(&victim).unwrap();
    std::fs::remove_dir_all(single.join("runs").join(&ids[3])).unwrap();
    reproduce(&single, "1");
    assert_eq!(table(&single), a);
    // The fresh run matches the committed expected results (artifact/expected/smoke).
    matches_expected_smoke(&single);

    // Outputs of another configuration are refused, not reused under the new one, and left
    // as they are: a changed DAA learning rate (results and run checkpoints), SFT learning
    // rate (SFT models) or pair seed (pairs).
    let s = single.to_str().unwrap();
    let original = std::fs::read_to_string(cfg).unwrap();
    let changed = |from: &str, to: &str, name: &str| {
        assert!(original.contains(from), "{from}");
        let p = d.path().join(name);
        std::fs::write(&p, original.replacen(from, to, 1)).unwrap();
        p.to_str().unwrap().to_string()
    };
    let daa_lr = changed("lr = 1e-3", "lr = 2e-3", "daa-lr.toml");
    let sft_lr = changed("lr = 3e-3", "lr = 4e-3", "sft-lr.toml");
    let pair_seed = changed("seed = 2", "seed = 5", "pair-seed.toml");
    let before = std::fs::read(single.join("results").join(format!("{}.json", ids[0]))).unwrap();
    for (args, culprit) in [
        (
            vec![
                "reproduce",
                "--section",
                "overoptimization",
                "--config",
                &daa_lr,
                "--out",
                s,
                "--jobs",
                "1",
            ],
            format!("{}.json", ids[0]),
        ),
        (
            vec!["sweep", "--config", &sft_lr, "--out", s, "--stage", "sft:s"],
            "sft-s".to_string(),
        ),
        (
            vec![
                "sweep", "--config", &pair_seed, "--out", s, "--stage", "pairs",
            ],
            "pairs_train.jsonl".to_string(),
        ),
        (
            vec!["collect", "--config", &daa_lr, "--out", s],
            "results/".to_string(),
        ),
    ] {
        let e = overopt_fails(&args);
        assert!(
            e.contains("another configuration") && e.contains(&culprit),
            "{args:?}: {e}"
        );
    }
    let after = std::fs::read(single.join("results").join(format!("{}.json", ids[0]))).unwrap();
    assert_eq!(before, after, "the stale results are kept");
    // A run's checkpoints refuse to resume under another configuration too.
    std::fs::remove_file(single.join("results").join(format!("{}.json", ids[0]))).unwrap();
    let e = overopt_fails(&["sweep", "--config", &daa_lr, "--out", s, "--run", &ids[0]]);
    assert!(
        e.contains("another configuration") && e.contains("lr"),
        "{e}"
    );
    std::fs::write(
        single.join("results").join(format!("{}.json", ids[0])),
        &before,
    )
    .unwrap();
    // Two files with rows of one policy (a copy, or results of an earlier configuration under
    // another run id) make collect fail, naming both.
    let copy = single.join("results").join("zz-copy.json");
    std::fs::write(&copy, &before).unwrap();
    let e = overopt_fails(&["collect", "--out", s]);
    assert!(e.contains("zz-copy.json") && e.contains(&ids[0]), "{e}");
    // With the configuration, files outside its grid are left out instead.
    overopt(&["collect", "--config", cfg, "--out", s]);
    assert_eq!(table(&single), a);
    std::fs::remove_file(&copy).unwrap();
    // compare: identical tables pass.
    compare_passes(
        &single.join("results.parquet"),
        &jobs.join("results.parquet"),
    );
}

/// artifact/slurm/sweep.sbatch, submitted to a stand-in `sbatch` that runs each job at once
/// (array tasks one index after another, in dependency order): the script's prepare / run /
/// collect stages produce the smoke grid's table.
#[test]
fn slurm_script_runs_the_grid_through_a_stand_in_scheduler() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = d.path().join("sbatch.log");
    let sbatch = bin.join("sbatch");
    std::fs::write(
        &sbatch,
        format!(
            r#"#!/usr/bin/env bash
# Stand-in for sbatch: run the job now; print a job id as --parsable does.
set -euo pipefail
echo "sbatch $*" >> {log:?}
script="${{@: -1}}"
stage=""
array=""
for a in "$@"; do
    case "$a" in
        --export=*) stage=$(printf '%s' "$a" | sed -n 's/.*STAGE=\([a-z]*\).*/\1/p') ;;
        --array=*) array=${{a#--array=}}; array=${{array%%\%*}} ;;
    esac
done
if [ -n "$array" ]; then
    for i in $(seq "${{array%-*}}" "${{array#*-}}"); do
        STAGE=$stage SLURM_ARRAY_TASK_ID=$i bash "$script" >&2
    done
else
    STAGE=$stage bash "$script" >&2
fi
echo "$RANDOM"
"#
        ),
    )
    .unwrap();
    let chmod = Command::new("chmod")
        .arg("+x")
        .arg(&sbatch)
        .status()
        .unwrap();
    assert!(chmod.success());
    let out = d.path().join("out");
    let o = Command::new("bash")
        .arg("artifact/slurm/sweep.sbatch")
        .current_dir(root)
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .env("OVEROPT", env!("CARGO_BIN_EXE_overopt"))
        .env("SCALE", "teach")
        .env("CONFIG", "artifact/configs/teach/smoke.toml")
        .env("OUT", &out)
        .env("GPU", "")
        .env_remove("STAGE")
        .env_remove("DRY_RUN")
        .output()
        .unwrap();
    let text = common::output_text(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("sweep.sbatch: 9 runs of"), "{text}");
    let submitted = std::fs::read_to_string(&log).unwrap();
    assert_eq!(submitted.lines().count(), 3, "{submitted}");
    assert!(submitted.contains("--array=0-8%16"), "{submitted}");
    assert!(
        !submitted.contains("--gres"),
        "GPU=\"\" asks for none: {submitted}"
    );
    assert_eq!(table(&out).len(), 2 + 9 * 2, "{text}");
    matches_expected_smoke(&out);
}
