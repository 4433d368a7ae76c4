//! `dots_moe._native`: the thin binding under the `dots_moe` Python package.
//!
//! Tensors arrive as `(address, elements)` of their own memory (no copy): the Python side
//! (`dots_moe/_tensors.py`) checks each is a CPU, contiguous f32 or bf16 tensor and keeps
//! it alive for the call; here addresses are checked for null and alignment and lengths
//! against the layer's shapes. Outputs are written into tensors the caller allocated. Every error is a
//! Python exception (`ValueError`, `TypeError`, or `RuntimeError` for an internal one); a
//! Rust panic is caught at each entry and never unwinds into Python.

use std::panic::{AssertUnwindSafe, catch_unwind};

use dots_moe::MoeError;
use dots_moe::config::{MoeConfig, RouterConfig, Scoring};
use dots_moe::moe::{ExpertShard, MoeLayer, MoeLayerBuilder, Precision, Routing, route_logits};
use dots_moe::tensor::{Dtype, TensorView};
use half::bf16;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

/// Runs `f` with panics turned into `RuntimeError` and the GIL released.
fn guarded<R: Send>(py: Python<'_>, f: impl FnOnce() -> PyResult<R> + Send) -> PyResult<R> {
    py.detach(|| match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let what = dots_moe::error::panic_message(payload.as_ref());
            Err(PyRuntimeError::new_err(format!("dots_moe internal error (please report): {what}")))
        }
    })
}

fn moe_err(e: MoeError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// A tensor handed over as `(address, elements)` of its memory: the Python side has checked
/// it is a live, CPU, C-contiguous tensor of the stated dtype and keeps it alive for the
/// call (the buffer protocol is outside the limited API before Python 3.11).
type Raw = (usize, usize);

/// A read-only tensor of `f32` or `bf16`.
#[derive(Clone, Copy)]
struct Buf {
    addr: usize,
    len: usize,
    dtype: Dtype,
}

fn dtype_of(name: &str, code: &str) -> PyResult<Dtype> {
    match code {
        "f32" => Ok(Dtype::F32),
        "bf16" => Ok(Dtype::Bf16),
        other => Err(PyTypeError::new_err(format!("{name}: dtype {other:?} is neither \"f32\" nor \"bf16\""))),
    }
}

/// Checks `raw` can hold `len` elements of `size` bytes aligned to `align`.
fn check_raw(raw: Raw, size: usize, name: &str) -> PyResult<()> {
    let (addr, len) = raw;
    if len > 0 && (addr == 0 || !addr.is_multiple_of(size)) {
        return Err(PyValueError::new_err(format!("{name}: address {addr:#x} is null or not {size}-byte aligned")));
    }
    if len.checked_mul(size).is_none_or(|b| b > isize::MAX as usize) {
        return Err(PyValueError::new_err(format!("{name}: {len} elements are too many")));
    }
    Ok(())
}

impl Buf {
    fn get(raw: Raw, dtype: &str, name: &str) -> PyResult<Self> {
        let dtype = dtype_of(name, dtype)?;
        check_raw(raw, dtype.size(), name)?;
        Ok(Buf { addr: raw.0, len: raw.1, dtype })
    }

    /// The elements.
    fn view(&self) -> TensorView<'_> {
        if self.len == 0 {
            // An empty tensor's address may be null: never build a slice from it.
            return match self.dtype {
                Dtype::F32 => TensorView::F32(&[]),
                Dtype::Bf16 => TensorView::Bf16(&[]),
            };
        }
        // SAFETY: non-null and aligned (checked), `len` live elements of `dtype` kept alive
        // by the caller for the call (the Python side's contract).
        unsafe {
            match self.dtype {
                Dtype::F32 => TensorView::F32(std::slice::from_raw_parts(self.addr as *const f32, self.len)),
                Dtype::Bf16 => TensorView::Bf16(std::slice::from_raw_parts(self.addr as *const bf16, self.len)),
            }
        }
    }
}

/// A writable output of `len` elements of `T`.
#[derive(Clone, Copy)]
struct Out {
    addr: usize,
    len: usize,
}

fn out_buf<T>(raw: Raw, len: usize, name: &str) -> PyResult<Out> {
    check_raw(raw, std::mem::size_of::<T>(), name)?;
    if raw.1 != len {
        return Err(PyValueError::new_err(format!("{name}: need {len} elements, got {}", raw.1)));
    }
    Ok(Out { addr: raw.0, len })
}

fn write<T: Copy>(out: Out, values: &[T]) {
    assert_eq!(out.len, values.len(), "output length checked by out_buf");
    if values.is_empty() {
        return; // an empty tensor's address may be null
    }
    // SAFETY: non-null, aligned, `len` writable elements the caller owns (out_buf, the
    // Python side's contract).
    let dst = unsafe { std::slice::from_raw_parts_mut(out.addr as *mut T, out.len) };
    dst.copy_from_slice(values);
}

