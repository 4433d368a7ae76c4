//! "No GPU" is a typed error, never a panic: on a machine without a driver or device
//! (CI), opening the GPU returns `NoDriver` / `NoDevice` and the CUDA backend says it is
//! unavailable; with a GPU (or `DOTS_MOE_REQUIRE_GPU=1`) it opens and names the device.
#![cfg(feature = "cuda")]

use dots_moe::backend::{Backend, BackendError, testing};
use dots_moe::cuda::{CudaError, GpuContext, context};

#[test]
fn opening_the_gpu_returns_a_typed_result() {
    match GpuContext::new(0) {
        Ok(gpu) => {
            let info = gpu.info();
            eprintln!("device 0: {} (compute capability {}.{}, {})", info.name, info.major, info.minor, info.arch);
            assert!(info.major >= 8);
            assert!(info.total_memory_bytes > 0);
            assert!(info.arch.starts_with("sm_"));
            // A device that does not exist is an error too.
            let count = context::device_count().unwrap();
            assert!(matches!(GpuContext::new(count), Err(CudaError::NoSuchDevice { .. })));
        }
        Err(err) => {
            assert!(!testing::gpu_required(), "DOTS_MOE_REQUIRE_GPU=1 but: {err}");
            assert!(
                matches!(err, CudaError::NoDriver | CudaError::NoDevice | CudaError::UnsupportedArch { .. }),
                "unexpected error without a GPU: {err:?}"
            );
            if !context::driver_present() {
                assert!(matches!(err, CudaError::NoDriver), "{err:?}");
                assert!(matches!(context::device_count(), Err(CudaError::NoDriver)));
                assert!(matches!(context::driver_version(), Err(CudaError::NoDriver)));
                assert!(matches!(context::devices(), Err(CudaError::NoDriver)));
            }
            eprintln!("no GPU, as expected here: {err}");
        }
    }
}

#[test]
fn the_cuda_backend_is_unavailable_or_named() {
    match Backend::cuda(0) {
        Ok(b) => assert!(b.name().starts_with("cuda:0")),
        Err(err) => {
            assert!(!testing::gpu_required(), "DOTS_MOE_REQUIRE_GPU=1 but: {err}");
            assert!(matches!(err, BackendError::Cuda(_)), "{err:?}");
            let (backends, why) = Backend::available();
            assert_eq!(backends.len(), 1);
            assert_eq!(backends[0].name(), "cpu");
            assert!(why.is_some());
        }
    }
}
