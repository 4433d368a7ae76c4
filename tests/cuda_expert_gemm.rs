//! The grouped expert GEMMs alone (steps 3 and 4 of the contract) against
//! `dots_moe::moe::grouped_experts` under `Precision::Bf16`, on every launcher
//! (`tests/kernel_support`: the CPU emulator always, with its C++ models of `mma.sync`,
//! `ldmatrix`, `cp.async` and `wgmma` written from the PTX ISA; the GPU when one opens),
//! running the launches `ExpertGemm` makes, on fresh random inputs, for every way the work
//! can be split (decode and tiled by row count, all tiled with `mma.sync`, all tiled with
//! `wgmma` on sm_90a and on the emulator, batch-invariant).
//!
//! - sizes: on the GPU the row counts of T = 1, 3, 17, 256 and 4099 tokens under uniform
//!   routing, a skewed batch (one slot with most rows, many empty), counts on every regime
//!   boundary (8/9, 16/17, 32/33, 64/65 rows of the decode tiles, 128/129 of the tiled
//!   ones); on the emulator (one thread per CUDA thread) T = 1 and 17 and one count of
//!   every decode tile class and of one and two tiles; K = 512 makes the stage rings wrap;
//! - relative error `||gpu - cpu|| / ||cpu|| <= 1e-2` for the weighted rows `y` and the
//!   activation (a test-local reference of GEMM 1);
//! - outputs poisoned (NaN) before every run: an element no kernel writes fails;
//! - two runs bit-identical; in the batch-invariant mode a row computed alone equals the
//!   same row inside a batch, bit for bit;
//! - the shared slots sum to the unfused shared MLP (width `n_shared * I`).
//!
//! Without a GPU its half is skipped (`DOTS_MOE_REQUIRE_GPU=1` makes that a failure);
//! without a C++ compiler the emulator's (`DOTS_MOE_REQUIRE_EMULATOR=1`).
#![cfg(feature = "cuda")]

mod kernel_support;
mod support;

use dots_moe::config::{MoeConfig, RouterConfig};
use dots_moe::cpu::Isa;
use dots_moe::cuda::Arch;
use dots_moe::cuda::expert_gemm::{self, GemmOptions, GemmPtrs, ITEM_WORDS, TiledKernel};
use dots_moe::moe::{MoeWeights, Permutation, Precision, grouped_experts};
use dots_moe::tensor::{Dtype, TensorView};
use half::bf16;
use kernel_support::Device;
use rand::Rng;
use rand::seq::index::sample;
use rayon::prelude::*;
use support::gemm::{all_options_for, assert_close, bits, random_bf16, rng};

const H: usize = 512;
const I: usize = 256;
const E: usize = 16;
const K: usize = 4;
const N_SHARED: usize = 2;
const N_SLOTS: usize = E + N_SHARED;

fn config() -> MoeConfig {
    MoeConfig {
        hidden_size: H,
        moe_intermediate_size: I,
        n_shared_experts: N_SHARED,
        router: RouterConfig { n_experts: E, top_k: K, ..RouterConfig::dots1() },
    }
}

/// One grouped step's inputs: rows sorted by slot.
struct Case {
    counts: Vec<usize>,
    perm: Permutation,
    x: Vec<bf16>,
    row_weights: Vec<f32>,
}

impl Case {
    fn rows(&self) -> usize {
        self.perm.rows()
    }

