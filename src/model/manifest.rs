//! What a checkpoint must hold: every tensor name and the shape the config implies
//! (docs/model.md, "Checkpoint tensors"), typed per decoder layer. The loader checks the
//! whole [`Manifest`] before computing or copying anything, then loads each tensor by
//! the same entry, so a name or a shape is written once.

use crate::config::{Dots1Config, Scoring};

/// One checkpoint tensor: its name and the shape the config implies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// The checkpoint name (`model.layers.3.mlp.gate.weight`).
    pub name: String,
    /// The shape, outermost first.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    fn new(name: impl Into<String>, shape: Vec<usize>) -> Self {
        TensorSpec { name: name.into(), shape }
    }
}

/// The name prefix of decoder layer `n`: `model.layers.{n}`.
pub fn layer_prefix(n: usize) -> String {
    format!("model.layers.{n}")
}

/// The tensors of a model of shape `cfg`.
#[derive(Clone, Copy, Debug)]
pub struct Manifest<'a> {
    cfg: &'a Dots1Config,
}

impl<'a> Manifest<'a> {
    /// The manifest of a model of shape `cfg`.
    pub fn new(cfg: &'a Dots1Config) -> Self {
        Manifest { cfg }
    }

    /// `model.embed_tokens.weight [V, H]`.
    pub fn embed(&self) -> TensorSpec {
        TensorSpec::new("model.embed_tokens.weight", vec![self.cfg.vocab_size, self.cfg.hidden_size])
    }

    /// The final norm, `model.norm.weight [H]`.
    pub fn norm(&self) -> TensorSpec {
        TensorSpec::new("model.norm.weight", vec![self.cfg.hidden_size])
    }

    /// `lm_head.weight [V, H]`: required unless [`Manifest::lm_head_tied`].
    pub fn lm_head(&self) -> TensorSpec {
        TensorSpec::new("lm_head.weight", vec![self.cfg.vocab_size, self.cfg.hidden_size])
    }

    /// Whether `lm_head` may share the embedding matrix (`tie_word_embeddings`): the
    /// checkpoint then need not hold `lm_head.weight`.
    pub fn lm_head_tied(&self) -> bool {
        self.cfg.tie_word_embeddings
    }

    /// The tensors of decoder layer `n`.
    pub fn layer(&self, n: usize) -> LayerManifest {
        let cfg = self.cfg;
        let h = cfg.hidden_size;
        let (heads, kv, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let prefix = layer_prefix(n);
        let named = |name: &str, shape: Vec<usize>| TensorSpec::new(format!("{prefix}.{name}"), shape);
        let mlp = if n < cfg.first_k_dense_replace {
            let i = cfg.intermediate_size;
            MlpManifest::Dense {
                gate: named("mlp.gate_proj.weight", vec![i, h]),
                up: named("mlp.up_proj.weight", vec![i, h]),
                down: named("mlp.down_proj.weight", vec![h, i]),
            }
        } else {
            let (i, e, s) = (cfg.moe_intermediate_size, cfg.router.n_experts, cfg.n_shared_experts);
            MlpManifest::Moe(MoeManifest {
                gate: named("mlp.gate.weight", vec![e, h]),
                bias: named("mlp.gate.e_score_correction_bias", vec![e]),
                bias_required: cfg.router.scoring == Scoring::Sigmoid,
                experts_prefix: format!("{prefix}.mlp.experts"),
                n_experts: e,
                expert_shape: (i, h),
                shared: (s > 0).then(|| {
                    [
                        named("mlp.shared_experts.gate_proj.weight", vec![s * i, h]),
                        named("mlp.shared_experts.up_proj.weight", vec![s * i, h]),
                        named("mlp.shared_experts.down_proj.weight", vec![h, s * i]),
                    ]
                }),
            })
        };
        LayerManifest {
            input_norm: named("input_layernorm.weight", vec![h]),
            post_norm: named("post_attention_layernorm.weight", vec![h]),
            q_proj: named("self_attn.q_proj.weight", vec![heads * d, h]),
            k_proj: named("self_attn.k_proj.weight", vec![kv * d, h]),
            v_proj: named("self_attn.v_proj.weight", vec![kv * d, h]),
            o_proj: named("self_attn.o_proj.weight", vec![h, heads * d]),
            q_norm: named("self_attn.q_norm.weight", vec![d]),
            k_norm: named("self_attn.k_norm.weight", vec![d]),
            mlp,
        }
    }

    /// Every tensor the checkpoint must hold, in checkpoint order: the correction bias
    /// for sigmoid routing (dots.llm1), `lm_head.weight` unless the embeddings are tied.
    ///
    /// Lazy: a config that claims millions of layers or experts costs nothing until the
    /// checkpoint is found to lack the first of them.
    pub fn tensors(self) -> impl Iterator<Item = TensorSpec> + 'a {
        let layers = (0..self.cfg.num_hidden_layers).flat_map(move |n| self.layer(n).into_tensors());
        let head = (!self.lm_head_tied()).then(|| self.lm_head());
        std::iter::once(self.embed()).chain(layers).chain(std::iter::once(self.norm())).chain(head)
    }
}

/// The tensors of one decoder layer.
#[derive(Clone, Debug)]
pub struct LayerManifest {
    /// `input_layernorm.weight [H]`.
    pub input_norm: TensorSpec,
    /// `post_attention_layernorm.weight [H]`.
    pub post_norm: TensorSpec,
    /// `self_attn.q_proj.weight [heads * D, H]`.
    pub q_proj: TensorSpec,
    /// `self_attn.k_proj.weight [kv_heads * D, H]`.
    pub k_proj: TensorSpec,
    /// `self_attn.v_proj.weight [kv_heads * D, H]`.
    pub v_proj: TensorSpec,
    /// `self_attn.o_proj.weight [H, heads * D]`.
    pub o_proj: TensorSpec,
    /// `self_attn.q_norm.weight [D]`.
    pub q_norm: TensorSpec,
    /// `self_attn.k_norm.weight [D]`.
    pub k_norm: TensorSpec,
    /// The dense MLP or the MoE layer.
    pub mlp: MlpManifest,
}

