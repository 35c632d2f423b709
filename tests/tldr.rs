//! `data::tldr` against small parquet files written here into a hub cache laid out as the hub
//! lays it out (`datasets--org--name/refs/<revision>` holding a commit hash,
//! `snapshots/<hash>/<config>/<split>/NNNN.parquet` linked to `blobs/<sha256>`). No test
//! reaches the real hub: the online path talks to a loopback server that speaks the hub's
//! protocol.

mod common;
mod common_tldr;

use common::{LoopbackServer, Reply};
use common_tldr::*;
use overopt::data::tldr::{
    self, PrefRecord, PrefSource, SftFormat, SftSource, Split, TldrConfig, load_pref_records,
    load_prefs, load_sft, load_sft_records, read_pref_file, read_sft_file,
};
use overopt::hub::HubAccess;
use polars::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

const SFT_REPO: &str = "org/tldr-filtered";
const PREF_REPO: &str = "org/comparisons";
const SFT_COMMIT: &str = "1111111111111111111111111111111111111111";
const PREF_COMMIT: &str = "2222222222222222222222222222222222222222";

// ---------------------------------------------------------------------------------------------
// Fixtures.

const SFT_SHARDS: [usize; 2] = [3, 2];
const PREF_TRAIN: usize = 4;

/// The long rows whose truncation the tests check.
fn long_sft_row() -> SftRow {
    sft_row(0, 3, 600)
}
fn long_pref_row() -> CmpRow {
    CmpRow {
        post: Some(words(0, 400)),
        texts: [Some(format!(" {}", words(100, 10))), Some(words(200, 300))],
        choice: 0,
        ..cmp_row(0, 0)
    }
}

/// The SFT files (train in two shards, validation in one) and the comparisons files (train,
/// and validation with one CNN/DM row) written into `cache`.
fn build_cache(cache: &Path) {
    let mut row = 0;
    for (shard, &n) in SFT_SHARDS.iter().enumerate() {
        let rows: Vec<SftRow> = (0..n)
            .map(|_| {
                row += 1;
                if row == 1 {
                    long_sft_row()
                } else {
                    sft_row(row, 5, 4)
                }
            })
            .collect();
        put_cached(
            cache,
            SFT_REPO,
            SFT_COMMIT,
            &format!("default/train/{shard:04}.parquet"),
            &parquet_bytes(sft_df(&rows)),
        );
    }
    put_cached(
        cache,
        SFT_REPO,
        SFT_COMMIT,
        "default/validation/0000.parquet",
        &parquet_bytes(sft_df(&[sft_row(50, 5, 4), sft_row(51, 5, 4)])),
    );
    let mut train = vec![long_pref_row()];
    train.extend((1..PREF_TRAIN).map(|i| cmp_row(i, (i % 2) as i32)));
    put_cached(
        cache,
        PREF_REPO,
        PREF_COMMIT,
        "comparisons/train/0000.parquet",
        &parquet_bytes(comparisons_df(&train)),
    );
    put_cached(
        cache,
        PREF_REPO,
        PREF_COMMIT,
        "comparisons/validation/0000.parquet",
        &parquet_bytes(comparisons_df(&[
            cmp_row(20, 1),
            cnndm_row(),
            cmp_row(21, 0),
        ])),
    );
}

fn test_config() -> TldrConfig {
    TldrConfig {
        sft: SftSource {
            repo: SFT_REPO.into(),
            ..SftSource::default()
        },
        prefs: PrefSource {
            repo: PREF_REPO.into(),
            ..PrefSource::default()
        },
        ..TldrConfig::default()
    }
}

fn err(r: anyhow::Result<impl std::fmt::Debug>) -> String {
    format!("{:#}", r.unwrap_err())
}

