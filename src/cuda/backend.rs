//! The CUDA side of [`crate::backend::Backend`]: each contract step and the whole layer on
//! one device, taking and returning host data.
//!
//! [`crate::backend::Backend::forward`] runs the layer whole on the GPU
//! ([`CudaMoeLayer`]); a layer its expert kernels do not take (f32 weights,
//! [`crate::moe::Precision::F32`], a shard, a shape off their multiples) is a
//! [`MoeError::Unsupported`], not a slower path.
//!
//! Without the `cuda` feature, `crate::backend` has an uninhabited `CudaBackend` in its
//! place, so the dispatch is written once.

use std::sync::Arc;

use half::bf16;

use crate::backend::BackendError;
use crate::config::{MoeConfig, RouterConfig};
use crate::cuda::layer::CudaMoeLayer;
use crate::cuda::{
    CudaError, DeviceBuffer, DeviceRouter, DeviceTensor, GpuContext, RouteCombineKernels, RoutingWorkspace, nvrtc,
};
use crate::error::{MoeError, check_len};
use crate::moe::{MoeLayer, MoeTrace, Permutation, Routing};
use crate::tensor::{Dtype, TensorView};

/// The CUDA backend: one device, its kernels.
#[derive(Debug)]
pub struct CudaBackend {
    gpu: Arc<GpuContext>,
    kernels: RouteCombineKernels,
}

impl CudaBackend {
    /// Opens device `ordinal` and compiles the kernels for it.
    pub fn new(ordinal: usize) -> Result<Self, BackendError> {
        let gpu = GpuContext::new(ordinal)?;
        if !nvrtc::available() {
            return Err(CudaError::NoNvrtc.into());
        }
        let kernels = RouteCombineKernels::new(&gpu)?;
        Ok(CudaBackend { gpu, kernels })
    }

    /// The device and its kernels.
    pub fn kernels(&self) -> &RouteCombineKernels {
        &self.kernels
    }

    pub(crate) fn name(&self) -> String {
        let info = self.gpu.info();
        format!("cuda:{} ({}, {})", info.ordinal, info.name, info.arch)
    }

    /// A workspace holding `perm` (uploaded) as if the permutation kernels made it.
    fn workspace_from(&self, perm: &Permutation) -> Result<RoutingWorkspace, BackendError> {
        let n_slots = perm.n_slots();
        let mut ws = RoutingWorkspace::new(&self.gpu, perm.tokens, 0, perm.slots_per_token, n_slots)?;
        check_len("row_pairs", &[perm.tokens, perm.slots_per_token], perm.row_pairs.len())?;
        check_len("pair_rows", &[perm.tokens, perm.slots_per_token], perm.pair_rows.len())?;
        perm.validate()?;
        ws.expert_offsets.copy_from_host("expert_offsets", &perm.expert_offsets)?;
        ws.row_pairs.copy_from_host("row_pairs", &perm.row_pairs)?;
        ws.pair_rows.copy_from_host("pair_rows", &perm.pair_rows)?;
        Ok(ws)
    }

    pub(crate) fn route_logits(
        &self,
        cfg: &RouterConfig,
        logits: &[f32],
        tokens: usize,
        bias: Option<&[f32]>,
    ) -> Result<Routing, BackendError> {
        cfg.validate().map_err(MoeError::from)?;
        check_len("router logits", &[tokens, cfg.n_experts], logits.len())?;
        let router = DeviceRouter::selection_only(&self.gpu, cfg, 0, bias)?;
        let mut ws = RoutingWorkspace::for_router(&self.gpu, &router, tokens)?;
        ws.logits.copy_from_host("router logits", logits)?;
        self.kernels.router_select(&router, &mut ws)?;
        ws.check_status()?;
        Ok(ws.read_routing(cfg.top_k)?)
    }

    pub(crate) fn route(
        &self,
        cfg: &RouterConfig,
        hidden: TensorView<'_>,
        tokens: usize,
        hidden_size: usize,
        gate: TensorView<'_>,
        bias: Option<&[f32]>,
    ) -> Result<Routing, BackendError> {
        let moe = MoeConfig { hidden_size, moe_intermediate_size: 1, n_shared_experts: 0, router: cfg.clone() };
        let router = DeviceRouter::upload(&self.gpu, &moe, gate, bias)?;
        let x = DeviceTensor::upload(&self.gpu, "hidden", hidden, &[tokens, hidden_size])?;
        let mut ws = RoutingWorkspace::for_router(&self.gpu, &router, tokens)?;
        self.kernels.router_logits(&router, &x, tokens, &mut ws.logits)?;
        self.kernels.router_select(&router, &mut ws)?;
        ws.check_status()?;
        Ok(ws.read_routing(cfg.top_k)?)
    }

