//! The results table as parquet (through polars) and CSV, written atomically.

use crate::analysis::table::{ResultRow, SampleRow};
use anyhow::{Context as _, Result};
use polars::prelude::{Column, DataFrame, ParquetReader, ParquetWriter, SerReader};
use std::path::Path;

/// Build the results DataFrame (one row per objective / beta / size / checkpoint / seed).
pub fn results_frame(rows: &[ResultRow]) -> Result<DataFrame> {
    let f = |g: fn(&ResultRow) -> f64| rows.iter().map(g).collect::<Vec<f64>>();
    let df = DataFrame::new(
        rows.len(),
        vec![
            Column::new(
                "objective".into(),
                rows.iter().map(|r| r.objective.clone()).collect::<Vec<_>>(),
            ),
            Column::new("beta".into(), f(|r| r.beta)),
            Column::new(
                "size".into(),
                rows.iter().map(|r| r.size.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                "n_params".into(),
                rows.iter().map(|r| r.n_params).collect::<Vec<u64>>(),
            ),
            Column::new("checkpoint".into(), f(|r| r.checkpoint)),
            Column::new(
                "seed".into(),
                rows.iter().map(|r| r.seed).collect::<Vec<u64>>(),
            ),
            Column::new("kl".into(), f(|r| r.kl)),
            Column::new("kl_se".into(), f(|r| r.kl_se)),
            Column::new("win_rate".into(), f(|r| r.win_rate)),
            Column::new("win_rate_lo".into(), f(|r| r.win_rate_lo)),
            Column::new("win_rate_hi".into(), f(|r| r.win_rate_hi)),
            Column::new("mean_length".into(), f(|r| r.mean_length)),
            Column::new("heldout_loss".into(), f(|r| r.heldout_loss)),
            Column::new("implicit_accuracy".into(), f(|r| r.implicit_accuracy)),
            Column::new("chosen_reward".into(), f(|r| r.chosen_reward)),
            Column::new(
                "config_hash".into(),
                rows.iter()
                    .map(|r| r.config_hash.clone())
                    .collect::<Vec<_>>(),
            ),
        ],
    )?;
    Ok(df)
}

fn write_parquet_atomic(df: &mut DataFrame, path: &Path) -> Result<()> {
    let mut buf = Vec::new();
    ParquetWriter::new(&mut buf).finish(df)?;
    crate::util::write_atomic(path, &buf)
}

/// Write a DataFrame as CSV (header, comma separated, RFC 4180 quoting), atomically.
fn write_csv_atomic(df: &mut DataFrame, path: &Path) -> Result<()> {
    let quote = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let cols = df.columns();
    let mut out = cols
        .iter()
        .map(|c| quote(c.name()))
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    for i in 0..df.height() {
        let line: Vec<String> = cols
            .iter()
            .map(|c| match c.get(i) {
                Ok(v) if v.is_null() => String::new(),
                Ok(v) => match v.get_str() {
                    Some(s) => quote(s),
                    None => v.to_string(),
                },
                Err(_) => String::new(),
            })
            .collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    crate::util::write_atomic(path, out.as_bytes())
}

/// Write OUT/results.parquet + results.csv and OUT/samples.parquet.
pub fn write_tables(out: &Path, rows: &[ResultRow], samples: &[SampleRow]) -> Result<()> {
    let mut df = results_frame(rows)?;
    write_parquet_atomic(&mut df, &out.join("results.parquet")).context("results.parquet")?;
    write_csv_atomic(&mut df, &out.join("results.csv")).context("results.csv")?;
    let mut s = DataFrame::new(
        samples.len(),
        vec![
            Column::new(
                "objective".into(),
                samples
                    .iter()
                    .map(|r| r.objective.clone())
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "beta".into(),
                samples.iter().map(|r| r.beta).collect::<Vec<f64>>(),
            ),
            Column::new(
                "size".into(),
                samples.iter().map(|r| r.size.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                "checkpoint".into(),
                samples.iter().map(|r| r.checkpoint).collect::<Vec<f64>>(),
            ),
            Column::new(
                "seed".into(),
                samples.iter().map(|r| r.seed).collect::<Vec<u64>>(),
            ),
            Column::new(
                "log_ratio".into(),
                samples.iter().map(|r| r.log_ratio).collect::<Vec<f64>>(),
            ),
            Column::new(
                "length".into(),
                samples
                    .iter()
                    .map(|r| r.length as u64)
                    .collect::<Vec<u64>>(),
            ),
        ],
    )?;
    write_parquet_atomic(&mut s, &out.join("samples.parquet")).context("samples.parquet")?;
    Ok(())
}

/// Read a results table written by [`write_tables`]; a missing column is named with the file.
pub fn read_results_parquet(path: &Path) -> Result<Vec<ResultRow>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let df = ParquetReader::new(f)
        .finish()
        .with_context(|| format!("{}: not a parquet file", path.display()))?;
    let col = |name: &str| -> Result<Column> {
        df.column(name)
            .cloned()
            .with_context(|| format!("{}: missing column `{name}`", path.display()))
    };
    let fcol = |name: &str| -> Result<Vec<f64>> {
        col(name)?
            .f64()
            .map_err(|_| anyhow::anyhow!("{}: column `{name}` is not f64", path.display()))
            .map(|ca| {
                (0..ca.len())
                    .map(|i| ca.get(i).unwrap_or(f64::NAN))
                    .collect()
            })
    };
    let scol = |name: &str| -> Result<Vec<String>> {
        col(name)?
            .str()
            .map_err(|_| anyhow::anyhow!("{}: column `{name}` is not a string", path.display()))
            .map(|ca| {
                (0..ca.len())
                    .map(|i| ca.get(i).unwrap_or_default().to_string())
                    .collect()
            })
    };
    let ucol = |name: &str| -> Result<Vec<u64>> {
        col(name)?
            .u64()
            .map_err(|_| anyhow::anyhow!("{}: column `{name}` is not u64", path.display()))
            .map(|ca| (0..ca.len()).map(|i| ca.get(i).unwrap_or(0)).collect())
    };
    let (obj, size, hash) = (scol("objective")?, scol("size")?, scol("config_hash")?);
    let (beta, ck, kl, kl_se) = (
        fcol("beta")?,
        fcol("checkpoint")?,
        fcol("kl")?,
        fcol("kl_se")?,
    );
    let (w, lo, hi, len) = (
        fcol("win_rate")?,
        fcol("win_rate_lo")?,
        fcol("win_rate_hi")?,
        fcol("mean_length")?,
    );
    let (hl, acc, cr) = (
        fcol("heldout_loss")?,
        fcol("implicit_accuracy")?,
        fcol("chosen_reward")?,
    );
    let (np, seed) = (ucol("n_params")?, ucol("seed")?);
    Ok((0..df.height())
        .map(|i| ResultRow {
            objective: obj[i].clone(),
            beta: beta[i],
            size: size[i].clone(),
            n_params: np[i],
            checkpoint: ck[i],
            seed: seed[i],
            kl: kl[i],
            kl_se: kl_se[i],
            win_rate: w[i],
            win_rate_lo: lo[i],
            win_rate_hi: hi[i],
            mean_length: len[i],
            heldout_loss: hl[i],
            implicit_accuracy: acc[i],
            chosen_reward: cr[i],
            config_hash: hash[i].clone(),
            length_corrected_win_rate: None,
        })
        .collect())
}
