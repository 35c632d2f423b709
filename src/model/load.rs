//! Loading GPT-NeoX models: a local directory in the HF layout, or a hub id + revision through
//! hf-hub, preferring the local hub cache so that a model downloaded once loads offline.

use super::config::GptNeoXConfig;
use super::gpt_neox::GptNeoX;
use anyhow::{Context, Result, anyhow, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The files of a model in the HF layout.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
}

// The hub-cache helpers live in `crate::hub` (shared with `data`); re-exported here for
// callers that know them by this path.
pub use crate::hub::{hub_cache_dir, hub_file};

fn weights_from_index(
    index: &Path,
    resolve: &dyn Fn(&str) -> Result<PathBuf>,
) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| anyhow!("{}: missing object `weight_map`", index.display()))?;
    let mut files: Vec<String> = map
        .values()
        .map(|f| {
            f.as_str().map(String::from).ok_or_else(|| {
                anyhow!(
                    "{}: `weight_map` values must be file names",
                    index.display()
                )
            })
        })
        .collect::<Result<_>>()?;
    files.sort();
    files.dedup();
    files.iter().map(|f| resolve(f)).collect()
}

/// Locate the files of a model given a local directory or a hub id (`org/name`) and revision.
pub fn locate(source: &str, revision: Option<&str>) -> Result<ModelFiles> {
    let dir = Path::new(source);
    if dir.is_dir() {
        let config = dir.join("config.json");
        if !config.is_file() {
            bail!("model directory {}: config.json is missing", dir.display());
        }
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let weights = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            weights_from_index(&index, &|f| {
                let p = dir.join(f);
                if p.is_file() {
                    Ok(p)
                } else {
                    bail!("{}: shard {} is missing", index.display(), p.display())
                }
            })?
        } else {
            bail!(
                "model directory {}: neither model.safetensors nor model.safetensors.index.json exists",
                dir.display()
            );
        };
        let tok = dir.join("tokenizer.json");
        return Ok(ModelFiles {
            config,
            weights,
            tokenizer: tok.is_file().then_some(tok),
        });
    }
    if source.starts_with('.') || source.starts_with('/') || source.split('/').count() != 2 {
        bail!(
            "model {source:?} is neither an existing directory nor a hub id of the form org/name"
        );
    }
    let repo = hf_hub::Repo::with_revision(
        source.to_string(),
        hf_hub::RepoType::Model,
        revision.unwrap_or("main").to_string(),
    );
    let config = hub_file(&repo, "config.json")?;
    let weights = match hub_file(&repo, "model.safetensors") {
        Ok(p) => vec![p],
        Err(single_err) => {
            let index = hub_file(&repo, "model.safetensors.index.json").map_err(|_| {
                single_err.context(format!(
                    "{source}: no model.safetensors nor a sharded index"
                ))
            })?;
            weights_from_index(&index, &|f| hub_file(&repo, f))?
        }
    };
    let tokenizer = hub_file(&repo, "tokenizer.json").ok();
    Ok(ModelFiles {
        config,
        weights,
        tokenizer,
    })
}

/// Whether `name` is one of the non-parameter buffers that HF GPT-NeoX checkpoints may carry
/// (rotary `inv_freq`, the causal mask `attention.bias` and `attention.masked_bias`); the
/// model computes these itself. Parameters such as `attention.dense.bias` are not buffers.
fn is_buffer(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
        || name.ends_with(".attention.bias")
        || name.ends_with(".attention.masked_bias")
}

/// Read the tensors of safetensors files into memory, checking each file's integrity.
/// Non-parameter buffers (see `is_buffer`) are skipped unread: they cost memory, and newer
/// transformers store the causal mask as BOOL, a dtype candle cannot load.
/// Errors name the file (and the tensor when one is at fault).
pub fn read_safetensors(
    files: &[PathBuf],
    device: &Device,
) -> Result<HashMap<String, (Tensor, PathBuf)>> {
    let mut out = HashMap::new();
    for f in files {
        let bytes = std::fs::read(f)
            .with_context(|| format!("cannot read weights file {}", f.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            anyhow!(
                "weights file {} is not a valid safetensors file (truncated or corrupt?): {e}",
                f.display()
            )
        })?;
        for (name, view) in st.tensors() {
            if is_buffer(&name) {
                continue;
            }
            let t = candle_core::safetensors::Load::load(&view, device).with_context(|| {
                format!("weights file {}: cannot load tensor {name}", f.display())
            })?;
            out.insert(name, (t, f.clone()));
        }
    }
    Ok(out)
}

