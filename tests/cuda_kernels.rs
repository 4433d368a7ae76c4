//! GPU-vs-CPU tests of every MoE kernel on fresh random inputs, at T = 0, 1, 3, 17, 256
//! and 4099 tokens and with skewed routing (experts with no tokens, one expert with most).
//! Output buffers are poisoned (0xff bytes: NaN, u32::MAX) before each run, so an element a
//! kernel fails to write fails the comparison.
//!
//! What "identical" means where the two sides compute differently:
//! - The router's scores use `exp`: the GPU's (double precision, rounded) and glibc's
//!   `expf` (< 0.502 ulp) can differ by one ulp, which can flip a selection only at a
//!   near-tie. The selection tests therefore draw logits whose deciding gaps (top-k
//!   boundary, order inside the top k, kept-group boundary) exceed 1e-5 relative, and then
//!   require the ids to be identical; weights agree within 1e-6 relative. Exact ties (equal
//!   logits) are tested separately: both sides compute bit-equal scores, ties go to the
//!   lower index.
//! - The GPU sums router logits in a different order than the CPU GEMM. The hidden -> ids
//!   test draws hidden states whose CPU logits decide with gaps above 1e-4 relative, then
//!   requires identical ids, weights within 1e-5 and logits within 1e-5 of sum |x w|.
//! - Permutation, gather and combine are integer or exactly specified float work: bit-identical.
//!
//! Without a GPU every test reports that it was skipped; `DOTS_MOE_REQUIRE_GPU=1` makes
//! that a failure.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use dots_moe::backend::testing;
use dots_moe::config::{MoeConfig, RouterConfig, Scoring};
use dots_moe::cuda::{DeviceBuffer, DeviceRouter, DeviceTensor, GpuContext, MoeKernels, MoeWorkspace};
use dots_moe::moe::route::sigmoid;
use dots_moe::moe::{Permutation, combine, gather_bf16, gather_f32, permute, route_logits, router_logits};
use dots_moe::tensor::{Dtype, TensorView};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZES: &[usize] = &[0, 1, 3, 17, 256, 4099];

