//! Steps 3 and 4 of the contract on the device: the grouped expert GEMMs (shared experts
//! fused as extra slots), behind safe wrappers.
//!
//! ```text
//! moe_expert_schedule     expert_offsets [n_slots + 1]  -> decode / tiled work items, counts
//! moe_expert_up_*         x [R, H] bf16, gate_up        -> act [R, I] bf16 (SwiGLU fused)
//! moe_expert_down_*       act, down, row_weights [R]    -> y [R, H] f32 (weight fused)
//! ```
//!
//! The regime of each slot is chosen **on the device** from its row count (no host sync):
//! slots with at most [`GemmOptions::decode_max_rows`] rows run the decode kernels
//! (`cuda/expert_gemm_decode.cu`: weights streamed once, tokens as the narrow MMA
//! dimension, padded to 8, 16, 32 or 64 rows); larger slots run the tiled kernels in tiles of
//! [`TILE_ROWS`] rows: `wgmma` on `sm_90a` (`cuda/expert_gemm_wgmma.cu`), `mma.sync`
//! elsewhere (`cuda/expert_gemm_mma.cu`). The host only knows `R` and sizes every grid for
//! the worst case; CTAs without an item return at once. So the whole step can be captured
//! in a CUDA graph.
//!
//! Determinism: no atomics, no split-K; every output element is one accumulator over `k` in
//! ascending order, so results are bit-identical run to run. In the batch-invariant mode
//! ([`GemmOptions::batch_invariant`]) every slot runs the decode kernels in chunks of at
//! most [`DECODE_ITEM_ROWS`] rows, whose per-row arithmetic does not depend on the chunk:
//! a token's rows give the same bits whichever tokens share the batch (and on any card).
//!
//! Shapes the kernels take (checked here, once): bf16 weights, `H % 256 == 0`,
//! `I % 128 == 0` (dots.llm1: 4096 and 1408).

use std::sync::Arc;

use half::bf16;

use crate::cuda::arch::Arch;
use crate::cuda::buffer::{DeviceBuffer, DeviceTensor};
use crate::cuda::context::GpuContext;
use crate::cuda::error::CudaError;
use crate::cuda::launch::{KernelArg as Arg, KernelDecl, Launch, LaunchDims, Launcher, TensorMapSpec};
use crate::cuda::source::{self, KernelSource};
use crate::error::MoeError;
use crate::moe::MoeWeights;
use crate::tensor::{Dtype, TensorView};

pub use crate::cuda::source::{DECODE, MMA, SCHEDULE, STREAM, WGMMA, WS};

/// The expert GEMM kernel files that compile for every architecture from `sm_80` on.
pub const PORTABLE_SOURCES: &[KernelSource] = &[SCHEDULE, DECODE, MMA];
/// The expert GEMM kernel files that need `sm_90a`.
pub const HOPPER_SOURCES: &[KernelSource] = &[WGMMA, WS, STREAM];

/// Rows of one decode item at most (`DECODE_ITEM_ROWS`): 8 MMA tiles of 8 rows.
pub const DECODE_ITEM_ROWS: usize = 64;
/// Rows of one tiled item (`MMA_BM` = `WG_BM`).
pub const TILE_ROWS: usize = 128;
/// Threads of a decode CTA (`DECODE_THREADS`).
pub const DECODE_THREADS: u32 = 128;
/// k per decode step: 4 lanes x 8 elements (`DECODE_K_STEP`).
pub const DECODE_K_STEP: usize = 32;
/// Decode steps whose weight loads are in flight together (`DECODE_UNROLL`).
pub const DECODE_UNROLL: usize = 4;
/// CTAs per SM the decode kernels' register budget must allow (`DECODE_MIN_CTAS`).
pub const DECODE_MIN_CTAS: usize = 4;
/// CTAs per SM the decode chain's GEMM 1 is built for (`DECODE_CHAIN_MIN_CTAS`: 168
/// registers; its row indices and conversions do not fit the 128 of
/// [`DECODE_MIN_CTAS`] without spills).
pub const DECODE_CHAIN_MIN_CTAS: usize = 3;
/// Act columns of a decode GEMM 1 CTA (`DECODE_UP_COLUMNS`).
pub const DECODE_UP_COLUMNS: usize = 32;
/// Output columns of a decode GEMM 2 CTA (`DECODE_DOWN_COLUMNS`).
pub const DECODE_DOWN_COLUMNS: usize = 64;
/// Threads of an `mma.sync` CTA (`MMA_THREADS`).
pub const MMA_THREADS: u32 = 256;
/// Act columns of an `mma.sync` GEMM 1 CTA (`MMA_BN / 2`).
pub const MMA_UP_COLUMNS: usize = 64;
/// Output columns of an `mma.sync` GEMM 2 CTA (`MMA_BN`).
pub const MMA_DOWN_COLUMNS: usize = 128;
/// k of one `mma.sync` stage (`MMA_BK`).
pub const MMA_BK: usize = 32;
/// Stages of the `mma.sync` pipeline (`MMA_STAGES`).
pub const MMA_STAGES: usize = 3;
/// Dynamic shared memory of the `mma.sync` kernels (`MMA_SHARED_BYTES`: 3 stages of 16 KB).
pub const MMA_SHARED_BYTES: usize = MMA_STAGES * (TILE_ROWS + MMA_DOWN_COLUMNS) * MMA_BK * 2;
/// Threads of a `wgmma` CTA (`WG_THREADS`: two warpgroups).
pub const WG_THREADS: u32 = 256;
/// Act columns of a `wgmma` GEMM 1 CTA (`WG_BN / 2`).
pub const WG_UP_COLUMNS: usize = 128;
/// Output columns of a `wgmma` GEMM 2 CTA (`WG_BN`).
pub const WG_DOWN_COLUMNS: usize = 256;
/// k of one `wgmma` stage (`WG_BK`).
pub const WG_BK: usize = 64;
/// Stages of the `wgmma` pipeline (`WG_STAGES`).
pub const WG_STAGES: usize = 4;
/// Alignment of the `wgmma` stages in shared memory (`WG_ALIGN`: the 128-byte swizzle's
/// 1024-byte atoms).
pub const WG_ALIGN: usize = 1024;
/// Dynamic shared memory of the `wgmma` kernels (`WG_SHARED_BYTES`: 4 stages of 48 KB and
/// 1 KB to align them).
pub const WG_SHARED_BYTES: usize = WG_STAGES * (TILE_ROWS + WG_DOWN_COLUMNS) * WG_BK * 2 + WG_ALIGN;
/// Threads of a warp-specialised CTA (`WS_THREADS`: a producer and two consumer
/// warpgroups).
pub const WS_THREADS: u32 = 384;
/// Stages of the warp-specialised ring (`WS_STAGES`: 4 of 48 KB).
pub const WS_STAGES: usize = 4;
/// CTAs of the persistent warp-specialised grid at most (`WS_CTAS`: the SMs of an
/// H100 / H200 SXM).
pub const WS_CTAS: usize = 132;
/// Rows of one A box of the warp-specialised kernels (`WS_HALF_ROWS`): a consumer's rows.
pub const WS_HALF_ROWS: usize = 64;
/// Rows of one weight box (`WS_B_BOX_ROWS`).
pub const WS_B_BOX_ROWS: usize = 128;
/// Bytes after the stages for the ring's mbarriers (`WS_BARRIER_BYTES`).
pub const WS_BARRIER_BYTES: usize = 128;
/// Arrivals that release a stage: every consumer warp (`WS_CONSUMER_WARPS`).
pub const WS_CONSUMER_WARPS: usize = 8;
/// Registers per thread the producer warpgroup keeps (`WS_PRODUCER_REGS`).
pub const WS_PRODUCER_REGS: usize = 40;
/// Registers per thread the consumer warpgroups take (`WS_CONSUMER_REGS`).
pub const WS_CONSUMER_REGS: usize = 232;
/// Dynamic shared memory of the warp-specialised kernels (`WS_SHARED_BYTES`: 4 stages of
/// 48 KB, 1 KB to align them, the mbarriers).
pub const WS_SHARED_BYTES: usize = WS_STAGES * (TILE_ROWS + WG_DOWN_COLUMNS) * WG_BK * 2 + WG_ALIGN + WS_BARRIER_BYTES;

