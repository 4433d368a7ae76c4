//! `dots-moe generate --model DIR (--prompt TEXT | --tokens 1,2,3) [--max-new-tokens N]
//! [--temperature T] [--top-k K] [--top-p P] [--seed S] [--chat] [--json]
//! [--precision bf16|f32] [--backend cpu|cuda]`
//!
//! Streams the new text to stdout (or the new ids, when the directory has no
//! `tokenizer.json`), and prints load time and tokens/s to stderr. With `--json` it prints
//! one object instead: `{"prompt_tokens": [...], "tokens": [...], "text": "..."}` (`text`
//! only when there is a tokenizer).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{ArgGroup, Args};
use indicatif::{ProgressBar, ProgressStyle};

use super::CliResult;
use super::precision::PrecisionArg;
use dots_moe::model::tokenizer::END_OF_RESPONSE;
use dots_moe::model::{
    Dots1Model, GenerateOptions, Generation, LoadOptions, LoadProgress, ModelError, ProgressFn, SamplingParams,
    StopReason, TextStream, Tokenizer, chat_prompt, generate,
};

/// Arguments of `dots-moe generate`.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("input").required(true).args(["prompt", "tokens"])))]
pub struct GenerateArgs {
    /// Hugging Face model directory (config.json, safetensors, optional tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt text (needs tokenizer.json in the model directory).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. `--tokens 1,2,3`.
    #[arg(long, value_delimiter = ',', num_args = 1)]
    pub tokens: Option<Vec<u32>>,
    /// Most new tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy. Default: greedy, or 1.0 when --top-k or
    /// --top-p is given.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Sample only among the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probability reaches P.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed of the sampler (runs with the same seed repeat exactly).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Wrap the prompt in the dots.llm1 inst chat format and stop on <|endofresponse|>.
    #[arg(long)]
    pub chat: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Compute precision of the matrix products: bf16 inputs (engine speed) or f32 (the
    /// exact reference).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Bf16)]
    pub precision: PrecisionArg,
    /// Where the MoE layers run: `cpu`, or `cuda` (GPU 0; attention stays on the CPU).
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: ModelBackend,
}

/// Where a model's MoE layers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelBackend {
    /// The CPU reference.
    Cpu,
    /// The CUDA kernels on GPU 0 (weights uploaded once; attention stays on the CPU).
    Cuda,
}

/// The bar `load_model` draws on stderr (hidden when stderr is not a terminal).
fn load_progress_bar(dir: &Path) -> ProgressBar {
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} layers ({elapsed})") {
        bar.set_style(style);
    }
    bar.set_message(format!("loading {}", dir.display()));
    bar
}

/// Loads a model in `precision`, reporting the load on stderr, and moves its MoE layers to
/// `backend`. The CUDA layer computes the bf16 contract, so `cuda` needs `bf16`.
pub(crate) fn load_model(
    dir: &Path,
    precision: PrecisionArg,
    backend: ModelBackend,
) -> Result<Dots1Model, Box<dyn std::error::Error>> {
    if backend == ModelBackend::Cuda && precision == PrecisionArg::F32 {
        return Err("--backend cuda computes the MoE layers with bf16 inputs: use --precision bf16".into());
    }
    // The GPU first: without one, say so before the (possibly long) load.
    let gpu = open_backend(backend)?;
    let bar = load_progress_bar(dir);
    let on_layer = bar.clone();
    let progress: ProgressFn = Arc::new(move |p: LoadProgress| {
        on_layer.set_length(p.layers as u64);
        on_layer.set_position(p.layers_done as u64);
    });
    let loaded = Dots1Model::load_with(dir, LoadOptions { progress: Some(progress), precision: precision.into() });
    bar.finish_and_clear();
    #[allow(unused_mut)]
    let mut model = loaded?;
    let report = model.load_report();
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    eprintln!(
        "loaded {} ({} file(s), {:.2} GB of weights mapped, {:.2} GB copied into the MoE layers) in {:.2} s",
        dir.display(),
        report.files.len(),
        report.checkpoint_bytes as f64 / 1e9,
        report.copied_bytes as f64 / 1e9,
        report.seconds
    );
    #[cfg(not(feature = "cuda"))]
    let _ = gpu;
    #[cfg(feature = "cuda")]
    if let Some(gpu) = gpu {
        let started = std::time::Instant::now();
        model.moe_to_cuda(&gpu)?;
        eprintln!("MoE layers on {} ({}) in {:.2} s", gpu.info().name, gpu.arch(), started.elapsed().as_secs_f64());
    }
    Ok(model)
}

