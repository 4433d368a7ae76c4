//! Subcommands of the `dots-moe` binary, one module each. Each exposes clap `Args` and a
//! `run(args) -> CliResult`.

pub mod bench;
pub mod doctor;
pub mod generate;
pub mod kernels;
pub mod logits;
pub mod precision;

/// What every subcommand returns: any error, printed by `main` as `error: ...`.
pub type CliResult = Result<(), Box<dyn std::error::Error>>;
