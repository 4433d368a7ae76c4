//! Fuzz target `checkpoint`: hostile model directories through `Checkpoint::open`,
//! `Checkpoint::weight` / `view` and `Dots1Model::load` (+ one forward pass).
//!
//! Inputs, by the first byte:
//! - **raw**: the rest of the input is `model.safetensors`, next to a valid tiny config;
//! - **single** / **sharded**: a checkpoint for the tiny config written from fuzzer
//!   choices, each tensor normal or broken (missing, unsupported dtype, wrong or huge or
//!   zero shape, overlapping offsets, offsets past the end, duplicate names, extra
//!   tensors), the file then maybe truncated, bit-flipped, given a false header length
//!   or padded; sharded adds a `model.safetensors.index.json` that may point at the wrong
//!   shard, a missing one, or out of the directory, or be invalid JSON;
//! - **config**: a valid checkpoint next to a `config.json` whose sizes (layers, experts,
//!   widths, vocabulary, sliding-window fields) the fuzzer picks, some of them huge.
//!
//! Oracle: never a panic; no single allocation larger than 8x the bytes of the model
//! directory plus 256 KiB (the guard in `dots_moe_fuzz::alloc_guard` aborts); errors are
//! typed and name the file at fault; every tensor `open` accepts reads back with as many
//! elements as its shape claims; and when nothing was broken, the checkpoint opens, every
//! tensor reads back bit for bit as written, the model loads and its logits are finite.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use dots_moe::Dots1Config;
use dots_moe::model::checkpoint::Checkpoint;
use dots_moe::model::manifest::Manifest;
use dots_moe::model::{Dots1Model, ModelError};
use dots_moe_fuzz::alloc_guard::Limit;
use dots_moe_fuzz::safetensors_file::{Entry, dtype_size, file_bytes, header_json, json_string};
use dots_moe_fuzz::values::rarely;
use half::{bf16, f16};
use libfuzzer_sys::fuzz_target;

/// The tiny model every structured checkpoint is written for: one dense layer, one MoE
/// layer (4 experts in 2 groups, top-2, one shared expert), GQA attention.
fn config_json(tied: bool) -> String {
    format!(
        r#"{{"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 4, "intermediate_size": 8, "moe_intermediate_size": 4, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2, "topk_group": 1,
        "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": true,
        "scoring_func": "noaux_tc", "vocab_size": 16, "max_position_embeddings": 64,
        "tie_word_embeddings": {tied}, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "layer_types": ["full_attention", "full_attention"]}}"#
    )
}

fn config(tied: bool) -> &'static Dots1Config {
    static CONFIGS: OnceLock<[Dots1Config; 2]> = OnceLock::new();
    let configs = CONFIGS.get_or_init(|| {
        [false, true].map(|t| Dots1Config::from_json(&config_json(t)).expect("the tiny config is valid"))
    });
    &configs[usize::from(tied)]
}

/// A fresh, empty directory for this process.
fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dots-moe-fuzz-checkpoint-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the scratch model directory");
    dir
}

/// What was written, for the oracle.
struct Written {
    /// Bytes of every file in the directory.
    bytes: usize,
    /// Nothing was broken: the checkpoint must load.
    clean: bool,
    /// The data of each tensor written normally: name -> values (as f32).
    values: Vec<(String, Vec<f32>)>,
}

/// One tensor as the fuzzer decided to write it.
struct Planned {
    entry: Entry,
    data: Vec<u8>,
    values: Option<Vec<f32>>,
}

fn encode(dtype: &str, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for &v in values {
        match dtype {
            "F32" => out.extend_from_slice(&v.to_le_bytes()),
            "BF16" => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
            _ => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
        }
    }
    out
}

