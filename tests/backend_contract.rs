//! The MoE contract, written once and run on every backend this machine has: the CPU
//! reference always, CUDA when a GPU opens (skipped with a message otherwise;
//! `DOTS_MOE_REQUIRE_GPU=1` makes a missing GPU a failure).
//!
//! Each backend's answers are compared with the contract's documented examples and with the
//! CPU reference. Exact where the contract is exact (ids on clear decisions, permutation,
//! gather, combine); weights within 1e-6 relative (the exponential may differ by an ulp).

use dots_moe::MoeError;
use dots_moe::backend::{Backend, BackendError, testing};
use dots_moe::config::{MoeConfig, RouterConfig};
use dots_moe::moe::route::sigmoid;
use dots_moe::moe::{MoeLayer, MoeWeights, Precision, permute, router_logits};
use dots_moe::tensor::{Dtype, TensorView};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn backends(test: &str) -> Vec<Backend> {
    testing::backends(test)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn ties_go_to_the_lower_index() {
    let cfg = RouterConfig { n_experts: 5, top_k: 3, ..RouterConfig::dots1() };
    for b in backends("ties_go_to_the_lower_index") {
        let r = b.route_logits(&cfg, &[0.5, 1.0, 0.5, 1.0, 0.5], 1, None).unwrap();
        assert_eq!(r.expert_ids, vec![1, 3, 0], "{}", b.name());
        let sum: f32 = r.weights.iter().sum();
        assert!((sum - 2.5).abs() < 1e-5, "{}: weights sum to {sum}", b.name());
    }
}

#[test]
fn bias_chooses_but_does_not_weigh() {
    let cfg = RouterConfig {
        n_experts: 4,
        top_k: 2,
        norm_topk_prob: false,
        routed_scaling_factor: 1.0,
        ..RouterConfig::dots1()
    };
    for b in backends("bias_chooses_but_does_not_weigh") {
        let r = b.route_logits(&cfg, &[0.0, 1.0, 2.0, 3.0], 1, Some(&[10.0, 0.0, 0.0, 0.0])).unwrap();
        assert_eq!(r.expert_ids, vec![0, 3], "{}", b.name());
        for (w, expected) in r.weights.iter().zip([sigmoid(0.0), sigmoid(3.0)]) {
            assert!((w - expected).abs() <= 1e-6 * expected, "{}: {w} vs {expected}", b.name());
        }
    }
}

#[test]
fn excluded_groups_score_zero() {
    // 6 experts in 3 groups, keep 2. Choices (0.5 + bias): group 0 (-0.05, -0.05) scores
    // -0.1, group 1 (0.9, 0.8) 1.7, group 2 (0.2, -0.5) -0.3 and is excluded: its choices
    // become 0.0 (not -inf), which beats group 0's -0.05, so the third pick is expert 4
    // (the lower index of the two tied zeros).
    let cfg = RouterConfig { n_experts: 6, top_k: 3, n_group: 3, topk_group: 2, ..RouterConfig::dots1() };
    let bias = [-0.55, -0.55, 0.4, 0.3, -0.3, -1.0];
    for b in backends("excluded_groups_score_zero") {
        let r = b.route_logits(&cfg, &[0.0; 6], 1, Some(&bias)).unwrap();
        assert_eq!(r.expert_ids, vec![2, 3, 4], "{}", b.name());
    }
}

#[test]
fn bad_inputs_are_the_same_errors() {
    let cfg = RouterConfig { n_experts: 4, top_k: 2, ..RouterConfig::dots1() };
    for b in backends("bad_inputs_are_the_same_errors") {
        let name = b.name();
        let err = b.route_logits(&cfg, &[0.0, 0.0, 0.0, 0.0, 0.0, f32::NAN, 0.0, 0.0], 2, None).unwrap_err();
        assert!(
            matches!(err, BackendError::Moe(MoeError::NonFiniteLogit { token: 1, expert: 1, .. })),
            "{name}: {err}"
        );
        let err = b.route_logits(&cfg, &[0.0; 4], 1, Some(&[0.0, f32::INFINITY, 0.0, 0.0])).unwrap_err();
        assert!(matches!(err, BackendError::Moe(MoeError::NonFiniteBias { expert: 1, .. })), "{name}: {err}");
        assert!(
            matches!(b.route_logits(&cfg, &[0.0; 3], 1, None), Err(BackendError::Moe(MoeError::Shape { .. }))),
            "{name}"
        );
        let err = b.permute(&[0, 4], 1, 2, 4).unwrap_err();
        assert!(matches!(err, BackendError::Moe(MoeError::BadRouting { token: 0, .. })), "{name}: {err}");
        assert!(b.permute(&[0, 1, 2], 2, 2, 4).is_err(), "{name}");
    }
}

#[test]
fn the_permutation_is_a_stable_counting_sort() {
    for b in backends("the_permutation_is_a_stable_counting_sort") {
        let p = b.permute(&[2, 0, 0, 2, 3, 0], 3, 2, 4).unwrap();
        assert_eq!(p.expert_offsets, vec![0, 3, 3, 5, 6], "{}", b.name());
        assert_eq!(p.row_pairs, vec![1, 2, 5, 0, 3, 4], "{}", b.name());
        assert_eq!(p.pair_rows, vec![3, 0, 1, 4, 5, 2], "{}", b.name());
        let empty = b.permute(&[], 0, 8, 130).unwrap();
        assert_eq!(empty.expert_offsets, vec![0; 131], "{}", b.name());
    }
}

#[test]
fn gather_and_combine_follow_the_contract() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for b in backends("gather_and_combine_follow_the_contract") {
        for (tokens, h) in [(0usize, 16usize), (1, 16), (5, 24), (40, 9)] {
            let ids: Vec<u32> = (0..tokens * 3).map(|_| rng.random_range(0..6)).collect();
            let perm = permute(&ids, tokens, 3, 6).unwrap();
            let x: Vec<f32> = (0..tokens * h).map(|_| rng.random_range(-2.0..2.0)).collect();
            let got = b.gather_bf16(TensorView::F32(&x), h, &perm).unwrap();
            let mut cpu = vec![bf16::ZERO; perm.rows() * h];
            dots_moe::moe::gather_bf16(TensorView::F32(&x), h, &perm, &mut cpu).unwrap();
            assert!(
                got.iter().zip(&cpu).all(|(a, c)| a.to_bits() == c.to_bits()) && got.len() == cpu.len(),
                "{}",
                b.name()
            );
            let got = b.gather_f32(TensorView::F32(&x), h, &perm).unwrap();
            assert_eq!(got.len(), perm.rows() * h);
            for (r, row) in got.chunks_exact(h.max(1)).enumerate() {
                let t = perm.row_token(r);
                assert_eq!(bits(row), bits(&x[t * h..(t + 1) * h]), "{}", b.name());
            }
            // Slot order, not row order: 1e8, -1e8, 1 sums to exactly 1 only in slot order.
            let rows: Vec<f32> = (0..perm.rows() * h).map(|i| [1e8, -1e8, 1.0][i % 3]).collect();
            let got = b.combine(&rows, h, &perm).unwrap();
            let mut cpu = vec![0.0; tokens * h];
            dots_moe::moe::combine(&rows, h, &perm, &mut cpu).unwrap();
            assert_eq!(bits(&got), bits(&cpu), "{} T={tokens} H={h}", b.name());
        }
    }
}

