//! The MoE kernels (router logits, selection, permutation, gather, combine) against the
//! CPU reference, on every launcher (`tests/kernel_support`): the CPU emulator of the
//! kernels always, the GPU when one opens. Both run the launches `RouteCombineKernels` makes (the
//! library's `*_launch` functions), with fresh random inputs; sizes per launcher (the GPU:
//! T = 0, 1, 3, 17, 256 and 4099 tokens at dots.llm1's widths; the emulator, which runs one
//! thread per CUDA thread: fewer and narrower, still over one and several tiles) and with
//! skewed routing (experts with no tokens, one expert with most). Output buffers are
//! poisoned (0xff bytes: NaN, u32::MAX) before each run, so an element a kernel fails to
//! write fails the comparison.
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
//! Without a GPU its half is skipped (`DOTS_MOE_REQUIRE_GPU=1` makes that a failure);
//! without a C++ compiler the emulator's (`DOTS_MOE_REQUIRE_EMULATOR=1` makes that a failure).
#![cfg(feature = "cuda")]

mod kernel_support;

use dots_moe::MoeError;
use dots_moe::backend::testing;
use dots_moe::config::{MoeConfig, RouterConfig, Scoring};
use dots_moe::cuda::CudaError;
use dots_moe::cuda::launch::{Launch, LaunchDims, MAX_GRID};
use dots_moe::cuda::moe::{self, WorkspaceDims, WorkspacePtrs, tiles};
use dots_moe::cuda::workspace::{permute_status, router_status};
use dots_moe::cuda::{DeviceBuffer, DeviceRouter, DeviceTensor, RoutingWorkspace};
use dots_moe::moe::route::sigmoid;
use dots_moe::moe::{Permutation, combine, gather_bf16, gather_f32, permute, route_logits, router_logits};
use dots_moe::tensor::{Dtype, TensorView};
use half::bf16;
use kernel_support::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Token counts: every size class on the GPU; on the emulator, one and several tiles.
fn sizes(dev: &Device) -> &'static [usize] {
    dev.pick(&[0, 1, 3, 17, 256, 4099], &[1, 40])
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The CPU routing's slot ids and weights `[T, k + n_shared]` (shared slots: weight 1.0).
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

/// A routing workspace on a launcher: every buffer poisoned, at the addresses the launches
/// take.
struct Ws<'a> {
    dev: &'a Device,
    ptrs: WorkspacePtrs,
    dims: WorkspaceDims,
    n_experts: usize,
}

impl<'a> Ws<'a> {
    fn new(dev: &'a Device, tokens: usize, n_experts: usize, s: usize, n_slots: usize) -> Self {
        let pairs = tokens * s;
        let ptrs = WorkspacePtrs {
            logits: dev.poisoned(4 * tokens * n_experts),
            slot_ids: dev.poisoned(4 * pairs),
            slot_weights: dev.poisoned(4 * pairs),
            pair_ranks: dev.poisoned(4 * pairs),
            tile_counts: dev.poisoned(4 * tiles(tokens) * n_slots),
            tile_status: dev.poisoned(8 * tiles(tokens)),
            tile_offsets: dev.poisoned(4 * tiles(tokens) * n_slots),
            tiles_done: dev.upload(&[0u32]),
            expert_offsets: dev.poisoned(4 * (n_slots + 1)),
            row_pairs: dev.poisoned(4 * pairs),
            pair_rows: dev.poisoned(4 * pairs),
            row_weights: dev.poisoned(4 * pairs),
        };
        Ws { dev, ptrs, dims: WorkspaceDims { tokens, slots_per_token: s, n_slots }, n_experts }
    }

    fn pairs(&self) -> usize {
        self.dims.tokens * self.dims.slots_per_token
    }

    /// The selection, then the scatter beyond one tile, as `RouteCombineKernels::route` runs them.
    fn select(&self, cfg: &RouterConfig, n_shared: usize, bias: u64) {
        self.dev.run(moe::select_launch(cfg, n_shared, bias, &self.ptrs, &self.dims).unwrap());
        if tiles(self.dims.tokens) != 1 {
            self.dev.run(moe::scatter_launch(&self.ptrs, &self.dims).unwrap());
        }
    }

    /// Rank, then scatter, as `RouteCombineKernels::permute` runs them.
    fn permute(&self) {
        self.dev.run(moe::rank_launch(&self.ptrs, &self.dims).unwrap());
        self.dev.run(moe::scatter_launch(&self.ptrs, &self.dims).unwrap());
    }

    fn ids(&self) -> Vec<u32> {
        self.dev.download(self.ptrs.slot_ids, self.pairs())
    }
    fn weights(&self) -> Vec<f32> {
        self.dev.download(self.ptrs.slot_weights, self.pairs())
    }
    fn logits(&self) -> Vec<f32> {
        self.dev.download(self.ptrs.logits, self.dims.tokens * self.n_experts)
    }
    fn status(&self) -> Vec<u64> {
        self.dev.download(self.ptrs.tile_status, tiles(self.dims.tokens))
    }
    fn permutation(&self) -> Permutation {
        let (t, s) = (self.dims.tokens, self.dims.slots_per_token);
        Permutation {
            tokens: t,
            slots_per_token: s,
            expert_offsets: self.dev.download(self.ptrs.expert_offsets, self.dims.n_slots + 1),
            row_pairs: self.dev.download(self.ptrs.row_pairs, t * s),
            pair_rows: self.dev.download(self.ptrs.pair_rows, t * s),
        }
    }

