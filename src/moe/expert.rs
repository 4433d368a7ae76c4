//! Steps 3 and 4 of the contract: the **grouped expert GEMM**, shared experts included
//! as extra slots.
//!
//! For every slot `e` and each of its permuted rows `r` (contiguous, from
//! [`Permutation::expert_rows`]):
//!
//! ```text
//! g      = x[r] @ gate_e^T             # [I], f32 accumulation
//! u      = x[r] @ up_e^T               # [I]
//! a      = silu(g) * u                 # f32; rounded to bf16 under Precision::Bf16
//! y[r]   = w[r] * (a @ down_e^T)       # [H], f32 accumulation, one multiply by the weight
//! ```
//!
//! `x` is the gathered input (bf16 under [`Precision::Bf16`], f32 under
//! [`Precision::F32`]); `w[r]` is the routing weight of the row's pair (1.0 for the shared
//! slots). Only the I-wide activation is kept between the two GEMMs.
//!
//! CPU schedule: each slot's rows are prepared for the kernel once
//! ([`crate::cpu::PackedA`]). GEMM 1 runs as tasks of (slot, block of [`UP_BLOCK`]
//! intermediate columns): each register tile reads gate rows and the matching up rows
//! together, and its epilogue writes `silu(g) * u` straight into the activation rows.
//! GEMM 2 runs as tasks of (slot, block of [`DOWN_BLOCK`] hidden columns), its epilogue
//! multiplying by the routing weight. Tasks spread over the rayon pool, so one token
//! still uses every core and each weight byte is read once per call. Every output
//! element's reduction order depends only on its own row and weight row
//! ([`crate::cpu::gemm_nt`]'s contract), so results are bit-identical run to run and
//! independent of the other tokens in the batch.

use half::bf16;
use rayon::prelude::*;

use std::ops::Range;

use crate::cpu::{self, Cols, Isa, PackedA};
use crate::error::{MoeError, check_len};
use crate::moe::Precision;
use crate::moe::permute::Permutation;
use crate::moe::weights::MoeWeights;
use crate::tensor::{Dtype, TensorView};

/// Intermediate columns (gate rows and the matching up rows) per GEMM 1 task.
pub const UP_BLOCK: usize = 128;
/// Hidden columns (down rows) per GEMM 2 task.
pub const DOWN_BLOCK: usize = 256;

/// The activation between the two GEMMs, `[R, I]`.
enum Activation {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl Activation {
    fn view(&self) -> TensorView<'_> {
        match self {
            Activation::F32(v) => TensorView::F32(v),
            Activation::Bf16(v) => TensorView::Bf16(v),
        }
    }
}

/// A row-major `[rows, cols]` matrix as a raw pointer, for epilogues of parallel tasks
/// that each write their own disjoint elements (column blocks are not contiguous).
struct RowsPtr<T> {
    ptr: *mut T,
    rows: usize,
    cols: usize,
}

// SAFETY: only a pointer and a shape; the tasks sharing it write disjoint elements (each
// owns a distinct block of slot rows x columns), so sharing it cannot create a data race.
unsafe impl<T: Send> Send for RowsPtr<T> {}
// SAFETY: as for `Send`.
unsafe impl<T: Send> Sync for RowsPtr<T> {}

impl<T> RowsPtr<T> {
    /// Borrows `data` as `[rows, cols]`. Panics if the length differs.
    fn new(data: &mut [T], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "expert rows: buffer length");
        RowsPtr { ptr: data.as_mut_ptr(), rows, cols }
    }

    /// Elements `(i, j..j + n)` as a slice.
    ///
    /// # Safety
    /// No other thread may access them while the slice lives, and the `&mut` borrow the
    /// pointer was built from must still be live.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)] // disjoint writes from parallel tasks, see above
    unsafe fn slice(&self, i: usize, j: usize, n: usize) -> &mut [T] {
        assert!(i < self.rows && j + n <= self.cols, "expert rows: ({i}, {j}..{}) out of range", j + n);
        // SAFETY: in bounds (asserted); exclusive access is the caller's guarantee.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.cols + j), n) }
    }
}

/// GEMM 1's epilogue: `silu(g) * u` (the formula of [`cpu::swiglu`]) into the activation
/// rows of one slot, rounded to bf16 under [`Precision::Bf16`].
struct SwigluSink<'a> {
    act: &'a ActivationPtr,
    /// The slot's first row in permuted order.
    row0: usize,
}

/// The activation buffer as a raw pointer.
enum ActivationPtr {
    F32(RowsPtr<f32>),
    Bf16(RowsPtr<bf16>),
}