    pub(crate) fn permute(
        &self,
        expert_ids: &[u32],
        tokens: usize,
        slots_per_token: usize,
        n_slots: usize,
    ) -> Result<Permutation, BackendError> {
        check_len("expert_ids", &[tokens, slots_per_token], expert_ids.len())?;
        let mut ws = RoutingWorkspace::new(&self.gpu, tokens, 0, slots_per_token, n_slots)?;
        ws.slot_ids.copy_from_host("expert_ids", expert_ids)?;
        self.kernels.permute(&mut ws)?;
        ws.check_status()?;
        Ok(ws.read_permutation()?)
    }

    fn gather(
        &self,
        hidden: TensorView<'_>,
        hidden_size: usize,
        perm: &Permutation,
        dtype: Dtype,
    ) -> Result<DeviceTensor, BackendError> {
        check_len("hidden", &[perm.tokens, hidden_size], hidden.len())?;
        let ws = self.workspace_from(perm)?;
        let x = DeviceTensor::upload(&self.gpu, "hidden", hidden, &[perm.tokens, hidden_size])?;
        let mut out = DeviceTensor::zeros(&self.gpu, dtype, &[perm.rows(), hidden_size])?;
        self.kernels.gather(&x, hidden_size, &ws, &mut out)?;
        Ok(out)
    }

    pub(crate) fn gather_bf16(
        &self,
        hidden: TensorView<'_>,
        hidden_size: usize,
        perm: &Permutation,
    ) -> Result<Vec<bf16>, BackendError> {
        match self.gather(hidden, hidden_size, perm, Dtype::Bf16)? {
            DeviceTensor::Bf16(b) => Ok(b.download()?),
            DeviceTensor::F32(_) => unreachable!("gather into bf16 returns bf16"),
        }
    }

    pub(crate) fn gather_f32(
        &self,
        hidden: TensorView<'_>,
        hidden_size: usize,
        perm: &Permutation,
    ) -> Result<Vec<f32>, BackendError> {
        match self.gather(hidden, hidden_size, perm, Dtype::F32)? {
            DeviceTensor::F32(b) => Ok(b.download()?),
            DeviceTensor::Bf16(_) => unreachable!("gather into f32 returns f32"),
        }
    }

    pub(crate) fn combine(
        &self,
        expert_out: &[f32],
        hidden_size: usize,
        perm: &Permutation,
    ) -> Result<Vec<f32>, BackendError> {
        check_len("expert output rows", &[perm.rows(), hidden_size], expert_out.len())?;
        let ws = self.workspace_from(perm)?;
        let rows = DeviceBuffer::upload(&self.gpu, "expert output rows", expert_out, &[perm.rows(), hidden_size])?;
        let mut out = DeviceBuffer::zeros(&self.gpu, &[perm.tokens, hidden_size])?;
        self.kernels.combine(&rows, hidden_size, &ws, &mut out)?;
        Ok(out.download()?)
    }

    /// The whole layer on the GPU ([`CudaMoeLayer`]), keeping every step's result.
    pub(crate) fn forward_trace(
        &self,
        layer: &MoeLayer,
        hidden: TensorView<'_>,
        tokens: usize,
    ) -> Result<MoeTrace, BackendError> {
        let cfg = layer.config();
        check_len("hidden", &[tokens, cfg.hidden_size], hidden.len())?;
        if !layer.shard().is_full(cfg) {
            return Err(MoeError::Unsupported(
                "the CUDA backend runs a layer with every expert slot; this one holds a shard".into(),
            )
            .into());
        }
        // Uploads the layer's weights on every call: an engine keeps a CudaMoeLayer. Its
        // constructor names what the expert kernels do not take (precision, dtype, shape).
        let gpu_layer = CudaMoeLayer::with_default_options(&self.gpu, layer)?;
        let mut ws = gpu_layer.workspace(tokens, hidden.dtype())?;
        ws.set_input(hidden)?;
        gpu_layer.enqueue(&mut ws)?;
        let output = ws.read_output()?;
        Ok(MoeTrace {
            routing: ws.routing.read_routing(cfg.router.top_k)?,
            slot_ids: ws.routing.slot_ids.download()?,
            slot_weights: ws.routing.slot_weights.download()?,
            permutation: ws.routing.read_permutation()?,
            weighted_rows: ws.expert_rows.download()?,
            output,
        })
    }
}

impl From<CudaError> for BackendError {
    fn from(err: CudaError) -> Self {
        match err {
            CudaError::Moe(e) => BackendError::Moe(e),
            other => BackendError::Cuda(other),
        }
    }
}
