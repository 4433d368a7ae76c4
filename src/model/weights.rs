//! What a checkpoint must hold: every tensor name and the shape the config implies
//! (DOTS1.md, "Checkpoint tensor names"), and `generation_config.json`.

use std::path::Path;

use super::error::ModelError;
use crate::config::{Dots1Config, Scoring, TokenIds};

/// The name prefix of decoder layer `n`: `model.layers.{n}`.
pub fn layer_prefix(n: usize) -> String {
    format!("model.layers.{n}")
}

/// Every tensor the model reads, with the shape `cfg` implies, in checkpoint order.
/// The correction bias is listed for sigmoid routing (dots.llm1); `lm_head.weight` is
/// left out when the embeddings are tied.
pub fn expected_tensors(cfg: &Dots1Config) -> Vec<(String, Vec<usize>)> {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let (heads, kv, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let (i_moe, e, s) = (cfg.moe_intermediate_size, cfg.router.n_experts, cfg.n_shared_experts);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for n in 0..cfg.num_hidden_layers {
        let p = layer_prefix(n);
        let mut add = |name: String, shape: Vec<usize>| out.push((format!("{p}.{name}"), shape));
        add("input_layernorm.weight".into(), vec![h]);
        add("post_attention_layernorm.weight".into(), vec![h]);
        add("self_attn.q_proj.weight".into(), vec![heads * d, h]);
        add("self_attn.k_proj.weight".into(), vec![kv * d, h]);
        add("self_attn.v_proj.weight".into(), vec![kv * d, h]);
        add("self_attn.o_proj.weight".into(), vec![h, heads * d]);
        add("self_attn.q_norm.weight".into(), vec![d]);
        add("self_attn.k_norm.weight".into(), vec![d]);
        if n < cfg.first_k_dense_replace {
            let i = cfg.intermediate_size;
            add("mlp.gate_proj.weight".into(), vec![i, h]);
            add("mlp.up_proj.weight".into(), vec![i, h]);
            add("mlp.down_proj.weight".into(), vec![h, i]);
        } else {
            add("mlp.gate.weight".into(), vec![e, h]);
            if cfg.router.scoring == Scoring::Sigmoid {
                add("mlp.gate.e_score_correction_bias".into(), vec![e]);
            }
            for x in 0..e {
                add(format!("mlp.experts.{x}.gate_proj.weight"), vec![i_moe, h]);
                add(format!("mlp.experts.{x}.up_proj.weight"), vec![i_moe, h]);
                add(format!("mlp.experts.{x}.down_proj.weight"), vec![h, i_moe]);
            }
            if s > 0 {
                add("mlp.shared_experts.gate_proj.weight".into(), vec![s * i_moe, h]);
                add("mlp.shared_experts.up_proj.weight".into(), vec![s * i_moe, h]);
                add("mlp.shared_experts.down_proj.weight".into(), vec![h, s * i_moe]);
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// Layers that transformers would run with sliding-window attention, by its rule: the
/// `layer_types` list when present, else every layer `i >= max_window_layers` when
/// `sliding_window` is set (Dots1Config defaults: window 4096, max_window_layers 62).
/// dots.llm1 has none; this model implements full attention only.
pub fn sliding_window_layers(config_text: &str, num_layers: usize) -> Vec<usize> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(config_text) else {
        return Vec::new();
    };
    if let Some(types) = value.get("layer_types").and_then(|t| t.as_array()) {
        return types
            .iter()
            .enumerate()
            .filter(|(_, t)| t.as_str() == Some("sliding_attention"))
            .map(|(i, _)| i)
            .collect();
    }
    let window = match value.get("sliding_window") {
        None => Some(4096),
        Some(v) => v.as_u64(),
    };
    let max_window_layers = value.get("max_window_layers").and_then(|v| v.as_u64()).unwrap_or(62) as usize;
    match window {
        Some(_) => (max_window_layers..num_layers).collect(),
        None => Vec::new(),
    }
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
        assert!(sliding_window_layers(r#"{"num_hidden_layers": 62}"#, 62).is_empty());
        assert_eq!(sliding_window_layers(r#"{"max_window_layers": 2}"#, 4), vec![2, 3]);
        assert!(sliding_window_layers(r#"{"max_window_layers": 2, "sliding_window": null}"#, 4).is_empty());
        let explicit = r#"{"layer_types": ["full_attention", "sliding_attention"], "max_window_layers": 0}"#;
        assert_eq!(sliding_window_layers(explicit, 2), vec![1]);
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