/// Threads of a streamed decode CTA (`STREAM_THREADS`: 4 compute warps and a producer).
pub const STREAM_THREADS: u32 = 160;
/// Stages of the streamed decode ring (`STREAM_STAGES`).
pub const STREAM_STAGES: usize = 4;
/// k per streamed decode stage (`STREAM_BK`: 128 bytes of bf16, the swizzle's span).
pub const STREAM_BK: usize = 64;
/// Weight rows per streamed decode CTA (`STREAM_W_ROWS`: GEMM 1's 32 gate + 32 up rows,
/// GEMM 2's 64 down rows), loaded as two boxes of `STREAM_W_BOX_ROWS`.
pub const STREAM_W_ROWS: usize = 64;
/// Rows of one weight box of the streamed decode kernels (`STREAM_W_BOX_ROWS`).
pub const STREAM_W_BOX_ROWS: usize = 32;
/// Rows of one item box of the streamed decode kernels (`STREAM_X_BOX_ROWS`: one MMA tile).
pub const STREAM_X_BOX_ROWS: usize = 8;
/// Bytes after the streamed decode stages for its mbarriers (`STREAM_BARRIER_BYTES`).
pub const STREAM_BARRIER_BYTES: usize = 64;
/// CTAs per SM the streamed decode kernels are built for (`STREAM_MIN_CTAS`).
pub const STREAM_MIN_CTAS: usize = 3;
/// Dynamic shared memory of the streamed decode kernels (`STREAM_SHARED_BYTES`: 4 stages of
/// 8 KB of weights and up to 8 KB of item rows, 1 KB to align them, the mbarriers).
pub const STREAM_SHARED_BYTES: usize =
    STREAM_STAGES * (STREAM_W_ROWS + DECODE_ITEM_ROWS) * STREAM_BK * 2 + WG_ALIGN + STREAM_BARRIER_BYTES;

/// The persistent grid of the warp-specialised kernels for `tiles` tiles (work items x
/// column blocks): one CTA per tile up to [`WS_CTAS`].
pub fn ws_grid(tiles: usize) -> usize {
    tiles.min(WS_CTAS)
}

/// `H` must be a multiple of this.
pub const HIDDEN_MULTIPLE: usize = 256;
/// `I` must be a multiple of this.
pub const INTER_MULTIPLE: usize = 128;
/// Words of one work item (`GemmItem`: slot, first row, rows, padding).
pub const ITEM_WORDS: usize = 4;
/// `item_counts[COUNT_DECODE]`: decode items written.
pub const COUNT_DECODE: usize = 0;
/// `item_counts[COUNT_TILED]`: tiled items written.
pub const COUNT_TILED: usize = 1;
/// `item_counts[COUNT_OVERFLOW]`: 1 if a list was too small.
pub const COUNT_OVERFLOW: usize = 2;
const MAX_GRID_Y: usize = crate::cuda::launch::MAX_GRID.1;

/// Which kernels run the slots with many rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TiledKernel {
    /// `wgmma` (Hopper, `sm_90a` only).
    Wgmma,
    /// `mma.sync` (any card from `sm_80` on).
    Mma,
    /// The second generation for Hopper (`sm_90a` only): a TMA producer warp feeding two
    /// `wgmma` consumer warpgroups through an mbarrier ring, on a persistent grid
    /// (`cuda/expert_gemm_ws.cu`). Same results, bit for bit, as [`TiledKernel::Wgmma`]; not
    /// the default until a device run has measured it.
    WarpSpecialized,
}

