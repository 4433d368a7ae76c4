//! Fuzz target `moe_layer`: a whole MoE layer (built with `MoeLayerBuilder`, per-expert
//! tensors in either dtype) on small random shapes, every precision and CPU ISA.
//!
//! Oracle: the layer output equals the plain per-token loop written here (route with the
//! reference router, then `sum_j w_j * down(silu(gate x) * up x)` over the routed choices
//! plus the shared slots), within f32 rounding of the down projection; the routing is
//! equal to the reference bit for bit (inputs are small dyadic values, so every router
//! logit is exact whatever the summation order); the trace's slots and permutation are
//! consistent; each token run alone gives its batch row bit for bit, and a second run
//! the same bits. A non-finite hidden value is a `NonFiniteLogit` error naming its token;
//! an invalid config or a missing or misshapen tensor is a typed error.
#![no_main]

use arbitrary::{Result, Unstructured};
use dots_moe::cpu::Isa;
use dots_moe::moe::{MoeLayer, MoeLayerBuilder, Precision};
use dots_moe::{Dtype, MoeConfig, MoeError, RouterConfig, Scoring, TensorView};
use dots_moe_fuzz::alloc_guard::Limit;
use dots_moe::moe::reference::{route_token, router_config_is_valid};
use dots_moe_fuzz::values::{EDGE_F32, dyadic, rarely, small_len};
use half::bf16;
use libfuzzer_sys::fuzz_target;

/// What goes wrong on purpose while building, if anything.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mishap {
    None,
    SkipExpert(usize),
    ExpertOutOfRange,
    MisshapenGate,
    SkipShared,
}

struct Case {
    cfg: MoeConfig,
    weight_dtype: Dtype,
    precision: Precision,
    isa: Isa,
    tokens: usize,
    hidden: Vec<f32>,
    hidden_bf16: bool,
    /// Per tensor: pass it to the builder as bf16 (else f32).
    input_bf16: Vec<bool>,
    /// Router gate `[E, H]`, bias `[E]`, experts' gate/up `[I, H]` and down `[H, I]`,
    /// shared gate/up `[n_shared*I, H]` and down `[H, n_shared*I]`: all dyadic.
    gate: Vec<f32>,
    bias: Option<Vec<f32>>,
    experts: Vec<[Vec<f32>; 3]>,
    shared: [Vec<f32>; 3],
    mishap: Mishap,
}

/// A xorshift stream of dyadic weights, so large tensors need few fuzzer bytes.
struct Weights(u64);

