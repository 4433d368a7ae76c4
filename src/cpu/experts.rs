//! The CPU engine's expert step (steps 3 and 4 of the contract, [`crate::moe::expert`]):
//! both GEMMs of every slot with their epilogues fused, over buffers kept from call to
//! call ([`LayerBuffers`], with a process-wide cache of one set).
//!
//! Schedule: each slot's rows are read in place from the gathered rows (prepared once
//! per slot where the kernel needs another layout). GEMM 1 runs as tasks of (slot, block of [`UP_BLOCK`]
//! intermediate columns): each register tile reads gate rows and the matching up rows
//! together, and its epilogue writes `silu(g) * u` straight into the activation rows.
//! GEMM 2 runs as tasks of (slot, block of [`DOWN_BLOCK`] hidden columns), its epilogue
//! multiplying by the routing weight. Tasks spread over the rayon pool, so one token
//! still uses every core and each weight byte is read once per call. Every output
//! element's reduction order depends only on its own row and weight row
//! ([`crate::cpu::gemm_nt`]'s contract), so results are bit-identical run to run and
//! independent of the other tokens in the batch.

use std::ops::Range;

use half::bf16;
use rayon::prelude::*;

use std::sync::Mutex;

use crate::cpu::{self, Cols, Isa, Line, PackedA, RowBuf, RowMut, RowsPtr};
use crate::error::{MoeError, check_len};
use crate::moe::{MoeWeights, Permutation, Precision};
use crate::tensor::{Dtype, TensorView};

/// Intermediate columns (gate rows and the matching up rows) per GEMM 1 task.
pub const UP_BLOCK: usize = 128;
/// Hidden columns (down rows) per GEMM 2 task.
pub const DOWN_BLOCK: usize = 256;

/// The buffers of one layer call on the CPU: the gathered rows, the activations and the
/// weighted output rows, and on AMX the rows packed as tiles (about 215 KB per token at
/// dots.llm1's shape, 280 KB with the tiles). Reshaping reuses
/// their storage, so a layer that runs again with them neither allocates nor page-faults.
///
/// [`crate::moe::MoeLayer::forward`] takes them from a process-wide cache of one set
/// ([`WORKSPACE_KEEP_BYTES`]); an engine that manages its own memory keeps its own and
/// passes them to [`crate::moe::MoeLayer::forward_with`].
#[derive(Default)]
pub struct LayerBuffers {
    /// Hidden rows gathered into permuted order, `[R, H]`, in the kernels' row layout.
    pub(crate) x: RowBuf,
    /// The SwiGLU activations `[R, I]`.
    pub(crate) act: RowBuf,
    /// Weighted expert output rows `[R, H]`.
    pub(crate) rows: Vec<f32>,
    /// Every slot's rows in the layout of kernels that need a copy (the AMX tiles).
    pub(crate) packed: Vec<Line>,
}

impl LayerBuffers {
    /// Empty buffers (they grow on first use).
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of storage held.
    pub fn capacity_bytes(&self) -> usize {
        self.x.capacity_bytes() + self.act.capacity_bytes() + self.rows.capacity() * 4 + self.packed.capacity() * 64
    }
}

impl std::fmt::Debug for LayerBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerBuffers").field("capacity_bytes", &self.capacity_bytes()).finish()
    }
}

/// The buffers of a layer call are kept in the process-wide cache only while they hold
/// at most this many bytes (about 1100 tokens of dots.llm1 with the AMX tiles, 1500
/// without); a larger batch allocates them for that call only.
pub const WORKSPACE_KEEP_BYTES: usize = 320 << 20;

/// The buffers of the last layer call in this process, for the next call of any layer
/// (a model runs its layers one after another: one set serves them all). A call takes
/// them out while it runs, so concurrent calls each get their own.
static CACHED: Mutex<Option<LayerBuffers>> = Mutex::new(None);

/// Runs `f` with the cached buffers of the last call (fresh ones if there are none, or
/// if another call is using them), and keeps them for the next call if not too large.
pub(crate) fn with_cached_buffers<R>(f: impl FnOnce(&mut LayerBuffers) -> R) -> R {
    // The lock is held only to take or return the buffers, never while computing; a
    // call that panicked left only buffers behind, reshaped before any use.
    let slot = || CACHED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut ws = slot().take().unwrap_or_default();
    let result = f(&mut ws);
    if ws.capacity_bytes() <= WORKSPACE_KEEP_BYTES {
        let mut kept = slot();
        if kept.as_ref().is_none_or(|k| k.capacity_bytes() < ws.capacity_bytes()) {
            *kept = Some(ws);
        }
    }
    result
}

