//! The CLI forms other tools depend on: `dots-moe generate ... --json` and
//! `dots-moe logits ... --out FILE`, run as a user would, against the golden fixtures.

mod support;

use std::process::{Command, Output};

use support::model::{Scratch, expected, expected_logits, fixture, read_f32, relative_error};

fn dots_moe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dots-moe")).args(args).output().unwrap()
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "--json prints exactly one line: {stdout:?}");
    serde_json::from_str(lines[0]).unwrap()
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn csv(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn generate_json_from_prompt_text() {
    let exp = expected("f32");
    let model = fixture("f32");
    let n = exp.max_new_tokens.to_string();
    let prompt = exp.prompt_text.clone().unwrap();
    let out = dots_moe(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &prompt,
        "--max-new-tokens",
        &n,
        "--temperature",
        "0",
        "--precision",
        "f32",
        "--json",
    ]);
    let v = json_of(&out);
    assert_eq!(ids(&v["prompt_tokens"]), exp.prompt_tokens);
    assert_eq!(ids(&v["tokens"]), exp.greedy_tokens);
    assert!(v["text"].is_string(), "a directory with a tokenizer gives text");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tokens/s"), "{stderr}");
}

#[test]
fn generate_json_from_tokens_without_tokenizer() {
    let exp = expected("sharded");
    let model = fixture("sharded");
    let tokens = csv(&exp.prompt_tokens);
    let out = dots_moe(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &tokens,
        "--max-new-tokens",
        "12",
        "--precision",
        "f32",
        "--json",
    ]);
    let v = json_of(&out);
    assert_eq!(ids(&v["prompt_tokens"]), exp.prompt_tokens);
    assert_eq!(ids(&v["tokens"]), exp.greedy_tokens, "greedy by default, stopping on the generation_config eos");
    assert!(v.get("text").is_none(), "no tokenizer.json, no text: {v}");
}

#[test]
fn generate_streams_text_and_ids() {
    let model = fixture("f32");
    let out =
        dots_moe(&["generate", "--model", model.to_str().unwrap(), "--prompt", "the theory", "--max-new-tokens", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let exp = expected("bf16");
    let tokens = csv(&exp.prompt_tokens);
    let out = dots_moe(&[
        "generate",
        "--model",
        fixture("bf16").to_str().unwrap(),
        "--tokens",
        &tokens,
        "--max-new-tokens",
        "3",
        "--precision",
        "f32",
    ]);
    assert!(out.status.success());
    let printed: Vec<u32> =
        String::from_utf8(out.stdout).unwrap().split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert_eq!(printed, exp.greedy_tokens[..3]);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let exp = expected("bf16");
    let model = fixture("bf16");
    let tokens = csv(&exp.prompt_tokens);
    let run = |seed: &str| {
        let out = dots_moe(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            &tokens,
            "--max-new-tokens",
            "16",
            "--temperature",
            "1.5",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--json",
        ]);
        ids(&json_of(&out)["tokens"])
    };
    let a = run("7");
    assert_eq!(a.len(), 16);
    assert_eq!(a, run("7"));
    let others: Vec<Vec<u32>> = ["8", "9", "10"].iter().map(|s| run(s)).collect();
    assert!(others.iter().any(|o| *o != a), "different seeds should sample differently");
}

#[test]
fn chat_wraps_the_prompt() {
    let model = fixture("f32");
    let out = dots_moe(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--chat",
        "--max-new-tokens",
        "2",
        "--json",
    ]);
    let v = json_of(&out);
    let prompt = ids(&v["prompt_tokens"]);
    let plain = ids(&json_of(&dots_moe(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "1",
        "--json",
    ]))["prompt_tokens"]);
    assert!(prompt.len() > plain.len() + 5, "{prompt:?}");
}

