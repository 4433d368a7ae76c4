//! The weights of one MoE layer, in the layout of the contract.
//!
//! ```text
//! router_gate  [E, H]              f32 or bf16 (checkpoint dtype)
//! router_bias  [E]                 f32 (a bf16 bias converts exactly)
//! gate_up      [E + n_shared, 2I, H]      per slot: gate rows 0..I, then up rows I..2I
//! down         [E + n_shared, H, I]
//! ```
//!
//! Slots `0..E` are the routed experts; slots `E..E+n_shared` are the shared experts' halves:
//! the `n_shared * I`-wide shared MLP splits exactly into `n_shared` experts of width `I` (gate and up
//! rows `s*I..(s+1)*I`, down columns `s*I..(s+1)*I`), whose outputs sum to the shared
//! output. So "top-k of E plus n_shared shared" runs as one grouped step over `E + n_shared` slots.
//!
//! Why gate and up are **stacked** in one `[2I, H]` block per slot rather than
//! interleaved: it is the layout transformers 5.x fuses to (`gate_up_proj`, gate rows
//! first), so fused checkpoints load without reordering; a kernel producing output
//! columns `n0..n1` reads gate rows `n0..n1` and up rows `I+n0..I+n1` of the same
//! contiguous slot, which fuses SwiGLU into the epilogue as well as interleaving would;
//! and splitting the shared MLP into slots is a plain row range. `down [H, I]` keeps the
//! checkpoint's `[out, in]` orientation: every output element is a contiguous dot product.
//!
//! Loading from per-expert checkpoint tensors copies each into its slot once
//! ([`crate::moe::MoeLayerBuilder`]); weights keep their dtype (bf16 stays bf16).
//!
//! **Expert parallelism.** A layer may hold only some of the slots ([`ExpertShard`]: a
//! contiguous range of the routed experts, and the shared experts or not). Its storage
//! then holds just those slots, in slot order (`gate_up [stored, 2I, H]`,
//! `down [stored, H, I]`); the router stays whole, so every shard routes every token the
//! same way, and its output is the sum over the slots it holds only: summed over shards
//! that hold every slot once, it is the whole layer's output.

use std::ops::Range;

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::config::MoeConfig;
use crate::error::MoeError;
use crate::moe::route::RouterBias;
use crate::tensor::{Dtype, TensorData, TensorView};

/// Which expert slots a layer holds (see the module docs): routed experts `routed`, and
/// the `n_shared` shared slots when `shared` is set.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ExpertShard {
    /// The routed experts held, a contiguous range of `0..E`.
    pub routed: Range<usize>,
    /// Whether the shared experts are held (and so computed).
    pub shared: bool,
}

impl ExpertShard {
    /// Every slot of a layer of shape `cfg`.
    pub fn full(cfg: &MoeConfig) -> Self {
        ExpertShard { routed: 0..cfg.router.n_experts, shared: true }
    }

    /// Checks the range lies in `0..E` (an empty range is valid: a shard may hold only
    /// the shared experts, or nothing at all).
    pub fn validate(&self, cfg: &MoeConfig) -> Result<(), MoeError> {
        let e = cfg.router.n_experts;
        if self.routed.start > self.routed.end || self.routed.end > e {
            return Err(MoeError::Config(crate::ConfigError::Invalid {
                field: "local_experts",
                reason: format!("{}..{} is not a range within 0..{e}", self.routed.start, self.routed.end),
            }));
        }
        Ok(())
    }

    /// Whether the shard holds every slot of `cfg`.
    pub fn is_full(&self, cfg: &MoeConfig) -> bool {
        *self == Self::full(cfg) || (self.routed == (0..cfg.router.n_experts) && cfg.n_shared_experts == 0)
    }

    /// Whether slot `slot` (routed `0..E`, shared `E..E+n_shared`) is held.
    pub fn holds(&self, cfg: &MoeConfig, slot: usize) -> bool {
        let e = cfg.router.n_experts;
        if slot < e { self.routed.contains(&slot) } else { self.shared && slot < cfg.n_slots() }
    }

    /// Slots stored: the routed range, plus `n_shared` when the shared experts are held.
    pub fn stored_slots(&self, cfg: &MoeConfig) -> usize {
        self.routed.len() + if self.shared { cfg.n_shared_experts } else { 0 }
    }

    /// Where slot `slot` sits in the storage, if held.
    pub fn stored_index(&self, cfg: &MoeConfig, slot: usize) -> Option<usize> {
        let e = cfg.router.n_experts;
        if !self.holds(cfg, slot) {
            None
        } else if slot < e {
            Some(slot - self.routed.start)
        } else {
            Some(self.routed.len() + slot - e)
        }
    }
}

/// The weights of one MoE layer in the contract's layout (see the module docs).
#[derive(Clone, Debug)]
pub struct MoeWeights {
    pub(crate) cfg: MoeConfig,
    pub(crate) router_gate: TensorData,
    pub(crate) router_bias: Option<RouterBias>,
    pub(crate) gate_up: TensorData,
    pub(crate) down: TensorData,
    pub(crate) shard: ExpertShard,
}

