//! Regression tests for panics the public MoE steps had on malformed inputs (found while
//! sweeping the API behind the `permute` and `route` fuzz targets):
//!
//! - `gather_f32`, `gather_bf16`, `combine` and `grouped_experts` trusted a `Permutation`
//!   (all public fields, made by a GPU download, a test or an engine) and indexed out of
//!   bounds on an inconsistent one; `Permutation::n_slots` (then `n_experts`) underflowed
//!   on empty offsets.
//! - `router_logits` computed `tokens * n_experts` unchecked: with `hidden_size == 0`
//!   both inputs are empty whatever the sizes say, and the product overflowed.

use dots_moe::moe::{Permutation, combine, gather_bf16, gather_f32, grouped_experts, permute, router_logits};
use dots_moe::{Dtype, MoeConfig, MoeError, RouterConfig, TensorView, cpu::Isa, moe::MoeWeights, moe::Precision};
use half::bf16;

/// Two tokens, two slots, three experts: a valid permutation to break.
fn valid() -> Permutation {
    permute(&[2, 0, 0, 1], 2, 2, 3).expect("a valid routing")
}

fn broken() -> Vec<(&'static str, Permutation)> {
    let mut out = Vec::new();
    let mut p = valid();
    p.pair_rows[1] = 99;
    out.push(("pair_rows out of range", p));
    let mut p = valid();
    p.row_pairs[0] = 77;
    out.push(("row_pairs out of range", p));
    let mut p = valid();
    p.row_pairs.swap(0, 1);
    out.push(("not inverse", p));
    let mut p = valid();
    p.pair_rows.pop();
    out.push(("pair_rows too short", p));
    let mut p = valid();
    p.expert_offsets = vec![0, 3, 2, 4];
    out.push(("offsets not monotone", p));
    let mut p = valid();
    p.expert_offsets = vec![0, 1, 2, 9];
    out.push(("offsets past the rows", p));
    let mut p = valid();
    p.expert_offsets.clear();
    out.push(("no offsets", p));
    let mut p = valid();
    p.slots_per_token = 0;
    out.push(("zero slots with rows", p));
    out
}

#[test]
fn malformed_permutations_are_errors_not_panics() {
    let h = 3;
    let hidden = vec![1.0f32; 2 * h];
    for (what, perm) in broken() {
        assert!(perm.validate().is_err(), "{what}: validate accepted it");
        let rows = perm.row_pairs.len();
        let mut out = vec![0.0f32; rows * h];
        assert!(gather_f32(TensorView::F32(&hidden), h, &perm, &mut out).is_err(), "{what}: gather_f32");
        let mut out16 = vec![bf16::ZERO; rows * h];
        assert!(gather_bf16(TensorView::F32(&hidden), h, &perm, &mut out16).is_err(), "{what}: gather_bf16");
        let expert_rows = vec![1.0f32; rows * h];
        let mut combined = vec![0.0f32; perm.tokens * h];
        assert!(combine(&expert_rows, h, &perm, &mut combined).is_err(), "{what}: combine");
    }
    assert_eq!(Permutation { expert_offsets: vec![], ..valid() }.n_slots(), 0);
    valid().validate().expect("what permute makes is valid");
}

#[test]
fn grouped_experts_rejects_a_malformed_permutation() {
    let cfg = MoeConfig {
        hidden_size: 4,
        moe_intermediate_size: 2,
        n_shared_experts: 0,
        router: RouterConfig { n_experts: 3, top_k: 2, ..RouterConfig::dots1() },
    };
    let weights = MoeWeights::synthetic(&cfg, Dtype::F32, 1).expect("synthetic layer");
    for (what, perm) in broken() {
        let rows = perm.row_pairs.len();
        let x = vec![0.5f32; rows * 4];
        let w = vec![1.0f32; rows];
        let result = grouped_experts(&weights, TensorView::F32(&x), &perm, &w, Precision::F32, Isa::Portable);
        assert!(result.is_err(), "{what}: grouped_experts accepted it");
    }
}

#[test]
fn router_logits_size_overflow_is_an_error() {
    let empty = TensorView::F32(&[]);
    let result = router_logits(empty, 1 << 40, 0, empty, 1 << 30);
    assert!(matches!(result, Err(MoeError::Overflow(_))), "{result:?}");
    let result = router_logits(empty, usize::MAX, 0, empty, 2);
    assert!(matches!(result, Err(MoeError::Overflow(_))), "{result:?}");
    assert_eq!(router_logits(empty, 3, 0, empty, 2).expect("zero-width router").len(), 6);
}
