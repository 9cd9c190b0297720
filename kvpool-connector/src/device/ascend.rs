//! KV on Ascend NPUs, through AscendCL loaded at run time.
//!
//! The CUDA design (`device-path.md` §4.2) with AscendCL's calls (§5.1): a copy stream of the
//! engine's own per direction, `aclrtMemcpyAsync` per contiguous run, and events for every edge with the
//! engine's compute stream (torch_npu's `current_stream().npu_stream`, a raw `aclrtStream`):
//!
//! - [`order_after`](CopyEngine::order_after): an event recorded on the compute stream, and
//!   `aclrtStreamWaitEvent` on the direction's copy stream;
//! - [`fence`](CopyEngine::fence): an event recorded on the direction's copy stream, polled with
//!   `aclrtQueryEventStatus` and waited for with `aclrtSynchronizeEvent`;
//! - [`stream_wait`](CopyEngine::stream_wait): `aclrtStreamWaitEvent` on the compute stream for
//!   the fence's event.
//!
//! The host never synchronizes the device or a stream, except when the engine is dropped.
//!
//! **Event lifetimes.** `acl_rt.h` (1.17) says of `aclrtDestroyEvent`: "the user must ensure
//! that the tasks involved in the aclrtSynchronizeEvent interface or the aclrtStreamWaitEvent
//! interface are completed before they are destroyed" (newer CANN documentation allows
//! destroying an event early, but kvpool does not rely on that). So an event some stream waits
//! on is kept alive until a later event on the *waiting* stream has completed: the events
//! [`order_after`](CopyEngine::order_after) makes a copy stream wait on are released once the
//! next [`fence`](CopyEngine::fence) of that stream completes, and a fence's event that
//! [`stream_wait`](CopyEngine::stream_wait) made the compute stream wait on is released once an
//! event recorded on the compute stream right after the wait completes. Completed entries are
//! reaped at every call; whatever is left is waited for when the engine drops.
//!
//! **Threads.** AscendCL binds a device (its default context) to each thread. Every method
//! binds the calling thread to the engine's device first: `aclrtGetDevice`, and
//! `aclrtSetDevice` only when the thread is on no device or on another one. That switches the
//! calling thread's current device: the worker calls the engine from torch's thread (already
//! on the KV's device) and from kvpool's own runtime threads.
//!
//! Nothing here has run on an NPU yet.

use std::any::Any;
use std::cell::Cell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ascendcl_sys::{AclError, AscendCl, Event, HostRegisterType, MemcpyKind, RawStream, Stream};
use kvpool_core::error::{Error, ErrorKind, Result};

use super::{Copy, CopyEngine, Device, Direction, Fence, StreamHandle};

/// `ACL_ERROR_RT_FEATURE_NOT_SUPPORT`: host registration on a product without it (the
/// Atlas inference series, per CANN's documentation).
const ACL_ERROR_RT_FEATURE_NOT_SUPPORT: i32 = 207_000;

/// What the engine calls, each as alternatives (any one will do). `aclrtHostRegister` is not
/// here: without it [`AscendEngine::pin`] degrades instead of failing.
const NEEDED: &[&[&str]] = &[
    &["aclrtGetDevice"],
    &["aclrtCreateStream"],
    &["aclrtSynchronizeStream"],
    &["aclrtDestroyStream"],
    &["aclrtCreateEventWithFlag", "aclrtCreateEvent"],
    &["aclrtDestroyEvent"],
    &["aclrtRecordEvent"],
    &["aclrtStreamWaitEvent"],
    &["aclrtQueryEventStatus", "aclrtQueryEvent"],
    &["aclrtSynchronizeEvent"],
    &["aclrtMemcpyAsync"],
];

thread_local! {
    /// The device this thread was last bound to by an engine, for a CANN whose
    /// `aclrtGetDevice` fails on threads bound by someone else.
    static BOUND: Cell<Option<i32>> = const { Cell::new(None) };
}

/// AscendCL and the device every call of one engine is made on.
#[derive(Debug)]
struct Npu {
    acl: Arc<AscendCl>,
    device: u32,
}

