//! Criterion benches of the CPU MoE contract at real dots.llm1 shapes (H 4096, E 128,
//! I 1408, top-6, 2 shared experts), seeded synthetic bf16 weights, uniform random
//! inputs: route, permute, the grouped expert GEMM and the whole layer, for
//! T in {1, 16, 128, 512}.
//!
//! `cargo bench --bench moe` (all) or `cargo bench --bench moe -- layer/16` (one).

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;

use dots_moe::config::MoeConfig;
use dots_moe::moe::{self, MoeLayer, MoeWeights, Precision};
use dots_moe::roofline::{layer_cost, random_hidden};
use dots_moe::tensor::{Dtype, TensorView};

const TOKENS: [usize; 4] = [1, 16, 128, 512];

fn benches(c: &mut Criterion) {
    let cfg = MoeConfig::dots1();
    let h = cfg.hidden_size;
    let layer = MoeLayer::new(MoeWeights::synthetic(&cfg, Dtype::Bf16, 1).expect("the dots.llm1 shape is valid"));
    let weights = layer.weights();

    let mut group = c.benchmark_group("route");
    group.sample_size(20).measurement_time(Duration::from_secs(3));
    for &t in &TOKENS {
        let x = random_hidden(t, h, t as u64);
        group.throughput(Throughput::Elements(t as u64));
        group.bench_with_input(BenchmarkId::from_parameter(t), &x, |b, x| {
            b.iter(|| layer.route(TensorView::F32(x), t).expect("finite inputs"))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("permute");
    group.sample_size(20).measurement_time(Duration::from_secs(2));
    for &t in &TOKENS {
        let x = random_hidden(t, h, t as u64);
        let routing = layer.route(TensorView::F32(&x), t).expect("finite inputs");
        let slots = cfg.slots_per_token();
        let (slot_ids, _) = routing.with_shared_slots(cfg.router.n_experts, cfg.n_shared_experts);
        group.throughput(Throughput::Elements(t as u64));
        group.bench_with_input(BenchmarkId::from_parameter(t), &slot_ids, |b, ids| {
            b.iter(|| {
                let p = moe::permute(ids, t, slots, cfg.n_slots()).expect("valid ids");
                let mut gathered = vec![bf16::ZERO; p.rows() * h];
                moe::gather_bf16(TensorView::F32(&x), h, &p, &mut gathered).expect("shapes match");
                gathered
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("expert_gemm");
    group.sample_size(10).measurement_time(Duration::from_secs(8));
    for &t in &TOKENS {
        let x = random_hidden(t, h, t as u64);
        let trace = layer.forward_trace(TensorView::F32(&x), t).expect("finite inputs");
        let perm = trace.permutation;
        let row_weights: Vec<f32> = perm.row_pairs.iter().map(|&p| trace.slot_weights[p as usize]).collect();
        let mut gathered = vec![bf16::ZERO; perm.rows() * h];
        moe::gather_bf16(TensorView::F32(&x), h, &perm, &mut gathered).expect("shapes match");
        let cost = layer_cost(&layer, &trace.routing);
        group.throughput(Throughput::Bytes(cost.bytes as u64));
        group.bench_with_input(BenchmarkId::from_parameter(t), &gathered, |b, g| {
            b.iter(|| {
                moe::grouped_experts(weights, TensorView::Bf16(g), &perm, &row_weights, Precision::Bf16, layer.isa())
                    .expect("shapes match")
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("layer");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    for &t in &TOKENS {
        let x = random_hidden(t, h, t as u64);
        let routing = layer.route(TensorView::F32(&x), t).expect("finite inputs");
        group.throughput(Throughput::Bytes(layer_cost(&layer, &routing).bytes as u64));
        group.bench_with_input(BenchmarkId::from_parameter(t), &x, |b, x| {
            b.iter(|| layer.forward(TensorView::F32(x), t).expect("finite inputs"))
        });
    }
    group.finish();
}

criterion_group!(moe_benches, benches);
criterion_main!(moe_benches);
