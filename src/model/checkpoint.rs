//! Hugging Face safetensors checkpoints, memory-mapped.
//!
//! A model directory holds `config.json`, optionally `generation_config.json`, and either
//! one `model.safetensors` or shards `model-0000K-of-0000N.safetensors` listed by
//! `model.safetensors.index.json` (its `weight_map` names the shard of each tensor).
//!
//! Every file is mapped read-only with `memmap2` and its header parsed (and checked:
//! offsets inside the file, the file not truncated) by the `safetensors` crate. A
//! [`Weight`] then points into a map: bf16 and f32 tensors are used in place, never
//! copied. f16 tensors (and, on the rare file whose data is not aligned for its dtype,
//! any tensor) are widened to an owned f32 copy once, at load.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use super::error::ModelError;
use crate::tensor::{Dtype, TensorData, TensorView};

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Element type of a tensor as stored on disk (the ones the model can read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredDtype {
    /// IEEE single precision: used in place.
    F32,
    /// bfloat16: used in place.
    Bf16,
    /// IEEE half precision: widened to f32 at load.
    F16,
}

impl StoredDtype {
    fn size(self) -> usize {
        match self {
            StoredDtype::F32 => 4,
            StoredDtype::Bf16 | StoredDtype::F16 => 2,
        }
    }
}

/// Where one tensor lives: which file, which bytes.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// Index of the file in [`Checkpoint::files`].
    pub file: usize,
    /// Stored dtype, or the unsupported dtype's name.
    pub dtype: Result<StoredDtype, String>,
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Byte offset of the data in the file.
    start: usize,
    /// Byte length of the data.
    len: usize,
}

/// A weight the model computes with: a range of a memory map, or an owned copy.
#[derive(Clone, Debug)]
pub struct Weight {
    storage: Storage,
    /// Shape, as validated against the configuration.
    pub shape: Vec<usize>,
}

#[derive(Clone, Debug)]
enum Storage {
    /// `elems` elements of `dtype` at byte `start` of file `file`'s map.
    Mapped { file: usize, start: usize, elems: usize, dtype: Dtype },
    /// Widened (f16) or realigned data.
    Owned(TensorData),
}

impl Weight {
    /// Whether the weight is used in place from the memory map.
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    /// Element type as the model sees it.
    pub fn dtype(&self) -> Dtype {
        match &self.storage {
            Storage::Mapped { dtype, .. } => *dtype,
            Storage::Owned(data) => data.dtype(),
        }
    }
}

struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

