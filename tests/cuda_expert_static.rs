//! The static proof of the expert GEMM kernels, without a GPU:
//!
//! - NVRTC compiles every file for its targets (the portable files for `sm_90a` and `sm_80`,
//!   the `wgmma` file for `sm_90a`), and ptxas's report shows each entry point within its
//!   register budget, with no spills and no stack frame;
//! - the sizes the Rust wrapper launches with equal the `#define`s of the kernel files;
//! - `cuobjdump --dump-sass` of the `sm_90a` cubins shows Hopper matrix instructions
//!   (`HGMMA.64x256x16.F32.BF16`) in both `wgmma` kernels and `HMMA` in the others.
//!
//! Needs `libnvrtc.so.13` on the library path (pip `nvidia-cuda-nvrtc==13.0.88`); the SASS
//! check also needs `cuobjdump` and `nvdisasm` (pip `nvidia-cuda-cuobjdump==13.2.51` and
//! `nvidia-cuda-nvdisasm==13.2.51`, found through `DOTS_MOE_CUOBJDUMP`, then
//! `.venv-cuda-tools` or `.venv-cuda` of this checkout, then `/usr/local/cuda/bin`, then `PATH`). Each missing tool
//! skips its test, unless `DOTS_MOE_REQUIRE_NVRTC=1`, which makes it a failure.
#![cfg(feature = "cuda")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use dots_moe::cuda::expert_gemm::{
    self, DECODE_DOWN_COLUMNS, DECODE_ITEM_ROWS, DECODE_THREADS, DECODE_UP_COLUMNS, MMA_DOWN_COLUMNS, MMA_SHARED_BYTES,
    MMA_THREADS, MMA_UP_COLUMNS, TILE_ROWS, WG_DOWN_COLUMNS, WG_SHARED_BYTES, WG_THREADS, WG_UP_COLUMNS,
};
use dots_moe::cuda::nvrtc::{self, KernelResources};
use dots_moe::cuda::source::{self, KernelSource};

fn required() -> bool {
    std::env::var("DOTS_MOE_REQUIRE_NVRTC").is_ok_and(|v| v == "1")
}

fn skip(what: &str) {
    assert!(!required(), "DOTS_MOE_REQUIRE_NVRTC=1 but {what}");
    eprintln!("skipped: {what}; set DOTS_MOE_REQUIRE_NVRTC=1 to fail instead");
}

fn nvrtc_or_skip() -> bool {
    if nvrtc::available() {
        return true;
    }
    skip("no NVRTC library (libnvrtc.so.13) on the library path");
    false
}

/// The most registers an entry point may use: what its planned occupancy allows.
fn register_budget(entry: &str) -> u32 {
    match entry {
        "moe_expert_schedule" => 64,
        // 4 CTAs of 128 threads per SM (DECODE_MIN_CTAS).
        e if e.ends_with("_decode") => 128,
        // 2 CTAs of 256 threads per SM.
        e if e.ends_with("_mma") => 128,
        // 1 CTA of 256 threads per SM: 128 accumulators per thread.
        e if e.ends_with("_wgmma") => 255,
        other => panic!("no register budget for {other}"),
    }
}

/// (source, architecture) pairs the kernels must compile for.
fn targets() -> Vec<(KernelSource, &'static str)> {
    let mut t = Vec::new();
    for src in expert_gemm::PORTABLE_SOURCES {
        t.push((*src, "sm_90a"));
        t.push((*src, "sm_80"));
    }
    for src in expert_gemm::HOPPER_SOURCES {
        t.push((*src, "sm_90a"));
    }
    t
}

fn report(k: &KernelResources) {
    eprintln!(
        "{:7} {:24} {:3} registers {:6} B static smem  stack {:3} B  spills {}/{} B",
        k.arch, k.name, k.registers, k.shared_bytes, k.stack_frame_bytes, k.spill_store_bytes, k.spill_load_bytes
    );
}

