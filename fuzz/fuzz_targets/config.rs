//! Fuzz target `config`: arbitrary bytes as `config.json` through `Dots1Config::from_json`.
//!
//! Two shapes of input, chosen by the first byte: raw text (whatever the fuzzer makes of
//! the seed configs), and a structured config whose every field the fuzzer picks from
//! edge values (0, 1, odd, huge, negative, wrong types, absent).
//!
//! Oracle: never a panic; an accepted config satisfies every invariant the model relies
//! on, checked here independently (positive sizes, divisibility, no size product past
//! `isize::MAX / 4`, a usable router when there is a MoE layer); for structured inputs,
//! the config is accepted exactly when the rules written here say it is valid, and a
//! rejection of a well-typed config names a field (`ConfigError::Invalid`).
#![no_main]

use arbitrary::{Result, Unstructured};
use dots_moe::{ConfigError, Dots1Config, Scoring};
use dots_moe_fuzz::alloc_guard::Limit;
use dots_moe::moe::reference::router_config_is_valid;
use dots_moe_fuzz::values::rarely;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

const LIMIT: u128 = (isize::MAX as u128) / 4;

/// Whether the product of `dims` is at most `LIMIT` (computed without overflow).
fn fits(dims: &[u128]) -> bool {
    dims.iter().try_fold(1u128, |acc, &d| acc.checked_mul(d)).is_some_and(|n| n <= LIMIT)
}

/// Invariants every accepted config must satisfy.
fn check_accepted(cfg: &Dots1Config) {
    cfg.validate().expect("an accepted config validates again");
    for (name, v) in [
        ("hidden_size", cfg.hidden_size),
        ("num_hidden_layers", cfg.num_hidden_layers),
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
        ("head_dim", cfg.head_dim),
        ("intermediate_size", cfg.intermediate_size),
        ("moe_intermediate_size", cfg.moe_intermediate_size),
        ("vocab_size", cfg.vocab_size),
    ] {
        assert!(v > 0, "{name} = 0 accepted");
    }
    assert_eq!(cfg.num_attention_heads % cfg.num_key_value_heads, 0, "heads not a multiple of kv heads");
    assert_eq!(cfg.head_dim % 2, 0, "odd head_dim accepted");
    assert!(cfg.first_k_dense_replace <= cfg.num_hidden_layers);
    assert!(cfg.rope_theta.is_finite() && cfg.rope_theta > 0.0);
    assert!(cfg.rms_norm_eps.is_finite() && cfg.rms_norm_eps >= 0.0);
    let (h, v, heads, d) =
        (cfg.hidden_size as u128, cfg.vocab_size as u128, cfg.num_attention_heads as u128, cfg.head_dim as u128);
    assert!(fits(&[v, h]), "embedding size overflows");
    assert!(fits(&[heads, d, h]), "attention size overflows");
    assert!(fits(&[cfg.intermediate_size as u128, h]), "dense MLP size overflows");
    if cfg.first_k_dense_replace < cfg.num_hidden_layers {
        let moe = cfg.moe();
        moe.validate().expect("the MoE shape of an accepted config validates");
        assert!(router_config_is_valid(&cfg.router), "accepted router {:?}", cfg.router);
        let slots = (cfg.router.n_experts + cfg.n_shared_experts) as u128;
        assert!(fits(&[slots, 2, cfg.moe_intermediate_size as u128, h]), "expert storage overflows");
    }
}

/// The structured fields: each present with a value the fuzzer picked, or absent.
struct Fields {
    json: Map<String, Value>,
    /// Every present value has the type serde expects (ints in usize range, ...).
    well_typed: bool,
    /// All fields the parser requires are present.
    complete: bool,
}

const REQUIRED: [&str; 8] = [
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "num_experts_per_tok",
    "vocab_size",
];
const OPTIONAL_USIZE: [&str; 6] =
    ["num_key_value_heads", "head_dim", "n_shared_experts", "n_group", "topk_group", "first_k_dense_replace"];