    /// Poisons the outputs of the selection, ranking and scatter again (not the inputs, not
    /// `tiles_done`): a second run must write them all afresh.
    fn poison_outputs(&self) {
        let (pairs, n_tiles, n_slots) = (self.pairs(), tiles(self.dims.tokens), self.dims.n_slots);
        let p = &self.ptrs;
        for (addr, bytes) in [
            (p.pair_ranks, 4 * pairs),
            (p.tile_counts, 4 * n_tiles * n_slots),
            (p.tile_status, 8 * n_tiles),
            (p.tile_offsets, 4 * n_tiles * n_slots),
            (p.expert_offsets, 4 * (n_slots + 1)),
            (p.row_pairs, 4 * pairs),
            (p.pair_rows, 4 * pairs),
            (p.row_weights, 4 * pairs),
        ] {
            self.dev.overwrite(addr, &vec![0xffu8; bytes]);
        }
    }

    /// The tile scan's outputs against slot ids `ids` (ids out of range left out, as the
    /// kernels do): the per-tile counts exactly, `tile_offsets[t][e]` = `expert_offsets[e]` +
    /// the pairs of slot `e` in tiles before `t`, and the arrival counter back at 0.
    fn check_tiles(&self, ids: &[u32], what: &str) {
        let (s, n_slots, n_tiles) = (self.dims.slots_per_token, self.dims.n_slots, tiles(self.dims.tokens));
        let mut counts = vec![0u32; n_tiles * n_slots];
        for (p, &e) in ids.iter().enumerate() {
            if (e as usize) < n_slots {
                counts[p / s / moe::TILE_TOKENS * n_slots + e as usize] += 1;
            }
        }
        let mut offsets = vec![0u32; n_slots + 1];
        for e in 0..n_slots {
            offsets[e + 1] = offsets[e] + counts.iter().skip(e).step_by(n_slots).sum::<u32>();
        }
        let mut expected = vec![0u32; n_tiles * n_slots];
        let mut running = offsets[..n_slots].to_vec();
        for t in 0..n_tiles {
            for e in 0..n_slots {
                expected[t * n_slots + e] = running[e];
                running[e] += counts[t * n_slots + e];
            }
        }
        let got_counts: Vec<u32> = self.dev.download(self.ptrs.tile_counts, n_tiles * n_slots);
        assert_eq!(got_counts, counts, "{what}: tile counts");
        let got_offsets: Vec<u32> = self.dev.download(self.ptrs.expert_offsets, n_slots + 1);
        assert_eq!(got_offsets, offsets, "{what}: expert offsets");
        let got: Vec<u32> = self.dev.download(self.ptrs.tile_offsets, n_tiles * n_slots);
        if let Some(i) = got.iter().zip(&expected).position(|(g, e)| g != e) {
            let (t, e) = (i / n_slots, i % n_slots);
            panic!("{what}: tile {t} of {n_tiles}, slot {e}: tile offset {} instead of {}", got[i], expected[i]);
        }
        assert_eq!(self.dev.download::<u32>(self.ptrs.tiles_done, 1), [0], "{what}: the arrival counter");
    }

    fn router_error(&self) -> Result<(), String> {
        router_status(&self.status(), &self.logits(), self.n_experts).map_err(|e| e.to_string())
    }
    fn permute_error(&self) -> Result<(), String> {
        permute_status(&self.status(), &self.ids(), self.dims.slots_per_token, self.dims.n_slots)
            .map_err(|e| e.to_string())
    }
}

/// Selection (+ scatter beyond one tile) from given logits.
fn select<'a>(
    dev: &'a Device,
    cfg: &RouterConfig,
    n_shared: usize,
    logits: &[f32],
    tokens: usize,
    bias: Option<&[f32]>,
) -> Ws<'a> {
    let ws = Ws::new(dev, tokens, cfg.n_experts, cfg.top_k + n_shared, cfg.n_experts + n_shared);
    let ws = Ws { ptrs: WorkspacePtrs { logits: dev.upload(logits), ..ws.ptrs }, ..ws };
    let bias = bias.map_or(0, |b| dev.upload(b));
    ws.select(cfg, n_shared, bias);
    ws
}

fn assert_close(got: &[f32], cpu: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), cpu.len(), "{what}: lengths");
    for (i, (&g, &c)) in got.iter().zip(cpu).enumerate() {
        assert!((g - c).abs() <= rel * c.abs().max(f32::MIN_POSITIVE), "{what}[{i}]: kernel {g} vs CPU {c}");
    }
}

/// Checks a workspace's routing and permutation against the CPU's slot ids and weights.
fn check_routing(ws: &Ws, cpu_ids: &[u32], cpu_w: &[f32], weight_tol: f32, what: &str) {
    let what = format!("{}: {what}", ws.dev.name());
    ws.router_error().unwrap_or_else(|e| panic!("{what}: {e}"));
    let ids = ws.ids();
    let weights = ws.weights();
    if let Some(i) = ids.iter().zip(cpu_ids).position(|(g, c)| g != c) {
        let s = ws.dims.slots_per_token;
        let t = i / s;
        panic!(
            "{what}: token {t}: kernel ids {:?}, CPU ids {:?}",
            &ids[t * s..(t + 1) * s],
            &cpu_ids[t * s..(t + 1) * s]
        );
    }
    assert_eq!(ids.len(), cpu_ids.len(), "{what}");
    assert_close(&weights, cpu_w, weight_tol, &what);
    let perm = ws.permutation();
    let cpu_perm = permute(cpu_ids, ws.dims.tokens, ws.dims.slots_per_token, ws.dims.n_slots).unwrap();
    assert_eq!(perm, cpu_perm, "{what}: permutation");
    let row_weights: Vec<f32> = ws.dev.download(ws.ptrs.row_weights, ws.pairs());
    let expected: Vec<f32> = perm.row_pairs.iter().map(|&p| weights[p as usize]).collect();
    assert_eq!(bits(&row_weights), bits(&expected), "{what}: row weights");
    // The router's per-tile counts, and the tile offsets the last CTA scanned from them.
    ws.check_tiles(cpu_ids, &what);
}

