//! Fuzz target `route`: `route_logits` on arbitrary logits, biases and router configs.
//!
//! Oracle: a typed error exactly when the reference says the input is unusable (invalid
//! config, wrong lengths, a non-finite logit or bias, each named correctly); otherwise
//! ids distinct and in range, weights finite and summing to the scaling factor (when
//! normalised), the tie rule, bit-for-bit agreement with the plain reference in
//! `dots_moe::moe::reference`, and each token routed alone equal to its row of the batch.
//! No allocation beyond what the input's size justifies.
#![no_main]

use arbitrary::{Result, Unstructured};
use dots_moe::{MoeError, RouterConfig, Scoring, moe::route_logits};
use dots_moe_fuzz::alloc_guard::Limit;
use dots_moe::moe::reference::{check_tie_rule, route_token, router_config_is_valid};
use dots_moe_fuzz::values::{any_f32, rarely, small_len};
use libfuzzer_sys::fuzz_target;

struct Case {
    cfg: RouterConfig,
    tokens: usize,
    logits: Vec<f32>,
    bias: Option<Vec<f32>>,
}

fn draw(u: &mut Unstructured<'_>) -> Result<Case> {
    let huge = rarely(u, 16)?;
    // Huge expert counts only with no tokens: the logits must be `[T, E]` long.
    let n_experts = if huge { u.arbitrary::<u32>()? as usize } else { small_len(u, 0, 48)? };
    let pick_divisor = |u: &mut Unstructured<'_>, n: usize| -> Result<usize> {
        if n > 0 && n <= 4096 && u.ratio(3u8, 4)? {
            let divisors: Vec<usize> = (1..=n).filter(|d| n % d == 0).collect();
            Ok(*u.choose(&divisors)?)
        } else {
            Ok(u.int_in_range(0..=n.saturating_add(1).min(64))?)
        }
    };
    let top_k = if u.ratio(7u8, 8)? && n_experts > 0 {
        u.int_in_range(1..=n_experts.min(64))?
    } else {
        u.int_in_range(0..=n_experts.saturating_add(1).min(65))?
    };
    let n_group = pick_divisor(u, n_experts)?;
    let topk_group =
        if n_group > 0 && u.ratio(7u8, 8)? { u.int_in_range(1..=n_group)? } else { u.int_in_range(0..=n_group + 1)? };
    let scoring = if u.arbitrary()? { Scoring::Sigmoid } else { Scoring::Softmax };
    let routed_scaling_factor = if u.ratio(3u8, 4)? { *u.choose(&[2.5f32, 1.0, 0.5, 16.0])? } else { any_f32(u)? };
    let cfg = RouterConfig {
        n_experts,
        top_k,
        n_group,
        topk_group,
        scoring,
        norm_topk_prob: u.arbitrary()?,
        routed_scaling_factor,
    };

    let tokens = if huge { 0 } else { small_len(u, 0, 6)? };
    let mut len = tokens * n_experts;
    if rarely(u, 32)? {
        len = len.saturating_add(1).min(1 << 12); // a wrong length
    }
    let mut logits = Vec::with_capacity(len);
    for _ in 0..len {
        logits.push(any_f32(u)?);
    }
    let bias = if u.arbitrary()? && n_experts <= 4096 {
        let mut n = n_experts;
        if rarely(u, 32)? {
            n += 1;
        }
        let mut b = Vec::with_capacity(n);
        for _ in 0..n {
            // Mostly small biases, so they reorder experts without dwarfing the scores.
            b.push(if u.ratio(3u8, 4)? { f32::from(u.int_in_range(-8i8..=8)?) / 16.0 } else { any_f32(u)? });
        }
        Some(b)
    } else {
        None
    };
    Ok(Case { cfg, tokens, logits, bias })
}

