//! What a checkpoint must hold: every tensor name and the shape the config implies
//! (docs/model.md, "Checkpoint tensors"), and `generation_config.json`.

use std::path::Path;

use super::error::ModelError;
use crate::config::{Dots1Config, Scoring, TokenIds};

/// The name prefix of decoder layer `n`: `model.layers.{n}`.
pub fn layer_prefix(n: usize) -> String {
    format!("model.layers.{n}")
}

/// A tensor name and the shape the config implies.
pub type ExpectedTensor = (String, Vec<usize>);

/// Every tensor the model reads, with the shape `cfg` implies, in checkpoint order.
/// The correction bias is listed for sigmoid routing (dots.llm1); `lm_head.weight` is
/// left out when the embeddings are tied.
///
/// Lazy: a config that claims millions of layers or experts costs nothing until the
/// checkpoint is found to lack the first of them.
pub fn expected_tensors(cfg: &Dots1Config) -> impl Iterator<Item = ExpectedTensor> + '_ {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let embed = std::iter::once(("model.embed_tokens.weight".to_string(), vec![v, h]));
    let layers = (0..cfg.num_hidden_layers).flat_map(move |n| layer_tensors(cfg, n));
    let head = std::iter::once(("model.norm.weight".to_string(), vec![h]))
        .chain((!cfg.tie_word_embeddings).then(|| ("lm_head.weight".to_string(), vec![v, h])));
    embed.chain(layers).chain(head)
}

/// The tensors of decoder layer `n`, lazily (the experts one at a time).
fn layer_tensors(cfg: &Dots1Config, n: usize) -> impl Iterator<Item = ExpectedTensor> + '_ {
    let h = cfg.hidden_size;
    let (heads, kv, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let (i_moe, e, s) = (cfg.moe_intermediate_size, cfg.router.n_experts, cfg.n_shared_experts);
    let p = layer_prefix(n);
    let named = move |name: &str, shape: Vec<usize>| (format!("{}.{name}", layer_prefix(n)), shape);
    let common = [
        ("input_layernorm.weight", vec![h]),
        ("post_attention_layernorm.weight", vec![h]),
        ("self_attn.q_proj.weight", vec![heads * d, h]),
        ("self_attn.k_proj.weight", vec![kv * d, h]),
        ("self_attn.v_proj.weight", vec![kv * d, h]),
        ("self_attn.o_proj.weight", vec![h, heads * d]),
        ("self_attn.q_norm.weight", vec![d]),
        ("self_attn.k_norm.weight", vec![d]),
    ]
    .into_iter()
    .map(move |(name, shape)| named(name, shape));
    let dense = n < cfg.first_k_dense_replace;
    let i = cfg.intermediate_size;
    let dense_mlp = dense
        .then(|| {
            [
                ("mlp.gate_proj.weight", vec![i, h]),
                ("mlp.up_proj.weight", vec![i, h]),
                ("mlp.down_proj.weight", vec![h, i]),
            ]
        })
        .into_iter()
        .flatten()
        .map(move |(name, shape)| named(name, shape));
    let moe = !dense;
    let router = moe
        .then(|| {
            let bias = (cfg.router.scoring == Scoring::Sigmoid).then(|| ("mlp.gate.e_score_correction_bias", vec![e]));
            std::iter::once(("mlp.gate.weight", vec![e, h])).chain(bias)
        })
        .into_iter()
        .flatten()
        .map(move |(name, shape)| named(name, shape));
    let experts_prefix = p.clone();
    let experts = (0..if moe { e } else { 0 }).flat_map(move |x| {
        let q = format!("{experts_prefix}.mlp.experts.{x}");
        [
            (format!("{q}.gate_proj.weight"), vec![i_moe, h]),
            (format!("{q}.up_proj.weight"), vec![i_moe, h]),
            (format!("{q}.down_proj.weight"), vec![h, i_moe]),
        ]
    });
    let shared = (moe && s > 0)
        .then(|| {
            [
                ("mlp.shared_experts.gate_proj.weight", vec![s * i_moe, h]),
                ("mlp.shared_experts.up_proj.weight", vec![s * i_moe, h]),
                ("mlp.shared_experts.down_proj.weight", vec![h, s * i_moe]),
            ]
        })
        .into_iter()
        .flatten()
        .map(move |(name, shape)| named(name, shape));
    common.chain(dense_mlp).chain(router).chain(experts).chain(shared)
}

