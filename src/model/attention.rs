//! Self-attention with QK-norm, NeoX RoPE and a KV cache (MHA and GQA).
//!
//! For `T` new tokens at positions `start..start + T` of one layer:
//!
//! ```text
//! q, k, v = x Wq^T, x Wk^T, x Wv^T          # [T, heads*d], [T, kv*d], [T, kv*d]
//! q, k    = rmsnorm_per_head(q, q_norm), rmsnorm_per_head(k, k_norm)   # before RoPE
//! q, k    = rope(q), rope(k)
//! cache  += k, v                             # the cache now holds start + T positions
//! o[t, h] = softmax_j<=start+t(q[t,h] . k[j, h/g] / sqrt(d)) @ v[:, h/g]   # f32, causal
//! out     = o Wo^T
//! ```
//!
//! The attention core runs in tiles of queries and keys with an online softmax (see
//! `attend`), so a prompt's `Q K^T` and `P V` are register-tiled matrix products.
//!
//! `g = heads / kv_heads` query heads share one key/value head (GQA; `g = 1` is MHA).

use rayon::prelude::*;

use super::checkpoint::{Checkpoint, Weight};
use super::ops::{GemmInput, Rope, linear_in, rms_norm_rows};
use crate::cpu::Isa;
use crate::moe::Precision;
use crate::tensor::round_to_bf16;

/// The keys and values of every layer for the positions seen so far.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    /// Width of one cached key or value row (`kv_heads * head_dim`).
    kv_width: usize,
}

#[derive(Clone, Debug, Default)]
struct LayerCache {
    /// `[len, kv_heads * head_dim]` keys after QK-norm and RoPE.
    keys: Vec<f32>,
    /// `[len, kv_heads * head_dim]` values.
    values: Vec<f32>,
}

impl KvCache {
    /// An empty cache for `layers` layers whose key and value rows are `kv_width` wide.
    pub fn new(layers: usize, kv_width: usize) -> Self {
        KvCache { layers: vec![LayerCache::default(); layers], len: 0, kv_width }
    }

    /// Layers and row width this cache was made for.
    pub fn shape(&self) -> (usize, usize) {
        (self.layers.len(), self.kv_width)
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        for layer in &mut self.layers {
            layer.keys.clear();
            layer.values.clear();
        }
        self.len = 0;
    }

    /// Bytes held by the cached keys and values.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| (l.keys.len() + l.values.len()) * 4).sum()
    }

    /// Records that `tokens` more positions were appended to every layer.
    pub(crate) fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }

    /// Drops the positions a failed step appended past `len` (keeps the cache consistent).
    pub(crate) fn rollback(&mut self) {
        for layer in &mut self.layers {
            layer.keys.truncate(self.len * self.kv_width);
            layer.values.truncate(self.len * self.kv_width);
        }
    }
}

/// The weights of one attention block.
#[derive(Debug)]
pub struct AttentionWeights {
    /// `q_proj [heads*d, H]`.
    pub q_proj: Weight,
    /// `k_proj [kv*d, H]`.
    pub k_proj: Weight,
    /// `v_proj [kv*d, H]`.
    pub v_proj: Weight,
    /// `o_proj [H, heads*d]`.
    pub o_proj: Weight,
    /// `q_norm [d]`.
    pub q_norm: Vec<f32>,
    /// `k_norm [d]`.
    pub k_norm: Vec<f32>,
}

/// The attention shape of the model, with its RoPE table.
#[derive(Clone, Debug)]
pub struct AttentionShape {
    /// Model width `H`.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head width `d`.
    pub head_dim: usize,
    /// RMSNorm epsilon of the QK-norm.
    pub eps: f64,
    /// The rotary embedding.
    pub rope: Rope,
}