    /// Rows `counts[e]` for slot `e`, random x in ±1, random routing weights (1.0 for the
    /// shared slots).
    fn from_counts(counts: &[usize], seed: u64) -> Case {
        assert_eq!(counts.len(), N_SLOTS);
        let rows: usize = counts.iter().sum();
        let mut offsets = vec![0u32];
        for &c in counts {
            offsets.push(offsets.last().unwrap() + c as u32);
        }
        let identity: Vec<u32> = (0..rows as u32).collect();
        let perm = Permutation {
            tokens: rows,
            slots_per_token: 1,
            expert_offsets: offsets,
            row_pairs: identity.clone(),
            pair_rows: identity,
        };
        let mut r = rng(seed);
        let x = random_bf16(&mut r, rows * H, 1.0);
        let mut row_weights = Vec::with_capacity(rows);
        for (e, &c) in counts.iter().enumerate() {
            for _ in 0..c {
                row_weights.push(if e >= E { 1.0 } else { r.random_range(0.05f32..2.5) });
            }
        }
        Case { counts: counts.to_vec(), perm, x, row_weights }
    }
}

/// Per-slot row counts of `tokens` tokens routed uniformly (k distinct experts each) plus
/// the shared slots.
fn uniform_counts(tokens: usize, seed: u64) -> Vec<usize> {
    let mut r = rng(seed);
    let mut counts = vec![0usize; N_SLOTS];
    for _ in 0..tokens {
        for e in sample(&mut r, E, K) {
            counts[e] += 1;
        }
    }
    for c in &mut counts[E..] {
        *c = tokens;
    }
    counts
}

/// One slot with most rows, half the slots empty.
fn skewed_counts() -> Vec<usize> {
    let mut counts = vec![0usize; N_SLOTS];
    counts[3] = 1500;
    counts[5] = 40;
    counts[11] = 1;
    counts[E] = 700;
    counts[E + 1] = 700;
    counts
}

/// Every regime boundary: decode tiles of 8 / 16 / 32 / 64 rows, tiles of 128 rows.
fn boundary_counts() -> Vec<usize> {
    vec![0, 1, 7, 8, 9, 16, 17, 32, 33, 63, 64, 65, 127, 128, 129, 300, 2, 1]
}

fn weights() -> MoeWeights {
    MoeWeights::synthetic(&config(), Dtype::Bf16, 42).unwrap()
}

/// The CPU reference: weighted rows `y [R, H]`.
fn cpu_rows(weights: &MoeWeights, case: &Case) -> Vec<f32> {
    grouped_experts(weights, TensorView::Bf16(&case.x), &case.perm, &case.row_weights, Precision::Bf16, Isa::detect())
        .unwrap()
}

/// GEMM 1 + SwiGLU by the contract's formula, plainly: `a [R, I]` as f32 (bf16 values).
fn cpu_activation(weights: &MoeWeights, case: &Case) -> Vec<f32> {
    let TensorView::Bf16(gate_up) = weights.gate_up() else { panic!("bf16 weights") };
    let slot_of_row: Vec<usize> =
        case.counts.iter().enumerate().flat_map(|(e, &c)| std::iter::repeat_n(e, c)).collect();
    let mut act = vec![0.0f32; case.rows() * I];
    act.par_chunks_mut(I).enumerate().for_each(|(r, out)| {
        let x = &case.x[r * H..(r + 1) * H];
        let slot = &gate_up[slot_of_row[r] * 2 * I * H..];
        for (i, o) in out.iter_mut().enumerate() {
            let dot = |row: usize| -> f32 {
                x.iter().zip(&slot[row * H..(row + 1) * H]).map(|(a, b)| a.to_f32() * b.to_f32()).sum()
            };
            let (g, u) = (dot(i), dot(I + i));
            *o = bf16::from_f32(g / (1.0 + (-g).exp()) * u).to_f32();
        }
    });
    act
}

/// What one run returns.
struct Run {
    act: Vec<f32>,
    y: Vec<f32>,
    items: (usize, usize),
}

/// The weights on a launcher: `(gate_up, down)` addresses.
fn upload_weights(dev: &Device, weights: &MoeWeights) -> (u64, u64) {
    let (TensorView::Bf16(gate_up), TensorView::Bf16(down)) = (weights.gate_up(), weights.down()) else { panic!() };
    (dev.upload(gate_up), dev.upload(down))
}

