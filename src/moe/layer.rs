//! The whole MoE layer on the CPU: route, permute, grouped experts, combine.

use crate::config::MoeConfig;
use crate::cpu::Isa;
use crate::error::{MoeError, check_len};
use crate::moe::expert::grouped_experts;
use crate::moe::permute::{Permutation, gather_bf16, gather_f32, permute};
use crate::moe::route::{Routing, route};
use crate::moe::weights::MoeWeights;
use crate::tensor::TensorView;

/// What the expert GEMMs take as input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// The kernel contract: the gathered hidden rows and the SwiGLU activation are rounded
    /// to bf16 (nearest even) before each GEMM; products and sums in f32. This is what a
    /// bf16 engine (and the CUDA kernels) compute.
    #[default]
    Bf16,
    /// Inputs stay f32 (bf16 weights convert exactly): the accurate path the reference
    /// model uses to match an f32 computation.
    F32,
}

/// One MoE layer, ready to run. Build it from a checkpoint or from tensors in memory with
/// [`crate::moe::MoeLayerBuilder`], or from [`MoeWeights::synthetic`].
#[derive(Clone, Debug)]
pub struct MoeLayer {
    weights: MoeWeights,
    precision: Precision,
    isa: Isa,
}

/// A layer's intermediate results, for tests and for comparing backends step by step.
#[derive(Clone, Debug)]
pub struct MoeTrace {
    /// The router's choice (`k` routed slots per token).
    pub routing: Routing,
    /// Slot ids `[T, k + S]`: the routed ids, then the shared slots `E..E+S`.
    pub slot_ids: Vec<u32>,
    /// Slot weights `[T, k + S]`: the routed weights, then 1.0 per shared slot.
    pub slot_weights: Vec<f32>,
    /// The permutation of the `T * (k + S)` pairs.
    pub permutation: Permutation,
    /// Weighted expert output rows `[T * (k + S), H]` in permuted order.
    pub expert_rows: Vec<f32>,
    /// The layer output `[T, H]`.
    pub output: Vec<f32>,
}

impl MoeLayer {
    /// A layer over `weights`, with [`Precision::Bf16`] and the best CPU kernels.
    pub fn new(weights: MoeWeights) -> Self {
        MoeLayer { weights, precision: Precision::default(), isa: Isa::detect() }
    }

    /// The layer's shape.
    pub fn config(&self) -> &MoeConfig {
        self.weights.config()
    }

    /// The weights, in the contract's layout.
    pub fn weights(&self) -> &MoeWeights {
        &self.weights
    }

    /// The expert GEMMs' input precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Sets the expert GEMMs' input precision.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// The CPU instruction set the layer runs on.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Runs on `isa` instead (to test or compare the portable fallback). Fails if this CPU
    /// cannot run it.
    pub fn set_isa(&mut self, isa: Isa) -> Result<(), MoeError> {
        if !isa.is_supported() {
            return Err(MoeError::Unsupported(format!("this CPU cannot run the {isa:?} kernels")));
        }
        self.isa = isa;
        Ok(())
    }

    /// Routes `hidden [T, H]` (f32 or bf16): the router's `k` choices per token.
    pub fn route(&self, hidden: TensorView<'_>, tokens: usize) -> Result<Routing, MoeError> {
        let cfg = self.config();
        check_len("hidden", &[tokens, cfg.hidden_size], hidden.len())?;
        route(&cfg.router, hidden, tokens, cfg.hidden_size, self.weights.router_gate(), self.weights.router_bias())
    }

    /// The layer's output `[T, H]` (f32) for `hidden [T, H]`. `T = 0` is valid.
    pub fn forward(&self, hidden: TensorView<'_>, tokens: usize) -> Result<Vec<f32>, MoeError> {
        Ok(self.forward_trace(hidden, tokens)?.output)
    }

    /// Like [`MoeLayer::forward`], keeping every step's result.
    pub fn forward_trace(&self, hidden: TensorView<'_>, tokens: usize) -> Result<MoeTrace, MoeError> {
        let cfg = self.config();
        let (h, k, e) = (cfg.hidden_size, cfg.router.top_k, cfg.router.n_experts);
        let slots = cfg.slots_per_token();
        tokens
            .checked_mul(slots)
            .and_then(|p| p.checked_mul(h))
            .ok_or_else(|| MoeError::Overflow(format!("{tokens} tokens x {slots} slots x {h}")))?;
        let routing = self.route(hidden, tokens)?;

        let (slot_ids, slot_weights) = routing.with_shared_slots(e, cfg.n_shared_experts);
        debug_assert_eq!(slot_ids.len(), tokens * (k + cfg.n_shared_experts));
        let permutation = permute(&slot_ids, tokens, slots, cfg.n_slots())?;
        let row_weights: Vec<f32> = permutation.row_pairs.iter().map(|&p| slot_weights[p as usize]).collect();

        let rows = permutation.rows();
        let expert_rows = match self.precision {
            Precision::Bf16 => {
                let mut x = vec![half::bf16::ZERO; rows * h];
                gather_bf16(hidden, h, &permutation, &mut x)?;
                grouped_experts(
                    &self.weights,
                    TensorView::Bf16(&x),
                    &permutation,
                    &row_weights,
                    self.precision,
                    self.isa,
                )?
            }
            Precision::F32 => {
                let mut x = vec![0.0f32; rows * h];
                gather_f32(hidden, h, &permutation, &mut x)?;
                grouped_experts(
                    &self.weights,
                    TensorView::F32(&x),
                    &permutation,
                    &row_weights,
                    self.precision,
                    self.isa,
                )?
            }
        };
        let mut output = vec![0.0f32; tokens * h];
        crate::moe::combine(&expert_rows, h, &permutation, &mut output)?;
        Ok(MoeTrace { routing, slot_ids, slot_weights, permutation, expert_rows, output })
    }
}