#[test]
fn logits_writes_the_full_pass() {
    for name in ["f32", "sharded"] {
        let exp = expected(name);
        let scratch = Scratch::new("logits");
        let out_file = scratch.path().join("logits.safetensors");
        let out = dots_moe(&[
            "logits",
            "--model",
            fixture(name).to_str().unwrap(),
            "--tokens",
            &csv(&exp.prompt_tokens),
            "--out",
            out_file.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let (shape, got) = read_f32(&out_file, "logits");
        let (want_shape, want) = expected_logits(name);
        assert_eq!(shape, want_shape);
        assert!(relative_error(&got, &want) <= 1e-4);
    }
}

#[test]
fn bad_input_fails_with_a_message() {
    let f32_dir = fixture("f32");
    let bf16_dir = fixture("bf16");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["generate", "--model", bf16_dir.to_str().unwrap(), "--tokens", "1,999"], "out of range"),
        (vec!["generate", "--model", bf16_dir.to_str().unwrap(), "--prompt", "hello"], "tokenizer.json"),
        (vec!["generate", "--model", "/nonexistent/model", "--tokens", "1"], "/nonexistent/model"),
        (vec!["generate", "--model", f32_dir.to_str().unwrap(), "--tokens", "1", "--top-p", "2"], "top_p"),
        (vec!["generate", "--model", f32_dir.to_str().unwrap(), "--tokens", "1", "--chat"], "--chat"),
        (
            vec!["logits", "--model", bf16_dir.to_str().unwrap(), "--tokens", "256", "--out", "/tmp/x.safetensors"],
            "out of range",
        ),
    ];
    for (args, needle) in cases {
        let out = dots_moe(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // Both or neither of --prompt / --tokens: a usage error.
    let out = dots_moe(&["generate", "--model", "x"]);
    assert!(!out.status.success());
    let out = dots_moe(&["generate", "--model", "x", "--prompt", "a", "--tokens", "1"]);
    assert!(!out.status.success());
}

/// `--backend cuda`: without a GPU a one-line typed error and a non-zero exit, never a
/// panic, for both commands, and no output file is written; with a GPU, the same JSON
/// shape as the CPU path.
#[test]
fn backend_cuda_without_a_gpu_is_a_one_line_error() {
    let exp = expected("bf16");
    let model = fixture("bf16");
    let tokens = csv(&exp.prompt_tokens);
    let scratch = Scratch::new("cuda-backend");
    let out_file = scratch.path().join("logits.safetensors");
    let runs = [
        dots_moe(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            &tokens,
            "--max-new-tokens",
            "2",
            "--json",
            "--backend",
            "cuda",
        ]),
        dots_moe(&[
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            &tokens,
            "--out",
            out_file.to_str().unwrap(),
            "--precision",
            "bf16",
            "--backend",
            "cuda",
        ]),
    ];
    let gpu_here = dots_moe_has_gpu();
    for out in &runs {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        if gpu_here {
            assert!(out.status.success(), "{stderr}");
        } else {
            assert!(!out.status.success(), "--backend cuda without a GPU must fail");
            let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
            assert_eq!(errors.len(), 1, "{stderr}");
            assert!(errors[0].contains("--backend cuda: not available"), "{stderr}");
            assert_eq!(stderr.lines().count(), 1, "one line only: {stderr}");
        }
    }
    assert_eq!(out_file.exists(), gpu_here, "logits written only when the run succeeded");
    // The CUDA layer computes the bf16 contract: f32 with cuda is refused, GPU or not.
    let out = dots_moe(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &tokens,
        "--out",
        "x",
        "--backend",
        "cuda",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--precision bf16"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line only: {stderr}");
}

/// Whether this machine can open GPU 0 (as `dots-moe doctor` reports it).
fn dots_moe_has_gpu() -> bool {
    let out = dots_moe(&["doctor"]);
    String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("device 0:"))
}

#[test]
fn precision_selects_the_compute_mode() {
    let exp = expected("bf16");
    let tokens = csv(&exp.prompt_tokens);
    let model = fixture("bf16");
    let model = model.to_str().unwrap();
    // logits: f32 by default (the reference), bf16 on request.
    let scratch = Scratch::new("precision");
    let logits_with = |extra: &[&str]| {
        let out_file = scratch.path().join("logits.safetensors");
        let mut args = vec!["logits", "--model", model, "--tokens", &tokens, "--out", out_file.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = dots_moe(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        read_f32(&out_file, "logits").1
    };
    let (_, want_f32) = expected_logits("bf16");
    let (_, want_bf16) = read_f32(&fixture("bf16").join("expected_bf16.safetensors"), "logits");
    let default = logits_with(&[]);
    assert!(relative_error(&default, &want_f32) <= 1e-4);
    let bf16 = logits_with(&["--precision", "bf16"]);
    assert!(relative_error(&bf16, &want_bf16) <= 3e-2);
    assert!(relative_error(&bf16, &default) > 1e-3, "--precision bf16 computed like f32");
    // generate: bf16 by default.
    let generate_with = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", model, "--tokens", &tokens, "--max-new-tokens", "6", "--json"];
        args.extend_from_slice(extra);
        ids(&json_of(&dots_moe(&args))["tokens"])
    };
    assert_eq!(generate_with(&[]), generate_with(&["--precision", "bf16"]));
    assert_eq!(generate_with(&["--precision", "f32"]), exp.greedy_tokens[..6]);
    // Anything else is a usage error naming the choices.
    let out = dots_moe(&["generate", "--model", model, "--tokens", &tokens, "--precision", "f16"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bf16") && stderr.contains("f32"), "{stderr}");
}
