//! Step 1 of the contract: **route**. Router logits to `expert_ids [T, k]` and
//! `weights [T, k]`.
//!
//! For each token, all in `f32`:
//!
//! ```text
//! logits  = fp32(x) @ fp32(W_gate)^T                    # [E]
//! s       = sigmoid(logits)            (Scoring::Sigmoid)
//!         | softmax(logits)            (Scoring::Softmax, max-subtracted)
//! choice  = s + bias                   # bias (if any) decides WHICH experts, never the weights
//! groups  (n_group > 1): group score = sum of the top-2 choices of the group (top-1 when a
//!          group has one expert); keep the topk_group best groups; the other experts'
//!          choice becomes 0.0 (not -inf: exactly what transformers does)
//! ids     = top-k(choice)              # ties go to the LOWER index (groups likewise)
//! w       = s[ids]
//! w       = w / (sum(w) + 1e-20)       (norm_topk_prob; the sum runs over j = 0..k in order)
//! w       = w * routed_scaling_factor
//! ```
//!
//! Output order: slot `j` of a token holds its `j`-th choice, in descending `choice`
//! (equal choices: lower expert index first). This order is the order the combine step
//! sums in, so it is part of the contract.
//!
//! A NaN or infinite logit (or bias) is an error, never a silent routing.

use crate::config::{RouterConfig, Scoring};
use crate::cpu;
use crate::error::{MoeError, check_len};
use crate::tensor::TensorView;

/// The router's score-correction bias `e_score_correction_bias [E]`: one finite f32 per
/// expert. Made only by [`RouterBias::new`] (or [`RouterBias::from_view`]), which check
/// both, so code holding one never checks again; every entry point that takes a bias
/// (the layer builder, the routing functions, the CUDA router upload) goes through it.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterBias(Vec<f32>);

impl RouterBias {
    /// The bias of a router over `n_experts` experts: a shape error unless
    /// `values.len() == n_experts`, [`MoeError::NonFiniteBias`] naming the first NaN or
    /// infinite value.
    pub fn new(values: Vec<f32>, n_experts: usize) -> Result<Self, MoeError> {
        check_len("e_score_correction_bias", &[n_experts], values.len())?;
        if let Some((expert, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(MoeError::NonFiniteBias { expert, value });
        }
        Ok(RouterBias(values))
    }

    /// [`RouterBias::new`] of an f32 or bf16 tensor (bf16 converts exactly).
    pub fn from_view(values: TensorView<'_>, n_experts: usize) -> Result<Self, MoeError> {
        check_len("e_score_correction_bias", &[n_experts], values.len())?;
        Self::new(values.to_f32_vec(), n_experts)
    }

    /// An optional bias given as a slice (the raw entry points' form), checked.
    pub fn from_slice(values: Option<&[f32]>, n_experts: usize) -> Result<Option<Self>, MoeError> {
        values.map(|b| Self::new(b.to_vec(), n_experts)).transpose()
    }

    /// The values, `[E]`.
    pub fn as_slice(&self) -> &[f32] {
        &self.0
    }
}

impl std::ops::Deref for RouterBias {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.0
    }
}

/// The router's decision for a batch of `tokens`.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// Tokens routed (`T`).
    pub tokens: usize,
    /// Experts per token (`k`).
    pub top_k: usize,
    /// `[T, k]` expert indices, per token in descending choice order (ties: lower first).
    pub expert_ids: Vec<u32>,
    /// `[T, k]` routing weights, aligned with `expert_ids`.
    pub weights: Vec<f32>,
}

impl Routing {
    /// The expert ids of token `t`.
    pub fn ids(&self, t: usize) -> &[u32] {
        &self.expert_ids[t * self.top_k..(t + 1) * self.top_k]
    }

    /// The weights of token `t`.
    pub fn token_weights(&self, t: usize) -> &[f32] {
        &self.weights[t * self.top_k..(t + 1) * self.top_k]
    }

    /// The routing with `n_shared` shared slots appended to every token: slot ids
    /// `[T, k + n_shared]` (the routed ids, then `n_experts..n_experts + n_shared`) and
    /// slot weights (the routed weights, then 1.0 per shared slot). This is what the
    /// permutation sorts when shared experts are fused into the grouped step.
    pub fn with_shared_slots(&self, n_experts: usize, n_shared: usize) -> (Vec<u32>, Vec<f32>) {
        let slots = self.top_k + n_shared;
        let mut ids = Vec::with_capacity(self.tokens * slots);
        let mut weights = Vec::with_capacity(self.tokens * slots);
        for t in 0..self.tokens {
            ids.extend_from_slice(self.ids(t));
            weights.extend_from_slice(self.token_weights(t));
            ids.extend((0..n_shared).map(|s| (n_experts + s) as u32));
            weights.extend(std::iter::repeat_n(1.0, n_shared));
        }
        (ids, weights)
    }

