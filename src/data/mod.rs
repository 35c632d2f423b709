//! Data: tokenization and the data sets of both scales.
pub mod tokenizer;
