//! Loading a model by hub id from the local hub cache, offline (no network is reachable here):
//! the fixture model is laid out as the hub client caches it.

use std::path::Path;
use std::process::Command;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gpt_neox")
        .join(name)
}

#[test]
fn a_model_in_the_hub_cache_loads_by_id_offline() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--tiny-org--tiny-neox");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for rev in ["main", "step1000"] {
        std::fs::write(repo.join("refs").join(rev), commit).unwrap();
    }
    // The sharded fixture: index + shards + config + tokenizer.
    for e in std::fs::read_dir(fixture("sequential")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
    }
    for rev in [None, Some("step1000")] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_overopt"));
        cmd.args(["score", "--model", "tiny-org/tiny-neox", "--input"])
            .arg(fixture("pairs.jsonl"))
            .env("HF_HUB_CACHE", cache.path())
            .env("HF_HUB_OFFLINE", "1");
        if let Some(r) = rev {
            cmd.args(["--revision", r]);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let exp = candle_core::safetensors::load(
            fixture("sequential").join("expected.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let want = exp["seq_logps"].to_vec1::<f32>().unwrap();
        let got: Vec<f64> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["logp"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - *w as f64).abs() < 1e-4, "{g} vs {w}");
        }
    }
    // A revision that is not cached is a clear offline error naming the repo and revision.
    let o = Command::new(env!("CARGO_BIN_EXE_overopt"))
        .args([
            "score",
            "--model",
            "tiny-org/tiny-neox",
            "--revision",
            "v9",
            "--input",
        ])
        .arg(fixture("pairs.jsonl"))
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("tiny-neox") && e.contains("v9") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
}
