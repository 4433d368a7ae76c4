//! Row storage the AVX-512 kernels read: 64-byte aligned rows with a padded stride.
//!
//! A 64-byte load that straddles two cache lines costs about 15% of the bf16 tile's
//! throughput, so the left operand of every AVX-512 GEMM lives in aligned rows. Either
//! a GEMM copies it there ([`AlignedRows::new`], from a per-thread scratch buffer), or
//! the caller keeps its activations in a [`RowBuf`] all along (the MoE layer's gathered
//! rows and SwiGLU activations) and the GEMM borrows them in place.

use std::borrow::Cow;
use std::cell::Cell;
use std::marker::PhantomData;
use std::ops::Range;

use half::bf16;
use rayon::prelude::*;

use super::driver::Sink;
use crate::tensor::{Dtype, TensorView};

/// One 64-byte cache line: the unit of row storage, which makes it aligned.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [u8; 64]);

thread_local! {
    /// Storage of the last owned [`AlignedRows`] dropped on this thread, reused by the
    /// next call: a fresh allocation per call costs page faults or zeroing on every call.
    static SCRATCH: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
}

/// Storage larger than this goes back to the allocator instead of being kept.
const SCRATCH_KEEP_BYTES: usize = 8 << 20;

/// Cache lines per row of `len` elements of `elem_bytes`: an odd number, because rows
/// `4 KiB * j` apart would all fall in one L1 set (64 sets of 64 bytes), and a tile's `a`
/// rows would evict each other and the `w` rows it streams beside them.
fn row_lines(len: usize, elem_bytes: usize) -> usize {
    len.div_ceil(64 / elem_bytes) | 1
}

/// Rows of at least `len` elements in 64-byte aligned storage, the row stride padded to
/// an odd number of whole cache lines (owned, or borrowed from a [`RowBuf`]). The
/// padding holds unspecified values: kernels never read past `len`
/// (`avx512::tile_f32_bf16`'s packed rows are written in full by the packing).
pub(crate) struct AlignedRows<'a, T> {
    lines: Cow<'a, [Line]>,
    rows: usize,
    stride: usize,
    elem: PhantomData<T>,
}

impl<T: bytemuck::Pod> AlignedRows<'static, T> {
    /// `rows` owned rows of at least `len` elements.
    pub(crate) fn new(rows: usize, len: usize) -> Self {
        let row_lines = row_lines(len, size_of::<T>());
        let mut buf = SCRATCH.take();
        if buf.len() < rows * row_lines {
            buf.resize(rows * row_lines, Line([0; 64]));
        }
        AlignedRows { lines: Cow::Owned(buf), rows, stride: row_lines * 64 / size_of::<T>(), elem: PhantomData }
    }

    /// Row `i`, mutable.
    pub(crate) fn row_mut(&mut self, i: usize) -> &mut [T] {
        assert!(i < self.rows);
        &mut bytemuck::cast_slice_mut(self.lines.to_mut())[i * self.stride..(i + 1) * self.stride]
    }

    /// Every row, mutable, as one slice (row `i` at `i * stride()`).
    pub(crate) fn all_mut(&mut self) -> &mut [T] {
        let n = self.rows * self.stride;
        &mut bytemuck::cast_slice_mut(self.lines.to_mut())[..n]
    }
}

impl<'a, T: bytemuck::Pod> AlignedRows<'a, T> {
    /// Cache lines that `rows` rows of at least `len` elements take.
    pub(crate) fn lines_needed(rows: usize, len: usize) -> usize {
        rows * row_lines(len, size_of::<T>())
    }

    /// `rows` rows of at least `len` elements in `lines` (written by the caller, at
    /// [`AlignedRows::stride_for`]), borrowed.
    ///
    /// # Panics
    /// If `lines` is shorter than [`AlignedRows::lines_needed`].
    pub(crate) fn borrowed(lines: &'a [Line], rows: usize, len: usize) -> Self {
        let need = Self::lines_needed(rows, len);
        assert!(lines.len() >= need, "AlignedRows::borrowed: {} lines for {need}", lines.len());
        AlignedRows { lines: Cow::Borrowed(&lines[..need]), rows, stride: Self::stride_for(len), elem: PhantomData }
    }

