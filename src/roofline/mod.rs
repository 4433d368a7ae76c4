//! The roofline model behind `dots-moe bench` and the criterion benches: this machine's
//! floor (or the H200's), what a layer must move and compute, the timing loop, and the
//! per-batch-size result beside its floor. Device timing with CUDA events is
//! `crate::cuda::timing`; the command is `src/cli/bench.rs`.
//!
//! Every figure is a ratio measured in one run: the layer's median time against the
//! floor `max(bytes / bandwidth, flops / matmul rate)` of the same machine, measured
//! just before.

pub mod report;

use std::time::{Duration, Instant};

use half::bf16;
use rayon::prelude::*;
use serde::Serialize;

use crate::cpu;
use crate::moe::{MoeLayer, Routing};
use crate::tensor::TensorView;

/// This machine's ceilings, measured.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct MachineFloor {
    /// Copy bandwidth, bytes read + written per second, all cores.
    pub copy_bytes_per_s: f64,
    /// Read-only streaming bandwidth, bytes per second, all cores.
    pub read_bytes_per_s: f64,
    /// bf16 matrix-product rate (FLOP/s) of a large dense product on all cores.
    pub matmul_flop_per_s: f64,
}

impl MachineFloor {
    /// The bandwidth the floor uses: the better of copy and read-only streaming, so the
    /// floor is never easier to reach than either.
    pub fn bandwidth(&self) -> f64 {
        self.copy_bytes_per_s.max(self.read_bytes_per_s)
    }

    /// The better of each rate of two measurements (on a shared machine a measurement can
    /// only be slowed down, never sped up, by other work).
    pub fn best(&self, other: &MachineFloor) -> MachineFloor {
        MachineFloor {
            copy_bytes_per_s: self.copy_bytes_per_s.max(other.copy_bytes_per_s),
            read_bytes_per_s: self.read_bytes_per_s.max(other.read_bytes_per_s),
            matmul_flop_per_s: self.matmul_flop_per_s.max(other.matmul_flop_per_s),
        }
    }

    /// The floor time (seconds) of a job that must move `bytes` and compute `flops`.
    pub fn floor_seconds(&self, bytes: f64, flops: f64) -> f64 {
        (bytes / self.bandwidth()).max(flops / self.matmul_flop_per_s)
    }
}

/// Measures copy and read bandwidth over `buffer_bytes`-sized buffers (use several times
/// the last-level cache) and the bf16 matmul rate of an `m x 4096 x 4096` product.
///
/// The read bandwidth is the faster of a plain read (several streams per core) and a
/// bf16 GEMV (`m = 1`, [`cpu::par_gemm_nt`]) streaming the same buffer as weights: the
/// GEMV's software prefetch reaches rates a plain loop does not, and a floor must not be
/// slower than what this machine demonstrably does.
pub fn measure_floor(buffer_bytes: usize) -> MachineFloor {
    let words = (buffer_bytes / 8).max(1024);
    let src: Vec<u64> = (0..words as u64).into_par_iter().map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let mut dst = vec![0u64; words];
    let chunk = words.div_ceil(rayon::current_num_threads() * 4).max(1024);
    let copy = best_of(5, || {
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
    });
    let read = best_of(5, || {
        let total: u64 = src.par_chunks(chunk).map(read_streams).reduce(|| 0, |a, b| a ^ b);
        std::hint::black_box(total);
    });
    // The buffer's words, seen as bf16 weights `[n, 4096]` (any bit pattern will do).
    let (gemv_k, weights) = (4096usize, bytemuck::cast_slice::<u64, bf16>(&src));
    let gemv_n = weights.len() / gemv_k;
    let x = vec![bf16::ONE; gemv_k];
    let mut y = vec![0.0f32; gemv_n];
    let gemv = best_of(5, || {
        let w = TensorView::Bf16(&weights[..gemv_n * gemv_k]);
        cpu::par_gemm_nt(TensorView::Bf16(&x), w, 1, gemv_n, gemv_k, &mut y, gemv_n);
    });
    std::hint::black_box((&dst, &y));
    drop((src, dst));

    let (m, n, k) = (256usize, 4096usize, 4096usize);
    let a: Vec<bf16> = (0..m * k).map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 1000.0 - 0.5)).collect();
    let w: Vec<bf16> = (0..n * k).map(|i| bf16::from_f32(((i * 104_729) % 1000) as f32 / 1000.0 - 0.5)).collect();
    let mut out = vec![0.0f32; m * n];
    let matmul = best_of(8, || cpu::par_gemm_nt(TensorView::Bf16(&a), TensorView::Bf16(&w), m, n, k, &mut out, n));
    MachineFloor {
        copy_bytes_per_s: 2.0 * (words * 8) as f64 / copy.as_secs_f64(),
        read_bytes_per_s: ((words * 8) as f64 / read.as_secs_f64())
            .max((gemv_n * gemv_k * 2) as f64 / gemv.as_secs_f64()),
        matmul_flop_per_s: 2.0 * (m * n * k) as f64 / matmul.as_secs_f64(),
    }
}

