//! The device buffers of one batch: the router's weights ([`DeviceRouter`]) and every
//! intermediate of routing and permutation ([`RoutingWorkspace`]), with the host-side readers
//! that download them (and wait).

use crate::config::{MoeConfig, RouterConfig};
use crate::cuda::buffer::{DeviceBuffer, DeviceTensor};
use crate::cuda::context::GpuContext;
use crate::cuda::error::CudaError;
use crate::cuda::moe::{LogitsKernel, tiles};
use crate::error::MoeError;
use crate::moe::{MoeLayer, Permutation, RouterBias, Routing};
use crate::tensor::TensorView;

/// The router's weights on the device, with the shape they route for.
#[derive(Debug)]
pub struct DeviceRouter {
    /// The router configuration.
    pub config: RouterConfig,
    /// Model width `H`.
    pub hidden_size: usize,
    /// Shared experts, appended as slots `E..E+n_shared` of every token.
    pub n_shared: usize,
    /// `[E, H]`, f32 or bf16 (`None` for a router that only selects from given logits).
    pub gate: Option<DeviceTensor>,
    /// `[E]` score-correction bias.
    pub bias: Option<DeviceBuffer<f32>>,
    /// Which kernel computes the logits of a batch of more than
    /// [`crate::cuda::moe::LOGIT_E1_MAX_TOKENS`] tokens (smaller ones always take the
    /// CUDA-core kernel). [`LogitsKernel::CudaCores`] unless set.
    pub logits: LogitsKernel,
}

impl DeviceRouter {
    /// Uploads a router: `gate [E, H]` and the optional bias `[E]` (finite values only).
    pub fn upload(
        gpu: &GpuContext,
        cfg: &MoeConfig,
        gate: TensorView<'_>,
        bias: Option<&[f32]>,
    ) -> Result<Self, CudaError> {
        cfg.validate().map_err(MoeError::from)?;
        let e = cfg.router.n_experts;
        let gate = DeviceTensor::upload(gpu, "mlp.gate.weight", gate, &[e, cfg.hidden_size])?;
        let bias = match RouterBias::from_slice(bias, e)? {
            Some(b) => Some(DeviceBuffer::upload(gpu, "e_score_correction_bias", &b, &[e])?),
            None => None,
        };
        Ok(DeviceRouter {
            config: cfg.router.clone(),
            hidden_size: cfg.hidden_size,
            n_shared: cfg.n_shared_experts,
            gate: Some(gate),
            bias,
            logits: LogitsKernel::CudaCores,
        })
    }

    /// A router that selects from logits computed elsewhere ([`crate::cuda::moe::RouteCombineKernels::router_select`]
    /// on logits written into the workspace): no gate weight.
    pub fn selection_only(
        gpu: &GpuContext,
        cfg: &RouterConfig,
        n_shared: usize,
        bias: Option<&[f32]>,
    ) -> Result<Self, CudaError> {
        cfg.validate().map_err(MoeError::from)?;
        let bias = match RouterBias::from_slice(bias, cfg.n_experts)? {
            Some(b) => Some(DeviceBuffer::upload(gpu, "e_score_correction_bias", &b, &[cfg.n_experts])?),
            None => None,
        };
        Ok(DeviceRouter {
            config: cfg.clone(),
            hidden_size: 0,
            n_shared,
            gate: None,
            bias,
            logits: LogitsKernel::CudaCores,
        })
    }

    /// Uploads the router of `layer`.
    pub fn from_layer(gpu: &GpuContext, layer: &MoeLayer) -> Result<Self, CudaError> {
        let w = layer.weights();
        Self::upload(gpu, layer.config(), w.router_gate(), w.router_bias().map(RouterBias::as_slice))
    }

    /// Slots per token, `k + n_shared`.
    pub fn slots_per_token(&self) -> usize {
        self.config.top_k + self.n_shared
    }

    /// Expert slots, `E + n_shared`.
    pub fn n_slots(&self) -> usize {
        self.config.n_experts + self.n_shared
    }
}

/// Which kernel last wrote a workspace's `tile_status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StatusSource {
    None,
    Router,
    Permute,
}

