//! The static proof of every kernel, without a GPU, iterating the kernel registry
//! (`dots_moe::cuda::source::FILES`):
//!
//! - NVRTC compiles every file for each target that supports its minimum architecture
//!   (`sm_90a`, the H200, and `sm_80`, the portable path); ptxas reports exactly the
//!   declared entry points, each within its declared register budget, with no spills, no
//!   stack frame, no non-inlined device function and no warning;
//! - the `wgmma` file refuses the targets below its minimum (`sm_80`, plain `sm_90`);
//! - `cuobjdump --dump-sass` of the `sm_90a` cubins shows Hopper matrix instructions
//!   (`HGMMA.64x256x16.F32.BF16`) in both `wgmma` kernels and `HMMA` in the other expert
//!   GEMMs, no local memory anywhere, and the SASS guards of `reports/gpu-gemm.md`.
//!
//! Needs `libnvrtc.so.13` on the library path (the pip wheel `nvidia-cuda-nvrtc==13.0.88`);
//! the SASS checks also need `cuobjdump` and `nvdisasm` (pip `nvidia-cuda-cuobjdump==13.2.51`
//! and `nvidia-cuda-nvdisasm==13.2.51`, found through `DOTS_MOE_CUOBJDUMP`, then
//! `.venv-cuda-tools` or `.venv-cuda` of this checkout, then `/usr/local/cuda/bin`, then
//! `PATH`). Each missing tool skips its test, unless `DOTS_MOE_REQUIRE_NVRTC=1` (CI), which
//! makes it a failure.
#![cfg(feature = "cuda")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use dots_moe::backend::testing::Requirement;
use dots_moe::cuda::expert_gemm::{self, DECODE_DOWN_COLUMNS, DECODE_UP_COLUMNS, MMA_DOWN_COLUMNS, MMA_UP_COLUMNS};
use dots_moe::cuda::expert_gemm::{WG_DOWN_COLUMNS, WG_UP_COLUMNS};
use dots_moe::cuda::moe::{MAX_SHARED_BYTES, rank_shared_bytes, select_shared_bytes};
use dots_moe::cuda::source::{self, FILES, KernelSource};
use dots_moe::cuda::{Arch, nvrtc};

/// Targets every kernel file is compiled for, where its minimum architecture allows.
const ARCHS: &[Arch] = &[Arch::SM_90A, Arch::SM_80];

fn nvrtc_or_skip(test: &str) -> bool {
    if nvrtc::available() {
        return true;
    }
    Requirement::Nvrtc.skip_or_fail(test, "no NVRTC library (libnvrtc.so.13) on the library path");
    false
}

