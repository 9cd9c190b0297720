//! KV in CUDA GPU memory, through the CUDA driver API (`cudarc`, loaded at run time).
//!
//! The engine shares torch's context (the device's primary context) and copies on two
//! non-blocking streams of its own, one per direction, so copies overlap the model's kernels
//! and saves never queue loads behind the forward; two event edges order them: a copy stream
//! waits for the compute stream before it reads or writes KV, and the compute stream waits
//! for a load's fence before attention reads it.
//!
//! Events are raw driver events created with `CU_EVENT_BLOCKING_SYNC` so a thread waiting for
//! a fence sleeps instead of spinning a core, and `CU_EVENT_DISABLE_TIMING` because timing
//! events are slower to record.

use std::any::Any;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaStream, DriverError};

use kvpool_core::error::{Error, ErrorKind, Result};

use super::{Copy, CopyEngine, Device, Direction, Fence, StreamHandle};

const EVENT_FLAGS: u32 = sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32
    | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;

fn check(call: &'static str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(driver_error(call, DriverError(r)))
    }
}

fn driver_error(call: &'static str, e: DriverError) -> Error {
    Error::new(ErrorKind::Unexpected, format!("CUDA {call} failed: {e}")).set_source(e)
}

/// Whether `libcuda.so` can be loaded. cudarc panics on the first call without it, so nothing
/// else may be called before this says yes.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { sys::is_culib_present() }
}

/// Copies between one GPU's memory and pinned host memory on dedicated streams.
#[derive(Debug)]
pub struct CudaEngine {
    ordinal: u32,
    ctx: Arc<CudaContext>,
    /// One stream per [`Direction`], by its index.
    copy: [Arc<CudaStream>; 2],
}

impl CudaEngine {
    /// Opens GPU `ordinal` (torch's device index).
    ///
    /// # Errors
    /// `Unsupported` when the machine has no CUDA driver; the driver's error for a bad ordinal.
    pub fn open(ordinal: u32) -> Result<CudaEngine> {
        if !driver_present() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "the KV cache is on cuda:{ordinal}, but the CUDA driver (libcuda.so) cannot \
                     be loaded on this machine; install the NVIDIA driver or keep the KV cache \
                     on the CPU"
                ),
            ));
        }
        let ctx = CudaContext::new(ordinal as usize)
            .map_err(|e| driver_error("cuDevicePrimaryCtxRetain", e))?;
        // cudarc's event tracking only serves its own allocations, which kvpool does not use;
        // left on, the first stream would synchronize the whole context.
        // SAFETY: no cudarc allocation is made through this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = || {
            ctx.new_stream()
                .map_err(|e| driver_error("cuStreamCreate", e))
        };
        let copy = [stream()?, stream()?];
        Ok(CudaEngine { ordinal, ctx, copy })
    }

    fn stream(&self, direction: Direction) -> sys::CUstream {
        self.copy[direction.index()].cu_stream()
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_error("cuCtxSetCurrent", e))
    }

    fn new_event(&self) -> Result<RawEvent> {
        let mut event = std::ptr::null_mut();
        // SAFETY: `event` is a valid out pointer; the context is current.
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut event, EVENT_FLAGS)
        })?;
        Ok(RawEvent(event))
    }

    /// Checks that `addr` is memory of this engine's GPU, so a wrong pointer is an error here
    /// rather than a fault in a copy later.
    pub fn check_device_memory(&self, addr: u64) -> Result<()> {
        self.bind()?;
        let mut memory_type: u32 = 0;
        // SAFETY: the out pointer is valid for the attribute's type (an unsigned int).
        let r = unsafe {
            sys::cuPointerGetAttribute(
                &mut memory_type as *mut u32 as *mut c_void,
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                addr,
            )
        };
        let not_device = || {
            Error::invalid_argument(format!(
                "address {addr:#x} is not memory of cuda:{}; a KV-cache tensor described as a \
                 CUDA tensor must be one",
                self.ordinal
            ))
        };
        if r == sys::CUresult::CUDA_ERROR_INVALID_VALUE {
            return Err(not_device());
        }
        check("cuPointerGetAttribute", r)?;
        if memory_type != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
            return Err(not_device());
        }
        let mut ordinal: i32 = -1;
        // SAFETY: as above, for an int.
        check("cuPointerGetAttribute", unsafe {
            sys::cuPointerGetAttribute(
                &mut ordinal as *mut i32 as *mut c_void,
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                addr,
            )
        })?;
        if ordinal != self.ordinal as i32 {
            return Err(not_device());
        }
        Ok(())
    }
}

/// A driver event, destroyed on drop. Destroying an event that is recorded but not complete
/// is allowed: the driver frees it once the device reaches it.
#[derive(Debug)]
struct RawEvent(sys::CUevent);

