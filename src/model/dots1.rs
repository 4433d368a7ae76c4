//! The dots.llm1 decoder: checkpoint to logits.
//!
//! ```text
//! h = embed[token]                                           # not scaled
//! for each layer:
//!     h = h + attention(rmsnorm(h, input_layernorm))          # see attention.rs
//!     h = h + mlp(rmsnorm(h, post_attention_layernorm))       # dense MLP in the first
//!                                                             # first_k_dense_replace layers,
//!                                                             # the MoE layer after
//! logits = lm_head(rmsnorm(h, model.norm))
//! ```
//!
//! The residual stream, norms, RoPE and softmax are f32. The inputs of the matrix
//! products are set by the compute precision ([`LoadOptions::precision`]):
//!
//! - [`Precision::F32`] (the default of the library): the exact reference. Activations
//!   enter every product as f32 (bf16 weights widen exactly); the MoE layers run with
//!   [`Precision::F32`]. This is what the golden tests compare with transformers in f32.
//! - [`Precision::Bf16`] (what engines run, the default of `dots-moe generate`): every
//!   product's inputs are bf16 (the attention projections, the attention core's `Q K^T`
//!   and `P V`, the dense MLP, the MoE layers under [`Precision::Bf16`], `lm_head`),
//!   accumulating in f32, on the bf16 dot-product kernels. f32 or f16 checkpoint tensors
//!   are rounded to bf16 once at load (norm weights included), as `model.to(bfloat16)`
//!   does; no weight is ever held as an f32 copy.
//!
//! Embeddings, attention, the dense MLP and `lm_head` of a bf16 checkpoint are used
//! straight from the memory map; only the MoE experts are copied, once, into the fused
//! layout of [`crate::moe`].

use std::path::Path;
use std::time::Instant;

use super::attention::{AttentionShape, AttentionWeights, KvCache, attention};
use super::checkpoint::{Checkpoint, Weight};
use super::error::ModelError;
use super::generation_config::GenerationConfig;
use super::manifest::{Manifest, MlpManifest, MoeManifest, TensorSpec};
use super::ops::{GemmInput, Rope, linear_in, rms_norm, rms_norm_rows};
use crate::config::{Dots1Config, sliding_window_layers};
use crate::error::ConfigError;
use crate::moe::{MoeLayer, MoeLayerBuilder, Precision, Routing};
use crate::tensor::{Dtype, TensorView, round_to_bf16};

/// Which rows of logits a forward pass computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every input position: `[T, vocab]`.
    All,
    /// Only the last position: `[vocab]` (what generation needs).
    Last,
}

/// Where loading stands, reported to [`LoadOptions::progress`] after each decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadProgress {
    /// Decoder layers loaded so far.
    pub layers_done: usize,
    /// Decoder layers in all.
    pub layers: usize,
}

/// A callback that receives [`LoadProgress`] (a progress bar, a log line).
pub type ProgressFn = std::sync::Arc<dyn Fn(LoadProgress) + Send + Sync>;

/// How to load a model.
#[derive(Clone)]
pub struct LoadOptions {
    /// Called after each decoder layer is loaded (none by default); the library draws
    /// nothing itself.
    pub progress: Option<ProgressFn>,
    /// The compute precision of the matrix products (see the [module docs](self)):
    /// [`Precision::F32`] by default (the exact reference), [`Precision::Bf16`] for engine
    /// speed.
    pub precision: Precision,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { progress: None, precision: Precision::F32 }
    }
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("progress", &self.progress.as_ref().map(|_| "callback"))
            .field("precision", &self.precision)
            .finish()
    }
}

/// What loading found and cost.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Wall-clock seconds from opening the directory to a ready model.
    pub seconds: f64,
    /// Bytes of tensor data in the checkpoint files.
    pub checkpoint_bytes: usize,
    /// Bytes copied at load: the MoE layers' fused layout, widened f16 tensors, and under
    /// [`Precision::Bf16`] the bf16 copies of f32 or f16 weights.
    pub copied_bytes: usize,
    /// Warnings: unknown extra tensors and the like.
    pub warnings: Vec<String>,
    /// The files mapped.
    pub files: Vec<String>,
}

enum Mlp {
    Dense {
        gate: Weight,
        up: Weight,
        down: Weight,
    },
    Moe(Box<MoeLayer>),
    /// A MoE layer moved to the GPU by [`Dots1Model::moe_to_cuda`].
    #[cfg(feature = "cuda")]
    CudaMoe(Box<super::cuda_moe::DeviceMoe>),
}

