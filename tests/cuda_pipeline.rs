//! The sm_90 pipeline primitives of `cuda/include/pipeline.cuh` (mbarrier phases with
//! transaction counts, bulk copies that complete on them), through a producer/consumer
//! ring (`tests/emulator/probes/pipeline_probe.cu`) checked against the CPU on every
//! launcher: the emulator's models of them, and the GPU (an sm_90 device) when one opens.
//! On the emulator, the ring is also mutated with the bugs such rings have (a wrong
//! transaction count, a wrong phase parity, a stage read before its phase completes, a
//! stage refilled before its consumers are done), and each mutant must fail while the
//! unmutated probe passes the same run. Skipped without a C++ compiler or a GPU (failures
//! with `DOTS_MOE_REQUIRE_EMULATOR=1` / `DOTS_MOE_REQUIRE_GPU=1`). NVRTC compiles the probe
//! for sm_90a in `tests/cuda_static.rs`.
#![cfg(feature = "cuda")]

mod kernel_support;

use dots_moe::cuda::Arch;
use dots_moe::cuda::launch::{Elem, KernelArg, KernelDecl, Launch, LaunchDims, Param};
use dots_moe::cuda::source::KernelSource;
use kernel_support::{Device, Emu};
use rand::{Rng, SeedableRng};

const PROBE: &str = include_str!("emulator/probes/pipeline_probe.cu");
const CHUNK: usize = 384;

static RING_SUM: KernelDecl = KernelDecl {
    entry: "probe_ring_sum",
    file: "pipeline_probe.cu",
    params: &[Param::input("rows", Elem::F32), Param::u32("n_chunks"), Param::output("out", Elem::F32)],
    block: 128,
    grid: |_| (1, 1),
    // Six mbarriers, then three stages of 1536 bytes from byte 128.
    dynamic_smem: |_| 128 + 3 * 4 * CHUNK,
    max_registers: 255,
};

static PROBE_SOURCE: KernelSource =
    KernelSource { name: "pipeline_probe.cu", text: PROBE, min_arch: Arch::SM_90A, kernels: &[&RING_SUM] };

/// The emulator of the probe with `from` -> `to` applied (`None`: as written).
fn emulator(test: &str, mutation: Option<(&str, &str)>) -> Option<Emu> {
    kernel_support::emulator(test)?;
    let text = match mutation {
        Some((from, to)) => {
            assert_eq!(PROBE.matches(from).count(), 1, "{from:?} must occur once in the probe");
            PROBE.replace(from, to)
        }
        None => PROBE.to_string(),
    };
    let cxx = kernel_support::compiler_name().expect("the emulator was built, so a compiler exists");
    let files = [("pipeline_probe.cu", text.as_str())];
    let binary =
        kernel_support::build_with(&cxx, &files, &[&RING_SUM], &["-O1"]).unwrap_or_else(|e| panic!("{test}: {e}"));
    Some(Emu::new(&binary))
}

/// The probe's column sums of `chunks` random chunks on `dev`, or the emulator's failure;
/// with the CPU's sums (the same f32 adds in the same order).
fn ring_sum(dev: &Device, chunks: usize) -> (Result<Vec<u32>, String>, Vec<u32>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(chunks as u64);
    let rows: Vec<f32> = (0..chunks * CHUNK).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut want = vec![0.0f32; CHUNK];
    for c in 0..chunks {
        for (j, w) in want.iter_mut().enumerate() {
            *w += rows[c * CHUNK + j];
        }
    }
    let rd = dev.upload(&rows);
    let out = dev.poisoned(4 * CHUNK);
    let args = vec![KernelArg::Ptr(rd), KernelArg::U32(chunks as u32), KernelArg::Ptr(out)];
    dev.run(Some(Launch::new(&RING_SUM, &LaunchDims::default(), args).unwrap()));
    let got = dev.finish().map(|()| dev.download::<u32>(out, CHUNK));
    (got, want.iter().map(|v| v.to_bits()).collect())
}

/// [`ring_sum`] on a fresh program of the emulator `emu`.
fn emulated_ring_sum(emu: &Emu, chunks: usize) -> (Result<Vec<u32>, String>, Vec<u32>) {
    ring_sum(&Device::Emulator(Emu::new(emu.binary())), chunks)
}

#[test]
fn the_ring_sums_every_chunk_once_in_order() {
    let test = "the_ring_sums_every_chunk_once_in_order";
    let mut devices = Vec::new();
    if let Some(emu) = emulator(test, None) {
        devices.push(Device::Emulator(emu));
    }
    if let Some((gpu, _)) = dots_moe::backend::testing::gpu(test) {
        gpu.load(&[&PROBE_SOURCE]).unwrap_or_else(|e| panic!("{test}: {e}"));
        devices.push(Device::Gpu { gpu, buffers: Default::default() });
    }
    for dev in devices {
        // Fewer chunks than stages, exactly the stages, and many laps of the ring.
        for chunks in [1, 3, 4, 10, 31] {
            let dev = dev.fresh();
            let (got, want) = ring_sum(&dev, chunks);
            let got = got.unwrap_or_else(|e| panic!("{}: {chunks} chunks: {e}", dev.name()));
            assert_eq!(got, want, "{}: {chunks} chunks", dev.name());
        }
    }
}

/// The mutated probe must fail on 10 chunks (three laps of the ring): an abort whose
/// message contains `message`, or (`message` empty) an abort or sums that differ.
fn check(test: &str, from: &str, to: &str, message: &str) {
    let Some(good) = emulator(test, None) else { return };
    let (got, want) = emulated_ring_sum(&good, 10);
    assert_eq!(got.unwrap_or_else(|e| panic!("{test}: the unmutated probe fails: {e}")), want);
    let bad = emulator(test, Some((from, to))).unwrap();
    kernel_support::expect_caught(test, &format!("{from:?} -> {to:?}"), message, &want, emulated_ring_sum(&bad, 10).0);
}

#[test]
fn an_expected_transaction_count_too_large_never_completes() {
    check(
        "an_expected_transaction_count_too_large_never_completes",
        "mbar_arrive_expect_tx(full(s), PROBE_BYTES);",
        "mbar_arrive_expect_tx(full(s), PROBE_BYTES + 16);",
        "can never complete",
    );
}

#[test]
fn an_expected_transaction_count_too_small_aborts() {
    check(
        "an_expected_transaction_count_too_small_aborts",
        "mbar_arrive_expect_tx(full(s), PROBE_BYTES);",
        "mbar_arrive_expect_tx(full(s), PROBE_BYTES - 16);",
        "more bytes than",
    );
}

#[test]
fn a_wrong_phase_parity_is_caught() {
    check(
        "a_wrong_phase_parity_is_caught",
        "mbar_wait(full(s), round & 1u);",
        "mbar_wait(full(s), (round & 1u) ^ 1u);",
        "",
    );
}

#[test]
fn a_stage_read_without_waiting_for_its_phase_is_caught() {
    check("a_stage_read_without_waiting_for_its_phase_is_caught", "mbar_wait(full(s), round & 1u);", "", "");
}

#[test]
fn a_stage_refilled_before_its_consumers_are_done_is_caught() {
    check(
        "a_stage_refilled_before_its_consumers_are_done_is_caught",
        "mbar_wait(empty(s), (round & 1u) ^ 1u);",
        "",
        "",
    );
}