#[test]
fn router_selection_matches_the_cpu_given_the_same_logits() {
    for dev in Device::all("router_selection_matches_the_cpu_given_the_same_logits") {
        let mut rng = ChaCha8Rng::seed_from_u64(0x5e1ec7);
        for case in router_cases() {
            let e = case.cfg.n_experts;
            let bias: Option<Vec<f32>> = case.bias.then(|| (0..e).map(|_| rng.random_range(-0.05..0.05)).collect());
            for &tokens in sizes(&dev) {
                let logits = separated_logits(&mut rng, &case.cfg, tokens, bias.as_deref(), 1e-5);
                let dev = dev.fresh();
                let ws = select(&dev, &case.cfg, case.n_shared, &logits, tokens, bias.as_deref());
                let (cpu_ids, cpu_w) = cpu_slots(&case.cfg, case.n_shared, &logits, tokens, bias.as_deref());
                check_routing(&ws, &cpu_ids, &cpu_w, 1e-6, &format!("{} T={tokens}", case.name));
            }
        }
    }
}

#[test]
fn exact_ties_go_to_the_lower_index() {
    for dev in Device::all("exact_ties_go_to_the_lower_index") {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let cfg = RouterConfig::dots1();
        for &tokens in dev.pick(&[1usize, 17, 256][..], &[1, 40]) {
            // Few distinct logit values and a bias of few values: many exact ties.
            let logits: Vec<f32> = (0..tokens * 128).map(|_| f32::from(rng.random_range(0u8..3)) * 0.5).collect();
            let bias: Vec<f32> = (0..128).map(|i| if i % 7 == 0 { 0.25 } else { 0.0 }).collect();
            for bias in [None, Some(bias.as_slice())] {
                let dev = dev.fresh();
                let ws = select(&dev, &cfg, 2, &logits, tokens, bias);
                let (cpu_ids, cpu_w) = cpu_slots(&cfg, 2, &logits, tokens, bias);
                check_routing(&ws, &cpu_ids, &cpu_w, 1e-6, &format!("ties T={tokens}"));
            }
        }
        // All-equal logits and no bias: every token picks experts 0..6 in index order.
        let cfg = RouterConfig { n_experts: 70, top_k: 6, ..RouterConfig::dots1() };
        let logits = vec![0.25f32; 40 * 70];
        let ws = select(&dev, &cfg, 0, &logits, 40, None);
        assert_eq!(&ws.ids()[..6], &[0, 1, 2, 3, 4, 5], "{}", dev.name());
        assert_eq!(ws.ids(), cpu_slots(&cfg, 0, &logits, 40, None).0, "{}", dev.name());
    }
}

#[test]
fn skewed_routing_leaves_experts_empty_or_crowded() {
    for dev in Device::all("skewed_routing_leaves_experts_empty_or_crowded") {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let cfg = RouterConfig::dots1();
        // Many tiles on the emulator too (6, the last one of 3 tokens).
        for &tokens in dev.pick(sizes(&dev), &[1, 40, 5 * moe::TILE_TOKENS + 3][..]) {
            // Expert 77 and experts 0..5 win for every token: the other 122 experts stay empty.
            let mut bias = vec![-1.0f32; 128];
            bias[77] = 2.0;
            bias[..5].fill(0.5);
            let logits = separated_logits(&mut rng, &cfg, tokens, Some(&bias), 1e-5);
            let dev = dev.fresh();
            let ws = select(&dev, &cfg, 2, &logits, tokens, Some(&bias));
            let (cpu_ids, cpu_w) = cpu_slots(&cfg, 2, &logits, tokens, Some(&bias));
            check_routing(&ws, &cpu_ids, &cpu_w, 1e-6, &format!("skewed T={tokens}"));
            assert_eq!(ws.permutation().expert_rows(77).len(), tokens);
        }
    }
}

#[test]
fn a_non_finite_logit_is_the_contract_error() {
    for dev in Device::all("a_non_finite_logit_is_the_contract_error") {
        let cfg = RouterConfig::dots1();
        let mut logits = vec![0.1f32; 100 * 128];
        logits[70 * 128 + 5] = f32::NAN;
        logits[90 * 128 + 1] = f32::INFINITY;
        let ws = select(&dev, &cfg, 2, &logits, 100, None);
        let cpu = route_logits(&cfg, &logits, 100, None).unwrap_err().to_string();
        assert_eq!(ws.router_error().unwrap_err(), cpu, "{}", dev.name());
        // Only the bad tokens' tile reports, its first bad token as (token << 32 | expert) + 1.
        assert_eq!(ws.status(), vec![0, 0, ((70u64 << 32) | 5) + 1, 0], "{}", dev.name());
        // A bad token is still routed in range.
        assert!(ws.ids().iter().all(|&i| i < 130));
        assert_eq!(*ws.permutation().expert_offsets.last().unwrap() as usize, 100 * 8);
    }
}

/// The config of the hidden -> ids tests: dots.llm1 on the GPU; on the emulator 256 wide
/// with 24 experts, top 4 (one thread per CUDA thread: the logits kernel's grid is T x E).
fn hidden_config(dev: &Device) -> MoeConfig {
    let cfg = MoeConfig { moe_intermediate_size: 8, ..MoeConfig::dots1() };
    let small = RouterConfig { n_experts: 24, top_k: 4, ..RouterConfig::dots1() };
    MoeConfig { hidden_size: dev.pick(cfg.hidden_size, 256), router: dev.pick(cfg.router.clone(), small), ..cfg }
}

