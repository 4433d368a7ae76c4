//! Tests of the CPU matrix kernels (`dots_moe::cpu`): every ISA this CPU supports, every
//! dtype combination, against an f64 triple loop; bit-identical batch invariance; the
//! helpers `f32_to_bf16` and `swiglu`.

use dots_moe::cpu::{ISA_ENV, Isa, f32_to_bf16, gemm_nt, par_gemm_nt, swiglu};
use dots_moe::{Dtype, TensorData, TensorView};
use half::bf16;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DTYPES: [(Dtype, Dtype); 4] =
    [(Dtype::Bf16, Dtype::Bf16), (Dtype::F32, Dtype::Bf16), (Dtype::F32, Dtype::F32), (Dtype::Bf16, Dtype::F32)];

/// `len` values uniform in [-2, 2) (bf16-rounded when `dtype` is bf16).
fn random(dtype: Dtype, len: usize, rng: &mut ChaCha8Rng) -> TensorData {
    let v: Vec<f32> = (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    match dtype {
        Dtype::F32 => TensorData::F32(v),
        Dtype::Bf16 => TensorData::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
    }
}

/// The exact dot products in f64 and the sums of |products| (for the error bound).
fn reference(a: TensorView, w: TensorView, m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut exact = vec![0.0; m * n];
    let mut abs = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            for kk in 0..k {
                let p = f64::from(a.get_f32(i * k + kk)) * f64::from(w.get_f32(j * k + kk));
                exact[i * n + j] += p;
                abs[i * n + j] += p.abs();
            }
        }
    }
    (exact, abs)
}

/// Error bound of a 16-lane f32 accumulation of `k` products: each lane adds at most
/// `ceil(k / 16)` terms, the tree 4 more levels, a product may round once (portable f32).
fn tolerance(k: usize, abs_sum: f64) -> f64 {
    let u = f64::from(f32::EPSILON) / 2.0;
    (k.div_ceil(16) + 6) as f64 * u * abs_sum + 1e-30
}

/// Runs `gemm_nt` with a padded output (`ldo = n + pad`, sentinel NaNs around).
fn run(isa: Isa, a: TensorView, w: TensorView, m: usize, n: usize, k: usize, pad: usize) -> Vec<f32> {
    let ldo = n + pad;
    let len = if m == 0 { 3 } else { (m - 1) * ldo + n + 3 };
    let mut out = vec![f32::NAN; len];
    gemm_nt(isa, a, w, m, n, k, &mut out, ldo);
    for (idx, v) in out.iter().enumerate() {
        let written = m > 0 && idx < (m - 1) * ldo + n && idx % ldo < n;
        assert_eq!(v.is_nan(), !written, "element {idx} wrongly written or left (ldo {ldo})");
    }
    (0..m * n).map(|e| out[e / n * ldo + e % n]).collect()
}

fn check_against_reference(m: usize, n: usize, k: usize, pad: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (ad, wd) in DTYPES {
        let a = random(ad, m * k, &mut rng);
        let w = random(wd, n * k, &mut rng);
        let (exact, abs) = reference(a.view(), w.view(), m, n, k);
        for isa in Isa::supported() {
            let got = run(isa, a.view(), w.view(), m, n, k, pad);
            for e in 0..m * n {
                let err = (f64::from(got[e]) - exact[e]).abs();
                let tol = tolerance(k, abs[e]);
                assert!(
                    err <= tol,
                    "{isa:?} a {ad:?} w {wd:?} m {m} n {n} k {k}: out[{}][{}] = {} vs {} (err {err:e} > tol {tol:e})",
                    e / n,
                    e % n,
                    got[e],
                    exact[e]
                );
            }
        }
    }
}

