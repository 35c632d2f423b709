//! Training runs from their TOML configuration ([`RunConfig`]): what `overopt sft` /
//! `overopt daa` and the paper-scale sweep run.
//!
//! The data file is read and every record checked before any training: a bad record stops
//! the run at once, named by `file: line N` (the file's physical line, blank lines counted)
//! and its key; too few records for one batch stop it before a model is loaded.

use super::config::{DataSpec, ModelSpec, RunConfig};
use super::{SpecialTokens, TrainOutcome, train_daa, train_sft};
use crate::data::tokenizer::Tok;
use crate::data::validate::{Limits, check_pref, check_sft};
use crate::data::{PrefExample, SftExample, truncate_pair, truncate_pref};
use crate::model::load;
use crate::model::score::limits;
use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use std::path::Path;

/// Load a run's model (its dtype, device, autocast and checkpointing) and tokenizer.
pub fn load_model(spec: &ModelSpec) -> Result<(load::LoadedModel, Tok)> {
    let (mut lm, tok) = load::load_with_tokenizer(
        &spec.source,
        spec.revision.as_deref(),
        spec.tokenizer.as_deref(),
        &spec.dtype,
        &spec.device,
        "set model.tokenizer",
    )?;
    if let Some(cd) = spec.autocast.dtype() {
        lm.model = lm.model.with_compute_dtype(cd);
    }
    lm.model = lm.model.with_checkpointing(spec.checkpoint_layers);
    Ok((lm, tok))
}

/// A record of an SFT data file.
#[derive(Deserialize)]
pub struct SftLine {
    pub prompt: String,
    pub response: String,
}