impl Npu {
    fn id(&self) -> i32 {
        // Device ids are small; `open` checked it fits.
        self.device as i32
    }

    /// Binds the calling thread to the device, unless it already is.
    fn bind(&self) -> Result<()> {
        let id = self.id();
        if let Ok(current) = self.acl.get_device() {
            if current == id {
                BOUND.with(|b| b.set(Some(id)));
                return Ok(());
            }
        } else if BOUND.with(Cell::get) == Some(id) {
            return Ok(());
        }
        self.acl
            .set_device(id)
            .map_err(|e| self.error("binding the thread to the device", e))?;
        BOUND.with(|b| b.set(Some(id)));
        Ok(())
    }

    /// A failed or missing AscendCL call, as kvpool's error.
    fn error(&self, what: &str, e: AclError) -> Error {
        let kind = match e {
            AclError::Unavailable { .. } => ErrorKind::Unsupported,
            AclError::Failed { .. } => ErrorKind::Unexpected,
        };
        Error::new(kind, format!("npu:{}: {what}", self.device))
            .with_context("device", format!("npu:{}", self.device))
            .set_source(e)
    }
}

/// Events kept alive until the streams waiting on them have passed the waits.
#[derive(Debug, Default)]
struct KeepAlive {
    /// Events each copy stream (by [`Direction::index`]) waits on since its last fence.
    waits: [Vec<Arc<Event>>; 2],
    /// Events released once `guard`, recorded on the waiting stream after the waits, completes.
    retiring: Vec<Retiring>,
}

#[derive(Debug)]
struct Retiring {
    guard: Arc<Event>,
    /// Held only to be dropped (destroyed) after `guard` completes.
    _keep: Vec<Arc<Event>>,
}

impl KeepAlive {
    /// Releases the entries whose guard has completed. The thread must be bound.
    fn reap(&mut self) {
        // A failing query (a failed stream) keeps the entry: destroying an event a stream may
        // still wait on is what this avoids. The failure itself surfaces through a fence.
        self.retiring
            .retain(|r| !matches!(r.guard.is_complete(), Ok(true)));
    }
}

/// Copies between NPU memory and pinned host memory on AscendCL streams.
#[derive(Debug)]
pub struct AscendEngine {
    npu: Arc<Npu>,
    /// One stream per [`Direction`], by its index.
    copy: [Stream; 2],
    keep: Mutex<KeepAlive>,
    /// Host ranges `aclrtHostRegister` accepted, by start address: only those are unregistered.
    registered: Mutex<HashSet<usize>>,
    /// Whether the "staging is not page-locked" warning was logged.
    warned_unpinned: AtomicBool,
}

impl AscendEngine {
    /// Opens NPU `device`: loads AscendCL, initialises it (sharing torch_npu's `aclInit`),
    /// binds the calling thread to the device and creates the copy streams.
    ///
    /// # Errors
    /// `Unsupported` naming `npu:{device}` and CANN when `libascendcl.so` cannot be loaded or
    /// lacks a function the engine calls (the message points to Mooncake's
    /// `"protocol": "tcp"` and KV in host memory); `Unexpected` when AscendCL fails.
    pub fn open(device: u32) -> Result<AscendEngine> {
        let acl = AscendCl::load().map_err(|e| {
            Error::new(
                ErrorKind::Unsupported,
                format!("the KV cache is on npu:{device}, but AscendCL cannot be used"),
            )
            .set_source(e)
        })?;
        Self::with_library(acl, device)
    }

