//! The MoE kernels on the device: safe wrappers that validate shapes and limits once and
//! queue the launches on the context's stream.
//!
//! Nothing here waits for the device: counts, offsets and every intermediate stay in
//! device buffers ([`RoutingWorkspace`]), so routing, permutation, gather and combine can be
//! captured in a CUDA graph. Only the `download`/`read_*` helpers of [`RoutingWorkspace`] copy
//! results back (and wait).
//!
//! The pipeline for `T` tokens, `slots_per_token = k + n_shared`:
//!
//! ```text
//! moe_router_logits_*   hidden [T,H], gate [E,H]          -> logits [T,E]
//! moe_router_select     logits, bias                      -> slot_ids, slot_weights [T,slots],
//!                                                            pair_ranks [T*slots_per_token], tile_counts,
//!                                                            tile_offsets, expert_offsets [n_slots+1]
//! moe_permute_scatter   ids, ranks, tile_offsets          -> row_pairs, pair_rows, row_weights
//! moe_gather_*          hidden, row_pairs                 -> x_perm [T*slots_per_token, H]
//!   (expert GEMMs)                                        -> expert_rows [T*slots_per_token, H], weighted
//! moe_combine           expert_rows, pair_rows            -> out [T, H]
//! ```
//!
//! `moe_permute_rank` replaces the selection's ranking step when slot ids come from
//! elsewhere ([`RouteCombineKernels::permute`]).
//!
//! The selection's (or the ranking's) CTA that finishes last scans the per-tile counts
//! into `tile_offsets` and `expert_offsets` (it counts arrivals in `tiles_done`, which is 0
//! between launches), so each scatter CTA reads one row of `n_slots` offsets: the
//! permutation's work is `O(n_tiles * n_slots)` beyond the pairs themselves.

use crate::config::{RouterConfig, Scoring};
use crate::cuda::buffer::{DeviceBuffer, DeviceTensor};
use crate::cuda::context::GpuContext;
use crate::cuda::error::CudaError;
use crate::cuda::launch::{KernelArg as Arg, KernelDecl, Launch, LaunchDims, Launcher};
use crate::cuda::source;
use crate::cuda::workspace::{DeviceRouter, RoutingWorkspace, StatusSource};
use crate::error::MoeError;
use crate::tensor::Dtype;

/// Tokens per permutation tile (`TILE_TOKENS` in `cuda/include/common.cuh`).
pub const TILE_TOKENS: usize = 32;
/// Threads of every tile block: router selection, rank, scatter (`TILE_THREADS`).
pub const TILE_THREADS: u32 = 256;
/// Warps of a tile block (`TILE_WARPS`).
pub const TILE_WARPS: usize = TILE_THREADS as usize / 32;
/// Threads of a router-logits block (`LOGIT_THREADS`).
pub const LOGIT_THREADS: u32 = 128;
/// Up to this many tokens the router logits run one CTA per expert (`_e1`), above it one
/// CTA per 4 experts (`_e4`); both sum in the same order.
pub const LOGIT_E1_MAX_TOKENS: usize = 64;
/// Tokens of a router-logits block (`LOGIT_TOKENS`).
pub const LOGIT_TOKENS: usize = 8;
/// Threads of a tensor-core router-logits block (`TC_THREADS`).
pub const TC_THREADS: u32 = 128;
/// Tokens of a tensor-core router-logits block (`TC_TOKENS`: 16 per warp).
pub const TC_TOKENS: usize = 64;
/// Experts of a tensor-core router-logits block (`TC_EXPERTS`: 8 tiles of 8).
pub const TC_EXPERTS: usize = 64;
/// `k` per step of the tensor-core router logits (`TC_K_STEP`): `H` must be a multiple.
pub const TC_K_STEP: usize = 32;

/// Which kernel computes the router logits of a batch of more than
/// [`LOGIT_E1_MAX_TOKENS`] tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LogitsKernel {
    /// CUDA cores (`moe_router_logits_*_e4`): f32 fused multiply-adds in one order for every
    /// batch size, so a token's logits never depend on its batch.
    #[default]
    CudaCores,
    /// Tensor cores (`moe_router_logits_tc_*`, `mma.sync`, f32 accumulation, f32 operands
    /// split into two bf16 parts) within the rounding contract of
    /// [`tensor_core_logit_bound`]; a token's logits then depend on whether its batch has
    /// more than [`LOGIT_E1_MAX_TOKENS`] tokens. Where `H` is not a multiple of
    /// [`TC_K_STEP`] or a row is not 16-byte aligned the CUDA-core kernel runs instead.
    TensorCores,
}