#[test]
fn every_kernel_compiles_for_its_targets_within_budget_without_spills() {
    if !nvrtc_or_skip("every_kernel_compiles_for_its_targets_within_budget_without_spills") {
        return;
    }
    let (major, minor) = nvrtc::version().expect("NVRTC version");
    eprintln!("NVRTC {major}.{minor}");
    let mut compiled_files = 0;
    for &arch in ARCHS {
        for src in FILES.iter().filter(|f| arch.supports(f.min_arch)) {
            let compiled = nvrtc::compile(src, &arch.to_string()).unwrap_or_else(|e| panic!("{e}"));
            compiled_files += 1;
            assert!(!compiled.cubin.is_empty(), "{} for {arch}: empty cubin", src.name);
            let mut names: Vec<&str> = compiled.kernels.iter().map(|k| k.name.as_str()).collect();
            names.sort_unstable();
            let mut expected = src.entry_points();
            expected.sort_unstable();
            assert_eq!(names, expected, "{} for {arch}: ptxas reported other entry points\n{}", src.name, compiled.log);
            for k in &compiled.kernels {
                let decl = src.kernels.iter().find(|d| d.entry == k.name).unwrap();
                eprintln!(
                    "{arch:7} {:32} {:3} registers (budget {:3}) {:5} B static smem  stack {:3} B  spills {}/{} B",
                    k.name,
                    k.registers,
                    decl.max_registers,
                    k.shared_bytes,
                    k.stack_frame_bytes,
                    k.spill_store_bytes,
                    k.spill_load_bytes
                );
                assert_eq!((k.spill_store_bytes, k.spill_load_bytes), (0, 0), "{} spills on {arch}", k.name);
                assert_eq!(k.stack_frame_bytes, 0, "{} has a stack frame on {arch}", k.name);
                assert!(k.registers > 0, "{}: no register count in the report", k.name);
                assert!(
                    k.registers <= decl.max_registers,
                    "{} uses {} registers on {arch}, budget {}",
                    k.name,
                    k.registers,
                    decl.max_registers
                );
                if src.name.starts_with("expert_gemm") {
                    // Shared memory is dynamic (sized at launch), except the schedule's none
                    // and the decode chain's combining GEMM 2: the one flag of its arrival
                    // counter (last_tile_to_arrive).
                    let flag = if k.name == source::DOWN_DECODE_COMBINE.entry { 4 } else { 0 };
                    assert_eq!(k.shared_bytes, flag, "{}: unexpected static shared memory", k.name);
                }
            }
            assert!(
                compiled.device_functions.is_empty(),
                "non-inlined device functions: {:?}",
                compiled.device_functions
            );
            let log = compiled.log.to_lowercase();
            assert!(!log.contains("warning"), "{} for {arch}: warnings\n{}", src.name, compiled.log);
        }
    }
    let hopper_only = FILES.iter().filter(|f| f.min_arch == Arch::SM_90A).count();
    assert_eq!(hopper_only, 3, "the wgmma and TMA files are sm_90a only");
    assert_eq!(
        compiled_files,
        2 * FILES.len() - hopper_only,
        "every file for both targets, the sm_90a files for it only"
    );
}

#[test]
fn files_refuse_targets_below_their_minimum() {
    if !nvrtc_or_skip("files_refuse_targets_below_their_minimum") {
        return;
    }
    // wgmma needs the architecture-specific target: plain sm_90 and sm_80 must refuse it,
    // which is why the wrapper only loads it on sm_90a devices.
    for arch in [Arch::SM_80, Arch::SM_90] {
        assert!(!arch.supports(source::WGMMA.min_arch));
        assert!(nvrtc::compile(&source::WGMMA, &arch.to_string()).is_err(), "wgmma compiled for {arch}");
    }
}

#[test]
fn the_compile_is_cached() {
    if !nvrtc_or_skip("the_compile_is_cached") {
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
    if !nvrtc_or_skip("a_broken_kernel_is_a_typed_compile_error") {
        return;
    }
    let broken = KernelSource {
        name: "broken.cu",
        text: "#include \"common.cuh\"\nextern \"C\" __global__ void k() { u32 a = undefined_thing(); }",
        min_arch: Arch::SM_80,
        kernels: &[],
    };
    let err = nvrtc::compile(&broken, "sm_90a").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, dots_moe::cuda::CudaError::Compile { .. }), "{msg}");
    assert!(msg.contains("broken.cu") && msg.contains("undefined_thing"), "{msg}");
    // A header that is not registered is not found: the in-memory headers are all there is.
    let missing = KernelSource { text: "#include \"cuda_bf16.h\"\n", ..broken };
    assert!(nvrtc::compile(&missing, "sm_90a").is_err());
}

#[test]
fn dots1_shapes_fit_the_shared_memory_limit() {
    // dots.llm1: E = 128, k = 6, 2 shared slots; DeepSeek-V3 sized: E = 256, k = 8, 1 shared.
    for (e, k, shared) in [(128, 6, 2), (256, 8, 1)] {
        let (s, n) = (k + shared, e + shared);
        assert!(select_shared_bytes(e, s, n) <= MAX_SHARED_BYTES);
        assert!(rank_shared_bytes(s, n) <= MAX_SHARED_BYTES);
    }
    const { assert!(expert_gemm::MMA_SHARED_BYTES <= 48 * 1024, "the portable kernels must run without an opt-in") };
    const { assert!(expert_gemm::WG_SHARED_BYTES <= 227 * 1024, "above the H100/H200 limit per CTA") };
}

