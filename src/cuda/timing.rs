//! Timing of the MoE kernels on the device, with CUDA events (`dots-moe kernels --time`).
//!
//! Each region runs on random inputs at dots.llm1 shapes (H 4096, E 128, top-6, 2 shared
//! slots, bf16 hidden states and router weight), after warm-up (NVRTC compile and module
//! load stay out), `iterations` times; the median is reported, both launched one kernel at
//! a time ("eager") and replayed from a CUDA graph ("graph", how an engine runs a layer).
//! Beside it: the bytes the region must move, the floor those bytes take at the measured
//! H200 copy bandwidth (4.3 TB/s, [`crate::roofline::H200`]), and the ratio floor / measured.

use std::sync::Arc;

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::MoeConfig;
use crate::cuda::buffer::{DeviceBuffer, DeviceTensor};
use crate::cuda::context::GpuContext;
use crate::cuda::error::CudaError;
use crate::cuda::graph::{capture, device_time_us};
use crate::cuda::moe::{LOGIT_E1_MAX_TOKENS, LogitsKernel, RouteCombineKernels};
use crate::cuda::workspace::{DeviceRouter, RoutingWorkspace};
use crate::tensor::{Dtype, TensorView};

/// Device-memory copy bandwidth of an H200, bytes per second ([`crate::roofline::H200`]).
pub const H200_COPY_BANDWIDTH: f64 = crate::roofline::H200.copy_bytes_per_s;

/// One timed region at one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct RegionTiming {
    /// What ran: `route` (logits, selection, scatter), `gather`, `route+gather`, `combine`.
    pub region: String,
    /// Tokens `T`.
    pub tokens: usize,
    /// Median over the iterations, launched kernel by kernel, microseconds.
    pub eager_us: f64,
    /// Median over the iterations, replayed from a CUDA graph, microseconds.
    pub graph_us: f64,
    /// Bytes the region reads and writes at least once.
    pub bytes: f64,
    /// `bytes` at [`H200_COPY_BANDWIDTH`], microseconds.
    pub floor_us: f64,
}