struct Layer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    attn: AttentionWeights,
    mlp: Mlp,
}

/// A loaded dots.llm1 model (`Dots1ForCausalLM`), ready for forward passes.
pub struct Dots1Model {
    cfg: Dots1Config,
    generation: GenerationConfig,
    ckpt: Checkpoint,
    embed: Weight,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Weight,
    attn_shape: AttentionShape,
    precision: Precision,
    report: LoadReport,
}

impl std::fmt::Debug for Dots1Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dots1Model").field("config", &self.cfg).field("checkpoint", &self.ckpt).finish()
    }
}

/// A norm weight, widened to f32 (they are a few KB; everything large stays mapped);
/// under [`Precision::Bf16`] an f32 one is first rounded to bf16 like every weight.
fn norm_weight(ckpt: &mut Checkpoint, spec: &TensorSpec, precision: Precision) -> Result<Vec<f32>, ModelError> {
    let w = ckpt.weight(&spec.name, &spec.shape)?;
    let mut values = ckpt.view(&w).to_f32_vec();
    if precision == Precision::Bf16 {
        round_to_bf16(&mut values);
    }
    Ok(values)
}

/// A matrix weight as the compute precision holds it: in place (or as loaded) under
/// [`Precision::F32`]; under [`Precision::Bf16`], bf16 (f32 and f16 tensors rounded once).
fn matrix_weight(ckpt: &mut Checkpoint, spec: &TensorSpec, precision: Precision) -> Result<Weight, ModelError> {
    let w = ckpt.weight(&spec.name, &spec.shape)?;
    Ok(match precision {
        Precision::F32 => w,
        Precision::Bf16 => ckpt.to_bf16(w),
    })
}

