//! `a` prepared once for the kernel that will run ([`PackedA`], shared by every task and
//! every weight matrix it multiplies), and the hand-off of register tiles to the kernel
//! and of their results to a [`Sink`].
//!
//! `a` is small next to the weights (`m * k` against `n * k`). Every AVX-512 plan reads it
//! from 64-byte aligned rows (see `rows`): copied there, or borrowed in place from a
//! [`RowBuf`] that already holds it in the kernel's layout. The weights are read in
//! place, once per call (per `a` cache block for `m` beyond a block).

#[cfg(target_arch = "x86_64")]
use std::array::from_fn;
use std::borrow::Cow;
use std::ops::Range;

use half::slice::HalfFloatSliceExt;

#[cfg(target_arch = "x86_64")]
use super::{amx, avx512};

use super::driver::{Blocking, MAX_PREFETCH_ROWS, Sink, drive, lcm};
use super::rows::{AlignedRows, Line, RowBuf};
use super::{Isa, portable};
use crate::tensor::{Dtype, TensorView};

/// How the output columns of a GEMM map to rows of `w`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cols {
    /// Output column `j` is the dot product with `w` row `j`.
    Plain,
    /// Output column `j` is the pair of dot products with `w` rows `j` and `second + j`
    /// (the gate and up rows of a SwiGLU expert), computed in the same register tile so
    /// that the epilogue sees both.
    Paired {
        /// Row offset of the second row of every pair.
        second: usize,
    },
}

impl Cols {
    /// Rows of `w` per output column.
    fn per_col(self) -> usize {
        match self {
            Cols::Plain => 1,
            Cols::Paired { .. } => 2,
        }
    }

    /// The `C` rows of `w` a tile over output columns `jo` reads: `jo` itself (`Plain`),
    /// or `C / 2` columns then their paired rows (`Paired`). Columns past `jo.end` repeat
    /// the last one (see `driver`).
    #[inline(always)]
    fn w_rows<const C: usize>(self, jo: &Range<usize>) -> [usize; C] {
        let col = |c: usize| (jo.start + c).min(jo.end - 1);
        match self {
            Cols::Plain => std::array::from_fn(col),
            Cols::Paired { second } => {
                std::array::from_fn(|c| if c < C / 2 { col(c) } else { second + col(c - C / 2) })
            }
        }
    }

    /// Hands a tile's results for rows `i0..` and output columns `jo` to `sink`.
    ///
    /// # Safety
    /// As [`Sink::put`] for every element of the tile.
    #[inline(always)]
    unsafe fn emit<S: Sink, const R: usize, const C: usize>(
        self,
        sink: &S,
        i0: usize,
        jo: &Range<usize>,
        t: &[[f32; C]; R],
    ) {
        let n = jo.len();
        for (r, row) in t.iter().enumerate() {
            // SAFETY: forwarded from the caller.
            unsafe {
                match self {
                    Cols::Plain => sink.put(i0 + r, jo.start, &row[..n], &[]),
                    Cols::Paired { .. } => sink.put(i0 + r, jo.start, &row[..n], &row[C / 2..C / 2 + n]),
                }
            }
        }
    }
}

