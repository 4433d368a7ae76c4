//! Step 2 of the contract: **permute**. Group the `(token, slot)` pairs by expert.
//!
//! Input: `expert_ids [T, slots_per_token]` (`slots_per_token` slots per token; with shared-expert fusion the last
//! slots of every token name the shared slots `E..E+n_shared`), over `n_slots` slots.
//!
//! A *pair* `p = t * slots_per_token + j` is token `t`'s slot `j`. The permutation is a **stable
//! counting sort** of the pairs by expert: rows of expert `e` are the contiguous range
//! `expert_offsets[e]..expert_offsets[e + 1]`, and inside it pairs keep ascending `p`
//! (so ascending token). Outputs:
//!
//! - `expert_offsets [n_slots + 1]`: monotone, `expert_offsets[0] = 0`, last `= T * slots_per_token`;
//! - `row_pairs [T * slots_per_token]`: the pair each permuted row came from (its token is
//!   `row_pairs[r] / slots_per_token`);
//! - `pair_rows [T * slots_per_token]`: the inverse, the permuted row of each pair.
//!
//! Rows are `u32` (a batch has fewer than 2^32 pairs; checked); element offsets
//! (`row * H`) are computed in `usize`.
//!
//! Then **gather**: `x_perm[r] = hidden[row_pairs[r] / slots_per_token]`, the hidden rows in permuted
//! order, as `f32` or as `bf16` (rounded to nearest even), per the layer's precision.

use half::bf16;
use rayon::prelude::*;

use crate::cpu::{RowBuf, RowMut};
use crate::error::{MoeError, PermutationError, check_len};
use crate::tensor::{Dtype, TensorView};

/// The stable counting sort of a batch's `(token, slot)` pairs by expert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permutation {
    /// Tokens `T`.
    pub tokens: usize,
    /// Slots per token (`k + n_shared` in a layer).
    pub slots_per_token: usize,
    /// `[n_slots + 1]`: rows of expert `e` are `expert_offsets[e]..expert_offsets[e+1]`.
    pub expert_offsets: Vec<u32>,
    /// `[T * slots_per_token]`: the pair (`t * slots_per_token + j`) of each permuted row.
    pub row_pairs: Vec<u32>,
    /// `[T * slots_per_token]`: the permuted row of each pair (inverse of `row_pairs`).
    pub pair_rows: Vec<u32>,
}

impl Permutation {
    /// Number of slots sorted over (`expert_offsets.len() - 1`; in a layer, the routed
    /// experts and the shared slots, `E + n_shared`).
    pub fn n_slots(&self) -> usize {
        self.expert_offsets.len().saturating_sub(1)
    }

    /// Checks what [`permute`] guarantees, for a permutation made elsewhere (a GPU
    /// download, a test, an engine): offsets monotone from 0 to `T * slots_per_token`, and `row_pairs`
    /// and `pair_rows` inverse permutations of `0..T * slots_per_token`. The CPU steps taking a
    /// permutation call it first, so a malformed one is an error, not a panic.
    pub fn validate(&self) -> Result<(), MoeError> {
        let (t, s) = (self.tokens, self.slots_per_token);
        let pairs = t.checked_mul(s).ok_or_else(|| MoeError::Overflow(format!("{t} tokens x {s} slots")))?;
        check_len("row_pairs", &[t, s], self.row_pairs.len())?;
        check_len("pair_rows", &[t, s], self.pair_rows.len())?;
        let offsets = &self.expert_offsets;
        let (&first, &last) = offsets.first().zip(offsets.last()).ok_or(PermutationError::NoOffsets)?;
        if first != 0 {
            return Err(PermutationError::FirstOffset { first }.into());
        }
        if let Some(slot) = offsets.windows(2).position(|w| w[0] > w[1]) {
            return Err(PermutationError::OffsetsDecrease { slot, start: offsets[slot], end: offsets[slot + 1] }.into());
        }
        if last as usize != pairs {
            return Err(PermutationError::LastOffset { last, pairs }.into());
        }
        for (row, &pair) in self.row_pairs.iter().enumerate() {
            let back = self.pair_rows.get(pair as usize).copied();
            if back != Some(row as u32) {
                return Err(PermutationError::NotInverse { row, pair, back }.into());
            }
        }
        Ok(())
    }

