//! `dots-moe bench`: the whole MoE layer at real dots.llm1 shapes, per batch size, beside
//! this machine's floor.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use dots_moe::config::MoeConfig;
use dots_moe::moe::{MoeLayer, MoeWeights};
use dots_moe::roofline::{self, BenchRow, report};
use dots_moe::tensor::{Dtype, TensorView};

use super::CliResult;

/// Which backend to time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// The CPU reference.
    Cpu,
    /// The CUDA kernels.
    Cuda,
    /// Every backend available here.
    All,
}

/// A set of CUDA expert kernels (`--kernels`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KernelSet {
    /// The first generation: register-streamed decode kernels, `wgmma` tiles on sm_90a
    /// (`mma.sync` elsewhere); the default.
    Gen1,
    /// The second generation (sm_90a): TMA-streamed decode kernels and warp-specialised
    /// TMA + `wgmma` tiles.
    Gen2,
    /// The portable set: register-streamed decode kernels, `mma.sync` tiles.
    Mma,
    /// The first generation launched as few times as it allows
    /// (`GemmOptions::fewer_launches`): the decode chain at up to 32 tokens, GEMM 1 reading
    /// the hidden states (no gather), the router logits on tensor cores.
    Direct,
}

/// Arguments of `dots-moe bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Batch sizes (tokens) to time, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 16, 64, 256, 1024])]
    pub tokens: Vec<usize>,
    /// Backend(s) to time.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendChoice,
    /// Print the results as a JSON list (one object per backend and batch size).
    #[arg(long)]
    pub json: bool,
    /// Write a markdown table and an SVG plot into this folder.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Seed of the synthetic weights and inputs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Seconds of timing per batch size (at least 3 runs each).
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,
    /// With the CUDA backend, also time the two expert GEMMs apart at each batch size
    /// (rows `cuda-gemm1:REGIME` and `cuda-gemm2:REGIME`, each beside the floor of the
    /// bytes and FLOPs of that GEMM alone; REGIME is `decode`, `tiled` or `mixed`).
    #[arg(long)]
    pub gemm: bool,
    /// With the CUDA backend, the expert kernel sets to time, comma separated, each as its
    /// own rows (`cuda-gen1`, `cuda-gen2`, `cuda-mma`), side by side at every batch size;
    /// default: the device's default kernels, as rows `cuda`.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub kernels: Vec<KernelSet>,
    /// Only measure and print this machine's floor (copy and read bandwidth, bf16 matmul
    /// rate), timing no layer: a quick probe of the machine's state beside other runs.
    #[arg(long)]
    pub floor_only: bool,
}

fn progress(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(message.to_string());
    bar
}

