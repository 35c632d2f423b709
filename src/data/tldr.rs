//! Reddit TL;DR at paper scale (SPEC section 1): the SFT set (filtered Reddit posts with their
//! reference summaries) and the preference set (OpenAI's summarize_from_feedback
//! "comparisons"), read from the parquet copies the hub keeps on the datasets' parquet
//! conversion revision (`refs/convert/parquet`, files `{config}/{split}/NNNN.parquet`).
//!
//! Files come through [`crate::hub::HubAccess`]: the standard hub cache first, the network only
//! on a miss, so a second run (or any run with `HF_HUB_OFFLINE=1`) is offline.
//!
//! Text form ([`SftRecord`], [`PrefRecord`]):
//! - prompt `"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"` (the
//!   fields verbatim), or a dataset's ready prompt column for [`SftFormat::PromptResponse`];
//! - every response (reference summary, chosen, rejected) trimmed and given ONE leading space,
//!   so that it continues the prompt's `TL;DR:` the way the summaries were written (the
//!   comparisons' texts carry that space, the filtered set's summaries do not).
//!
//! Preference rows: `chosen = summaries[choice].text`, `rejected = summaries[1 - choice].text`.
//! Rows without a post that carry an article instead (the CNN/Daily Mail items of the
//! comparisons' validation split) are dropped and counted; any other null post is an error.
//! The comparisons have no test split: their held-out pairs come from `validation`.
//!
//! Held-out sets: the SFT set's evaluation split gives the evaluation prompts and, as each
//! record's response, the human-written reference summary that the judge compares policy
//! samples with. The comparisons' evaluation split gives preference pairs (no reference
//! summary) for the held-out DAA loss, implicit-reward accuracy and E[r(x, y_w)].
//!
//! Token form: prompt and response are tokenized separately (no special tokens) and cut with
//! the reference code's rule ([`truncate_pair`], [`truncate_pref`]).
//!
//! Errors name the culprit: a missing column or struct field (and the file), a malformed row
//! (its 0-based row index within the file, and the file), an empty file.

use super::tokenizer::Tok;
use super::{PrefExample, SftExample, truncate_pair, truncate_pref};
use crate::hub::HubAccess;
use anyhow::{Context, Result, anyhow, bail};
use polars::prelude::{
    DataFrame, DataType, ParquetReader, Schema, SchemaExt, SerReader, StringChunked,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The revision that holds the hub's parquet conversion of a dataset.
pub const PARQUET_REVISION: &str = "refs/convert/parquet";

/// The TL;DR prompt of a Reddit post (SPEC section 1).
pub fn tldr_prompt(subreddit: &str, title: &str, post: &str) -> String {
    format!("SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:")
}

/// A response as the pipeline scores it: trimmed, with one leading space.
pub fn response_text(raw: &str) -> String {
    format!(" {}", raw.trim())
}

fn default_revision() -> String {
    PARQUET_REVISION.into()
}
fn default_sft_repo() -> String {
    "vwxyzjn/summarize_from_feedback_tldr_3_filtered".into()
}
fn default_pref_repo() -> String {
    "openai/summarize_from_feedback".into()
}
fn default_config() -> String {
    "default".into()
}
fn default_comparisons() -> String {
    "comparisons".into()
}
fn default_train() -> String {
    "train".into()
}
fn default_validation() -> String {
    "validation".into()
}
fn default_max_length() -> usize {
    512
}
fn default_max_prompt_length() -> usize {
    256
}

/// How the SFT set's columns are laid out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SftFormat {
    /// String columns `subreddit`, `title`, `post`, `summary` (OpenAI's `tldr_3_filtered`
    /// layout; an `id` column is kept when present); the prompt is built with [`tldr_prompt`].
    #[default]
    Fields,
    /// A ready prompt column and a response column, used as they are (the response still goes
    /// through [`response_text`]). E.g. `trl-lib/tldr`: prompt = "prompt",
    /// response = "completion".
    PromptResponse { prompt: String, response: String },
}