impl TiledKernel {
    /// The kernel file.
    pub fn source(self) -> &'static KernelSource {
        match self {
            TiledKernel::Wgmma => &WGMMA,
            TiledKernel::Mma => &MMA,
            TiledKernel::WarpSpecialized => &WS,
        }
    }
}

/// Which kernels run the slots with few rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodeKernel {
    /// Weights streamed through registers (`cuda/expert_gemm_decode.cu`, any card from
    /// `sm_80` on).
    Registers,
    /// The second generation for Hopper (`sm_90a` only): weights streamed by TMA through a
    /// ring of shared-memory stages with an L2 evict-first hint (`cuda/expert_gemm_stream.cu`).
    /// Not the default until a device run has measured it.
    Stream,
}

impl DecodeKernel {
    /// The kernel file.
    pub fn source(self) -> &'static KernelSource {
        match self {
            DecodeKernel::Registers => &DECODE,
            DecodeKernel::Stream => &STREAM,
        }
    }
}

/// How the expert GEMMs split the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmOptions {
    /// Slots with at most this many rows (capped at [`DECODE_ITEM_ROWS`]) run the decode
    /// kernels; 0 sends every slot to the tiled kernels.
    pub decode_max_rows: usize,
    /// The tiled kernels.
    pub tiled: TiledKernel,
    /// The decode kernels.
    pub decode: DecodeKernel,
    /// Every slot through the decode kernels in chunks of [`DECODE_ITEM_ROWS`] rows: a
    /// token's output does not depend on the other tokens of the batch.
    pub batch_invariant: bool,
    /// A whole layer ([`crate::cuda::layer::CudaMoeLayer`]) of at most
    /// [`crate::cuda::chain::CHAIN_MAX_TOKENS`] tokens runs as the three-launch decode chain
    /// ([`crate::cuda::chain`]; the register decode kernels, whatever [`GemmOptions::decode`]
    /// says), where the decode regime takes every slot. Same bits as the separate launches.
    pub decode_chain: bool,
    /// A layer's router logits on tensor cores for batches of more than
    /// [`crate::cuda::moe::LOGIT_E1_MAX_TOKENS`] tokens
    /// ([`crate::cuda::moe::LogitsKernel::TensorCores`]), except in the batch-invariant mode.
    pub tensor_core_logits: bool,
    /// GEMM 1 of a layer reads bf16 hidden states through the permutation, with no gather
    /// launch, where its kernels can ([`GemmOptions::reads_hidden`]: the register decode
    /// kernels and the `wgmma` or `mma.sync` tiles). The same bits as gathering first.
    pub read_hidden: bool,
}

impl GemmOptions {
    /// The fastest choice for `gpu`: decode kernels up to [`DECODE_ITEM_ROWS`] rows per
    /// slot, `wgmma` tiles on `sm_90a`, `mma.sync` tiles elsewhere; not batch-invariant.
    pub fn for_device(gpu: &GpuContext) -> Self {
        Self::for_arch(gpu.target())
    }

    /// The fastest choice for a device of target `arch`: `wgmma` tiles where the `wgmma`
    /// file compiles ([`WGMMA`]'s minimum architecture), `mma.sync` elsewhere.
    pub fn for_arch(arch: Arch) -> Self {
        let tiled = if arch.supports(WGMMA.min_arch) { TiledKernel::Wgmma } else { TiledKernel::Mma };
        GemmOptions {
            decode_max_rows: DECODE_ITEM_ROWS,
            tiled,
            decode: DecodeKernel::Registers,
            batch_invariant: false,
            decode_chain: false,
            tensor_core_logits: false,
            read_hidden: false,
        }
    }

    /// The second-generation Hopper kernels (`sm_90a`): [`DecodeKernel::Stream`] and
    /// [`TiledKernel::WarpSpecialized`], with the split of [`GemmOptions::for_arch`], the
    /// decode chain for small batches ([`GemmOptions::decode_chain`]) and the router logits on
    /// tensor cores for large ones ([`GemmOptions::tensor_core_logits`]).
    pub fn second_generation() -> Self {
        GemmOptions {
            tiled: TiledKernel::WarpSpecialized,
            decode: DecodeKernel::Stream,
            decode_chain: true,
            tensor_core_logits: true,
            ..Self::for_arch(Arch::SM_90A)
        }
    }

    /// The first generation's kernels launched as few times as they allow (`sm_90a`, or
    /// `mma.sync` tiles elsewhere): [`GemmOptions::for_arch`] with the decode chain, GEMM 1
    /// reading the hidden states ([`GemmOptions::read_hidden`]) and the router logits on
    /// tensor cores.
    pub fn fewer_launches(arch: Arch) -> Self {
        GemmOptions { decode_chain: true, tensor_core_logits: true, read_hidden: true, ..Self::for_arch(arch) }
    }

    /// Whether GEMM 1 under these options reads hidden states of `dtype` through the
    /// permutation (no gather launch): [`GemmOptions::read_hidden`], bf16 hidden states, the
    /// register decode kernels and the `wgmma` or `mma.sync` tiles, or no tiles (the
    /// batch-invariant mode). Not the TMA-fed kernels: a tensor map's box is consecutive rows.
    pub fn reads_hidden(&self, dtype: Dtype) -> bool {
        self.read_hidden
            && dtype == Dtype::Bf16
            && self.decode == DecodeKernel::Registers
            && (self.tiled != TiledKernel::WarpSpecialized || self.batch_invariant)
    }

    /// The kernel files these options launch.
    pub fn sources(&self) -> [&'static KernelSource; 3] {
        [&SCHEDULE, self.decode.source(), self.tiled.source()]
    }

