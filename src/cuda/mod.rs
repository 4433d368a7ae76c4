//! The CUDA backend (Cargo feature `cuda`, on by default).
//!
//! Built on `cudarc` with dynamic loading: the crate builds, and its tests pass, on a
//! machine with no CUDA at all. At run time [`GpuContext::new`] opens `libcuda` and a
//! device, or returns a [`CudaError`] saying which is missing; nothing panics.
//!
//! - [`source`]: the kernel registry: every kernel file of `cuda/` (embedded with
//!   `include_str!`), its headers, minimum [`arch`] and kernels' launch contracts.
//! - [`launch`]: a kernel's declaration, a checked [`launch::Launch`], and the
//!   [`launch::Launcher`] trait (the GPU, or the CPU emulator of the tests).
//! - [`nvrtc`]: NVRTC compiles them for the device's architecture (`sm_90a` on Hopper) into
//!   cubins, cached per (source, arch, options), and reads ptxas's resource report; this
//!   also runs without a GPU (the static proof).
//! - [`context`]: the gate, the device, its stream, the loaded modules.
//! - [`buffer`]: typed device buffers with shapes; host/device copies.
//! - [`moe`]: the router, permutation, gather and combine kernels behind safe wrappers;
//!   the pipeline never waits for the host.
//! - [`chain`]: the decode chain: a layer of at most one permutation tile of tokens in
//!   three launches.
//! - [`workspace`]: a batch's device buffers and the readers that download them.
//! - [`occupancy`]: each kernel's registers, shared memory and CTAs per SM on the device.
//! - [`graph`]: capture into a CUDA graph, and device time between CUDA events.
//! - [`backend`]: the CUDA side of [`crate::backend::Backend`] (host data in and out).
//! - [`timing`]: device timing with CUDA events (for `dots-moe kernels --time`).

pub mod arch;
pub mod backend;
pub mod buffer;
pub mod chain;
pub mod context;
mod error;
pub mod expert_gemm;
pub mod graph;
pub mod launch;
pub mod layer;
pub mod moe;
pub mod nvrtc;
pub mod occupancy;
pub mod source;
pub mod timing;
pub mod workspace;

pub use arch::Arch;
pub use buffer::{DeviceBuffer, DeviceTensor};
pub use context::{DeviceInfo, GpuContext};
pub use error::CudaError;
pub use moe::RouteCombineKernels;
pub use workspace::{DeviceRouter, RoutingWorkspace};
