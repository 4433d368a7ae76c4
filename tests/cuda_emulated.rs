//! The kernels' logic against the CPU reference, without a GPU: the kernel files run on
//! the CPU under a small emulator of CUDA's device language (`scripts/gpu/emulate`, one
//! thread per CUDA thread, AddressSanitizer on). It checks what the kernels compute, not
//! how fast or how the real compiler and memory model treat them: `tests/cuda_kernels.rs`
//! does that on a GPU.
//!
//! Runs when `DOTS_MOE_EMULATOR` names the emulator binary
//! (`scripts/gpu/emulate/build.sh` builds it into `gpu-bin/emu`); skipped otherwise.
//! The launch sequences below mirror `dots_moe::cuda::MoeKernels` argument for argument.
#![cfg(feature = "cuda")]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use dots_moe::config::{RouterConfig, Scoring};
use dots_moe::cuda::moe::{TILE_TOKENS, rank_shared_bytes, scatter_shared_bytes, select_shared_bytes, tiles};
use dots_moe::moe::{Permutation, combine, gather_bf16, gather_f32, permute, route_logits, router_logits};
use dots_moe::tensor::TensorView;
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn emulator() -> Option<PathBuf> {
    match std::env::var_os("DOTS_MOE_EMULATOR") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: set DOTS_MOE_EMULATOR to the binary scripts/gpu/emulate/build.sh builds");
            None
        }
    }
}

enum A {
    Buf(usize),
    Null,
    U32(u32),
    U64(u64),
    F32(f32),
}

#[derive(Default)]
struct Program {
    buffers: Vec<Vec<u8>>,
    launches: Vec<u8>,
    n_launches: u32,
}

impl Program {
    fn buf<T: bytemuck::Pod>(&mut self, data: &[T]) -> usize {
        self.buffers.push(bytemuck::cast_slice(data).to_vec());
        self.buffers.len() - 1
    }

    fn poisoned(&mut self, bytes: usize) -> usize {
        self.buffers.push(vec![0xff; bytes]);
        self.buffers.len() - 1
    }

    fn launch(&mut self, name: &str, grid: (usize, usize), block: u32, shared: usize, args: &[A]) {
        let l = &mut self.launches;
        l.extend((name.len() as u32).to_le_bytes());
        l.extend(name.as_bytes());
        for v in [grid.0 as u32, grid.1 as u32, block, shared as u32, args.len() as u32] {
            l.extend(v.to_le_bytes());
        }
        for a in args {
            let (kind, value) = match *a {
                A::Buf(i) => (0u8, i as u64),
                A::U32(v) => (1, u64::from(v)),
                A::U64(v) => (2, v),
                A::F32(v) => (3, u64::from(v.to_bits())),
                A::Null => (4, 0),
            };
            l.push(kind);
            l.extend(value.to_le_bytes());
        }
        self.n_launches += 1;
    }

    /// Runs the program; returns every buffer afterwards.
    fn run(self, emu: &PathBuf) -> Vec<Vec<u8>> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir();
        let tag = format!("dots-moe-emu-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let (prog, out) = (dir.join(format!("{tag}.prog")), dir.join(format!("{tag}.out")));
        let mut bytes = Vec::new();
        bytes.extend((self.buffers.len() as u32).to_le_bytes());
        for b in &self.buffers {
            bytes.extend((b.len() as u64).to_le_bytes());
            bytes.extend(b);
        }
        bytes.extend(self.n_launches.to_le_bytes());
        bytes.extend(&self.launches);
        std::fs::write(&prog, bytes).unwrap();
        let status = std::process::Command::new(emu).arg(&prog).arg(&out).status().expect("run the emulator");
        assert!(status.success(), "emulator failed: {status}");
        let data = std::fs::read(&out).unwrap();
        let _ = std::fs::remove_file(&prog);
        let _ = std::fs::remove_file(&out);
        let mut at = 4;
        let n = u32::from_le_bytes(data[0..4].try_into().unwrap()) as usize;
        (0..n)
            .map(|_| {
                let len = u64::from_le_bytes(data[at..at + 8].try_into().unwrap()) as usize;
                at += 8 + len;
                data[at - len..at].to_vec()
            })
            .collect()
    }
}