/// Token counts of the hidden -> ids tests on `dev`.
fn hidden_sizes(dev: &Device) -> &'static [usize] {
    dev.pick(&[0, 1, 3, 17, 256, 4099], &[0, 1, 40])
}

/// Router logits then selection and scatter (`RouteCombineKernels::route`), from hidden states.
fn route<'a>(
    dev: &'a Device,
    cfg: &MoeConfig,
    gate: (u64, Dtype),
    bias: u64,
    host: TensorView<'_>,
    tokens: usize,
) -> Ws<'a> {
    let (h, e) = (cfg.hidden_size, cfg.router.n_experts);
    let x = match host {
        TensorView::Bf16(x) => (dev.upload(x), Dtype::Bf16),
        TensorView::F32(x) => (dev.upload(x), Dtype::F32),
    };
    let ws = Ws::new(dev, tokens, e, cfg.router.top_k + cfg.n_shared_experts, cfg.n_slots());
    dev.run(moe::logits_launch(x, gate, ws.ptrs.logits, tokens, e, h).unwrap());
    ws.select(&cfg.router, cfg.n_shared_experts, bias);
    ws
}

#[test]
fn hidden_to_ids_matches_the_cpu() {
    for dev in Device::all("hidden_to_ids_matches_the_cpu") {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let cfg = hidden_config(&dev);
        let (h, e) = (cfg.hidden_size, cfg.router.n_experts);
        let bound = (3.0 / h as f32).sqrt();
        for dtype in [Dtype::Bf16, Dtype::F32] {
            let gate_f: Vec<f32> = (0..e * h).map(|_| rng.random_range(-bound..bound)).collect();
            let gate_b: Vec<bf16> = gate_f.iter().map(|&v| bf16::from_f32(v)).collect();
            let gate = if dtype == Dtype::Bf16 { TensorView::Bf16(&gate_b) } else { TensorView::F32(&gate_f) };
            let bias: Vec<f32> = (0..e).map(|_| rng.random_range(-0.02..0.02)).collect();
            for &tokens in hidden_sizes(&dev) {
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

                let dev = dev.fresh();
                let gate_dev = match gate {
                    TensorView::Bf16(g) => (dev.upload(g), Dtype::Bf16),
                    TensorView::F32(g) => (dev.upload(g), Dtype::F32),
                };
                let ws = route(&dev, &cfg, gate_dev, dev.upload(&bias), host, tokens);
                let logits = ws.logits();
                for (i, ((&g, &c), &a)) in logits.iter().zip(&cpu_logits).zip(&abs_dot).enumerate() {
                    assert!(
                        (g - c).abs() <= 1e-5 * a + 1e-30,
                        "{}: {dtype:?} T={tokens} logit {i}: kernel {g} vs CPU {c} (sum |x w| {a})",
                        dev.name()
                    );
                }
                let (cpu_ids, cpu_w) = cpu_slots(&cfg.router, cfg.n_shared_experts, &cpu_logits, tokens, Some(&bias));
                check_routing(&ws, &cpu_ids, &cpu_w, 1e-5, &format!("hidden {dtype:?} T={tokens}"));
            }
        }
    }
}

#[test]
fn routing_is_batch_invariant_and_deterministic() {
    for dev in Device::all("routing_is_batch_invariant_and_deterministic") {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let cfg = hidden_config(&dev);
        let (h, e) = (cfg.hidden_size, cfg.router.n_experts);
        let total = dev.pick(300, 40);
        let s = cfg.router.top_k + cfg.n_shared_experts;
        let gate: Vec<bf16> = (0..e * h).map(|_| bf16::from_f32(rng.random_range(-0.03..0.03))).collect();
        let x: Vec<bf16> = (0..total * h).map(|_| bf16::from_f32(rng.random_range(-2.0..2.0))).collect();
        let run = |rows: std::ops::Range<usize>| {
            let dev = dev.fresh();
            let gate_dev = (dev.upload(&gate), Dtype::Bf16);
            let ws = route(&dev, &cfg, gate_dev, 0, TensorView::Bf16(&x[rows.start * h..rows.end * h]), rows.len());
            (bits(&ws.logits()), ws.ids(), bits(&ws.weights()))
        };
        let all = run(0..total);
        assert_eq!(all, run(0..total), "{}: run to run", dev.name());
        for part in [5..6, 33..total, total - 10..total] {
            let alone = run(part.clone());
            let what = format!("{}: {part:?} alone", dev.name());
            assert_eq!(alone.0, all.0[part.start * e..part.end * e].to_vec(), "logits of {what}");
            assert_eq!(alone.1, all.1[part.start * s..part.end * s].to_vec(), "ids of {what}");
            assert_eq!(alone.2, all.2[part.start * s..part.end * s].to_vec(), "weights of {what}");
        }
    }
}

