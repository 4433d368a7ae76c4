//! The bf16 compute mode (`LoadOptions::precision = Precision::Bf16`) against transformers
//! 4.57.6 run in bf16 (`from_pretrained(dtype=torch.bfloat16)`) on the committed fixtures:
//! full-pass logits within [`BF16_TOLERANCE`], greedy tokens equal wherever transformers'
//! top-2 gap leaves room for that error, and the mode's own invariants (deterministic,
//! every token's logits independent of the batch it runs in, cached decode equal to the
//! full pass). Fixtures: `expected_bf16.{json,safetensors}` beside each model, written by
//! `scripts/golden/make_fixtures.py --bf16-only`.

mod support;

use dots_moe::model::{Dots1Model, GenerateOptions, LoadOptions, LogitsFor, Precision, SamplingParams, generate};
use serde::Deserialize;
use support::model::{FIXTURES, expected, expected_logits, fixture, read_f32, relative_error};

/// Largest `max |logit - transformers bf16| / max |logit|` allowed.
///
/// Both sides round every product input to bf16 (8 significant bits: a relative step of
/// 2^-8 = 3.9e-3), but not at the same places: transformers also keeps the residual
/// stream, the norm outputs, the softmax probabilities and the logits in bf16, where
/// dots-moe keeps f32. transformers' own bf16 logits are 1.2-2.4e-2 (relative) away
/// from its f32 logits on these fixtures (`logit_error_vs_f32` in expected_bf16.json), so
/// two bf16 computations that round differently can be about that far apart; measured
/// (printed by the test): 0.9-2.1e-2 from transformers in bf16, 0.6-1.6e-2 from
/// transformers in f32. 3e-2 is the bf16 rounding's reach on these models, not more: a
/// wrong mask, a dropped rescale or a dropped layer is far outside it, and
/// `bf16_mode_is_not_f32` checks that the mode's rounding is visible (above 1e-3).
const BF16_TOLERANCE: f32 = 3e-2;

#[derive(Deserialize)]
struct ExpectedBf16 {
    greedy_tokens: Vec<u32>,
    greedy_top2_gaps: Vec<f32>,
    logit_error_vs_f32: f32,
}

fn expected_bf16(name: &str) -> ExpectedBf16 {
    let text = std::fs::read_to_string(fixture(name).join("expected_bf16.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(name: &str, precision: Precision) -> Dots1Model {
    Dots1Model::load_with(&fixture(name), LoadOptions { progress: None, precision })
        .unwrap_or_else(|e| panic!("loading fixture {name}: {e}"))
}

#[test]
fn bf16_logits_match_transformers_in_bf16() {
    for name in FIXTURES {
        let model = load(name, Precision::Bf16);
        assert_eq!(model.precision(), Precision::Bf16);
        let exp = expected(name);
        let (shape, want) = read_f32(&fixture(name).join("expected_bf16.safetensors"), "logits");
        assert_eq!(shape, vec![exp.prompt_tokens.len(), model.config().vocab_size]);
        let got = model.logits(&exp.prompt_tokens).unwrap();
        let err = relative_error(&got, &want);
        let (_, f32_want) = expected_logits(name);
        let err_f32 = relative_error(&got, &f32_want);
        eprintln!(
            "{name}: bf16 mode vs transformers bf16 {err:.3e}, vs transformers f32 {err_f32:.3e} \
             (transformers bf16 vs f32: {:.3e})",
            expected_bf16(name).logit_error_vs_f32
        );
        assert!(err <= BF16_TOLERANCE, "{name}: relative logit error {err:e} > {BF16_TOLERANCE:e}");
        assert!(err_f32 <= BF16_TOLERANCE, "{name}: bf16 mode is {err_f32:e} from the f32 reference");
    }
}

#[test]
fn bf16_greedy_tokens_match_transformers_where_the_gap_is_clear() {
    let mut compared = 0;
    for name in FIXTURES {
        let model = load(name, Precision::Bf16);
        let exp = expected(name);
        let want = expected_bf16(name);
        let options = GenerateOptions {
            max_new_tokens: want.greedy_tokens.len(),
            sampling: SamplingParams::greedy(),
            stop_ids: Vec::new(),
        };
        let out = generate(&model, &exp.prompt_tokens, &options, |_| Ok(())).unwrap();
        assert_eq!(out.tokens.len(), want.greedy_tokens.len());
        // Each side's logits are within BF16_TOLERANCE (relative to the row's largest) of
        // the exact ones' neighbourhood, so the choice is certain to agree when the two
        // best are more than twice that apart. Once a step may differ, so may the rest.
        for (step, ((&got, &wanted), &gap)) in
            out.tokens.iter().zip(&want.greedy_tokens).zip(&want.greedy_top2_gaps).enumerate()
        {
            if gap <= 2.0 * BF16_TOLERANCE {
                if got != wanted {
                    eprintln!("{name}: step {step} differs with a top-2 gap of {gap:.2e}; the rest is not compared");
                    break;
                }
                continue;
            }
            assert_eq!(got, wanted, "{name}: greedy step {step} differs (top-2 gap {gap:.2e})");
            compared += 1;
        }
    }
    assert!(compared >= 10, "only {compared} greedy steps had a clear gap: the test would say little");
}

#[test]
fn bf16_mode_is_deterministic() {
    for name in FIXTURES {
        let model = load(name, Precision::Bf16);
        let tokens = expected(name).prompt_tokens;
        let a = model.logits(&tokens).unwrap();
        let b = load(name, Precision::Bf16).logits(&tokens).unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name}: two runs differ");
    }
}

#[test]
fn bf16_logits_of_a_token_do_not_depend_on_the_batch() {
    // The MoE layer groups the rows of a batch by expert, the linear layers and attention
    // tile them: none of that may change a token's result. A prefix alone gives the same
    // bits as the same rows inside the longer batch (causal: later tokens cannot matter).
    for name in FIXTURES {
        let model = load(name, Precision::Bf16);
        let exp = expected(name);
        let tokens: Vec<u32> = exp.prompt_tokens.iter().chain(&expected_bf16(name).greedy_tokens).copied().collect();
        let vocab = model.config().vocab_size;
        let full = model.logits(&tokens).unwrap();
        for n in [1, 3, tokens.len() / 2, tokens.len() - 1] {
            let part = model.logits(&tokens[..n]).unwrap();
            assert!(
                part.iter().zip(&full[..n * vocab]).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name}: the first {n} tokens alone differ from the same rows of the whole batch"
            );
        }
    }
}