#[test]
fn the_shape_rule_covers_every_kernels_blocks() {
    // The wrapper's shape rule covers every kernel's column block and k step.
    for columns in [DECODE_UP_COLUMNS, MMA_UP_COLUMNS, WG_UP_COLUMNS] {
        assert_eq!(expert_gemm::INTER_MULTIPLE % columns, 0);
    }
    for columns in [DECODE_DOWN_COLUMNS, MMA_DOWN_COLUMNS, WG_DOWN_COLUMNS] {
        assert_eq!(expert_gemm::HIDDEN_MULTIPLE % columns, 0);
    }
    let decode_k = expert_gemm::DECODE_K_STEP * expert_gemm::DECODE_UNROLL;
    for k in [decode_k, expert_gemm::MMA_BK, expert_gemm::WG_BK] {
        assert_eq!(expert_gemm::INTER_MULTIPLE % k, 0);
        assert_eq!(expert_gemm::HIDDEN_MULTIPLE % k, 0);
    }
    // 8 tiles of 8 rows: the largest decode dispatch; one tiled item is one tile.
    assert_eq!(expert_gemm::DECODE_ITEM_ROWS, 8 * 8);
    assert_eq!(expert_gemm::TILE_ROWS, 128);
}

// ---- SASS ----------------------------------------------------------------------------

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

/// The SASS of every kernel compiled for `sm_90a`, by entry point; `None` after reporting
/// the skip.
fn sm90a_sass(test: &str) -> Option<HashMap<String, String>> {
    if !nvrtc_or_skip(test) {
        return None;
    }
    let tool = match cuobjdump() {
        Ok(t) => t,
        Err(why) => {
            Requirement::Nvrtc.skip_or_fail(test, &why);
            return None;
        }
    };
    let mut all = HashMap::new();
    for src in source::files_for(Arch::SM_90A) {
        let compiled = nvrtc::compile(src, "sm_90a").unwrap_or_else(|e| panic!("{e}"));
        all.extend(sass(&tool, &compiled.cubin, src.name));
    }
    Some(all)
}

#[test]
fn the_expert_kernels_contain_their_matrix_instructions_and_no_local_memory() {
    let Some(functions) = sm90a_sass("the_expert_kernels_contain_their_matrix_instructions_and_no_local_memory") else {
        return;
    };
    for decl in source::kernels() {
        let code = functions.get(decl.entry).unwrap_or_else(|| panic!("{} missing from the SASS", decl.entry));
        let count = |op: &str| code.matches(op).count();
        assert_eq!(count(" LDL"), 0, "{}: local-memory loads", decl.entry);
        assert_eq!(count(" STL"), 0, "{}: local-memory stores", decl.entry);
        if decl.entry.starts_with("moe_router_logits_tc_") {
            let hmma = count("HMMA.16816.F32.BF16");
            eprintln!("sm_90a {:24} HMMA.16816 x{hmma}", decl.entry);
            assert!(hmma > 0, "{}: expected HMMA.16816.F32.BF16 in the SASS", decl.entry);
        }
        if !decl.file.starts_with("expert_gemm") {
            continue;
        }
        let (hgmma, hmma) = (count("HGMMA.64x256x16.F32.BF16"), count("HMMA.16816.F32.BF16"));
        eprintln!("sm_90a {:24} HGMMA.64x256x16 x{hgmma}  HMMA.16816 x{hmma}", decl.entry);
        if decl.entry.ends_with("_wgmma") || decl.entry.ends_with("_ws") || decl.entry.ends_with("_wgmma_hidden") {
            // 4 k16 steps per 64-wide stage, unrolled.
            assert!(hgmma >= 4, "{}: expected HGMMA.64x256x16.F32.BF16 in the SASS", decl.entry);
            assert_eq!(hmma, 0);
        } else if decl.entry != "moe_expert_schedule" {
            assert!(hmma > 0, "{}: expected HMMA.16816.F32.BF16 in the SASS", decl.entry);
            assert_eq!(hgmma, 0);
        }
    }
}

/// The instructions of one function's SASS: `(address, text)` without the predicate-free
/// encoding lines.
fn instructions(code: &str) -> Vec<(u64, String)> {
    code.lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("/*")?;
            let (addr, text) = rest.split_once("*/")?;
            let addr = u64::from_str_radix(addr.trim(), 16).ok()?;
            let text = text.split(';').next()?.trim();
            (!text.is_empty()).then(|| (addr, text.to_string()))
        })
        .collect()
}

