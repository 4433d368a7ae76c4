//! AVX-512 micro-kernels (x86_64 only).
//!
//! Every kernel computes dot products of `a` rows with `w` rows, one zmm accumulator of
//! 16 f32 lanes per output element, walking `k` in fixed chunks from 0 upwards and
//! finishing with the same horizontal-sum tree ([`hsum`]). The chunk after the last full
//! one is loaded with a mask (zeros past `k`). Nothing in an element's reduction depends
//! on the tile it sits in, so results are batch invariant and bit-reproducible.
//!
//! | kernel | a | w | chunk | per chunk and lane `l` |
//! |---|---|---|---|---|
//! | [`tile_bf16`] (`avx512bf16`) | bf16 | bf16 | 32 | `acc += a[2l]w[2l] + a[2l+1]w[2l+1]` (VDPBF16PS) |
//! | [`tile_f32_bf16`] | f32, packed even/odd | bf16 | 32 | `acc = fma(a[2l], w[2l], acc)`, then `fma(a[2l+1], w[2l+1], acc)` |
//! | [`tile_f32`] | f32 | f32 | 16 | `acc = fma(a[l], w[l], acc)` |
//!
//! Per tile of `R` a rows and `C` w rows and one chunk: `R + C` vector loads, `R * C`
//! VDPBF16PS (or `2 R C` FMAs): a 4 x 6 tile issues 10 loads per 24 VDPBF16PS. The tile
//! shapes were measured on Zen 4 (one core, k = 4096, m = 64, `w` in L3): about 92% of
//! the VDPBF16PS peak for bf16, 93% (f32 x bf16) and 83% (f32 x f32) of the FMA peak.
//! Wider tiles measured slower. Two or three rows left over after the tiles of 4 run as
//! one tile of that height and the same width (about 2x fewer loads per product than
//! single rows). The rows of a tile stream from L2; `a` rows are 64-byte
//! aligned with an odd number of cache lines per row (see `rows::AlignedRows`).

use std::arch::x86_64::*;

/// Tile height of every kernel: `a` rows per tile (then one tile of the leftover rows).
pub(crate) const MR: usize = 4;
/// Tile width of [`tile_bf16`]: `w` rows (4 x 6: 24 accumulators, 10 loads per 24 VDPBF16PS).
pub(crate) const BF16_NR: usize = 6;
/// Tile width of [`tile_f32_bf16`] (16 accumulators; 8 registers hold a chunk of 4 `w` rows).
pub(crate) const F32_BF16_NR: usize = 4;
/// Tile width of [`tile_f32`] (4 x 6 measured 40% slower: 16 KiB `w` rows alias in L1).
pub(crate) const F32_NR: usize = 4;
/// Tile width of the single-row tiles (decode GEMV, or one row left over after the tiles
/// of 4; two or three leftover rows run as one tile of the full width).
pub(crate) const NR1: usize = 8;

/// Sum of the 16 lanes, always in the same order: halves (8 pairs), quarters, pairs.
#[inline]
#[target_feature(enable = "avx512f")]
fn hsum(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let s8 = _mm256_add_ps(lo, hi);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
    _mm_cvtss_f32(s1)
}

/// Reduces a tile of accumulators with [`hsum`].
#[inline]
#[target_feature(enable = "avx512f")]
fn reduce<const R: usize, const C: usize>(acc: &[[__m512; C]; R]) -> [[f32; C]; R] {
    let mut out = [[0.0; C]; R];
    for (o_row, a_row) in out.iter_mut().zip(acc) {
        for (o, &a) in o_row.iter_mut().zip(a_row) {
            *o = hsum(a);
        }
    }
    out
}

/// Mask of the first `n` of 32 lanes (`n < 32`).
#[inline]
fn mask32(n: usize) -> u32 {
    debug_assert!(n < 32);
    (1u32 << n) - 1
}

