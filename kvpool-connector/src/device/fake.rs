//! A device for tests: memory no backend can see, streams whose work runs only when the test
//! (or a driver thread with random delays) says so, and copies that can be made to fail.
//!
//! It models exactly the ordering a real accelerator gives, so tests can prove the worker
//! relies on nothing else:
//!
//! - the compute stream is a queue of writes the test submits ([`FakeEngine::compute_write`]);
//!   they happen when [`FakeEngine::run_compute`] runs them, in order, stopping at a wait for a
//!   fence that is not done;
//! - each direction's copy stream is a queue of waits, copies and fence records; a copy runs
//!   only after the compute work that was queued before the matching
//!   [`CopyEngine::order_after`] of its direction ran. The two streams run independently.
//!
//! Device memory is an allocation of the engine's own, never a `MemRegion`, so a backend that
//! read it directly would be a bug the test can detect ([`FakeEngine::overlaps`]).

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvpool_core::error::{Error, ErrorKind, Result};

use super::{Copy, CopyEngine, Device, Direction, Fence, StreamHandle};

#[derive(Debug)]
enum ComputeOp {
    Write { offset: usize, bytes: Vec<u8> },
    WaitFence(u64),
}

#[derive(Debug)]
enum CopyOp {
    /// Wait until this many compute ops have run.
    WaitCompute(u64),
    ToHost(Vec<Copy>),
    ToDevice(Vec<Copy>),
    Record(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FenceState {
    Pending,
    Done,
    Failed(String),
}

/// What happened, in order, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeEvent {
    /// A compute write ran (its offset).
    Computed(usize),
    /// Copies device → host ran (their device offsets).
    ToHost(Vec<usize>),
    /// Copies host → device ran.
    ToDevice(Vec<usize>),
    /// A fence completed (its id; `false` if failed).
    Fenced(u64, bool),
}

#[derive(Debug, Default)]
struct State {
    compute: VecDeque<ComputeOp>,
    compute_submitted: u64,
    compute_done: u64,
    /// Each direction's copy stream, by [`Direction::index`].
    copies: [VecDeque<CopyOp>; 2],
    fences: HashMap<u64, FenceState>,
    next_fence: u64,
    /// Copy ops still to fail, counted from the next one run.
    fail_copies: usize,
    /// Per direction, a copy failed since the last fence record: that fence fails.
    failed_since_fence: [Option<String>; 2],
    events: Vec<FakeEvent>,
    pinned: Vec<(usize, usize)>,
    stream: Option<StreamHandle>,
    order_afters: usize,
    stream_waits: usize,
}

/// The fake device's memory: written through raw pointers by copies and compute ops, always
/// under the state lock.
#[derive(Debug)]
struct DeviceMemory {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a plain heap allocation; every access holds the engine's state lock.
unsafe impl Send for DeviceMemory {}
// SAFETY: see `Send`.
unsafe impl Sync for DeviceMemory {}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        // SAFETY: made from a boxed slice of this length in `FakeEngine::new`.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

#[derive(Debug)]
struct Inner {
    device: Device,
    memory: DeviceMemory,
    state: Mutex<State>,
    changed: Condvar,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn base(&self) -> usize {
        self.memory.ptr as usize
    }
}

/// A fake accelerator for ordering tests. Cloning shares the device.
#[derive(Debug, Clone)]
pub struct FakeEngine {
    inner: Arc<Inner>,
}

/// Stops the driver thread when dropped.
#[derive(Debug)]
pub struct FakeDriver {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for FakeDriver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl FakeEngine {
    /// A device of `len` bytes, zeroed, that claims to be `device`.
    pub fn new(device: Device, len: usize) -> Self {
        FakeEngine {
            inner: Arc::new(Inner {
                device,
                memory: DeviceMemory {
                    ptr: Box::into_raw(vec![0u8; len].into_boxed_slice()).cast::<u8>(),
                    len,
                },
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
            }),
        }
    }

