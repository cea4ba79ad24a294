//! Warren (perf worktree: only the load generator is built here).
pub mod cli;
