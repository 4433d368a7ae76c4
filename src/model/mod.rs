//! The whole dots.llm1 model on the CPU: Hugging Face checkpoints, the decoder, a KV
//! cache, the tokenizer and generation.
//!
//! - [`checkpoint`]: `model.safetensors` or sharded files with their index, memory-mapped;
//!   bf16/f32 weights used in place.
//! - [`manifest`]: every tensor the config implies, with its shape, typed per layer: what
//!   the loader checks and then loads.
//! - [`generation_config`](mod@generation_config): `generation_config.json`, the authors' sampling defaults.
//! - [`dots1`]: [`Dots1Model`]: embedding, attention ([`attention`]), dense MLP or the MoE
//!   layer of [`crate::moe`], final norm, `lm_head`; the residual stream in f32, the
//!   matrix products in the compute precision [`Precision`] (f32 or bf16 inputs).
//! - `cuda_moe` (feature `cuda`): the MoE layers moved to the GPU
//!   (`Dots1Model::moe_to_cuda`), attention staying on the CPU.
//! - [`mod@generate`], [`sampling`], [`tokenizer`]: prefill plus cached decode, greedy or
//!   seeded sampling, `tokenizer.json` and the inst chat format.
//!
//! The reference is `transformers` 4.57 (`Dots1ForCausalLM`); the golden tests in
//! `tests/model_golden.rs` compare against it.

pub mod attention;
pub mod checkpoint;
#[cfg(feature = "cuda")]
pub mod cuda_moe;
pub mod dots1;
pub mod error;
pub mod generate;
pub mod generation_config;
pub mod manifest;
pub mod ops;
pub mod sampling;
pub mod tokenizer;

pub use crate::moe::Precision;
pub use attention::KvCache;
pub use checkpoint::Checkpoint;
pub use dots1::{Dots1Model, LoadOptions, LoadProgress, LoadReport, LogitsFor, ProgressFn};
pub use error::ModelError;
pub use generate::{GenerateOptions, Generation, StopReason, generate};
pub use generation_config::GenerationConfig;
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::{TextStream, Tokenizer, chat_prompt};
