//! The kernel registry: every kernel file under `cuda/` (embedded in the binary), the
//! headers of `cuda/include/` it includes, its minimum architecture, and the launch
//! contract of each of its kernels ([`KernelDecl`]: entry point, typed parameters, block,
//! grid rule, dynamic shared memory, register budget). The GPU launcher, the emulator, the
//! static tests, `GemmOptions` and the CLI (`dots-moe kernels`, `doctor`) all iterate
//! [`FILES`]; nothing else lists kernels.
//!
//! Each file is one NVRTC program; its `#include "…​.cuh"` lines are served from
//! [`HEADERS`] as in-memory headers, so NVRTC needs no include path and nothing is read
//! from disk at run time: the binaries run unchanged on a machine without this checkout.
//!
//! The sizes the kernel files `#define` are owned here too ([`KERNEL_CONSTANTS`]): a test
//! evaluates every integer `#define` of every file and header and requires it to equal the
//! constant of the same name.

use crate::cuda::arch::Arch;
use crate::cuda::expert_gemm as gemm;
use crate::cuda::launch::{Elem, KernelDecl, LaunchDims, Param};
use crate::cuda::moe;

/// An in-memory header: its `#include` name and its text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// The name the kernel files include (`common.cuh`).
    pub name: &'static str,
    /// The text.
    pub text: &'static str,
}

/// `cuda/include/common.cuh`: types, bf16, warp helpers and the permutation tile of every
/// kernel file.
pub const COMMON: Header = Header { name: "common.cuh", text: include_str!("../../cuda/include/common.cuh") };
/// `cuda/include/expert_gemm.cuh`: work items, numerics and the PTX wrappers of the expert
/// GEMM files.
pub const EXPERT_GEMM: Header =
    Header { name: "expert_gemm.cuh", text: include_str!("../../cuda/include/expert_gemm.cuh") };
/// `cuda/include/pipeline.cuh`: the sm_90 mbarrier and bulk-copy wrappers of producer /
/// consumer pipelines.
pub const PIPELINE: Header = Header { name: "pipeline.cuh", text: include_str!("../../cuda/include/pipeline.cuh") };
/// `cuda/include/wgmma.cuh`: the sm_90a warpgroup MMA wrappers (descriptor, m64n256k16,
/// fences and group waits) of both `wgmma` kernel files.
pub const WGMMA_OPS: Header = Header { name: "wgmma.cuh", text: include_str!("../../cuda/include/wgmma.cuh") };
/// Every header of `cuda/include/`.
pub const HEADERS: &[Header] = &[COMMON, EXPERT_GEMM, PIPELINE, WGMMA_OPS];

/// One kernel file: an NVRTC program.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// Program name (the file name under `cuda/`).
    pub name: &'static str,
    /// The file's text.
    pub text: &'static str,
    /// The oldest target it compiles for.
    pub min_arch: Arch,
    /// Its kernels.
    pub kernels: &'static [&'static KernelDecl],
}

impl KernelSource {
    /// The program text NVRTC compiles (the headers come from [`HEADERS`]).
    pub fn program(&self) -> String {
        self.text.to_string()
    }

    /// The headers the program may include.
    pub fn headers(&self) -> &'static [Header] {
        HEADERS
    }

    /// The text a compilation depends on: the file and every header (for cache keys).
    pub fn fingerprint(&self) -> String {
        let mut text = String::from(self.text);
        for h in self.headers() {
            text.push('\0');
            text.push_str(h.name);
            text.push('\0');
            text.push_str(h.text);
        }
        text
    }

    /// Its entry points, in declaration order.
    pub fn entry_points(&self) -> Vec<&'static str> {
        self.kernels.iter().map(|k| k.entry).collect()
    }
}

// ---- the declarations -------------------------------------------------------------------