fn gpu(test: &str) -> Option<(Arc<GpuContext>, MoeKernels)> {
    testing::gpu(test)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The CPU routing's slot ids and weights `[T, k + S]` (shared slots: weight 1.0).
fn cpu_slots(
    cfg: &RouterConfig,
    n_shared: usize,
    logits: &[f32],
    tokens: usize,
    bias: Option<&[f32]>,
) -> (Vec<u32>, Vec<f32>) {
    route_logits(cfg, logits, tokens, bias).unwrap().with_shared_slots(cfg.n_experts, n_shared)
}

/// The smallest relative gap that decides the selection of one token (see the module docs):
/// consecutive values among the top k + 1 choices (after group masking; two masked 0.0
/// choices tie exactly on both sides and do not count), and the kept-group boundary.
fn selection_margin(cfg: &RouterConfig, logits: &[f32], bias: Option<&[f32]>) -> f32 {
    let e = cfg.n_experts;
    let scores: Vec<f32> = match cfg.scoring {
        Scoring::Sigmoid => logits.iter().map(|&l| sigmoid(l)).collect(),
        Scoring::Softmax => {
            let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let ex: Vec<f32> = logits.iter().map(|&l| (l - m).exp()).collect();
            let s: f32 = ex.iter().sum();
            ex.iter().map(|v| v / s).collect()
        }
    };
    let rel = |a: f32, b: f32| (a - b).abs() / a.abs().max(b.abs()).max(1e-3);
    let mut margin = f32::INFINITY;
    let mut choice: Vec<(f32, bool)> = (0..e).map(|i| (scores[i] + bias.map_or(0.0, |b| b[i]), false)).collect();
    if cfg.n_group > 1 {
        let per = e / cfg.n_group;
        let mut groups: Vec<(f32, usize)> = (0..cfg.n_group)
            .map(|g| {
                let mut v: Vec<f32> = choice[g * per..(g + 1) * per].iter().map(|c| c.0).collect();
                v.sort_by(|a, b| b.total_cmp(a));
                (v.iter().take(2).sum(), g)
            })
            .collect();
        groups.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for w in groups.windows(2).take(cfg.topk_group) {
            margin = margin.min(rel(w[0].0, w[1].0));
        }
        for &(_, g) in &groups[cfg.topk_group..] {
            choice[g * per..(g + 1) * per].iter_mut().for_each(|c| *c = (0.0, true));
        }
    }
    choice.sort_by(|a, b| b.0.total_cmp(&a.0));
    for w in choice.windows(2).take(cfg.top_k) {
        if !(w[0].1 && w[1].1) {
            margin = margin.min(rel(w[0].0, w[1].0));
        }
    }
    margin
}

/// Random logits `[T, E]` whose every token decides with a margin above `min_margin`.
fn separated_logits(
    rng: &mut ChaCha8Rng,
    cfg: &RouterConfig,
    tokens: usize,
    bias: Option<&[f32]>,
    min_margin: f32,
) -> Vec<f32> {
    let e = cfg.n_experts;
    let mut logits = vec![0.0f32; tokens * e];
    for row in logits.chunks_exact_mut(e) {
        loop {
            row.iter_mut().for_each(|l| *l = rng.random_range(-4.0..4.0));
            if selection_margin(cfg, row, bias) > min_margin {
                break;
            }
        }
    }
    logits
}

struct RouterCase {
    name: &'static str,
    cfg: RouterConfig,
    n_shared: usize,
    bias: bool,
}

fn router_cases() -> Vec<RouterCase> {
    vec![
        RouterCase { name: "dots.llm1", cfg: RouterConfig::dots1(), n_shared: 2, bias: true },
        RouterCase {
            name: "deepseek-v3 groups",
            cfg: RouterConfig { n_experts: 256, top_k: 8, n_group: 8, topk_group: 4, ..RouterConfig::dots1() },
            n_shared: 1,
            bias: true,
        },
        RouterCase {
            name: "softmax",
            cfg: RouterConfig {
                n_experts: 60,
                top_k: 4,
                scoring: Scoring::Softmax,
                norm_topk_prob: false,
                routed_scaling_factor: 1.0,
                ..RouterConfig::dots1()
            },
            n_shared: 0,
            bias: false,
        },
        RouterCase {
            name: "k = E",
            cfg: RouterConfig { n_experts: 8, top_k: 8, ..RouterConfig::dots1() },
            n_shared: 0,
            bias: true,
        },
    ]
}

/// Selection (+ scatter beyond one tile) on the GPU from given logits; returns the workspace.
fn gpu_select(
    gpu: &GpuContext,
    kernels: &MoeKernels,
    cfg: &RouterConfig,
    n_shared: usize,
    logits: &[f32],
    tokens: usize,
    bias: Option<&[f32]>,
) -> MoeWorkspace {
    let router = DeviceRouter::selection_only(gpu, cfg, n_shared, bias).unwrap();
    let mut ws = MoeWorkspace::for_router(gpu, &router, tokens).unwrap();
    ws.poison().unwrap();
    ws.logits.copy_from_host("logits", logits).unwrap();
    kernels.router_select(&router, &mut ws).unwrap();
    // As MoeKernels::route: a single tile is scattered by the selection itself.
    if dots_moe::cuda::moe::tiles(tokens) != 1 {
        kernels.permute_scatter(&mut ws).unwrap();
    }
    ws
}

fn assert_close(gpu: &[f32], cpu: &[f32], rel: f32, what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        assert!((g - c).abs() <= rel * c.abs().max(f32::MIN_POSITIVE), "{what}[{i}]: GPU {g} vs CPU {c}");
    }
}

