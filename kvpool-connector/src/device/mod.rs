//! Moving KV between accelerator memory and the pinned host memory backends read and write.
//!
//! A backend only ever sees host [`MemRegion`](kvpool_core::buffer::MemRegion)s. KV that
//! lives on a GPU or an NPU goes device → staging → backend on save and backend → staging →
//! device on load; a [`CopyEngine`] does the device half, on a copy stream of its own.
//!
//! Ordering is by stream events, never by synchronizing the device: vLLM calls the connector
//! right after it launches a forward, while the KV is still being written.
//!
//! - Before a save reads KV, and before a load writes blocks the engine may be zeroing, the
//!   copy stream waits for everything queued so far on the engine's compute stream
//!   ([`CopyEngine::order_after`]).
//! - A sync load makes the compute stream wait for the load's [`Fence`]
//!   ([`CopyEngine::stream_wait`]), so attention reads the loaded bytes without the host ever
//!   blocking; an async load is reported done only once its fence is.
//!
//! Engines: [`HostEngine`] (plain memory, `memcpy`), [`CudaEngine`](cuda) (the CUDA driver,
//! loaded at run time, cargo feature `cuda`), [`AscendEngine`](ascend) (AscendCL, loaded at run
//! time), and [`FakeEngine`] (tests: a "device" whose copies run only when a test says so).

use std::any::Any;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use kvpool_core::error::{Error, Result};

pub mod ascend;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fake;
mod host;

pub use fake::{FakeDriver, FakeEngine, FakeEvent};
pub use host::HostEngine;

/// Where a KV-cache tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory: backends may read and write it directly.
    Host,
    /// A CUDA GPU, by ordinal (torch's `device.index`).
    Cuda { ordinal: u32 },
    /// An Ascend NPU, by device id (torch_npu's `device.index`).
    Npu { device: u32 },
}

impl Device {
    /// Whether backends may address the memory.
    pub fn is_host(self) -> bool {
        self == Device::Host
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Host => f.write_str("cpu"),
            Device::Cuda { ordinal } => write!(f, "cuda:{ordinal}"),
            Device::Npu { device } => write!(f, "npu:{device}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;

    /// torch's spelling: `cpu`, `cuda`, `cuda:1`, `npu:0`.
    fn from_str(s: &str) -> Result<Self> {
        let (kind, index) = match s.split_once(':') {
            Some((kind, index)) => {
                let index = index.parse::<u32>().map_err(|_| {
                    Error::invalid_argument(format!(
                        "device {s:?}: {index:?} is not a device index"
                    ))
                })?;
                (kind, index)
            }
            None => (s, 0),
        };
        match kind {
            "cpu" => Ok(Device::Host),
            "cuda" => Ok(Device::Cuda { ordinal: index }),
            "npu" => Ok(Device::Npu { device: index }),
            _ => Err(Error::invalid_argument(format!(
                "device {s:?}: kvpool moves KV on cpu, cuda and npu devices"
            ))),
        }
    }
}

/// A stream of the engine's compute work, as the framework hands it out: torch's
/// `torch.cuda.current_stream().cuda_stream` or `torch.npu.current_stream().npu_stream`.
/// 0 is the legacy default stream. Read it at every hook: vLLM changes the current stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamHandle(pub u64);

/// One contiguous copy between device memory and pinned host memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copy {
    /// Device address (for [`HostEngine`], a host address).
    pub device: u64,
    /// Host address inside a staging region.
    pub host: usize,
    /// Bytes.
    pub len: usize,
}

/// Which of an engine's two copy streams. Device → host copies (saves) and host → device
/// copies (loads) run on streams of their own: a save, which waits for the forward that writes
/// its KV, never holds up a load that the forward itself waits for (layer by layer, that would
/// serialize the forward with the loads), and the two directions can use the device's separate
/// copy engines at the same time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Device → host: [`CopyEngine::to_host`].
    ToHost,
    /// Host → device: [`CopyEngine::to_device`].
    ToDevice,
}

impl Direction {
    /// Both directions, in the order of [`index`](Self::index).
    pub const ALL: [Direction; 2] = [Direction::ToHost, Direction::ToDevice];

    /// 0 for `ToHost`, 1 for `ToDevice`: for engines that keep one stream per direction in
    /// an array.
    pub fn index(self) -> usize {
        match self {
            Direction::ToHost => 0,
            Direction::ToDevice => 1,
        }
    }
}