/// Loads 32 bf16 at `p[0..32]`, or only the first `n < 32` (zero-filled), as a raw
/// 512-bit vector.
///
/// # Safety
/// `p[0..min(n, 32)]` must be readable (masked-off lanes are not accessed).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn load_u16x32(p: *const u16, n: usize) -> __m512i {
    if n >= 32 {
        // SAFETY: `p[0..32]` is readable (caller); loadu has no alignment requirement.
        unsafe { _mm512_loadu_si512(p.cast()) }
    } else {
        // SAFETY: only the first `n` lanes are read and they are readable (caller);
        // masked-off lanes are not accessed (no fault) and read as zero.
        unsafe { _mm512_maskz_loadu_epi16(mask32(n), p.cast()) }
    }
}

/// Loads 16 f32 at `p[0..16]`, or only the first `n < 16` (zero-filled).
///
/// # Safety
/// `p[0..min(n, 16)]` must be readable.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_f32x16(p: *const f32, n: usize) -> __m512 {
    if n >= 16 {
        // SAFETY: `p[0..16]` is readable (caller); loadu is unaligned.
        unsafe { _mm512_loadu_ps(p) }
    } else {
        let mask = ((1u32 << n) - 1) as u16;
        // SAFETY: only the first `n` lanes are read and they are readable (caller).
        unsafe { _mm512_maskz_loadu_ps(mask, p) }
    }
}

/// Row pointers of a tile after checking once that every row holds `len` elements, so
/// that the loops can load `row[off..off + chunk]` for `off + chunk <= len` unchecked.
#[inline(always)]
fn row_ptrs<T, const N: usize>(rows: [&[T]; N], len: usize) -> [*const T; N] {
    assert!(rows.iter().all(|r| r.len() >= len), "tile row shorter than {len}");
    rows.map(<[T]>::as_ptr)
}

/// Splits 32 bf16 into the even-index elements and the odd-index ones, as exact f32.
#[inline]
#[target_feature(enable = "avx512f")]
fn bf16x32_even_odd(x: __m512i) -> (__m512, __m512) {
    let even = _mm512_slli_epi32::<16>(x);
    let odd = _mm512_and_si512(x, _mm512_set1_epi32(0xFFFF_0000u32 as i32));
    (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
}

/// Reinterprets 32 raw bf16 as the VDPBF16PS operand type.
#[inline]
#[target_feature(enable = "avx512f")]
fn as_bh(x: __m512i) -> __m512bh {
    // SAFETY: both are plain 512-bit vectors; every bit pattern is a valid value of each.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
}

/// Prefetches the cache line at element `off` of every row in `pf` (rows of the next
/// cache block of `w`, see `driver::drive`) into L2: one line per row per chunk, the pace
/// at which the tile itself walks its rows. Into L2 (T1): on Zen 4, T1 measured 10-20%
/// faster than no prefetch at m = 2..16 with `w` from DRAM, T0 (into L1) slower.
#[inline]
#[target_feature(enable = "avx512f")]
fn prefetch<T>(pf: &[*const T], off: usize) {
    for &row in pf {
        // Prefetching is only a hint: it never faults, whatever the address.
        _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(off).cast::<i8>());
    }
}

/// One chunk of [`tile_bf16`]: `n <= 32` elements at `off` of every row, and the
/// prefetch of the lines at `off` of the rows in `pf`.
///
/// # Safety
/// Every row pointer must be readable for `off + n` elements.
#[inline]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
unsafe fn chunk_bf16<const R: usize, const C: usize>(
    acc: &mut [[__m512; C]; R],
    a: &[*const u16; R],
    w: &[*const u16; C],
    pf: &[*const u16],
    off: usize,
    n: usize,
) {
    prefetch(pf, off);
    // SAFETY (loads): every row is readable for `off + n` elements (caller).
    let wv: [__m512bh; C] = std::array::from_fn(|c| as_bh(unsafe { load_u16x32(w[c].add(off), n) }));
    for (acc_row, &row) in acc.iter_mut().zip(a) {
        let av = as_bh(unsafe { load_u16x32(row.add(off), n) });
        for (s, &v) in acc_row.iter_mut().zip(&wv) {
            *s = _mm512_dpbf16_ps(*s, av, v);
        }
    }
}

