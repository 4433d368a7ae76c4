//! CPU GEMM benchmarks: decode GEMV (m = 1) streaming weights from DRAM, and the expert
//! GEMM at prefill (m = 8..64), for every dtype combination, with `par_gemm_nt`.
//!
//! Weights come from a pool of matrices eight times the 32 MB L3, visited in turn, so
//! every call reads its weights from DRAM. Besides criterion's figures, a summary table
//! prints GB/s and GFLOP/s next to this machine's own ceilings, measured in the same run:
//! copy (bytes read + written) and read bandwidth of a 256 MiB buffer, and register-only
//! loops of VDPBF16PS / FMA on every rayon thread. The summary makes several passes over
//! everything and prints the median and the best sample of each figure: on a shared
//! machine the best is the uncontended one.
//!
//! `cargo bench --bench gemm` (criterion and the summary), `cargo bench --bench gemm --
//! summary [passes=N]` (the summary only, N passes, default 3).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use dots_moe::cpu::{Isa, par_gemm_nt};
use dots_moe::{Dtype, TensorData};
use half::bf16;
use rayon::prelude::*;

/// Weight pool size: far above the 32 MB L3.
const POOL_BYTES: usize = 256 << 20;
const K: usize = 4096;

/// A pool of weight matrices `[n, K]` of `dtype` totalling about `POOL_BYTES`.
struct Pool {
    mats: Vec<TensorData>,
    next: usize,
}

impl Pool {
    fn new(dtype: Dtype, n: usize) -> Self {
        let count = (POOL_BYTES / (n * K * dtype.size())).max(2);
        let mats = (0..count).map(|s| filled(dtype, n * K, s as u32 + 1)).collect();
        Pool { mats, next: 0 }
    }

    fn next(&mut self) -> &TensorData {
        self.next = (self.next + 1) % self.mats.len();
        &self.mats[self.next]
    }
}

/// Non-trivial values in [-1, 1) from a cheap hash (random data, never zeros).
fn filled(dtype: Dtype, len: usize, seed: u32) -> TensorData {
    let val = |i: usize| {
        let h = (i as u32 ^ seed.wrapping_mul(0x9E37_79B9)).wrapping_mul(0x85EB_CA6B);
        ((h >> 8) as f32 / (1 << 23) as f32) - 1.0
    };
    match dtype {
        Dtype::F32 => TensorData::F32((0..len).into_par_iter().map(val).collect()),
        Dtype::Bf16 => TensorData::Bf16((0..len).into_par_iter().map(|i| bf16::from_f32(val(i))).collect()),
    }
}

/// One benchmark case: `a [m, K]` times a pool of `w [n, K]`.
struct Case {
    a_dtype: Dtype,
    w_dtype: Dtype,
    m: usize,
    n: usize,
}

impl Case {
    fn name(&self) -> String {
        let d = |d: Dtype| if d == Dtype::Bf16 { "bf16" } else { "f32" };
        format!("a{}_w{}/n{}_k{K}", d(self.a_dtype), d(self.w_dtype), self.n)
    }
    fn bytes(&self) -> usize {
        self.n * K * self.w_dtype.size() + self.m * K * self.a_dtype.size() + self.m * self.n * 4
    }
    fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * K) as f64
    }
}

const CASES: &[(Dtype, Dtype, &[usize], usize)] = &[
    (Dtype::Bf16, Dtype::Bf16, &[1], 2816),
    (Dtype::Bf16, Dtype::Bf16, &[1, 8, 16, 32, 64], 4096),
    (Dtype::F32, Dtype::Bf16, &[1, 8, 64], 4096),
    (Dtype::F32, Dtype::F32, &[1, 8, 64], 4096),
];

fn cases() -> impl Iterator<Item = Case> {
    CASES.iter().flat_map(|&(a_dtype, w_dtype, ms, n)| ms.iter().map(move |&m| Case { a_dtype, w_dtype, m, n }))
}