/// Where the SFT set lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftSource {
    #[serde(default = "default_sft_repo")]
    pub repo: String,
    /// A branch, tag or commit hash; by default the parquet conversion branch.
    #[serde(default = "default_revision")]
    pub revision: String,
    /// The dataset configuration (the first folder of the parquet files).
    #[serde(default = "default_config")]
    pub config: String,
    #[serde(default)]
    pub format: SftFormat,
    #[serde(default = "default_train")]
    pub train_split: String,
    /// The held-out split: evaluation prompts with their reference summaries.
    #[serde(default = "default_validation")]
    pub eval_split: String,
    /// Keep at most this many examples of the training split (file order).
    #[serde(default)]
    pub max_train: Option<usize>,
    /// Keep at most this many examples of the evaluation split (file order).
    #[serde(default)]
    pub max_eval: Option<usize>,
}

impl Default for SftSource {
    fn default() -> Self {
        Self {
            repo: default_sft_repo(),
            revision: default_revision(),
            config: default_config(),
            format: SftFormat::Fields,
            train_split: default_train(),
            eval_split: default_validation(),
            max_train: None,
            max_eval: None,
        }
    }
}

/// Where the preference set lives (the summarize_from_feedback "comparisons" layout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefSource {
    #[serde(default = "default_pref_repo")]
    pub repo: String,
    #[serde(default = "default_revision")]
    pub revision: String,
    #[serde(default = "default_comparisons")]
    pub config: String,
    #[serde(default = "default_train")]
    pub train_split: String,
    /// The comparisons have no test split; the validation split holds the held-out pairs.
    #[serde(default = "default_validation")]
    pub eval_split: String,
    #[serde(default)]
    pub max_train: Option<usize>,
    #[serde(default)]
    pub max_eval: Option<usize>,
}

impl Default for PrefSource {
    fn default() -> Self {
        Self {
            repo: default_pref_repo(),
            revision: default_revision(),
            config: default_comparisons(),
            train_split: default_train(),
            eval_split: default_validation(),
            max_train: None,
            max_eval: None,
        }
    }
}

/// The TL;DR data of a paper-scale run. Every key has a default (the paper's setting).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TldrConfig {
    #[serde(default)]
    pub sft: SftSource,
    #[serde(default)]
    pub prefs: PrefSource,
    /// Prompt + response + EOS, in tokens.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    #[serde(default = "default_max_prompt_length")]
    pub max_prompt_length: usize,
}

impl Default for TldrConfig {
    fn default() -> Self {
        Self {
            sft: SftSource::default(),
            prefs: PrefSource::default(),
            max_length: default_max_length(),
            max_prompt_length: default_max_prompt_length(),
        }
    }
}

impl TldrConfig {
    pub fn from_toml(text: &str, ctx: &str) -> Result<Self> {
        let cfg: Self =
            toml::from_str(text).with_context(|| format!("{ctx}: invalid TL;DR data config"))?;
        cfg.validate().with_context(|| ctx.to_string())?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    pub fn validate(&self) -> Result<()> {
        if self.max_prompt_length + 2 > self.max_length {
            bail!(
                "`max_prompt_length` ({}) must leave room for a response and EOS within \
                 `max_length` ({})",
                self.max_prompt_length,
                self.max_length
            );
        }
        for (what, repo) in [("sft", &self.sft.repo), ("prefs", &self.prefs.repo)] {
            if repo.split('/').count() != 2 || repo.starts_with('/') || repo.ends_with('/') {
                bail!("{what}.repo {repo:?} is not a hub id of the form org/name");
            }
        }
        for (what, m) in [
            ("sft.max_train", self.sft.max_train),
            ("sft.max_eval", self.sft.max_eval),
            ("prefs.max_train", self.prefs.max_train),
            ("prefs.max_eval", self.prefs.max_eval),
        ] {
            if m == Some(0) {
                bail!("`{what}` must be positive (leave it out for no limit)");
            }
        }
        Ok(())
    }
}

/// Which split of a source: training, or the held-out split used for evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Eval,
}