/// `a` prepared for the kernel that will run.
enum Prepared<'a> {
    /// Portable kernels; `a` as f32.
    Portable(Cow<'a, [f32]>),
    /// bf16 x bf16 by VDPBF16PS; `a` copied to aligned rows as raw bf16 bits.
    #[cfg(target_arch = "x86_64")]
    Bf16Dot(AlignedRows<'a, u16>),
    /// bf16 x bf16 by AMX tiles; `a` packed as the tiles' `B` operand.
    #[cfg(target_arch = "x86_64")]
    Amx(amx::AmxA<'a>),
    /// f32 (or exactly widened bf16) `a`, packed even/odd, times bf16 `w` by FMA.
    #[cfg(target_arch = "x86_64")]
    F32Bf16(AlignedRows<'a, f32>),
    /// f32 (or exactly widened bf16) `a` in aligned rows times f32 `w` by FMA.
    #[cfg(target_arch = "x86_64")]
    F32F32(AlignedRows<'a, f32>),
}

/// The left operand `a [m, k]` of GEMMs against weights of one dtype, prepared once for
/// the kernel of an ISA and then shared by every task (and every weight matrix) that
/// multiplies it.
pub(crate) struct PackedA<'a> {
    prepared: Prepared<'a>,
    w_dtype: Dtype,
    m: usize,
    k: usize,
}

impl<'a> PackedA<'a> {
    /// Prepares `a [m, k]` for weights of `w_dtype` on `isa`.
    ///
    /// # Panics
    /// If `a.len() != m * k` or this CPU cannot run `isa`.
    pub(crate) fn new(isa: Isa, a: TensorView<'a>, w_dtype: Dtype, m: usize, k: usize) -> Self {
        assert_eq!(a.len(), m * k, "gemm: a.len() != m * k ({m} * {k})");
        if isa == Isa::Portable
            && let TensorView::F32(s) = a
        {
            return PackedA { prepared: Prepared::Portable(Cow::Borrowed(s)), w_dtype, m, k };
        }
        Self::prepare(isa, a.dtype(), w_dtype, m, k, |i| a.slice(i * k..(i + 1) * k))
    }

    /// Rows `rows` of `buf` (`[_, k]`), prepared for weights of `w_dtype` on `isa`:
    /// borrowed in place when `buf` already holds them in the kernel's layout (bf16 rows
    /// for VDPBF16PS, f32 rows for f32 weights), packed into `arena` (at least
    /// [`PackedA::arena_lines`] lines, kept by the caller from call to call) for the AMX
    /// tiles, copied otherwise.
    ///
    /// # Panics
    /// If `rows` is out of range, `arena` too short, or this CPU cannot run `isa`.
    pub(crate) fn from_rows(
        isa: Isa,
        buf: &'a RowBuf,
        rows: Range<usize>,
        w_dtype: Dtype,
        arena: &'a mut [Line],
    ) -> Self {
        assert!(isa.is_supported(), "gemm: {isa:?} is not supported by this CPU");
        let (m, k) = (rows.len(), buf.k());
        #[cfg(target_arch = "x86_64")]
        match (isa, buf.dtype(), w_dtype) {
            _ if uses_amx(isa, buf.dtype(), w_dtype, k) => {
                let tiles = amx::AmxA::pack_into(arena, m, k, |i| match buf.row(rows.start + i) {
                    TensorView::Bf16(src) => bytemuck::cast_slice(src),
                    TensorView::F32(_) => unreachable!("checked by uses_amx"),
                });
                return PackedA { prepared: Prepared::Amx(tiles), w_dtype, m, k };
            }
            (Isa::Amx | Isa::Avx512Bf16, Dtype::Bf16, Dtype::Bf16) => {
                return PackedA { prepared: Prepared::Bf16Dot(buf.aligned(rows)), w_dtype, m, k };
            }
            (Isa::Amx | Isa::Avx512Bf16 | Isa::Avx512, Dtype::F32, Dtype::F32) => {
                return PackedA { prepared: Prepared::F32F32(buf.aligned(rows)), w_dtype, m, k };
            }
            _ => {}
        }
        let _ = arena;
        Self::prepare(isa, buf.dtype(), w_dtype, m, k, |i| buf.row(rows.start + i))
    }

    /// Cache lines of caller-kept storage that [`PackedA::from_rows`] packs `rows` rows
    /// of `buf` into (0 where the plan borrows `buf` in place or owns a copy).
    pub(crate) fn arena_lines(isa: Isa, buf: &RowBuf, rows: usize, w_dtype: Dtype) -> usize {
        #[cfg(target_arch = "x86_64")]
        if uses_amx(isa, buf.dtype(), w_dtype, buf.k()) {
            return amx::AmxA::lines_needed(rows, buf.k());
        }
        let _ = (isa, buf, rows, w_dtype);
        0
    }

    /// Copies (and converts) the `m` rows `row(i)` of `k` elements of `a_dtype` into the
    /// layout of the kernel for `isa` and `w_dtype`.
    fn prepare<'r>(
        isa: Isa,
        a_dtype: Dtype,
        w_dtype: Dtype,
        m: usize,
        k: usize,
        row: impl Fn(usize) -> TensorView<'r>,
    ) -> Self {
        assert!(isa.is_supported(), "gemm: {isa:?} is not supported by this CPU");
        let prepared = match isa {
            Isa::Portable => {
                let mut a = vec![0.0f32; m * k];
                for (i, dst) in a.chunks_exact_mut(k.max(1)).enumerate().take(m) {
                    row(i).copy_to_f32(dst);
                }
                Prepared::Portable(Cow::Owned(a))
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Amx | Isa::Avx512Bf16 | Isa::Avx512 => match (a_dtype, w_dtype) {
                _ if uses_amx(isa, a_dtype, w_dtype, k) => Prepared::Amx(amx::AmxA::pack(m, k, |i| {
                    let TensorView::Bf16(src) = row(i) else { unreachable!("rows of a_dtype") };
                    bytemuck::cast_slice(src)
                })),
                (Dtype::Bf16, Dtype::Bf16) if isa != Isa::Avx512 => {
                    let mut rows = AlignedRows::new(m, k);
                    for i in 0..m {
                        let TensorView::Bf16(src) = row(i) else { unreachable!("rows of a_dtype") };
                        rows.row_mut(i)[..k].copy_from_slice(bytemuck::cast_slice(src));
                    }
                    Prepared::Bf16Dot(rows)
                }
                (_, Dtype::Bf16) => Prepared::F32Bf16(pack_even_odd(m, k, row)),
                (_, Dtype::F32) => {
                    let mut rows = AlignedRows::new(m, k);
                    for i in 0..m {
                        let dst = &mut rows.row_mut(i)[..k];
                        match row(i) {
                            TensorView::F32(s) => dst.copy_from_slice(s),
                            TensorView::Bf16(s) => s.convert_to_f32_slice(dst),
                        }
                    }
                    Prepared::F32F32(rows)
                }
            },
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Amx | Isa::Avx512Bf16 | Isa::Avx512 => unreachable!("checked by is_supported"),
        };
        PackedA { prepared, w_dtype, m, k }
    }

    /// Computes rows `rows` x output columns `cols` of `a * w^T` (columns mapped to rows of
    /// `w [n, k]` by `mode`) and hands every value to `sink` exactly once.
    ///
    /// # Panics
    /// If `w` is not of the dtype `a` was prepared for or not a whole number of rows of
    /// `k`, or if `rows` or the `w` rows `cols` maps to are out of range.
    ///
    /// # Safety
    /// No other thread may access the sink's elements of `rows x cols` during the call,
    /// and the storage the sink was built from must still be borrowed for it.
    pub(crate) unsafe fn run<S: Sink>(
        &self,
        w: TensorView<'_>,
        mode: Cols,
        rows: Range<usize>,
        cols: Range<usize>,
        sink: &S,
    ) {
        let k = self.k;
        assert_eq!(w.dtype(), self.w_dtype, "gemm: w is not of the dtype a was prepared for");
        assert!(rows.end <= self.m, "gemm: rows {rows:?} past m = {}", self.m);
        if rows.is_empty() || cols.is_empty() {
            return;
        }
        if k > 0 {
            assert_eq!(w.len() % k, 0, "gemm: w.len() is not a multiple of k = {k}");
            let last = match mode {
                Cols::Plain => cols.end,
                Cols::Paired { second } => second + cols.end,
            };
            assert!(last <= w.len() / k, "gemm: columns {cols:?} ({mode:?}) past the {} rows of w", w.len() / k);
        }
        match &self.prepared {
            Prepared::Portable(a) => {
                let a_row = |i: usize| &a[i * k..(i + 1) * k];
                match w {
                    // SAFETY (both): forwarded from the caller.
                    TensorView::F32(w) => unsafe {
                        drive_portable(rows, cols, mode, sink, k, 4, a_row, |j| &w[j * k..(j + 1) * k])
                    },
                    TensorView::Bf16(w) => unsafe {
                        drive_portable(rows, cols, mode, sink, k, 2, a_row, |j| &w[j * k..(j + 1) * k])
                    },
                }
            }
            // SAFETY (all three): `PackedA::prepare` or `from_rows` checked that the CPU
            // supports the ISA the plan was built for (`Isa::Avx512Bf16` for `Bf16Dot`, `Isa::Avx512` or better
            // for the others), and the `w` dtype was checked above; the sink access is
            // forwarded from the caller.
            #[cfg(target_arch = "x86_64")]
            Prepared::Bf16Dot(a) => unsafe {
                drive_avx512::<avx512::Bf16Dot, _, { avx512::BF16_NR }>(
                    a,
                    bytemuck::cast_slice(bf16_slice(w)),
                    k,
                    2 * k,
                    mode,
                    rows,
                    cols,
                    sink,
                )
            },
            // SAFETY: `PackedA::prepare` built this plan only for `Isa::Amx`, whose support
            // (AMX granted to this process) it checked; the sink access is forwarded.
            #[cfg(target_arch = "x86_64")]
            Prepared::Amx(a) => unsafe {
                amx::drive(a, bytemuck::cast_slice(bf16_slice(w)), k, mode, rows, cols, sink)
            },
            #[cfg(target_arch = "x86_64")]
            Prepared::F32Bf16(a) => unsafe {
                let a_bytes = 4 * avx512::packed_len(k);
                drive_avx512::<avx512::F32Bf16, _, { avx512::F32_BF16_NR }>(
                    a,
                    bytemuck::cast_slice(bf16_slice(w)),
                    k,
                    a_bytes,
                    mode,
                    rows,
                    cols,
                    sink,
                )
            },
            #[cfg(target_arch = "x86_64")]
            Prepared::F32F32(a) => unsafe {
                let TensorView::F32(w) = w else { unreachable!("dtype checked above") };
                drive_avx512::<avx512::F32F32, _, { avx512::F32_NR }>(a, w, k, 4 * k, mode, rows, cols, sink)
            },
        }
    }
}

/// Whether the plan for `a_dtype` x `w_dtype` over `k` on `isa` runs the AMX tiles: the
/// one place that choice is made (it depends on `k`, never on `m`).
#[cfg(target_arch = "x86_64")]
fn uses_amx(isa: Isa, a_dtype: Dtype, w_dtype: Dtype, k: usize) -> bool {
    isa == Isa::Amx && a_dtype == Dtype::Bf16 && w_dtype == Dtype::Bf16 && amx::takes(k)
}

/// The bf16 elements of `w` (its dtype was checked to be bf16).
#[cfg(target_arch = "x86_64")]
fn bf16_slice<'w>(w: TensorView<'w>) -> &'w [half::bf16] {
    match w {
        TensorView::Bf16(s) => s,
        TensorView::F32(_) => unreachable!("dtype checked by PackedA::run"),
    }
}

/// Runs kernel `K` over `rows x cols`: full `MR`-row tiles `NR` wide, a leftover
/// tile of 2 or 3 rows as wide, and a single leftover row (or `m = 1`) `NR1` wide.
///
/// # Safety
/// The CPU must support `K`'s instructions; the sink access is as for [`PackedA::run`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)] // one internal call site per plan
unsafe fn drive_avx512<K: avx512::Kernel, S: Sink, const NR: usize>(
    a: &AlignedRows<'_, K::A>,
    w: &[K::W],
    k: usize,
    a_row_bytes: usize,
    mode: Cols,
    rows: Range<usize>,
    cols: Range<usize>,
    sink: &S,
) {
    use avx512::{MR, NR1};
    const { assert!(MR == 4, "the widths and the tile heights below are written for MR = 4") };
    let p = mode.per_col();
    let (nr, nr1) = (NR / p, NR1 / p);
    let widths = [0, nr1, nr, nr, nr];
    let blk = Blocking::for_l2(a_row_bytes, p * size_of::<K::W>() * k, MR, lcm(nr, nr1));
    let w_row = |j: usize| &w[j * k..(j + 1) * k];
    let tile = |ia: Range<usize>, jo: Range<usize>, pf: Range<usize>| {
        let pf = Prefetch::new(w, k, mode, pf);
        let (i0, pf) = (ia.start, pf.rows());
        let a_rows = |r: usize| a.row(i0 + r);
        // SAFETY (all four): the caller guarantees the CPU features and the sink access.
        unsafe {
            match ia.len() {
                1 => mode.emit(sink, i0, &jo, &K::tile::<1, NR1>([a_rows(0)], mode.w_rows(&jo).map(w_row), k, pf)),
                2 => mode.emit(sink, i0, &jo, &K::tile::<2, NR>(from_fn(a_rows), mode.w_rows(&jo).map(w_row), k, pf)),
                3 => mode.emit(sink, i0, &jo, &K::tile::<3, NR>(from_fn(a_rows), mode.w_rows(&jo).map(w_row), k, pf)),
                _ => mode.emit(sink, i0, &jo, &K::tile::<MR, NR>(from_fn(a_rows), mode.w_rows(&jo).map(w_row), k, pf)),
            }
        }
    };
    // SAFETY: forwarded from the caller.
    unsafe { drive(rows, cols, MR, &widths, blk, MAX_PREFETCH_ROWS / p, tile) }
}

/// Rows of `w` a tile call prefetches (see `driver::drive`), as pointers.
#[cfg(target_arch = "x86_64")]
struct Prefetch<T> {
    ptrs: [*const T; MAX_PREFETCH_ROWS],
    len: usize,
}

#[cfg(target_arch = "x86_64")]
impl<T> Prefetch<T> {
    /// The `w` rows (rows of `k` elements) of output columns `cols` under `mode`, at most
    /// [`MAX_PREFETCH_ROWS`] of them.
    fn new(w: &[T], k: usize, mode: Cols, cols: Range<usize>) -> Self {
        let mut ptrs = [std::ptr::null(); MAX_PREFETCH_ROWS];
        let mut len = 0;
        let second = match mode {
            Cols::Plain => None,
            Cols::Paired { second } => Some(second),
        };
        for j in cols {
            for row in std::iter::once(j).chain(second.map(|s| s + j)) {
                if len < MAX_PREFETCH_ROWS {
                    ptrs[len] = w[row * k..].as_ptr();
                    len += 1;
                }
            }
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
/// As [`PackedA::run`].
#[allow(clippy::too_many_arguments)] // one internal call site per weight dtype
unsafe fn drive_portable<'w, W: portable::WeightElem + 'w, S: Sink>(
    rows: Range<usize>,
    cols: Range<usize>,
    mode: Cols,
    sink: &S,
    k: usize,
    w_elem_bytes: usize,
    a_row: impl Fn(usize) -> &'w [f32],
    w_row: impl Fn(usize) -> &'w [W],
) {
    use portable::{NR, tile};
    let nr = NR / mode.per_col();
    let blk = Blocking::for_l2(4 * k, mode.per_col() * w_elem_bytes * k, 1, nr);
    let tile = |ia: Range<usize>, jo: Range<usize>, _: Range<usize>| {
        let t = [tile(a_row(ia.start), mode.w_rows::<NR>(&jo).map(&w_row), k)];
        // SAFETY: forwarded from the caller.
        unsafe { mode.emit(sink, ia.start, &jo, &t) }
    };
    // SAFETY: forwarded from the caller.
    unsafe { drive(rows, cols, 1, &[0, nr], blk, 0, tile) }
}

/// Packs the `m` rows `row(i)` for `avx512::tile_f32_bf16` (see
/// `avx512::pack_even_odd_bf16`).
#[cfg(target_arch = "x86_64")]
fn pack_even_odd<'r>(m: usize, k: usize, row: impl Fn(usize) -> TensorView<'r>) -> AlignedRows<'static, f32> {
    let mut rows = AlignedRows::new(m, avx512::packed_len(k));
    if k == 0 {
        return rows;
    }
    for i in 0..m {
        let dst = &mut rows.row_mut(i)[..avx512::packed_len(k)];
        match row(i) {
            // SAFETY: only called for plans of `Isa::Avx512` or better, whose support
            // `PackedA::prepare` checked before.
            TensorView::F32(s) => unsafe { avx512::pack_even_odd_f32(s, dst) },
            // SAFETY: as above.
            TensorView::Bf16(s) => unsafe { avx512::pack_even_odd_bf16(bytemuck::cast_slice(s), dst) },
        }
    }
    rows
}
