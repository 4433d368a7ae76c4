//! Cache blocking and register-block tiling shared by every ISA.
//!
//! [`drive`] walks the output `out[rows, cols]` in cache blocks (`mb` rows of `a`, `nb`
//! output columns) and inside each block in register tiles: tiles of `MR` rows while at
//! least `MR` rows of `a` remain, then one tile of the leftover rows (fewer than `MR`),
//! each as wide as [`drive`]'s `widths` says for its height. A tile that runs past the
//! last column re-reads the last valid `w` row (its results are dropped), so every tile
//! has a full shape and every output element goes through the same per-element
//! reduction: batch invariance does not depend on tile position or height.
//!
//! Loop order: `a` block outer, column block inner, so a cache block of `w` rows is reused
//! from L2 by every `a` row of the block and each `w` row is read from memory once per
//! `a` block (once per call when `m <= mb`).
//!
//! What a tile's values become is up to a [`Sink`]: `RowsPtr<f32>` stores them (plain GEMM);
//! the MoE expert step fuses SwiGLU or the routing weight into its own sinks.

use std::ops::Range;

/// Where a tile's results go: the epilogue of a GEMM.
///
/// `put(i, j, x, y)` receives output row `i`, columns `j..j + x.len()`: `x[c]` is the dot
/// product of row `i` with the column's `w` row and, for [`super::Cols::Paired`], `y[c]`
/// the one with its paired row (`y` is empty for [`super::Cols::Plain`]).
pub(crate) trait Sink: Sync {
    /// Consumes the values of row `i`, columns `j..j + x.len()`.
    ///
    /// # Safety
    /// No other thread may access those output elements during the call, and the
    /// storage the sink was built from must still be borrowed for it.
    unsafe fn put(&self, i: usize, j: usize, x: &[f32], y: &[f32]);
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

/// Computes output rows `rows` x output columns `cols` in register tiles.
///
/// `tile(ia, jo, pf)` computes and hands to its sink the tile of rows `ia` (`1..=mr` of
/// them: `mr` except for the leftover rows) and output columns `jo`, at most
/// `widths[ia.len()]` of them (fewer at the end of a block: the tile then re-reads the
/// last valid column's rows, see the module docs). Every element must go through one and
/// the same per-element reduction whatever the tile.
///
/// `pf` are output columns whose `w` rows the call should prefetch, spread over its walk
/// along `k`: the next cache block of `w` is prefetched during this one, split evenly over
/// its tile calls (at most `max_pf` columns per call). When a block takes several passes
/// (several tiles of `a` rows), only the first reads it from memory, and the memory
/// would otherwise idle during the later ones; with a single pass (decode), the requests
/// one block ahead keep more lines in flight than the hardware prefetcher alone (measured
/// on Zen 4: about 10% less time for the whole layer at 1 and 16 tokens).
///
/// `blk.mb` must be a multiple of `mr`, `blk.nb` a multiple of every width.
///
/// # Safety
/// No other thread may access the output elements in `rows x cols` during the call, and
/// the ranges must lie inside the output the tiles write.
pub(crate) unsafe fn drive<T>(
    rows: Range<usize>,
    cols: Range<usize>,
    mr: usize,
    widths: &[usize],
    blk: Blocking,
    max_pf: usize,
    mut tile: T,
) where
    T: FnMut(Range<usize>, Range<usize>, Range<usize>),
{
    debug_assert!(widths.len() > mr && blk.mb.is_multiple_of(mr));
    debug_assert!(widths[1..=mr].iter().all(|&w| w > 0 && blk.nb.is_multiple_of(w)));
    if rows.is_empty() || cols.is_empty() {
        return;
    }
    let mut i_block = rows.start;
    while i_block < rows.end {
        let i_end = (i_block + blk.mb).min(rows.end);
        let (full_tiles, left) = ((i_end - i_block) / mr, (i_end - i_block) % mr);
        let mut j_block = cols.start;
        while j_block < cols.end {
            let j_end = (j_block + blk.nb).min(cols.end);
            let width = j_end - j_block;
            let next = j_end..(j_end + blk.nb).min(cols.end);
            let left_calls = if left > 0 { width.div_ceil(widths[left]) } else { 0 };
            let calls = full_tiles * width.div_ceil(widths[mr]) + left_calls;
            let per_call = next.len().div_ceil(calls).min(max_pf);
            let mut call = 0;
            let mut prefetch = || {
                let start = (next.start + call * per_call).min(next.end);
                call += 1;
                start..(start + per_call).min(next.end)
            };
            let mut i = i_block;
            while i < i_end {
                let height = mr.min(i_end - i);
                let step = widths[height];
                for j in (j_block..j_end).step_by(step) {
                    tile(i..i + height, j..(j + step).min(j_end), prefetch());
                }
                i += height;
            }
            j_block = j_end;
        }
        i_block = i_end;
    }
}
