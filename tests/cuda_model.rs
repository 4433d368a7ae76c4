//! The model with its MoE layers on the GPU (`Dots1Model::moe_to_cuda`), end to end on the
//! golden fixtures (`tests/fixtures/model_{f32,bf16,sharded}`), against the CPU path:
//!
//! - the full-pass logits within bf16 tolerance of the CPU's (the device layer rounds the
//!   gathered rows, the activation and, for the f32 fixture, the expert weights to bf16);
//! - the first MoE layer's router ids equal to transformers' (the fixtures keep every
//!   routing margin above 1e-4, far above the f32 rounding of the logit sums);
//! - greedy generation: how many tokens agree with the CPU path is printed; the first
//!   token must agree (the fixtures keep the greedy margin above 1e-3 relative).
//!
//! The fixtures' shapes (H 32, I 16) are below the kernels' multiples, so these also run the
//! zero padding of `src/model/cuda_moe.rs` on the device.
//!
//! Without a GPU the test reports the skip (`DOTS_MOE_REQUIRE_GPU=1` makes that a failure);
//! `tests/model_cli.rs` checks that `--backend cuda` is then a one-line error.
#![cfg(feature = "cuda")]

mod support;

use dots_moe::backend::testing;
use dots_moe::cuda::GpuContext;
use dots_moe::model::{Dots1Model, GenerateOptions, SamplingParams, generate};
use support::model::{FIXTURES, expected, fixture, relative_error};

/// `max |gpu - cpu| / max |cpu|` over the logits: bf16 rounding inside the MoE layers.
const LOGIT_TOLERANCE: f32 = 3e-2;

fn load(name: &str) -> Dots1Model {
    Dots1Model::load(&fixture(name)).unwrap_or_else(|e| panic!("loading fixture {name}: {e}"))
}

#[test]
fn model_with_moe_on_gpu_matches_cpu_on_every_fixture() {
    let gpu = match GpuContext::new(0) {
        Ok(gpu) => gpu,
        Err(err) => {
            testing::skip_or_fail("model_with_moe_on_gpu_matches_cpu_on_every_fixture", &err.to_string());
            return;
        }
    };
    for name in FIXTURES {
        let cpu = load(name);
        let mut on_gpu = load(name);
        on_gpu.moe_to_cuda(&gpu).unwrap_or_else(|e| panic!("{name}: moe_to_cuda: {e}"));
        let exp = expected(name);

        let want = cpu.logits(&exp.prompt_tokens).unwrap();
        let got = on_gpu.logits(&exp.prompt_tokens).unwrap();
        if let Some(i) = got.iter().position(|v| !v.is_finite()) {
            panic!("{name}: logit {i} is {}", got[i]);
        }
        let err = relative_error(&got, &want);
        eprintln!("{name}: max |logit gpu - cpu| / max |logit cpu| = {err:.3e}");
        assert!(err <= LOGIT_TOLERANCE, "{name}: relative logit error {err:.3e} > {LOGIT_TOLERANCE:e}");

        let routing = on_gpu.routing(&exp.prompt_tokens, exp.router_layer).unwrap();
        for (t, want) in exp.router_ids.iter().enumerate() {
            // The device returns each token's ids in its own order; compare as sets.
            let (mut a, mut b) = (routing.ids(t).to_vec(), want.clone());
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "{name}: token {t} routed differently on the GPU");
        }

        let options = GenerateOptions {
            max_new_tokens: exp.max_new_tokens,
            sampling: SamplingParams::greedy(),
            stop_ids: cpu.eos_token_ids(),
        };
        let cpu_tokens = generate(&cpu, &exp.prompt_tokens, &options, |_| Ok(())).unwrap().tokens;
        let gpu_tokens = generate(&on_gpu, &exp.prompt_tokens, &options, |_| Ok(())).unwrap().tokens;
        let agree = cpu_tokens.iter().zip(&gpu_tokens).take_while(|(a, b)| a == b).count();
        eprintln!(
            "{name}: greedy tokens agree for {agree} of {} (cpu {cpu_tokens:?}, gpu {gpu_tokens:?})",
            cpu_tokens.len()
        );
        assert!(agree >= 1, "{name}: the first greedy token differs");
    }
}
