//! Helpers shared by the GPU-vs-CPU tests of the expert GEMMs and the CUDA layer.

use std::sync::Arc;

use dots_moe::backend::testing;
use dots_moe::cuda::expert_gemm::{GemmOptions, TiledKernel};
use dots_moe::cuda::{Arch, GpuContext};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The relative error bound of the issue for bf16: `||out - ref|| / ||ref||`.
pub const TOLERANCE: f64 = 1e-2;

/// The device, or `None` after reporting the skip (a failure with `DOTS_MOE_REQUIRE_GPU=1`).
pub fn gpu(test: &str) -> Option<Arc<GpuContext>> {
    testing::gpu(test).map(|(gpu, _kernels)| gpu)
}

/// `||got - want|| / ||want||`, after checking lengths and that `got` is all finite.
pub fn rel_error(what: &str, got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{what}: element {i} is {} (unwritten or overflowed)", got[i]);
    }
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        diff += (f64::from(g) - f64::from(w)).powi(2);
        norm += f64::from(w).powi(2);
    }
    if norm == 0.0 { diff.sqrt() } else { (diff / norm).sqrt() }
}

/// Asserts the relative error is within [`TOLERANCE`] and prints it.
pub fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let err = rel_error(what, got, want);
    eprintln!("{what}: relative error {err:.2e}");
    assert!(err <= TOLERANCE, "{what}: relative error {err:.3e} > {TOLERANCE}");
}

/// Bit patterns, for bit-identity checks.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `n` values uniform in `±scale`, rounded to bf16.
pub fn random_bf16(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.random_range(-scale..scale))).collect()
}

/// `n` values uniform in `±scale`.
pub fn random_f32(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// A seeded generator.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Every way the expert GEMMs can split the work on `gpu`, named: the default (decode and
/// tiled by count), all tiled with each tiled kernel the device runs, the second
/// generation (sm_90a), batch-invariant with each decode kernel, and the first generation
/// launched fewer times.
pub fn all_options(gpu: &GpuContext) -> Vec<(&'static str, GemmOptions)> {
    all_options_for(gpu.target())
}

/// Which generations of the expert kernels the tests run: `DOTS_MOE_TEST_KERNELS` = `gen1`
/// or `gen2` for one (the device script runs the GPU suites once per generation, so that a
/// fault of one cannot take the other's results with the CUDA context), anything else or
/// unset for both. `(gen1, gen2)`.
pub fn generations() -> (bool, bool) {
    match std::env::var("DOTS_MOE_TEST_KERNELS").as_deref() {
        Ok("gen1") => (true, false),
        Ok("gen2") => (false, true),
        _ => (true, true),
    }
}

/// [`all_options`] for a device of target `arch`: of the generations [`generations`] asks
/// for, the second only on `sm_90a`.
pub fn all_options_for(arch: Arch) -> Vec<(&'static str, GemmOptions)> {
    let default = GemmOptions::for_arch(arch);
    let (gen1, gen2) = generations();
    let hopper = arch.supports(Arch::SM_90A);
    let mut all = Vec::new();
    if gen1 {
        all.push(("default", default));
        all.push(("all-tiled-mma", GemmOptions { decode_max_rows: 0, tiled: TiledKernel::Mma, ..default }));
        if hopper {
            all.push(("all-tiled-wgmma", GemmOptions { decode_max_rows: 0, tiled: TiledKernel::Wgmma, ..default }));
            all.push(("default-mma", GemmOptions { tiled: TiledKernel::Mma, ..default }));
        }
        all.push(("batch-invariant", default.batch_invariant()));
        // The same kernels launched fewer times: the decode chain, GEMM 1 from the hidden
        // states, tensor-core router logits (the layer's paths; the GEMM kernels are the
        // sets' above).
        all.push(("fewer-launches", GemmOptions::fewer_launches(arch)));
    }
    if gen2 && hopper {
        // The second generation: warp-specialised tiles, then with the streamed decode kernels.
        all.push(("all-tiled-ws", GemmOptions { decode_max_rows: 0, tiled: TiledKernel::WarpSpecialized, ..default }));
        all.push(("default-ws", GemmOptions { tiled: TiledKernel::WarpSpecialized, ..default }));
        all.push(("gen2", GemmOptions::second_generation()));
        all.push(("batch-invariant-stream", GemmOptions::second_generation().batch_invariant()));
    }
    all
}
