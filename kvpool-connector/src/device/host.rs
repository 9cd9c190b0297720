//! KV in host memory, copied through staging with `memcpy`.
//!
//! Only used when `stage_host_kv` asks for it: normally backends read host KV directly. The
//! "device" is the host, so a copy is done when it is submitted and every fence is complete.

use std::any::Any;
use std::sync::Arc;

use kvpool_core::error::Result;

use super::{Copy, CopyEngine, Device, Direction, Fence, StreamHandle};

/// Copies host KV to and from staging on the calling thread.
#[derive(Debug, Default)]
pub struct HostEngine;

impl HostEngine {
    pub fn new() -> Self {
        HostEngine
    }
}

#[derive(Debug)]
struct Done;

impl Fence for Done {
    fn is_done(&self) -> Result<bool> {
        Ok(true)
    }

    fn wait(&self) -> Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl CopyEngine for HostEngine {
    fn device(&self) -> Device {
        Device::Host
    }

    unsafe fn pin(&self, _ptr: *mut u8, _len: usize) -> Result<()> {
        Ok(())
    }

    unsafe fn unpin(&self, _ptr: *mut u8) -> Result<()> {
        Ok(())
    }

    // Host KV is written by the CPU forward, which has returned before vLLM calls the
    // connector: there is nothing queued to wait for.
    fn order_after(&self, _direction: Direction, _compute: StreamHandle) -> Result<()> {
        Ok(())
    }

    unsafe fn to_host(&self, copies: &[Copy]) -> Result<()> {
        for c in copies {
            // SAFETY: the caller guarantees both ranges are valid and not written by others.
            unsafe {
                std::ptr::copy_nonoverlapping(c.device as *const u8, c.host as *mut u8, c.len)
            };
        }
        Ok(())
    }

    unsafe fn to_device(&self, copies: &[Copy]) -> Result<()> {
        for c in copies {
            // SAFETY: as in `to_host`.
            unsafe {
                std::ptr::copy_nonoverlapping(c.host as *const u8, c.device as *mut u8, c.len)
            };
        }
        Ok(())
    }

    fn fence(&self, _direction: Direction) -> Result<Arc<dyn Fence>> {
        Ok(Arc::new(Done))
    }

    fn stream_wait(&self, _compute: StreamHandle, _fence: &dyn Fence) -> Result<()> {
        Ok(())
    }
}