/// bf16 x bf16 tile: `out[r][c] = dot(a[r], w[c])`, VDPBF16PS over chunks of 32.
/// Every row slice must hold at least `k` elements.
#[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
pub(crate) fn tile_bf16<const R: usize, const C: usize>(
    a: [&[u16]; R],
    w: [&[u16]; C],
    k: usize,
    pf: &[*const u16],
) -> [[f32; C]; R] {
    let (a, w) = (row_ptrs(a, k), row_ptrs(w, k));
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let full = k / 32 * 32;
    // SAFETY (both): every row holds `k` elements (`row_ptrs`) and `off + n <= k`.
    for off in (0..full).step_by(32) {
        unsafe { chunk_bf16(&mut acc, &a, &w, pf, off, 32) };
    }
    if full < k {
        unsafe { chunk_bf16(&mut acc, &a, &w, pf, full, k - full) };
    }
    reduce(&acc)
}

/// One chunk of [`tile_f32_bf16`]: `n <= 32` elements at `off` of every `w` row and the
/// 32 packed elements at `off` of every `a` row.
///
/// # Safety
/// `w` rows must be readable for `off + n` elements, `a` rows for `off + 32`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn chunk_f32_bf16<const R: usize, const C: usize>(
    acc: &mut [[__m512; C]; R],
    a: &[*const f32; R],
    w: &[*const u16; C],
    pf: &[*const u16],
    off: usize,
    n: usize,
) {
    prefetch(pf, off);
    // SAFETY (loads): readable as the caller guarantees.
    let wv: [(__m512, __m512); C] = std::array::from_fn(|c| bf16x32_even_odd(unsafe { load_u16x32(w[c].add(off), n) }));
    for (acc_row, &row) in acc.iter_mut().zip(a) {
        let (ae, ao) = unsafe { (load_f32x16(row.add(off), 16), load_f32x16(row.add(off + 16), 16)) };
        for (s, &(we, wo)) in acc_row.iter_mut().zip(&wv) {
            *s = _mm512_fmadd_ps(ae, we, *s);
            *s = _mm512_fmadd_ps(ao, wo, *s);
        }
    }
}

/// f32 x bf16 tile over chunks of 32: each `a` row is packed by [`pack_even_odd_bf16`] /
/// [`pack_even_odd_f32`] (the 16 even-index elements of a chunk, then the 16 odd-index
/// ones, zero-padded to [`packed_len`]); `w` rows are plain bf16 with at least `k`
/// elements.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) fn tile_f32_bf16<const R: usize, const C: usize>(
    a: [&[f32]; R],
    w: [&[u16]; C],
    k: usize,
    pf: &[*const u16],
) -> [[f32; C]; R] {
    let (a, w) = (row_ptrs(a, packed_len(k)), row_ptrs(w, k));
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let full = k / 32 * 32;
    // SAFETY (both): `w` rows hold `k >= off + n` elements and packed `a` rows
    // `packed_len(k) >= off + 32` (`row_ptrs`).
    for off in (0..full).step_by(32) {
        unsafe { chunk_f32_bf16(&mut acc, &a, &w, pf, off, 32) };
    }
    if full < k {
        unsafe { chunk_f32_bf16(&mut acc, &a, &w, pf, full, k - full) };
    }
    reduce(&acc)
}