/// Where a record came from: the file inside the dataset repo and its 0-based row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowRef {
    pub file: String,
    pub row: usize,
}

/// An SFT example in text form. As JSON lines it is also a valid `overopt sft` data file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftRecord {
    pub prompt: String,
    pub response: String,
    #[serde(default)]
    pub id: Option<String>,
    pub source: RowRef,
}

/// A preference pair in text form. As JSON lines it is also a valid `overopt daa` data file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefRecord {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    #[serde(default)]
    pub id: Option<String>,
    pub source: RowRef,
}

/// Records of one split with what was read to get them.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    pub records: Vec<T>,
    /// Local paths of the parquet files read (all shards of the split, or those needed to
    /// reach the limit).
    pub files: Vec<PathBuf>,
    /// Rows dropped on purpose (preference rows without a post: CNN/Daily Mail items).
    pub skipped: usize,
}

// ---------------------------------------------------------------------------------------------
// Reading parquet files with schema checks.

/// The kind of value a column (or struct field) must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    Struct,
    ListOfStruct,
}

impl Kind {
    fn matches(self, dt: &DataType) -> bool {
        match self {
            Kind::Str => matches!(dt, DataType::String),
            Kind::Int => dt.is_integer(),
            Kind::Struct => matches!(dt, DataType::Struct(_)),
            Kind::ListOfStruct => {
                matches!(dt, DataType::List(inner) if matches!(**inner, DataType::Struct(_)))
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Str => "a string",
            Kind::Int => "an integer",
            Kind::Struct => "a struct",
            Kind::ListOfStruct => "a list of structs",
        }
    }
}

/// The type of a column path: `["info", "post"]` is field `post` of struct column `info`; a
/// list of structs is looked through (`["summaries", "text"]`).
fn dtype_at<'a>(schema: &'a Schema, path: &[&str]) -> Option<&'a DataType> {
    let mut dt = schema.get(path[0])?;
    for name in &path[1..] {
        if let DataType::List(inner) = dt {
            dt = inner;
        }
        let DataType::Struct(fields) = dt else {
            return None;
        };
        dt = fields.iter().find(|f| f.name().as_str() == *name)?.dtype();
    }
    Some(dt)
}

/// What exists where `path` stops resolving: the file's columns, or the fields of the struct
/// that lacks the next name.
fn available_at(schema: &Schema, path: &[&str]) -> String {
    let names = |it: &mut dyn Iterator<Item = &str>| it.collect::<Vec<_>>().join(", ");
    let Some(mut dt) = schema.get(path[0]) else {
        return format!(
            "the file has columns: {}",
            names(&mut schema.iter_names().map(|n| n.as_str()))
        );
    };
    for (i, name) in path.iter().enumerate().skip(1) {
        if let DataType::List(inner) = dt {
            dt = inner;
        }
        let DataType::Struct(fields) = dt else {
            return format!("`{}` is {dt}, not a struct", path[..i].join("."));
        };
        match fields.iter().find(|f| f.name().as_str() == *name) {
            Some(f) => dt = f.dtype(),
            None => {
                return format!(
                    "`{}` has fields: {}",
                    path[..i].join("."),
                    names(&mut fields.iter().map(|f| f.name().as_str()))
                );
            }
        }
    }
    String::new()
}

/// The schema of a parquet file, with the empty-file checks.
fn file_schema(path: &Path) -> Result<Schema> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.len() == 0 {
        bail!("{}: the file is empty (0 bytes)", path.display());
    }
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = ParquetReader::new(file);
    let arrow = reader
        .schema()
        .map_err(|e| anyhow!("{}: not a readable parquet file: {e}", path.display()))?;
    let rows = reader
        .num_rows()
        .map_err(|e| anyhow!("{}: not a readable parquet file: {e}", path.display()))?;
    if rows == 0 {
        bail!("{}: the file has no rows", path.display());
    }
    Ok(Schema::from_arrow_schema(&arrow))
}

