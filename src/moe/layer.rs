//! The whole MoE layer on the CPU: route, permute, grouped experts, combine.

use crate::config::MoeConfig;
use crate::cpu::Isa;
use crate::cpu::experts::{self, LayerBuffers};
use crate::error::{MoeError, check_len};
use crate::moe::expert::Precision;
use crate::moe::permute::{Permutation, gather_into, permute};
use crate::moe::route::{Routing, route_checked};
use crate::moe::weights::MoeWeights;
use crate::tensor::{Dtype, TensorView};

/// One MoE layer, ready to run. Build it from a checkpoint or from tensors in memory with
/// [`crate::moe::MoeLayerBuilder`], or from [`MoeWeights::synthetic`].
///
/// The buffers of a call ([`LayerBuffers`]: gathered rows, activations, expert rows,
/// about 215 KB per token at dots.llm1's shape, 280 KB with the AMX tiles) are kept for
/// the next call of any layer in the process, up to [`crate::cpu::WORKSPACE_KEEP_BYTES`],
/// so that a repeated call neither allocates nor page-faults; [`MoeLayer::forward_with`]
/// takes the caller's own instead. Calls from several threads at once are fine: each runs on its own.
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
    /// Slot ids `[T, k + n_shared]`: the routed ids, then the shared slots `E..E+n_shared`.
    pub slot_ids: Vec<u32>,
    /// Slot weights `[T, k + n_shared]`: the routed weights, then 1.0 per shared slot.
    pub slot_weights: Vec<f32>,
    /// The permutation of the `T * (k + n_shared)` pairs.
    pub permutation: Permutation,
    /// Weighted expert output rows `[T * (k + n_shared), H]` in permuted order.
    pub weighted_rows: Vec<f32>,
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

    /// The expert slots this layer holds ([`crate::moe::ExpertShard`]; all unless it was
    /// built as one rank's part under expert parallelism).
    pub fn shard(&self) -> &crate::moe::ExpertShard {
        self.weights.shard()
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
        route_checked(
            &cfg.router,
            hidden,
            tokens,
            cfg.hidden_size,
            self.weights.router_gate(),
            self.weights.router_bias(),
        )
    }

    /// The layer's output `[T, H]` (f32) for `hidden [T, H]`. `T = 0` is valid.
    pub fn forward(&self, hidden: TensorView<'_>, tokens: usize) -> Result<Vec<f32>, MoeError> {
        experts::with_cached_buffers(|ws| self.forward_with(hidden, tokens, ws))
    }

    /// [`MoeLayer::forward`] on buffers the caller keeps (an engine that manages its own
    /// memory): the same output bit for bit, with `buffers` reshaped and reused from call
    /// to call instead of the process-wide cache.
    pub fn forward_with(
        &self,
        hidden: TensorView<'_>,
        tokens: usize,
        buffers: &mut LayerBuffers,
    ) -> Result<Vec<f32>, MoeError> {
        Ok(self.run(hidden, tokens, buffers)?.output)
    }

    /// The layer's output `[T, H]` for `hidden [T, H]` under a routing given by the caller
    /// (`routing.top_k` choices per token, any `k`): the router is skipped. This is the
    /// step an expert-parallel rank runs on tokens another rank routed, and what a
    /// `fused_experts` call computes. A shard sums only the slots it holds.
    pub fn forward_routed(
        &self,
        hidden: TensorView<'_>,
        tokens: usize,
        routing: &Routing,
    ) -> Result<Vec<f32>, MoeError> {
        let cfg = self.config();
        check_len("hidden", &[tokens, cfg.hidden_size], hidden.len())?;
        if routing.tokens != tokens {
            return Err(MoeError::shape("routing", &[tokens, routing.top_k], &[routing.tokens, routing.top_k]));
        }
        routing.validate(cfg.router.n_experts)?;
        experts::with_cached_buffers(|ws| Ok(self.run_routed(hidden, tokens, routing.clone(), ws)?.output))
    }

    /// Like [`MoeLayer::forward`], keeping every step's result.
    pub fn forward_trace(&self, hidden: TensorView<'_>, tokens: usize) -> Result<MoeTrace, MoeError> {
        experts::with_cached_buffers(|ws| {
            let mut trace = self.run(hidden, tokens, ws)?;
            trace.weighted_rows = std::mem::take(&mut ws.rows);
            Ok(trace)
        })
    }

    /// Every step; the trace's `weighted_rows` stay in `ws.rows` (left empty in the trace).
    fn run(&self, hidden: TensorView<'_>, tokens: usize, ws: &mut LayerBuffers) -> Result<MoeTrace, MoeError> {
        let cfg = self.config();
        let (h, slots) = (cfg.hidden_size, cfg.slots_per_token());
        tokens
            .checked_mul(slots)
            .and_then(|p| p.checked_mul(h))
            .ok_or_else(|| MoeError::Overflow(format!("{tokens} tokens x {slots} slots x {h}")))?;
        let routing = self.route(hidden, tokens)?;
        self.run_routed(hidden, tokens, routing, ws)
    }

    /// Steps 2 to 5 under `routing` (well formed, `routing.tokens == tokens`).
    fn run_routed(
        &self,
        hidden: TensorView<'_>,
        tokens: usize,
        routing: Routing,
        ws: &mut LayerBuffers,
    ) -> Result<MoeTrace, MoeError> {
        let cfg = self.config();
        let (h, k, e) = (cfg.hidden_size, routing.top_k, cfg.router.n_experts);
        let slots = k + cfg.n_shared_experts;
        tokens
            .checked_mul(slots)
            .and_then(|p| p.checked_mul(h))
            .ok_or_else(|| MoeError::Overflow(format!("{tokens} tokens x {slots} slots x {h}")))?;
        check_len("hidden", &[tokens, h], hidden.len())?;

        let (slot_ids, slot_weights) = routing.with_shared_slots(e, cfg.n_shared_experts);
        debug_assert_eq!(slot_ids.len(), tokens * (k + cfg.n_shared_experts));
        let permutation = permute(&slot_ids, tokens, slots, cfg.n_slots())?;
        let row_weights: Vec<f32> = permutation.row_pairs.iter().map(|&p| slot_weights[p as usize]).collect();

        let x_dtype = match self.precision {
            Precision::Bf16 => Dtype::Bf16,
            Precision::F32 => Dtype::F32,
        };
        gather_into(hidden, h, &permutation, x_dtype, &mut ws.x)?;
        let LayerBuffers { x, act, rows, packed } = ws;
        experts::run(&self.weights, x, &permutation, &row_weights, self.precision, self.isa, act, rows, packed)?;
        let mut output = vec![0.0f32; tokens * h];
        crate::moe::combine(rows, h, &permutation, &mut output)?;
        Ok(MoeTrace { routing, slot_ids, slot_weights, permutation, weighted_rows: Vec::new(), output })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouterConfig;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn forward_with_own_buffers_equals_forward_and_reuses_them() {
        let router = RouterConfig { n_experts: 8, top_k: 2, n_group: 1, topk_group: 1, ..RouterConfig::dots1() };
        let cfg = MoeConfig { hidden_size: 64, moe_intermediate_size: 40, n_shared_experts: 1, router };
        let layer = MoeLayer::new(MoeWeights::synthetic(&cfg, Dtype::Bf16, 3).unwrap());
        let (tokens, h) = (9, cfg.hidden_size);
        let x: Vec<f32> = (0..tokens * h).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
        let want = layer.forward(TensorView::F32(&x), tokens).unwrap();

        let mut buffers = LayerBuffers::new();
        assert_eq!(buffers.capacity_bytes(), 0);
        let got = layer.forward_with(TensorView::F32(&x), tokens, &mut buffers).unwrap();
        assert_eq!(bits(&got), bits(&want), "forward_with differs from forward");
        let held = buffers.capacity_bytes();
        assert!(held >= tokens * cfg.slots_per_token() * h * 4, "the buffers hold the call's rows");
        let rows_at = buffers.rows.as_ptr();

        // Again, and then a smaller batch: the same storage, the same results.
        let again = layer.forward_with(TensorView::F32(&x), tokens, &mut buffers).unwrap();
        assert_eq!(bits(&again), bits(&want));
        let fewer = layer.forward_with(TensorView::F32(&x[..3 * h]), 3, &mut buffers).unwrap();
        assert_eq!(bits(&fewer), bits(&want[..3 * h]));
        assert_eq!(buffers.capacity_bytes(), held, "the buffers were reallocated");
        assert_eq!(buffers.rows.as_ptr(), rows_at, "the output rows moved");
    }
}
