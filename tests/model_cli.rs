//! `overopt score` and `overopt sample` on the tiny HF fixture model: the output file is
//! replaced atomically (a new file renamed over it), never rewritten in place.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

fn fixture() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gpt_neox/parallel")
        .display()
        .to_string()
}

/// Run `overopt` with `args` and `--output out`, where `out` already exists with a second hard
/// link: an in-place write would change the content seen through the link too.
fn check_atomic_output(args: &[&str], dir: &Path) -> String {
    let out = dir.join("out.jsonl");
    let link = dir.join("old.jsonl");
    std::fs::write(&out, "old\n").unwrap();
    std::fs::hard_link(&out, &link).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_overopt"))
        .args(args)
        .args(["--output", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(&link).unwrap(),
        "old\n",
        "the output file was rewritten in place"
    );
    assert_ne!(
        std::fs::metadata(&out).unwrap().ino(),
        std::fs::metadata(&link).unwrap().ino()
    );
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    names.sort();
    assert!(names.is_empty(), "temporary files left: {names:?}");
    std::fs::remove_file(&link).unwrap();
    std::fs::read_to_string(&out).unwrap()
}

#[test]
fn score_and_sample_replace_their_output_atomically() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let input = p.join("pairs.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"w3 w4\", \"response\": \"w5\"}\n{\"prompt\": \"w6\", \"response\": \"w7 w8\"}\n",
    )
    .unwrap();
    let m = fixture();
    let text = check_atomic_output(
        &["score", "--model", &m, "--input", input.to_str().unwrap()],
        p,
    );
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains("\"logp\""), "{text}");
    let text = check_atomic_output(
        &[
            "sample",
            "--model",
            &m,
            "--prompts",
            input.to_str().unwrap(),
            "--max-length",
            "8",
        ],
        p,
    );
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains("\"response\""), "{text}");
}
