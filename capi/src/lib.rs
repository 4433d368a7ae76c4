//! The C ABI of dots-moe: one MoE layer behind an opaque handle.
//!
//! Every function returns a [`DotsMoeStatus`]; on failure the thread's last error
//! ([`dots_moe_last_error`]) says what was wrong, naming the argument. No panic crosses
//! the boundary: each entry point runs under `catch_unwind` and reports a panic as
//! [`DotsMoeStatus::DotsMoeErrPanic`]. Buffers are host memory, row-major, given with
//! their length in elements, checked against the layer's shape before any is read.
//! bf16 values travel as `uint16_t` bit patterns.
//!
//! The layer is the CPU reference ([`dots_moe::moe::MoeLayer`]); `include/dots_moe.h` is
//! generated from this file by cbindgen (`tests/header.rs` fails when it is stale).
#![warn(missing_docs, unsafe_op_in_unsafe_fn)]

use std::cell::RefCell;
use std::ffi::{CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use dots_moe::config::{MoeConfig, RouterConfig, Scoring};
use dots_moe::moe::{ExpertShard, MoeLayer, MoeLayerBuilder, Precision, Routing};
use dots_moe::tensor::{Dtype, TensorView};
use dots_moe::{ConfigError, MoeError};
use half::bf16;

/// Element type code: IEEE `float`.
pub const DOTS_MOE_F32: u32 = 0;
/// Element type code: bfloat16, as `uint16_t` bit patterns.
pub const DOTS_MOE_BF16: u32 = 1;
/// Scoring code: `sigmoid(logit)`, the bias choosing only (dots.llm1).
pub const DOTS_MOE_SCORING_SIGMOID: u32 = 0;
/// Scoring code: softmax over all experts.
pub const DOTS_MOE_SCORING_SOFTMAX: u32 = 1;
/// Precision code: the expert GEMMs' inputs rounded to bf16 (what a bf16 engine computes).
pub const DOTS_MOE_PRECISION_BF16: u32 = 0;
/// Precision code: the expert GEMMs' inputs kept f32.
pub const DOTS_MOE_PRECISION_F32: u32 = 1;

/// What a call returned. Anything but `DOTS_MOE_OK` leaves a message in
/// [`dots_moe_last_error`] and writes no output.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DotsMoeStatus {
    /// Success.
    DotsMoeOk = 0,
    /// A required pointer was null.
    DotsMoeErrNullPointer = 1,
    /// An argument is out of its range (an unknown code, an inconsistent config, an
    /// expert range outside `0..E`, a misaligned buffer).
    DotsMoeErrInvalidArgument = 2,
    /// A buffer's length does not match the shape the layer implies.
    DotsMoeErrShape = 3,
    /// A value is unusable: a non-finite router logit or bias, a malformed routing.
    DotsMoeErrBadValue = 4,
    /// The layer cannot run on this machine.
    DotsMoeErrUnsupported = 5,
    /// An internal error (a bug): the call was abandoned, nothing was written.
    DotsMoeErrPanic = 6,
}

/// The shape of one MoE layer and its router.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DotsMoeConfig {
    /// Model width `H`.
    pub hidden_size: usize,
    /// Width `I` of one routed expert.
    pub moe_intermediate_size: usize,
    /// Routed experts `E`.
    pub n_experts: usize,
    /// Experts per token `k`.
    pub top_k: usize,
    /// Shared experts `n_shared` (one MLP of width `n_shared * I`).
    pub n_shared_experts: usize,
    /// Expert groups (1: no grouping).
    pub n_group: usize,
    /// Groups kept per token.
    pub topk_group: usize,
    /// `DOTS_MOE_SCORING_SIGMOID` or `DOTS_MOE_SCORING_SOFTMAX`.
    pub scoring: u32,
    /// Nonzero: normalise the chosen weights to sum to one before scaling.
    pub norm_topk_prob: u32,
    /// Multiplier of the routed weights (2.5 for dots.llm1).
    pub routed_scaling_factor: f32,
}

