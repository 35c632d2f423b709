//! `overopt`: reproduce "Scaling Laws for Reward Model Overoptimization in Direct Alignment
//! Algorithms" (Rafailov et al., 2024) with candle.
//!
//! Modules in pipeline order; no stage imports a later one:
//! `data` -> `model` -> `train` -> `eval` -> `analysis` -> `plots`, plus `toy_mdp` and the
//! sweep runner on top, and `notebook`, the notebooks' facade, above everything. `hub`
//! (cache-first hub access) and `util` sit below every stage.

pub mod analysis;
pub mod cli;
pub mod data;
pub mod eval;
pub mod hub;
pub mod model;
pub mod notebook;
pub mod plots;
pub mod sweep;
pub mod toy_mdp;
pub mod train;
pub mod util;

pub use candle_core;
pub use candle_nn;

/// Parse a device name: `cpu`, `cuda` or `cuda:N`.
pub fn device(name: &str) -> anyhow::Result<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n = s
                .strip_prefix("cuda:")
                .map(|x| x.parse::<usize>())
                .transpose()
                .map_err(|_| anyhow::anyhow!("bad device {s:?}: expected cuda:N"))?
                .unwrap_or(0);
            Ok(candle_core::Device::new_cuda(n)?)
        }
        s => anyhow::bail!("unknown device {s:?}: expected cpu, cuda or cuda:N"),
    }
}

/// Parse a dtype name: f32, bf16 or f16.
pub fn dtype(name: &str) -> anyhow::Result<candle_core::DType> {
    match name {
        "f32" | "float32" => Ok(candle_core::DType::F32),
        "bf16" | "bfloat16" => Ok(candle_core::DType::BF16),
        "f16" | "float16" => Ok(candle_core::DType::F16),
        s => anyhow::bail!("unknown dtype {s:?}: expected f32, bf16 or f16"),
    }
}

/// The variables of a `VarMap`, sorted by name (a stable order for initialisation and
/// optimizer state).
pub fn sorted_vars(varmap: &candle_nn::VarMap) -> Vec<(String, candle_core::Var)> {
    let data = varmap.data().lock().unwrap();
    let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
