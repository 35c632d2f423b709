//! Models: the GPT-NeoX (Pythia) architecture, loading, scoring and sampling.
pub(crate) mod attention_softmax;
pub(crate) mod bias_add;
pub mod config;
pub mod fused;
pub mod gemm;
pub mod generate;
pub mod gpt_neox;
pub mod hand;
pub(crate) mod layer_node;
pub(crate) mod layer_norm_grad;
pub mod load;
pub(crate) mod nvrtc;
pub mod profile;
pub(crate) mod qkv_heads;
pub mod recompute;
pub mod score;

pub use config::GptNeoXConfig;
pub use gpt_neox::{GptNeoX, KvCache, OpPath};
pub use load::LoadedModel;