/// Everything a layer is built from. Weights are copied into the layer; the caller's
/// buffers may be freed once [`dots_moe_layer_new`] returns. All weight buffers share
/// `weight_dtype`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DotsMoeLayerDesc {
    /// The layer's shape.
    pub config: DotsMoeConfig,
    /// `DOTS_MOE_F32` or `DOTS_MOE_BF16`: the element type of every weight buffer.
    pub weight_dtype: u32,
    /// `DOTS_MOE_PRECISION_BF16` or `DOTS_MOE_PRECISION_F32`.
    pub precision: u32,
    /// Router weight `[E, H]`.
    pub router_gate: *const c_void,
    /// Elements in `router_gate`.
    pub router_gate_len: usize,
    /// Score-correction bias `[E]` (f32), or null for none.
    pub router_bias: *const f32,
    /// Elements in `router_bias`.
    pub router_bias_len: usize,
    /// First routed expert this layer holds (expert parallelism; 0 for all).
    pub expert_begin: usize,
    /// One past the last routed expert held (`n_experts` for all).
    pub expert_end: usize,
    /// Stacked gate and up weights of the held experts, `[expert_end - expert_begin, 2I, H]`:
    /// per expert, gate rows `0..I`, then up rows `I..2I`.
    pub experts_gate_up: *const c_void,
    /// Elements in `experts_gate_up`.
    pub experts_gate_up_len: usize,
    /// Down weights of the held experts, `[expert_end - expert_begin, H, I]`.
    pub experts_down: *const c_void,
    /// Elements in `experts_down`.
    pub experts_down_len: usize,
    /// Nonzero: the layer holds and computes the shared experts (give the three buffers
    /// below); zero: it leaves them out (they may be null).
    pub shared_experts: u32,
    /// Shared MLP gate `[n_shared*I, H]`.
    pub shared_gate: *const c_void,
    /// Elements in `shared_gate`.
    pub shared_gate_len: usize,
    /// Shared MLP up `[n_shared*I, H]`.
    pub shared_up: *const c_void,
    /// Elements in `shared_up`.
    pub shared_up_len: usize,
    /// Shared MLP down `[H, n_shared*I]`.
    pub shared_down: *const c_void,
    /// Elements in `shared_down`.
    pub shared_down_len: usize,
}

/// An MoE layer (opaque). Calls on one layer from several threads at once are fine.
pub struct DotsMoeLayer {
    layer: MoeLayer,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// A failed call: its status and message.
struct Failure(DotsMoeStatus, String);

impl From<MoeError> for Failure {
    fn from(e: MoeError) -> Self {
        let status = match &e {
            MoeError::Shape { .. } => DotsMoeStatus::DotsMoeErrShape,
            MoeError::NonFiniteLogit { .. }
            | MoeError::NonFiniteBias { .. }
            | MoeError::BadRouting { .. }
            | MoeError::BadPermutation(_) => DotsMoeStatus::DotsMoeErrBadValue,
            MoeError::Unsupported(_) | MoeError::Limit { .. } => DotsMoeStatus::DotsMoeErrUnsupported,
            _ => DotsMoeStatus::DotsMoeErrInvalidArgument,
        };
        Failure(status, e.to_string())
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure(DotsMoeStatus::DotsMoeErrInvalidArgument, e.to_string())
    }
}

fn invalid(msg: String) -> Failure {
    Failure(DotsMoeStatus::DotsMoeErrInvalidArgument, msg)
}

fn set_last_error(msg: &str) {
    let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = msg);
}

/// Runs `f` with panics caught; records the error of a failure.
fn guard(f: impl FnOnce() -> Result<(), Failure>) -> DotsMoeStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last_error("");
            DotsMoeStatus::DotsMoeOk
        }
        Ok(Err(Failure(status, msg))) => {
            set_last_error(&msg);
            status
        }
        Err(payload) => {
            let what = dots_moe::error::panic_message(payload.as_ref());
            set_last_error(&format!("internal error (please report): {what}"));
            DotsMoeStatus::DotsMoeErrPanic
        }
    }
}

fn non_null<T>(p: *const T, name: &str) -> Result<(), Failure> {
    if p.is_null() {
        return Err(Failure(DotsMoeStatus::DotsMoeErrNullPointer, format!("`{name}` is null")));
    }
    Ok(())
}

