//! The emulator models what the hardware does asynchronously (`tests/emulator/ptx_models.h`):
//! `cp.async` lands its bytes only at the `wait_group` that retires its group (poison
//! before); a `wgmma` may read only shared memory its writers fenced with
//! `fence.proxy.async`; its accumulators stay poisoned until a `wgmma.wait_group` leaves
//! none of its groups in flight, and its operands must not change before its group
//! completes; registers written between a wait and the next `wgmma` need a `wgmma.fence`.
//! The warps of a CTA take turns in a seeded order between barriers
//! (`tests/emulator/cuda_shim.h`), and every vector access is checked for its alignment
//! (`-fsanitize=alignment`). Here each of these is shown to catch a planted bug: the kernel
//! file is mutated, the emulator rebuilt from the mutant, and a run of its kernels must then
//! fail (an abort with the emulator's message, or output that differs from the unmutated
//! kernels'), while the unmutated kernels pass the same run. Skipped without a C++ compiler
//! (a failure with `DOTS_MOE_REQUIRE_EMULATOR=1`).
#![cfg(feature = "cuda")]

mod kernel_support;

use dots_moe::cuda::Arch;
use dots_moe::cuda::expert_gemm::{self, GemmOptions, GemmPtrs, ITEM_WORDS, TiledKernel};
use dots_moe::cuda::moe;
use dots_moe::cuda::source::FILES;
use dots_moe::tensor::Dtype;
use half::bf16;
use kernel_support::{Device, Emu};
use rand::{Rng, SeedableRng};

const H: usize = 512;
const I: usize = 128;
/// Two slots: 130 rows (two tiled items, the second nearly empty) and 3.
const COUNTS: [usize; 2] = [130, 3];

/// The tiled GEMMs of one small batch on `emu`: `(act bits, y bits)`, or the emulator's
/// failure.
fn run(emu: &Emu, tiled: TiledKernel) -> Result<(Vec<u16>, Vec<u32>), String> {
    run_with(emu, GemmOptions { decode_max_rows: 0, tiled, ..GemmOptions::for_arch(Arch::SM_90A) })
}

/// The GEMMs of the batch of [`run`] under `options` (the 3-row slot is a decode item when
/// the options send slots of up to 64 rows there).
fn run_with(emu: &Emu, options: GemmOptions) -> Result<(Vec<u16>, Vec<u32>), String> {
    let dev = Device::Emulator(Emu::new(emu.binary()));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    let n_slots = COUNTS.len();
    let rows: usize = COUNTS.iter().sum();
    let mut random = |n: usize, scale: f32| -> Vec<bf16> {
        (0..n).map(|_| bf16::from_f32(rng.random_range(-scale..scale))).collect()
    };
    let gate_up = dev.upload(&random(n_slots * 2 * I * H, 0.1));
    let down = dev.upload(&random(n_slots * H * I, 0.1));
    let x = dev.upload(&random(rows * H, 1.0));
    let row_weights = dev.upload(&vec![0.75f32; rows]);
    let offsets = dev.upload(&[0u32, COUNTS[0] as u32, rows as u32]);
    let (decode_capacity, tiled_capacity) = options.capacities(rows, n_slots);
    let ws = GemmPtrs {
        decode_items: dev.poisoned(4 * ITEM_WORDS * decode_capacity),
        tiled_items: dev.poisoned(4 * ITEM_WORDS * tiled_capacity),
        item_counts: dev.poisoned(12),
        act: dev.poisoned(2 * rows * I),
        decode_capacity,
        tiled_capacity,
        rows,
        n_slots,
    };
    let y = dev.poisoned(4 * rows * H);
    dev.run(Some(expert_gemm::schedule_launch(&options, offsets, n_slots, &ws).unwrap()));
    for l in expert_gemm::up_launches(&options, x, gate_up, H, I, &ws).unwrap() {
        dev.run(Some(l));
    }
    for l in expert_gemm::down_launches(&options, down, row_weights, y, H, I, &ws).unwrap() {
        dev.run(Some(l));
    }
    dev.finish()?;
    Ok((dev.download(ws.act, rows * I), dev.download(y, rows * H)))
}