fn bench_gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("par_gemm_nt");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for case in cases() {
        let mut pool = Pool::new(case.w_dtype, case.n);
        let a = filled(case.a_dtype, case.m * K, 99);
        let mut out = vec![0.0f32; case.m * case.n];
        group.throughput(Throughput::BytesDecimal(case.bytes() as u64));
        group.bench_function(BenchmarkId::new(case.name(), format!("m{}", case.m)), |b| {
            b.iter(|| {
                let w = pool.next();
                par_gemm_nt(a.view(), w.view(), case.m, case.n, K, &mut out, case.n);
                black_box(&out);
            })
        });
    }
    group.finish();
}

/// Median and minimum seconds of `runs` calls of `f`, after two warm-up calls. On a
/// shared machine the minimum is the uncontended figure, the median the typical one.
fn time_secs(runs: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[runs / 2], t[0])
}

/// Rates `amount / seconds` for (median, best).
fn rates(amount: f64, (median, best): (f64, f64)) -> (f64, f64) {
    (amount / median, amount / best)
}

/// Copy and read bandwidth of a 256 MiB buffer split over rayon's threads, in bytes
/// per second, one sample per run: copy counts bytes read + written, read the bytes read.
fn bandwidth_samples(copy: &mut Vec<f64>, read: &mut Vec<f64>) {
    const RUNS: usize = 8;
    let len = (256 << 20) / 8;
    let src: Vec<u64> = (0..len as u64).into_par_iter().collect();
    let mut dst = vec![0u64; len];
    let chunk = len.div_ceil(rayon::current_num_threads());
    let bytes = (len * 8) as f64;
    for run in 0..=RUNS {
        let start = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        black_box(&dst);
        let copy_secs = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let x = src.par_chunks(chunk).map(|c| c.iter().fold(0, |x, &y| x ^ y)).reduce(|| 0, |x, y| x ^ y);
        black_box(x);
        let read_secs = start.elapsed().as_secs_f64();
        if run > 0 {
            // Run 0 is the warm-up (it also faults `dst` in).
            copy.push(2.0 * bytes / copy_secs);
            read.push(bytes / read_secs);
        }
    }
}

