//! Owned AscendCL objects: streams, events and device memory, released on drop.

use super::*;

/// A stream created by kvpool, destroyed on drop.
pub struct Stream {
    pub(crate) acl: Arc<AscendCl>,
    pub(crate) raw: RawStream,
}

// SAFETY: an `aclrtStream` is an opaque handle into the runtime, which takes task
// submissions for one stream from any thread bound to its device (torch_npu submits to
// its streams from several threads). `Stream` holds nothing else but an `Arc`.
unsafe impl Send for Stream {}
// SAFETY: every method takes `&self` and only passes the handle to AscendCL; see `Send`.
unsafe impl Sync for Stream {}

impl Stream {
    /// The `aclrtStream`, for other CANN calls.
    pub fn as_raw(&self) -> RawStream {
        self.raw
    }

    /// `aclrtStreamWaitEvent(self, event)`: work queued here afterwards waits for `event`.
    /// `event` must stay alive until the wait has completed on the device.
    pub fn wait_event(&self, event: &Event) -> Result<(), AclError> {
        // SAFETY: `self.raw` is a live stream this value owns.
        unsafe { self.acl.stream_wait_event_raw(self.raw, event) }
    }

    /// `aclrtSynchronizeStream`: blocks until everything queued here has completed.
    pub fn synchronize(&self) -> Result<(), AclError> {
        let f = self
            .acl
            .need(self.acl.opt.synchronize_stream, "aclrtSynchronizeStream")?;
        // SAFETY: a live stream.
        self.acl
            .check("aclrtSynchronizeStream", unsafe { f(self.raw) })
    }
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Stream").field(&self.raw).finish()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(destroy) = self.acl.opt.destroy_stream {
            // SAFETY: created by `create_stream*` and destroyed once. AscendCL destroys a
            // stream with tasks outstanding only after they finish; callers synchronize first.
            let _ = unsafe { destroy(self.raw) };
        }
    }
}

/// An event created by kvpool, destroyed on drop.
pub struct Event {
    pub(crate) acl: Arc<AscendCl>,
    pub(crate) raw: RawEvent,
}

// SAFETY: an `aclrtEvent` is an opaque runtime handle, usable from any thread bound to its
// device; `Event` holds nothing else but an `Arc`.
unsafe impl Send for Event {}
// SAFETY: every method takes `&self` and only passes the handle to AscendCL.
unsafe impl Sync for Event {}

impl Event {
    /// The `aclrtEvent`, for other CANN calls.
    pub fn as_raw(&self) -> RawEvent {
        self.raw
    }

    /// `aclrtRecordEvent(self, stream)`: the event completes once everything queued on
    /// `stream` so far has.
    pub fn record(&self, stream: &Stream) -> Result<(), AclError> {
        // SAFETY: `stream` is live.
        unsafe { self.record_raw(stream.raw) }
    }

    /// `aclrtRecordEvent` on a stream kvpool does not own.
    ///
    /// # Safety
    /// `stream` is a live stream of the calling thread's device (0: the default stream).
    pub unsafe fn record_raw(&self, stream: RawStream) -> Result<(), AclError> {
        let f = self
            .acl
            .need(self.acl.opt.record_event, "aclrtRecordEvent")?;
        // SAFETY: the caller vouches for `stream`; the event is live.
        self.acl
            .check("aclrtRecordEvent", unsafe { f(self.raw, stream) })
    }

    /// Whether the work before the last record has completed:
    /// `aclrtQueryEventStatus == ACL_EVENT_RECORDED_STATUS_COMPLETE`, or on a CANN without
    /// it the older `aclrtQueryEvent == ACL_EVENT_STATUS_COMPLETE`.
    pub fn is_complete(&self) -> Result<bool, AclError> {
        let mut status: c_int = -1;
        if let Some(f) = self.acl.opt.query_event_status {
            // SAFETY: a live event and a valid out pointer (the C enum is an int).
            let code = unsafe { f(self.raw, &mut status) };
            self.acl.check("aclrtQueryEventStatus", code)?;
            return Ok(status == ACL_EVENT_RECORDED_STATUS_COMPLETE);
        }
        let f = self
            .acl
            .need(self.acl.opt.query_event, "aclrtQueryEventStatus")?;
        // SAFETY: as above.
        let code = unsafe { f(self.raw, &mut status) };
        self.acl.check("aclrtQueryEvent", code)?;
        Ok(status == ACL_EVENT_STATUS_COMPLETE)
    }

    /// `aclrtSynchronizeEvent`: blocks the calling thread until the event completes.
    pub fn synchronize(&self) -> Result<(), AclError> {
        let f = self
            .acl
            .need(self.acl.opt.synchronize_event, "aclrtSynchronizeEvent")?;
        // SAFETY: a live event.
        self.acl
            .check("aclrtSynchronizeEvent", unsafe { f(self.raw) })
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Event").field(&self.raw).finish()
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if let Some(destroy) = self.acl.opt.destroy_event {
            // SAFETY: created by `create_event` and destroyed once. acl_rt.h asks that no
            // `aclrtStreamWaitEvent`/`aclrtSynchronizeEvent` on it be outstanding: owners
            // keep an event alive until such waits have completed.
            let _ = unsafe { destroy(self.raw) };
        }
    }
}

/// Memory from `aclrtMalloc` or `aclrtMallocHost`, freed on drop.
pub struct DeviceBuffer {
    pub(crate) acl: Arc<AscendCl>,
    pub(crate) ptr: *mut c_void,
    pub(crate) len: usize,
    pub(crate) host: bool,
}

// SAFETY: device memory has no thread affinity; CANN calls take the pointer
// from any thread bound to the device.
unsafe impl Send for DeviceBuffer {}

impl DeviceBuffer {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The raw pointer, for other CANN calls.
    pub fn as_ptr(&self) -> *mut c_void {
        self.ptr
    }
}

impl fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("host", &self.host)
            .finish()
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let free = if self.host {
            self.acl.free_host
        } else {
            self.acl.free
        };
        // SAFETY: allocated by the matching allocator and freed once.
        let _ = unsafe { free(self.ptr) };
    }
}
