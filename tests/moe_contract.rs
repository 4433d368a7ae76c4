//! Property tests of the MoE contract: routing invariants, the permutation, shared-expert
//! fusion, and the whole layer against a plain per-token loop.

use dots_moe::config::{MoeConfig, RouterConfig, Scoring};
use dots_moe::cpu::Isa;
use dots_moe::moe::{MoeLayer, MoeLayerBuilder, Precision, combine, permute, reference, route_logits};
use dots_moe::tensor::{Dtype, TensorView};
use dots_moe::{MoeError, moe};
use half::bf16;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------
// The plain reference: one token at a time, the shared experts unfused; the router is
// the library's oracle (`dots_moe::moe::reference`).
// ---------------------------------------------------------------------------------------

struct PlainWeights {
    cfg: MoeConfig,
    gate: Vec<f32>,                // [E, H]
    bias: Option<Vec<f32>>,        // [E]
    experts: Vec<[Vec<f32>; 3]>,   // gate [I,H], up [I,H], down [H,I]
    shared: Option<[Vec<f32>; 3]>, // gate [n_shared*I,H], up [n_shared*I,H], down [H,n_shared*I]
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Whether `a` lies within `err` of a point where rounding to bf16 changes direction.
fn near_bf16_boundary(a: f32, err: f32) -> bool {
    if a == 0.0 || !a.is_normal() {
        return false;
    }
    let ulp = f32::from_bits(a.abs().to_bits() & 0x7F80_0000) * f32::EPSILON;
    let low = (a.to_bits() & 0xFFFF) as i64;
    ((low - 0x8000).abs() as f32) * ulp <= err
}

fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// `down(silu(gate x) * up x)` for an MLP of width `width`, with optional bf16 rounding
/// of the inputs of each matrix product.
fn mlp(x: &[f32], w: &[Vec<f32>; 3], width: usize, h: usize, bf16_inputs: bool) -> Vec<f32> {
    mlp_checked(x, w, width, h, bf16_inputs).0
}

/// [`mlp`], and per output element a bound on how much it may legitimately differ from
/// another correct implementation: where an activation lies so close to a bf16 rounding
/// boundary that a different f32 summation order could round it the other way, one bf16
/// ulp of that activation times its down weight.
fn mlp_checked(x: &[f32], w: &[Vec<f32>; 3], width: usize, h: usize, bf16_inputs: bool) -> (Vec<f32>, Vec<f32>) {
    let x: Vec<f32> = x.iter().map(|&v| if bf16_inputs { round_bf16(v) } else { v }).collect();
    let mut flip = vec![0.0f32; width]; // the bf16 ulp of activations near a boundary
    let act: Vec<f32> = (0..width)
        .map(|n| {
            let g = dot(&x, &w[0][n * h..(n + 1) * h]);
            let u = dot(&x, &w[1][n * h..(n + 1) * h]);
            let a = g / (1.0 + (-g).exp()) * u;
            if bf16_inputs {
                // Recursive summation error is at most (h - 1) u sum|terms| (u = eps / 2);
                // allow twice that, plus a few ulps for silu and the product.
                let abs_dot = |w: &[f32]| x.iter().zip(w).map(|(p, q)| (p * q).abs()).sum::<f32>();
                let (eg, eu) = (abs_dot(&w[0][n * h..(n + 1) * h]), abs_dot(&w[1][n * h..(n + 1) * h]));
                let silu = (g / (1.0 + (-g).exp())).abs();
                let err = h as f32 * f32::EPSILON * (1.1 * u.abs() * eg + silu * eu) + 4.0 * f32::EPSILON * a.abs();
                if near_bf16_boundary(a, err) {
                    flip[n] = a.abs() * 2.0 / 256.0;
                }
            }
            if bf16_inputs { round_bf16(a) } else { a }
        })
        .collect();
    let out = (0..h).map(|o| dot(&act, &w[2][o * width..(o + 1) * width])).collect();
    let bound =
        (0..h).map(|o| flip.iter().zip(&w[2][o * width..(o + 1) * width]).map(|(f, d)| f * d.abs()).sum()).collect();
    (out, bound)
}

/// The router for one token, by the shared oracle: (ids, weights, margin), where margin
/// is the smallest gap that decided the selection (so near-ties can be told apart).
fn plain_route(cfg: &RouterConfig, logits: &[f32], bias: Option<&[f32]>) -> (Vec<usize>, Vec<f32>, f32) {
    let r = reference::route_token(cfg, logits, bias);
    (r.ids.iter().map(|&i| i as usize).collect(), r.weights, r.margin)
}

/// The whole layer for one token: routed experts weighted, plus the unfused shared MLP.
/// Returns the output, the ids, the routing margin, and per output element the bound on
/// legitimate bf16 rounding differences (see [`mlp_checked`]).
fn plain_layer(p: &PlainWeights, x: &[f32], bf16_inputs: bool) -> (Vec<f32>, Vec<usize>, f32, Vec<f32>) {
    let (h, i) = (p.cfg.hidden_size, p.cfg.moe_intermediate_size);
    let logits: Vec<f32> = (0..p.cfg.router.n_experts).map(|e| dot(x, &p.gate[e * h..(e + 1) * h])).collect();
    let (ids, weights, margin) = plain_route(&p.cfg.router, &logits, p.bias.as_deref());
    let mut out = vec![0.0f32; h];
    let mut bound = vec![0.0f32; h];
    let mut add = |y: Vec<f32>, b: Vec<f32>, w: f32| {
        out.iter_mut().zip(&y).for_each(|(o, v)| *o += w * v);
        bound.iter_mut().zip(&b).for_each(|(o, v)| *o += w.abs() * v);
    };
    for (&e, &w) in ids.iter().zip(&weights) {
        let (y, b) = mlp_checked(x, &p.experts[e], i, h, bf16_inputs);
        add(y, b, w);
    }
    if let Some(shared) = &p.shared {
        let (y, b) = mlp_checked(x, shared, p.cfg.n_shared_experts * i, h, bf16_inputs);
        add(y, b, 1.0);
    }
    (out, ids, margin, bound)
}

fn random_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32, dtype: Dtype) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v = rng.random_range(-scale..scale);
            if dtype == Dtype::Bf16 { round_bf16(v) } else { v }
        })
        .collect()
}