    /// The router kernel these options ask of a layer (see
    /// [`GemmOptions::tensor_core_logits`]).
    pub fn logits_kernel(&self) -> crate::cuda::moe::LogitsKernel {
        if self.tensor_core_logits && !self.batch_invariant {
            crate::cuda::moe::LogitsKernel::TensorCores
        } else {
            crate::cuda::moe::LogitsKernel::CudaCores
        }
    }

    /// The batch-invariant mode (see the module docs).
    pub fn batch_invariant(self) -> Self {
        GemmOptions { batch_invariant: true, ..self }
    }

    /// Item-list sizes that hold every schedule of `rows` permuted rows over `n_slots`
    /// slots: `(decode, tiled)`. A slot with `c` rows makes at most one decode item, or
    /// `ceil(c / chunk)` items, and at most `rows / (decode_max_rows + 1)` slots exceed
    /// the decode limit; so the bounds are exact sums, not guesses.
    pub fn capacities(&self, rows: usize, n_slots: usize) -> (usize, usize) {
        let used = n_slots.min(rows);
        if self.batch_invariant {
            return (if rows == 0 { 0 } else { rows.div_ceil(DECODE_ITEM_ROWS) + used }, 0);
        }
        let limit = self.decode_max_rows.min(DECODE_ITEM_ROWS);
        let decode = if limit == 0 { 0 } else { used };
        let big = n_slots.min(rows / (limit + 1));
        let tiled = if big == 0 { 0 } else { rows.div_ceil(TILE_ROWS) + big };
        (decode, tiled)
    }

    /// `(decode_max_rows, tile_rows)` as the schedule kernel takes them.
    pub fn schedule_args(&self) -> (u32, u32) {
        if self.batch_invariant {
            (DECODE_ITEM_ROWS as u32, 0)
        } else {
            (self.decode_max_rows.min(DECODE_ITEM_ROWS) as u32, TILE_ROWS as u32)
        }
    }
}

/// The expert weights on the device, in the contract's stacked layout (bf16).
#[derive(Debug)]
pub struct DeviceExpertWeights {
    /// `[E + n_shared, 2I, H]`: per slot, gate rows then up rows.
    pub gate_up: DeviceBuffer<bf16>,
    /// `[E + n_shared, H, I]`.
    pub down: DeviceBuffer<bf16>,
    /// `H`.
    pub hidden_size: usize,
    /// `I`.
    pub intermediate_size: usize,
    /// `E + n_shared`.
    pub n_slots: usize,
}

/// Checks that the kernels take `H` and `I`.
pub fn check_shape(hidden: usize, inter: usize) -> Result<(), MoeError> {
    if hidden == 0 || !hidden.is_multiple_of(HIDDEN_MULTIPLE) || inter == 0 || !inter.is_multiple_of(INTER_MULTIPLE) {
        return Err(MoeError::Unsupported(format!(
            "the CUDA expert kernels need hidden_size % {HIDDEN_MULTIPLE} == 0 and moe_intermediate_size % \
             {INTER_MULTIPLE} == 0; got {hidden} and {inter}"
        )));
    }
    Ok(())
}

impl DeviceExpertWeights {
    /// Uploads the expert weights of `weights` (bf16 only: the kernels' contract).
    pub fn upload(gpu: &GpuContext, weights: &MoeWeights) -> Result<Self, CudaError> {
        let cfg = weights.config();
        let (h, i, slots) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_slots());
        check_shape(h, i)?;
        let (TensorView::Bf16(gate_up), TensorView::Bf16(down)) = (weights.gate_up(), weights.down()) else {
            return Err(MoeError::Unsupported(format!(
                "the CUDA expert kernels take bf16 weights; this layer's are {:?}",
                weights.dtype()
            ))
            .into());
        };
        Ok(DeviceExpertWeights {
            gate_up: DeviceBuffer::upload(gpu, "experts.gate_up_proj", gate_up, &[slots, 2 * i, h])?,
            down: DeviceBuffer::upload(gpu, "experts.down_proj", down, &[slots, h, i])?,
            hidden_size: h,
            intermediate_size: i,
            n_slots: slots,
        })
    }

    /// Bytes of the expert weights.
    pub fn bytes(&self) -> usize {
        2 * (self.gate_up.len() + self.down.len())
    }
}

/// The work lists and the activation of one batch of `rows` permuted rows.
#[derive(Debug)]
pub struct GemmWorkspace {
    /// Permuted rows `R`.
    pub rows: usize,
    /// Items the decode list holds.
    pub decode_capacity: usize,
    /// Items the tiled list holds.
    pub tiled_capacity: usize,
    /// Decode items, 4 words each (slot, first row, rows, 0).
    pub decode_items: DeviceBuffer<u32>,
    /// Tiled items, 4 words each.
    pub tiled_items: DeviceBuffer<u32>,
    /// `[decode items, tiled items, overflow flag]`.
    pub item_counts: DeviceBuffer<u32>,
    /// The SwiGLU activation `[R, I]` (bf16).
    pub act: DeviceBuffer<bf16>,
    /// Expert slots of the weights the workspace was sized for.
    pub n_slots: usize,
    options: GemmOptions,
}

impl GemmWorkspace {
    /// The options the lists were sized for.
    pub fn options(&self) -> GemmOptions {
        self.options
    }

    /// Reads `(decode items, tiled items)` (waits), failing if a list overflowed.
    pub fn read_item_counts(&self) -> Result<(usize, usize), CudaError> {
        let counts = self.item_counts.download()?;
        if counts[2] != 0 {
            return Err(MoeError::Unsupported(format!(
                "expert schedule overflow: item lists of {} / {} items were too small (a bug)",
                self.decode_capacity, self.tiled_capacity
            ))
            .into());
        }
        Ok((counts[0] as usize, counts[1] as usize))
    }
}

