//! CPU GEMM benchmarks: decode GEMV (m = 1) streaming weights from DRAM, and the expert
//! GEMM at prefill (m = 8..64), for every dtype combination, with `par_gemm_nt`.
//!
//! Weights come from a pool of matrices eight times the 32 MB L3, visited in turn, so
//! every call reads its weights from DRAM. Besides criterion's figures, a summary table
//! prints GB/s and GFLOP/s next to this machine's own ceilings measured in the same run:
//! copy (bytes read + written) and read bandwidth of a 256 MiB buffer, and register-only
//! loops of VDPBF16PS / FMA on every rayon thread. Each kernel sample is paired with
//! ceiling samples taken right after it, and the table gives the median of the paired
//! ratios, which stays meaningful on a machine shared with other jobs.
//!
//! `cargo bench --bench gemm` (criterion and the summary), `cargo bench --bench gemm --
//! summary` (the summary only); `GEMM_BENCH_PASSES=N` sets the summary's passes (3).

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

/// Register-only loops of `CHAINS` independent accumulators: the arithmetic ceiling.
#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    /// Independent accumulator chains (enough to cover the latency).
    pub const CHAINS: usize = 24;

    /// `iters` steps of VDPBF16PS on every chain (64 FLOP each).
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
    pub fn dot_loop(iters: usize) -> f32 {
        // SAFETY: same size, every bit pattern valid in both types.
        let x = unsafe { std::mem::transmute::<__m512, __m512bh>(_mm512_set1_ps(1e-3)) };
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_dpbf16_ps(*a, x, x);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    /// `iters` steps of f32 FMA on every chain (32 FLOP each).
    #[target_feature(enable = "avx512f")]
    pub fn fma_loop(iters: usize) -> f32 {
        let x = _mm512_set1_ps(1e-3);
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(x, x, *a);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }
}

/// Ceiling probes run right after every kernel sample, on the same threads and for about
/// as long, so that both see the same machine: on a shared machine the ratio of a pair
/// is steadier than the ratio of two medians taken minutes apart.
struct Ceilings {
    /// Read and copied from in turn: 256 MiB, far above the L3.
    src: Vec<u64>,
    /// Copy destination.
    dst: Vec<u64>,
    /// Next offset into `src`.
    next: usize,
}

impl Ceilings {
    fn new() -> Self {
        let src: Vec<u64> = (0..(256u64 << 20) / 8).into_par_iter().collect();
        let dst = vec![1u64; (64 << 20) / 8];
        Ceilings { src, dst, next: 0 }
    }

    /// The next `bytes` of `src` (wrapping), as a window of u64.
    fn window(&mut self, bytes: usize) -> std::ops::Range<usize> {
        let len = (bytes / 8).min(self.dst.len());
        if self.next + len > self.src.len() {
            self.next = 0;
        }
        self.next += len;
        self.next - len..self.next
    }

    /// Seconds to read `bytes` from DRAM, split over rayon's threads.
    fn read_secs(&mut self, bytes: usize) -> f64 {
        let window = self.window(bytes);
        let chunk = window.len().div_ceil(rayon::current_num_threads());
        let start = Instant::now();
        let x = self.src[window].par_chunks(chunk).map(|c| c.iter().fold(0, |x, &y| x ^ y)).reduce(|| 0, |x, y| x ^ y);
        black_box(x);
        start.elapsed().as_secs_f64()
    }

