//! Loading a model by hub id from the local hub cache, offline (no network is reachable here):
//! the fixture model is laid out as the hub client caches it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gpt_neox")
        .join(name)
}

/// Lay the sharded fixture (index + shards + config + tokenizer) out in `cache` as the hub
/// client caches `tiny-org/tiny-neox`, with refs `main` and `step1000`; returns the snapshot.
fn cache_fixture(cache: &Path) -> PathBuf {
    let repo = cache.join("models--tiny-org--tiny-neox");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for rev in ["main", "step1000"] {
        std::fs::write(repo.join("refs").join(rev), commit).unwrap();
    }
    for e in std::fs::read_dir(fixture("sequential")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
    }
    snap
}

/// Score the fixture pairs with `tiny-org/tiny-neox` from `cache`, offline, and check the
/// sequence log-probs against the fixture's expected values (HF transformers').
fn scores_match_expected(cache: &Path, rev: Option<&str>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_overopt"));
    cmd.args(["score", "--model", "tiny-org/tiny-neox", "--input"])
        .arg(fixture("pairs.jsonl"))
        .env("HF_HUB_CACHE", cache)
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

/// Append tensors `(name, dtype, shape, raw little-endian bytes)` to a safetensors file,
/// written by hand in the format (8-byte little-endian header length, JSON header padded with
/// spaces to a multiple of 8, then the data), so that dtypes candle has no type for (BOOL) can
/// be written.
fn append_tensors(path: &Path, extra: &[(String, &str, Vec<usize>, Vec<u8>)]) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    for (name, dtype, shape, raw) in extra {
        let start = data.len();
        data.extend_from_slice(raw);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

#[test]
fn a_model_in_the_hub_cache_loads_by_id_offline() {
    let cache = tempfile::tempdir().unwrap();
    cache_fixture(cache.path());
    for rev in [None, Some("step1000")] {
        scores_match_expected(cache.path(), rev);
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

/// Checkpoints saved by newer transformers keep each layer's causal-mask buffer
/// `attention.bias` as BOOL (a dtype candle cannot load) next to the parameters, with
/// `attention.masked_bias` and `rotary_emb.inv_freq`: such buffers are skipped unread, and the
/// model scores exactly as without them.
#[test]
fn hf_buffers_in_the_shards_are_skipped_even_when_stored_as_bool() {
    let cache = tempfile::tempdir().unwrap();
    let snap = cache_fixture(cache.path());
    let index_path = snap.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let n_pos = 64; // max_position_embeddings of the fixture
    let mask: Vec<u8> = (0..n_pos * n_pos)
        .map(|i| u8::from(i % n_pos <= i / n_pos))
        .collect();
    for layer in 0..2 {
        let pre = format!("gpt_neox.layers.{layer}.attention");
        // The shard that holds the layer's attention parameters gets its buffers too.
        let shard = index["weight_map"][format!("{pre}.dense.weight")]
            .as_str()
            .unwrap()
            .to_string();
        let buffers = vec![
            (
                format!("{pre}.bias"),
                "BOOL",
                vec![1, 1, n_pos, n_pos],
                mask.clone(),
            ),
            (
                format!("{pre}.masked_bias"),
                "F32",
                vec![],
                (-1e9f32).to_le_bytes().to_vec(),
            ),
            (
                format!("{pre}.rotary_emb.inv_freq"),
                "F32",
                vec![2],
                [1.0f32, 0.01]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
        ];
        append_tensors(&snap.join(&shard), &buffers);
        for (name, ..) in &buffers {
            index["weight_map"][name] = shard.clone().into();
        }
    }
    std::fs::write(&index_path, serde_json::to_vec_pretty(&index).unwrap()).unwrap();
    scores_match_expected(cache.path(), None);
}
