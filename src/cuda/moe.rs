//! The MoE kernels on the device: safe wrappers that validate shapes and limits once and
//! queue the launches on the context's stream.
//!
//! Nothing here waits for the device: counts, offsets and every intermediate stay in
//! device buffers ([`MoeWorkspace`]), so routing, permutation, gather and combine can be
//! captured in a CUDA graph. Only the `download`/`read_*` helpers of [`MoeWorkspace`] copy
//! results back (and wait).
//!
//! The pipeline for `T` tokens, `S = k + n_shared` slots per token:
//!
//! ```text
//! moe_router_logits_*   hidden [T,H], gate [E,H]          -> logits [T,E]
//! moe_router_select     logits, bias                      -> slot_ids, slot_weights [T,S],
//!                                                            pair_ranks [T*S], tile_counts
//! moe_permute_scatter   ids, ranks, tile_counts           -> expert_offsets [n_slots+1],
//!                                                            row_pairs, pair_rows, row_weights
//! moe_gather_*          hidden, row_pairs                 -> x_perm [T*S, H]
//!   (expert GEMMs)                                        -> expert_rows [T*S, H], weighted
//! moe_combine           expert_rows, pair_rows            -> out [T, H]
//! ```
//!
//! `moe_permute_rank` replaces the selection's ranking step when slot ids come from
//! elsewhere ([`MoeKernels::permute`]).

use cudarc::driver::CudaFunction;

use crate::config::Scoring;
use crate::cuda::buffer::{DeviceBuffer, DeviceTensor};
use crate::cuda::context::{GpuContext, KernelArg as Arg};
use crate::cuda::error::CudaError;
use crate::cuda::source;
use crate::cuda::workspace::{DeviceRouter, MoeWorkspace, StatusSource};
use crate::error::MoeError;
use crate::tensor::Dtype;

/// Tokens per permutation tile (`TILE_TOKENS` in `cuda/common.cu`).
pub const TILE_TOKENS: usize = 32;
pub(crate) const TILE_THREADS: u32 = 256;
const TILE_WARPS: usize = 8;
pub(crate) const LOGIT_THREADS: u32 = 128;
/// Up to this many tokens the router logits run one CTA per expert (`_e1`), above it one
/// CTA per 4 experts (`_e4`); both sum in the same order.
const LOGIT_E1_MAX_TOKENS: usize = 64;
const LOGIT_TOKENS: u32 = 8;
pub(crate) const GATHER_THREADS: u32 = 256;
pub(crate) const COMBINE_THREADS: u32 = 256;
/// Most slots per token the combine kernel takes (`COMBINE_MAX_SLOTS`).
pub const COMBINE_MAX_SLOTS: usize = 64;
/// Most expert groups the selection kernel takes (one per lane).
pub const MAX_GROUPS: usize = 32;
/// Dynamic shared memory the kernels may ask for without opting in to more.
pub const MAX_SHARED_BYTES: usize = 48 * 1024;
const MAX_GRID_X: usize = i32::MAX as usize;
const MAX_GRID_Y: usize = 65_535;

/// Permutation tiles for `tokens` tokens.
pub fn tiles(tokens: usize) -> usize {
    tokens.div_ceil(TILE_TOKENS)
}

/// Dynamic shared memory of `moe_router_select` (its layout is in `cuda/route.cu`).
pub fn select_shared_bytes(experts: usize, slots_per_token: usize, n_slots: usize) -> usize {
    let words = 2 * TILE_WARPS * experts + 2 * TILE_TOKENS * slots_per_token + (TILE_WARPS + 1) * n_slots;
    (words * 4).div_ceil(8) * 8 + 8 * TILE_WARPS
}

/// Dynamic shared memory of `moe_permute_rank`.
pub fn rank_shared_bytes(slots_per_token: usize, n_slots: usize) -> usize {
    4 * (TILE_TOKENS * slots_per_token + (TILE_WARPS + 1) * n_slots)
}

/// Dynamic shared memory of `moe_permute_scatter`.
pub fn scatter_shared_bytes(n_slots: usize) -> usize {
    4 * (2 * n_slots + 1)
}