    /// Checks that the routing is well formed for `n_experts` experts: lengths match,
    /// ids are in range and distinct per token, weights are finite.
    pub fn validate(&self, n_experts: usize) -> Result<(), MoeError> {
        let pairs = self.tokens.checked_mul(self.top_k).ok_or_else(|| MoeError::Overflow("tokens * top_k".into()))?;
        check_len("expert_ids", &[self.tokens, self.top_k], self.expert_ids.len())?;
        check_len("routing weights", &[self.tokens, self.top_k], self.weights.len())?;
        debug_assert_eq!(pairs, self.expert_ids.len());
        for t in 0..self.tokens {
            let ids = self.ids(t);
            for (j, &id) in ids.iter().enumerate() {
                if id as usize >= n_experts {
                    return Err(MoeError::BadRouting {
                        token: t,
                        reason: format!("expert {id} out of range 0..{n_experts}"),
                    });
                }
                if ids[..j].contains(&id) {
                    return Err(MoeError::BadRouting { token: t, reason: format!("expert {id} chosen twice") });
                }
            }
            if let Some(w) = self.token_weights(t).iter().find(|w| !w.is_finite()) {
                return Err(MoeError::BadRouting { token: t, reason: format!("weight {w} is not finite") });
            }
        }
        Ok(())
    }
}

/// Router logits `[T, E] = fp32(hidden [T, H]) @ fp32(gate [E, H])^T`.
pub fn router_logits(
    hidden: TensorView<'_>,
    tokens: usize,
    hidden_size: usize,
    gate: TensorView<'_>,
    n_experts: usize,
) -> Result<Vec<f32>, MoeError> {
    check_len("hidden", &[tokens, hidden_size], hidden.len())?;
    check_len("mlp.gate.weight", &[n_experts, hidden_size], gate.len())?;
    // With `hidden_size == 0` both inputs are empty whatever `tokens` and `n_experts` say.
    let len = tokens
        .checked_mul(n_experts)
        .filter(|&n| n <= isize::MAX as usize / 4)
        .ok_or_else(|| MoeError::Overflow(format!("router logits [{tokens}, {n_experts}]")))?;
    let mut logits = vec![0.0f32; len];
    // Exact products for every dtype pair (bf16 x bf16 is exact in f32), f32 accumulation.
    cpu::par_gemm_nt(hidden, gate, tokens, n_experts, hidden_size, &mut logits, n_experts);
    Ok(logits)
}

/// Routes `tokens` tokens from their router `logits` `[T, E]`; `bias` `[E]` is the
/// score-correction bias (selection only), checked as a [`RouterBias`]: a NaN or
/// infinite value is [`MoeError::NonFiniteBias`].
pub fn route_logits(
    cfg: &RouterConfig,
    logits: &[f32],
    tokens: usize,
    bias: Option<&[f32]>,
) -> Result<Routing, MoeError> {
    cfg.validate()?;
    let e = cfg.n_experts;
    check_len("router logits", &[tokens, e], logits.len())?;
    route_checked_logits(cfg, logits, tokens, RouterBias::from_slice(bias, e)?.as_ref())
}

/// [`route_logits`] with a bias already checked.
fn route_checked_logits(
    cfg: &RouterConfig,
    logits: &[f32],
    tokens: usize,
    bias: Option<&RouterBias>,
) -> Result<Routing, MoeError> {
    cfg.validate()?;
    let e = cfg.n_experts;
    check_len("router logits", &[tokens, e], logits.len())?;
    if let Some(bias) = bias {
        check_len("e_score_correction_bias", &[e], bias.len())?;
    }
    let bias = bias.map(RouterBias::as_slice);
    let k = cfg.top_k;
    let mut routing = Routing { tokens, top_k: k, expert_ids: vec![0; tokens * k], weights: vec![0.0; tokens * k] };
    if tokens == 0 {
        // No per-expert scratch for an empty batch: its size comes from the config alone.
        return Ok(routing);
    }
    let mut scratch = RouteScratch::new(cfg);
    for t in 0..tokens {
        let row = &logits[t * e..(t + 1) * e];
        if let Some((expert, &value)) = row.iter().enumerate().find(|(_, l)| !l.is_finite()) {
            return Err(MoeError::NonFiniteLogit { token: t, expert, value });
        }
        let ids = &mut routing.expert_ids[t * k..(t + 1) * k];
        let weights = &mut routing.weights[t * k..(t + 1) * k];
        scratch.route_token(cfg, row, bias, ids, weights);
    }
    Ok(routing)
}

