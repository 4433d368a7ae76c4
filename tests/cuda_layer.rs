//! GPU-vs-CPU tests of the whole MoE layer on the GPU (`dots_moe::cuda::layer::CudaMoeLayer`:
//! route, permute, gather, expert GEMMs with the shared experts fused, combine) against
//! `dots_moe::moe::MoeLayer` (`Precision::Bf16`, the matching CPU contract), on fresh
//! random inputs:
//!
//! - T = 1, 3, 17, 256 and 4099, f32 and bf16 hidden states, every way the GEMMs can split
//!   the work; skewed routing (a router bias that sends most tokens to two experts and
//!   leaves others empty); the real dots.llm1 shape (H 4096, I 1408, E 128, k 6, 2 shared);
//! - relative error `||gpu - cpu|| / ||cpu|| <= 1e-2`, on the tokens both sides route to
//!   the same experts (the router's sums run in another order on the GPU, which may flip a
//!   near-tie: at most T / 500 tokens may differ, none below 500 tokens);
//! - every intermediate and the output poisoned (NaN) before each run;
//! - two runs bit-identical; graph replays equal to direct launches, bit for bit;
//! - batch-invariant mode: a token run alone equals the same token inside a batch;
//! - at the real shape, T = 4096 and 16384 against the CPU on a sample of 64 tokens (the CPU
//!   layer is batch-invariant, so the sample alone gives the same rows as the whole batch),
//!   and five graph replays at T = 4096, poisoned in between, bit-identical: the cheapest
//!   detector of a race between CTAs that an emulator cannot see.
//!
//! Without a GPU every test reports that it was skipped; `DOTS_MOE_REQUIRE_GPU=1` makes
//! that a failure.
#![cfg(feature = "cuda")]

mod support;

use std::sync::{Arc, OnceLock};

use dots_moe::config::{MoeConfig, RouterConfig};
use dots_moe::cuda::expert_gemm::GemmOptions;
use dots_moe::cuda::layer::CudaMoeLayer;
use dots_moe::cuda::{Arch, GpuContext};
use dots_moe::moe::{MoeLayer, MoeLayerBuilder, MoeWeights, Precision};
use dots_moe::tensor::{Dtype, TensorView};
use half::bf16;
use support::gemm::{all_options, bits, random_f32, rel_error, rng};

fn small_config() -> MoeConfig {
    MoeConfig {
        hidden_size: 1024,
        moe_intermediate_size: 384,
        n_shared_experts: 2,
        router: RouterConfig { n_experts: 32, top_k: 6, ..RouterConfig::dots1() },
    }
}

fn synthetic_layer(cfg: &MoeConfig, seed: u64) -> MoeLayer {
    MoeLayer::new(MoeWeights::synthetic(cfg, Dtype::Bf16, seed).unwrap())
}

/// `layer` with another router bias: rebuilt through the checkpoint-shaped builder.
fn with_bias(layer: &MoeLayer, bias: &[f32]) -> MoeLayer {
    let w = layer.weights();
    let cfg = layer.config().clone();
    let (h, i, e, s) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.router.n_experts, cfg.n_shared_experts);
    let mut b = MoeLayerBuilder::new(cfg, Dtype::Bf16).unwrap();
    b.router(w.router_gate(), Some(TensorView::F32(bias))).unwrap();
    for x in 0..e {
        let gu = w.slot_gate_up(x);
        b.expert(x, gu.slice(0..i * h), gu.slice(i * h..2 * i * h), w.slot_down(x)).unwrap();
    }
    // The shared MLP as the checkpoint stores it: gate / up [n_shared I, H], down [H, n_shared I].
    let (mut gate, mut up, mut down) = (Vec::new(), Vec::new(), vec![bf16::ZERO; h * s * i]);
    for half in 0..s {
        let TensorView::Bf16(gu) = w.slot_gate_up(e + half) else { panic!("bf16") };
        gate.extend_from_slice(&gu[..i * h]);
        up.extend_from_slice(&gu[i * h..]);
        let TensorView::Bf16(d) = w.slot_down(e + half) else { panic!("bf16") };
        for row in 0..h {
            down[row * s * i + half * i..row * s * i + (half + 1) * i].copy_from_slice(&d[row * i..(row + 1) * i]);
        }
    }
    b.shared(TensorView::Bf16(&gate), TensorView::Bf16(&up), TensorView::Bf16(&down)).unwrap();
    b.build().unwrap()
}

