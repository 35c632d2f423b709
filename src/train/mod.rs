//! Training: DAA losses, the RMSProp optimizer, and the SFT / DAA trainers.
pub mod checkpoint;
pub mod config;
pub mod daa;
pub mod loss;
pub mod optim;
pub(crate) mod rmsprop_fused;
pub mod run;
pub mod sft;
pub mod trainer;

pub use daa::{DaaConfig, train_daa};
pub use sft::{SpecialTokens, train_sft};
pub use trainer::{LoopConfig, TrainOutcome, config_difference};