#[test]
fn logits_are_one_order_for_one_and_four_experts_per_cta() {
    for dev in Device::all("logits_are_one_order_for_one_and_four_experts_per_cta") {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let cases: &[(usize, usize, usize)] = dev.pick(
            &[(1, 128, 4096), (70, 128, 4096), (17, 9, 2056), (9, 4, 13)][..],
            &[(1, 5, 64), (9, 4, 13), (3, 2, 2056)],
        );
        for &(tokens, e, h) in cases {
            for (x_bf16, w_bf16) in [(false, false), (false, true), (true, false), (true, true)] {
                let x: Vec<f32> = (0..tokens * h).map(|_| rng.random_range(-1.0..1.0)).collect();
                let w: Vec<f32> = (0..e * h).map(|_| rng.random_range(-1.0..1.0)).collect();
                let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
                let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                let xv = if x_bf16 { TensorView::Bf16(&xb) } else { TensorView::F32(&x) };
                let wv = if w_bf16 { TensorView::Bf16(&wb) } else { TensorView::F32(&w) };
                let cpu = router_logits(xv, tokens, h, wv, e).unwrap();
                let dev = dev.fresh();
                let xd = if x_bf16 { (dev.upload(&xb), Dtype::Bf16) } else { (dev.upload(&x), Dtype::F32) };
                let wd = if w_bf16 { (dev.upload(&wb), Dtype::Bf16) } else { (dev.upload(&w), Dtype::F32) };
                let outs = [dev.poisoned(4 * tokens * e), dev.poisoned(4 * tokens * e)];
                // The wrapper's launch, then the same arguments on the other variant.
                let launch = moe::logits_launch(xd, wd, outs[0], tokens, e, h).unwrap().unwrap();
                let (e1, e4) = (moe::logits_kernel(xd.1, wd.1, 1), moe::logits_kernel(xd.1, wd.1, 1 << 20));
                let other = if std::ptr::eq(launch.kernel, e1) { e4 } else { e1 };
                let mut args = launch.args.clone();
                args[2] = dots_moe::cuda::launch::KernelArg::Ptr(outs[1]);
                let dims = LaunchDims { tokens, experts: e, hidden: h, ..LaunchDims::default() };
                dev.run(Some(launch));
                dev.run(Some(Launch::new(other, &dims, args).unwrap()));
                let (a, b) = (dev.download::<f32>(outs[0], tokens * e), dev.download::<f32>(outs[1], tokens * e));
                let what = format!("{}: {} T={tokens} E={e} H={h}", dev.name(), other.entry);
                assert_eq!(bits(&a), bits(&b), "{what}: one and four experts per CTA must sum in the same order");
                for (i, (&g, &c)) in a.iter().zip(&cpu).enumerate() {
                    assert!((g - c).abs() <= 1e-5 * (1.0 + c.abs()), "{what} [{i}]: {g} vs {c}");
                }
            }
        }
    }
}

/// Exact logits and `S = sum |x w|` per (token, expert), in f64, of `x [T, H]` and `w [E, H]`.
fn exact_logits(x: &[f32], w: &[f32], tokens: usize, e: usize, h: usize) -> (Vec<f64>, Vec<f64>) {
    use rayon::prelude::*;
    let rows: Vec<(Vec<f64>, Vec<f64>)> = (0..tokens)
        .into_par_iter()
        .map(|t| {
            let xr = &x[t * h..(t + 1) * h];
            (0..e)
                .map(|j| {
                    let products = xr.iter().zip(&w[j * h..(j + 1) * h]).map(|(&a, &b)| f64::from(a) * f64::from(b));
                    products.fold((0.0, 0.0), |(sum, mag), p| (sum + p, mag + p.abs()))
                })
                .unzip()
        })
        .collect();
    rows.into_iter().fold((Vec::new(), Vec::new()), |(mut exact, mut magnitude), (x, m)| {
        exact.extend(x);
        magnitude.extend(m);
        (exact, magnitude)
    })
}

/// The smallest gap between consecutive choices (sigmoid score + bias) among a token's top
/// k + 1: no error below half of it can change the token's ids or their order.
fn choice_gap(cfg: &RouterConfig, logits: &[f32], bias: &[f32]) -> f32 {
    let mut choice: Vec<f32> = logits.iter().zip(bias).map(|(&l, &b)| sigmoid(l) + b).collect();
    choice.sort_by(|a, b| b.total_cmp(a));
    choice.windows(2).take(cfg.top_k).map(|w| w[0] - w[1]).fold(f32::INFINITY, f32::min)
}