/// The smallest relative gap deciding a sigmoid routing without groups (top k + 1 choices).
fn margin(cfg: &RouterConfig, logits: &[f32], bias: &[f32]) -> f32 {
    let mut c: Vec<f32> = logits.iter().zip(bias).map(|(&l, &b)| sigmoid(l) + b).collect();
    c.sort_by(|a, b| b.total_cmp(a));
    c.windows(2).take(cfg.top_k).map(|w| (w[0] - w[1]).abs() / w[0].abs().max(1e-3)).fold(f32::INFINITY, f32::min)
}

#[test]
fn the_layer_runs_through_the_same_call() {
    // H 256, I 128: a shape the CUDA expert kernels take, so on a GPU the bf16 layer with
    // Precision::Bf16 runs whole on the GPU; the others are Unsupported there (the CPU runs
    // every one).
    let cfg = MoeConfig {
        hidden_size: 256,
        moe_intermediate_size: 128,
        n_shared_experts: 2,
        router: RouterConfig { n_experts: 16, top_k: 4, ..RouterConfig::dots1() },
    };
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for dtype in [Dtype::Bf16, Dtype::F32] {
        let weights = MoeWeights::synthetic(&cfg, dtype, 9).unwrap();
        let bias = weights.router_bias().unwrap().to_vec();
        let mut layer = MoeLayer::new(weights);
        for precision in [Precision::Bf16, Precision::F32] {
            layer.set_precision(precision);
            for tokens in [0usize, 1, 3, 17, 256] {
                // Hidden rows that route with a clear margin (the logits' summation order
                // differs between backends).
                let h = cfg.hidden_size;
                let mut x = vec![0.0f32; tokens * h];
                for t in 0..tokens {
                    loop {
                        let row: Vec<f32> = (0..h).map(|_| rng.random_range(-1.7..1.7)).collect();
                        let l = router_logits(TensorView::F32(&row), 1, h, layer.weights().router_gate(), 16).unwrap();
                        if margin(&cfg.router, &l, &bias) > 1e-4 {
                            x[t * h..(t + 1) * h].copy_from_slice(&row);
                            break;
                        }
                    }
                }
                let cpu = layer.forward_trace(TensorView::F32(&x), tokens).unwrap();
                for b in backends("the_layer_runs_through_the_same_call") {
                    let what = format!("{} {dtype:?} {precision:?} T={tokens}", b.name());
                    let on_gpu = matches!(b, Backend::Cuda(_));
                    if on_gpu && (dtype, precision) != (Dtype::Bf16, Precision::Bf16) {
                        for result in [
                            b.forward_trace(&layer, TensorView::F32(&x), tokens).map(|t| t.output),
                            b.forward(&layer, TensorView::F32(&x), tokens),
                        ] {
                            assert!(
                                matches!(result, Err(BackendError::Moe(MoeError::Unsupported(_)))),
                                "{what}: {result:?}"
                            );
                        }
                        continue;
                    }
                    let got = b.forward_trace(&layer, TensorView::F32(&x), tokens).unwrap();
                    assert_eq!(got.routing.expert_ids, cpu.routing.expert_ids, "{what}");
                    assert_eq!(got.slot_ids, cpu.slot_ids, "{what}");
                    assert_eq!(got.permutation, cpu.permutation, "{what}");
                    for (g, c) in got.slot_weights.iter().zip(&cpu.slot_weights) {
                        assert!((g - c).abs() <= 1e-5 * c.abs(), "{what}: weight {g} vs {c}");
                    }
                    assert_eq!(got.output.len(), tokens * h, "{what}");
                    for (g, c) in got.output.iter().zip(&cpu.output) {
                        assert!((g - c).abs() <= 1e-4 * (1.0 + c.abs()), "{what}: output {g} vs {c}");
                    }
                    let plain = b.forward(&layer, TensorView::F32(&x), tokens).unwrap();
                    assert_eq!(bits(&plain), bits(&got.output), "{what}: forward vs forward_trace");
                }
            }
        }
    }
}
