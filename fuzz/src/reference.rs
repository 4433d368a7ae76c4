//! A plain reference of the router contract (src/moe/route.rs), written separately.
//!
//! Where the contract fixes an operation's order (sigmoid as `1 / (1 + exp(-x))`, the
//! max-subtracted softmax summed in expert order, the weight sum over `j = 0..k` plus
//! `1e-20`), the reference follows it, so its results are comparable bit for bit.
//! Selection is written differently: stable sorts by `(value desc, index asc)` instead
//! of selection loops.

use std::cmp::Ordering;

use dots_moe::{RouterConfig, Scoring};

/// Whether the router configuration is usable, from the contract's rules.
pub fn router_config_is_valid(cfg: &RouterConfig) -> bool {
    let e = cfg.n_experts;
    let groups_ok = cfg.n_group >= 1
        && e % cfg.n_group == 0
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

/// One token's routing by the reference.
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
}

/// Descending by value, ties to the lower index: the contract's order.
fn by_value_desc(values: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    // Values are never NaN here (finite inputs; at worst +-inf for group sums).
    order.sort_by(|&a, &b| values[b].partial_cmp(&values[a]).unwrap_or(Ordering::Equal).then(a.cmp(&b)));
    order
}

/// Routes one token of finite `logits` (`[E]`), with an optional finite `bias`.
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
    if cfg.n_group > 1 {
        let per = e / cfg.n_group;
        let group_scores: Vec<f32> = (0..cfg.n_group)
            .map(|g| {
                let members = &choice[g * per..(g + 1) * per];
                let order = by_value_desc(members);
                if per >= 2 { members[order[0]] + members[order[1]] } else { members[order[0]] }
            })
            .collect();
        kept_groups = vec![false; cfg.n_group];
        for &g in by_value_desc(&group_scores).iter().take(cfg.topk_group) {
            kept_groups[g] = true;
        }
        for (g, kept) in kept_groups.iter().enumerate() {
            if !kept {
                choice[g * per..(g + 1) * per].fill(0.0);
            }
        }
    }
    let ids: Vec<u32> = by_value_desc(&choice).into_iter().take(cfg.top_k).map(|i| i as u32).collect();
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
    TokenRoute { scores, choice, ids, weights, kept_groups }
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
