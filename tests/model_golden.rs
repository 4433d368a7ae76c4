//! Golden tests against transformers 4.57.6 (`Dots1ForCausalLM`): full-pass logits, greedy
//! continuations, the router's choices in the first MoE layer, and cached decoding.
//! Fixtures: tests/fixtures/model_{f32,bf16,sharded}, written by
//! scripts/golden/make_fixtures.py. No Python is needed here.

mod support;

use dots_moe::Dtype;
use std::sync::{Arc, Mutex};

use dots_moe::model::{
    Checkpoint, Dots1Model, GenerateOptions, LoadOptions, LoadProgress, LogitsFor, ProgressFn, SamplingParams,
    StopReason, generate,
};
use support::model::{FIXTURES, expected, expected_logits, fixture, relative_error};

/// Logits within 1e-4 of the largest logit magnitude (all fixtures compute in f32).
const LOGIT_TOLERANCE: f32 = 1e-4;

fn load(name: &str) -> Dots1Model {
    Dots1Model::load(&fixture(name)).unwrap_or_else(|e| panic!("loading fixture {name}: {e}"))
}

fn check_logits(name: &str) {
    let model = load(name);
    let exp = expected(name);
    let (shape, want) = expected_logits(name);
    assert_eq!(shape, vec![exp.prompt_tokens.len(), model.config().vocab_size]);
    let got = model.logits(&exp.prompt_tokens).unwrap();
    let err = relative_error(&got, &want);
    eprintln!("{name}: max |logit - transformers| / max |logit| = {err:.3e}");
    assert!(err <= LOGIT_TOLERANCE, "{name}: relative logit error {err:e} > {LOGIT_TOLERANCE:e}");
}

#[test]
fn logits_match_transformers_f32() {
    check_logits("f32");
}

#[test]
fn logits_match_transformers_bf16() {
    check_logits("bf16");
}

#[test]
fn logits_match_transformers_sharded() {
    check_logits("sharded");
}

#[test]
fn greedy_continuations_match_transformers() {
    for name in FIXTURES {
        let model = load(name);
        let exp = expected(name);
        let options = GenerateOptions {
            max_new_tokens: exp.max_new_tokens,
            sampling: SamplingParams::greedy(),
            stop_ids: model.eos_token_ids(),
        };
        let out = generate(&model, &exp.prompt_tokens, &options, |_| Ok(())).unwrap();
        assert_eq!(out.tokens, exp.greedy_tokens, "{name}: greedy tokens differ from transformers");
        let want_stop = if exp.eos_token_id.is_some() { StopReason::Eos } else { StopReason::MaxTokens };
        assert_eq!(out.stop, want_stop, "{name}");
    }
}

#[test]
fn eos_from_generation_config_stops_generation() {
    let exp = expected("sharded");
    let eos = exp.eos_token_id.expect("the sharded fixture sets an eos id in generation_config.json");
    let model = load("sharded");
    assert!(model.eos_token_ids().contains(&eos));
    assert!(exp.greedy_tokens.len() < exp.max_new_tokens);
    assert_eq!(exp.greedy_tokens.last(), Some(&eos));
}

#[test]
fn router_ids_match_transformers() {
    for name in FIXTURES {
        let model = load(name);
        let exp = expected(name);
        let routing = model.routing(&exp.prompt_tokens, exp.router_layer).unwrap();
        assert_eq!(routing.tokens, exp.prompt_tokens.len());
        for (t, want) in exp.router_ids.iter().enumerate() {
            assert_eq!(routing.ids(t), &want[..], "{name}: token {t} routed differently");
        }
        // The fixture is only meaningful if the correction bias changes the choice.
        assert!(exp.bias_changes_choice_fraction >= 0.3, "{name}: bias too weak in the fixture");
    }
}

#[test]
fn router_of_a_dense_layer_is_an_error() {
    let model = load("sharded");
    assert!(model.routing(&[1, 2], 0).is_err());
    assert!(model.routing(&[1, 2], 99).is_err());
}

#[test]
fn cached_decode_equals_full_pass() {
    for name in FIXTURES {
        let model = load(name);
        let exp = expected(name);
        let tokens: Vec<u32> = exp.prompt_tokens.iter().chain(&exp.greedy_tokens).copied().collect();
        let full = model.logits(&tokens).unwrap();
        let vocab = model.config().vocab_size;
        let split = tokens.len() / 2;
        let mut cache = model.new_cache();
        let prefill = model.forward(&tokens[..split], &mut cache, LogitsFor::All).unwrap();
        assert_eq!(cache.len(), split);
        let err = relative_error(&prefill, &full[..split * vocab]);
        assert!(err <= 1e-5, "{name}: prefill differs from the full pass by {err:e}");
        for (pos, &token) in tokens.iter().enumerate().skip(split) {
            let step = model.forward(&[token], &mut cache, LogitsFor::Last).unwrap();
            let err = relative_error(&step, &full[pos * vocab..(pos + 1) * vocab]);
            assert!(err <= 1e-5, "{name}: decode step at position {pos} differs from the full pass by {err:e}");
        }
        assert_eq!(cache.len(), tokens.len());
    }
}

#[test]
fn last_position_logits_equal_the_last_row() {
    let model = load("f32");
    let exp = expected("f32");
    let full = model.logits(&exp.prompt_tokens).unwrap();
    let vocab = model.config().vocab_size;
    let mut cache = model.new_cache();
    let last = model.forward(&exp.prompt_tokens, &mut cache, LogitsFor::Last).unwrap();
    assert_eq!(last, full[full.len() - vocab..]);
}

#[test]
fn weights_are_mapped_in_their_dtype() {
    // bf16 fixture: bf16 weights and a bf16 bias; sharded: bf16 weights, f32 bias; f32: f32.
    let cases =
        [("bf16", Dtype::Bf16, Dtype::Bf16), ("sharded", Dtype::Bf16, Dtype::F32), ("f32", Dtype::F32, Dtype::F32)];
    for (name, weight_dtype, bias_dtype) in cases {
        let model = load(name);
        let cfg = model.config().clone();
        let mut ckpt = Checkpoint::open(&fixture(name)).unwrap();
        let q = ckpt
            .weight(
                "model.layers.0.self_attn.q_proj.weight",
                &[cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size],
            )
            .unwrap();
        assert!(q.is_mapped(), "{name}: q_proj should be used in place");
        assert_eq!(q.dtype(), weight_dtype, "{name}");
        let layer = cfg.first_k_dense_replace;
        let bias = ckpt
            .weight(&format!("model.layers.{layer}.mlp.gate.e_score_correction_bias"), &[cfg.router.n_experts])
            .unwrap();
        assert_eq!(bias.dtype(), bias_dtype, "{name}");
        assert!(model.load_report().warnings.is_empty(), "{name}: {:?}", model.load_report().warnings);
        assert!(model.load_report().copied_bytes > 0);
    }
    let sharded = Checkpoint::open(&fixture("sharded")).unwrap();
    assert_eq!(sharded.files().count(), 2);
}

#[test]
fn loading_reports_progress_per_layer_through_the_callback() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let progress: ProgressFn = Arc::new(move |p: LoadProgress| sink.lock().unwrap().push(p));
    let options = LoadOptions { progress: Some(progress), ..LoadOptions::default() };
    let model = Dots1Model::load_with(&fixture("f32"), options).unwrap();
    let layers = model.config().num_hidden_layers;
    let want: Vec<LoadProgress> = (0..=layers).map(|layers_done| LoadProgress { layers_done, layers }).collect();
    assert_eq!(*seen.lock().unwrap(), want);
}