    /// Elements from one row to the next for rows of at least `len` elements.
    pub(crate) fn stride_for(len: usize) -> usize {
        row_lines(len, size_of::<T>()) * 64 / size_of::<T>()
    }

    /// Elements from one row to the next.
    pub(crate) fn stride(&self) -> usize {
        self.stride
    }
}

impl<T: bytemuck::Pod> AlignedRows<'_, T> {
    /// Row `i`: `stride >= len` elements, starting on a cache line.
    #[inline]
    pub(crate) fn row(&self, i: usize) -> &[T] {
        assert!(i < self.rows);
        &bytemuck::cast_slice(&self.lines)[i * self.stride..(i + 1) * self.stride]
    }
}

impl<T> Drop for AlignedRows<'_, T> {
    fn drop(&mut self) {
        if let Cow::Owned(buf) = &mut self.lines {
            let buf = std::mem::take(buf);
            if buf.len() * 64 <= SCRATCH_KEEP_BYTES {
                SCRATCH.set(buf);
            }
        }
    }
}

/// A `[rows, k]` matrix of bf16 or f32 in the kernels' aligned row layout, kept by its
/// owner across calls: reshaping reuses the allocation, so a layer that runs again
/// neither allocates nor page-faults. The padding of each row holds unspecified values.
pub(crate) struct RowBuf {
    lines: Vec<Line>,
    dtype: Dtype,
    rows: usize,
    k: usize,
    /// Elements per row, padding included.
    stride: usize,
}

/// One row of a [`RowBuf`], mutable: its `k` elements.
pub(crate) enum RowMut<'a> {
    /// An f32 row.
    F32(&'a mut [f32]),
    /// A bf16 row.
    Bf16(&'a mut [bf16]),
}

impl Default for RowBuf {
    fn default() -> Self {
        RowBuf { lines: Vec::new(), dtype: Dtype::F32, rows: 0, k: 0, stride: 0 }
    }
}

impl RowBuf {
    /// Reshapes to `[rows, k]` of `dtype`, growing the storage if it is too small. The
    /// contents are unspecified until written.
    pub(crate) fn reset(&mut self, dtype: Dtype, rows: usize, k: usize) {
        let row_lines = row_lines(k, dtype.size());
        if self.lines.len() < rows * row_lines {
            self.lines.resize(rows * row_lines, Line([0; 64]));
        }
        *self =
            RowBuf { lines: std::mem::take(&mut self.lines), dtype, rows, k, stride: row_lines * 64 / dtype.size() };
    }

    /// Element type.
    pub(crate) fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Number of rows.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Elements per row (without the padding).
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Bytes of storage held.
    pub(crate) fn capacity_bytes(&self) -> usize {
        self.lines.len() * 64
    }

    /// Row `i`: its `k` elements.
    pub(crate) fn row(&self, i: usize) -> TensorView<'_> {
        assert!(i < self.rows, "row {i} of {}", self.rows);
        let span = i * self.stride..i * self.stride + self.k;
        match self.dtype {
            Dtype::F32 => TensorView::F32(&bytemuck::cast_slice(&self.lines)[span]),
            Dtype::Bf16 => TensorView::Bf16(&bytemuck::cast_slice(&self.lines)[span]),
        }
    }

    /// Every row, mutable, in parallel (row index, its `k` elements).
    pub(crate) fn par_rows_mut(&mut self) -> impl IndexedParallelIterator<Item = (usize, RowMut<'_>)> {
        let (dtype, k, row_lines) = (self.dtype, self.k, self.stride * self.dtype.size() / 64);
        self.lines[..self.rows * row_lines].par_chunks_mut(row_lines.max(1)).take(self.rows).enumerate().map(
            move |(i, lines)| {
                let row = match dtype {
                    Dtype::F32 => RowMut::F32(&mut bytemuck::cast_slice_mut(lines)[..k]),
                    Dtype::Bf16 => RowMut::Bf16(&mut bytemuck::cast_slice_mut(lines)[..k]),
                };
                (i, row)
            },
        )
    }

    /// Rows `rows`, borrowed as [`AlignedRows`] of `T` (which must be the element type:
    /// `u16` for bf16, `f32` for f32).
    pub(crate) fn aligned<T: bytemuck::Pod>(&self, rows: Range<usize>) -> AlignedRows<'_, T> {
        assert_eq!(size_of::<T>(), self.dtype.size(), "RowBuf::aligned: element type");
        assert!(rows.start <= rows.end && rows.end <= self.rows, "rows {rows:?} of {}", self.rows);
        let row_lines = self.stride * self.dtype.size() / 64;
        AlignedRows {
            lines: Cow::Borrowed(&self.lines[rows.start * row_lines..rows.end * row_lines]),
            rows: rows.len(),
            stride: self.stride,
            elem: PhantomData,
        }
    }

    /// The storage as a raw matrix of `T` for epilogues that write disjoint elements from
    /// parallel tasks (see [`RowsPtr`]).
    pub(crate) fn rows_ptr<T: bytemuck::Pod>(&mut self) -> RowsPtr<T> {
        assert_eq!(size_of::<T>(), self.dtype.size(), "RowBuf::rows_ptr: element type");
        let need = self.rows * self.stride;
        let data: &mut [T] = &mut bytemuck::cast_slice_mut(&mut self.lines)[..need];
        RowsPtr { ptr: data.as_mut_ptr(), rows: self.rows, cols: self.k, stride: self.stride }
    }
}