impl RegionTiming {
    /// Floor / graph time: 1.0 is the physical limit.
    pub fn ratio(&self) -> f64 {
        self.floor_us / self.graph_us
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median GPU time (microseconds) of `region` over `iterations` runs, launched eagerly and
/// replayed from a CUDA graph captured from it, after warm-up.
pub fn time_region(
    gpu: &GpuContext,
    iterations: usize,
    mut region: impl FnMut() -> Result<(), CudaError>,
) -> Result<(f64, f64), CudaError> {
    for _ in 0..3 {
        region()?;
    }
    gpu.synchronize()?;
    let eager = (0..iterations).map(|_| device_time_us(gpu, &mut region)).collect::<Result<Vec<_>, _>>()?;
    let graph = capture(gpu, &mut region)?;
    for _ in 0..3 {
        graph.launch()?;
    }
    let replayed =
        (0..iterations).map(|_| device_time_us(gpu, || Ok(graph.launch()?))).collect::<Result<Vec<_>, _>>()?;
    Ok((median(eager), median(replayed)))
}

/// Times routing, permutation, gather and combine at each of `token_counts` on `gpu`.
pub fn time_moe_kernels(
    gpu: &Arc<GpuContext>,
    token_counts: &[usize],
    iterations: usize,
) -> Result<Vec<RegionTiming>, CudaError> {
    let kernels = RouteCombineKernels::new(gpu)?;
    let cfg = MoeConfig::dots1();
    let (h, e) = (cfg.hidden_size, cfg.router.n_experts);
    let s = cfg.slots_per_token();
    let mut rng = ChaCha8Rng::seed_from_u64(0xbe7c);
    let bound = (3.0 / h as f32).sqrt();
    let gate: Vec<bf16> = (0..e * h).map(|_| bf16::from_f32(rng.random_range(-bound..bound))).collect();
    let bias: Vec<f32> = (0..e).map(|_| rng.random_range(-0.02..0.02)).collect();
    let router = DeviceRouter::upload(gpu, &cfg, TensorView::Bf16(&gate), Some(&bias))?;
    // The same router with its logits on tensor cores (batches of more than 64 tokens).
    let router_tc = DeviceRouter {
        logits: LogitsKernel::TensorCores,
        ..DeviceRouter::upload(gpu, &cfg, TensorView::Bf16(&gate), Some(&bias))?
    };
    let mut out = Vec::new();
    for &tokens in token_counts.iter().filter(|&&t| t > 0) {
        let x: Vec<bf16> = (0..tokens * h).map(|_| bf16::from_f32(rng.random_range(-2.0..2.0))).collect();
        let hidden = DeviceTensor::upload(gpu, "hidden", TensorView::Bf16(&x), &[tokens, h])?;
        let rows: Vec<f32> = (0..tokens * s * h).map(|_| rng.random_range(-1.0..1.0)).collect();
        let expert_rows = DeviceBuffer::upload(gpu, "expert rows", &rows, &[tokens * s, h])?;
        let mut ws = RoutingWorkspace::for_router(gpu, &router, tokens)?;
        let mut x_perm = DeviceTensor::zeros(gpu, Dtype::Bf16, &[tokens * s, h])?;
        let mut y = DeviceBuffer::<f32>::zeros(gpu, &[tokens, h])?;
        let (t, p, hf) = (tokens as f64, (tokens * s) as f64, h as f64);
        let route_bytes = (e * h * 2) as f64 + t * hf * 2.0 + t * e as f64 * 8.0 + p * 32.0;
        let gather_bytes = t * hf * 2.0 + p * hf * 2.0 + p * 4.0;
        let combine_bytes = p * hf * 4.0 + t * hf * 4.0 + p * 4.0;

        let mut push = |region: &str, bytes: f64, (eager_us, graph_us): (f64, f64)| {
            out.push(RegionTiming {
                region: region.into(),
                tokens,
                eager_us,
                graph_us,
                bytes,
                floor_us: bytes / H200_COPY_BANDWIDTH * 1e6,
            });
        };
        kernels.route(&router, &hidden, &mut ws)?;
        let timed = time_region(gpu, iterations, || kernels.route(&router, &hidden, &mut ws))?;
        push("route", route_bytes, timed);
        if tokens > LOGIT_E1_MAX_TOKENS {
            kernels.route(&router_tc, &hidden, &mut ws)?;
            let timed = time_region(gpu, iterations, || kernels.route(&router_tc, &hidden, &mut ws))?;
            push("route-tc", route_bytes, timed);
        }
        let timed = time_region(gpu, iterations, || kernels.gather(&hidden, h, &ws, &mut x_perm))?;
        push("gather", gather_bytes, timed);
        let timed = time_region(gpu, iterations, || {
            kernels.route(&router, &hidden, &mut ws)?;
            kernels.gather(&hidden, h, &ws, &mut x_perm)
        })?;
        push("route+gather", route_bytes + gather_bytes, timed);
        let timed = time_region(gpu, iterations, || kernels.combine(&expert_rows, h, &ws, &mut y))?;
        push("combine", combine_bytes, timed);
        ws.check_status()?;
    }
    Ok(out)
}

/// The timings as a text table.
pub fn format_table(gpu: &GpuContext, timings: &[RegionTiming]) -> String {
    let info = gpu.info();
    let mut s = format!(
        "MoE kernels on {} ({}), dots.llm1 shapes (H 4096, E 128, top-6 + 2 shared, bf16), uniform random routing\n",
        info.name, info.arch
    );
    s += &format!(
        "{:<13} {:>6} {:>11} {:>11} {:>11} {:>9} {:>8}\n",
        "region", "T", "eager us", "graph us", "bytes", "floor us", "floor/t"
    );
    for t in timings {
        s += &format!(
            "{:<13} {:>6} {:>11.2} {:>11.2} {:>11.3e} {:>9.2} {:>8.3}\n",
            t.region,
            t.tokens,
            t.eager_us,
            t.graph_us,
            t.bytes,
            t.floor_us,
            t.ratio()
        );
    }
    s += "targets (docs/perf.md): router + permutation <= 5 us at T = 1, <= 30 us at T = 4096 (graph column)\n";
    s
}