/// Runs the benchmark.
pub fn run(args: BenchArgs) -> CliResult {
    if args.tokens.is_empty() {
        return Err("--tokens needs at least one batch size".into());
    }
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        return Err(format!("--seconds must be positive, got {}", args.seconds).into());
    }
    let cfg = MoeConfig::dots1();
    let measure = || {
        let bar = progress("measuring this machine's floor (copy bandwidth, matmul rate)");
        let floor = roofline::measure_floor(1 << 28);
        bar.finish_and_clear();
        floor
    };
    // The CUDA rows use the H200's ceilings; only the CPU rows need this machine's floor.
    let mut floor = if args.backend == BackendChoice::Cuda && !args.floor_only { roofline::H200 } else { measure() };
    if args.floor_only {
        if args.json {
            println!("{}", serde_json::to_string(&floor)?);
        } else {
            println!(
                "floor: copy {:.1} GB/s, read {:.1} GB/s, bf16 matmul {:.0} GFLOP/s",
                floor.copy_bytes_per_s / 1e9,
                floor.read_bytes_per_s / 1e9,
                floor.matmul_flop_per_s / 1e9
            );
        }
        return Ok(());
    }

    let mut rows: Vec<BenchRow> = Vec::new();
    let wants_cpu = matches!(args.backend, BackendChoice::Cpu | BackendChoice::All);
    let wants_cuda = matches!(args.backend, BackendChoice::Cuda | BackendChoice::All);
    // GPU 0 opens before the layer is built, so `--backend cuda` fails early without one.
    let gpu = wants_cuda.then(cuda::GpuBench::open);
    if let (BackendChoice::Cuda, Some(Err(reason))) = (args.backend, &gpu) {
        return Err(format!("cuda backend: not available: {reason}").into());
    }
    let bar = progress("building a seeded synthetic dots.llm1 MoE layer (4.5 GB of bf16 weights)");
    let layer = MoeLayer::new(MoeWeights::synthetic(&cfg, Dtype::Bf16, args.seed)?);
    bar.finish_and_clear();
    let weight_bytes = layer.weights().bytes();
    if wants_cpu {
        // The floor again after each batch size: on a shared machine any measurement may
        // have been slowed down by other work, and the floor takes the best rates seen.
        let timings = time_cpu(&layer, &args, || floor = floor.best(&measure()))?;
        if !args.json {
            println!(
                "floor: copy {:.1} GB/s (read + written), read {:.1} GB/s, bf16 matmul {:.1} GFLOP/s \
                 (the best of measurements before the timings and after each batch size)",
                floor.copy_bytes_per_s / 1e9,
                floor.read_bytes_per_s / 1e9,
                floor.matmul_flop_per_s / 1e9
            );
        }
        for (tokens, median, cost) in timings {
            let row = BenchRow::new("cpu", tokens, median, &cost, &floor);
            if !args.json {
                print_row(&row, rows.is_empty());
            }
            rows.push(row);
        }
    }
    if let Some(gpu) = gpu {
        match gpu.and_then(|gpu| gpu.time(&layer, &args)) {
            Ok(cuda_rows) => rows.extend(cuda_rows),
            Err(reason) if args.backend == BackendChoice::All => eprintln!("cuda backend: not available: {reason}"),
            Err(reason) => return Err(format!("cuda backend: not available: {reason}").into()),
        }
    }

    let peak = roofline::peak_rss_bytes();
    if let (Some(peak), false) = (peak, args.json) {
        println!(
            "peak resident memory: {:.2} GB ({:.2}x the layer's bf16 weights)",
            peak as f64 / 1e9,
            peak as f64 / weight_bytes as f64
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    if let Some(dir) = &args.report {
        std::fs::create_dir_all(dir)?;
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let mut md = report::markdown(&rows, &floor, &command, &machine_name());
        if let Some(peak) = peak {
            md.push_str(&format!(
                "\nPeak resident memory of the run: {:.2} GB, {:.2}x the layer's {:.2} GB of bf16 weights.\n",
                peak as f64 / 1e9,
                peak as f64 / weight_bytes as f64,
                weight_bytes as f64 / 1e9
            ));
        }
        report::write_atomic(&dir.join("bench.md"), &md)?;
        report::write_atomic(&dir.join("bench.svg"), &report::svg(&rows))?;
        if !args.json {
            println!("wrote {} and {}", dir.join("bench.md").display(), dir.join("bench.svg").display());
        }
    }
    Ok(())
}

/// Prints one result row (the table's header comes first).
fn print_row(row: &BenchRow, header: bool) {
    if header {
        println!(
            "{:>8} {:>8} {:>12} {:>9} {:>9} {:>12} {:>12}",
            "backend", "tokens", "median", "GB/s", "GFLOP/s", "floor", "floor/time"
        );
    }
    println!(
        "{:>8} {:>8} {:>12} {:>9.1} {:>9.1} {:>12} {:>12.2}",
        row.backend,
        row.tokens,
        report::fmt_us(row.median_us),
        row.gb_per_s,
        row.tflop_per_s * 1e3,
        report::fmt_us(row.floor_us),
        row.floor_ratio
    );
}

/// One batch size's result: tokens, median time, what the layer moves and computes.
type Timing = (usize, Duration, roofline::LayerCost);

/// Times the CPU layer at every batch size, calling `after_each` after each one.
fn time_cpu(
    layer: &MoeLayer,
    args: &BenchArgs,
    mut after_each: impl FnMut(),
) -> Result<Vec<Timing>, Box<dyn std::error::Error>> {
    let h = layer.config().hidden_size;
    let mut timings = Vec::new();
    for &tokens in &args.tokens {
        let bar = progress(&format!("cpu: timing {tokens} tokens"));
        let hidden = roofline::random_hidden(tokens, h, args.seed.wrapping_add(tokens as u64));
        let input = TensorView::F32(&hidden);
        let routing = layer.route(input, tokens)?;
        let cost = roofline::layer_cost(layer, &routing);
        let mut failure = None;
        let median = roofline::median_time(3, 50, Duration::from_secs_f64(args.seconds), || {
            if let Err(e) = layer.forward(input, tokens) {
                failure.get_or_insert(e);
            }
        });
        bar.finish_and_clear();
        if let Some(e) = failure {
            return Err(e.into());
        }
        timings.push((tokens, median, cost));
        after_each();
    }
    Ok(timings)
}

fn machine_name() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpu}, {} threads, CPU kernels: {:?}", rayon::current_num_threads(), dots_moe::cpu::Isa::detect())
}