impl Dots1Model {
    /// Loads the model in directory `dir` with the default [`LoadOptions`].
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        Self::load_with(dir, LoadOptions::default())
    }

    /// Loads the model in directory `dir`: `config.json`, `generation_config.json` if
    /// present, and the safetensors weights. Every tensor is checked against the config
    /// before anything is computed or copied.
    pub fn load_with(dir: &Path, options: LoadOptions) -> Result<Self, ModelError> {
        let started = Instant::now();
        std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
        let config_path = dir.join("config.json");
        let config_text = std::fs::read_to_string(&config_path)
            .map_err(|source| ConfigError::Io { path: config_path.clone(), source })?;
        let cfg = Dots1Config::from_json(&config_text)?;
        if let Some(sliding) = sliding_window_layers(&config_text, cfg.num_hidden_layers) {
            return Err(ModelError::Unsupported(format!(
                "config.json asks for sliding-window attention in layers {sliding}; only full attention is implemented (dots.llm1 uses none)"
            )));
        }
        let generation = GenerationConfig::load(dir)?;
        let mut ckpt = Checkpoint::open(dir)?;

        // Validate every tensor before computing or copying anything.
        let manifest = Manifest::new(&cfg);
        for spec in manifest.tensors() {
            ckpt.check(&spec.name, &spec.shape)?;
        }

        let h = cfg.hidden_size;
        let (heads, kv, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let report_progress = |layers_done: usize| {
            if let Some(progress) = &options.progress {
                progress(LoadProgress { layers_done, layers: cfg.num_hidden_layers });
            }
        };
        report_progress(0);

        let precision = options.precision;
        let embed_spec = manifest.embed();
        let embed = ckpt.weight(&embed_spec.name, &embed_spec.shape)?;
        let mut copied_bytes = 0usize;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for n in 0..cfg.num_hidden_layers {
            let m = manifest.layer(n);
            let attn = AttentionWeights {
                q_proj: matrix_weight(&mut ckpt, &m.q_proj, precision)?,
                k_proj: matrix_weight(&mut ckpt, &m.k_proj, precision)?,
                v_proj: matrix_weight(&mut ckpt, &m.v_proj, precision)?,
                o_proj: matrix_weight(&mut ckpt, &m.o_proj, precision)?,
                q_norm: norm_weight(&mut ckpt, &m.q_norm, precision)?,
                k_norm: norm_weight(&mut ckpt, &m.k_norm, precision)?,
            };
            let mlp = match &m.mlp {
                MlpManifest::Dense { gate, up, down } => Mlp::Dense {
                    gate: matrix_weight(&mut ckpt, gate, precision)?,
                    up: matrix_weight(&mut ckpt, up, precision)?,
                    down: matrix_weight(&mut ckpt, down, precision)?,
                },
                MlpManifest::Moe(moe) => {
                    let layer = build_moe_layer(&mut ckpt, &cfg, moe, precision)?;
                    copied_bytes += layer.weights().bytes();
                    Mlp::Moe(Box::new(layer))
                }
            };
            layers.push(Layer {
                input_norm: norm_weight(&mut ckpt, &m.input_norm, precision)?,
                post_norm: norm_weight(&mut ckpt, &m.post_norm, precision)?,
                attn,
                mlp,
            });
            report_progress(n + 1);
        }
        let norm = norm_weight(&mut ckpt, &manifest.norm(), precision)?;
        let lm_head_spec = manifest.lm_head();
        let lm_head = if manifest.lm_head_tied() && !ckpt.contains(&lm_head_spec.name) {
            match precision {
                Precision::F32 => embed.clone(),
                Precision::Bf16 => ckpt.to_bf16(embed.clone()),
            }
        } else {
            matrix_weight(&mut ckpt, &lm_head_spec, precision)?
        };
        // Weights held as owned copies (f16 widened, or rounded to bf16 in bf16 mode).
        let owned = |w: &Weight| if w.is_mapped() { 0 } else { ckpt.view(w).len() * w.dtype().size() };
        for layer in &layers {
            let a = &layer.attn;
            copied_bytes += [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj].into_iter().map(owned).sum::<usize>();
            if let Mlp::Dense { gate, up, down } = &layer.mlp {
                copied_bytes += [gate, up, down].into_iter().map(owned).sum::<usize>();
            }
        }
        copied_bytes += owned(&lm_head);
        // Fault in the weights used in place on every step; the embeddings (only the rows
        // of the tokens seen are ever read) only into the page cache.
        ckpt.cache(&embed);
        for layer in &layers {
            let a = &layer.attn;
            for w in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj] {
                ckpt.prefetch(w);
            }
            if let Mlp::Dense { gate, up, down } = &layer.mlp {
                [gate, up, down].into_iter().for_each(|w| ckpt.prefetch(w));
            }
        }
        ckpt.prefetch(&lm_head);

        let warnings = ckpt
            .unused()
            .into_iter()
            .map(|name| format!("unknown tensor `{name}` in the checkpoint is ignored"))
            .collect();
        let report = LoadReport {
            seconds: started.elapsed().as_secs_f64(),
            checkpoint_bytes: ckpt.data_bytes(),
            copied_bytes,
            warnings,
            files: ckpt.files().map(|p| p.display().to_string()).collect(),
        };
        let attn_shape = AttentionShape {
            hidden: h,
            heads,
            kv_heads: kv,
            head_dim: d,
            eps: cfg.rms_norm_eps,
            rope: Rope::new(d, cfg.rope_theta),
        };
        Ok(Dots1Model { cfg, generation, ckpt, embed, layers, norm, lm_head, attn_shape, precision, report })
    }

    /// Moves every MoE layer onto `gpu`: the weights are uploaded once (expert weights as
    /// bf16, the kernels' contract; see [`super::cuda_moe`]) and the CPU copy is dropped.
    /// On the device the MoE layers compute [`Precision::Bf16`] whatever the model's
    /// precision (the CLI asks for `--precision bf16` with `--backend cuda`).
    /// Attention, norms, the dense layers and `lm_head` stay on the CPU. All layers are
    /// uploaded before any is replaced, so on an error the model is left as it was.
    #[cfg(feature = "cuda")]
    pub fn moe_to_cuda(&mut self, gpu: &std::sync::Arc<crate::cuda::GpuContext>) -> Result<(), ModelError> {
        let mut uploaded = Vec::new();
        for (n, layer) in self.layers.iter().enumerate() {
            if let Mlp::Moe(moe) = &layer.mlp {
                uploaded.push((n, super::cuda_moe::DeviceMoe::upload(gpu, moe)?));
            }
        }
        for (n, device) in uploaded {
            self.layers[n].mlp = Mlp::CudaMoe(Box::new(device));
        }
        Ok(())
    }

    /// The model's configuration.
    pub fn config(&self) -> &Dots1Config {
        &self.cfg
    }

    /// `generation_config.json` (defaults when absent).
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }

    /// Every token id that ends generation: the eos ids of `config.json` and
    /// `generation_config.json`, deduplicated.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids = self.cfg.eos_token_ids.clone();
        for id in &self.generation.eos_token_ids {
            if !ids.contains(id) {
                ids.push(*id);
            }
        }
        ids
    }

    /// The compute precision of the matrix products (see the [module docs](self)).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// What loading found and cost.
    pub fn load_report(&self) -> &LoadReport {
        &self.report
    }

    /// The checkpoint the weights are mapped from.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ckpt
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len(), self.attn_shape.kv_width())
    }

    /// Logits `[T, vocab]` of one full forward pass over `tokens` (no cache kept).
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let mut cache = self.new_cache();
        self.forward(tokens, &mut cache, LogitsFor::All)
    }

    /// Runs `tokens` at positions `cache.len()..`, appending their keys and values to
    /// `cache`, and returns logits for the positions `which` asks for. On error the cache
    /// is left as it was.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, which: LogitsFor) -> Result<Vec<f32>, ModelError> {
        let hidden = match self.run_layers(tokens, cache, None) {
            Ok(Some(hidden)) => hidden,
            Ok(None) => return Err(ModelError::EmptyInput),
            Err(e) => {
                cache.rollback();
                return Err(e);
            }
        };
        cache.advance(tokens.len());
        let h = self.cfg.hidden_size;
        let rows = match which {
            LogitsFor::All => &hidden[..],
            LogitsFor::Last => &hidden[(tokens.len() - 1) * h..],
        };
        let m = rows.len() / h;
        let normed = rms_norm(rows, &self.norm, self.cfg.rms_norm_eps);
        let normed = GemmInput::new(&normed, self.precision);
        Ok(linear_in(&normed, self.ckpt.view(&self.lm_head), m, self.cfg.vocab_size, h))
    }

    /// The router's choice in MoE layer `layer` for `tokens` run from position 0.
    pub fn routing(&self, tokens: &[u32], layer: usize) -> Result<Routing, ModelError> {
        #[cfg(feature = "cuda")]
        if let Some(Mlp::CudaMoe(moe)) = self.layers.get(layer).map(|l| &l.mlp) {
            let normed = self.run_layers(tokens, &mut self.new_cache(), Some(layer))?.ok_or(ModelError::EmptyInput)?;
            return Ok(moe.route(&normed, tokens.len())?);
        }
        let moe = match self.layers.get(layer).map(|l| &l.mlp) {
            Some(Mlp::Moe(moe)) => moe,
            _ => {
                return Err(ModelError::Moe(crate::error::MoeError::MissingWeights(format!(
                    "layer {layer} is not a MoE layer (first_k_dense_replace = {}, layers = {})",
                    self.cfg.first_k_dense_replace,
                    self.layers.len()
                ))));
            }
        };
        let mut cache = self.new_cache();
        let normed = self.run_layers(tokens, &mut cache, Some(layer))?.ok_or(ModelError::EmptyInput)?;
        Ok(moe.route(TensorView::F32(&normed), tokens.len())?)
    }

    /// Checks that `tokens` can run at positions `start..`: not empty, every id below
    /// `vocab_size`, the sequence within `max_position_embeddings`.
    pub fn check_tokens(&self, tokens: &[u32], start: usize) -> Result<(), ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::EmptyInput);
        }
        let vocab_size = self.cfg.vocab_size;
        if let Some((position, &id)) = tokens.iter().enumerate().find(|(_, id)| **id as usize >= vocab_size) {
            return Err(ModelError::TokenOutOfRange { id, position, vocab_size });
        }
        if let Some(max) = self.cfg.max_position_embeddings {
            let len = start + tokens.len();
            if len > max {
                return Err(ModelError::TooLong { len, max });
            }
        }
        Ok(())
    }

    /// The residual stream after every layer (`stop_at: None`), or the normed input of
    /// layer `stop_at`'s MLP. `None` when there are no tokens.
    fn run_layers(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        stop_at: Option<usize>,
    ) -> Result<Option<Vec<f32>>, ModelError> {
        self.check_tokens(tokens, cache.len())?;
        let want = (self.layers.len(), self.attn_shape.kv_width());
        if cache.shape() != want {
            return Err(ModelError::CacheMismatch { expected: want, actual: cache.shape() });
        }
        let (t, h) = (tokens.len(), self.cfg.hidden_size);
        let embed = self.ckpt.view(&self.embed);
        let mut hidden = vec![0.0f32; t * h];
        for (row, &id) in hidden.chunks_mut(h).zip(tokens) {
            let id = id as usize;
            embed.slice(id * h..(id + 1) * h).copy_to_f32(row);
            if self.precision == Precision::Bf16 && embed.dtype() != Dtype::Bf16 {
                round_to_bf16(row);
            }
        }
        let eps = self.cfg.rms_norm_eps;
        for (n, layer) in self.layers.iter().enumerate() {
            let normed = rms_norm(&hidden, &layer.input_norm, eps);
            let attn_out = attention(&self.ckpt, &layer.attn, &self.attn_shape, &normed, t, cache, n, self.precision);
            add_in_place(&mut hidden, &attn_out);
            let mut normed = hidden.clone();
            rms_norm_rows(&mut normed, &layer.post_norm, eps);
            if stop_at == Some(n) {
                return Ok(Some(normed));
            }
            let mlp_out = match &layer.mlp {
                Mlp::Dense { gate, up, down } => {
                    let i = self.cfg.intermediate_size;
                    let input = GemmInput::new(&normed, self.precision);
                    let g = linear_in(&input, self.ckpt.view(gate), t, i, h);
                    let u = linear_in(&input, self.ckpt.view(up), t, i, h);
                    drop(input);
                    let mut act = vec![0.0f32; t * i];
                    crate::cpu::swiglu(&g, &u, &mut act);
                    let act = GemmInput::new(&act, self.precision);
                    linear_in(&act, self.ckpt.view(down), t, h, i)
                }
                Mlp::Moe(moe) => moe.forward(TensorView::F32(&normed), t)?,
                #[cfg(feature = "cuda")]
                Mlp::CudaMoe(moe) => moe.forward(&normed, t)?,
            };
            add_in_place(&mut hidden, &mlp_out);
        }
        Ok(Some(hidden))
    }
}