/// Check that `path` has the required columns (paths with their kinds), then read the named
/// top-level columns.
fn read_checked(
    path: &Path,
    required: &[(&[&str], Kind)],
    optional: &[(&[&str], Kind)],
) -> Result<(DataFrame, Vec<bool>)> {
    let schema = file_schema(path)?;
    let mut top: Vec<String> = Vec::new();
    for (cols, kind) in required {
        let name = cols.join(".");
        let dt = dtype_at(&schema, cols).ok_or_else(|| {
            anyhow!(
                "{}: column `{name}` is missing ({})",
                path.display(),
                available_at(&schema, cols)
            )
        })?;
        if !kind.matches(dt) {
            bail!(
                "{}: column `{name}` has type {dt}, expected {}",
                path.display(),
                kind.name()
            );
        }
        if !top.contains(&cols[0].to_string()) {
            top.push(cols[0].to_string());
        }
    }
    let mut present = Vec::new();
    for (cols, kind) in optional {
        let ok = dtype_at(&schema, cols).is_some_and(|dt| kind.matches(dt));
        if ok && !top.contains(&cols[0].to_string()) {
            top.push(cols[0].to_string());
        }
        present.push(ok);
    }
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let df = ParquetReader::new(file)
        .with_columns(Some(top))
        .finish()
        .map_err(|e| anyhow!("{}: cannot read the parquet data: {e}", path.display()))?;
    Ok((df, present))
}

/// A string column, or a string field of a struct column.
fn strings(df: &DataFrame, path: &[&str], file: &Path) -> Result<StringChunked> {
    let ctx = || format!("{}: column `{}`", file.display(), path.join("."));
    let mut s = df
        .column(path[0])
        .with_context(ctx)?
        .as_materialized_series()
        .clone();
    for name in &path[1..] {
        s = s
            .struct_()
            .with_context(ctx)?
            .field_by_name(name)
            .with_context(ctx)?;
    }
    Ok(s.str().with_context(ctx)?.clone())
}

fn bad_row(file: &Path, row: usize, what: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{}: row {row} (0-based): {what}", file.display())
}

/// A required string cell.
fn cell<'a>(col: &'a StringChunked, row: usize, name: &str, file: &Path) -> Result<&'a str> {
    col.get(row)
        .ok_or_else(|| bad_row(file, row, format!("`{name}` is null")))
}

/// A response cell: not null, not blank.
fn response_cell(col: &StringChunked, row: usize, name: &str, file: &Path) -> Result<String> {
    let t = cell(col, row, name, file)?;
    if t.trim().is_empty() {
        return Err(bad_row(file, row, format!("`{name}` is empty")));
    }
    Ok(response_text(t))
}