/// The rounding contract of the tensor-core router logits: `|logit - exact| <= bound * S`
/// with `S = sum_i |x_i w_i|` and `exact` the logit in exact arithmetic, for hidden size
/// `hidden` and the operands that are f32 (each split into two bf16 parts, whose dropped
/// remainder is at most `2^-16` of the value). Per MMA (16 products added to the
/// accumulator) at most `2^-21` of the magnitudes so far, `hidden / 16` MMAs per term; plus
/// `2^-14` per split operand.
pub fn tensor_core_logit_bound(hidden: usize, x_f32: bool, w_f32: bool) -> f32 {
    let splits = usize::from(x_f32) + usize::from(w_f32);
    let mmas = hidden.div_ceil(16) * (1 + splits);
    mmas as f32 * 2f32.powi(-21) + splits as f32 * 2f32.powi(-14)
}
/// Threads of a gather block (`GATHER_THREADS`).
pub const GATHER_THREADS: u32 = 256;
/// Threads of a combine block (`COMBINE_THREADS`).
pub const COMBINE_THREADS: u32 = 256;
/// Most slots per token the combine kernel takes (`COMBINE_MAX_SLOTS`).
pub const COMBINE_MAX_SLOTS: usize = 64;
/// Most expert groups the selection kernel takes (one per lane).
pub const MAX_GROUPS: usize = 32;
/// Dynamic shared memory the kernels may ask for without opting in to more.
pub const MAX_SHARED_BYTES: usize = 48 * 1024;

/// Permutation tiles for `tokens` tokens.
pub fn tiles(tokens: usize) -> usize {
    tokens.div_ceil(TILE_TOKENS)
}

/// Dynamic shared memory of `moe_router_select` (its layout is in `cuda/route.cu`).
pub fn select_shared_bytes(experts: usize, slots_per_token: usize, n_slots: usize) -> usize {
    let words = 2 * TILE_WARPS * experts + 2 * TILE_TOKENS * slots_per_token + (TILE_WARPS + 1) * n_slots + 1;
    (words * 4).div_ceil(8) * 8 + 8 * TILE_WARPS
}

/// Dynamic shared memory of `moe_permute_rank`.
pub fn rank_shared_bytes(slots_per_token: usize, n_slots: usize) -> usize {
    4 * (TILE_TOKENS * slots_per_token + (TILE_WARPS + 1) * n_slots + 1)
}

/// A [`MoeError::Limit`]: `what` needs `needed`, past `limit`.
fn limit(what: String, needed: usize, limit: usize) -> CudaError {
    CudaError::Moe(MoeError::Limit { what, needed, limit })
}

// ---- the launches, from sizes and device addresses ----------------------------------------
//
// Shared by the GPU wrappers below and the CPU emulator (tests/emulator), so both run the
// same launches. Each returns `None` when there is nothing to launch.

/// Device addresses of a routing workspace's buffers (see [`RoutingWorkspace`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct WorkspacePtrs {
    pub logits: u64,
    pub slot_ids: u64,
    pub slot_weights: u64,
    pub pair_ranks: u64,
    pub tile_counts: u64,
    pub tile_status: u64,
    pub tile_offsets: u64,
    pub tiles_done: u64,
    pub expert_offsets: u64,
    pub row_pairs: u64,
    pub pair_rows: u64,
    pub row_weights: u64,
}

/// A workspace's sizes: `(tokens, slots per token, slots)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkspaceDims {
    /// Tokens `T`.
    pub tokens: usize,
    /// Slots per token, `k + n_shared`.
    pub slots_per_token: usize,
    /// Expert slots.
    pub n_slots: usize,
}

impl WorkspaceDims {
    fn launch_dims(&self) -> LaunchDims {
        LaunchDims {
            tokens: self.tokens,
            slots_per_token: self.slots_per_token,
            n_slots: self.n_slots,
            ..LaunchDims::default()
        }
    }
}