/// A value for a size field; clears `well_typed` unless serde reads it as a `usize`
/// (`null` reads as absent in an `Option` field: `nullable`).
fn size_value(u: &mut Unstructured<'_>, well_typed: &mut bool, nullable: bool) -> Result<Value> {
    Ok(match u.int_in_range(0u8..=15)? {
        0 => json!(0),
        1..=3 => json!(u.int_in_range(1u64..=4)?),
        4..=6 => json!(2 * u.int_in_range(1u64..=64)?),
        7 => json!(u.int_in_range(1u64..=200)?),
        8 => json!(*u.choose(&[1u64 << 31, 1 << 32, 1 << 40, 1 << 62, u64::MAX / 2 + 1, u64::MAX])?),
        9 => json!(u.arbitrary::<u64>()?),
        10 => {
            let v = u.choose(&[json!(-1), json!(1.5), json!("8"), json!(null), json!([4]), json!(true)])?.clone();
            if !(v.is_null() && nullable) {
                *well_typed = false;
            }
            v
        }
        _ => json!(*u.choose(&[4u64, 8, 16, 32, 128])?),
    })
}

fn draw(u: &mut Unstructured<'_>) -> Result<Fields> {
    let mut json = Map::new();
    let mut well_typed = true;
    let mut complete = true;
    for name in REQUIRED {
        if rarely(u, 40)? {
            complete = false;
        } else {
            json.insert(name.into(), size_value(u, &mut well_typed, false)?);
        }
    }
    for name in OPTIONAL_USIZE {
        if u.arbitrary()? {
            // `null` is fine for the Option fields, not for the defaulted ones.
            let nullable = matches!(name, "num_key_value_heads" | "head_dim" | "n_shared_experts");
            json.insert(name.into(), size_value(u, &mut well_typed, nullable)?);
        }
    }
    if u.arbitrary()? {
        let v = *u.choose(&[2.5f64, 1.0, 0.0, -1.0, 1e-30, 1e39, 3.4e38])?;
        json.insert("routed_scaling_factor".into(), json!(v));
    }
    if u.arbitrary()? {
        json.insert("norm_topk_prob".into(), json!(u.arbitrary::<bool>()?));
    }
    if u.arbitrary()? {
        json.insert("scoring_func".into(), json!(*u.choose(&["noaux_tc", "sigmoid", "softmax", "relu", ""])?));
    }
    if u.arbitrary()? {
        json.insert("topk_method".into(), json!(*u.choose(&["noaux_tc", "greedy", "group_limited_greedy", "top1"])?));
    }
    if u.arbitrary()? {
        json.insert("rope_theta".into(), json!(*u.choose(&[10_000.0f64, 1e7, 0.0, -1.0, 1e-300, 1.7e308])?));
    }
    if u.arbitrary()? {
        json.insert("rms_norm_eps".into(), json!(*u.choose(&[1e-6f64, 1e-5, 0.0, -1e-6, 1e300])?));
    }
    if u.arbitrary()? {
        json.insert("tie_word_embeddings".into(), json!(u.arbitrary::<bool>()?));
    }
    if u.arbitrary()? {
        let v = match u.int_in_range(0u8..=2)? {
            0 => json!(u.arbitrary::<u32>()?),
            1 => json!([u.arbitrary::<u32>()?, u.arbitrary::<u32>()?]),
            _ => {
                well_typed = false;
                json!(-5)
            }
        };
        json.insert("eos_token_id".into(), v);
    }
    Ok(Fields { json, well_typed, complete })
}

fn get(json: &Map<String, Value>, name: &str) -> Option<u64> {
    json.get(name).and_then(Value::as_u64)
}

