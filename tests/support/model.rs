//! Shared helpers of the model tests: fixture paths, expected values, scratch directories.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Deserialize;

/// The fixtures the generator wrote (scripts/golden/make_fixtures.py).
pub const FIXTURES: [&str; 3] = ["f32", "bf16", "sharded"];

/// `tests/fixtures/model_<name>`: in this checkout, or, for a test binary run on another
/// machine (the GPU host gets the binaries and a copy of the repository), under
/// `$DOTS_MOE_FIXTURES` or `tests/fixtures` of the working directory.
pub fn fixture(name: &str) -> PathBuf {
    let dir = format!("model_{name}");
    let built_here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let candidates = std::env::var_os("DOTS_MOE_FIXTURES")
        .map(PathBuf::from)
        .into_iter()
        .chain([built_here.clone(), PathBuf::from("tests/fixtures")]);
    candidates.map(|root| root.join(&dir)).find(|p| p.is_dir()).unwrap_or_else(|| built_here.join(&dir))
}

/// What transformers computed, from `expected.json`.
#[derive(Debug, Deserialize)]
pub struct Expected {
    pub prompt_tokens: Vec<u32>,
    pub prompt_text: Option<String>,
    pub max_new_tokens: usize,
    pub greedy_tokens: Vec<u32>,
    pub eos_token_id: Option<u32>,
    pub router_layer: usize,
    pub router_ids: Vec<Vec<u32>>,
    pub bias_changes_choice_fraction: f64,
}

/// Reads `expected.json` of fixture `name`.
pub fn expected(name: &str) -> Expected {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Reads an f32 tensor `name` from a safetensors file: (shape, values).
pub fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let values = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    (t.shape().to_vec(), values)
}

/// The expected full-pass logits of fixture `name`: (shape, values).
pub fn expected_logits(name: &str) -> (Vec<usize>, Vec<f32>) {
    read_f32(&fixture(name).join("expected.safetensors"), "logits")
}

/// `max |a - b| / max |b|`.
pub fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let err = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    err / scale
}

/// A fresh, empty scratch directory (removed when dropped).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("dots-moe-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A scratch copy of fixture `name`.
    pub fn copy_of(name: &str) -> Self {
        let s = Scratch::new(name);
        for entry in std::fs::read_dir(fixture(name)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), s.0.join(entry.file_name())).unwrap();
        }
        s
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
