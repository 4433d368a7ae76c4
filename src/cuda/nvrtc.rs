//! Run-time compilation with NVRTC: kernel files to cubins for one architecture, with
//! ptxas's resource report, cached in memory per (program, source hash, arch, options).
//!
//! An on-disk cache can sit behind the memory cache: when the environment variable
//! [`KERNEL_CACHE_ENV`] (`DOTS_MOE_KERNEL_CACHE`) names a folder, each compilation is looked
//! up there first (a `.cubin` and NVRTC's `.log` per key, the key being the NVRTC version,
//! the program's name and text, the arch and the options) and written there after a miss.
//! `scripts/gpu/build.sh` fills one for `sm_90a` on the build machine and it travels with
//! the GPU binaries, so that they compile nothing on the GPU host. A cached cubin is also
//! found when NVRTC itself cannot be loaded (its version is then unknown: the newest entry
//! for the same program text, arch and options is used).
//!
//! NVRTC runs without a GPU: this is also how the kernels are proven statically on the
//! build machines (registers, shared memory, no spills; see `tests/cuda_static.rs` and
//! `dots-moe kernels`).

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::{result, sys};
use serde::Serialize;

use crate::cuda::error::CudaError;
use crate::cuda::source::{Header, KernelSource};

/// Whether the NVRTC library can be loaded. Checked before any NVRTC call (cudarc panics
/// on a missing library).
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names; loads no symbol.
    unsafe { sys::is_culib_present() }
}

fn require() -> Result<(), CudaError> {
    if available() { Ok(()) } else { Err(CudaError::NoNvrtc) }
}

/// NVRTC's version, `(major, minor)`.
pub fn version() -> Result<(i32, i32), CudaError> {
    require()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are valid for writes.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result()?;
    Ok((major, minor))
}

/// The virtual architectures this NVRTC can compile for, as numbers (`90` for `sm_90`).
pub fn supported_archs() -> Result<Vec<i32>, CudaError> {
    require()?;
    let mut n = 0;
    // SAFETY: the library is present; `n` is valid for writes.
    unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }.result()?;
    let mut archs = vec![0i32; n.max(0) as usize];
    // SAFETY: `archs` has room for the `n` entries NVRTC writes.
    unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }.result()?;
    Ok(archs)
}

/// What ptxas reported for one entry point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelResources {
    /// The `extern "C"` entry point.
    pub name: String,
    /// Target architecture (`sm_90a`, `sm_80`).
    pub arch: String,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory per CTA, bytes (dynamic shared memory is sized at launch).
    pub shared_bytes: u32,
    /// Bytes spilled to local memory by stores.
    pub spill_store_bytes: u32,
    /// Bytes reloaded from spills.
    pub spill_load_bytes: u32,
    /// Per-thread stack frame, bytes (local arrays, spills, calls).
    #[serde(skip)]
    pub stack_frame_bytes: u32,
}

/// What ptxas reported for one non-inlined device function: its stack frame and spills.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceFunctionFrame {
    /// The function's (mangled) name.
    pub name: String,
    /// Per-thread stack frame, bytes.
    pub stack_frame_bytes: u32,
    /// Bytes spilled to local memory by stores.
    pub spill_store_bytes: u32,
    /// Bytes reloaded from spills.
    pub spill_load_bytes: u32,
}

/// A compiled kernel file.
#[derive(Debug)]
pub struct CompiledProgram {
    /// The kernel file.
    pub program: &'static str,
    /// Target architecture.
    pub arch: String,
    /// NVRTC options used.
    pub options: Vec<String>,
    /// The cubin, loadable with `cuModuleLoadData` on a device of `arch`.
    pub cubin: Vec<u8>,
    /// NVRTC's log (ptxas's verbose report included).
    pub log: String,
    /// ptxas's report per entry point, in the order it compiled them.
    pub kernels: Vec<KernelResources>,
    /// Stack and spill bytes of the non-inlined device functions, by name; empty when
    /// everything is inlined.
    pub device_functions: Vec<DeviceFunctionFrame>,
    /// Compiled here, or read from the on-disk cache.
    pub origin: Origin,
}

/// The options every kernel file is compiled with, for `arch`.
pub fn options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "-std=c++17".into(), "-lineinfo".into(), "--ptxas-options=-v".into()]
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    program: &'static str,
    source_hash: u64,
    arch: String,
    options: Vec<String>,
}

