//! The two device-side helpers every timing and replay path shares: capturing what a
//! closure queues into a CUDA graph, and timing what a closure queues with CUDA events.

use cudarc::driver::CudaGraph;
use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};

use crate::cuda::context::GpuContext;
use crate::cuda::error::CudaError;

/// Captures everything `enqueue` queues on `gpu`'s stream into an instantiated graph,
/// uploaded and ready to launch. The capture is ended whatever `enqueue` returned, so the
/// stream stays usable after an error.
pub fn capture(gpu: &GpuContext, enqueue: impl FnOnce() -> Result<(), CudaError>) -> Result<CudaGraph, CudaError> {
    let stream = gpu.stream();
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let queued = enqueue();
    let graph = stream.end_capture(CUgraphInstantiate_flags(0));
    queued?;
    let graph = graph?.ok_or(CudaError::NoGraph)?;
    graph.upload()?;
    Ok(graph)
}

/// Device time, in microseconds, of what `enqueue` queues on `gpu`'s stream, between two
/// CUDA events (waits for the second).
pub fn device_time_us(gpu: &GpuContext, enqueue: impl FnOnce() -> Result<(), CudaError>) -> Result<f64, CudaError> {
    let ctx = gpu.cuda_context();
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (ctx.new_event(flags)?, ctx.new_event(flags)?);
    start.record(gpu.stream())?;
    enqueue()?;
    end.record(gpu.stream())?;
    end.synchronize()?;
    Ok(f64::from(start.elapsed_ms(&end)?) * 1e3)
}