fn as_u32(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}
fn bits_of(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
fn as_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Emulated `router_select` (+ `permute_scatter` beyond one tile), as `MoeKernels::route`
/// runs them, from given logits. Returns (slot_ids, slot_weights, permutation,
/// row_weights, tile_status).
fn emulate_select(
    emu: &PathBuf,
    cfg: &RouterConfig,
    n_shared: usize,
    logits: &[f32],
    tokens: usize,
    bias: Option<&[f32]>,
) -> (Vec<u32>, Vec<f32>, Permutation, Vec<f32>, Vec<u64>) {
    let (e, s) = (cfg.n_experts, cfg.top_k + n_shared);
    let n_slots = e + n_shared;
    let (pairs, n_tiles) = (tokens * s, tiles(tokens));
    let mut p = Program::default();
    let logits_b = p.buf(logits);
    let bias_b = bias.map(|b| p.buf(b));
    let ids = p.poisoned(4 * pairs);
    let weights = p.poisoned(4 * pairs);
    let ranks = p.poisoned(4 * pairs);
    let counts = p.poisoned(4 * n_tiles * n_slots);
    let status = p.poisoned(8 * n_tiles);
    let offsets = p.poisoned(4 * (n_slots + 1));
    let row_pairs = p.poisoned(4 * pairs);
    let pair_rows = p.poisoned(4 * pairs);
    let row_weights = p.poisoned(4 * pairs);
    if tokens > 0 {
        p.launch(
            "moe_router_select",
            (n_tiles, 1),
            256,
            select_shared_bytes(e, s, n_slots),
            &[
                A::Buf(logits_b),
                bias_b.map_or(A::Null, A::Buf),
                A::U32(tokens as u32),
                A::U32(e as u32),
                A::U32(cfg.top_k as u32),
                A::U32(n_shared as u32),
                A::U32(cfg.n_group as u32),
                A::U32(cfg.topk_group as u32),
                A::U32(u32::from(cfg.scoring == Scoring::Softmax)),
                A::U32(u32::from(cfg.norm_topk_prob)),
                A::F32(cfg.routed_scaling_factor),
                A::Buf(ids),
                A::Buf(weights),
                A::Buf(ranks),
                A::Buf(counts),
                A::Buf(status),
                A::U32(u32::from(n_tiles == 1)),
                A::Buf(offsets),
                A::Buf(row_pairs),
                A::Buf(pair_rows),
                A::Buf(row_weights),
            ],
        );
    }
    // As MoeKernels::route: one tile scatters inside the selection.
    if n_tiles != 1 {
        scatter(&mut p, ids, weights, ranks, counts, tokens, s, n_slots, [offsets, row_pairs, pair_rows, row_weights]);
    }
    let out = p.run(emu);
    let perm = Permutation {
        tokens,
        slots_per_token: s,
        expert_offsets: as_u32(&out[offsets]),
        row_pairs: as_u32(&out[row_pairs]),
        pair_rows: as_u32(&out[pair_rows]),
    };
    let status = out[status].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    (as_u32(&out[ids]), as_f32(&out[weights]), perm, as_f32(&out[row_weights]), status)
}

#[allow(clippy::too_many_arguments)]
fn scatter(
    p: &mut Program,
    ids: usize,
    weights: usize,
    ranks: usize,
    counts: usize,
    tokens: usize,
    s: usize,
    n_slots: usize,
    out: [usize; 4],
) {
    let n_tiles = tiles(tokens);
    p.launch(
        "moe_permute_scatter",
        (n_tiles.max(1), 1),
        256,
        scatter_shared_bytes(n_slots),
        &[
            A::Buf(ids),
            A::Buf(weights),
            A::Buf(ranks),
            A::Buf(counts),
            A::U32(tokens as u32),
            A::U32(s as u32),
            A::U32(n_slots as u32),
            A::U32(n_tiles as u32),
            A::Buf(out[0]),
            A::Buf(out[1]),
            A::Buf(out[2]),
            A::Buf(out[3]),
        ],
    );
}

/// CPU slot ids and weights: the routing, then the shared slots with weight 1.0.
fn cpu_slots(
    cfg: &RouterConfig,
    n_shared: usize,
    logits: &[f32],
    tokens: usize,
    bias: Option<&[f32]>,
) -> (Vec<u32>, Vec<f32>) {
    route_logits(cfg, logits, tokens, bias).unwrap().with_shared_slots(cfg.n_experts, n_shared)
}

fn assert_weights_close(gpu: &[f32], cpu: &[f32], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        let tol = 1e-6 * c.abs().max(f32::MIN_POSITIVE);
        assert!((g - c).abs() <= tol, "{what}[{i}]: {g} vs {c}");
    }
}

