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
//! CPU schedule: GEMM 1 runs as tasks of (slot, block of [`UP_BLOCK`] intermediate
//! columns), GEMM 2 as tasks of (slot, block of [`DOWN_BLOCK`] hidden columns), spread
//! over the rayon pool, so one token still uses every core and each weight byte is read
//! once per call. Every output element's reduction order depends only on its own row and
//! weight row ([`crate::cpu::gemm_nt`]'s contract), so results are bit-identical run to
//! run and independent of the other tokens in the batch.

use half::bf16;
use rayon::prelude::*;

use crate::cpu::{self, Isa};
use crate::error::{MoeError, check_len};
use crate::moe::Precision;
use crate::moe::permute::Permutation;
use crate::moe::weights::MoeWeights;
use crate::tensor::TensorView;

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

    let used: Vec<(usize, std::ops::Range<usize>)> =
        (0..cfg.n_slots()).map(|e| (e, perm.expert_rows(e))).filter(|(_, r)| !r.is_empty()).collect();

    // GEMM 1 + SwiGLU: tasks of (slot, intermediate block).
    let up_tasks: Vec<(usize, std::ops::Range<usize>, usize)> =
        used.iter().flat_map(|(e, r)| (0..i).step_by(UP_BLOCK).map(move |i0| (*e, r.clone(), i0))).collect();
    let blocks: Vec<Vec<f32>> = up_tasks
        .par_iter()
        .map(|(e, r, i0)| {
            let (c, nb) = (r.len(), UP_BLOCK.min(i - i0));
            let x = x_perm.slice(r.start * h..r.end * h);
            let slot = weights.slot_gate_up(*e);
            let mut g = vec![0.0f32; c * nb];
            let mut u = vec![0.0f32; c * nb];
            cpu::gemm_nt(isa, x, slot.slice(i0 * h..(i0 + nb) * h), c, nb, h, &mut g, nb);
            cpu::gemm_nt(isa, x, slot.slice((i + i0) * h..(i + i0 + nb) * h), c, nb, h, &mut u, nb);
            let mut a = vec![0.0f32; c * nb];
            cpu::swiglu(&g, &u, &mut a);
            a
        })
        .collect();
    let mut act = match precision {
        Precision::F32 => Activation::F32(vec![0.0; rows * i]),
        Precision::Bf16 => Activation::Bf16(vec![bf16::ZERO; rows * i]),
    };
    for ((_, r, i0), block) in up_tasks.iter().zip(&blocks) {
        let nb = UP_BLOCK.min(i - i0);
        for (row, src) in r.clone().zip(block.chunks_exact(nb)) {
            let dst = row * i + i0..row * i + i0 + nb;
            match &mut act {
                Activation::F32(a) => a[dst].copy_from_slice(src),
                Activation::Bf16(a) => cpu::f32_to_bf16(src, &mut a[dst]),
            }
        }
    }
    drop(blocks);

    // GEMM 2 with the routing weight in the epilogue: tasks of (slot, hidden block).
    let act = act.view();
    let down_tasks: Vec<(usize, std::ops::Range<usize>, usize)> =
        used.iter().flat_map(|(e, r)| (0..h).step_by(DOWN_BLOCK).map(move |h0| (*e, r.clone(), h0))).collect();
    let blocks: Vec<Vec<f32>> = down_tasks
        .par_iter()
        .map(|(e, r, h0)| {
            let (c, nb) = (r.len(), DOWN_BLOCK.min(h - h0));
            let a = act.slice(r.start * i..r.end * i);
            let mut y = vec![0.0f32; c * nb];
            cpu::gemm_nt(isa, a, weights.slot_down(*e).slice(h0 * i..(h0 + nb) * i), c, nb, i, &mut y, nb);
            y
        })
        .collect();
    let mut out = vec![0.0f32; rows * h];
    for ((_, r, h0), block) in down_tasks.iter().zip(&blocks) {
        let nb = DOWN_BLOCK.min(h - h0);
        for (row, src) in r.clone().zip(block.chunks_exact(nb)) {
            let w = row_weights[row];
            for (d, s) in out[row * h + h0..row * h + h0 + nb].iter_mut().zip(src) {
                *d = w * *s;
            }
        }
    }
    Ok(out)
}