impl LayerManifest {
    /// The layer's required tensors in checkpoint order (the experts one at a time).
    pub fn into_tensors(self) -> impl Iterator<Item = TensorSpec> {
        let LayerManifest { input_norm, post_norm, q_proj, k_proj, v_proj, o_proj, q_norm, k_norm, mlp } = self;
        let common = [input_norm, post_norm, q_proj, k_proj, v_proj, o_proj, q_norm, k_norm].into_iter();
        let mlp: Box<dyn Iterator<Item = TensorSpec>> = match mlp {
            MlpManifest::Dense { gate, up, down } => Box::new([gate, up, down].into_iter()),
            MlpManifest::Moe(moe) => {
                let MoeManifest { gate, bias, bias_required, shared, .. } = moe.clone();
                let experts = (0..moe.n_experts).flat_map(move |e| moe.expert(e));
                Box::new(
                    std::iter::once(gate)
                        .chain(bias_required.then_some(bias))
                        .chain(experts)
                        .chain(shared.into_iter().flatten()),
                )
            }
        };
        common.chain(mlp)
    }
}

/// A decoder layer's MLP tensors.
#[derive(Clone, Debug)]
pub enum MlpManifest {
    /// The dense SwiGLU MLP of the first `first_k_dense_replace` layers:
    /// `mlp.{gate,up}_proj.weight [I, H]`, `mlp.down_proj.weight [H, I]`.
    Dense {
        /// `mlp.gate_proj.weight`.
        gate: TensorSpec,
        /// `mlp.up_proj.weight`.
        up: TensorSpec,
        /// `mlp.down_proj.weight`.
        down: TensorSpec,
    },
    /// A MoE layer.
    Moe(MoeManifest),
}

/// A MoE layer's tensors: the router, each routed expert, the shared experts.
#[derive(Clone, Debug)]
pub struct MoeManifest {
    /// `mlp.gate.weight [E, H]`.
    pub gate: TensorSpec,
    /// `mlp.gate.e_score_correction_bias [E]`: required when [`MoeManifest::bias_required`],
    /// used when present otherwise.
    pub bias: TensorSpec,
    /// Whether the bias must be present (sigmoid routing, as dots.llm1).
    pub bias_required: bool,
    /// The shared experts as one MLP of width `n_shared * I`, if any:
    /// `mlp.shared_experts.{gate,up}_proj.weight [n_shared * I, H]`,
    /// `mlp.shared_experts.down_proj.weight [H, n_shared * I]`.
    pub shared: Option<[TensorSpec; 3]>,
    experts_prefix: String,
    n_experts: usize,
    /// `(I, H)`.
    expert_shape: (usize, usize),
}

impl MoeManifest {
    /// Routed experts `E`.
    pub fn n_experts(&self) -> usize {
        self.n_experts
    }

    /// Routed expert `e`'s `gate_proj [I, H]`, `up_proj [I, H]` and `down_proj [H, I]`.
    pub fn expert(&self, e: usize) -> [TensorSpec; 3] {
        let (i, h) = self.expert_shape;
        let q = format!("{}.{e}", self.experts_prefix);
        [
            TensorSpec::new(format!("{q}.gate_proj.weight"), vec![i, h]),
            TensorSpec::new(format!("{q}.up_proj.weight"), vec![i, h]),
            TensorSpec::new(format!("{q}.down_proj.weight"), vec![h, i]),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_follows_the_layer_kinds() {
        let text = r#"{"hidden_size": 8, "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 12, "moe_intermediate_size": 4, "n_routed_experts": 3, "num_experts_per_tok": 2,
            "n_shared_experts": 2, "first_k_dense_replace": 1, "vocab_size": 16}"#;
        let cfg = Dots1Config::from_json(text).unwrap();
        let all: Vec<TensorSpec> = Manifest::new(&cfg).tensors().collect();
        // embed + 3 x 8 attention/norm + 3 dense + 2 x (gate, bias, 3 x 3 experts, 3 shared) + norm + lm_head
        assert_eq!(all.len(), 1 + 24 + 3 + 2 * (2 + 9 + 3) + 2);
        let find = |name: &str| all.iter().find(|t| t.name == name).map(|t| t.shape.clone());
        assert_eq!(find("model.layers.0.mlp.down_proj.weight"), Some(vec![8, 12]));
        assert_eq!(find("model.layers.2.mlp.experts.2.down_proj.weight"), Some(vec![8, 4]));
        assert_eq!(find("model.layers.1.mlp.shared_experts.up_proj.weight"), Some(vec![8, 8]));
        assert_eq!(find("model.layers.1.self_attn.k_proj.weight"), Some(vec![4, 8]));
        assert_eq!(find("model.layers.0.mlp.gate.weight"), None);
        assert_eq!(all.last().map(|t| t.name.as_str()), Some("lm_head.weight"));
        // The typed entries name the same tensors the list does.
        let MlpManifest::Moe(moe) = Manifest::new(&cfg).layer(2).mlp else { panic!("layer 2 is a MoE layer") };
        assert_eq!(moe.expert(1)[1].name, "model.layers.2.mlp.experts.1.up_proj.weight");
        assert!(moe.bias_required);
        assert!(matches!(Manifest::new(&cfg).layer(0).mlp, MlpManifest::Dense { .. }));
    }
}
