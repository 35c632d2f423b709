//! Evaluation of trained policies: pairwise judging of sampled summaries against the dataset's
//! reference summaries (win rate).

pub mod judge;
pub mod policy;
