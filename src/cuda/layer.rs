//! The whole MoE layer on the GPU: route, permute, gather, the grouped expert GEMMs
//! (shared experts fused as slots), combine — queued on one stream with no host sync, so
//! that a batch shape can be captured once in a CUDA graph and replayed ([`LayerGraph`]).
//!
//! ```text
//! moe_router_logits, moe_router_select, moe_permute_scatter   (RouteCombineKernels::route)
//! moe_gather_*_to_bf16                                         x [R, H] bf16
//! moe_expert_schedule, moe_expert_up_*, moe_expert_down_*      (ExpertGemm::run) y [R, H]
//! moe_combine                                                  out [T, H] f32
//! ```
//!
//! With [`GemmOptions::read_hidden`] (and the kernels of [`GemmOptions::reads_hidden`]) GEMM 1
//! reads bf16 hidden states through the permutation, and no gather runs. With
//! [`GemmOptions::decode_chain`], a batch of at most
//! [`crate::cuda::chain::CHAIN_MAX_TOKENS`] tokens runs as the three-launch decode chain
//! instead ([`crate::cuda::chain`]), with the same result, bit for bit.
//!
//! It implements the contract of [`crate::moe::MoeLayer`] under [`Precision::Bf16`] (the
//! gathered rows and the activation rounded to bf16, f32 accumulation) with bf16 expert
//! weights; [`CudaMoeLayer::new`] refuses anything else with a typed error. Weights are
//! uploaded once, in the contract's layout (4.5 GB for dots.llm1).

use std::sync::Arc;

use cudarc::driver::CudaGraph;

use crate::config::MoeConfig;
use crate::cuda::buffer::{DeviceBuffer, DeviceTensor};
use crate::cuda::chain;
use crate::cuda::context::GpuContext;
use crate::cuda::error::CudaError;
use crate::cuda::expert_gemm::{DeviceExpertWeights, ExpertGemm, GemmOptions, GemmWorkspace};
use crate::cuda::launch::Launcher;
use crate::cuda::moe::RouteCombineKernels;
use crate::cuda::source;
use crate::cuda::workspace::{DeviceRouter, RoutingWorkspace, StatusSource};
use crate::error::{MoeError, check_len};
use crate::moe::{MoeLayer, Precision};
use crate::tensor::{Dtype, TensorView};

/// One MoE layer resident on a GPU.
#[derive(Debug)]
pub struct CudaMoeLayer {
    config: MoeConfig,
    kernels: RouteCombineKernels,
    gemm: ExpertGemm,
    router: DeviceRouter,
    weights: DeviceExpertWeights,
}

/// Every device buffer of one batch of `tokens` tokens: input, intermediates, output.
#[derive(Debug)]
pub struct LayerWorkspace {
    /// Tokens `T`.
    pub tokens: usize,
    /// The input `hidden [T, H]` (f32 or bf16, fixed when the workspace is made).
    pub hidden: DeviceTensor,
    /// Routing and permutation buffers.
    pub routing: RoutingWorkspace,
    /// The gathered rows `x [R, H]`, bf16, permuted order (`R = T * (k + n_shared)`); `[0, H]`
    /// where GEMM 1 reads the hidden states ([`GemmOptions::reads_hidden`]).
    pub x: DeviceTensor,
    /// Work items and the activation `[R, I]`.
    pub gemm: GemmWorkspace,
    /// Weighted expert rows `y [R, H]` (f32, permuted order).
    pub expert_rows: DeviceBuffer<f32>,
    /// The layer output `[T, H]` (f32).
    pub output: DeviceBuffer<f32>,
    /// The decode chain's arrival counters, one per column block of GEMM 2
    /// ([`crate::cuda::chain::column_blocks`]); 0 between launches.
    pub column_done: DeviceBuffer<u32>,
}

