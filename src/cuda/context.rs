//! The GPU context: the gate in front of every CUDA call, the device's architecture, one
//! stream, and the kernels compiled for it.
//!
//! cudarc panics when `libcuda` is missing; [`GpuContext::new`] checks for the library,
//! then for a device, then for its architecture, and turns each absence into a
//! [`CudaError`] before cudarc is asked anything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg, result, sys};
use serde::Serialize;

use crate::cuda::arch::Arch;
use crate::cuda::error::CudaError;
use crate::cuda::launch::{KernelArg, KernelDecl, Launch, Launcher, TensorMapSpec};
use crate::cuda::nvrtc;
use crate::cuda::source::{self, KernelSource};
use crate::error::MoeError;

/// Whether the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names; loads no symbol.
    unsafe { sys::is_culib_present() }
}

fn require_driver() -> Result<(), CudaError> {
    if driver_present() { Ok(()) } else { Err(CudaError::NoDriver) }
}

/// Number of CUDA devices (an error when there is no driver).
pub fn device_count() -> Result<usize, CudaError> {
    require_driver()?;
    result::init()?;
    Ok(result::device::get_count()?.max(0) as usize)
}

/// The CUDA version the installed driver supports, `(major, minor)` (13.0 for driver 580).
pub fn driver_version() -> Result<(i32, i32), CudaError> {
    require_driver()?;
    let mut version = 0;
    // SAFETY: the driver library is present; `version` is valid for writes.
    unsafe { sys::cuDriverGetVersion(&mut version) }.result()?;
    Ok((version / 1000, (version % 1000) / 10))
}

/// The NVRTC target for a compute capability: the architecture-specific `a` target from
/// Hopper on (`sm_90a`: `wgmma` and `setmaxnreg` need it), the plain one before.
pub fn arch_name(major: i32, minor: i32) -> String {
    Arch::for_device(major, minor).to_string()
}

/// What the driver says about one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name (`NVIDIA H200`).
    pub name: String,
    /// Compute capability, major.
    pub major: i32,
    /// Compute capability, minor.
    pub minor: i32,
    /// The NVRTC target the kernels are compiled for ([`arch_name`]).
    pub arch: String,
    /// Device memory, bytes.
    pub total_memory_bytes: usize,
    /// Streaming multiprocessors.
    pub multiprocessors: i32,
}

/// Describes device `ordinal` without creating a context.
pub fn device_info(ordinal: usize) -> Result<DeviceInfo, CudaError> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(if count == 0 { CudaError::NoDevice } else { CudaError::NoSuchDevice { ordinal, count } });
    }
    let dev = result::device::get(ordinal as i32)?;
    let attribute = |a: sys::CUdevice_attribute| -> Result<i32, CudaError> {
        // SAFETY: `dev` is a valid device handle from `cuDeviceGet`.
        Ok(unsafe { result::device::get_attribute(dev, a) }?)
    };
    use sys::CUdevice_attribute::*;
    let major = attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    Ok(DeviceInfo {
        ordinal,
        name: result::device::get_name(dev)?,
        major,
        minor,
        arch: arch_name(major, minor),
        // SAFETY: `dev` is a valid device handle.
        total_memory_bytes: unsafe { result::device::total_mem(dev) }?,
        multiprocessors: attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
    })
}

/// Every device the driver reports.
pub fn devices() -> Result<Vec<DeviceInfo>, CudaError> {
    (0..device_count()?).map(device_info).collect()
}

/// One device, one stream, and the kernels loaded on it.
///
/// All work of a context goes to its one stream, in order. cudarc's per-buffer event
/// tracking is turned off: with a single stream it is not needed, and without it every
/// launch and copy can be captured in a CUDA graph.
pub struct GpuContext {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    target: Arch,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    shared_limits: Mutex<HashMap<&'static str, usize>>,
    programmatic: AtomicBool,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext").field("device", &self.info).finish()
    }
}