/// Plans the tensors of the tiny model, each normal or broken; `clean` is cleared by
/// anything broken.
fn plan(u: &mut Unstructured<'_>, cfg: &Dots1Config, clean: &mut bool) -> Result<Vec<Planned>> {
    let mut seed = u.arbitrary::<u64>()? | 1;
    let mut next_value = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        ((seed >> 40) % 32) as f32 / 64.0 - 0.25
    };
    let mut out: Vec<Planned> = Vec::new();
    let mut names: Vec<(String, Vec<usize>)> = Manifest::new(cfg).tensors().map(|t| (t.name, t.shape)).collect();
    if rarely(u, 16)? {
        names.push(("model.extra.weight".into(), vec![3])); // unknown extra: a warning, not an error
    }
    for (name, shape) in names {
        let dtype = *u.choose(&["F32", "F32", "BF16", "BF16", "F16"])?;
        let elems: usize = shape.iter().product();
        let values: Vec<f32> = (0..elems).map(|_| next_value()).collect();
        let mut planned = Planned {
            entry: Entry {
                name: name.clone(),
                dtype: dtype.into(),
                shape: shape.iter().map(|&d| d as u64).collect(),
                offsets: (0, 0),
            },
            data: encode(dtype, &values),
            values: Some(values),
        };
        let op = u.int_in_range(0u8..=63)?;
        if op >= 56 {
            *clean = false;
            planned.values = None;
        }
        match op {
            56 => continue, // missing
            57 => {
                let wrong = *u.choose(&["I8", "U8", "I32", "F64", "BOOL", "F8_E4M3", "I64", "C64", "bf16", ""])?;
                planned.entry.dtype = wrong.into();
                let n = dtype_size(wrong).unwrap_or(1) * elems;
                planned.data = vec![0x3f; n];
            }
            58 => {
                // Wrong shape, consistent bytes.
                let s = &mut planned.entry.shape;
                match u.int_in_range(0u8..=3)? {
                    0 => s.reverse(),
                    1 => s.push(1),
                    2 => {
                        s.pop();
                    }
                    _ => s[0] += 1,
                }
                let n: u64 = s.iter().product();
                planned.data = vec![0; n as usize * dtype_size(dtype).unwrap_or(4)];
            }
            59 => {
                // A huge claim: shape past the data (and maybe past usize).
                planned.entry.shape[0] = *u.choose(&[1u64 << 40, 1 << 62, u64::MAX, (usize::MAX / 4) as u64 + 1])?;
            }
            60 => {
                planned.entry.shape = vec![0; planned.entry.shape.len()];
                planned.data.clear();
            }
            61 => planned.entry.name = format!("{name}\u{0}\u{202e}"),
            _ => {}
        }
        out.push(planned);
    }
    if !out.is_empty() && rarely(u, 24)? {
        *clean = false;
        let i = u.choose_index(out.len())?;
        let dup = Planned { entry: out[i].entry.clone(), data: Vec::new(), values: None };
        out[i].values = None;
        out.push(dup); // the same name twice in one header
    }
    Ok(out)
}

/// Lays out the data of one file's tensors contiguously, then maybe breaks one range:
/// overlapping the previous tensor, past the end, reversed, or ending at `u64::MAX`.
fn lay_out(u: &mut Unstructured<'_>, tensors: &mut [&mut Planned], clean: &mut bool) -> Result<()> {
    let mut at = 0u64;
    for p in tensors.iter_mut() {
        p.entry.offsets = (at, at + p.data.len() as u64);
        at += p.data.len() as u64;
    }
    if !tensors.is_empty() && rarely(u, 12)? {
        *clean = false;
        let i = u.choose_index(tensors.len())?;
        let prev = if i > 0 { tensors[i - 1].entry.offsets.0 } else { 0 };
        let t = &mut tensors[i];
        t.values = None;
        let (start, end) = t.entry.offsets;
        t.entry.offsets = match u.int_in_range(0u8..=3)? {
            0 => (prev, end),
            1 => (start, end.saturating_add(u64::from(u.arbitrary::<u32>()?) + 1)),
            2 => (end, start),
            _ => (start, u64::MAX),
        };
    }
    Ok(())
}

/// Serialises `tensors` into one safetensors file, then maybe breaks the bytes.
fn serialise(u: &mut Unstructured<'_>, tensors: &[&Planned], clean: &mut bool) -> Result<Vec<u8>> {
    let entries: Vec<Entry> = tensors.iter().map(|p| p.entry.clone()).collect();
    let mut data = Vec::new();
    for p in tensors {
        data.extend_from_slice(&p.data);
    }
    let header = header_json(&entries, u.arbitrary()?);
    let mut bytes = file_bytes(&header, &data);
    if rarely(u, 8)? && !bytes.is_empty() {
        *clean = false;
        match u.int_in_range(0u8..=4)? {
            0 => {
                let at = u.choose_index(bytes.len())?;
                bytes.truncate(at);
            }
            1 => {
                let at = u.choose_index(bytes.len())?;
                bytes[at] ^= 1 << u.int_in_range(0..=7)?;
            }
            2 => {
                let len: u64 = u.arbitrary()?;
                bytes[..8].copy_from_slice(&len.to_le_bytes());
            }
            3 => {
                let n = u.int_in_range(1..=64)?;
                bytes.extend_from_slice(u.bytes(n)?);
            }
            _ => {
                let len = (bytes.len() as u64).saturating_sub(8);
                bytes[..8].copy_from_slice(&len.to_le_bytes()); // header swallows the data
            }
        }
    }
    Ok(bytes)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> usize {
    std::fs::write(dir.join(name), bytes).expect("write into the scratch directory");
    bytes.len()
}

const SINGLE: &str = "model.safetensors";
const SHARDS: [&str; 2] = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];

