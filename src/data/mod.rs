//! Data: tokenization and the data sets of both scales.
pub mod synthetic;
pub mod tokenizer;