/// Checks a workspace's routing and permutation against the CPU's slot ids and weights.
fn check_routing(ws: &MoeWorkspace, cpu_ids: &[u32], cpu_w: &[f32], weight_tol: f32, what: &str) {
    ws.check_status().unwrap_or_else(|e| panic!("{what}: {e}"));
    let ids = ws.slot_ids.download().unwrap();
    let weights = ws.slot_weights.download().unwrap();
    if let Some(i) = ids.iter().zip(cpu_ids).position(|(g, c)| g != c) {
        let s = ws.slots_per_token;
        let t = i / s;
        panic!("{what}: token {t}: GPU ids {:?}, CPU ids {:?}", &ids[t * s..(t + 1) * s], &cpu_ids[t * s..(t + 1) * s]);
    }
    assert_eq!(ids.len(), cpu_ids.len(), "{what}");
    assert_close(&weights, cpu_w, weight_tol, what);
    let perm = ws.read_permutation().unwrap();
    let cpu_perm = permute(cpu_ids, ws.tokens, ws.slots_per_token, ws.n_slots).unwrap();
    assert_eq!(perm, cpu_perm, "{what}: permutation");
    let row_weights = ws.row_weights.download().unwrap();
    let expected: Vec<f32> = perm.row_pairs.iter().map(|&p| weights[p as usize]).collect();
    assert_eq!(bits(&row_weights), bits(&expected), "{what}: row weights");
    // The router's per-tile counts add up to the offsets.
    let counts = ws.tile_counts.download().unwrap();
    for e in 0..ws.n_slots {
        let total: u32 = counts.chunks_exact(ws.n_slots).map(|c| c[e]).sum();
        assert_eq!(total, perm.expert_offsets[e + 1] - perm.expert_offsets[e], "{what}: count of slot {e}");
    }
}

#[test]
fn router_selection_matches_the_cpu_given_the_same_logits() {
    let Some((gpu, kernels)) = gpu("router_selection_matches_the_cpu_given_the_same_logits") else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(0x5e1ec7);
    for case in router_cases() {
        let e = case.cfg.n_experts;
        let bias: Option<Vec<f32>> = case.bias.then(|| (0..e).map(|_| rng.random_range(-0.05..0.05)).collect());
        for &tokens in SIZES {
            let logits = separated_logits(&mut rng, &case.cfg, tokens, bias.as_deref(), 1e-5);
            let ws = gpu_select(&gpu, &kernels, &case.cfg, case.n_shared, &logits, tokens, bias.as_deref());
            let (cpu_ids, cpu_w) = cpu_slots(&case.cfg, case.n_shared, &logits, tokens, bias.as_deref());
            check_routing(&ws, &cpu_ids, &cpu_w, 1e-6, &format!("{} T={tokens}", case.name));
        }
    }
}

#[test]
fn exact_ties_go_to_the_lower_index() {
    let Some((gpu, kernels)) = gpu("exact_ties_go_to_the_lower_index") else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let cfg = RouterConfig::dots1();
    for tokens in [1usize, 17, 256] {
        // Few distinct logit values and a bias of few values: many exact ties.
        let logits: Vec<f32> = (0..tokens * 128).map(|_| f32::from(rng.random_range(0u8..3)) * 0.5).collect();
        let bias: Vec<f32> = (0..128).map(|i| if i % 7 == 0 { 0.25 } else { 0.0 }).collect();
        for bias in [None, Some(bias.as_slice())] {
            let ws = gpu_select(&gpu, &kernels, &cfg, 2, &logits, tokens, bias);
            let (cpu_ids, cpu_w) = cpu_slots(&cfg, 2, &logits, tokens, bias);
            check_routing(&ws, &cpu_ids, &cpu_w, 1e-6, &format!("ties T={tokens}"));
        }
    }
}