/// A slice over `len` elements at `p`, checked for null and alignment.
///
/// # Safety
/// `p` must point to `len` readable `T` that stay valid and unchanged for `'a`.
unsafe fn slice<'a, T>(p: *const T, len: usize, name: &str) -> Result<&'a [T], Failure> {
    non_null(p, name)?;
    if !p.is_aligned() {
        return Err(invalid(format!("`{name}` is not aligned to {} bytes", std::mem::align_of::<T>())));
    }
    if len.checked_mul(std::mem::size_of::<T>()).is_none_or(|b| b > isize::MAX as usize) {
        return Err(Failure(DotsMoeStatus::DotsMoeErrShape, format!("`{name}`: length {len} is too large")));
    }
    // SAFETY: non-null, aligned, size in range; validity is the caller's promise.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// A writable slice, checked like [`slice`].
///
/// # Safety
/// `p` must point to `len` writable `T`, not otherwise accessed during `'a`.
unsafe fn slice_mut<'a, T>(p: *mut T, len: usize, name: &str) -> Result<&'a mut [T], Failure> {
    // SAFETY: forwarded.
    unsafe { slice(p.cast_const(), len, name)? };
    // SAFETY: checked above; exclusivity is the caller's promise.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

fn dtype(code: u32, name: &str) -> Result<Dtype, Failure> {
    match code {
        DOTS_MOE_F32 => Ok(Dtype::F32),
        DOTS_MOE_BF16 => Ok(Dtype::Bf16),
        other => Err(invalid(format!("`{name}` = {other} is not DOTS_MOE_F32 (0) or DOTS_MOE_BF16 (1)"))),
    }
}

/// A tensor view of `len` elements of `dtype` at `p`.
///
/// # Safety
/// As [`slice`].
/// The hidden states `[tokens, H]` of `layer` at `hidden`, in the dtype code `hidden_dtype`.
///
/// # Safety
/// As [`view`]: `hidden` holds `tokens * H` elements of that dtype, live for `'a`.
unsafe fn hidden_view<'a>(
    layer: &MoeLayer,
    hidden_dtype: u32,
    hidden: *const c_void,
    tokens: usize,
) -> Result<TensorView<'a>, Failure> {
    let h = layer.config().hidden_size;
    let n = tokens.checked_mul(h).ok_or_else(|| invalid(format!("{tokens} tokens x {h} overflows")))?;
    // SAFETY: forwarded.
    unsafe { view(hidden, n, dtype(hidden_dtype, "hidden_dtype")?, "hidden") }
}

unsafe fn view<'a>(p: *const c_void, len: usize, dtype: Dtype, name: &str) -> Result<TensorView<'a>, Failure> {
    // SAFETY (both): forwarded.
    Ok(match dtype {
        Dtype::F32 => TensorView::F32(unsafe { slice(p.cast::<f32>(), len, name)? }),
        Dtype::Bf16 => TensorView::Bf16(unsafe { slice(p.cast::<bf16>(), len, name)? }),
    })
}

