//! Regression tests for allocations the `checkpoint` fuzz target found in
//! `Dots1Model::load` (src/model): a `config.json` of a few hundred bytes claiming many
//! layers made the loader allocate in proportion to the claim before it found that the
//! checkpoint holds none of them (fixed in a2e4801). The claims used here are small next
//! to what a hostile file can say (2^40 layers aborted the process), so that a
//! regression fails cleanly, with a few hundred MB at most.
//!
//! This file is its own test binary, so it can record every allocation.

use std::path::PathBuf;
use std::sync::Mutex;

use dots_moe::model::Dots1Model;

/// The tests share `LARGEST`: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

mod support;

use support::alloc::Recording;

#[global_allocator]
static GLOBAL: Recording = Recording;

/// A model directory: `config.json` for a tiny model claiming `layers` layers (plus
/// `extra` fields), and a valid `model.safetensors` holding no tensor at all.
fn model_dir(name: &str, layers: usize, extra: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dots-moe-regress-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        r#"{{"hidden_size": 8, "num_hidden_layers": {layers}, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 4, "intermediate_size": 8, "moe_intermediate_size": 4,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
        "first_k_dense_replace": 1, "vocab_size": 16{extra}}}"#
    );
    std::fs::write(dir.join("config.json"), config).unwrap();
    // Header `{}` padded to 8 bytes: a valid safetensors file with no tensors.
    let mut empty = 8u64.to_le_bytes().to_vec();
    empty.extend_from_slice(b"{}      ");
    std::fs::write(dir.join("model.safetensors"), empty).unwrap();
    dir
}

/// Loads `dir` and returns the largest single allocation, which must stay under 1 MiB:
/// the whole directory is under 1 KiB.
fn largest_allocation_loading(dir: &PathBuf) -> usize {
    support::alloc::reset();
    let result = Dots1Model::load(dir);
    let largest = support::alloc::largest();
    let _ = std::fs::remove_dir_all(dir);
    assert!(result.is_err(), "a checkpoint without tensors cannot load");
    largest
}

/// `sliding_window_layers` (then in src/model/weights.rs, now src/config.rs) collected `max_window_layers..
/// num_hidden_layers` into a Vec, and the `Unsupported` error printed every index: 2^20
/// layers cost single allocations of up to 15 MB (the Vec, the message); 2^40 aborted.
#[test]
fn many_claimed_layers_do_not_allocate_per_layer_in_the_sliding_window_check() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = model_dir("sliding", 1 << 20, "");
    let largest = largest_allocation_loading(&dir);
    assert!(largest < 1 << 20, "loading allocated {largest} bytes at once for a directory under 1 KiB");
}

/// `Dots1Model::load` built `expected_tensors(&cfg)` (now `Manifest::tensors`; one `(String, Vec<usize>)` per
/// tensor of every claimed layer) before checking the first of them: 2^16 layers of 4
/// experts cost a 100 MB Vec (and as much again in names) for an empty checkpoint.
#[test]
fn many_claimed_layers_do_not_allocate_per_layer_before_the_first_missing_tensor() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = model_dir("expected", 1 << 16, r#", "sliding_window": null"#);
    let largest = largest_allocation_loading(&dir);
    assert!(largest < 1 << 20, "loading allocated {largest} bytes at once for a directory under 1 KiB");
}
