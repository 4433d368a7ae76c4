//! The CUDA layer's typed errors: "no GPU" is a value, never a panic.

use crate::error::MoeError;

/// An error of the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The CUDA driver library (`libcuda.so.1`) cannot be loaded: no NVIDIA driver here.
    #[error("no CUDA driver library (libcuda.so.1) on this machine: no GPU to run on")]
    NoDriver,
    /// The NVRTC library (`libnvrtc.so.13`) cannot be loaded, so kernels cannot be compiled.
    #[error(
        "no NVRTC library (libnvrtc.so.13): install the pip wheel nvidia-cuda-nvrtc==13.0.88 \
         (or a CUDA 13 toolkit) and put its lib folder on LD_LIBRARY_PATH"
    )]
    NoNvrtc,
    /// The driver is there but reports no device.
    #[error("the CUDA driver reports no device")]
    NoDevice,
    /// The requested device ordinal does not exist.
    #[error("CUDA device {ordinal} does not exist (the driver reports {count})")]
    NoSuchDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many devices there are.
        count: usize,
    },
    /// The device is too old for these kernels.
    #[error(
        "CUDA device {ordinal} ({name}) has compute capability {major}.{minor}; the dots-moe kernels need 8.0 or newer"
    )]
    UnsupportedArch {
        /// Device ordinal.
        ordinal: usize,
        /// Device name.
        name: String,
        /// Compute capability, major.
        major: i32,
        /// Compute capability, minor.
        minor: i32,
    },
    /// A CUDA driver call failed (the message is the driver's own).
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// An NVRTC call other than the compilation itself failed.
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    /// NVRTC rejected a kernel file.
    #[error("NVRTC could not compile {program} for {arch}:\n{log}")]
    Compile {
        /// The kernel file.
        program: String,
        /// The target architecture (`sm_90a`, ...).
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// An input the MoE contract rejects (shape, value, size limit of a kernel).
    #[error(transparent)]
    Moe(#[from] MoeError),
}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(err: cudarc::driver::DriverError) -> Self {
        CudaError::Driver(format!("{err:?}"))
    }
}

impl From<cudarc::nvrtc::result::NvrtcError> for CudaError {
    fn from(err: cudarc::nvrtc::result::NvrtcError) -> Self {
        CudaError::Nvrtc(format!("{err:?}"))
    }
}