/// Routes a batch: logits from `hidden` and `gate`, then [`route_logits`].
pub fn route(
    cfg: &RouterConfig,
    hidden: TensorView<'_>,
    tokens: usize,
    hidden_size: usize,
    gate: TensorView<'_>,
    bias: Option<&[f32]>,
) -> Result<Routing, MoeError> {
    cfg.validate()?;
    let logits = router_logits(hidden, tokens, hidden_size, gate, cfg.n_experts)?;
    route_logits(cfg, &logits, tokens, bias)
}

/// [`route`] with a bias already checked (a layer's own).
pub(crate) fn route_checked(
    cfg: &RouterConfig,
    hidden: TensorView<'_>,
    tokens: usize,
    hidden_size: usize,
    gate: TensorView<'_>,
    bias: Option<&RouterBias>,
) -> Result<Routing, MoeError> {
    cfg.validate()?;
    let logits = router_logits(hidden, tokens, hidden_size, gate, cfg.n_experts)?;
    route_checked_logits(cfg, &logits, tokens, bias)
}

/// Per-token buffers, reused across tokens.
struct RouteScratch {
    scores: Vec<f32>,
    choice: Vec<f32>,
    taken: Vec<bool>,
    group_scores: Vec<f32>,
    group_kept: Vec<bool>,
}

impl RouteScratch {
    fn new(cfg: &RouterConfig) -> Self {
        RouteScratch {
            scores: vec![0.0; cfg.n_experts],
            choice: vec![0.0; cfg.n_experts],
            taken: vec![false; cfg.n_experts],
            group_scores: vec![0.0; cfg.n_group],
            group_kept: vec![false; cfg.n_group],
        }
    }

    /// Routes one token with finite `logits` into `ids` and `weights` (both `[k]`).
    fn route_token(
        &mut self,
        cfg: &RouterConfig,
        logits: &[f32],
        bias: Option<&[f32]>,
        ids: &mut [u32],
        weights: &mut [f32],
    ) {
        let e = cfg.n_experts;
        match cfg.scoring {
            Scoring::Sigmoid => {
                for (s, &l) in self.scores.iter_mut().zip(logits) {
                    *s = sigmoid(l);
                }
            }
            Scoring::Softmax => softmax(logits, &mut self.scores),
        }
        for i in 0..e {
            self.choice[i] = self.scores[i] + bias.map_or(0.0, |b| b[i]);
        }
        if cfg.n_group > 1 {
            self.mask_groups(cfg);
        }
        self.taken.fill(false);
        top_k_into(&self.choice, &mut self.taken, ids);
        let mut sum = 0.0f32;
        for (w, &id) in weights.iter_mut().zip(ids.iter()) {
            *w = self.scores[id as usize];
            sum += *w;
        }
        if cfg.norm_topk_prob {
            let denominator = sum + 1e-20;
            for w in weights.iter_mut() {
                *w /= denominator;
            }
        }
        for w in weights.iter_mut() {
            *w *= cfg.routed_scaling_factor;
        }
    }

