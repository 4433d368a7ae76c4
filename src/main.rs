//! `dots-moe`: the command-line front end (benchmarks, generation, kernel reports).

mod cli;

use clap::{Parser, Subcommand};

/// Mixture-of-Experts kernels for dots.llm1.
#[derive(Parser)]
#[command(name = "dots-moe", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time the whole MoE layer at real dots.llm1 shapes, beside this machine's floor.
    Bench(cli::bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => cli::bench::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
