//! What the device makes of each kernel at its launch shape: registers, shared memory,
//! and how many CTAs fit on one multiprocessor (`cuOccupancyMaxActiveBlocksPerMultiprocessor`),
//! beside the device's shared-memory opt-in limit. `dots-moe doctor` prints it.
//!
//! The launch shapes are the ones the wrappers use at dots.llm1 shapes (E 128, 6 + 2 slots
//! per token, 130 slot ids): the block sizes of [`crate::cuda::moe`] and
//! [`crate::cuda::expert_gemm`], and their dynamic shared memory.

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use serde::Serialize;

use crate::cuda::context::GpuContext;
use crate::cuda::error::CudaError;
use crate::cuda::expert_gemm as gemm;
use crate::cuda::moe;
use crate::cuda::source::{self, KernelSource};

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

/// Every kernel the layer launches on `gpu`, with its block size and dynamic shared memory
/// at dots.llm1 shapes.
fn launch_shapes(arch: &str) -> Vec<(&'static KernelSource, &'static str, u32, usize)> {
    let (experts, slots_per_token, n_slots) = (128, 8, 130);
    let mut shapes: Vec<(&'static KernelSource, &'static str, u32, usize)> = Vec::new();
    for name in source::ROUTE.entry_points.iter().filter(|n| n.starts_with("moe_router_logits")) {
        shapes.push((&source::ROUTE, name, moe::LOGIT_THREADS, 0));
    }
    shapes.push((
        &source::ROUTE,
        "moe_router_select",
        moe::TILE_THREADS,
        moe::select_shared_bytes(experts, slots_per_token, n_slots),
    ));
    shapes.push((
        &source::PERMUTE,
        "moe_permute_rank",
        moe::TILE_THREADS,
        moe::rank_shared_bytes(slots_per_token, n_slots),
    ));
    shapes.push((&source::PERMUTE, "moe_permute_scatter", moe::TILE_THREADS, moe::scatter_shared_bytes(n_slots)));
    for name in source::PERMUTE.entry_points.iter().filter(|n| n.starts_with("moe_gather")) {
        shapes.push((&source::PERMUTE, name, moe::GATHER_THREADS, 0));
    }
    shapes.push((&source::COMBINE, "moe_combine", moe::COMBINE_THREADS, 0));
    shapes.push((&gemm::SCHEDULE, "moe_expert_schedule", 32, 0));
    shapes.push((&gemm::DECODE, "moe_expert_up_decode", gemm::DECODE_THREADS, 0));
    shapes.push((&gemm::DECODE, "moe_expert_down_decode", gemm::DECODE_THREADS, 0));
    shapes.push((&gemm::MMA, "moe_expert_up_mma", gemm::MMA_THREADS, gemm::MMA_SHARED_BYTES));
    shapes.push((&gemm::MMA, "moe_expert_down_mma", gemm::MMA_THREADS, gemm::MMA_SHARED_BYTES));
    if arch == "sm_90a" {
        shapes.push((&gemm::WGMMA, "moe_expert_up_wgmma", gemm::WG_THREADS, gemm::WG_SHARED_BYTES));
        shapes.push((&gemm::WGMMA, "moe_expert_down_wgmma", gemm::WG_THREADS, gemm::WG_SHARED_BYTES));
    }
    shapes
}

/// Each kernel's occupancy on `gpu` (compiles and loads every kernel file).
pub fn kernel_occupancy(gpu: &GpuContext) -> Result<Vec<KernelOccupancy>, CudaError> {
    gpu.cuda_context().bind_to_thread()?;
    let mut out = Vec::new();
    for (src, name, block, dynamic) in launch_shapes(gpu.arch()) {
        let func = gpu.function(src, name)?;
        if dynamic > 48 * 1024 {
            // Above 48 KB a kernel must opt in, as the wrappers do before launching.
            func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic as i32)?;
        }
        let ctas = func.occupancy_max_active_blocks_per_multiprocessor(block, dynamic, None)?;
        out.push(KernelOccupancy {
            name: name.to_string(),
            block_threads: block,
            dynamic_shared_bytes: dynamic,
            static_shared_bytes: func.shared_size_bytes()?,
            registers: func.num_regs()?,
            ctas_per_sm: ctas,
            warps_per_sm: ctas * block.div_ceil(32),
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
    fn every_entry_point_has_one_launch_shape() {
        for (arch, files) in [
            ("sm_80", vec![source::ROUTE, source::PERMUTE, source::COMBINE, gemm::SCHEDULE, gemm::DECODE, gemm::MMA]),
            (
                "sm_90a",
                vec![
                    source::ROUTE,
                    source::PERMUTE,
                    source::COMBINE,
                    gemm::SCHEDULE,
                    gemm::DECODE,
                    gemm::MMA,
                    gemm::WGMMA,
                ],
            ),
        ] {
            let mut listed: Vec<&str> = launch_shapes(arch).iter().map(|s| s.1).collect();
            let mut entries: Vec<&str> = files.iter().flat_map(|f| f.entry_points.iter().copied()).collect();
            listed.sort_unstable();
            entries.sort_unstable();
            assert_eq!(listed, entries, "{arch}");
            for (src, name, block, _) in launch_shapes(arch) {
                assert!(src.entry_points.contains(&name), "{name} is not in {}", src.name);
                assert!(block > 0 && block % 32 == 0, "{name}: block {block}");
            }
        }
    }
}