impl DotsMoeConfig {
    fn to_config(self) -> Result<MoeConfig, Failure> {
        let scoring = match self.scoring {
            DOTS_MOE_SCORING_SIGMOID => Scoring::Sigmoid,
            DOTS_MOE_SCORING_SOFTMAX => Scoring::Softmax,
            other => return Err(invalid(format!("`config.scoring` = {other} is not a DOTS_MOE_SCORING_* code"))),
        };
        let cfg = MoeConfig {
            hidden_size: self.hidden_size,
            moe_intermediate_size: self.moe_intermediate_size,
            n_shared_experts: self.n_shared_experts,
            router: RouterConfig {
                n_experts: self.n_experts,
                top_k: self.top_k,
                n_group: self.n_group,
                topk_group: self.topk_group,
                scoring,
                norm_topk_prob: self.norm_topk_prob != 0,
                routed_scaling_factor: self.routed_scaling_factor,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Builds the layer `desc` describes.
///
/// # Safety
/// Every non-null pointer of `desc` must point to as many readable elements as its
/// length says.
unsafe fn build(desc: &DotsMoeLayerDesc) -> Result<MoeLayer, Failure> {
    let cfg = desc.config.to_config()?;
    let wd = dtype(desc.weight_dtype, "weight_dtype")?;
    let precision = match desc.precision {
        DOTS_MOE_PRECISION_BF16 => Precision::Bf16,
        DOTS_MOE_PRECISION_F32 => Precision::F32,
        other => return Err(invalid(format!("`precision` = {other} is not a DOTS_MOE_PRECISION_* code"))),
    };
    let shard = ExpertShard { routed: desc.expert_begin..desc.expert_end, shared: desc.shared_experts != 0 };
    let mut builder = MoeLayerBuilder::with_shard(cfg.clone(), wd, shard.clone())?;
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    // SAFETY (all the views): the caller's promise on `desc`.
    let gate = unsafe { view(desc.router_gate, desc.router_gate_len, wd, "router_gate")? };
    let bias = if desc.router_bias.is_null() {
        None
    } else {
        Some(TensorView::F32(unsafe { slice(desc.router_bias, desc.router_bias_len, "router_bias")? }))
    };
    builder.router(gate, bias)?;
    let n_local = shard.routed.len();
    let gate_up = unsafe { view(desc.experts_gate_up, desc.experts_gate_up_len, wd, "experts_gate_up")? };
    let down = unsafe { view(desc.experts_down, desc.experts_down_len, wd, "experts_down")? };
    dots_moe::error::check_len("experts_gate_up", &[n_local, 2 * i, h], gate_up.len())?;
    dots_moe::error::check_len("experts_down", &[n_local, h, i], down.len())?;
    for (n, e) in shard.routed.clone().enumerate() {
        let gu = gate_up.slice(n * 2 * i * h..(n + 1) * 2 * i * h);
        builder.expert(e, gu.slice(0..i * h), gu.slice(i * h..2 * i * h), down.slice(n * h * i..(n + 1) * h * i))?;
    }
    if shard.shared && cfg.n_shared_experts > 0 {
        let g = unsafe { view(desc.shared_gate, desc.shared_gate_len, wd, "shared_gate")? };
        let u = unsafe { view(desc.shared_up, desc.shared_up_len, wd, "shared_up")? };
        let d = unsafe { view(desc.shared_down, desc.shared_down_len, wd, "shared_down")? };
        builder.shared(g, u, d)?;
    }
    let mut layer = builder.build()?;
    layer.set_precision(precision);
    Ok(layer)
}

/// Builds a layer from `desc` into `*out` (free it with [`dots_moe_layer_free`]). On
/// failure `*out` is set to null.
///
/// # Safety
/// `desc` must point to a valid descriptor whose buffers hold the lengths it states;
/// `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dots_moe_layer_new(
    desc: *const DotsMoeLayerDesc,
    out: *mut *mut DotsMoeLayer,
) -> DotsMoeStatus {
    guard(|| {
        non_null(out, "out")?;
        // SAFETY: checked non-null; writable by the caller's promise.
        unsafe { *out = std::ptr::null_mut() };
        non_null(desc, "desc")?;
        // SAFETY: non-null; valid by the caller's promise.
        let layer = unsafe { build(&*desc)? };
        // SAFETY: as above.
        unsafe { *out = Box::into_raw(Box::new(DotsMoeLayer { layer })) };
        Ok(())
    })
}

/// Frees a layer. A null `layer` is fine.
///
/// # Safety
/// `layer` must come from [`dots_moe_layer_new`] and not be used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dots_moe_layer_free(layer: *mut DotsMoeLayer) -> DotsMoeStatus {
    guard(|| {
        if !layer.is_null() {
            // SAFETY: from Box::into_raw in dots_moe_layer_new, freed once.
            drop(unsafe { Box::from_raw(layer) });
        }
        Ok(())
    })
}

/// The layer behind a handle.
///
/// # Safety
/// `layer` must be null or a live handle.
unsafe fn layer_ref<'a>(layer: *const DotsMoeLayer) -> Result<&'a MoeLayer, Failure> {
    non_null(layer, "layer")?;
    // SAFETY: non-null and live by the caller's promise.
    Ok(unsafe { &(*layer).layer })
}

/// The layer's output `out [T, H]` (f32) for `hidden [T, H]` of `hidden_dtype`. A layer
/// holding some experts only (`expert_begin..expert_end`, `shared_experts`) writes its
/// partial output: summed over layers that hold every expert once, the whole output.
///
/// # Safety
/// `layer` a live handle; `hidden` holds `tokens * H` elements; `out` holds `out_len`
/// writable floats.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dots_moe_layer_forward(
    layer: *const DotsMoeLayer,
    hidden_dtype: u32,
    hidden: *const c_void,
    tokens: usize,
    out: *mut f32,
    out_len: usize,
) -> DotsMoeStatus {
    guard(|| {
        // SAFETY (all): the caller's promises.
        let layer = unsafe { layer_ref(layer)? };
        let h = layer.config().hidden_size;
        let x = unsafe { hidden_view(layer, hidden_dtype, hidden, tokens)? };
        dots_moe::error::check_len("out", &[tokens, h], out_len)?;
        let out = unsafe { slice_mut(out, out_len, "out")? };
        let y = layer.forward(x, tokens)?;
        out.copy_from_slice(&y);
        Ok(())
    })
}

/// Routes `hidden [T, H]`: `expert_ids [T, k]` (descending choice, ties to the lower
/// index) and `weights [T, k]` (f32); `len` is the length of each (`T * k`). Routing is
/// always computed in full, whatever experts the layer holds.
///
/// # Safety
/// As [`dots_moe_layer_forward`]; `expert_ids` and `weights` hold `len` writable elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dots_moe_layer_route(
    layer: *const DotsMoeLayer,
    hidden_dtype: u32,
    hidden: *const c_void,
    tokens: usize,
    expert_ids: *mut u32,
    weights: *mut f32,
    len: usize,
) -> DotsMoeStatus {
    guard(|| {
        // SAFETY (all): the caller's promises.
        let layer = unsafe { layer_ref(layer)? };
        let k = layer.config().router.top_k;
        let x = unsafe { hidden_view(layer, hidden_dtype, hidden, tokens)? };
        dots_moe::error::check_len("expert_ids", &[tokens, k], len)?;
        let ids = unsafe { slice_mut(expert_ids, len, "expert_ids")? };
        let w = unsafe { slice_mut(weights, len, "weights")? };
        let routing = layer.route(x, tokens)?;
        ids.copy_from_slice(&routing.expert_ids);
        w.copy_from_slice(&routing.weights);
        Ok(())
    })
}

