//! The model's MoE layers on the GPU ([`Dots1Model::moe_to_cuda`](super::Dots1Model::moe_to_cuda)):
//! each layer's weights are uploaded once into a [`CudaMoeLayer`], and attention, norms and
//! the dense layers stay on the CPU. Each MoE call uploads the normed hidden states `[T, H]`,
//! runs the whole layer on the device and downloads its output. The device buffers of the
//! last call's batch size are kept and reused by the next call of the same size (every
//! decode step after the first), so decoding allocates nothing on the device.
//!
//! The device layer computes the contract under [`Precision::Bf16`] with bf16 expert weights
//! (what the kernels implement): f32 or f16 expert weights of the checkpoint are rounded to
//! bf16 once, at upload. The router gate keeps its dtype (f32 stays f32), so the routing is
//! the CPU's up to the order of the logit sums.
//!
//! The kernels take `H % 256 == 0` and `I % 128 == 0` (dots.llm1: 4096 and 1408). Other
//! shapes (the small test models) are zero-padded up to those multiples, which leaves every
//! result exact: padded hidden columns are zero in the input, the router and the expert
//! weights, so they add nothing to any dot product; a padded intermediate unit has zero gate
//! and up rows, so its activation is `silu(0) * 0 = 0`, and its down column is zero; padded
//! output columns are dropped.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use half::bf16;

use crate::config::MoeConfig;
use crate::cuda::expert_gemm::{GemmOptions, HIDDEN_MULTIPLE, INTER_MULTIPLE};
use crate::cuda::layer::{CudaMoeLayer, LayerWorkspace};
use crate::cuda::{CudaError, GpuContext};
use crate::error::MoeError;
use crate::moe::weights::ExpertShard;
use crate::moe::{MoeLayer, MoeWeights, Precision, Routing};
use crate::tensor::{Dtype, TensorData, TensorView};

/// One MoE layer of the model, resident on a GPU.
pub(crate) struct DeviceMoe {
    layer: CudaMoeLayer,
    /// The model's hidden size (the device layer's may be padded up).
    hidden: usize,
    /// The buffers of the last call (f32 input), reused when the next has as many tokens.
    workspace: Mutex<Option<LayerWorkspace>>,
}

impl std::fmt::Debug for DeviceMoe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMoe").field("hidden", &self.hidden).field("layer", &self.layer).finish()
    }
}

impl DeviceMoe {
    /// Uploads `cpu` (any precision and weight dtype) to `gpu`, padded if need be.
    pub(crate) fn upload(gpu: &Arc<GpuContext>, cpu: &MoeLayer) -> Result<Self, CudaError> {
        if !cpu.weights().shard().is_full(cpu.config()) {
            return Err(MoeError::Unsupported(
                "the model's MoE layers move to the GPU whole; this layer holds a subset of the experts".into(),
            )
            .into());
        }
        let device_form = device_form(cpu.weights());
        let layer = CudaMoeLayer::new(gpu, &device_form, GemmOptions::for_device(gpu))?;
        Ok(DeviceMoe { layer, hidden: cpu.config().hidden_size, workspace: Mutex::new(None) })
    }

    /// The device layer's hidden size (the model's, rounded up to the kernels' multiple).
    fn padded_hidden(&self) -> usize {
        self.layer.config().hidden_size
    }

