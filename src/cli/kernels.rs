//! `dots-moe kernels`: compile every CUDA kernel with NVRTC and print ptxas's report
//! (registers, shared memory, spills) per kernel; `--time` also times them on the GPU.

use clap::Args;

use super::CliResult;

/// Arguments of `dots-moe kernels`.
#[derive(Args, Debug)]
pub struct KernelsArgs {
    /// Target architecture (`sm_90a`, `sm_80`, ...). Default: the GPU's own, else `sm_90a`.
    #[arg(long)]
    pub arch: Option<String>,
    /// Print a JSON list of objects with the fields `name`, `arch`, `registers`,
    /// `shared_bytes`, `spill_store_bytes`, `spill_load_bytes`.
    #[arg(long)]
    pub json: bool,
    /// Also time the kernels on GPU 0 (CUDA events, median), as a table.
    #[arg(long)]
    pub time: bool,
    /// Batch sizes (tokens) for `--time`, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 16, 256, 4096])]
    pub tokens: Vec<usize>,
    /// Timed runs per region for `--time`.
    #[arg(long, default_value_t = 200)]
    pub iterations: usize,
}

/// Every kernel file of the registry that compiles for `arch` (its minimum architecture
/// supported by `arch`); none for a name that is not an architecture.
#[cfg(feature = "cuda")]
pub fn kernel_files(arch: &str) -> Vec<&'static dots_moe::cuda::source::KernelSource> {
    use dots_moe::cuda::{Arch, source};
    Arch::parse(arch).map(|arch| source::files_for(arch).collect()).unwrap_or_default()
}

/// Runs the subcommand.
#[cfg(feature = "cuda")]
pub fn run(args: KernelsArgs) -> CliResult {
    use dots_moe::cuda::launch::LaunchDims;
    use dots_moe::cuda::moe::{rank_shared_bytes, select_shared_bytes};
    use dots_moe::cuda::{Arch, GpuContext, context, nvrtc, source, timing};

    let arch = match &args.arch {
        Some(arch) => Arch::parse(arch)?.to_string(),
        None => context::device_info(0).map(|d| d.arch).unwrap_or_else(|_| Arch::DEFAULT.to_string()),
    };
    let mut kernels = Vec::new();
    for src in kernel_files(&arch) {
        kernels.extend(nvrtc::compile(src, &arch)?.kernels.iter().cloned());
    }
    // The declarations' launch rules at dots.llm1 shapes, T = 256 (one item per slot).
    let dims = LaunchDims::dots1(256, 130);
    let declared = |name: &str| source::kernels().find(|k| k.entry == name);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&kernels)?);
    } else {
        let (major, minor) = nvrtc::version()?;
        println!("NVRTC {major}.{minor}, target {arch}, options {}", nvrtc::options(&arch).join(" "));
        println!(
            "{:<30} {:>9} {:>13} {:>8} {:>11} {:>11} {:>7} {:>6} {:>16} {:>11}",
            "kernel",
            "registers",
            "static smem B",
            "stack B",
            "spill st B",
            "spill ld B",
            "budget",
            "block",
            "grid (T=256)",
            "dyn smem B"
        );
        for k in &kernels {
            let decl = declared(&k.name).ok_or_else(|| format!("{} is not in the kernel registry", k.name))?;
            let (x, y) = (decl.grid)(&dims);
            println!(
                "{:<30} {:>9} {:>13} {:>8} {:>11} {:>11} {:>7} {:>6} {:>16} {:>11}",
                k.name,
                k.registers,
                k.shared_bytes,
                k.stack_frame_bytes,
                k.spill_store_bytes,
                k.spill_load_bytes,
                decl.max_registers,
                decl.block,
                format!("{x} x {y}"),
                (decl.dynamic_smem)(&dims)
            );
        }
        println!(
            "dynamic shared memory at dots.llm1 shapes (E 128, 8 slots, 130 slot ids): select {} B, rank {} B, scatter 0 B",
            select_shared_bytes(128, 8, 130),
            rank_shared_bytes(8, 130)
        );
    }
    if args.time {
        let gpu = GpuContext::new(0)?;
        let timings = timing::time_moe_kernels(&gpu, &args.tokens, args.iterations.max(1))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&timings)?);
        } else {
            print!("{}", timing::format_table(&gpu, &timings));
        }
    }
    Ok(())
}

/// Runs the subcommand.
#[cfg(not(feature = "cuda"))]
pub fn run(_args: KernelsArgs) -> CliResult {
    Err("dots-moe was built without the `cuda` feature".into())
}
