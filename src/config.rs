//! The dots.llm1 configuration, parsed from a Hugging Face `config.json`.
//!
//! Every field docs/model.md lists is read; where a field is absent the Hugging Face
//! default applies (`n_group`, `topk_group` -> 1; `head_dim` -> hidden / heads). A
//! parsed config is validated once ([`Dots1Config::validate`]) and every error names
//! the offending field.

use serde::Deserialize;
use std::path::Path;

use crate::error::ConfigError;

/// How router logits become scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scoring {
    /// `sigmoid(logit)`; the correction bias (if any) only decides which experts win.
    /// dots.llm1 and DeepSeek-V3 (`"noaux_tc"`, `"sigmoid"`).
    Sigmoid,
    /// `softmax(logits)` over all experts (Mixtral / Qwen-MoE style).
    Softmax,
}

impl Scoring {
    /// Parses Hugging Face's `scoring_func` value.
    pub fn from_hf(name: &str) -> Result<Self, ConfigError> {
        match name {
            "noaux_tc" | "sigmoid" => Ok(Scoring::Sigmoid),
            "softmax" => Ok(Scoring::Softmax),
            other => Err(ConfigError::Invalid {
                field: "scoring_func",
                reason: format!(
                    "unknown scoring function {other:?} (expected \"noaux_tc\", \"sigmoid\" or \"softmax\")"
                ),
            }),
        }
    }
}

/// The router's part of the configuration: everything [`crate::moe::route()`] needs.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterConfig {
    /// Number of routed experts `E`.
    pub n_experts: usize,
    /// Experts chosen per token `k`.
    pub top_k: usize,
    /// Expert groups for group-limited selection (1: no grouping).
    pub n_group: usize,
    /// Groups kept per token (`<= n_group`).
    pub topk_group: usize,
    /// Score function.
    pub scoring: Scoring,
    /// Normalise the chosen weights to sum to one (before scaling).
    pub norm_topk_prob: bool,
    /// Multiplier applied to the routed weights (2.5 for dots.llm1).
    pub routed_scaling_factor: f32,
}

impl RouterConfig {
    /// The dots.llm1 router: 128 experts, top-6, sigmoid with bias, scale 2.5.
    pub fn dots1() -> Self {
        RouterConfig {
            n_experts: 128,
            top_k: 6,
            n_group: 1,
            topk_group: 1,
            scoring: Scoring::Sigmoid,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
        }
    }

    /// Checks the invariants the router relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: String| Err(ConfigError::Invalid { field, reason });
        if self.n_experts == 0 {
            return invalid("n_routed_experts", "must be positive".into());
        }
        if self.n_experts > u32::MAX as usize / 2 {
            return invalid("n_routed_experts", format!("{} is too large", self.n_experts));
        }
        if self.top_k == 0 || self.top_k > self.n_experts {
            return invalid(
                "num_experts_per_tok",
                format!("must be in 1..={} (n_routed_experts), got {}", self.n_experts, self.top_k),
            );
        }
        if self.n_group == 0 || !self.n_experts.is_multiple_of(self.n_group) {
            return invalid(
                "n_group",
                format!("must be positive and divide n_routed_experts = {}, got {}", self.n_experts, self.n_group),
            );
        }
        if self.topk_group == 0 || self.topk_group > self.n_group {
            return invalid(
                "topk_group",
                format!("must be in 1..={} (n_group), got {}", self.n_group, self.topk_group),
            );
        }
        if self.n_group > 1 {
            let per_group = self.n_experts / self.n_group;
            if self.topk_group * per_group < self.top_k {
                return invalid(
                    "topk_group",
                    format!(
                        "{} groups of {per_group} experts hold fewer than num_experts_per_tok = {} experts",
                        self.topk_group, self.top_k
                    ),
                );
            }
        }
        if !self.routed_scaling_factor.is_finite() || self.routed_scaling_factor <= 0.0 {
            return invalid(
                "routed_scaling_factor",
                format!("must be finite and positive, got {}", self.routed_scaling_factor),
            );
        }
        Ok(())
    }
}