fn random_weights(cfg: &MoeConfig, dtype: Dtype, seed: u64) -> PlainWeights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (h, i, e, s) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.router.n_experts, cfg.n_shared_experts);
    let wh = 1.0 / (h as f32).sqrt() * 1.7;
    let wi = 1.0 / (i as f32).sqrt() * 1.7;
    PlainWeights {
        cfg: cfg.clone(),
        gate: random_vec(&mut rng, e * h, wh * 2.0, dtype),
        bias: if rng.random_bool(0.7) { Some(random_vec(&mut rng, e, 0.3, Dtype::F32)) } else { None },
        experts: (0..e)
            .map(|_| {
                [
                    random_vec(&mut rng, i * h, wh, dtype),
                    random_vec(&mut rng, i * h, wh, dtype),
                    random_vec(&mut rng, h * i, wi, dtype),
                ]
            })
            .collect(),
        shared: (s > 0).then(|| {
            [
                random_vec(&mut rng, s * i * h, wh, dtype),
                random_vec(&mut rng, s * i * h, wh, dtype),
                random_vec(&mut rng, h * s * i, wi, dtype),
            ]
        }),
    }
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// Builds the layer from the plain weights, passing bf16 tensors as bf16 (as a
/// checkpoint would) and f32 tensors as f32.
fn build_layer(p: &PlainWeights, dtype: Dtype) -> MoeLayer {
    let mut b = MoeLayerBuilder::new(p.cfg.clone(), dtype).unwrap();
    match dtype {
        Dtype::F32 => {
            b.router(TensorView::F32(&p.gate), p.bias.as_deref().map(TensorView::F32)).unwrap();
            for (e, [g, u, d]) in p.experts.iter().enumerate() {
                b.expert(e, TensorView::F32(g), TensorView::F32(u), TensorView::F32(d)).unwrap();
            }
            if let Some([g, u, d]) = &p.shared {
                b.shared(TensorView::F32(g), TensorView::F32(u), TensorView::F32(d)).unwrap();
            }
        }
        Dtype::Bf16 => {
            b.router(TensorView::Bf16(&to_bf16(&p.gate)), p.bias.as_deref().map(TensorView::F32)).unwrap();
            for (e, [g, u, d]) in p.experts.iter().enumerate() {
                b.expert(
                    e,
                    TensorView::Bf16(&to_bf16(g)),
                    TensorView::Bf16(&to_bf16(u)),
                    TensorView::Bf16(&to_bf16(d)),
                )
                .unwrap();
            }
            if let Some([g, u, d]) = &p.shared {
                b.shared(TensorView::Bf16(&to_bf16(g)), TensorView::Bf16(&to_bf16(u)), TensorView::Bf16(&to_bf16(d)))
                    .unwrap();
            }
        }
    }
    b.build().unwrap()
}