/// Reads `[T, k]` int32 ids and f32 weights.
fn read_routing(ids: Raw, weights: Raw, tokens: usize, top_k: usize) -> PyResult<Routing> {
    let n = tokens.checked_mul(top_k).ok_or_else(|| PyValueError::new_err("topk_ids: size overflows"))?;
    for (name, raw) in [("topk_ids", ids), ("topk_weights", weights)] {
        check_raw(raw, 4, name)?;
        if raw.1 != n {
            return Err(PyValueError::new_err(format!("{name}: need [{tokens}, {top_k}], got {} elements", raw.1)));
        }
    }
    if n == 0 {
        return Ok(Routing { tokens, top_k, expert_ids: Vec::new(), weights: Vec::new() });
    }
    // SAFETY: checked non-null, aligned, n elements; kept alive by the caller.
    let (ids, w) = unsafe {
        (std::slice::from_raw_parts(ids.0 as *const i32, n), std::slice::from_raw_parts(weights.0 as *const f32, n))
    };
    let mut expert_ids = Vec::with_capacity(n);
    for (p, &id) in ids.iter().enumerate() {
        let id = u32::try_from(id).map_err(|_| {
            PyValueError::new_err(format!("topk_ids: token {} has negative expert id {id}", p / top_k.max(1)))
        })?;
        expert_ids.push(id);
    }
    Ok(Routing { tokens, top_k, expert_ids, weights: w.to_vec() })
}

fn precision_of(code: &str) -> PyResult<Precision> {
    match code {
        "bf16" => Ok(Precision::Bf16),
        "f32" => Ok(Precision::F32),
        other => Err(PyValueError::new_err(format!("precision {other:?} is neither \"bf16\" nor \"f32\""))),
    }
}

fn scoring_of(name: &str) -> PyResult<Scoring> {
    Scoring::from_hf(name).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// One MoE layer (or one expert-parallel part of it), built by [`build_layer`].
#[pyclass(frozen, module = "dots_moe._native")]
struct Layer {
    layer: MoeLayer,
}

#[pymethods]
impl Layer {
    /// `(hidden_size, moe_intermediate_size, n_experts, top_k, n_shared_experts)`.
    #[getter]
    fn shape(&self) -> (usize, usize, usize, usize, usize) {
        let c = self.layer.config();
        (c.hidden_size, c.moe_intermediate_size, c.router.n_experts, c.router.top_k, c.n_shared_experts)
    }

    /// `(expert_begin, expert_end, shared_experts)` held.
    #[getter]
    fn shard(&self) -> (usize, usize, bool) {
        let s = self.layer.shard();
        (s.routed.start, s.routed.end, s.shared)
    }

    /// Writes the (partial) output `[T, H]` f32 of `x [T, H]` into `out`.
    fn forward(&self, py: Python<'_>, x: Raw, x_dtype: &str, tokens: usize, out: Raw) -> PyResult<()> {
        let h = self.layer.config().hidden_size;
        let x = Buf::get(x, x_dtype, "hidden_states")?;
        let out = out_buf::<f32>(out, tokens * h, "out")?;
        guarded(py, || {
            let y = self.layer.forward(x.view(), tokens).map_err(moe_err)?;
            write(out, &y);
            Ok(())
        })
    }

    /// Writes the routing of `x [T, H]`: `ids [T, k]` int32 and `weights [T, k]` f32.
    fn route(&self, py: Python<'_>, x: Raw, x_dtype: &str, tokens: usize, ids: Raw, weights: Raw) -> PyResult<()> {
        let k = self.layer.config().router.top_k;
        let x = Buf::get(x, x_dtype, "hidden_states")?;
        let ids = out_buf::<i32>(ids, tokens * k, "topk_ids")?;
        let weights = out_buf::<f32>(weights, tokens * k, "topk_weights")?;
        guarded(py, || {
            let r = self.layer.route(x.view(), tokens).map_err(moe_err)?;
            let as_i32: Vec<i32> = r.expert_ids.iter().map(|&i| i as i32).collect();
            write(ids, &as_i32);
            write(weights, &r.weights);
            Ok(())
        })
    }

    /// Writes the (partial) output of `x [T, H]` under the given routing `ids`, `weights`
    /// `[T, top_k]` (int32, f32) into `out`.
    #[allow(clippy::too_many_arguments)] // the tensors, their dtype and shape
    fn forward_routed(
        &self,
        py: Python<'_>,
        x: Raw,
        x_dtype: &str,
        tokens: usize,
        ids: Raw,
        weights: Raw,
        top_k: usize,
        out: Raw,
    ) -> PyResult<()> {
        let h = self.layer.config().hidden_size;
        let x = Buf::get(x, x_dtype, "hidden_states")?;
        let routing = read_routing(ids, weights, tokens, top_k)?;
        let out = out_buf::<f32>(out, tokens * h, "out")?;
        guarded(py, || {
            let y = self.layer.forward_routed(x.view(), tokens, &routing).map_err(moe_err)?;
            write(out, &y);
            Ok(())
        })
    }
}

/// Builds a layer (or the part holding experts `expert_begin..expert_end` and, if
/// `shared`, the shared experts). `experts` is a list of `(gate [I,H], up [I,H],
/// down [H,I])` for the held experts in order; `shared_mlp` the shared MLP
/// `(gate [n_shared*I,H], up [n_shared*I,H], down [H,n_shared*I])` or None. Every weight buffer is of `w_dtype`.
#[pyfunction]
#[pyo3(signature = (hidden_size, moe_intermediate_size, n_experts, top_k, n_shared_experts, n_group, topk_group,
                    scoring, norm_topk_prob, routed_scaling_factor, w_dtype, router_gate, router_bias,
                    expert_begin, expert_end, experts, shared, shared_mlp, precision))]
