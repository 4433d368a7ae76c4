//! Fuzz target `permute`: `permute`, `gather_f32`, `gather_bf16` and `combine` on
//! arbitrary routings (ids in and out of range, wrong lengths, empty batches).
//!
//! Oracle: an error exactly when a length is wrong or an id is out of range (naming the
//! token); otherwise offsets monotone from 0 to `T * slots_per_token` with each expert's count,
//! `row_pairs` and `pair_rows` inverse permutations (both compositions the identity),
//! each expert's rows holding its pairs in ascending order (stable), the gathers copying
//! (bf16: rounding exactly as `half::bf16::from_f32`) the token row of every permuted
//! row, and `combine` equal bit for bit to the plain per-token sum in slot order. A
//! corrupted copy of the permutation (entries out of range, rows swapped, offsets moved,
//! lengths or slot counts changed) is an error in `gather`/`combine` exactly when
//! `Permutation::validate` rejects it, never a panic.
#![no_main]

use arbitrary::{Result, Unstructured};
use dots_moe::moe::{Permutation, combine, gather_bf16, gather_f32, permute};
use dots_moe::{MoeError, TensorView};
use dots_moe_fuzz::alloc_guard::Limit;
use dots_moe_fuzz::values::{any_f32, rarely, small_len};
use half::bf16;
use libfuzzer_sys::fuzz_target;

/// A change to a valid permutation, as a GPU bug or a careless engine might make one.
#[derive(Clone, Copy, Debug)]
enum Corruption {
    None,
    PairRow(usize, u32),
    RowPair(usize, u32),
    Offset(usize, u32),
    SwapRows(usize, usize),
    TruncatePairRows,
    Slots(usize),
    Tokens(usize),
}

struct Case {
    corruption: Corruption,
    tokens: usize,
    slots: usize,
    n_experts: usize,
    ids: Vec<u32>,
    hidden_size: usize,
    hidden: Vec<f32>,
    hidden_bf16: bool,
    rows: Vec<f32>,
}

fn draw(u: &mut Unstructured<'_>) -> Result<Case> {
    let tokens = small_len(u, 0, 24)?;
    let slots = small_len(u, 0, 10)?;
    let n_experts = if rarely(u, 16)? { u.int_in_range(0..=1000)? } else { small_len(u, 0, 16)? };
    let mut len = tokens * slots;
    if rarely(u, 32)? {
        len += 1;
    }
    let mut ids = Vec::with_capacity(len);
    for _ in 0..len {
        // Mostly in range; sometimes just past the end, sometimes anything.
        let id = match u.int_in_range(0u8..=31)? {
            0 => u.arbitrary()?,
            1 => n_experts as u32,
            _ => u.int_in_range(0..=n_experts.saturating_sub(1) as u32)?,
        };
        ids.push(id);
    }
    let hidden_size = small_len(u, 0, 9)?;
    let mut hidden = Vec::with_capacity(tokens * hidden_size);
    for _ in 0..tokens * hidden_size {
        hidden.push(any_f32(u)?);
    }
    let mut rows = Vec::with_capacity(len * hidden_size);
    for _ in 0..len * hidden_size {
        rows.push(any_f32(u)?);
    }
    let corruption = match u.int_in_range(0u8..=15)? {
        0 => Corruption::PairRow(u.arbitrary()?, u.arbitrary()?),
        1 => Corruption::RowPair(u.arbitrary()?, u.arbitrary()?),
        2 => Corruption::Offset(u.arbitrary()?, u.arbitrary()?),
        3 => Corruption::SwapRows(u.arbitrary()?, u.arbitrary()?),
        4 => Corruption::TruncatePairRows,
        5 => Corruption::Slots(u.int_in_range(0..=12)?),
        6 => Corruption::Tokens(u.int_in_range(0..=30)?),
        _ => Corruption::None,
    };
    Ok(Case { corruption, tokens, slots, n_experts, ids, hidden_size, hidden, hidden_bf16: u.arbitrary()?, rows })
}

/// A corrupted copy of `perm`: `validate` decides, and every step taking a permutation
/// must agree with it (an error when invalid, success when still valid), never panic.
fn check_corrupted(perm: &Permutation, corruption: Corruption, h: usize, hidden: TensorView<'_>, rows: &[f32]) {
    let mut bad = perm.clone();
    let pick = |i: usize, len: usize| if len == 0 { None } else { Some(i % len) };
    match corruption {
        Corruption::None => return,
        Corruption::PairRow(i, v) => match pick(i, bad.pair_rows.len()) {
            Some(i) => bad.pair_rows[i] = v % (bad.pair_rows.len() as u32 + 2),
            None => return,
        },
        Corruption::RowPair(i, v) => match pick(i, bad.row_pairs.len()) {
            Some(i) => bad.row_pairs[i] = v % (bad.row_pairs.len() as u32 + 2),
            None => return,
        },
        Corruption::Offset(i, v) => match pick(i, bad.expert_offsets.len()) {
            Some(i) => bad.expert_offsets[i] = v % (bad.row_pairs.len() as u32 + 2),
            None => return,
        },
        Corruption::SwapRows(a, b) => match (pick(a, bad.row_pairs.len()), pick(b, bad.row_pairs.len())) {
            (Some(a), Some(b)) => bad.row_pairs.swap(a, b),
            _ => return,
        },
        Corruption::TruncatePairRows => {
            bad.pair_rows.pop();
        }
        Corruption::Slots(s) => bad.slots_per_token = s,
        Corruption::Tokens(t) => bad.tokens = t,
    }
    let valid = bad.validate().is_ok();
    let mut out = vec![0.0f32; bad.rows() * h];
    let gathered =
        if hidden.len() == bad.tokens * h { Some(gather_f32(hidden, h, &bad, &mut out).is_ok()) } else { None };
    let mut combined = vec![0.0f32; bad.tokens * h];
    let combine_ok =
        if rows.len() == bad.rows() * h { Some(combine(rows, h, &bad, &mut combined).is_ok()) } else { None };
    for (step, ok) in [("gather_f32", gathered), ("combine", combine_ok)] {
        if let Some(ok) = ok {
            assert_eq!(ok, valid, "{step} on {corruption:?}: ok = {ok}, validate says {valid}");
        }
    }
}