#[test]
fn skewed_routing_leaves_experts_empty_or_crowded() {
    let Some((gpu, kernels)) = gpu("skewed_routing_leaves_experts_empty_or_crowded") else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let cfg = RouterConfig::dots1();
    for &tokens in SIZES {
        // Expert 77 and experts 0..5 win for every token: the other 122 experts stay empty.
        let mut bias = vec![-1.0f32; 128];
        bias[77] = 2.0;
        bias[..5].fill(0.5);
        let logits = separated_logits(&mut rng, &cfg, tokens, Some(&bias), 1e-5);
        let ws = gpu_select(&gpu, &kernels, &cfg, 2, &logits, tokens, Some(&bias));
        let (cpu_ids, cpu_w) = cpu_slots(&cfg, 2, &logits, tokens, Some(&bias));
        check_routing(&ws, &cpu_ids, &cpu_w, 1e-6, &format!("skewed T={tokens}"));
        let perm = ws.read_permutation().unwrap();
        assert_eq!(perm.expert_rows(77).len(), tokens);
    }
}

#[test]
fn a_non_finite_logit_is_the_contract_error() {
    let Some((gpu, kernels)) = gpu("a_non_finite_logit_is_the_contract_error") else { return };
    let cfg = RouterConfig::dots1();
    let mut logits = vec![0.1f32; 100 * 128];
    logits[70 * 128 + 5] = f32::NAN;
    logits[90 * 128 + 1] = f32::INFINITY;
    let ws = gpu_select(&gpu, &kernels, &cfg, 2, &logits, 100, None);
    let err = ws.check_status().unwrap_err().to_string();
    let cpu = route_logits(&cfg, &logits, 100, None).unwrap_err().to_string();
    assert_eq!(err, cpu);
}

#[test]
fn hidden_to_ids_matches_the_cpu() {
    let Some((gpu, kernels)) = gpu("hidden_to_ids_matches_the_cpu") else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let cfg = MoeConfig { moe_intermediate_size: 8, ..MoeConfig::dots1() };
    let (h, e) = (cfg.hidden_size, cfg.router.n_experts);
    let bound = (3.0 / h as f32).sqrt();
    for dtype in [Dtype::Bf16, Dtype::F32] {
        let gate_f: Vec<f32> = (0..e * h).map(|_| rng.random_range(-bound..bound)).collect();
        let gate_b: Vec<bf16> = gate_f.iter().map(|&v| bf16::from_f32(v)).collect();
        let gate = if dtype == Dtype::Bf16 { TensorView::Bf16(&gate_b) } else { TensorView::F32(&gate_f) };
        let bias: Vec<f32> = (0..e).map(|_| rng.random_range(-0.02..0.02)).collect();
        let router = DeviceRouter::upload(&gpu, &cfg, gate, Some(&bias)).unwrap();
        for &tokens in SIZES {
            // Hidden rows whose CPU logits decide by a margin the summation order cannot cross.
            let mut x = vec![0.0f32; tokens * h];
            let mut fresh: Vec<usize> = (0..tokens).collect();
            while !fresh.is_empty() {
                for &t in &fresh {
                    x[t * h..(t + 1) * h]
                        .iter_mut()
                        .for_each(|v| *v = bf16::from_f32(rng.random_range(-1.7..1.7)).to_f32());
                }
                let xs: Vec<f32> = fresh.iter().flat_map(|&t| x[t * h..(t + 1) * h].to_vec()).collect();
                let logits = router_logits(TensorView::F32(&xs), fresh.len(), h, gate, e).unwrap();
                fresh = fresh
                    .iter()
                    .zip(logits.chunks_exact(e))
                    .filter(|(_, l)| selection_margin(&cfg.router, l, Some(&bias)) <= 1e-4)
                    .map(|(&t, _)| t)
                    .collect();
            }
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let host = if dtype == Dtype::Bf16 { TensorView::Bf16(&xb) } else { TensorView::F32(&x) };
            let cpu_logits = router_logits(host, tokens, h, gate, e).unwrap();
            let xa: Vec<f32> = x.iter().map(|v| v.abs()).collect();
            let ga: Vec<f32> = gate_f
                .iter()
                .zip(&gate_b)
                .map(|(f, b)| if dtype == Dtype::Bf16 { b.to_f32().abs() } else { f.abs() })
                .collect();
            let abs_dot = router_logits(TensorView::F32(&xa), tokens, h, TensorView::F32(&ga), e).unwrap();

            let dev_x = DeviceTensor::upload(&gpu, "hidden", host, &[tokens, h]).unwrap();
            let mut ws = MoeWorkspace::for_router(&gpu, &router, tokens).unwrap();
            ws.poison().unwrap();
            kernels.route(&router, &dev_x, &mut ws).unwrap();
            let logits = ws.logits.download().unwrap();
            for (i, ((&g, &c), &a)) in logits.iter().zip(&cpu_logits).zip(&abs_dot).enumerate() {
                assert!(
                    (g - c).abs() <= 1e-5 * a + 1e-30,
                    "{dtype:?} T={tokens} logit {i}: GPU {g} vs CPU {c} (sum |x w| {a})"
                );
            }
            let (cpu_ids, cpu_w) = cpu_slots(&cfg.router, 2, &cpu_logits, tokens, Some(&bias));
            check_routing(&ws, &cpu_ids, &cpu_w, 1e-5, &format!("hidden {dtype:?} T={tokens}"));
        }
    }
}