    /// The device address of byte `offset`.
    pub fn addr(&self, offset: usize) -> usize {
        self.inner.base() + offset
    }

    /// Whether `[ptr, ptr + len)` touches device memory: a backend must never be given it.
    pub fn overlaps(&self, ptr: usize, len: usize) -> bool {
        let base = self.inner.base();
        ptr < base + self.inner.memory.len && base < ptr + len
    }

    /// Reads device memory now, bypassing the streams.
    pub fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(
            offset + len <= self.inner.memory.len,
            "read outside the fake device"
        );
        let _s = self.inner.state();
        // SAFETY: in bounds (checked above); writes happen under the same lock.
        unsafe { std::slice::from_raw_parts(self.inner.memory.ptr.add(offset), len) }.to_vec()
    }

    /// Writes device memory now, bypassing the streams (the state before a test's steps).
    pub fn fill(&self, offset: usize, bytes: &[u8]) {
        assert!(
            offset + bytes.len() <= self.inner.memory.len,
            "write outside the fake device"
        );
        let _s = self.inner.state();
        // SAFETY: in bounds; under the state lock, as every write to the fake memory is.
        unsafe { self.write_raw(offset, bytes) };
    }

    /// # Safety
    /// The state lock is held; `offset + bytes.len()` is in bounds.
    unsafe fn write_raw(&self, offset: usize, bytes: &[u8]) {
        let dst = self.inner.memory.ptr;
        // SAFETY: in bounds per the caller; the fake memory is only written under the lock.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst.add(offset), bytes.len()) };
    }

    /// Queues a write of `bytes` at `offset` on the compute stream (a forward writing KV, or
    /// vLLM zeroing a new block). It happens when [`run_compute`](Self::run_compute) reaches it.
    pub fn compute_write(&self, offset: usize, bytes: Vec<u8>) {
        let mut s = self.inner.state();
        s.compute.push_back(ComputeOp::Write { offset, bytes });
        s.compute_submitted += 1;
    }

    /// Runs queued compute work in order until the queue is empty or waits on a fence that is
    /// not done; returns how many ops ran.
    pub fn run_compute(&self) -> usize {
        let mut s = self.inner.state();
        let mut ran = 0;
        while let Some(op) = s.compute.front() {
            match op {
                ComputeOp::WaitFence(id) => {
                    if s.fences.get(id) == Some(&FenceState::Pending) {
                        break;
                    }
                }
                ComputeOp::Write { offset, bytes } => {
                    assert!(
                        offset + bytes.len() <= self.inner.memory.len,
                        "compute write outside the fake device"
                    );
                    // SAFETY: the lock is held; in bounds (checked above).
                    unsafe { self.write_raw(*offset, bytes) };
                    let offset = *offset;
                    s.events.push(FakeEvent::Computed(offset));
                }
            }
            s.compute.pop_front();
            s.compute_done += 1;
            ran += 1;
        }
        drop(s);
        self.inner.changed.notify_all();
        ran
    }

    /// Compute ops queued and not yet run.
    pub fn compute_pending(&self) -> usize {
        self.inner.state().compute.len()
    }

    /// Runs up to `max` ops of each copy stream in order; a stream stops at a wait for compute
    /// work that has not run. Returns how many ran.
    pub fn run_copies(&self, max: usize) -> usize {
        Direction::ALL
            .iter()
            .map(|&d| self.run_stream(d, max))
            .sum()
    }

