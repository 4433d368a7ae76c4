//! The static proof, without a GPU: NVRTC compiles every kernel file for `sm_90a` (the
//! H200) and `sm_80` (the portable path), and ptxas's report shows every entry point
//! within its register budget, with no spills and no stack frame.
//!
//! Needs `libnvrtc.so.13` on the library path (the pip wheel `nvidia-cuda-nvrtc==13.0.88`;
//! see README "GPU"). Without it the test is skipped, unless `DOTS_MOE_REQUIRE_NVRTC=1`,
//! which turns the missing library into a failure (CI sets it).
#![cfg(feature = "cuda")]

use dots_moe::cuda::moe::{MAX_SHARED_BYTES, rank_shared_bytes, scatter_shared_bytes, select_shared_bytes};
use dots_moe::cuda::{nvrtc, source};

/// Architectures every kernel must compile for.
const ARCHS: &[&str] = &["sm_90a", "sm_80"];

/// Register budget per entry point: at most this many registers per thread, so that the
/// planned occupancy holds. 256-thread CTAs at 64 registers: 4 CTAs (32 warps) per SM. The
/// router logits' 128-thread CTAs: one expert per CTA within 96 registers (5 CTAs, 20 warps
/// per SM); four experts per CTA (32 accumulators, 4 weight chunks) within 128 (4 CTAs, 16
/// warps), each thread keeping up to 4 chunk loads in flight.
fn register_budget(entry: &str) -> u32 {
    match entry {
        e if e.starts_with("moe_router_logits") && e.ends_with("_e1") => 96,
        e if e.starts_with("moe_router_logits") && e.ends_with("_e4") => 128,
        _ => 64,
    }
}

fn nvrtc_or_skip() -> bool {
    if nvrtc::available() {
        return true;
    }
    if std::env::var("DOTS_MOE_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
        panic!("DOTS_MOE_REQUIRE_NVRTC=1 but NVRTC is missing: {}", dots_moe::cuda::CudaError::NoNvrtc);
    }
    eprintln!(
        "skipped: no NVRTC library (libnvrtc.so.13) on the library path; set DOTS_MOE_REQUIRE_NVRTC=1 to fail instead"
    );
    false
}

#[test]
fn every_kernel_compiles_for_each_arch_without_spills() {
    if !nvrtc_or_skip() {
        return;
    }
    let (major, minor) = nvrtc::version().expect("NVRTC version");
    eprintln!("NVRTC {major}.{minor}");
    for arch in ARCHS {
        for src in source::ALL {
            let compiled = nvrtc::compile(src, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(!compiled.cubin.is_empty(), "{} for {arch}: empty cubin", src.name);
            let mut names: Vec<&str> = compiled.kernels.iter().map(|k| k.name.as_str()).collect();
            names.sort_unstable();
            let mut expected = src.entry_points.to_vec();
            expected.sort_unstable();
            assert_eq!(names, expected, "{} for {arch}: ptxas reported other entry points\n{}", src.name, compiled.log);
            for k in &compiled.kernels {
                eprintln!(
                    "{arch:7} {:30} {:3} registers {:5} B smem  stack {:3} B  spills {}/{} B",
                    k.name, k.registers, k.shared_bytes, k.stack_frame_bytes, k.spill_store_bytes, k.spill_load_bytes
                );
                assert_eq!((k.spill_store_bytes, k.spill_load_bytes), (0, 0), "{} spills on {arch}", k.name);
                assert_eq!(k.stack_frame_bytes, 0, "{} has a stack frame on {arch}", k.name);
                assert!(k.registers > 0, "{}: no register count in the report", k.name);
                assert!(
                    k.registers <= register_budget(&k.name),
                    "{} uses {} registers on {arch}, budget {}",
                    k.name,
                    k.registers,
                    register_budget(&k.name)
                );
            }
            assert!(
                compiled.device_functions.is_empty(),
                "non-inlined device functions: {:?}",
                compiled.device_functions
            );
        }
    }
}

#[test]
fn the_compile_is_cached() {
    if !nvrtc_or_skip() {
        return;
    }
    let a = nvrtc::compile(&source::COMBINE, "sm_90a").unwrap();
    let b = nvrtc::compile(&source::COMBINE, "sm_90a").unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b), "same (source, arch, options) must hit the cache");
    let c = nvrtc::compile(&source::COMBINE, "sm_80").unwrap();
    assert!(!std::sync::Arc::ptr_eq(&a, &c));
}

#[test]
fn a_broken_kernel_is_a_typed_compile_error() {
    if !nvrtc_or_skip() {
        return;
    }
    let broken = source::KernelSource {
        name: "broken.cu",
        text: "extern \"C\" __global__ void k() { undefined_thing(); }",
        entry_points: &["k"],
    };
    let err = nvrtc::compile(&broken, "sm_90a").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, dots_moe::cuda::CudaError::Compile { .. }), "{msg}");
    assert!(msg.contains("broken.cu") && msg.contains("undefined_thing"), "{msg}");
}

#[test]
fn the_kernels_include_no_toolkit_header() {
    for src in source::ALL.iter().map(|s| s.text).chain([source::COMMON]) {
        assert!(!src.lines().any(|l| l.trim_start().starts_with("#include")), "kernel files must be self-contained");
    }
}

#[test]
fn dots1_shapes_fit_the_shared_memory_limit() {
    // dots.llm1: E = 128, k = 6, 2 shared slots; DeepSeek-V3 sized: E = 256, k = 8, 1 shared.
    for (e, k, shared) in [(128, 6, 2), (256, 8, 1)] {
        let (s, n) = (k + shared, e + shared);
        assert!(select_shared_bytes(e, s, n) <= MAX_SHARED_BYTES);
        assert!(rank_shared_bytes(s, n) <= MAX_SHARED_BYTES);
        assert!(scatter_shared_bytes(n) <= MAX_SHARED_BYTES);
    }
}