#[test]
fn routing_is_batch_invariant_and_deterministic() {
    let Some((gpu, kernels)) = gpu("routing_is_batch_invariant_and_deterministic") else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let cfg = MoeConfig { moe_intermediate_size: 8, ..MoeConfig::dots1() };
    let (h, e) = (cfg.hidden_size, cfg.router.n_experts);
    let gate: Vec<bf16> = (0..e * h).map(|_| bf16::from_f32(rng.random_range(-0.03..0.03))).collect();
    let router = DeviceRouter::upload(&gpu, &cfg, TensorView::Bf16(&gate), None).unwrap();
    let x: Vec<bf16> = (0..300 * h).map(|_| bf16::from_f32(rng.random_range(-2.0..2.0))).collect();
    let run = |rows: std::ops::Range<usize>| {
        let t = rows.len();
        let dev_x =
            DeviceTensor::upload(&gpu, "hidden", TensorView::Bf16(&x[rows.start * h..rows.end * h]), &[t, h]).unwrap();
        let mut ws = MoeWorkspace::for_router(&gpu, &router, t).unwrap();
        ws.poison().unwrap();
        kernels.route(&router, &dev_x, &mut ws).unwrap();
        (
            bits(&ws.logits.download().unwrap()),
            ws.slot_ids.download().unwrap(),
            bits(&ws.slot_weights.download().unwrap()),
        )
    };
    let all = run(0..300);
    assert_eq!(all, run(0..300), "run to run");
    for part in [5..6, 33..70, 250..300] {
        let alone = run(part.clone());
        assert_eq!(alone.0, all.0[part.start * e..part.end * e].to_vec(), "logits of {part:?} alone");
        assert_eq!(alone.1, all.1[part.start * 8..part.end * 8].to_vec(), "ids of {part:?} alone");
        assert_eq!(alone.2, all.2[part.start * 8..part.end * 8].to_vec(), "weights of {part:?} alone");
    }
}

fn gpu_permute(
    gpu: &GpuContext,
    kernels: &MoeKernels,
    ids: &[u32],
    tokens: usize,
    s: usize,
    n_slots: usize,
) -> MoeWorkspace {
    let mut ws = MoeWorkspace::new(gpu, tokens, 0, s, n_slots).unwrap();
    ws.poison().unwrap();
    ws.slot_ids.copy_from_host("ids", ids).unwrap();
    ws.slot_weights.copy_from_host("weights", &vec![1.0; ids.len()]).unwrap();
    kernels.permute(&mut ws).unwrap();
    ws
}