#[allow(clippy::too_many_arguments)] // one keyword per field of the config
fn build_layer(
    py: Python<'_>,
    hidden_size: usize,
    moe_intermediate_size: usize,
    n_experts: usize,
    top_k: usize,
    n_shared_experts: usize,
    n_group: usize,
    topk_group: usize,
    scoring: &str,
    norm_topk_prob: bool,
    routed_scaling_factor: f32,
    w_dtype: &str,
    router_gate: Raw,
    router_bias: Option<Raw>,
    expert_begin: usize,
    expert_end: usize,
    experts: Vec<(Raw, Raw, Raw)>,
    shared: bool,
    shared_mlp: Option<(Raw, Raw, Raw)>,
    precision: &str,
) -> PyResult<Layer> {
    let cfg = MoeConfig {
        hidden_size,
        moe_intermediate_size,
        n_shared_experts,
        router: RouterConfig {
            n_experts,
            top_k,
            n_group,
            topk_group,
            scoring: scoring_of(scoring)?,
            norm_topk_prob,
            routed_scaling_factor,
        },
    };
    let dtype = dtype_of("weights", w_dtype)?;
    let precision = precision_of(precision)?;
    if expert_end < expert_begin || experts.len() != expert_end - expert_begin {
        return Err(PyValueError::new_err(format!(
            "local experts {expert_begin}..{expert_end}: {} experts given",
            experts.len()
        )));
    }
    let gate = Buf::get(router_gate, w_dtype, "gate.weight")?;
    let bias = router_bias.map(|b| Buf::get(b, "f32", "gate.e_score_correction_bias")).transpose()?;
    let mut bufs = Vec::with_capacity(experts.len());
    for (n, &(g, u, d)) in experts.iter().enumerate() {
        let e = expert_begin + n;
        bufs.push((
            Buf::get(g, w_dtype, &format!("experts.{e}.gate_proj.weight"))?,
            Buf::get(u, w_dtype, &format!("experts.{e}.up_proj.weight"))?,
            Buf::get(d, w_dtype, &format!("experts.{e}.down_proj.weight"))?,
        ));
    }
    let shared_bufs = match shared_mlp {
        Some((g, u, d)) => Some((
            Buf::get(g, w_dtype, "shared_experts.gate_proj.weight")?,
            Buf::get(u, w_dtype, "shared_experts.up_proj.weight")?,
            Buf::get(d, w_dtype, "shared_experts.down_proj.weight")?,
        )),
        None => None,
    };
    guarded(py, || {
        let shard = ExpertShard { routed: expert_begin..expert_end, shared };
        let mut b = MoeLayerBuilder::with_shard(cfg, dtype, shard).map_err(moe_err)?;
        b.router(gate.view(), bias.as_ref().map(Buf::view)).map_err(moe_err)?;
        for (n, (g, u, d)) in bufs.iter().enumerate() {
            b.expert(expert_begin + n, g.view(), u.view(), d.view()).map_err(moe_err)?;
        }
        if let Some((g, u, d)) = &shared_bufs {
            b.shared(g.view(), u.view(), d.view()).map_err(moe_err)?;
        }
        let mut layer = b.build().map_err(moe_err)?;
        layer.set_precision(precision);
        Ok(Layer { layer })
    })
}

