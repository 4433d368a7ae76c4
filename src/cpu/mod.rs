//! Fast CPU matrix kernels for bf16 / f32 weights.
//!
//! The central operation is [`gemm_nt`]: `out = a * w^T` with `a` row-major `[m, k]`
//! (activations) and `w` row-major `[n, k]` (weights, "out, in" like PyTorch `Linear`).
//!
//! # Numerics (a contract other code relies on)
//!
//! | a | w | products | accumulation |
//! |---|---|---|---|
//! | bf16 | bf16 | exact in f32 | f32 (VDPBF16PS on [`Isa::Avx512Bf16`]; AMX `TDPBF16PS` tiles on [`Isa::Amx`] when `k` is a multiple of 32) |
//! | f32 | bf16 | `w` widened exactly, `a` never rounded | f32 FMA |
//! | f32 | f32 | f32 FMA | f32 |
//! | bf16 | f32 | `a` widened exactly | f32 FMA |
//!
//! # Determinism and batch invariance
//!
//! `out[i][j]` is a function of `(isa, a[i, :], w[j, :], k)` only: every output element
//! has one accumulator of 16 f32 lanes that walks `k` in fixed chunks from 0 upwards and
//! is reduced by the same tree (on AMX tiles, one f32 accumulator that walks `k` in
//! chunks of 32), whatever `m`, `n`, `ldo`, the thread or the position of the element
//! inside a register tile. Which kernel runs depends on the ISA, the dtypes and `k`,
//! never on `m`. [`par_gemm_nt`] therefore returns bit-identical
//! results to [`gemm_nt`] with [`Isa::detect`], and a token's output does not depend on
//! the other tokens in its batch. Results may differ (within rounding) between ISAs.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod driver;
pub mod experts;
mod plan;
mod portable;
mod rows;

use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

use crate::tensor::TensorView;
pub(crate) use driver::Sink;
pub use experts::{LayerBuffers, WORKSPACE_KEEP_BYTES};
pub(crate) use plan::{Cols, PackedA};
pub(crate) use rows::{Line, RowBuf, RowMut, RowsPtr};

/// Instruction set the CPU kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// AMX-BF16 tiles for bf16 x bf16 products (`k` a multiple of 32), the
    /// [`Isa::Avx512Bf16`] kernels for everything else (Sapphire Rapids and later, on Linux).
    Amx,
    /// AVX-512 with `avx512bf16`: bf16 x bf16 products by VDPBF16PS (Zen 4, Sapphire Rapids).
    Avx512Bf16,
    /// AVX-512 F/BW/VL without bf16 dot products: every path by f32 FMA.
    Avx512,
    /// Plain Rust, any CPU.
    Portable,
}

/// Environment variable that forces a lower ISA than the best one detected.
pub const ISA_ENV: &str = "DOTS_MOE_CPU_ISA";

impl Isa {
    /// Best ISA this CPU supports (detected once, cached).
    ///
    /// The environment variable [`ISA_ENV`] (`DOTS_MOE_CPU_ISA=portable|avx512|avx512bf16|amx`)
    /// forces a lower one; a value above what the CPU supports, or an unknown value, is
    /// ignored.
    pub fn detect() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let best = Isa::supported()[0];
            let forced = match std::env::var(ISA_ENV).as_deref() {
                Ok("portable") => Some(Isa::Portable),
                Ok("amx") => Some(Isa::Amx),
                Ok("avx512") => Some(Isa::Avx512),
                Ok("avx512bf16") => Some(Isa::Avx512Bf16),
                _ => None,
            };
            // Declaration order is best first, so the lower ISA compares greater.
            forced.map_or(best, |f| f.max(best))
        })
    }

    /// Whether this CPU can run `self`.
    pub fn is_supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl");
            match self {
                Isa::Amx => avx512 && amx::available(),
                Isa::Avx512Bf16 => avx512 && is_x86_feature_detected!("avx512bf16"),
                Isa::Avx512 => avx512,
                Isa::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// All ISAs this CPU supports, best first (for tests that check every path).
    pub fn supported() -> Vec<Isa> {
        [Isa::Amx, Isa::Avx512Bf16, Isa::Avx512, Isa::Portable].into_iter().filter(|isa| isa.is_supported()).collect()
    }
}

