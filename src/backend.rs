//! One backend API: the MoE contract's steps and the whole layer, on the CPU reference or
//! on CUDA, through the same calls.
//!
//! [`Backend::available`] lists every backend this machine can run (always the CPU; CUDA
//! when a device, its driver and NVRTC are there), so a test is written once and runs for
//! each. Every call takes and returns host data; the device-resident pipeline (no host
//! sync, graph-capturable) is [`crate::cuda::MoeKernels`].
//!
//! Without the `cuda` feature the API is the same: [`Backend::cuda`] returns
//! [`BackendError::Unavailable`].
//!
//! What runs where on CUDA: every step is a CUDA kernel when the layer is one the expert
//! GEMM kernels take (bf16 weights, [`crate::moe::Precision::Bf16`], their shape
//! multiples): [`Backend::forward`] then runs [`crate::cuda::layer::CudaMoeLayer`]. For any
//! other layer (f32 weights, [`crate::moe::Precision::F32`]) routing, permutation, gather
//! and combine run on the GPU and the expert GEMMs on the CPU kernels in between; the
//! result follows the same contract either way.

use half::bf16;

use crate::config::RouterConfig;
use crate::error::MoeError;
use crate::moe::{MoeLayer, MoeTrace, Permutation, Routing};
use crate::tensor::TensorView;

/// An error of a backend call.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The inputs break the MoE contract (same variants on every backend).
    #[error(transparent)]
    Moe(#[from] MoeError),
    /// The backend cannot run on this machine or build.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// A CUDA failure other than a contract error.
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Cuda(crate::cuda::CudaError),
}

#[cfg(feature = "cuda")]
impl From<crate::cuda::CudaError> for BackendError {
    fn from(err: crate::cuda::CudaError) -> Self {
        match err {
            crate::cuda::CudaError::Moe(e) => BackendError::Moe(e),
            other => BackendError::Cuda(other),
        }
    }
}

/// Where the MoE steps run.
#[derive(Debug)]
pub enum Backend {
    /// The CPU reference (`crate::moe`).
    Cpu,
    /// CUDA kernels on one device.
    #[cfg(feature = "cuda")]
    Cuda(Box<cuda_backend::CudaBackend>),
}

impl Backend {
    /// The CPU reference.
    pub fn cpu() -> Self {
        Backend::Cpu
    }

    /// CUDA on device `ordinal`: a typed error when there is no driver, no device, no
    /// NVRTC, an unsupported architecture, or no `cuda` feature.
    pub fn cuda(ordinal: usize) -> Result<Self, BackendError> {
        #[cfg(feature = "cuda")]
        {
            Ok(Backend::Cuda(Box::new(cuda_backend::CudaBackend::new(ordinal)?)))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ordinal;
            Err(BackendError::Unavailable("dots-moe was built without the `cuda` feature".into()))
        }
    }

    /// Every backend this machine can run: the CPU, then CUDA device 0 if it opens. The
    /// second element says why CUDA is missing, if it is.
    pub fn available() -> (Vec<Backend>, Option<String>) {
        match Backend::cuda(0) {
            Ok(cuda) => (vec![Backend::Cpu, cuda], None),
            Err(why) => (vec![Backend::Cpu], Some(why.to_string())),
        }
    }