/// A loopback "hub" whose every answer is an error: counts any request made to it.
fn refusing_hub() -> LoopbackServer {
    LoopbackServer::start(|_, _| Reply::status(500, "no network in tests"))
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn loads_both_sets_from_the_hub_cache_with_format_split_mapping_and_truncation() {
    let tmp = tempfile::tempdir().unwrap();
    build_cache(tmp.path());
    let hub = HubAccess::offline_cache(tmp.path());
    let cfg = test_config();
    let tok = word_tok();

    // SFT: both train shards in order, the known long row first.
    let sft = load_sft_records(&cfg, Split::Train, &hub).unwrap();
    assert_eq!(sft.records.len(), SFT_SHARDS.iter().sum::<usize>());
    assert_eq!(sft.files.len(), 2);
    let first = &sft.records[0];
    let long = long_sft_row();
    assert_eq!(
        first.prompt,
        format!(
            "SUBREDDIT: r/sub0\n\nTITLE: {}\n\nPOST: {}\n\nTL;DR:",
            long.title, long.post
        )
    );
    assert_eq!(first.response, format!(" {}", long.summary.unwrap()));
    assert_eq!(first.id.as_deref(), Some("t3_sub0"));
    assert_eq!(first.source.file, "default/train/0000.parquet");
    assert_eq!(sft.records[3].source.file, "default/train/0001.parquet");
    assert_eq!(sft.records[3].source.row, 0);
    assert_eq!(
        load_sft_records(&cfg, Split::Eval, &hub)
            .unwrap()
            .records
            .len(),
        2
    );

    // SFT tokens: a 3-word post gives a 10-token prompt; the 600-word summary is cut to
    // max_length - max_prompt_length - 1 = 255 tokens (the prompt is short enough to keep).
    let ex = load_sft(&cfg, Split::Train, &hub, &tok).unwrap();
    assert_eq!(ex.len(), 5);
    assert_eq!(ex[0].prompt, tok.encode(&first.prompt).unwrap());
    assert_eq!(ex[0].prompt.len(), 10);
    assert_eq!(ex[0].response.len(), 255);
    assert_eq!(
        ex[0].response[..],
        tok.encode(&first.response).unwrap()[..255]
    );
    assert!(ex[1..].iter().all(|e| e.response.len() == 4));

    // Preferences: chosen / rejected follow `choice`.
    let prefs = load_pref_records(&cfg, Split::Train, &hub).unwrap();
    assert_eq!(prefs.records.len(), PREF_TRAIN);
    assert_eq!(prefs.skipped, 0);
    let r1 = &prefs.records[1]; // choice 1
    assert_eq!(r1.chosen, format!(" {}", words(801, 4)));
    assert_eq!(r1.rejected, format!(" {}", words(701, 3)));
    let r2 = &prefs.records[2]; // choice 0
    assert_eq!(r2.chosen, format!(" {}", words(702, 3)));
    assert_eq!(
        r2.prompt,
        format!(
            "SUBREDDIT: r/sub2\n\nTITLE: {}\n\nPOST: {}\n\nTL;DR:",
            words(602, 2),
            words(20, 5)
        )
    );
    // A summary stored without the leading space gets one (and nothing doubles it).
    assert_eq!(prefs.records[0].rejected, format!(" {}", words(200, 300)));

    // Preference tokens on the known long row: prompt 407 tokens, chosen 10, rejected 300.
    // The prompt is cut once for the longer response, keeping its START (256 tokens); the
    // rejected response is then cut to 255 so that prompt + response + EOS = 512.
    let pex = load_prefs(&cfg, Split::Train, &hub, &tok).unwrap();
    let full_prompt = tok.encode(&prefs.records[0].prompt).unwrap();
    assert_eq!(full_prompt.len(), 407);
    assert_eq!(pex[0].prompt[..], full_prompt[..256]);
    assert_eq!(pex[0].chosen.len(), 10);
    assert_eq!(pex[0].rejected.len(), 255);
    assert_eq!(pex[0].prompt.len() + pex[0].rejected.len() + 1, 512);
    assert!(pex[1..].iter().all(|e| e.prompt.len() == 12));

    // Evaluation = the validation split (there is no test split); the CNN/DM row (no post,
    // an article) is dropped and counted.
    let val = load_pref_records(&cfg, Split::Eval, &hub).unwrap();
    assert_eq!(val.records.len(), 2);
    assert_eq!(val.skipped, 1);
    assert_eq!(val.records[1].source.row, 2);
    assert!(
        val.records
            .iter()
            .all(|r| r.prompt.starts_with("SUBREDDIT: r/sub2"))
    );
}

#[test]
fn limits_cut_across_shards_and_jsonl_export_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    build_cache(tmp.path());
    let hub = HubAccess::offline_cache(tmp.path());
    let mut cfg = test_config();
    cfg.sft.max_train = Some(4);
    cfg.prefs.max_eval = Some(1);
    let sft = load_sft_records(&cfg, Split::Train, &hub).unwrap();
    assert_eq!(sft.records.len(), 4);
    assert_eq!(sft.files.len(), 2);
    cfg.sft.max_train = Some(2);
    let sft2 = load_sft_records(&cfg, Split::Train, &hub).unwrap();
    assert_eq!(sft2.records[..], sft.records[..2]);
    assert_eq!(sft2.files.len(), 1);
    let val = load_pref_records(&cfg, Split::Eval, &hub).unwrap();
    assert_eq!(val.records.len(), 1);

    // The text records as JSON lines: readable back, and usable as `overopt daa` data.
    let path = tmp.path().join("out/val.jsonl");
    tldr::write_jsonl(&path, &val.records).unwrap();
    let back: Vec<PrefRecord> = overopt::util::read_jsonl(&path).unwrap();
    assert_eq!(back, val.records);
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    for key in ["prompt", "chosen", "rejected"] {
        assert!(line[key].is_string(), "{key} missing in {line}");
    }
}

