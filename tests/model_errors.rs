//! Bad input: every problem is a clear error naming what is wrong, never a panic.
//! Each case starts from a scratch copy of a golden fixture and breaks one thing.

mod support;

use std::path::Path;

use dots_moe::model::{Dots1Model, ModelError};
use safetensors::{Dtype, SafeTensors};
use support::model::{Scratch, expected, expected_logits, fixture, relative_error};

type Tensor = (Dtype, Vec<usize>, Vec<u8>);

/// Rewrites `dir/file`: `edit` may change or drop each tensor; `extra` tensors are added.
fn rewrite(dir: &Path, file: &str, edit: impl Fn(&str, Tensor) -> Option<Tensor>, extra: Vec<(String, Tensor)>) {
    let path = dir.join(file);
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Tensor)> = st
        .iter()
        .filter_map(|(name, t)| {
            edit(name, (t.dtype(), t.shape().to_vec(), t.data().to_vec())).map(|t| (name.to_string(), t))
        })
        .collect();
    tensors.extend(extra);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, (dtype, shape, data))| {
            (name.clone(), safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn load_err(dir: &Path) -> ModelError {
    match Dots1Model::load(dir) {
        Ok(_) => panic!("{} loaded, but should not", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_directory_is_an_io_error() {
    let dir = Path::new("/nonexistent/dots-moe-model");
    let err = load_err(dir);
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/dots-moe-model"), "{err}");
}

#[test]
fn missing_config_and_missing_weights() {
    let s = Scratch::copy_of("bf16");
    std::fs::remove_file(s.path().join("config.json")).unwrap();
    let err = load_err(s.path());
    assert!(err.to_string().contains("config.json"), "{err}");

    let s = Scratch::copy_of("bf16");
    std::fs::remove_file(s.path().join("model.safetensors")).unwrap();
    assert!(matches!(load_err(s.path()), ModelError::NoWeights { .. }));
}

#[test]
fn truncated_and_corrupt_files_are_named() {
    let s = Scratch::copy_of("bf16");
    let path = s.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_err(s.path());
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    for garbage in [
        &b""[..],
        &b"\x05\x00"[..],
        &b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk"[..],
        &b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{"[..],
    ] {
        std::fs::write(&path, garbage).unwrap();
        let err = load_err(s.path());
        assert!(matches!(err, ModelError::Corrupt { .. }), "{garbage:?}: {err:?}");
    }
}

#[test]
fn missing_tensor_is_named_with_its_shape() {
    let s = Scratch::copy_of("bf16");
    let victim = "model.layers.2.mlp.experts.7.down_proj.weight";
    rewrite(s.path(), "model.safetensors", |name, t| (name != victim).then_some(t), vec![]);
    match load_err(s.path()) {
        ModelError::MissingTensor { name, expected, .. } => {
            assert_eq!(name, victim);
            assert_eq!(expected, vec![32, 16]);
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
}

#[test]
fn misshapen_tensor_names_expected_actual_and_file() {
    let s = Scratch::copy_of("sharded");
    // Shard 1 holds the first layers; cut one row off a q_proj there.
    let victim = "model.layers.0.self_attn.q_proj.weight";
    let index = std::fs::read_to_string(s.path().join("model.safetensors.index.json")).unwrap();
    let index: serde_json::Value = serde_json::from_str(&index).unwrap();
    let shard = index["weight_map"][victim].as_str().unwrap().to_string();
    rewrite(
        s.path(),
        &shard,
        |name, (dtype, shape, data)| {
            if name == victim {
                let row = shape[1] * 2;
                Some((dtype, vec![shape[0] - 1, shape[1]], data[..data.len() - row].to_vec()))
            } else {
                Some((dtype, shape, data))
            }
        },
        vec![],
    );
    let err = load_err(s.path());
    match &err {
        ModelError::TensorShape { name, file, expected, actual } => {
            assert_eq!(name, victim);
            assert_eq!(expected, &vec![64, 32]);
            assert_eq!(actual, &vec![63, 32]);
            assert!(file.ends_with(&shard));
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(victim) && text.contains("[64, 32]") && text.contains("[63, 32]") && text.contains(&shard),
        "{text}"
    );
}

#[test]
fn config_that_does_not_match_the_weights() {
    let s = Scratch::copy_of("f32");
    let path = s.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("\"vocab_size\": 320", "\"vocab_size\": 321");
    std::fs::write(&path, text).unwrap();
    match load_err(s.path()) {
        ModelError::TensorShape { name, expected, actual, .. } => {
            assert_eq!(name, "model.embed_tokens.weight");
            assert_eq!((expected, actual), (vec![321, 32], vec![320, 32]));
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }

    let s = Scratch::copy_of("f32");
    let path = s.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("\"n_routed_experts\": 12", "\"n_routed_experts\": 15");
    std::fs::write(&path, text).unwrap();
    let err = load_err(s.path());
    assert!(
        matches!(&err, ModelError::TensorShape { name, .. } if name == "model.layers.1.mlp.gate.weight"),
        "{err:?}"
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let s = Scratch::copy_of("bf16");
    let victim = "model.norm.weight";
    rewrite(
        s.path(),
        "model.safetensors",
        |name, (dtype, shape, data)| {
            if name == victim {
                let widened: Vec<u8> = data.chunks_exact(2).flat_map(|_| 1i32.to_le_bytes()).collect();
                Some((Dtype::I32, shape, widened))
            } else {
                Some((dtype, shape, data))
            }
        },
        vec![],
    );
    match load_err(s.path()) {
        ModelError::TensorDtype { name, dtype, .. } => assert_eq!((name.as_str(), dtype.as_str()), (victim, "I32")),
        other => panic!("expected TensorDtype, got {other:?}"),
    }
}

#[test]
fn unknown_extra_tensor_is_a_warning() {
    let s = Scratch::copy_of("bf16");
    let extra = ("model.layers.0.self_attn.rotary_emb.inv_freq".to_string(), (Dtype::F32, vec![4], vec![0u8; 16]));
    rewrite(s.path(), "model.safetensors", |_, t| Some(t), vec![extra]);
    let model = Dots1Model::load(s.path()).unwrap();
    let warnings = &model.load_report().warnings;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("rotary_emb.inv_freq"));
}

#[test]
fn broken_shard_index() {
    // A shard the index names is missing.
    let s = Scratch::copy_of("sharded");
    std::fs::remove_file(s.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_err(s.path());
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("model-00002-of-00002.safetensors"), "{err}");

    // The index places a tensor in a shard that does not hold it.
    let s = Scratch::copy_of("sharded");
    let path = s.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let first = index["weight_map"]["model.embed_tokens.weight"].as_str().unwrap().to_string();
    let other =
        if first.contains("00001") { "model-00002-of-00002.safetensors" } else { "model-00001-of-00002.safetensors" };
    index["weight_map"]["model.embed_tokens.weight"] = serde_json::Value::String(other.into());
    std::fs::write(&path, index.to_string()).unwrap();
    let err = load_err(s.path());
    assert!(err.to_string().contains("model.embed_tokens.weight"), "{err}");

    // Not JSON at all, and a shard name that leaves the directory.
    std::fs::write(&path, "{not json").unwrap();
    assert!(matches!(load_err(s.path()), ModelError::Corrupt { .. }));
    std::fs::write(&path, r#"{"weight_map": {"lm_head.weight": "../../etc/passwd"}}"#).unwrap();
    assert!(matches!(load_err(s.path()), ModelError::Corrupt { .. }));
}

#[test]
fn bad_token_ids_and_lengths() {
    let model = Dots1Model::load(&fixture("sharded")).unwrap();
    let mut cache = model.new_cache();
    model.forward(&[1, 2, 3], &mut cache, dots_moe::model::LogitsFor::Last).unwrap();
    let err = model.forward(&[4, 200, 5], &mut cache, dots_moe::model::LogitsFor::Last).unwrap_err();
    match &err {
        ModelError::TokenOutOfRange { id, position, vocab_size } => {
            assert_eq!((*id, *position, *vocab_size), (200, 1, 200))
        }
        other => panic!("expected TokenOutOfRange, got {other:?}"),
    }
    assert!(err.to_string().contains("200"));
    assert_eq!(cache.len(), 3, "a failed step must not change the cache");
    assert!(matches!(model.logits(&[]), Err(ModelError::EmptyInput)));
    // max_position_embeddings is 64 in this fixture.
    assert!(matches!(model.logits(&[1; 65]), Err(ModelError::TooLong { len: 65, max: 64 })));
    assert_eq!(model.logits(&[1; 64]).unwrap().len(), 64 * 200);
}

#[test]
fn non_finite_bias_is_rejected() {
    let s = Scratch::copy_of("f32");
    let victim = "model.layers.1.mlp.gate.e_score_correction_bias";
    rewrite(
        s.path(),
        "model.safetensors",
        |name, (dtype, shape, mut data)| {
            if name == victim {
                data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
            Some((dtype, shape, data))
        },
        vec![],
    );
    let err = load_err(s.path());
    assert!(matches!(err, ModelError::Moe(_)), "{err:?}");
}

#[test]
fn f16_checkpoint_loads_and_matches_closely() {
    let s = Scratch::copy_of("f32");
    rewrite(
        s.path(),
        "model.safetensors",
        |_, (dtype, shape, data)| {
            assert_eq!(dtype, Dtype::F32);
            let halves: Vec<u8> = data
                .chunks_exact(4)
                .flat_map(|b| half::f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes())
                .collect();
            Some((Dtype::F16, shape, halves))
        },
        vec![],
    );
    let model = Dots1Model::load(s.path()).unwrap();
    let exp = expected("f32");
    let (_, want) = expected_logits("f32");
    let got = model.logits(&exp.prompt_tokens).unwrap();
    let err = relative_error(&got, &want);
    // f16 rounding of every weight (2^-11 relative): close, not exact.
    assert!(err < 2e-2, "f16 copy of the f32 fixture: relative error {err}");
}

#[test]
fn sliding_window_config_is_refused() {
    let s = Scratch::copy_of("bf16");
    let path = s.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["layer_types"][2] = serde_json::Value::String("sliding_attention".into());
    std::fs::write(&path, config.to_string()).unwrap();
    let err = load_err(s.path());
    assert!(matches!(err, ModelError::Unsupported(_)), "{err:?}");
    assert!(err.to_string().contains("[2]"), "{err}");
}

#[test]
fn generation_checks_the_prompt_and_stops_at_the_context_limit() {
    use dots_moe::model::{GenerateOptions, SamplingParams, StopReason, generate};
    let model = Dots1Model::load(&fixture("sharded")).unwrap();
    let options = |n| GenerateOptions { max_new_tokens: n, sampling: SamplingParams::greedy(), stop_ids: vec![] };
    let err = generate(&model, &[1, 500], &options(0), |_| Ok(())).unwrap_err();
    assert!(matches!(err, ModelError::TokenOutOfRange { id: 500, .. }), "{err:?}");
    assert!(matches!(generate(&model, &[], &options(3), |_| Ok(())), Err(ModelError::EmptyInput)));
    // max_position_embeddings is 64: a 60-token prompt leaves room for 4 more positions.
    let out = generate(&model, &[7; 60], &options(10), |_| Ok(())).unwrap();
    assert_eq!(out.stop, StopReason::ContextFull);
    assert_eq!(out.tokens.len(), 5);
    // An error from the streaming callback stops generation and is returned.
    let err = generate(&model, &[7; 4], &options(10), |_| Err(ModelError::EmptyInput)).unwrap_err();
    assert!(matches!(err, ModelError::EmptyInput));
}

#[test]
fn cache_of_another_model_is_rejected() {
    let a = Dots1Model::load(&fixture("sharded")).unwrap();
    let b = Dots1Model::load(&fixture("bf16")).unwrap();
    let mut cache = b.new_cache();
    let err = a.forward(&[1, 2], &mut cache, dots_moe::model::LogitsFor::Last).unwrap_err();
    assert!(matches!(err, ModelError::CacheMismatch { .. }), "{err:?}");
    assert!(cache.is_empty());
}

#[test]
fn misaligned_tensors_are_copied_not_mapped() {
    // A hand-written file whose f32 tensor starts at byte 6 of the data: not 4-aligned.
    let s = Scratch::new("misaligned");
    let mut header =
        r#"{"a":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]},"b":{"dtype":"F32","shape":[2],"data_offsets":[6,14]}}"#
            .to_string();
    while !(8 + header.len()).is_multiple_of(8) {
        header.push(' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    for v in [1.0f32, 2.0, 3.0] {
        bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
    }
    for v in [4.5f32, -6.25] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(s.path().join("model.safetensors"), &bytes).unwrap();
    let mut ckpt = dots_moe::model::Checkpoint::open(s.path()).unwrap();
    let a = ckpt.weight("a", &[3]).unwrap();
    let b = ckpt.weight("b", &[2]).unwrap();
    assert!(a.is_mapped());
    assert!(!b.is_mapped());
    assert_eq!(ckpt.view(&a).to_f32_vec(), vec![1.0, 2.0, 3.0]);
    assert_eq!(ckpt.view(&b).to_f32_vec(), vec![4.5, -6.25]);
    assert!(matches!(ckpt.weight("b", &[3]), Err(ModelError::TensorShape { .. })));
    assert!(ckpt.unused().is_empty());
}
