//! How an engine that already holds its weights and activations in memory runs a
//! dots-moe layer: no checkpoint files, no copies beyond the one into the layer's layout.
//!
//! `cargo run --release --example embed_moe` (add `-- --real` for the real dots.llm1 shape,
//! which allocates about 9 GB: the engine's bf16 copy plus the layer's).

use dots_moe::MoeError;
use dots_moe::config::{MoeConfig, RouterConfig};
use dots_moe::moe::{MoeLayerBuilder, Precision};
use dots_moe::tensor::{Dtype, TensorView};
use half::bf16;

/// The engine's own storage of one MoE layer (per-expert tensors, `[out, in]` like
/// PyTorch `Linear`), here filled with a cheap deterministic pattern.
struct EngineLayer {
    router: Vec<bf16>,            // [E, H]
    bias: Vec<f32>,               // [E]
    experts: Vec<[Vec<bf16>; 3]>, // gate [I, H], up [I, H], down [H, I]
    shared: [Vec<bf16>; 3],       // gate [n_shared*I, H], up [n_shared*I, H], down [H, n_shared*I]
}

fn pattern(n: usize, seed: usize, scale: f32) -> Vec<bf16> {
    (0..n)
        .map(|i| bf16::from_f32((((i * 2_654_435_761 + seed * 40_503) % 2001) as f32 / 1000.0 - 1.0) * scale))
        .collect()
}

impl EngineLayer {
    fn new(cfg: &MoeConfig) -> Self {
        let (h, i, e, s) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.router.n_experts, cfg.n_shared_experts);
        let (wh, wi) = (1.7 / (h as f32).sqrt(), 1.7 / (i as f32).sqrt());
        EngineLayer {
            router: pattern(e * h, 1, 4.0 * wh),
            bias: (0..e).map(|x| (x % 7) as f32 * 1e-3).collect(),
            experts: (0..e)
                .map(|x| [pattern(i * h, 3 * x + 2, wh), pattern(i * h, 3 * x + 3, wh), pattern(h * i, 3 * x + 4, wi)])
                .collect(),
            shared: [pattern(s * i * h, 7, wh), pattern(s * i * h, 8, wh), pattern(h * s * i, 9, wi)],
        }
    }
}

fn main() -> Result<(), MoeError> {
    let real = std::env::args().any(|a| a == "--real");
    let cfg = if real {
        MoeConfig::dots1()
    } else {
        // The dots.llm1 structure (top-6 sigmoid routing, 2 shared experts) at a small width.
        MoeConfig {
            hidden_size: 256,
            moe_intermediate_size: 96,
            n_shared_experts: 2,
            router: RouterConfig { n_experts: 32, ..RouterConfig::dots1() },
        }
    };
    let engine = EngineLayer::new(&cfg);

    // Hand the tensors over once; the builder checks every shape and names any mismatch.
    let mut builder = MoeLayerBuilder::new(cfg.clone(), Dtype::Bf16)?;
    builder.router(TensorView::Bf16(&engine.router), Some(TensorView::F32(&engine.bias)))?;
    for (e, [gate, up, down]) in engine.experts.iter().enumerate() {
        builder.expert(e, gate.into(), up.into(), down.into())?;
    }
    builder.shared((&engine.shared[0]).into(), (&engine.shared[1]).into(), (&engine.shared[2]).into())?;
    let mut layer = builder.build()?;
    layer.set_precision(Precision::Bf16);

    // The engine's activations: 5 tokens of width H, f32 (bf16 works too).
    let tokens = 5;
    let hidden: Vec<f32> = (0..tokens * cfg.hidden_size).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let routing = layer.route(TensorView::F32(&hidden), tokens)?;
    let out = layer.forward(TensorView::F32(&hidden), tokens)?;

    for t in 0..tokens {
        let row = &out[t * cfg.hidden_size..(t + 1) * cfg.hidden_size];
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        println!(
            "token {t}: experts {:?}, weights {:.3?}, |out| = {norm:.4}",
            routing.ids(t),
            routing.token_weights(t)
        );
    }
    // Bad input is a typed error, not a panic.
    match layer.forward(TensorView::F32(&hidden[1..]), tokens) {
        Err(err) => println!("wrong-length input: {err}"),
        Ok(_) => println!("unexpected: a wrong-length input was accepted"),
    }
    Ok(())
}