#[test]
fn cached_data_needs_no_network_even_when_online() {
    let tmp = tempfile::tempdir().unwrap();
    build_cache(tmp.path());
    let server = refusing_hub();
    let hub = HubAccess {
        cache_dir: tmp.path().to_path_buf(),
        offline: false,
        endpoint: Some(server.root_url()),
        token: None,
    };
    let cfg = test_config();
    for split in [Split::Train, Split::Eval] {
        load_sft_records(&cfg, split, &hub).unwrap();
        load_pref_records(&cfg, split, &hub).unwrap();
    }
    assert_eq!(server.request_count(), 0, "{:?}", server.requests());

    // Offline, a split that is not cached is an error that names what is missing.
    let mut cfg = test_config();
    cfg.prefs.eval_split = "test".into();
    let e = err(load_pref_records(
        &cfg,
        Split::Eval,
        &HubAccess::offline_cache(tmp.path()),
    ));
    assert!(
        e.contains("comparisons/test") && e.contains("datasets--org--comparisons"),
        "{e}"
    );
    assert_eq!(server.request_count(), 0);
}

/// The hub's side of a download, for files of one dataset repo at the parquet revision.
fn fake_hub(
    repo: &'static str,
    commit: &'static str,
    files: BTreeMap<String, Vec<u8>>,
) -> LoopbackServer {
    let files = Arc::new(files);
    LoopbackServer::start(move |_, req| {
        let rev = PARQUET_REV.replace('/', "%2F");
        if req.path == format!("/api/datasets/{repo}/revision/{rev}") {
            let siblings: Vec<serde_json::Value> = files
                .keys()
                .map(|f| serde_json::json!({ "rfilename": f }))
                .chain([serde_json::json!({"rfilename": "README.md"})])
                .collect();
            let body = serde_json::json!({ "sha": commit, "siblings": siblings });
            return Reply::status(200, &body.to_string())
                .with_header("Content-Type", "application/json");
        }
        let prefix = format!("/datasets/{repo}/resolve/{rev}/");
        let Some(bytes) = req.path.strip_prefix(&prefix).and_then(|f| files.get(f)) else {
            return Reply::status(404, "not found");
        };
        let head_only = req.header("range") == Some("bytes=0-0");
        Reply::Bytes {
            status: 200,
            headers: vec![],
            body: if head_only { vec![] } else { bytes.clone() },
        }
        .with_header("ETag", &format!("\"{}\"", overopt::util::sha256_hex(bytes)))
        .with_header("X-Repo-Commit", commit)
        .with_header("Content-Range", &format!("bytes 0-0/{}", bytes.len()))
    })
}