// ---------------------------------------------------------------------------------------
// Random shapes.
// ---------------------------------------------------------------------------------------

fn router_strategy() -> impl Strategy<Value = RouterConfig> {
    // (n_group, experts per group): E = n_group * per_group, rarely a power of two.
    (prop_oneof![Just(1usize), 2usize..5], 1usize..12, any::<bool>(), any::<bool>(), 0u32..3)
        .prop_flat_map(|(n_group, per_group, softmax, norm, scale)| {
            let e = n_group * per_group;
            let max_group = n_group;
            (Just((n_group, e, softmax, norm, scale)), 1..=max_group)
        })
        .prop_flat_map(|((n_group, e, softmax, norm, scale), topk_group)| {
            let per = e / n_group;
            let max_k = (topk_group * per).min(8).min(e);
            (Just((n_group, e, softmax, norm, scale, topk_group)), 1..=max_k)
        })
        .prop_map(|((n_group, e, softmax, norm, scale, topk_group), k)| RouterConfig {
            n_experts: e,
            top_k: k,
            n_group,
            topk_group,
            scoring: if softmax { Scoring::Softmax } else { Scoring::Sigmoid },
            norm_topk_prob: norm,
            routed_scaling_factor: [1.0, 2.5, 0.5][scale as usize],
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn routing_invariants(cfg in router_strategy(), tokens in 0usize..40, seed in any::<u64>(), with_bias in any::<bool>()) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let e = cfg.n_experts;
        let logits = random_vec(&mut rng, tokens * e, 4.0, Dtype::F32);
        let bias = with_bias.then(|| random_vec(&mut rng, e, 0.5, Dtype::F32));
        let r = route_logits(&cfg, &logits, tokens, bias.as_deref()).unwrap();
        prop_assert_eq!(r.expert_ids.len(), tokens * cfg.top_k);
        r.validate(e).unwrap();
        for t in 0..tokens {
            let (ids, w, _) = plain_route(&cfg, &logits[t * e..(t + 1) * e], bias.as_deref());
            let got: Vec<usize> = r.ids(t).iter().map(|&i| i as usize).collect();
            prop_assert_eq!(&got, &ids, "token {}", t);
            for (a, b) in r.token_weights(t).iter().zip(&w) {
                prop_assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{} vs {}", a, b);
            }
            if cfg.norm_topk_prob {
                let sum: f32 = r.token_weights(t).iter().sum();
                let scores_tiny = r.token_weights(t).iter().all(|&x| x == 0.0);
                prop_assert!(scores_tiny || (sum - cfg.routed_scaling_factor).abs() <= 1e-5 * cfg.routed_scaling_factor, "sum {}", sum);
            }
        }
    }

    #[test]
    fn tie_rule_lower_index_first(e in 2usize..40, k_frac in 0.0f64..1.0, value in -3.0f32..3.0, seed in any::<u64>()) {
        // Every logit equal (or a random subset tied at the top): ids ascend.
        let k = 1 + ((e - 1) as f64 * k_frac) as usize;
        let cfg = RouterConfig { n_experts: e, top_k: k, ..RouterConfig::dots1() };
        let r = route_logits(&cfg, &vec![value; e], 1, None).unwrap();
        prop_assert_eq!(r.expert_ids, (0..k as u32).collect::<Vec<_>>());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut logits: Vec<f32> = (0..e).map(|_| rng.random_range(-5.0f32..0.0)).collect();
        let tied: Vec<usize> = (0..e).filter(|_| rng.random_bool(0.5)).collect();
        for &i in &tied { logits[i] = 1.0; }
        let r = route_logits(&cfg, &logits, 1, None).unwrap();
        let expected_prefix: Vec<u32> = tied.iter().take(k).map(|&i| i as u32).collect();
        prop_assert_eq!(&r.expert_ids[..expected_prefix.len()], &expected_prefix[..]);
    }

    #[test]
    fn permutation_is_a_stable_bijection(tokens in 0usize..300, slots in 1usize..10, n in 1usize..40, seed in any::<u64>(), skew in any::<bool>()) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let ids: Vec<u32> = (0..tokens * slots)
            .map(|_| if skew && rng.random_bool(0.8) { 0 } else { rng.random_range(0..n as u32) })
            .collect();
        let p = permute(&ids, tokens, slots, n).unwrap();
        prop_assert_eq!(p.expert_offsets.len(), n + 1);
        prop_assert_eq!(p.expert_offsets[0], 0);
        prop_assert_eq!(*p.expert_offsets.last().unwrap() as usize, tokens * slots);
        prop_assert!(p.expert_offsets.windows(2).all(|w| w[0] <= w[1]));
        let mut seen = vec![false; tokens * slots];
        for (r, &pair) in p.row_pairs.iter().enumerate() {
            prop_assert!(!seen[pair as usize], "pair {} twice", pair);
            seen[pair as usize] = true;
            prop_assert_eq!(p.pair_rows[pair as usize] as usize, r);
        }
        for (pair, &row) in p.pair_rows.iter().enumerate() {
            prop_assert_eq!(p.row_pairs[row as usize] as usize, pair);
        }
        for e in 0..n {
            let rows = p.expert_rows(e);
            prop_assert!(rows.clone().all(|r| ids[p.row_pairs[r] as usize] as usize == e));
            prop_assert!(p.row_pairs[rows].windows(2).all(|w| w[0] < w[1]), "stable within expert {}", e);
        }
    }

    #[test]
    fn engine_steps_equal_the_oracle(tokens in 0usize..200, slots in 1usize..10, n in 1usize..40, h in 1usize..20, seed in any::<u64>()) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let ids: Vec<u32> = (0..tokens * slots).map(|_| rng.random_range(0..n as u32)).collect();
        let p = permute(&ids, tokens, slots, n).unwrap();
        prop_assert_eq!(&p, &reference::permute(&ids, tokens, slots, n));
        // The combine's sum runs in slot order from 0.0 in both: bit for bit.
        let rows = random_vec(&mut rng, tokens * slots * h, 1e3, Dtype::F32);
        let mut out = vec![f32::NAN; tokens * h];
        combine(&rows, h, &p, &mut out).unwrap();
        let want = reference::combine(&rows, h, &p);
        prop_assert_eq!(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }

    #[test]
    fn layer_equals_the_oracle_under_a_given_routing(
        router in router_strategy(),
        h in 1usize..40,
        i in 1usize..24,
        shared in 0usize..3,
        tokens in 0usize..30,
        bf16_weights in any::<bool>(),
        seed in any::<u64>(),
    ) {
        // f32 inputs to the GEMMs: no activation rounds, so the engine and the oracle
        // differ only by f32 summation order.
        let cfg = MoeConfig { hidden_size: h, moe_intermediate_size: i, n_shared_experts: shared, router };
        let dtype = if bf16_weights { Dtype::Bf16 } else { Dtype::F32 };
        let mut layer = build_layer(&random_weights(&cfg, dtype, seed), dtype);
        layer.set_precision(Precision::F32);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 2);
        let x = random_vec(&mut rng, tokens * h, 1.5, Dtype::F32);
        let routing = layer.route(TensorView::F32(&x), tokens).unwrap();
        let got = layer.forward_routed(TensorView::F32(&x), tokens, &routing).unwrap();
        let want = reference::forward_routed(layer.weights(), Precision::F32, &x, &routing);
        prop_assert_eq!(got.len(), want.len());
        for t in 0..tokens {
            let (g, w) = (&got[t * h..(t + 1) * h], &want[t * h..(t + 1) * h]);
            let scale = w.iter().fold(0.05f32, |m, v| m.max(v.abs()));
            for (c, (a, b)) in g.iter().zip(w).enumerate() {
                prop_assert!((a - b).abs() <= 2e-5 * scale, "token {} column {}: {} vs {}", t, c, a, b);
            }
        }
    }

    #[test]
    fn layer_equals_plain_per_token_loop(
        router in router_strategy(),
        h in 1usize..40,
        i in 1usize..24,
        shared in 0usize..3,
        tokens in prop_oneof![Just(0usize), 1usize..20, 200usize..=300],
        bf16_weights in any::<bool>(),
        bf16_precision in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let cfg = MoeConfig { hidden_size: h, moe_intermediate_size: i, n_shared_experts: shared, router };
        let dtype = if bf16_weights { Dtype::Bf16 } else { Dtype::F32 };
        let precision = if bf16_precision { Precision::Bf16 } else { Precision::F32 };
        let plain = random_weights(&cfg, dtype, seed);
        let mut layer = build_layer(&plain, dtype);
        layer.set_precision(precision);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 1);
        let x = random_vec(&mut rng, tokens * h, 1.5, Dtype::F32);
        if let Err(e) = compare_with_plain_loop(&plain, &mut layer, &x, tokens, bf16_precision) {
            prop_assert!(false, "{}", e);
        }
    }
}

