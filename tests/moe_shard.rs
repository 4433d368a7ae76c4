//! Expert parallelism in the layer: a layer that holds a subset of the expert slots
//! ([`ExpertShard`]) returns its partial output, and the partials of shards that hold
//! every slot once sum to the whole layer.

use dots_moe::MoeError;
use dots_moe::config::{MoeConfig, RouterConfig};
use dots_moe::moe::{ExpertShard, MoeLayer, MoeLayerBuilder, MoeWeights, Precision, Routing};
use dots_moe::tensor::{Dtype, TensorView};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn cfg() -> MoeConfig {
    MoeConfig {
        hidden_size: 48,
        moe_intermediate_size: 24,
        n_shared_experts: 2,
        router: RouterConfig { n_experts: 16, top_k: 4, n_group: 4, topk_group: 2, ..RouterConfig::dots1() },
    }
}

fn hidden(tokens: usize, h: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..tokens * h).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn layer(weights: &MoeWeights, shard: ExpertShard, precision: Precision) -> MoeLayer {
    let mut layer = MoeLayer::new(weights.select(shard).unwrap());
    layer.set_precision(precision);
    layer
}

/// The expected partial of `shard`, from the whole layer's trace: each token's weighted
/// rows of the held slots, summed in slot order (a skipped slot adds nothing, exactly).
fn partial_from_trace(full: &MoeLayer, x: &[f32], tokens: usize, shard: &ExpertShard) -> Vec<f32> {
    let cfg = full.config();
    let h = cfg.hidden_size;
    let trace = full.forward_trace(TensorView::F32(x), tokens).unwrap();
    let slots = cfg.slots_per_token();
    let mut out = vec![0.0f32; tokens * h];
    for t in 0..tokens {
        for j in 0..slots {
            let pair = t * slots + j;
            if !shard.holds(cfg, trace.slot_ids[pair] as usize) {
                continue;
            }
            let row = trace.permutation.pair_rows[pair] as usize;
            for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(&trace.weighted_rows[row * h..(row + 1) * h]) {
                *o += v;
            }
        }
    }
    out
}

#[test]
fn partials_are_exactly_the_held_slots_and_sum_to_the_layer() {
    let cfg = cfg();
    let (h, e) = (cfg.hidden_size, cfg.router.n_experts);
    for precision in [Precision::F32, Precision::Bf16] {
        let weights = MoeWeights::synthetic(&cfg, Dtype::Bf16, 7).unwrap();
        let mut full = MoeLayer::new(weights.clone());
        full.set_precision(precision);
        for tokens in [1, 9, 64] {
            let x = hidden(tokens, h, tokens as u64);
            let whole = full.forward(TensorView::F32(&x), tokens).unwrap();
            // Uneven splits, an empty one, the shared experts on one shard only.
            for bounds in [vec![0, 8, 16], vec![0, 3, 3, 11, 16], vec![0, 1, 2, 3, 16], vec![0, 16, 16]] {
                let mut sum = vec![0.0f32; tokens * h];
                for (n, pair) in bounds.windows(2).enumerate() {
                    let shard = ExpertShard { routed: pair[0]..pair[1], shared: n == 0 };
                    let part = layer(&weights, shard.clone(), precision);
                    let got = part.forward(TensorView::F32(&x), tokens).unwrap();
                    // Bit for bit the held slots' rows of the whole layer.
                    let expected = partial_from_trace(&full, &x, tokens, &shard);
                    assert_eq!(got, expected, "{precision:?} T={tokens} shard {shard:?}");
                    for (s, v) in sum.iter_mut().zip(&got) {
                        *s += v;
                    }
                }
                for (i, (a, b)) in sum.iter().zip(&whole).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{precision:?} T={tokens} {bounds:?} [{i}]: {a} vs {b}"
                    );
                }
            }
            // A shard holding every slot is the layer.
            let all = layer(&weights, ExpertShard { routed: 0..e, shared: true }, precision);
            assert_eq!(all.forward(TensorView::F32(&x), tokens).unwrap(), whole);
        }
    }
}

