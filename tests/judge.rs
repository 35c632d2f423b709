//! `eval::judge` against a loopback chat-completions server (127.0.0.1 only).

mod common;

use common::{LoopbackServer, Reply, Request};
use overopt::eval::judge::prompt::flip_for;
use overopt::eval::judge::{
    ApiKey, Judge, JudgeItem, OpenAiJudge, OpenAiJudgeConfig, Position, VerdictStatus,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "sk-test-DISTINCTIVE-7c1e5a90f3";

/// Fast settings for tests: short timeouts, millisecond backoff.
fn test_config(server: &LoopbackServer) -> OpenAiJudgeConfig {
    OpenAiJudgeConfig {
        model: "judge-test".into(),
        base_url: Some(server.base_url()),
        api_key: Some(ApiKey::new(KEY)),
        api_key_env: String::new(),
        max_tokens: 64,
        seed: 11,
        concurrency: 4,
        max_retries: 3,
        backoff_base_ms: 1,
        backoff_cap_ms: 4,
        max_retry_after_s: 30.0,
        connect_timeout_ms: 1000,
        read_timeout_ms: 300,
        ..Default::default()
    }
}

fn item(id: &str) -> JudgeItem {
    JudgeItem {
        id: id.to_string(),
        prompt: format!("SUBREDDIT: r/test\n\nTITLE: t\n\nPOST: POST-{id}\n\nTL;DR:"),
        candidate: format!("CANDIDATE ITEM={id} ."),
        reference: format!("REFERENCE ITEM={id} ."),
    }
}

/// The item id marked in a judging prompt.
fn marker(req: &Request) -> String {
    let p = req.prompt();
    let i = p.find("ITEM=").expect("prompt has an item marker") + 5;
    p[i..].split_whitespace().next().unwrap().to_string()
}

/// Which summary the prompt shows as A.
fn candidate_shown_as_a(req: &Request) -> bool {
    let p = req.prompt();
    let a = p.find("Summary A:\n").unwrap();
    let b = p.find("Summary B:\n").unwrap();
    let c = p.find("CANDIDATE").unwrap();
    a < c && c < b
}

#[test]
fn verdicts_map_back_through_the_order() {
    let items: Vec<JudgeItem> = (0..40).map(|i| item(&format!("it{i}"))).collect();

    // A judge that always answers "A": the candidate wins exactly when shown as A.
    let always_a =
        LoopbackServer::start(|_, _| Reply::chat("Comparison: A is tighter.\nPreferred: A"));
    let report = OpenAiJudge::new(test_config(&always_a))
        .unwrap()
        .judge(&items)
        .unwrap();
    assert_eq!(report.verdicts.len(), items.len());
    let flips = report.verdicts.iter().filter(|v| v.flipped).count();
    assert!(
        flips > 0 && flips < items.len(),
        "both orders occur: {flips} of {}",
        items.len()
    );
    for (v, it) in report.verdicts.iter().zip(&items) {
        assert_eq!(v.id, it.id);
        assert_eq!(v.status, VerdictStatus::Decided);
        assert_eq!(v.preferred, Some(Position::A));
        assert_eq!(
            v.flipped,
            flip_for(11, &it.id),
            "order drawn from seed and id"
        );
        assert_eq!(
            v.candidate_score,
            Some(if v.flipped { 0.0 } else { 1.0 }),
            "{v:?}"
        );
        assert_eq!(v.requests, 1);
    }
    // What the server saw agrees with the recorded order, and the request is well formed.
    let flipped_of: HashMap<String, bool> = report
        .verdicts
        .iter()
        .map(|v| (v.id.clone(), v.flipped))
        .collect();
    for req in always_a.requests() {
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/v1/chat/completions");
        assert_eq!(
            req.header("authorization"),
            Some(format!("Bearer {KEY}").as_str())
        );
        let body = req.json();
        assert_eq!(body["model"], "judge-test");
        assert_eq!(body["temperature"], 0.0);
        assert_eq!(body["max_tokens"], 64);
        let id = marker(&req);
        assert_eq!(candidate_shown_as_a(&req), !flipped_of[&id], "{id}");
        assert!(req.prompt().contains(&format!(
            "Post:\nSUBREDDIT: r/test\n\nTITLE: t\n\nPOST: POST-{id}\n\nSummary A:"
        )));
    }
    let s = &report.summary;
    assert_eq!((s.wins, s.losses), (items.len() - flips, flips));
    assert_eq!(s.position_bias.shown_a_preferred, items.len());
    assert_eq!(s.position_bias.shown_a_rate, Some(1.0));
    assert_eq!(s.position_bias.win_rate_candidate_a, Some(1.0));
    assert_eq!(s.position_bias.win_rate_candidate_b, Some(0.0));
    assert_eq!(s.prompt_tokens, 100 * items.len() as u64);

    // A judge that always picks the candidate, in whichever position: all wins, "A" and "B" both.
    let fan = LoopbackServer::start(|_, req| {
        let pick = if candidate_shown_as_a(req) { "A" } else { "B" };
        Reply::chat(&format!(
            "Comparison: the candidate is better.\nPreferred: {pick}"
        ))
    });
    let report = OpenAiJudge::new(test_config(&fan))
        .unwrap()
        .judge(&items)
        .unwrap();
    for v in &report.verdicts {
        assert_eq!(v.candidate_score, Some(1.0), "{v:?}");
        assert_eq!(
            v.preferred,
            Some(if v.flipped { Position::B } else { Position::A })
        );
    }
    assert_eq!(report.summary.win_rate, Some(1.0));
    assert_eq!(report.summary.position_bias.shown_b_preferred, flips);
}

#[test]
fn cache_hits_make_no_requests() {
    let dir = tempfile::tempdir().unwrap();
    let server = LoopbackServer::start(|_, req| {
        let pick = if candidate_shown_as_a(req) { "B" } else { "A" };
        Reply::chat(&format!(
            "Comparison: the reference is better.\nPreferred: {pick}"
        ))
    });
    let cfg = OpenAiJudgeConfig {
        cache_dir: Some(dir.path().join("cache")),
        ..test_config(&server)
    };
    let items: Vec<JudgeItem> = (0..12).map(|i| item(&format!("c{i}"))).collect();

    let first = OpenAiJudge::new(cfg.clone())
        .unwrap()
        .judge(&items)
        .unwrap();
    assert_eq!(server.request_count(), 12);
    assert_eq!(first.summary.losses, 12);
    assert_eq!((first.summary.requests, first.summary.cache_hits), (12, 0));

    // A fresh judge on the same cache: zero requests, the same verdicts.
    let again = OpenAiJudge::new(cfg.clone())
        .unwrap()
        .judge(&items)
        .unwrap();
    assert_eq!(
        server.request_count(),
        12,
        "cache hits must not reach the server"
    );
    for (a, b) in first.verdicts.iter().zip(&again.verdicts) {
        assert!(b.cached && b.requests == 0 && !a.cached);
        assert_eq!(
            (&a.id, a.flipped, a.candidate_score, &a.reply, a.usage),
            (&b.id, b.flipped, b.candidate_score, &b.reply, b.usage)
        );
    }
    let s = &again.summary;
    assert_eq!((s.requests, s.cache_hits, s.losses), (0, 12, 12));
    assert_eq!((s.prompt_tokens, s.paid_prompt_tokens), (1200, 0));

    // Another seed changes the order of some comparisons: only those are fetched (the order is
    // part of the key), each once.
    let cfg2 = OpenAiJudgeConfig {
        seed: 12,
        ..cfg.clone()
    };
    let changed = items
        .iter()
        .filter(|it| flip_for(11, &it.id) != flip_for(12, &it.id))
        .count();
    assert!(changed > 0);
    let third = OpenAiJudge::new(cfg2).unwrap().judge(&items).unwrap();
    assert_eq!(server.request_count(), 12 + changed);
    assert_eq!(third.summary.requests as usize, changed);
    assert_eq!(third.summary.losses, 12);

    // Two items with the same texts and the same order are one comparison: one request, the
    // later item marked as served without a request; both counted once in the summary.
    let ids: Vec<String> = (0..100)
        .map(|i| format!("dup{i}"))
        .filter(|id| flip_for(11, id) == flip_for(11, "dup0"))
        .take(2)
        .collect();
    let twin = |id: &str| JudgeItem {
        id: id.to_string(),
        ..item("twin")
    };
    let before = server.request_count();
    let dup = OpenAiJudge::new(cfg)
        .unwrap()
        .judge(&[twin(&ids[0]), twin(&ids[1])])
        .unwrap();
    assert_eq!(server.request_count(), before + 1);
    assert_eq!(dup.verdicts.len(), 2);
    assert_eq!(
        (dup.verdicts[0].requests, dup.verdicts[0].cached),
        (1, false)
    );
    assert_eq!(
        (dup.verdicts[1].requests, dup.verdicts[1].cached),
        (0, true)
    );
    assert_eq!(
        (dup.summary.n, dup.summary.losses, dup.summary.requests),
        (2, 2, 1)
    );

    // Duplicate ids are an error, not two verdicts.
    let judge = OpenAiJudge::new(test_config(&server)).unwrap();
    assert!(judge.judge(&[item("x"), item("x")]).is_err());
}

#[test]
fn faults_are_retried_or_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let healed = Arc::new(AtomicBool::new(false));
    let per_item: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let server = {
        let (healed, per_item) = (healed.clone(), per_item.clone());
        LoopbackServer::start(move |_, req| {
            let id = marker(req);
            let n = {
                let mut m = per_item.lock().unwrap();
                let c = m.entry(id.clone()).or_insert(0);
                *c += 1;
                *c - 1
            };
            let ok = || Reply::chat("Comparison: one is better.\nPreferred: A");
            if healed.load(Ordering::SeqCst) {
                return ok();
            }
            match (id.as_str(), n) {
                ("rate", 0) => Reply::status(429, r#"{"error":{"message":"slow down"}}"#)
                    .with_header("Retry-After", "7"),
                ("flaky", 0) => Reply::status(500, "oops"),
                ("flaky", 1) => Reply::status(503, "busy"),
                ("stall", 0) => Reply::Stall,
                ("close", 0) => Reply::Close,
                ("garbage", _) => Reply::status(200, "<html>upstream hiccup</html>"),
                ("nopref", _) => Reply::chat("Comparison: they are equally good, hard to say."),
                ("bad", _) => Reply::status(400, r#"{"error":{"message":"invalid request"}}"#),
                ("down", _) => Reply::status(503, "maintenance"),
                ("nocontent", _) => Reply::status(200, r#"{"error":"no choices here"}"#),
                _ => ok(),
            }
        })
    };
    let sleeps: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let cfg = OpenAiJudgeConfig {
        cache_dir: Some(dir.path().join("cache")),
        ..test_config(&server)
    };
    let judge = {
        let sleeps = sleeps.clone();
        OpenAiJudge::new(cfg.clone())
            .unwrap()
            .with_sleeper(move |d| sleeps.lock().unwrap().push(d))
    };
    let names = [
        "ok",
        "rate",
        "flaky",
        "stall",
        "close",
        "garbage",
        "nopref",
        "bad",
        "down",
        "nocontent",
    ];
    let items: Vec<JudgeItem> = names.iter().map(|n| item(n)).collect();
    let report = judge.judge(&items).unwrap();

    // One verdict per item, in order.
    let by_id: HashMap<&str, _> = report.verdicts.iter().map(|v| (v.id.as_str(), v)).collect();
    assert_eq!(
        report
            .verdicts
            .iter()
            .map(|v| v.id.as_str())
            .collect::<Vec<_>>(),
        names
    );
    let expect = [
        ("ok", VerdictStatus::Decided, 1, None),
        ("rate", VerdictStatus::Decided, 2, None),
        ("flaky", VerdictStatus::Decided, 3, None),
        ("stall", VerdictStatus::Decided, 2, None),
        ("close", VerdictStatus::Decided, 2, None),
        ("garbage", VerdictStatus::Failed, 1, None),
        ("nopref", VerdictStatus::Unparseable, 1, None),
        ("bad", VerdictStatus::Failed, 1, Some(400)),
        ("down", VerdictStatus::Failed, 4, Some(503)),
        ("nocontent", VerdictStatus::Failed, 1, None),
    ];
    let seen = per_item.lock().unwrap().clone();
    for (id, status, requests, http) in expect {
        let v = by_id[id];
        assert_eq!(
            (v.status, v.requests, v.http_status),
            (status, requests, http),
            "{id}: {v:?}"
        );
        assert_eq!(seen[id], requests, "{id}: requests the server saw");
        assert_eq!(
            v.candidate_score.is_some(),
            status == VerdictStatus::Decided,
            "{id}"
        );
        assert!(!v.cached);
    }
    assert!(
        by_id["down"]
            .error
            .as_deref()
            .unwrap()
            .contains("gave up after 4 requests")
    );
    assert!(
        by_id["garbage"]
            .error
            .as_deref()
            .unwrap()
            .contains("not JSON")
    );
    assert!(
        by_id["nopref"]
            .reply
            .as_deref()
            .unwrap()
            .contains("equally good")
    );
    assert!(
        by_id["bad"]
            .error
            .as_deref()
            .unwrap()
            .contains("invalid request")
    );

    let s = &report.summary;
    assert_eq!((s.n, s.decided, s.unparseable, s.failed), (10, 5, 1, 4));
    assert_eq!(s.wins + s.losses + s.ties + s.unparseable + s.failed, s.n);
    assert_eq!(s.requests as usize, server.request_count());
    assert_eq!(server.request_count(), 18);

    // Waits: Retry-After honoured once (7 s), every other wait is a capped backoff.
    let sleeps = sleeps.lock().unwrap().clone();
    assert_eq!(sleeps.len(), 18 - 10, "one wait per retry: {sleeps:?}");
    assert_eq!(
        sleeps
            .iter()
            .filter(|d| **d == Duration::from_secs(7))
            .count(),
        1,
        "{sleeps:?}"
    );
    assert!(
        sleeps
            .iter()
            .filter(|d| **d != Duration::from_secs(7))
            .all(|d| *d <= Duration::from_millis(4)),
        "{sleeps:?}"
    );

    // Re-run on the same cache once the server behaves: cached replies (decided and
    // unparseable) cost nothing; only the 4 failed comparisons are asked again, once each.
    healed.store(true, Ordering::SeqCst);
    let again = OpenAiJudge::new(cfg)
        .unwrap()
        .with_sleeper(|_| {})
        .judge(&items)
        .unwrap();
    assert_eq!(server.request_count(), 18 + 4);
    let s = &again.summary;
    assert_eq!(
        (
            s.n,
            s.decided,
            s.unparseable,
            s.failed,
            s.cache_hits,
            s.requests
        ),
        (10, 9, 1, 0, 6, 4)
    );
}

#[test]
fn requests_in_flight_are_bounded() {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let server = {
        let (in_flight, max_seen) = (in_flight.clone(), max_seen.clone());
        LoopbackServer::start(move |_, _| {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            max_seen.fetch_max(now, Ordering::SeqCst);
            // Hold each request until the pool has been seen full once (bounded), then briefly,
            // so that an unbounded client would exceed the limit.
            let t0 = Instant::now();
            while max_seen.load(Ordering::SeqCst) < 3 && t0.elapsed() < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(Duration::from_millis(20));
            in_flight.fetch_sub(1, Ordering::SeqCst);
            Reply::chat("Comparison: x.\nPreferred: B")
        })
    };
    let cfg = OpenAiJudgeConfig {
        concurrency: 3,
        read_timeout_ms: 3000,
        ..test_config(&server)
    };
    let items: Vec<JudgeItem> = (0..12).map(|i| item(&format!("p{i}"))).collect();
    let report = OpenAiJudge::new(cfg).unwrap().judge(&items).unwrap();
    assert_eq!(report.summary.decided, 12);
    assert_eq!(server.request_count(), 12);
    assert_eq!(max_seen.load(Ordering::SeqCst), 3);
}

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn api_key_stays_in_the_authorization_header() {
    let server = LoopbackServer::start(|_, req| {
        let auth = req.header("authorization").unwrap_or("").to_string();
        if auth != format!("Bearer {KEY}") {
            return Reply::status(401, r#"{"error":{"message":"missing or wrong key"}}"#);
        }
        match marker(req).as_str() {
            // A server that echoes the key in a reply, an error body and the model name.
            "echo" => Reply::chat(&format!("Comparison: the header was {auth}.\nPreferred: B")),
            "err" => Reply::status(
                400,
                &format!(r#"{{"error":{{"message":"key {KEY} not allowed"}}}}"#),
            ),
            "unparse" => Reply::chat(&format!("I will not say. {KEY}")),
            _ => Reply::chat("Comparison: fine.\nPreferred: A"),
        }
    });
    let work = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let config = secrets.path().join("judge.toml");
    std::fs::write(
        &config,
        format!(
            "api_key = \"{KEY}\"\napi_key_env = \"\"\nmax_retries = 1\nbackoff_base_ms = 1\nbackoff_cap_ms = 2\n\
             connect_timeout_ms = 1000\nread_timeout_ms = 1000\n"
        ),
    )
    .unwrap();
    let input = work.path().join("in.jsonl");
    let lines: Vec<String> = ["echo", "err", "unparse", "plain"]
        .iter()
        .map(|id| {
            let it = item(id);
            serde_json::json!({"id": id, "prompt": it.prompt, "candidate": it.candidate, "reference": it.reference})
                .to_string()
        })
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = work.path().join("out/verdicts.jsonl");
    let cache = work.path().join("cache");
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let argv = [
        "overopt".to_string(),
        "judge".into(),
        "--input".into(),
        p(&input),
        "--output".into(),
        p(&out),
        "--config".into(),
        p(&config),
        "--base-url".into(),
        server.base_url(),
        "--model".into(),
        "judge-test".into(),
        "--cache-dir".into(),
        p(&cache),
        "--concurrency".into(),
        "2".into(),
        "--seed".into(),
        "5".into(),
        "--price-prompt-per-1k".into(),
        "0.01".into(),
    ];
    let cli = <overopt::cli::Cli as clap::Parser>::try_parse_from(argv.clone()).unwrap();
    // One comparison fails (HTTP 400): the command fails, naming it, after writing everything.
    let e = format!("{:#}", overopt::cli::run(cli).unwrap_err());
    assert!(
        e.contains("1 of 4 comparisons failed")
            && e.contains("item err")
            && e.contains("--allow-failed"),
        "{e}"
    );
    assert!(out.exists());

    // Every request was authorized, and the key travelled only in the header.
    assert_eq!(server.request_count(), 4);
    for req in server.requests() {
        assert_eq!(
            req.header("authorization"),
            Some(format!("Bearer {KEY}").as_str())
        );
        assert!(!req.body.contains(KEY) && !req.path.contains(KEY));
    }

    // Outputs: one verdict per input line, a summary, and no key anywhere on disk.
    let verdicts: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(verdicts.len(), 4);
    assert_eq!(verdicts[0]["id"], "echo");
    assert_eq!(verdicts[1]["status"], "failed");
    assert_eq!(verdicts[1]["http_status"], 400);
    assert_eq!(verdicts[2]["status"], "unparseable");
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(work.path().join("out/verdicts.summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["summary"]["n"], 4);
    assert_eq!(summary["summary"]["failed"], 1);
    assert_eq!(summary["seed"], 5);
    assert!(
        (summary["summary"]["cost"].as_f64().unwrap() - 3.0 * 100.0 * 0.01 / 1000.0).abs() < 1e-12
    );
    let mut files = Vec::new();
    files_under(work.path(), &mut files);
    assert!(
        files.iter().any(|f| f.starts_with(&cache)),
        "the cache was written"
    );
    let mut redacted_seen = false;
    for f in &files {
        let text = String::from_utf8_lossy(&std::fs::read(f).unwrap()).into_owned();
        assert!(
            !text.contains(KEY),
            "the API key leaked into {}",
            f.display()
        );
        redacted_seen |= text.contains("<redacted>");
    }
    assert!(redacted_seen, "the echoed key was replaced");

    // Debug output of the config and the judge.
    let cfg = OpenAiJudgeConfig {
        api_key: Some(ApiKey::new(KEY)),
        ..test_config(&server)
    };
    assert!(!format!("{cfg:?}").contains(KEY));
    let judge = OpenAiJudge::new(cfg).unwrap();
    assert!(!format!("{judge:?}{judge:#?}").contains(KEY));

    // With --allow-failed the same command succeeds, all from the cache but the failed one.
    let before = server.request_count();
    let mut argv = argv.to_vec();
    argv.push("--allow-failed".into());
    let cli = <overopt::cli::Cli as clap::Parser>::try_parse_from(argv).unwrap();
    overopt::cli::run(cli).unwrap();
    assert_eq!(server.request_count(), before + 1);

    // Without the key: 401, recorded as failed with its status, not retried, and fatal for the
    // batch: the next comparison is not requested.
    let before = server.request_count();
    let cfg = OpenAiJudgeConfig {
        api_key: None,
        concurrency: 1,
        ..test_config(&server)
    };
    let report = OpenAiJudge::new(cfg)
        .unwrap()
        .judge(&[item("plain"), item("echo")])
        .unwrap();
    assert_eq!(server.request_count(), before + 1);
    let [first, second] = &report.verdicts[..] else {
        panic!()
    };
    assert_eq!(
        (first.status, first.http_status, first.requests),
        (VerdictStatus::Failed, Some(401), 1)
    );
    assert_eq!(
        (second.status, second.http_status, second.requests),
        (VerdictStatus::Failed, None, 0)
    );
    let e = second.error.as_deref().unwrap();
    assert!(e.contains("not requested") && e.contains("HTTP 401"), "{e}");
}

/// A judge with the server's replies chosen per item id.
fn server_by_id(f: impl Fn(&str, &Request) -> Reply + Send + Sync + 'static) -> LoopbackServer {
    LoopbackServer::start(move |_, req| f(&marker(req), req))
}

fn chat_reply(content: serde_json::Value, finish: &str, model: &str) -> Reply {
    let body = serde_json::json!({
        "model": model,
        "choices": [{"index": 0, "message": content, "finish_reason": finish}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 7},
    });
    Reply::status(200, &body.to_string())
}

#[test]
fn fatal_errors_stop_the_batch() {
    let no_credit = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
    for (reply, status, hint) in [
        (Reply::status(429, no_credit), 429, "current quota"),
        (
            Reply::status(403, r#"{"error":{"message":"forbidden"}}"#),
            403,
            "forbidden",
        ),
        (
            Reply::status(404, "no such route"),
            404,
            "/chat/completions: is the base URL right?",
        ),
    ] {
        let reply = Arc::new(Mutex::new(Some(reply)));
        let server = LoopbackServer::start(move |_, _| {
            reply
                .lock()
                .unwrap()
                .take()
                .unwrap_or_else(|| Reply::chat("Comparison: x.\nPreferred: A"))
        });
        let cfg = OpenAiJudgeConfig {
            concurrency: 1,
            ..test_config(&server)
        };
        let items: Vec<JudgeItem> = (0..5).map(|i| item(&format!("q{i}"))).collect();
        let report = OpenAiJudge::new(cfg)
            .unwrap()
            .with_sleeper(|_| {})
            .judge(&items)
            .unwrap();
        assert_eq!(
            server.request_count(),
            1,
            "HTTP {status}: one request, no retry"
        );
        let v = &report.verdicts[0];
        assert_eq!(
            (v.status, v.http_status),
            (VerdictStatus::Failed, Some(status))
        );
        assert!(v.error.as_deref().unwrap().contains(hint), "{v:?}");
        for v in &report.verdicts[1..] {
            assert_eq!((v.status, v.requests), (VerdictStatus::Failed, 0), "{v:?}");
        }
        assert_eq!(report.summary.failed, 5);
    }
}

#[test]
fn refusals_and_cut_replies_fail_uncached_with_their_cost() {
    let dir = tempfile::tempdir().unwrap();
    let healed = Arc::new(AtomicBool::new(false));
    let server = {
        let healed = healed.clone();
        server_by_id(move |id, _| {
            if healed.load(Ordering::SeqCst) {
                return Reply::chat("Comparison: fine.\nPreferred: B");
            }
            match id {
                "refused" => chat_reply(
                    serde_json::json!({"role": "assistant", "content": null, "refusal": "I can't help with that."}),
                    "stop",
                    "judge-2024",
                ),
                "cut" => chat_reply(
                    serde_json::json!({"role": "assistant", "content": "Comparison: Summary A covers the"}),
                    "length",
                    "judge-2024",
                ),
                "cut_late" => chat_reply(
                    serde_json::json!({"role": "assistant", "content": "Comparison: A.\nPreferred: A\nBecause"}),
                    "length",
                    "judge-2024",
                ),
                _ => chat_reply(
                    serde_json::json!({"role": "assistant", "content": "Comparison: A.\nPreferred: A"}),
                    "stop",
                    "judge-2024-b",
                ),
            }
        })
    };
    let cfg = OpenAiJudgeConfig {
        cache_dir: Some(dir.path().join("cache")),
        ..test_config(&server)
    };
    let items: Vec<JudgeItem> = ["refused", "cut", "cut_late", "plain"].map(item).to_vec();
    let report = OpenAiJudge::new(cfg.clone())
        .unwrap()
        .judge(&items)
        .unwrap();
    let v = &report.verdicts;
    assert_eq!(v[0].status, VerdictStatus::Failed);
    assert!(
        v[0].error
            .as_deref()
            .unwrap()
            .contains("refused: I can't help"),
        "{:?}",
        v[0]
    );
    assert_eq!(v[1].status, VerdictStatus::Failed);
    let e = v[1].error.as_deref().unwrap();
    assert!(
        e.contains("token limit") && e.contains("max_tokens = 64"),
        "{e}"
    );
    assert_eq!(
        v[2].status,
        VerdictStatus::Decided,
        "a cut reply that already chose counts"
    );
    assert_eq!(v[3].status, VerdictStatus::Decided);
    for v in v {
        assert_eq!(
            (v.usage.prompt_tokens, v.usage.completion_tokens),
            (50, 7),
            "{v:?}"
        );
        assert_eq!(v.requests, 1);
    }
    assert_eq!(
        report.summary.prompt_tokens, 200,
        "failed replies were billed too"
    );
    assert_eq!(
        report.summary.response_models,
        vec!["judge-2024".to_string(), "judge-2024-b".to_string()]
    );

    // A re-run asks the refused and the cut comparison again; the others come from the cache.
    healed.store(true, Ordering::SeqCst);
    let before = server.request_count();
    let again = OpenAiJudge::new(cfg).unwrap().judge(&items).unwrap();
    assert_eq!(server.request_count(), before + 2);
    assert_eq!((again.summary.decided, again.summary.cache_hits), (4, 2));
}

#[test]
fn timeouts_and_conflicts_are_retried_with_the_servers_wait() {
    let per_item: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let server = {
        let per_item = per_item.clone();
        server_by_id(move |id, _| {
            let n = {
                let mut m = per_item.lock().unwrap();
                let c = m.entry(id.to_string()).or_insert(0);
                *c += 1;
                *c - 1
            };
            match (id, n) {
                ("t408", 0) => Reply::status(408, "request timeout"),
                ("t409", 0) => Reply::status(409, "conflict"),
                ("ms", 0) => Reply::status(
                    429,
                    r#"{"error":{"message":"rate limit","code":"rate_limit_exceeded"}}"#,
                )
                .with_header("retry-after-ms", "1250")
                .with_header("retry-after", "2"),
                _ => Reply::chat("Comparison: x.\nPreferred: A"),
            }
        })
    };
    let sleeps: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let judge = {
        let sleeps = sleeps.clone();
        OpenAiJudge::new(test_config(&server))
            .unwrap()
            .with_sleeper(move |d| sleeps.lock().unwrap().push(d))
    };
    let report = judge.judge(&["t408", "t409", "ms"].map(item)).unwrap();
    assert_eq!(report.summary.decided, 3);
    assert_eq!(server.request_count(), 6);
    let sleeps = sleeps.lock().unwrap().clone();
    assert_eq!(sleeps.len(), 3);
    assert_eq!(
        sleeps
            .iter()
            .filter(|d| **d == Duration::from_millis(1250))
            .count(),
        1,
        "retry-after-ms is honoured before retry-after: {sleeps:?}"
    );
}

#[test]
fn requests_go_through_a_configured_proxy() {
    // The loopback server plays an HTTP proxy: a client that uses it sends the absolute URL of
    // a host that does not resolve.
    let server = LoopbackServer::start(|_, _| Reply::chat("Comparison: x.\nPreferred: B"));
    let cfg = OpenAiJudgeConfig {
        base_url: Some("http://judge.invalid/v1".into()),
        proxy: Some(server.root_url()),
        ..test_config(&server)
    };
    let judge = OpenAiJudge::new(cfg).unwrap();
    assert_eq!(
        judge.proxy().map(|(u, _)| u.to_string()),
        Some(server.root_url())
    );
    let report = judge.judge(&[item("viaproxy")]).unwrap();
    assert_eq!(report.summary.decided, 1);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].path, "http://judge.invalid/v1/chat/completions");
}

#[test]
fn a_prompt_template_replaces_the_wording() {
    let server = LoopbackServer::start(|_, _| Reply::chat("Comparison: x.\nPreferred: Summary A"));
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("prompt.txt");
    std::fs::write(
        &template,
        "Judge these.\nPOST >>> {post}\nSummary A:\n{summary_a}\nSummary B:\n{summary_b}\nPreferred: A or B",
    )
    .unwrap();
    let cfg = OpenAiJudgeConfig {
        prompt_template: Some(template.clone()),
        ..test_config(&server)
    };
    let report = OpenAiJudge::new(cfg.clone())
        .unwrap()
        .judge(&[item("t1"), item("t2")])
        .unwrap();
    assert_eq!(report.summary.decided, 2);
    for req in server.requests() {
        let p = req.prompt();
        assert!(
            p.starts_with("Judge these.\nPOST >>> SUBREDDIT: r/test"),
            "{p}"
        );
        assert!(
            !p.contains("TL;DR:") && !p.contains("most important points"),
            "{p}"
        );
        // The order is still drawn per comparison.
        let id = marker(&req);
        assert_eq!(candidate_shown_as_a(&req), !flip_for(11, &id));
    }
    std::fs::write(&template, "no placeholders").unwrap();
    let e = OpenAiJudge::new(cfg).unwrap_err().to_string();
    assert!(e.contains("prompt.txt") && e.contains("{post}"), "{e}");
}