/// A mutation: in kernel file `file`, `from` (which must occur once) becomes `to`.
type Mutation<'a> = (&'a str, &'a str, &'a str);

/// Builds the emulator of the kernel files whose names start with `prefix` (a smaller
/// translation unit to build per mutant), with `mutation` applied (`None`: unmutated).
fn emulator_with(test: &str, prefix: &str, mutation: Option<Mutation>) -> Option<Emu> {
    kernel_support::emulator(test)?;
    let mutated: Vec<(&str, String)> = FILES
        .iter()
        .filter(|f| f.name.starts_with(prefix))
        .map(|f| match mutation {
            Some((file, from, to)) if f.name == file => {
                assert_eq!(f.text.matches(from).count(), 1, "{file}: {from:?} must occur once");
                (f.name, f.text.replace(from, to))
            }
            _ => (f.name, f.text.to_string()),
        })
        .collect();
    assert!(mutation.is_none_or(|(file, ..)| mutated.iter().any(|(n, _)| *n == file)));
    let files: Vec<(&str, &str)> = mutated.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let cxx = kernel_support::compiler_name().expect("the emulator was built, so a compiler exists");
    // -O1: the mutants run one small batch; a faster build matters more.
    Some(Emu::new(&kernel_support::build(&cxx, &files, &["-O1"]).unwrap_or_else(|e| panic!("{test}: {e}"))))
}

/// The planted bug must make `run` fail: an emulator abort containing `message`, or
/// (`message` empty) results that differ from the unmutated kernels' (which must pass
/// `sane`).
fn check<T: PartialEq>(
    test: &str,
    prefix: &str,
    mutation: Mutation,
    message: &str,
    run: impl Fn(&Emu) -> Result<T, String>,
    sane: impl Fn(&T) -> bool,
) {
    let Some(good) = emulator_with(test, prefix, None) else { return };
    let want = run(&good).unwrap_or_else(|e| panic!("{test}: the unmutated kernels fail: {e}"));
    assert!(sane(&want), "{test}: the unmutated kernels' output is wrong");
    let bad = emulator_with(test, prefix, Some(mutation)).unwrap();
    let (file, from, to) = mutation;
    kernel_support::expect_caught(test, &format!("{file}: {from:?} -> {to:?}"), message, &want, run(&bad));
}

/// The tiled expert GEMM kernels of `file` with `from` -> `to` must fail (see [`check`]).
fn check_mutation(test: &str, tiled: TiledKernel, file: &str, from: &str, to: &str, message: &str) {
    check(
        test,
        "expert_gemm",
        (file, from, to),
        message,
        |emu| run(emu, tiled),
        |(_, y)| y.iter().all(|&b| f32::from_bits(b).is_finite()),
    );
}

/// The second generation's streamed decode kernels with `from` -> `to` in
/// `expert_gemm_stream.cu` must fail (see [`check`]).
fn check_stream_mutation(test: &str, from: &str, to: &str, message: &str) {
    check(
        test,
        "expert_gemm",
        ("expert_gemm_stream.cu", from, to),
        message,
        |emu| run_with(emu, GemmOptions::second_generation()),
        |(_, y)| y.iter().all(|&b| f32::from_bits(b).is_finite()),
    );
}

#[test]
fn a_short_cp_async_wait_reads_poison_in_the_mma_kernels() {
    check_mutation(
        "a_short_cp_async_wait_reads_poison_in_the_mma_kernels",
        TiledKernel::Mma,
        "expert_gemm_mma.cu",
        "cp_async_wait<MMA_STAGES - 2>();",
        "cp_async_wait<MMA_STAGES - 1>();",
        "",
    );
}

#[test]
fn a_short_cp_async_wait_reads_poison_in_the_wgmma_kernels() {
    check_mutation(
        "a_short_cp_async_wait_reads_poison_in_the_wgmma_kernels",
        TiledKernel::Wgmma,
        "expert_gemm_wgmma.cu",
        "cp_async_wait<WG_STAGES - 2>();",
        "cp_async_wait<WG_STAGES - 1>();",
        "",
    );
}

