//! Drawing the values that break numeric code, from the fuzzer's bytes.

use arbitrary::{Result, Unstructured};

/// f32 values that sit on the edges: signed zeros, ties, the extremes, the non-finite.
pub const EDGE_F32: [f32; 20] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    2.0,
    -2.0,
    1e-20,
    -1e-20,
    1e30,
    -1e30,
    88.0,
    -88.0,
    f32::MAX,
    f32::MIN,
    f32::MIN_POSITIVE,
    1e-45, // the smallest subnormal
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
];

/// Any f32, biased towards edges and small repeated values (which make ties).
pub fn any_f32(u: &mut Unstructured<'_>) -> Result<f32> {
    Ok(match u.int_in_range(0u8..=7)? {
        0 | 1 => *u.choose(&EDGE_F32)?,
        2..=4 => dyadic(u)?,
        _ => f32::from_bits(u.arbitrary()?),
    })
}

/// A finite f32, biased like [`any_f32`].
pub fn finite_f32(u: &mut Unstructured<'_>) -> Result<f32> {
    let v = any_f32(u)?;
    Ok(if v.is_finite() { v } else { 0.25 })
}

/// `k / 8` for `k` in `-16..=15`: exact in bf16 and f32, so sums and products of a few
/// hundred of them are exact in f32 whatever the order (see the moe_layer target).
pub fn dyadic(u: &mut Unstructured<'_>) -> Result<f32> {
    Ok(f32::from(u.int_in_range(-16i8..=15)?) / 8.0)
}

/// A length in `lo..=hi`, most often small.
pub fn small_len(u: &mut Unstructured<'_>, lo: usize, hi: usize) -> Result<usize> {
    if u.ratio(3u8, 4)? { u.int_in_range(lo..=lo.saturating_add(4).min(hi)) } else { u.int_in_range(lo..=hi) }
}

/// True about once in `n` draws; false when the fuzzer's bytes run out (so a short
/// input means "nothing unusual", not "everything unusual" as `Unstructured::ratio` does).
pub fn rarely(u: &mut Unstructured<'_>, n: u32) -> Result<bool> {
    Ok(n <= 1 || u.int_in_range(0..=n - 1)? == n - 1)
}