/// A record of a preference data file.
#[derive(Deserialize)]
pub struct PrefLine {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// Checks of the configuration and the number of records that need no model: before any
/// model is loaded.
fn check_before_loading(cfg: &RunConfig, config: &Path, n_records: usize) -> Result<()> {
    let d = &cfg.data;
    if d.max_prompt_length == 0 || d.max_prompt_length + 2 > d.max_length {
        bail!(
            "{}: `data.max_prompt_length` ({}) must be at least 1 and leave room for a response token and EOS within `data.max_length` ({})",
            config.display(),
            d.max_prompt_length,
            d.max_length
        );
    }
    let batch = cfg.train.batch_size;
    if n_records / batch == 0 {
        bail!(
            "{}: {n_records} records (non-blank lines) make no full batch of {batch} (`train.batch_size` in {})",
            d.train.display(),
            config.display()
        );
    }
    Ok(())
}

/// Token ids of a field of a record, which must have some.
pub fn encode_field(tok: &Tok, key: &str, text: &str) -> Result<Vec<u32>> {
    let ids = tok.encode(text).with_context(|| format!("`{key}`"))?;
    if ids.is_empty() {
        if text.trim().is_empty() {
            bail!("`{key}` is empty");
        }
        bail!("`{key}` {text:?} has no tokens");
    }
    Ok(ids)
}

/// The training example of an SFT record: tokenized, truncated and checked against the
/// model.
pub fn sft_example(l: &SftLine, tok: &Tok, data: &DataSpec, lim: &Limits) -> Result<SftExample> {
    let prompt = encode_field(tok, "prompt", &l.prompt)?;
    let response = encode_field(tok, "response", &l.response)?;
    let (prompt, response) =
        truncate_pair(&prompt, &response, data.max_length, data.max_prompt_length);
    let ex = SftExample { prompt, response };
    check_sft(&ex, lim)?;
    Ok(ex)
}

/// The training example of a preference record, as [`sft_example`].
pub fn pref_example(l: &PrefLine, tok: &Tok, data: &DataSpec, lim: &Limits) -> Result<PrefExample> {
    let ex = PrefExample {
        prompt: encode_field(tok, "prompt", &l.prompt)?,
        chosen: encode_field(tok, "chosen", &l.chosen)?,
        rejected: encode_field(tok, "rejected", &l.rejected)?,
    };
    let ex = truncate_pref(&ex, data.max_length, data.max_prompt_length);
    check_pref(&ex, lim)?;
    Ok(ex)
}

/// Every record made an example, the first bad one named by `file: line N`.
pub fn examples<L, E>(
    path: &Path,
    records: &[(usize, L)],
    make: impl Fn(&L) -> Result<E>,
) -> Result<Vec<E>> {
    records
        .iter()
        .map(|(line, l)| make(l).with_context(|| format!("{}: line {line}", path.display())))
        .collect()
}

/// Train an SFT run; `config` names the configuration in messages. The tokenizer is saved
/// next to the run and into every checkpoint.
pub fn sft(cfg: &RunConfig, config: &Path) -> Result<TrainOutcome> {
    let lines: Vec<(usize, SftLine)> = crate::util::read_jsonl_numbered(&cfg.data.train)?;
    check_before_loading(cfg, config, lines.len())?;
    let (lm, tok) = load_model(&cfg.model)?;
    let lim = limits(&lm.model);
    lim.check_special(tok.eos_id, tok.pad_id)
        .with_context(|| format!("{}: the tokenizer's special tokens", config.display()))?;
    let data = examples(&cfg.data.train, &lines, |l| {
        sft_example(l, &tok, &cfg.data, &lim)
    })?;
    let tokens = SpecialTokens {
        eos: tok.eos_id,
        pad: tok.pad_id,
    };
    let out = train_sft(
        &lm,
        &data,
        tokens,
        &cfg.train,
        &cfg.optim,
        &cfg.out_dir,
        &serde_json::to_value(cfg)?,
    )?;
    tok.save(&cfg.out_dir.join("tokenizer.json"))?;
    for (_, dir) in &out.checkpoints {
        tok.save(&dir.join("tokenizer.json"))?;
    }
    Ok(out)
}

/// Train a DAA run (its `[daa]` table is required), as [`sft`].
pub fn daa(cfg: &RunConfig, config: &Path) -> Result<TrainOutcome> {
    let daa = cfg.daa.clone().ok_or_else(|| {
        anyhow!(
            "{}: a [daa] table (objective, beta) is required",
            config.display()
        )
    })?;
    let lines: Vec<(usize, PrefLine)> = crate::util::read_jsonl_numbered(&cfg.data.train)?;
    check_before_loading(cfg, config, lines.len())?;
    let (policy, tok) = load_model(&cfg.model)?;
    let reference = match &cfg.reference {
        Some(spec) => load_model(spec)?.0,
        None => load::deep_copy(&policy)?,
    };
    let lim = limits(&policy.model).min(limits(&reference.model));
    lim.check_special(tok.eos_id, tok.pad_id)
        .with_context(|| format!("{}: the tokenizer's special tokens", config.display()))?;
    let data = examples(&cfg.data.train, &lines, |l| {
        pref_example(l, &tok, &cfg.data, &lim)
    })?;
    let tokens = SpecialTokens {
        eos: tok.eos_id,
        pad: tok.pad_id,
    };
    let out = train_daa(
        &policy,
        &reference.model,
        &data,
        tokens,
        &daa,
        &cfg.train,
        &cfg.optim,
        &cfg.out_dir,
        &serde_json::to_value(cfg)?,
    )?;
    for (_, dir) in &out.checkpoints {
        tok.save(&dir.join("tokenizer.json"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tok {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gpt_neox/parallel/tokenizer.json");
        Tok::from_file(&p, Some(0)).unwrap()
    }

    fn data_spec(train: &Path) -> DataSpec {
        DataSpec {
            train: train.to_path_buf(),
            max_length: 512,
            max_prompt_length: 256,
        }
    }

    const LIM: Limits = Limits {
        vocab: 50,
        max_positions: 64,
    };

    /// Physical lines: blank lines are counted, as an editor counts them.
    #[test]
    fn records_are_named_by_their_physical_line() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("sft.jsonl");
        let rec = |p: &str, r: &str| format!("{{\"prompt\": \"{p}\", \"response\": \"{r}\"}}\n");
        let mut text = String::new();
        for i in 1..=35 {
            text.push_str(&match i {
                // Blank lines (one only spaces) before the bad record.
                3 | 7 => "\n".to_string(),
                11 => "   \n".to_string(),
                30 => rec("", "w5"),
                _ => rec("w3 w4", "w5"),
            });
        }
        std::fs::write(&f, &text).unwrap();
        let lines: Vec<(usize, SftLine)> = crate::util::read_jsonl_numbered(&f).unwrap();
        assert_eq!(lines.len(), 32);
        assert_eq!((lines[0].0, lines[2].0, lines[31].0), (1, 4, 35));
        let (tok, spec) = (tok(), data_spec(&f));
        let e = examples(&f, &lines, |l| sft_example(l, &tok, &spec, &LIM)).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!("{}: line 30: `prompt` is empty", f.display())
        );
        // A response of blanks, and a token beyond the model's vocabulary, each on its line.
        let mut bad = text.replace(&rec("", "w5"), &rec("w3", "w5"));
        bad = bad.replacen(&rec("w3 w4", "w5"), &rec("w3 w4", " "), 1);
        std::fs::write(&f, &bad).unwrap();
        let lines: Vec<(usize, SftLine)> = crate::util::read_jsonl_numbered(&f).unwrap();
        let e = examples(&f, &lines, |l| sft_example(l, &tok, &spec, &LIM)).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!("{}: line 1: `response` is empty", f.display())
        );
        // A token beyond the model's vocabulary on line 12, after two blank lines (record 10).
        let mut text = String::new();
        for i in 1..=12 {
            text.push_str(&match i {
                2 | 5 => "\n".to_string(),
                12 => rec("w3 w4", "w5 w60"),
                _ => rec("w3 w4", "w5"),
            });
        }
        std::fs::write(&f, &text).unwrap();
        let lines: Vec<(usize, SftLine)> = crate::util::read_jsonl_numbered(&f).unwrap();
        let e = examples(&f, &lines, |l| sft_example(l, &tok, &spec, &LIM)).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.starts_with(&format!(
                "{}: line 12: `response`: token 60 at position 1",
                f.display()
            )) && e.contains("vocabulary of 50"),
            "{e}"
        );
    }