#[test]
fn tensor_core_logits_keep_their_rounding_contract() {
    for dev in Device::all("tensor_core_logits_keep_their_rounding_contract") {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        // (T, E, H): more than 64 tokens (the tensor cores' range), partial tiles of tokens and
        // experts.
        let cases: &[(usize, usize, usize)] =
            dev.pick(&[(2053, 128, 4096), (100, 9, 2048), (69, 130, 1024)][..], &[(70, 9, 96), (69, 24, 256)]);
        let cfg = RouterConfig { n_experts: 1, top_k: 4, ..RouterConfig::dots1() };
        for &(tokens, e, h) in cases {
            let cfg = RouterConfig { n_experts: e, top_k: cfg.top_k.min(e - 1), ..cfg.clone() };
            let bound_w = (3.0 / h as f32).sqrt();
            let x: Vec<f32> = (0..tokens * h).map(|_| rng.random_range(-1.7..1.7)).collect();
            let w: Vec<f32> = (0..e * h).map(|_| rng.random_range(-bound_w..bound_w)).collect();
            let bias: Vec<f32> = (0..e).map(|_| rng.random_range(-0.02..0.02)).collect();
            for (x_bf16, w_bf16) in [(true, true), (false, true), (true, false), (false, false)] {
                let round = |v: &[f32], b: bool| -> Vec<f32> {
                    v.iter().map(|&a| if b { bf16::from_f32(a).to_f32() } else { a }).collect()
                };
                let (xv, wv) = (round(&x, x_bf16), round(&w, w_bf16));
                let (exact, magnitude) = exact_logits(&xv, &wv, tokens, e, h);
                let relative = moe::tensor_core_logit_bound(h, !x_bf16, !w_bf16);
                let what = format!("{}: T={tokens} E={e} H={h} x {x_bf16} w {w_bf16} (bf16?)", dev.name());

                let dev = dev.fresh();
                let up = |v: &[f32], b: bool| -> (u64, Dtype) {
                    if b {
                        (dev.upload(&v.iter().map(|&a| bf16::from_f32(a)).collect::<Vec<_>>()), Dtype::Bf16)
                    } else {
                        (dev.upload(v), Dtype::F32)
                    }
                };
                let (xd, wd) = (up(&xv, x_bf16), up(&wv, w_bf16));
                let tc = moe::LogitsKernel::TensorCores;
                let out = dev.poisoned(4 * tokens * e);
                let launch = moe::logits_launch_with(tc, xd, wd, out, tokens, e, h).unwrap().unwrap();
                assert!(launch.kernel.entry.starts_with("moe_router_logits_tc_"), "{what}: {}", launch.kernel.entry);
                dev.run(Some(launch));
                // A part of the batch alone (still more than 64 tokens): the same bits.
                let part = 65;
                let first = (tokens - part).min(3);
                let x_part = match xd.1 {
                    Dtype::Bf16 => {
                        let b: Vec<bf16> =
                            xv[first * h..(first + part) * h].iter().map(|&a| bf16::from_f32(a)).collect();
                        (dev.upload(&b), Dtype::Bf16)
                    }
                    Dtype::F32 => (dev.upload(&xv[first * h..(first + part) * h]), Dtype::F32),
                };
                let out_part = dev.poisoned(4 * part * e);
                dev.run(moe::logits_launch_with(tc, x_part, wd, out_part, part, e, h).unwrap());
                let got: Vec<f32> = dev.download(out, tokens * e);
                let alone: Vec<f32> = dev.download(out_part, part * e);
                assert_eq!(
                    bits(&alone),
                    bits(&got[first * e..(first + part) * e]),
                    "{what}: a token's logits depend on its batch"
                );

                let mut worst = 0.0f64;
                for (i, ((&g, &x), &s)) in got.iter().zip(&exact).zip(&magnitude).enumerate() {
                    let err = (f64::from(g) - x).abs();
                    assert!(
                        err <= f64::from(relative) * s + 1e-30,
                        "{what}: logit {i}: {g} vs exact {x}, error {err:.3e} > {relative:.3e} x S = {s:.3e}"
                    );
                    worst = worst.max(err / s.max(1e-30));
                }
                eprintln!("{what}: worst error {worst:.2e} x S (contract {relative:.2e} x S)");

                // The ids equal the CPU's wherever the gap between choices exceeds what both
                // roundings can move them (sigmoid is 1/4-Lipschitz).
                let cpu = router_logits(TensorView::F32(&xv), tokens, h, TensorView::F32(&wv), e).unwrap();
                let cpu_bound = h as f64 * 2f64.powi(-24);
                let ws = select(&dev, &cfg, 0, &got, tokens, Some(&bias));
                let (cpu_ids, _) = cpu_slots(&cfg, 0, &cpu, tokens, Some(&bias));
                let ids = ws.ids();
                let k = cfg.top_k;
                let mut decided = 0;
                for t in 0..tokens {
                    let s_max = magnitude[t * e..(t + 1) * e].iter().copied().fold(0.0, f64::max);
                    let moved = ((f64::from(relative) + cpu_bound) * s_max / 4.0) as f32;
                    if choice_gap(&cfg, &cpu[t * e..(t + 1) * e], &bias) > 2.0 * moved {
                        decided += 1;
                        assert_eq!(ids[t * k..(t + 1) * k], cpu_ids[t * k..(t + 1) * k], "{what}: token {t}'s ids");
                    }
                }
                eprintln!("{what}: {decided} of {tokens} tokens decided beyond the bound, all equal to the CPU");
                assert!(decided * 2 >= tokens, "{what}: too few tokens decided beyond the bound to test the ids");
            }
        }
    }
}

fn permute_ids<'a>(dev: &'a Device, ids: &[u32], tokens: usize, s: usize, n_slots: usize) -> Ws<'a> {
    let ws = Ws::new(dev, tokens, 0, s, n_slots);
    let ws = Ws {
        ptrs: WorkspacePtrs {
            slot_ids: dev.upload(ids),
            slot_weights: dev.upload(&vec![1.0f32; ids.len()]),
            ..ws.ptrs
        },
        ..ws
    };
    ws.permute();
    ws
}

#[test]
fn permutation_matches_the_cpu() {
    for dev in Device::all("permutation_matches_the_cpu") {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut cases: Vec<(usize, usize, usize)> = sizes(&dev).iter().map(|&t| (t, 8, 130)).collect();
        // Many tiles: 6 (the last of 3 tokens); 21, more than a CTA's warps (the last CTA's
        // scan gives each warp 3 tiles and the eighth none).
        let many = [(5 * moe::TILE_TOKENS + 3, 8, 130), (20 * moe::TILE_TOKENS + 5, 2, 37)];
        cases.extend([(3, 3, 4), (40, 9, 300), (65, 1, 1)].into_iter().chain(many));
        for (tokens, s, n_slots) in cases {
            for skew in ["uniform", "one expert has most", "six experts only", "duplicates"] {
                let ids: Vec<u32> = (0..tokens * s)
                    .map(|p| match skew {
                        "uniform" => rng.random_range(0..n_slots as u32),
                        "one expert has most" => {
                            if rng.random_bool(0.9) {
                                (41 % n_slots) as u32
                            } else {
                                rng.random_range(0..n_slots as u32)
                            }
                        }
                        "six experts only" => ((p % 6) * 25 % n_slots) as u32,
                        _ => rng.random_range(0..3.min(n_slots) as u32),
                    })
                    .collect();
                let dev = dev.fresh();
                let ws = permute_ids(&dev, &ids, tokens, s, n_slots);
                let what = format!("{}: T={tokens} slots_per_token={s} slots={n_slots} {skew}", dev.name());
                ws.permute_error().unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(ws.permutation(), permute(&ids, tokens, s, n_slots).unwrap(), "{what}");
                ws.check_tiles(&ids, &what);
            }
        }
        // Out of range: the CPU's error, for the first such pair of its tile.
        let s = 8;
        let mut ids = vec![3u32; 40 * s];
        ids[37 * s + 2] = 130;
        ids[38 * s] = 200;
        let ws = permute_ids(&dev, &ids, 40, s, 130);
        assert_eq!(ws.permute_error().unwrap_err(), permute(&ids, 40, s, 130).unwrap_err().to_string());
        assert_eq!(ws.status(), vec![0, (37 * s + 2) as u64 + 1], "{}", dev.name());
    }
}