/// Register-only loop: `chains` independent accumulators, `iters` steps of VDPBF16PS (or
/// f32 FMA), on every rayon thread at once. Returns FLOP/s.
#[cfg(target_arch = "x86_64")]
fn peak_flops(bf16_dot: bool) -> f64 {
    use std::arch::x86_64::*;
    const CHAINS: usize = 24;
    const ITERS: usize = 1 << 22;

    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
    fn dot_loop() -> f32 {
        let x = _mm512_set1_ps(1e-3);
        // SAFETY: same size, every bit pattern valid in both types.
        let xb = unsafe { std::mem::transmute::<__m512, __m512bh>(x) };
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..ITERS {
            for a in acc.iter_mut() {
                *a = _mm512_dpbf16_ps(*a, xb, xb);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    #[target_feature(enable = "avx512f")]
    fn fma_loop() -> f32 {
        let x = _mm512_set1_ps(1e-3);
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..ITERS {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(x, x, *a);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    let isa = if bf16_dot { Isa::Avx512Bf16 } else { Isa::Avx512 };
    if !isa.is_supported() {
        return f64::NAN;
    }
    let threads = rayon::current_num_threads();
    let (_, best) = time_secs(5, || {
        let s: f32 = (0..threads)
            .into_par_iter()
            // SAFETY: the ISA the loop needs was checked above.
            .map(|_| unsafe { if bf16_dot { dot_loop() } else { fma_loop() } })
            .sum();
        black_box(s);
    });
    let flops_per_op = if bf16_dot { 64.0 } else { 32.0 };
    (threads * CHAINS * ITERS) as f64 * flops_per_op / best
}

#[cfg(not(target_arch = "x86_64"))]
fn peak_flops(_bf16_dot: bool) -> f64 {
    f64::NAN
}

/// Median and minimum of time samples (the minimum is the best).
fn median_best(mut t: Vec<f64>) -> (f64, f64) {
    t.sort_by(f64::total_cmp);
    (t[t.len() / 2], t[0])
}

/// Median and maximum of rate samples (the maximum is the best).
fn median_max(mut r: Vec<f64>) -> (f64, f64) {
    r.sort_by(f64::total_cmp);
    (r[r.len() / 2], r[r.len() - 1])
}

/// The summary table: every case against the ceilings measured in the same run. On a
/// shared machine, `passes` rounds over all cases (and the ceilings) spread the samples
/// in time; the medians and bests are over all of them.
fn summary(passes: usize) {
    let threads = rayon::current_num_threads();
    let mut pools: Vec<((Dtype, usize), Pool)> = Vec::new();
    let all: Vec<Case> = cases().collect();
    let actives: Vec<TensorData> = all.iter().map(|c| filled(c.a_dtype, c.m * K, 99)).collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); all.len()];
    let (mut copy_s, mut read_s, mut peak_dot, mut peak_fma) = (Vec::new(), Vec::new(), 0.0f64, 0.0f64);
    for _ in 0..passes {
        bandwidth_samples(&mut copy_s, &mut read_s);
        peak_dot = peak_dot.max(peak_flops(true));
        peak_fma = peak_fma.max(peak_flops(false));
        for ((case, a), t) in all.iter().zip(&actives).zip(&mut samples) {
            let key = (case.w_dtype, case.n);
            if !pools.iter().any(|(k, _)| *k == key) {
                pools.push((key, Pool::new(case.w_dtype, case.n)));
            }
            let pool = &mut pools.iter_mut().find(|(k, _)| *k == key).expect("pool built above").1;
            let mut out = vec![0.0f32; case.m * case.n];
            let runs = 2 * pool.mats.len() + 1;
            let mut f = || {
                let w = pool.next();
                par_gemm_nt(a.view(), w.view(), case.m, case.n, K, &mut out, case.n);
                black_box(&out);
            };
            f();
            for _ in 0..runs {
                let start = Instant::now();
                f();
                t.push(start.elapsed().as_secs_f64());
            }
        }
    }
    let (copy, read) = (median_max(copy_s), median_max(read_s));
    println!(
        "\n== gemm summary: {:?}, {threads} threads, k = {K}, {passes} passes; figures median / best ==",
        Isa::detect()
    );
    println!(
        "copy bandwidth (read + write): {:.1} / {:.1} GB/s; read bandwidth: {:.1} / {:.1} GB/s",
        copy.0 / 1e9,
        copy.1 / 1e9,
        read.0 / 1e9,
        read.1 / 1e9
    );
    println!(
        "peaks (register-only loops, best): VDPBF16PS {:.1} GFLOP/s, f32 FMA {:.1} GFLOP/s",
        peak_dot / 1e9,
        peak_fma / 1e9
    );
    println!(
        "{:<24} {:>3} {:>17} {:>13} {:>13} {:>13} {:>13}",
        "case", "m", "time (us)", "GB/s", "of copy", "GFLOP/s", "of peak"
    );
    for (case, t) in all.iter().zip(samples) {
        let t = median_best(t);
        let peak = if case.a_dtype == Dtype::Bf16 && case.w_dtype == Dtype::Bf16 { peak_dot } else { peak_fma };
        let (gbs, gflops) = (rates(case.bytes() as f64, t), rates(case.flops(), t));
        let pct = |x: f64, of: f64| 100.0 * x / of;
        println!(
            "{:<24} {:>3} {:>8.0} /{:>7.0} {:>6.1} /{:>5.1} {:>5.0}% /{:>4.0}% {:>6.1} /{:>5.1} {:>5.0}% /{:>4.0}%",
            case.name(),
            case.m,
            t.0 * 1e6,
            t.1 * 1e6,
            gbs.0 / 1e9,
            gbs.1 / 1e9,
            pct(gbs.0, copy.0),
            pct(gbs.1, copy.1),
            gflops.0 / 1e9,
            gflops.1 / 1e9,
            pct(gflops.0, peak),
            pct(gflops.1, peak)
        );
    }
}

fn main() {
    let summary_only = std::env::args().any(|a| a == "summary");
    let passes = std::env::args().find_map(|a| a.strip_prefix("passes=").and_then(|p| p.parse().ok())).unwrap_or(3);
    if !summary_only {
        let mut c = Criterion::default().configure_from_args();
        bench_gemm(&mut c);
        c.final_summary();
    }
    summary(passes);
}