/// An open checkpoint: every file mapped, every tensor header known.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, TensorEntry>,
    used: BTreeSet<String>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files.iter().map(|m| &m.path).collect::<Vec<_>>())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens the safetensors files of the model directory `dir`: `model.safetensors`, or the
    /// shards its index names. Headers are parsed and checked; no tensor data is read.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let index: Index = serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
                path: index_path.clone(),
                reason: format!("bad index JSON: {e}"),
            })?;
            Self::open_sharded(dir, &index_path, index)
        } else if single_path.exists() {
            let mut ckpt = Checkpoint {
                dir: dir.to_path_buf(),
                files: Vec::new(),
                tensors: BTreeMap::new(),
                used: BTreeSet::new(),
            };
            let names = ckpt.add_file(single_path)?;
            for (name, entry) in names {
                ckpt.tensors.insert(name, entry);
            }
            Ok(ckpt)
        } else {
            Err(ModelError::NoWeights { dir: dir.to_path_buf() })
        }
    }

    fn open_sharded(dir: &Path, index_path: &Path, index: Index) -> Result<Self, ModelError> {
        let mut ckpt =
            Checkpoint { dir: dir.to_path_buf(), files: Vec::new(), tensors: BTreeMap::new(), used: BTreeSet::new() };
        let shard_names: BTreeSet<&String> = index.weight_map.values().collect();
        if shard_names.is_empty() {
            return Err(ModelError::Corrupt { path: index_path.to_path_buf(), reason: "weight_map is empty".into() });
        }
        for shard in shard_names {
            let shard_path = Path::new(shard);
            if shard_path.is_absolute() || shard_path.components().any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(ModelError::Corrupt {
                    path: index_path.to_path_buf(),
                    reason: format!("shard name {shard:?} leaves the model directory"),
                });
            }
            let entries = ckpt.add_file(dir.join(shard_path))?;
            for (name, entry) in entries {
                match index.weight_map.get(&name) {
                    Some(listed) if listed == shard => {
                        ckpt.tensors.insert(name, entry);
                    }
                    // A tensor the index places elsewhere (or not at all): the index wins.
                    _ => {}
                }
            }
        }
        for (name, shard) in &index.weight_map {
            if !ckpt.tensors.contains_key(name) {
                return Err(ModelError::Corrupt {
                    path: dir.join(shard),
                    reason: format!("the index places tensor `{name}` in this file, but the file does not hold it"),
                });
            }
        }
        Ok(ckpt)
    }

    /// Maps `path` and reads its header. Returns its tensors.
    fn add_file(&mut self, path: PathBuf) -> Result<Vec<(String, TensorEntry)>, ModelError> {
        let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        // SAFETY: the file is opened read-only and the map is only ever read. Like every
        // reader of memory-mapped checkpoints we assume no other process truncates or
        // rewrites the file while the model is loaded; the map lives as long as `self`.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map[..])
            .map_err(|e| ModelError::Corrupt { path: path.clone(), reason: format!("{e}") })?;
        let data_start = 8 + header_len;
        let index = self.files.len();
        let mut out = Vec::new();
        for (name, info) in metadata.tensors() {
            let (begin, end) = info.data_offsets;
            let dtype = match info.dtype {
                StDtype::F32 => Ok(StoredDtype::F32),
                StDtype::BF16 => Ok(StoredDtype::Bf16),
                StDtype::F16 => Ok(StoredDtype::F16),
                other => Err(format!("{other}")),
            };
            out.push((
                name,
                TensorEntry {
                    file: index,
                    dtype,
                    shape: info.shape.clone(),
                    start: data_start + begin,
                    len: end - begin,
                },
            ));
        }
        self.files.push(MappedFile { path, map });
        Ok(out)
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The files mapped, in index order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// Total bytes of tensor data across files.
    pub fn data_bytes(&self) -> usize {
        self.tensors.values().map(|t| t.len).sum()
    }

    /// Every tensor, by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorEntry> {
        &self.tensors
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn files_description(&self) -> String {
        self.files.iter().map(|f| f.path.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    /// Checks that `name` exists with shape `expected` and a supported dtype, without
    /// touching its data.
    pub fn check(&self, name: &str, expected: &[usize]) -> Result<&TensorEntry, ModelError> {
        let entry = self.tensors.get(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            expected: expected.to_vec(),
            files: self.files_description(),
        })?;
        let file = &self.files[entry.file].path;
        if entry.shape != expected {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                file: file.clone(),
                expected: expected.to_vec(),
                actual: entry.shape.clone(),
            });
        }
        if let Err(dtype) = &entry.dtype {
            return Err(ModelError::TensorDtype { name: name.to_string(), file: file.clone(), dtype: dtype.clone() });
        }
        Ok(entry)
    }

    /// The tensor `name`, checked against `expected`, as a [`Weight`] (mapped in place when
    /// its dtype and alignment allow). Marks the tensor used.
    pub fn weight(&mut self, name: &str, expected: &[usize]) -> Result<Weight, ModelError> {
        let entry = self.check(name, expected)?.clone();
        let stored = entry.dtype.clone().map_err(|dtype| ModelError::TensorDtype {
            name: name.to_string(),
            file: self.files[entry.file].path.clone(),
            dtype,
        })?;
        self.used.insert(name.to_string());
        let elems = entry.len / stored.size();
        let bytes = &self.files[entry.file].map[entry.start..entry.start + entry.len];
        let aligned = bytes.as_ptr().align_offset(stored.size()) == 0 && cfg!(target_endian = "little");
        let storage = match stored {
            StoredDtype::F32 if aligned => {
                Storage::Mapped { file: entry.file, start: entry.start, elems, dtype: Dtype::F32 }
            }
            StoredDtype::Bf16 if aligned => {
                Storage::Mapped { file: entry.file, start: entry.start, elems, dtype: Dtype::Bf16 }
            }
            StoredDtype::F32 => Storage::Owned(TensorData::F32(
                bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            )),
            StoredDtype::Bf16 => Storage::Owned(TensorData::Bf16(
                bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect(),
            )),
            StoredDtype::F16 => Storage::Owned(TensorData::F32(
                bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            )),
        };
        Ok(Weight { storage, shape: entry.shape })
    }

    /// Borrows the data of `weight` (which must come from this checkpoint).
    pub fn view<'a>(&'a self, weight: &'a Weight) -> TensorView<'a> {
        match &weight.storage {
            Storage::Owned(data) => data.view(),
            Storage::Mapped { file, start, elems, dtype } => {
                let bytes = &self.files[*file].map[*start..*start + elems * dtype.size()];
                // Alignment and length were checked when the weight was made.
                match dtype {
                    Dtype::F32 => TensorView::F32(bytemuck::cast_slice(bytes)),
                    Dtype::Bf16 => TensorView::Bf16(bytemuck::cast_slice(bytes)),
                }
            }
        }
    }

    /// `weight` as bf16: itself when it already is, otherwise an owned bf16 copy (f32
    /// rounded to nearest even), after which the f32 pages are released. This is how
    /// the bf16 compute mode holds f32 or f16 checkpoints: never an f32 copy of a weight.
    pub fn to_bf16(&self, weight: Weight) -> Weight {
        if weight.dtype() == Dtype::Bf16 {
            return weight;
        }
        let view = self.view(&weight);
        let mut data = TensorData::zeros(Dtype::Bf16, view.len());
        data.write_at(0, view);
        self.release(&weight);
        Weight { storage: Storage::Owned(data), shape: weight.shape }
    }

    /// Reads every page of a mapped `weight` once (after asking the OS to read ahead), so
    /// that the first forward pass does not pay for page faults; the load time then says
    /// what loading really costs. A no-op for owned weights.
    pub fn prefetch(&self, weight: &Weight) {
        if let Storage::Mapped { file, start, elems, dtype } = &weight.storage {
            let len = elems * dtype.size();
            let map = &self.files[*file].map;
            #[cfg(unix)]
            let _ = map.advise_range(memmap2::Advice::WillNeed, *start, len);
            const PAGE: usize = 4096;
            let touched = map[*start..*start + len].iter().step_by(PAGE).fold(0u8, |acc, &b| acc ^ b);
            std::hint::black_box(touched);
        }
    }

    /// Reads every page of a mapped `weight` into the page cache, then unmaps it from this
    /// process: for tensors read only in part, like the embeddings (only the rows of the
    /// tokens seen), whose rows would otherwise each cost a disk read on first use
    /// (measured from a cold cache: a 64-token prefill 0.78 s instead of 0.45 s). The
    /// rows read later are minor faults, and the resident memory does not count the
    /// whole tensor. A no-op for owned weights.
    pub fn cache(&self, weight: &Weight) {
        self.prefetch(weight);
        self.release(weight);
    }

    /// Tells the OS that this process no longer needs the mapped pages of `weight` (after
    /// they were copied elsewhere, like the MoE experts): its resident memory drops, and a
    /// later read simply maps the file again. The page cache keeps the file's pages (a
    /// later load of the same checkpoint reads them from memory, not from disk). A no-op
    /// for owned weights and off Unix.
    pub fn release(&self, weight: &Weight) {
        #[cfg(unix)]
        if let Storage::Mapped { file, start, elems, dtype } = &weight.storage {
            // SAFETY: the map is a read-only mapping of a file that is never written through
            // it; MADV_DONTNEED on such a mapping only drops resident pages, and any later
            // access faults the identical bytes back in from the file, so no slice handed
            // out by `view` can observe a change. Errors are only advisory and ignored.
            let _ = unsafe {
                self.files[*file].map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    *start,
                    elems * dtype.size(),
                )
            };
        }
        #[cfg(not(unix))]
        let _ = weight;
    }

    /// Tensors present in the files but never asked for: "unknown extra tensors".
    pub fn unused(&self) -> Vec<&str> {
        self.tensors.keys().filter(|k| !self.used.contains(*k)).map(String::as_str).collect()
    }
}