/// One chunk of [`tile_f32`]: `n <= 16` elements at `off` of every row.
///
/// # Safety
/// Every row pointer must be readable for `off + n` elements.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn chunk_f32<const R: usize, const C: usize>(
    acc: &mut [[__m512; C]; R],
    a: &[*const f32; R],
    w: &[*const f32; C],
    pf: &[*const f32],
    off: usize,
    n: usize,
) {
    prefetch(pf, off);
    // SAFETY (loads): every row is readable for `off + n` elements (caller).
    let wv: [__m512; C] = std::array::from_fn(|c| unsafe { load_f32x16(w[c].add(off), n) });
    for (acc_row, &row) in acc.iter_mut().zip(a) {
        let av = unsafe { load_f32x16(row.add(off), n) };
        for (s, &v) in acc_row.iter_mut().zip(&wv) {
            *s = _mm512_fmadd_ps(av, v, *s);
        }
    }
}

/// f32 x f32 tile over chunks of 16. Every row slice must hold at least `k` elements.
#[target_feature(enable = "avx512f")]
pub(crate) fn tile_f32<const R: usize, const C: usize>(
    a: [&[f32]; R],
    w: [&[f32]; C],
    k: usize,
    pf: &[*const f32],
) -> [[f32; C]; R] {
    let (a, w) = (row_ptrs(a, k), row_ptrs(w, k));
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let full = k / 16 * 16;
    // SAFETY (both): every row holds `k` elements (`row_ptrs`) and `off + n <= k`.
    for off in (0..full).step_by(16) {
        unsafe { chunk_f32(&mut acc, &a, &w, pf, off, 16) };
    }
    if full < k {
        unsafe { chunk_f32(&mut acc, &a, &w, pf, full, k - full) };
    }
    reduce(&acc)
}

/// One register-tile kernel: its operand element types and its tile function, so that
/// the plans can drive every kernel with the same code (`plan::drive_avx512`).
pub(crate) trait Kernel {
    /// Element of the prepared `a` rows.
    type A: bytemuck::Pod;
    /// Element of the `w` rows.
    type W;
    /// `out[r][c] = dot(a[r], w[c])` over `k` (see the module docs for each kernel).
    ///
    /// # Safety
    /// The CPU must support the kernel's instructions.
    unsafe fn tile<const R: usize, const C: usize>(
        a: [&[Self::A]; R],
        w: [&[Self::W]; C],
        k: usize,
        pf: &[*const Self::W],
    ) -> [[f32; C]; R];
}

/// [`tile_bf16`] (needs `avx512bf16`).
pub(crate) struct Bf16Dot;
/// [`tile_f32_bf16`] (needs AVX-512 F/BW).
pub(crate) struct F32Bf16;
/// [`tile_f32`] (needs AVX-512 F).
pub(crate) struct F32F32;

impl Kernel for Bf16Dot {
    type A = u16;
    type W = u16;
    #[inline(always)]
    unsafe fn tile<const R: usize, const C: usize>(
        a: [&[u16]; R],
        w: [&[u16]; C],
        k: usize,
        pf: &[*const u16],
    ) -> [[f32; C]; R] {
        // SAFETY: the caller guarantees `avx512bf16` and AVX-512 F/BW/VL.
        unsafe { tile_bf16(a, w, k, pf) }
    }
}

impl Kernel for F32Bf16 {
    type A = f32;
    type W = u16;
    #[inline(always)]
    unsafe fn tile<const R: usize, const C: usize>(
        a: [&[f32]; R],
        w: [&[u16]; C],
        k: usize,
        pf: &[*const u16],
    ) -> [[f32; C]; R] {
        // SAFETY: the caller guarantees AVX-512 F/BW.
        unsafe { tile_f32_bf16(a, w, k, pf) }
    }
}

impl Kernel for F32F32 {
    type A = f32;
    type W = f32;
    #[inline(always)]
    unsafe fn tile<const R: usize, const C: usize>(
        a: [&[f32]; R],
        w: [&[f32]; C],
        k: usize,
        pf: &[*const f32],
    ) -> [[f32; C]; R] {
        // SAFETY: the caller guarantees AVX-512 F.
        unsafe { tile_f32(a, w, k, pf) }
    }
}