fn unsupported(what: String) -> CudaError {
    CudaError::Moe(MoeError::Unsupported(what))
}

fn grid_dim(what: &str, n: usize, max: usize) -> Result<u32, CudaError> {
    if n > max {
        return Err(unsupported(format!("{what}: {n} blocks exceed the grid limit {max}")));
    }
    Ok(n as u32)
}

/// The MoE kernels, compiled for and loaded on one device.
pub struct MoeKernels {
    gpu: std::sync::Arc<GpuContext>,
    logits: [[CudaFunction; 4]; 2],
    select: CudaFunction,
    rank: CudaFunction,
    scatter: CudaFunction,
    gather: [CudaFunction; 4],
    combine: CudaFunction,
}

impl std::fmt::Debug for MoeKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeKernels").field("gpu", &self.gpu).finish_non_exhaustive()
    }
}

fn dtype_index(a: Dtype, b: Dtype) -> usize {
    let bit = |d: Dtype| usize::from(d == Dtype::Bf16);
    2 * bit(a) + bit(b)
}

impl MoeKernels {
    /// Compiles (NVRTC, cached) and loads every MoE kernel on `gpu`.
    pub fn new(gpu: &std::sync::Arc<GpuContext>) -> Result<Self, CudaError> {
        let f = |src: &source::KernelSource, name: &str| gpu.function(src, name);
        Ok(MoeKernels {
            gpu: gpu.clone(),
            logits: [
                [
                    f(&source::ROUTE, "moe_router_logits_f32_f32_e1")?,
                    f(&source::ROUTE, "moe_router_logits_f32_bf16_e1")?,
                    f(&source::ROUTE, "moe_router_logits_bf16_f32_e1")?,
                    f(&source::ROUTE, "moe_router_logits_bf16_bf16_e1")?,
                ],
                [
                    f(&source::ROUTE, "moe_router_logits_f32_f32_e4")?,
                    f(&source::ROUTE, "moe_router_logits_f32_bf16_e4")?,
                    f(&source::ROUTE, "moe_router_logits_bf16_f32_e4")?,
                    f(&source::ROUTE, "moe_router_logits_bf16_bf16_e4")?,
                ],
            ],
            select: f(&source::ROUTE, "moe_router_select")?,
            rank: f(&source::PERMUTE, "moe_permute_rank")?,
            scatter: f(&source::PERMUTE, "moe_permute_scatter")?,
            gather: [
                f(&source::PERMUTE, "moe_gather_f32_to_f32")?,
                f(&source::PERMUTE, "moe_gather_f32_to_bf16")?,
                f(&source::PERMUTE, "moe_gather_bf16_to_f32")?,
                f(&source::PERMUTE, "moe_gather_bf16_to_bf16")?,
            ],
            combine: f(&source::COMBINE, "moe_combine")?,
        })
    }

    /// The device.
    pub fn gpu(&self) -> &std::sync::Arc<GpuContext> {
        &self.gpu
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
        if tokens == 0 || e == 0 {
            return Ok(());
        }
        if tokens > u32::MAX as usize {
            return Err(
                MoeError::Overflow(format!("{tokens} tokens do not fit the router kernel's 32-bit count")).into()
            );
        }
        let aligned = [hidden.device_ptr(), gate.device_ptr()].iter().all(|p| p.is_multiple_of(16));
        let vectorized = u32::from(h.is_multiple_of(8) && aligned);
        let experts_per_cta = if tokens <= LOGIT_E1_MAX_TOKENS { 1 } else { 4 };
        let grid = (
            grid_dim("router logits", tokens.div_ceil(LOGIT_TOKENS as usize), MAX_GRID_X)?,
            grid_dim("router logits", e.div_ceil(experts_per_cta), MAX_GRID_Y)?,
        );
        let func = &self.logits[usize::from(experts_per_cta == 4)][dtype_index(hidden.dtype(), gate.dtype())];
        let args = [
            Arg::Ptr(hidden.device_ptr()),
            Arg::Ptr(gate.device_ptr()),
            Arg::Ptr(logits.device_ptr()),
            Arg::U32(tokens as u32),
            Arg::U32(e as u32),
            Arg::U64(h as u64),
            Arg::U32(vectorized),
        ];
        // SAFETY: matches `router_logits(x, w, logits, tokens, experts, hidden, vectorized)`;
        // x is [T, H], w [E, H], logits [T, E] (checked above); T and E fit u32 (E is
        // validated by RouterConfig, T above); grid and block are the kernel's mapping.
        unsafe { self.gpu.launch(func, grid, LOGIT_THREADS, 0, &args) }
    }