// SAFETY: CUDA events are usable from any thread of the process.
unsafe impl Send for RawEvent {}
// SAFETY: see `Send`; the driver synchronizes access to events.
unsafe impl Sync for RawEvent {}

impl Drop for RawEvent {
    fn drop(&mut self) {
        // SAFETY: created by `cuEventCreate`, destroyed once.
        unsafe { sys::cuEventDestroy_v2(self.0) };
    }
}

#[derive(Debug)]
struct CudaFence {
    event: RawEvent,
    ctx: Arc<CudaContext>,
}

impl Fence for CudaFence {
    fn is_done(&self) -> Result<bool> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_error("cuCtxSetCurrent", e))?;
        // SAFETY: a live event.
        match unsafe { sys::cuEventQuery(self.event.0) } {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            r => check("cuEventQuery", r).map(|()| false),
        }
    }

    fn wait(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_error("cuCtxSetCurrent", e))?;
        // SAFETY: a live event.
        check("cuEventSynchronize", unsafe {
            sys::cuEventSynchronize(self.event.0)
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl CopyEngine for CudaEngine {
    fn device(&self) -> Device {
        Device::Cuda {
            ordinal: self.ordinal,
        }
    }

    fn check_device_memory(&self, addr: u64) -> Result<()> {
        CudaEngine::check_device_memory(self, addr)
    }

    unsafe fn pin(&self, ptr: *mut u8, len: usize) -> Result<()> {
        self.bind()?;
        // PORTABLE: every context may use it; not write-combined, since the CPU reads staging.
        // SAFETY: the caller keeps the memory allocated until `unpin`.
        check("cuMemHostRegister", unsafe {
            sys::cuMemHostRegister_v2(ptr.cast(), len, sys::CU_MEMHOSTREGISTER_PORTABLE)
        })
    }

    unsafe fn unpin(&self, ptr: *mut u8) -> Result<()> {
        self.bind()?;
        // SAFETY: pinned by `pin`; no copy is in flight per the caller.
        check("cuMemHostUnregister", unsafe {
            sys::cuMemHostUnregister(ptr.cast())
        })
    }

    fn order_after(&self, direction: Direction, compute: StreamHandle) -> Result<()> {
        self.bind()?;
        let event = self.new_event()?;
        // SAFETY: `compute` is a live stream of this context, handed over by torch for this
        // call; the event is live until dropped, and a wait captures its state when enqueued.
        unsafe {
            check(
                "cuEventRecord",
                sys::cuEventRecord(event.0, compute.0 as sys::CUstream),
            )?;
            check(
                "cuStreamWaitEvent",
                sys::cuStreamWaitEvent(self.stream(direction), event.0, 0),
            )
        }
    }

    unsafe fn to_host(&self, copies: &[Copy]) -> Result<()> {
        self.bind()?;
        for c in copies {
            // SAFETY: per the trait's contract, device and pinned host ranges stay valid.
            check("cuMemcpyDtoHAsync", unsafe {
                sys::cuMemcpyDtoHAsync_v2(
                    c.host as *mut c_void,
                    c.device,
                    c.len,
                    self.stream(Direction::ToHost),
                )
            })?;
        }
        Ok(())
    }

    unsafe fn to_device(&self, copies: &[Copy]) -> Result<()> {
        self.bind()?;
        for c in copies {
            // SAFETY: as in `to_host`.
            check("cuMemcpyHtoDAsync", unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    c.device,
                    c.host as *const c_void,
                    c.len,
                    self.stream(Direction::ToDevice),
                )
            })?;
        }
        Ok(())
    }

    fn fence(&self, direction: Direction) -> Result<Arc<dyn Fence>> {
        self.bind()?;
        let event = self.new_event()?;
        // SAFETY: a live event on this engine's live stream.
        check("cuEventRecord", unsafe {
            sys::cuEventRecord(event.0, self.stream(direction))
        })?;
        Ok(Arc::new(CudaFence {
            event,
            ctx: self.ctx.clone(),
        }))
    }

    fn stream_wait(&self, compute: StreamHandle, fence: &dyn Fence) -> Result<()> {
        let fence = fence
            .as_any()
            .downcast_ref::<CudaFence>()
            .ok_or_else(|| Error::invalid_argument("a fence of another copy engine"))?;
        self.bind()?;
        // SAFETY: `compute` is torch's live stream for this call; the event is live.
        check("cuStreamWaitEvent", unsafe {
            sys::cuStreamWaitEvent(compute.0 as sys::CUstream, fence.event.0, 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_opening_is_a_clear_error_not_a_panic() {
        if driver_present() {
            return; // a GPU machine: the GPU check script covers it
        }
        let err = CudaEngine::open(0).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        let text = err.to_string();
        assert!(
            text.contains("cuda:0") && text.contains("libcuda"),
            "{text}"
        );
    }
}