pub(crate) fn index2(a: Dtype, b: Dtype) -> usize {
    let bit = |d: Dtype| usize::from(d == Dtype::Bf16);
    2 * bit(a) + bit(b)
}

/// The router-logits kernel for `(x, w)` dtypes and tokens.
pub fn logits_kernel(x: Dtype, w: Dtype, tokens: usize) -> &'static KernelDecl {
    const E1: [&KernelDecl; 4] = [
        &source::LOGITS_F32_F32_E1,
        &source::LOGITS_F32_BF16_E1,
        &source::LOGITS_BF16_F32_E1,
        &source::LOGITS_BF16_BF16_E1,
    ];
    const E4: [&KernelDecl; 4] = [
        &source::LOGITS_F32_F32_E4,
        &source::LOGITS_F32_BF16_E4,
        &source::LOGITS_BF16_F32_E4,
        &source::LOGITS_BF16_BF16_E4,
    ];
    if tokens <= LOGIT_E1_MAX_TOKENS { E1[index2(x, w)] } else { E4[index2(x, w)] }
}

/// The arguments both router-logits kernels begin with.
fn logits_args(x: u64, w: u64, logits: u64, tokens: usize, experts: usize, hidden: usize) -> Vec<Arg> {
    vec![
        Arg::Ptr(x),
        Arg::Ptr(w),
        Arg::Ptr(logits),
        Arg::U32(tokens as u32),
        Arg::U32(experts as u32),
        Arg::U64(hidden as u64),
    ]
}

/// `logits [T, E] = fp32(x [T, H]) @ fp32(w [E, H])^T`.
pub fn logits_launch(
    x: (u64, Dtype),
    w: (u64, Dtype),
    logits: u64,
    tokens: usize,
    experts: usize,
    hidden: usize,
) -> Result<Option<Launch>, CudaError> {
    if tokens == 0 || experts == 0 {
        return Ok(None);
    }
    if tokens > u32::MAX as usize {
        return Err(MoeError::Overflow(format!("{tokens} tokens do not fit the router kernel's 32-bit count")).into());
    }
    let aligned = x.0.is_multiple_of(16) && w.0.is_multiple_of(16);
    let vectorized = u32::from(hidden.is_multiple_of(8) && aligned);
    let dims = LaunchDims { tokens, experts, hidden, ..LaunchDims::default() };
    let mut args = logits_args(x.0, w.0, logits, tokens, experts, hidden);
    args.push(Arg::U32(vectorized));
    Launch::new(logits_kernel(x.1, w.1, tokens), &dims, args).map(Some)
}

/// The router logits as [`logits_launch`], on the tensor cores where `kind` asks for them
/// and the batch has more than [`LOGIT_E1_MAX_TOKENS`] tokens (see [`LogitsKernel`]).
pub fn logits_launch_with(
    kind: LogitsKernel,
    x: (u64, Dtype),
    w: (u64, Dtype),
    logits: u64,
    tokens: usize,
    experts: usize,
    hidden: usize,
) -> Result<Option<Launch>, CudaError> {
    let takes = hidden.is_multiple_of(TC_K_STEP) && x.0.is_multiple_of(16) && w.0.is_multiple_of(16);
    if kind == LogitsKernel::CudaCores || tokens <= LOGIT_E1_MAX_TOKENS || experts == 0 || !takes {
        return logits_launch(x, w, logits, tokens, experts, hidden);
    }
    if tokens > u32::MAX as usize {
        return Err(MoeError::Overflow(format!("{tokens} tokens do not fit the router kernel's 32-bit count")).into());
    }
    const TC: [&KernelDecl; 4] = [
        &source::LOGITS_TC_F32_F32,
        &source::LOGITS_TC_F32_BF16,
        &source::LOGITS_TC_BF16_F32,
        &source::LOGITS_TC_BF16_BF16,
    ];
    let dims = LaunchDims { tokens, experts, hidden, ..LaunchDims::default() };
    let args = logits_args(x.0, w.0, logits, tokens, experts, hidden);
    Launch::new(TC[index2(x.1, w.1)], &dims, args).map(Some)
}