/// The figures of one `wgmma` kernel's main loop (the backward branch around the HGMMAs).
#[derive(Debug, PartialEq, Eq)]
struct MainLoop {
    /// Instructions from the loop's `BAR.SYNC` to its first `WARPGROUP.ARRIVE` (the issue
    /// slots spent on addresses and copies before the tensor cores start on a k-tile).
    bar_to_arrive: usize,
    /// `WARPGROUP.DEPBAR` per k-tile.
    depbars: usize,
    /// `HGMMA` per k-tile.
    hgmmas: usize,
}

fn main_loops(code: &str) -> Vec<MainLoop> {
    let ins = instructions(code);
    let mut loops = Vec::new();
    for (i, (addr, text)) in ins.iter().enumerate() {
        let Some(target) = text.split("BRA ").nth(1).and_then(|t| t.trim().strip_prefix("0x")) else { continue };
        let Ok(target) = u64::from_str_radix(target, 16) else { continue };
        if target >= *addr {
            continue;
        }
        let body: Vec<&(u64, String)> = ins[..=i].iter().filter(|(a, _)| *a >= target).collect();
        let count = |op: &str| body.iter().filter(|(_, t)| t.contains(op)).count();
        if count("HGMMA") == 0 {
            continue;
        }
        let bar = body.iter().position(|(_, t)| t.contains("BAR.SYNC")).expect("a barrier in the main loop");
        let arrive = bar + body[bar..].iter().position(|(_, t)| t.contains("WARPGROUP.ARRIVE")).expect("an arrive");
        loops.push(MainLoop {
            bar_to_arrive: arrive - bar,
            depbars: count("WARPGROUP.DEPBAR"),
            hgmmas: count("HGMMA"),
        });
    }
    loops
}

/// The static SASS guards recorded in reports/gpu-gemm.md.
#[test]
fn sass_guards_of_the_wgmma_main_loop_and_the_stores() {
    let Some(functions) = sm90a_sass("sass_guards_of_the_wgmma_main_loop_and_the_stores") else { return };
    for entry in ["moe_expert_up_wgmma", "moe_expert_down_wgmma", "moe_expert_up_wgmma_hidden"] {
        let loops = main_loops(&functions[entry]);
        eprintln!("sm_90a {entry}: main loop {loops:?}");
        assert_eq!(loops.len(), 1, "{entry}: one main loop around the HGMMAs");
        let l = &loops[0];
        // A k-tile of WG_BK = 64: four k16 HGMMAs, one wait for them.
        assert_eq!(l.hgmmas, 4, "{entry}: HGMMA per k-tile");
        assert_eq!(l.depbars, 1, "{entry}: exactly one WARPGROUP.DEPBAR per k-tile");
        // 174 on NVRTC 13.0.88; the bound stops it from growing unnoticed.
        assert!(
            l.bar_to_arrive <= 176,
            "{entry}: {} instructions between BAR.SYNC and WARPGROUP.ARRIVE",
            l.bar_to_arrive
        );
    }
    // The vectorised paths' 16-byte stores: (kernel, stores). Each is one 128-bit store
    // (`store_global_16` in common.cuh: NVRTC 13.0 split the combine's float4 and the
    // f32 -> bf16 gather's uint4, built lane by lane, into four 32-bit stores).
    for (entry, stores) in [
        ("moe_gather_f32_to_f32", 2),
        ("moe_gather_bf16_to_f32", 2),
        ("moe_gather_bf16_to_bf16", 1),
        ("moe_gather_f32_to_bf16", 1),
        ("moe_combine", 1),
    ] {
        let (wide, split) = global_stores(&functions[entry]);
        eprintln!("sm_90a {entry}: STG.E.128 x{wide}, 16-byte stores split into 4 x STG.E: {split}");
        assert_eq!((wide, split), (stores, 0), "{entry}: 128-bit and split 16-byte stores of the vectorised path");
    }
}