fn cache() -> &'static Mutex<HashMap<CacheKey, Arc<CompiledProgram>>> {
    static CACHE: OnceLock<Mutex<HashMap<CacheKey, Arc<CompiledProgram>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// FNV-1a, 64 bits: a stable hash of the program text (stable across runs and Rust versions).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// What identifies one compilation: the program (its text and headers), the arch, the options.
fn cache_key(source: &KernelSource, arch: &str) -> CacheKey {
    CacheKey {
        program: source.name,
        source_hash: fnv1a(&source.fingerprint()),
        arch: arch.to_string(),
        options: options(arch),
    }
}

/// The environment variable that names the on-disk cubin cache folder (see the module docs).
pub const KERNEL_CACHE_ENV: &str = "DOTS_MOE_KERNEL_CACHE";

/// Where a compiled program came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Origin {
    /// NVRTC compiled it in this process.
    Compiled,
    /// Read from the on-disk cache ([`KERNEL_CACHE_ENV`]).
    DiskCache,
}

/// The on-disk cache folder, if [`KERNEL_CACHE_ENV`] names one.
pub fn disk_cache_dir() -> Option<PathBuf> {
    std::env::var_os(KERNEL_CACHE_ENV).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The file stem of a cache entry: program, arch, a hash of (program text, options), and
/// the NVRTC version that made it, e.g. `route.cu-sm_90a-0123456789abcdef-nvrtc13.0`.
fn disk_stem(key: &CacheKey, nvrtc_version: (i32, i32)) -> String {
    format!("{}-nvrtc{}.{}", disk_prefix(key), nvrtc_version.0, nvrtc_version.1)
}

fn disk_prefix(key: &CacheKey) -> String {
    let options = key.options.join("\u{1f}");
    let hash = fnv1a(&format!("{:016x}\u{1f}{options}", key.source_hash));
    format!("{}-{}-{hash:016x}", key.program, key.arch)
}

/// Reads a cache entry written by [`store_on_disk`]: `None` when absent or unreadable.
fn load_from_disk(dir: &Path, key: &CacheKey, nvrtc_version: Option<(i32, i32)>) -> Option<CompiledProgram> {
    let stem = match nvrtc_version {
        Some(version) => disk_stem(key, version),
        None => {
            // NVRTC cannot be loaded here: take the newest NVRTC version's entry.
            let prefix = format!("{}-nvrtc", disk_prefix(key));
            let mut stems: Vec<(i32, i32, String)> = std::fs::read_dir(dir)
                .ok()?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter_map(|name| {
                    let stem = name.strip_suffix(".cubin")?;
                    let (major, minor) = stem.strip_prefix(&prefix)?.split_once('.')?;
                    Some((major.parse().ok()?, minor.parse().ok()?, stem.to_string()))
                })
                .collect();
            stems.sort();
            stems.pop()?.2
        }
    };
    let cubin = std::fs::read(dir.join(format!("{stem}.cubin"))).ok()?;
    let log = std::fs::read_to_string(dir.join(format!("{stem}.log"))).ok()?;
    if cubin.is_empty() {
        return None;
    }
    let (kernels, device_functions) = parse_ptxas_report(&log, &key.arch);
    Some(CompiledProgram {
        program: key.program,
        arch: key.arch.clone(),
        options: key.options.clone(),
        cubin,
        log,
        kernels,
        device_functions,
        origin: Origin::DiskCache,
    })
}

/// Writes a cache entry, each file through a temporary name and a rename, so that a
/// reader never sees half a file. Best effort: a folder that cannot be written to leaves
/// the cache as it was (the program was compiled and is returned all the same).
fn store_on_disk(dir: &Path, key: &CacheKey, nvrtc_version: (i32, i32), compiled: &CompiledProgram) {
    let stem = disk_stem(key, nvrtc_version);
    let write = |suffix: &str, bytes: &[u8]| -> std::io::Result<()> {
        let tmp = dir.join(format!(".{stem}.{suffix}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, dir.join(format!("{stem}.{suffix}"))).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    };
    // The log first: a `.cubin` is only ever looked up with its `.log` beside it.
    let _ = std::fs::create_dir_all(dir)
        .and_then(|()| write("log", compiled.log.as_bytes()))
        .and_then(|()| write("cubin", &compiled.cubin));
}

/// Compiles `source` for `arch` (`sm_90a`, `sm_80`, ...), or returns the cached result of
/// an earlier identical compilation: in this process, or in the on-disk cache
/// ([`KERNEL_CACHE_ENV`]).
pub fn compile(source: &KernelSource, arch: &str) -> Result<Arc<CompiledProgram>, CudaError> {
    compile_with_cache(source, arch, disk_cache_dir().as_deref())
}

/// [`compile`] with the on-disk cache folder given (`None`: memory cache only).
pub fn compile_with_cache(
    source: &KernelSource,
    arch: &str,
    disk: Option<&Path>,
) -> Result<Arc<CompiledProgram>, CudaError> {
    let text = source.program();
    let key = cache_key(source, arch);
    if let Some(hit) = cache().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(hit.clone());
    }
    let nvrtc_version = if available() { Some(version()?) } else { None };
    let from_disk = disk.and_then(|dir| load_from_disk(dir, &key, nvrtc_version));
    let compiled = match (from_disk, nvrtc_version) {
        (Some(hit), _) => hit,
        (None, None) => return Err(CudaError::NoNvrtc),
        (None, Some(version)) => {
            let compiled = compile_uncached(source.name, &text, source.headers(), arch, key.options.clone())?;
            if let Some(dir) = disk {
                store_on_disk(dir, &key, version, &compiled);
            }
            compiled
        }
    };
    let compiled = Arc::new(compiled);
    cache().lock().unwrap_or_else(|e| e.into_inner()).insert(key, compiled.clone());
    Ok(compiled)
}

/// Destroys an NVRTC program when dropped.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by `create_program` and destroyed only here, once.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn compile_uncached(
    program: &'static str,
    text: &str,
    headers: &[Header],
    arch: &str,
    options: Vec<String>,
) -> Result<CompiledProgram, CudaError> {
    let c_string = |what: &str, s: &str| {
        CString::new(s).map_err(|_| CudaError::BadProgram {
            program: program.into(),
            reason: format!("{what} contains a NUL byte"),
        })
    };
    let src = c_string("the text", text)?;
    let name = c_string("the name", program)?;
    // The headers, served in memory under the names the kernel files `#include`.
    let header_texts = headers.iter().map(|h| c_string(h.name, h.text)).collect::<Result<Vec<_>, _>>()?;
    let header_names = headers.iter().map(|h| c_string(h.name, h.name)).collect::<Result<Vec<_>, _>>()?;
    let text_ptrs: Vec<*const std::ffi::c_char> = header_texts.iter().map(|s| s.as_ptr()).collect();
    let name_ptrs: Vec<*const std::ffi::c_char> = header_names.iter().map(|s| s.as_ptr()).collect();
    let mut raw = std::mem::MaybeUninit::uninit();
    // SAFETY: every pointer is a NUL-terminated string that outlives the call (NVRTC copies
    // them); the two header arrays have `headers.len()` entries each.
    unsafe {
        sys::nvrtcCreateProgram(
            raw.as_mut_ptr(),
            src.as_ptr(),
            name.as_ptr(),
            headers.len() as i32,
            text_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
        )
    }
    .result()?;
    // SAFETY: nvrtcCreateProgram succeeded, so it wrote the program handle.
    let prog = Program(unsafe { raw.assume_init() });
    // SAFETY: `prog` is a live program (destroyed on drop, after every use below); `src`
    // and `name` outlive it.
    let compiled = unsafe { result::compile_program(prog.0, &options) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(prog.0) }?;
    // SAFETY: NVRTC's log is NUL-terminated within the buffer it returned.
    let log = unsafe { CStr::from_ptr(log.as_ptr()) }.to_string_lossy().into_owned();
    if compiled.is_err() {
        return Err(CudaError::Compile { program: program.into(), arch: arch.into(), log });
    }
    let mut size = 0usize;
    // SAFETY: the program compiled; `size` is valid for writes.
    unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }.result()?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has the `size` bytes NVRTC writes.
    unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast()) }.result()?;
    let (kernels, device_functions) = parse_ptxas_report(&log, arch);
    Ok(CompiledProgram {
        program,
        arch: arch.into(),
        options,
        cubin,
        log,
        kernels,
        device_functions,
        origin: Origin::Compiled,
    })
}