#[test]
fn a_shard_that_no_token_chose_returns_zeros() {
    let cfg = cfg();
    let weights = MoeWeights::synthetic(&cfg, Dtype::Bf16, 3).unwrap();
    let full = MoeLayer::new(weights.clone());
    let x = hidden(5, cfg.hidden_size, 11);
    let routing = full.route(TensorView::F32(&x), 5).unwrap();
    let unused = (0..cfg.router.n_experts).find(|id| !routing.expert_ids.contains(&(*id as u32))).unwrap();
    let part = layer(&weights, ExpertShard { routed: unused..unused + 1, shared: false }, Precision::Bf16);
    assert!(part.forward(TensorView::F32(&x), 5).unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn forward_routed_matches_forward_and_takes_any_k() {
    let cfg = cfg();
    let weights = MoeWeights::synthetic(&cfg, Dtype::Bf16, 5).unwrap();
    let full = MoeLayer::new(weights.clone());
    let tokens = 6;
    let x = hidden(tokens, cfg.hidden_size, 2);
    let routing = full.route(TensorView::F32(&x), tokens).unwrap();
    assert_eq!(
        full.forward_routed(TensorView::F32(&x), tokens, &routing).unwrap(),
        full.forward(TensorView::F32(&x), tokens).unwrap()
    );
    // A routing of k = 1 (one expert with weight 1) on a layer with no shared experts is
    // that expert's MLP; two shards of it sum to it.
    let no_shared = MoeConfig { n_shared_experts: 0, ..cfg.clone() };
    let w = MoeWeights::synthetic(&no_shared, Dtype::Bf16, 5).unwrap();
    let single = Routing { tokens, top_k: 1, expert_ids: vec![3; tokens], weights: vec![1.0; tokens] };
    let whole = MoeLayer::new(w.clone()).forward_routed(TensorView::F32(&x), tokens, &single).unwrap();
    let low = layer(&w, ExpertShard { routed: 0..4, shared: false }, Precision::Bf16);
    let high = layer(&w, ExpertShard { routed: 4..16, shared: false }, Precision::Bf16);
    assert_eq!(low.forward_routed(TensorView::F32(&x), tokens, &single).unwrap(), whole);
    assert!(high.forward_routed(TensorView::F32(&x), tokens, &single).unwrap().iter().all(|&v| v == 0.0));
    // A malformed routing is a typed error.
    let bad = Routing { tokens, top_k: 1, expert_ids: vec![16; tokens], weights: vec![1.0; tokens] };
    assert!(matches!(full.forward_routed(TensorView::F32(&x), tokens, &bad), Err(MoeError::BadRouting { .. })));
    let short = Routing { tokens: 2, top_k: 1, expert_ids: vec![0; 2], weights: vec![1.0; 2] };
    assert!(matches!(full.forward_routed(TensorView::F32(&x), tokens, &short), Err(MoeError::Shape { .. })));
}

#[test]
fn the_builder_takes_only_the_shards_weights() {
    let cfg = cfg();
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let weights = MoeWeights::synthetic(&cfg, Dtype::Bf16, 9).unwrap();
    let shard = ExpertShard { routed: 4..10, shared: false };
    let mut b = MoeLayerBuilder::with_shard(cfg.clone(), Dtype::Bf16, shard.clone()).unwrap();
    b.router(weights.router_gate(), weights.router_bias().map(|b| TensorView::F32(b))).unwrap();
    let expert = |e: usize| {
        let gu = weights.slot_gate_up(e);
        (gu.slice(0..i * h), gu.slice(i * h..2 * i * h), weights.slot_down(e))
    };
    // An expert outside the shard, and the shared experts, are refused by name.
    let (g, u, d) = expert(3);
    let err = b.expert(3, g, u, d).unwrap_err().to_string();
    assert!(err.contains("expert 3") && err.contains("4..10"), "{err}");
    let shared_gate = vec![0.0f32; 2 * i * h];
    let shared_down = vec![0.0f32; h * 2 * i];
    let err = b
        .shared(TensorView::F32(&shared_gate), TensorView::F32(&shared_gate), TensorView::F32(&shared_down))
        .unwrap_err();
    assert!(err.to_string().contains("leaves them out"), "{err}");
    for e in 4..9 {
        let (g, u, d) = expert(e);
        b.expert(e, g, u, d).unwrap();
    }
    // Expert 9 missing.
    let b2 = {
        let mut b2 = MoeLayerBuilder::with_shard(cfg.clone(), Dtype::Bf16, shard.clone()).unwrap();
        b2.router(weights.router_gate(), weights.router_bias().map(|b| TensorView::F32(b))).unwrap();
        b2
    };
    assert!(b2.build().unwrap_err().to_string().contains("expert 4"));
    let (g, u, d) = expert(9);
    b.expert(9, g, u, d).unwrap();
    let built = b.build().unwrap();
    assert_eq!(built.weights().gate_up().len(), 6 * 2 * i * h);
    let x = hidden(7, h, 4);
    let selected = MoeLayer::new(weights.select(shard).unwrap());
    assert_eq!(built.forward(TensorView::F32(&x), 7).unwrap(), selected.forward(TensorView::F32(&x), 7).unwrap());
    // A range outside 0..E, and selecting slots a shard lacks, are errors.
    assert!(
        MoeLayerBuilder::with_shard(cfg.clone(), Dtype::Bf16, ExpertShard { routed: 10..17, shared: true }).is_err()
    );
    let part = weights.select(ExpertShard { routed: 0..4, shared: false }).unwrap();
    assert!(part.select(ExpertShard { routed: 0..5, shared: false }).is_err());
    assert!(part.select(ExpertShard { routed: 0..4, shared: true }).is_err());
}