    /// A short name (`cpu`, `cuda:0 (NVIDIA H200, sm_90a)`).
    pub fn name(&self) -> String {
        match self {
            Backend::Cpu => "cpu".into(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(b) => b.name(),
        }
    }

    /// Where [`Backend::forward`] runs `layer`'s steps: `cpu`, `cuda` (the whole layer on
    /// the GPU) or `cuda+cpu-gemm` (the expert GEMMs on the CPU; see the module docs).
    pub fn forward_path(&self, layer: &MoeLayer) -> &'static str {
        match self {
            Backend::Cpu => {
                let _ = layer;
                "cpu"
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(b) => {
                if b.runs_whole_layer(layer) {
                    "cuda"
                } else {
                    "cuda+cpu-gemm"
                }
            }
        }
    }

    /// Routes from router `logits [T, E]` ([`crate::moe::route_logits`]).
    pub fn route_logits(
        &self,
        cfg: &RouterConfig,
        logits: &[f32],
        tokens: usize,
        bias: Option<&[f32]>,
    ) -> Result<Routing, BackendError> {
        match self {
            Backend::Cpu => Ok(crate::moe::route_logits(cfg, logits, tokens, bias)?),
            #[cfg(feature = "cuda")]
            Backend::Cuda(b) => b.route_logits(cfg, logits, tokens, bias),
        }
    }

    /// Routes `hidden [T, H]` with `gate [E, H]` ([`crate::moe::route()`]).
    pub fn route(
        &self,
        cfg: &RouterConfig,
        hidden: TensorView<'_>,
        tokens: usize,
        hidden_size: usize,
        gate: TensorView<'_>,
        bias: Option<&[f32]>,
    ) -> Result<Routing, BackendError> {
        match self {
            Backend::Cpu => Ok(crate::moe::route(cfg, hidden, tokens, hidden_size, gate, bias)?),
            #[cfg(feature = "cuda")]
            Backend::Cuda(b) => b.route(cfg, hidden, tokens, hidden_size, gate, bias),
        }
    }

    /// The stable counting sort of `expert_ids [T, slots_per_token]` over `n_slots` slots
    /// ([`crate::moe::permute()`]).
    pub fn permute(
        &self,
        expert_ids: &[u32],
        tokens: usize,
        slots_per_token: usize,
        n_slots: usize,
    ) -> Result<Permutation, BackendError> {
        match self {
            Backend::Cpu => Ok(crate::moe::permute(expert_ids, tokens, slots_per_token, n_slots)?),
            #[cfg(feature = "cuda")]
            Backend::Cuda(b) => b.permute(expert_ids, tokens, slots_per_token, n_slots),
        }
    }

    /// Gathers `hidden [T, H]` into permuted order as bf16 ([`crate::moe::gather_bf16`]).
    pub fn gather_bf16(
        &self,
        hidden: TensorView<'_>,
        hidden_size: usize,
        perm: &Permutation,
    ) -> Result<Vec<bf16>, BackendError> {
        match self {
            Backend::Cpu => {
                let mut out = vec![bf16::ZERO; perm.rows() * hidden_size];
                crate::moe::gather_bf16(hidden, hidden_size, perm, &mut out)?;
                Ok(out)
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(b) => b.gather_bf16(hidden, hidden_size, perm),
        }
    }

    /// Gathers `hidden [T, H]` into permuted order as f32 ([`crate::moe::gather_f32`]).
    pub fn gather_f32(
        &self,
        hidden: TensorView<'_>,
        hidden_size: usize,
        perm: &Permutation,
    ) -> Result<Vec<f32>, BackendError> {
        match self {
            Backend::Cpu => {
                let mut out = vec![0.0; perm.rows() * hidden_size];
                crate::moe::gather_f32(hidden, hidden_size, perm, &mut out)?;
                Ok(out)
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(b) => b.gather_f32(hidden, hidden_size, perm),
        }
    }

    /// Sums each token's weighted rows in slot order ([`crate::moe::combine()`]).
    pub fn combine(
        &self,
        expert_out: &[f32],
        hidden_size: usize,
        perm: &Permutation,
    ) -> Result<Vec<f32>, BackendError> {
        match self {
            Backend::Cpu => {
                let mut out = vec![0.0; perm.tokens * hidden_size];
                crate::moe::combine(expert_out, hidden_size, perm, &mut out)?;
                Ok(out)
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(b) => b.combine(expert_out, hidden_size, perm),
        }
    }

    /// The layer's output `[T, H]` for `hidden [T, H]` ([`MoeLayer::forward`]).
    pub fn forward(&self, layer: &MoeLayer, hidden: TensorView<'_>, tokens: usize) -> Result<Vec<f32>, BackendError> {
        Ok(self.forward_trace(layer, hidden, tokens)?.output)
    }

    /// Like [`Backend::forward`], keeping every step's result ([`MoeLayer::forward_trace`]).
    pub fn forward_trace(
        &self,
        layer: &MoeLayer,
        hidden: TensorView<'_>,
        tokens: usize,
    ) -> Result<MoeTrace, BackendError> {
        match self {
            Backend::Cpu => Ok(layer.forward_trace(hidden, tokens)?),
            #[cfg(feature = "cuda")]
            Backend::Cuda(b) => b.forward_trace(layer, hidden, tokens),
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda_backend {
    use std::sync::Arc;

    use half::bf16;

    use super::BackendError;
    use crate::config::{MoeConfig, RouterConfig};
    use crate::cuda::expert_gemm::check_shape;
    use crate::cuda::layer::CudaMoeLayer;
    use crate::cuda::{DeviceBuffer, DeviceRouter, DeviceTensor, GpuContext, MoeKernels, MoeWorkspace, nvrtc};
    use crate::error::{MoeError, check_len};
    use crate::moe::{MoeLayer, MoeTrace, Permutation, Precision, Routing, grouped_experts};
    use crate::tensor::{Dtype, TensorView};

    /// The permutation's row weights: `slot_weights[row_pairs[r]]`.
    fn row_weights(perm: &Permutation, slot_weights: &[f32]) -> Vec<f32> {
        perm.row_pairs.iter().map(|&p| slot_weights[p as usize]).collect()
    }

    /// The CUDA backend: one device, its kernels.
    #[derive(Debug)]
    pub struct CudaBackend {
        gpu: Arc<GpuContext>,
        kernels: MoeKernels,
    }

    impl CudaBackend {
        /// Opens device `ordinal` and compiles the kernels for it.
        pub fn new(ordinal: usize) -> Result<Self, BackendError> {
            let gpu = GpuContext::new(ordinal)?;
            if !nvrtc::available() {
                return Err(crate::cuda::CudaError::NoNvrtc.into());
            }
            let kernels = MoeKernels::new(&gpu)?;
            Ok(CudaBackend { gpu, kernels })
        }

        /// The device and its kernels.
        pub fn kernels(&self) -> &MoeKernels {
            &self.kernels
        }

        pub(super) fn name(&self) -> String {
            let info = self.gpu.info();
            format!("cuda:{} ({}, {})", info.ordinal, info.name, info.arch)
        }

        /// A workspace holding `perm` (uploaded) as if the permutation kernels made it.
        fn workspace_from(&self, perm: &Permutation) -> Result<MoeWorkspace, BackendError> {
            let n_slots = perm.n_slots();
            let mut ws = MoeWorkspace::new(&self.gpu, perm.tokens, 0, perm.slots_per_token, n_slots)?;
            check_len("row_pairs", &[perm.tokens, perm.slots_per_token], perm.row_pairs.len())?;
            check_len("pair_rows", &[perm.tokens, perm.slots_per_token], perm.pair_rows.len())?;
            perm.validate()?;
            ws.expert_offsets.copy_from_host("expert_offsets", &perm.expert_offsets)?;
            ws.row_pairs.copy_from_host("row_pairs", &perm.row_pairs)?;
            ws.pair_rows.copy_from_host("pair_rows", &perm.pair_rows)?;
            Ok(ws)
        }

        pub(super) fn route_logits(
            &self,
            cfg: &RouterConfig,
            logits: &[f32],
            tokens: usize,
            bias: Option<&[f32]>,
        ) -> Result<Routing, BackendError> {
            cfg.validate().map_err(MoeError::from)?;
            check_len("router logits", &[tokens, cfg.n_experts], logits.len())?;
            let router = DeviceRouter::selection_only(&self.gpu, cfg, 0, bias)?;
            let mut ws = MoeWorkspace::for_router(&self.gpu, &router, tokens)?;
            ws.logits.copy_from_host("router logits", logits)?;
            self.kernels.router_select(&router, &mut ws)?;
            ws.check_status()?;
            Ok(ws.read_routing(cfg.top_k)?)
        }

        pub(super) fn route(
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
            let mut ws = MoeWorkspace::for_router(&self.gpu, &router, tokens)?;
            self.kernels.router_logits(&router, &x, tokens, &mut ws.logits)?;
            self.kernels.router_select(&router, &mut ws)?;
            ws.check_status()?;
            Ok(ws.read_routing(cfg.top_k)?)
        }

        pub(super) fn permute(
            &self,
            expert_ids: &[u32],
            tokens: usize,
            slots_per_token: usize,
            n_slots: usize,
        ) -> Result<Permutation, BackendError> {
            check_len("expert_ids", &[tokens, slots_per_token], expert_ids.len())?;
            let mut ws = MoeWorkspace::new(&self.gpu, tokens, 0, slots_per_token, n_slots)?;
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

        pub(super) fn gather_bf16(
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

        pub(super) fn gather_f32(
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

        pub(super) fn combine(
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

        /// Whether [`super::Backend::forward`] runs all of `layer` on the GPU
        /// ([`CudaMoeLayer`]: every expert slot, bf16 expert weights, [`Precision::Bf16`], a shape the expert
        /// kernels take). Otherwise the expert GEMMs run on the CPU between the GPU's gather
        /// and combine.
        pub fn runs_whole_layer(&self, layer: &MoeLayer) -> bool {
            let cfg = layer.config();
            layer.precision() == Precision::Bf16
                && layer.shard().is_full(cfg)
                && layer.weights().dtype() == Dtype::Bf16
                && check_shape(cfg.hidden_size, cfg.moe_intermediate_size).is_ok()
        }

        pub(super) fn forward_trace(
            &self,
            layer: &MoeLayer,
            hidden: TensorView<'_>,
            tokens: usize,
        ) -> Result<MoeTrace, BackendError> {
            let cfg = layer.config();
            let (h, k) = (cfg.hidden_size, cfg.router.top_k);
            check_len("hidden", &[tokens, h], hidden.len())?;
            if self.runs_whole_layer(layer) {
                // Uploads the layer's weights on every call: an engine keeps a CudaMoeLayer.
                let gpu_layer = CudaMoeLayer::with_default_options(&self.gpu, layer)?;
                let mut ws = gpu_layer.workspace(tokens, hidden.dtype())?;
                ws.set_input(hidden)?;
                gpu_layer.enqueue(&mut ws)?;
                let output = ws.read_output()?;
                return Ok(MoeTrace {
                    routing: ws.routing.read_routing(k)?,
                    slot_ids: ws.routing.slot_ids.download()?,
                    slot_weights: ws.routing.slot_weights.download()?,
                    permutation: ws.routing.read_permutation()?,
                    weighted_rows: ws.expert_rows.download()?,
                    output,
                });
            }
            tokens.checked_mul(cfg.slots_per_token()).and_then(|p| p.checked_mul(h)).ok_or_else(|| {
                MoeError::Overflow(format!("{tokens} tokens x {} slots x {h}", cfg.slots_per_token()))
            })?;
            let router = DeviceRouter::from_layer(&self.gpu, layer)?;
            let x = DeviceTensor::upload(&self.gpu, "hidden", hidden, &[tokens, h])?;
            let mut ws = MoeWorkspace::for_router(&self.gpu, &router, tokens)?;
            self.kernels.route(&router, &x, &mut ws)?;
            let rows = ws.pairs();
            let gather_dtype = match layer.precision() {
                Precision::Bf16 => Dtype::Bf16,
                Precision::F32 => Dtype::F32,
            };
            let mut x_perm = DeviceTensor::zeros(&self.gpu, gather_dtype, &[rows, h])?;
            self.kernels.gather(&x, h, &ws, &mut x_perm)?;
            ws.check_status()?;

            let routing = ws.read_routing(k)?;
            let slot_ids = ws.slot_ids.download()?;
            let slot_weights = ws.slot_weights.download()?;
            let permutation = ws.read_permutation()?;
            let weights = row_weights(&permutation, &slot_weights);
            // The expert GEMMs on the CPU kernels (this layer is not one the GPU's take).
            let expert_rows = match x_perm {
                DeviceTensor::Bf16(b) => {
                    let x = b.download()?;
                    grouped_experts(
                        layer.weights(),
                        TensorView::Bf16(&x),
                        &permutation,
                        &weights,
                        layer.precision(),
                        layer.isa(),
                    )?
                }
                DeviceTensor::F32(b) => {
                    let x = b.download()?;
                    grouped_experts(
                        layer.weights(),
                        TensorView::F32(&x),
                        &permutation,
                        &weights,
                        layer.precision(),
                        layer.isa(),
                    )?
                }
            };
            let rows_dev = DeviceBuffer::upload(&self.gpu, "expert output rows", &expert_rows, &[rows, h])?;
            let mut out = DeviceBuffer::zeros(&self.gpu, &[tokens, h])?;
            self.kernels.combine(&rows_dev, h, &ws, &mut out)?;
            let output = out.download()?;
            Ok(MoeTrace { routing, slot_ids, slot_weights, permutation, weighted_rows: expert_rows, output })
        }
    }
}

#[cfg(feature = "cuda")]
pub use cuda_backend::CudaBackend;

/// Helpers for test suites that run once per backend, or only on a GPU.
///
/// Without a GPU the GPU half of a test is skipped with a message on stderr; with
/// `DOTS_MOE_REQUIRE_GPU=1` (the GPU host's runner sets it) a missing GPU is a failure.
pub mod testing {
    use super::Backend;

    /// The environment variable that turns "no GPU, skipped" into a failure.
    pub const REQUIRE_GPU_ENV: &str = "DOTS_MOE_REQUIRE_GPU";

    /// Something a test needs that a machine may lack. Without it the test (or its part)
    /// is skipped with a message on stderr, unless its `DOTS_MOE_REQUIRE_*` variable is
    /// `1`: then the absence is a failure. Every such variable is read here and nowhere
    /// else.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Requirement {
        /// A CUDA device with its driver (`DOTS_MOE_REQUIRE_GPU`; the GPU host sets it).
        Gpu,
        /// The NVRTC library, and the SASS tools for the SASS checks
        /// (`DOTS_MOE_REQUIRE_NVRTC`; CI and the GPU host set it).
        Nvrtc,
        /// A C++20 compiler for the CPU emulator of the kernels (`DOTS_MOE_REQUIRE_EMULATOR`;
        /// CI sets it).
        Emulator,
    }

    impl Requirement {
        /// Its environment variable.
        pub fn env(self) -> &'static str {
            match self {
                Requirement::Gpu => REQUIRE_GPU_ENV,
                Requirement::Nvrtc => "DOTS_MOE_REQUIRE_NVRTC",
                Requirement::Emulator => "DOTS_MOE_REQUIRE_EMULATOR",
            }
        }

        /// Whether its variable is `1`.
        pub fn required(self) -> bool {
            std::env::var(self.env()).is_ok_and(|v| v == "1")
        }

        /// Reports that `test` skips (its part needing this) because of `why`; panics
        /// instead when it is required.
        pub fn skip_or_fail(self, test: &str, why: &str) {
            assert!(!self.required(), "{test}: {}=1 but {why}", self.env());
            eprintln!("{test}: skipped: {why} (set {}=1 to fail instead)", self.env());
        }
    }

    /// Whether `DOTS_MOE_REQUIRE_GPU=1`.
    pub fn gpu_required() -> bool {
        Requirement::Gpu.required()
    }

    /// Reports that `test` skips its GPU part because of `why`; panics instead when a GPU
    /// is required.
    pub fn skip_or_fail(test: &str, why: &str) {
        Requirement::Gpu.skip_or_fail(test, &format!("the GPU is unavailable: {why}"));
    }

    /// Every backend to run `test` on: the CPU, and CUDA when it opens (see the module).
    pub fn backends(test: &str) -> Vec<Backend> {
        let (backends, missing) = Backend::available();
        if let Some(why) = missing {
            skip_or_fail(test, &why);
        }
        backends
    }

    /// The GPU and its kernels for `test`, or `None` (skipped; see the module).
    #[cfg(feature = "cuda")]
    pub fn gpu(test: &str) -> Option<(std::sync::Arc<crate::cuda::GpuContext>, crate::cuda::MoeKernels)> {
        // NVRTC may be absent when every kernel comes from the on-disk cubin cache;
        // `MoeKernels::new` says `NoNvrtc` when neither has them.
        let opened = crate::cuda::GpuContext::new(0).and_then(|gpu| {
            let kernels = crate::cuda::MoeKernels::new(&gpu)?;
            Ok((gpu, kernels))
        });
        match opened {
            Ok(pair) => Some(pair),
            Err(why) => {
                skip_or_fail(test, &why.to_string());
                None
            }
        }
    }
}
