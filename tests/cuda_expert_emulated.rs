//! The expert GEMM kernels' logic on the CPU, without a GPU: the kernel files (schedule,
//! decode, mma.sync, wgmma) are compiled as C++ against `tests/emulate_gemm` (one thread per
//! CUDA thread; C++ models of `mma.sync`, `ldmatrix`, `cp.async` and `wgmma` with its
//! matrix descriptors and 128-byte swizzle, written from the PTX ISA; AddressSanitizer on)
//! and compared with the contract computed in double precision, in four modes: decode and
//! `wgmma` tiles by row count, all tiled with `mma.sync`, all tiled with `wgmma`, and
//! batch-invariant (decode chunks). Row counts cover every decode tile class (1, 9, 20, 33
//! rows) and one- and two-tile slots; K = 512 makes both shared-memory stage rings wrap.
//!
//! What it checks: index arithmetic, fragment layouts, the work schedule, the SwiGLU and
//! routing-weight epilogues, bounds (ASan), unwritten outputs (poisoned). What it cannot:
//! the hardware's real instruction semantics where the models could share a misreading of
//! the documentation, asynchronous-copy races, speed. `tests/cuda_expert_gemm.rs` checks on
//! a GPU.
//!
//! Needs a C++20 compiler (`g++`, or `DOTS_MOE_CXX`); skipped without one unless
//! `DOTS_MOE_REQUIRE_EMULATOR=1`.
#![cfg(feature = "cuda")]

use std::path::PathBuf;
use std::process::Command;

const BASE_SHIM: &str = include_str!("../scripts/gpu/emulate/cuda_shim.h");
const SHIM: &str = include_str!("emulate_gemm/gemm_shim.h");
const MODELS: &str = include_str!("emulate_gemm/gemm_ptx_models.h");
const MAIN: &str = include_str!("emulate_gemm/gemm_emu.cpp");
const FILES: &[(&str, &str)] = &[
    ("expert_gemm_schedule.cu", include_str!("../cuda/expert_gemm_schedule.cu")),
    ("expert_gemm_decode.cu", include_str!("../cuda/expert_gemm_decode.cu")),
    ("expert_gemm_mma.cu", include_str!("../cuda/expert_gemm_mma.cu")),
    ("expert_gemm_wgmma.cu", include_str!("../cuda/expert_gemm_wgmma.cu")),
];
const DYNAMIC_SHARED: &str = "extern __shared__ __align__(128) unsigned char smem_buffer[];";

fn compiler() -> Option<String> {
    if let Ok(cxx) = std::env::var("DOTS_MOE_CXX") {
        return Some(cxx);
    }
    let found = Command::new("g++").arg("--version").output().is_ok_and(|o| o.status.success());
    if found {
        return Some("g++".into());
    }
    assert!(
        !std::env::var("DOTS_MOE_REQUIRE_EMULATOR").is_ok_and(|v| v == "1"),
        "DOTS_MOE_REQUIRE_EMULATOR=1 but there is no C++ compiler (g++ or DOTS_MOE_CXX)"
    );
    eprintln!("skipped: no C++ compiler (g++ or DOTS_MOE_CXX) for the kernel emulator");
    None
}

/// The kernel files as one C++ include: the PTX wrappers compiled out, the dynamic shared
/// memory declared as the emulator's buffer.
fn kernels_inc() -> String {
    let mut text = String::from("#define DOTS_MOE_EMULATE 1\n");
    text += dots_moe::cuda::source::COMMON;
    text += "\n";
    text += include_str!("../cuda/expert_gemm_common.cu");
    text += "\n#include \"gemm_ptx_models.h\"\n";
    for (name, body) in FILES {
        if name.ends_with("_mma.cu") || name.ends_with("_wgmma.cu") {
            assert!(body.contains(DYNAMIC_SHARED), "{name}: the dynamic shared memory declaration changed");
        }
        text += &format!("\n#line 1 \"{name}\"\n");
        text += &body.replace(DYNAMIC_SHARED, "unsigned char* smem_buffer = emu::dynamic_smem;");
    }
    text
}

#[test]
fn expert_kernels_match_the_contract_under_emulation() {
    let Some(cxx) = compiler() else { return };
    let dir: PathBuf = std::env::temp_dir().join(format!("dots-moe-gemm-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in
        [("cuda_shim.h", BASE_SHIM), ("gemm_shim.h", SHIM), ("gemm_ptx_models.h", MODELS), ("gemm_emu.cpp", MAIN)]
    {
        std::fs::write(dir.join(name), text).unwrap();
    }
    std::fs::write(dir.join("kernels.inc"), kernels_inc()).unwrap();
    let binary = dir.join("gemm_emu");
    let built = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-g", "-pthread", "-fno-strict-aliasing", "-ffp-contract=off"])
        .arg("-fsanitize=address")
        .arg("-I")
        .arg(&dir)
        .arg(dir.join("gemm_emu.cpp"))
        .arg("-o")
        .arg(&binary)
        .output()
        .unwrap_or_else(|e| panic!("running {cxx}: {e}"));
    assert!(built.status.success(), "building the emulator failed:\n{}", String::from_utf8_lossy(&built.stderr));
    let run = Command::new(&binary).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        run.status.success(),
        "the emulated kernels disagree with the contract:\n{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(stdout.matches(" ok\n").count(), 4, "expected four modes to pass:\n{stdout}");
}