/// `out[i * ldo + j] = sum_kk a[i * k + kk] * w[j * k + kk]` for `i < m`, `j < n`
/// (overwrites those elements, leaves the others alone). Single-threaded.
///
/// See the [module documentation](self) for the numerics and the batch invariance.
///
/// # Panics
/// Only on caller bugs: `a.len() != m * k`, `w.len() != n * k`, `ldo < n`,
/// `out.len() < (m - 1) * ldo + n` (when `m, n > 0`), or an `isa` this CPU does not
/// support.
#[allow(clippy::too_many_arguments)] // the BLAS-like signature is the contract callers use
pub fn gemm_nt(
    isa: Isa,
    a: TensorView<'_>,
    w: TensorView<'_>,
    m: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
    ldo: usize,
) {
    assert_eq!(w.len(), n * k, "gemm: w.len() != n * k ({n} * {k})");
    let a = PackedA::new(isa, a, w.dtype(), m, k);
    let out = RowsPtr::gemm_out(out, m, n, ldo);
    // SAFETY: `out` borrows the caller's `&mut [f32]` for this whole call and this is
    // the only computation writing to it.
    unsafe { a.run(w, Cols::Plain, 0..m, 0..n, &out) };
}

/// Same contract as [`gemm_nt`], parallel over rayon's pool, with [`Isa::detect`].
///
/// Splits `n` into blocks (and `m` into blocks of 64 rows when `m > 128`); each task
/// reads its block of `w` once. Bit-identical to `gemm_nt(Isa::detect(), ..)`.
///
/// # Panics
/// As [`gemm_nt`].
pub fn par_gemm_nt(a: TensorView<'_>, w: TensorView<'_>, m: usize, n: usize, k: usize, out: &mut [f32], ldo: usize) {
    /// Below this many multiply-adds one thread is faster than fanning out.
    const MIN_PARALLEL_WORK: usize = 1 << 18;
    /// Rows of `a` per task when `m` is split.
    const M_TASK: usize = 64;
    /// Granularity of the `n` split: a multiple of every tile width (4, 6, 8).
    const N_ALIGN: usize = 24;
    /// Granularity of the `m` split: a multiple of every tile height.
    const M_ALIGN: usize = 4;

    assert_eq!(w.len(), n * k, "gemm: w.len() != n * k ({n} * {k})");
    let a = PackedA::new(Isa::detect(), a, w.dtype(), m, k);
    let out = RowsPtr::gemm_out(out, m, n, ldo);
    let threads = rayon::current_num_threads();
    if threads <= 1 || m * n * k.max(1) < MIN_PARALLEL_WORK {
        // SAFETY: `out` borrows the caller's `&mut [f32]`; no other writer.
        unsafe { a.run(w, Cols::Plain, 0..m, 0..n, &out) };
        return;
    }
    let m_task = if m > 2 * M_TASK { m.div_ceil(m.div_ceil(M_TASK)).next_multiple_of(M_ALIGN) } else { m };
    let m_tasks = m.div_ceil(m_task);
    let n_tasks = (4 * threads).div_ceil(m_tasks).max(1);
    let n_task = n.div_ceil(n_tasks).div_ceil(N_ALIGN) * N_ALIGN;
    let n_tasks = n.div_ceil(n_task);
    (0..m_tasks * n_tasks).into_par_iter().for_each(|t| {
        let (ti, tj) = (t / n_tasks, t % n_tasks);
        let rows = ti * m_task..((ti + 1) * m_task).min(m);
        let cols = tj * n_task..((tj + 1) * n_task).min(n);
        // SAFETY: the tasks' `rows x cols` blocks are disjoint and cover the output
        // once; `out` borrows the caller's `&mut [f32]` until `for_each` returns.
        unsafe { a.run(w, Cols::Plain, rows, cols, &out) };
    });
}

/// Rounds f32 values to bf16 (nearest even, NaNs made quiet; bit-identical to
/// `half::bf16::from_f32`) into `out`, vectorised on AVX-512.
///
/// # Panics
/// If `src.len() != out.len()`.
pub fn f32_to_bf16(src: &[f32], out: &mut [bf16]) {
    assert_eq!(src.len(), out.len(), "f32_to_bf16: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if Isa::detect() != Isa::Portable {
        // SAFETY: AVX-512 F/BW/VL are present (`Isa::Avx512` or better was detected).
        unsafe { avx512::f32_to_bf16(src, bytemuck::cast_slice_mut(out)) };
        return;
    }
    use half::slice::HalfFloatSliceExt;
    out.convert_from_f32_slice(src);
}

/// `silu(g) * u` elementwise in f32: `out[i] = g[i] / (1 + exp(-g[i])) * u[i]`.
///
/// # Panics
/// If the three slices do not have the same length.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(
        gate.len() == up.len() && up.len() == out.len(),
        "swiglu: lengths {} (gate), {} (up), {} (out) differ",
        gate.len(),
        up.len(),
        out.len()
    );
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu_mul(g, u);
    }
}

/// `silu(g) * u = g / (1 + exp(-g)) * u`: the one formula every SwiGLU of the crate uses.
#[inline(always)]
pub(crate) fn silu_mul(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}