/// A GEMM workspace for `rows` rows under `options` on `dev`, every buffer poisoned.
fn poisoned_ptrs(dev: &Device, options: &GemmOptions, rows: usize) -> GemmPtrs {
    let (decode_capacity, tiled_capacity) = options.capacities(rows, N_SLOTS);
    GemmPtrs {
        decode_items: dev.poisoned(4 * ITEM_WORDS * decode_capacity),
        tiled_items: dev.poisoned(4 * ITEM_WORDS * tiled_capacity),
        item_counts: dev.poisoned(4 * 3),
        act: dev.poisoned(2 * rows * I),
        decode_capacity,
        tiled_capacity,
        rows,
        n_slots: N_SLOTS,
    }
}

/// Schedule, GEMM 1, GEMM 2 as `ExpertGemm::run` queues them, every output poisoned.
fn run(dev: &Device, options: GemmOptions, weights: &MoeWeights, case: &Case) -> Run {
    run_on_ctas(dev, options, weights, case, None)
}

/// [`run`], with the persistent grids of the warp-specialised kernels cut to `ctas` CTAs
/// (each then runs several tiles, and its ring wraps across them).
fn run_on_ctas(dev: &Device, options: GemmOptions, weights: &MoeWeights, case: &Case, ctas: Option<u32>) -> Run {
    let dev = dev.fresh();
    let (gate_up, down) = upload_weights(&dev, weights);
    let rows = case.rows();
    let ws = poisoned_ptrs(&dev, &options, rows);
    let offsets = dev.upload(&case.perm.expert_offsets);
    let x = dev.upload(&case.x);
    let row_weights = dev.upload(&case.row_weights);
    let y = dev.poisoned(4 * rows * H);
    dev.run(Some(expert_gemm::schedule_launch(&options, offsets, N_SLOTS, &ws).unwrap()));
    let persistent = |mut l: dots_moe::cuda::launch::Launch| {
        if let Some(ctas) = ctas
            && l.kernel.file == "expert_gemm_ws.cu"
        {
            l.grid.0 = l.grid.0.min(ctas);
        }
        Some(l)
    };
    for l in expert_gemm::up_launches(&options, x, gate_up, H, I, &ws).unwrap() {
        dev.run(persistent(l));
    }
    for l in expert_gemm::down_launches(&options, down, row_weights, y, H, I, &ws).unwrap() {
        dev.run(persistent(l));
    }
    let counts: Vec<u32> = dev.download(ws.item_counts, 3);
    assert_eq!(counts[2], 0, "{}: an item list overflowed", dev.name());
    let act: Vec<half::bf16> = dev.download(ws.act, rows * I);
    Run {
        act: act.iter().map(|v| v.to_f32()).collect(),
        y: dev.download(y, rows * H),
        items: (counts[0] as usize, counts[1] as usize),
    }
}

/// Every way the work can be split on `dev` (the emulator runs the `sm_90a` set).
fn options(dev: &Device) -> Vec<(&'static str, GemmOptions)> {
    match dev {
        Device::Gpu { gpu, .. } => all_options_for(gpu.target()),
        // The emulator: one of each kernel path (it runs one thread per CUDA thread).
        Device::Emulator(_) => {
            // (The fewer-launches set runs these GEMM kernels as the default set does.)
            let skip = ["default-mma", "fewer-launches"];
            all_options_for(Arch::SM_90A).into_iter().filter(|(label, _)| !skip.contains(label)).collect()
        }
    }
}

/// The items the schedule must have made, by its documented rule.
fn expected_items(options: &GemmOptions, counts: &[usize]) -> (usize, usize) {
    let (mut decode, mut tiled) = (0, 0);
    for &c in counts.iter().filter(|&&c| c > 0) {
        if options.batch_invariant {
            decode += c.div_ceil(64);
        } else if c <= options.decode_max_rows.min(64) {
            decode += 1;
        } else {
            tiled += c.div_ceil(128);
        }
    }
    (decode, tiled)
}