/// Checks what the selection kernel takes of a router configuration.
pub fn check_select(cfg: &RouterConfig, slots_per_token: usize, n_slots: usize) -> Result<(), CudaError> {
    cfg.validate().map_err(MoeError::from)?;
    if cfg.n_group > MAX_GROUPS {
        return Err(limit("expert groups of the router kernel".into(), cfg.n_group, MAX_GROUPS));
    }
    let shared = select_shared_bytes(cfg.n_experts, slots_per_token, n_slots);
    if shared > MAX_SHARED_BYTES {
        return Err(limit(
            format!(
                "shared memory bytes of the router kernel for {} experts and {slots_per_token} slots per token",
                cfg.n_experts
            ),
            shared,
            MAX_SHARED_BYTES,
        ));
    }
    Ok(())
}

/// The arguments of `moe_router_select` (the scatter fused for one tile), which the decode
/// chain's router also takes after its logits' operands.
pub(crate) fn select_args(
    cfg: &RouterConfig,
    n_shared: usize,
    bias: u64,
    ws: &WorkspacePtrs,
    dims: &WorkspaceDims,
) -> Vec<Arg> {
    vec![
        Arg::Ptr(ws.logits),
        Arg::Ptr(bias),
        Arg::U32(dims.tokens as u32),
        Arg::U32(cfg.n_experts as u32),
        Arg::U32(cfg.top_k as u32),
        Arg::U32(n_shared as u32),
        Arg::U32(cfg.n_group as u32),
        Arg::U32(cfg.topk_group as u32),
        Arg::U32(u32::from(cfg.scoring == Scoring::Softmax)),
        Arg::U32(u32::from(cfg.norm_topk_prob)),
        Arg::F32(cfg.routed_scaling_factor),
        Arg::Ptr(ws.slot_ids),
        Arg::Ptr(ws.slot_weights),
        Arg::Ptr(ws.pair_ranks),
        Arg::Ptr(ws.tile_counts),
        Arg::Ptr(ws.tile_status),
        Arg::Ptr(ws.tile_offsets),
        Arg::Ptr(ws.expert_offsets),
        Arg::Ptr(ws.tiles_done),
        Arg::U32(u32::from(tiles(dims.tokens) == 1)),
        Arg::Ptr(ws.row_pairs),
        Arg::Ptr(ws.pair_rows),
        Arg::Ptr(ws.row_weights),
    ]
}

/// The selection from `ws.logits` (see [`RouteCombineKernels::router_select`]); `bias` is 0 for
/// none.
pub fn select_launch(
    cfg: &RouterConfig,
    n_shared: usize,
    bias: u64,
    ws: &WorkspacePtrs,
    dims: &WorkspaceDims,
) -> Result<Option<Launch>, CudaError> {
    check_select(cfg, dims.slots_per_token, dims.n_slots)?;
    if dims.tokens == 0 {
        return Ok(None);
    }
    let args = select_args(cfg, n_shared, bias, ws, dims);
    let launch_dims = LaunchDims { experts: cfg.n_experts, ..dims.launch_dims() };
    Launch::new(&source::SELECT, &launch_dims, args).map(Some)
}

/// The ranks and per-tile counts of the slot ids in `ws.slot_ids`, and (from the CTA that
/// finishes last) the tile offsets and expert offsets.
pub fn rank_launch(ws: &WorkspacePtrs, dims: &WorkspaceDims) -> Result<Option<Launch>, CudaError> {
    if dims.tokens == 0 {
        return Ok(None);
    }
    let shared = rank_shared_bytes(dims.slots_per_token, dims.n_slots);
    if shared > MAX_SHARED_BYTES {
        return Err(limit("shared memory bytes of the permutation's ranking".into(), shared, MAX_SHARED_BYTES));
    }
    let args = vec![
        Arg::Ptr(ws.slot_ids),
        Arg::U32(dims.tokens as u32),
        Arg::U32(dims.slots_per_token as u32),
        Arg::U32(dims.n_slots as u32),
        Arg::Ptr(ws.pair_ranks),
        Arg::Ptr(ws.tile_counts),
        Arg::Ptr(ws.tile_status),
        Arg::Ptr(ws.tile_offsets),
        Arg::Ptr(ws.expert_offsets),
        Arg::Ptr(ws.tiles_done),
    ];
    Launch::new(&source::RANK, &dims.launch_dims(), args).map(Some)
}