fn same_bits(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits()
}

fn check(case: &Case) {
    let Case { corruption, tokens, slots, n_experts, ids, hidden_size, hidden, hidden_bf16, rows } = case;
    let (t_count, s, e, h) = (*tokens, *slots, *n_experts, *hidden_size);
    let input_bytes = 4 * (ids.len() + hidden.len() + rows.len()) + 4 * e;
    let _limit = Limit::proportional(input_bytes, 8, 64 << 10);

    let result = permute(ids, t_count, s, e);
    if ids.len() != t_count * s {
        assert!(matches!(result, Err(MoeError::Shape { .. })), "wrong length gave {result:?}");
        return;
    }
    if let Some(p) = ids.iter().position(|&id| id as usize >= e) {
        let t = p / s.max(1);
        assert!(
            matches!(result, Err(MoeError::BadRouting { token, .. }) if token == t),
            "bad id at pair {p} gave {result:?}"
        );
        return;
    }
    let perm = match result {
        Ok(p) => p,
        Err(err) => panic!("valid routing rejected: {err}"),
    };
    let pairs = t_count * s;

    // Offsets: [E + 1], from 0 to T * slots_per_token, each expert's count apart.
    assert_eq!(perm.expert_offsets.len(), e + 1);
    assert_eq!(perm.n_slots(), e);
    assert_eq!(perm.expert_offsets[0], 0);
    assert_eq!(perm.expert_offsets[e] as usize, pairs);
    for x in 0..e {
        let count = ids.iter().filter(|&&id| id as usize == x).count();
        assert_eq!(perm.expert_rows(x).len(), count, "expert {x}: offsets disagree with its count");
    }
    // Inverse permutations: both compositions are the identity.
    assert_eq!((perm.rows(), perm.pair_rows.len()), (pairs, pairs));
    for r in 0..pairs {
        assert_eq!(perm.pair_rows[perm.row_pairs[r] as usize] as usize, r, "pair_rows . row_pairs != id at row {r}");
    }
    for p in 0..pairs {
        assert_eq!(perm.row_pairs[perm.pair_rows[p] as usize] as usize, p, "row_pairs . pair_rows != id at pair {p}");
    }
    // Each expert's rows hold exactly its pairs, in ascending pair order.
    for x in 0..e {
        let range = perm.expert_rows(x);
        for r in range.clone() {
            assert_eq!(ids[perm.row_pairs[r] as usize] as usize, x, "row {r} in expert {x}'s range");
            assert_eq!(perm.row_token(r), perm.row_pairs[r] as usize / s);
        }
        for r in range.start + 1..range.end {
            assert!(perm.row_pairs[r - 1] < perm.row_pairs[r], "expert {x}: not stable at row {r}");
        }
    }

    // Gathers.
    let hidden_bf16_values: Vec<bf16> = hidden.iter().map(|&v| bf16::from_f32(v)).collect();
    let view = if *hidden_bf16 { TensorView::Bf16(&hidden_bf16_values) } else { TensorView::F32(hidden) };
    let mut out = vec![0.0f32; pairs * h];
    gather_f32(view, h, &perm, &mut out).expect("gather_f32 on matching shapes");
    let mut out16 = vec![bf16::ZERO; pairs * h];
    gather_bf16(view, h, &perm, &mut out16).expect("gather_bf16 on matching shapes");
    for r in 0..pairs {
        let t = perm.row_token(r);
        for c in 0..h {
            let (want32, want16) = if *hidden_bf16 {
                (hidden_bf16_values[t * h + c].to_f32(), hidden_bf16_values[t * h + c])
            } else {
                (hidden[t * h + c], bf16::from_f32(hidden[t * h + c]))
            };
            assert!(same_bits(out[r * h + c], want32), "gather_f32 row {r} col {c}: {} vs {want32}", out[r * h + c]);
            assert_eq!(
                out16[r * h + c].to_bits(),
                want16.to_bits(),
                "gather_bf16 row {r} col {c}: {} vs {want16}",
                out16[r * h + c]
            );
        }
    }
    if h > 0 {
        let mut short = vec![0.0f32; (pairs * h).saturating_sub(1)];
        assert!(gather_f32(view, h, &perm, &mut short).is_err() || pairs == 0);
    }

    perm.validate().expect("what permute makes is valid");
    check_corrupted(&perm, *corruption, h, view, rows);

    // Combine: the plain per-token sum of its rows, in slot order.
    let mut combined = vec![0.0f32; t_count * h];
    combine(rows, h, &perm, &mut combined).expect("combine on matching shapes");
    for t in 0..t_count {
        for c in 0..h {
            let mut want = 0.0f32;
            for j in 0..s {
                want += rows[perm.pair_rows[t * s + j] as usize * h + c];
            }
            let got = combined[t * h + c];
            assert!(
                same_bits(got, want) || (got.is_nan() && want.is_nan()),
                "combine token {t} col {c}: {got} vs {want}"
            );
        }
    }
    if h > 0 && t_count > 0 {
        let mut wrong = vec![0.0f32; t_count * h + 1];
        assert!(combine(rows, h, &perm, &mut wrong).is_err());
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if let Ok(case) = draw(&mut u) {
        check(&case);
    }
});