/// The CUDA side of the bench: the whole layer on the GPU, replayed from a CUDA graph,
/// timed with CUDA events; the floor is the H200's ([`dots_moe::roofline::H200`]: 4.3 TB/s,
/// 790 TFLOP/s). Without the `cuda` feature, [`cuda::GpuBench`] is a type with no values
/// whose `open` says so.
#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use dots_moe::cuda::layer::{CudaMoeLayer, LayerWorkspace};
    use dots_moe::cuda::timing::time_region;
    use dots_moe::cuda::{CudaError, GpuContext};
    use dots_moe::moe::MoeLayer;
    use dots_moe::roofline::{self, BenchRow, LayerCost};
    use dots_moe::tensor::{Dtype, TensorView};

    use super::{BenchArgs, KernelSet, print_row, progress};
    use dots_moe::cuda::expert_gemm::{GemmOptions, TiledKernel};

    /// GPU 0, opened for timing.
    pub struct GpuBench {
        gpu: Arc<GpuContext>,
    }

    impl GpuBench {
        /// Opens GPU 0; `Err` says why it cannot.
        pub fn open() -> Result<Self, String> {
            Ok(GpuBench { gpu: GpuContext::new(0).map_err(|e| e.to_string())? })
        }

        /// Times `layer` for every batch size of `args`; `Err` says why CUDA cannot run it.
        pub fn time(&self, layer: &MoeLayer, args: &BenchArgs) -> Result<Vec<BenchRow>, String> {
            let gpu = &self.gpu;
            let bar = progress("cuda: uploading the layer and compiling the kernels");
            let default = GemmOptions::for_device(gpu);
            let layers = if args.kernels.is_empty() {
                vec![("cuda".to_string(), CudaMoeLayer::new(gpu, layer, default).map_err(|e| e.to_string())?)]
            } else {
                let mut layers = Vec::new();
                for set in &args.kernels {
                    let (label, options) = match set {
                        KernelSet::Gen1 => ("cuda-gen1", default),
                        KernelSet::Gen2 => ("cuda-gen2", GemmOptions::second_generation()),
                        KernelSet::Mma => ("cuda-mma", GemmOptions { tiled: TiledKernel::Mma, ..default }),
                        KernelSet::Direct => ("cuda-direct", GemmOptions::fewer_launches(gpu.target())),
                    };
                    let device_layer = CudaMoeLayer::new(gpu, layer, options).map_err(|e| e.to_string())?;
                    layers.push((label.to_string(), device_layer));
                }
                layers
            };
            bar.finish_and_clear();
            let floor = roofline::H200;
            let h = layer.config().hidden_size;
            let mut rows = Vec::new();
            for &tokens in args.tokens.iter().filter(|&&t| t > 0) {
                let bar = progress(&format!("cuda: timing {tokens} tokens"));
                let hidden = roofline::random_hidden(tokens, h, args.seed.wrapping_add(tokens as u64));
                let cost = roofline::layer_cost(
                    layer,
                    &layer.route(TensorView::F32(&hidden), tokens).map_err(|e| e.to_string())?,
                );
                let iterations = if tokens >= 4096 { 20 } else { 50 };
                let mut timed = Vec::new();
                for (label, device_layer) in &layers {
                    let mut ws = device_layer.workspace(tokens, Dtype::F32).map_err(|e| e.to_string())?;
                    ws.set_input(TensorView::F32(&hidden)).map_err(|e| e.to_string())?;
                    let (_eager_us, graph_us) =
                        time_region(gpu, iterations, || device_layer.enqueue(&mut ws)).map_err(|e| e.to_string())?;
                    timed.push((label.clone(), graph_us, cost));
                    if args.gemm {
                        timed.extend(
                            time_gemms(gpu, label, device_layer, &mut ws, iterations).map_err(|e| e.to_string())?,
                        );
                    }
                }
                bar.finish_and_clear();
                for (backend, us, cost) in timed {
                    let row =
                        BenchRow::new(&backend, tokens, std::time::Duration::from_secs_f64(us * 1e-6), &cost, &floor);
                    if !args.json {
                        print_row(&row, rows.is_empty());
                    }
                    rows.push(row);
                }
            }
            Ok(rows)
        }
    }
    /// GEMM 1 (gate/up + SwiGLU) and GEMM 2 (down + routing weight) timed apart on a
    /// workspace the layer has just run on (its schedule, gathered rows and activation are
    /// in place): `(label, graph-replay median us, cost of that GEMM alone)`, the labels
    /// `LAYER-gemm1:REGIME` and `LAYER-gemm2:REGIME` after the layer's row label. GEMM 1
    /// reads the hidden states where the layer does ([`GemmOptions::reads_hidden`]), the
    /// gathered rows otherwise, also where the layer ran as the decode chain (which gathers
    /// no rows: `x` then holds what it held, and a GEMM's time does not depend on the
    /// values).
    fn time_gemms(
        gpu: &GpuContext,
        layer_label: &str,
        layer: &CudaMoeLayer,
        ws: &mut LayerWorkspace,
        iterations: usize,
    ) -> Result<Vec<(String, f64, LayerCost)>, CudaError> {
        layer.enqueue(ws)?;
        let (decode_items, tiled_items) = ws.gemm.read_item_counts()?;
        let regime = match (decode_items, tiled_items) {
            (_, 0) => "decode",
            (0, _) => "tiled",
            _ => "mixed",
        };
        let offsets = ws.routing.expert_offsets.download()?;
        let slots_used = offsets.windows(2).filter(|w| w[1] > w[0]).count() as f64;
        let cfg = layer.config();
        let (h, i, rows) = (cfg.hidden_size as f64, cfg.moe_intermediate_size as f64, ws.gemm.rows as f64);
        let (gemm, weights) = (layer.expert_gemm(), layer.weights());
        let up_cost = LayerCost {
            distinct_experts: slots_used as usize,
            bytes: slots_used * 2.0 * i * h * 2.0 + rows * h * 2.0 + rows * i * 2.0,
            flops: 2.0 * rows * 2.0 * i * h,
        };
        let down_cost = LayerCost {
            distinct_experts: slots_used as usize,
            bytes: slots_used * h * i * 2.0 + rows * i * 2.0 + rows * 4.0 + rows * h * 4.0,
            flops: 2.0 * rows * h * i,
        };
        let slots = cfg.slots_per_token();
        let reads_hidden = layer.options().reads_hidden(ws.hidden.dtype());
        let LayerWorkspace { x, hidden, gemm: gemm_ws, routing, expert_rows, .. } = ws;
        let (_, up_us) = time_region(gpu, iterations, || {
            if reads_hidden {
                gemm.up_from_hidden(weights, hidden, &routing.row_pairs, slots, gemm_ws)
            } else {
                gemm.up(weights, x, gemm_ws)
            }
        })?;
        let (_, down_us) =
            time_region(gpu, iterations, || gemm.down(weights, &routing.row_weights, gemm_ws, expert_rows))?;
        Ok(vec![
            (format!("{layer_label}-gemm1:{regime}"), up_us, up_cost),
            (format!("{layer_label}-gemm2:{regime}"), down_us, down_cost),
        ])
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use dots_moe::moe::MoeLayer;
    use dots_moe::roofline::BenchRow;

    /// GPU 0 for timing: this build has none, so no value exists.
    pub enum GpuBench {}

    impl GpuBench {
        /// Always `Err`: this build has no CUDA.
        pub fn open() -> Result<Self, String> {
            Err("this binary was built without the `cuda` feature".into())
        }

        /// Never runs (no value exists).
        pub fn time(&self, _layer: &MoeLayer, _args: &super::BenchArgs) -> Result<Vec<BenchRow>, String> {
            match *self {}
        }
    }
}