/// The layer's (partial) output under a routing given by the caller, `expert_ids` and
/// `weights` `[T, top_k]` (any `top_k`): the router is skipped. An expert-parallel rank
/// runs this on the tokens other ranks routed to its experts.
///
/// # Safety
/// As [`dots_moe_layer_forward`]; `expert_ids` and `weights` hold `tokens * top_k`
/// readable elements.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)] // the C signature: pointers with their lengths
pub unsafe extern "C" fn dots_moe_layer_forward_routed(
    layer: *const DotsMoeLayer,
    hidden_dtype: u32,
    hidden: *const c_void,
    tokens: usize,
    expert_ids: *const u32,
    weights: *const f32,
    top_k: usize,
    out: *mut f32,
    out_len: usize,
) -> DotsMoeStatus {
    guard(|| {
        // SAFETY (all): the caller's promises.
        let layer = unsafe { layer_ref(layer)? };
        let h = layer.config().hidden_size;
        let pairs = tokens.checked_mul(top_k).ok_or_else(|| invalid(format!("{tokens} x {top_k} overflows")))?;
        let x = unsafe { hidden_view(layer, hidden_dtype, hidden, tokens)? };
        let ids = unsafe { slice(expert_ids, pairs, "expert_ids")? };
        let w = unsafe { slice(weights, pairs, "weights")? };
        dots_moe::error::check_len("out", &[tokens, h], out_len)?;
        let out = unsafe { slice_mut(out, out_len, "out")? };
        let routing = Routing { tokens, top_k, expert_ids: ids.to_vec(), weights: w.to_vec() };
        let y = layer.forward_routed(x, tokens, &routing)?;
        out.copy_from_slice(&y);
        Ok(())
    })
}

/// The message of this thread's last failed call (empty after a success). The pointer
/// stays valid until the thread's next dots-moe call.
#[unsafe(no_mangle)]
pub extern "C" fn dots_moe_last_error() -> *const c_char {
    catch_unwind(|| LAST_ERROR.with(|e| e.borrow().as_ptr())).unwrap_or(c"internal error".as_ptr())
}
