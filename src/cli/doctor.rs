//! `dots-moe doctor`: the CPU kernels this machine runs, and what it offers the CUDA
//! backend (driver library and NVRTC,
//! with the files they were loaded from; devices with compute capability and memory, driver
//! version; whether every kernel compiles, or comes from the on-disk cubin cache; and on a
//! GPU each kernel's occupancy at its launch shape beside the shared-memory opt-in limit).
//! Without a GPU it says so and exits 0.

use clap::Args;

use super::CliResult;

/// Arguments of `dots-moe doctor`.
#[derive(Args, Debug)]
pub struct DoctorArgs {}

/// Runs the subcommand.
#[cfg(feature = "cuda")]
pub fn run(_args: DoctorArgs) -> CliResult {
    use dots_moe::cuda::{GpuContext, context, nvrtc, occupancy};

    println!("dots-moe {} (cuda feature on)", env!("CARGO_PKG_VERSION"));
    print_cpu_kernels();
    let mut device_arch = None;
    if context::driver_present() {
        match context::driver_version() {
            Ok((major, minor)) => println!("GPU driver library: found (libcuda), supports CUDA {major}.{minor}"),
            Err(e) => println!("GPU driver library: found (libcuda), but cuDriverGetVersion failed: {e}"),
        }
        match context::devices() {
            Ok(devices) if devices.is_empty() => println!("devices: none (the driver reports no GPU)"),
            Ok(devices) => {
                for d in &devices {
                    println!(
                        "device {}: {}, compute capability {}.{} (target {}), {:.1} GiB, {} SMs{}",
                        d.ordinal,
                        d.name,
                        d.major,
                        d.minor,
                        d.arch,
                        d.total_memory_bytes as f64 / (1u64 << 30) as f64,
                        d.multiprocessors,
                        if d.major < 8 { " (too old for these kernels: 8.0 or newer needed)" } else { "" }
                    );
                }
                device_arch = devices.first().map(|d| d.arch.clone());
            }
            Err(e) => println!("devices: cannot list: {e}"),
        }
        println!("  loaded from: {}", loaded_library("libcuda.so"));
    } else {
        println!("GPU driver library: not found (no libcuda.so.1): no GPU on this machine");
    }
    if nvrtc::available() {
        let version = nvrtc::version().map(|(a, b)| format!("{a}.{b}")).unwrap_or_else(|e| format!("unknown ({e})"));
        let archs = nvrtc::supported_archs()
            .map(|a| a.iter().map(|x| format!("sm_{x}")).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        println!("NVRTC: found, version {version}; targets: {archs}");
        println!("  loaded from: {}", loaded_library("libnvrtc"));
    } else {
        println!("NVRTC: not found (libnvrtc.so.13); {}", dots_moe::cuda::CudaError::NoNvrtc);
    }
    match nvrtc::disk_cache_dir() {
        Some(dir) => println!("cubin cache ({}): {}", nvrtc::KERNEL_CACHE_ENV, dir.display()),
        None => println!("cubin cache: none ({} unset)", nvrtc::KERNEL_CACHE_ENV),
    }
    let arch = device_arch.clone().unwrap_or_else(|| dots_moe::cuda::Arch::DEFAULT.to_string());
    let mut compiled = (0, 0);
    let mut failure = None;
    for file in super::kernels::kernel_files(&arch) {
        match nvrtc::compile(file, &arch) {
            Ok(c) if c.origin == nvrtc::Origin::DiskCache => compiled.1 += c.kernels.len().max(1),
            Ok(c) => compiled.0 += c.kernels.len().max(1),
            Err(e) => {
                failure = Some(format!("{}: {e}", file.name));
                break;
            }
        }
    }
    match failure {
        None => println!("kernels for {arch}: {} compiled here, {} from the cubin cache", compiled.0, compiled.1),
        Some(e) => println!("kernels for {arch}: not all available: {e}"),
    }
    if device_arch.is_some() {
        match GpuContext::new(0)
            .and_then(|gpu| Ok((occupancy::shared_memory_limits(&gpu)?, occupancy::kernel_occupancy(&gpu)?)))
        {
            Ok((limits, kernels)) => {
                println!("occupancy on device 0 at dots.llm1 launch shapes:");
                print!("{}", occupancy::format_occupancy(&limits, &kernels));
            }
            Err(e) => println!("occupancy on device 0: cannot query: {e}"),
        }
    }
    Ok(())
}

/// The file a loaded shared library was mapped from (`/proc/self/maps`), or why not.
#[cfg(feature = "cuda")]
fn loaded_library(fragment: &str) -> String {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return "unknown (no /proc/self/maps)".into();
    };
    let mut paths: Vec<&str> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| path.rsplit('/').next().is_some_and(|file| file.starts_with(fragment)))
        .collect();
    paths.dedup();
    if paths.is_empty() { "not mapped in this process".into() } else { paths.join(", ") }
}

/// Runs the subcommand.
#[cfg(not(feature = "cuda"))]
pub fn run(_args: DoctorArgs) -> CliResult {
    println!("dots-moe {} built without the `cuda` feature: no GPU support in this binary", env!("CARGO_PKG_VERSION"));
    print_cpu_kernels();
    Ok(())
}

/// The CPU kernels this machine runs, and every ISA it supports.
fn print_cpu_kernels() {
    use dots_moe::cpu::Isa;
    println!(
        "CPU kernels: {:?} (supported: {:?}; DOTS_MOE_CPU_ISA forces a lower one)",
        Isa::detect(),
        Isa::supported()
    );
}