impl Weights {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) % 32) as f32 / 8.0 - 2.0
    }
    fn tensor(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn draw(u: &mut Unstructured<'_>) -> Result<Case> {
    let n_experts = small_len(u, 1, 8)?;
    let n_shared = u.int_in_range(0..=2)?;
    let (mut h, mut i) = (small_len(u, 1, 12)?, small_len(u, 1, 8)?);
    if rarely(u, 8)? {
        // Cross the task blocks (UP_BLOCK = 128 intermediate, DOWN_BLOCK = 256 hidden).
        h = u.int_in_range(1..=280)?;
        i = u.int_in_range(1..=140)?;
        while (n_experts + n_shared) * 3 * i * h > 40_000 {
            i = i.div_ceil(2);
            h = h.div_ceil(2);
        }
    }
    let top_k = u.int_in_range(1..=n_experts)?;
    let divisors: Vec<usize> = (1..=n_experts).filter(|d| n_experts % d == 0).collect();
    let n_group = *u.choose(&divisors)?;
    let topk_group = u.int_in_range(1..=n_group)?;
    let router = RouterConfig {
        n_experts,
        top_k,
        n_group,
        topk_group,
        scoring: if u.ratio(3u8, 4)? { Scoring::Sigmoid } else { Scoring::Softmax },
        norm_topk_prob: u.ratio(3u8, 4)?,
        routed_scaling_factor: *u.choose(&[2.5f32, 1.0, 0.5, 0.0, -1.0])?,
    };
    let cfg = MoeConfig { hidden_size: h, moe_intermediate_size: i, n_shared_experts: n_shared, router };

    let weight_dtype = if u.arbitrary()? { Dtype::Bf16 } else { Dtype::F32 };
    let precision = if u.arbitrary()? { Precision::Bf16 } else { Precision::F32 };
    let isa = *u.choose(&Isa::supported())?;
    let tokens = small_len(u, 0, 12)?;
    let mut hidden = Vec::with_capacity(tokens * h);
    for _ in 0..tokens * h {
        hidden.push(if rarely(u, 200)? { *u.choose(&EDGE_F32[17..])? } else { dyadic(u)? });
    }
    let bias = if u.arbitrary()? {
        let mut b = Vec::with_capacity(n_experts);
        for _ in 0..n_experts {
            b.push(dyadic(u)? / 4.0);
        }
        Some(b)
    } else {
        None
    };
    let mut stream = Weights(u.arbitrary::<u64>()? | 1);
    let gate = stream.tensor(n_experts * h);
    let experts = (0..n_experts).map(|_| [stream.tensor(i * h), stream.tensor(i * h), stream.tensor(h * i)]).collect();
    let shared = [stream.tensor(n_shared * i * h), stream.tensor(n_shared * i * h), stream.tensor(h * n_shared * i)];
    let mut input_bf16 = Vec::new();
    for _ in 0..(2 + 3 * n_experts + 3) {
        input_bf16.push(u.arbitrary()?);
    }
    let mishap = match u.int_in_range(0u8..=63)? {
        0 => Mishap::SkipExpert(u.int_in_range(0..=n_experts - 1)?),
        1 => Mishap::ExpertOutOfRange,
        2 => Mishap::MisshapenGate,
        3 => Mishap::SkipShared,
        _ => Mishap::None,
    };
    Ok(Case {
        cfg,
        weight_dtype,
        precision,
        isa,
        tokens,
        hidden,
        hidden_bf16: u.arbitrary()?,
        input_bf16,
        gate,
        bias,
        experts,
        shared,
        mishap,
    })
}

/// A view of `values` in f32 or (exactly, they are dyadic) bf16, kept alive by `store`.
fn view<'a>(values: &'a [f32], as_bf16: bool, store: &'a mut Vec<bf16>) -> TensorView<'a> {
    if as_bf16 {
        *store = values.iter().map(|&v| bf16::from_f32(v)).collect();
        TensorView::Bf16(store)
    } else {
        TensorView::F32(values)
    }
}

/// Builds the layer as the case says; `Err` carries the builder's error.
fn build(case: &Case) -> std::result::Result<MoeLayer, MoeError> {
    let cfg = &case.cfg;
    let (h, i, e) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.router.n_experts);
    let mut b = MoeLayerBuilder::new(cfg.clone(), case.weight_dtype)?;
    let flags = &case.input_bf16;
    let (mut s0, mut s1, mut s2) = (Vec::new(), Vec::new(), Vec::new());
    let gate = if case.mishap == Mishap::MisshapenGate { &case.gate[1..] } else { &case.gate[..] };
    let bias_store = case.bias.as_ref().map(|v| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>());
    let bias = match (&case.bias, &bias_store) {
        (Some(_), Some(b16)) if flags[1] => Some(TensorView::Bf16(b16)),
        (Some(b), _) => Some(TensorView::F32(b)),
        _ => None,
    };
    b.router(view(gate, flags[0], &mut s0), bias)?;
    // Experts in reverse order: the builder must not care.
    for x in (0..e).rev() {
        if case.mishap == Mishap::SkipExpert(x) {
            continue;
        }
        let [g, u, d] = &case.experts[x];
        let f = &flags[2 + 3 * x..5 + 3 * x];
        b.expert(x, view(g, f[0], &mut s0), view(u, f[1], &mut s1), view(d, f[2], &mut s2))?;
    }
    if case.mishap == Mishap::ExpertOutOfRange {
        let [g, u, d] = &case.experts[0];
        b.expert(e, TensorView::F32(g), TensorView::F32(u), TensorView::F32(d))?;
    }
    if case.mishap != Mishap::SkipShared && cfg.n_shared_experts > 0 {
        let [g, u, d] = &case.shared;
        let f = &flags[2 + 3 * e..5 + 3 * e];
        b.shared(view(g, f[0], &mut s0), view(u, f[1], &mut s1), view(d, f[2], &mut s2))?;
    }
    debug_assert!(h * i > 0);
    b.build()
}