/// Runs `layer` on every supported ISA and compares each token's output with
/// [`plain_layer`]: same routing, and outputs within f32 accumulation in another order
/// plus any activation that may round to the other bf16 neighbour.
fn compare_with_plain_loop(
    plain: &PlainWeights,
    layer: &mut MoeLayer,
    x: &[f32],
    tokens: usize,
    bf16_precision: bool,
) -> Result<(), String> {
    let h = plain.cfg.hidden_size;
    for isa in Isa::supported() {
        layer.set_isa(isa).unwrap();
        let trace = layer.forward_trace(TensorView::F32(x), tokens).unwrap();
        if trace.output.len() != tokens * h {
            return Err(format!("output length {} for {tokens} tokens", trace.output.len()));
        }
        let mut compared = 0;
        for t in 0..tokens {
            let (want, ids, margin, flips) = plain_layer(plain, &x[t * h..(t + 1) * h], bf16_precision);
            if margin < 1e-4 {
                continue; // a near-tie: rounding may legitimately pick the other expert
            }
            let got_ids: Vec<usize> = trace.routing.ids(t).iter().map(|&e| e as usize).collect();
            if got_ids != ids {
                return Err(format!("token {t} ({isa:?}): routed to {got_ids:?}, want {ids:?}"));
            }
            let got = &trace.output[t * h..(t + 1) * h];
            let scale = want.iter().fold(0.05f32, |m, v| m.max(v.abs()));
            for (c, ((a, b), flip)) in got.iter().zip(&want).zip(&flips).enumerate() {
                let tol = 2e-5 * scale + flip;
                if (a - b).abs() > tol {
                    return Err(format!("token {t} column {c} ({isa:?}): {a} vs {b} (tol {tol})"));
                }
            }
            compared += 1;
        }
        // Near-ties are rare: most tokens must have been compared.
        if tokens >= 20 && compared * 2 < tokens {
            return Err(format!("only {compared} of {tokens} tokens compared"));
        }
    }
    Ok(())
}