/// Layers that transformers would run with sliding-window attention, by its rule: the
/// `layer_types` list when present, else every layer `i >= max_window_layers` when
/// `sliding_window` is set (Dots1Config defaults: window 4096, max_window_layers 62).
/// dots.llm1 has none; this model implements full attention only. Returns a short
/// description of those layers (`[1, 5]`, `62..80`), or `None` when there are none;
/// its size does not grow with the number of layers claimed.
pub fn sliding_window_layers(config_text: &str, num_layers: usize) -> Option<String> {
    const SHOWN: usize = 8;
    let value = serde_json::from_str::<serde_json::Value>(config_text).ok()?;
    if let Some(types) = value.get("layer_types").and_then(|t| t.as_array()) {
        let mut sliding =
            types.iter().enumerate().filter(|(_, t)| t.as_str() == Some("sliding_attention")).map(|(i, _)| i);
        let shown: Vec<usize> = sliding.by_ref().take(SHOWN).collect();
        let more = sliding.count();
        return match (shown.is_empty(), more) {
            (true, _) => None,
            (false, 0) => Some(format!("{shown:?}")),
            (false, more) => Some(format!("{shown:?} and {more} more")),
        };
    }
    let window = match value.get("sliding_window") {
        None => Some(4096),
        Some(v) => v.as_u64(),
    };
    let max_window_layers = value.get("max_window_layers").and_then(|v| v.as_u64()).unwrap_or(62);
    let first = usize::try_from(max_window_layers).unwrap_or(usize::MAX);
    (window.is_some() && first < num_layers).then(|| format!("{first}..{num_layers}"))
}

/// The parts of `generation_config.json` generation uses. Absent fields stay `None`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    /// Extra end-of-sequence ids.
    pub eos_token_ids: Vec<u32>,
    /// Whether the authors sample by default.
    pub do_sample: Option<bool>,
    /// Suggested temperature.
    pub temperature: Option<f32>,
    /// Suggested top-k.
    pub top_k: Option<usize>,
    /// Suggested top-p.
    pub top_p: Option<f32>,
}

#[derive(serde::Deserialize)]
struct RawGeneration {
    #[serde(default)]
    eos_token_id: Option<TokenIds>,
    #[serde(default)]
    do_sample: Option<bool>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    top_p: Option<f32>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; defaults when the file is absent.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        Self::from_json(&text).map_err(|reason| ModelError::Corrupt { path, reason })
    }

    /// Parses the text of a `generation_config.json`.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: RawGeneration = serde_json::from_str(text).map_err(|e| format!("invalid generation config: {e}"))?;
        Ok(GenerationConfig {
            eos_token_ids: raw.eos_token_id.map(|ids| ids.to_vec()).unwrap_or_default(),
            do_sample: raw.do_sample,
            temperature: raw.temperature,
            top_k: raw.top_k,
            top_p: raw.top_p,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_rule() {
        assert_eq!(sliding_window_layers(r#"{"num_hidden_layers": 62}"#, 62), None);
        assert_eq!(sliding_window_layers(r#"{"max_window_layers": 2}"#, 4).as_deref(), Some("2..4"));
        assert_eq!(sliding_window_layers(r#"{"max_window_layers": 2, "sliding_window": null}"#, 4), None);
        let explicit = r#"{"layer_types": ["full_attention", "sliding_attention"], "max_window_layers": 0}"#;
        assert_eq!(sliding_window_layers(explicit, 2).as_deref(), Some("[1]"));
        let many = format!(r#"{{"layer_types": {:?}}}"#, vec!["sliding_attention"; 10]);
        assert_eq!(sliding_window_layers(&many, 10).as_deref(), Some("[0, 1, 2, 3, 4, 5, 6, 7] and 2 more"));
    }

    #[test]
    fn expected_tensors_follow_the_layer_kinds() {
        let text = r#"{"hidden_size": 8, "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 12, "moe_intermediate_size": 4, "n_routed_experts": 3, "num_experts_per_tok": 2,
            "n_shared_experts": 2, "first_k_dense_replace": 1, "vocab_size": 16}"#;
        let cfg = Dots1Config::from_json(text).unwrap();
        let all: Vec<ExpectedTensor> = expected_tensors(&cfg).collect();
        // embed + 3 x 8 attention/norm + 3 dense + 2 x (gate, bias, 3 x 3 experts, 3 shared) + norm + lm_head
        assert_eq!(all.len(), 1 + 24 + 3 + 2 * (2 + 9 + 3) + 2);
        let find = |name: &str| all.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone());
        assert_eq!(find("model.layers.0.mlp.down_proj.weight"), Some(vec![8, 12]));
        assert_eq!(find("model.layers.2.mlp.experts.2.down_proj.weight"), Some(vec![8, 4]));
        assert_eq!(find("model.layers.1.mlp.shared_experts.up_proj.weight"), Some(vec![8, 8]));
        assert_eq!(find("model.layers.1.self_attn.k_proj.weight"), Some(vec![4, 8]));
        assert_eq!(find("model.layers.0.mlp.gate.weight"), None);
        assert_eq!(all.last().map(|(n, _)| n.as_str()), Some("lm_head.weight"));
    }

    #[test]
    fn generation_config_forms() {
        let g = GenerationConfig::from_json(r#"{"eos_token_id": [1, 2], "temperature": 0.7}"#).unwrap();
        assert_eq!(g.eos_token_ids, vec![1, 2]);
        assert_eq!(g.temperature, Some(0.7));
        let g = GenerationConfig::from_json(r#"{"eos_token_id": 5}"#).unwrap();
        assert_eq!(g.eos_token_ids, vec![5]);
        assert!(GenerationConfig::from_json("{").is_err());
    }
}