impl Launcher for GpuContext {
    /// Queues `launch` on the stream: a 2-D grid of 1-D blocks with its dynamic shared
    /// memory (the function's shared-memory limit is raised first when it asks for more
    /// than the default 48 KB). An empty grid queues nothing.
    unsafe fn launch(&self, launch: &Launch) -> Result<(), CudaError> {
        if launch.is_empty() {
            return Ok(());
        }
        let func = self.kernel(launch.kernel)?;
        if launch.shared > DEFAULT_SHARED_BYTES {
            let mut raised = self.shared_limits.lock().unwrap_or_else(|e| e.into_inner());
            let limit = raised.entry(launch.kernel.entry).or_insert(DEFAULT_SHARED_BYTES);
            if launch.shared > *limit {
                func.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    launch.shared as i32,
                )?;
                *limit = launch.shared;
            }
        }
        // The tensor maps, encoded before the builder borrows them.
        let maps = launch
            .args
            .iter()
            .map(|arg| match arg {
                KernelArg::TensorMap(spec) => encode_tensor_map(spec).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.programmatic_launch() {
            // SAFETY: as for the builder below; the arguments live until the call returns,
            // which copies them.
            return unsafe { self.launch_programmatic(&func, launch, &maps) };
        }
        let mut builder = self.stream().launch_builder(&func);
        for (arg, map) in launch.args.iter().zip(&maps) {
            match (arg, map) {
                (KernelArg::Ptr(v) | KernelArg::U64(v), _) => builder.arg(v),
                (KernelArg::U32(v), _) => builder.arg(v),
                (KernelArg::F32(v), _) => builder.arg(v),
                (KernelArg::TensorMap(_), Some(map)) => builder.arg(map),
                (KernelArg::TensorMap(_), None) => unreachable!("encoded above"),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (launch.grid.0, launch.grid.1, 1),
            block_dim: (launch.block, 1, 1),
            shared_mem_bytes: launch.shared as u32,
        };
        // SAFETY: `Launch::new` checked the arguments against the kernel's declaration
        // (whose agreement with the `.cu` signature tests/kernel_seam.rs proves); the
        // caller guarantees the pointers (see the trait).
        unsafe { builder.launch(cfg) }?;
        Ok(())
    }
}

impl GpuContext {
    /// `launch` by `cuLaunchKernelEx` with programmatic stream serialisation allowed.
    ///
    /// # Safety
    /// As [`Launcher::launch`]; `maps` holds the encoded tensor map of every
    /// `KernelArg::TensorMap` argument.
    unsafe fn launch_programmatic(
        &self,
        func: &CudaFunction,
        launch: &Launch,
        maps: &[Option<EncodedTensorMap>],
    ) -> Result<(), CudaError> {
        // One pointer per parameter, to the argument's value (kept in `launch` and `maps`).
        let mut params: Vec<*mut std::ffi::c_void> = launch
            .args
            .iter()
            .zip(maps)
            .map(|(arg, map)| match (arg, map) {
                (KernelArg::Ptr(v) | KernelArg::U64(v), _) => v as *const u64 as *mut std::ffi::c_void,
                (KernelArg::U32(v), _) => v as *const u32 as *mut std::ffi::c_void,
                (KernelArg::F32(v), _) => v as *const f32 as *mut std::ffi::c_void,
                (KernelArg::TensorMap(_), Some(map)) => map as *const EncodedTensorMap as *mut std::ffi::c_void,
                (KernelArg::TensorMap(_), None) => unreachable!("encoded by the caller"),
            })
            .collect();
        // SAFETY: a plain-old-data attribute, zeroed then set.
        let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attribute.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: launch.grid.0,
            gridDimY: launch.grid.1,
            gridDimZ: 1,
            blockDimX: launch.block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: launch.shared as u32,
            hStream: self.stream.cu_stream(),
            attrs: &mut attribute,
            numAttrs: 1,
        };
        self.ctx.bind_to_thread()?;
        // SAFETY: the function belongs to this context, the stream too; `params` holds one
        // pointer per kernel parameter, each to a live value of the parameter's type (checked
        // against the declaration by `Launch::new`); the caller vouches for the pointers.
        unsafe { sys::cuLaunchKernelEx(&config, func.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()?;
        Ok(())
    }
}

/// A tensor map as the kernels take it (`TmaMap`: 128 bytes, 64-byte aligned), passed by
/// value.
#[repr(C, align(64))]
struct EncodedTensorMap([u64; 16]);

// SAFETY: plain bytes of the size and alignment of the kernels' `TmaMap` parameter.
unsafe impl cudarc::driver::DeviceRepr for EncodedTensorMap {}

/// The driver's encoding of `spec`: bf16, 2-D, the 128-byte swizzle, zeros outside the
/// tensor, L2 promotion of 256 bytes.
fn encode_tensor_map(spec: &TensorMapSpec) -> Result<EncodedTensorMap, CudaError> {
    use sys::{CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion};
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    let dims = [spec.inner, spec.rows];
    let strides = [spec.pitch];
    let boxes = [spec.box_inner, spec.box_rows];
    let element_strides = [1u32, 1];
    // SAFETY: every array holds the rank's entries (2, and 1 stride), `map` is writable
    // storage of the driver's type; the spec was checked by `Launch::new` (is_valid).
    unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            spec.base as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()?;
    // SAFETY: the driver wrote the map (the call succeeded).
    let map = unsafe { map.assume_init() };
    Ok(EncodedTensorMap(map.opaque))
}

/// Dynamic shared memory a kernel may use without raising its limit.
const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

impl GpuContext {
    /// Opens device `ordinal`: [`CudaError::NoDriver`], [`CudaError::NoDevice`],
    /// [`CudaError::NoSuchDevice`] or [`CudaError::UnsupportedArch`] (compute capability
    /// below 8.0) instead of a panic.
    pub fn new(ordinal: usize) -> Result<Arc<Self>, CudaError> {
        let info = device_info(ordinal)?;
        if info.major < 8 {
            return Err(CudaError::UnsupportedArch { ordinal, name: info.name, major: info.major, minor: info.minor });
        }
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: called before this context allocates anything; afterwards every buffer
        // and launch of this GpuContext goes to its single stream, so stream order alone
        // orders every use and free (what the events would otherwise enforce).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let target = Arch::for_device(info.major, info.minor);
        let gpu = Arc::new(GpuContext {
            ctx,
            stream,
            info,
            target,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            shared_limits: Mutex::new(HashMap::new()),
            programmatic: AtomicBool::new(false),
        });
        if std::env::var("DOTS_MOE_PDL").is_ok_and(|v| v == "1") {
            gpu.set_programmatic_launch(true);
        }
        Ok(gpu)
    }

    /// Whether kernels are launched with programmatic stream serialisation (programmatic
    /// dependent launch, sm_90 and later): each kernel may then be scheduled while the one
    /// before it still runs, and waits for it in its first statement (`grid_dependency_sync`
    /// in `cuda/include/common.cuh`), which hides a launch's latency behind the previous
    /// kernel. Off by default until a device run has measured it; `DOTS_MOE_PDL=1` in the
    /// environment turns it on for every context [`GpuContext::new`] opens. Returns whether
    /// it is on: never on a device older than sm_90.
    pub fn set_programmatic_launch(&self, on: bool) -> bool {
        let on = on && self.info.major >= 9;
        self.programmatic.store(on, Ordering::Relaxed);
        on
    }

    /// Whether kernels are launched with programmatic stream serialisation.
    pub fn programmatic_launch(&self) -> bool {
        self.programmatic.load(Ordering::Relaxed)
    }

    /// The device.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The NVRTC target of the device (`sm_90a` on an H200), by name.
    pub fn arch(&self) -> &str {
        &self.info.arch
    }

    /// The NVRTC target of the device.
    pub fn target(&self) -> Arch {
        self.target
    }

    /// The stream all work of this context runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The cudarc context.
    pub fn cuda_context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Waits for all work queued on the stream.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        Ok(self.stream.synchronize()?)
    }

    /// The file of `kernel`, compiled by NVRTC for this device (cached per source, arch
    /// and options) and loaded once per context; an error when the device's target does
    /// not support the file.
    pub fn module(&self, source: &KernelSource) -> Result<Arc<CudaModule>, CudaError> {
        if !self.target.supports(source.min_arch) {
            return Err(MoeError::Unsupported(format!(
                "{} needs an {} device; {} is {}",
                source.name, source.min_arch, self.info.name, self.target
            ))
            .into());
        }
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(module) = modules.get(source.name) {
            return Ok(module.clone());
        }
        let compiled = nvrtc::compile(source, self.arch())?;
        let module = self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(compiled.cubin.clone()))?;
        modules.insert(source.name, module.clone());
        Ok(module)
    }

    /// The loaded function of `kernel` (compiled and loaded on first use).
    pub fn kernel(&self, kernel: &'static KernelDecl) -> Result<CudaFunction, CudaError> {
        if let Some(f) = self.functions.lock().unwrap_or_else(|e| e.into_inner()).get(kernel.entry) {
            return Ok(f.clone());
        }
        let source = source::file(kernel.file).ok_or_else(|| CudaError::BadProgram {
            program: kernel.file.into(),
            reason: format!("{} names a file that is not registered", kernel.entry),
        })?;
        let function = self.module(source)?.load_function(kernel.entry)?;
        self.functions.lock().unwrap_or_else(|e| e.into_inner()).insert(kernel.entry, function.clone());
        Ok(function)
    }

    /// Compiles and loads every kernel of `sources` now (so that a compile error shows at
    /// construction, not at the first launch). A source outside the registry (a test's
    /// probe) is launchable after this.
    pub fn load(&self, sources: &[&KernelSource]) -> Result<(), CudaError> {
        for source in sources {
            let module = self.module(source)?;
            for kernel in source.kernels {
                let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
                if !functions.contains_key(kernel.entry) {
                    functions.insert(kernel.entry, module.load_function(kernel.entry)?);
                }
            }
        }
        Ok(())
    }
}
