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
    /// A CUDA driver call failed. The source is the driver's status code, so that an engine
    /// can match it ([`CudaError::is_out_of_memory`]).
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// An NVRTC call other than the compilation itself failed (the source is NVRTC's status).
    #[error("NVRTC: {0}")]
    Nvrtc(#[from] cudarc::nvrtc::result::NvrtcError),
    /// A kernel program's name or text cannot be handed to NVRTC.
    #[error("kernel program {program}: {reason}")]
    BadProgram {
        /// The kernel file.
        program: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A name that is not a GPU architecture (`sm_80`, `sm_90a`, ...).
    #[error("{0:?} is not a GPU architecture like sm_80 or sm_90a")]
    UnknownArch(String),
    /// A stream capture ended without a graph.
    #[error("CUDA stream capture returned no graph")]
    NoGraph,
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

impl CudaError {
    /// Whether the device ran out of memory (an engine may free caches and retry).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, CudaError::Driver(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::driver::{DriverError, sys::CUresult};

    #[test]
    fn driver_errors_keep_their_status() {
        let oom = CudaError::from(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        assert!(oom.is_out_of_memory());
        assert!(matches!(&oom, CudaError::Driver(e) if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        assert!(std::error::Error::source(&oom).is_some(), "the driver error is the source");
        // (Not formatted here: cudarc asks the driver library for the message.)
        assert!(!CudaError::from(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE)).is_out_of_memory());
        assert!(!CudaError::NoDevice.is_out_of_memory());
    }
}