#[test]
fn permutation_matches_the_cpu() {
    let Some((gpu, kernels)) = gpu("permutation_matches_the_cpu") else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (s, n_slots) = (8usize, 130usize);
    for &tokens in SIZES {
        for skew in ["uniform", "one expert has most", "six experts only", "duplicates"] {
            let ids: Vec<u32> = (0..tokens * s)
                .map(|p| match skew {
                    "uniform" => rng.random_range(0..n_slots as u32),
                    "one expert has most" => {
                        if rng.random_bool(0.9) {
                            41
                        } else {
                            rng.random_range(0..n_slots as u32)
                        }
                    }
                    "six experts only" => (p % 6) as u32 * 25,
                    _ => rng.random_range(0..3),
                })
                .collect();
            let ws = gpu_permute(&gpu, &kernels, &ids, tokens, s, n_slots);
            ws.check_status().unwrap();
            let perm = ws.read_permutation().unwrap();
            assert_eq!(perm, permute(&ids, tokens, s, n_slots).unwrap(), "T={tokens} {skew}");
        }
    }
    // Out of range: the CPU's error.
    let mut ids = vec![3u32; 40 * s];
    ids[37 * s + 2] = 130;
    let err = gpu_permute(&gpu, &kernels, &ids, 40, s, n_slots).check_status().unwrap_err().to_string();
    assert_eq!(err, permute(&ids, 40, s, n_slots).unwrap_err().to_string());
}

fn random_perm(rng: &mut ChaCha8Rng, tokens: usize, s: usize, n_slots: usize) -> Permutation {
    let ids: Vec<u32> = (0..tokens * s).map(|_| rng.random_range(0..n_slots as u32)).collect();
    permute(&ids, tokens, s, n_slots).unwrap()
}

/// A workspace holding a CPU permutation (what the scatter would have written).
fn workspace_with(gpu: &GpuContext, perm: &Permutation) -> MoeWorkspace {
    let mut ws = MoeWorkspace::new(gpu, perm.tokens, 0, perm.slots_per_token, perm.n_experts()).unwrap();
    ws.row_pairs.copy_from_host("row_pairs", &perm.row_pairs).unwrap();
    ws.pair_rows.copy_from_host("pair_rows", &perm.pair_rows).unwrap();
    ws
}