/// Read the SFT records of one parquet file. `repo_path` is the file's path inside the dataset
/// repo (recorded in each record); `limit` stops early.
pub fn read_sft_file(
    path: &Path,
    repo_path: &str,
    format: &SftFormat,
    limit: Option<usize>,
) -> Result<Vec<SftRecord>> {
    let id_col: &[&str] = &["id"];
    let mut out = Vec::new();
    match format {
        SftFormat::Fields => {
            let cols: [&[&str]; 4] = [&["subreddit"], &["title"], &["post"], &["summary"]];
            let required: Vec<(&[&str], Kind)> = cols.iter().map(|c| (*c, Kind::Str)).collect();
            let (df, present) = read_checked(path, &required, &[(id_col, Kind::Str)])?;
            let [sub, title, post, summary] = cols.map(|c| strings(&df, c, path));
            let (sub, title, post, summary) = (sub?, title?, post?, summary?);
            let ids = if present[0] {
                Some(strings(&df, id_col, path)?)
            } else {
                None
            };
            for row in 0..df.height() {
                if limit.is_some_and(|n| out.len() >= n) {
                    break;
                }
                let prompt = tldr_prompt(
                    cell(&sub, row, "subreddit", path)?,
                    cell(&title, row, "title", path)?,
                    cell(&post, row, "post", path)?,
                );
                out.push(SftRecord {
                    prompt,
                    response: response_cell(&summary, row, "summary", path)?,
                    id: ids.as_ref().and_then(|c| c.get(row)).map(String::from),
                    source: RowRef {
                        file: repo_path.to_string(),
                        row,
                    },
                });
            }
        }
        SftFormat::PromptResponse { prompt, response } => {
            let (pc, rc): (&[&str], &[&str]) = (&[prompt.as_str()], &[response.as_str()]);
            let (df, present) = read_checked(
                path,
                &[(pc, Kind::Str), (rc, Kind::Str)],
                &[(id_col, Kind::Str)],
            )?;
            let (p, r) = (strings(&df, pc, path)?, strings(&df, rc, path)?);
            let ids = if present[0] {
                Some(strings(&df, id_col, path)?)
            } else {
                None
            };
            for row in 0..df.height() {
                if limit.is_some_and(|n| out.len() >= n) {
                    break;
                }
                let prompt_text = cell(&p, row, prompt, path)?;
                if prompt_text.trim().is_empty() {
                    return Err(bad_row(path, row, format!("`{prompt}` is empty")));
                }
                out.push(SftRecord {
                    prompt: prompt_text.to_string(),
                    response: response_cell(&r, row, response, path)?,
                    id: ids.as_ref().and_then(|c| c.get(row)).map(String::from),
                    source: RowRef {
                        file: repo_path.to_string(),
                        row,
                    },
                });
            }
        }
    }
    Ok(out)
}

/// Read the preference records of one "comparisons" parquet file; returns the records and the
/// number of rows dropped for having no post (CNN/Daily Mail items).
pub fn read_pref_file(
    path: &Path,
    repo_path: &str,
    limit: Option<usize>,
) -> Result<(Vec<PrefRecord>, usize)> {
    let (post_c, title_c, sub_c): (&[&str], &[&str], &[&str]) = (
        &["info", "post"],
        &["info", "title"],
        &["info", "subreddit"],
    );
    let (text_c, choice_c): (&[&str], &[&str]) = (&["summaries", "text"], &["choice"]);
    let (id_c, article_c): (&[&str], &[&str]) = (&["info", "id"], &["info", "article"]);
    let (df, present) = read_checked(
        path,
        &[
            (&["info"], Kind::Struct),
            (post_c, Kind::Str),
            (title_c, Kind::Str),
            (sub_c, Kind::Str),
            (&["summaries"], Kind::ListOfStruct),
            (text_c, Kind::Str),
            (choice_c, Kind::Int),
        ],
        &[(id_c, Kind::Str), (article_c, Kind::Str)],
    )?;
    let post = strings(&df, post_c, path)?;
    let title = strings(&df, title_c, path)?;
    let sub = strings(&df, sub_c, path)?;
    let ids = if present[0] {
        Some(strings(&df, id_c, path)?)
    } else {
        None
    };
    let articles = if present[1] {
        Some(strings(&df, article_c, path)?)
    } else {
        None
    };
    let ctx = |c: &str| format!("{}: column `{c}`", path.display());
    let choice = df
        .column("choice")
        .with_context(|| ctx("choice"))?
        .as_materialized_series()
        .cast(&DataType::Int64)
        .with_context(|| ctx("choice"))?;
    let choice = choice.i64().with_context(|| ctx("choice"))?;
    let summaries = df
        .column("summaries")
        .with_context(|| ctx("summaries"))?
        .as_materialized_series()
        .list()
        .with_context(|| ctx("summaries"))?
        .clone();

    let mut out = Vec::new();
    let mut skipped = 0;
    for row in 0..df.height() {
        if limit.is_some_and(|n| out.len() >= n) {
            break;
        }
        let Some(post_text) = post.get(row) else {
            let has_article = articles.as_ref().and_then(|a| a.get(row)).is_some();
            if has_article {
                skipped += 1;
                continue;
            }
            return Err(bad_row(
                path,
                row,
                "`info.post` is null and there is no `info.article` (not a CNN/DM item)",
            ));
        };
        let prompt = tldr_prompt(
            cell(&sub, row, "info.subreddit", path)?,
            cell(&title, row, "info.title", path)?,
            post_text,
        );
        let c = match choice.get(row) {
            Some(c @ (0 | 1)) => c as usize,
            Some(c) => return Err(bad_row(path, row, format!("`choice` is {c}, not 0 or 1"))),
            None => return Err(bad_row(path, row, "`choice` is null")),
        };
        let pair = summaries
            .get_as_series(row)
            .ok_or_else(|| bad_row(path, row, "`summaries` is null"))?;
        if pair.len() != 2 {
            return Err(bad_row(
                path,
                row,
                format!("`summaries` has {} entries, expected 2", pair.len()),
            ));
        }
        let texts = pair
            .struct_()
            .and_then(|s| s.field_by_name("text"))
            .with_context(|| ctx("summaries.text"))?;
        let texts = texts.str().with_context(|| ctx("summaries.text"))?;
        let text = |k: usize| -> Result<String> {
            match texts.get(k) {
                Some(t) if !t.trim().is_empty() => Ok(response_text(t)),
                t => Err(bad_row(
                    path,
                    row,
                    format!(
                        "`summaries[{k}].text` is {} (a summary text is missing)",
                        if t.is_none() { "null" } else { "empty" }
                    ),
                )),
            }
        };
        let (chosen, rejected) = (text(c)?, text(1 - c)?);
        out.push(PrefRecord {
            prompt,
            chosen,
            rejected,
            id: ids.as_ref().and_then(|c| c.get(row)).map(String::from),
            source: RowRef {
                file: repo_path.to_string(),
                row,
            },
        });
    }
    Ok((out, skipped))
}