/// vLLM's `grouped_topk` on router logits `[T, E]`: writes `ids [T, k]` (int32) and
/// `weights [T, k]` (f32).
#[pyfunction]
#[allow(clippy::too_many_arguments)] // vLLM's signature
fn grouped_topk(
    py: Python<'_>,
    logits: Raw,
    logits_dtype: &str,
    tokens: usize,
    n_experts: usize,
    topk: usize,
    renormalize: bool,
    n_group: usize,
    topk_group: usize,
    scoring: &str,
    routed_scaling_factor: f32,
    bias: Option<Raw>,
    ids: Raw,
    weights: Raw,
) -> PyResult<()> {
    let cfg = RouterConfig {
        n_experts,
        top_k: topk,
        n_group,
        topk_group,
        scoring: scoring_of(scoring)?,
        norm_topk_prob: renormalize,
        routed_scaling_factor,
    };
    cfg.validate().map_err(|e| PyValueError::new_err(e.to_string()))?;
    let logits = Buf::get(logits, logits_dtype, "gating_output")?;
    let bias = bias.map(|b| Buf::get(b, "f32", "e_score_correction_bias")).transpose()?;
    let ids = out_buf::<i32>(ids, tokens * topk, "topk_ids")?;
    let weights = out_buf::<f32>(weights, tokens * topk, "topk_weights")?;
    guarded(py, || {
        let logits = logits.view().to_f32_vec();
        let bias = bias.as_ref().map(|b| b.view().to_f32_vec());
        let r = route_logits(&cfg, &logits, tokens, bias.as_deref()).map_err(moe_err)?;
        let as_i32: Vec<i32> = r.expert_ids.iter().map(|&i| i as i32).collect();
        write(ids, &as_i32);
        write(weights, &r.weights);
        Ok(())
    })
}

/// vLLM's `fused_experts` without shared experts: `w1 [E, 2I, H]` (gate rows, then up
/// rows), `w2 [E, H, I]`, routing `ids`/`weights [T, k]`; writes `out [T, H]` f32.
#[pyfunction]
#[allow(clippy::too_many_arguments)] // the tensors with their dtypes and shape
fn fused_experts(
    py: Python<'_>,
    x: Raw,
    x_dtype: &str,
    w1: Raw,
    w2: Raw,
    w_dtype: &str,
    tokens: usize,
    hidden_size: usize,
    intermediate_size: usize,
    n_experts: usize,
    ids: Raw,
    weights: Raw,
    top_k: usize,
    precision: &str,
    out: Raw,
) -> PyResult<()> {
    let (h, i, e) = (hidden_size, intermediate_size, n_experts);
    let dtype = dtype_of("w1", w_dtype)?;
    let precision = precision_of(precision)?;
    let x = Buf::get(x, x_dtype, "hidden_states")?;
    let w1 = Buf::get(w1, w_dtype, "w1")?;
    let w2 = Buf::get(w2, w_dtype, "w2")?;
    let routing = read_routing(ids, weights, tokens, top_k)?;
    let out = out_buf::<f32>(out, tokens * h, "out")?;
    guarded(py, || {
        let cfg = MoeConfig {
            hidden_size: h,
            moe_intermediate_size: i,
            n_shared_experts: 0,
            router: RouterConfig { n_experts: e, top_k: top_k.clamp(1, e.max(1)), ..RouterConfig::dots1() },
        };
        let (w1, w2) = (w1.view(), w2.view());
        dots_moe::error::check_len("w1", &[e, 2 * i, h], w1.len()).map_err(moe_err)?;
        dots_moe::error::check_len("w2", &[e, h, i], w2.len()).map_err(moe_err)?;
        let mut b = MoeLayerBuilder::new(cfg, dtype).map_err(moe_err)?;
        // The router is never used (the routing is given); it only has to be present.
        let zeros = vec![0.0f32; e * h];
        b.router(TensorView::F32(&zeros), None).map_err(moe_err)?;
        for ex in 0..e {
            let gu = w1.slice(ex * 2 * i * h..(ex + 1) * 2 * i * h);
            b.expert(ex, gu.slice(0..i * h), gu.slice(i * h..2 * i * h), w2.slice(ex * h * i..(ex + 1) * h * i))
                .map_err(moe_err)?;
        }
        let mut layer = b.build().map_err(moe_err)?;
        layer.set_precision(precision);
        let y = layer.forward_routed(x.view(), tokens, &routing).map_err(moe_err)?;
        write(out, &y);
        Ok(())
    })
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Layer>()?;
    m.add_function(wrap_pyfunction!(build_layer, m)?)?;
    m.add_function(wrap_pyfunction!(grouped_topk, m)?)?;
    m.add_function(wrap_pyfunction!(fused_experts, m)?)?;
    Ok(())
}