    fn check_router(router: &DeviceRouter, ws: &MoeWorkspace) -> Result<(), CudaError> {
        let cfg = &router.config;
        cfg.validate().map_err(MoeError::from)?;
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
        if cfg.n_group > MAX_GROUPS {
            return Err(unsupported(format!(
                "the router kernel takes at most {MAX_GROUPS} expert groups, got {}",
                cfg.n_group
            )));
        }
        let shared = select_shared_bytes(cfg.n_experts, router.slots_per_token(), router.n_slots());
        if shared > MAX_SHARED_BYTES {
            return Err(unsupported(format!(
                "the router kernel needs {shared} bytes of shared memory for {} experts and {} slots per token (limit {MAX_SHARED_BYTES})",
                cfg.n_experts,
                router.slots_per_token()
            )));
        }
        Ok(())
    }

    /// Queues the selection from `ws.logits`: slot ids and weights, the pairs' ranks and the
    /// per-tile counts, and the status. With one tile (`T <= TILE_TOKENS`) it also writes the
    /// permutation; otherwise [`MoeKernels::permute_scatter`] finishes it (calling it after a
    /// one-tile selection rewrites the same values).
    pub fn router_select(&self, router: &DeviceRouter, ws: &mut MoeWorkspace) -> Result<(), CudaError> {
        Self::check_router(router, ws)?;
        ws.status_source = StatusSource::Router;
        let tokens = ws.tokens;
        if tokens == 0 {
            return Ok(());
        }
        let cfg = &router.config;
        let shared = select_shared_bytes(cfg.n_experts, router.slots_per_token(), router.n_slots());
        let args = [
            Arg::Ptr(ws.logits.device_ptr()),
            Arg::Ptr(router.bias.as_ref().map_or(0, |b| b.device_ptr())),
            Arg::U32(tokens as u32),
            Arg::U32(cfg.n_experts as u32),
            Arg::U32(cfg.top_k as u32),
            Arg::U32(router.n_shared as u32),
            Arg::U32(cfg.n_group as u32),
            Arg::U32(cfg.topk_group as u32),
            Arg::U32(u32::from(cfg.scoring == Scoring::Softmax)),
            Arg::U32(u32::from(cfg.norm_topk_prob)),
            Arg::F32(cfg.routed_scaling_factor),
            Arg::Ptr(ws.slot_ids.device_ptr()),
            Arg::Ptr(ws.slot_weights.device_ptr()),
            Arg::Ptr(ws.pair_ranks.device_ptr()),
            Arg::Ptr(ws.tile_counts.device_ptr()),
            Arg::Ptr(ws.tile_status.device_ptr()),
            Arg::U32(u32::from(tiles(tokens) == 1)),
            Arg::Ptr(ws.expert_offsets.device_ptr()),
            Arg::Ptr(ws.row_pairs.device_ptr()),
            Arg::Ptr(ws.pair_rows.device_ptr()),
            Arg::Ptr(ws.row_weights.device_ptr()),
        ];
        let grid = (grid_dim("router selection", tiles(tokens), MAX_GRID_X)?, 1);
        // SAFETY: matches `moe_router_select`'s parameters; the workspace was sized for
        // this router and T (checked): ids, weights, ranks, row_pairs, pair_rows and
        // row_weights hold T*S, tile_counts n_tiles*n_slots, expert_offsets n_slots+1; the
        // bias is [E] or null; `shared` is the kernel's layout for these sizes, within the
        // default limit.
        unsafe { self.gpu.launch(&self.select, grid, TILE_THREADS, shared, &args) }
    }

