//! The rate of one `par_gemm_nt` shape: `a [m, k]` bf16 times `w [n, k]` bf16, the best of
//! several calls, in GFLOP/s, with the CPU kernels `Isa::detect` picks (force another with
//! `DOTS_MOE_CPU_ISA`, one thread with `RAYON_NUM_THREADS=1`).
//!
//! `cargo run --release --example gemm_rate -- M N K [POOL]`: POOL weight matrices are
//! visited in turn (1 by default: `w` stays in cache; enough of them to exceed the last
//! cache level streams `w` from memory).

use std::time::Instant;

use dots_moe::cpu::{Isa, par_gemm_nt};
use dots_moe::tensor::TensorView;
use half::bf16;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().expect("M N K [POOL]: integers")).collect();
    let [m, n, k] = [0, 1, 2].map(|i| *args.get(i).expect("usage: gemm_rate M N K [POOL]"));
    let pool = args.get(3).copied().unwrap_or(1).max(1);
    let value = |i: usize, seed: usize| bf16::from_f32((((i + seed) * 104_729) % 1000) as f32 / 1000.0 - 0.5);
    let a: Vec<bf16> = (0..m * k).map(|i| value(i, 7)).collect();
    let ws: Vec<Vec<bf16>> = (0..pool).map(|p| (0..n * k).map(|i| value(i, p)).collect()).collect();
    let mut out = vec![0.0f32; m * n];
    let mut best = f64::MAX;
    for call in 0..20.max(2 * pool) {
        let started = Instant::now();
        par_gemm_nt(TensorView::Bf16(&a), TensorView::Bf16(&ws[call % pool]), m, n, k, &mut out, n);
        best = best.min(started.elapsed().as_secs_f64());
    }
    let rate = 2.0 * (m * n * k) as f64 / best / 1e9;
    println!("{:?}, {} threads: m {m} n {n} k {k}: {rate:.1} GFLOP/s", Isa::detect(), rayon::current_num_threads());
}
