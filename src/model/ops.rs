//! The small numeric pieces of the decoder: linear layers, RMSNorm, RoPE, SwiGLU.
//!
//! Activations are `f32` rows; weights are `[out, in]` like `torch.nn.Linear`, `f32` or
//! `bf16`. Every matrix product goes through [`crate::cpu::par_gemm_nt`], the same
//! register-tiled kernels the MoE layer uses. Under [`Precision::F32`] the activations go
//! in as f32 (bf16 weights widen exactly); under [`Precision::Bf16`] they are rounded to
//! bf16 first ([`GemmInput`]) and bf16 weights multiply them by the bf16 dot-product
//! kernel, accumulating in f32.

use half::bf16;
use rayon::prelude::*;

use crate::moe::Precision;
use crate::tensor::TensorView;

/// The left operand of one or more linear layers, in the compute precision: the f32 rows
/// borrowed, or rounded to bf16 (nearest even) once for every product that reads them.
pub enum GemmInput<'a> {
    /// f32 rows, used as they are.
    F32(&'a [f32]),
    /// The rows rounded to bf16.
    Bf16(Vec<bf16>),
}

impl<'a> GemmInput<'a> {
    /// `x` prepared for `precision`.
    pub fn new(x: &'a [f32], precision: Precision) -> Self {
        match precision {
            Precision::F32 => GemmInput::F32(x),
            Precision::Bf16 => {
                let mut rounded = vec![bf16::ZERO; x.len()];
                crate::cpu::f32_to_bf16(x, &mut rounded);
                GemmInput::Bf16(rounded)
            }
        }
    }

    /// The rows as a tensor view.
    pub fn view(&self) -> TensorView<'_> {
        match self {
            GemmInput::F32(x) => TensorView::F32(x),
            GemmInput::Bf16(x) => TensorView::Bf16(x),
        }
    }
}

/// `x [m, k] @ w[n, k]^T -> [m, n]` in f32.
pub fn linear(x: &[f32], w: TensorView<'_>, m: usize, n: usize, k: usize) -> Vec<f32> {
    linear_in(&GemmInput::F32(x), w, m, n, k)
}

/// `x [m, k] @ w[n, k]^T -> [m, n]` with `x` already in its compute precision; f32 out.
pub fn linear_in(x: &GemmInput<'_>, w: TensorView<'_>, m: usize, n: usize, k: usize) -> Vec<f32> {
    let x = x.view();
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    let mut out = vec![0.0f32; m * n];
    crate::cpu::par_gemm_nt(x, w, m, n, k, &mut out, n);
    out
}

/// RMSNorm of every `width`-wide row of `x` in place, as transformers computes it in f32:
/// `w * (x * rsqrt(mean(x^2) + eps))`. The mean is accumulated in f64.
pub fn rms_norm_rows(x: &mut [f32], weight: &[f32], eps: f64) {
    let width = weight.len();
    let norm_row = |row: &mut [f32]| {
        let sum_sq: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let variance = (sum_sq / width as f64) as f32;
        let scale = 1.0 / (variance + eps as f32).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = w * (*v * scale);
        }
    };
    if x.len() >= 1 << 15 {
        x.par_chunks_mut(width).for_each(norm_row);
    } else {
        x.chunks_mut(width).for_each(norm_row);
    }
}

/// RMSNorm into a new buffer (the residual stream stays untouched).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f64) -> Vec<f32> {
    let mut out = x.to_vec();
    rms_norm_rows(&mut out, weight, eps);
    out
}

/// Rotary position embedding in the NeoX (rotate-half) layout.
///
/// `inv_freq[i] = 1 / theta^(2i / d)` for `i < d/2`, computed in f32 as transformers does;
/// the angle for position `p` is `f32(p) * inv_freq[i]`, and for each head
/// `x'[i] = x[i] cos - x[i + d/2] sin`, `x'[i + d/2] = x[i + d/2] cos + x[i] sin`.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// The table for heads of width `head_dim` (even) and base `theta`.
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let base = theta as f32;
        let inv_freq = (0..half).map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32)).collect();
        Rope { inv_freq }
    }

    /// Rotates `rows` consecutive rows of `heads * head_dim` values; row `r` sits at
    /// position `start + r`.
    pub fn apply(&self, x: &mut [f32], heads: usize, start: usize) {
        let half = self.inv_freq.len();
        let head_dim = 2 * half;
        let row_width = heads * head_dim;
        let mut cos = vec![0.0f32; half];
        let mut sin = vec![0.0f32; half];
        for (r, row) in x.chunks_mut(row_width).enumerate() {
            let pos = (start + r) as f32;
            for i in 0..half {
                let angle = pos * self.inv_freq[i];
                cos[i] = angle.cos();
                sin[i] = angle.sin();
            }
            for head in row.chunks_mut(head_dim) {
                let (lo, hi) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * cos[i] - b * sin[i];
                    hi[i] = b * cos[i] + a * sin[i];
                }
            }
        }
    }
}

/// Index of the largest value; ties go to the lower index (like `torch.argmax`). NaN
/// values are never chosen unless every value is NaN.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in values.iter().enumerate() {
        if !v.is_nan() && (!found || v > best_value) {
            best = i;
            best_value = v;
            found = true;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_and_keeps_norms() {
        let rope = Rope::new(8, 10_000.0);
        let mut x: Vec<f32> = (0..16).map(|i| i as f32 * 0.25 - 1.0).collect();
        let before: f32 = x[..8].iter().map(|v| v * v).sum();
        rope.apply(&mut x, 2, 5);
        let after: f32 = x[..8].iter().map(|v| v * v).sum();
        assert!((before - after).abs() < 1e-4);
        // Position 0 is the identity.
        let mut y = vec![1.0f32; 8];
        rope.apply(&mut y, 1, 0);
        assert_eq!(y, vec![1.0; 8]);
    }

    #[test]
    fn rms_norm_unit_rows() {
        let mut x = vec![2.0f32, -2.0, 2.0, -2.0];
        rms_norm_rows(&mut x, &[1.0, 2.0, 1.0, 0.5], 0.0);
        assert_eq!(x, vec![1.0, -2.0, 1.0, -0.5]);
    }

    #[test]
    fn argmax_prefers_lower_index_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, -2.0]), 1);
    }
}
