//! `generation_config.json`: the sampling defaults and extra end-of-sequence ids a
//! checkpoint's authors suggest.

use std::path::Path;

use super::error::ModelError;
use crate::config::TokenIds;

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
    fn generation_config_forms() {
        let g = GenerationConfig::from_json(r#"{"eos_token_id": [1, 2], "temperature": 0.7}"#).unwrap();
        assert_eq!(g.eos_token_ids, vec![1, 2]);
        assert_eq!(g.temperature, Some(0.7));
        let g = GenerationConfig::from_json(r#"{"eos_token_id": 5}"#).unwrap();
        assert_eq!(g.eos_token_ids, vec![5]);
        assert!(GenerationConfig::from_json("{").is_err());
    }
}
