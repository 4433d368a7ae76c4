//! One GEMM call: which kernel runs, `a` prepared for it once (shared by every task),
//! and the hand-off of register tiles to the kernel.
//!
//! `a` is small next to the weights (`m * k` against `n * k`), so every AVX-512 plan
//! copies it into 64-byte aligned rows with a padded stride: a 64-byte load that straddles
//! two cache lines costs about 15% of the bf16 tile's throughput. The weights are read in
//! place, once per call (per `a` cache block for `m` beyond a block).

use std::borrow::Cow;
use std::cell::Cell;
use std::ops::Range;

use half::slice::HalfFloatSliceExt;

#[cfg(target_arch = "x86_64")]
use super::avx512;
use super::driver::{Blocking, MAX_PREFETCH_ROWS, OutPtr, drive, lcm};
use super::{Isa, portable};
use crate::tensor::TensorView;

/// One 64-byte cache line: the unit of [`AlignedRows`] storage, which makes it aligned.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Line([u8; 64]);

thread_local! {
    /// Storage of the last [`AlignedRows`] dropped on this thread, reused by the next
    /// call: a fresh allocation per call costs page faults or zeroing on every call.
    static SCRATCH: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
}

/// Storage larger than this goes back to the allocator instead of being kept.
const SCRATCH_KEEP_BYTES: usize = 8 << 20;

/// Rows of at least `len` elements in 64-byte aligned storage, the row stride padded to
/// an odd number of whole cache lines. The padding holds unspecified values: kernels never read past `len`
/// (`avx512::tile_f32_bf16`'s packed rows are written in full by the packing).
pub(crate) struct AlignedRows<T> {
    buf: Vec<Line>,
    rows: usize,
    stride: usize,
    elem: std::marker::PhantomData<T>,
}

impl<T: bytemuck::Pod> AlignedRows<T> {
    /// `rows` rows of at least `len` elements.
    fn new(rows: usize, len: usize) -> Self {
        let per_line = 64 / size_of::<T>();
        // An odd number of lines per row: rows `4 KiB * j` apart would all fall in one
        // L1 set (64 sets of 64 bytes), and a tile's `a` rows would evict each other
        // and the `w` rows it streams beside them.
        let row_lines = len.div_ceil(per_line) | 1;
        let stride = row_lines * per_line;
        let lines = rows * row_lines;
        let mut buf = SCRATCH.take();
        if buf.len() < lines {
            buf.resize(lines, Line([0; 64]));
        }
        AlignedRows { buf, rows, stride, elem: std::marker::PhantomData }
    }

    /// Row `i`: `stride >= len` elements, starting on a cache line.
    #[inline]
    fn row(&self, i: usize) -> &[T] {
        assert!(i < self.rows);
        &bytemuck::cast_slice(&self.buf)[i * self.stride..(i + 1) * self.stride]
    }

    /// Row `i`, mutable.
    fn row_mut(&mut self, i: usize) -> &mut [T] {
        assert!(i < self.rows);
        &mut bytemuck::cast_slice_mut(&mut self.buf)[i * self.stride..(i + 1) * self.stride]
    }
}

impl<T> Drop for AlignedRows<T> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.len() * 64 <= SCRATCH_KEEP_BYTES {
            SCRATCH.set(buf);
        }
    }
}

