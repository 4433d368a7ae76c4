//! Typed device buffers with their shape, and the copies between host and device.
//!
//! A buffer belongs to one [`GpuContext`] and its stream; copies and kernels are queued on
//! that stream in order. Uploads and plain allocations never wait for the device;
//! downloads do (they return host data).

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, ValidAsZeroBits, result};
use half::bf16;

use crate::cuda::context::GpuContext;
use crate::cuda::error::CudaError;
use crate::error::{MoeError, check_len};
use crate::tensor::{Dtype, TensorView};

/// A device array of `T` with a row-major shape.
///
/// Zero-sized shapes are valid: the allocation then holds one element that is never read.
pub struct DeviceBuffer<T> {
    data: CudaSlice<T>,
    shape: Vec<usize>,
    len: usize,
}

impl<T> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer<{}>{:?}", std::any::type_name::<T>(), self.shape)
    }
}

fn elements(name: &str, shape: &[usize]) -> Result<usize, MoeError> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| MoeError::Overflow(format!("device tensor `{name}` of shape {shape:?}")))
}

impl<T: DeviceRepr + ValidAsZeroBits> DeviceBuffer<T> {
    /// A zero-filled buffer of `shape` (the fill is queued, not waited for).
    pub fn zeros(gpu: &GpuContext, shape: &[usize]) -> Result<Self, CudaError> {
        let len = elements("buffer", shape)?;
        let data = gpu.stream().alloc_zeros::<T>(len.max(1))?;
        Ok(DeviceBuffer { data, shape: shape.to_vec(), len })
    }

    /// Copies `host` (which must hold exactly `shape`'s elements) to a new buffer.
    pub fn upload(gpu: &GpuContext, name: &str, host: &[T], shape: &[usize]) -> Result<Self, CudaError> {
        check_len(name, shape, host.len())?;
        let mut buffer = Self::zeros(gpu, shape)?;
        if !host.is_empty() {
            gpu.stream().memcpy_htod(host, &mut buffer.data)?;
        }
        Ok(buffer)
    }

    /// Overwrites the buffer with `host` (same length).
    pub fn copy_from_host(&mut self, name: &str, host: &[T]) -> Result<(), CudaError> {
        check_len(name, &self.shape, host.len())?;
        if !host.is_empty() {
            let stream = self.data.stream().clone();
            stream.memcpy_htod(host, &mut self.data)?;
        }
        Ok(())
    }

    /// Copies the buffer to the host (waits for the stream).
    pub fn download(&self) -> Result<Vec<T>, CudaError> {
        if self.len == 0 {
            return Ok(Vec::new());
        }
        let stream = self.data.stream();
        Ok(stream.clone_dtoh(&self.data.slice(0..self.len))?)
    }
}

impl<T> DeviceBuffer<T> {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address, for a kernel argument.
    pub fn device_ptr(&self) -> u64 {
        let (ptr, _record) = self.data.device_ptr(self.data.stream());
        ptr
    }

    /// The cudarc slice.
    pub fn slice(&self) -> &CudaSlice<T> {
        &self.data
    }

    /// Fills every byte with `0xff` (queued): u32 `0xffffffff`, f32 and bf16 NaN. Tests
    /// poison outputs before a kernel runs so that an element it fails to write shows.
    pub fn poison(&mut self) -> Result<(), CudaError> {
        let bytes = self.data.len() * std::mem::size_of::<T>();
        let stream = self.data.stream().clone();
        let (ptr, _record) = self.data.device_ptr(&stream);
        // SAFETY: `ptr` addresses this buffer's own `bytes`-byte allocation, alive for as
        // long as `self`; the memset is queued on the stream every use of the buffer goes to.
        unsafe { result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream()) }?;
        Ok(())
    }

    /// Checks the buffer has `shape`, naming it otherwise.
    pub fn expect_shape(&self, name: &str, shape: &[usize]) -> Result<(), MoeError> {
        if self.shape == shape { Ok(()) } else { Err(MoeError::shape(name, shape, &self.shape)) }
    }
}

/// A device tensor of either element type (hidden states, router weights).
#[derive(Debug)]
pub enum DeviceTensor {
    /// f32 elements.
    F32(DeviceBuffer<f32>),
    /// bf16 elements.
    Bf16(DeviceBuffer<bf16>),
}

impl DeviceTensor {
    /// Copies a host tensor of `shape` to the device, keeping its element type.
    pub fn upload(gpu: &GpuContext, name: &str, host: TensorView<'_>, shape: &[usize]) -> Result<Self, CudaError> {
        Ok(match host {
            TensorView::F32(v) => DeviceTensor::F32(DeviceBuffer::upload(gpu, name, v, shape)?),
            TensorView::Bf16(v) => DeviceTensor::Bf16(DeviceBuffer::upload(gpu, name, v, shape)?),
        })
    }

    /// A zero-filled tensor.
    pub fn zeros(gpu: &GpuContext, dtype: Dtype, shape: &[usize]) -> Result<Self, CudaError> {
        Ok(match dtype {
            Dtype::F32 => DeviceTensor::F32(DeviceBuffer::zeros(gpu, shape)?),
            Dtype::Bf16 => DeviceTensor::Bf16(DeviceBuffer::zeros(gpu, shape)?),
        })
    }

    /// Element type.
    pub fn dtype(&self) -> Dtype {
        match self {
            DeviceTensor::F32(_) => Dtype::F32,
            DeviceTensor::Bf16(_) => Dtype::Bf16,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            DeviceTensor::F32(b) => b.shape(),
            DeviceTensor::Bf16(b) => b.shape(),
        }
    }

    /// The device address.
    pub fn device_ptr(&self) -> u64 {
        match self {
            DeviceTensor::F32(b) => b.device_ptr(),
            DeviceTensor::Bf16(b) => b.device_ptr(),
        }
    }

    /// Poisons every byte (see [`DeviceBuffer::poison`]).
    pub fn poison(&mut self) -> Result<(), CudaError> {
        match self {
            DeviceTensor::F32(b) => b.poison(),
            DeviceTensor::Bf16(b) => b.poison(),
        }
    }

    /// Checks the shape, naming the tensor otherwise.
    pub fn expect_shape(&self, name: &str, shape: &[usize]) -> Result<(), MoeError> {
        match self {
            DeviceTensor::F32(b) => b.expect_shape(name, shape),
            DeviceTensor::Bf16(b) => b.expect_shape(name, shape),
        }
    }
}
