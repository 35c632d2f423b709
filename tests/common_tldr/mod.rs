//! TL;DR fixtures shared by tests/tldr.rs and tests/paper_sweep.rs: a word-level tokenizer,
//! small SFT and comparisons tables in the layouts of the released datasets, written as parquet
//! into a hub cache laid out as the hub client lays it out.

#![allow(dead_code)]

use overopt::data::tokenizer::Tok;
use polars::prelude::*;
use std::path::{Path, PathBuf};

/// The revision of the hub's parquet conversion.
pub const PARQUET_REV: &str = "refs/convert/parquet";

/// A word-level tokenizer: one token per whitespace-separated word, so token counts are word
/// counts. Words `w0`..`w999` and the prompt's markers are known; anything else is `<|unk|>`.
pub fn word_tok() -> Tok {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
    let mut words: Vec<String> = [
        "<|endoftext|>",
        "<|unk|>",
        "SUBREDDIT:",
        "TITLE:",
        "POST:",
        "TL;DR:",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    words.extend((0..1000).map(|i| format!("w{i}")));
    let model = WordLevel::builder()
        .vocab(
            words
                .iter()
                .enumerate()
                .map(|(i, w)| (w.clone(), i as u32))
                .collect(),
        )
        .unk_token("<|unk|>".to_string())
        .build()
        .unwrap();
    let mut t = tokenizers::Tokenizer::new(model);
    t.with_pre_tokenizer(Some(WhitespaceSplit));
    t.add_special_tokens([tokenizers::AddedToken::from("<|endoftext|>", true)])
        .unwrap();
    Tok::new(t, None, "test words").unwrap()
}

/// `n` words starting at `w{start}`.
pub fn words(start: usize, n: usize) -> String {
    (start..start + n)
        .map(|i| format!("w{}", i % 1000))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn parquet_bytes(mut df: DataFrame) -> Vec<u8> {
    let mut buf = Vec::new();
    ParquetWriter::new(&mut buf).finish(&mut df).unwrap();
    buf
}

pub fn strs(name: &str, v: Vec<Option<String>>) -> Series {
    Series::new(name.into(), v)
}

/// One row of the SFT set (tldr_3_filtered layout).
#[derive(Clone)]
pub struct SftRow {
    pub subreddit: String,
    pub title: String,
    pub post: String,
    pub summary: Option<String>,
}

pub fn sft_row(i: usize, post_words: usize, summary_words: usize) -> SftRow {
    SftRow {
        subreddit: format!("sub{i}"),
        title: words(500 + i, 2),
        post: words(i * 10, post_words),
        summary: Some(words(900 + i, summary_words)),
    }
}

pub fn sft_df(rows: &[SftRow]) -> DataFrame {
    let n = rows.len();
    let col = |name: &str, f: &dyn Fn(&SftRow) -> Option<String>| -> Column {
        strs(name, rows.iter().map(f).collect()).into()
    };
    DataFrame::new(
        n,
        vec![
            col("id", &|r| Some(format!("t3_{}", r.subreddit))),
            col("subreddit", &|r| Some(r.subreddit.clone())),
            col("title", &|r| Some(r.title.clone())),
            col("post", &|r| Some(r.post.clone())),
            col("summary", &|r| r.summary.clone()),
        ],
    )
    .unwrap()
}

/// One row of the comparisons layout.
#[derive(Clone)]
pub struct CmpRow {
    pub post: Option<String>,
    pub article: Option<String>,
    pub title: String,
    pub subreddit: String,
    pub texts: [Option<String>; 2],
    pub choice: i32,
}

pub fn cmp_row(i: usize, choice: i32) -> CmpRow {
    CmpRow {
        post: Some(words(i * 10, 5)),
        article: None,
        title: words(600 + i, 2),
        subreddit: format!("sub{i}"),
        // Summaries carry a leading space, as in the released comparisons.
        texts: [
            Some(format!(" {}", words(700 + i, 3))),
            Some(format!(" {}", words(800 + i, 4))),
        ],
        choice,
    }
}

pub fn cnndm_row() -> CmpRow {
    CmpRow {
        post: None,
        article: Some("An article of the Daily Mail.".into()),
        title: "A headline".into(),
        subreddit: String::new(),
        texts: [Some(" one".into()), Some(" two".into())],
        choice: 0,
    }
}

pub fn comparisons_df(rows: &[CmpRow]) -> DataFrame {
    let n = rows.len();
    let field = |name: &str, f: &dyn Fn(&CmpRow) -> Option<String>| -> Series {
        strs(name, rows.iter().map(f).collect())
    };
    let info = StructChunked::from_series(
        "info".into(),
        n,
        [
            field("id", &|r| Some(format!("t3_{}", r.subreddit))),
            field("post", &|r| r.post.clone()),
            field("title", &|r| Some(r.title.clone())),
            field("subreddit", &|r| {
                r.post.as_ref().map(|_| r.subreddit.clone())
            }),
            field("site", &|r| r.article.as_ref().map(|_| "dailymail".into())),
            field("article", &|r| r.article.clone()),
        ]
        .iter(),
    )
    .unwrap()
    .into_series();
    let pairs: Vec<Series> = rows
        .iter()
        .map(|r| {
            let text = strs("text", r.texts.to_vec());
            let policy = strs("policy", vec![Some("sup2".into()), Some("ppo".into())]);
            StructChunked::from_series("".into(), 2, [text, policy].iter())
                .unwrap()
                .into_series()
        })
        .collect();
    let summaries = Series::new("summaries".into(), pairs);
    let choice = Series::new(
        "choice".into(),
        rows.iter().map(|r| r.choice).collect::<Vec<i32>>(),
    );
    let batch = strs("batch", vec![Some("batch3".into()); n]);
    DataFrame::new(
        n,
        vec![info.into(), summaries.into(), choice.into(), batch.into()],
    )
    .unwrap()
}

/// Put `bytes` into the hub cache as the hub client does: the blob under its hash, the
/// snapshot path a relative symlink to it, and `refs/<revision>` holding the commit.
pub fn put_cached(cache: &Path, repo: &str, commit: &str, file: &str, bytes: &[u8]) -> PathBuf {
    let root = cache.join(format!("datasets--{}", repo.replace('/', "--")));
    let ref_path = root.join("refs").join(PARQUET_REV);
    std::fs::create_dir_all(ref_path.parent().unwrap()).unwrap();
    std::fs::write(&ref_path, commit).unwrap();
    let hash = overopt::util::sha256_hex(bytes);
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::write(root.join("blobs").join(&hash), bytes).unwrap();
    let link = root.join("snapshots").join(commit).join(file);
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    let up = "../".repeat(file.split('/').count() + 1);
    #[cfg(unix)]
    std::os::unix::fs::symlink(format!("{up}blobs/{hash}"), &link).unwrap();
    #[cfg(not(unix))]
    std::fs::write(&link, bytes).unwrap();
    link
}