/// GPU 0 for `--backend cuda` (`None` for the CPU), or a one-line reason why not.
#[cfg(feature = "cuda")]
fn open_backend(backend: ModelBackend) -> Result<Option<std::sync::Arc<dots_moe::cuda::GpuContext>>, String> {
    match backend {
        ModelBackend::Cpu => Ok(None),
        ModelBackend::Cuda => {
            dots_moe::cuda::GpuContext::new(0).map(Some).map_err(|e| format!("--backend cuda: not available: {e}"))
        }
    }
}

/// Without the `cuda` feature only the CPU backend exists.
#[cfg(not(feature = "cuda"))]
fn open_backend(backend: ModelBackend) -> Result<Option<()>, String> {
    match backend {
        ModelBackend::Cpu => Ok(None),
        ModelBackend::Cuda => {
            Err("--backend cuda: not available: this binary was built without the `cuda` feature".into())
        }
    }
}

/// Runs `dots-moe generate`.
pub fn run(args: GenerateArgs) -> CliResult {
    let sampling = SamplingParams {
        temperature: args.temperature.unwrap_or(if args.top_k.is_some() || args.top_p.is_some() { 1.0 } else { 0.0 }),
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    sampling.validate()?;
    if args.chat && args.prompt.is_none() {
        return Err("--chat needs --prompt (the chat format wraps text)".into());
    }
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let prompt_tokens = match (&args.prompt, &args.tokens, &tokenizer) {
        (_, Some(tokens), _) => tokens.clone(),
        (Some(text), None, Some(tok)) => {
            let text = if args.chat { chat_prompt(text, None) } else { text.clone() };
            tok.encode(&text)?
        }
        (Some(_), None, None) => {
            return Err(
                format!("{} has no tokenizer.json: give the prompt as --tokens 1,2,3", args.model.display()).into()
            );
        }
        (None, None, _) => return Err("give --prompt TEXT or --tokens 1,2,3".into()),
    };
    if prompt_tokens.is_empty() {
        return Err("the prompt is empty".into());
    }

    let model = load_model(&args.model, args.precision, args.backend)?;
    let mut stop_ids = model.eos_token_ids();
    if args.chat
        && let Some(id) = tokenizer.as_ref().and_then(|t| t.token_id(END_OF_RESPONSE))
        && !stop_ids.contains(&id)
    {
        stop_ids.push(id);
    }
    let options = GenerateOptions { max_new_tokens: args.max_new_tokens, sampling, stop_ids };

    let stdout = std::io::stdout();
    let mut stream = TextStream::new();
    let streaming = !args.json;
    let write_err = |e: std::io::Error| ModelError::Write { path: PathBuf::from("<stdout>"), reason: e.to_string() };
    let generation = generate(&model, &prompt_tokens, &options, |id| {
        if !streaming {
            return Ok(());
        }
        let mut out = stdout.lock();
        match &tokenizer {
            Some(tok) => {
                if let Some(piece) = stream.push(tok, id)? {
                    out.write_all(piece.as_bytes()).map_err(write_err)?;
                }
            }
            None => write!(out, "{id} ").map_err(write_err)?,
        }
        out.flush().map_err(write_err)
    })?;

    if args.json {
        let mut object = serde_json::json!({
            "prompt_tokens": generation.prompt_tokens,
            "tokens": generation.tokens,
        });
        if let Some(tok) = &tokenizer {
            object["text"] = serde_json::Value::String(tok.decode(&generation.tokens)?);
        }
        println!("{object}");
    } else {
        let mut out = stdout.lock();
        if let Some(tok) = &tokenizer
            && let Some(piece) = stream.finish(tok)?
        {
            out.write_all(piece.as_bytes())?;
        }
        writeln!(out)?;
    }
    print_stats(&generation);
    Ok(())
}

fn print_stats(g: &Generation) {
    let stop = match g.stop {
        StopReason::Eos => "stopped on eos",
        StopReason::MaxTokens => "reached --max-new-tokens",
        StopReason::ContextFull => "reached max_position_embeddings",
    };
    eprintln!(
        "prefill: {} tokens in {:.3} s ({:.1} tokens/s); decode: {} tokens in {:.3} s ({:.2} tokens/s); {} new tokens, {stop}",
        g.prompt_tokens.len(),
        g.prefill_seconds,
        g.prefill_tokens_per_second(),
        g.decode_steps,
        g.decode_seconds,
        g.decode_tokens_per_second(),
        g.tokens.len()
    );
}
