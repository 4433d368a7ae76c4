//! The launchers a kernel test runs on, in the spirit of candle's `test_device!`: the CPU
//! emulator of the kernels always (`tests/emulator`, built here from Rust with a C++20
//! compiler, AddressSanitizer and alignment checks), and the GPU when one opens. Tests build
//! their launches with the library's own `*_launch` functions (the ones
//! `RouteCombineKernels` and `ExpertGemm` use), so both launchers run exactly the launches
//! the wrappers make.
//!
//! Without a C++ compiler the emulator is skipped (a failure with
//! `DOTS_MOE_REQUIRE_EMULATOR=1`); without a GPU the GPU is skipped (a failure with
//! `DOTS_MOE_REQUIRE_GPU=1`). `DOTS_MOE_CXX` names the compiler (`none`: no emulator).
#![allow(dead_code)]

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use dots_moe::backend::testing::Requirement;
use dots_moe::cuda::launch::{KernelArg, KernelDecl, Launch, Launcher, ParamType, TensorMapSpec};
use dots_moe::cuda::source::{self, FILES, HEADERS};
use dots_moe::cuda::{DeviceBuffer, GpuContext};

const SHIM: &str = include_str!("../emulator/cuda_shim.h");
const MODELS: &str = include_str!("../emulator/ptx_models.h");
const MAIN: &str = include_str!("../emulator/emu.cpp");
const FLAGS: &[&str] = &[
    "-std=c++20",
    "-O2",
    "-g",
    "-pthread",
    "-fno-strict-aliasing",
    "-ffp-contract=off",
    "-fsanitize=address,alignment",
    "-fno-sanitize-recover=alignment",
];

/// `kernels.inc`: the shim, the headers, the PTX models and every kernel file of the
/// registry, as one translation unit.
pub fn kernels_inc(files: &[(&str, &str)]) -> String {
    let mut text = String::from("#define DOTS_MOE_EMULATE 1\n#include \"cuda_shim.h\"\n#include \"common.cuh\"\n");
    text += "#include \"ptx_models.h\"\n";
    for (name, _) in files {
        text += &format!("#include \"{name}\"\n");
    }
    text
}

/// `dispatch.inc`: per declared kernel of `files` (the registry's, then `extra`), its
/// argument count and a call with every argument cast to its declared type.
pub fn dispatch_inc(files: &[(&str, &str)], extra: &[&'static KernelDecl]) -> String {
    let mut text = String::new();
    for k in source::kernels().chain(extra.iter().copied()).filter(|k| files.iter().any(|(n, _)| *n == k.file)) {
        let args: Vec<String> = k
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| match p.ty {
                ParamType::In(e) => format!("(const {}*)emu::ptr(a[{i}])", e.c_type()),
                ParamType::Out(e) => format!("({}*)emu::ptr(a[{i}])", e.c_type()),
                ParamType::U32 => format!("(u32)a[{i}]"),
                ParamType::U64 => format!("(u64)a[{i}]"),
                ParamType::F32 => format!("emu::f32(a[{i}])"),
                // A tensor map by value, from the buffer holding the emulator's encoding
                // (copied: the buffer is not 64-byte aligned).
                ParamType::TensorMap => {
                    format!("[&] {{ TmaMap m; std::memcpy(&m, emu::ptr(a[{i}]), sizeof m); return m; }}()")
                }
            })
            .collect();
        text += &format!(
            "{{\"{}\", {{{}u, [](const Args& a) {{ {}({}); }}}}}},\n",
            k.entry,
            k.params.len(),
            k.entry,
            args.join(", ")
        );
    }
    text
}