    /// Permuted rows (`T * slots_per_token`).
    pub fn rows(&self) -> usize {
        self.row_pairs.len()
    }

    /// The permuted rows of expert `e`.
    pub fn expert_rows(&self, e: usize) -> std::ops::Range<usize> {
        self.expert_offsets[e] as usize..self.expert_offsets[e + 1] as usize
    }

    /// The token of permuted row `r`.
    pub fn row_token(&self, r: usize) -> usize {
        self.row_pairs[r] as usize / self.slots_per_token
    }
}

/// Sorts the pairs of `expert_ids [tokens, slots_per_token]` by expert (stable).
pub fn permute(
    expert_ids: &[u32],
    tokens: usize,
    slots_per_token: usize,
    n_slots: usize,
) -> Result<Permutation, MoeError> {
    check_len("expert_ids", &[tokens, slots_per_token], expert_ids.len())?;
    if expert_ids.len() > u32::MAX as usize || n_slots > u32::MAX as usize - 1 {
        return Err(MoeError::Overflow(format!(
            "{} (token, slot) pairs do not fit 32-bit row indices",
            expert_ids.len()
        )));
    }
    let mut counts = vec![0u32; n_slots];
    for (p, &e) in expert_ids.iter().enumerate() {
        let Some(count) = counts.get_mut(e as usize) else {
            let token = p / slots_per_token.max(1);
            return Err(MoeError::BadRouting { token, reason: format!("expert {e} out of range 0..{n_slots}") });
        };
        *count += 1;
    }
    let mut expert_offsets = Vec::with_capacity(n_slots + 1);
    let mut running = 0u32;
    expert_offsets.push(0);
    for &c in &counts {
        running += c;
        expert_offsets.push(running);
    }
    // Second pass: each pair takes the next row of its expert, in ascending pair order.
    let mut cursor: Vec<u32> = expert_offsets[..n_slots].to_vec();
    let mut row_pairs = vec![0u32; expert_ids.len()];
    let mut pair_rows = vec![0u32; expert_ids.len()];
    for (p, &e) in expert_ids.iter().enumerate() {
        let row = cursor[e as usize];
        cursor[e as usize] += 1;
        row_pairs[row as usize] = p as u32;
        pair_rows[p] = row;
    }
    Ok(Permutation { tokens, slots_per_token, expert_offsets, row_pairs, pair_rows })
}

/// Gathers `hidden [T, H]` rows into permuted order as f32: `out [T*slots_per_token, H]`.
pub fn gather_f32(
    hidden: TensorView<'_>,
    hidden_size: usize,
    perm: &Permutation,
    out: &mut [f32],
) -> Result<(), MoeError> {
    check_gather(hidden, hidden_size, perm, out.len())?;
    out.par_chunks_mut(hidden_size.max(1)).enumerate().for_each(|(r, dst)| {
        gather_row(hidden, hidden_size, perm, r, RowMut::F32(dst));
    });
    Ok(())
}

/// Gathers `hidden [T, H]` rows into permuted order as bf16 (f32 input rounds to nearest
/// even): `out [T*slots_per_token, H]`.
pub fn gather_bf16(
    hidden: TensorView<'_>,
    hidden_size: usize,
    perm: &Permutation,
    out: &mut [bf16],
) -> Result<(), MoeError> {
    check_gather(hidden, hidden_size, perm, out.len())?;
    out.par_chunks_mut(hidden_size.max(1)).enumerate().for_each(|(r, dst)| {
        gather_row(hidden, hidden_size, perm, r, RowMut::Bf16(dst));
    });
    Ok(())
}

/// Gathers `hidden [T, H]` rows into permuted order into `out`, reshaped to `[T*slots_per_token, H]`
/// of `dtype` (bf16 rounds f32 input to nearest even; f32 widens bf16 exactly): the rows
/// [`crate::cpu::experts`] multiplies in place.
pub(crate) fn gather_into(
    hidden: TensorView<'_>,
    hidden_size: usize,
    perm: &Permutation,
    dtype: Dtype,
    out: &mut RowBuf,
) -> Result<(), MoeError> {
    let rows = perm.rows();
    check_gather(hidden, hidden_size, perm, rows * hidden_size)?;
    out.reset(dtype, rows, hidden_size);
    out.par_rows_mut().for_each(|(r, dst)| gather_row(hidden, hidden_size, perm, r, dst));
    Ok(())
}