    /// As [`open`](Self::open), with AscendCL already loaded (a CANN outside the usual
    /// places: [`AscendCl::load_from`]).
    ///
    /// # Errors
    /// As [`open`](Self::open), but for loading.
    pub fn with_library(acl: Arc<AscendCl>, device: u32) -> Result<AscendEngine> {
        let missing = acl.missing_optional();
        let lacking: Vec<&str> = NEEDED
            .iter()
            .filter(|alternatives| alternatives.iter().all(|s| missing.contains(s)))
            .map(|alternatives| alternatives[0])
            .collect();
        if !lacking.is_empty() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "the KV cache is on npu:{device}, but the CANN at {} lacks {}: kvpool's NPU \
                     copies need AscendCL streams, events and aclrtMemcpyAsync. Upgrade CANN \
                     (8.x has them), or run with the KV cache in host memory and Mooncake's \
                     \"protocol\": \"tcp\"",
                    acl.path(),
                    lacking.join(", ")
                ),
            ));
        }
        if i32::try_from(device).is_err() {
            return Err(Error::invalid_argument(format!(
                "npu:{device} is not an AscendCL device id"
            )));
        }
        let npu = Arc::new(Npu { acl, device });
        npu.acl.init_shared().map_err(|e| npu.error("aclInit", e))?;
        npu.bind()?;
        let stream = || {
            npu.acl
                .create_stream()
                .map_err(|e| npu.error("creating a copy stream", e))
        };
        let copy = [stream()?, stream()?];
        Ok(AscendEngine {
            npu,
            copy,
            keep: Mutex::new(KeepAlive::default()),
            registered: Mutex::new(HashSet::new()),
            warned_unpinned: AtomicBool::new(false),
        })
    }

    fn keep(&self) -> MutexGuard<'_, KeepAlive> {
        // The lists stay consistent whatever panicked while they were held.
        self.keep.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn registered(&self) -> MutexGuard<'_, HashSet<usize>> {
        self.registered.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn event(&self) -> Result<Arc<Event>> {
        self.npu
            .acl
            .create_event()
            .map(Arc::new)
            .map_err(|e| self.npu.error("creating an event", e))
    }

    /// Queues `copies` on the copy stream of their direction.
    ///
    /// # Safety
    /// As [`CopyEngine::to_host`].
    unsafe fn queue(&self, copies: &[Copy], kind: MemcpyKind) -> Result<()> {
        self.npu.bind()?;
        let stream = match kind {
            MemcpyKind::DeviceToHost => &self.copy[Direction::ToHost.index()],
            _ => &self.copy[Direction::ToDevice.index()],
        };
        for c in copies.iter().filter(|c| c.len > 0) {
            let (dst, src) = match kind {
                MemcpyKind::DeviceToHost => (c.host as *mut u8, c.device as *const u8),
                _ => (c.device as *mut u8, c.host as *const u8),
            };
            // SAFETY: the caller guarantees `len` bytes at both ends, of the kinds `kind`
            // names, valid until a later fence completes; `dest_max == count`.
            unsafe {
                self.npu
                    .acl
                    .memcpy_async(dst.cast(), c.len, src.cast(), c.len, kind, stream)
            }
            .map_err(|e| {
                self.npu
                    .error(
                        &format!(
                            "queueing a {}-byte copy (device {:#x}, host {:#x})",
                            c.len, c.device, c.host
                        ),
                        e,
                    )
                    .with_operation(match kind {
                        MemcpyKind::DeviceToHost => "to_host",
                        _ => "to_device",
                    })
            })?;
        }
        Ok(())
    }
}

impl Drop for AscendEngine {
    fn drop(&mut self) {
        // Every event some stream waits on must outlive the wait, and the copy streams must be
        // idle before they are destroyed: wait for all. Errors are a failed device; nothing
        // better can be done with them here.
        let _ = self.npu.bind();
        for stream in &self.copy {
            let _ = stream.synchronize();
        }
        let kept = std::mem::take(&mut *self.keep());
        for r in &kept.retiring {
            let _ = r.guard.synchronize();
        }
        drop(kept);
    }
}

/// The point on an engine's copy stream after everything queued before [`AscendEngine::fence`].
#[derive(Debug)]
pub struct AscendFence {
    npu: Arc<Npu>,
    event: Arc<Event>,
}

impl Fence for AscendFence {
    fn is_done(&self) -> Result<bool> {
        self.npu.bind()?;
        self.event
            .is_complete()
            .map_err(|e| self.npu.error("copy stream failed (querying its fence)", e))
    }