    /// Runs up to `max` ops of `direction`'s copy stream in order; stops at a wait for compute
    /// work that has not run. Returns how many ran.
    pub fn run_stream(&self, direction: Direction, max: usize) -> usize {
        let lane = direction.index();
        let mut s = self.inner.state();
        let mut ran = 0;
        while ran < max {
            let Some(op) = s.copies[lane].front() else {
                break;
            };
            match op {
                CopyOp::WaitCompute(n) => {
                    if s.compute_done < *n {
                        break;
                    }
                }
                CopyOp::ToHost(copies) | CopyOp::ToDevice(copies) => {
                    let to_host = matches!(op, CopyOp::ToHost(_));
                    let copies = copies.clone();
                    if s.fail_copies > 0 {
                        s.fail_copies -= 1;
                        s.failed_since_fence[lane] = Some("injected copy failure".into());
                    } else {
                        let base = self.inner.base();
                        let mut offsets = Vec::with_capacity(copies.len());
                        for c in &copies {
                            let off = c.device as usize - base;
                            offsets.push(off);
                            // SAFETY: the worker's contract: host ranges are staging it owns
                            // until the fence; device ranges are inside the fake memory.
                            unsafe {
                                if to_host {
                                    std::ptr::copy_nonoverlapping(
                                        self.inner.memory.ptr.add(off),
                                        c.host as *mut u8,
                                        c.len,
                                    );
                                } else {
                                    self.write_raw(
                                        off,
                                        std::slice::from_raw_parts(c.host as *const u8, c.len),
                                    );
                                }
                            }
                        }
                        s.events.push(if to_host {
                            FakeEvent::ToHost(offsets)
                        } else {
                            FakeEvent::ToDevice(offsets)
                        });
                    }
                }
                CopyOp::Record(id) => {
                    let id = *id;
                    let state = match s.failed_since_fence[lane].take() {
                        Some(why) => FenceState::Failed(why),
                        None => FenceState::Done,
                    };
                    s.events
                        .push(FakeEvent::Fenced(id, state == FenceState::Done));
                    s.fences.insert(id, state);
                }
            }
            s.copies[lane].pop_front();
            ran += 1;
        }
        drop(s);
        self.inner.changed.notify_all();
        ran
    }

    /// Makes the next `n` copy submissions fail when they run: the fence after them fails.
    pub fn fail_next_copies(&self, n: usize) {
        self.inner.state().fail_copies = n;
    }

    /// Only `stream` may be passed to `order_after` and `stream_wait` from now on: proves the
    /// caller passes the engine's current stream through.
    pub fn expect_stream(&self, stream: StreamHandle) {
        self.inner.state().stream = Some(stream);
    }

    /// Everything that happened so far.
    pub fn events(&self) -> Vec<FakeEvent> {
        self.inner.state().events.clone()
    }

    /// How many times `order_after` and `stream_wait` were called.
    pub fn edges(&self) -> (usize, usize) {
        let s = self.inner.state();
        (s.order_afters, s.stream_waits)
    }

    /// Host ranges pinned and not unpinned.
    pub fn pinned(&self) -> Vec<(usize, usize)> {
        self.inner.state().pinned.clone()
    }

    /// Starts a thread that runs compute and copy work one op at a time with random delays of
    /// up to `max_delay`, from `seed`, so completions land late and interleave with the
    /// worker's next calls and with each other across the two copy streams. Copies still
    /// never run before the compute work they wait for.
    pub fn drive(&self, seed: u64, max_delay: Duration) -> FakeDriver {
        let stop = Arc::new(AtomicBool::new(false));
        let me = self.clone();
        let halt = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut x = seed | 1;
            let max = max_delay.as_micros().max(1) as u64;
            while !halt.load(Ordering::Relaxed) {
                // xorshift: cheap, seeded, reproducible.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                std::thread::sleep(Duration::from_micros(x % max));
                if x % 3 == 0 {
                    me.run_compute();
                }
                // The streams progress independently, as on a device.
                let direction = Direction::ALL[(x >> 5) as usize % 2];
                me.run_stream(direction, 1 + (x % 2) as usize);
            }
        });
        FakeDriver {
            stop,
            thread: Some(thread),
        }
    }

    fn check_stream(&self, s: &State, stream: StreamHandle) -> Result<()> {
        match s.stream {
            Some(expected) if expected != stream => Err(Error::new(
                ErrorKind::Unexpected,
                format!("fake device: stream {stream:?} is not the current stream {expected:?}"),
            )),
            _ => Ok(()),
        }
    }

