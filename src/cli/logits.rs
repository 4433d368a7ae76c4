//! `dots-moe logits --model DIR --tokens 1,2,3 --out FILE [--precision f32|bf16]
//! [--backend cpu|cuda]`: one full forward pass over the tokens; writes a safetensors file
//! holding `logits`, f32 `[T, vocab]`. `--precision bf16` computes them with bf16 inputs to
//! the matrix products (f32 is the default); `--backend cuda` runs the MoE layers on GPU 0.

use std::path::PathBuf;

use clap::Args;

use super::CliResult;
use super::generate::{ModelBackend, load_model};
use super::precision::PrecisionArg;
use dots_moe::model::ModelError;

/// Arguments of `dots-moe logits`.
#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Token ids, comma-separated, e.g. `--tokens 1,2,3`.
    #[arg(long, value_delimiter = ',', num_args = 1, required = true)]
    pub tokens: Vec<u32>,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Where the MoE layers run: `cpu`, or `cuda` (GPU 0; attention stays on the CPU).
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: ModelBackend,
    /// Compute precision of the matrix products: f32 (the exact reference) or bf16 inputs.
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    pub precision: PrecisionArg,
}

/// Runs `dots-moe logits`.
pub fn run(args: LogitsArgs) -> CliResult {
    if args.tokens.is_empty() {
        return Err("--tokens is empty".into());
    }
    let model = load_model(&args.model, args.precision, args.backend)?;
    let logits = model.logits(&args.tokens)?;
    let shape = vec![args.tokens.len(), model.config().vocab_size];
    write_logits(&args.out, &logits, shape)?;
    eprintln!("wrote logits [{}, {}] to {}", args.tokens.len(), model.config().vocab_size, args.out.display());
    Ok(())
}

fn write_logits(path: &std::path::Path, logits: &[f32], shape: Vec<usize>) -> Result<(), ModelError> {
    let write_err = |reason: String| ModelError::Write { path: path.to_path_buf(), reason };
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)
        .map_err(|e| write_err(e.to_string()))?;
    safetensors::serialize_to_file([("logits", view)], None, path).map_err(|e| write_err(e.to_string()))
}
