//! The kernel sources, embedded in the binary.
//!
//! Every kernel file under `cuda/` is compiled as one NVRTC program: `cuda/common.cu` (the
//! shared device helpers) followed by the file itself, behind a `#line` directive so that
//! compiler messages name the kernel file's own lines. Nothing is read from disk at run
//! time, so the binaries run unchanged on a machine without this checkout.

/// The shared device helpers prepended to every kernel file.
pub const COMMON: &str = include_str!("../../cuda/common.cu");

/// One kernel file: an NVRTC program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelSource {
    /// Program name (the file name under `cuda/`).
    pub name: &'static str,
    /// The file's text (without [`COMMON`]).
    pub text: &'static str,
    /// Its `extern "C"` entry points.
    pub entry_points: &'static [&'static str],
}

impl KernelSource {
    /// The full program text NVRTC compiles: [`COMMON`], then the file.
    pub fn program(&self) -> String {
        format!("{COMMON}\n#line 1 \"{}\"\n{}", self.name, self.text)
    }
}

/// `cuda/route.cu`: router logits and selection (fused with the permutation's ranks).
pub const ROUTE: KernelSource = KernelSource {
    name: "route.cu",
    text: include_str!("../../cuda/route.cu"),
    entry_points: &[
        "moe_router_logits_f32_f32_e1",
        "moe_router_logits_f32_bf16_e1",
        "moe_router_logits_bf16_f32_e1",
        "moe_router_logits_bf16_bf16_e1",
        "moe_router_logits_f32_f32_e4",
        "moe_router_logits_f32_bf16_e4",
        "moe_router_logits_bf16_f32_e4",
        "moe_router_logits_bf16_bf16_e4",
        "moe_router_select",
    ],
};

/// `cuda/permute.cu`: ranks, scatter and gather of the stable counting sort.
pub const PERMUTE: KernelSource = KernelSource {
    name: "permute.cu",
    text: include_str!("../../cuda/permute.cu"),
    entry_points: &[
        "moe_permute_rank",
        "moe_permute_scatter",
        "moe_gather_f32_to_f32",
        "moe_gather_f32_to_bf16",
        "moe_gather_bf16_to_f32",
        "moe_gather_bf16_to_bf16",
    ],
};

/// `cuda/combine.cu`: the fixed-order combine.
pub const COMBINE: KernelSource =
    KernelSource { name: "combine.cu", text: include_str!("../../cuda/combine.cu"), entry_points: &["moe_combine"] };

/// Every kernel file, in pipeline order.
pub const ALL: &[KernelSource] = &[ROUTE, PERMUTE, COMBINE];

/// The expert GEMM files, registered in `crate::cuda::expert_gemm` (portable: `sm_80` on; Hopper: `sm_90a` only).
pub use super::expert_gemm::{HOPPER_SOURCES as EXPERT_GEMM_HOPPER, PORTABLE_SOURCES as EXPERT_GEMM_PORTABLE};
