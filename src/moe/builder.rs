//! The layer builder: weights an engine or a checkpoint already has in memory, given one
//! tensor at a time in the checkpoint's per-expert shapes, copied into the contract's
//! layout ([`crate::moe::weights`]).

use crate::config::MoeConfig;
use crate::error::{MoeError, check_len};
use crate::moe::layer::MoeLayer;
use crate::moe::route::RouterBias;
use crate::moe::weights::{ExpertShard, MoeWeights};
use crate::tensor::{Dtype, TensorData, TensorView};

/// Builds a layer from weights an engine or a checkpoint already has in memory, one
/// tensor at a time, in the checkpoint's per-expert shapes. Each tensor is checked
/// against the config and copied into its slot once.
#[derive(Debug)]
pub struct MoeLayerBuilder {
    weights: MoeWeights,
    router_set: bool,
    experts_set: Vec<bool>,
    shared_set: bool,
}

impl MoeLayerBuilder {
    /// An empty builder for a layer of shape `cfg` whose expert weights are stored as
    /// `dtype` (inputs of the other dtype convert; f32 -> bf16 rounds to nearest even).
    /// Allocates the full expert storage up front.
    pub fn new(cfg: MoeConfig, dtype: Dtype) -> Result<Self, MoeError> {
        let shard = ExpertShard::full(&cfg);
        Self::with_shard(cfg, dtype, shard)
    }

    /// An empty builder for the part of a layer that holds `shard` only (expert
    /// parallelism): the router whole, the routed experts of `shard.routed`, and the
    /// shared experts if `shard.shared`. Only those are given and stored; the layer's
    /// output is its partial sum (see the module docs).
    pub fn with_shard(cfg: MoeConfig, dtype: Dtype, shard: ExpertShard) -> Result<Self, MoeError> {
        cfg.validate()?;
        shard.validate(&cfg)?;
        let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
        let slots = shard.stored_slots(&cfg);
        let weights = MoeWeights {
            router_gate: TensorData::zeros(dtype, cfg.router.n_experts * h),
            router_bias: None,
            gate_up: TensorData::zeros(dtype, slots * 2 * i * h),
            down: TensorData::zeros(dtype, slots * h * i),
            cfg,
            shard,
        };
        let experts_set = vec![false; weights.cfg.router.n_experts];
        Ok(MoeLayerBuilder { weights, router_set: false, experts_set, shared_set: false })
    }

    /// The router: `gate [E, H]` and the optional score-correction bias `[E]` (f32 or
    /// bf16; non-finite values are rejected).
    pub fn router(&mut self, gate: TensorView<'_>, bias: Option<TensorView<'_>>) -> Result<&mut Self, MoeError> {
        let cfg = &self.weights.cfg;
        check_len("mlp.gate.weight", &[cfg.router.n_experts, cfg.hidden_size], gate.len())?;
        let bias = bias.map(|b| RouterBias::from_view(b, cfg.router.n_experts)).transpose()?;
        self.weights.router_gate.write_at(0, gate);
        self.weights.router_bias = bias;
        self.router_set = true;
        Ok(self)
    }

    /// Routed expert `e`: `gate [I, H]`, `up [I, H]`, `down [H, I]`.
    pub fn expert(
        &mut self,
        e: usize,
        gate: TensorView<'_>,
        up: TensorView<'_>,
        down: TensorView<'_>,
    ) -> Result<&mut Self, MoeError> {
        let cfg = &self.weights.cfg;
        let (h, i, n) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.router.n_experts);
        if e >= n {
            return Err(MoeError::MissingWeights(format!("expert index {e} out of range 0..{n}")));
        }
        let Some(stored) = self.weights.shard.stored_index(cfg, e) else {
            let r = &self.weights.shard.routed;
            return Err(MoeError::MissingWeights(format!(
                "expert {e} is not one of this layer's local experts {}..{}",
                r.start, r.end
            )));
        };
        check_len(&format!("experts.{e}.gate_proj.weight"), &[i, h], gate.len())?;
        check_len(&format!("experts.{e}.up_proj.weight"), &[i, h], up.len())?;
        check_len(&format!("experts.{e}.down_proj.weight"), &[h, i], down.len())?;
        let base = stored * 2 * i * h;
        self.weights.gate_up.write_at(base, gate);
        self.weights.gate_up.write_at(base + i * h, up);
        self.weights.down.write_at(stored * h * i, down);
        self.experts_set[e] = true;
        Ok(self)
    }

    /// The shared experts as one MLP of width `n_shared * I`: `gate [n_shared*I, H]`, `up [n_shared*I, H]`,
    /// `down [H, n_shared*I]`; split into `n_shared` slots of width `I`.
    pub fn shared(
        &mut self,
        gate: TensorView<'_>,
        up: TensorView<'_>,
        down: TensorView<'_>,
    ) -> Result<&mut Self, MoeError> {
        let cfg = &self.weights.cfg;
        let (h, i, s, e) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_shared_experts, cfg.router.n_experts);
        if s == 0 {
            return Err(MoeError::MissingWeights("shared experts given, but n_shared_experts is 0".into()));
        }
        if !self.weights.shard.shared {
            return Err(MoeError::MissingWeights("shared experts given, but this layer leaves them out".into()));
        }
        let first = self.weights.shard.routed.len();
        check_len("shared_experts.gate_proj.weight", &[s * i, h], gate.len())?;
        check_len("shared_experts.up_proj.weight", &[s * i, h], up.len())?;
        check_len("shared_experts.down_proj.weight", &[h, s * i], down.len())?;
        debug_assert_eq!(self.weights.shard.stored_index(cfg, e), Some(first));
        for half in 0..s {
            let slot = first + half;
            let base = slot * 2 * i * h;
            self.weights.gate_up.write_at(base, gate.slice(half * i * h..(half + 1) * i * h));
            self.weights.gate_up.write_at(base + i * h, up.slice(half * i * h..(half + 1) * i * h));
            // Down columns half*I..(half+1)*I of each of the H rows.
            for row in 0..h {
                let src = down.slice(row * s * i + half * i..row * s * i + (half + 1) * i);
                self.weights.down.write_at(slot * h * i + row * i, src);
            }
        }
        self.shared_set = true;
        Ok(self)
    }

    /// Finishes the layer; every expert, the router and (if any) the shared experts must
    /// have been given.
    pub fn build(self) -> Result<MoeLayer, MoeError> {
        if !self.router_set {
            return Err(MoeError::MissingWeights("router gate (mlp.gate.weight)".into()));
        }
        let local = self.weights.shard.routed.clone();
        if let Some(e) = local.clone().find(|&e| !self.experts_set[e]) {
            return Err(MoeError::MissingWeights(format!("expert {e} (and possibly others)")));
        }
        if self.weights.cfg.n_shared_experts > 0 && self.weights.shard.shared && !self.shared_set {
            return Err(MoeError::MissingWeights("shared experts (mlp.shared_experts.*)".into()));
        }
        Ok(MoeLayer::new(self.weights))
    }
}