pub(crate) fn grid_y(what: &str, n: usize) -> Result<u32, CudaError> {
    if n > MAX_GRID_Y {
        return Err(
            MoeError::Limit { what: format!("{what}: work items (grid y)"), needed: n, limit: MAX_GRID_Y }.into()
        );
    }
    Ok(n as u32)
}

// ---- the launches, from sizes and device addresses ----------------------------------------
//
// Shared by the GPU wrapper below and the CPU emulator (tests/emulator).

/// Device addresses of a GEMM workspace's buffers, with its list capacities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GemmPtrs {
    /// Decode items (`decode_capacity` x 4 words).
    pub decode_items: u64,
    /// Tiled items (`tiled_capacity` x 4 words).
    pub tiled_items: u64,
    /// `[decode items, tiled items, overflow]`.
    pub item_counts: u64,
    /// The activation `[R, I]` (bf16).
    pub act: u64,
    /// Items the decode list holds.
    pub decode_capacity: usize,
    /// Items the tiled list holds.
    pub tiled_capacity: usize,
    /// Permuted rows `R` (the gathered rows' and the activation's; the tensor maps of the
    /// warp-specialised kernels bound them).
    pub rows: usize,
    /// Expert slots of the weights (`E + n_shared`: the weight tensor maps' bound).
    pub n_slots: usize,
}

fn decode_kernels(options: &GemmOptions) -> (&'static KernelDecl, &'static KernelDecl) {
    match options.decode {
        DecodeKernel::Registers => (&source::UP_DECODE, &source::DOWN_DECODE),
        DecodeKernel::Stream => (&source::UP_STREAM, &source::DOWN_STREAM),
    }
}

/// Whether the launch over the decode items (`tiled` false) or the tiled ones takes tensor
/// maps of its operands.
fn takes_maps(options: &GemmOptions, tiled: bool) -> bool {
    if tiled { options.tiled == TiledKernel::WarpSpecialized } else { options.decode == DecodeKernel::Stream }
}

fn tiled_kernels(options: &GemmOptions) -> (&'static KernelDecl, &'static KernelDecl) {
    match options.tiled {
        TiledKernel::Wgmma => (&source::UP_WGMMA, &source::DOWN_WGMMA),
        TiledKernel::Mma => (&source::UP_MMA, &source::DOWN_MMA),
        TiledKernel::WarpSpecialized => (&source::UP_WS, &source::DOWN_WS),
    }
}

/// The TMA-fed kernels address rows by signed 32-bit coordinates: `R` and
/// every slot's weight rows must fit.
fn check_tma_coordinates(options: &GemmOptions, ws: &GemmPtrs, hidden: usize, inter: usize) -> Result<(), CudaError> {
    if !takes_maps(options, false) && !takes_maps(options, true) {
        return Ok(());
    }
    let limit = i32::MAX as usize;
    let weight_rows = ws.n_slots.saturating_mul((2 * inter).max(hidden));
    for (what, needed) in [("permuted rows", ws.rows), ("stacked weight rows", weight_rows)] {
        if needed > limit {
            return Err(MoeError::Limit { what: format!("TMA expert GEMM coordinates: {what}"), needed, limit }.into());
        }
    }
    Ok(())
}

/// The tensor map of the gathered rows or the activation `[R, width]` at `base`: boxes of
/// one consumer's 64 rows (tiled) or one MMA tile's 8 rows (decode).
fn rows_map(base: u64, ws: &GemmPtrs, width: usize, tiled: bool) -> Arg {
    let box_rows = if tiled { WS_HALF_ROWS } else { STREAM_X_BOX_ROWS };
    Arg::TensorMap(TensorMapSpec::bf16_rows(base, ws.rows, width, box_rows as u32))
}

/// The tensor map of stacked weights, `rows_per_slot` rows of `width` per slot: boxes of
/// 128 rows (tiled) or 32 (decode).
fn weights_map(base: u64, ws: &GemmPtrs, rows_per_slot: usize, width: usize, tiled: bool) -> Arg {
    let box_rows = if tiled { WS_B_BOX_ROWS } else { STREAM_W_BOX_ROWS };
    Arg::TensorMap(TensorMapSpec::bf16_rows(base, ws.n_slots * rows_per_slot, width, box_rows as u32))
}

/// The schedule of `n_slots` slots from `expert_offsets [n_slots + 1]`.
pub fn schedule_launch(
    options: &GemmOptions,
    expert_offsets: u64,
    n_slots: usize,
    ws: &GemmPtrs,
) -> Result<Launch, CudaError> {
    let mut args = vec![Arg::Ptr(expert_offsets), Arg::U32(n_slots as u32)];
    args.extend(schedule_tail_args(options, ws));
    Launch::new(&source::EXPERT_SCHEDULE, &LaunchDims::default(), args)
}

/// The arguments the schedule kernel ends with (the rules and the item lists), which the
/// decode chain's router also ends with.
pub(crate) fn schedule_tail_args(options: &GemmOptions, ws: &GemmPtrs) -> [Arg; 7] {
    let (decode_max_rows, tile_rows) = options.schedule_args();
    [
        Arg::U32(decode_max_rows),
        Arg::U32(tile_rows),
        Arg::U32(ws.decode_capacity as u32),
        Arg::U32(ws.tiled_capacity as u32),
        Arg::Ptr(ws.decode_items),
        Arg::Ptr(ws.tiled_items),
        Arg::Ptr(ws.item_counts),
    ]
}