    /// `hidden [T, H]` padded with zero columns to the device layer's width (borrowed as it
    /// is when no padding is needed).
    fn pad<'a>(&self, hidden: &'a [f32], tokens: usize) -> Cow<'a, [f32]> {
        let (h, hp) = (self.hidden, self.padded_hidden());
        if h == hp {
            return Cow::Borrowed(hidden);
        }
        let mut out = vec![0.0f32; tokens * hp];
        for (dst, src) in out.chunks_exact_mut(hp).zip(hidden.chunks_exact(h)) {
            dst[..h].copy_from_slice(src);
        }
        Cow::Owned(out)
    }

    /// Runs the whole layer on `hidden [T, H]` (f32, unpadded) in the kept workspace (made
    /// anew when the token count changed) and hands it to `read`.
    fn run<R>(
        &self,
        hidden: &[f32],
        tokens: usize,
        read: impl FnOnce(&LayerWorkspace) -> Result<R, CudaError>,
    ) -> Result<R, CudaError> {
        crate::error::check_len("hidden", &[tokens, self.hidden], hidden.len())?;
        let mut kept = self.workspace.lock().unwrap_or_else(|e| e.into_inner());
        let mut ws = match kept.take() {
            Some(ws) if ws.tokens == tokens => ws,
            _ => self.layer.workspace(tokens, Dtype::F32)?,
        };
        ws.set_input(TensorView::F32(&self.pad(hidden, tokens)))?;
        self.layer.enqueue(&mut ws)?;
        let result = read(&ws);
        // Kept only after a clean run: an error leaves nothing half-used behind.
        if result.is_ok() {
            *kept = Some(ws);
        }
        result
    }

    /// The layer's output `[T, H]` (f32) for the normed hidden states `[T, H]`.
    pub(crate) fn forward(&self, hidden: &[f32], tokens: usize) -> Result<Vec<f32>, CudaError> {
        let (h, hp) = (self.hidden, self.padded_hidden());
        let out = self.run(hidden, tokens, LayerWorkspace::read_output)?;
        if h == hp {
            return Ok(out);
        }
        Ok(out.chunks_exact(hp).flat_map(|row| row[..h].iter().copied()).collect())
    }

    /// The device router's choice for the normed hidden states `[T, H]`.
    pub(crate) fn route(&self, hidden: &[f32], tokens: usize) -> Result<Routing, CudaError> {
        let top_k = self.layer.config().router.top_k;
        self.run(hidden, tokens, |ws| {
            ws.read_output()?;
            ws.routing.read_routing(top_k)
        })
    }
}

/// `n` rounded up to a multiple of `m`.
fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// Copies `rows` rows of `cols` elements from `src` (row stride `cols`) into `dst` (row
/// stride `dst_stride`), rounding to bf16.
fn copy_rows_bf16(dst: &mut [bf16], dst_stride: usize, src: TensorView<'_>, rows: usize, cols: usize) {
    for r in 0..rows {
        let to = &mut dst[r * dst_stride..r * dst_stride + cols];
        match src.slice(r * cols..(r + 1) * cols) {
            TensorView::Bf16(from) => to.copy_from_slice(from),
            TensorView::F32(from) => to.iter_mut().zip(from).for_each(|(t, &f)| *t = bf16::from_f32(f)),
        }
    }
}