// ---------------------------------------------------------------------------------------------
// Whole splits through the hub cache.

/// The train or the eval member of a pair of settings (split name, record limit).
fn by_split<T>(split: Split, train: T, eval: T) -> T {
    match split {
        Split::Train => train,
        Split::Eval => eval,
    }
}

/// The parquet shards of `config/split` of a dataset repo, fetched (cache first).
fn shards(
    hub: &HubAccess,
    repo_id: &str,
    revision: &str,
    config: &str,
    split: &str,
) -> Result<Vec<(String, PathBuf)>> {
    let repo = hf_hub::Repo::with_revision(
        repo_id.to_string(),
        hf_hub::RepoType::Dataset,
        revision.to_string(),
    );
    let names = hub.list_files(&repo, &format!("{config}/{split}"), ".parquet")?;
    names
        .into_iter()
        .map(|n| {
            let p = hub.file(&repo, &n)?;
            Ok((n, p))
        })
        .collect()
}

/// Read the shards of one split in order, up to `limit` records; `read(local, repo_path,
/// left)` returns a shard's records and how many rows it skipped.
#[allow(clippy::too_many_arguments)]
fn load_split<T>(
    hub: &HubAccess,
    repo: &str,
    revision: &str,
    config: &str,
    name: &str,
    limit: Option<usize>,
    mut read: impl FnMut(&Path, &str, Option<usize>) -> Result<(Vec<T>, usize)>,
) -> Result<Loaded<T>> {
    let mut out = Loaded {
        records: Vec::new(),
        files: Vec::new(),
        skipped: 0,
    };
    for (repo_path, local) in shards(hub, repo, revision, config, name)? {
        let left = limit.map(|n| n - out.records.len());
        if left == Some(0) {
            break;
        }
        let (recs, skipped) = read(&local, &repo_path, left)?;
        out.records.extend(recs);
        out.skipped += skipped;
        out.files.push(local);
    }
    Ok(out)
}

