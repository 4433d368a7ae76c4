//! The CUDA backend of a build without the `cuda` feature: a type with no values.
//!
//! [`CudaBackend::new`] always fails, so no [`super::Backend::Cuda`] exists and every method
//! below is an empty match; the dispatch in [`super`] is written once for both builds.

use half::bf16;

use super::BackendError;
use crate::config::RouterConfig;
use crate::moe::{MoeLayer, MoeTrace, Permutation, Routing};
use crate::tensor::TensorView;

/// The CUDA backend of a build without the `cuda` feature: it has no values.
#[derive(Debug)]
pub enum CudaBackend {}

impl CudaBackend {
    /// Always [`BackendError::Unavailable`]: this build has no CUDA.
    pub fn new(_ordinal: usize) -> Result<Self, BackendError> {
        Err(BackendError::Unavailable("dots-moe was built without the `cuda` feature".into()))
    }

    pub(crate) fn name(&self) -> String {
        match *self {}
    }

    pub(crate) fn route_logits(
        &self,
        _cfg: &RouterConfig,
        _logits: &[f32],
        _tokens: usize,
        _bias: Option<&[f32]>,
    ) -> Result<Routing, BackendError> {
        match *self {}
    }

    pub(crate) fn route(
        &self,
        _cfg: &RouterConfig,
        _hidden: TensorView<'_>,
        _tokens: usize,
        _hidden_size: usize,
        _gate: TensorView<'_>,
        _bias: Option<&[f32]>,
    ) -> Result<Routing, BackendError> {
        match *self {}
    }

    pub(crate) fn permute(
        &self,
        _expert_ids: &[u32],
        _tokens: usize,
        _slots_per_token: usize,
        _n_slots: usize,
    ) -> Result<Permutation, BackendError> {
        match *self {}
    }

    pub(crate) fn gather_bf16(
        &self,
        _hidden: TensorView<'_>,
        _hidden_size: usize,
        _perm: &Permutation,
    ) -> Result<Vec<bf16>, BackendError> {
        match *self {}
    }

    pub(crate) fn gather_f32(
        &self,
        _hidden: TensorView<'_>,
        _hidden_size: usize,
        _perm: &Permutation,
    ) -> Result<Vec<f32>, BackendError> {
        match *self {}
    }

    pub(crate) fn combine(
        &self,
        _expert_out: &[f32],
        _hidden_size: usize,
        _perm: &Permutation,
    ) -> Result<Vec<f32>, BackendError> {
        match *self {}
    }

    pub(crate) fn forward_trace(
        &self,
        _layer: &MoeLayer,
        _hidden: TensorView<'_>,
        _tokens: usize,
    ) -> Result<MoeTrace, BackendError> {
        match *self {}
    }
}