const fn cdiv(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

fn no_smem(_: &LaunchDims) -> usize {
    0
}

macro_rules! router_logits {
    ($name:ident, $entry:literal, $x:ident, $w:ident, $eb:literal, $regs:literal) => {
        #[doc = concat!("`", $entry, "`: router logits, ", stringify!($eb), " expert(s) per CTA.")]
        pub const $name: KernelDecl = KernelDecl {
            entry: $entry,
            file: "route.cu",
            params: &[
                Param::input("x", Elem::$x),
                Param::input("w", Elem::$w),
                Param::output("logits", Elem::F32),
                Param::u32("tokens"),
                Param::u32("experts"),
                Param::u64("hidden"),
                Param::u32("vectorized"),
            ],
            block: moe::LOGIT_THREADS,
            grid: |d| (cdiv(d.tokens, moe::LOGIT_TOKENS), cdiv(d.experts, $eb)),
            dynamic_smem: no_smem,
            max_registers: $regs,
        };
    };
}

// Register budgets: the planned occupancy. 256-thread tile CTAs at 64 registers: 4 CTAs
// (32 warps) per SM. Router logits, 128-thread CTAs: one expert per CTA within 96 (5 CTAs,
// 20 warps per SM); four experts per CTA (32 accumulators, 4 weight chunks) within 128.
router_logits!(LOGITS_F32_F32_E1, "moe_router_logits_f32_f32_e1", F32, F32, 1, 96);
router_logits!(LOGITS_F32_BF16_E1, "moe_router_logits_f32_bf16_e1", F32, Bf16, 1, 96);
router_logits!(LOGITS_BF16_F32_E1, "moe_router_logits_bf16_f32_e1", Bf16, F32, 1, 96);
router_logits!(LOGITS_BF16_BF16_E1, "moe_router_logits_bf16_bf16_e1", Bf16, Bf16, 1, 96);
router_logits!(LOGITS_F32_F32_E4, "moe_router_logits_f32_f32_e4", F32, F32, 4, 128);
router_logits!(LOGITS_F32_BF16_E4, "moe_router_logits_f32_bf16_e4", F32, Bf16, 4, 128);
router_logits!(LOGITS_BF16_F32_E4, "moe_router_logits_bf16_f32_e4", Bf16, F32, 4, 128);
router_logits!(LOGITS_BF16_BF16_E4, "moe_router_logits_bf16_bf16_e4", Bf16, Bf16, 4, 128);

macro_rules! router_logits_tc {
    ($name:ident, $entry:literal, $x:ident, $w:ident) => {
        /// Router logits on tensor cores (64 tokens x 64 experts per CTA).
        pub const $name: KernelDecl = KernelDecl {
            entry: $entry,
            file: "route.cu",
            params: &[
                Param::input("x", Elem::$x),
                Param::input("w", Elem::$w),
                Param::output("logits", Elem::F32),
                Param::u32("tokens"),
                Param::u32("experts"),
                Param::u64("hidden"),
            ],
            block: moe::TC_THREADS,
            grid: |d| (cdiv(d.tokens, moe::TC_TOKENS), cdiv(d.experts, moe::TC_EXPERTS)),
            dynamic_smem: no_smem,
            // `__launch_bounds__(TC_THREADS, 4)`: without the bound ptxas spilled at 96.
            max_registers: 128,
        };
    };
}

router_logits_tc!(LOGITS_TC_F32_F32, "moe_router_logits_tc_f32_f32", F32, F32);
router_logits_tc!(LOGITS_TC_F32_BF16, "moe_router_logits_tc_f32_bf16", F32, Bf16);
router_logits_tc!(LOGITS_TC_BF16_F32, "moe_router_logits_tc_bf16_f32", Bf16, F32);
router_logits_tc!(LOGITS_TC_BF16_BF16, "moe_router_logits_tc_bf16_bf16", Bf16, Bf16);

/// The parameter list of `moe_router_select` after its logits, between the parameters in
/// `$before` (which end with the logits) and those in `$after`: the decode chain's router
/// takes the same after its logits' operands (and writes the logits).
macro_rules! select_params {
    ([$($before:expr),*], [$($after:expr),*]) => {
        &[
            $($before,)*
            Param::input("bias", Elem::F32),
            Param::u32("tokens"),
            Param::u32("experts"),
            Param::u32("top_k"),
            Param::u32("n_shared"),
            Param::u32("n_group"),
            Param::u32("topk_group"),
            Param::u32("softmax"),
            Param::u32("norm_topk_prob"),
            Param::f32("scale"),
            Param::output("slot_ids", Elem::U32),
            Param::output("slot_weights", Elem::F32),
            Param::output("pair_ranks", Elem::U32),
            Param::output("tile_counts", Elem::U32),
            Param::output("tile_status", Elem::U64),
            Param::output("tile_offsets", Elem::U32),
            Param::output("expert_offsets", Elem::U32),
            Param::output("tiles_done", Elem::U32),
            Param::u32("fuse_scatter"),
            Param::output("row_pairs", Elem::U32),
            Param::output("pair_rows", Elem::U32),
            Param::output("row_weights", Elem::F32),
            $($after,)*
        ]
    };
}

/// `moe_router_select`: selection, ranks, tile counts, tile and expert offsets (and the
/// scatter for one tile).
pub const SELECT: KernelDecl = KernelDecl {
    entry: "moe_router_select",
    file: "route.cu",
    params: select_params!([Param::input("logits", Elem::F32)], []),
    block: moe::TILE_THREADS,
    grid: |d| (moe::tiles(d.tokens), 1),
    dynamic_smem: |d| moe::select_shared_bytes(d.experts, d.slots_per_token, d.n_slots),
    max_registers: 64,
};

macro_rules! router_decode {
    ($name:ident, $entry:literal, $x:ident, $w:ident) => {
        /// The decode chain's router (one tile): logits, then from its last CTA the selection, the
        /// scatter and the expert GEMMs' schedule.
        pub const $name: KernelDecl = KernelDecl {
            entry: $entry,
            file: "route.cu",
            params: select_params!(
                [
                    Param::input("x", Elem::$x),
                    Param::input("w", Elem::$w),
                    Param::u64("hidden"),
                    Param::u32("vectorized"),
                    Param::output("logits", Elem::F32)
                ],
                [
                    Param::u32("decode_max_rows"),
                    Param::u32("tile_rows"),
                    Param::u32("decode_capacity"),
                    Param::u32("tiled_capacity"),
                    Param::output("decode_items", Elem::Item),
                    Param::output("tiled_items", Elem::Item),
                    Param::output("item_counts", Elem::U32)
                ]
            ),
            block: moe::TILE_THREADS,
            grid: |d| (cdiv(d.tokens, moe::LOGIT_TOKENS), d.experts),
            dynamic_smem: |d| moe::select_shared_bytes(d.experts, d.slots_per_token, d.n_slots),
            // `__launch_bounds__(TILE_THREADS, 2)`: two 256-thread CTAs per SM.
            max_registers: 128,
        };
    };
}

router_decode!(ROUTER_DECODE_F32_F32, "moe_router_decode_f32_f32", F32, F32);
router_decode!(ROUTER_DECODE_F32_BF16, "moe_router_decode_f32_bf16", F32, Bf16);
router_decode!(ROUTER_DECODE_BF16_F32, "moe_router_decode_bf16_f32", Bf16, F32);
router_decode!(ROUTER_DECODE_BF16_BF16, "moe_router_decode_bf16_bf16", Bf16, Bf16);

/// `moe_permute_rank`: ranks, tile counts, tile and expert offsets of given slot ids.
pub const RANK: KernelDecl = KernelDecl {
    entry: "moe_permute_rank",
    file: "permute.cu",
    params: &[
        Param::input("slot_ids", Elem::U32),
        Param::u32("tokens"),
        Param::u32("slots_per_token"),
        Param::u32("n_slots"),
        Param::output("pair_ranks", Elem::U32),
        Param::output("tile_counts", Elem::U32),
        Param::output("tile_status", Elem::U64),
        Param::output("tile_offsets", Elem::U32),
        Param::output("expert_offsets", Elem::U32),
        Param::output("tiles_done", Elem::U32),
    ],
    block: moe::TILE_THREADS,
    grid: |d| (moe::tiles(d.tokens), 1),
    dynamic_smem: |d| moe::rank_shared_bytes(d.slots_per_token, d.n_slots),
    max_registers: 64,
};

/// `moe_permute_scatter`: row order and row weights from ranks and tile offsets.
pub const SCATTER: KernelDecl = KernelDecl {
    entry: "moe_permute_scatter",
    file: "permute.cu",
    params: &[
        Param::input("slot_ids", Elem::U32),
        Param::input("slot_weights", Elem::F32),
        Param::input("pair_ranks", Elem::U32),
        Param::input("tile_offsets", Elem::U32),
        Param::u32("tokens"),
        Param::u32("slots_per_token"),
        Param::u32("n_slots"),
        Param::output("expert_offsets", Elem::U32),
        Param::output("row_pairs", Elem::U32),
        Param::output("pair_rows", Elem::U32),
        Param::output("row_weights", Elem::F32),
    ],
    block: moe::TILE_THREADS,
    grid: |d| (moe::tiles(d.tokens).max(1), 1),
    dynamic_smem: no_smem,
    max_registers: 64,
};

macro_rules! gather {
    ($name:ident, $entry:literal, $x:ident, $out:ident) => {
        #[doc = concat!("`", $entry, "`: hidden rows into permuted order.")]
        pub const $name: KernelDecl = KernelDecl {
            entry: $entry,
            file: "permute.cu",
            params: &[
                Param::input("hidden", Elem::$x),
                Param::input("row_pairs", Elem::U32),
                Param::output("out", Elem::$out),
                Param::u32("slots_per_token"),
                Param::u64("hidden_size"),
                Param::u32("vectorized"),
            ],
            block: moe::GATHER_THREADS,
            grid: |d| (d.tokens * d.slots_per_token, cdiv(d.hidden, 8 * moe::GATHER_THREADS as usize)),
            dynamic_smem: no_smem,
            max_registers: 64,
        };
    };
}

gather!(GATHER_F32_F32, "moe_gather_f32_to_f32", F32, F32);
gather!(GATHER_F32_BF16, "moe_gather_f32_to_bf16", F32, Bf16);
gather!(GATHER_BF16_F32, "moe_gather_bf16_to_f32", Bf16, F32);
gather!(GATHER_BF16_BF16, "moe_gather_bf16_to_bf16", Bf16, Bf16);

/// `moe_combine`: each token's weighted rows, summed in slot order.
pub const COMBINE_KERNEL: KernelDecl = KernelDecl {
    entry: "moe_combine",
    file: "combine.cu",
    params: &[
        Param::input("expert_rows", Elem::F32),
        Param::input("pair_rows", Elem::U32),
        Param::u32("slots_per_token"),
        Param::u64("hidden_size"),
        Param::u32("vectorized"),
        Param::output("out", Elem::F32),
    ],
    block: moe::COMBINE_THREADS,
    grid: |d| (d.tokens, cdiv(d.hidden, 4 * moe::COMBINE_THREADS as usize)),
    dynamic_smem: no_smem,
    max_registers: 64,
};

/// `moe_expert_schedule`: the work items of every slot.
pub const EXPERT_SCHEDULE: KernelDecl = KernelDecl {
    entry: "moe_expert_schedule",
    file: "expert_gemm_schedule.cu",
    params: &[
        Param::input("expert_offsets", Elem::U32),
        Param::u32("n_slots"),
        Param::u32("decode_max_rows"),
        Param::u32("tile_rows"),
        Param::u32("decode_capacity"),
        Param::u32("tiled_capacity"),
        Param::output("decode_items", Elem::Item),
        Param::output("tiled_items", Elem::Item),
        Param::output("item_counts", Elem::U32),
    ],
    block: 32,
    grid: |_| (1, 1),
    dynamic_smem: no_smem,
    max_registers: 64,
};

const UP_PARAMS: &[Param] = &[
    Param::input("x", Elem::Bf16),
    Param::input("gate_up", Elem::Bf16),
    Param::input("items", Elem::Item),
    Param::input("item_counts", Elem::U32),
    Param::u32("hidden"),
    Param::u32("inter"),
    Param::output("act", Elem::Bf16),
];

const DOWN_PARAMS: &[Param] = &[
    Param::input("act", Elem::Bf16),
    Param::input("down", Elem::Bf16),
    Param::input("row_weights", Elem::F32),
    Param::input("items", Elem::Item),
    Param::input("item_counts", Elem::U32),
    Param::u32("hidden"),
    Param::u32("inter"),
    Param::output("y", Elem::F32),
];

/// `moe_expert_up_decode`: GEMM 1 + SwiGLU for slots with few rows (4 CTAs per SM).
pub const UP_DECODE: KernelDecl = KernelDecl {
    entry: "moe_expert_up_decode",
    file: "expert_gemm_decode.cu",
    params: UP_PARAMS,
    block: gemm::DECODE_THREADS,
    grid: |d| (d.inter / gemm::DECODE_UP_COLUMNS, d.items),
    dynamic_smem: no_smem,
    max_registers: 128,
};

/// `moe_expert_down_decode`: GEMM 2 with the routing weight for slots with few rows.
pub const DOWN_DECODE: KernelDecl = KernelDecl {
    entry: "moe_expert_down_decode",
    file: "expert_gemm_decode.cu",
    params: DOWN_PARAMS,
    block: gemm::DECODE_THREADS,
    grid: |d| (d.hidden / gemm::DECODE_DOWN_COLUMNS, d.items),
    dynamic_smem: no_smem,
    max_registers: 128,
};

/// The parameters of GEMM 1 reading bf16 hidden states through the permutation.
const UP_HIDDEN_PARAMS: &[Param] = &[
    Param::input("hidden_states", Elem::Bf16),
    Param::input("row_pairs", Elem::U32),
    Param::u32("slots_per_token"),
    Param::input("gate_up", Elem::Bf16),
    Param::input("items", Elem::Item),
    Param::input("item_counts", Elem::U32),
    Param::u32("hidden"),
    Param::u32("inter"),
    Param::output("act", Elem::Bf16),
];

macro_rules! up_decode_hidden {
    ($name:ident, $entry:literal, $x:ident) => {
        /// GEMM 1 + SwiGLU of the decode chain, the rows read from the hidden states through the
        /// permutation.
        pub const $name: KernelDecl = KernelDecl {
            entry: $entry,
            file: "expert_gemm_decode.cu",
            params: &[
                Param::input("hidden_states", Elem::$x),
                Param::input("row_pairs", Elem::U32),
                Param::u32("slots_per_token"),
                Param::input("gate_up", Elem::Bf16),
                Param::input("items", Elem::Item),
                Param::input("item_counts", Elem::U32),
                Param::u32("hidden"),
                Param::u32("inter"),
                Param::output("act", Elem::Bf16),
            ],
            block: gemm::DECODE_THREADS,
            grid: |d| (d.inter / gemm::DECODE_UP_COLUMNS, d.items),
            dynamic_smem: no_smem,
            // 3 CTAs per SM (`DECODE_CHAIN_MIN_CTAS`): the gathered kernel's 4 spill here.
            max_registers: 168,
        };
    };
}

up_decode_hidden!(UP_DECODE_HIDDEN_F32, "moe_expert_up_decode_hidden_f32", F32);
up_decode_hidden!(UP_DECODE_HIDDEN_BF16, "moe_expert_up_decode_hidden_bf16", Bf16);

/// `moe_expert_down_decode_combine`: GEMM 2 of the decode chain, with the combine done by
/// each column block's last CTA.
pub const DOWN_DECODE_COMBINE: KernelDecl = KernelDecl {
    entry: "moe_expert_down_decode_combine",
    file: "expert_gemm_decode.cu",
    params: &[
        Param::input("act", Elem::Bf16),
        Param::input("down", Elem::Bf16),
        Param::input("row_weights", Elem::F32),
        Param::input("items", Elem::Item),
        Param::input("item_counts", Elem::U32),
        Param::u32("hidden"),
        Param::u32("inter"),
        Param::output("y", Elem::F32),
        Param::input("pair_rows", Elem::U32),
        Param::u32("tokens"),
        Param::u32("slots_per_token"),
        Param::output("column_done", Elem::U32),
        Param::output("out", Elem::F32),
    ],
    block: gemm::DECODE_THREADS,
    grid: |d| (d.hidden / gemm::DECODE_DOWN_COLUMNS, d.items),
    dynamic_smem: no_smem,
    max_registers: 128,
};

/// `moe_expert_up_mma`: GEMM 1 + SwiGLU, `mma.sync` tiles (2 CTAs per SM).
pub const UP_MMA: KernelDecl = KernelDecl {
    entry: "moe_expert_up_mma",
    file: "expert_gemm_mma.cu",
    params: UP_PARAMS,
    block: gemm::MMA_THREADS,
    grid: |d| (d.inter / gemm::MMA_UP_COLUMNS, d.items),
    dynamic_smem: |_| gemm::MMA_SHARED_BYTES,
    max_registers: 128,
};

/// `moe_expert_down_mma`: GEMM 2, `mma.sync` tiles.
pub const DOWN_MMA: KernelDecl = KernelDecl {
    entry: "moe_expert_down_mma",
    file: "expert_gemm_mma.cu",
    params: DOWN_PARAMS,
    block: gemm::MMA_THREADS,
    grid: |d| (d.hidden / gemm::MMA_DOWN_COLUMNS, d.items),
    dynamic_smem: |_| gemm::MMA_SHARED_BYTES,
    max_registers: 128,
};

/// `moe_expert_up_wgmma`: GEMM 1 + SwiGLU, `wgmma` tiles (1 CTA per SM, 128 accumulators
/// per thread).
pub const UP_WGMMA: KernelDecl = KernelDecl {
    entry: "moe_expert_up_wgmma",
    file: "expert_gemm_wgmma.cu",
    params: UP_PARAMS,
    block: gemm::WG_THREADS,
    grid: |d| (d.inter / gemm::WG_UP_COLUMNS, d.items),
    dynamic_smem: |_| gemm::WG_SHARED_BYTES,
    max_registers: 255,
};

/// `moe_expert_up_mma_hidden`: GEMM 1 + SwiGLU, `mma.sync` tiles, the rows read from the bf16
/// hidden states through the permutation (no gather pass).
pub const UP_MMA_HIDDEN: KernelDecl =
    KernelDecl { entry: "moe_expert_up_mma_hidden", file: "expert_gemm_mma.cu", params: UP_HIDDEN_PARAMS, ..UP_MMA };

/// `moe_expert_up_wgmma_hidden`: GEMM 1 + SwiGLU, `wgmma` tiles, the rows read from the bf16
/// hidden states through the permutation (no gather pass).
pub const UP_WGMMA_HIDDEN: KernelDecl = KernelDecl {
    entry: "moe_expert_up_wgmma_hidden",
    file: "expert_gemm_wgmma.cu",
    params: UP_HIDDEN_PARAMS,
    ..UP_WGMMA
};

/// `moe_expert_down_wgmma`: GEMM 2, `wgmma` tiles.
pub const DOWN_WGMMA: KernelDecl = KernelDecl {
    entry: "moe_expert_down_wgmma",
    file: "expert_gemm_wgmma.cu",
    params: DOWN_PARAMS,
    block: gemm::WG_THREADS,
    grid: |d| (d.hidden / gemm::WG_DOWN_COLUMNS, d.items),
    dynamic_smem: |_| gemm::WG_SHARED_BYTES,
    max_registers: 255,
};

/// The TMA-fed kernels (`moe_expert_{up,down}_{ws,stream}`): the tensor maps of the
/// gathered rows and the weights come first, then the GEMM's other parameters.
const UP_WS_PARAMS: &[Param] = &[
    Param::tensor_map("x_map"),
    Param::tensor_map("gate_up_map"),
    Param::input("items", Elem::Item),
    Param::input("item_counts", Elem::U32),
    Param::u32("hidden"),
    Param::u32("inter"),
    Param::output("act", Elem::Bf16),
];
const DOWN_WS_PARAMS: &[Param] = &[
    Param::tensor_map("act_map"),
    Param::tensor_map("down_map"),
    Param::input("row_weights", Elem::F32),
    Param::input("items", Elem::Item),
    Param::input("item_counts", Elem::U32),
    Param::u32("hidden"),
    Param::u32("inter"),
    Param::output("y", Elem::F32),
];

/// `moe_expert_up_ws`: GEMM 1 + SwiGLU, warp-specialised (a TMA producer, two `wgmma`
/// consumer warpgroups) on a persistent grid of at most [`gemm::WS_CTAS`] CTAs.
pub const UP_WS: KernelDecl = KernelDecl {
    entry: "moe_expert_up_ws",
    file: "expert_gemm_ws.cu",
    params: UP_WS_PARAMS,
    block: gemm::WS_THREADS,
    grid: |d| (gemm::ws_grid(d.items * (d.inter / gemm::WG_UP_COLUMNS)), 1),
    dynamic_smem: |_| gemm::WS_SHARED_BYTES,
    max_registers: 168,
};

/// `moe_expert_down_ws`: GEMM 2, warp-specialised.
pub const DOWN_WS: KernelDecl = KernelDecl {
    entry: "moe_expert_down_ws",
    file: "expert_gemm_ws.cu",
    params: DOWN_WS_PARAMS,
    block: gemm::WS_THREADS,
    grid: |d| (gemm::ws_grid(d.items * (d.hidden / gemm::WG_DOWN_COLUMNS)), 1),
    dynamic_smem: |_| gemm::WS_SHARED_BYTES,
    max_registers: 168,
};

/// `moe_expert_up_stream`: GEMM 1 + SwiGLU for slots with few rows, the weights streamed
/// by TMA through a shared-memory ring (3 CTAs per SM).
pub const UP_STREAM: KernelDecl = KernelDecl {
    entry: "moe_expert_up_stream",
    file: "expert_gemm_stream.cu",
    params: UP_WS_PARAMS,
    block: gemm::STREAM_THREADS,
    grid: |d| (d.inter / (gemm::STREAM_W_ROWS / 2), d.items),
    dynamic_smem: |_| gemm::STREAM_SHARED_BYTES,
    max_registers: 136,
};

/// `moe_expert_down_stream`: GEMM 2 with the routing weight for slots with few rows.
pub const DOWN_STREAM: KernelDecl = KernelDecl {
    entry: "moe_expert_down_stream",
    file: "expert_gemm_stream.cu",
    params: DOWN_WS_PARAMS,
    block: gemm::STREAM_THREADS,
    grid: |d| (d.hidden / gemm::STREAM_W_ROWS, d.items),
    dynamic_smem: |_| gemm::STREAM_SHARED_BYTES,
    max_registers: 136,
};

// ---- the files --------------------------------------------------------------------------

/// `cuda/route.cu`: router logits and selection (fused with the permutation's ranks).
pub const ROUTE: KernelSource = KernelSource {
    name: "route.cu",
    text: include_str!("../../cuda/route.cu"),
    min_arch: Arch::SM_80,
    kernels: &[
        &LOGITS_F32_F32_E1,
        &LOGITS_F32_BF16_E1,
        &LOGITS_BF16_F32_E1,
        &LOGITS_BF16_BF16_E1,
        &LOGITS_F32_F32_E4,
        &LOGITS_F32_BF16_E4,
        &LOGITS_BF16_F32_E4,
        &LOGITS_BF16_BF16_E4,
        &LOGITS_TC_F32_F32,
        &LOGITS_TC_F32_BF16,
        &LOGITS_TC_BF16_F32,
        &LOGITS_TC_BF16_BF16,
        &SELECT,
        &ROUTER_DECODE_F32_F32,
        &ROUTER_DECODE_F32_BF16,
        &ROUTER_DECODE_BF16_F32,
        &ROUTER_DECODE_BF16_BF16,
    ],
};

/// `cuda/permute.cu`: ranks, scatter and gather of the stable counting sort.
pub const PERMUTE: KernelSource = KernelSource {
    name: "permute.cu",
    text: include_str!("../../cuda/permute.cu"),
    min_arch: Arch::SM_80,
    kernels: &[&RANK, &SCATTER, &GATHER_F32_F32, &GATHER_F32_BF16, &GATHER_BF16_F32, &GATHER_BF16_BF16],
};

/// `cuda/combine.cu`: the fixed-order combine.
pub const COMBINE: KernelSource = KernelSource {
    name: "combine.cu",
    text: include_str!("../../cuda/combine.cu"),
    min_arch: Arch::SM_80,
    kernels: &[&COMBINE_KERNEL],
};

/// `cuda/expert_gemm_schedule.cu`: per-slot regime and work items.
pub const SCHEDULE: KernelSource = KernelSource {
    name: "expert_gemm_schedule.cu",
    text: include_str!("../../cuda/expert_gemm_schedule.cu"),
    min_arch: Arch::SM_80,
    kernels: &[&EXPERT_SCHEDULE],
};

/// `cuda/expert_gemm_decode.cu`: few rows per slot, weights streamed once.
pub const DECODE: KernelSource = KernelSource {
    name: "expert_gemm_decode.cu",
    text: include_str!("../../cuda/expert_gemm_decode.cu"),
    min_arch: Arch::SM_80,
    kernels: &[&UP_DECODE, &DOWN_DECODE, &UP_DECODE_HIDDEN_F32, &UP_DECODE_HIDDEN_BF16, &DOWN_DECODE_COMBINE],
};

/// `cuda/expert_gemm_mma.cu`: many rows per slot, `mma.sync` tiles (portable).
pub const MMA: KernelSource = KernelSource {
    name: "expert_gemm_mma.cu",
    text: include_str!("../../cuda/expert_gemm_mma.cu"),
    min_arch: Arch::SM_80,
    kernels: &[&UP_MMA, &DOWN_MMA, &UP_MMA_HIDDEN],
};

/// `cuda/expert_gemm_wgmma.cu`: many rows per slot, `wgmma` tiles (`sm_90a` only).
pub const WGMMA: KernelSource = KernelSource {
    name: "expert_gemm_wgmma.cu",
    text: include_str!("../../cuda/expert_gemm_wgmma.cu"),
    min_arch: Arch::SM_90A,
    kernels: &[&UP_WGMMA, &DOWN_WGMMA, &UP_WGMMA_HIDDEN],
};

/// `cuda/expert_gemm_ws.cu`: many rows per slot, the second generation: warp-specialised
/// TMA + `wgmma` on a persistent grid (`sm_90a` only).
pub const WS: KernelSource = KernelSource {
    name: "expert_gemm_ws.cu",
    text: include_str!("../../cuda/expert_gemm_ws.cu"),
    min_arch: Arch::SM_90A,
    kernels: &[&UP_WS, &DOWN_WS],
};

/// `cuda/expert_gemm_stream.cu`: few rows per slot, the second generation: weights streamed
/// by TMA through a shared-memory ring (`sm_90a` only).
pub const STREAM: KernelSource = KernelSource {
    name: "expert_gemm_stream.cu",
    text: include_str!("../../cuda/expert_gemm_stream.cu"),
    min_arch: Arch::SM_90A,
    kernels: &[&UP_STREAM, &DOWN_STREAM],
};

/// Every kernel file, in pipeline order.
pub const FILES: &[KernelSource] = &[ROUTE, PERMUTE, COMBINE, SCHEDULE, DECODE, STREAM, MMA, WGMMA, WS];

/// The kernel files that compile for `arch`.
pub fn files_for(arch: Arch) -> impl Iterator<Item = &'static KernelSource> {
    FILES.iter().filter(move |f| arch.supports(f.min_arch))
}

