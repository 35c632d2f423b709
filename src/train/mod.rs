//! Training: DAA losses, the RMSProp optimizer, and the SFT / DAA trainers.
pub mod loss;
pub mod optim;
