//! The plain oracle of the contract: every step written as simply as possible from the
//! step's documentation, one token (or one row) at a time, for tests and fuzz targets to
//! compare the engines against. Not fast, and not meant to be.
//!
//! Where the contract fixes the order of an operation (sigmoid as `1 / (1 + exp(-x))`,
//! the max-subtracted softmax summed in expert order, the weight sum over `j = 0..k` plus
//! `1e-20`, the combine's sum in slot order from 0.0), the oracle follows it, so those
//! results compare bit for bit. Elsewhere it is written differently from the engines on
//! purpose: stable sorts by `(value desc, index asc)` instead of selection loops, a sort
//! instead of a counting sort, plain dot products instead of tiled GEMMs (so the expert
//! step agrees within f32 rounding, not bit for bit).
//!
//! Inputs are assumed valid (a valid config, finite logits and bias, well-formed ids):
//! checking them is the engines' job, and the tests' oracle for that is
//! [`router_config_is_valid`].

use std::cmp::Ordering;

use half::bf16;

use crate::config::{RouterConfig, Scoring};
use crate::moe::expert::Precision;
use crate::moe::permute::Permutation;
use crate::moe::route::Routing;
use crate::moe::weights::MoeWeights;

/// Whether a router configuration is usable, from the contract's rules
/// ([`RouterConfig::validate`] must agree).
pub fn router_config_is_valid(cfg: &RouterConfig) -> bool {
    let e = cfg.n_experts;
    let groups_ok = cfg.n_group >= 1
        && e.is_multiple_of(cfg.n_group)
        && cfg.topk_group >= 1
        && cfg.topk_group <= cfg.n_group
        && (cfg.n_group == 1 || cfg.topk_group * (e / cfg.n_group) >= cfg.top_k);
    e >= 1
        && e <= (u32::MAX / 2) as usize
        && cfg.top_k >= 1
        && cfg.top_k <= e
        && groups_ok
        && cfg.routed_scaling_factor.is_finite()
        && cfg.routed_scaling_factor > 0.0
}

/// One token's routing by the oracle.
#[derive(Clone, Debug)]
pub struct TokenRoute {
    /// Scores (sigmoid or softmax), `[E]`.
    pub scores: Vec<f32>,
    /// Selection values after the bias and the group mask, `[E]`.
    pub choice: Vec<f32>,
    /// The chosen experts, best first.
    pub ids: Vec<u32>,
    /// Their weights.
    pub weights: Vec<f32>,
    /// Which groups were kept (`[n_group]`).
    pub kept_groups: Vec<bool>,
    /// The smallest gap that decided the selection (the kept groups, each chosen expert
    /// against the next one down): below f32 rounding, another correct implementation
    /// may legitimately choose differently.
    pub margin: f32,
}

/// Indices of `values` in the contract's order: descending, ties to the lower index.
fn by_value_desc(values: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    // Values are never NaN here (finite inputs; at worst +-inf for group sums).
    order.sort_by(|&a, &b| values[b].partial_cmp(&values[a]).unwrap_or(Ordering::Equal).then(a.cmp(&b)));
    order
}

