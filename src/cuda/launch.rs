//! The launch contract of every kernel, written once: [`KernelDecl`] (entry point, typed
//! parameters, block size, grid rule, dynamic shared memory, register budget; the
//! declarations themselves are in [`crate::cuda::source`]), a [`Launch`] built and checked
//! against it, and the [`Launcher`] that runs it: [`GpuContext`](crate::cuda::GpuContext)
//! on a device, or the CPU emulator of the kernels (`tests/emulator`).
//!
//! The wrappers ([`crate::cuda::moe`], [`crate::cuda::expert_gemm`]) build their launches
//! with the `*_launch` functions there, from sizes and raw device addresses only, so the
//! emulator runs exactly the launches the device would: same entry, argument order, grid
//! and shared memory. `tests/kernel_seam.rs` checks every declaration against the
//! `extern "C" __global__` signature of its `.cu` file.

use crate::cuda::error::CudaError;
use crate::error::MoeError;

/// The element type behind a pointer parameter (its C spelling in [`Elem::c_type`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    /// `float`.
    F32,
    /// `u16` holding a bf16.
    Bf16,
    /// `u32`.
    U32,
    /// `u64`.
    U64,
    /// `GemmItem` (four `u32`: slot, first row, rows, padding).
    Item,
}

impl Elem {
    /// The type's name in the kernel files.
    pub fn c_type(self) -> &'static str {
        match self {
            Elem::F32 => "float",
            Elem::Bf16 => "u16",
            Elem::U32 => "u32",
            Elem::U64 => "u64",
            Elem::Item => "GemmItem",
        }
    }
}

/// The type of one kernel parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamType {
    /// `const T* __restrict__`: read only.
    In(Elem),
    /// `T* __restrict__`: written (and maybe read).
    Out(Elem),
    /// `u32`.
    U32,
    /// `u64`.
    U64,
    /// `float`.
    F32,
    /// `const __grid_constant__ TmaMap`: a TMA tensor map passed by value (128 bytes),
    /// built by the launcher from a [`TensorMapSpec`].
    TensorMap,
}

impl ParamType {
    /// The parameter's type as the kernel file spells it.
    pub fn c_type(self) -> String {
        match self {
            ParamType::In(e) => format!("const {}* __restrict__", e.c_type()),
            ParamType::Out(e) => format!("{}* __restrict__", e.c_type()),
            ParamType::U32 => "u32".into(),
            ParamType::U64 => "u64".into(),
            ParamType::F32 => "float".into(),
            ParamType::TensorMap => "const __grid_constant__ TmaMap".into(),
        }
    }

    /// Whether `arg` is a value of this type.
    pub fn accepts(self, arg: KernelArg) -> bool {
        matches!(
            (self, arg),
            (ParamType::In(_) | ParamType::Out(_), KernelArg::Ptr(_))
                | (ParamType::U32, KernelArg::U32(_))
                | (ParamType::U64, KernelArg::U64(_))
                | (ParamType::F32, KernelArg::F32(_))
                | (ParamType::TensorMap, KernelArg::TensorMap(_))
        )
    }
}

/// One named kernel parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Param {
    /// The name in the kernel file.
    pub name: &'static str,
    /// Its type.
    pub ty: ParamType,
}

impl Param {
    /// A read-only pointer parameter.
    pub const fn input(name: &'static str, elem: Elem) -> Param {
        Param { name, ty: ParamType::In(elem) }
    }
    /// A written pointer parameter.
    pub const fn output(name: &'static str, elem: Elem) -> Param {
        Param { name, ty: ParamType::Out(elem) }
    }
    /// A `u32` scalar.
    pub const fn u32(name: &'static str) -> Param {
        Param { name, ty: ParamType::U32 }
    }
    /// A `u64` scalar.
    pub const fn u64(name: &'static str) -> Param {
        Param { name, ty: ParamType::U64 }
    }
    /// A `float` scalar.
    pub const fn f32(name: &'static str) -> Param {
        Param { name, ty: ParamType::F32 }
    }
    /// A TMA tensor map.
    pub const fn tensor_map(name: &'static str) -> Param {
        Param { name, ty: ParamType::TensorMap }
    }
}

/// The sizes a kernel's grid and dynamic shared memory depend on (each rule reads the
/// fields it needs; the others stay 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchDims {
    /// Tokens `T`.
    pub tokens: usize,
    /// Routed experts `E`.
    pub experts: usize,
    /// Slots per token, `k + n_shared`.
    pub slots_per_token: usize,
    /// Expert slots (`E + n_shared`).
    pub n_slots: usize,
    /// Model width `H`.
    pub hidden: usize,
    /// Expert intermediate size `I`.
    pub inter: usize,
    /// Work items the grid covers (the expert GEMMs' list capacity).
    pub items: usize,
}

impl LaunchDims {
    /// dots.llm1's shapes at `tokens` tokens (E 128, top 6 + 2 shared slots, H 4096,
    /// I 1408), with `items` work items: what `dots-moe kernels` prints the rules at.
    pub fn dots1(tokens: usize, items: usize) -> LaunchDims {
        LaunchDims { tokens, experts: 128, slots_per_token: 8, n_slots: 130, hidden: 4096, inter: 1408, items }
    }
}

/// One kernel's launch contract.
#[derive(Clone, Copy, Debug)]
pub struct KernelDecl {
    /// The `extern "C"` entry point.
    pub entry: &'static str,
    /// The kernel file under `cuda/` that defines it.
    pub file: &'static str,
    /// Its parameters, in order.
    pub params: &'static [Param],
    /// Threads per block (one-dimensional blocks).
    pub block: u32,
    /// The grid `(x, y)` for the launch's sizes.
    pub grid: fn(&LaunchDims) -> (usize, usize),
    /// Dynamic shared memory, bytes, for the launch's sizes.
    pub dynamic_smem: fn(&LaunchDims) -> usize,
    /// Registers per thread the planned occupancy allows (checked against ptxas).
    pub max_registers: u32,
}