impl AttentionShape {
    /// Width of one key or value row: `kv_heads * head_dim`.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Runs the attention block of layer `layer` on the normed hidden rows `x [T, H]`, whose
/// first position is `cache.len()`; appends the new keys and values to the cache (the
/// caller advances the cache once every layer has run). Returns `[T, H]`.
///
/// Under [`Precision::Bf16`] the projections take bf16 inputs, the cached keys (after
/// QK-norm and RoPE, both f32) and values are rounded to bf16, and so are the query and
/// the probabilities that enter the two products of the attention core; the softmax and
/// its running maximum and sum stay f32.
#[allow(clippy::too_many_arguments)] // the layer's weights, shape, input, cache and precision
pub fn attention(
    ckpt: &Checkpoint,
    w: &AttentionWeights,
    shape: &AttentionShape,
    x: &[f32],
    tokens: usize,
    cache: &mut KvCache,
    layer: usize,
    precision: Precision,
) -> Vec<f32> {
    let AttentionShape { hidden, heads, kv_heads, head_dim, eps, ref rope } = *shape;
    let q_width = heads * head_dim;
    let kv_width = shape.kv_width();
    let start = cache.len;

    let input = GemmInput::new(x, precision);
    let mut q = linear_in(&input, ckpt.view(&w.q_proj), tokens, q_width, hidden);
    let mut k = linear_in(&input, ckpt.view(&w.k_proj), tokens, kv_width, hidden);
    let mut v = linear_in(&input, ckpt.view(&w.v_proj), tokens, kv_width, hidden);
    drop(input);
    rms_norm_rows(&mut q, &w.q_norm, eps);
    rms_norm_rows(&mut k, &w.k_norm, eps);
    rope.apply(&mut q, heads, start);
    rope.apply(&mut k, kv_heads, start);
    if precision == Precision::Bf16 {
        round_to_bf16(&mut k);
        round_to_bf16(&mut v);
    }

    let lc = &mut cache.layers[layer];
    lc.keys.extend_from_slice(&k);
    lc.values.extend_from_slice(&v);
    let out = attend(&q, &lc.keys, &lc.values, shape, tokens, start, precision);
    let out = GemmInput::new(&out, precision);
    linear_in(&out, ckpt.view(&w.o_proj), tokens, hidden, q_width)
}

/// Query rows per attention tile.
const Q_TILE: usize = 32;
/// Key positions per attention tile.
const K_TILE: usize = 64;

/// The attention core for `tokens` queries `q [T, heads * d]` at positions `start..`,
/// over `keys` and `values` `[start + T, kv_heads * d]` (causal). Returns `[T, heads * d]`.
///
/// Computed in tiles with an online softmax (as flash attention does): for each head and
/// block of [`Q_TILE`] query rows, the key positions are walked in blocks of [`K_TILE`];
/// `S = Q K^T` and `P V` are register-tiled GEMMs ([`crate::cpu::gemm_nt`]), and each row
/// keeps its running maximum `m` and sum `l` in f32, rescaling its output accumulator by
/// `exp(m_old - m_new)` when the maximum grows. Positions past a row's own are masked
/// (probability 0). A row's values depend only on its query, its position and the cache,
/// not on the other rows of the block, so prefill and cached decode agree.
fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    shape: &AttentionShape,
    tokens: usize,
    start: usize,
    precision: Precision,
) -> Vec<f32> {
    let (heads, d) = (shape.heads, shape.head_dim);
    let (q_width, kv_width) = (heads * d, shape.kv_width());
    let group = heads / shape.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let isa = Isa::detect();
    let q_blocks = tokens.div_ceil(Q_TILE);

    let tiles: Vec<(usize, usize, Vec<f32>)> = (0..heads * q_blocks)
        .into_par_iter()
        .map(|task| {
            let (h, qb) = (task / q_blocks, task % q_blocks);
            let kv_off = (h / group) * d;
            let (t0, t1) = (qb * Q_TILE, ((qb + 1) * Q_TILE).min(tokens));
            let rows = t1 - t0;
            let mut q_tile = vec![0.0f32; rows * d];
            for (r, dst) in q_tile.chunks_exact_mut(d).enumerate() {
                dst.copy_from_slice(&q[(t0 + r) * q_width + h * d..][..d]);
            }
            let q_tile = GemmInput::new(&q_tile, precision);
            let mut o = vec![0.0f32; rows * d];
            let mut m = vec![f32::NEG_INFINITY; rows];
            let mut l = vec![0.0f32; rows];
            let mut k_tile = vec![0.0f32; K_TILE * d];
            let mut vt_tile = vec![0.0f32; d * K_TILE];
            let mut s = vec![0.0f32; rows * K_TILE];
            let mut pv = vec![0.0f32; rows * d];
            let visible_end = start + t1;
            for j0 in (0..visible_end).step_by(K_TILE) {
                let n = K_TILE.min(visible_end - j0);
                for (j, dst) in k_tile[..n * d].chunks_exact_mut(d).enumerate() {
                    dst.copy_from_slice(&keys[(j0 + j) * kv_width + kv_off..][..d]);
                }
                // V^T: the key positions are the reduction of P V, so they go along rows.
                for (c, dst) in vt_tile[..d * n].chunks_exact_mut(n).enumerate() {
                    for (j, v) in dst.iter_mut().enumerate() {
                        *v = values[(j0 + j) * kv_width + kv_off + c];
                    }
                }
                let k_in = GemmInput::new(&k_tile[..n * d], precision);
                let s = &mut s[..rows * n];
                crate::cpu::gemm_nt(isa, q_tile.view(), k_in.view(), rows, n, d, s, n);
                for (r, row) in s.chunks_exact_mut(n).enumerate() {
                    // Keys j0 + j with j0 + j <= start + t0 + r are visible to row r.
                    let visible = (start + t0 + r + 1).saturating_sub(j0).min(n);
                    if visible == 0 {
                        row.fill(0.0);
                        continue;
                    }
                    let block_max = row[..visible].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b * scale));
                    let m_new = m[r].max(block_max);
                    let correction = (m[r] - m_new).exp();
                    let mut sum = 0.0f32;
                    for p in &mut row[..visible] {
                        *p = (*p * scale - m_new).exp();
                        sum += *p;
                    }
                    row[visible..].fill(0.0);
                    l[r] = l[r] * correction + sum;
                    m[r] = m_new;
                    o[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= correction);
                }
                let p_in = GemmInput::new(s, precision);
                let v_in = GemmInput::new(&vt_tile[..d * n], precision);
                crate::cpu::gemm_nt(isa, p_in.view(), v_in.view(), rows, d, n, &mut pv, d);
                o.iter_mut().zip(&pv).for_each(|(x, y)| *x += y);
            }
            for (row, &sum) in o.chunks_exact_mut(d).zip(&l) {
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
            }
            (h, t0, o)
        })
        .collect();

    let mut out = vec![0.0f32; tokens * q_width];
    for (h, t0, o) in tiles {
        for (r, src) in o.chunks_exact(d).enumerate() {
            out[(t0 + r) * q_width + h * d..][..d].copy_from_slice(src);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(heads: usize, kv_heads: usize, head_dim: usize) -> AttentionShape {
        AttentionShape {
            hidden: heads * head_dim,
            heads,
            kv_heads,
            head_dim,
            eps: 1e-5,
            rope: Rope::new(head_dim, 1e4),
        }
    }

    /// Values in [-scale, scale) from a fixed LCG.
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// The plain definition, row by row, in f64.
    fn naive(q: &[f32], keys: &[f32], vals: &[f32], shape: &AttentionShape, tokens: usize, start: usize) -> Vec<f32> {
        let (heads, d, kvw) = (shape.heads, shape.head_dim, shape.kv_width());
        let group = heads / shape.kv_heads;
        let mut out = vec![0.0f32; tokens * heads * d];
        for t in 0..tokens {
            for h in 0..heads {
                let qr = &q[t * heads * d + h * d..][..d];
                let kv = (h / group) * d;
                let scores: Vec<f64> = (0..=start + t)
                    .map(|j| {
                        let kr = &keys[j * kvw + kv..][..d];
                        qr.iter().zip(kr).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                for c in 0..d {
                    let o: f64 = weights.iter().enumerate().map(|(j, w)| w * f64::from(vals[j * kvw + kv + c])).sum();
                    out[t * heads * d + h * d + c] = (o / sum) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn tiled_attention_matches_the_plain_softmax_over_many_key_tiles() {
        // Several key tiles (K_TILE = 64) and query tiles (Q_TILE = 32), a cache already
        // holding positions, GQA and MQA; queries scaled so that the row maximum moves
        // from tile to tile (the online rescaling is exercised).
        for (heads, kv_heads, d, start, tokens) in [(4, 2, 32, 0, 150), (3, 1, 24, 65, 40), (2, 2, 16, 200, 1)] {
            let s = shape(heads, kv_heads, d);
            let len = start + tokens;
            let q = values(tokens * heads * d, 1, 3.0);
            let keys = values(len * s.kv_width(), 2, 1.0);
            let vals = values(len * s.kv_width(), 3, 1.0);
            let want = naive(&q, &keys, &vals, &s, tokens, start);
            let got = attend(&q, &keys, &vals, &s, tokens, start, Precision::F32);
            let err = got.iter().zip(&want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-5, "f32, {heads}/{kv_heads} heads, start {start}, {tokens} tokens: error {err:e}");

            // bf16: the same definition on bf16-rounded inputs, with the probabilities
            // rounded to bf16 too (a relative 2^-9 each): within 1e-2.
            let (mut qb, mut kb, mut vb) = (q.clone(), keys.clone(), vals.clone());
            [&mut qb, &mut kb, &mut vb].into_iter().for_each(|x| round_to_bf16(x));
            let want = naive(&qb, &kb, &vb, &s, tokens, start);
            let got = attend(&qb, &kb, &vb, &s, tokens, start, Precision::Bf16);
            let err = got.iter().zip(&want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-2, "bf16, {heads}/{kv_heads} heads, start {start}, {tokens} tokens: error {err:e}");

            // The last row alone (a decode step) gives the same bits as inside the batch.
            let row = heads * d;
            let last = attend(&qb[(tokens - 1) * row..], &kb, &vb, &s, 1, len - 1, Precision::Bf16);
            assert_eq!(last, got[(tokens - 1) * row..], "bf16: the last row depends on the batch");
        }
    }
}