fn check_case(dev: &Device, weights: &MoeWeights, name: &str, case: &Case) {
    let want_y = cpu_rows(weights, case);
    let want_act = cpu_activation(weights, case);
    let mut by_label = std::collections::HashMap::new();
    for (label, options) in options(dev) {
        let run = run(dev, options, weights, case);
        let name = format!("{}: {name} / {label}", dev.name());
        assert_eq!(run.items, expected_items(&options, &case.counts), "{name}: work items");
        assert_close(&format!("{name}: activation"), &run.act, &want_act);
        assert_close(&format!("{name}: weighted rows"), &run.y, &want_y);
        if options.tiled == TiledKernel::WarpSpecialized {
            // Three persistent CTAs: several tiles per CTA, the same bits.
            let few = run_on_ctas(dev, options, weights, case, Some(3));
            assert!(bits(&few.y) == bits(&run.y), "{name}: 3 persistent CTAs change the weighted rows");
            assert!(bits(&few.act) == bits(&run.act), "{name}: 3 persistent CTAs change the activation");
        }
        by_label.insert(label, run);
    }
    // The second generation sums in the first one's order: the same bits.
    for (first, second) in [("all-tiled-wgmma", "all-tiled-ws"), ("default", "default-ws")] {
        if let (Some(a), Some(b)) = (by_label.get(first), by_label.get(second))
            && options(dev).iter().any(|(l, o)| *l == first && o.tiled == TiledKernel::Wgmma)
        {
            assert!(bits(&a.y) == bits(&b.y), "{}: {name}: {second} and {first} differ", dev.name());
            assert!(bits(&a.act) == bits(&b.act), "{}: {name}: {second} and {first} differ", dev.name());
        }
    }
}

/// One count of every decode tile class (1, 9, 20, 33 rows) and of one- and two-tile slots
/// (70, 129), the rest empty: the emulator's regime coverage.
fn emulator_counts() -> Vec<usize> {
    let mut counts = vec![0usize; N_SLOTS];
    counts[..8].copy_from_slice(&[0, 1, 9, 20, 33, 70, 129, 2]);
    counts
}

#[test]
fn gemm_matches_cpu_at_every_size() {
    let weights = weights();
    for dev in Device::all("gemm_matches_cpu_at_every_size") {
        for &tokens in dev.pick(&[1, 3, 17, 256, 4099][..], &[1]) {
            let case = Case::from_counts(&uniform_counts(tokens, tokens as u64), 100 + tokens as u64);
            check_case(&dev, &weights, &format!("T = {tokens}"), &case);
        }
    }
}

#[test]
fn gemm_matches_cpu_with_skewed_and_boundary_counts() {
    let weights = weights();
    for dev in Device::all("gemm_matches_cpu_with_skewed_and_boundary_counts") {
        if dev.is_gpu() {
            check_case(&dev, &weights, "skewed", &Case::from_counts(&skewed_counts(), 7));
            check_case(&dev, &weights, "boundaries", &Case::from_counts(&boundary_counts(), 8));
        } else {
            check_case(&dev, &weights, "every tile class", &Case::from_counts(&emulator_counts(), 8));
        }
    }
}

#[test]
fn gemm_is_bit_identical_run_to_run() {
    let weights = weights();
    for dev in Device::all("gemm_is_bit_identical_run_to_run") {
        let cases = if dev.is_gpu() {
            vec![Case::from_counts(&boundary_counts(), 9), Case::from_counts(&uniform_counts(256, 1), 10)]
        } else {
            // The emulator is deterministic by construction: nothing to learn.
            vec![]
        };
        for case in cases {
            for (label, options) in options(&dev) {
                let a = run(&dev, options, &weights, &case);
                let b = run(&dev, options, &weights, &case);
                assert!(bits(&a.y) == bits(&b.y), "{}: {label}: weighted rows differ between two runs", dev.name());
                assert!(bits(&a.act) == bits(&b.act), "{}: {label}: activations differ between two runs", dev.name());
            }
        }
    }
}