/// `(128-bit global stores, 16-byte stores split into four 32-bit ones)` of a function:
/// a split store is `STG.E [R.64]` followed within 64 instructions by `+0x4`, `+0x8`, `+0xc`
/// on the same register.
fn global_stores(code: &str) -> (usize, usize) {
    let ins = instructions(code);
    let wide = ins.iter().filter(|(_, t)| t.contains("STG.E.128")).count();
    let address = |t: &str| -> Option<String> {
        let t = t.strip_prefix("STG.E ")?;
        Some(t[t.rfind('[')?..t.rfind(']')? + 1].to_string())
    };
    let mut split = 0;
    for (i, (_, t)) in ins.iter().enumerate() {
        let Some(a) = address(t) else { continue };
        if a.contains('+') || a.contains('-') {
            continue;
        }
        let base = a.trim_end_matches(']').to_string();
        let near: Vec<String> = ins[i + 1..(i + 65).min(ins.len())].iter().filter_map(|(_, t)| address(t)).collect();
        if ["+0x4]", "+0x8]", "+0xc]"].iter().all(|o| near.contains(&format!("{base}{o}"))) {
            split += 1;
        }
    }
    (wide, split)
}

#[test]
fn the_main_loop_reader_sees_a_second_depbar() {
    // The guard's reader on a hand-written loop: a second WARPGROUP.DEPBAR, or a longer
    // stretch before the arrive, shows in its figures.
    let sass = "\
        /*0000*/                   MOV R1, c[0x0][0x28] ;\n\
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;\n\
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;\n\
        /*0030*/                   WARPGROUP.ARRIVE ;\n\
        /*0040*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR20], R24, gsb0 ;\n\
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n\
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n\
        /*0070*/              @!P0 BRA 0x10 ;\n\
        /*0080*/                   EXIT ;\n";
    assert_eq!(main_loops(sass), vec![MainLoop { bar_to_arrive: 2, depbars: 2, hgmmas: 1 }]);
    let stores = "\
        /*0000*/                   STG.E desc[UR8][R2.64], R23 ;\n\
        /*0010*/                   STG.E desc[UR8][R2.64+0x4], R22 ;\n\
        /*0020*/                   STG.E desc[UR8][R2.64+0x8], R25 ;\n\
        /*0030*/                   STG.E desc[UR8][R2.64+0xc], R24 ;\n\
        /*0040*/                   STG.E.128 desc[UR8][R4.64], R8 ;\n\
        /*0050*/                   STG.E desc[UR8][R6.64], RZ ;\n\
        /*0060*/                   STG.E desc[UR8][R6.64+0x400], RZ ;\n";
    assert_eq!(global_stores(stores), (1, 1));
}

#[test]
fn the_pipeline_wrappers_assemble_into_hopper_mbarrier_and_bulk_copy_instructions() {
    // The probe of the emulator's pipeline models (tests/cuda_pipeline.rs), through NVRTC
    // and ptxas for sm_90a: pipeline.cuh's PTX is accepted, and becomes the SYNCS mbarrier
    // operations and UBLKCP bulk copies, with no local memory.
    let test = "the_pipeline_wrappers_assemble_into_hopper_mbarrier_and_bulk_copy_instructions";
    if !nvrtc_or_skip(test) {
        return;
    }
    let probe = KernelSource {
        name: "pipeline_probe.cu",
        text: include_str!("emulator/probes/pipeline_probe.cu"),
        min_arch: Arch::SM_90A,
        kernels: &[],
    };
    let compiled = nvrtc::compile(&probe, "sm_90a").unwrap_or_else(|e| panic!("{e}"));
    let tool = match cuobjdump() {
        Ok(t) => t,
        Err(why) => {
            Requirement::Nvrtc.skip_or_fail(test, &why);
            return;
        }
    };
    let functions = sass(&tool, &compiled.cubin, probe.name);
    let code = &functions["probe_ring_sum"];
    for op in ["SYNCS.EXCH.64", "SYNCS.ARRIVE.TRANS64", "SYNCS.PHASECHK.TRANS64.TRYWAIT", "UBLKCP.S.G", "STG.E.128"] {
        assert!(code.contains(op), "probe_ring_sum: no {op} in its SASS");
    }
    assert!(!code.contains(" LDL") && !code.contains(" STL"), "probe_ring_sum: local memory");
}