/// The layer the kernels take: bf16 expert weights, `H` and `I` padded with zeros to the
/// kernels' multiples, the router gate in its own dtype (padded), [`Precision::Bf16`].
fn device_form(w: &MoeWeights) -> MoeLayer {
    let cfg = w.config();
    let (h, i, e) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.router.n_experts);
    let (hp, ip) = (round_up(h, HIDDEN_MULTIPLE), round_up(i, INTER_MULTIPLE));
    let padded_cfg = MoeConfig { hidden_size: hp, moe_intermediate_size: ip, ..cfg.clone() };
    let slots = cfg.n_slots();

    let router_gate = match w.router_gate() {
        TensorView::F32(g) => {
            let mut out = vec![0.0f32; e * hp];
            for (dst, src) in out.chunks_exact_mut(hp).zip(g.chunks_exact(h)) {
                dst[..h].copy_from_slice(src);
            }
            TensorData::F32(out)
        }
        TensorView::Bf16(g) => {
            let mut out = vec![bf16::ZERO; e * hp];
            copy_rows_bf16(&mut out, hp, TensorView::Bf16(g), e, h);
            TensorData::Bf16(out)
        }
    };
    let mut gate_up = vec![bf16::ZERO; slots * 2 * ip * hp];
    let mut down = vec![bf16::ZERO; slots * hp * ip];
    for s in 0..slots {
        let (gu, d) = (w.slot_gate_up(s), w.slot_down(s));
        let dst = &mut gate_up[s * 2 * ip * hp..(s + 1) * 2 * ip * hp];
        // Gate rows 0..I, then up rows at Ip..Ip + I.
        copy_rows_bf16(&mut dst[..ip * hp], hp, gu.slice(0..i * h), i, h);
        copy_rows_bf16(&mut dst[ip * hp..], hp, gu.slice(i * h..2 * i * h), i, h);
        copy_rows_bf16(&mut down[s * hp * ip..(s + 1) * hp * ip], ip, d, h, i);
    }
    let mut layer = MoeLayer::new(MoeWeights {
        cfg: padded_cfg.clone(),
        router_gate,
        router_bias: w.router_bias().cloned(),
        gate_up: TensorData::Bf16(gate_up),
        down: TensorData::Bf16(down),
        shard: ExpertShard::full(&padded_cfg),
    });
    layer.set_precision(Precision::Bf16);
    layer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouterConfig;

    /// The padded form computes what the layer computes, on the CPU: padding is exact.
    #[test]
    fn padded_device_form_equals_the_layer() {
        let cfg = MoeConfig {
            hidden_size: 40,
            moe_intermediate_size: 24,
            n_shared_experts: 2,
            router: RouterConfig { n_experts: 12, top_k: 4, n_group: 3, topk_group: 2, ..RouterConfig::dots1() },
        };
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let mut layer = MoeLayer::new(MoeWeights::synthetic(&cfg, dtype, 3).unwrap());
            layer.set_precision(Precision::Bf16);
            // The reference with bf16-rounded expert weights (the device form's storage).
            let rounded = device_form(layer.weights());
            assert_eq!(rounded.config().hidden_size, HIDDEN_MULTIPLE);
            assert_eq!(rounded.config().moe_intermediate_size, INTER_MULTIPLE);
            let tokens = 9;
            let x = crate::roofline::random_hidden(tokens, 40, 5);
            let padded: Vec<f32> = x
                .chunks(40)
                .flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(0.0, HIDDEN_MULTIPLE - 40)))
                .collect();
            let got = rounded.forward(TensorView::F32(&padded), tokens).unwrap();
            let want_routing = layer.route(TensorView::F32(&x), tokens).unwrap();
            let got_routing = rounded.route(TensorView::F32(&padded), tokens).unwrap();
            assert_eq!(got_routing.expert_ids, want_routing.expert_ids, "{dtype:?}: routing changed by padding");
            let want = if dtype == Dtype::Bf16 {
                layer.forward(TensorView::F32(&x), tokens).unwrap()
            } else {
                // f32 weights are rounded to bf16 in the device form: compare against the
                // unpadded layer built from the rounded weights.
                let w = layer.weights();
                let round =
                    |v: TensorView<'_>| TensorData::Bf16(v.to_f32_vec().into_iter().map(bf16::from_f32).collect());
                let mut same = MoeLayer::new(MoeWeights {
                    cfg: cfg.clone(),
                    router_gate: TensorData::F32(w.router_gate().to_f32_vec()),
                    router_bias: w.router_bias().cloned(),
                    gate_up: round(w.gate_up()),
                    down: round(w.down()),
                    shard: ExpertShard::full(&cfg),
                });
                same.set_precision(Precision::Bf16);
                same.forward(TensorView::F32(&x), tokens).unwrap()
            };
            for t in 0..tokens {
                let row = &got[t * HIDDEN_MULTIPLE..(t + 1) * HIDDEN_MULTIPLE];
                assert!(row[40..].iter().all(|&v| v == 0.0), "{dtype:?}: padded output columns are not zero");
                for c in 0..40 {
                    let (g, w) = (row[c], want[t * 40 + c]);
                    assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{dtype:?}: token {t} column {c}: {g} vs {w}");
                }
            }
        }
    }
}