/// A row-major `[rows, cols]` matrix (row stride `stride`) as a raw pointer, for
/// epilogues of parallel tasks that each write their own disjoint elements (column
/// blocks of a row-major matrix are not contiguous).
pub(crate) struct RowsPtr<T> {
    ptr: *mut T,
    rows: usize,
    cols: usize,
    stride: usize,
}

// SAFETY: only a pointer and a shape; the tasks sharing it write disjoint elements (each
// owns a distinct block of rows x columns), so sharing it cannot create a data race.
unsafe impl<T: Send> Send for RowsPtr<T> {}
// SAFETY: as for `Send`.
unsafe impl<T: Send> Sync for RowsPtr<T> {}

impl<T> RowsPtr<T> {
    /// Borrows the contiguous `data` as `[rows, cols]`. Panics if the length differs.
    pub(crate) fn new(data: &mut [T], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "RowsPtr: buffer length");
        RowsPtr { ptr: data.as_mut_ptr(), rows, cols, stride: cols }
    }

    /// Borrows `out` as a GEMM output `[rows, cols]` with row stride `ldo`. Panics if `out`
    /// cannot hold it (this is the safe GEMM API's bounds check).
    pub(crate) fn gemm_out(out: &mut [T], rows: usize, cols: usize, ldo: usize) -> Self {
        assert!(ldo >= cols, "gemm: ldo ({ldo}) < n ({cols})");
        if rows > 0 && cols > 0 {
            let need = (rows - 1) * ldo + cols;
            assert!(out.len() >= need, "gemm: out.len() = {} < (m - 1) * ldo + n = {need}", out.len());
        }
        RowsPtr { ptr: out.as_mut_ptr(), rows, cols, stride: ldo }
    }

    /// Elements `(i, j..j + n)` as a slice.
    ///
    /// # Safety
    /// No other thread may access them while the slice lives, and the `&mut` borrow the
    /// pointer was built from must still be live.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)] // disjoint writes from parallel tasks, see above
    pub(crate) unsafe fn slice(&self, i: usize, j: usize, n: usize) -> &mut [T] {
        assert!(i < self.rows && j + n <= self.cols, "RowsPtr: ({i}, {j}..{}) out of range", j + n);
        // SAFETY: in bounds (asserted; every constructor checked that the storage holds
        // `(rows - 1) * stride + cols` elements); exclusive access is the caller's guarantee.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.stride + j), n) }
    }
}

/// The plain GEMM epilogue: store the dot products.
impl Sink for RowsPtr<f32> {
    #[inline(always)]
    unsafe fn put(&self, i: usize, j: usize, x: &[f32], _: &[f32]) {
        // SAFETY: forwarded from the caller.
        unsafe { self.slice(i, j, x.len()) }.copy_from_slice(x);
    }
}