#[test]
fn bf16_cached_decode_equals_full_pass() {
    for name in FIXTURES {
        let model = load(name, Precision::Bf16);
        let exp = expected(name);
        let tokens: Vec<u32> = exp.prompt_tokens.iter().chain(&expected_bf16(name).greedy_tokens).copied().collect();
        let full = model.logits(&tokens).unwrap();
        let vocab = model.config().vocab_size;
        let split = tokens.len() / 2;
        let mut cache = model.new_cache();
        let prefill = model.forward(&tokens[..split], &mut cache, LogitsFor::All).unwrap();
        assert_eq!(prefill, full[..split * vocab], "{name}: prefill differs from the full pass");
        for (pos, &token) in tokens.iter().enumerate().skip(split) {
            let step = model.forward(&[token], &mut cache, LogitsFor::Last).unwrap();
            assert_eq!(step, full[pos * vocab..(pos + 1) * vocab], "{name}: decode step at position {pos} differs");
        }
    }
}

#[test]
fn bf16_mode_is_not_f32() {
    // The rounding must really happen: the bf16 mode's logits differ visibly from the f32
    // reference's, while both stay close to transformers.
    for name in FIXTURES {
        let tokens = expected(name).prompt_tokens;
        let f32_logits = load(name, Precision::F32).logits(&tokens).unwrap();
        let bf16_logits = load(name, Precision::Bf16).logits(&tokens).unwrap();
        let diff = relative_error(&bf16_logits, &f32_logits);
        assert!(diff > 1e-3, "{name}: bf16 mode within {diff:e} of f32: are the inputs rounded?");
    }
}

#[test]
fn bf16_mode_copies_no_weight_of_a_bf16_checkpoint() {
    // Only the MoE experts go into their fused layout, as in f32 mode: attention, the
    // dense MLP and lm_head are used in place (no f32 copy, no copy at all).
    for name in ["bf16", "sharded"] {
        let f32_mode = load(name, Precision::F32);
        let bf16_mode = load(name, Precision::Bf16);
        assert_eq!(
            bf16_mode.load_report().copied_bytes,
            f32_mode.load_report().copied_bytes,
            "{name}: bf16 mode copied more than the MoE layout"
        );
    }
    // An f32 checkpoint is held in bf16: its copies take half the bytes of its f32 tensors.
    let f32_ckpt = load("f32", Precision::Bf16);
    let report = f32_ckpt.load_report();
    assert!(report.copied_bytes > 0 && report.copied_bytes < report.checkpoint_bytes / 2 + 1);
}