/// The scatter from ranks and tile offsets (valid for `T = 0`: it writes all offsets 0).
pub fn scatter_launch(ws: &WorkspacePtrs, dims: &WorkspaceDims) -> Result<Option<Launch>, CudaError> {
    let args = vec![
        Arg::Ptr(ws.slot_ids),
        Arg::Ptr(ws.slot_weights),
        Arg::Ptr(ws.pair_ranks),
        Arg::Ptr(ws.tile_offsets),
        Arg::U32(dims.tokens as u32),
        Arg::U32(dims.slots_per_token as u32),
        Arg::U32(dims.n_slots as u32),
        Arg::Ptr(ws.expert_offsets),
        Arg::Ptr(ws.row_pairs),
        Arg::Ptr(ws.pair_rows),
        Arg::Ptr(ws.row_weights),
    ];
    Launch::new(&source::SCATTER, &dims.launch_dims(), args).map(Some)
}

/// The gather `out [T * slots_per_token, H] = hidden [row_pairs[r] / slots_per_token]`.
pub fn gather_launch(
    hidden: (u64, Dtype),
    row_pairs: u64,
    out: (u64, Dtype),
    tokens: usize,
    slots_per_token: usize,
    hidden_size: usize,
) -> Result<Option<Launch>, CudaError> {
    if tokens * slots_per_token == 0 || hidden_size == 0 {
        return Ok(None);
    }
    const GATHER: [&KernelDecl; 4] =
        [&source::GATHER_F32_F32, &source::GATHER_F32_BF16, &source::GATHER_BF16_F32, &source::GATHER_BF16_BF16];
    let aligned = hidden.0.is_multiple_of(16) && out.0.is_multiple_of(16);
    let vectorized = u32::from(hidden_size.is_multiple_of(8) && aligned);
    let dims = LaunchDims { tokens, slots_per_token, hidden: hidden_size, ..LaunchDims::default() };
    let args = vec![
        Arg::Ptr(hidden.0),
        Arg::Ptr(row_pairs),
        Arg::Ptr(out.0),
        Arg::U32(slots_per_token as u32),
        Arg::U64(hidden_size as u64),
        Arg::U32(vectorized),
    ];
    Launch::new(GATHER[index2(hidden.1, out.1)], &dims, args).map(Some)
}

/// The combine `out [T, H]` of `expert_rows [T * slots_per_token, H]` through `pair_rows [T * slots_per_token]`.
pub fn combine_launch(
    expert_rows: u64,
    pair_rows: u64,
    out: u64,
    tokens: usize,
    slots_per_token: usize,
    hidden_size: usize,
) -> Result<Option<Launch>, CudaError> {
    if slots_per_token > COMBINE_MAX_SLOTS {
        return Err(limit("slots per token of the combine kernel".into(), slots_per_token, COMBINE_MAX_SLOTS));
    }
    if tokens == 0 || hidden_size == 0 {
        return Ok(None);
    }
    let aligned = expert_rows.is_multiple_of(16) && out.is_multiple_of(16);
    let vectorized = u32::from(hidden_size.is_multiple_of(4) && aligned);
    let dims = LaunchDims { tokens, slots_per_token, hidden: hidden_size, ..LaunchDims::default() };
    let args = vec![
        Arg::Ptr(expert_rows),
        Arg::Ptr(pair_rows),
        Arg::U32(slots_per_token as u32),
        Arg::U64(hidden_size as u64),
        Arg::U32(vectorized),
        Arg::Ptr(out),
    ];
    Launch::new(&source::COMBINE_KERNEL, &dims, args).map(Some)
}

// ---- the GPU wrappers ----------------------------------------------------------------

/// The kernels around the expert GEMMs (router logits and selection, permutation, gather,
/// combine), compiled for and loaded on one device. The expert GEMMs are
/// [`crate::cuda::expert_gemm::ExpertGemm`].
pub struct RouteCombineKernels {
    gpu: std::sync::Arc<GpuContext>,
}

impl std::fmt::Debug for RouteCombineKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteCombineKernels").field("gpu", &self.gpu).finish_non_exhaustive()
    }
}