/// Copy weights into the variables of `varmap` (built for `cfg`), casting to the variables'
/// dtype. Every variable must be present with the right shape; extra tensors that HF keeps as
/// buffers (rotary inv_freq, attention masks) are ignored, any other extra tensor is an error.
pub fn assign_weights(varmap: &VarMap, tensors: &HashMap<String, (Tensor, PathBuf)>) -> Result<()> {
    let data = varmap.data().lock().unwrap();
    let sorted: BTreeMap<_, _> = data.iter().collect();
    for (name, var) in sorted {
        let (t, file) = tensors.get(name.as_str()).ok_or_else(|| {
            anyhow!("tensor {name} is missing from the weights ({} file(s))", {
                let mut fs: Vec<_> = tensors
                    .values()
                    .map(|(_, f)| f.display().to_string())
                    .collect();
                fs.sort();
                fs.dedup();
                fs.join(", ")
            })
        })?;
        if t.dims() != var.dims() {
            bail!(
                "weights file {}: tensor {name} has shape {:?} but the config expects {:?}",
                file.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    for (name, (_, file)) in tensors {
        if !data.contains_key(name) && !is_buffer(name) {
            bail!(
                "weights file {}: unexpected tensor {name} (not a GPT-NeoX parameter)",
                file.display()
            );
        }
    }
    Ok(())
}

/// A model together with the variables that hold its weights (for training) and its files.
pub struct LoadedModel {
    pub model: GptNeoX,
    pub varmap: VarMap,
    pub files: Option<ModelFiles>,
}

/// A fresh, randomly initialised model (for the tiny teaching models), reproducible from
/// `seed` on every device: weights normal(0, initializer_range), biases 0, layer norms 1 (HF's
/// GPT-NeoX initialisation). Each parameter draws from its own stream (seed, name).
pub fn fresh(cfg: &GptNeoXConfig, dtype: DType, device: &Device, seed: u64) -> Result<LoadedModel> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, device);
    let model = GptNeoX::new(cfg, vb)?;
    let normal = rand_distr::Normal::new(0.0f32, cfg.initializer_range as f32)?;
    for (name, var) in crate::sorted_vars(&varmap) {
        let n = var.elem_count();
        let is_norm = name.contains("layernorm") || name.contains("layer_norm");
        let values: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if is_norm {
            vec![1.0; n]
        } else {
            let stream = u64::from_str_radix(&crate::util::sha256_hex(name.as_bytes())[..16], 16)?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ stream);
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        };
        let t = Tensor::from_vec(values, var.shape(), device)?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(LoadedModel {
        model,
        varmap,
        files: None,
    })
}

/// Load a model from a directory or hub id, with trainable variables in `dtype`.
pub fn load(
    source: &str,
    revision: Option<&str>,
    dtype: DType,
    device: &Device,
) -> Result<LoadedModel> {
    let files = locate(source, revision)?;
    let cfg = GptNeoXConfig::from_file(&files.config)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, device);
    let model = GptNeoX::new(&cfg, vb)?;
    let tensors = read_safetensors(&files.weights, device)?;
    assign_weights(&varmap, &tensors)?;
    Ok(LoadedModel {
        model,
        varmap,
        files: Some(files),
    })
}

/// Load a model and its tokenizer (the given file, else the model's tokenizer.json).
/// `hint` says how to name a tokenizer when the model has none.
pub fn load_with_tokenizer(
    source: &str,
    revision: Option<&str>,
    tokenizer: Option<&std::path::Path>,
    dtype: &str,
    device: &str,
    hint: &str,
) -> Result<(LoadedModel, crate::data::tokenizer::Tok)> {
    let dev = crate::device(device)?;
    let lm = load(source, revision, crate::dtype(dtype)?, &dev)?;
    let tok_path = match tokenizer {
        Some(p) => p.to_path_buf(),
        None => lm
            .files
            .as_ref()
            .and_then(|f| f.tokenizer.clone())
            .ok_or_else(|| anyhow!("model {source} has no tokenizer.json; {hint}"))?,
    };
    let tok = crate::data::tokenizer::Tok::from_file(&tok_path, lm.model.config().eos_token_id)?;
    Ok((lm, tok))
}

/// Write a model in the HF layout: `model.safetensors` (f32 or the vars' dtype) and
/// `config.json`, each atomically (a temporary name, fsync, rename) and durably (the folder is
/// fsynced too); an error of any write or fsync is returned.
pub fn save_hf(model: &GptNeoX, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors: HashMap<String, Tensor> = model
        .named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.detach()))
        .collect();
    write_safetensors(&tensors, &dir.join("model.safetensors"))?;
    crate::util::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&model.config().to_hf_json())?.as_bytes(),
    )
}

