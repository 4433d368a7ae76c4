//! The model layer's error type: checkpoints, tokenizer, generation.
//!
//! Every variant names what was wrong: the tensor with its expected and actual shape and
//! the file it came from, the token id and the vocabulary size, the file that could not be
//! read. Nothing in [`crate::model`] panics on user input.

use std::path::PathBuf;

use crate::error::{ConfigError, MoeError};

/// An error of checkpoint loading, the forward pass, the tokenizer or generation.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `config.json` is missing, unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The MoE layer rejected its weights or inputs.
    #[error(transparent)]
    Moe(#[from] MoeError),
    /// The GPU (the MoE layers on CUDA) is unavailable or failed.
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Cuda(#[from] crate::cuda::CudaError),
    /// A file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A safetensors file (or its index) is truncated, corrupt or not safetensors at all.
    #[error("{path}: corrupt or invalid: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser found.
        reason: String,
    },
    /// The model directory holds neither `model.safetensors` nor an index of shards.
    #[error("{dir}: no model.safetensors and no model.safetensors.index.json")]
    NoWeights {
        /// The model directory.
        dir: PathBuf,
    },
    /// A tensor the configuration requires is absent from every file.
    #[error("tensor `{name}` (expected shape {expected:?}) is missing from {files}")]
    MissingTensor {
        /// Checkpoint name of the tensor.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The files searched.
        files: String,
    },
    /// A tensor has a shape the configuration does not imply.
    #[error(
        "tensor `{name}` in {file}: expected shape {expected:?}, got {actual:?} (does config.json match the weights?)"
    )]
    TensorShape {
        /// Checkpoint name of the tensor.
        name: String,
        /// The file that holds it.
        file: PathBuf,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape stored in the file.
        actual: Vec<usize>,
    },
    /// A tensor is stored in a dtype the model cannot compute with.
    #[error("tensor `{name}` in {file}: dtype {dtype} is not supported (expected BF16, F16 or F32)")]
    TensorDtype {
        /// Checkpoint name of the tensor.
        name: String,
        /// The file that holds it.
        file: PathBuf,
        /// The dtype stored in the file.
        dtype: String,
    },
    /// A token id is not in the vocabulary.
    #[error("token id {id} at position {position} is out of range: vocab_size is {vocab_size}")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// Its position in the input.
        position: usize,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// The sequence would grow past `max_position_embeddings`.
    #[error("sequence of {len} tokens exceeds max_position_embeddings {max}")]
    TooLong {
        /// The length asked for.
        len: usize,
        /// The model's limit.
        max: usize,
    },
    /// A KV cache made for another model shape was passed in.
    #[error("KV cache of (layers, kv width) {actual:?} does not fit this model's {expected:?}")]
    CacheMismatch {
        /// (layers, kv_heads * head_dim) of this model.
        expected: (usize, usize),
        /// What the cache was made for.
        actual: (usize, usize),
    },
    /// An empty token sequence where at least one token is needed.
    #[error("no input tokens")]
    EmptyInput,
    /// `tokenizer.json` is missing, unreadable or invalid, or encoding/decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A sampling parameter is out of range.
    #[error("invalid sampling parameter `{name}`: {reason}")]
    Sampling {
        /// The parameter.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The checkpoint asks for something this model does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Writing an output file failed.
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl ModelError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.into(), source }
    }
}
