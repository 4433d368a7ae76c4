//! `--precision bf16|f32`: the compute precision of the model's matrix products.

use dots_moe::moe::Precision;

/// The compute precision of `generate` and `logits` (see `dots_moe::model::dots1`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecisionArg {
    /// bf16 inputs to every matrix product, f32 accumulation (engine speed).
    Bf16,
    /// f32 inputs everywhere: the exact reference.
    F32,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::F32 => Precision::F32,
        }
    }
}