/// GEMM 1's epilogue: `silu(g) * u` (the formula of [`cpu::swiglu`]) into the activation
/// rows of one slot, rounded to bf16 under [`Precision::Bf16`].
struct SwigluSink<'a> {
    act: &'a ActivationPtr,
    /// The slot's first row in permuted order.
    row0: usize,
}

/// The activation rows as a raw pointer.
enum ActivationPtr {
    F32(RowsPtr<f32>),
    Bf16(RowsPtr<bf16>),
}

impl cpu::Sink for SwigluSink<'_> {
    #[inline(always)]
    unsafe fn put(&self, i: usize, j: usize, g: &[f32], u: &[f32]) {
        // SAFETY (both): the task owns these elements (forwarded from the caller).
        match self.act {
            ActivationPtr::F32(p) => {
                for ((d, &g), &u) in unsafe { p.slice(self.row0 + i, j, g.len()) }.iter_mut().zip(g).zip(u) {
                    *d = cpu::silu_mul(g, u);
                }
            }
            ActivationPtr::Bf16(p) => {
                for ((d, &g), &u) in unsafe { p.slice(self.row0 + i, j, g.len()) }.iter_mut().zip(g).zip(u) {
                    *d = bf16::from_f32(cpu::silu_mul(g, u));
                }
            }
        }
    }
}

/// GEMM 2's epilogue: the routing weight times the down projection into the output rows.
struct WeightedSink<'a> {
    out: &'a RowsPtr<f32>,
    row0: usize,
    row_weights: &'a [f32],
}

impl cpu::Sink for WeightedSink<'_> {
    #[inline(always)]
    unsafe fn put(&self, i: usize, j: usize, y: &[f32], _: &[f32]) {
        let w = self.row_weights[self.row0 + i];
        // SAFETY: the task owns these elements (forwarded from the caller).
        for (d, &y) in unsafe { self.out.slice(self.row0 + i, j, y.len()) }.iter_mut().zip(y) {
            *d = w * y;
        }
    }
}

/// Runs both expert GEMMs for every slot on the CPU: `x_perm [R, H]` in permuted order
/// to weighted rows `[R, H]` (f32), ready for [`crate::moe::combine()`].
pub fn grouped_experts(
    weights: &MoeWeights,
    x_perm: TensorView<'_>,
    perm: &Permutation,
    row_weights: &[f32],
    precision: Precision,
    isa: Isa,
) -> Result<Vec<f32>, MoeError> {
    let h = weights.config().hidden_size;
    perm.validate()?;
    let rows = perm.rows();
    check_len("permuted hidden", &[rows, h], x_perm.len())?;
    let mut ws = LayerBuffers::default();
    ws.x.reset(x_perm.dtype(), rows, h);
    ws.x.par_rows_mut().for_each(|(r, dst)| match (dst, x_perm.slice(r * h..(r + 1) * h)) {
        (RowMut::F32(d), TensorView::F32(s)) => d.copy_from_slice(s),
        (RowMut::Bf16(d), TensorView::Bf16(s)) => d.copy_from_slice(s),
        _ => unreachable!("the rows were shaped with the input's dtype"),
    });
    run(weights, &ws.x, perm, row_weights, precision, isa, &mut ws.act, &mut ws.rows, &mut ws.packed)?;
    Ok(ws.rows)
}