/// The arguments of GEMM 1 reading the hidden states through the permutation (every such
/// kernel, the decode chain's included), for the item list at `items`.
#[allow(clippy::too_many_arguments)] // GEMM 1's operands and the permutation
pub(crate) fn up_hidden_args(
    hidden_states: u64,
    row_pairs: u64,
    slots_per_token: usize,
    gate_up: u64,
    items: u64,
    hidden: usize,
    inter: usize,
    ws: &GemmPtrs,
) -> Vec<Arg> {
    vec![
        Arg::Ptr(hidden_states),
        Arg::Ptr(row_pairs),
        Arg::U32(slots_per_token as u32),
        Arg::Ptr(gate_up),
        Arg::Ptr(items),
        Arg::Ptr(ws.item_counts),
        Arg::U32(hidden as u32),
        Arg::U32(inter as u32),
        Arg::Ptr(ws.act),
    ]
}

/// GEMM 1 + SwiGLU, `act [R, I]` from `x [R, H]`: the decode launch, then the tiled one
/// (each only when its list has room).
pub fn up_launches(
    options: &GemmOptions,
    x: u64,
    gate_up: u64,
    hidden: usize,
    inter: usize,
    ws: &GemmPtrs,
) -> Result<Vec<Launch>, CudaError> {
    check_shape(hidden, inter)?;
    check_tma_coordinates(options, ws, hidden, inter)?;
    let args = |items: u64, tiled: bool| {
        let operands = if takes_maps(options, tiled) {
            [rows_map(x, ws, hidden, tiled), weights_map(gate_up, ws, 2 * inter, hidden, tiled)]
        } else {
            [Arg::Ptr(x), Arg::Ptr(gate_up)]
        };
        let mut args = operands.to_vec();
        args.extend([
            Arg::Ptr(items),
            Arg::Ptr(ws.item_counts),
            Arg::U32(hidden as u32),
            Arg::U32(inter as u32),
            Arg::Ptr(ws.act),
        ]);
        args
    };
    regime_launches((decode_kernels(options).0, tiled_kernels(options).0), hidden, inter, ws, args)
}

/// GEMM 1 + SwiGLU, `act [R, I]`, with each item's rows read from the bf16 hidden states
/// `hidden_states [T, H]` through `row_pairs` (see [`GemmOptions::reads_hidden`], which the
/// caller checked): the decode launch, then the tiled one.
#[allow(clippy::too_many_arguments)] // GEMM 1's operands and the permutation
pub fn up_hidden_launches(
    options: &GemmOptions,
    hidden_states: u64,
    row_pairs: u64,
    slots_per_token: usize,
    gate_up: u64,
    hidden: usize,
    inter: usize,
    ws: &GemmPtrs,
) -> Result<Vec<Launch>, CudaError> {
    check_shape(hidden, inter)?;
    if !options.reads_hidden(Dtype::Bf16) {
        return Err(
            MoeError::Unsupported(format!("these expert kernels cannot read the hidden states: {options:?}")).into()
        );
    }
    let args = |items: u64, _tiled: bool| {
        up_hidden_args(hidden_states, row_pairs, slots_per_token, gate_up, items, hidden, inter, ws)
    };
    let tiled = if options.tiled == TiledKernel::Mma { &source::UP_MMA_HIDDEN } else { &source::UP_WGMMA_HIDDEN };
    regime_launches((&source::UP_DECODE_HIDDEN_BF16, tiled), hidden, inter, ws, args)
}

/// GEMM 2 with the routing weight, `y [R, H] = row_weights[r] * (act down^T)`.
pub fn down_launches(
    options: &GemmOptions,
    down: u64,
    row_weights: u64,
    y: u64,
    hidden: usize,
    inter: usize,
    ws: &GemmPtrs,
) -> Result<Vec<Launch>, CudaError> {
    check_shape(hidden, inter)?;
    check_tma_coordinates(options, ws, hidden, inter)?;
    let args = |items: u64, tiled: bool| {
        let operands = if takes_maps(options, tiled) {
            [rows_map(ws.act, ws, inter, tiled), weights_map(down, ws, hidden, inter, tiled)]
        } else {
            [Arg::Ptr(ws.act), Arg::Ptr(down)]
        };
        let mut args = operands.to_vec();
        args.extend([
            Arg::Ptr(row_weights),
            Arg::Ptr(items),
            Arg::Ptr(ws.item_counts),
            Arg::U32(hidden as u32),
            Arg::U32(inter as u32),
            Arg::Ptr(y),
        ]);
        args
    };
    regime_launches((decode_kernels(options).1, tiled_kernels(options).1), hidden, inter, ws, args)
}

/// One GEMM's launches: its decode kernel over the decode items and its tiled kernel over
/// the tiled items, each only when its list has room; `args` builds the arguments for an
/// item list (and whether it is the tiled kernel's).
fn regime_launches(
    (decode, tiled): (&'static KernelDecl, &'static KernelDecl),
    hidden: usize,
    inter: usize,
    ws: &GemmPtrs,
    args: impl Fn(u64, bool) -> Vec<Arg>,
) -> Result<Vec<Launch>, CudaError> {
    let dims = |items| LaunchDims { hidden, inter, items, ..LaunchDims::default() };
    let mut launches = Vec::new();
    if ws.decode_capacity > 0 {
        launches.push(Launch::new(decode, &dims(ws.decode_capacity), args(ws.decode_items, false))?);
    }
    if ws.tiled_capacity > 0 {
        launches.push(Launch::new(tiled, &dims(ws.tiled_capacity), args(ws.tiled_items, true))?);
    }
    Ok(launches)
}

impl GemmWorkspace {
    /// Its buffers' device addresses and capacities.
    pub fn ptrs(&self) -> GemmPtrs {
        GemmPtrs {
            decode_items: self.decode_items.device_ptr(),
            tiled_items: self.tiled_items.device_ptr(),
            item_counts: self.item_counts.device_ptr(),
            act: self.act.device_ptr(),
            decode_capacity: self.decode_capacity,
            tiled_capacity: self.tiled_capacity,
            rows: self.rows,
            n_slots: self.n_slots,
        }
    }
}