    fn wait(&self) -> Result<()> {
        self.npu.bind()?;
        self.event.synchronize().map_err(|e| {
            self.npu
                .error("copy stream failed (waiting for its fence)", e)
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl CopyEngine for AscendEngine {
    fn device(&self) -> Device {
        Device::Npu {
            device: self.npu.device,
        }
    }

    /// `aclrtHostRegister(ptr, len, ACL_HOST_REGISTER_MAPPED)`.
    ///
    /// Where the CANN has no `aclrtHostRegister`, or the NPU does not support it
    /// (`ACL_ERROR_RT_FEATURE_NOT_SUPPORT`), this logs a warning once and returns `Ok`: the
    /// staging memory then stays pageable, and `aclrtMemcpyAsync` from or to it is performed
    /// synchronously by the runtime (acl_rt.h says so of the batched copy; for the single copy
    /// some CANN versions may instead reject pageable memory — unverified). Copies are then
    /// correct but no longer overlap the host.
    unsafe fn pin(&self, ptr: *mut u8, len: usize) -> Result<()> {
        self.npu.bind()?;
        // SAFETY: the caller keeps the memory allocated until `unpin`.
        let r = unsafe {
            self.npu
                .acl
                .host_register(ptr.cast(), len as u64, HostRegisterType::Mapped)
        };
        match r {
            Ok(_mapped) => {
                self.registered().insert(ptr as usize);
                Ok(())
            }
            Err(e)
                if matches!(e, AclError::Unavailable { .. })
                    || e.code() == Some(ACL_ERROR_RT_FEATURE_NOT_SUPPORT) =>
            {
                if !self.warned_unpinned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        device = %self.device(),
                        error = %e,
                        "staging memory cannot be page-locked on this CANN/NPU; device copies \
                         through it will be synchronous"
                    );
                }
                Ok(())
            }
            Err(e) => Err(self
                .npu
                .error(&format!("page-locking {len} bytes of staging"), e)
                .with_operation("pin")),
        }
    }

    /// `aclrtHostUnregister`, for memory [`pin`](CopyEngine::pin) registered; `Ok` for memory
    /// it left pageable.
    unsafe fn unpin(&self, ptr: *mut u8) -> Result<()> {
        if !self.registered().remove(&(ptr as usize)) {
            return Ok(());
        }
        self.npu.bind()?;
        // SAFETY: registered by `pin`; the caller guarantees no copy is in flight.
        unsafe { self.npu.acl.host_unregister(ptr.cast()) }.map_err(|e| {
            self.npu
                .error("unregistering staging", e)
                .with_operation("unpin")
        })
    }

    fn order_after(&self, direction: Direction, compute: StreamHandle) -> Result<()> {
        self.npu.bind()?;
        let event = self.event()?;
        // SAFETY: `compute` is the framework's current `aclrtStream` on this device (0 is the
        // default stream), as the trait's contract says.
        unsafe { event.record_raw(compute.0 as RawStream) }.map_err(|e| {
            self.npu
                .error("recording an event on the compute stream", e)
                .with_operation("order_after")
        })?;
        self.copy[direction.index()]
            .wait_event(&event)
            .map_err(|e| {
                self.npu
                    .error("making the copy stream wait for compute", e)
                    .with_operation("order_after")
            })?;
        let mut keep = self.keep();
        keep.reap();
        keep.waits[direction.index()].push(event);
        Ok(())
    }

    unsafe fn to_host(&self, copies: &[Copy]) -> Result<()> {
        // SAFETY: the caller's contract is `queue`'s.
        unsafe { self.queue(copies, MemcpyKind::DeviceToHost) }
    }

    unsafe fn to_device(&self, copies: &[Copy]) -> Result<()> {
        // SAFETY: the caller's contract is `queue`'s.
        unsafe { self.queue(copies, MemcpyKind::HostToDevice) }
    }

    fn fence(&self, direction: Direction) -> Result<Arc<dyn Fence>> {
        self.npu.bind()?;
        let event = self.event()?;
        event.record(&self.copy[direction.index()]).map_err(|e| {
            self.npu
                .error("recording a fence on the copy stream", e)
                .with_operation("fence")
        })?;
        let mut keep = self.keep();
        keep.reap();
        let waits = std::mem::take(&mut keep.waits[direction.index()]);
        if !waits.is_empty() {
            // The copy stream passed those waits once this fence completes.
            keep.retiring.push(Retiring {
                guard: event.clone(),
                _keep: waits,
            });
        }
        Ok(Arc::new(AscendFence {
            npu: self.npu.clone(),
            event,
        }))
    }

    fn stream_wait(&self, compute: StreamHandle, fence: &dyn Fence) -> Result<()> {
        let fence = fence
            .as_any()
            .downcast_ref::<AscendFence>()
            .filter(|f| Arc::ptr_eq(&f.npu, &self.npu))
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "{}: stream_wait takes a fence this engine made",
                    self.device()
                ))
            })?;
        self.npu.bind()?;
        let op = |e| {
            self.npu
                .error("making the compute stream wait for a fence", e)
                .with_operation("stream_wait")
        };
        if fence.event.is_complete().map_err(op)? {
            // Nothing to wait for, and no event to keep alive.
            return Ok(());
        }
        let raw = compute.0 as RawStream;
        // SAFETY: `compute` is the framework's current stream on this device; the fence's
        // event is kept alive below until the compute stream has passed the wait.
        unsafe { self.npu.acl.stream_wait_event_raw(raw, &fence.event) }.map_err(op)?;
        let guard = self.event()?;
        // SAFETY: as above.
        unsafe { guard.record_raw(raw) }.map_err(op)?;
        let mut keep = self.keep();
        keep.reap();
        keep.retiring.push(Retiring {
            guard,
            _keep: vec![fence.event.clone()],
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These machines have no CANN: opening an NPU engine is a clear error, not a panic.
    /// Where CANN is installed this test is skipped (the engine opens instead).
    #[test]
    fn without_cann_an_npu_engine_says_what_to_do() {
        if ascendcl_sys::AscendCl::load().is_ok() {
            return;
        }
        let err = super::super::engine_for(Device::Npu { device: 0 }).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        let msg = err.to_string();
        for needle in ["CANN", "npu:0", "tcp"] {
            assert!(msg.contains(needle), "{needle:?} not in {msg}");
        }
        let err = AscendEngine::open(3).unwrap_err();
        assert!(err.to_string().contains("npu:3"), "{err}");
    }

    /// The stand-in CANN of `ascendcl-sys` (host memory; checks thread binding, sizes, event
    /// flags and alignment), built and loaded.
    fn stub() -> (tempfile::TempDir, Arc<AscendCl>) {
        let dir = tempfile::tempdir().unwrap();
        let lib = ascendcl_sys::build_test_stub(dir.path());
        let acl = AscendCl::load_from(&lib).unwrap();
        (dir, acl)
    }

    /// Calls one of the stub's `int stub_*(void)` counters, or `stub_hold(int)`.
    fn stub_call(acl: &AscendCl, name: &'static str, arg: Option<i32>) -> i32 {
        // SAFETY: the stub's signatures.
        unsafe {
            match arg {
                None => acl.symbol::<unsafe extern "C" fn() -> i32>(name).unwrap()(),
                Some(a) => {
                    acl.symbol::<unsafe extern "C" fn(i32)>(name).unwrap()(a);
                    0
                }
            }
        }
    }

    #[test]
    fn copies_fences_and_waits_against_a_stub_cann() {
        let (_dir, acl) = stub();
        let engine = Arc::new(AscendEngine::with_library(acl.clone(), 0).unwrap());
        assert_eq!(engine.device(), Device::Npu { device: 0 });
        let count = |name| stub_call(&acl, name, None);

        // Staging: 4 KiB-aligned, as aclrtHostRegister wants; the stub rejects anything else.
        let mut buf = vec![0u8; 3 * 4096];
        let staging = buf
            .as_mut_ptr()
            .wrapping_add(buf.as_ptr().align_offset(4096));
        // SAFETY: 8 KiB inside `buf`, unpinned below before `buf` drops.
        unsafe { engine.pin(staging, 8192) }.unwrap();
        assert_eq!(count("stub_registered"), 1);
        // SAFETY: as above; the stub refuses the unaligned address.
        let err = unsafe { engine.pin(staging.wrapping_add(1), 100) }.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unexpected);
        let msg = err.to_string();
        assert!(
            msg.contains("npu:0") && msg.contains("stub: recent error"),
            "{msg}"
        );

        let device: Vec<u8> = (0..=255).collect();
        let compute = StreamHandle(0x1000);
        engine.order_after(Direction::ToHost, compute).unwrap();
        let copies = [
            Copy {
                device: device.as_ptr() as u64,
                host: staging as usize,
                len: 100,
            },
            Copy {
                device: device.as_ptr() as u64 + 100,
                host: staging as usize + 4096,
                len: 156,
            },
            Copy {
                device: 0,
                host: 0,
                len: 0,
            },
        ];
        // SAFETY: the ranges lie in `device` and the pinned staging.
        unsafe { engine.to_host(&copies) }.unwrap();
        assert_eq!(count("stub_copies"), 2);
        let fence = engine.fence(Direction::ToHost).unwrap();
        // The order_after event lives until this fence completes: reaped at the next call.
        assert!(fence.is_done().unwrap());
        fence.wait().unwrap();
        // SAFETY: the staging was written by the fenced copies.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(staging, 100).to_vec(),
                std::slice::from_raw_parts(staging.wrapping_add(4096), 156).to_vec(),
            )
        };
        assert_eq!(a, &device[..100]);
        assert_eq!(b, &device[100..]);

        // Another thread, never bound to the NPU: the engine binds it (the stub refuses calls
        // from an unbound thread).
        let back = vec![0u8; 256];
        let (e, f, back_addr) = (engine.clone(), fence.clone(), back.as_ptr() as u64);
        let staging_addr = staging as usize;
        std::thread::spawn(move || {
            assert!(f.is_done().unwrap());
            let copies = [Copy {
                device: back_addr,
                host: staging_addr,
                len: 100,
            }];
            // SAFETY: `back` and the staging outlive the join below.
            unsafe { e.to_device(&copies) }.unwrap();
            e.fence(Direction::ToDevice).unwrap().wait().unwrap();
        })
        .join()
        .unwrap();
        assert_eq!(&back[..100], &device[..100]);

        // A fence already complete needs no wait.
        engine.stream_wait(compute, &*fence).unwrap();
        assert_eq!(count("stub_waits"), 1);
        // A fence still in flight: the compute stream waits on its event (made with
        // ACL_EVENT_SYNC, or the stub refuses), which outlives the fence until compute has
        // passed the wait.
        stub_call(&acl, "stub_hold", Some(1));
        let pending = engine.fence(Direction::ToHost).unwrap();
        assert!(!pending.is_done().unwrap());
        engine.stream_wait(compute, &*pending).unwrap();
        assert_eq!(count("stub_waits"), 2);
        drop(pending);
        let live = count("stub_live_events");
        assert!(live >= 2, "{live}");
        stub_call(&acl, "stub_hold", Some(0));
        engine.order_after(Direction::ToHost, compute).unwrap();
        // Reaped: only the new order_after event (and `fence`'s) remain.
        assert_eq!(count("stub_live_events"), 2);

        let foreign = super::super::HostEngine::new()
            .fence(Direction::ToHost)
            .unwrap();
        let err = engine.stream_wait(compute, &*foreign).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);

        // SAFETY: nothing in flight; pinned above. The second address was never registered.
        unsafe {
            engine.unpin(staging).unwrap();
            engine.unpin(staging.wrapping_add(1)).unwrap();
        }
        assert_eq!(count("stub_registered"), 0);
        drop(fence);
        drop(engine);
        assert_eq!(count("stub_live_events"), 0);
        assert_eq!(count("stub_live_streams"), 0);
    }

    #[test]
    fn every_needed_function_is_one_ascendcl_sys_resolves() {
        // A name here that ascendcl-sys does not resolve would always read as missing.
        for name in NEEDED.iter().flat_map(|a| a.iter()) {
            assert!(ascendcl_sys::OPTIONAL_FUNCTIONS.contains(name), "{name}");
        }
    }
}