impl LayerWorkspace {
    /// Poisons every intermediate and the output (`0xff` bytes: NaN, `u32::MAX`), so that
    /// an element no kernel writes shows in the result. The input is left alone.
    pub fn poison(&mut self) -> Result<(), CudaError> {
        self.routing.poison()?;
        self.x.poison()?;
        self.gemm.decode_items.poison()?;
        self.gemm.tiled_items.poison()?;
        self.gemm.item_counts.poison()?;
        self.gemm.act.poison()?;
        self.expert_rows.poison()?;
        self.output.poison()
    }

    /// Copies `hidden [T, H]` from the host into the input buffer (same element type).
    pub fn set_input(&mut self, hidden: TensorView<'_>) -> Result<(), CudaError> {
        match (&mut self.hidden, hidden) {
            (DeviceTensor::F32(d), TensorView::F32(h)) => d.copy_from_host("hidden", h),
            (DeviceTensor::Bf16(d), TensorView::Bf16(h)) => d.copy_from_host("hidden", h),
            (d, h) => Err(MoeError::Unsupported(format!(
                "this workspace takes {:?} hidden states, got {:?}",
                d.dtype(),
                h.dtype()
            ))
            .into()),
        }
    }

    /// Downloads the output `[T, H]` (waits), after checking the routing status (a
    /// non-finite router logit is an error, as on the CPU) and the work lists.
    pub fn read_output(&self) -> Result<Vec<f32>, CudaError> {
        self.routing.check_status()?;
        if self.tokens > 0 {
            self.gemm.read_item_counts()?;
        }
        self.output.download()
    }
}

impl CudaMoeLayer {
    /// Uploads `layer` to `gpu` and loads the kernels `options` need. The layer must use
    /// [`Precision::Bf16`] and bf16 expert weights of a shape the kernels take
    /// ([`crate::cuda::expert_gemm::check_shape`]).
    pub fn new(gpu: &Arc<GpuContext>, layer: &MoeLayer, options: GemmOptions) -> Result<Self, CudaError> {
        if layer.precision() != Precision::Bf16 {
            return Err(MoeError::Unsupported(
                "the CUDA layer implements Precision::Bf16 (bf16 gathered rows and activation); set it on the layer"
                    .into(),
            )
            .into());
        }
        let weights = DeviceExpertWeights::upload(gpu, layer.weights())?;
        if options.decode_chain || options.read_hidden {
            gpu.load(&[&source::DECODE])?;
        }
        Ok(CudaMoeLayer {
            config: layer.config().clone(),
            kernels: RouteCombineKernels::new(gpu)?,
            gemm: ExpertGemm::new(gpu, options)?,
            router: DeviceRouter { logits: options.logits_kernel(), ..DeviceRouter::from_layer(gpu, layer)? },
            weights,
        })
    }

    /// [`CudaMoeLayer::new`] with the fastest options for the device.
    pub fn with_default_options(gpu: &Arc<GpuContext>, layer: &MoeLayer) -> Result<Self, CudaError> {
        Self::new(gpu, layer, GemmOptions::for_device(gpu))
    }

    /// The layer's shape.
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// The GEMM options.
    pub fn options(&self) -> GemmOptions {
        self.gemm.options()
    }

    /// The expert GEMM kernels (to time GEMM 1 and GEMM 2 apart on a workspace that
    /// [`CudaMoeLayer::enqueue`] has filled).
    pub fn expert_gemm(&self) -> &ExpertGemm {
        &self.gemm
    }