/// The expert GEMM kernels, compiled for and loaded on one device.
pub struct ExpertGemm {
    gpu: Arc<GpuContext>,
    options: GemmOptions,
}

impl std::fmt::Debug for ExpertGemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertGemm").field("gpu", &self.gpu).field("options", &self.options).finish_non_exhaustive()
    }
}

impl ExpertGemm {
    /// Compiles (NVRTC, cached) and loads the kernels `options` needs on `gpu`. `wgmma`
    /// needs an `sm_90a` device.
    pub fn new(gpu: &Arc<GpuContext>, options: GemmOptions) -> Result<Self, CudaError> {
        if let Some(file) = options.sources().into_iter().find(|f| !gpu.target().supports(f.min_arch)) {
            return Err(MoeError::Unsupported(format!(
                "the expert kernels of {} need an {} device; {} is {}",
                file.name,
                file.min_arch,
                gpu.info().name,
                gpu.arch()
            ))
            .into());
        }
        gpu.load(&options.sources())?;
        Ok(ExpertGemm { gpu: gpu.clone(), options })
    }

    /// The options.
    pub fn options(&self) -> GemmOptions {
        self.options
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<GpuContext> {
        &self.gpu
    }

    /// Buffers for a batch of `rows` permuted rows of `weights`' shape.
    pub fn workspace(&self, weights: &DeviceExpertWeights, rows: usize) -> Result<GemmWorkspace, CudaError> {
        let (decode_capacity, tiled_capacity) = self.options.capacities(rows, weights.n_slots);
        grid_y("decode items", decode_capacity)?;
        grid_y("tiled items", tiled_capacity)?;
        let gpu = &self.gpu;
        Ok(GemmWorkspace {
            rows,
            decode_capacity,
            tiled_capacity,
            decode_items: DeviceBuffer::zeros(gpu, &[decode_capacity, ITEM_WORDS])?,
            tiled_items: DeviceBuffer::zeros(gpu, &[tiled_capacity, ITEM_WORDS])?,
            item_counts: DeviceBuffer::zeros(gpu, &[3])?,
            act: DeviceBuffer::zeros(gpu, &[rows, weights.intermediate_size])?,
            n_slots: weights.n_slots,
            options: self.options,
        })
    }

    fn check(&self, weights: &DeviceExpertWeights, ws: &GemmWorkspace) -> Result<(), CudaError> {
        check_shape(weights.hidden_size, weights.intermediate_size)?;
        if ws.options != self.options || ws.n_slots != weights.n_slots {
            return Err(
                MoeError::Unsupported("this GEMM workspace was sized for other options or weights".into()).into()
            );
        }
        ws.act.expect_shape("activation", &[ws.rows, weights.intermediate_size])?;
        if ws.rows > u32::MAX as usize {
            return Err(MoeError::Overflow(format!("{} permuted rows do not fit 32-bit rows", ws.rows)).into());
        }
        Ok(())
    }

    fn queue(&self, launches: impl IntoIterator<Item = Launch>) -> Result<(), CudaError> {
        for launch in launches {
            // SAFETY: every caller checked the shapes of the buffers the launch addresses
            // (see each wrapper); the schedule writes items with slot < n_slots and rows
            // inside 0..R, and check_shape makes every column block and k step in bounds.
            unsafe { self.gpu.launch(&launch) }?;
        }
        Ok(())
    }

    /// Queues the schedule: work items of every slot of `expert_offsets [n_slots + 1]`.
    pub fn schedule(&self, expert_offsets: &DeviceBuffer<u32>, ws: &mut GemmWorkspace) -> Result<(), CudaError> {
        let n_slots = expert_offsets.len().saturating_sub(1);
        // expert_offsets has n_slots + 1 entries, the item lists hold their capacities (it
        // never writes past them), item_counts 3 words.
        self.queue([schedule_launch(&self.options, expert_offsets.device_ptr(), n_slots, &ws.ptrs())?])
    }

    /// Queues GEMM 1 + SwiGLU: `ws.act [R, I]` from `x [R, H]` (bf16, permuted order).
    /// Needs [`ExpertGemm::schedule`] queued first on the same `expert_offsets`.
    pub fn up(&self, weights: &DeviceExpertWeights, x: &DeviceTensor, ws: &mut GemmWorkspace) -> Result<(), CudaError> {
        self.check(weights, ws)?;
        let (h, i) = (weights.hidden_size, weights.intermediate_size);
        let DeviceTensor::Bf16(x) = x else {
            return Err(MoeError::Unsupported("the CUDA expert kernels take bf16 gathered rows".into()).into());
        };
        x.expect_shape("permuted hidden", &[ws.rows, h])?;
        // x [R, H], act [R, I], gate_up [n_slots, 2I, H] (shapes checked).
        self.queue(up_launches(&self.options, x.device_ptr(), weights.gate_up.device_ptr(), h, i, &ws.ptrs())?)
    }

    /// Queues GEMM 1 + SwiGLU: `ws.act [R, I]` from the bf16 hidden states `hidden [T, H]`
    /// through the permutation `row_pairs [R]` (`slots_per_token` pairs per token), with no
    /// gathered copy: where [`GemmOptions::reads_hidden`] holds.
    pub fn up_from_hidden(
        &self,
        weights: &DeviceExpertWeights,
        hidden: &DeviceTensor,
        row_pairs: &DeviceBuffer<u32>,
        slots_per_token: usize,
        ws: &mut GemmWorkspace,
    ) -> Result<(), CudaError> {
        self.check(weights, ws)?;
        let (h, i) = (weights.hidden_size, weights.intermediate_size);
        let DeviceTensor::Bf16(x) = hidden else {
            return Err(MoeError::Unsupported("GEMM 1 reads bf16 hidden states only".into()).into());
        };
        if slots_per_token == 0 || !ws.rows.is_multiple_of(slots_per_token) {
            return Err(MoeError::shape("permuted rows", &[ws.rows], &[ws.rows / slots_per_token.max(1)]).into());
        }
        x.expect_shape("hidden", &[ws.rows / slots_per_token, h])?;
        row_pairs.expect_shape("row_pairs", &[ws.rows])?;
        // hidden [T, H], row_pairs [R] with values < T * slots_per_token (a permutation the
        // router or the permutation kernels wrote), act [R, I], gate_up [n_slots, 2I, H].
        self.queue(up_hidden_launches(
            &self.options,
            x.device_ptr(),
            row_pairs.device_ptr(),
            slots_per_token,
            weights.gate_up.device_ptr(),
            h,
            i,
            &ws.ptrs(),
        )?)
    }

    /// Queues GEMM 2 with the routing weight: `y [R, H] = row_weights[r] * (act down^T)`.
    pub fn down(
        &self,
        weights: &DeviceExpertWeights,
        row_weights: &DeviceBuffer<f32>,
        ws: &GemmWorkspace,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<(), CudaError> {
        self.check(weights, ws)?;
        let (h, i) = (weights.hidden_size, weights.intermediate_size);
        row_weights.expect_shape("row weights", &[ws.rows])?;
        y.expect_shape("expert output rows", &[ws.rows, h])?;
        // act [R, I], y [R, H], row_weights [R], down [n_slots, H, I] (checked).
        self.queue(down_launches(
            &self.options,
            weights.down.device_ptr(),
            row_weights.device_ptr(),
            y.device_ptr(),
            h,
            i,
            &ws.ptrs(),
        )?)
    }

    /// Queues the whole grouped step: schedule, GEMM 1, GEMM 2 (no host sync).
    pub fn run(
        &self,
        weights: &DeviceExpertWeights,
        expert_offsets: &DeviceBuffer<u32>,
        x: &DeviceTensor,
        row_weights: &DeviceBuffer<f32>,
        ws: &mut GemmWorkspace,
        y: &mut DeviceBuffer<f32>,
    ) -> Result<(), CudaError> {
        expert_offsets.expect_shape("expert_offsets", &[weights.n_slots + 1])?;
        if x.dtype() != Dtype::Bf16 {
            return Err(MoeError::Unsupported("the CUDA expert kernels take bf16 gathered rows".into()).into());
        }
        self.schedule(expert_offsets, ws)?;
        self.up(weights, x, ws)?;
        self.down(weights, row_weights, ws, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(batch_invariant: bool, decode_max_rows: usize) -> GemmOptions {
        GemmOptions {
            decode_max_rows,
            tiled: TiledKernel::Mma,
            decode: DecodeKernel::Registers,
            batch_invariant,
            decode_chain: false,
            tensor_core_logits: false,
            read_hidden: false,
        }
    }

    /// The items the schedule kernel writes, computed on the host (its documented rule).
    fn items(opts: &GemmOptions, counts: &[usize]) -> (usize, usize) {
        let (limit, tile) = opts.schedule_args();
        let (mut decode, mut tiled) = (0, 0);
        for &c in counts {
            if c == 0 {
            } else if c <= limit as usize {
                decode += 1;
            } else if tile > 0 {
                tiled += c.div_ceil(tile as usize);
            } else {
                decode += c.div_ceil(DECODE_ITEM_ROWS);
            }
        }
        (decode, tiled)
    }

    #[test]
    fn capacities_hold_every_schedule() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for opts in [options(false, 64), options(false, 0), options(false, 7), options(true, 64)] {
            for _ in 0..2000 {
                let n_slots = rng.random_range(1..140);
                let rows = rng.random_range(0..3000);
                // Random counts summing to `rows`, sometimes all in one slot.
                let mut counts = vec![0usize; n_slots];
                if rng.random_bool(0.2) {
                    counts[rng.random_range(0..n_slots)] = rows;
                } else {
                    for _ in 0..rows {
                        counts[rng.random_range(0..n_slots)] += 1;
                    }
                }
                let (decode, tiled) = items(&opts, &counts);
                let (dc, tc) = opts.capacities(rows, n_slots);
                assert!(decode <= dc && tiled <= tc, "{opts:?} {counts:?}: {decode}/{tiled} items, room {dc}/{tc}");
            }
        }
    }

    #[test]
    fn small_batches_launch_no_tiled_kernel() {
        // T = 1 of dots.llm1: 8 rows over 130 slots, one row each.
        assert_eq!(options(false, 64).capacities(8, 130), (8, 0));
        assert_eq!(options(false, 64).capacities(0, 130), (0, 0));
        assert_eq!(options(true, 64).capacities(0, 130), (0, 0));
        assert_eq!(options(false, 0).capacities(8, 130), (0, 1 + 8));
    }

    #[test]
    fn work_items_past_the_grid_are_a_limit() {
        assert_eq!(grid_y("decode items", MAX_GRID_Y).unwrap(), MAX_GRID_Y as u32);
        match grid_y("decode items", MAX_GRID_Y + 1) {
            Err(CudaError::Moe(MoeError::Limit { what, needed, limit })) => {
                assert_eq!((needed, limit), (MAX_GRID_Y + 1, MAX_GRID_Y));
                assert!(what.starts_with("decode items"), "{what}");
            }
            other => panic!("expected a Limit error, got {other:?}"),
        }
    }

    #[test]
    fn shapes() {
        assert!(check_shape(4096, 1408).is_ok());
        assert!(check_shape(7168, 2048).is_ok());
        assert!(check_shape(4096 + 64, 1408).is_err());
        assert!(check_shape(4096, 1408 + 32).is_err());
        assert!(check_shape(0, 128).is_err());
    }
}