/// Every element of a batch equals, bit for bit, the element computed alone (one `a` row
/// times one `w` row), and a row alone against all of `w`.
fn check_batch_invariance(m: usize, n: usize, k: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (ad, wd) in DTYPES {
        let a = random(ad, m * k, &mut rng);
        let w = random(wd, n * k, &mut rng);
        for isa in Isa::supported() {
            let batch = run(isa, a.view(), w.view(), m, n, k, 3);
            for i in 0..m {
                let a_i = a.view().slice(i * k..(i + 1) * k);
                let row = run(isa, a_i, w.view(), 1, n, k, 0);
                for j in 0..n {
                    let w_j = w.view().slice(j * k..(j + 1) * k);
                    let alone = run(isa, a_i, w_j, 1, 1, k, 0)[0];
                    let in_batch = batch[i * n + j];
                    assert_eq!(
                        in_batch.to_bits(),
                        alone.to_bits(),
                        "{isa:?} a {ad:?} w {wd:?} m {m} n {n} k {k}: [{i}][{j}] in batch {in_batch} vs alone {alone}"
                    );
                    assert_eq!(row[j].to_bits(), alone.to_bits(), "{isa:?} row {i} alone, col {j}");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn gemm_matches_f64_reference(m in 0usize..70, n in 0usize..70, k in 0usize..70, pad in 0usize..3, seed: u64) {
        check_against_reference(m, n, k, pad, seed);
    }

    #[test]
    fn gemm_is_batch_invariant(m in 0usize..12, n in 0usize..20, k in 0usize..100, seed: u64) {
        check_batch_invariance(m, n, k, seed);
    }
}

#[test]
fn gemm_matches_reference_at_larger_sizes() {
    for (m, n, k) in [(1, 37, 4096), (9, 33, 1000), (64, 24, 513), (5, 130, 2049), (70, 9, 64)] {
        check_against_reference(m, n, k, 1, (m * n * k) as u64);
    }
}

#[test]
fn gemm_is_batch_invariant_at_larger_sizes() {
    for (m, n, k) in [(13, 19, 1057), (4, 8, 4096), (21, 3, 96)] {
        check_batch_invariance(m, n, k, k as u64);
    }
}

/// Shapes the AMX kernel takes (`k` a multiple of 32; `avx512bf16` otherwise): rows around
/// the 16-row activation blocks and the pairs of them, columns around the 16-row weight
/// tiles and the 32-column groups, a weight tile past the last row of `w`.
#[test]
fn tile_shapes_match_reference_and_are_batch_invariant() {
    for (m, n, k) in
        [(1, 16, 32), (15, 17, 64), (16, 31, 96), (17, 33, 4096), (33, 15, 128), (48, 100, 1408), (70, 48, 64)]
    {
        check_against_reference(m, n, k, 1, (m * n + k) as u64);
    }
    for (m, n, k) in [(17, 33, 64), (40, 20, 96), (3, 50, 4096)] {
        check_batch_invariance(m, n, k, (m + n + k) as u64);
    }
}

#[test]
fn empty_shapes_write_nothing() {
    for isa in Isa::supported() {
        for (ad, wd) in DTYPES {
            for (m, n, k) in [(0, 0, 0), (0, 5, 7), (5, 0, 7), (0, 0, 9)] {
                let a = TensorData::zeros(ad, m * k);
                let w = TensorData::zeros(wd, n * k);
                gemm_nt(isa, a.view(), w.view(), m, n, k, &mut [], n);
                par_gemm_nt(a.view(), w.view(), m, n, k, &mut [], n);
            }
            // k = 0: the sums are empty, every element becomes +0.
            let out = run(isa, TensorData::zeros(ad, 0).view(), TensorData::zeros(wd, 0).view(), 3, 4, 0, 1);
            assert!(out.iter().all(|v| v.to_bits() == 0), "{isa:?}: {out:?}");
        }
    }
}

#[test]
fn par_gemm_is_bit_identical_to_gemm() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (m, n, k) in [(1, 1000, 777), (8, 333, 512), (150, 70, 300), (64, 256, 129)] {
        for (ad, wd) in DTYPES {
            let a = random(ad, m * k, &mut rng);
            let w = random(wd, n * k, &mut rng);
            let ldo = n + 5;
            let mut serial = vec![0.0; m * ldo];
            let mut parallel = vec![1.0; m * ldo];
            gemm_nt(Isa::detect(), a.view(), w.view(), m, n, k, &mut serial, ldo);
            par_gemm_nt(a.view(), w.view(), m, n, k, &mut parallel, ldo);
            for i in 0..m {
                for j in 0..n {
                    let (s, p) = (serial[i * ldo + j], parallel[i * ldo + j]);
                    assert_eq!(s.to_bits(), p.to_bits(), "{ad:?} {wd:?} m {m} n {n} k {k} [{i}][{j}]");
                }
                assert!(parallel[i * ldo + n..(i + 1) * ldo].iter().all(|&v| v == 1.0));
            }
        }
    }
}

#[test]
fn isas_agree_within_rounding() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (m, n, k) = (7, 29, 3001);
    for (ad, wd) in DTYPES {
        let a = random(ad, m * k, &mut rng);
        let w = random(wd, n * k, &mut rng);
        let (_, abs) = reference(a.view(), w.view(), m, n, k);
        let portable = run(Isa::Portable, a.view(), w.view(), m, n, k, 0);
        for isa in Isa::supported() {
            let got = run(isa, a.view(), w.view(), m, n, k, 0);
            for e in 0..m * n {
                let diff = f64::from((got[e] - portable[e]).abs());
                assert!(diff <= 2.0 * tolerance(k, abs[e]), "{isa:?} vs portable: {} vs {}", got[e], portable[e]);
            }
        }
    }
}

#[test]
fn f32_a_is_not_rounded_to_bf16() {
    // a = 1 + 2^-20 is not a bf16; w = 1. Rounding a would give exactly 1.
    let a = vec![1.0 + 2f32.powi(-20); 3];
    let w = vec![bf16::ONE; 3];
    for isa in Isa::supported() {
        let out = run(isa, TensorView::F32(&a), TensorView::Bf16(&w), 1, 1, 3, 0);
        assert_eq!(out[0], 3.0 * (1.0 + 2f32.powi(-20)), "{isa:?}");
    }
}

#[test]
#[should_panic(expected = "a.len()")]
fn wrong_a_length_panics() {
    gemm_nt(Isa::Portable, TensorView::F32(&[0.0; 5]), TensorView::F32(&[0.0; 6]), 2, 2, 3, &mut [0.0; 4], 2);
}

#[test]
#[should_panic(expected = "out.len()")]
fn short_out_panics() {
    gemm_nt(Isa::Portable, TensorView::F32(&[0.0; 6]), TensorView::F32(&[0.0; 6]), 2, 2, 3, &mut [0.0; 4], 3);
}

#[test]
fn isa_detection_is_consistent() {
    let supported = Isa::supported();
    assert!(supported.contains(&Isa::Portable));
    assert!(supported.contains(&Isa::detect()));
    assert!(supported.iter().all(|isa| isa.is_supported()));
}

/// `DOTS_MOE_CPU_ISA` forces a lower ISA: the test re-runs itself in a child process
/// with the variable set (`Isa::detect` caches its answer per process).
#[test]
fn isa_env_var_forces_a_lower_isa() {
    if let Ok(forced) = std::env::var(ISA_ENV) {
        let want = match forced.as_str() {
            "portable" => Isa::Portable,
            "avx512" if Isa::Avx512.is_supported() => Isa::Avx512,
            _ => Isa::supported()[0],
        };
        assert_eq!(Isa::detect(), want, "{ISA_ENV}={forced}");
        return;
    }
    for forced in ["portable", "avx512", "bogus"] {
        let child = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["isa_env_var_forces_a_lower_isa", "--exact", "--quiet"])
            .env(ISA_ENV, forced)
            .output()
            .expect("re-run the test binary");
        let log = String::from_utf8_lossy(&child.stdout);
        assert!(child.status.success(), "child with {ISA_ENV}={forced} failed:\n{log}");
        assert!(log.contains("1 passed"), "child with {ISA_ENV}={forced} ran no test:\n{log}");
    }
}

#[test]
fn f32_to_bf16_matches_half_bit_for_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut src: Vec<f32> = [
        0.0,
        -0.0,
        1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        1e-40,
        -3e-39,
        f32::from_bits(0x7F80_0001), // signalling NaN
        f32::from_bits(0x3F80_8000), // tie, rounds to even (down)
        f32::from_bits(0x3F81_8000), // tie, rounds to even (up)
        f32::from_bits(0x3F80_8001),
        f32::from_bits(0x7F7F_FFFF),
    ]
    .to_vec();
    src.extend((0..1000).map(|_| f32::from_bits(rng.random())));
    for len in [0, 1, 15, 16, 17, src.len()] {
        let mut out = vec![bf16::ZERO; len];
        f32_to_bf16(&src[..len], &mut out);
        for (x, y) in src.iter().zip(&out) {
            assert_eq!(y.to_bits(), bf16::from_f32(*x).to_bits(), "{x:e} ({:#x})", x.to_bits());
        }
    }
}

#[test]
fn swiglu_matches_f64() {
    let gate = [-30.0f32, -2.5, -1.0, 0.0, 0.5, 3.0, 20.0, 90.0];
    let up = [1.0f32, 2.0, -0.5, 7.0, 3.0, -1.0, 0.25, 2.0];
    let mut out = [0.0; 8];
    swiglu(&gate, &up, &mut out);
    for i in 0..8 {
        let g = f64::from(gate[i]);
        let want = g / (1.0 + (-g).exp()) * f64::from(up[i]);
        assert!((f64::from(out[i]) - want).abs() <= 4e-7 * want.abs(), "{i}: {} vs {want}", out[i]);
    }
}