    /// The expert weights on the device.
    pub fn weights(&self) -> &DeviceExpertWeights {
        &self.weights
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<GpuContext> {
        self.kernels.gpu()
    }

    /// Buffers for `tokens` tokens whose hidden states are `dtype`.
    pub fn workspace(&self, tokens: usize, dtype: Dtype) -> Result<LayerWorkspace, CudaError> {
        let (h, slots) = (self.config.hidden_size, self.config.slots_per_token());
        let rows = tokens
            .checked_mul(slots)
            .filter(|r| r.checked_mul(h).is_some())
            .ok_or_else(|| MoeError::Overflow(format!("{tokens} tokens x {slots} slots x {h}")))?;
        let gpu = self.gpu();
        Ok(LayerWorkspace {
            tokens,
            hidden: DeviceTensor::zeros(gpu, dtype, &[tokens, h])?,
            routing: RoutingWorkspace::for_router(gpu, &self.router, tokens)?,
            // No gathered copy where GEMM 1 reads the hidden states.
            x: DeviceTensor::zeros(gpu, Dtype::Bf16, &[if self.options().reads_hidden(dtype) { 0 } else { rows }, h])?,
            gemm: self.gemm.workspace(&self.weights, rows)?,
            expert_rows: DeviceBuffer::zeros(gpu, &[rows, h])?,
            output: DeviceBuffer::zeros(gpu, &[tokens, h])?,
            column_done: DeviceBuffer::zeros(gpu, &[chain::column_blocks(h)])?,
        })
    }

    /// Queues the whole layer on `ws.hidden`: nine launches (ten with both GEMM regimes),
    /// or the three of the decode chain ([`CudaMoeLayer::runs_chain`]); no host sync,
    /// nothing allocated: capturable in a CUDA graph.
    pub fn enqueue(&self, ws: &mut LayerWorkspace) -> Result<(), CudaError> {
        let h = self.config.hidden_size;
        if ws.tokens == 0 {
            return Ok(());
        }
        if self.runs_chain(ws.tokens) {
            return self.enqueue_chain(ws);
        }
        self.kernels.route(&self.router, &ws.hidden, &mut ws.routing)?;
        if self.gemm.options().reads_hidden(ws.hidden.dtype()) {
            // GEMM 1 reads the hidden states through the permutation: no gather launch.
            self.gemm.schedule(&ws.routing.expert_offsets, &mut ws.gemm)?;
            let slots = self.config.slots_per_token();
            self.gemm.up_from_hidden(&self.weights, &ws.hidden, &ws.routing.row_pairs, slots, &mut ws.gemm)?;
            self.gemm.down(&self.weights, &ws.routing.row_weights, &ws.gemm, &mut ws.expert_rows)?;
        } else {
            self.kernels.gather(&ws.hidden, h, &ws.routing, &mut ws.x)?;
            self.gemm.run(
                &self.weights,
                &ws.routing.expert_offsets,
                &ws.x,
                &ws.routing.row_weights,
                &mut ws.gemm,
                &mut ws.expert_rows,
            )?;
        }
        self.kernels.combine(&ws.expert_rows, h, &ws.routing, &mut ws.output)
    }

    /// Whether a batch of `tokens` tokens runs as the decode chain ([`chain::runs_chain`]).
    pub fn runs_chain(&self, tokens: usize) -> bool {
        chain::runs_chain(&self.gemm.options(), tokens)
    }

    /// The decode chain on `ws` (three launches).
    fn enqueue_chain(&self, ws: &mut LayerWorkspace) -> Result<(), CudaError> {
        let (h, i) = (self.config.hidden_size, self.config.moe_intermediate_size);
        let router = &self.router;
        let gate = router
            .gate
            .as_ref()
            .ok_or_else(|| MoeError::MissingWeights("this device router has no gate weight (selection only)".into()))?;
        let bias = router.bias.as_ref().map_or(0, |b| b.device_ptr());
        let (tokens, slots) = (ws.tokens, self.config.slots_per_token());
        // The workspace was made by `self.workspace(tokens, _)`: every buffer has the size
        // its launch is built for (routing [T, E] and [T * slots], the item lists of these
        // options, act [R, I], y [R, H], out [T, H], H / 64 counters); check the ones a
        // caller could have swapped.
        ws.hidden.expect_shape("hidden", &[tokens, h])?;
        ws.expert_rows.expect_shape("expert output rows", &[tokens * slots, h])?;
        ws.output.expect_shape("output", &[tokens, h])?;
        ws.column_done.expect_shape("column counters", &[chain::column_blocks(h)])?;
        if ws.routing.tokens != tokens || ws.routing.n_slots != router.n_slots() || ws.gemm.rows != tokens * slots {
            return Err(MoeError::Unsupported("this workspace was made for another batch or layer".into()).into());
        }
        let items = ws.gemm.ptrs();
        let launches = [
            chain::route_launch(
                &router.config,
                router.n_shared,
                (ws.hidden.device_ptr(), ws.hidden.dtype()),
                (gate.device_ptr(), gate.dtype()),
                bias,
                h,
                &ws.routing.ptrs(),
                &ws.routing.dims(),
                &self.gemm.options(),
                &items,
            )?,
            chain::up_launch(
                (ws.hidden.device_ptr(), ws.hidden.dtype()),
                ws.routing.row_pairs.device_ptr(),
                slots,
                self.weights.gate_up.device_ptr(),
                h,
                i,
                &items,
            )?,
            chain::down_launch(
                self.weights.down.device_ptr(),
                ws.routing.row_weights.device_ptr(),
                ws.routing.pair_rows.device_ptr(),
                &chain::CombineTargets {
                    expert_rows: ws.expert_rows.device_ptr(),
                    column_done: ws.column_done.device_ptr(),
                    out: ws.output.device_ptr(),
                },
                tokens,
                slots,
                h,
                i,
                &items,
            )?,
        ];
        ws.routing.status_source = StatusSource::Router;
        for launch in launches.into_iter().flatten() {
            // SAFETY: the buffers have the sizes the launches were built for (checked above
            // and by the workspace's constructor); the router writes items inside the lists'
            // capacities, with slot < n_slots and rows inside 0..R.
            unsafe { self.gpu().launch(&launch) }?;
        }
        Ok(())
    }

    /// The layer's output `[T, H]` for host `hidden [T, H]`: a fresh workspace, upload,
    /// [`CudaMoeLayer::enqueue`], download (waits).
    pub fn forward(&self, hidden: TensorView<'_>, tokens: usize) -> Result<Vec<f32>, CudaError> {
        check_len("hidden", &[tokens, self.config.hidden_size], hidden.len())?;
        let mut ws = self.workspace(tokens, hidden.dtype())?;
        ws.set_input(hidden)?;
        self.enqueue(&mut ws)?;
        ws.read_output()
    }

    /// Captures [`CudaMoeLayer::enqueue`] on `ws` in a CUDA graph, for replay with new
    /// inputs of the same shape ([`LayerGraph::replay`]): the decode path without launch
    /// overhead.
    pub fn capture(&self, mut ws: LayerWorkspace) -> Result<LayerGraph<'_>, CudaError> {
        let graph = crate::cuda::graph::capture(self.gpu(), || self.enqueue(&mut ws))?;
        Ok(LayerGraph { layer: self, graph, ws })
    }
}