/// Hidden states `[T, H]` in ±1 as f32, or rounded to bf16.
enum Hidden {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl Hidden {
    fn random(tokens: usize, h: usize, dtype: Dtype, seed: u64) -> Hidden {
        let v = random_f32(&mut rng(seed), tokens * h, 1.0);
        match dtype {
            Dtype::F32 => Hidden::F32(v),
            Dtype::Bf16 => Hidden::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }

    fn view(&self) -> TensorView<'_> {
        match self {
            Hidden::F32(v) => TensorView::F32(v),
            Hidden::Bf16(v) => TensorView::Bf16(v),
        }
    }

    fn dtype(&self) -> Dtype {
        self.view().dtype()
    }

    fn token(&self, t: usize, h: usize) -> Hidden {
        match self {
            Hidden::F32(v) => Hidden::F32(v[t * h..(t + 1) * h].to_vec()),
            Hidden::Bf16(v) => Hidden::Bf16(v[t * h..(t + 1) * h].to_vec()),
        }
    }
}

/// One GPU run from poisoned buffers: the output and the routed ids `[T, k]`.
fn run_gpu(gpu_layer: &CudaMoeLayer, hidden: &Hidden, tokens: usize) -> (Vec<f32>, Vec<u32>) {
    let mut ws = gpu_layer.workspace(tokens, hidden.dtype()).unwrap();
    ws.set_input(hidden.view()).unwrap();
    ws.poison().unwrap();
    gpu_layer.enqueue(&mut ws).unwrap();
    let out = ws.read_output().unwrap();
    let ids = ws.routing.read_routing(gpu_layer.config().router.top_k).unwrap().expert_ids;
    (out, ids)
}

/// Compares a GPU output with the CPU's on the tokens routed alike (see the module docs).
fn check(what: &str, cpu: &MoeLayer, gpu_layer: &CudaMoeLayer, hidden: &Hidden, tokens: usize) {
    let trace = cpu.forward_trace(hidden.view(), tokens).unwrap();
    let (out, ids) = run_gpu(gpu_layer, hidden, tokens);
    let (h, k) = (cpu.config().hidden_size, cpu.config().router.top_k);
    if let Some(i) = out.iter().position(|v| !v.is_finite()) {
        panic!("{what}: output element {i} is {} (unwritten?)", out[i]);
    }
    let same: Vec<usize> = (0..tokens).filter(|&t| ids[t * k..(t + 1) * k] == *trace.routing.ids(t)).collect();
    let differing = tokens - same.len();
    assert!(differing <= tokens / 500, "{what}: {differing} of {tokens} tokens routed differently from the CPU");
    let pick = |v: &[f32]| -> Vec<f32> { same.iter().flat_map(|&t| v[t * h..(t + 1) * h].to_vec()).collect() };
    let err = rel_error(what, &pick(&out), &pick(&trace.output));
    eprintln!("{what}: relative error {err:.2e} ({differing} tokens routed differently, left out)");
    assert!(err <= support::gemm::TOLERANCE, "{what}: relative error {err:.3e}");
}

fn setup(test: &str) -> Option<Arc<GpuContext>> {
    support::gemm::gpu(test)
}

#[test]
fn layer_matches_cpu_at_every_size() {
    let Some(gpu) = setup("layer_matches_cpu_at_every_size") else { return };
    let cpu = synthetic_layer(&small_config(), 1);
    let h = cpu.config().hidden_size;
    for (label, options) in all_options(&gpu) {
        let gpu_layer = CudaMoeLayer::new(&gpu, &cpu, options).unwrap();
        for tokens in [1, 3, 17, 256, 4099] {
            let hidden = Hidden::random(tokens, h, Dtype::F32, tokens as u64);
            check(&format!("{label}, T = {tokens}"), &cpu, &gpu_layer, &hidden, tokens);
        }
        let hidden = Hidden::random(17, h, Dtype::Bf16, 99);
        check(&format!("{label}, T = 17, bf16 hidden"), &cpu, &gpu_layer, &hidden, 17);
    }
}

#[test]
fn layer_matches_cpu_with_skewed_routing() {
    let Some(gpu) = setup("layer_matches_cpu_with_skewed_routing") else { return };
    let base = synthetic_layer(&small_config(), 2);
    let h = base.config().hidden_size;
    // Experts 3 and 20 win almost every token; the lowest-biased ones get none.
    let mut bias = vec![0.0f32; base.config().router.n_experts];
    bias[3] = 5.0;
    bias[20] = 5.0;
    for b in bias.iter_mut().skip(24) {
        *b = -5.0;
    }
    let cpu = with_bias(&base, &bias);
    for (label, options) in all_options(&gpu) {
        let gpu_layer = CudaMoeLayer::new(&gpu, &cpu, options).unwrap();
        for tokens in [17, 256, 4099] {
            let hidden = Hidden::random(tokens, h, Dtype::F32, 1000 + tokens as u64);
            check(&format!("skewed, {label}, T = {tokens}"), &cpu, &gpu_layer, &hidden, tokens);
        }
    }
}

#[test]
fn layer_is_bit_identical_run_to_run() {
    let Some(gpu) = setup("layer_is_bit_identical_run_to_run") else { return };
    let cpu = synthetic_layer(&small_config(), 3);
    let h = cpu.config().hidden_size;
    for (label, options) in all_options(&gpu) {
        let gpu_layer = CudaMoeLayer::new(&gpu, &cpu, options).unwrap();
        for tokens in [1, 300] {
            let hidden = Hidden::random(tokens, h, Dtype::F32, 5);
            let (a, _) = run_gpu(&gpu_layer, &hidden, tokens);
            let (b, _) = run_gpu(&gpu_layer, &hidden, tokens);
            assert!(bits(&a) == bits(&b), "{label}, T = {tokens}: two runs differ");
        }
    }
}

#[test]
fn batch_invariant_token_alone_equals_token_in_batch() {
    let Some(gpu) = setup("batch_invariant_token_alone_equals_token_in_batch") else { return };
    let cpu = synthetic_layer(&small_config(), 4);
    let h = cpu.config().hidden_size;
    let gpu_layer = CudaMoeLayer::new(&gpu, &cpu, GemmOptions::for_device(&gpu).batch_invariant()).unwrap();
    // 2000 tokens: the shared slots hold 2000 rows (32 chunks), routed experts ~375.
    let tokens = 2000;
    let hidden = Hidden::random(tokens, h, Dtype::F32, 6);
    let (batch, _) = run_gpu(&gpu_layer, &hidden, tokens);
    for t in [0, 1, 777, 1999] {
        let (alone, _) = run_gpu(&gpu_layer, &hidden.token(t, h), 1);
        assert!(bits(&alone) == bits(&batch[t * h..(t + 1) * h]), "token {t}: alone and in the batch differ");
    }
}

#[test]
fn graph_replay_equals_direct_launches() {
    let Some(gpu) = setup("graph_replay_equals_direct_launches") else { return };
    let cpu = synthetic_layer(&small_config(), 5);
    let h = cpu.config().hidden_size;
    // The default kernels, and on sm_90a the second generation (the decode chain at T = 1,
    // whose arrival counters must be back at 0 for each replay; tensor-core logits at 96).
    let mut sets = vec![("default", GemmOptions::for_device(&gpu))];
    if gpu.target().supports(Arch::SM_90A) && support::gemm::generations().1 {
        sets.push(("gen2", GemmOptions::second_generation()));
    }
    for (label, options) in sets {
        let gpu_layer = CudaMoeLayer::new(&gpu, &cpu, options).unwrap();
        for tokens in [1, 64, 96] {
            let ws = gpu_layer.workspace(tokens, Dtype::F32).unwrap();
            let mut graph = gpu_layer.capture(ws).unwrap();
            for seed in [7, 8] {
                let hidden = Hidden::random(tokens, h, Dtype::F32, seed);
                let replayed = graph.forward(hidden.view()).unwrap();
                let (direct, _) = run_gpu(&gpu_layer, &hidden, tokens);
                assert!(bits(&replayed) == bits(&direct), "{label}, T = {tokens}, seed {seed}: graph replay differs");
            }
        }
    }
}

#[test]
fn programmatic_dependent_launch_changes_no_bit() {
    // The same layers launched plainly and with programmatic stream serialisation (each
    // kernel scheduled while the one before it runs, waiting in its first statement),
    // directly and from a captured graph: the same bits.
    let Some(gpu) = setup("programmatic_dependent_launch_changes_no_bit") else { return };
    if gpu.info().major < 9 {
        eprintln!("programmatic dependent launch needs sm_90: skipped on {}", gpu.info().name);
        return;
    }
    let cfg = small_config();
    let cpu = synthetic_layer(&cfg, 31);
    for (label, options) in all_options(&gpu) {
        let gpu_layer = CudaMoeLayer::new(&gpu, &cpu, options).unwrap();
        for tokens in [1, 17, 300] {
            let hidden = Hidden::random(tokens, cfg.hidden_size, Dtype::Bf16, 50 + tokens as u64);
            gpu.set_programmatic_launch(false);
            let (plain, _) = run_gpu(&gpu_layer, &hidden, tokens);
            assert!(gpu.set_programmatic_launch(true), "sm_90 takes programmatic launches");
            let (programmatic, _) = run_gpu(&gpu_layer, &hidden, tokens);
            let mut graph = gpu_layer.capture(gpu_layer.workspace(tokens, Dtype::Bf16).unwrap()).unwrap();
            graph.set_input(hidden.view()).unwrap();
            graph.workspace_mut().poison().unwrap();
            graph.replay().unwrap();
            let replayed = graph.workspace().read_output().unwrap();
            gpu.set_programmatic_launch(false);
            assert!(bits(&plain) == bits(&programmatic), "{label}, T = {tokens}: programmatic launches differ");
            assert!(bits(&plain) == bits(&replayed), "{label}, T = {tokens}: the programmatic graph differs");
        }
    }
}

#[test]
fn the_gpu_layer_refuses_other_contracts() {
    let Some(gpu) = setup("the_gpu_layer_refuses_other_contracts") else { return };
    let mut cpu = synthetic_layer(&small_config(), 6);
    cpu.set_precision(Precision::F32);
    let err = CudaMoeLayer::with_default_options(&gpu, &cpu).unwrap_err().to_string();
    assert!(err.contains("Precision::Bf16"), "{err}");
    let f32_layer = MoeLayer::new(MoeWeights::synthetic(&small_config(), Dtype::F32, 6).unwrap());
    let err = CudaMoeLayer::with_default_options(&gpu, &f32_layer).unwrap_err().to_string();
    assert!(err.contains("bf16"), "{err}");
    let odd = MoeConfig { hidden_size: 1000, ..small_config() };
    let err = CudaMoeLayer::with_default_options(&gpu, &synthetic_layer(&odd, 6)).unwrap_err().to_string();
    assert!(err.contains("hidden_size"), "{err}");
}

/// The dots.llm1-shaped synthetic layer: 4.5 GB of bf16 weights, made once per process and
/// only when a GPU is there.
fn dots1_layer() -> &'static MoeLayer {
    static LAYER: OnceLock<MoeLayer> = OnceLock::new();
    LAYER.get_or_init(|| synthetic_layer(&MoeConfig::dots1(), 11))
}