#[test]
fn a_missing_fence_proxy_async_aborts_the_wgmma() {
    check_mutation(
        "a_missing_fence_proxy_async_aborts_the_wgmma",
        TiledKernel::Wgmma,
        "expert_gemm_wgmma.cu",
        "        fence_proxy_async_shared();\n        __syncthreads();",
        "        __syncthreads();",
        "no fence.proxy.async made visible",
    );
}

#[test]
fn accumulators_read_without_wgmma_wait_are_poison() {
    check_mutation(
        "accumulators_read_without_wgmma_wait_are_poison",
        TiledKernel::Wgmma,
        "expert_gemm_wgmma.cu",
        "        wgmma_wait<0>();\n",
        "",
        "",
    );
}

#[test]
fn a_wait_group_that_leaves_the_last_wgmma_in_flight_aborts() {
    // wgmma.wait_group 1 keeps each k-tile's wgmmas in flight into the next k-tile, whose
    // cp.async refills the stage they read (what the ring's depth assumes is free).
    check_mutation(
        "a_wait_group_that_leaves_the_last_wgmma_in_flight_aborts",
        TiledKernel::Wgmma,
        "expert_gemm_wgmma.cu",
        "        wgmma_wait<0>();\n",
        "        wgmma_wait<1>();\n",
        "operands changed before its wait_group",
    );
}

#[test]
fn a_missing_wgmma_fence_aborts_the_wgmma() {
    check_mutation(
        "a_missing_wgmma_fence_aborts_the_wgmma",
        TiledKernel::Wgmma,
        "expert_gemm_wgmma.cu",
        "        wgmma_fence();\n",
        "",
        "without a wgmma.fence",
    );
}

#[test]
fn a_refilled_stage_under_a_wgmma_in_flight_aborts() {
    // The wait for the MMAs kept only for the last k-tile: a later k-tile's cp.async
    // refills a stage while the wgmma that reads it is still in flight (K = 512: 8 k-tiles
    // through 4 stages).
    check_mutation(
        "a_refilled_stage_under_a_wgmma_in_flight_aborts",
        TiledKernel::Wgmma,
        "expert_gemm_wgmma.cu",
        "        wgmma_commit();\n        wgmma_wait<0>();\n        fence_accumulators(acc);\n    }\n}",
        "        wgmma_commit();\n        if (kt + 1 == k_tiles) wgmma_wait<0>();\n        fence_accumulators(acc);\n    }\n}",
        "operands changed before its wait_group",
    );
}

// The warp-specialised kernels (expert_gemm_ws.cu): the TMA producer and the mbarrier
// ring. The batch has items of 128, 2 and 3 rows (one A box or two), GEMM 1 8 k-tiles and
// GEMM 2 2 through 4 stages.

#[test]
fn an_expect_tx_larger_than_the_tma_boxes_hangs_the_ring() {
    // Both A halves announced for an item whose second half is never loaded: the stage's
    // phase never completes, and every warp ends up waiting for it.
    check_mutation(
        "an_expect_tx_larger_than_the_tma_boxes_hangs_the_ring",
        TiledKernel::WarpSpecialized,
        "expert_gemm_ws.cu",
        "(two_halves ? 2u : 1u) * WS_HALF_BYTES",
        "2u * WS_HALF_BYTES",
        "can never complete",
    );
}

#[test]
fn a_wrong_full_barrier_parity_reads_a_stage_before_its_boxes_land() {
    // The consumers wait for the other parity: the first round passes at once and reads
    // the stages while the TMA boxes are in flight (poison).
    check_mutation(
        "a_wrong_full_barrier_parity_reads_a_stage_before_its_boxes_land",
        TiledKernel::WarpSpecialized,
        "expert_gemm_ws.cu",
        "            mbar_wait(full + 8 * s, (use / WS_STAGES) & 1u);\n            const u64 desc_a",
        "            mbar_wait(full + 8 * s, ((use / WS_STAGES) & 1u) ^ 1u);\n            const u64 desc_a",
        "",
    );
}

