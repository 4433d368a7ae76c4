//! Cache blocking and register-block tiling shared by every ISA.
//!
//! [`drive`] walks the output `out[rows, cols]` in cache blocks (`mb` rows of `a`, `nb`
//! rows of `w`) and inside each block in register tiles: `MR x NR` tiles while at least
//! `MR` rows of `a` remain, then single-row `1 x NR1` tiles for the leftover rows. A tile
//! that runs past the last column re-reads the last valid `w` row (its results are
//! dropped), so every tile has a full shape and every output element goes through the
//! same per-element reduction: batch invariance does not depend on tile position.
//!
//! Loop order: `a` block outer, `w` block inner, so a cache block of `w` rows is reused
//! from L2 by every `a` row of the block and each `w` row is read from memory once per
//! `a` block (once per call when `m <= mb`).

use std::ops::Range;

/// The output matrix as a raw pointer, so that parallel tasks can each write their own
/// disjoint set of elements (column blocks of a row-major matrix are not contiguous).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr {
    ptr: *mut f32,
    ldo: usize,
    rows: usize,
    cols: usize,
}

// SAFETY: `OutPtr` is only a pointer and a shape; the tasks that share it write
// disjoint elements (each task owns a distinct block of rows x columns, see `drive`'s
// callers), so sending or sharing it between threads cannot create a data race.
unsafe impl Send for OutPtr {}
// SAFETY: as for `Send`: shared access never writes the same element from two threads.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Borrows `out` as a `rows x cols` matrix with row stride `ldo`. Panics if `out`
    /// cannot hold it (this is the safe API's bounds check).
    pub(crate) fn new(out: &mut [f32], rows: usize, cols: usize, ldo: usize) -> OutPtr {
        assert!(ldo >= cols, "gemm: ldo ({ldo}) < n ({cols})");
        if rows > 0 && cols > 0 {
            let need = (rows - 1) * ldo + cols;
            assert!(out.len() >= need, "gemm: out.len() = {} < (m - 1) * ldo + n = {need}", out.len());
        }
        OutPtr { ptr: out.as_mut_ptr(), ldo, rows, cols }
    }

    /// Writes `out[i][j] = v`.
    ///
    /// # Safety
    /// No other thread may access element `(i, j)` during the call, and the `&mut`
    /// borrow `self` was built from must still be live.
    #[inline(always)]
    unsafe fn write(&self, i: usize, j: usize, v: f32) {
        assert!(i < self.rows && j < self.cols);
        // SAFETY: `new` checked that `(rows - 1) * ldo + cols <= out.len()`, and
        // `i < rows`, `j < cols` (asserted above), so the element is in bounds; the
        // caller guarantees exclusive access to it.
        unsafe { *self.ptr.add(i * self.ldo + j) = v };
    }
}

/// Cache-block sizes in rows: `mb` rows of `a`, `nb` rows of `w`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Blocking {
    /// Rows of `a` per block (a multiple of the tile height).
    pub mb: usize,
    /// Rows of `w` per block (a multiple of both tile widths).
    pub nb: usize,
}

impl Blocking {
    /// Blocks sized so that an `a` block stays within about 384 KiB and a `w` block within
    /// about 192 KiB of the 1 MiB L2, for rows of `a_row_bytes` and `w_row_bytes`.
    pub(crate) fn for_l2(a_row_bytes: usize, w_row_bytes: usize, mr: usize, nr: usize) -> Self {
        const A_BUDGET: usize = 384 << 10;
        const W_BUDGET: usize = 192 << 10;

        let mb = (A_BUDGET / a_row_bytes.max(1) / mr).max(1) * mr;
        let nb = (W_BUDGET / w_row_bytes.max(1) / nr).max(1) * nr;
        Blocking { mb, nb }
    }
}

/// Least common multiple (tile widths, to size cache blocks).
pub(crate) const fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

/// Most `w` rows one tile call is asked to prefetch (see [`drive`]).
pub(crate) const MAX_PREFETCH_ROWS: usize = 8;

/// Computes `out[i][j]` for `i` in `rows`, `j` in `cols` with register tiles.
///
/// `tile(ia, jw, pf)` returns the dot products of `a` rows `ia` with `w` rows `jw`;
/// `row(i, jw, pf)` the same for a single `a` row. Both must compute every element with
/// one and the same per-element reduction. `blk.nb` must be a multiple of `NR` and `NR1`.
///
/// `pf` are rows of `w` the call should prefetch, spread over its walk along `k`: when a
/// cache block of `w` takes several passes (several tile rows of `a`), only the first
/// pass reads it from memory, so the next block is prefetched during this one, split
/// evenly over its tile calls. Otherwise the memory would idle during the later passes.
///
/// # Safety
/// No other thread may access `out` elements in `rows x cols` during the call, and the
/// ranges must lie inside `out`'s shape (checked by `OutPtr::write`).
pub(crate) unsafe fn drive<const MR: usize, const NR: usize, const NR1: usize, T, R>(
    rows: Range<usize>,
    cols: Range<usize>,
    blk: Blocking,
    out: OutPtr,
    mut tile: T,
    mut row: R,
) where
    T: FnMut([usize; MR], [usize; NR], Range<usize>) -> [[f32; NR]; MR],
    R: FnMut(usize, [usize; NR1], Range<usize>) -> [f32; NR1],
{
    debug_assert!(blk.nb.is_multiple_of(NR) && blk.nb.is_multiple_of(NR1) && blk.mb.is_multiple_of(MR));
    if rows.is_empty() || cols.is_empty() {
        return;
    }
    let mut i_block = rows.start;
    while i_block < rows.end {
        let i_end = (i_block + blk.mb).min(rows.end);
        let (full_tiles, single_rows) = ((i_end - i_block) / MR, (i_end - i_block) % MR);
        let mut j_block = cols.start;
        while j_block < cols.end {
            let j_end = (j_block + blk.nb).min(cols.end);
            let width = j_end - j_block;
            let next = j_end..(j_end + blk.nb).min(cols.end);
            let calls = full_tiles * width.div_ceil(NR) + single_rows * width.div_ceil(NR1);
            let per_call = if full_tiles + single_rows >= 2 { next.len().div_ceil(calls) } else { 0 };
            let per_call = per_call.min(MAX_PREFETCH_ROWS);
            let mut call = 0;
            let mut prefetch = || {
                let start = (next.start + call * per_call).min(next.end);
                call += 1;
                start..(start + per_call).min(next.end)
            };
            let mut i = i_block;
            while i + MR <= i_end {
                let ia: [usize; MR] = std::array::from_fn(|r| i + r);
                for j in (j_block..j_end).step_by(NR) {
                    let jw: [usize; NR] = std::array::from_fn(|c| (j + c).min(j_end - 1));
                    let t = tile(ia, jw, prefetch());
                    for (r, t_row) in t.iter().enumerate() {
                        for (c, &v) in t_row.iter().enumerate().take(j_end - j) {
                            // SAFETY: the caller owns `rows x cols` exclusively; `i + r`
                            // and `j + c` lie inside them.
                            unsafe { out.write(i + r, j + c, v) };
                        }
                    }
                }
                i += MR;
            }
            for i in i..i_end {
                for j in (j_block..j_end).step_by(NR1) {
                    let jw: [usize; NR1] = std::array::from_fn(|c| (j + c).min(j_end - 1));
                    let t = row(i, jw, prefetch());
                    for (c, &v) in t.iter().enumerate().take(j_end - j) {
                        // SAFETY: as above.
                        unsafe { out.write(i, j + c, v) };
                    }
                }
            }
            j_block = j_end;
        }
        i_block = i_end;
    }
}
