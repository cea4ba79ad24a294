//! The command line.
pub mod perf;
