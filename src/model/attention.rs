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
//! `g = heads / kv_heads` query heads share one key/value head (GQA; `g = 1` is MHA).

use rayon::prelude::*;

use super::checkpoint::{Checkpoint, Weight};
use super::ops::{Rope, linear, rms_norm_rows};

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
pub fn attention(
    ckpt: &Checkpoint,
    w: &AttentionWeights,
    shape: &AttentionShape,
    x: &[f32],
    tokens: usize,
    cache: &mut KvCache,
    layer: usize,
) -> Vec<f32> {
    let AttentionShape { hidden, heads, kv_heads, head_dim, eps, ref rope } = *shape;
    let q_width = heads * head_dim;
    let kv_width = shape.kv_width();
    let start = cache.len;

    let mut q = linear(x, ckpt.view(&w.q_proj), tokens, q_width, hidden);
    let mut k = linear(x, ckpt.view(&w.k_proj), tokens, kv_width, hidden);
    let v = linear(x, ckpt.view(&w.v_proj), tokens, kv_width, hidden);
    rms_norm_rows(&mut q, &w.q_norm, eps);
    rms_norm_rows(&mut k, &w.k_norm, eps);
    rope.apply(&mut q, heads, start);
    rope.apply(&mut k, kv_heads, start);

    let lc = &mut cache.layers[layer];
    lc.keys.extend_from_slice(&k);
    lc.values.extend_from_slice(&v);
    let (keys, values) = (&lc.keys[..], &lc.values[..]);

    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = vec![0.0f32; tokens * q_width];
    // One chunk of `head_dim` outputs per (token, head) pair: rows are [T, heads, d].
    out.par_chunks_mut(head_dim).enumerate().for_each(|(pair, o)| {
        let (t, h) = (pair / heads, pair % heads);
        let kv_head = h / group;
        let q_row = &q[t * q_width + h * head_dim..][..head_dim];
        let visible = start + t + 1;
        let mut scores: Vec<f32> = (0..visible)
            .map(|j| {
                let k_row = &keys[j * kv_width + kv_head * head_dim..][..head_dim];
                q_row.iter().zip(k_row).map(|(a, b)| a * b).sum::<f32>() * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for s in &mut scores {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for (j, &p) in scores.iter().enumerate() {
            let v_row = &values[j * kv_width + kv_head * head_dim..][..head_dim];
            let p = p * inv;
            for (o, &vv) in o.iter_mut().zip(v_row) {
                *o += p * vv;
            }
        }
    });
    linear(&out, ckpt.view(&w.o_proj), tokens, hidden, q_width)
}