/// Both expert GEMMs of every slot on rows already gathered into `x` (`[R, H]`), with
/// the activations in `act` and the weighted rows written to `out` (both reshaped here).
#[allow(clippy::too_many_arguments)] // the contract's inputs plus the two reused buffers
pub(crate) fn run(
    weights: &MoeWeights,
    x: &RowBuf,
    perm: &Permutation,
    row_weights: &[f32],
    precision: Precision,
    isa: Isa,
    act: &mut RowBuf,
    out: &mut Vec<f32>,
    packed: &mut Vec<Line>,
) -> Result<(), MoeError> {
    let cfg = weights.config();
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    perm.validate()?;
    let rows = perm.rows();
    if perm.n_slots() != cfg.n_slots() {
        return Err(MoeError::shape("expert_offsets", &[cfg.n_slots() + 1], &[perm.expert_offsets.len()]));
    }
    if (x.rows(), x.k()) != (rows, h) {
        return Err(MoeError::shape("permuted hidden", &[rows, h], &[x.rows(), x.k()]));
    }
    check_len("row weights", &[rows], row_weights.len())?;
    if !isa.is_supported() {
        return Err(MoeError::Unsupported(format!("this CPU cannot run the {isa:?} kernels")));
    }

    // The slots with rows that this layer holds (all of them unless it is a shard: the
    // rows of the others stay zero, so the combine sums only this shard's part). The
    // shared slots (every token's rows: compute-bound) come first, so that the first
    // thread computes them while the others stream the routed experts' weights.
    let routed = cfg.router.n_experts;
    let used: Vec<(usize, Range<usize>)> = (routed..cfg.n_slots())
        .chain(0..routed)
        .filter(|&e| weights.shard.holds(cfg, e))
        .map(|e| (e, perm.expert_rows(e)))
        .filter(|(_, r)| !r.is_empty())
        .collect();
    /// Each used slot's rows of `x`, prepared for the kernel (in place where possible).
    /// Copies go into `arena`, one part per slot, kept from call to call (a fresh
    /// allocation per slot costs page faults on every call).
    fn pack<'x>(
        isa: Isa,
        x: &'x RowBuf,
        w_dtype: Dtype,
        used: &[(usize, Range<usize>)],
        arena: &'x mut Vec<Line>,
    ) -> Vec<PackedA<'x>> {
        let need: Vec<usize> = used.iter().map(|(_, r)| PackedA::arena_lines(isa, x, r.len(), w_dtype)).collect();
        let total = need.iter().sum();
        if arena.len() < total {
            arena.resize(total, Line([0; 64]));
        }
        let mut rest = &mut arena[..total];
        let parts: Vec<&'x mut [Line]> = need
            .iter()
            .map(|&n| {
                let (part, tail) = std::mem::take(&mut rest).split_at_mut(n);
                rest = tail;
                part
            })
            .collect();
        used.par_iter().zip(parts).map(|((_, r), part)| PackedA::from_rows(isa, x, r.clone(), w_dtype, part)).collect()
    }
    let tasks = |width: usize, block: usize| -> Vec<(usize, Range<usize>)> {
        (0..used.len()).flat_map(|u| (0..width).step_by(block).map(move |c| (u, c..(c + block).min(width)))).collect()
    };

    // GEMM 1 + SwiGLU: tasks of (slot, intermediate block), gate and up rows in one tile.
    act.reset(
        match precision {
            Precision::F32 => Dtype::F32,
            Precision::Bf16 => Dtype::Bf16,
        },
        rows,
        i,
    );
    {
        let x = pack(isa, x, weights.gate_up.dtype(), &used, packed);
        let act_ptr = match precision {
            Precision::F32 => ActivationPtr::F32(act.rows_ptr()),
            Precision::Bf16 => ActivationPtr::Bf16(act.rows_ptr()),
        };
        tasks(i, UP_BLOCK).into_par_iter().for_each(|(u, cols)| {
            let (e, r) = &used[u];
            let sink = SwigluSink { act: &act_ptr, row0: r.start };
            // SAFETY: the tasks' (slot rows x columns) blocks of `act` are disjoint, and
            // nothing else touches `act` (borrowed mutably by this function) meanwhile.
            unsafe { x[u].run(weights.slot_gate_up(*e), Cols::Paired { second: i }, 0..r.len(), cols, &sink) };
        });
    }

    // GEMM 2 with the routing weight in the epilogue: tasks of (slot, hidden block).
    // Every row of a used slot is written (the tasks cover every hidden column); the rows
    // of slots a shard does not hold keep the zeros written here.
    out.clear();
    out.resize(rows * h, 0.0);
    let a = pack(isa, act, weights.down.dtype(), &used, packed);
    let out_ptr = RowsPtr::new(out, rows, h);
    tasks(h, DOWN_BLOCK).into_par_iter().for_each(|(u, cols)| {
        let (e, r) = &used[u];
        let sink = WeightedSink { out: &out_ptr, row0: r.start, row_weights };
        // SAFETY: as for GEMM 1, with `out` borrowed mutably by this function.
        unsafe { a[u].run(weights.slot_down(*e), Cols::Plain, 0..r.len(), cols, &sink) };
    });
    Ok(())
}