#[test]
fn first_run_downloads_into_the_hub_cache_and_the_second_is_offline() {
    let src = tempfile::tempdir().unwrap();
    build_cache(src.path());
    // The files the fake hub serves: those of the comparisons repo built above.
    let snap = src
        .path()
        .join("datasets--org--comparisons/snapshots")
        .join(PREF_COMMIT);
    let mut files = BTreeMap::new();
    for f in [
        "comparisons/train/0000.parquet",
        "comparisons/validation/0000.parquet",
    ] {
        files.insert(f.to_string(), std::fs::read(snap.join(f)).unwrap());
    }
    let server = fake_hub(PREF_REPO, PREF_COMMIT, files);
    let cache = tempfile::tempdir().unwrap();
    let online = HubAccess {
        cache_dir: cache.path().to_path_buf(),
        offline: false,
        endpoint: Some(server.root_url()),
        token: None,
    };
    let cfg = test_config();
    let first = load_pref_records(&cfg, Split::Eval, &online).unwrap();
    assert_eq!(first.records.len(), 2);
    assert_eq!(first.skipped, 1);
    let after_first = server.request_count();
    assert!(after_first >= 2, "listing + download expected");
    // Stored in the standard layout.
    let root = cache.path().join("datasets--org--comparisons");
    assert_eq!(
        std::fs::read_to_string(root.join("refs/refs/convert/parquet"))
            .unwrap()
            .trim(),
        PREF_COMMIT
    );
    assert!(
        root.join("snapshots")
            .join(PREF_COMMIT)
            .join("comparisons/validation/0000.parquet")
            .exists()
    );
    // Second run: offline, same records; and online again makes no request.
    let offline = HubAccess::offline_cache(cache.path());
    let second = load_pref_records(&cfg, Split::Eval, &offline).unwrap();
    assert_eq!(second.records, first.records);
    load_pref_records(&cfg, Split::Eval, &online).unwrap();
    assert_eq!(server.request_count(), after_first);
}

#[test]
fn environment_variables_select_the_cache_and_offline_mode() {
    let tmp = tempfile::tempdir().unwrap();
    build_cache(tmp.path());
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_loads_through_the_environment",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HF_HUB_CACHE", tmp.path())
        .env("HF_HUB_OFFLINE", "1")
        // Were offline mode ignored, the client would try this closed port and fail.
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("HF_HOME")
        .env("OVEROPT_TLDR_CHILD", "1")
        .output()
        .unwrap();
    let text = common::output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("child loaded 5 sft, 4 pairs"), "{text}");
}

/// Run by [`environment_variables_select_the_cache_and_offline_mode`] in a child process with
/// `HF_HUB_CACHE` / `HF_HUB_OFFLINE` set (the environment is per process).
#[test]
#[ignore = "run as a child process by environment_variables_select_the_cache_and_offline_mode"]
fn child_loads_through_the_environment() {
    assert_eq!(
        std::env::var("OVEROPT_TLDR_CHILD").as_deref(),
        Ok("1"),
        "this test only runs as a child of environment_variables_select_the_cache_and_offline_mode"
    );
    let hub = HubAccess::from_env();
    assert!(hub.offline);
    let cfg = test_config();
    let sft = load_sft_records(&cfg, Split::Train, &hub).unwrap();
    let prefs = load_pref_records(&cfg, Split::Train, &hub).unwrap();
    // Offline mode: a file missing from the cache is an error, not a download attempt.
    let mut missing = test_config();
    missing.prefs.train_split = "nope".into();
    let e = err(load_pref_records(&missing, Split::Train, &hub));
    assert!(e.contains("offline"), "{e}");
    println!(
        "child loaded {} sft, {} pairs",
        sft.records.len(),
        prefs.records.len()
    );
}