/// The SFT records of a split (text form).
pub fn load_sft_records(
    cfg: &TldrConfig,
    split: Split,
    hub: &HubAccess,
) -> Result<Loaded<SftRecord>> {
    let s = &cfg.sft;
    let (name, limit) = by_split(
        split,
        (s.train_split.as_str(), s.max_train),
        (s.eval_split.as_str(), s.max_eval),
    );
    load_split(
        hub,
        &s.repo,
        &s.revision,
        &s.config,
        name,
        limit,
        |local, repo_path, left| Ok((read_sft_file(local, repo_path, &s.format, left)?, 0)),
    )
}

/// The preference records of a split (text form).
pub fn load_pref_records(
    cfg: &TldrConfig,
    split: Split,
    hub: &HubAccess,
) -> Result<Loaded<PrefRecord>> {
    let s = &cfg.prefs;
    let (name, limit) = by_split(
        split,
        (s.train_split.as_str(), s.max_train),
        (s.eval_split.as_str(), s.max_eval),
    );
    load_split(
        hub,
        &s.repo,
        &s.revision,
        &s.config,
        name,
        limit,
        read_pref_file,
    )
}

fn encode(tok: &Tok, text: &str, what: &str, src: &RowRef) -> Result<Vec<u32>> {
    tok.encode(text)
        .with_context(|| format!("{} row {}: cannot tokenize the {what}", src.file, src.row))
}

/// Tokenize and truncate SFT records.
pub fn sft_examples(
    records: &[SftRecord],
    tok: &Tok,
    max_length: usize,
    max_prompt_length: usize,
) -> Result<Vec<SftExample>> {
    records
        .iter()
        .map(|r| {
            let (prompt, response) = truncate_pair(
                &encode(tok, &r.prompt, "prompt", &r.source)?,
                &encode(tok, &r.response, "response", &r.source)?,
                max_length,
                max_prompt_length,
            );
            Ok(SftExample { prompt, response })
        })
        .collect()
}

/// Tokenize and truncate preference records.
pub fn pref_examples(
    records: &[PrefRecord],
    tok: &Tok,
    max_length: usize,
    max_prompt_length: usize,
) -> Result<Vec<PrefExample>> {
    records
        .iter()
        .map(|r| {
            let ex = PrefExample {
                prompt: encode(tok, &r.prompt, "prompt", &r.source)?,
                chosen: encode(tok, &r.chosen, "chosen response", &r.source)?,
                rejected: encode(tok, &r.rejected, "rejected response", &r.source)?,
            };
            Ok(truncate_pref(&ex, max_length, max_prompt_length))
        })
        .collect()
}

/// The SFT examples of a split, tokenized and truncated.
pub fn load_sft(
    cfg: &TldrConfig,
    split: Split,
    hub: &HubAccess,
    tok: &Tok,
) -> Result<Vec<SftExample>> {
    let recs = load_sft_records(cfg, split, hub)?;
    sft_examples(&recs.records, tok, cfg.max_length, cfg.max_prompt_length)
}

/// The preference pairs of a split, tokenized and truncated.
pub fn load_prefs(
    cfg: &TldrConfig,
    split: Split,
    hub: &HubAccess,
    tok: &Tok,
) -> Result<Vec<PrefExample>> {
    let recs = load_pref_records(cfg, split, hub)?;
    pref_examples(&recs.records, tok, cfg.max_length, cfg.max_prompt_length)
}