impl RoutingWorkspace {
    /// Its buffers' device addresses.
    pub fn ptrs(&self) -> WorkspacePtrs {
        WorkspacePtrs {
            logits: self.logits.device_ptr(),
            slot_ids: self.slot_ids.device_ptr(),
            slot_weights: self.slot_weights.device_ptr(),
            pair_ranks: self.pair_ranks.device_ptr(),
            tile_counts: self.tile_counts.device_ptr(),
            tile_status: self.tile_status.device_ptr(),
            tile_offsets: self.tile_offsets.device_ptr(),
            tiles_done: self.tiles_done.device_ptr(),
            expert_offsets: self.expert_offsets.device_ptr(),
            row_pairs: self.row_pairs.device_ptr(),
            pair_rows: self.pair_rows.device_ptr(),
            row_weights: self.row_weights.device_ptr(),
        }
    }

    /// Its sizes.
    pub fn dims(&self) -> WorkspaceDims {
        WorkspaceDims { tokens: self.tokens, slots_per_token: self.slots_per_token, n_slots: self.n_slots }
    }
}

impl RouteCombineKernels {
    /// Compiles (NVRTC, cached) and loads every MoE kernel on `gpu`.
    pub fn new(gpu: &std::sync::Arc<GpuContext>) -> Result<Self, CudaError> {
        gpu.load(&[&source::ROUTE, &source::PERMUTE, &source::COMBINE])?;
        Ok(RouteCombineKernels { gpu: gpu.clone() })
    }

    /// The device.
    pub fn gpu(&self) -> &std::sync::Arc<GpuContext> {
        &self.gpu
    }

    fn run(&self, launch: Option<Launch>) -> Result<(), CudaError> {
        match launch {
            // SAFETY: every caller checked the shapes of the buffers whose addresses the
            // launch carries against the sizes it was built for (see each wrapper).
            Some(launch) => unsafe { self.gpu.launch(&launch) },
            None => Ok(()),
        }
    }

    /// Queues `logits [T, E] = fp32(hidden [T, H]) @ fp32(gate [E, H])^T`.
    pub fn router_logits(
        &self,
        router: &DeviceRouter,
        hidden: &DeviceTensor,
        tokens: usize,
        logits: &mut DeviceBuffer<f32>,
    ) -> Result<(), CudaError> {
        let (h, e) = (router.hidden_size, router.config.n_experts);
        let gate = router
            .gate
            .as_ref()
            .ok_or_else(|| MoeError::MissingWeights("this device router has no gate weight (selection only)".into()))?;
        hidden.expect_shape("hidden", &[tokens, h])?;
        logits.expect_shape("router logits", &[tokens, e])?;
        // x is [T, H], w [E, H], logits [T, E] (checked above).
        self.run(logits_launch_with(
            router.logits,
            (hidden.device_ptr(), hidden.dtype()),
            (gate.device_ptr(), gate.dtype()),
            logits.device_ptr(),
            tokens,
            e,
            h,
        )?)
    }

    fn check_router(router: &DeviceRouter, ws: &RoutingWorkspace) -> Result<(), CudaError> {
        let cfg = &router.config;
        if ws.n_experts != cfg.n_experts
            || ws.slots_per_token != router.slots_per_token()
            || ws.n_slots != router.n_slots()
        {
            return Err(MoeError::shape(
                "workspace (experts, slots per token, slots)",
                &[cfg.n_experts, router.slots_per_token(), router.n_slots()],
                &[ws.n_experts, ws.slots_per_token, ws.n_slots],
            )
            .into());
        }
        Ok(())
    }

    /// Queues the selection from `ws.logits`: slot ids and weights, the pairs' ranks, the
    /// per-tile counts, the tile and expert offsets, and the status. With one tile (`T <= TILE_TOKENS`) it also writes the
    /// permutation; otherwise [`RouteCombineKernels::permute_scatter`] finishes it (calling it after a
    /// one-tile selection rewrites the same values).
    pub fn router_select(&self, router: &DeviceRouter, ws: &mut RoutingWorkspace) -> Result<(), CudaError> {
        router.config.validate().map_err(MoeError::from)?;
        Self::check_router(router, ws)?;
        let bias = router.bias.as_ref().map_or(0, |b| b.device_ptr());
        // The workspace was sized for this router and T (checked): ids, weights, ranks,
        // row_pairs, pair_rows and row_weights hold T*slots_per_token, tile_counts and
        // tile_offsets n_tiles*n_slots, expert_offsets n_slots+1, tiles_done 1 (0 between
        // launches); the bias is [E] or null.
        let launch = select_launch(&router.config, router.n_shared, bias, &ws.ptrs(), &ws.dims())?;
        ws.status_source = StatusSource::Router;
        self.run(launch)
    }