/// The static SASS guards of the second-generation kernels (issue 13; recorded in
/// reports/gpu-gemm.md): the operands arrive by TMA (`UTMALDG`) on mbarriers (`SYNCS`), the
/// warpgroups trade registers (`USETMAXREG`), and the consumers keep one wgmma group in
/// flight: every `WARPGROUP.DEPBAR` waits for all but one group (`0x1`) except the one
/// drain at the end of a tile (`0x0`), and the only CTA barrier is the one after the
/// mbarriers' initialisation.
#[test]
fn sass_guards_of_the_second_generation_kernels() {
    let Some(functions) = sm90a_sass("sass_guards_of_the_second_generation_kernels") else { return };
    for entry in ["moe_expert_up_ws", "moe_expert_down_ws"] {
        let ins = instructions(&functions[entry]);
        let count = |op: &str| ins.iter().filter(|(_, t)| t.contains(op)).count();
        let (tma, hgmma, keep_one, drain) = (
            count("UTMALDG.2D"),
            count("HGMMA.64x256x16.F32.BF16"),
            count("WARPGROUP.DEPBAR.LE gsb0, 0x1"),
            count("WARPGROUP.DEPBAR.LE gsb0, 0x0"),
        );
        eprintln!(
            "sm_90a {entry}: UTMALDG.2D x{tma}, HGMMA x{hgmma}, DEPBAR 0x1 x{keep_one}, DEPBAR 0x0 x{drain}, \
             SYNCS x{}, BAR.SYNC x{}",
            count("SYNCS."),
            count("BAR.SYNC")
        );
        // A k-tile: two A boxes and two weight boxes.
        assert!(tma >= 3, "{entry}: TMA loads of the operands");
        assert!(count("SYNCS.PHASECHK") >= 2 && count("SYNCS.ARRIVE") >= 2, "{entry}: the mbarrier ring");
        assert!(count("USETMAXREG") >= 2, "{entry}: setmaxnreg in both roles");
        assert!(hgmma >= 4 && hgmma % 4 == 0, "{entry}: four k16 HGMMAs per k-tile");
        assert!(keep_one >= 1, "{entry}: the k-tile loop keeps one wgmma group in flight");
        assert_eq!(drain, 1, "{entry}: one drain per tile, none per k-tile");
        assert_eq!(keep_one, hgmma / 4, "{entry}: one wait per k-tile of four HGMMAs");
        assert_eq!(count("BAR.SYNC"), 1, "{entry}: no CTA barrier past the ring's initialisation");
    }
    // The streamed decode kernels: weights and item rows by TMA (the first generation's
    // 16-byte LDG of both gone), read from shared memory by ldmatrix (LDSM), an mbarrier
    // ring, one CTA barrier.
    for entry in ["moe_expert_up_stream", "moe_expert_down_stream"] {
        let ins = instructions(&functions[entry]);
        let count = |op: &str| ins.iter().filter(|(_, t)| t.contains(op)).count();
        eprintln!(
            "sm_90a {entry}: UTMALDG.2D x{}, LDSM x{}, HMMA x{}, LDG.E.128 x{}, SYNCS x{}, BAR.SYNC x{}",
            count("UTMALDG.2D"),
            count("LDSM"),
            count("HMMA.16816"),
            count("LDG.E.128"),
            count("SYNCS."),
            count("BAR.SYNC")
        );
        assert!(count("UTMALDG.2D") >= 3, "{entry}: TMA loads of the weights and the item rows");
        assert!(count("LDSM") > 0, "{entry}: operands read from shared memory by ldmatrix");
        assert_eq!(count("LDG.E.128"), 0, "{entry}: no 16-byte global loads of operands");
        assert!(count("SYNCS.PHASECHK") >= 2 && count("SYNCS.ARRIVE") >= 2, "{entry}: the mbarrier ring");
        assert_eq!(count("BAR.SYNC"), 1, "{entry}: no CTA barrier past the ring's initialisation");
    }
}