#[test]
fn gather_is_bit_identical_to_the_cpu() {
    let Some((gpu, kernels)) = gpu("gather_is_bit_identical_to_the_cpu") else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for &tokens in SIZES {
        for h in [4096usize, 100, 7] {
            if tokens == 4099 && h != 4096 {
                continue;
            }
            let perm = random_perm(&mut rng, tokens, 8, 130);
            let ws = workspace_with(&gpu, &perm);
            let x: Vec<f32> = (0..tokens * h).map(|_| rng.random_range(-3.0..3.0)).collect();
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            for src in [Dtype::F32, Dtype::Bf16] {
                let host = if src == Dtype::Bf16 { TensorView::Bf16(&xb) } else { TensorView::F32(&x) };
                let dev_x = DeviceTensor::upload(&gpu, "hidden", host, &[tokens, h]).unwrap();
                for out in [Dtype::F32, Dtype::Bf16] {
                    let mut y = DeviceTensor::zeros(&gpu, out, &[tokens * 8, h]).unwrap();
                    y.poison().unwrap();
                    kernels.gather(&dev_x, h, &ws, &mut y).unwrap();
                    let what = format!("gather {src:?} -> {out:?} T={tokens} H={h}");
                    match y {
                        DeviceTensor::Bf16(y) => {
                            let mut cpu = vec![bf16::ZERO; tokens * 8 * h];
                            gather_bf16(host, h, &perm, &mut cpu).unwrap();
                            assert!(
                                y.download().unwrap().iter().zip(&cpu).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{what}"
                            );
                        }
                        DeviceTensor::F32(y) => {
                            let mut cpu = vec![0.0f32; tokens * 8 * h];
                            gather_f32(host, h, &perm, &mut cpu).unwrap();
                            assert_eq!(bits(&y.download().unwrap()), bits(&cpu), "{what}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn combine_is_bit_identical_to_the_cpu_and_run_to_run() {
    let Some((gpu, kernels)) = gpu("combine_is_bit_identical_to_the_cpu_and_run_to_run") else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for &tokens in SIZES {
        for h in [4096usize, 30] {
            let perm = random_perm(&mut rng, tokens, 8, 130);
            let ws = workspace_with(&gpu, &perm);
            // Mixed magnitudes: a different summation order would change the bits.
            let rows: Vec<f32> =
                (0..tokens * 8 * h).map(|i| rng.random_range(-1.0..1.0) * if i % 5 == 0 { 1e6 } else { 1.0 }).collect();
            let dev_rows = DeviceBuffer::upload(&gpu, "rows", &rows, &[tokens * 8, h]).unwrap();
            let mut cpu = vec![0.0f32; tokens * h];
            combine(&rows, h, &perm, &mut cpu).unwrap();
            let mut first = None;
            for _ in 0..3 {
                let mut out = DeviceBuffer::<f32>::zeros(&gpu, &[tokens, h]).unwrap();
                out.poison().unwrap();
                kernels.combine(&dev_rows, h, &ws, &mut out).unwrap();
                let got = bits(&out.download().unwrap());
                assert_eq!(got, bits(&cpu), "combine T={tokens} H={h}");
                assert_eq!(first.get_or_insert_with(|| got.clone()), &got);
            }
        }
    }
}

#[test]
fn the_pipeline_runs_inside_a_cuda_graph() {
    let Some((gpu, kernels)) = gpu("the_pipeline_runs_inside_a_cuda_graph") else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let cfg = MoeConfig { moe_intermediate_size: 8, ..MoeConfig::dots1() };
    let (h, e) = (cfg.hidden_size, cfg.router.n_experts);
    let gate: Vec<bf16> = (0..e * h).map(|_| bf16::from_f32(rng.random_range(-0.03..0.03))).collect();
    let bias: Vec<f32> = (0..e).map(|_| rng.random_range(-0.02..0.02)).collect();
    let router = DeviceRouter::upload(&gpu, &cfg, TensorView::Bf16(&gate), Some(&bias)).unwrap();
    for tokens in [1usize, 256] {
        let x: Vec<bf16> = (0..tokens * h).map(|_| bf16::from_f32(rng.random_range(-2.0..2.0))).collect();
        let dev_x = DeviceTensor::upload(&gpu, "hidden", TensorView::Bf16(&x), &[tokens, h]).unwrap();
        let rows: Vec<f32> = (0..tokens * 8 * h).map(|_| rng.random_range(-1.0..1.0)).collect();
        let dev_rows = DeviceBuffer::upload(&gpu, "rows", &rows, &[tokens * 8, h]).unwrap();
        let mut ws = MoeWorkspace::for_router(&gpu, &router, tokens).unwrap();
        let mut x_perm = DeviceTensor::zeros(&gpu, Dtype::Bf16, &[tokens * 8, h]).unwrap();
        let mut out = DeviceBuffer::<f32>::zeros(&gpu, &[tokens, h]).unwrap();
        let run = |ws: &mut MoeWorkspace, x_perm: &mut DeviceTensor, out: &mut DeviceBuffer<f32>| {
            kernels.route(&router, &dev_x, ws).unwrap();
            kernels.gather(&dev_x, h, ws, x_perm).unwrap();
            kernels.combine(&dev_rows, h, ws, out).unwrap();
        };
        run(&mut ws, &mut x_perm, &mut out);
        let eager = (ws.read_permutation().unwrap(), bits(&out.download().unwrap()));
        ws.poison().unwrap();
        out.poison().unwrap();
        gpu.synchronize().unwrap();
        // A host synchronisation inside would make the capture fail.
        let stream = gpu.stream();
        stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
        run(&mut ws, &mut x_perm, &mut out);
        let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).unwrap().expect("a graph");
        for _ in 0..2 {
            graph.launch().unwrap();
            let replay = (ws.read_permutation().unwrap(), bits(&out.download().unwrap()));
            assert_eq!(replay, eager, "T={tokens}: graph replay differs from the eager run");
        }
    }
}