fn random_logits(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

#[test]
fn selection_and_permutation_match_the_cpu() {
    let Some(emu) = emulator() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let dots = RouterConfig::dots1();
    let grouped = RouterConfig { n_experts: 64, top_k: 8, n_group: 8, topk_group: 3, ..RouterConfig::dots1() };
    let softmax = RouterConfig {
        n_experts: 40,
        top_k: 4,
        scoring: Scoring::Softmax,
        norm_topk_prob: false,
        routed_scaling_factor: 1.0,
        ..RouterConfig::dots1()
    };
    let small = RouterConfig { n_experts: 5, top_k: 5, ..RouterConfig::dots1() };
    for (cfg, n_shared) in [(&dots, 2), (&grouped, 1), (&softmax, 0), (&small, 3)] {
        for tokens in [0usize, 1, 3, 33, 70] {
            let e = cfg.n_experts;
            let logits = random_logits(&mut rng, tokens * e, 4.0);
            let bias: Vec<f32> = (0..e).map(|_| rng.random_range(-0.05..0.05)).collect();
            let bias = (cfg.scoring == Scoring::Sigmoid).then_some(bias);
            let (ids, weights, perm, row_w, status) =
                emulate_select(&emu, cfg, n_shared, &logits, tokens, bias.as_deref());
            let (cpu_ids, cpu_w) = cpu_slots(cfg, n_shared, &logits, tokens, bias.as_deref());
            let what = format!("E={e} k={} groups={} T={tokens}", cfg.top_k, cfg.n_group);
            assert_eq!(ids, cpu_ids, "{what}: slot ids");
            assert_weights_close(&weights, &cpu_w, &what);
            let cpu_perm = permute(&cpu_ids, tokens, cfg.top_k + n_shared, e + n_shared).unwrap();
            assert_eq!(perm, cpu_perm, "{what}: permutation");
            let expected_rw: Vec<f32> = perm.row_pairs.iter().map(|&p| weights[p as usize]).collect();
            assert_eq!(
                row_w.iter().map(|w| w.to_bits()).collect::<Vec<_>>(),
                expected_rw.iter().map(|w| w.to_bits()).collect::<Vec<_>>()
            );
            assert!(status.iter().all(|&s| s == 0), "{what}: status {status:?}");
        }
    }
}

#[test]
fn ties_go_to_the_lower_index_and_bad_logits_are_reported() {
    let Some(emu) = emulator() else { return };
    let cfg = RouterConfig { n_experts: 70, top_k: 6, ..RouterConfig::dots1() };
    // All-equal logits and no bias: every token picks experts 0..6 in index order.
    let tokens = 40;
    let logits = vec![0.25f32; tokens * 70];
    let (ids, _, _, _, status) = emulate_select(&emu, &cfg, 0, &logits, tokens, None);
    let (cpu_ids, _) = cpu_slots(&cfg, 0, &logits, tokens, None);
    assert_eq!(ids, cpu_ids);
    assert_eq!(&ids[..6], &[0, 1, 2, 3, 4, 5]);
    assert!(status.iter().all(|&s| s == 0));
    // Duplicated values among random ones.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let logits: Vec<f32> = (0..tokens * 70).map(|_| f32::from(rng.random_range(0u8..4)) * 0.5).collect();
    let (ids, _, _, _, _) = emulate_select(&emu, &cfg, 2, &logits, tokens, None);
    assert_eq!(ids, cpu_slots(&cfg, 2, &logits, tokens, None).0);
    // A NaN in token 35 (tile 1) and an infinity in token 37: the first is reported.
    let mut logits = vec![0.0f32; tokens * 70];
    logits[35 * 70 + 9] = f32::NAN;
    logits[37 * 70 + 2] = f32::INFINITY;
    let (ids, _, perm, _, status) = emulate_select(&emu, &cfg, 0, &logits, tokens, None);
    assert_eq!(status[0], 0);
    assert_eq!(status[1], ((35u64 << 32) | 9) + 1);
    assert!(ids.iter().all(|&i| i < 70), "a bad token is still routed in range");
    assert_eq!(*perm.expert_offsets.last().unwrap() as usize, tokens * 6);
}

#[test]
fn logits_match_the_cpu() {
    let Some(emu) = emulator() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (tokens, e, h) in [(1usize, 5usize, 64usize), (3, 9, 72), (17, 6, 70), (9, 4, 13), (5, 9, 2056)] {
        for (x_bf16, w_bf16) in [(false, false), (false, true), (true, false), (true, true)] {
            let x: Vec<f32> = (0..tokens * h).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..e * h).map(|_| rng.random_range(-1.0..1.0)).collect();
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let xv = if x_bf16 { TensorView::Bf16(&xb) } else { TensorView::F32(&x) };
            let wv = if w_bf16 { TensorView::Bf16(&wb) } else { TensorView::F32(&w) };
            let cpu = router_logits(xv, tokens, h, wv, e).unwrap();
            let mut p = Program::default();
            let xi = if x_bf16 { p.buf(&xb) } else { p.buf(&x) };
            let wi = if w_bf16 { p.buf(&wb) } else { p.buf(&w) };
            let outs = [p.poisoned(4 * tokens * e), p.poisoned(4 * tokens * e)];
            let name = format!(
                "moe_router_logits_{}_{}",
                if x_bf16 { "bf16" } else { "f32" },
                if w_bf16 { "bf16" } else { "f32" }
            );
            for (eb, &out) in [1usize, 4].iter().zip(&outs) {
                p.launch(
                    &format!("{name}_e{eb}"),
                    (tokens.div_ceil(8), e.div_ceil(*eb)),
                    128,
                    0,
                    &[
                        A::Buf(xi),
                        A::Buf(wi),
                        A::Buf(out),
                        A::U32(tokens as u32),
                        A::U32(e as u32),
                        A::U64(h as u64),
                        A::U32(u32::from(h % 8 == 0)),
                    ],
                );
            }
            let b = p.run(&emu);
            let (e1, e4) = (as_f32(&b[outs[0]]), as_f32(&b[outs[1]]));
            assert_eq!(bits_of(&e1), bits_of(&e4), "{name}: one and four experts per CTA must sum in the same order");
            for (i, (&g, &c)) in e1.iter().zip(&cpu).enumerate() {
                assert!((g - c).abs() <= 1e-5 * (1.0 + c.abs()), "{name} T={tokens} E={e} H={h} [{i}]: {g} vs {c}");
            }
        }
    }
}