#[test]
fn batch_invariant_rows_do_not_depend_on_the_batch() {
    let weights = weights();
    for dev in Device::all("batch_invariant_rows_do_not_depend_on_the_batch") {
        for (label, options) in options(&dev).into_iter().filter(|(_, o)| o.batch_invariant) {
            let (batch, slots) = if dev.is_gpu() {
                // Rows of slots with 1, 9, 65, 129 and 300 rows (several chunks), computed alone.
                (Case::from_counts(&boundary_counts(), 11), vec![1usize, 4, 11, 14, 15])
            } else {
                // Slots with 9 and 70 rows (two decode chunks).
                let mut counts = vec![0usize; N_SLOTS];
                counts[2] = 9;
                counts[5] = 70;
                (Case::from_counts(&counts, 11), vec![2usize, 5])
            };
            let full = run(&dev, options, &weights, &batch);
            let mut r = rng(12);
            for slot in slots {
                let begin = batch.perm.expert_offsets[slot] as usize;
                let row = begin + r.random_range(0..batch.counts[slot]);
                let mut counts = vec![0usize; N_SLOTS];
                counts[slot] = 1;
                let mut alone = Case::from_counts(&counts, 0);
                alone.x.copy_from_slice(&batch.x[row * H..(row + 1) * H]);
                alone.row_weights[0] = batch.row_weights[row];
                let single = run(&dev, options, &weights, &alone);
                let what = format!("{}: {label}: slot {slot}, row {row}", dev.name());
                assert!(
                    bits(&single.y) == bits(&full.y[row * H..(row + 1) * H]),
                    "{what}: alone and inside the batch differ"
                );
                assert!(bits(&single.act) == bits(&full.act[row * I..(row + 1) * I]), "{what}: activation");
            }
        }
    }
}

#[test]
fn shared_slots_equal_the_unfused_shared_mlp() {
    let weights = weights();
    for dev in Device::all("shared_slots_equal_the_unfused_shared_mlp") {
        let tokens = dev.pick(70, 8);
        let mut counts = vec![0usize; N_SLOTS];
        counts[E..].iter_mut().for_each(|c| *c = tokens);
        let mut case = Case::from_counts(&counts, 13);
        // The same token rows in both shared slots.
        let (first, rest) = case.x.split_at_mut(tokens * H);
        rest.copy_from_slice(first);
        // The unfused shared MLP of width n_shared * I, from the checkpoint-shaped tensors the
        // slots were split from: gate / up [n_shared I, H] (slot rows stacked), down [H, n_shared I].
        let (TensorView::Bf16(gate_up), TensorView::Bf16(down)) = (weights.gate_up(), weights.down()) else { panic!() };
        let f = |v: bf16| v.to_f32();
        let mut want = vec![0.0f32; tokens * H];
        want.par_chunks_mut(H).enumerate().for_each(|(t, out)| {
            let x = &case.x[t * H..(t + 1) * H];
            let mut a = vec![0.0f32; N_SHARED * I];
            for (j, aj) in a.iter_mut().enumerate() {
                let (slot, i) = (E + j / I, j % I);
                let base = slot * 2 * I * H;
                let dot =
                    |row: usize| -> f32 { x.iter().zip(&gate_up[base + row * H..]).map(|(p, q)| f(*p) * f(*q)).sum() };
                let (g, u) = (dot(i), dot(I + i));
                *aj = bf16::from_f32(g / (1.0 + (-g).exp()) * u).to_f32();
            }
            for (h, o) in out.iter_mut().enumerate() {
                // down_shared[h][j] = slot (E + j / I)'s down[h][j % I].
                *o = (0..N_SHARED * I).map(|j| a[j] * f(down[(E + j / I) * H * I + h * I + j % I])).sum();
            }
        });
        for (label, options) in options(&dev) {
            let run = run(&dev, options, &weights, &case);
            let fused: Vec<f32> = (0..tokens * H).map(|i| run.y[i] + run.y[tokens * H + i]).collect();
            assert_close(&format!("{}: {label}: fused shared slots vs unfused shared MLP", dev.name()), &fused, &want);
        }
    }
}