#[test]
fn a_stage_released_under_its_wgmma_in_flight_aborts() {
    // wait_group 2 leaves k-tile kt - 1's wgmmas in flight when its stage is released: the
    // producer refills it under them.
    check_mutation(
        "a_stage_released_under_its_wgmma_in_flight_aborts",
        TiledKernel::WarpSpecialized,
        "expert_gemm_ws.cu",
        "            wgmma_wait<1>();",
        "            wgmma_wait<2>();",
        "operands changed before its wait_group",
    );
}

#[test]
fn a_producer_that_does_not_wait_for_an_empty_stage_overwrites_it() {
    check_mutation(
        "a_producer_that_does_not_wait_for_an_empty_stage_overwrites_it",
        TiledKernel::WarpSpecialized,
        "expert_gemm_ws.cu",
        "                mbar_wait(empty + 8 * s, parity ^ 1u);\n",
        "",
        "",
    );
}

// The streamed decode kernels (expert_gemm_stream.cu): the 3-row slot is one decode item
// of one 8-row tile; GEMM 1 runs 8 k-tiles and GEMM 2 2 through the 4-stage ring.

#[test]
fn a_stream_expect_tx_of_eight_tiles_for_one_hangs_the_ring() {
    check_stream_mutation(
        "a_stream_expect_tx_of_eight_tiles_for_one_hangs_the_ring",
        "STREAM_W_BYTES + nt * STREAM_X_BOX_BYTES",
        "STREAM_W_BYTES + STREAM_MAX_TILES * STREAM_X_BOX_BYTES",
        "can never complete",
    );
}

#[test]
fn a_stream_full_barrier_parity_inverted_reads_poison() {
    check_stream_mutation(
        "a_stream_full_barrier_parity_inverted_reads_poison",
        "mbar_wait(stream_full(smem, s), (kt / STREAM_STAGES) & 1u);",
        "mbar_wait(stream_full(smem, s), ((kt / STREAM_STAGES) & 1u) ^ 1u);",
        "",
    );
}

#[test]
fn a_stream_operand_read_without_the_swizzle_is_wrong() {
    // ldmatrix addresses without the 128-byte swizzle the TMA boxes were written with.
    check_stream_mutation(
        "a_stream_operand_read_without_the_swizzle_is_wrong",
        "return r * (STREAM_BK * 2) + ((c ^ (r & 7u)) << 4);",
        "return r * (STREAM_BK * 2) + (c << 4);",
        "",
    );
}

#[test]
fn a_stream_a_fragment_with_its_k_halves_swapped_is_wrong() {
    // Matrices 1 and 2 of the weight ldmatrix exchanged: the up rows' k 0..7 read as the
    // gate rows' k 8..15.
    check_stream_mutation(
        "a_stream_a_fragment_with_its_k_halves_swapped_is_wrong",
        "const u32 a_chunk = m >> 1;",
        "const u32 a_chunk = m & 1u;",
        "",
    );
}

/// `moe_combine` of `tokens` tokens of 8 slots and `hidden` columns on `emu` (the output's
/// bits), or the emulator's failure.
fn run_combine(emu: &Emu, tokens: usize, hidden: usize) -> Result<Vec<u32>, String> {
    let dev = Device::Emulator(Emu::new(emu.binary()));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let s = 8;
    let rows: Vec<f32> = (0..tokens * s * hidden).map(|_| rng.random_range(-1.0..1.0)).collect();
    // Each token's rows at scattered places of the permuted order.
    let mut pair_rows: Vec<u32> = (0..(tokens * s) as u32).collect();
    for i in (1..pair_rows.len()).rev() {
        pair_rows.swap(i, rng.random_range(0..=i));
    }
    let rd = dev.upload(&rows);
    let pr = dev.upload(&pair_rows);
    let out = dev.poisoned(4 * tokens * hidden);
    dev.run(moe::combine_launch(rd, pr, out, tokens, s, hidden).unwrap());
    dev.finish()?;
    Ok(dev.download(out, tokens * hidden))
}

fn finite(bits: &[u32]) -> bool {
    bits.iter().all(|&b| f32::from_bits(b).is_finite())
}