/// Write tensors as a safetensors file, atomically and durably (through
/// [`crate::util::write_atomic_with`]), streaming one tensor at a time. Unlike
/// `candle_core::safetensors::save`, the file is fsynced on the handle that wrote it, so a
/// write-back error (disk full, quota on NFS) is returned, with the path, instead of lost.
pub fn write_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    use safetensors::View;
    use safetensors::tensor::TensorInfo;
    // The layout of safetensors' own writer: by descending dtype alignment, then name.
    let mut order: Vec<(&String, &Tensor)> = tensors.iter().collect();
    order.sort_by(|(ln, l), (rn, r)| {
        View::dtype(*r)
            .cmp(&View::dtype(*l))
            .then_with(|| ln.cmp(rn))
    });
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, t) in &order {
        let n = View::data_len(*t);
        let info = TensorInfo {
            dtype: View::dtype(*t),
            shape: t.dims().to_vec(),
            data_offsets: (offset, offset + n),
        };
        header.insert((*name).clone(), serde_json::to_value(info)?);
        offset += n;
    }
    let mut header = serde_json::to_vec(&header)?;
    header.resize(header.len().next_multiple_of(8), b' ');
    crate::util::write_atomic_with(path, |w| {
        use std::io::Write;
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for (name, t) in &order {
            t.write_bytes(w).with_context(|| format!("tensor {name}"))?;
        }
        Ok(())
    })
}

/// An independent copy of a model (new variables, copied storage): for a frozen reference
/// that must not see the policy's updates.
pub fn deep_copy(lm: &LoadedModel) -> Result<LoadedModel> {
    let cfg = lm.model.config().clone();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, lm.model.dtype(), lm.model.device());
    let model = GptNeoX::new(&cfg, vb)?
        .with_op_path(lm.model.op_path())
        .with_compute_dtype(lm.model.compute_dtype());
    {
        let data = varmap.data().lock().unwrap();
        for (name, t) in lm.model.named_parameters() {
            let var = data
                .get(&name)
                .ok_or_else(|| anyhow!("copy: no variable {name}"))?;
            var.set(&t.detach().copy()?)?;
        }
    }
    Ok(LoadedModel {
        model,
        varmap,
        files: lm.files.clone(),
    })
}

/// A content hash of a model's weights (names, shapes and f32 values), e.g. to key caches of
/// values computed with a frozen reference model.
pub fn weights_hash(model: &GptNeoX) -> Result<String> {
    let mut h = crate::util::Hasher::new();
    let mut params = model.named_parameters();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in params {
        h.update(name.as_bytes());
        h.update(format!("{:?}", t.dims()).as_bytes());
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        h.update(&bytes);
    }
    Ok(h.hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_told_from_parameters_and_not_read() {
        for name in [
            "gpt_neox.layers.3.attention.bias",
            "gpt_neox.layers.3.attention.masked_bias",
            "gpt_neox.layers.3.attention.rotary_emb.inv_freq",
        ] {
            assert!(is_buffer(name), "{name}");
        }
        for name in [
            "gpt_neox.layers.3.attention.dense.bias",
            "gpt_neox.layers.3.attention.query_key_value.bias",
            "gpt_neox.layers.3.mlp.dense_h_to_4h.bias",
        ] {
            assert!(!is_buffer(name), "{name}");
        }
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("model.safetensors");
        let dev = Device::Cpu;
        let w = Tensor::new(&[1f32, 2.0], &dev).unwrap();
        let tensors: HashMap<String, Tensor> = [
            ("gpt_neox.layers.0.attention.dense.bias", w.clone()),
            ("gpt_neox.layers.0.attention.masked_bias", w.clone()),
            ("gpt_neox.layers.0.attention.rotary_emb.inv_freq", w),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
        candle_core::safetensors::save(&tensors, &f).unwrap();
        let read = read_safetensors(&[f], &dev).unwrap();
        let names: Vec<&String> = read.keys().collect();
        assert_eq!(names, ["gpt_neox.layers.0.attention.dense.bias"]);
    }

    #[test]
    fn written_safetensors_read_back_equal() {
        let d = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 12., &dev)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let mut t = HashMap::new();
        t.insert("a".to_string(), a.clone());
        t.insert("a_t".to_string(), a.t().unwrap()); // not contiguous
        t.insert("b".to_string(), a.to_dtype(DType::BF16).unwrap());
        t.insert("c".to_string(), Tensor::new(&[7u32, 8, 9], &dev).unwrap());
        t.insert("s".to_string(), Tensor::new(2.5f64, &dev).unwrap());
        let p = d.path().join("x.safetensors");
        write_safetensors(&t, &p).unwrap();
        let back = candle_core::safetensors::load(&p, &dev).unwrap();
        assert_eq!(back.len(), t.len());
        for (name, orig) in &t {
            let got = &back[name];
            assert_eq!(
                (got.dtype(), got.dims()),
                (orig.dtype(), orig.dims()),
                "{name}"
            );
            let f = |x: &Tensor| {
                x.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            assert_eq!(f(got), f(orig), "{name}");
        }
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