/// FNV-1a of the parts (a build key).
fn hash(parts: &[&str]) -> u64 {
    parts
        .iter()
        .flat_map(|p| p.bytes().chain([0]))
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The C++ compiler the emulator is built with (`DOTS_MOE_CXX`, else the first of g++,
/// c++, clang++ that runs).
pub fn compiler_name() -> Option<String> {
    if let Ok(cxx) = std::env::var("DOTS_MOE_CXX") {
        return (cxx != "none").then_some(cxx);
    }
    ["g++", "c++", "clang++"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
        .map(str::to_string)
}

/// Builds the emulator of `files` (name, text) with `extra` flags, unless a build of the
/// same inputs is there; its path.
pub fn build(cxx: &str, files: &[(&str, &str)], extra: &[&str]) -> Result<PathBuf, String> {
    build_with(cxx, files, &[], extra)
}

/// [`build`], with kernels declared outside the registry (`decls`, defined in `files`):
/// the tests' probes of the emulator's models.
pub fn build_with(
    cxx: &str,
    files: &[(&str, &str)],
    decls: &[&'static KernelDecl],
    extra: &[&str],
) -> Result<PathBuf, String> {
    let kernels = kernels_inc(files);
    let dispatch = dispatch_inc(files, decls);
    let mut parts = vec![cxx, SHIM, MODELS, MAIN, &kernels, &dispatch];
    parts.extend(FLAGS);
    parts.extend(extra);
    for (n, t) in files {
        parts.extend([*n, *t]);
    }
    for h in HEADERS {
        parts.extend([h.name, h.text]);
    }
    // The build machine's target folder; elsewhere (a test binary copied to the GPU host)
    // the temporary folder.
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
    let dir = base.join(format!("dots-moe-emulator-{:016x}", hash(&parts)));
    let binary = dir.join("emu");
    if binary.is_file() {
        return Ok(binary);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("no folder to build the emulator in ({e})"))?;
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).map_err(|e| e.to_string());
    write("cuda_shim.h", SHIM)?;
    write("ptx_models.h", MODELS)?;
    write("emu.cpp", MAIN)?;
    write("kernels.inc", &kernels)?;
    write("dispatch.inc", &dispatch)?;
    for h in HEADERS {
        write(h.name, h.text)?;
    }
    for (n, t) in files {
        write(n, t)?;
    }
    // Another test binary may build the same emulator at the same time: each writes its
    // own file and renames it into place.
    static N: AtomicUsize = AtomicUsize::new(0);
    let partial = dir.join(format!("emu.{}.{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    let out = Command::new(cxx)
        .args(FLAGS)
        .args(extra)
        .arg("-I")
        .arg(&dir)
        .arg(dir.join("emu.cpp"))
        .arg("-o")
        .arg(&partial)
        .output()
        .map_err(|e| format!("running {cxx}: {e}"))?;
    if !out.status.success() {
        return Err(format!("building the emulator failed:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    std::fs::rename(&partial, &binary).map_err(|e| e.to_string())?;
    Ok(binary)
}

/// The emulator of every kernel file, built once per test binary; `None` after reporting
/// the skip.
pub fn emulator(test: &str) -> Option<&'static Path> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let cxx = compiler_name().ok_or_else(|| "no C++20 compiler (g++, c++, clang++ or DOTS_MOE_CXX)".to_string())?;
        let files: Vec<(&str, &str)> = FILES.iter().map(|f| (f.name, f.text)).collect();
        build(&cxx, &files, &[])
    });
    match built {
        Ok(path) => Some(path),
        Err(why) if why.starts_with("no C++") || why.starts_with("no folder") => {
            Requirement::Emulator.skip_or_fail(test, why);
            None
        }
        Err(why) => panic!("{test}: {why}"),
    }
}

/// A program for the emulator: buffers at fake device addresses (buffer `i` at
/// `(i + 1) << 32`), launches queued in order and run when a buffer is read.
pub struct Emu {
    binary: PathBuf,
    buffers: RefCell<Vec<Vec<u8>>>,
    /// Queued launches with their arguments as the program passes them.
    pending: RefCell<Vec<(Launch, Vec<u64>)>>,
}

/// `EMU_TMA_MAGIC` of `tests/emulator/ptx_models.h`.
const EMU_TMA_MAGIC: u64 = 0x414d_5475_6d45;

/// The emulator's encoding of a tensor map (documented in `tests/emulator/ptx_models.h`).
fn emulator_tensor_map(spec: &TensorMapSpec) -> [u64; 16] {
    let mut words = [0u64; 16];
    words[..9].copy_from_slice(&[
        EMU_TMA_MAGIC,
        spec.base,
        spec.inner,
        spec.rows,
        spec.pitch,
        u64::from(spec.box_inner),
        u64::from(spec.box_rows),
        TensorMapSpec::ELEMENT_BYTES,
        TensorMapSpec::SWIZZLE_BYTES,
    ]);
    words
}

impl Emu {
    /// The emulator binary.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// An empty program for the emulator at `binary`.
    pub fn new(binary: &Path) -> Emu {
        Emu { binary: binary.to_path_buf(), buffers: RefCell::new(Vec::new()), pending: RefCell::new(Vec::new()) }
    }

    fn push(&self, bytes: Vec<u8>) -> u64 {
        let mut buffers = self.buffers.borrow_mut();
        buffers.push(bytes);
        (buffers.len() as u64) << 32
    }

    fn index(addr: u64) -> usize {
        assert!(addr != 0 && addr & 0xffff_ffff == 0, "{addr:#x} is not a buffer's start");
        (addr >> 32) as usize - 1
    }

    /// Runs the queued launches; panics with the emulator's message when it fails.
    pub fn run(&self) -> Result<(), String> {
        let launches = std::mem::take(&mut *self.pending.borrow_mut());
        if launches.is_empty() {
            return Ok(());
        }
        static N: AtomicUsize = AtomicUsize::new(0);
        let tag = format!("dots-moe-emu-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir();
        let (prog, out) = (dir.join(format!("{tag}.prog")), dir.join(format!("{tag}.out")));
        let mut bytes = Vec::new();
        {
            let buffers = self.buffers.borrow();
            bytes.extend((buffers.len() as u32).to_le_bytes());
            for b in buffers.iter() {
                bytes.extend((b.len() as u64).to_le_bytes());
                bytes.extend(b);
            }
        }
        bytes.extend((launches.len() as u32).to_le_bytes());
        for (l, args) in &launches {
            bytes.extend((l.kernel.entry.len() as u32).to_le_bytes());
            bytes.extend(l.kernel.entry.as_bytes());
            for v in [l.grid.0, l.grid.1, l.block] {
                bytes.extend(v.to_le_bytes());
            }
            bytes.extend((l.shared as u64).to_le_bytes());
            bytes.extend((args.len() as u32).to_le_bytes());
            for v in args {
                bytes.extend(v.to_le_bytes());
            }
        }
        std::fs::write(&prog, bytes).map_err(|e| e.to_string())?;
        let result = Command::new(&self.binary).arg(&prog).arg(&out).output().map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&prog);
        if !result.status.success() {
            let _ = std::fs::remove_file(&out);
            return Err(format!(
                "the emulator failed ({}):\n{}",
                result.status,
                String::from_utf8_lossy(&result.stderr)
            ));
        }
        let data = std::fs::read(&out).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&out);
        let mut at = 4;
        let mut buffers = self.buffers.borrow_mut();
        for b in buffers.iter_mut() {
            let len = u64::from_le_bytes(data[at..at + 8].try_into().unwrap()) as usize;
            at += 8;
            b.copy_from_slice(&data[at..at + len]);
            at += len;
        }
        Ok(())
    }
}

impl Launcher for Emu {
    unsafe fn launch(&self, launch: &Launch) -> Result<(), dots_moe::cuda::CudaError> {
        if !launch.is_empty() {
            // Scalars zero-extended, f32 as its bits, a tensor map as the address of a
            // buffer holding its encoding.
            let args = launch
                .args
                .iter()
                .map(|a| match *a {
                    KernelArg::Ptr(v) | KernelArg::U64(v) => v,
                    KernelArg::U32(v) => u64::from(v),
                    KernelArg::F32(v) => u64::from(v.to_bits()),
                    KernelArg::TensorMap(spec) => self.push(bytemuck::cast_slice(&emulator_tensor_map(&spec)).to_vec()),
                })
                .collect();
            self.pending.borrow_mut().push((launch.clone(), args));
        }
        Ok(())
    }
}

/// One launcher of the suite, with the buffers a test allocated on it.
pub enum Device {
    /// The CPU emulator.
    Emulator(Emu),
    /// The GPU (device 0).
    Gpu { gpu: Arc<GpuContext>, buffers: RefCell<Vec<DeviceBuffer<u8>>> },
}

impl Device {
    /// Every launcher `test` runs on: the emulator, then the GPU (each skipped, or a
    /// failure when required, when missing).
    pub fn all(test: &str) -> Vec<Device> {
        let mut all = Vec::new();
        if let Some(binary) = emulator(test) {
            all.push(Device::Emulator(Emu::new(binary)));
        }
        if let Some((gpu, _)) = dots_moe::backend::testing::gpu(test) {
            all.push(Device::Gpu { gpu, buffers: RefCell::new(Vec::new()) });
        }
        all
    }

    /// A fresh launcher of the same kind (no buffers).
    pub fn fresh(&self) -> Device {
        match self {
            Device::Emulator(e) => Device::Emulator(Emu::new(&e.binary)),
            Device::Gpu { gpu, .. } => Device::Gpu { gpu: gpu.clone(), buffers: RefCell::new(Vec::new()) },
        }
    }

    /// `emulator` or `gpu`.
    pub fn name(&self) -> &'static str {
        match self {
            Device::Emulator(_) => "emulator",
            Device::Gpu { .. } => "gpu",
        }
    }

    /// Whether this is the GPU.
    pub fn is_gpu(&self) -> bool {
        matches!(self, Device::Gpu { .. })
    }

    /// `gpu` on the GPU, `emulator` on the emulator (test sizes: the emulator runs one
    /// thread per CUDA thread).
    pub fn pick<T>(&self, gpu: T, emulator: T) -> T {
        if self.is_gpu() { gpu } else { emulator }
    }

    fn alloc(&self, bytes: Vec<u8>) -> u64 {
        match self {
            Device::Emulator(e) => e.push(bytes),
            Device::Gpu { gpu, buffers } => {
                // At least 16 bytes: an empty buffer still gets its own address.
                let mut padded = bytes;
                let len = padded.len();
                padded.resize(len.max(16), 0xff);
                let b = DeviceBuffer::upload(gpu, "test buffer", &padded, &[padded.len()]).unwrap();
                let addr = b.device_ptr();
                buffers.borrow_mut().push(b);
                addr
            }
        }
    }

    /// A buffer holding `data`; its device address.
    pub fn upload<T: bytemuck::Pod>(&self, data: &[T]) -> u64 {
        self.alloc(bytemuck::cast_slice(data).to_vec())
    }

    /// A buffer of `bytes` 0xff bytes (NaN, `u32::MAX`): elements a kernel fails to write
    /// fail the comparison.
    pub fn poisoned(&self, bytes: usize) -> u64 {
        self.alloc(vec![0xff; bytes])
    }

    /// Replaces the first `bytes.len()` bytes of the buffer at `addr`, after the queued
    /// launches ran (so later launches see the new bytes).
    pub fn overwrite(&self, addr: u64, bytes: &[u8]) {
        self.finish().unwrap_or_else(|e| panic!("{e}"));
        match self {
            Device::Emulator(e) => e.buffers.borrow_mut()[Emu::index(addr)][..bytes.len()].copy_from_slice(bytes),
            Device::Gpu { buffers, .. } => {
                let mut buffers = buffers.borrow_mut();
                let b = buffers.iter_mut().find(|b| b.device_ptr() == addr).expect("a buffer of this test");
                let mut data = b.download().unwrap();
                data[..bytes.len()].copy_from_slice(bytes);
                b.copy_from_host("test buffer", &data).unwrap();
            }
        }
    }

    /// Queues a launch (nothing for `None`).
    pub fn run(&self, launch: Option<Launch>) {
        let Some(launch) = launch else { return };
        // SAFETY: the tests size every buffer for the launch they build from its sizes.
        match self {
            Device::Emulator(e) => unsafe { e.launch(&launch) },
            Device::Gpu { gpu, .. } => unsafe { gpu.launch(&launch) },
        }
        .unwrap_or_else(|e| panic!("{}: {e}", launch.kernel.entry));
    }

    /// Runs what is queued; the emulator's failure as an error.
    pub fn finish(&self) -> Result<(), String> {
        match self {
            Device::Emulator(e) => e.run(),
            Device::Gpu { gpu, .. } => gpu.synchronize().map_err(|e| e.to_string()),
        }
    }

    /// The `len` elements of the buffer at `addr`, after the queued launches ran.
    pub fn download<T: bytemuck::Pod>(&self, addr: u64, len: usize) -> Vec<T> {
        self.finish().unwrap_or_else(|e| panic!("{e}"));
        let bytes = len * std::mem::size_of::<T>();
        let raw: Vec<u8> = match self {
            Device::Emulator(e) => e.buffers.borrow()[Emu::index(addr)][..bytes].to_vec(),
            Device::Gpu { buffers, .. } => {
                let buffers = buffers.borrow();
                let b = buffers.iter().find(|b| b.device_ptr() == addr).expect("a buffer of this test");
                b.download().unwrap()[..bytes].to_vec()
            }
        };
        bytemuck::pod_collect_to_vec(&raw)
    }
}

/// A mutant's run (`got`) must fail: an emulator abort whose message contains `message`,
/// or (`message` empty) an abort or output that differs from the unmutated kernels'
/// (`want`). `what` names the mutation.
pub fn expect_caught<T: PartialEq>(test: &str, what: &str, message: &str, want: &T, got: Result<T, String>) {
    match got {
        Err(e) => {
            eprintln!("{test}: the mutant aborted:\n{e}");
            assert!(e.contains(message), "{test}: the mutant failed, but not with {message:?}:\n{e}");
        }
        Ok(got) => {
            assert!(message.is_empty(), "{test}: expected the emulator to abort with {message:?}");
            assert!(&got != want, "{test}: {what} went unnoticed");
            eprintln!("{test}: the mutant's output differs");
        }
    }
}