/// GEMM 1 of `case`'s slots under `options`, its rows gathered (`x`) or read from hidden
/// states through a permutation: the activation bits of both.
fn up_both_ways(dev: &Device, options: GemmOptions, weights: &MoeWeights, case: &Case) -> (Vec<u16>, Vec<u16>) {
    let dev = dev.fresh();
    let (gate_up, _) = upload_weights(&dev, weights);
    let rows = case.rows();
    // Hidden states of T tokens, S slots per token; permuted row r holds the pair
    // row_pairs[r] (an injective random map into the T S pairs), so x[r] = hidden[that / S].
    let s = 3;
    let tokens = rows.div_ceil(s);
    let mut r = rng(rows as u64);
    let hidden = random_bf16(&mut r, tokens * H, 1.0);
    let mut pairs: Vec<u32> = (0..(tokens * s) as u32).collect();
    for i in (1..pairs.len()).rev() {
        pairs.swap(i, r.random_range(0..=i));
    }
    pairs.truncate(rows);
    let x: Vec<bf16> =
        pairs.iter().flat_map(|&p| hidden[p as usize / s * H..(p as usize / s + 1) * H].to_vec()).collect();
    let offsets = dev.upload(&case.perm.expert_offsets);
    let (gathered, direct) = (poisoned_ptrs(&dev, &options, rows), poisoned_ptrs(&dev, &options, rows));
    for w in [&gathered, &direct] {
        dev.run(Some(expert_gemm::schedule_launch(&options, offsets, N_SLOTS, w).unwrap()));
    }
    for l in expert_gemm::up_launches(&options, dev.upload(&x), gate_up, H, I, &gathered).unwrap() {
        dev.run(Some(l));
    }
    let (hd, pd) = (dev.upload(&hidden), dev.upload(&pairs));
    for l in expert_gemm::up_hidden_launches(&options, hd, pd, s, gate_up, H, I, &direct).unwrap() {
        dev.run(Some(l));
    }
    (dev.download(gathered.act, rows * I), dev.download(direct.act, rows * I))
}

#[test]
fn gemm_one_reads_the_hidden_states_as_it_reads_the_gathered_rows() {
    let weights = weights();
    for dev in Device::all("gemm_one_reads_the_hidden_states_as_it_reads_the_gathered_rows") {
        let arch = match &dev {
            Device::Gpu { gpu, .. } => gpu.target(),
            Device::Emulator(_) => Arch::SM_90A,
        };
        let direct = GemmOptions::fewer_launches(arch);
        let mut sets = vec![("batch-invariant", direct.batch_invariant())];
        sets.push(("default", direct));
        sets.push(("all-tiled", GemmOptions { decode_max_rows: 0, ..direct }));
        if direct.tiled != TiledKernel::Mma {
            sets.push(("all-tiled-mma", GemmOptions { decode_max_rows: 0, tiled: TiledKernel::Mma, ..direct }));
        }
        let counts = if dev.is_gpu() { boundary_counts() } else { emulator_counts() };
        let case = Case::from_counts(&counts, 12);
        for (label, options) in sets {
            assert!(options.reads_hidden(Dtype::Bf16), "{label}");
            let (gathered, direct) = up_both_ways(&dev, options, &weights, &case);
            assert!(gathered.iter().all(|&b| bf16::from_bits(b).is_finite()), "{}: {label}: unwritten", dev.name());
            assert!(
                gathered == direct,
                "{}: {label}: GEMM 1 from the hidden states differs from the gathered rows'",
                dev.name()
            );
            eprintln!("{}: {label}: GEMM 1 from the hidden states = from the gathered rows, bit for bit", dev.name());
        }
    }
}