/// Which kernel runs, with `a` prepared for it.
enum Plan<'a> {
    /// Portable kernels; `a` as f32.
    Portable { a: Cow<'a, [f32]>, w: TensorView<'a> },
    /// bf16 x bf16 by VDPBF16PS; `a` copied to aligned rows, both as raw bf16 bits.
    #[cfg(target_arch = "x86_64")]
    Bf16Dot { a: AlignedRows<u16>, w: &'a [u16] },
    /// f32 (or exactly widened bf16) `a`, packed even/odd, times bf16 `w` by FMA.
    #[cfg(target_arch = "x86_64")]
    F32Bf16 { a: AlignedRows<f32>, w: &'a [u16] },
    /// f32 (or exactly widened bf16) `a` in aligned rows times f32 `w` by FMA.
    #[cfg(target_arch = "x86_64")]
    F32F32 { a: AlignedRows<f32>, w: &'a [f32] },
}

/// One validated GEMM call: the plan and `k`.
pub(crate) struct Gemm<'a> {
    plan: Plan<'a>,
    k: usize,
}

impl<'a> Gemm<'a> {
    /// Validates the operand lengths and the ISA, and prepares `a` for the kernel.
    pub(crate) fn new(isa: Isa, a: TensorView<'a>, w: TensorView<'a>, m: usize, n: usize, k: usize) -> Self {
        assert_eq!(a.len(), m * k, "gemm: a.len() != m * k ({m} * {k})");
        assert_eq!(w.len(), n * k, "gemm: w.len() != n * k ({n} * {k})");
        assert!(isa.is_supported(), "gemm: {isa:?} is not supported by this CPU");
        let plan = match isa {
            Isa::Portable => Plan::Portable {
                a: match a {
                    TensorView::F32(s) => Cow::Borrowed(s),
                    TensorView::Bf16(_) => Cow::Owned(a.to_f32_vec()),
                },
                w,
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 | Isa::Avx512 => match (a, w) {
                (TensorView::Bf16(a), TensorView::Bf16(w)) if isa == Isa::Avx512Bf16 => {
                    let mut rows = AlignedRows::new(m, k);
                    for (i, src) in a.chunks_exact(k.max(1)).enumerate() {
                        rows.row_mut(i)[..k].copy_from_slice(bytemuck::cast_slice(src));
                    }
                    Plan::Bf16Dot { a: rows, w: bytemuck::cast_slice(w) }
                }
                (_, TensorView::Bf16(w)) => Plan::F32Bf16 { a: pack_even_odd(a, m, k), w: bytemuck::cast_slice(w) },
                (_, TensorView::F32(w)) => {
                    let mut rows = AlignedRows::new(m, k);
                    for i in 0..m {
                        let dst = &mut rows.row_mut(i)[..k];
                        match a {
                            TensorView::F32(s) => dst.copy_from_slice(&s[i * k..(i + 1) * k]),
                            TensorView::Bf16(s) => s[i * k..(i + 1) * k].convert_to_f32_slice(dst),
                        }
                    }
                    Plan::F32F32 { a: rows, w }
                }
            },
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512Bf16 | Isa::Avx512 => unreachable!("checked by is_supported"),
        };
        Gemm { plan, k }
    }

    /// Computes `out[rows, cols]`.
    ///
    /// # Safety
    /// No other thread may access `out` elements in `rows x cols` during the call, and
    /// the `&mut` borrow `out` was built from must be live.
    pub(crate) unsafe fn run(&self, rows: Range<usize>, cols: Range<usize>, out: OutPtr) {
        let k = self.k;
        match &self.plan {
            Plan::Portable { a, w } => {
                let a_row = |i: usize| &a[i * k..(i + 1) * k];
                match *w {
                    // SAFETY (both): forwarded from the caller.
                    TensorView::F32(w) => unsafe {
                        drive_portable(rows, cols, out, k, 4, a_row, |j| &w[j * k..(j + 1) * k])
                    },
                    TensorView::Bf16(w) => unsafe {
                        drive_portable(rows, cols, out, k, 2, a_row, |j| &w[j * k..(j + 1) * k])
                    },
                }
            }
            #[cfg(target_arch = "x86_64")]
            Plan::Bf16Dot { a, w } => {
                use avx512::{BF16_TILE, NR1, tile_bf16};
                const MR: usize = BF16_TILE[0];
                const NR: usize = BF16_TILE[1];
                let w_row = |j: usize| &w[j * k..(j + 1) * k];
                let blk = Blocking::for_l2(2 * k, 2 * k, MR, lcm(NR, NR1));
                // SAFETY (all three): `Gemm::new` checked that the CPU supports
                // `Isa::Avx512Bf16`, the only ISA that builds this plan; `out` access is
                // forwarded from the caller.
                unsafe {
                    drive::<MR, NR, NR1, _, _>(
                        rows,
                        cols,
                        blk,
                        out,
                        |ia, jw, pf| tile_bf16(ia.map(|i| a.row(i)), jw.map(w_row), k, Prefetch::new(w, k, pf).rows()),
                        |i, jw, pf| tile_bf16([a.row(i)], jw.map(w_row), k, Prefetch::new(w, k, pf).rows())[0],
                    )
                }
            }
            #[cfg(target_arch = "x86_64")]
            Plan::F32Bf16 { a, w } => {
                use avx512::{F32_BF16_TILE, NR1, packed_len, tile_f32_bf16};
                const MR: usize = F32_BF16_TILE[0];
                const NR: usize = F32_BF16_TILE[1];
                let w_row = |j: usize| &w[j * k..(j + 1) * k];
                let blk = Blocking::for_l2(4 * packed_len(k), 2 * k, MR, lcm(NR, NR1));
                // SAFETY (all three): this plan is built only for `Isa::Avx512` or
                // better, which `Gemm::new` checked; `out` access is forwarded.
                unsafe {
                    drive::<MR, NR, NR1, _, _>(
                        rows,
                        cols,
                        blk,
                        out,
                        |ia, jw, pf| {
                            tile_f32_bf16(ia.map(|i| a.row(i)), jw.map(w_row), k, Prefetch::new(w, k, pf).rows())
                        },
                        |i, jw, pf| tile_f32_bf16([a.row(i)], jw.map(w_row), k, Prefetch::new(w, k, pf).rows())[0],
                    )
                }
            }
            #[cfg(target_arch = "x86_64")]
            Plan::F32F32 { a, w } => {
                use avx512::{F32_TILE, NR1, tile_f32};
                const MR: usize = F32_TILE[0];
                const NR: usize = F32_TILE[1];
                let w_row = |j: usize| &w[j * k..(j + 1) * k];
                let blk = Blocking::for_l2(4 * k, 4 * k, MR, lcm(NR, NR1));
                // SAFETY (all three): this plan is built only for `Isa::Avx512` or
                // better, which `Gemm::new` checked; `out` access is forwarded.
                unsafe {
                    drive::<MR, NR, NR1, _, _>(
                        rows,
                        cols,
                        blk,
                        out,
                        |ia, jw, pf| tile_f32(ia.map(|i| a.row(i)), jw.map(w_row), k, Prefetch::new(w, k, pf).rows()),
                        |i, jw, pf| tile_f32([a.row(i)], jw.map(w_row), k, Prefetch::new(w, k, pf).rows())[0],
                    )
                }
            }
        }
    }
}

/// Rows of `w` a tile call prefetches (see `driver::drive`), as pointers.
#[cfg(target_arch = "x86_64")]
struct Prefetch<T> {
    ptrs: [*const T; MAX_PREFETCH_ROWS],
    len: usize,
}

#[cfg(target_arch = "x86_64")]
impl<T> Prefetch<T> {
    /// Rows `rows` (at most [`MAX_PREFETCH_ROWS`]) of `w`, rows of `k` elements.
    fn new(w: &[T], k: usize, rows: Range<usize>) -> Self {
        let mut ptrs = [std::ptr::null(); MAX_PREFETCH_ROWS];
        let len = rows.len().min(MAX_PREFETCH_ROWS);
        for (p, j) in ptrs.iter_mut().zip(rows) {
            *p = w[j * k..].as_ptr();
        }
        Prefetch { ptrs, len }
    }

    fn rows(&self) -> &[*const T] {
        &self.ptrs[..self.len]
    }
}

/// Runs the portable kernel over `rows x cols` (`w_elem_bytes` sizes the cache blocks).
///
/// # Safety
/// As [`Gemm::run`].
unsafe fn drive_portable<'w, W: portable::WeightElem + 'w>(
    rows: Range<usize>,
    cols: Range<usize>,
    out: OutPtr,
    k: usize,
    w_elem_bytes: usize,
    a_row: impl Fn(usize) -> &'w [f32],
    w_row: impl Fn(usize) -> &'w [W],
) {
    use portable::{NR, tile};
    let blk = Blocking::for_l2(4 * k, w_elem_bytes * k, 1, NR);
    // SAFETY: forwarded from the caller.
    unsafe {
        drive::<1, NR, NR, _, _>(
            rows,
            cols,
            blk,
            out,
            |[i], jw, _| [tile(a_row(i), jw.map(&w_row), k)],
            |i, jw, _| tile(a_row(i), jw.map(&w_row), k),
        )
    }
}

/// Packs every row of `a` for `avx512::tile_f32_bf16` (see `avx512::pack_even_odd_bf16`).
#[cfg(target_arch = "x86_64")]
fn pack_even_odd(a: TensorView<'_>, m: usize, k: usize) -> AlignedRows<f32> {
    let mut rows = AlignedRows::new(m, avx512::packed_len(k));
    if k == 0 {
        return rows;
    }
    for i in 0..m {
        let dst = &mut rows.row_mut(i)[..avx512::packed_len(k)];
        match a {
            // SAFETY: only called for plans of `Isa::Avx512` or better, whose support
            // `Gemm::new` checked before.
            TensorView::F32(s) => unsafe { avx512::pack_even_odd_f32(&s[i * k..(i + 1) * k], dst) },
            // SAFETY: as above.
            TensorView::Bf16(s) => unsafe {
                avx512::pack_even_odd_bf16(bytemuck::cast_slice(&s[i * k..(i + 1) * k]), dst)
            },
        }
    }
    rows
}