    /// Queues the ranks, per-tile counts, tile and expert offsets of the slot ids already in
    /// `ws.slot_ids` (ids from elsewhere than the router).
    pub fn permute_rank(&self, ws: &mut RoutingWorkspace) -> Result<(), CudaError> {
        ws.status_source = StatusSource::Permute;
        // The workspace buffers have the sizes its constructor gave for (T, slots_per_token, n_slots).
        self.run(rank_launch(&ws.ptrs(), &ws.dims())?)
    }

    /// Queues the scatter: `row_pairs`, `pair_rows` and `row_weights` from the ranks and
    /// tile offsets (of [`RouteCombineKernels::router_select`] or
    /// [`RouteCombineKernels::permute_rank`], which also wrote `expert_offsets`). Valid for
    /// `T = 0`, where it writes `expert_offsets` (all 0).
    pub fn permute_scatter(&self, ws: &mut RoutingWorkspace) -> Result<(), CudaError> {
        self.run(scatter_launch(&ws.ptrs(), &ws.dims())?)
    }

    /// Routes and permutes: logits, selection, scatter (three launches; two for one tile,
    /// where the selection scatters too; no host sync).
    pub fn route(
        &self,
        router: &DeviceRouter,
        hidden: &DeviceTensor,
        ws: &mut RoutingWorkspace,
    ) -> Result<(), CudaError> {
        let tokens = ws.tokens;
        self.router_logits(router, hidden, tokens, &mut ws.logits)?;
        self.router_select(router, ws)?;
        if tiles(tokens) == 1 { Ok(()) } else { self.permute_scatter(ws) }
    }

    /// Permutes the slot ids (and weights) already in the workspace: rank, scatter.
    pub fn permute(&self, ws: &mut RoutingWorkspace) -> Result<(), CudaError> {
        self.permute_rank(ws)?;
        self.permute_scatter(ws)
    }

    /// Queues the gather `out [T * slots_per_token, H] = hidden [row_pairs[r] / slots_per_token]` (bf16 output rounds
    /// to nearest even).
    pub fn gather(
        &self,
        hidden: &DeviceTensor,
        hidden_size: usize,
        ws: &RoutingWorkspace,
        out: &mut DeviceTensor,
    ) -> Result<(), CudaError> {
        hidden.expect_shape("hidden", &[ws.tokens, hidden_size])?;
        out.expect_shape("permuted hidden", &[ws.pairs(), hidden_size])?;
        // hidden is [T, H], out [T*slots_per_token, H], row_pairs [T*slots_per_token] with values < T*slots_per_token once permuted.
        self.run(gather_launch(
            (hidden.device_ptr(), hidden.dtype()),
            ws.row_pairs.device_ptr(),
            (out.device_ptr(), out.dtype()),
            ws.tokens,
            ws.slots_per_token,
            hidden_size,
        )?)
    }

    /// Queues the combine `out [T, H]`: each token's `slots_per_token` weighted rows of
    /// `expert_rows [T * slots_per_token, H]`, summed in slot order from 0.0.
    pub fn combine(
        &self,
        expert_rows: &DeviceBuffer<f32>,
        hidden_size: usize,
        ws: &RoutingWorkspace,
        out: &mut DeviceBuffer<f32>,
    ) -> Result<(), CudaError> {
        let (t, s) = (ws.tokens, ws.slots_per_token);
        expert_rows.expect_shape("expert output rows", &[t * s, hidden_size])?;
        out.expect_shape("output", &[t, hidden_size])?;
        // expert_rows [T*slots_per_token, H], out [T, H], pair_rows [T*slots_per_token] (slots_per_token checked by the launch).
        self.run(combine_launch(
            expert_rows.device_ptr(),
            ws.pair_rows.device_ptr(),
            out.device_ptr(),
            t,
            s,
            hidden_size,
        )?)
    }
}