#[test]
fn expert_kernels_compile_for_their_targets_without_spills() {
    if !nvrtc_or_skip() {
        return;
    }
    for (src, arch) in targets() {
        let compiled = nvrtc::compile(&src, arch).unwrap_or_else(|e| panic!("{e}"));
        assert!(!compiled.cubin.is_empty(), "{} for {arch}: empty cubin", src.name);
        let mut names: Vec<&str> = compiled.kernels.iter().map(|k| k.name.as_str()).collect();
        names.sort_unstable();
        let mut expected = src.entry_points.to_vec();
        expected.sort_unstable();
        assert_eq!(names, expected, "{} for {arch}: ptxas reported other entry points\n{}", src.name, compiled.log);
        for k in &compiled.kernels {
            report(k);
            assert_eq!((k.spill_store_bytes, k.spill_load_bytes), (0, 0), "{} spills on {arch}", k.name);
            assert_eq!(k.stack_frame_bytes, 0, "{} has a stack frame on {arch}", k.name);
            assert!(k.registers > 0, "{}: no register count in the report", k.name);
            let budget = register_budget(&k.name);
            assert!(k.registers <= budget, "{} uses {} registers on {arch}, budget {budget}", k.name, k.registers);
            // Shared memory is dynamic (sized at launch), except the schedule's none.
            assert_eq!(k.shared_bytes, 0, "{}: unexpected static shared memory", k.name);
        }
        assert!(compiled.device_functions.is_empty(), "non-inlined device functions: {:?}", compiled.device_functions);
        let log = compiled.log.to_lowercase();
        assert!(!log.contains("warning"), "{} for {arch}: warnings\n{}", src.name, compiled.log);
    }
}

#[test]
fn the_wgmma_file_is_hopper_only() {
    if !nvrtc_or_skip() {
        return;
    }
    // wgmma needs the architecture-specific target: plain sm_90 and sm_80 must refuse it,
    // which is why the wrapper only loads it on sm_90a devices.
    for arch in ["sm_80", "sm_90"] {
        assert!(nvrtc::compile(&expert_gemm::WGMMA, arch).is_err(), "wgmma compiled for {arch}");
    }
}

/// The integer `#define`s of a kernel file.
fn defines(text: &str) -> HashMap<String, usize> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.strip_prefix("#define ")?.split_whitespace();
            let (name, value) = (words.next()?, words.next()?);
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[test]
fn the_wrapper_launches_with_the_kernels_sizes() {
    let d = defines(expert_gemm::DECODE.text);
    let s = defines(expert_gemm::SCHEDULE.text);
    let m = defines(expert_gemm::MMA.text);
    let w = defines(expert_gemm::WGMMA.text);
    assert_eq!(s["DECODE_ITEM_ROWS"], DECODE_ITEM_ROWS);
    assert_eq!(d["DECODE_WARPS"] * 32, DECODE_THREADS as usize);
    assert_eq!(d["DECODE_WARPS"] * 8, DECODE_UP_COLUMNS);
    assert_eq!(d["DECODE_WARPS"] * 16, DECODE_DOWN_COLUMNS);
    // 8 tiles of 8 rows: the largest decode dispatch.
    assert_eq!(DECODE_ITEM_ROWS, 8 * 8);
    assert_eq!((m["MMA_BM"], w["WG_BM"]), (TILE_ROWS, TILE_ROWS));
    assert_eq!(m["MMA_THREADS"], MMA_THREADS as usize);
    assert_eq!((m["MMA_BN"] / 2, m["MMA_BN"]), (MMA_UP_COLUMNS, MMA_DOWN_COLUMNS));
    assert_eq!(m["MMA_STAGES"] * (m["MMA_BM"] + m["MMA_BN"]) * m["MMA_BK"] * 2, MMA_SHARED_BYTES);
    const { assert!(MMA_SHARED_BYTES <= 48 * 1024, "the portable kernels must run without a shared-memory opt-in") };
    assert_eq!(w["WG_THREADS"], WG_THREADS as usize);
    assert_eq!((w["WG_BN"] / 2, w["WG_BN"]), (WG_UP_COLUMNS, WG_DOWN_COLUMNS));
    assert_eq!(w["WG_STAGES"] * (w["WG_BM"] + w["WG_BN"]) * w["WG_BK"] * 2 + w["WG_ALIGN"], WG_SHARED_BYTES);
    const { assert!(WG_SHARED_BYTES <= 227 * 1024, "above the H100/H200 limit per CTA") };
    // The wrapper's shape rule covers every kernel's column block and k step.
    for columns in [DECODE_UP_COLUMNS, MMA_UP_COLUMNS, WG_UP_COLUMNS] {
        assert_eq!(expert_gemm::INTER_MULTIPLE % columns, 0);
    }
    for columns in [DECODE_DOWN_COLUMNS, MMA_DOWN_COLUMNS, WG_DOWN_COLUMNS] {
        assert_eq!(expert_gemm::HIDDEN_MULTIPLE % columns, 0);
    }
    let decode_k = d["DECODE_K_STEP"] * d["DECODE_UNROLL"];
    for k in [decode_k, m["MMA_BK"], w["WG_BK"]] {
        assert_eq!(expert_gemm::INTER_MULTIPLE % k, 0);
        assert_eq!(expert_gemm::HIDDEN_MULTIPLE % k, 0);
    }
}