/// The plain per-token loop: output row `[H]` (f64) and its magnitude for the tolerance,
/// plus the reference routing of the token.
fn reference_token(case: &Case, x: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<u32>, Vec<f32>) {
    let cfg = &case.cfg;
    let (h, i, e) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.router.n_experts);
    // Exact: dyadic values, so the order of the sum does not matter.
    let logits: Vec<f32> = (0..e)
        .map(|x_e| {
            let mut acc = 0.0f32;
            for c in 0..h {
                acc += x[c] * case.gate[x_e * h + c];
            }
            acc
        })
        .collect();
    let routed = route_token(&cfg.router, &logits, case.bias.as_deref());
    let round = |v: f32| if case.precision == Precision::Bf16 { bf16::from_f32(v).to_f32() } else { v };
    let xr: Vec<f32> = x.iter().map(|&v| round(v)).collect();

    let mut out = vec![0.0f64; h];
    let mut magnitude = vec![0.0f64; h];
    let mut run = |weight: f32, gate: &[f32], up: &[f32], down: &[f32], ld: usize, col0: usize| {
        let a: Vec<f32> = (0..i)
            .map(|r| {
                let (mut g, mut u) = (0.0f32, 0.0f32);
                for c in 0..h {
                    g += xr[c] * gate[r * h + c];
                    u += xr[c] * up[r * h + c];
                }
                // The contract's SwiGLU, in f32: g / (1 + exp(-g)) * u.
                round(g / (1.0 + (-g).exp()) * u)
            })
            .collect();
        for c in 0..h {
            let (mut y, mut m) = (0.0f64, 0.0f64);
            for r in 0..i {
                let term = f64::from(a[r]) * f64::from(down[c * ld + col0 + r]);
                y += term;
                m += term.abs();
            }
            out[c] += f64::from(weight) * y;
            magnitude[c] += f64::from(weight).abs() * m;
        }
    };
    for (&id, &w) in routed.ids.iter().zip(&routed.weights) {
        let [g, u, d] = &case.experts[id as usize];
        run(w, g, u, d, i, 0);
    }
    let s = cfg.n_shared_experts;
    for half in 0..s {
        let [g, u, d] = &case.shared;
        run(1.0, &g[half * i * h..(half + 1) * i * h], &u[half * i * h..(half + 1) * i * h], d, s * i, half * i);
    }
    (out, magnitude, routed.ids, routed.weights)
}

