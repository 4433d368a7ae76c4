//! What the device makes of each kernel at its launch shape: registers, shared memory,
//! and how many CTAs fit on one multiprocessor (`cuOccupancyMaxActiveBlocksPerMultiprocessor`),
//! beside the device's shared-memory opt-in limit. `dots-moe doctor` prints it.
//!
//! The launch shapes come from each kernel's declaration in the registry
//! ([`crate::cuda::source`]): its block size, and its dynamic shared memory at dots.llm1
//! shapes (E 128, 6 + 2 slots per token, 130 slot ids).

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use serde::Serialize;

use crate::cuda::arch::Arch;
use crate::cuda::context::GpuContext;
use crate::cuda::error::CudaError;
use crate::cuda::launch::{KernelDecl, LaunchDims};
use crate::cuda::source;

/// One kernel at its launch shape on one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelOccupancy {
    /// The `extern "C"` entry point.
    pub name: String,
    /// Threads per CTA.
    pub block_threads: u32,
    /// Dynamic shared memory per CTA at dots.llm1 shapes, bytes.
    pub dynamic_shared_bytes: usize,
    /// Static shared memory per CTA (the driver's figure), bytes.
    pub static_shared_bytes: i32,
    /// Registers per thread (the driver's figure).
    pub registers: i32,
    /// CTAs of this shape that fit on one multiprocessor at once (0: it cannot launch).
    pub ctas_per_sm: u32,
    /// Warps resident per multiprocessor at that occupancy.
    pub warps_per_sm: u32,
}

/// The device's limits that decide whether a kernel launches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SharedMemoryLimits {
    /// Shared memory a CTA may use after opting in (`MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`).
    pub per_block_optin_bytes: i32,
    /// Shared memory of one multiprocessor.
    pub per_multiprocessor_bytes: i32,
    /// Warps a multiprocessor holds at most.
    pub max_warps_per_sm: i32,
}

/// The device's shared-memory limits.
pub fn shared_memory_limits(gpu: &GpuContext) -> Result<SharedMemoryLimits, CudaError> {
    let ctx = gpu.cuda_context();
    use CUdevice_attribute::*;
    Ok(SharedMemoryLimits {
        per_block_optin_bytes: ctx.attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
        per_multiprocessor_bytes: ctx.attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?,
        max_warps_per_sm: ctx.attribute(CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR)? / 32,
    })
}

/// Every registered kernel for `arch`, with its block size and its dynamic shared memory at
/// dots.llm1 shapes (the declarations' own rules).
fn launch_shapes(arch: Arch) -> Vec<(&'static KernelDecl, usize)> {
    let dims = LaunchDims::dots1(4096, 1);
    source::files_for(arch).flat_map(|file| file.kernels.iter()).map(|k| (*k, (k.dynamic_smem)(&dims))).collect()
}

/// Each kernel's occupancy on `gpu` (compiles or loads every kernel file).
pub fn kernel_occupancy(gpu: &GpuContext) -> Result<Vec<KernelOccupancy>, CudaError> {
    gpu.cuda_context().bind_to_thread()?;
    let mut out = Vec::new();
    for (kernel, dynamic) in launch_shapes(gpu.target()) {
        let func = gpu.kernel(kernel)?;
        if dynamic > 48 * 1024 {
            // Above 48 KB a kernel must opt in, as the wrappers do before launching.
            func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic as i32)?;
        }
        let ctas = func.occupancy_max_active_blocks_per_multiprocessor(kernel.block, dynamic, None)?;
        out.push(KernelOccupancy {
            name: kernel.entry.to_string(),
            block_threads: kernel.block,
            dynamic_shared_bytes: dynamic,
            static_shared_bytes: func.shared_size_bytes()?,
            registers: func.num_regs()?,
            ctas_per_sm: ctas,
            warps_per_sm: ctas * kernel.block.div_ceil(32),
        });
    }
    Ok(out)
}

/// The occupancy table as text (one line per kernel).
pub fn format_occupancy(limits: &SharedMemoryLimits, kernels: &[KernelOccupancy]) -> String {
    let mut s = format!(
        "shared memory: {} B per CTA after opt-in, {} B per SM; {} warps per SM at most\n",
        limits.per_block_optin_bytes, limits.per_multiprocessor_bytes, limits.max_warps_per_sm
    );
    s += &format!(
        "{:<32} {:>6} {:>9} {:>9} {:>5} {:>7} {:>7}\n",
        "kernel", "block", "dyn smem", "stat smem", "regs", "CTAs/SM", "warps"
    );
    for k in kernels {
        let note = if k.ctas_per_sm == 0 { "  CANNOT LAUNCH" } else { "" };
        s += &format!(
            "{:<32} {:>6} {:>9} {:>9} {:>5} {:>7} {:>7}{note}\n",
            k.name,
            k.block_threads,
            k.dynamic_shared_bytes,
            k.static_shared_bytes,
            k.registers,
            k.ctas_per_sm,
            k.warps_per_sm
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_kernel_has_one_launch_shape() {
        for arch in [Arch::SM_80, Arch::SM_90A] {
            let shapes = launch_shapes(arch);
            let mut listed: Vec<&str> = shapes.iter().map(|(k, _)| k.entry).collect();
            let mut registered: Vec<&str> = source::files_for(arch).flat_map(|f| f.entry_points()).collect();
            listed.sort_unstable();
            registered.sort_unstable();
            assert_eq!(listed, registered, "{arch}");
            for (k, _) in &shapes {
                assert!(k.block > 0 && k.block % 32 == 0, "{}: block {}", k.entry, k.block);
            }
        }
        // The wgmma kernels are Hopper's only, and they are the ones that opt in past 48 KB.
        assert!(launch_shapes(Arch::SM_80).iter().all(|(k, _)| !k.entry.contains("wgmma")));
        assert!(launch_shapes(Arch::SM_90A).iter().any(|(k, smem)| k.entry.contains("wgmma") && *smem > 48 * 1024));
    }
}