/// A 2-D bf16 tensor in device memory and the box a TMA load of it copies, with the
/// 128-byte swizzle (what the `wgmma` operands read): the launcher encodes it as a tensor
/// map (`cuTensorMapEncodeTiled` on a device). Elements outside the tensor load as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorMapSpec {
    /// Device address of element (0, 0) (16-byte aligned).
    pub base: u64,
    /// Elements per row (the contiguous dimension).
    pub inner: u64,
    /// Rows.
    pub rows: u64,
    /// Bytes from one row to the next (a multiple of 16).
    pub pitch: u64,
    /// Elements of a box row (64 bf16: the 128 bytes the swizzle spans).
    pub box_inner: u32,
    /// Rows of a box (at most 256).
    pub box_rows: u32,
}

impl TensorMapSpec {
    /// Bytes of one element (bf16).
    pub const ELEMENT_BYTES: u64 = 2;
    /// The bytes the 128-byte swizzle spans: a box row must be exactly this long.
    pub const SWIZZLE_BYTES: u64 = 128;

    /// The row-major bf16 tensor `[rows, inner]` at `base`, read in boxes of `box_rows`
    /// rows of 64 elements.
    pub fn bf16_rows(base: u64, rows: usize, inner: usize, box_rows: u32) -> TensorMapSpec {
        TensorMapSpec {
            base,
            inner: inner as u64,
            rows: rows as u64,
            pitch: inner as u64 * Self::ELEMENT_BYTES,
            box_inner: (Self::SWIZZLE_BYTES / Self::ELEMENT_BYTES) as u32,
            box_rows,
        }
    }

    /// Whether the hardware's limits hold: a 16-byte aligned base and pitch, extents in
    /// `1..=2^32`, box rows in `1..=256`, box rows of exactly the swizzle span.
    pub fn is_valid(&self) -> bool {
        self.base.is_multiple_of(16)
            && self.pitch.is_multiple_of(16)
            && self.pitch >= self.inner * Self::ELEMENT_BYTES
            && (1..=1 << 32).contains(&self.inner)
            && (1..=1 << 32).contains(&self.rows)
            && (1..=256).contains(&self.box_rows)
            && u64::from(self.box_inner) * Self::ELEMENT_BYTES == Self::SWIZZLE_BYTES
    }
}

/// One kernel argument (every parameter of the crate's kernels is a pointer, a scalar or a
/// tensor map).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    /// A device address (0 for an optional input left out).
    Ptr(u64),
    /// A 32-bit unsigned scalar.
    U32(u32),
    /// A 64-bit unsigned scalar.
    U64(u64),
    /// An f32 scalar.
    F32(f32),
    /// A TMA tensor map, encoded by the launcher.
    TensorMap(TensorMapSpec),
}

/// The largest grid the launches use: `x` below 2^31, `y` below 2^16.
pub const MAX_GRID: (usize, usize) = (i32::MAX as usize, 65_535);

/// A launch, checked against its declaration: argument count and types, grid limits.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The kernel.
    pub kernel: &'static KernelDecl,
    /// Grid `(x, y)`.
    pub grid: (u32, u32),
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory, bytes.
    pub shared: usize,
    /// The arguments, in the kernel's parameter order.
    pub args: Vec<KernelArg>,
}

impl Launch {
    /// The launch of `kernel` for `dims` with `args`: its grid and shared memory from the
    /// declaration's rules. A grid past [`MAX_GRID`] is a typed error; arguments that do
    /// not match the declaration are a bug of this crate and panic.
    pub fn new(kernel: &'static KernelDecl, dims: &LaunchDims, args: Vec<KernelArg>) -> Result<Launch, CudaError> {
        assert_eq!(
            args.len(),
            kernel.params.len(),
            "{}: {} arguments for {} parameters",
            kernel.entry,
            args.len(),
            kernel.params.len()
        );
        for (param, &arg) in kernel.params.iter().zip(&args) {
            assert!(
                param.ty.accepts(arg),
                "{}: parameter {} is {:?}, the argument {arg:?}",
                kernel.entry,
                param.name,
                param.ty
            );
            if let KernelArg::TensorMap(spec) = arg
                && !spec.is_valid()
            {
                return Err(MoeError::Unsupported(format!(
                    "{}: parameter {}: a tensor the TMA cannot read ({spec:?})",
                    kernel.entry, param.name
                ))
                .into());
            }
        }
        let (x, y) = (kernel.grid)(dims);
        for (axis, needed, limit) in [("x", x, MAX_GRID.0), ("y", y, MAX_GRID.1)] {
            if needed > limit {
                return Err(MoeError::Limit {
                    what: format!("{}: grid blocks in {axis}", kernel.entry),
                    needed,
                    limit,
                }
                .into());
            }
        }
        Ok(Launch {
            kernel,
            grid: (x as u32, y as u32),
            block: kernel.block,
            shared: (kernel.dynamic_smem)(dims),
            args,
        })
    }

    /// Whether the grid is empty (nothing to launch).
    pub fn is_empty(&self) -> bool {
        self.grid.0 == 0 || self.grid.1 == 0
    }
}

/// Something that runs launches in order: the GPU, or the CPU emulator.
pub trait Launcher {
    /// Queues `launch`.
    ///
    /// # Safety
    /// Every pointer argument must address memory of this launcher large enough for what
    /// the kernel reads and writes at this grid (the wrappers check shapes first).
    unsafe fn launch(&self, launch: &Launch) -> Result<(), CudaError>;
}