#[test]
fn schema_mismatches_name_the_column_and_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, df: DataFrame| {
        let p = tmp.path().join(name);
        std::fs::write(&p, parquet_bytes(df)).unwrap();
        p
    };
    // Comparisons without `choice`.
    let mut df = comparisons_df(&[cmp_row(1, 0)]);
    df.drop_in_place("choice").unwrap();
    let p = write("no_choice.parquet", df);
    let e = err(read_pref_file(&p, "x", None));
    assert!(
        e.contains("`choice` is missing") && e.contains("no_choice.parquet"),
        "{e}"
    );
    // A struct without the `post` field.
    let mut df = comparisons_df(&[cmp_row(1, 0)]);
    let info = StructChunked::from_series(
        "info".into(),
        1,
        [
            strs("id", vec![Some("a".into())]),
            strs("title", vec![Some("t".into())]),
            strs("subreddit", vec![Some("s".into())]),
        ]
        .iter(),
    )
    .unwrap()
    .into_series();
    df.with_column(info.into()).unwrap();
    let p = write("no_post.parquet", df);
    let e = err(read_pref_file(&p, "x", None));
    assert!(
        e.contains("`info.post` is missing")
            && e.contains("`info` has fields: id, title, subreddit")
            && e.contains("no_post.parquet"),
        "{e}"
    );
    // `choice` of the wrong type.
    let mut df = comparisons_df(&[cmp_row(1, 0)]);
    df.with_column(strs("choice", vec![Some("0".into())]).into())
        .unwrap();
    let p = write("str_choice.parquet", df);
    let e = err(read_pref_file(&p, "x", None));
    assert!(
        e.contains("`choice` has type")
            && e.contains("integer")
            && e.contains("str_choice.parquet"),
        "{e}"
    );
    // The SFT layouts.
    let mut df = sft_df(&[sft_row(1, 3, 3)]);
    df.drop_in_place("summary").unwrap();
    let p = write("no_summary.parquet", df);
    let e = err(read_sft_file(&p, "x", &SftFormat::Fields, None));
    assert!(
        e.contains("`summary` is missing") && e.contains("no_summary.parquet"),
        "{e}"
    );
    let p = write("fields.parquet", sft_df(&[sft_row(1, 3, 3)]));
    let fmt = SftFormat::PromptResponse {
        prompt: "prompt".into(),
        response: "completion".into(),
    };
    let e = err(read_sft_file(&p, "x", &fmt, None));
    assert!(
        e.contains("`prompt` is missing") && e.contains("fields.parquet"),
        "{e}"
    );
    // Through the hub cache, the error names the cached file.
    let cache = tempfile::tempdir().unwrap();
    let mut df = comparisons_df(&[cmp_row(1, 0)]);
    df.drop_in_place("summaries").unwrap();
    put_cached(
        cache.path(),
        PREF_REPO,
        PREF_COMMIT,
        "comparisons/train/0000.parquet",
        &parquet_bytes(df),
    );
    let e = err(load_pref_records(
        &test_config(),
        Split::Train,
        &HubAccess::offline_cache(cache.path()),
    ));
    assert!(
        e.contains("`summaries") && e.contains("comparisons/train/0000.parquet"),
        "{e}"
    );
}

#[test]
fn empty_files_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let zero = tmp.path().join("zero.parquet");
    std::fs::write(&zero, b"").unwrap();
    let e = err(read_pref_file(&zero, "x", None));
    assert!(e.contains("zero.parquet") && e.contains("empty"), "{e}");
    let no_rows = tmp.path().join("no_rows.parquet");
    std::fs::write(&no_rows, parquet_bytes(comparisons_df(&[]))).unwrap();
    let e = err(read_pref_file(&no_rows, "x", None));
    assert!(
        e.contains("no_rows.parquet") && e.contains("no rows"),
        "{e}"
    );
    let no_rows = tmp.path().join("no_sft_rows.parquet");
    std::fs::write(&no_rows, parquet_bytes(sft_df(&[]))).unwrap();
    let e = err(read_sft_file(&no_rows, "x", &SftFormat::Fields, None));
    assert!(
        e.contains("no_sft_rows.parquet") && e.contains("no rows"),
        "{e}"
    );
    let junk = tmp.path().join("junk.parquet");
    std::fs::write(&junk, b"not parquet at all").unwrap();
    let e = err(read_sft_file(&junk, "x", &SftFormat::Fields, None));
    assert!(e.contains("junk.parquet") && e.contains("parquet"), "{e}");
}

#[test]
fn malformed_rows_name_their_index_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let case = |name: &str, bad: CmpRow| -> String {
        let p = tmp.path().join(name);
        let rows = vec![cmp_row(0, 0), cmp_row(1, 1), bad];
        std::fs::write(&p, parquet_bytes(comparisons_df(&rows))).unwrap();
        err(read_pref_file(&p, "x", None))
    };
    let e = case(
        "null_post.parquet",
        CmpRow {
            post: None,
            ..cmp_row(2, 0)
        },
    );
    assert!(
        e.contains("null_post.parquet") && e.contains("row 2") && e.contains("info.post"),
        "{e}"
    );
    let e = case("choice.parquet", cmp_row(2, 2));
    assert!(
        e.contains("choice.parquet") && e.contains("row 2") && e.contains("`choice` is 2"),
        "{e}"
    );
    let e = case(
        "no_text.parquet",
        CmpRow {
            texts: [Some(" fine".into()), None],
            ..cmp_row(2, 1)
        },
    );
    assert!(
        e.contains("no_text.parquet") && e.contains("row 2") && e.contains("summaries[1].text"),
        "{e}"
    );
    let e = case(
        "blank_text.parquet",
        CmpRow {
            texts: [Some("  ".into()), Some(" fine".into())],
            ..cmp_row(2, 0)
        },
    );
    assert!(
        e.contains("row 2") && e.contains("summaries[0].text` is empty"),
        "{e}"
    );
    // The SFT set: a missing reference summary.
    let p = tmp.path().join("sft_null.parquet");
    let rows = vec![
        sft_row(0, 3, 3),
        SftRow {
            summary: None,
            ..sft_row(1, 3, 3)
        },
    ];
    std::fs::write(&p, parquet_bytes(sft_df(&rows))).unwrap();
    let e = err(read_sft_file(&p, "x", &SftFormat::Fields, None));
    assert!(
        e.contains("sft_null.parquet") && e.contains("row 1") && e.contains("`summary` is null"),
        "{e}"
    );
}