/// The checks every gather makes: a valid permutation, `hidden [T, H]` and an output of
/// `out_len == T*slots_per_token * H` elements.
fn check_gather(
    hidden: TensorView<'_>,
    hidden_size: usize,
    perm: &Permutation,
    out_len: usize,
) -> Result<(), MoeError> {
    perm.validate()?;
    check_len("hidden", &[perm.tokens, hidden_size], hidden.len())?;
    check_len("permuted hidden", &[perm.rows(), hidden_size], out_len)
}

/// Copies the hidden row of permuted row `r` into `dst`, converting to its dtype.
fn gather_row(hidden: TensorView<'_>, h: usize, perm: &Permutation, r: usize, dst: RowMut<'_>) {
    let t = perm.row_token(r);
    let src = hidden.slice(t * h..(t + 1) * h);
    match (dst, src) {
        (RowMut::F32(dst), src) => src.copy_to_f32(dst),
        (RowMut::Bf16(dst), TensorView::Bf16(src)) => dst.copy_from_slice(src),
        (RowMut::Bf16(dst), TensorView::F32(src)) => crate::cpu::f32_to_bf16(src, dst),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_counting_sort() {
        // 3 tokens x 2 slots over 4 experts.
        let ids = [2, 0, 0, 2, 3, 0];
        let p = permute(&ids, 3, 2, 4).unwrap();
        assert_eq!(p.expert_offsets, vec![0, 3, 3, 5, 6]);
        assert_eq!(p.row_pairs, vec![1, 2, 5, 0, 3, 4]);
        for (pair, &row) in p.pair_rows.iter().enumerate() {
            assert_eq!(p.row_pairs[row as usize] as usize, pair);
        }
        assert_eq!(p.row_token(2), 2);
    }

    #[test]
    fn out_of_range_expert_is_an_error() {
        let err = permute(&[0, 4], 1, 2, 4).unwrap_err();
        assert!(matches!(err, MoeError::BadRouting { token: 0, .. }), "{err}");
        assert!(permute(&[0, 1, 2], 2, 2, 4).is_err());
    }

    #[test]
    fn malformed_permutations_name_what_is_wrong() {
        use PermutationError::*;
        let valid = || permute(&[2, 0, 0, 1], 2, 2, 3).unwrap();
        let fault = |p: Permutation| match p.validate() {
            Err(MoeError::BadPermutation(e)) => e,
            other => panic!("expected a malformed permutation, got {other:?}"),
        };
        assert_eq!(fault(Permutation { expert_offsets: vec![], ..valid() }), NoOffsets);
        assert_eq!(fault(Permutation { expert_offsets: vec![1, 2, 3, 4], ..valid() }), FirstOffset { first: 1 });
        assert_eq!(
            fault(Permutation { expert_offsets: vec![0, 3, 2, 4], ..valid() }),
            OffsetsDecrease { slot: 1, start: 3, end: 2 }
        );
        assert_eq!(
            fault(Permutation { expert_offsets: vec![0, 1, 2, 9], ..valid() }),
            LastOffset { last: 9, pairs: 4 }
        );
        let mut p = valid();
        p.row_pairs[0] = 77;
        assert_eq!(fault(p), NotInverse { row: 0, pair: 77, back: None });
        let mut p = valid();
        p.row_pairs.swap(0, 1);
        let (pair, back) = (p.row_pairs[0], p.pair_rows[p.row_pairs[0] as usize]);
        assert_eq!(fault(p), NotInverse { row: 0, pair, back: Some(back) });
        let err = Permutation { expert_offsets: vec![0, 3, 2, 4], ..valid() }.validate().unwrap_err();
        assert_eq!(err.to_string(), "malformed permutation: expert_offsets[2] = 2 is below expert_offsets[1] = 3");
    }

    #[test]
    fn empty_batch() {
        let p = permute(&[], 0, 8, 130).unwrap();
        assert_eq!(p.expert_offsets.len(), 131);
        assert!(p.expert_offsets.iter().all(|&o| o == 0));
        let mut out = vec![];
        gather_f32(TensorView::F32(&[]), 16, &p, &mut out).unwrap();
    }
}