/// The contract's error for the per-tile status the router selection left: the first bad
/// token's non-finite logit (`logits [T, n_experts]`), or `Ok` when every tile is clean.
pub fn router_status(status: &[u64], logits: &[f32], n_experts: usize) -> Result<(), MoeError> {
    let Some(&code) = status.iter().find(|&&s| s != 0) else { return Ok(()) };
    let code = code - 1;
    let (token, expert) = ((code >> 32) as usize, (code & 0xffff_ffff) as usize);
    let value = logits.get(token * n_experts + expert).copied().unwrap_or(f32::NAN);
    Err(MoeError::NonFiniteLogit { token, expert, value })
}

/// The contract's error for the per-tile status the rank kernel left: the first pair whose
/// slot id (`ids [T * slots_per_token]`) is out of range, or `Ok` when every tile is clean.
pub fn permute_status(status: &[u64], ids: &[u32], slots_per_token: usize, n_slots: usize) -> Result<(), MoeError> {
    let Some(&code) = status.iter().find(|&&s| s != 0) else { return Ok(()) };
    let pair = (code - 1) as usize;
    let id = ids.get(pair).copied().unwrap_or(u32::MAX);
    let token = pair / slots_per_token.max(1);
    Err(MoeError::BadRouting { token, reason: format!("expert {id} out of range 0..{n_slots}") })
}

/// Every device buffer of one batch's routing and permutation (router logits to row
/// order and weights); the gathered rows, expert outputs and output are the caller's.
#[derive(Debug)]
pub struct RoutingWorkspace {
    /// Tokens `T`.
    pub tokens: usize,
    /// Routed experts `E` (0 for a permutation-only workspace).
    pub n_experts: usize,
    /// Slots per token, `k + n_shared`.
    pub slots_per_token: usize,
    /// Expert slots (`E + n_shared`).
    pub n_slots: usize,
    /// Router logits `[T, E]`.
    pub logits: DeviceBuffer<f32>,
    /// Slot ids `[T, slots_per_token]`.
    pub slot_ids: DeviceBuffer<u32>,
    /// Slot weights `[T, slots_per_token]`.
    pub slot_weights: DeviceBuffer<f32>,
    /// Stable rank of each pair among its tile's pairs of the same slot `[T * slots_per_token]`.
    pub pair_ranks: DeviceBuffer<u32>,
    /// Pairs per (tile, slot) `[n_tiles, n_slots]`: the router's per-expert counts.
    pub tile_counts: DeviceBuffer<u32>,
    /// Per tile: 0, or the first bad input of the tile, encoded (see the kernels).
    pub tile_status: DeviceBuffer<u64>,
    /// `[n_tiles, n_slots]`: the permuted row of each tile's first pair of each slot
    /// (`expert_offsets[e]` + the pairs of slot `e` in earlier tiles).
    pub tile_offsets: DeviceBuffer<u32>,
    /// `[1]`: the tile CTAs that have finished their counts, in the running selection or
    /// ranking launch; 0 between launches (the last CTA resets it). State, not an output:
    /// [`RoutingWorkspace::poison`] leaves it alone.
    pub tiles_done: DeviceBuffer<u32>,
    /// `[n_slots + 1]`.
    pub expert_offsets: DeviceBuffer<u32>,
    /// `[T * slots_per_token]`: the pair of each permuted row.
    pub row_pairs: DeviceBuffer<u32>,
    /// `[T * slots_per_token]`: the permuted row of each pair.
    pub pair_rows: DeviceBuffer<u32>,
    /// `[T * slots_per_token]`: the slot weight of each permuted row.
    pub row_weights: DeviceBuffer<f32>,
    pub(crate) status_source: StatusSource,
}

impl RoutingWorkspace {
    /// Buffers for `tokens` tokens routed by `router`.
    pub fn for_router(gpu: &GpuContext, router: &DeviceRouter, tokens: usize) -> Result<Self, CudaError> {
        Self::new(gpu, tokens, router.config.n_experts, router.slots_per_token(), router.n_slots())
    }