/// Write records as JSON lines (atomically), e.g. for inspection or as the `data.train` file of
/// an `overopt sft` / `overopt daa` run (the extra `id` / `source` keys are ignored there).
pub fn write_jsonl<T: Serialize>(path: &Path, records: &[T]) -> Result<()> {
    let text = crate::util::to_jsonl(records)?;
    crate::util::write_atomic(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// What one exported file holds.
#[derive(Debug, Serialize)]
struct FileSummary {
    file: String,
    records: usize,
    /// Rows dropped on purpose (preference rows without a post).
    skipped: usize,
    /// Parquet files read, as paths inside the dataset repository.
    read: Vec<String>,
}

fn write_split<T: Serialize>(out: &Path, name: &str, loaded: &Loaded<T>) -> Result<FileSummary> {
    let path = out.join(name);
    write_jsonl(&path, &loaded.records)?;
    let read = loaded
        .files
        .iter()
        .map(|p| {
            // `.../snapshots/<commit>/<config>/<split>/NNNN.parquet` -> `<config>/<split>/NNNN...`
            let parts: Vec<_> = p.iter().map(|c| c.to_string_lossy().into_owned()).collect();
            match parts.iter().position(|c| c == "snapshots") {
                Some(i) if i + 2 < parts.len() => parts[i + 2..].join("/"),
                _ => p.display().to_string(),
            }
        })
        .collect();
    Ok(FileSummary {
        file: name.to_string(),
        records: loaded.records.len(),
        skipped: loaded.skipped,
        read,
    })
}

/// Export the four sets of `cfg` into `out` through `hub` as the JSON-lines files the run
/// configurations read (`sft-train.jsonl`, `sft-eval.jsonl`, `prefs-train.jsonl`,
/// `prefs-eval.jsonl`), then `export.json` (the configuration, counts and parquet files read),
/// written last; returns that manifest.
pub fn export(cfg: &TldrConfig, hub: &HubAccess, out: &Path) -> Result<serde_json::Value> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut files = Vec::new();
    for (name, split) in [
        ("sft-train.jsonl", Split::Train),
        ("sft-eval.jsonl", Split::Eval),
    ] {
        let loaded = load_sft_records(cfg, split, hub)
            .with_context(|| format!("the SFT set ({})", cfg.sft.repo))?;
        files.push(write_split(out, name, &loaded)?);
    }
    for (name, split) in [
        ("prefs-train.jsonl", Split::Train),
        ("prefs-eval.jsonl", Split::Eval),
    ] {
        let loaded = load_pref_records(cfg, split, hub)
            .with_context(|| format!("the preference set ({})", cfg.prefs.repo))?;
        files.push(write_split(out, name, &loaded)?);
    }
    let manifest = serde_json::json!({
        "config": cfg,
        "files": files,
    });
    crate::util::write_atomic(
        &out.join("export.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_and_response_format() {
        assert_eq!(
            tldr_prompt("AskReddit", "A title", "The post."),
            "SUBREDDIT: r/AskReddit\n\nTITLE: A title\n\nPOST: The post.\n\nTL;DR:"
        );
        assert_eq!(response_text("  short summary \n"), " short summary");
        assert_eq!(response_text(" already spaced"), " already spaced");
    }

    #[test]
    fn config_defaults_are_the_paper_setting_and_unknown_keys_fail() {
        let c = TldrConfig::from_toml("", "t.toml").unwrap();
        assert_eq!(c, TldrConfig::default());
        assert_eq!(c.prefs.repo, "openai/summarize_from_feedback");
        assert_eq!(c.prefs.config, "comparisons");
        assert_eq!(c.prefs.eval_split, "validation");
        assert_eq!(c.sft.revision, PARQUET_REVISION);
        assert_eq!((c.max_length, c.max_prompt_length), (512, 256));
        let c = TldrConfig::from_toml(
            "[sft]\nrepo = \"trl-lib/tldr\"\nformat = { kind = \"prompt_response\", prompt = \"prompt\", response = \"completion\" }\nmax_train = 10\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.sft.max_train, Some(10));
        assert!(matches!(c.sft.format, SftFormat::PromptResponse { .. }));
        let e = format!(
            "{:#}",
            TldrConfig::from_toml("[prefs]\nmax_examples = 3\n", "t.toml").unwrap_err()
        );
        assert!(e.contains("t.toml") && e.contains("max_examples"), "{e}");
        let e = format!(
            "{:#}",
            TldrConfig::from_toml("max_length = 200\nmax_prompt_length = 256\n", "t.toml")
                .unwrap_err()
        );
        assert!(e.contains("max_prompt_length"), "{e}");
    }
}