/// The point on a copy stream after everything submitted before it.
pub trait Fence: Send + Sync + fmt::Debug {
    /// Whether every copy before the fence has completed. An error is a failed copy.
    fn is_done(&self) -> Result<bool>;
    /// Blocks the calling thread until the fence completes. Call it from a blocking thread,
    /// never from an async task.
    fn wait(&self) -> Result<()>;
    /// For the engine that made it, to reach its own event.
    fn as_any(&self) -> &dyn Any;
}

/// Moves bytes between device memory and pinned host memory on two copy streams, one per
/// [`Direction`].
///
/// Copies are queued, not performed: they complete in submission order on their direction's
/// stream, and a [`fence`](Self::fence) of that direction tells when. The two streams are not
/// ordered with each other. Implementations are thread-safe: the worker submits from its
/// runtime's threads.
pub trait CopyEngine: Send + Sync + fmt::Debug {
    /// The device this engine copies to and from.
    fn device(&self) -> Device;

    /// Checks that `addr` is memory of this engine's device, so a wrong description is a
    /// clear error at registration instead of a fault in a copy. Engines that cannot tell
    /// accept every address.
    fn check_device_memory(&self, _addr: u64) -> Result<()> {
        Ok(())
    }

    /// Page-locks `len` bytes at `ptr` so device copies reach them directly (registered, not
    /// write-combined: the CPU reads staging back). Undone by [`unpin`](Self::unpin).
    ///
    /// # Safety
    /// The memory must stay allocated until it is unpinned.
    unsafe fn pin(&self, ptr: *mut u8, len: usize) -> Result<()>;

    /// Undoes [`pin`](Self::pin).
    ///
    /// # Safety
    /// `ptr` was pinned by this engine and no copy to or from it is in flight.
    unsafe fn unpin(&self, ptr: *mut u8) -> Result<()>;

    /// Copies in `direction` submitted after this call start only after everything already
    /// queued on `compute` has finished; copies in the other direction are not held. Does not
    /// block the host.
    fn order_after(&self, direction: Direction, compute: StreamHandle) -> Result<()>;

    /// Queues device → host copies on the [`Direction::ToHost`] stream.
    ///
    /// # Safety
    /// Every `device` range is device memory of this engine's device and every `host` range
    /// pinned host memory; both stay valid, and nobody else writes the host ranges, until a
    /// later fence completes.
    unsafe fn to_host(&self, copies: &[Copy]) -> Result<()>;

    /// Queues host → device copies on the [`Direction::ToDevice`] stream.
    ///
    /// # Safety
    /// As [`to_host`](Self::to_host), with the device ranges written.
    unsafe fn to_device(&self, copies: &[Copy]) -> Result<()>;

    /// A fence after every copy in `direction` submitted so far.
    fn fence(&self, direction: Direction) -> Result<Arc<dyn Fence>>;

    /// Work queued on `compute` after this call waits for `fence`. Does not block the host.
    fn stream_wait(&self, compute: StreamHandle, fence: &dyn Fence) -> Result<()>;
}

/// The engine for KV on `device`, or a clear error when this build or machine cannot reach it.
pub fn engine_for(device: Device) -> Result<Arc<dyn CopyEngine>> {
    match device {
        Device::Host => Ok(Arc::new(HostEngine::new())),
        Device::Cuda { ordinal } => cuda_engine(ordinal),
        Device::Npu { device } => Ok(Arc::new(ascend::AscendEngine::open(device)?)),
    }
}

#[cfg(feature = "cuda")]
fn cuda_engine(ordinal: u32) -> Result<Arc<dyn CopyEngine>> {
    Ok(Arc::new(cuda::CudaEngine::open(ordinal)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_engine(ordinal: u32) -> Result<Arc<dyn CopyEngine>> {
    Err(Error::new(
        kvpool_core::error::ErrorKind::Unsupported,
        format!(
            "the KV cache is on cuda:{ordinal}, but this kvpool was built without CUDA support \
             (cargo feature `cuda`); install a wheel built with it"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_as_torch_spells_them() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Host);
        assert_eq!(
            "cuda".parse::<Device>().unwrap(),
            Device::Cuda { ordinal: 0 }
        );
        assert_eq!(
            "cuda:3".parse::<Device>().unwrap(),
            Device::Cuda { ordinal: 3 }
        );
        assert_eq!(
            "npu:1".parse::<Device>().unwrap(),
            Device::Npu { device: 1 }
        );
        let err = "mps".parse::<Device>().unwrap_err().to_string();
        assert!(err.contains("mps") && err.contains("cuda"), "{err}");
        let err = "cuda:x".parse::<Device>().unwrap_err().to_string();
        assert!(err.contains("cuda:x"), "{err}");
        assert_eq!(Device::Cuda { ordinal: 2 }.to_string(), "cuda:2");
    }
}
