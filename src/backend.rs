//! One backend API: the MoE contract's steps and the whole layer, on the CPU reference or
//! on CUDA, through the same calls.
//!
//! [`Backend::available`] lists every backend this machine can run (always the CPU; CUDA
//! when a device, its driver and NVRTC are there), so a test is written once and runs for
//! each. Every call takes and returns host data; the device-resident pipeline (no host
//! sync, graph-capturable) is `crate::cuda::RouteCombineKernels`.
//!
//! The CUDA side lives in `crate::cuda::backend`. Without the `cuda` feature the API is the
//! same: [`CudaBackend`] is then a type with no values, [`Backend::cuda`] returns
//! [`BackendError::Unavailable`], and the dispatch below has no `cfg` of its own.
//!
//! On CUDA, [`Backend::forward`] runs the whole layer on the GPU
//! (`crate::cuda::layer::CudaMoeLayer`), for the layers its expert kernels take: bf16
//! weights, [`crate::moe::Precision::Bf16`], every expert slot, their shape multiples. Any
//! other layer is a [`MoeError::Unsupported`] on CUDA (the CPU backend runs it); the
//! single steps (route, permute, gather, combine) take any shape on both.

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
pub use crate::cuda::backend::CudaBackend;
#[cfg(not(feature = "cuda"))]
pub use no_cuda::CudaBackend;

#[cfg(not(feature = "cuda"))]
mod no_cuda;

/// Where the MoE steps run.
#[derive(Debug)]
pub enum Backend {
    /// The CPU reference (`crate::moe`).
    Cpu,
    /// CUDA kernels on one device (no value of it exists without the `cuda` feature).
    Cuda(Box<CudaBackend>),
}

impl Backend {
    /// The CPU reference.
    pub fn cpu() -> Self {
        Backend::Cpu
    }

    /// CUDA on device `ordinal`: a typed error when there is no driver, no device, no
    /// NVRTC, an unsupported architecture, or no `cuda` feature.
    pub fn cuda(ordinal: usize) -> Result<Self, BackendError> {
        Ok(Backend::Cuda(Box::new(CudaBackend::new(ordinal)?)))
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
            Backend::Cuda(b) => b.name(),
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
            Backend::Cuda(b) => b.combine(expert_out, hidden_size, perm),
        }
    }

    /// The layer's output `[T, H]` for `hidden [T, H]` ([`MoeLayer::forward`]). On CUDA,
    /// only a layer the GPU runs whole (see the module docs).
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
            Backend::Cuda(b) => b.forward_trace(layer, hidden, tokens),
        }
    }
}

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
    pub fn gpu(test: &str) -> Option<(std::sync::Arc<crate::cuda::GpuContext>, crate::cuda::RouteCombineKernels)> {
        // NVRTC may be absent when every kernel comes from the on-disk cubin cache;
        // `RouteCombineKernels::new` says `NoNvrtc` when neither has them.
        let opened = crate::cuda::GpuContext::new(0).and_then(|gpu| {
            let kernels = crate::cuda::RouteCombineKernels::new(&gpu)?;
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