/// Every kernel of every file.
pub fn kernels() -> impl Iterator<Item = &'static KernelDecl> {
    FILES.iter().flat_map(|f| f.kernels.iter().copied())
}

/// The file named `name`.
pub fn file(name: &str) -> Option<&'static KernelSource> {
    FILES.iter().find(|f| f.name == name)
}

/// The oldest target a kernel file compiles for: every file of the crate needs `sm_80`.
pub const MIN_ARCH: Arch = Arch::SM_80;

/// The integer constants the kernel files `#define`, with the values the Rust side launches
/// with (checked against every file and header by `tests/kernel_seam.rs`).
pub const KERNEL_CONSTANTS: &[(&str, usize)] = &[
    ("FULL_MASK", u32::MAX as usize),
    ("NO_INDEX", u32::MAX as usize),
    ("TILE_TOKENS", moe::TILE_TOKENS),
    ("TILE_THREADS", moe::TILE_THREADS as usize),
    ("TILE_WARPS", moe::TILE_WARPS),
    ("LOGIT_THREADS", moe::LOGIT_THREADS as usize),
    ("LOGIT_WARPS", moe::LOGIT_THREADS as usize / 32),
    ("LOGIT_TOKENS", moe::LOGIT_TOKENS),
    ("TC_WARPS", moe::TC_THREADS as usize / 32),
    ("TC_THREADS", moe::TC_THREADS as usize),
    ("TC_TOKENS", moe::TC_TOKENS),
    ("TC_TILES", moe::TC_EXPERTS / 8),
    ("TC_EXPERTS", moe::TC_EXPERTS),
    ("TC_K_STEP", moe::TC_K_STEP),
    ("GATHER_THREADS", moe::GATHER_THREADS as usize),
    ("COMBINE_THREADS", moe::COMBINE_THREADS as usize),
    ("COMBINE_MAX_SLOTS", moe::COMBINE_MAX_SLOTS),
    ("COUNT_DECODE", gemm::COUNT_DECODE),
    ("COUNT_TILED", gemm::COUNT_TILED),
    ("COUNT_OVERFLOW", gemm::COUNT_OVERFLOW),
    ("DECODE_ITEM_ROWS", gemm::DECODE_ITEM_ROWS),
    ("DECODE_WARPS", gemm::DECODE_THREADS as usize / 32),
    ("DECODE_THREADS", gemm::DECODE_THREADS as usize),
    ("DECODE_K_STEP", gemm::DECODE_K_STEP),
    ("DECODE_UNROLL", gemm::DECODE_UNROLL),
    ("DECODE_MIN_CTAS", gemm::DECODE_MIN_CTAS),
    ("DECODE_CHAIN_MIN_CTAS", gemm::DECODE_CHAIN_MIN_CTAS),
    ("DECODE_UP_COLUMNS", gemm::DECODE_UP_COLUMNS),
    ("DECODE_DOWN_COLUMNS", gemm::DECODE_DOWN_COLUMNS),
    ("MMA_BM", gemm::TILE_ROWS),
    ("MMA_BN", gemm::MMA_DOWN_COLUMNS),
    ("MMA_BK", gemm::MMA_BK),
    ("MMA_STAGES", gemm::MMA_STAGES),
    ("MMA_THREADS", gemm::MMA_THREADS as usize),
    ("MMA_ROW_BYTES", gemm::MMA_BK * 2),
    ("MMA_A_BYTES", gemm::TILE_ROWS * gemm::MMA_BK * 2),
    ("MMA_B_BYTES", gemm::MMA_DOWN_COLUMNS * gemm::MMA_BK * 2),
    ("MMA_STAGE_BYTES", (gemm::TILE_ROWS + gemm::MMA_DOWN_COLUMNS) * gemm::MMA_BK * 2),
    ("MMA_SHARED_BYTES", gemm::MMA_SHARED_BYTES),
    ("MMA_CHUNKS_PER_ROW", gemm::MMA_BK * 2 / 16),
    ("WG_BM", gemm::TILE_ROWS),
    ("WG_BN", gemm::WG_DOWN_COLUMNS),
    ("WG_BK", gemm::WG_BK),
    ("WG_STAGES", gemm::WG_STAGES),
    ("WG_THREADS", gemm::WG_THREADS as usize),
    ("WG_ROW_BYTES", gemm::WG_BK * 2),
    ("WG_A_BYTES", gemm::TILE_ROWS * gemm::WG_BK * 2),
    ("WG_B_BYTES", gemm::WG_DOWN_COLUMNS * gemm::WG_BK * 2),
    ("WG_STAGE_BYTES", (gemm::TILE_ROWS + gemm::WG_DOWN_COLUMNS) * gemm::WG_BK * 2),
    ("WG_ALIGN", gemm::WG_ALIGN),
    ("WG_SHARED_BYTES", gemm::WG_SHARED_BYTES),
    ("WG_CHUNKS_PER_ROW", gemm::WG_BK * 2 / 16),
    ("WG_A_CHUNKS", gemm::TILE_ROWS * (gemm::WG_BK * 2 / 16) / gemm::WG_THREADS as usize),
    ("MMA_A_CHUNKS", gemm::TILE_ROWS * (gemm::MMA_BK * 2 / 16) / gemm::MMA_THREADS as usize),
    ("WG_ACC", 64 * gemm::WG_DOWN_COLUMNS / 128),
    ("WS_BM", gemm::TILE_ROWS),
    ("WS_BN", gemm::WG_DOWN_COLUMNS),
    ("WS_BK", gemm::WG_BK),
    ("WS_STAGES", gemm::WS_STAGES),
    ("WS_THREADS", gemm::WS_THREADS as usize),
    ("WS_CTAS", gemm::WS_CTAS),
    ("WS_HALF_ROWS", gemm::WS_HALF_ROWS),
    ("WS_B_BOX_ROWS", gemm::WS_B_BOX_ROWS),
    ("WS_HALF_BYTES", gemm::WS_HALF_ROWS * gemm::WG_BK * 2),
    ("WS_A_BYTES", gemm::TILE_ROWS * gemm::WG_BK * 2),
    ("WS_B_BYTES", gemm::WG_DOWN_COLUMNS * gemm::WG_BK * 2),
    ("WS_STAGE_BYTES", (gemm::TILE_ROWS + gemm::WG_DOWN_COLUMNS) * gemm::WG_BK * 2),
    ("WS_ALIGN", gemm::WG_ALIGN),
    ("WS_BARRIER_BYTES", gemm::WS_BARRIER_BYTES),
    ("WS_SHARED_BYTES", gemm::WS_SHARED_BYTES),
    ("WS_CONSUMER_WARPS", gemm::WS_CONSUMER_WARPS),
    ("WS_PRODUCER_REGS", gemm::WS_PRODUCER_REGS),
    ("WS_CONSUMER_REGS", gemm::WS_CONSUMER_REGS),
    ("WS_ACC", 64 * gemm::WG_DOWN_COLUMNS / 128),
    ("STREAM_WARPS", (gemm::STREAM_THREADS as usize - 32) / 32),
    ("STREAM_THREADS", gemm::STREAM_THREADS as usize),
    ("STREAM_STAGES", gemm::STREAM_STAGES),
    ("STREAM_BK", gemm::STREAM_BK),
    ("STREAM_W_ROWS", gemm::STREAM_W_ROWS),
    ("STREAM_W_BOX_ROWS", gemm::STREAM_W_BOX_ROWS),
    ("STREAM_X_BOX_ROWS", gemm::STREAM_X_BOX_ROWS),
    ("STREAM_MAX_TILES", gemm::DECODE_ITEM_ROWS / gemm::STREAM_X_BOX_ROWS),
    ("STREAM_W_BYTES", gemm::STREAM_W_ROWS * gemm::STREAM_BK * 2),
    ("STREAM_X_BOX_BYTES", gemm::STREAM_X_BOX_ROWS * gemm::STREAM_BK * 2),
    ("STREAM_STAGE_BYTES", (gemm::STREAM_W_ROWS + gemm::DECODE_ITEM_ROWS) * gemm::STREAM_BK * 2),
    ("STREAM_ALIGN", gemm::WG_ALIGN),
    ("STREAM_BARRIER_BYTES", gemm::STREAM_BARRIER_BYTES),
    ("STREAM_SHARED_BYTES", gemm::STREAM_SHARED_BYTES),
    ("STREAM_MIN_CTAS", gemm::STREAM_MIN_CTAS),
];