    /// Queues the ranks and per-tile counts of the slot ids already in `ws.slot_ids`
    /// (ids from elsewhere than the router).
    pub fn permute_rank(&self, ws: &mut MoeWorkspace) -> Result<(), CudaError> {
        ws.status_source = StatusSource::Permute;
        if ws.tokens == 0 {
            return Ok(());
        }
        let shared = rank_shared_bytes(ws.slots_per_token, ws.n_slots);
        if shared > MAX_SHARED_BYTES {
            return Err(unsupported(format!(
                "the permutation needs {shared} bytes of shared memory (limit {MAX_SHARED_BYTES})"
            )));
        }
        let args = [
            Arg::Ptr(ws.slot_ids.device_ptr()),
            Arg::U32(ws.tokens as u32),
            Arg::U32(ws.slots_per_token as u32),
            Arg::U32(ws.n_slots as u32),
            Arg::Ptr(ws.pair_ranks.device_ptr()),
            Arg::Ptr(ws.tile_counts.device_ptr()),
            Arg::Ptr(ws.tile_status.device_ptr()),
        ];
        let grid = (grid_dim("permutation", tiles(ws.tokens), MAX_GRID_X)?, 1);
        // SAFETY: matches `moe_permute_rank`; the workspace buffers have the sizes its
        // constructor gave for (T, S, n_slots); T * S < 2^32 (checked there).
        unsafe { self.gpu.launch(&self.rank, grid, TILE_THREADS, shared, &args) }
    }

    /// Queues the scatter: `expert_offsets`, `row_pairs`, `pair_rows` and `row_weights`
    /// from the ranks and counts (of [`MoeKernels::router_select`] or
    /// [`MoeKernels::permute_rank`]). Valid for `T = 0` (all offsets 0).
    pub fn permute_scatter(&self, ws: &mut MoeWorkspace) -> Result<(), CudaError> {
        let shared = scatter_shared_bytes(ws.n_slots);
        if shared > MAX_SHARED_BYTES {
            return Err(unsupported(format!(
                "the permutation needs {shared} bytes of shared memory (limit {MAX_SHARED_BYTES})"
            )));
        }
        let n_tiles = tiles(ws.tokens);
        let args = [
            Arg::Ptr(ws.slot_ids.device_ptr()),
            Arg::Ptr(ws.slot_weights.device_ptr()),
            Arg::Ptr(ws.pair_ranks.device_ptr()),
            Arg::Ptr(ws.tile_counts.device_ptr()),
            Arg::U32(ws.tokens as u32),
            Arg::U32(ws.slots_per_token as u32),
            Arg::U32(ws.n_slots as u32),
            Arg::U32(n_tiles as u32),
            Arg::Ptr(ws.expert_offsets.device_ptr()),
            Arg::Ptr(ws.row_pairs.device_ptr()),
            Arg::Ptr(ws.pair_rows.device_ptr()),
            Arg::Ptr(ws.row_weights.device_ptr()),
        ];
        let grid = (grid_dim("permutation", n_tiles.max(1), MAX_GRID_X)?, 1);
        // SAFETY: matches `moe_permute_scatter`; buffers sized by the workspace for
        // (T, S, n_slots); with T = 0 the one CTA only writes expert_offsets [n_slots + 1].
        unsafe { self.gpu.launch(&self.scatter, grid, TILE_THREADS, shared, &args) }
    }

    /// Routes and permutes: logits, selection, scatter (three launches; two for one tile,
    /// where the selection scatters too; no host sync).
    pub fn route(&self, router: &DeviceRouter, hidden: &DeviceTensor, ws: &mut MoeWorkspace) -> Result<(), CudaError> {
        let tokens = ws.tokens;
        self.router_logits(router, hidden, tokens, &mut ws.logits)?;
        self.router_select(router, ws)?;
        if tiles(tokens) == 1 { Ok(()) } else { self.permute_scatter(ws) }
    }

