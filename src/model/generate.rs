//! Generation: prefill the whole prompt in one pass, then one cached decode step per
//! token, until an eos id, `max_new_tokens`, or the model's position limit.

use std::time::Instant;

use super::dots1::{Dots1Model, LogitsFor};
use super::error::ModelError;
use super::sampling::{Sampler, SamplingParams};

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to add after the prompt.
    pub max_new_tokens: usize,
    /// How each token is chosen.
    pub sampling: SamplingParams,
    /// Ids that end generation (the eos id is kept as the last new token, as
    /// transformers does).
    pub stop_ids: Vec<u32>,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A stop id was generated.
    Eos,
    /// `max_new_tokens` tokens were generated.
    MaxTokens,
    /// The sequence reached `max_position_embeddings`.
    ContextFull,
}

/// The result of [`generate`], with its timing.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The prompt.
    pub prompt_tokens: Vec<u32>,
    /// The new tokens (a final eos id included).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop: StopReason,
    /// Seconds of the prefill pass (which also yields the first new token).
    pub prefill_seconds: f64,
    /// Seconds of the decode steps after the first token.
    pub decode_seconds: f64,
    /// Decode steps run (`tokens.len() - 1` unless generation stopped early).
    pub decode_steps: usize,
}

impl Generation {
    /// Prompt tokens per second of the prefill pass.
    pub fn prefill_tokens_per_second(&self) -> f64 {
        rate(self.prompt_tokens.len(), self.prefill_seconds)
    }

    /// New tokens per second of the decode steps.
    pub fn decode_tokens_per_second(&self) -> f64 {
        rate(self.decode_steps, self.decode_seconds)
    }
}

fn rate(count: usize, seconds: f64) -> f64 {
    if seconds > 0.0 { count as f64 / seconds } else { 0.0 }
}

/// Generates from `prompt`, calling `on_token` with each new id as soon as it is chosen
/// (for streaming); an error from `on_token` stops generation and is returned.
pub fn generate(
    model: &Dots1Model,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<(), ModelError>,
) -> Result<Generation, ModelError> {
    let mut sampler = Sampler::new(options.sampling)?;
    let mut cache = model.new_cache();
    let max_len = model.config().max_position_embeddings.unwrap_or(usize::MAX);
    let mut result = Generation {
        prompt_tokens: prompt.to_vec(),
        tokens: Vec::new(),
        stop: StopReason::MaxTokens,
        prefill_seconds: 0.0,
        decode_seconds: 0.0,
        decode_steps: 0,
    };
    if options.max_new_tokens == 0 {
        // Nothing to generate, but a bad prompt is still reported.
        model.check_tokens(prompt, 0)?;
        return Ok(result);
    }
    let started = Instant::now();
    let mut logits = model.forward(prompt, &mut cache, LogitsFor::Last)?;
    result.prefill_seconds = started.elapsed().as_secs_f64();
    let decode_started = Instant::now();
    loop {
        let next = sampler.sample(&logits);
        result.tokens.push(next);
        on_token(next)?;
        if options.stop_ids.contains(&next) {
            result.stop = StopReason::Eos;
            break;
        }
        if result.tokens.len() >= options.max_new_tokens {
            result.stop = StopReason::MaxTokens;
            break;
        }
        if cache.len() + 1 > max_len {
            result.stop = StopReason::ContextFull;
            break;
        }
        logits = model.forward(&[next], &mut cache, LogitsFor::Last)?;
        result.decode_steps += 1;
    }
    result.decode_seconds = decode_started.elapsed().as_secs_f64();
    Ok(result)
}