/// Shapes large enough to cross every block of the CPU schedule: several intermediate
/// (`UP_BLOCK`) and hidden (`DOWN_BLOCK`) task blocks with partial last ones, several
/// L2 cache blocks of rows and of columns per task, leftover tiles of 1, 2 and 3 rows,
/// and an intermediate size that is not a multiple of the paired tile width.
#[test]
fn layer_equals_plain_loop_across_cache_blocks() {
    let cfg = MoeConfig {
        hidden_size: 2080,
        moe_intermediate_size: 301,
        n_shared_experts: 1,
        router: RouterConfig { n_experts: 7, top_k: 2, n_group: 1, topk_group: 1, ..RouterConfig::dots1() },
    };
    let mut leftovers = [false; 4];
    for (dtype, bf16_precision, tokens) in
        [(Dtype::Bf16, true, 303), (Dtype::Bf16, false, 150), (Dtype::F32, false, 61)]
    {
        let plain = random_weights(&cfg, dtype, 21);
        let mut layer = build_layer(&plain, dtype);
        layer.set_precision(if bf16_precision { Precision::Bf16 } else { Precision::F32 });
        let mut rng = ChaCha8Rng::seed_from_u64(22);
        let x = random_vec(&mut rng, tokens * cfg.hidden_size, 1.5, Dtype::F32);
        let trace = layer.forward_trace(TensorView::F32(&x), tokens).unwrap();
        for e in 0..cfg.n_slots() {
            leftovers[trace.permutation.expert_rows(e).len() % 4] = true;
        }
        compare_with_plain_loop(&plain, &mut layer, &x, tokens, bf16_precision)
            .unwrap_or_else(|e| panic!("{dtype:?} weights, bf16 inputs {bf16_precision}: {e}"));
    }
    assert!(leftovers[1..].iter().all(|&l| l), "leftover tiles of 1, 2 and 3 rows not all exercised");
}