    #[test]
    fn preference_records_name_the_line_and_the_key() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("pref.jsonl");
        let rec = |p: &str, c: &str, r: &str| {
            format!("{{\"prompt\": \"{p}\", \"chosen\": \"{c}\", \"rejected\": \"{r}\"}}\n")
        };
        let text = [
            rec("w3", "w4", "w5"),
            "\n".into(),
            "\n".into(),
            rec("w3", "w4", ""),
        ]
        .concat();
        std::fs::write(&f, &text).unwrap();
        let lines: Vec<(usize, PrefLine)> = crate::util::read_jsonl_numbered(&f).unwrap();
        let (tok, spec) = (tok(), data_spec(&f));
        let e = examples(&f, &lines, |l| pref_example(l, &tok, &spec, &LIM)).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!("{}: line 4: `rejected` is empty", f.display())
        );
        std::fs::write(
            &f,
            text.replace(&rec("w3", "w4", ""), &rec("w3", "w4 w51", "w5")),
        )
        .unwrap();
        let lines: Vec<(usize, PrefLine)> = crate::util::read_jsonl_numbered(&f).unwrap();
        let e = examples(&f, &lines, |l| pref_example(l, &tok, &spec, &LIM)).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.starts_with(&format!(
                "{}: line 4: `chosen`: token 51 at position 1",
                f.display()
            )),
            "{e}"
        );
        // Too long for the model's positions after truncation.
        let short = Limits {
            vocab: 300,
            max_positions: 3,
        };
        std::fs::write(&f, rec("w3 w4", "w5", "w6")).unwrap();
        let lines: Vec<(usize, PrefLine)> = crate::util::read_jsonl_numbered(&f).unwrap();
        let e = examples(&f, &lines, |l| pref_example(l, &tok, &spec, &short)).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.starts_with(&format!(
                "{}: line 1: `prompt` + `chosen` + EOS is 4 tokens",
                f.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn too_few_records_and_bad_lengths_are_refused_before_loading_a_model() {
        let cfg = |train: &str, extra: &str| {
            RunConfig::from_toml(
                &format!(
                    "out_dir = \"o\"\n[model]\nsource = \"m\"\n[data]\ntrain = \"{train}\"\n{extra}[train]\nbatch_size = 8\nmicro_batch_size = 4\n"
                ),
                "run.toml",
            )
            .unwrap()
        };
        let c = cfg("data/empty.jsonl", "");
        let e = format!(
            "{:#}",
            check_before_loading(&c, Path::new("run.toml"), 0).unwrap_err()
        );
        assert_eq!(
            e,
            "data/empty.jsonl: 0 records (non-blank lines) make no full batch of 8 (`train.batch_size` in run.toml)"
        );
        assert!(check_before_loading(&c, Path::new("run.toml"), 7).is_err());
        check_before_loading(&c, Path::new("run.toml"), 8).unwrap();
        for extra in ["max_length = 257\n", "max_prompt_length = 0\n"] {
            let c = cfg("d.jsonl", extra);
            let e = format!(
                "{:#}",
                check_before_loading(&c, Path::new("run.toml"), 8).unwrap_err()
            );
            assert!(
                e.starts_with("run.toml: `data.max_prompt_length`")
                    && e.contains("data.max_length"),
                "{extra}: {e}"
            );
        }
        check_before_loading(
            &cfg("d.jsonl", "max_length = 258\n"),
            Path::new("run.toml"),
            8,
        )
        .unwrap();
    }
}