/// The shape of one MoE layer: what [`crate::moe::MoeLayer`] needs besides its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Model width `H`.
    pub hidden_size: usize,
    /// Width `I` of one routed expert.
    pub moe_intermediate_size: usize,
    /// Number of shared experts `n_shared`: one SwiGLU MLP of width `n_shared * I` that every token uses.
    pub n_shared_experts: usize,
    /// The router.
    pub router: RouterConfig,
}

impl MoeConfig {
    /// The real dots.llm1 MoE layer: H 4096, I 1408, E 128, top-6, 2 shared experts.
    pub fn dots1() -> Self {
        MoeConfig { hidden_size: 4096, moe_intermediate_size: 1408, n_shared_experts: 2, router: RouterConfig::dots1() }
    }

    /// Checks every size is positive and the router is consistent.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.hidden_size == 0 {
            return Err(ConfigError::Invalid { field: "hidden_size", reason: "must be positive".into() });
        }
        if self.moe_intermediate_size == 0 {
            return Err(ConfigError::Invalid { field: "moe_intermediate_size", reason: "must be positive".into() });
        }
        // Every weight tensor must be addressable: (E + n_shared) * 2I * H elements.
        let slots = self.router.n_experts.checked_add(self.n_shared_experts);
        let elems = slots
            .and_then(|s| s.checked_mul(self.moe_intermediate_size))
            .and_then(|n| n.checked_mul(2))
            .and_then(|n| n.checked_mul(self.hidden_size))
            .filter(|&n| n <= isize::MAX as usize / 4);
        if elems.is_none() {
            return Err(ConfigError::Invalid {
                field: "moe_intermediate_size",
                reason: "expert weights would not fit in memory".into(),
            });
        }
        self.router.validate()
    }

    /// Expert slots in the fused grouped step: routed experts, then one slot per shared expert.
    pub fn n_slots(&self) -> usize {
        self.router.n_experts + self.n_shared_experts
    }

    /// Slots each token occupies: its `k` routed choices, then the shared slots.
    pub fn slots_per_token(&self) -> usize {
        self.router.top_k + self.n_shared_experts
    }
}