    /// Group-limited selection: zero the choices of every expert outside the
    /// `topk_group` groups with the largest top-2 sums.
    fn mask_groups(&mut self, cfg: &RouterConfig) {
        let per_group = cfg.n_experts / cfg.n_group;
        for (g, score) in self.group_scores.iter_mut().enumerate() {
            let group = &self.choice[g * per_group..(g + 1) * per_group];
            let (mut best, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            for &c in group {
                if c > best {
                    second = best;
                    best = c;
                } else if c > second {
                    second = c;
                }
            }
            *score = if per_group >= 2 { best + second } else { best };
        }
        self.group_kept.fill(false);
        for _ in 0..cfg.topk_group {
            let mut pick = usize::MAX;
            for g in 0..cfg.n_group {
                if !self.group_kept[g] && (pick == usize::MAX || self.group_scores[g] > self.group_scores[pick]) {
                    pick = g;
                }
            }
            self.group_kept[pick] = true;
        }
        for g in 0..cfg.n_group {
            if !self.group_kept[g] {
                self.choice[g * per_group..(g + 1) * per_group].fill(0.0);
            }
        }
    }
}

/// Writes the indices of the `ids.len()` largest `values` into `ids`, in descending
/// order; equal values go to the lower index first. `taken` must be all false.
fn top_k_into(values: &[f32], taken: &mut [bool], ids: &mut [u32]) {
    for slot in ids.iter_mut() {
        let mut pick = usize::MAX;
        for (i, &v) in values.iter().enumerate() {
            if !taken[i] && (pick == usize::MAX || v > values[pick]) {
                pick = i;
            }
        }
        taken[pick] = true;
        *slot = pick as u32;
    }
}

/// `1 / (1 + exp(-x))` in f32.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Max-subtracted softmax of `logits` into `out`, in f32.
fn softmax(logits: &[f32], out: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for (o, &l) in out.iter_mut().zip(logits) {
        *o = (l - max).exp();
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(e: usize, k: usize) -> RouterConfig {
        RouterConfig { n_experts: e, top_k: k, ..RouterConfig::dots1() }
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let routing = route_logits(&cfg(5, 3), &[0.5, 1.0, 0.5, 1.0, 0.5], 1, None).unwrap();
        assert_eq!(routing.expert_ids, vec![1, 3, 0]);
    }

    #[test]
    fn bias_chooses_but_does_not_weigh() {
        let logits = [0.0, 1.0, 2.0, 3.0];
        let bias = [10.0, 0.0, 0.0, 0.0];
        let r = route_logits(
            &RouterConfig { norm_topk_prob: false, routed_scaling_factor: 1.0, ..cfg(4, 2) },
            &logits,
            1,
            Some(&bias),
        )
        .unwrap();
        assert_eq!(r.expert_ids, vec![0, 3]);
        assert_eq!(r.weights, vec![sigmoid(0.0), sigmoid(3.0)]);
    }

    #[test]
    fn excluded_groups_score_zero_like_transformers() {
        // 6 experts in 2 groups of 3, keep 1 group, top-3. Choices (logit 0 -> 0.5, plus
        // bias): group 0 = 0.7, 0.1, 0.05 (top-2 sum 0.8); group 1 = 0.9, 0.8, -0.3 (1.7).
        // Group 1 wins; group 0 is masked to 0.0, which beats expert 5's -0.3.
        let cfg = RouterConfig { n_group: 2, topk_group: 1, ..cfg(6, 3) };
        let bias = [0.2, -0.4, -0.45, 0.4, 0.3, -0.8];
        let r = route_logits(&cfg, &[0.0; 6], 1, Some(&bias)).unwrap();
        assert_eq!(r.expert_ids, vec![3, 4, 0]);
        // Weights come from the unbiased scores: all 0.5, normalised, scaled.
        assert!(r.weights.iter().all(|&w| (w - 2.5 / 3.0).abs() < 1e-6));
    }

    #[test]
    fn non_finite_input_is_an_error() {
        let err = route_logits(&cfg(4, 2), &[0.0, 0.0, 0.0, 0.0, 0.0, f32::NAN, 0.0, 0.0], 2, None).unwrap_err();
        assert!(matches!(err, MoeError::NonFiniteLogit { token: 1, expert: 1, .. }), "{err}");
        let err = route_logits(&cfg(4, 2), &[0.0; 4], 1, Some(&[0.0, f32::INFINITY, 0.0, 0.0])).unwrap_err();
        assert!(matches!(err, MoeError::NonFiniteBias { expert: 1, .. }), "{err}");
        let err = route_logits(&cfg(4, 2), &[0.0; 4], 1, Some(&[0.0; 3])).unwrap_err();
        assert!(matches!(&err, MoeError::Shape { name, .. } if name == "e_score_correction_bias"), "{err}");
        assert!(route_logits(&cfg(4, 2), &[0.0; 3], 1, None).is_err());
        assert!(route_logits(&cfg(4, 5), &[0.0; 4], 1, None).is_err());
    }

    #[test]
    fn router_bias_is_checked_once_at_construction() {
        let bias = RouterBias::new(vec![0.5, -0.25, 0.0], 3).unwrap();
        assert_eq!(bias.as_slice(), &[0.5, -0.25, 0.0]);
        let err = RouterBias::new(vec![0.0, 0.0, f32::NAN], 3).unwrap_err();
        assert!(matches!(err, MoeError::NonFiniteBias { expert: 2, .. }), "{err}");
        let err = RouterBias::new(vec![f32::NEG_INFINITY, 0.0, 0.0], 3).unwrap_err();
        assert!(matches!(err, MoeError::NonFiniteBias { expert: 0, value } if value == f32::NEG_INFINITY), "{err}");
        let err = RouterBias::new(vec![0.0; 2], 3).unwrap_err();
        assert!(matches!(&err, MoeError::Shape { name, .. } if name == "e_score_correction_bias"), "{err}");
        let b16 = [half::bf16::from_f32(1.5), half::bf16::INFINITY];
        let err = RouterBias::from_view(TensorView::Bf16(&b16), 2).unwrap_err();
        assert!(matches!(err, MoeError::NonFiniteBias { expert: 1, .. }), "{err}");
        assert_eq!(RouterBias::from_slice(None, 3).unwrap(), None);
    }

    #[test]
    fn softmax_scoring_normalises_over_the_choice() {
        let cfg = RouterConfig { scoring: Scoring::Softmax, routed_scaling_factor: 1.0, ..cfg(3, 2) };
        let r = route_logits(&cfg, &[1.0, 3.0, 2.0], 1, None).unwrap();
        assert_eq!(r.expert_ids, vec![1, 2]);
        let expected = 1.0 / (1.0 + (-1.0f32).exp());
        assert!((r.weights[0] - expected).abs() < 1e-6);
    }
}