#[test]
fn the_expert_kernels_include_no_toolkit_header() {
    for src in expert_gemm::PORTABLE_SOURCES.iter().chain(expert_gemm::HOPPER_SOURCES) {
        assert!(!src.text.lines().any(|l| l.trim_start().starts_with("#include")), "{} includes a header", src.name);
    }
    // Registered next to the other kernel files.
    assert_eq!(source::EXPERT_GEMM_PORTABLE.len() + source::EXPERT_GEMM_HOPPER.len(), 4);
}

/// `cuobjdump`, or `None` with the reason.
fn cuobjdump() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("DOTS_MOE_CUOBJDUMP") {
        return Ok(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for venv in [".venv-cuda-tools", ".venv-cuda"] {
        let Ok(lib) = std::fs::read_dir(root.join(venv).join("lib")) else { continue };
        for python in lib.flatten() {
            let candidate = python.path().join("site-packages/nvidia/cu13/bin/cuobjdump");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    // A CUDA toolkit (the GPU host's), then PATH.
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/local/cuda/bin"))
        .chain(std::env::split_paths(&path))
        .map(|d| d.join("cuobjdump"))
        .find(|p| p.is_file())
        .ok_or_else(|| "no cuobjdump (pip nvidia-cuda-cuobjdump==13.2.51 + nvidia-cuda-nvdisasm==13.2.51)".into())
}

/// The SASS of each function of `cubin`, by name.
fn sass(tool: &Path, cubin: &[u8], name: &str) -> HashMap<String, String> {
    let dir = std::env::temp_dir().join(format!("dots-moe-sass-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.cubin"));
    std::fs::write(&file, cubin).unwrap();
    // cuobjdump runs nvdisasm, which the wheels install next to it.
    let mut path = vec![tool.parent().unwrap_or(Path::new(".")).to_path_buf()];
    path.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    let out = Command::new(tool)
        .arg("--dump-sass")
        .arg(&file)
        .env("PATH", std::env::join_paths(path).unwrap())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "cuobjdump failed: {}{}", text, String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_file(&file);
    let mut functions = HashMap::new();
    for part in text.split("Function : ").skip(1) {
        let name = part.split_whitespace().next().unwrap_or_default().to_string();
        functions.insert(name, part.to_string());
    }
    functions
}

#[test]
fn the_wgmma_kernels_contain_hopper_matrix_instructions() {
    if !nvrtc_or_skip() {
        return;
    }
    let tool = match cuobjdump() {
        Ok(t) => t,
        Err(why) => return skip(&why),
    };
    for src in expert_gemm::PORTABLE_SOURCES.iter().chain(expert_gemm::HOPPER_SOURCES) {
        let compiled = nvrtc::compile(src, "sm_90a").unwrap_or_else(|e| panic!("{e}"));
        let functions = sass(&tool, &compiled.cubin, src.name);
        for entry in src.entry_points {
            let code = functions.get(*entry).unwrap_or_else(|| panic!("{entry} missing from the SASS"));
            let count = |op: &str| code.matches(op).count();
            let (hgmma, hmma) = (count("HGMMA.64x256x16.F32.BF16"), count("HMMA.16816.F32.BF16"));
            eprintln!("sm_90a {entry:24} HGMMA.64x256x16 x{hgmma}  HMMA.16816 x{hmma}");
            assert_eq!(count(" LDL"), 0, "{entry}: local-memory loads");
            assert_eq!(count(" STL"), 0, "{entry}: local-memory stores");
            if entry.ends_with("_wgmma") {
                // 4 k16 steps per 64-wide stage, unrolled.
                assert!(hgmma >= 4, "{entry}: expected HGMMA.64x256x16.F32.BF16 in the SASS");
            } else if *entry != "moe_expert_schedule" {
                assert!(hmma > 0, "{entry}: expected HMMA.16816.F32.BF16 in the SASS");
                assert_eq!(hgmma, 0);
            }
        }
    }
}