fn check(case: &Case) {
    let Case { cfg, tokens, logits, bias } = case;
    let (e, k) = (cfg.n_experts, cfg.top_k);
    let input_bytes = 4 * (logits.len() + bias.as_ref().map_or(0, Vec::len));
    let result = {
        // Scratch and output are O(T * E + E); with T * E elements given, E is justified
        // only when T > 0.
        let _limit = Limit::proportional(input_bytes, 8, 64 << 10);
        route_logits(cfg, logits, *tokens, bias.as_deref())
    };

    // What the reference expects, in the contract's order of checks.
    if !router_config_is_valid(cfg) {
        assert!(matches!(result, Err(MoeError::Config(_))), "invalid config {cfg:?} gave {result:?}");
        return;
    }
    if Some(logits.len()) != tokens.checked_mul(e) {
        assert!(matches!(result, Err(MoeError::Shape { .. })), "wrong logits length gave {result:?}");
        return;
    }
    if let Some(b) = bias {
        if b.len() != e {
            assert!(matches!(result, Err(MoeError::Shape { .. })), "wrong bias length gave {result:?}");
            return;
        }
        if let Some(i) = b.iter().position(|v| !v.is_finite()) {
            assert!(
                matches!(result, Err(MoeError::NonFiniteBias { expert, .. }) if expert == i),
                "bias[{i}] = {} gave {result:?}",
                b[i]
            );
            return;
        }
    }
    if let Some(p) = logits.iter().position(|v| !v.is_finite()) {
        let (t, x) = (p / e, p % e);
        assert!(
            matches!(result, Err(MoeError::NonFiniteLogit { token, expert, .. }) if token == t && expert == x),
            "logit [{t}, {x}] = {} gave {result:?}",
            logits[p]
        );
        return;
    }
    let routing = match result {
        Ok(r) => r,
        Err(err) => panic!("valid input rejected: {err} ({cfg:?})"),
    };

    assert_eq!((routing.tokens, routing.top_k), (*tokens, k));
    assert_eq!(routing.expert_ids.len(), tokens * k);
    assert_eq!(routing.weights.len(), tokens * k);
    if let Err(err) = routing.validate(e) {
        panic!("routing fails its own validation: {err}");
    }
    let scale = f64::from(cfg.routed_scaling_factor);
    for t in 0..*tokens {
        let row = &logits[t * e..(t + 1) * e];
        let ids = routing.ids(t);
        let weights = routing.token_weights(t);
        let reference = route_token(cfg, row, bias.as_deref());

        for (j, &id) in ids.iter().enumerate() {
            assert!((id as usize) < e, "token {t}: id {id} out of range");
            assert!(!ids[..j].contains(&id), "token {t}: id {id} twice");
        }
        assert!(weights.iter().all(|w| w.is_finite() && *w >= 0.0), "token {t}: weights {weights:?}");
        if let Err(why) = check_tie_rule(&reference.choice, ids) {
            panic!("token {t}: tie rule broken: {why}; ids {ids:?}, choice {:?}", reference.choice);
        }
        // Group-limited: an expert outside the kept groups can only win with choice 0.0.
        if cfg.n_group > 1 {
            let per = e / cfg.n_group;
            for &id in ids {
                let g = id as usize / per;
                assert!(
                    reference.kept_groups[g] || reference.choice[id as usize] == 0.0,
                    "token {t}: expert {id} of dropped group {g} chosen"
                );
            }
        }
        // Weights: the scores of the chosen experts (the bias never weighs), normalised
        // and scaled. Sum over the chosen scores in f64 for the sum check.
        let raw: f64 = ids.iter().map(|&i| f64::from(reference.scores[i as usize])).sum();
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        // Relative rounding of k products and sums, plus subnormal steps for tiny scales.
        let tolerance = 1e-5 * (k as f64 + 2.0);
        let slack = k as f64 * 2e-45;
        if cfg.norm_topk_prob {
            if raw >= 1e-6 {
                assert!(
                    (total - scale).abs() <= tolerance * scale + slack,
                    "token {t}: weights sum to {total}, not {scale}"
                );
            } else {
                assert!(total <= scale * (1.0 + tolerance) + slack, "token {t}: weights sum to {total} > {scale}");
            }
        } else {
            assert!(
                (total - scale * raw).abs() <= tolerance * scale * raw + slack,
                "token {t}: {total} != {scale} * {raw}"
            );
        }
        // Bit-for-bit agreement with the reference.
        assert_eq!(ids, &reference.ids[..], "token {t}: ids differ from the reference");
        let bits = |w: &[f32]| w.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(weights),
            bits(&reference.weights),
            "token {t}: weights {weights:?} vs reference {:?}",
            reference.weights
        );

        // A token routed alone gets its batch row.
        if *tokens > 1 {
            let alone = route_logits(cfg, row, 1, bias.as_deref()).expect("a valid single token routes");
            assert_eq!(alone.expert_ids, ids, "token {t}: routing depends on the batch");
            assert_eq!(bits(&alone.weights), bits(weights), "token {t}: weights depend on the batch");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if let Ok(case) = draw(&mut u) {
        check(&case);
    }
});