/// The unsigned number just before the first `suffix` in `line`, if any.
fn number_before(line: &str, suffix: &str) -> Option<u32> {
    let end = line.find(suffix)?;
    let digits: String = line[..end].trim_end().chars().rev().take_while(|c| c.is_ascii_digit()).collect();
    digits.chars().rev().collect::<String>().parse().ok()
}

/// Reads ptxas's `-v` report: per entry point, registers, static shared memory, stack
/// frame and spills. Returns the entry points and the non-inlined device functions (by name).
pub fn parse_ptxas_report(log: &str, arch: &str) -> (Vec<KernelResources>, Vec<DeviceFunctionFrame>) {
    let mut kernels: Vec<KernelResources> = Vec::new();
    // Every function's frame, entry points included; what is left after the entry points
    // take theirs are the device functions.
    let mut properties: HashMap<String, DeviceFunctionFrame> = HashMap::new();
    let mut current_entry: Option<String> = None;
    let mut properties_for: Option<String> = None;
    let quoted = |line: &str| -> Option<String> {
        let start = line.find('\'')? + 1;
        let len = line[start..].find('\'')?;
        Some(line[start..start + len].to_string())
    };
    for line in log.lines() {
        if line.contains("Compiling entry function") {
            current_entry = quoted(line);
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            properties_for = Some(rest.trim().to_string());
        } else if line.contains("bytes stack frame") {
            if let Some(name) = properties_for.take() {
                let frame = DeviceFunctionFrame {
                    name: name.clone(),
                    stack_frame_bytes: number_before(line, "bytes stack frame").unwrap_or(0),
                    spill_store_bytes: number_before(line, "bytes spill stores").unwrap_or(0),
                    spill_load_bytes: number_before(line, "bytes spill loads").unwrap_or(0),
                };
                properties.insert(name, frame);
            }
        } else if line.contains("Used")
            && line.contains("registers")
            && let Some(name) = current_entry.take()
        {
            kernels.push(KernelResources {
                name,
                arch: arch.to_string(),
                registers: number_before(line, "registers").unwrap_or(0),
                shared_bytes: number_before(line, "bytes smem").unwrap_or(0),
                spill_store_bytes: 0,
                spill_load_bytes: 0,
                stack_frame_bytes: 0,
            });
        }
    }
    for kernel in &mut kernels {
        if let Some(frame) = properties.remove(&kernel.name) {
            kernel.stack_frame_bytes = frame.stack_frame_bytes;
            kernel.spill_store_bytes = frame.spill_store_bytes;
            kernel.spill_load_bytes = frame.spill_load_bytes;
        }
    }
    let mut device_functions: Vec<DeviceFunctionFrame> = properties.into_values().collect();
    device_functions.sort();
    (kernels, device_functions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_ptxas_report() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'bar' for 'sm_90a'\n\
ptxas info    : Function properties for bar\n\
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 8 registers, used 0 barriers\n\
ptxas info    : Compiling entry function 'foo' for 'sm_90a'\n\
ptxas info    : Function properties for foo\n\
ptxas         .     24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 255 registers, used 1 barriers, 256 bytes smem, 400 bytes cmem[0]\n";
        let (kernels, others) = parse_ptxas_report(log, "sm_90a");
        assert!(others.is_empty());
        assert_eq!(kernels.len(), 2);
        assert_eq!((kernels[0].name.as_str(), kernels[0].registers, kernels[0].shared_bytes), ("bar", 8, 0));
        let foo = &kernels[1];
        assert_eq!((foo.registers, foo.shared_bytes, foo.stack_frame_bytes), (255, 256, 24));
        assert_eq!((foo.spill_store_bytes, foo.spill_load_bytes), (16, 12));
        let json = serde_json::to_value(foo).unwrap();
        let mut fields: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(fields, ["arch", "name", "registers", "shared_bytes", "spill_load_bytes", "spill_store_bytes"]);
    }

    #[test]
    fn reads_the_frames_of_device_functions() {
        // Two non-inlined device functions (listed out of name order) beside one entry point.
        let log = "ptxas info    : Function properties for _Z4zetav\n\
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n\
ptxas info    : Compiling entry function 'k' for 'sm_90a'\n\
ptxas info    : Function properties for k\n\
ptxas         .     16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 32 registers, used 0 barriers\n\
ptxas info    : Function properties for _Z4betav\n\
ptxas         .     40 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads\n";
        let (kernels, others) = parse_ptxas_report(log, "sm_90a");
        assert_eq!((kernels.len(), kernels[0].stack_frame_bytes), (1, 16));
        let frame = |name: &str, stack, stores, loads| DeviceFunctionFrame {
            name: name.into(),
            stack_frame_bytes: stack,
            spill_store_bytes: stores,
            spill_load_bytes: loads,
        };
        assert_eq!(others, [frame("_Z4betav", 40, 12, 20), frame("_Z4zetav", 8, 4, 4)]);
    }

    fn program(log: &str, cubin: &[u8]) -> CompiledProgram {
        let (kernels, device_functions) = parse_ptxas_report(log, "sm_90a");
        CompiledProgram {
            program: "route.cu",
            arch: "sm_90a".into(),
            options: options("sm_90a"),
            cubin: cubin.to_vec(),
            log: log.into(),
            kernels,
            device_functions,
            origin: Origin::Compiled,
        }
    }

    fn key(text: &str) -> CacheKey {
        CacheKey { program: "route.cu", source_hash: fnv1a(text), arch: "sm_90a".into(), options: options("sm_90a") }
    }

    #[test]
    fn disk_cache_round_trips_and_keys_on_version_text_and_options() {
        let dir = std::env::temp_dir().join(format!("dots-moe-cubin-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let log = "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n\
ptxas info    : Used 40 registers, used 1 barriers, 64 bytes smem\n";
        let entry = program(log, b"cubin 13.0");
        store_on_disk(&dir, &key("text"), (13, 0), &entry);
        store_on_disk(&dir, &key("text"), (12, 9), &program(log, b"cubin 12.9"));

        let hit = load_from_disk(&dir, &key("text"), Some((13, 0))).expect("cached");
        assert_eq!((hit.cubin.as_slice(), hit.origin), (&b"cubin 13.0"[..], Origin::DiskCache));
        assert_eq!(
            (hit.kernels[0].name.as_str(), hit.kernels[0].registers, hit.kernels[0].shared_bytes),
            ("k", 40, 64)
        );
        assert_eq!(load_from_disk(&dir, &key("text"), Some((12, 9))).unwrap().cubin, b"cubin 12.9");
        // Another NVRTC, another text, other options: misses.
        assert!(load_from_disk(&dir, &key("text"), Some((13, 1))).is_none());
        assert!(load_from_disk(&dir, &key("other text"), Some((13, 0))).is_none());
        let mut other_options = key("text");
        other_options.options.push("-DX=1".into());
        assert!(load_from_disk(&dir, &other_options, Some((13, 0))).is_none());
        // Without NVRTC the newest version's entry is taken.
        assert_eq!(load_from_disk(&dir, &key("text"), None).unwrap().cubin, b"cubin 13.0");
        // A cubin without its log is not an entry; no temporary file is left behind.
        std::fs::remove_file(dir.join(format!("{}.log", disk_stem(&key("text"), (13, 0))))).unwrap();
        assert!(load_from_disk(&dir, &key("text"), Some((13, 0))).is_none());
        let names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn compile_fills_the_disk_cache_and_reads_it_back() {
        if !available() {
            assert!(
                !std::env::var("DOTS_MOE_REQUIRE_NVRTC").is_ok_and(|v| v == "1"),
                "DOTS_MOE_REQUIRE_NVRTC=1 but NVRTC is missing"
            );
            eprintln!("skipped: no NVRTC library on the library path");
            return;
        }
        let dir = std::env::temp_dir().join(format!("dots-moe-cubin-cache-nvrtc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let source = crate::cuda::source::COMBINE;
        let compiled = compile_with_cache(&source, "sm_80", Some(&dir)).unwrap();
        let cached = load_from_disk(&dir, &cache_key(&source, "sm_80"), Some(version().unwrap()))
            .expect("written after the miss");
        assert_eq!(cached.origin, Origin::DiskCache);
        assert!(cached.cubin == compiled.cubin, "the cached cubin differs from the compiled one");
        assert_eq!(cached.kernels, compiled.kernels);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
