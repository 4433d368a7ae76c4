//! Step 5 of the contract: **combine**. Expert rows back to token order.
//!
//! Input: `expert_out [T*slots_per_token, H]` f32, the grouped step's output rows in permuted order,
//! each already multiplied by its pair's weight (the down GEMM's epilogue does
//! `y[r] = w[r] * acc[r]`, one f32 multiply; shared slots carry weight 1.0).
//!
//! ```text
//! out[t][h] = 0.0
//! for j in 0..slots_per_token:                     # slot order: routed choices, then shared slots
//!     out[t][h] += expert_out[pair_rows[t * slots_per_token + j]][h]
//! ```
//!
//! One f32 add per slot, in that fixed order, no atomics: the result is bit-identical run
//! to run, and a token's output depends only on its own rows, never on which other
//! tokens share the batch.

use rayon::prelude::*;

use crate::error::{MoeError, check_len};
use crate::moe::permute::Permutation;

/// Sums each token's weighted expert rows, in slot order, into `out [T, H]`.
pub fn combine(expert_out: &[f32], hidden_size: usize, perm: &Permutation, out: &mut [f32]) -> Result<(), MoeError> {
    perm.validate()?;
    check_len("expert output rows", &[perm.rows(), hidden_size], expert_out.len())?;
    check_len("output", &[perm.tokens, hidden_size], out.len())?;
    if hidden_size == 0 {
        return Ok(());
    }
    let slots = perm.slots_per_token;
    out.par_chunks_mut(hidden_size).enumerate().for_each(|(t, dst)| {
        dst.fill(0.0);
        for &row in &perm.pair_rows[t * slots..(t + 1) * slots] {
            let src = &expert_out[row as usize * hidden_size..(row as usize + 1) * hidden_size];
            for (d, s) in dst.iter_mut().zip(src) {
                *d += *s;
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moe::permute::permute;

    #[test]
    fn sums_in_slot_order() {
        // One token, 3 slots -> experts (2, 0, 1); H = 1. Permuted rows hold pairs 1, 2, 0.
        let perm = permute(&[2, 0, 1], 1, 3, 3).unwrap();
        assert_eq!(perm.row_pairs, vec![1, 2, 0]);
        // Slot values 1e8, -1e8, 1.0: slot order gives exactly 1.0, row order gives 0.0.
        let rows = [-1e8f32, 1.0, 1e8];
        let mut out = [f32::NAN];
        combine(&rows, 1, &perm, &mut out).unwrap();
        assert_eq!(out[0], 1.0);
    }
}