/// Routes one token of finite `logits` (`[E]`), with an optional finite `bias` (`[E]`);
/// `cfg` must be valid.
pub fn route_token(cfg: &RouterConfig, logits: &[f32], bias: Option<&[f32]>) -> TokenRoute {
    let e = cfg.n_experts;
    let scores: Vec<f32> = match cfg.scoring {
        Scoring::Sigmoid => logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
        Scoring::Softmax => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
            let mut sum = 0.0f32;
            for &x in &exps {
                sum += x;
            }
            exps.iter().map(|&x| x / sum).collect()
        }
    };
    let mut choice: Vec<f32> = (0..e).map(|i| scores[i] + bias.map_or(0.0, |b| b[i])).collect();
    let mut kept_groups = vec![true; cfg.n_group];
    let mut margin = f32::INFINITY;
    if cfg.n_group > 1 {
        let per = e / cfg.n_group;
        let group_scores: Vec<f32> = (0..cfg.n_group)
            .map(|g| {
                let members = &choice[g * per..(g + 1) * per];
                let order = by_value_desc(members);
                if per >= 2 { members[order[0]] + members[order[1]] } else { members[order[0]] }
            })
            .collect();
        let groups = by_value_desc(&group_scores);
        if cfg.topk_group < cfg.n_group {
            margin = margin.min(group_scores[groups[cfg.topk_group - 1]] - group_scores[groups[cfg.topk_group]]);
        }
        kept_groups = vec![false; cfg.n_group];
        for &g in groups.iter().take(cfg.topk_group) {
            kept_groups[g] = true;
        }
        for (g, kept) in kept_groups.iter().enumerate() {
            if !kept {
                choice[g * per..(g + 1) * per].fill(0.0);
            }
        }
    }
    let order = by_value_desc(&choice);
    // The gaps that decide the selection and its order: each chosen expert against the
    // next one down. Masked experts all score exactly 0.0 in any implementation, so ties
    // among them are exact and broken by index: skip past them.
    let masked = |i: usize| cfg.n_group > 1 && !kept_groups[i / (e / cfg.n_group)];
    for j in 0..cfg.top_k {
        let mut next = j + 1;
        while next < e && masked(order[j]) && masked(order[next]) {
            next += 1;
        }
        if next < e {
            margin = margin.min(choice[order[j]] - choice[order[next]]);
        }
    }
    let ids: Vec<u32> = order.into_iter().take(cfg.top_k).map(|i| i as u32).collect();
    let mut weights: Vec<f32> = ids.iter().map(|&i| scores[i as usize]).collect();
    if cfg.norm_topk_prob {
        let mut sum = 0.0f32;
        for &w in &weights {
            sum += w;
        }
        let denominator = sum + 1e-20;
        for w in &mut weights {
            *w /= denominator;
        }
    }
    for w in &mut weights {
        *w *= cfg.routed_scaling_factor;
    }
    TokenRoute { scores, choice, ids, weights, kept_groups, margin }
}

/// Checks the tie rule on `ids` against the selection values `choice`: descending, equal
/// values in ascending index order, and every expert left out is no better than the
/// last one chosen (equal only with a higher index). Returns what is wrong, if anything.
pub fn check_tie_rule(choice: &[f32], ids: &[u32]) -> Result<(), String> {
    let better = |a: usize, b: usize| choice[a] > choice[b] || (choice[a] == choice[b] && a < b);
    for pair in ids.windows(2) {
        let (a, b) = (pair[0] as usize, pair[1] as usize);
        if !better(a, b) {
            return Err(format!("expert {a} ({}) ranked before expert {b} ({})", choice[a], choice[b]));
        }
    }
    if let Some(&last) = ids.last() {
        let last = last as usize;
        for i in 0..choice.len() {
            if !ids.contains(&(i as u32)) && better(i, last) {
                return Err(format!(
                    "expert {i} ({}) left out but beats chosen expert {last} ({})",
                    choice[i], choice[last]
                ));
            }
        }
    }
    Ok(())
}

/// The permutation of `slot_ids [tokens, slots_per_token]` (every id below `n_slots`):
/// the pairs sorted by `(slot, pair)`, offsets counted per slot.
pub fn permute(slot_ids: &[u32], tokens: usize, slots_per_token: usize, n_slots: usize) -> Permutation {
    let mut row_pairs: Vec<u32> = (0..slot_ids.len() as u32).collect();
    row_pairs.sort_by_key(|&p| (slot_ids[p as usize], p));
    let mut pair_rows = vec![0u32; slot_ids.len()];
    for (row, &pair) in row_pairs.iter().enumerate() {
        pair_rows[pair as usize] = row as u32;
    }
    let expert_offsets =
        (0..=n_slots).map(|e| slot_ids.iter().filter(|&&id| (id as usize) < e).count() as u32).collect();
    Permutation { tokens, slots_per_token, expert_offsets, row_pairs, pair_rows }
}

/// Rounds to bf16 (nearest even) and back under [`Precision::Bf16`]; as is under f32.
fn round(precision: Precision, x: f32) -> f32 {
    match precision {
        Precision::Bf16 => bf16::from_f32(x).to_f32(),
        Precision::F32 => x,
    }
}

