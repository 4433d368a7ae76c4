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
    /// Generate text with a dots.llm1 checkpoint on the CPU reference model.
    Generate(cli::generate::GenerateArgs),
    /// Write the logits of one full forward pass over --tokens to a safetensors file.
    Logits(cli::logits::LogitsArgs),
    /// Compile every CUDA kernel (NVRTC) and print registers, shared memory and spills.
    Kernels(cli::kernels::KernelsArgs),
    /// Report the GPU driver, NVRTC and devices this machine has (exits 0 without a GPU).
    Doctor(cli::doctor::DoctorArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => cli::bench::run(args),
        Command::Generate(args) => cli::generate::run(args),
        Command::Logits(args) => cli::logits::run(args),
        Command::Kernels(args) => cli::kernels::run(args),
        Command::Doctor(args) => cli::doctor::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