/// `n` distinct token indices spread over `0..tokens`, the first and last included.
fn sample_tokens(tokens: usize, n: usize, seed: u64) -> Vec<usize> {
    use rand::Rng;
    let mut r = rng(seed);
    let mut picked = vec![0, tokens - 1];
    while picked.len() < n.min(tokens) {
        let t = r.random_range(0..tokens);
        if !picked.contains(&t) {
            picked.push(t);
        }
    }
    picked.sort_unstable();
    picked
}

#[test]
fn dots1_shape_large_batches_match_cpu_on_a_sample() {
    let Some(gpu) = setup("dots1_shape_large_batches_match_cpu_on_a_sample") else { return };
    let cpu = dots1_layer();
    let (h, k) = (cpu.config().hidden_size, cpu.config().router.top_k);
    for (label, options) in kernel_sets(&gpu) {
        let gpu_layer = CudaMoeLayer::new(&gpu, cpu, options).unwrap();
        for tokens in [4096, 16384] {
            let hidden = Hidden::random(tokens, h, Dtype::Bf16, 40 + tokens as u64);
            let (out, ids) = run_gpu(&gpu_layer, &hidden, tokens);
            if let Some(i) = out.iter().position(|v| !v.is_finite()) {
                panic!("T = {tokens}: output element {i} is {} (unwritten?)", out[i]);
            }
            let sample = sample_tokens(tokens, 64, tokens as u64);
            let Hidden::Bf16(all) = &hidden else { unreachable!("bf16 hidden") };
            let rows: Vec<bf16> = sample.iter().flat_map(|&t| all[t * h..(t + 1) * h].to_vec()).collect();
            let trace = cpu.forward_trace(TensorView::Bf16(&rows), sample.len()).unwrap();
            let same: Vec<usize> = (0..sample.len())
                .filter(|&j| ids[sample[j] * k..(sample[j] + 1) * k] == *trace.routing.ids(j))
                .collect();
            let differing = sample.len() - same.len();
            // A near-tie may flip one sampled token's choice (sums in another order); a wrong
            // router or permutation changes many.
            assert!(
                differing <= 1,
                "{label}, T = {tokens}: {differing} of {} sampled tokens routed differently",
                sample.len()
            );
            let got: Vec<f32> = same.iter().flat_map(|&j| out[sample[j] * h..(sample[j] + 1) * h].to_vec()).collect();
            let want: Vec<f32> = same.iter().flat_map(|&j| trace.output[j * h..(j + 1) * h].to_vec()).collect();
            let err = rel_error(&format!("T = {tokens}"), &got, &want);
            eprintln!(
                "dots.llm1 shape, {label}, T = {tokens}, {} sampled tokens: relative error {err:.2e} ({differing} routed differently)",
                sample.len()
            );
            assert!(err <= support::gemm::TOLERANCE, "{label}, T = {tokens}: relative error {err:.3e}");
        }
    }
}