// ---------------------------------------------------------------------------------------
// Fixed cases.
// ---------------------------------------------------------------------------------------

fn small_cfg() -> MoeConfig {
    MoeConfig {
        hidden_size: 24,
        moe_intermediate_size: 10,
        n_shared_experts: 2,
        router: RouterConfig { n_experts: 12, top_k: 4, n_group: 3, topk_group: 2, ..RouterConfig::dots1() },
    }
}

#[test]
fn fused_shared_equals_unfused_shared_mlp() {
    let cfg = small_cfg();
    let plain = random_weights(&cfg, Dtype::F32, 7);
    let mut layer = build_layer(&plain, Dtype::F32);
    layer.set_precision(Precision::F32);
    let tokens = 9;
    let h = cfg.hidden_size;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = random_vec(&mut rng, tokens * h, 1.0, Dtype::F32);
    let trace = layer.forward_trace(TensorView::F32(&x), tokens).unwrap();
    let (k, s) = (cfg.router.top_k, cfg.slots_per_token());
    for t in 0..tokens {
        // Sum of the shared slots' rows (weight 1.0) against the plain 2I-wide shared MLP.
        let mut fused = vec![0.0f32; h];
        for j in k..s {
            let row = trace.permutation.pair_rows[t * s + j] as usize;
            fused.iter_mut().zip(&trace.weighted_rows[row * h..(row + 1) * h]).for_each(|(f, v)| *f += v);
        }
        let unfused =
            mlp(&x[t * h..(t + 1) * h], plain.shared.as_ref().unwrap(), 2 * cfg.moe_intermediate_size, h, false);
        for (a, b) in fused.iter().zip(&unfused) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "token {t}: fused {a} vs unfused {b}");
        }
    }
}

#[test]
fn forward_is_bit_identical_and_batch_invariant() {
    let cfg = small_cfg();
    let plain = random_weights(&cfg, Dtype::Bf16, 11);
    let layer = build_layer(&plain, Dtype::Bf16);
    let h = cfg.hidden_size;
    let tokens = 37;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let x = random_vec(&mut rng, tokens * h, 1.0, Dtype::F32);
    let a = layer.forward(TensorView::F32(&x), tokens).unwrap();
    let b = layer.forward(TensorView::F32(&x), tokens).unwrap();
    assert_eq!(a, b);
    for t in [0, 5, 36] {
        let alone = layer.forward(TensorView::F32(&x[t * h..(t + 1) * h]), 1).unwrap();
        assert_eq!(alone, a[t * h..(t + 1) * h], "token {t} alone differs from inside the batch");
    }
}

