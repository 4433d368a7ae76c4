//! The whole MoE layer on the CPU: route, permute, grouped experts, combine.

use std::sync::Mutex;

use crate::config::MoeConfig;
use crate::cpu::Isa;
use crate::error::{MoeError, check_len};
use crate::moe::expert::{self, Workspace};
use crate::moe::permute::{Permutation, gather_into, permute};
use crate::moe::route::{Routing, route_checked};
use crate::moe::weights::MoeWeights;
use crate::tensor::{Dtype, TensorView};

/// The buffers of a layer call are kept for the next call only while they hold at most
/// this many bytes (about 1000 tokens of dots.llm1); a larger batch allocates them for
/// that call only.
pub const WORKSPACE_KEEP_BYTES: usize = 256 << 20;

/// The buffers of the last layer call in this process, for the next call of any layer
/// (a model runs its layers one after another: one set serves them all). A call takes
/// them out while it runs, so concurrent calls each get their own.
static WORKSPACE: Mutex<Option<Workspace>> = Mutex::new(None);

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
///
/// The buffers of a call (gathered rows, activations, expert rows: about 215 KB per
/// token at dots.llm1's shape) are kept for the next call of any layer in the process,
/// up to [`WORKSPACE_KEEP_BYTES`], so that a repeated call neither allocates nor
/// page-faults. Calls from several threads at once are fine: each runs on its own.
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
        self.with_workspace(|ws| Ok(self.run(hidden, tokens, ws)?.output))
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
        self.with_workspace(|ws| Ok(self.run_routed(hidden, tokens, routing.clone(), ws)?.output))
    }

    /// Like [`MoeLayer::forward`], keeping every step's result.
    pub fn forward_trace(&self, hidden: TensorView<'_>, tokens: usize) -> Result<MoeTrace, MoeError> {
        self.with_workspace(|ws| {
            let mut trace = self.run(hidden, tokens, ws)?;
            trace.weighted_rows = std::mem::take(&mut ws.rows);
            Ok(trace)
        })
    }

    /// Runs `f` with the buffers of the last call (fresh ones if there are none, or if
    /// another call is using them), and keeps them for the next call if not too large.
    fn with_workspace<R>(&self, f: impl FnOnce(&mut Workspace) -> R) -> R {
        // The lock is held only to take or return the buffers, never while computing; a
        // call that panicked left only buffers behind, reshaped before any use.
        let slot = || WORKSPACE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut ws = slot().take().unwrap_or_default();
        let result = f(&mut ws);
        if ws.capacity_bytes() <= WORKSPACE_KEEP_BYTES {
            let mut kept = slot();
            if kept.as_ref().is_none_or(|k| k.capacity_bytes() < ws.capacity_bytes()) {
                *kept = Some(ws);
            }
        }
        result
    }

    /// Every step; the trace's `weighted_rows` stay in `ws.rows` (left empty in the trace).
    fn run(&self, hidden: TensorView<'_>, tokens: usize, ws: &mut Workspace) -> Result<MoeTrace, MoeError> {
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
        ws: &mut Workspace,
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
        let Workspace { x, act, rows } = ws;
        expert::run(&self.weights, x, &permutation, &row_weights, self.precision, self.isa, act, rows)?;
        let mut output = vec![0.0f32; tokens * h];
        crate::moe::combine(rows, h, &permutation, &mut output)?;
        Ok(MoeTrace { routing, slot_ids, slot_weights, permutation, weighted_rows: Vec::new(), output })
    }
}