fn emulate_permute(emu: &PathBuf, ids: &[u32], tokens: usize, s: usize, n_slots: usize) -> (Permutation, Vec<u64>) {
    let (pairs, n_tiles) = (tokens * s, tiles(tokens));
    let mut p = Program::default();
    let ids_b = p.buf(ids);
    let weights = p.buf(&vec![0.5f32; pairs]);
    let ranks = p.poisoned(4 * pairs);
    let counts = p.poisoned(4 * n_tiles * n_slots);
    let status = p.poisoned(8 * n_tiles);
    let out = [p.poisoned(4 * (n_slots + 1)), p.poisoned(4 * pairs), p.poisoned(4 * pairs), p.poisoned(4 * pairs)];
    if tokens > 0 {
        p.launch(
            "moe_permute_rank",
            (n_tiles, 1),
            256,
            rank_shared_bytes(s, n_slots),
            &[
                A::Buf(ids_b),
                A::U32(tokens as u32),
                A::U32(s as u32),
                A::U32(n_slots as u32),
                A::Buf(ranks),
                A::Buf(counts),
                A::Buf(status),
            ],
        );
    }
    scatter(&mut p, ids_b, weights, ranks, counts, tokens, s, n_slots, out);
    let b = p.run(emu);
    let perm = Permutation {
        tokens,
        slots_per_token: s,
        expert_offsets: as_u32(&b[out[0]]),
        row_pairs: as_u32(&b[out[1]]),
        pair_rows: as_u32(&b[out[2]]),
    };
    (perm, b[status].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect())
}

