//! Criterion benches of the CUDA MoE layer and its expert GEMM kernels at the real
//! dots.llm1 shape (H 4096, I 1408, E 128, top-6, 2 shared; 4.5 GB of seeded synthetic bf16
//! weights, uniform random inputs), timed on the device with CUDA events (`iter_custom`):
//!
//! - `cuda_layer/T`: route, permute, gather, expert GEMMs, combine (default options);
//! - `cuda_layer_graph/T`: the same replayed from a CUDA graph (T <= 64: decode);
//! - `cuda_layer_invariant/T`: the batch-invariant mode;
//! - `cuda_gemm_up/T`, `cuda_gemm_down/T`: GEMM 1 (+ schedule) and GEMM 2 alone;
//!
//! for T in 1, 16, 64, 256, 1024, 4096, 16384 (`DOTS_MOE_BENCH_TOKENS=1,64` to choose).
//! After criterion, a table: median time of the layer, achieved GB/s and TFLOP/s of the
//! bytes and FLOPs it must move (`dots_moe::roofline::layer_cost`), the floor from the H200's
//! ceilings (`dots_moe::roofline::H200`: 4.3 TB/s, 790 TFLOP/s) and floor / time.
//!
//! Without a GPU it prints why and measures nothing.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use dots_moe::config::MoeConfig;
use dots_moe::cuda::GpuContext;
use dots_moe::cuda::expert_gemm::{ExpertGemm, GemmOptions};
use dots_moe::cuda::graph::device_time_us;
use dots_moe::cuda::layer::CudaMoeLayer;
use dots_moe::moe::{MoeLayer, MoeWeights};
use dots_moe::roofline::{BenchRow, H200, layer_cost, random_hidden};
use dots_moe::tensor::{Dtype, TensorView};

const TOKENS: [usize; 7] = [1, 16, 64, 256, 1024, 4096, 16384];

fn tokens() -> Vec<usize> {
    match std::env::var("DOTS_MOE_BENCH_TOKENS") {
        Ok(list) => list.split(',').filter_map(|t| t.trim().parse().ok()).collect(),
        Err(_) => TOKENS.to_vec(),
    }
}

/// Device time of `iters` calls of `f`, between two CUDA events on the stream.
fn device_time(gpu: &GpuContext, iters: u64, mut f: impl FnMut()) -> Duration {
    let us = device_time_us(gpu, || {
        (0..iters).for_each(|_| f());
        Ok(())
    })
    .expect("CUDA events");
    Duration::from_secs_f64(us / 1e6)
}

/// Median device time of one call of `f` over `reps` event-timed calls (after a warm-up).
fn median_device_time(gpu: &GpuContext, reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut times: Vec<Duration> = (0..reps).map(|_| device_time(gpu, 1, &mut f)).collect();
    times.sort();
    times[times.len() / 2]
}

fn benches(c: &mut Criterion) {
    let gpu = match GpuContext::new(0) {
        Ok(gpu) => gpu,
        Err(why) => {
            eprintln!("cuda benches skipped: {why}");
            return;
        }
    };
    let cfg = MoeConfig::dots1();
    let h = cfg.hidden_size;
    eprintln!("{}: generating and uploading the 4.5 GB dots.llm1 layer...", gpu.info().name);
    let layer = MoeLayer::new(MoeWeights::synthetic(&cfg, Dtype::Bf16, 1).expect("the dots.llm1 shape is valid"));
    let default = CudaMoeLayer::with_default_options(&gpu, &layer).expect("CUDA layer");
    let invariant =
        CudaMoeLayer::new(&gpu, &layer, GemmOptions::for_device(&gpu).batch_invariant()).expect("CUDA layer");
    let mut rows: Vec<BenchRow> = Vec::new();

    for t in tokens() {
        let x = random_hidden(t, h, t as u64);
        let cost = layer_cost(&layer, &layer.route(TensorView::F32(&x), t).expect("finite inputs"));
        let mut group = c.benchmark_group(format!("cuda_t{t}"));
        group.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
        group.throughput(Throughput::Bytes(cost.bytes as u64));

        let mut ws = default.workspace(t, Dtype::F32).expect("workspace");
        ws.set_input(TensorView::F32(&x)).expect("input");
        default.enqueue(&mut ws).expect("enqueue");
        ws.read_output().expect("a valid run");
        group.bench_function(BenchmarkId::new("cuda_layer", t), |b| {
            b.iter_custom(|iters| device_time(&gpu, iters, || default.enqueue(&mut ws).expect("enqueue")))
        });
        let median = median_device_time(&gpu, 20, || default.enqueue(&mut ws).expect("enqueue"));
        rows.push(BenchRow::new("cuda", t, median, &cost, &H200));

        // GEMM 1 (with its schedule) and GEMM 2 alone, on the routed and gathered rows.
        let gemm = ExpertGemm::new(&gpu, default.options()).expect("kernels");
        let weights = default.weights();
        group.bench_function(BenchmarkId::new("cuda_gemm_up", t), |b| {
            b.iter_custom(|iters| {
                device_time(&gpu, iters, || {
                    gemm.schedule(&ws.routing.expert_offsets, &mut ws.gemm).expect("schedule");
                    gemm.up(weights, &ws.x, &mut ws.gemm).expect("GEMM 1");
                })
            })
        });
        group.bench_function(BenchmarkId::new("cuda_gemm_down", t), |b| {
            b.iter_custom(|iters| {
                device_time(&gpu, iters, || {
                    gemm.down(weights, &ws.routing.row_weights, &ws.gemm, &mut ws.expert_rows).expect("GEMM 2")
                })
            })
        });

        if t <= 64 {
            let ws = default.workspace(t, Dtype::F32).expect("workspace");
            let mut graph = default.capture(ws).expect("graph capture");
            graph.forward(TensorView::F32(&x)).expect("a valid replay");
            group.bench_function(BenchmarkId::new("cuda_layer_graph", t), |b| {
                b.iter_custom(|iters| device_time(&gpu, iters, || graph.replay().expect("replay")))
            });
            let median = median_device_time(&gpu, 20, || graph.replay().expect("replay"));
            rows.push(BenchRow::new("cuda-graph", t, median, &cost, &H200));
        }

        let mut ws = invariant.workspace(t, Dtype::F32).expect("workspace");
        ws.set_input(TensorView::F32(&x)).expect("input");
        group.bench_function(BenchmarkId::new("cuda_layer_invariant", t), |b| {
            b.iter_custom(|iters| device_time(&gpu, iters, || invariant.enqueue(&mut ws).expect("enqueue")))
        });
        let median = median_device_time(&gpu, 10, || invariant.enqueue(&mut ws).expect("enqueue"));
        rows.push(BenchRow::new("cuda-invariant", t, median, &cost, &H200));
        group.finish();
    }

    println!(
        "\n{} ({}), dots.llm1 MoE layer, bf16 weights, uniform routing, CUDA events:",
        gpu.info().name,
        gpu.arch()
    );
    println!(
        "{:>15} {:>6} {:>11} {:>9} {:>9} {:>10} {:>11}",
        "path", "T", "median us", "GB/s", "TFLOP/s", "floor us", "floor/time"
    );
    for r in &rows {
        println!(
            "{:>15} {:>6} {:>11.1} {:>9.0} {:>9.1} {:>10.1} {:>11.2}",
            r.backend, r.tokens, r.median_us, r.gb_per_s, r.tflop_per_s, r.floor_us, r.floor_ratio
        );
    }
}

criterion_group!(cuda, benches);
criterion_main!(cuda);