/// Reads every word of `chunk` as [`READ_STREAMS`] interleaved sequential streams (one
/// per part of the chunk), the way a GEMV walks several weight rows at once: one stream
/// per core leaves memory-level parallelism unused and underestimates the bandwidth.
fn read_streams(chunk: &[u64]) -> u64 {
    let part = chunk.len() / READ_STREAMS;
    let mut acc = [0u64; 8];
    for i in (0..part).step_by(8) {
        let n = 8.min(part - i);
        for s in 0..READ_STREAMS {
            for (a, &x) in acc.iter_mut().zip(&chunk[s * part + i..s * part + i + n]) {
                *a ^= x;
            }
        }
    }
    let tail = chunk[READ_STREAMS * part..].iter().fold(0, |a, &x| a ^ x);
    acc.iter().fold(tail, |a, &x| a ^ x)
}

/// Sequential streams per task of the read-bandwidth measurement.
const READ_STREAMS: usize = 8;

/// The fastest of `reps` runs of `f` (after one warm-up run).
fn best_of(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// Times `f`: one warm-up, then at least `min_reps` runs and until `budget` has passed
/// (at most `max_reps`). Returns the median.
pub fn median_time(min_reps: usize, max_reps: usize, budget: Duration, mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < min_reps || (times.len() < max_reps && start.elapsed() < budget) {
        let t = Instant::now();
        f();
        times.push(t.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

/// The ceilings of one H200, measured on such a card (docs/perf.md): 4.3 TB/s of
/// device-memory copy bandwidth (bytes read plus written) and 790 TFLOP/s of dense bf16
/// matrix products. The floor every GPU figure of this project is reported against.
pub const H200: MachineFloor =
    MachineFloor { copy_bytes_per_s: 4.3e12, read_bytes_per_s: 4.3e12, matmul_flop_per_s: 790e12 };

/// What one MoE layer forward must move and compute for a given routing.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LayerCost {
    /// Distinct routed experts the batch uses.
    pub distinct_experts: usize,
    /// Bytes that must be read or written at least once: router, bias, the used experts'
    /// and the shared experts' weights, the input and the output.
    pub bytes: f64,
    /// Multiply-adds times two: router, and three expert GEMMs per (token, slot).
    pub flops: f64,
}

/// The cost of running `layer` on `routing` (input and output as f32).
pub fn layer_cost(layer: &MoeLayer, routing: &Routing) -> LayerCost {
    let cfg = layer.config();
    let w = layer.weights();
    let (h, i, e) = (cfg.hidden_size as f64, cfg.moe_intermediate_size as f64, cfg.router.n_experts);
    let mut used = vec![false; e];
    for &id in &routing.expert_ids {
        used[id as usize] = true;
    }
    let distinct = used.iter().filter(|&&u| u).count();
    let t = routing.tokens as f64;
    let router_bytes = (e * cfg.hidden_size * w.dtype().size() + w.router_bias().map_or(0, |b| b.len() * 4)) as f64;
    let expert_bytes = ((distinct + cfg.n_shared_experts) * w.slot_bytes()) as f64;
    let io_bytes = 2.0 * t * h * 4.0;
    let pairs = t * cfg.slots_per_token() as f64;
    LayerCost {
        distinct_experts: distinct,
        bytes: router_bytes + expert_bytes + io_bytes,
        flops: 2.0 * t * e as f64 * h + pairs * 6.0 * i * h,
    }
}

/// One benchmark result: a backend at one batch size, beside its floor.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// `"cpu"` or `"cuda"`.
    pub backend: String,
    /// Tokens in the batch.
    pub tokens: usize,
    /// Median wall time of one layer forward, microseconds.
    pub median_us: f64,
    /// Bytes that must move ([`LayerCost::bytes`]) per second achieved.
    pub gb_per_s: f64,
    /// FLOP per second achieved, in TFLOP/s.
    pub tflop_per_s: f64,
    /// The floor for this batch on this machine, microseconds.
    pub floor_us: f64,
    /// `floor_us / median_us`: 1.0 is the physical limit.
    pub floor_ratio: f64,
}

impl BenchRow {
    /// A row from a measured `median` for `cost` against `floor`.
    pub fn new(backend: &str, tokens: usize, median: Duration, cost: &LayerCost, floor: &MachineFloor) -> Self {
        let secs = median.as_secs_f64();
        let floor_s = floor.floor_seconds(cost.bytes, cost.flops);
        BenchRow {
            backend: backend.to_string(),
            tokens,
            median_us: secs * 1e6,
            gb_per_s: cost.bytes / secs / 1e9,
            tflop_per_s: cost.flops / secs / 1e12,
            floor_us: floor_s * 1e6,
            floor_ratio: floor_s / secs,
        }
    }
}

/// This process's peak resident memory in bytes (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `tokens x hidden` seeded random activations, standard-normal-like (uniform with unit
/// variance), as f32.
pub fn random_hidden(tokens: usize, hidden: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let bound = 3.0f32.sqrt();
    (0..tokens * hidden).map(|_| rng.random_range(-bound..bound)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_is_the_slower_of_memory_and_compute() {
        let floor = MachineFloor { copy_bytes_per_s: 20e9, read_bytes_per_s: 25e9, matmul_flop_per_s: 100e9 };
        assert_eq!(floor.bandwidth(), 25e9);
        assert!((floor.floor_seconds(25e9, 1.0) - 1.0).abs() < 1e-12);
        assert!((floor.floor_seconds(1.0, 200e9) - 2.0).abs() < 1e-12);
        let cost = LayerCost { distinct_experts: 1, bytes: 25e9, flops: 0.0 };
        let row = BenchRow::new("cpu", 1, Duration::from_secs(2), &cost, &floor);
        assert!((row.floor_ratio - 0.5).abs() < 1e-12);
        assert!((row.gb_per_s - 12.5).abs() < 1e-9);
    }
}