#[test]
fn permutation_of_any_ids_matches_the_cpu() {
    let Some(emu) = emulator() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (tokens, s, n_slots) in
        [(0usize, 8usize, 130usize), (1, 8, 130), (3, 3, 4), (40, 8, 130), (70, 9, 300), (65, 1, 1)]
    {
        for skew in [false, true] {
            // Duplicates within a token are allowed here; skew: most pairs on slot 0.
            let ids: Vec<u32> = (0..tokens * s)
                .map(|_| if skew && rng.random_bool(0.9) { 0 } else { rng.random_range(0..n_slots as u32) })
                .collect();
            let (perm, status) = emulate_permute(&emu, &ids, tokens, s, n_slots);
            assert_eq!(
                perm,
                permute(&ids, tokens, s, n_slots).unwrap(),
                "T={tokens} S={s} slots={n_slots} skew={skew}"
            );
            assert!(status.iter().all(|&x| x == 0));
        }
    }
    // An id out of range: reported for the first such pair of its tile.
    let mut ids = vec![1u32; 40 * 2];
    ids[2 * 33 + 1] = 9;
    ids[2 * 34] = 4;
    let (_, status) = emulate_permute(&emu, &ids, 40, 2, 4);
    assert_eq!(status, vec![0, (2 * 33 + 1) as u64 + 1]);
    assert_eq!(TILE_TOKENS, 32);
}

#[test]
fn gather_and_combine_match_the_cpu_bit_for_bit() {
    let Some(emu) = emulator() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for (tokens, s, h) in [(1usize, 8usize, 40usize), (5, 3, 13), (9, 8, 2048 + 16), (3, 2, 7)] {
        let n_slots = 10;
        let ids: Vec<u32> = (0..tokens * s).map(|_| rng.random_range(0..n_slots as u32)).collect();
        let perm = permute(&ids, tokens, s, n_slots).unwrap();
        let x: Vec<f32> = (0..tokens * h).map(|_| rng.random_range(-3.0..3.0)).collect();
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        for (src_bf16, out_bf16) in [(false, false), (false, true), (true, false), (true, true)] {
            let mut p = Program::default();
            let xi = if src_bf16 { p.buf(&xb) } else { p.buf(&x) };
            let rp = p.buf(&perm.row_pairs);
            let out = p.poisoned(tokens * s * h * if out_bf16 { 2 } else { 4 });
            let name = format!(
                "moe_gather_{}_to_{}",
                if src_bf16 { "bf16" } else { "f32" },
                if out_bf16 { "bf16" } else { "f32" }
            );
            p.launch(
                &name,
                (tokens * s, h.div_ceil(8 * 256)),
                256,
                0,
                &[
                    A::Buf(xi),
                    A::Buf(rp),
                    A::Buf(out),
                    A::U32(s as u32),
                    A::U64(h as u64),
                    A::U32(u32::from(h % 8 == 0)),
                ],
            );
            let got = p.run(&emu).swap_remove(out);
            let src = if src_bf16 { TensorView::Bf16(&xb) } else { TensorView::F32(&x) };
            let expected: Vec<u8> = if out_bf16 {
                let mut o = vec![bf16::ZERO; tokens * s * h];
                gather_bf16(src, h, &perm, &mut o).unwrap();
                bytemuck::cast_slice(&o).to_vec()
            } else {
                let mut o = vec![0.0f32; tokens * s * h];
                gather_f32(src, h, &perm, &mut o).unwrap();
                bytemuck::cast_slice(&o).to_vec()
            };
            assert_eq!(got, expected, "{name} T={tokens} S={s} H={h}");
        }
        // Combine: rows with mixed magnitudes so the order of the sum matters.
        let rows: Vec<f32> =
            (0..tokens * s * h).map(|i| rng.random_range(-1.0..1.0) * if i % 3 == 0 { 1e7 } else { 1.0 }).collect();
        let mut p = Program::default();
        let ri = p.buf(&rows);
        let pr = p.buf(&perm.pair_rows);
        let out = p.poisoned(4 * tokens * h);
        p.launch(
            "moe_combine",
            (tokens, h.div_ceil(4 * 256)),
            256,
            0,
            &[A::Buf(ri), A::Buf(pr), A::U32(s as u32), A::U64(h as u64), A::U32(u32::from(h % 4 == 0)), A::Buf(out)],
        );
        let got = as_f32(&p.run(&emu)[out]);
        let mut expected = vec![0.0f32; tokens * h];
        combine(&rows, h, &perm, &mut expected).unwrap();
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "combine T={tokens} S={s} H={h}"
        );
    }
}
