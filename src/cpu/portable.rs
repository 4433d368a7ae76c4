//! Portable kernels: plain Rust that the compiler may vectorise, for any CPU.
//!
//! Same shape of reduction as the AVX-512 `f32` kernel: 16 lane accumulators per output
//! element, chunks of 16 along `k` (the last one zero-padded), lane `l` of chunk `c`
//! adding `a[16c + l] * w[16c + l]` (a multiply then an add: exact for bf16 x bf16, one
//! extra rounding for f32 x f32), then the same halving tree over the 16 lanes.

use half::bf16;

/// Lanes of the accumulator of one output element.
const LANES: usize = 16;
/// Tile width (rows of `w` per tile); the tile height is 1.
pub(crate) const NR: usize = 4;

/// An element type of `w`, converted exactly to f32.
pub(crate) trait WeightElem: Copy + Sync {
    /// The value as f32 (exact).
    fn to_f32(self) -> f32;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

/// Sum of 16 lanes in the same tree as the AVX-512 `hsum`: halves, quarters, pairs.
#[inline(always)]
fn hsum(v: [f32; LANES]) -> f32 {
    let s8: [f32; 8] = std::array::from_fn(|l| v[l] + v[l + 8]);
    let s4: [f32; 4] = std::array::from_fn(|l| s8[l] + s8[l + 4]);
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    s2[0] + s2[1]
}

/// `out[c] = dot(a, w[c])` for one f32 row `a` of `k` elements and `C` rows of `w`.
pub(crate) fn tile<W: WeightElem, const C: usize>(a: &[f32], w: [&[W]; C], k: usize) -> [f32; C] {
    let a = &a[..k];
    let w: [&[W]; C] = w.map(|row| &row[..k]);
    let mut acc = [[0.0f32; LANES]; C];
    let full = k / LANES * LANES;
    for off in (0..full).step_by(LANES) {
        let av: &[f32; LANES] = a[off..off + LANES].try_into().expect("chunk of LANES");
        for (s, row) in acc.iter_mut().zip(&w) {
            let wv: &[W; LANES] = row[off..off + LANES].try_into().expect("chunk of LANES");
            for l in 0..LANES {
                s[l] += av[l] * wv[l].to_f32();
            }
        }
    }
    if full < k {
        let mut av = [0.0f32; LANES];
        av[..k - full].copy_from_slice(&a[full..]);
        for (s, row) in acc.iter_mut().zip(&w) {
            let mut wv = [0.0f32; LANES];
            for (d, x) in wv.iter_mut().zip(&row[full..]) {
                *d = x.to_f32();
            }
            for l in 0..LANES {
                s[l] += av[l] * wv[l];
            }
        }
    }
    acc.map(hsum)
}