fn default_one() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_scale() -> f32 {
    1.0
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_scoring() -> String {
    "noaux_tc".to_string()
}

/// An eos id field: Hugging Face writes either one id or a list.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
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

/// The raw `config.json`, as serde reads it.
#[derive(Debug, Deserialize)]
struct RawConfig {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: usize,
    moe_intermediate_size: usize,
    n_routed_experts: usize,
    num_experts_per_tok: usize,
    #[serde(default)]
    n_shared_experts: Option<usize>,
    #[serde(default = "default_scale")]
    routed_scaling_factor: f32,
    #[serde(default = "default_true")]
    norm_topk_prob: bool,
    #[serde(default = "default_scoring")]
    scoring_func: String,
    #[serde(default)]
    topk_method: Option<String>,
    #[serde(default = "default_one")]
    n_group: usize,
    #[serde(default = "default_one")]
    topk_group: usize,
    #[serde(default)]
    first_k_dense_replace: usize,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    vocab_size: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    eos_token_id: Option<TokenIds>,
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    torch_dtype: Option<String>,
    #[serde(default)]
    dtype: Option<String>,
}

/// The dots.llm1 model configuration (`Dots1Config` in transformers).
#[derive(Clone, Debug, PartialEq)]
pub struct Dots1Config {
    /// Model width `H`.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (`== heads` for MHA, fewer for GQA).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Width of the dense MLP in the first `first_k_dense_replace` layers.
    pub intermediate_size: usize,
    /// Width of one routed expert.
    pub moe_intermediate_size: usize,
    /// Shared experts (0 when absent).
    pub n_shared_experts: usize,
    /// Layers `0..first_k_dense_replace` use the dense MLP; the rest are MoE layers.
    pub first_k_dense_replace: usize,
    /// The router of every MoE layer.
    pub router: RouterConfig,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest supported sequence, if given.
    pub max_position_embeddings: Option<usize>,
    /// End-of-sequence ids from `config.json`.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id, if any (dots.llm1 has none in use).
    pub bos_token_id: Option<u32>,
    /// The checkpoint dtype named in the config (`"bfloat16"`, ...), if any.
    pub torch_dtype: Option<String>,
}

impl Dots1Config {
    /// Parses and validates a `config.json` text.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        let scoring = Scoring::from_hf(&raw.scoring_func)?;
        if let Some(method) = &raw.topk_method
            && !matches!(method.as_str(), "noaux_tc" | "greedy" | "group_limited_greedy")
        {
            return Err(ConfigError::Invalid {
                field: "topk_method",
                reason: format!("unsupported top-k method {method:?}"),
            });
        }
        if raw.num_attention_heads == 0 {
            return Err(ConfigError::Invalid { field: "num_attention_heads", reason: "must be positive".into() });
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None => {
                if !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
                    return Err(ConfigError::Invalid {
                        field: "head_dim",
                        reason: format!(
                            "absent, and hidden_size {} is not divisible by num_attention_heads {}",
                            raw.hidden_size, raw.num_attention_heads
                        ),
                    });
                }
                raw.hidden_size / raw.num_attention_heads
            }
        };
        let cfg = Dots1Config {
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim,
            intermediate_size: raw.intermediate_size,
            moe_intermediate_size: raw.moe_intermediate_size,
            n_shared_experts: raw.n_shared_experts.unwrap_or(0),
            first_k_dense_replace: raw.first_k_dense_replace,
            router: RouterConfig {
                n_experts: raw.n_routed_experts,
                top_k: raw.num_experts_per_tok,
                n_group: raw.n_group,
                topk_group: raw.topk_group,
                scoring,
                norm_topk_prob: raw.norm_topk_prob,
                routed_scaling_factor: raw.routed_scaling_factor,
            },
            rope_theta: raw.rope_theta,
            rms_norm_eps: raw.rms_norm_eps,
            vocab_size: raw.vocab_size,
            tie_word_embeddings: raw.tie_word_embeddings,
            max_position_embeddings: raw.max_position_embeddings,
            eos_token_ids: raw.eos_token_id.map(|ids| ids.to_vec()).unwrap_or_default(),
            bos_token_id: raw.bos_token_id,
            torch_dtype: raw.torch_dtype.or(raw.dtype),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Io { path: path.to_path_buf(), source: e })?;
        Self::from_json(&text)
    }

    /// The shape of every MoE layer of this model.
    pub fn moe(&self) -> MoeConfig {
        MoeConfig {
            hidden_size: self.hidden_size,
            moe_intermediate_size: self.moe_intermediate_size,
            n_shared_experts: self.n_shared_experts,
            router: self.router.clone(),
        }
    }

    /// Checks every size is positive and consistent.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("vocab_size", self.vocab_size),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid { field, reason: "must be positive".into() });
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(ConfigError::Invalid {
                field: "num_key_value_heads",
                reason: format!(
                    "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            });
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ConfigError::Invalid {
                field: "head_dim",
                reason: format!("must be even for RoPE, got {}", self.head_dim),
            });
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return Err(ConfigError::Invalid {
                field: "first_k_dense_replace",
                reason: format!("{} exceeds num_hidden_layers {}", self.first_k_dense_replace, self.num_hidden_layers),
            });
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(ConfigError::Invalid {
                field: "rope_theta",
                reason: format!("must be finite and positive, got {}", self.rope_theta),
            });
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(ConfigError::Invalid {
                field: "rms_norm_eps",
                reason: format!("must be finite and >= 0, got {}", self.rms_norm_eps),
            });
        }
        // Products that size tensors must not overflow.
        let checks = [
            ("vocab_size", self.vocab_size.checked_mul(self.hidden_size)),
            (
                "num_attention_heads",
                self.num_attention_heads.checked_mul(self.head_dim).and_then(|q| q.checked_mul(self.hidden_size)),
            ),
            ("intermediate_size", self.intermediate_size.checked_mul(self.hidden_size)),
        ];
        for (field, product) in checks {
            if product.is_none_or(|n| n > isize::MAX as usize / 4) {
                return Err(ConfigError::Invalid { field, reason: "tensor size overflows".into() });
            }
        }
        if self.first_k_dense_replace < self.num_hidden_layers {
            self.moe().validate()?;
        }
        Ok(())
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

    const DOTS1_CONFIG: &str = r#"{
        "architectures": ["Dots1ForCausalLM"], "model_type": "dots1",
        "hidden_size": 4096, "num_hidden_layers": 62, "num_attention_heads": 32,
        "num_key_value_heads": 32, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "n_routed_experts": 128, "num_experts_per_tok": 6, "n_shared_experts": 2,
        "routed_scaling_factor": 2.5, "norm_topk_prob": true, "scoring_func": "noaux_tc",
        "first_k_dense_replace": 1, "rope_theta": 10000000, "rms_norm_eps": 1e-5,
        "vocab_size": 152064, "tie_word_embeddings": false, "max_position_embeddings": 32768,
        "eos_token_id": 151643, "torch_dtype": "bfloat16"
    }"#;

    #[test]
    fn parses_the_published_config() {
        let cfg = Dots1Config::from_json(DOTS1_CONFIG).unwrap();
        assert_eq!(cfg.head_dim, 128);
        assert_eq!(cfg.router, RouterConfig::dots1());
        assert_eq!(cfg.moe(), MoeConfig::dots1());
        assert_eq!(cfg.eos_token_ids, vec![151643]);
        assert_eq!(cfg.rope_theta, 1e7);
    }

    #[test]
    fn newer_sigmoid_form_and_softmax_parse() {
        let newer = DOTS1_CONFIG
            .replace(r#""scoring_func": "noaux_tc""#, r#""scoring_func": "sigmoid", "topk_method": "noaux_tc""#);
        assert_eq!(Dots1Config::from_json(&newer).unwrap().router.scoring, Scoring::Sigmoid);
        let softmax = DOTS1_CONFIG.replace("noaux_tc", "softmax");
        assert_eq!(Dots1Config::from_json(&softmax).unwrap().router.scoring, Scoring::Softmax);
    }

    #[test]
    fn invalid_fields_are_named() {
        let cases = [
            (r#""num_experts_per_tok": 6"#, r#""num_experts_per_tok": 129"#, "num_experts_per_tok"),
            (r#""n_routed_experts": 128"#, r#""n_routed_experts": 128, "n_group": 3"#, "n_group"),
            (r#""n_routed_experts": 128"#, r#""n_routed_experts": 128, "n_group": 4, "topk_group": 5"#, "topk_group"),
            (r#""hidden_size": 4096"#, r#""hidden_size": 0"#, "hidden_size"),
            (r#""scoring_func": "noaux_tc""#, r#""scoring_func": "relu""#, "scoring_func"),
            (r#""routed_scaling_factor": 2.5"#, r#""routed_scaling_factor": -1.0"#, "routed_scaling_factor"),
        ];
        for (from, to, field) in cases {
            let text = DOTS1_CONFIG.replace(from, to);
            match Dots1Config::from_json(&text) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{to}"),
                other => panic!("{to}: expected an error naming {field}, got {other:?}"),
            }
        }
        assert!(matches!(Dots1Config::from_json("{"), Err(ConfigError::Json(_))));
        assert!(matches!(Dots1Config::from_json("{}"), Err(ConfigError::Json(_))));
    }
}
