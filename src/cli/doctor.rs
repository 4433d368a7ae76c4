//! `dots-moe doctor`: what this machine offers the CUDA backend (driver library, NVRTC,
//! devices with compute capability and memory, driver version). Without a GPU it says so
//! and exits 0.

use clap::Args;

use super::CliResult;

/// Arguments of `dots-moe doctor`.
#[derive(Args, Debug)]
pub struct DoctorArgs {}

/// Runs the subcommand.
#[cfg(feature = "cuda")]
pub fn run(_args: DoctorArgs) -> CliResult {
    use dots_moe::cuda::{context, nvrtc};

    println!("dots-moe {} (cuda feature on)", env!("CARGO_PKG_VERSION"));
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
    } else {
        println!("GPU driver library: not found (no libcuda.so.1): no GPU on this machine");
    }
    if nvrtc::available() {
        let version = nvrtc::version().map(|(a, b)| format!("{a}.{b}")).unwrap_or_else(|e| format!("unknown ({e})"));
        let archs = nvrtc::supported_archs()
            .map(|a| a.iter().map(|x| format!("sm_{x}")).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        println!("NVRTC: found, version {version}; targets: {archs}");
        let arch = device_arch.unwrap_or_else(|| dots_moe::cuda::Arch::DEFAULT.to_string());
        let compiled: Result<usize, _> = super::kernels::kernel_files(&arch)
            .into_iter()
            .map(|s| nvrtc::compile(s, &arch).map(|c| c.kernels.len()))
            .sum();
        match compiled {
            Ok(n) => println!("kernels: all {n} compile for {arch}"),
            Err(e) => println!("kernels: do not compile for {arch}: {e}"),
        }
    } else {
        println!("NVRTC: not found (libnvrtc.so.13); {}", dots_moe::cuda::CudaError::NoNvrtc);
    }
    Ok(())
}

/// Runs the subcommand.
#[cfg(not(feature = "cuda"))]
pub fn run(_args: DoctorArgs) -> CliResult {
    println!("dots-moe {} built without the `cuda` feature: no GPU support in this binary", env!("CARGO_PKG_VERSION"));
    Ok(())
}