/// Whether a complete, well-typed structured config is valid, by the rules of docs/model.md
/// and src/config.rs, written out independently.
fn expected_valid(json: &Map<String, Value>) -> bool {
    let f = |name: &str| get(json, name).map(u128::from);
    let (Some(h), Some(layers), Some(heads), Some(inter), Some(moe_i), Some(e), Some(k), Some(vocab)) = (
        f("hidden_size"),
        f("num_hidden_layers"),
        f("num_attention_heads"),
        f("intermediate_size"),
        f("moe_intermediate_size"),
        f("n_routed_experts"),
        f("num_experts_per_tok"),
        f("vocab_size"),
    ) else {
        return false;
    };
    let scoring = json.get("scoring_func").and_then(Value::as_str).unwrap_or("noaux_tc");
    if !matches!(scoring, "noaux_tc" | "sigmoid" | "softmax") {
        return false;
    }
    if let Some(m) = json.get("topk_method").and_then(Value::as_str) {
        if !matches!(m, "noaux_tc" | "greedy" | "group_limited_greedy") {
            return false;
        }
    }
    if heads == 0 {
        return false;
    }
    let d = match f("head_dim") {
        Some(d) => d,
        None if h % heads == 0 => h / heads,
        None => return false,
    };
    let kv = f("num_key_value_heads").unwrap_or(heads);
    let s = f("n_shared_experts").unwrap_or(0);
    let n_group = f("n_group").unwrap_or(1);
    let topk_group = f("topk_group").unwrap_or(1);
    let dense = f("first_k_dense_replace").unwrap_or(0);
    let theta = json.get("rope_theta").and_then(Value::as_f64).unwrap_or(10_000.0);
    let eps = json.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6);
    let scale = json.get("routed_scaling_factor").and_then(Value::as_f64).unwrap_or(1.0) as f32;

    if [h, layers, heads, kv, d, inter, moe_i, vocab].contains(&0) {
        return false;
    }
    if heads % kv != 0 || d % 2 != 0 || dense > layers {
        return false;
    }
    if !(theta.is_finite() && theta > 0.0) || !(eps.is_finite() && eps >= 0.0) {
        return false;
    }
    if !fits(&[vocab, h]) || !fits(&[heads, d, h]) || !fits(&[inter, h]) {
        return false;
    }
    if dense < layers {
        if !fits(&[e + s, 2, moe_i, h]) {
            return false;
        }
        let as_usize = |v: u128| usize::try_from(v).unwrap_or(usize::MAX);
        let router = dots_moe::RouterConfig {
            n_experts: as_usize(e),
            top_k: as_usize(k),
            n_group: as_usize(n_group),
            topk_group: as_usize(topk_group),
            scoring: if scoring == "softmax" { Scoring::Softmax } else { Scoring::Sigmoid },
            norm_topk_prob: true,
            routed_scaling_factor: scale,
        };
        if !router_config_is_valid(&router) {
            return false;
        }
    }
    true
}

fn run(text: &str) -> std::result::Result<Dots1Config, ConfigError> {
    // Parsing may allocate in proportion to the text, never more.
    let _limit = Limit::proportional(text.len(), 16, 64 << 10);
    Dots1Config::from_json(text)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        let text = String::from_utf8_lossy(rest);
        if let Ok(cfg) = run(&text) {
            check_accepted(&cfg);
        }
        return;
    }
    let mut u = Unstructured::new(rest);
    let Ok(fields) = draw(&mut u) else { return };
    let text = Value::Object(fields.json.clone()).to_string();
    let result = run(&text);
    if let Ok(cfg) = &result {
        check_accepted(cfg);
    }
    if fields.well_typed && fields.complete {
        let want = expected_valid(&fields.json);
        match &result {
            Ok(_) if want => {}
            Err(ConfigError::Invalid { .. }) if !want => {}
            other => panic!("config {text}\nexpected valid = {want}, got {other:?}"),
        }
    } else if let Ok(cfg) = &result {
        panic!("ill-typed or incomplete config {text} accepted: {cfg:?}");
    }
});