/// A captured layer for one batch shape: its workspace and the graph of its launches.
pub struct LayerGraph<'a> {
    layer: &'a CudaMoeLayer,
    graph: CudaGraph,
    ws: LayerWorkspace,
}

impl std::fmt::Debug for LayerGraph<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerGraph").field("tokens", &self.ws.tokens).finish_non_exhaustive()
    }
}

impl LayerGraph<'_> {
    /// The workspace (input, intermediates, output).
    pub fn workspace(&self) -> &LayerWorkspace {
        &self.ws
    }

    /// The workspace, mutable: to poison the intermediates between replays, say. The
    /// buffers stay where the graph captured them.
    pub fn workspace_mut(&mut self) -> &mut LayerWorkspace {
        &mut self.ws
    }

    /// Copies a new input `[T, H]` into the captured input buffer.
    pub fn set_input(&mut self, hidden: TensorView<'_>) -> Result<(), CudaError> {
        self.ws.set_input(hidden)
    }

    /// Queues one replay of the whole layer (no host sync).
    pub fn replay(&self) -> Result<(), CudaError> {
        Ok(self.graph.launch()?)
    }

    /// Replays on `hidden` and downloads the output (waits).
    pub fn forward(&mut self, hidden: TensorView<'_>) -> Result<Vec<f32>, CudaError> {
        check_len("hidden", &[self.ws.tokens, self.layer.config.hidden_size], hidden.len())?;
        self.set_input(hidden)?;
        self.replay()?;
        self.ws.read_output()
    }
}