/// `overopt export-tldr`: the command line writes the four JSON-lines sets of a data config
/// from the hub cache (offline, through the environment), and its manifest says what it read.
#[test]
fn export_command_writes_the_run_data_from_the_hub_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    build_cache(&cache);
    let data = tmp.path().join("data.toml");
    std::fs::write(
        &data,
        format!("[sft]\nrepo = \"{SFT_REPO}\"\n\n[prefs]\nrepo = \"{PREF_REPO}\"\n"),
    )
    .unwrap();
    let out = tmp.path().join("runs/data");
    let run = |data: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_overopt"))
            .arg("export-tldr")
            .arg("--data")
            .arg(data)
            .arg("--out")
            .arg(&out)
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env_remove("HF_HOME")
            .output()
            .unwrap()
    };
    let o = run(&data);
    let text = common::output_text(&o);
    assert!(o.status.success(), "{text}");

    // The same records as the library loads, in the files the paper run configs name.
    let hub = HubAccess::offline_cache(&cache);
    let cfg = test_config();
    let sft_train: Vec<tldr::SftRecord> =
        overopt::util::read_jsonl(&out.join("sft-train.jsonl")).unwrap();
    assert_eq!(
        sft_train,
        load_sft_records(&cfg, Split::Train, &hub).unwrap().records
    );
    let sft_eval: Vec<tldr::SftRecord> =
        overopt::util::read_jsonl(&out.join("sft-eval.jsonl")).unwrap();
    assert_eq!(sft_eval.len(), 2);
    let prefs_train: Vec<PrefRecord> =
        overopt::util::read_jsonl(&out.join("prefs-train.jsonl")).unwrap();
    assert_eq!(
        prefs_train,
        load_pref_records(&cfg, Split::Train, &hub).unwrap().records
    );
    let prefs_eval: Vec<PrefRecord> =
        overopt::util::read_jsonl(&out.join("prefs-eval.jsonl")).unwrap();
    assert_eq!(prefs_eval.len(), 2, "the CNN/DM row is dropped");
    assert!(
        text.contains("prefs-eval.jsonl 2 records (1 skipped)"),
        "{text}"
    );

    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("export.json")).unwrap()).unwrap();
    let files = manifest["files"].as_array().unwrap();
    assert_eq!(files.len(), 4);
    assert_eq!(files[3]["file"], "prefs-eval.jsonl");
    assert_eq!(files[3]["skipped"], 1);
    assert_eq!(
        files[3]["read"][0], "comparisons/validation/0000.parquet",
        "{manifest}"
    );
    assert_eq!(manifest["config"]["prefs"]["repo"], PREF_REPO);

    // A config naming a split the cache lacks: offline, so an error naming the set, not a
    // download attempt; a bad key names the file.
    std::fs::write(
        &data,
        format!("[sft]\nrepo = \"{SFT_REPO}\"\n\n[prefs]\nrepo = \"{PREF_REPO}\"\ntrain_split = \"nope\"\n"),
    )
    .unwrap();
    let o = run(&data);
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success());
    assert!(e.contains("preference set") && e.contains("offline"), "{e}");
    std::fs::write(&data, "[sft]\nrepos = \"x/y\"\n").unwrap();
    let o = run(&data);
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success());
    assert!(e.contains("data.toml") && e.contains("repos"), "{e}");
}
