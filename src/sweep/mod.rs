//! The sweep runner: the top of the pipeline, holding the state of a whole reproduction.
pub mod local;
pub mod paper;
pub mod results;
pub mod tables;
pub mod teach;