fn write_case(u: &mut Unstructured<'_>, dir: &Path, mode: u8) -> Result<Written> {
    let tied = rarely(u, 4)?;
    let mut clean = true;
    let mut bytes = write(dir, "config.json", config_json(tied).as_bytes());
    let cfg = config(tied);
    match mode {
        0 => {
            let rest = u.bytes(u.len())?;
            bytes += write(dir, SINGLE, rest);
            return Ok(Written { bytes, clean: false, values: Vec::new() });
        }
        1 => {
            let mut tensors = plan(u, cfg, &mut clean)?;
            lay_out(u, &mut tensors.iter_mut().collect::<Vec<_>>(), &mut clean)?;
            let refs: Vec<&Planned> = tensors.iter().collect();
            let file = serialise(u, &refs, &mut clean)?;
            bytes += write(dir, SINGLE, &file);
            let values = tensors.into_iter().filter_map(|p| Some((p.entry.name, p.values?))).collect();
            Ok(Written { bytes, clean, values })
        }
        _ => {
            let mut tensors = plan(u, cfg, &mut clean)?;
            let mut shard_of = Vec::with_capacity(tensors.len());
            for _ in 0..tensors.len() {
                shard_of.push(usize::from(u.arbitrary::<bool>()?));
            }
            let mut weight_map: Vec<(String, String)> = Vec::new();
            for s in 0..2 {
                let mut mine: Vec<&mut Planned> =
                    tensors.iter_mut().zip(&shard_of).filter(|(_, of)| **of == s).map(|(p, _)| p).collect();
                lay_out(u, &mut mine, &mut clean)?;
                let refs: Vec<&Planned> = mine.iter().map(|p| &**p).collect();
                for p in &refs {
                    weight_map.push((p.entry.name.clone(), SHARDS[s].to_string()));
                }
                let file = serialise(u, &refs, &mut clean)?;
                bytes += write(dir, SHARDS[s], &file);
            }
            if rarely(u, 6)? && !weight_map.is_empty() {
                clean = false;
                let i = u.choose_index(weight_map.len())?;
                match u.int_in_range(0u8..=4)? {
                    0 => weight_map[i].1 = SHARDS[1 - usize::from(weight_map[i].1 == SHARDS[1])].to_string(),
                    1 => {
                        weight_map.remove(i);
                    }
                    2 => weight_map[i].1 = "../model-00001-of-00002.safetensors".into(),
                    3 => weight_map[i].1 = "/etc/hostname".into(),
                    _ => weight_map[i].1 = "model-00003-of-00002.safetensors".into(),
                }
            }
            let entries: Vec<String> =
                weight_map.iter().map(|(t, f)| format!("{}: {}", json_string(t), json_string(f))).collect();
            let mut index = format!(r#"{{"metadata": {{"total_size": 0}}, "weight_map": {{{}}}}}"#, entries.join(", "));
            if rarely(u, 16)? {
                clean = false;
                let cut = u.int_in_range(0..=index.len())?;
                index = String::from_utf8_lossy(&index.as_bytes()[..cut]).into_owned();
            }
            bytes += write(dir, "model.safetensors.index.json", index.as_bytes());
            let values = tensors.into_iter().filter_map(|p| Some((p.entry.name, p.values?))).collect();
            Ok(Written { bytes, clean, values })
        }
    }
}

/// A `config.json` with sizes the fuzzer picks (mode 3).
fn hostile_config(u: &mut Unstructured<'_>) -> Result<String> {
    let pick = |u: &mut Unstructured<'_>, usual: u64| -> Result<u64> {
        // Out of bytes: the usual value.
        Ok(match u.int_in_range(0u8..=7)? {
            7 => *u.choose(&[1u64 << 20, 1 << 31, 1 << 40, 1 << 60])?,
            6 => u.int_in_range(1..=4096)?,
            _ => usual,
        })
    };
    Ok(format!(
        r#"{{"hidden_size": {}, "num_hidden_layers": {}, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 4, "intermediate_size": {}, "moe_intermediate_size": {}, "n_routed_experts": {},
        "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1, "vocab_size": {},
        "max_window_layers": {}{}}}"#,
        pick(u, 8)?,
        pick(u, 2)?,
        pick(u, 8)?,
        pick(u, 4)?,
        pick(u, 4)?,
        pick(u, 16)?,
        pick(u, 62)?,
        // Past the sliding-window check (src/model/weights.rs) to the tensor list.
        *u.choose(&["", r#", "sliding_window": null"#, r#", "layer_types": []"#])?
    ))
}