/// Length of a row packed by [`pack_even_odd`]: `k` rounded up to a multiple of 32.
pub(crate) fn packed_len(k: usize) -> usize {
    k.div_ceil(32) * 32
}

/// Packs one bf16 row of `k = src.len()` elements for [`tile_f32_bf16`]: per chunk of 32,
/// the 16 even-index elements then the 16 odd-index ones, as exact f32; zeros past `k`.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) fn pack_even_odd_bf16(src: &[u16], dst: &mut [f32]) {
    let k = src.len();
    assert_eq!(dst.len(), packed_len(k));
    for (c, chunk) in dst.chunks_exact_mut(32).enumerate() {
        let off = c * 32;
        // SAFETY: `src[off..k]` is in bounds and at most 32 elements of it are read.
        let (e, o) = bf16x32_even_odd(unsafe { load_u16x32(src.as_ptr().add(off), k - off) });
        // SAFETY: `chunk` has exactly 32 elements: 16 for each unaligned store.
        unsafe {
            _mm512_storeu_ps(chunk.as_mut_ptr(), e);
            _mm512_storeu_ps(chunk.as_mut_ptr().add(16), o);
        }
    }
}

/// Packs one f32 row like [`pack_even_odd_bf16`].
#[target_feature(enable = "avx512f")]
pub(crate) fn pack_even_odd_f32(src: &[f32], dst: &mut [f32]) {
    let k = src.len();
    assert_eq!(dst.len(), packed_len(k));
    let even_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd_idx = _mm512_add_epi32(even_idx, _mm512_set1_epi32(1));
    for (c, chunk) in dst.chunks_exact_mut(32).enumerate() {
        let off = c * 32;
        let n = k - off;
        // SAFETY: `src[off..off + min(n, 32)]` is in bounds and only that is read.
        let (lo, hi) = unsafe {
            let p = src.as_ptr().add(off);
            (load_f32x16(p, n), load_f32x16(p.add(16.min(n)), n.saturating_sub(16)))
        };
        let e = _mm512_permutex2var_ps(lo, even_idx, hi);
        let o = _mm512_permutex2var_ps(lo, odd_idx, hi);
        // SAFETY: `chunk` has exactly 32 elements: 16 for each unaligned store.
        unsafe {
            _mm512_storeu_ps(chunk.as_mut_ptr(), e);
            _mm512_storeu_ps(chunk.as_mut_ptr().add(16), o);
        }
    }
}

/// Rounds f32 to bf16, nearest even, bit-identical to `half::bf16::from_f32` (NaNs keep
/// their sign and top payload bits and become quiet).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn f32_to_bf16(src: &[f32], out: &mut [u16]) {
    assert_eq!(src.len(), out.len());
    let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
    let inf = _mm512_set1_epi32(0x7F80_0000);
    let quiet = _mm512_set1_epi32(0x0040_0000);
    let bias = _mm512_set1_epi32(0x7FFF);
    let one = _mm512_set1_epi32(1);
    let mut off = 0;
    while off < src.len() {
        let n = (src.len() - off).min(16);
        // SAFETY: `src[off..off + n]` is in bounds and only that is read.
        let x = _mm512_castps_si512(unsafe { load_f32x16(src.as_ptr().add(off), n) });
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), one);
        let rounded = _mm512_add_epi32(x, _mm512_add_epi32(bias, lsb));
        let is_nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, abs_mask), inf);
        let bits = _mm512_mask_mov_epi32(rounded, is_nan, _mm512_or_si512(x, quiet));
        let packed = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(bits));
        let mask = ((1u32 << n) - 1) as u16;
        assert!(off + n <= out.len());
        // SAFETY: only the first `n` lanes are written, and `out[off..off + n]` is in
        // bounds (asserted); masked-off lanes are not accessed.
        unsafe { _mm256_mask_storeu_epi16(out.as_mut_ptr().add(off).cast(), mask, packed) };
        off += 16;
    }
}