/// The expert kernel sets the real-shape tests run: the default, and the second generation
/// where the device takes it (sm_90a); each only when `generations` asks for it.
fn kernel_sets(gpu: &GpuContext) -> Vec<(&'static str, GemmOptions)> {
    let (gen1, gen2) = support::gemm::generations();
    let mut sets = Vec::new();
    if gen1 {
        sets.push(("default", GemmOptions::for_device(gpu)));
        sets.push(("fewer-launches", GemmOptions::fewer_launches(gpu.target())));
    }
    if gen2 && gpu.target().supports(Arch::SM_90A) {
        sets.push(("gen2", GemmOptions::second_generation()));
    }
    sets
}

#[test]
fn dots1_shape_graph_replays_are_bit_identical() {
    let Some(gpu) = setup("dots1_shape_graph_replays_are_bit_identical") else { return };
    let cpu = dots1_layer();
    let h = cpu.config().hidden_size;
    for (label, options) in kernel_sets(&gpu) {
        let gpu_layer = CudaMoeLayer::new(&gpu, cpu, options).unwrap();
        let tokens = 4096;
        let hidden = Hidden::random(tokens, h, Dtype::F32, 77);
        let mut graph = gpu_layer.capture(gpu_layer.workspace(tokens, Dtype::F32).unwrap()).unwrap();
        graph.set_input(hidden.view()).unwrap();
        let mut first: Option<Vec<u32>> = None;
        for replay in 0..5 {
            graph.workspace_mut().poison().unwrap();
            graph.replay().unwrap();
            let out = graph.workspace().read_output().unwrap();
            if let Some(i) = out.iter().position(|v| !v.is_finite()) {
                panic!("{label}: replay {replay}: output element {i} is {} (unwritten?)", out[i]);
            }
            match &first {
                None => first = Some(bits(&out)),
                Some(f) => {
                    let diff = f.iter().zip(bits(&out)).filter(|(a, b)| **a != *b).count();
                    assert!(
                        diff == 0,
                        "{label}: replay {replay}: {diff} of {} output elements differ from replay 0",
                        out.len()
                    );
                }
            }
        }
        eprintln!("{label}, T = {tokens}: five graph replays bit-identical");
    }
}

#[test]
fn dots1_shape_layer_matches_cpu() {
    let Some(gpu) = setup("dots1_shape_layer_matches_cpu") else { return };
    let cpu = dots1_layer();
    let h = cpu.config().hidden_size;
    let mut sets = kernel_sets(&gpu);
    sets.extend(kernel_sets(&gpu).into_iter().map(|(label, o)| {
        (if label == "default" { "batch-invariant" } else { "gen2-batch-invariant" }, o.batch_invariant())
    }));
    for (label, options) in sets {
        let gpu_layer = CudaMoeLayer::new(&gpu, cpu, options).unwrap();
        for tokens in [1, 17, 256] {
            let hidden = Hidden::random(tokens, h, Dtype::Bf16, 20 + tokens as u64);
            check(&format!("dots.llm1 shape, {label}, T = {tokens}"), cpu, &gpu_layer, &hidden, tokens);
        }
    }
}