impl cpu::Sink for SwigluSink<'_> {
    #[inline(always)]
    unsafe fn put(&self, i: usize, j: usize, g: &[f32], u: &[f32]) {
        // SAFETY (both): the task owns these elements (forwarded from the caller).
        match self.act {
            ActivationPtr::F32(p) => {
                for ((d, &g), &u) in unsafe { p.slice(self.row0 + i, j, g.len()) }.iter_mut().zip(g).zip(u) {
                    *d = cpu::silu_mul(g, u);
                }
            }
            ActivationPtr::Bf16(p) => {
                for ((d, &g), &u) in unsafe { p.slice(self.row0 + i, j, g.len()) }.iter_mut().zip(g).zip(u) {
                    *d = bf16::from_f32(cpu::silu_mul(g, u));
                }
            }
        }
    }
}

/// GEMM 2's epilogue: the routing weight times the down projection into the output rows.
struct WeightedSink<'a> {
    out: &'a RowsPtr<f32>,
    row0: usize,
    row_weights: &'a [f32],
}

impl cpu::Sink for WeightedSink<'_> {
    #[inline(always)]
    unsafe fn put(&self, i: usize, j: usize, y: &[f32], _: &[f32]) {
        let w = self.row_weights[self.row0 + i];
        // SAFETY: the task owns these elements (forwarded from the caller).
        for (d, &y) in unsafe { self.out.slice(self.row0 + i, j, y.len()) }.iter_mut().zip(y) {
            *d = w * y;
        }
    }
}

/// Runs both expert GEMMs for every slot: `x_perm [R, H]` in permuted order to weighted
/// rows `[R, H]` (f32), ready for [`crate::moe::combine`].
pub fn grouped_experts(
    weights: &MoeWeights,
    x_perm: TensorView<'_>,
    perm: &Permutation,
    row_weights: &[f32],
    precision: Precision,
    isa: Isa,
) -> Result<Vec<f32>, MoeError> {
    let cfg = weights.config();
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    perm.validate()?;
    let rows = perm.rows();
    if perm.n_experts() != cfg.n_slots() {
        return Err(MoeError::shape("expert_offsets", &[cfg.n_slots() + 1], &[perm.expert_offsets.len()]));
    }
    check_len("permuted hidden", &[rows, h], x_perm.len())?;
    check_len("row weights", &[rows], row_weights.len())?;
    if !isa.is_supported() {
        return Err(MoeError::Unsupported(format!("this CPU cannot run the {isa:?} kernels")));
    }

    let used: Vec<(usize, Range<usize>)> =
        (0..cfg.n_slots()).map(|e| (e, perm.expert_rows(e))).filter(|(_, r)| !r.is_empty()).collect();
    /// Each used slot's rows of `x [R, k]`, prepared for the kernel once.
    fn pack<'x>(
        isa: Isa,
        x: TensorView<'x>,
        k: usize,
        w_dtype: Dtype,
        used: &[(usize, Range<usize>)],
    ) -> Vec<PackedA<'x>> {
        used.par_iter().map(|(_, r)| PackedA::new(isa, x.slice(r.start * k..r.end * k), w_dtype, r.len(), k)).collect()
    }
    let tasks = |width: usize, block: usize| -> Vec<(usize, Range<usize>)> {
        (0..used.len()).flat_map(|u| (0..width).step_by(block).map(move |c| (u, c..(c + block).min(width)))).collect()
    };

    // GEMM 1 + SwiGLU: tasks of (slot, intermediate block), gate and up rows in one tile.
    let mut act = match precision {
        Precision::F32 => Activation::F32(vec![0.0; rows * i]),
        Precision::Bf16 => Activation::Bf16(vec![bf16::ZERO; rows * i]),
    };
    {
        let x = pack(isa, x_perm, h, weights.gate_up.dtype(), &used);
        let act_ptr = match &mut act {
            Activation::F32(v) => ActivationPtr::F32(RowsPtr::new(v, rows, i)),
            Activation::Bf16(v) => ActivationPtr::Bf16(RowsPtr::new(v, rows, i)),
        };
        tasks(i, UP_BLOCK).into_par_iter().for_each(|(u, cols)| {
            let (e, r) = &used[u];
            let sink = SwigluSink { act: &act_ptr, row0: r.start };
            // SAFETY: the tasks' (slot rows x columns) blocks of `act` are disjoint, and
            // `act` stays mutably borrowed by `act_ptr` until `for_each` returns.
            unsafe { x[u].run(weights.slot_gate_up(*e), Cols::Paired { second: i }, 0..r.len(), cols, &sink) };
        });
    }

    // GEMM 2 with the routing weight in the epilogue: tasks of (slot, hidden block).
    let mut out = vec![0.0f32; rows * h];
    {
        let a = pack(isa, act.view(), i, weights.down.dtype(), &used);
        let out_ptr = RowsPtr::new(&mut out, rows, h);
        tasks(h, DOWN_BLOCK).into_par_iter().for_each(|(u, cols)| {
            let (e, r) = &used[u];
            let sink = WeightedSink { out: &out_ptr, row0: r.start, row_weights };
            // SAFETY: as for GEMM 1, with `out` borrowed by `out_ptr`.
            unsafe { a[u].run(weights.slot_down(*e), Cols::Plain, 0..r.len(), cols, &sink) };
        });
    }
    Ok(out)
}