fn check(case: &Case) {
    let cfg = &case.cfg;
    let (h, t_count) = (cfg.hidden_size, case.tokens);
    let weight_elems = cfg.n_slots() * 3 * cfg.moe_intermediate_size * h + cfg.router.n_experts * h;
    let input_bytes = 4 * (weight_elems + case.hidden.len() + h * cfg.slots_per_token() * t_count);
    let _limit = Limit::proportional(input_bytes, 8, 256 << 10);

    let built = build(case);
    if !router_config_is_valid(&cfg.router) {
        assert!(matches!(built, Err(MoeError::Config(_))), "invalid config {cfg:?} gave {built:?}");
        return;
    }
    let expect_missing =
        matches!(case.mishap, Mishap::SkipExpert(_)) || (case.mishap == Mishap::SkipShared && cfg.n_shared_experts > 0);
    let mut layer = match (built, case.mishap) {
        (Err(MoeError::Shape { .. }), Mishap::MisshapenGate) => return,
        (Err(MoeError::MissingWeights(_)), Mishap::ExpertOutOfRange) => return,
        (Err(MoeError::MissingWeights(_)), _) if expect_missing => return,
        (Ok(layer), m) if m == Mishap::None || (m == Mishap::SkipShared && cfg.n_shared_experts == 0) => layer,
        (other, m) => panic!("builder with mishap {m:?} gave {other:?}"),
    };
    layer.set_precision(case.precision);
    layer.set_isa(case.isa).expect("a supported ISA");

    let hidden16: Vec<bf16> = case.hidden.iter().map(|&v| bf16::from_f32(v)).collect();
    let hidden = if case.hidden_bf16 { TensorView::Bf16(&hidden16) } else { TensorView::F32(&case.hidden) };
    let result = layer.forward_trace(hidden, t_count);

    if let Some(p) = case.hidden.iter().position(|v| !v.is_finite()) {
        let t = p / h;
        assert!(
            matches!(result, Err(MoeError::NonFiniteLogit { token, .. }) if token == t),
            "non-finite hidden in token {t} gave {result:?}"
        );
        return;
    }
    let trace = match result {
        Ok(trace) => trace,
        Err(err) => panic!("valid layer and input rejected: {err}"),
    };
    let (k, s, e) = (cfg.router.top_k, cfg.n_shared_experts, cfg.router.n_experts);
    let slots = k + s;
    assert_eq!(trace.output.len(), t_count * h);
    assert_eq!(trace.slot_ids.len(), t_count * slots);
    assert_eq!(trace.permutation.rows(), t_count * slots);
    for p in 0..t_count * slots {
        let row = trace.permutation.pair_rows[p] as usize;
        assert_eq!(trace.permutation.row_pairs[row] as usize, p, "permutation not inverse at pair {p}");
    }

    for t in 0..t_count {
        let x = &case.hidden[t * h..(t + 1) * h];
        let (want, magnitude, ids, weights) = reference_token(case, x);
        assert_eq!(trace.routing.ids(t), &ids[..], "token {t}: routing differs from the reference");
        let bits = |w: &[f32]| w.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(trace.routing.token_weights(t)), bits(&weights), "token {t}: routing weights differ");
        for j in 0..s {
            assert_eq!(trace.slot_ids[t * slots + k + j] as usize, e + j, "token {t}: shared slot {j}");
            assert_eq!(trace.slot_weights[t * slots + k + j], 1.0, "token {t}: shared slot weight");
        }
        for c in 0..h {
            let got = f64::from(trace.output[t * h + c]);
            let tolerance = 1e-4 * magnitude[c] + 1e-30;
            assert!(
                (got - want[c]).abs() <= tolerance,
                "token {t} col {c}: layer {got} vs per-token loop {} (tolerance {tolerance}); {cfg:?} {:?} {:?}",
                want[c],
                case.precision,
                case.isa
            );
        }
    }

    // Deterministic, and a token's output does not depend on the rest of its batch.
    let again = layer.forward(hidden, t_count).expect("second run");
    let bits = |w: &[f32]| w.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&again), bits(&trace.output), "two runs differ");
    if t_count > 1 {
        for t in 0..t_count {
            let alone = layer.forward(hidden.slice(t * h..(t + 1) * h), 1).expect("one token");
            assert_eq!(
                bits(&alone),
                bits(&trace.output[t * h..(t + 1) * h]),
                "token {t} alone differs from its batch row"
            );
        }
    }
    // A wrong hidden length is a shape error, not a panic.
    assert!(layer.forward(hidden, t_count + 1).is_err());
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if let Ok(case) = draw(&mut u) {
        check(&case);
    }
});