    /// Permutes the slot ids (and weights) already in the workspace: rank, scatter.
    pub fn permute(&self, ws: &mut MoeWorkspace) -> Result<(), CudaError> {
        self.permute_rank(ws)?;
        self.permute_scatter(ws)
    }

    /// Queues the gather `out [T * S, H] = hidden [row_pairs[r] / S]` (bf16 output rounds
    /// to nearest even).
    pub fn gather(
        &self,
        hidden: &DeviceTensor,
        hidden_size: usize,
        ws: &MoeWorkspace,
        out: &mut DeviceTensor,
    ) -> Result<(), CudaError> {
        let rows = ws.pairs();
        hidden.expect_shape("hidden", &[ws.tokens, hidden_size])?;
        out.expect_shape("permuted hidden", &[rows, hidden_size])?;
        if rows == 0 || hidden_size == 0 {
            return Ok(());
        }
        let aligned = hidden.device_ptr().is_multiple_of(16) && out.device_ptr().is_multiple_of(16);
        let vectorized = u32::from(hidden_size.is_multiple_of(8) && aligned);
        let grid = (
            grid_dim("gather", rows, MAX_GRID_X)?,
            grid_dim("gather", hidden_size.div_ceil(8 * GATHER_THREADS as usize), MAX_GRID_Y)?,
        );
        let func = &self.gather[dtype_index(hidden.dtype(), out.dtype())];
        let args = [
            Arg::Ptr(hidden.device_ptr()),
            Arg::Ptr(ws.row_pairs.device_ptr()),
            Arg::Ptr(out.device_ptr()),
            Arg::U32(ws.slots_per_token as u32),
            Arg::U64(hidden_size as u64),
            Arg::U32(vectorized),
        ];
        // SAFETY: matches `gather(hidden, row_pairs, out, S, H, vectorized)`; hidden is
        // [T, H], out [T*S, H], row_pairs [T*S] with values < T*S once permuted.
        unsafe { self.gpu.launch(func, grid, GATHER_THREADS, 0, &args) }
    }

    /// Queues the combine `out [T, H]`: each token's `S` weighted rows of
    /// `expert_rows [T * S, H]`, summed in slot order from 0.0.
    pub fn combine(
        &self,
        expert_rows: &DeviceBuffer<f32>,
        hidden_size: usize,
        ws: &MoeWorkspace,
        out: &mut DeviceBuffer<f32>,
    ) -> Result<(), CudaError> {
        let (t, s) = (ws.tokens, ws.slots_per_token);
        expert_rows.expect_shape("expert output rows", &[t * s, hidden_size])?;
        out.expect_shape("output", &[t, hidden_size])?;
        if s > COMBINE_MAX_SLOTS {
            return Err(unsupported(format!(
                "the combine kernel takes at most {COMBINE_MAX_SLOTS} slots per token, got {s}"
            )));
        }
        if t == 0 || hidden_size == 0 {
            return Ok(());
        }
        let aligned = expert_rows.device_ptr().is_multiple_of(16) && out.device_ptr().is_multiple_of(16);
        let vectorized = u32::from(hidden_size.is_multiple_of(4) && aligned);
        let grid = (
            grid_dim("combine", t, MAX_GRID_X)?,
            grid_dim("combine", hidden_size.div_ceil(4 * COMBINE_THREADS as usize), MAX_GRID_Y)?,
        );
        let args = [
            Arg::Ptr(expert_rows.device_ptr()),
            Arg::Ptr(ws.pair_rows.device_ptr()),
            Arg::U32(s as u32),
            Arg::U64(hidden_size as u64),
            Arg::U32(vectorized),
            Arg::Ptr(out.device_ptr()),
        ];
        // SAFETY: matches `moe_combine(expert_rows, pair_rows, S, H, vectorized, out)`;
        // expert_rows [T*S, H], out [T, H], pair_rows [T*S] with S <= COMBINE_MAX_SLOTS.
        unsafe { self.gpu.launch(&self.combine, grid, COMBINE_THREADS, 0, &args) }
    }
}
