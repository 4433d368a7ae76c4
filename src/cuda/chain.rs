//! The decode chain: a whole MoE layer of at most [`CHAIN_MAX_TOKENS`] tokens in three
//! launches, where the separate pipeline ([`crate::cuda::layer`]) takes seven at decode
//! (logits, selection, gather, schedule, GEMM 1, GEMM 2, combine):
//!
//! ```text
//! moe_router_decode_<x>_<w>        logits (one CTA per token block x expert); the last CTA:
//!                                  selection, scatter, the expert GEMMs' work items
//! moe_expert_up_decode_hidden_<x>  GEMM 1 + SwiGLU, the item rows read from the hidden
//!                                  states through row_pairs (no gather pass)
//! moe_expert_down_decode_combine   GEMM 2 with the routing weight; each column block's
//!                                  last CTA combines that block of every token
//! ```
//!
//! Every step does the arithmetic of the separate launches in the same order (the same
//! logit sums, the same rounding of f32 hidden states to bf16, the same MMAs, the same
//! combine sum), so the output is bit-identical to the separate pipeline's on the register
//! decode kernels (`tests/cuda_decode_chain.rs` checks it, on the emulator and on a GPU).
//! The handoffs inside a launch go through arrival counters in device memory, which are 0
//! between launches (the last CTA to arrive resets its counter), so the chain replays in a
//! CUDA graph.
//!
//! It needs one permutation tile (`T <= TILE_TOKENS`: one CTA selects) and every slot in
//! the decode regime: a routed slot gets at most `T` rows (a token picks an expert once)
//! and a shared slot exactly `T`, so `T` must not exceed the decode limit
//! ([`runs_chain`]).

use crate::config::RouterConfig;
use crate::cuda::error::CudaError;
use crate::cuda::expert_gemm::{self as gemm, GemmOptions, GemmPtrs};
use crate::cuda::launch::{KernelArg as Arg, KernelDecl, Launch, LaunchDims};
use crate::cuda::moe::{self, WorkspaceDims, WorkspacePtrs};
use crate::cuda::source;
use crate::error::MoeError;
use crate::tensor::Dtype;

/// Most tokens the decode chain takes: one permutation tile.
pub const CHAIN_MAX_TOKENS: usize = moe::TILE_TOKENS;

/// Whether a layer under `options` runs a batch of `tokens` tokens as the decode chain:
/// the option is set, the batch is one tile, and the decode regime takes a slot of
/// `tokens` rows.
pub fn runs_chain(options: &GemmOptions, tokens: usize) -> bool {
    let (decode_max_rows, _) = options.schedule_args();
    options.decode_chain && (1..=CHAIN_MAX_TOKENS).contains(&tokens) && tokens <= decode_max_rows as usize
}

/// Column blocks of the combining GEMM 2 (one arrival counter each).
pub fn column_blocks(hidden: usize) -> usize {
    hidden / gemm::DECODE_DOWN_COLUMNS
}

fn check_tokens(tokens: usize) -> Result<(), CudaError> {
    if tokens > CHAIN_MAX_TOKENS {
        return Err(MoeError::Limit {
            what: "tokens of the decode chain".into(),
            needed: tokens,
            limit: CHAIN_MAX_TOKENS,
        }
        .into());
    }
    Ok(())
}

fn aligned(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p.is_multiple_of(16))
}

/// Launch 1: the router logits of `x [T, H]` against `gate [E, H]`, then (its last CTA)
/// the selection, the scatter into `ws`, and the work items of `options` into `items`.
#[allow(clippy::too_many_arguments)] // the router's and the schedule's operands
pub fn route_launch(
    cfg: &RouterConfig,
    n_shared: usize,
    x: (u64, Dtype),
    gate: (u64, Dtype),
    bias: u64,
    hidden: usize,
    ws: &WorkspacePtrs,
    dims: &WorkspaceDims,
    options: &GemmOptions,
    items: &GemmPtrs,
) -> Result<Option<Launch>, CudaError> {
    moe::check_select(cfg, dims.slots_per_token, dims.n_slots)?;
    check_tokens(dims.tokens)?;
    if dims.tokens == 0 {
        return Ok(None);
    }
    const KERNELS: [&KernelDecl; 4] = [
        &source::ROUTER_DECODE_F32_F32,
        &source::ROUTER_DECODE_F32_BF16,
        &source::ROUTER_DECODE_BF16_F32,
        &source::ROUTER_DECODE_BF16_BF16,
    ];
    let vectorized = u32::from(hidden.is_multiple_of(8) && aligned(&[x.0, gate.0]));
    let mut args = vec![Arg::Ptr(x.0), Arg::Ptr(gate.0), Arg::U64(hidden as u64), Arg::U32(vectorized)];
    args.extend(moe::select_args(cfg, n_shared, bias, ws, dims));
    args.extend(gemm::schedule_tail_args(options, items));
    let launch_dims = LaunchDims {
        tokens: dims.tokens,
        experts: cfg.n_experts,
        slots_per_token: dims.slots_per_token,
        n_slots: dims.n_slots,
        hidden,
        ..LaunchDims::default()
    };
    Launch::new(KERNELS[moe::index2(x.1, gate.1)], &launch_dims, args).map(Some)
}