    fn check_copies(&self, copies: &[Copy]) -> Result<()> {
        let base = self.inner.base();
        let end = base + self.inner.memory.len;
        for c in copies {
            let d = c.device as usize;
            if d < base || d + c.len > end {
                return Err(Error::invalid_argument(format!(
                    "fake device: copy of {} bytes at {d:#x} is outside device memory",
                    c.len
                )));
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
struct FakeFence {
    id: u64,
    inner: Arc<Inner>,
}

impl Fence for FakeFence {
    fn is_done(&self) -> Result<bool> {
        match self.inner.state().fences.get(&self.id) {
            Some(FenceState::Done) => Ok(true),
            Some(FenceState::Failed(why)) => Err(Error::new(ErrorKind::Unexpected, why.clone())),
            _ => Ok(false),
        }
    }

    fn wait(&self) -> Result<()> {
        let mut s = self.inner.state();
        loop {
            match s.fences.get(&self.id) {
                Some(FenceState::Done) => return Ok(()),
                Some(FenceState::Failed(why)) => {
                    return Err(Error::new(ErrorKind::Unexpected, why.clone()))
                }
                _ => {}
            }
            s = self
                .inner
                .changed
                .wait(s)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl CopyEngine for FakeEngine {
    fn device(&self) -> Device {
        self.inner.device
    }

    fn check_device_memory(&self, addr: u64) -> Result<()> {
        if self.overlaps(addr as usize, 1) {
            Ok(())
        } else {
            Err(Error::invalid_argument(format!(
                "fake device: {addr:#x} is not device memory"
            )))
        }
    }

    unsafe fn pin(&self, ptr: *mut u8, len: usize) -> Result<()> {
        self.inner.state().pinned.push((ptr as usize, len));
        Ok(())
    }

    unsafe fn unpin(&self, ptr: *mut u8) -> Result<()> {
        let mut s = self.inner.state();
        let before = s.pinned.len();
        s.pinned.retain(|&(p, _)| p != ptr as usize);
        if s.pinned.len() == before {
            return Err(Error::invalid_argument(
                "fake device: unpin of memory never pinned",
            ));
        }
        Ok(())
    }

    fn order_after(&self, direction: Direction, compute: StreamHandle) -> Result<()> {
        let mut s = self.inner.state();
        self.check_stream(&s, compute)?;
        s.order_afters += 1;
        let n = s.compute_submitted;
        s.copies[direction.index()].push_back(CopyOp::WaitCompute(n));
        Ok(())
    }

    unsafe fn to_host(&self, copies: &[Copy]) -> Result<()> {
        self.check_copies(copies)?;
        self.inner.state().copies[Direction::ToHost.index()]
            .push_back(CopyOp::ToHost(copies.to_vec()));
        Ok(())
    }

    unsafe fn to_device(&self, copies: &[Copy]) -> Result<()> {
        self.check_copies(copies)?;
        self.inner.state().copies[Direction::ToDevice.index()]
            .push_back(CopyOp::ToDevice(copies.to_vec()));
        Ok(())
    }

    fn fence(&self, direction: Direction) -> Result<Arc<dyn Fence>> {
        let mut s = self.inner.state();
        let id = s.next_fence;
        s.next_fence += 1;
        s.fences.insert(id, FenceState::Pending);
        s.copies[direction.index()].push_back(CopyOp::Record(id));
        Ok(Arc::new(FakeFence {
            id,
            inner: self.inner.clone(),
        }))
    }

    fn stream_wait(&self, compute: StreamHandle, fence: &dyn Fence) -> Result<()> {
        let fence = fence
            .as_any()
            .downcast_ref::<FakeFence>()
            .ok_or_else(|| Error::invalid_argument("fake device: a fence of another engine"))?;
        let mut s = self.inner.state();
        self.check_stream(&s, compute)?;
        s.stream_waits += 1;
        s.compute.push_back(ComputeOp::WaitFence(fence.id));
        s.compute_submitted += 1;
        Ok(())
    }
}
