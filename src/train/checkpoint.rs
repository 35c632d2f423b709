//! Checkpoints: the model in the HF layout (model.safetensors + config.json, loadable by HF
//! transformers), the optimizer state, and JSON metadata, written atomically as a directory
//! (written under a temporary name, then renamed), so a killed run never leaves a half
//! checkpoint that looks complete.

use crate::model::GptNeoX;
use crate::model::load::save_hf;
use crate::train::optim::RmsProp;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Metadata written beside each checkpoint as `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    /// Fraction of the epoch completed (step / total_steps).
    pub fraction: f64,
    pub examples_seen: usize,
    pub seed: u64,
    /// Metrics of the last step before the checkpoint.
    pub metrics: serde_json::Value,
    /// The run's full configuration.
    pub config: serde_json::Value,
}

/// Directory name of the checkpoint at `step`: `step-000123`.
pub fn checkpoint_dir(out_dir: &Path, step: usize) -> PathBuf {
    out_dir.join(format!("step-{step:06}"))
}

/// Prefix of the temporary folder a checkpoint is written in before it is renamed to
/// `step-N`: `.tmp-step-000123.PID.N`, unique to the process and the call, so that several
/// processes saving into one folder (a requeued Slurm task beside the first; sweep tasks that
/// train a shared SFT model) never write into or delete each other's.
const TMP_PREFIX: &str = ".tmp-step-";

/// A temporary checkpoint folder untouched for this long is taken for the leftover of a killed
/// process and removed by the next save into the same folder. (A live writer touches its folder
/// or its files at least every few minutes, even when writing many GiB to NFS.)
const STALE_TMP_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// The files of a checkpoint folder besides `meta.json`, which is written last and lists them
/// (with their sizes) under `"files"`.
const FILES: [&str; 3] = ["model.safetensors", "config.json", "optimizer.safetensors"];

/// Write a checkpoint atomically and durably: into a temporary folder of its own (every file
/// fsynced, then the folder), renamed to `step-N` (then the parent folder fsynced). If a
/// complete `step-N` already exists (another process saved the same step of the same
/// deterministic run), it is kept and this copy dropped; an incomplete one (left by an older
/// version) is replaced.
pub fn save(
    out_dir: &Path,
    model: &GptNeoX,
    opt: &RmsProp,
    meta: &CheckpointMeta,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    remove_stale_temps(out_dir);
    let final_dir = checkpoint_dir(out_dir, meta.step);
    let tmp = out_dir.join(format!(
        "{TMP_PREFIX}{:06}.{}",
        meta.step,
        crate::util::unique_suffix()
    ));
    let r = write_contents(&tmp, model, opt, meta).and_then(|()| place(&tmp, &final_dir));
    if tmp.exists() {
        // Ours alone (a unique name): the copy not needed, or the remains of a failed write.
        std::fs::remove_dir_all(&tmp).ok();
    }
    r?;
    Ok(final_dir)
}

/// Write a checkpoint's files into `dir` (created), `meta.json` last, and fsync the folder.
fn write_contents(dir: &Path, model: &GptNeoX, opt: &RmsProp, meta: &CheckpointMeta) -> Result<()> {
    std::fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    save_hf(model, dir)?;
    let (state, step) = opt.state();
    let state: HashMap<String, Tensor> = state.into_iter().map(|(k, v)| (k, v.detach())).collect();
    crate::model::load::write_safetensors(&state, &dir.join("optimizer.safetensors"))
        .with_context(|| format!("cannot write optimizer state in {}", dir.display()))?;
    debug_assert_eq!(step, meta.step);
    let mut files = serde_json::Map::new();
    for f in FILES {
        let p = dir.join(f);
        let len = std::fs::metadata(&p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .len();
        files.insert(f.to_string(), len.into());
    }
    let mut value = serde_json::to_value(meta)?;
    value["files"] = files.into();
    crate::util::write_atomic(
        &dir.join("meta.json"),
        serde_json::to_string_pretty(&value)?.as_bytes(),
    )?;
    crate::util::sync_dir(dir)
}

/// Rename the written folder `tmp` to `final_dir`, unless a complete checkpoint is there.
fn place(tmp: &Path, final_dir: &Path) -> Result<()> {
    let parent = final_dir.parent().unwrap_or(Path::new("."));
    for _ in 0..3 {
        if is_complete(final_dir) {
            return Ok(());
        }
        let err = match std::fs::rename(tmp, final_dir) {
            Ok(()) => return crate::util::sync_dir(parent),
            Err(e) => e,
        };
        if !final_dir.exists() {
            return Err(err).with_context(|| {
                format!("cannot move {} to {}", tmp.display(), final_dir.display())
            });
        }
        if is_complete(final_dir) {
            return Ok(());
        }
        // An incomplete folder in the way: move it aside (a unique name, so that no other
        // process works on it), then try again; it is deleted once ours is in place. (Should
        // another process have completed `step-N` in between, what was moved aside is a
        // complete copy equal to ours, and no checkpoint is lost.)
        let aside = parent.join(format!(
            "{TMP_PREFIX}{}.incomplete.{}",
            final_dir.file_name().unwrap_or_default().to_string_lossy(),
            crate::util::unique_suffix()
        ));
        if std::fs::rename(final_dir, &aside).is_ok() {
            let r = std::fs::rename(tmp, final_dir);
            std::fs::remove_dir_all(&aside).ok();
            if r.is_ok() {
                return crate::util::sync_dir(parent);
            }
        }
    }
    bail!(
        "cannot move {} to {}: the folder there is incomplete and could not be replaced",
        tmp.display(),
        final_dir.display()
    )
}

/// Whether `dir` holds a complete checkpoint: `meta.json` readable and every file it lists
/// present with its recorded size (checkpoints written before `meta.json` listed its files:
/// every checkpoint file present).
pub fn is_complete(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("meta.json")) else {
        return false;
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    match value.get("files") {
        Some(serde_json::Value::Object(files)) => files.iter().all(|(name, len)| {
            let p = dir.join(name);
            std::fs::metadata(&p).is_ok_and(|m| m.is_file() && len.as_u64() == Some(m.len()))
        }),
        Some(_) => false,
        None => FILES.iter().all(|f| dir.join(f).is_file()),
    }
}

/// Remove temporary checkpoint folders of `out_dir` that nothing has touched for
/// [`STALE_TMP_AGE`] (left by killed processes). Best effort: errors are ignored (another
/// process may be removing the same folder).
fn remove_stale_temps(out_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(out_dir) else {
        return;
    };
    let now = std::time::SystemTime::now();
    for e in entries.flatten() {
        let p = e.path();
        let is_temp = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(TMP_PREFIX));
        if !is_temp || !p.is_dir() {
            continue;
        }
        // The newest modification of the folder or of a file in it.
        let mut newest = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
        if let Ok(inner) = std::fs::read_dir(&p) {
            for f in inner.flatten() {
                let t = f.metadata().and_then(|m| m.modified()).ok();
                newest = newest.max(t);
            }
        }
        let stale = newest
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > STALE_TMP_AGE);
        if stale {
            std::fs::remove_dir_all(&p).ok();
        }
    }
}

/// Complete checkpoints under `out_dir`, sorted by step. Temporary folders and `step-N`
/// folders that are not complete (see [`is_complete`]) are left out.
pub fn list(out_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = vec![];
    if !out_dir.is_dir() {
        return Ok(out);
    }
    for e in std::fs::read_dir(out_dir)? {
        let p = e?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(s) = name.strip_prefix("step-")
            && let Ok(step) = s.parse::<usize>()
            && is_complete(&p)
        {
            out.push((step, p));
        }
    }
    out.sort();
    Ok(out)
}

pub fn read_meta(dir: &Path) -> Result<CheckpointMeta> {
    let p = dir.join("meta.json");
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid checkpoint metadata", p.display()))
}

/// Restore weights (into `varmap`) and optimizer state from a checkpoint directory.
pub fn restore(
    dir: &Path,
    varmap: &candle_nn::VarMap,
    opt: &mut RmsProp,
    device: &Device,
) -> Result<CheckpointMeta> {
    if !is_complete(dir) {
        bail!(
            "{}: incomplete checkpoint (a file listed in meta.json is missing or truncated)",
            dir.display()
        );
    }
    let meta = read_meta(dir)?;
    let tensors = crate::model::load::read_safetensors(&[dir.join("model.safetensors")], device)?;
    crate::model::load::assign_weights(varmap, &tensors)?;
    let st = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)
        .with_context(|| format!("cannot read optimizer state in {}", dir.display()))?;
    opt.load_state(&st, meta.step)?;
    if opt.steps_taken() != meta.step {
        bail!("{}: optimizer step mismatch", dir.display());
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GptNeoXConfig, LoadedModel};
    use crate::train::optim::{RmsPropConfig, named_vars};
    use candle_core::DType;
    use candle_nn::Optimizer;

    fn tiny(seed: u64) -> (LoadedModel, RmsProp) {
        let text = r#"{"model_type":"gpt_neox","vocab_size":16,"hidden_size":8,"num_hidden_layers":1,
          "num_attention_heads":2,"intermediate_size":16,"max_position_embeddings":16,
          "rotary_pct":0.5,"rotary_emb_base":10000,"use_parallel_residual":true,
          "bos_token_id":0,"eos_token_id":0,"initializer_range":0.2}"#;
        let cfg = GptNeoXConfig::from_json_str(text, "tiny").unwrap();
        let lm = crate::model::load::fresh(&cfg, DType::F32, &Device::Cpu, seed).unwrap();
        let vars = named_vars(&lm.varmap).into_iter().map(|(_, v)| v).collect();
        let opt = RmsProp::new(vars, RmsPropConfig::default()).unwrap();
        (lm, opt)
    }

    fn meta() -> CheckpointMeta {
        CheckpointMeta {
            step: 0,
            total_steps: 4,
            fraction: 0.0,
            examples_seen: 0,
            seed: 1,
            metrics: serde_json::json!({}),
            config: serde_json::json!({"run": "test"}),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn concurrent_saves_of_one_step_all_succeed_and_leave_one_complete_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("run");
        std::thread::scope(|s| {
            for t in 0..4 {
                let out = &out;
                s.spawn(move || {
                    let (lm, opt) = tiny(7);
                    for i in 0..25 {
                        save(out, &lm.model, &opt, &meta())
                            .unwrap_or_else(|e| panic!("thread {t} save {i}: {e:#}"));
                        // Never a step folder that is not complete.
                        for (_, dir) in list(out).unwrap() {
                            assert!(dir.join("model.safetensors").is_file());
                        }
                    }
                });
            }
        });
        assert_eq!(names(&out), vec!["step-000000"], "no temporary folder left");
        let ck = list(&out).unwrap();
        assert_eq!(ck.len(), 1);
        let (lm, mut opt) = tiny(99);
        restore(&ck[0].1, &lm.varmap, &mut opt, &Device::Cpu).unwrap();
        let (orig, _) = tiny(7);
        assert_eq!(
            crate::model::load::weights_hash(&lm.model).unwrap(),
            crate::model::load::weights_hash(&orig.model).unwrap()
        );
    }

    #[test]
    fn a_complete_checkpoint_of_the_same_step_is_kept_not_replaced() {
        let d = tempfile::tempdir().unwrap();
        let (lm, opt) = tiny(3);
        let dir = save(d.path(), &lm.model, &opt, &meta()).unwrap();
        // What another process may have added meanwhile (teach writes tokenizer.json there).
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        save(d.path(), &lm.model, &opt, &meta()).unwrap();
        assert!(
            dir.join("tokenizer.json").is_file(),
            "the folder was replaced"
        );
        assert_eq!(names(d.path()), vec!["step-000000"]);
        // An incomplete one (from an older version) is replaced.
        std::fs::remove_file(dir.join("optimizer.safetensors")).unwrap();
        save(d.path(), &lm.model, &opt, &meta()).unwrap();
        assert!(is_complete(&dir) && !dir.join("tokenizer.json").exists());
        assert_eq!(names(d.path()), vec!["step-000000"]);
    }

    #[test]
    fn list_accepts_only_step_folders_with_every_file_meta_lists() {
        let d = tempfile::tempdir().unwrap();
        let (lm, opt) = tiny(3);
        let dir = save(d.path(), &lm.model, &opt, &meta()).unwrap();
        assert_eq!(list(d.path()).unwrap(), vec![(0, dir.clone())]);
        let listed: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
        let listed: Vec<&String> = listed["files"].as_object().unwrap().keys().collect();
        assert_eq!(listed.len(), 3, "{listed:?}");
        for f in listed {
            // Missing, then truncated.
            let bytes = std::fs::read(dir.join(f)).unwrap();
            std::fs::remove_file(dir.join(f)).unwrap();
            assert_eq!(list(d.path()).unwrap(), vec![], "{f} missing");
            std::fs::write(dir.join(f), &bytes[..bytes.len() - 1]).unwrap();
            assert_eq!(list(d.path()).unwrap(), vec![], "{f} truncated");
            std::fs::write(dir.join(f), &bytes).unwrap();
            assert_eq!(list(d.path()).unwrap().len(), 1);
        }
        // meta.json but no weights, in the layout of checkpoints that did not list their files.
        let legacy = d.path().join("step-000002");
        std::fs::create_dir(&legacy).unwrap();
        std::fs::write(
            legacy.join("meta.json"),
            serde_json::to_string(&CheckpointMeta { step: 2, ..meta() }).unwrap(),
        )
        .unwrap();
        std::fs::write(legacy.join("config.json"), "{}").unwrap();
        assert_eq!(list(d.path()).unwrap(), vec![(0, dir.clone())]);
        let (lm2, mut opt2) = tiny(4);
        let e = restore(&legacy, &lm2.varmap, &mut opt2, &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("incomplete"), "{e}");
        for f in ["model.safetensors", "optimizer.safetensors"] {
            std::fs::copy(dir.join(f), legacy.join(f)).unwrap();
        }
        assert_eq!(
            list(d.path()).unwrap().len(),
            2,
            "a complete legacy checkpoint"
        );
    }

    #[test]
    fn temporary_folders_are_ignored_and_only_stale_ones_removed() {
        let d = tempfile::tempdir().unwrap();
        let (lm, opt) = tiny(3);
        let dir = save(d.path(), &lm.model, &opt, &meta()).unwrap();
        // Complete-looking temporary folders: a killed process's (old) and a live one's.
        let old = d.path().join(".tmp-step-000004.1234.0");
        let live = d.path().join(".tmp-step-000004.5678.0");
        let legacy = d.path().join(".tmp-step-000005");
        for t in [&old, &live, &legacy] {
            std::fs::create_dir(t).unwrap();
            for f in std::fs::read_dir(&dir).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), t.join(f.file_name())).unwrap();
            }
        }
        assert_eq!(list(d.path()).unwrap(), vec![(0, dir.clone())]);
        let past = std::time::SystemTime::now() - STALE_TMP_AGE * 2;
        for t in [&old, &legacy] {
            for f in std::fs::read_dir(t).unwrap() {
                let f = std::fs::File::options().write(true).open(f.unwrap().path());
                f.unwrap().set_modified(past).unwrap();
            }
            std::fs::File::open(t).unwrap().set_modified(past).unwrap();
        }
        save(d.path(), &lm.model, &opt, &meta()).unwrap();
        assert!(
            !old.exists() && !legacy.exists(),
            "stale temporary folders removed"
        );
        assert!(live.join("model.safetensors").is_file(), "a live one kept");
    }

    #[test]
    fn every_file_then_the_folder_then_its_parent_is_synced_and_errors_surface() {
        let d = tempfile::tempdir().unwrap();
        let (lm, opt) = tiny(3);
        let seen = std::rc::Rc::new(std::cell::RefCell::new(vec![]));
        let log = seen.clone();
        crate::util::set_sync_hook(Some(Box::new(move |p, is_dir| {
            log.borrow_mut().push((p.to_path_buf(), is_dir));
            Ok(())
        })));
        save(d.path(), &lm.model, &opt, &meta()).unwrap();
        crate::util::set_sync_hook(None);
        let seen = seen.borrow().clone();
        let (last, rest) = seen.split_last().unwrap();
        assert_eq!(
            last,
            &(d.path().to_path_buf(), true),
            "parent last: {seen:?}"
        );
        let tmp = &rest.last().unwrap().0;
        assert!(rest.last().unwrap().1 && tmp.parent() == Some(d.path()));
        let tmp_name = tmp.file_name().unwrap().to_string_lossy().into_owned();
        assert!(tmp_name.starts_with(".tmp-step-000000."), "{tmp_name}");
        for f in [
            "model.safetensors",
            "config.json",
            "optimizer.safetensors",
            "meta.json",
        ] {
            let synced = rest.iter().any(|(p, is_dir)| {
                !is_dir
                    && p.parent() == Some(tmp.as_path())
                    && p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with(&format!(".{f}.tmp."))
            });
            assert!(synced, "{f} not synced before the rename: {seen:?}");
        }
        // A failed fsync of the weights (a quota error on NFS) fails the save and leaves no
        // checkpoint and no temporary folder.
        let d = tempfile::tempdir().unwrap();
        crate::util::set_sync_hook(Some(Box::new(|p, _| {
            if p.to_string_lossy().contains("model.safetensors") {
                Err(std::io::Error::other("Disk quota exceeded"))
            } else {
                Ok(())
            }
        })));
        let e = save(d.path(), &lm.model, &opt, &meta()).unwrap_err();
        crate::util::set_sync_hook(None);
        let e = format!("{e:#}");
        assert!(
            e.contains("model.safetensors") && e.contains("quota"),
            "{e}"
        );
        assert!(names(d.path()).is_empty(), "{:?}", names(d.path()));
    }
}