fn is_typed_file_error(err: &ModelError, dir: &Path) -> bool {
    match err {
        ModelError::Corrupt { path, reason } => path.starts_with(dir) && !reason.is_empty(),
        ModelError::Io { path, .. } => path.starts_with(dir),
        ModelError::NoWeights { dir: d } => d == dir,
        _ => false,
    }
}

fn check(dir: &Path, written: &Written) {
    // Open: a typed error naming a file of this directory, or every tensor readable.
    match Checkpoint::open(dir) {
        Err(err) => {
            assert!(is_typed_file_error(&err, dir), "Checkpoint::open: untyped or misplaced error {err:?}");
            assert!(!written.clean, "a clean checkpoint failed to open: {err}");
            let text = err.to_string();
            assert!(text.contains(&*dir.to_string_lossy()), "error does not name the file: {text}");
        }
        Ok(mut ckpt) => {
            let entries: Vec<(String, Vec<usize>, bool)> = ckpt
                .tensors()
                .iter()
                .map(|(name, entry)| (name.clone(), entry.shape.clone(), entry.dtype.is_ok()))
                .collect();
            for (name, shape, supported) in entries {
                match ckpt.weight(&name, &shape) {
                    Ok(w) => {
                        assert!(supported, "{name}: unsupported dtype read");
                        let view = ckpt.view(&w);
                        let elems: usize = shape.iter().product();
                        assert_eq!(view.len(), elems, "{name}: {} elements for shape {shape:?}", view.len());
                        if let Some((_, values)) = written.values.iter().find(|(n, _)| *n == name) {
                            if written.clean {
                                for (i, &v) in values.iter().enumerate() {
                                    assert_eq!(view.get_f32(i).to_bits(), v.to_bits(), "{name}[{i}] read back wrong");
                                }
                            }
                        }
                    }
                    Err(ModelError::TensorDtype { .. }) if !supported => {}
                    Err(err) => panic!("{name}: a tensor open() accepted does not read: {err}"),
                }
                // Asking with another shape is a shape error.
                let mut other = shape.clone();
                other.push(1);
                assert!(matches!(ckpt.check(&name, &other), Err(ModelError::TensorShape { .. })));
            }
        }
    }

    // Load and run.
    match Dots1Model::load(dir) {
        Err(err) => {
            assert!(!written.clean, "a clean checkpoint failed to load: {err}");
            assert!(!err.to_string().is_empty());
        }
        Ok(model) => {
            let vocab = model.config().vocab_size;
            match model.logits(&[0, 1, (vocab - 1) as u32]) {
                Ok(logits) => {
                    assert_eq!(logits.len(), 3 * vocab);
                    if written.clean {
                        assert!(logits.iter().all(|v| v.is_finite()), "clean checkpoint gave non-finite logits");
                    }
                }
                Err(err) => assert!(!written.clean, "clean checkpoint: logits failed: {err}"),
            }
            assert!(matches!(model.logits(&[vocab as u32]), Err(ModelError::TokenOutOfRange { .. })));
            assert!(matches!(model.logits(&[]), Err(ModelError::EmptyInput)));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut u = Unstructured::new(rest);
    let dir = scratch_dir();
    let written = if mode % 4 == 3 {
        // The config first: short inputs then still reach every size.
        let Ok(text) = hostile_config(&mut u) else { return };
        let Ok(mut written) = write_case(&mut u, &dir, 1) else { return };
        written.bytes += write(&dir, "config.json", text.as_bytes());
        written.clean = false;
        written
    } else {
        match write_case(&mut u, &dir, mode % 3) {
            Ok(w) => w,
            Err(_) => return,
        }
    };
    let _limit = Limit::proportional(written.bytes, 8, 256 << 10);
    check(&dir, &written);
    if std::env::var_os("DOTS_MOE_FUZZ_VERBOSE").is_some() {
        let loaded = Dots1Model::load(&dir).map(|_| ()).map_err(|e| e.to_string());
        let config = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
        eprintln!("mode {mode}: {} bytes, clean {}, load {loaded:?}\n{config}", written.bytes, written.clean);
    }
});