impl MoeWeights {
    /// The layer's shape.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// Router weight `[E, H]`.
    pub fn router_gate(&self) -> TensorView<'_> {
        self.router_gate.view()
    }

    /// Score-correction bias `[E]`, if the router has one.
    pub fn router_bias(&self) -> Option<&RouterBias> {
        self.router_bias.as_ref()
    }

    /// Stacked gate and up weights `[E + n_shared, 2I, H]` (`[stored, 2I, H]` for a partial
    /// layer: see [`MoeWeights::shard`]).
    pub fn gate_up(&self) -> TensorView<'_> {
        self.gate_up.view()
    }

    /// Down weights `[E + n_shared, H, I]` (`[stored, H, I]` for a partial layer).
    pub fn down(&self) -> TensorView<'_> {
        self.down.view()
    }

    /// The slots this layer holds (all of them unless built as a shard).
    pub fn shard(&self) -> &ExpertShard {
        &self.shard
    }

    /// The weights of the slots of `shard` only, copied out of these (which must hold
    /// them): one rank's part of a layer under expert parallelism.
    pub fn select(&self, shard: ExpertShard) -> Result<Self, MoeError> {
        let cfg = &self.cfg;
        shard.validate(cfg)?;
        let held: Vec<usize> = (0..cfg.n_slots()).filter(|&e| shard.holds(cfg, e)).collect();
        if let Some(&missing) = held.iter().find(|&&e| !self.shard.holds(cfg, e)) {
            return Err(MoeError::MissingWeights(format!("slot {missing} is not held by this layer")));
        }
        let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
        let dtype = self.dtype();
        let mut gate_up = TensorData::zeros(dtype, held.len() * 2 * i * h);
        let mut down = TensorData::zeros(dtype, held.len() * h * i);
        for (n, &e) in held.iter().enumerate() {
            gate_up.write_at(n * 2 * i * h, self.slot_gate_up(e));
            down.write_at(n * h * i, self.slot_down(e));
        }
        Ok(MoeWeights {
            cfg: cfg.clone(),
            router_gate: self.router_gate.clone(),
            router_bias: self.router_bias.clone(),
            gate_up,
            down,
            shard,
        })
    }

    /// Element type of the expert weights.
    pub fn dtype(&self) -> Dtype {
        self.gate_up.dtype()
    }

    /// Gate-and-up block `[2I, H]` of slot `e`. Panics if the layer does not hold slot
    /// `e` ([`ExpertShard::holds`]).
    pub fn slot_gate_up(&self, e: usize) -> TensorView<'_> {
        let n = 2 * self.cfg.moe_intermediate_size * self.cfg.hidden_size;
        let s = self.stored(e);
        self.gate_up.view().slice(s * n..(s + 1) * n)
    }

    /// Down block `[H, I]` of slot `e`. Panics if the layer does not hold slot `e`.
    pub fn slot_down(&self, e: usize) -> TensorView<'_> {
        let n = self.cfg.hidden_size * self.cfg.moe_intermediate_size;
        let s = self.stored(e);
        self.down.view().slice(s * n..(s + 1) * n)
    }

    /// Where slot `e` is stored; panics if it is not held.
    fn stored(&self, e: usize) -> usize {
        match self.shard.stored_index(&self.cfg, e) {
            Some(s) => s,
            None => panic!("slot {e} is not held by this layer (experts {:?})", self.shard),
        }
    }

    /// Bytes of all weights (router, bias, experts, shared experts).
    pub fn bytes(&self) -> usize {
        let elem = |t: &TensorData| t.len() * t.dtype().size();
        elem(&self.router_gate)
            + elem(&self.gate_up)
            + elem(&self.down)
            + self.router_bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    /// Bytes of one expert slot's weights.
    pub fn slot_bytes(&self) -> usize {
        3 * self.cfg.moe_intermediate_size * self.cfg.hidden_size * self.dtype().size()
    }

    /// A seeded synthetic layer of `dtype`: weights uniform in `±sqrt(3 / fan_in)` (unit
    /// variance outputs for unit-variance inputs), a small random correction bias, so
    /// routing of random hidden states is close to uniform. Generated in parallel, one
    /// independent stream per expert slot: the same seed always gives the same layer.
    pub fn synthetic(cfg: &MoeConfig, dtype: Dtype, seed: u64) -> Result<Self, MoeError> {
        cfg.validate()?;
        let (h, i, e) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.router.n_experts);
        let slots = cfg.n_slots();
        let fill = |data: &mut TensorData, chunk: usize, salt: u64, fan_in: usize| {
            let bound = (3.0 / fan_in as f32).sqrt();
            match data {
                TensorData::F32(v) => v.par_chunks_mut(chunk.max(1)).enumerate().for_each(|(c, out)| {
                    let mut rng =
                        ChaCha8Rng::seed_from_u64(seed ^ salt ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    out.iter_mut().for_each(|x| *x = rng.random_range(-bound..bound));
                }),
                TensorData::Bf16(v) => v.par_chunks_mut(chunk.max(1)).enumerate().for_each(|(c, out)| {
                    let mut rng =
                        ChaCha8Rng::seed_from_u64(seed ^ salt ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    out.iter_mut().for_each(|x| *x = bf16::from_f32(rng.random_range(-bound..bound)));
                }),
            }
        };
        let mut router_gate = TensorData::zeros(dtype, e * h);
        fill(&mut router_gate, h, 0x1111, h);
        let mut gate_up = TensorData::zeros(dtype, slots * 2 * i * h);
        fill(&mut gate_up, i * h, 0x2222, h);
        let mut down = TensorData::zeros(dtype, slots * h * i);
        fill(&mut down, h * i, 0x3333, i);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4444);
        let bias = RouterBias::new((0..e).map(|_| rng.random_range(-0.02f32..0.02)).collect(), e)?;
        Ok(MoeWeights {
            shard: ExpertShard::full(cfg),
            cfg: cfg.clone(),
            router_gate,
            router_bias: Some(bias),
            gate_up,
            down,
        })
    }
}