fn add_in_place(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

/// Builds MoE layer `n` from the checkpoint: the router and every expert are copied into
/// the fused layout, in the dtype of the experts (f32 if any expert tensor is f32 or f16)
/// under [`Precision::F32`], in bf16 (f32 rounded) under [`Precision::Bf16`], which the
/// layer then runs with.
fn build_moe_layer(
    ckpt: &mut Checkpoint,
    cfg: &Dots1Config,
    m: &MoeManifest,
    precision: Precision,
) -> Result<MoeLayer, ModelError> {
    let gate = ckpt.weight(&m.gate.name, &m.gate.shape)?;
    let bias = if m.bias_required || ckpt.contains(&m.bias.name) {
        Some(ckpt.weight(&m.bias.name, &m.bias.shape)?)
    } else {
        None
    };
    let mut experts = Vec::with_capacity(m.n_experts());
    for e in 0..m.n_experts() {
        let [g, u, d] = m.expert(e);
        experts.push([
            ckpt.weight(&g.name, &g.shape)?,
            ckpt.weight(&u.name, &u.shape)?,
            ckpt.weight(&d.name, &d.shape)?,
        ]);
    }
    let shared = match &m.shared {
        Some([g, u, d]) => {
            Some([ckpt.weight(&g.name, &g.shape)?, ckpt.weight(&u.name, &u.shape)?, ckpt.weight(&d.name, &d.shape)?])
        }
        None => None,
    };
    let all_bf16 = experts.iter().chain(shared.iter()).flatten().all(|w| w.dtype() == Dtype::Bf16);
    let dtype = if all_bf16 || precision == Precision::Bf16 { Dtype::Bf16 } else { Dtype::F32 };
    let mut builder = MoeLayerBuilder::new(cfg.moe(), dtype)?;
    builder.router(ckpt.view(&gate), bias.as_ref().map(|b| ckpt.view(b)))?;
    ckpt.release(&gate);
    // Each expert lives in the layer's own copy once written: let its mapped pages go at
    // once, so the checkpoint's expert bytes and the copy are never resident together.
    for (e, weights) in experts.iter().enumerate() {
        let [g, u, d] = weights;
        builder.expert(e, ckpt.view(g), ckpt.view(u), ckpt.view(d))?;
        weights.iter().for_each(|w| ckpt.release(w));
    }
    if let Some(weights) = &shared {
        let [g, u, d] = weights;
        builder.shared(ckpt.view(g), ckpt.view(u), ckpt.view(d))?;
        weights.iter().for_each(|w| ckpt.release(w));
    }
    let mut layer = builder.build()?;
    layer.set_precision(precision);
    Ok(layer)
}