#[test]
fn a_second_run_on_the_same_workspace_starts_from_a_reset_counter() {
    // What a CUDA graph replay does: the same launches on the same buffers, new inputs. The
    // tile scan's arrival counter must be back at 0 after each launch, or no CTA of the next
    // one sees itself last and the tile offsets stay what they were (here: poison).
    for dev in Device::all("a_second_run_on_the_same_workspace_starts_from_a_reset_counter") {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (tokens, s, n_slots) = (dev.pick(4099, 5 * moe::TILE_TOKENS + 3), 8, 130);
        let ws = Ws::new(&dev, tokens, 0, s, n_slots);
        let ws = Ws { ptrs: WorkspacePtrs { slot_weights: dev.upload(&vec![0.5f32; tokens * s]), ..ws.ptrs }, ..ws };
        for run in 0..3 {
            // Each run routes differently: uniform, then crowded on few slots, then uniform.
            let spread = if run == 1 { 5 } else { n_slots as u32 };
            let ids: Vec<u32> = (0..tokens * s).map(|_| rng.random_range(0..spread)).collect();
            dev.overwrite(ws.ptrs.slot_ids, bytemuck::cast_slice(&ids));
            ws.poison_outputs();
            ws.permute();
            let what = format!("{}: run {run}", dev.name());
            assert_eq!(ws.permutation(), permute(&ids, tokens, s, n_slots).unwrap(), "{what}");
            ws.check_tiles(&ids, &what);
        }
        // The selection's counter (the same buffer): select twice from different logits.
        let cfg = RouterConfig::dots1();
        let ws = Ws::new(&dev, tokens, cfg.n_experts, cfg.top_k + 2, cfg.n_experts + 2);
        for run in 0..2 {
            let logits = separated_logits(&mut rng, &cfg, tokens, None, 1e-5);
            dev.overwrite(ws.ptrs.logits, bytemuck::cast_slice(&logits));
            ws.poison_outputs();
            ws.select(&cfg, 2, 0);
            let (cpu_ids, cpu_w) = cpu_slots(&cfg, 2, &logits, tokens, None);
            check_routing(&ws, &cpu_ids, &cpu_w, 1e-6, &format!("selection run {run}"));
        }
    }
}

fn random_perm(rng: &mut ChaCha8Rng, tokens: usize, s: usize, n_slots: usize) -> Permutation {
    let ids: Vec<u32> = (0..tokens * s).map(|_| rng.random_range(0..n_slots as u32)).collect();
    permute(&ids, tokens, s, n_slots).unwrap()
}

#[test]
fn gather_is_bit_identical_to_the_cpu() {
    for dev in Device::all("gather_is_bit_identical_to_the_cpu") {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let cases: Vec<(usize, usize)> = dev.pick(
            sizes(&dev)
                .iter()
                .flat_map(|&t| [4096usize, 100, 7].map(|h| (t, h)))
                .filter(|&(t, h)| t != 4099 || h == 4096)
                .collect(),
            vec![(1, 40), (5, 13), (3, 2048 + 16)],
        );
        for (tokens, h) in cases {
            let s = 8;
            let perm = random_perm(&mut rng, tokens, s, 130);
            let x: Vec<f32> = (0..tokens * h).map(|_| rng.random_range(-3.0..3.0)).collect();
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            for src in [Dtype::F32, Dtype::Bf16] {
                let host = if src == Dtype::Bf16 { TensorView::Bf16(&xb) } else { TensorView::F32(&x) };
                for out in [Dtype::F32, Dtype::Bf16] {
                    let dev = dev.fresh();
                    let xd = if src == Dtype::Bf16 { dev.upload(&xb) } else { dev.upload(&x) };
                    let rp = dev.upload(&perm.row_pairs);
                    let size = if out == Dtype::Bf16 { 2 } else { 4 };
                    let od = dev.poisoned(tokens * s * h * size);
                    dev.run(moe::gather_launch((xd, src), rp, (od, out), tokens, s, h).unwrap());
                    let got: Vec<u8> = dev.download(od, tokens * s * h * size);
                    let expected: Vec<u8> = if out == Dtype::Bf16 {
                        let mut o = vec![bf16::ZERO; tokens * s * h];
                        gather_bf16(host, h, &perm, &mut o).unwrap();
                        bytemuck::cast_slice(&o).to_vec()
                    } else {
                        let mut o = vec![0.0f32; tokens * s * h];
                        gather_f32(host, h, &perm, &mut o).unwrap();
                        bytemuck::cast_slice(&o).to_vec()
                    };
                    assert!(got == expected, "{}: gather {src:?} -> {out:?} T={tokens} H={h}", dev.name());
                }
            }
        }
    }
}

