//! Flat tensors of `f32` or `bf16`: the two element types weights and activations use.
//!
//! Tensors are row-major and flat; their shape travels beside them and is checked once,
//! at the safe API, with [`crate::error::check_len`].

use half::bf16;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE single precision.
    F32,
    /// bfloat16: the checkpoint dtype of dots.llm1.
    Bf16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }
}

/// A borrowed flat tensor of `f32` or `bf16` elements.
#[derive(Clone, Copy, Debug)]
pub enum TensorView<'a> {
    /// `f32` elements.
    F32(&'a [f32]),
    /// `bf16` elements.
    Bf16(&'a [bf16]),
}

impl<'a> TensorView<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorView::F32(s) => s.len(),
            TensorView::Bf16(s) => s.len(),
        }
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element type.
    pub fn dtype(&self) -> Dtype {
        match self {
            TensorView::F32(_) => Dtype::F32,
            TensorView::Bf16(_) => Dtype::Bf16,
        }
    }

    /// Elements `range` of the flat tensor. Panics if out of range: callers slice
    /// tensors whose length they have already checked.
    pub fn slice(&self, range: std::ops::Range<usize>) -> TensorView<'a> {
        match self {
            TensorView::F32(s) => TensorView::F32(&s[range]),
            TensorView::Bf16(s) => TensorView::Bf16(&s[range]),
        }
    }

    /// Element `i` as `f32` (exact for both types).
    #[inline]
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            TensorView::F32(s) => s[i],
            TensorView::Bf16(s) => s[i].to_f32(),
        }
    }

    /// Copies elements into `out` as `f32` (exact). `out.len()` must equal `self.len()`.
    pub fn copy_to_f32(&self, out: &mut [f32]) {
        match self {
            TensorView::F32(s) => out.copy_from_slice(s),
            TensorView::Bf16(s) => {
                for (o, v) in out.iter_mut().zip(s.iter()) {
                    *o = v.to_f32();
                }
            }
        }
    }

    /// All elements as a new `f32` vector.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.copy_to_f32(&mut out);
        out
    }
}

impl<'a> From<&'a [f32]> for TensorView<'a> {
    fn from(s: &'a [f32]) -> Self {
        TensorView::F32(s)
    }
}

impl<'a> From<&'a [bf16]> for TensorView<'a> {
    fn from(s: &'a [bf16]) -> Self {
        TensorView::Bf16(s)
    }
}

impl<'a> From<&'a Vec<f32>> for TensorView<'a> {
    fn from(s: &'a Vec<f32>) -> Self {
        TensorView::F32(s)
    }
}

impl<'a> From<&'a Vec<bf16>> for TensorView<'a> {
    fn from(s: &'a Vec<bf16>) -> Self {
        TensorView::Bf16(s)
    }
}

/// An owned flat tensor of `f32` or `bf16` elements.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// `f32` elements.
    F32(Vec<f32>),
    /// `bf16` elements.
    Bf16(Vec<bf16>),
}

impl TensorData {
    /// A zero-filled tensor of `len` elements. The memory comes zeroed from the
    /// allocator (untouched pages cost nothing until written), so building a 4.5 GB layer
    /// does not first write 4.5 GB of zeros.
    pub fn zeros(dtype: Dtype, len: usize) -> Self {
        match dtype {
            Dtype::F32 => TensorData::F32(bytemuck::zeroed_vec(len)),
            Dtype::Bf16 => TensorData::Bf16(bytemuck::zeroed_vec(len)),
        }
    }

    /// Borrows the whole tensor.
    pub fn view(&self) -> TensorView<'_> {
        match self {
            TensorData::F32(v) => TensorView::F32(v),
            TensorData::Bf16(v) => TensorView::Bf16(v),
        }
    }

    /// Element type.
    pub fn dtype(&self) -> Dtype {
        self.view().dtype()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.view().len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Overwrites elements `offset..offset + src.len()` with `src`, converting to this
    /// tensor's dtype (f32 -> bf16 rounds to nearest even). Panics if out of range:
    /// callers write into tensors whose shapes they have already checked.
    pub fn write_at(&mut self, offset: usize, src: TensorView<'_>) {
        let n = src.len();
        match (self, src) {
            (TensorData::F32(d), TensorView::F32(s)) => d[offset..offset + n].copy_from_slice(s),
            (TensorData::Bf16(d), TensorView::Bf16(s)) => d[offset..offset + n].copy_from_slice(s),
            (TensorData::F32(d), TensorView::Bf16(s)) => {
                for (o, v) in d[offset..offset + n].iter_mut().zip(s) {
                    *o = v.to_f32();
                }
            }
            (TensorData::Bf16(d), TensorView::F32(s)) => {
                for (o, v) in d[offset..offset + n].iter_mut().zip(s) {
                    *o = bf16::from_f32(*v);
                }
            }
        }
    }
}

/// Rounds every element to the nearest bf16 (ties to even), in place, keeping `f32`
/// storage: the value a bf16 kernel input would hold.
pub fn round_to_bf16(values: &mut [f32]) {
    for v in values {
        *v = bf16::from_f32(*v).to_f32();
    }
}