#[test]
fn a_missing_syncthreads_reads_shared_memory_another_warp_has_not_written() {
    // Warp 0 stages the token's row indices in shared memory; without the barrier the other
    // seven warps may read them first (the warps' turns make that happen, reproducibly).
    // 2064 columns: every warp of the CTA owns columns.
    check(
        "a_missing_syncthreads_reads_shared_memory_another_warp_has_not_written",
        "combine",
        (
            "combine.cu",
            "rows[j] = pair_rows[token * slots + j];\n    __syncthreads();\n",
            "rows[j] = pair_rows[token * slots + j];\n",
        ),
        "",
        |emu| run_combine(emu, 3, 2048 + 16),
        |y: &Vec<u32>| finite(y),
    );
}

#[test]
fn a_misaligned_vector_access_aborts() {
    // The float4 path taken for a hidden size that is not a multiple of 4: rows start
    // 8 bytes off a 16-byte boundary.
    check(
        "a_misaligned_vector_access_aborts",
        "combine",
        ("combine.cu", "if (vectorized) {", "if (vectorized || hidden_size > 0) {"),
        "misaligned address",
        |emu| run_combine(emu, 3, 2048 + 2),
        |y: &Vec<u32>| finite(y),
    );
}

/// The tensor-core router logits of f32 `x [70, 256]` and `w [24, 256]` on `emu`: the worst
/// `|logit - exact| / (bound * S)` over the batch (at most 1 is the rounding contract).
fn tensor_core_logit_ratio(emu: &Emu) -> Result<f64, String> {
    let dev = Device::Emulator(Emu::new(emu.binary()));
    let (tokens, e, h) = (70, 24, 256);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
    let x: Vec<f32> = (0..tokens * h).map(|_| rng.random_range(-1.7..1.7)).collect();
    let w: Vec<f32> = (0..e * h).map(|_| rng.random_range(-0.1..0.1)).collect();
    let out = dev.poisoned(4 * tokens * e);
    let (xd, wd) = ((dev.upload(&x), Dtype::F32), (dev.upload(&w), Dtype::F32));
    dev.run(moe::logits_launch_with(moe::LogitsKernel::TensorCores, xd, wd, out, tokens, e, h).unwrap());
    dev.finish()?;
    let got: Vec<f32> = dev.download(out, tokens * e);
    let bound = f64::from(moe::tensor_core_logit_bound(h, true, true));
    let mut worst = 0.0f64;
    for t in 0..tokens {
        for j in 0..e {
            let pairs = x[t * h..(t + 1) * h].iter().zip(&w[j * h..(j + 1) * h]);
            let (exact, s) = pairs.fold((0.0f64, 0.0f64), |(a, m), (&p, &q)| {
                (a + f64::from(p) * f64::from(q), m + (f64::from(p) * f64::from(q)).abs())
            });
            worst = worst.max((f64::from(got[t * e + j]) - exact).abs() / (bound * s));
        }
    }
    Ok(worst)
}

#[test]
fn tensor_core_logits_without_a_split_term_break_their_rounding_contract() {
    let test = "tensor_core_logits_without_a_split_term_break_their_rounding_contract";
    let Some(good) = emulator_with(test, "route", None) else { return };
    let ratio = tensor_core_logit_ratio(&good).unwrap();
    eprintln!("{test}: unmutated, worst error {ratio:.3} of the contract");
    assert!(ratio <= 1.0, "{test}: the unmutated kernel breaks the contract ({ratio})");
    for (what, from) in [
        ("x's remainder dropped", "if (IsF32<TX>::value) mma_step(acc[j], r0l, r1l, bh);"),
        ("w's remainder dropped", "if (IsF32<TW>::value) mma_step(acc[j], r0h, r1h, bl);"),
    ] {
        let bad = emulator_with(test, "route", Some(("route.cu", from, ""))).unwrap();
        let ratio = tensor_core_logit_ratio(&bad).unwrap();
        eprintln!("{test}: {what}, worst error {ratio:.1} x the contract");
        assert!(ratio > 1.0, "{test}: {what} stays within the contract ({ratio})");
    }
}