#[test]
fn combine_is_bit_identical_to_the_cpu_and_run_to_run() {
    for dev in Device::all("combine_is_bit_identical_to_the_cpu_and_run_to_run") {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let cases: Vec<(usize, usize)> = dev.pick(
            sizes(&dev).iter().flat_map(|&t| [4096usize, 30].map(|h| (t, h))).collect(),
            vec![(1, 40), (5, 13), (3, 2048 + 16), (0, 8)],
        );
        for (tokens, h) in cases {
            let s = 8;
            let perm = random_perm(&mut rng, tokens, s, 130);
            // Mixed magnitudes: a different summation order would change the bits.
            let rows: Vec<f32> =
                (0..tokens * s * h).map(|i| rng.random_range(-1.0..1.0) * if i % 5 == 0 { 1e6 } else { 1.0 }).collect();
            let mut cpu = vec![0.0f32; tokens * h];
            combine(&rows, h, &perm, &mut cpu).unwrap();
            let dev = dev.fresh();
            let rd = dev.upload(&rows);
            let pr = dev.upload(&perm.pair_rows);
            let mut first = None;
            for _ in 0..dev.pick(3, 1) {
                let out = dev.poisoned(4 * tokens * h);
                dev.run(moe::combine_launch(rd, pr, out, tokens, s, h).unwrap());
                let got = bits(&dev.download::<f32>(out, tokens * h));
                assert_eq!(got, bits(&cpu), "{}: combine T={tokens} H={h}", dev.name());
                assert_eq!(first.get_or_insert_with(|| got.clone()), &got);
            }
        }
    }
}

#[test]
fn the_launch_checks_its_arguments_against_the_declaration() {
    // A launch built with a wrong argument list is refused before any launcher sees it.
    let dims = LaunchDims { tokens: 1, slots_per_token: 1, hidden: 4, ..LaunchDims::default() };
    let launch = moe::combine_launch(16, 32, 48, 1, 1, 4).unwrap().unwrap();
    let mut swapped = launch.args.clone();
    swapped.swap(2, 3);
    let refused = std::panic::catch_unwind(|| Launch::new(launch.kernel, &dims, swapped));
    assert!(refused.is_err(), "u32 and u64 swapped went unnoticed");
    let short = launch.args[..5].to_vec();
    assert!(std::panic::catch_unwind(|| Launch::new(launch.kernel, &dims, short)).is_err());
    // A grid past the limit is a typed error naming the axis, the need and the limit.
    let huge = LaunchDims { tokens: 1 << 40, ..dims };
    match Launch::new(launch.kernel, &huge, launch.args.clone()) {
        Err(CudaError::Moe(MoeError::Limit { what, needed, limit })) => {
            assert_eq!((needed, limit), (1 << 40, MAX_GRID.0), "{what}");
            assert!(what.contains("moe_combine") && what.contains(" x"), "{what}");
        }
        other => panic!("a grid of 2^40 blocks gave {other:?}"),
    }
    let at_limit = LaunchDims { tokens: MAX_GRID.0, ..dims };
    assert!(Launch::new(launch.kernel, &at_limit, launch.args.clone()).is_ok());
}

/// The `Limit` a launch builder returned: `(needed, limit)`.
fn limit_of(result: Result<Option<Launch>, CudaError>) -> (usize, usize) {
    match result {
        Err(CudaError::Moe(MoeError::Limit { needed, limit, .. })) => (needed, limit),
        other => panic!("expected a Limit error, got {other:?}"),
    }
}

#[test]
fn kernel_limits_are_limit_errors() {
    let ws = WorkspacePtrs::default();
    // Slots per token past what the combine kernel holds per token; at the limit it builds.
    let over = moe::COMBINE_MAX_SLOTS + 1;
    assert_eq!(limit_of(moe::combine_launch(16, 32, 48, 1, over, 4)), (over, moe::COMBINE_MAX_SLOTS));
    assert!(moe::combine_launch(16, 32, 48, 1, moe::COMBINE_MAX_SLOTS, 4).is_ok());
    // Shared memory of the permutation's ranking and scatter: enough slots to pass 48 KB.
    let n_slots = moe::MAX_SHARED_BYTES / 4;
    let dims = WorkspaceDims { tokens: 1, slots_per_token: 1, n_slots };
    let needed = moe::rank_shared_bytes(1, n_slots);
    assert_eq!(limit_of(moe::rank_launch(&ws, &dims)), (needed, moe::MAX_SHARED_BYTES));
    // The scatter needs no shared memory: it reads its tile's row of offsets from memory.
    assert!(moe::scatter_launch(&ws, &dims).is_ok());
    // The router: more groups than lanes, then more experts than its shared memory holds.
    let groups = RouterConfig { n_experts: 66, top_k: 2, n_group: 33, topk_group: 1, ..RouterConfig::dots1() };
    let as_limit = |r: Result<(), CudaError>| limit_of(r.map(|()| None));
    assert_eq!(as_limit(moe::check_select(&groups, 2, 66)), (33, moe::MAX_GROUPS));
    let wide = RouterConfig { n_experts: 4096, top_k: 2, n_group: 1, topk_group: 1, ..RouterConfig::dots1() };
    let needed = moe::select_shared_bytes(4096, 2, 4096);
    assert!(needed > moe::MAX_SHARED_BYTES);
    assert_eq!(as_limit(moe::check_select(&wide, 2, 4096)), (needed, moe::MAX_SHARED_BYTES));
    // dots.llm1 itself is within every limit.
    assert!(moe::check_select(&RouterConfig::dots1(), 8, 130).is_ok());
}

#[test]
fn the_pipeline_runs_inside_a_cuda_graph() {
    // The wrappers themselves (RouteCombineKernels), captured in a CUDA graph: GPU only.
    let Some((gpu, kernels)) = testing::gpu("the_pipeline_runs_inside_a_cuda_graph") else { return };
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
        let mut ws = RoutingWorkspace::for_router(&gpu, &router, tokens).unwrap();
        let mut x_perm = DeviceTensor::zeros(&gpu, Dtype::Bf16, &[tokens * 8, h]).unwrap();
        let mut out = DeviceBuffer::<f32>::zeros(&gpu, &[tokens, h]).unwrap();
        let run = |ws: &mut RoutingWorkspace, x_perm: &mut DeviceTensor, out: &mut DeviceBuffer<f32>| {
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