/// One expert of width `I` on one row `x [H]`: `down(silu(gate x) * up x)` with
/// `gate [I, H]`, `up [I, H]` and `down [H, I]` (f32), dot products summed in index
/// order; under [`Precision::Bf16`] the input row and the activation round to bf16
/// before their products. Not yet multiplied by the routing weight.
pub fn expert_mlp(x: &[f32], gate: &[f32], up: &[f32], down: &[f32], precision: Precision) -> Vec<f32> {
    let h = x.len();
    let x: Vec<f32> = x.iter().map(|&v| round(precision, v)).collect();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0.0f32, |acc, (p, q)| acc + p * q);
    let act: Vec<f32> = gate
        .chunks(h.max(1))
        .zip(up.chunks(h.max(1)))
        .map(|(g, u)| {
            let (g, u) = (dot(&x, g), dot(&x, u));
            round(precision, g / (1.0 + (-g).exp()) * u)
        })
        .collect();
    down.chunks(act.len().max(1)).take(h).map(|d| dot(&act, d)).collect()
}

/// Each token's weighted rows `weighted_rows [T * slots_per_token, H]` (permuted order)
/// summed in slot order from 0.0: the combine's output `[T, H]`.
pub fn combine(weighted_rows: &[f32], hidden_size: usize, perm: &Permutation) -> Vec<f32> {
    let mut out = vec![0.0f32; perm.tokens * hidden_size];
    for t in 0..perm.tokens {
        for j in 0..perm.slots_per_token {
            let row = perm.pair_rows[t * perm.slots_per_token + j] as usize;
            for c in 0..hidden_size {
                out[t * hidden_size + c] += weighted_rows[row * hidden_size + c];
            }
        }
    }
    out
}

/// The layer under a given `routing` (valid for `weights`, which must hold every slot):
/// steps 2 to 5, plainly. `hidden [T, H]` in f32; the output `[T, H]`.
pub fn forward_routed(weights: &MoeWeights, precision: Precision, hidden: &[f32], routing: &Routing) -> Vec<f32> {
    let cfg = weights.config();
    let (h, tokens) = (cfg.hidden_size, routing.tokens);
    let (slot_ids, slot_weights) = routing.with_shared_slots(cfg.router.n_experts, cfg.n_shared_experts);
    let slots_per_token = routing.top_k + cfg.n_shared_experts;
    let perm = permute(&slot_ids, tokens, slots_per_token, cfg.n_slots());
    let mut rows = vec![0.0f32; perm.rows() * h];
    for (r, &pair) in perm.row_pairs.iter().enumerate() {
        let (slot, t) = (slot_ids[pair as usize] as usize, perm.row_token(r));
        let gate_up = weights.slot_gate_up(slot).to_f32_vec();
        let (gate, up) = gate_up.split_at(gate_up.len() / 2);
        let y = expert_mlp(&hidden[t * h..(t + 1) * h], gate, up, &weights.slot_down(slot).to_f32_vec(), precision);
        for (o, v) in rows[r * h..(r + 1) * h].iter_mut().zip(y) {
            *o = slot_weights[pair as usize] * v;
        }
    }
    combine(&rows, h, &perm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_sorts_pairs_by_slot() {
        // 3 tokens x 2 slots over 4 slots (the engine's unit test case, by another route).
        let p = permute(&[2, 0, 0, 2, 3, 0], 3, 2, 4);
        assert_eq!(p.expert_offsets, vec![0, 3, 3, 5, 6]);
        assert_eq!(p.row_pairs, vec![1, 2, 5, 0, 3, 4]);
        p.validate().unwrap();
    }

    #[test]
    fn route_token_ties_and_margin() {
        let cfg = RouterConfig { n_experts: 5, top_k: 3, ..RouterConfig::dots1() };
        let r = route_token(&cfg, &[0.5, 1.0, 0.5, 1.0, 0.5], None);
        assert_eq!(r.ids, vec![1, 3, 0]);
        assert_eq!(r.margin, 0.0, "exact ties decide the order");
        check_tie_rule(&r.choice, &r.ids).unwrap();
        assert!(check_tie_rule(&r.choice, &[3, 1, 0]).is_err());
    }
}