    /// Seconds to copy `bytes` (read `bytes`, write `bytes`), split over rayon's threads.
    fn copy_secs(&mut self, bytes: usize) -> f64 {
        let window = self.window(bytes);
        let chunk = window.len().div_ceil(rayon::current_num_threads());
        let dst = &mut self.dst[..window.len()];
        let start = Instant::now();
        dst.par_chunks_mut(chunk).zip(self.src[window].par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        black_box(&dst);
        start.elapsed().as_secs_f64()
    }

    /// Seconds for `flops` FLOP of VDPBF16PS (or f32 FMA) in registers, on every rayon
    /// thread at once; NaN without the ISA.
    fn peak_secs(&self, flops: f64, bf16_dot: bool) -> f64 {
        #[cfg(target_arch = "x86_64")]
        {
            let isa = if bf16_dot { Isa::Avx512Bf16 } else { Isa::Avx512 };
            if !isa.is_supported() {
                return f64::NAN;
            }
            let per_step = (peak::CHAINS * if bf16_dot { 64 } else { 32 }) as f64;
            let iters = (flops / per_step / rayon::current_num_threads() as f64).ceil() as usize;
            let start = Instant::now();
            // SAFETY: the ISA each loop needs was checked above.
            let s =
                rayon::broadcast(|_| unsafe { if bf16_dot { peak::dot_loop(iters) } else { peak::fma_loop(iters) } });
            black_box(s);
            start.elapsed().as_secs_f64()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (flops, bf16_dot);
            f64::NAN
        }
    }
}

/// (median, best) of rate samples; the best is the largest.
fn median_max(mut r: Vec<f64>) -> (f64, f64) {
    r.sort_by(f64::total_cmp);
    (r[r.len() / 2], r[r.len() - 1])
}

/// Median of ratio samples.
fn median(mut r: Vec<f64>) -> f64 {
    r.sort_by(f64::total_cmp);
    r[r.len() / 2]
}

/// One kernel sample with its paired ceilings, as rates (per second).
struct Sample {
    bytes_rate: f64,
    flops_rate: f64,
    copy_rate: f64,
    read_rate: f64,
    peak_rate: f64,
}

/// The summary table. `passes` rounds over all cases spread the samples in time; every
/// kernel sample is paired with a copy, a read and a peak-loop sample of the same size
/// taken right after it (see [`Ceilings`]), and the ratios are medians over the pairs.
fn summary(passes: usize) {
    let threads = rayon::current_num_threads();
    let mut ceilings = Ceilings::new();
    let mut pools: Vec<((Dtype, usize), Pool)> = Vec::new();
    let all: Vec<Case> = cases().collect();
    let actives: Vec<TensorData> = all.iter().map(|c| filled(c.a_dtype, c.m * K, 99)).collect();
    let mut samples: Vec<Vec<Sample>> = all.iter().map(|_| Vec::new()).collect();
    for _ in 0..passes {
        for ((case, a), case_samples) in all.iter().zip(&actives).zip(&mut samples) {
            let key = (case.w_dtype, case.n);
            if !pools.iter().any(|(k, _)| *k == key) {
                pools.push((key, Pool::new(case.w_dtype, case.n)));
            }
            let pool = &mut pools.iter_mut().find(|(k, _)| *k == key).expect("pool built above").1;
            let mut out = vec![0.0f32; case.m * case.n];
            let bf16_dot = case.a_dtype == Dtype::Bf16 && case.w_dtype == Dtype::Bf16;
            let (bytes, flops) = (case.bytes() as f64, case.flops());
            for run in 0..=2 * pool.mats.len() {
                let w = pool.next();
                let start = Instant::now();
                par_gemm_nt(a.view(), w.view(), case.m, case.n, K, &mut out, case.n);
                black_box(&out);
                let secs = start.elapsed().as_secs_f64();
                let copy = ceilings.copy_secs(case.bytes());
                let read = ceilings.read_secs(case.bytes());
                let peak = ceilings.peak_secs(flops, bf16_dot);
                if run > 0 {
                    case_samples.push(Sample {
                        bytes_rate: bytes / secs,
                        flops_rate: flops / secs,
                        copy_rate: 2.0 * bytes / copy,
                        read_rate: bytes / read,
                        peak_rate: flops / peak,
                    });
                }
            }
        }
    }
    let every = || samples.iter().flatten();
    let copy = median_max(every().map(|s| s.copy_rate).collect());
    let read = median_max(every().map(|s| s.read_rate).collect());
    let peak_of = |dot: bool| {
        median_max(
            all.iter()
                .zip(&samples)
                .filter(|(c, _)| (c.a_dtype == Dtype::Bf16 && c.w_dtype == Dtype::Bf16) == dot)
                .flat_map(|(_, s)| s.iter().map(|s| s.peak_rate))
                .collect(),
        )
    };
    let (peak_dot, peak_fma) = (peak_of(true), peak_of(false));
    println!("\n== gemm summary: {:?}, {threads} threads, k = {K}, {passes} passes ==", Isa::detect());
    println!(
        "ceilings, median / best of the paired samples: copy (read + write) {:.1} / {:.1} GB/s, \
         read {:.1} / {:.1} GB/s, VDPBF16PS {:.0} / {:.0} GFLOP/s, f32 FMA {:.0} / {:.0} GFLOP/s",
        copy.0 / 1e9,
        copy.1 / 1e9,
        read.0 / 1e9,
        read.1 / 1e9,
        peak_dot.0 / 1e9,
        peak_dot.1 / 1e9,
        peak_fma.0 / 1e9,
        peak_fma.1 / 1e9
    );
    println!(
        "{:<24} {:>3} {:>15} {:>15} {:>8} {:>8} {:>8}",
        "case", "m", "GB/s med/best", "GFLOP/s", "/copy", "/read", "/peak"
    );
    println!("{:<44}(the last three: medians of paired ratios)", "");
    for (case, s) in all.iter().zip(&samples) {
        let gbs = median_max(s.iter().map(|s| s.bytes_rate).collect());
        let gflops = median_max(s.iter().map(|s| s.flops_rate).collect());
        let of_copy = median(s.iter().map(|s| s.bytes_rate / s.copy_rate).collect());
        let of_read = median(s.iter().map(|s| s.bytes_rate / s.read_rate).collect());
        let of_peak = median(s.iter().map(|s| s.flops_rate / s.peak_rate).collect());
        println!(
            "{:<24} {:>3} {:>6.1} /{:>6.1} {:>6.1} /{:>6.1} {:>7.0}% {:>7.0}% {:>7.0}%",
            case.name(),
            case.m,
            gbs.0 / 1e9,
            gbs.1 / 1e9,
            gflops.0 / 1e9,
            gflops.1 / 1e9,
            100.0 * of_copy,
            100.0 * of_read,
            100.0 * of_peak
        );
    }
}

fn main() {
    let summary_only = std::env::args().any(|a| a == "summary");
    let passes = std::env::var("GEMM_BENCH_PASSES").ok().and_then(|p| p.parse().ok()).unwrap_or(3);
    if !summary_only {
        let mut c = Criterion::default().configure_from_args();
        bench_gemm(&mut c);
        c.final_summary();
    }
    summary(passes);
}