/// Launch 2: GEMM 1 + SwiGLU into `items.act`, the rows of each decode item read from
/// `hidden_states [T, H]` through `row_pairs`.
pub fn up_launch(
    hidden_states: (u64, Dtype),
    row_pairs: u64,
    slots_per_token: usize,
    gate_up: u64,
    hidden: usize,
    inter: usize,
    items: &GemmPtrs,
) -> Result<Option<Launch>, CudaError> {
    gemm::check_shape(hidden, inter)?;
    if items.decode_capacity == 0 {
        return Ok(None);
    }
    if !aligned(&[hidden_states.0]) {
        return Err(MoeError::Unsupported("the decode chain reads 16-byte aligned hidden states".into()).into());
    }
    let kernel = match hidden_states.1 {
        Dtype::F32 => &source::UP_DECODE_HIDDEN_F32,
        Dtype::Bf16 => &source::UP_DECODE_HIDDEN_BF16,
    };
    gemm::grid_y("decode items", items.decode_capacity)?;
    let dims = LaunchDims { hidden, inter, items: items.decode_capacity, ..LaunchDims::default() };
    let args = gemm::up_hidden_args(
        hidden_states.0,
        row_pairs,
        slots_per_token,
        gate_up,
        items.decode_items,
        hidden,
        inter,
        items,
    );
    Launch::new(kernel, &dims, args).map(Some)
}

/// Where launch 3 writes: the weighted expert rows `y [R, H]`, the arrival counters
/// `[H / DECODE_DOWN_COLUMNS]` (0 between launches), the output `out [T, H]`.
#[derive(Clone, Copy, Debug)]
pub struct CombineTargets {
    /// `y [R, H]` (f32).
    pub expert_rows: u64,
    /// `[column_blocks(H)]` u32, 0 between launches.
    pub column_done: u64,
    /// `out [T, H]` (f32).
    pub out: u64,
}

/// Launch 3: GEMM 2 with the routing weight into `targets.expert_rows`, and the combine
/// into `targets.out` through `pair_rows`.
#[allow(clippy::too_many_arguments)] // GEMM 2's and the combine's operands
pub fn down_launch(
    down: u64,
    row_weights: u64,
    pair_rows: u64,
    targets: &CombineTargets,
    tokens: usize,
    slots_per_token: usize,
    hidden: usize,
    inter: usize,
    items: &GemmPtrs,
) -> Result<Option<Launch>, CudaError> {
    gemm::check_shape(hidden, inter)?;
    check_tokens(tokens)?;
    if items.decode_capacity == 0 || tokens == 0 {
        return Ok(None);
    }
    if !aligned(&[targets.expert_rows, targets.out]) {
        return Err(MoeError::Unsupported("the decode chain's combine writes 16-byte aligned rows".into()).into());
    }
    gemm::grid_y("decode items", items.decode_capacity)?;
    let dims =
        LaunchDims { tokens, slots_per_token, hidden, inter, items: items.decode_capacity, ..LaunchDims::default() };
    let args = vec![
        Arg::Ptr(items.act),
        Arg::Ptr(down),
        Arg::Ptr(row_weights),
        Arg::Ptr(items.decode_items),
        Arg::Ptr(items.item_counts),
        Arg::U32(hidden as u32),
        Arg::U32(inter as u32),
        Arg::Ptr(targets.expert_rows),
        Arg::Ptr(pair_rows),
        Arg::U32(tokens as u32),
        Arg::U32(slots_per_token as u32),
        Arg::Ptr(targets.column_done),
        Arg::Ptr(targets.out),
    ];
    Launch::new(&source::DOWN_DECODE_COMBINE, &dims, args).map(Some)
}