    /// Buffers for `tokens` tokens of `slots_per_token` slots over `n_slots` slots, with
    /// room for `n_experts` router logits per token (0 for a permutation alone).
    pub fn new(
        gpu: &GpuContext,
        tokens: usize,
        n_experts: usize,
        slots_per_token: usize,
        n_slots: usize,
    ) -> Result<Self, CudaError> {
        let pairs = tokens
            .checked_mul(slots_per_token)
            .filter(|&p| p <= u32::MAX as usize && n_slots < u32::MAX as usize)
            .ok_or_else(|| {
                MoeError::Overflow(format!("{tokens} tokens x {slots_per_token} slots do not fit 32-bit rows"))
            })?;
        let n_tiles = tiles(tokens);
        Ok(RoutingWorkspace {
            tokens,
            n_experts,
            slots_per_token,
            n_slots,
            logits: DeviceBuffer::zeros(gpu, &[tokens, n_experts])?,
            slot_ids: DeviceBuffer::zeros(gpu, &[tokens, slots_per_token])?,
            slot_weights: DeviceBuffer::zeros(gpu, &[tokens, slots_per_token])?,
            pair_ranks: DeviceBuffer::zeros(gpu, &[pairs])?,
            tile_counts: DeviceBuffer::zeros(gpu, &[n_tiles, n_slots])?,
            tile_status: DeviceBuffer::zeros(gpu, &[n_tiles])?,
            tile_offsets: DeviceBuffer::zeros(gpu, &[n_tiles, n_slots])?,
            tiles_done: DeviceBuffer::zeros(gpu, &[1])?,
            expert_offsets: DeviceBuffer::zeros(gpu, &[n_slots + 1])?,
            row_pairs: DeviceBuffer::zeros(gpu, &[pairs])?,
            pair_rows: DeviceBuffer::zeros(gpu, &[pairs])?,
            row_weights: DeviceBuffer::zeros(gpu, &[pairs])?,
            status_source: StatusSource::None,
        })
    }

    /// `T * slots_per_token`.
    pub fn pairs(&self) -> usize {
        self.tokens * self.slots_per_token
    }

    /// Poisons every output buffer (`0xff` bytes), so that elements a kernel fails to
    /// write read as NaN or `u32::MAX` afterwards; not `tiles_done`, which the kernels need
    /// at 0. The inputs (`logits` when routing from given logits, `slot_ids` when permuting
    /// given ids) must be written after this.
    pub fn poison(&mut self) -> Result<(), CudaError> {
        self.logits.poison()?;
        self.slot_ids.poison()?;
        self.slot_weights.poison()?;
        self.pair_ranks.poison()?;
        self.tile_counts.poison()?;
        self.tile_status.poison()?;
        self.tile_offsets.poison()?;
        self.expert_offsets.poison()?;
        self.row_pairs.poison()?;
        self.pair_rows.poison()?;
        self.row_weights.poison()
    }

    /// Reads the status the last router selection or rank kernel left (waits): the
    /// contract's error for the first bad token or pair, if any.
    pub fn check_status(&self) -> Result<(), CudaError> {
        if self.status_source == StatusSource::None || self.tokens == 0 {
            return Ok(());
        }
        let status = self.tile_status.download()?;
        if status.iter().all(|&s| s == 0) {
            return Ok(());
        }
        match self.status_source {
            StatusSource::Router => Ok(router_status(&status, &self.logits.download()?, self.n_experts)?),
            _ => Ok(permute_status(&status, &self.slot_ids.download()?, self.slots_per_token, self.n_slots)?),
        }
    }

    /// The routing (the first `top_k` slots of each token), downloaded.
    pub fn read_routing(&self, top_k: usize) -> Result<Routing, CudaError> {
        let (t, s) = (self.tokens, self.slots_per_token);
        if top_k > s {
            return Err(MoeError::shape("routing", &[t, s], &[t, top_k]).into());
        }
        let ids = self.slot_ids.download()?;
        let weights = self.slot_weights.download()?;
        let mut routing = Routing {
            tokens: t,
            top_k,
            expert_ids: Vec::with_capacity(t * top_k),
            weights: Vec::with_capacity(t * top_k),
        };
        for token in 0..t {
            routing.expert_ids.extend_from_slice(&ids[token * s..token * s + top_k]);
            routing.weights.extend_from_slice(&weights[token * s..token * s + top_k]);
        }
        Ok(routing)
    }

    /// The permutation, downloaded.
    pub fn read_permutation(&self) -> Result<Permutation, CudaError> {
        Ok(Permutation {
            tokens: self.tokens,
            slots_per_token: self.slots_per_token,
            expert_offsets: self.expert_offsets.download()?,
            row_pairs: self.row_pairs.download()?,
            pair_rows: self.pair_rows.download()?,
        })
    }
}