/// Batch invariance in bf16 at shapes whose GEMMs all take the AMX tiles where the CPU has
/// them (`H` and `I` multiples of 32, at least 3 chunks of 32 each so that the order of
/// the chunks' sums shows): a slot's rows in the batch go through two-block tiles, a
/// token alone through the single-tile kernel, and both must give the same bits.
#[test]
fn bf16_forward_is_batch_invariant_at_tile_shapes() {
    let cfg = MoeConfig {
        hidden_size: 128,
        moe_intermediate_size: 96,
        n_shared_experts: 1,
        router: RouterConfig { n_experts: 4, top_k: 2, n_group: 1, topk_group: 1, ..RouterConfig::dots1() },
    };
    let plain = random_weights(&cfg, Dtype::Bf16, 13);
    let mut layer = build_layer(&plain, Dtype::Bf16);
    layer.set_precision(Precision::Bf16);
    let (h, tokens) = (cfg.hidden_size, 75);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let x = random_vec(&mut rng, tokens * h, 1.0, Dtype::F32);
    let all = layer.forward(TensorView::F32(&x), tokens).unwrap();
    assert_eq!(all, layer.forward(TensorView::F32(&x), tokens).unwrap());
    for t in [0, 16, 17, 40, 74] {
        let alone = layer.forward(TensorView::F32(&x[t * h..(t + 1) * h]), 1).unwrap();
        assert_eq!(alone, all[t * h..(t + 1) * h], "token {t} alone differs from inside the batch");
    }
    let some = layer.forward(TensorView::F32(&x[10 * h..43 * h]), 33).unwrap();
    assert_eq!(some, all[10 * h..43 * h], "tokens 10..43 differ from inside the whole batch");
}

#[test]
fn bf16_and_f32_hidden_route_alike() {
    let cfg = small_cfg();
    let plain = random_weights(&cfg, Dtype::Bf16, 13);
    let layer = build_layer(&plain, Dtype::Bf16);
    let h = cfg.hidden_size;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x = random_vec(&mut rng, 4 * h, 1.0, Dtype::Bf16);
    let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let a = layer.forward(TensorView::F32(&x), 4).unwrap();
    let b = layer.forward(TensorView::Bf16(&xb), 4).unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_input_gives_typed_errors() {
    let cfg = small_cfg();
    let plain = random_weights(&cfg, Dtype::F32, 1);
    let layer = build_layer(&plain, Dtype::F32);
    let h = cfg.hidden_size;
    // Hidden of the wrong length.
    let err = layer.forward(TensorView::F32(&vec![0.0; 2 * h + 1]), 2).unwrap_err();
    assert!(matches!(&err, MoeError::Shape { name, .. } if name == "hidden"), "{err}");
    // NaN and infinite hidden values give non-finite logits.
    let mut x = vec![0.5f32; 3 * h];
    x[h + 2] = f32::NAN;
    let err = layer.forward(TensorView::F32(&x), 3).unwrap_err();
    assert!(matches!(err, MoeError::NonFiniteLogit { token: 1, .. }), "{err}");
    x[h + 2] = f32::INFINITY;
    assert!(matches!(layer.forward(TensorView::F32(&x), 3), Err(MoeError::NonFiniteLogit { token: 1, .. })));
    // Empty batch is valid.
    assert!(layer.forward(TensorView::F32(&[]), 0).unwrap().is_empty());
    // k > E.
    let bad = MoeConfig { router: RouterConfig { top_k: 13, ..cfg.router.clone() }, ..cfg.clone() };
    assert!(matches!(MoeLayerBuilder::new(bad, Dtype::F32), Err(MoeError::Config(_))));
    // A tensor of the wrong shape names itself.
    let mut b = MoeLayerBuilder::new(cfg.clone(), Dtype::F32).unwrap();
    let err = b
        .expert(3, TensorView::F32(&[0.0; 5]), TensorView::F32(&[0.0; 240]), TensorView::F32(&[0.0; 240]))
        .unwrap_err();
    assert!(err.to_string().contains("experts.3.gate_proj.weight"), "{err}");
    // Missing weights.
    let mut b = MoeLayerBuilder::new(cfg.clone(), Dtype::F32).unwrap();
    b.router(TensorView::F32(&plain.gate), None).unwrap();
    assert!(matches!(b.build(), Err(MoeError::MissingWeights(_))));
    // Out-of-range routing in the permutation step.
    assert!(moe::permute(&[0, 99], 1, 2, 14).is_err());
}
