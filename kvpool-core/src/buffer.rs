//! Registered memory and gather/scatter descriptors.
//!
//! The data path never copies through an owned `Vec`: callers describe where a
//! value's bytes live (or should land) as a list of slices of registered
//! [`MemRegion`]s — every layer's K and V of one block, say — and each backend
//! copies straight between its storage and those slices, as Mooncake's
//! `batch_put_from_multi_buffers` does.

use std::alloc::{self, Layout};
use std::any::Any;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

static NEXT_REGION_ID: AtomicU64 = AtomicU64::new(1);

const PAGE: usize = 4096;

/// Regions this large come straight from `mmap`: the system allocator's `alloc_zeroed` at
/// page alignment memsets the whole region (0.6 s per GiB here), where fresh anonymous pages
/// are zero already and are faulted in only when first touched.
const MMAP_THRESHOLD: usize = 2 << 20;

/// An anonymous mapping from [`MemRegion::alloc`], unmapped with the region.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a plain mapping with no thread affinity.
unsafe impl Send for Mapping {}
// SAFETY: the owner is never accessed; it only unmaps on drop.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `MemRegion::alloc` with this length.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Memory from [`MemRegion::alloc`], freed with the region.
struct AlignedAlloc {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: a plain heap allocation with no thread affinity.
unsafe impl Send for AlignedAlloc {}
// SAFETY: the owner is never accessed; it only frees on drop.
unsafe impl Sync for AlignedAlloc {}

impl Drop for AlignedAlloc {
    fn drop(&mut self) {
        // SAFETY: allocated in `MemRegion::alloc` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// A span of memory that backends may read from and write into.
///
/// Regions are `Arc`-held: a descriptor keeps its region alive, so memory
/// owned by the region (built with [`MemRegion::alloc`] or
/// [`MemRegion::from_vec`]) cannot be freed under an in-flight operation.
pub struct MemRegion {
    ptr: NonNull<u8>,
    len: usize,
    id: u64,
    // Keeps foreign memory (a tensor, a Vec) alive as long as the region.
    _owner: Option<Box<dyn Any + Send + Sync>>,
}

// SAFETY: the region is a plain span of bytes; the constructors' contracts make
// concurrent access through descriptors the caller's responsibility, exactly as
// with DMA buffers handed to a transfer engine.
unsafe impl Send for MemRegion {}
// SAFETY: see `Send`.
unsafe impl Sync for MemRegion {}

impl MemRegion {
    /// A zero-filled, page-aligned region of `len` bytes owned by kvpool.
    ///
    /// Page alignment matters for speed, not just tidiness: a copy between
    /// buffers whose addresses differ modulo the cache line (a `Vec` starts
    /// 16 bytes into its page) runs about 20% slower on these machines than
    /// one between aligned buffers, as engines' KV tensors are.
    pub fn alloc(len: usize) -> Arc<Self> {
        if len == 0 {
            return Self::from_vec(Vec::new());
        }
        if len >= MMAP_THRESHOLD {
            if let Some(region) = Self::map(len) {
                return region;
            }
        }
        let layout =
            Layout::from_size_align(len, PAGE).expect("a page-aligned layout of len bytes");
        // SAFETY: `len > 0`.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            alloc::handle_alloc_error(layout)
        };
        Arc::new(MemRegion {
            ptr,
            len,
            id: NEXT_REGION_ID.fetch_add(1, Ordering::Relaxed),
            _owner: Some(Box::new(AlignedAlloc { ptr, layout })),
        })
    }

    fn map(len: usize) -> Option<Arc<Self>> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        let ptr = NonNull::new(ptr.cast::<u8>())?;
        Some(Arc::new(MemRegion {
            ptr,
            len,
            id: NEXT_REGION_ID.fetch_add(1, Ordering::Relaxed),
            _owner: Some(Box::new(Mapping { ptr, len })),
        }))
    }

    /// Faults the region's pages in on a background thread, so that first writes into it
    /// do not pay for them, without touching its contents (writers may already be using it).
    /// Best effort: a kernel without `MADV_POPULATE_WRITE` (Linux < 5.14) faults pages on
    /// first use instead. Returns at once.
    pub fn populate_in_background(self: &Arc<Self>) {
        #[cfg(target_os = "linux")]
        {
            let region = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name("kvpool-populate".into())
                .spawn(move || {
                    const STEP: usize = 64 << 20;
                    let mut offset = 0;
                    // Holds the region only for one step at a time, so it can be dropped.
                    while let Some(region) = region.upgrade() {
                        if offset >= region.len {
                            return;
                        }
                        let len = STEP.min(region.len - offset);
                        // SAFETY: in bounds of the live region; MADV_POPULATE_WRITE only
                        // faults pages in, it never changes their contents.
                        let rc = unsafe {
                            libc::madvise(
                                region.ptr.as_ptr().add(offset).cast(),
                                len,
                                libc::MADV_POPULATE_WRITE,
                            )
                        };
                        if rc != 0 {
                            return;
                        }
                        offset += len;
                    }
                });
            if let Err(e) = spawned {
                tracing::debug!(error = %e, "no thread to fault a region in; pages fault on use");
            }
        }
    }

    /// A region that owns `data`.
    pub fn from_vec(mut data: Vec<u8>) -> Arc<Self> {
        let len = data.len();
        let ptr = NonNull::new(data.as_mut_ptr()).expect("Vec pointers are never null");
        // Moving the Vec into the box moves only its header, not the heap buffer.
        Arc::new(MemRegion {
            ptr,
            len,
            id: NEXT_REGION_ID.fetch_add(1, Ordering::Relaxed),
            _owner: Some(Box::new(data)),
        })
    }

    /// Registers foreign memory, such as a KV-cache tensor.
    ///
    /// `owner`, if given, is dropped when the region is, so it can hold the
    /// object that owns the memory.
    ///
    /// # Safety
    ///
    /// `ptr..ptr+len` must be valid for reads and writes for as long as the
    /// region (and any descriptor cloned from it) lives. While a `put` reads
    /// from a range, nobody may write it; while a `get_into` writes a range,
    /// nobody else may read or write it.
    pub unsafe fn from_raw(
        ptr: *mut u8,
        len: usize,
        owner: Option<Box<dyn Any + Send + Sync>>,
    ) -> Result<Arc<Self>> {
        let ptr = NonNull::new(ptr)
            .ok_or_else(|| Error::invalid_argument("cannot register a null pointer as a region"))?;
        if len > isize::MAX as usize {
            return Err(Error::invalid_argument(format!(
                "region length {len} exceeds isize::MAX"
            )));
        }
        Ok(Arc::new(MemRegion {
            ptr,
            len,
            id: NEXT_REGION_ID.fetch_add(1, Ordering::Relaxed),
            _owner: owner,
        }))
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start address, for backends that register memory with a transfer engine.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// A process-unique id, stable for the region's life.
    pub fn id(&self) -> u64 {
        self.id
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::invalid_argument(format!(
                "slice {offset}..{} is outside region {} of {} bytes",
                offset as u128 + len as u128,
                self.id,
                self.len
            ))),
        }
    }

    /// Copies `len` bytes at `offset` out of the region.
    pub fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        self.check_range(offset, len)?;
        let mut out = vec![0u8; len];
        // SAFETY: the range was checked; the constructor's contract rules out
        // concurrent writers.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), out.as_mut_ptr(), len)
        };
        Ok(out)
    }

    /// Copies `data` into the region at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len())?;
        // SAFETY: the range was checked; the constructor's contract rules out
        // concurrent access to it.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
        Ok(())
    }
}

impl fmt::Debug for MemRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemRegion")
            .field("id", &self.id)
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

/// One slice of a region.
#[derive(Clone)]
pub struct RegionSlice {
    region: Arc<MemRegion>,
    offset: usize,
    len: usize,
}

impl RegionSlice {
    /// The region.
    pub fn region(&self) -> &Arc<MemRegion> {
        &self.region
    }
    /// Offset in the region.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Start address.
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: `offset <= region.len` was checked when the slice was built.
        unsafe { self.region.as_ptr().add(self.offset) }
    }
}

impl fmt::Debug for RegionSlice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "region{}[{}..{}]",
            self.region.id,
            self.offset,
            self.offset + self.len
        )
    }
}

/// The methods `IoVec` and `IoVecMut` share: they differ only in direction.
macro_rules! slice_list {
    ($ty:ident, $doc:literal, $len_doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Default)]
        pub struct $ty {
            slices: Vec<RegionSlice>,
            total: usize,
        }

        impl $ty {
            /// An empty descriptor.
            pub fn new() -> Self {
                Self::default()
            }

            /// One slice of `region`.
            pub fn single(region: &Arc<MemRegion>, offset: usize, len: usize) -> Result<Self> {
                let mut v = Self::new();
                v.push(region, offset, len)?;
                Ok(v)
            }

            /// The whole region.
            pub fn whole(region: &Arc<MemRegion>) -> Self {
                Self::single(region, 0, region.len()).expect("the whole region is in bounds")
            }

            /// Appends a slice; out-of-bounds slices are an InvalidArgument error.
            pub fn push(
                &mut self,
                region: &Arc<MemRegion>,
                offset: usize,
                len: usize,
            ) -> Result<()> {
                region.check_range(offset, len)?;
                self.total = self
                    .total
                    .checked_add(len)
                    .ok_or_else(|| Error::invalid_argument("descriptor length overflows usize"))?;
                self.slices.push(RegionSlice {
                    region: region.clone(),
                    offset,
                    len,
                });
                Ok(())
            }

            #[doc = $len_doc]
            pub fn len(&self) -> usize {
                self.total
            }

            /// Whether the descriptor covers no bytes.
            pub fn is_empty(&self) -> bool {
                self.total == 0
            }

            /// The slices, in order.
            pub fn slices(&self) -> &[RegionSlice] {
                &self.slices
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($ty))
                    .field("len", &self.total)
                    .field("slices", &self.slices)
                    .finish()
            }
        }
    };
}

slice_list!(
    IoVec,
    "Where a value's bytes are read from by `put`: slices gathered in order.",
    "Total length of the value."
);
slice_list!(
    IoVecMut,
    "Where a value's bytes are written by `get_into`: slices filled in order.",
    "Total length the stored value must have."
);

impl IoVec {
    /// The slices as byte slices.
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> + Clone {
        self.slices.iter().map(|s| {
            // SAFETY: bounds were checked at push; `MemRegion::from_raw`'s
            // contract forbids writers while a put reads the range.
            unsafe { std::slice::from_raw_parts(s.as_ptr(), s.len) }
        })
    }

    /// Gathers the value into one contiguous buffer (tests, tools, network backends).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.total);
        for c in self.chunks() {
            out.extend_from_slice(c);
        }
        out
    }
}

impl IoVecMut {
    /// Scatters `chunks` (whose lengths must sum to [`len`](Self::len)) into the slices.
    ///
    /// Callers check the length first; a mismatch here is an InvalidArgument
    /// error and, because it is checked before any byte moves, nothing is written.
    pub fn scatter_from<'a>(
        &self,
        chunks: impl IntoIterator<Item = &'a [u8]> + Clone,
    ) -> Result<()> {
        let total: usize = chunks.clone().into_iter().map(<[u8]>::len).sum();
        if total != self.total {
            return Err(Error::invalid_argument(format!(
                "destination holds {} bytes but the value has {total}",
                self.total
            )));
        }
        let dst = self.slices.iter().map(|s| (s.as_ptr(), s.len));
        let src = chunks.into_iter().map(|c| (c.as_ptr(), c.len()));
        // SAFETY: lengths match; destination ranges were bounds-checked and
        // the region contract gives this call exclusive access to them.
        unsafe { copy_segments(src, dst) };
        Ok(())
    }

    /// Scatters one contiguous buffer.
    pub fn copy_from_slice(&self, data: &[u8]) -> Result<()> {
        self.scatter_from(std::iter::once(data))
    }

    /// Reads back what the slices hold, as one buffer (after a `get_into` filled them, to
    /// pass the value on, as a tiered pool's promotion does).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.total);
        for s in &self.slices {
            // SAFETY: bounds were checked at push; the region contract gives the holder of
            // the descriptor access to these ranges.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(s.as_ptr(), s.len) });
        }
        out
    }
}

/// Copies bytes from one list of segments to another, walking both in step.
/// Stops when either runs out; returns the bytes copied.
///
/// # Safety
///
/// Every source segment must be valid for reads and every destination
/// segment valid for writes, for their stated lengths, and no source may
/// overlap a destination.
pub unsafe fn copy_segments(
    src: impl IntoIterator<Item = (*const u8, usize)>,
    dst: impl IntoIterator<Item = (*mut u8, usize)>,
) -> usize {
    let mut src = src.into_iter();
    let mut dst = dst.into_iter();
    let (mut s_ptr, mut s_len) = match src.next() {
        Some(x) => x,
        None => return 0,
    };
    let (mut d_ptr, mut d_len) = match dst.next() {
        Some(x) => x,
        None => return 0,
    };
    let mut copied = 0;
    loop {
        let n = s_len.min(d_len);
        if n > 0 {
            // SAFETY: forwarded from the caller's contract.
            unsafe { std::ptr::copy_nonoverlapping(s_ptr, d_ptr, n) };
            copied += n;
            // SAFETY: `n` is within both segments.
            unsafe {
                s_ptr = s_ptr.add(n);
                d_ptr = d_ptr.add(n);
            }
            s_len -= n;
            d_len -= n;
        }
        if s_len == 0 {
            match src.next() {
                Some((p, l)) => (s_ptr, s_len) = (p, l),
                None => return copied,
            }
        }
        if d_len == 0 {
            match dst.next() {
                Some((p, l)) => (d_ptr, d_len) = (p, l),
                None => return copied,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_and_scatter_across_uneven_slices() {
        let src = MemRegion::from_vec((0u8..100).collect());
        let mut put = IoVec::new();
        put.push(&src, 10, 7).unwrap();
        put.push(&src, 50, 13).unwrap();
        assert_eq!(put.len(), 20);
        let expected: Vec<u8> = (10u8..17).chain(50..63).collect();
        assert_eq!(put.to_vec(), expected);

        let dst = MemRegion::alloc(64);
        let mut get = IoVecMut::new();
        get.push(&dst, 0, 3).unwrap();
        get.push(&dst, 40, 17).unwrap();
        get.scatter_from(put.chunks()).unwrap();
        assert_eq!(dst.read(0, 3).unwrap(), expected[..3]);
        assert_eq!(dst.read(40, 17).unwrap(), expected[3..]);
        assert_eq!(dst.read(3, 37).unwrap(), vec![0u8; 37]);
    }

    #[test]
    fn out_of_bounds_slices_are_rejected() {
        let r = MemRegion::alloc(16);
        assert!(IoVec::single(&r, 10, 7).is_err());
        assert!(IoVecMut::single(&r, usize::MAX, 2).is_err());
        let e = IoVec::single(&r, 17, 0).unwrap_err();
        assert!(e.to_string().contains("outside region"), "{e}");
        assert!(IoVec::single(&r, 16, 0).is_ok());
    }

    #[test]
    fn scatter_with_wrong_length_writes_nothing() {
        let dst = MemRegion::from_vec(vec![9u8; 8]);
        let get = IoVecMut::whole(&dst);
        let err = get.copy_from_slice(&[1, 2, 3]).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        assert_eq!(dst.read(0, 8).unwrap(), vec![9u8; 8]);
    }

    #[test]
    fn alloc_is_page_aligned_and_zeroed() {
        let r = MemRegion::alloc(10_000);
        assert_eq!(r.as_ptr() as usize % PAGE, 0);
        assert_eq!(r.read(0, 10_000).unwrap(), vec![0u8; 10_000]);
        r.write(9_990, &[5; 10]).unwrap();
        assert_eq!(r.read(9_995, 5).unwrap(), vec![5; 5]);
        assert!(MemRegion::alloc(0).is_empty());
    }

    #[test]
    fn null_pointer_cannot_be_registered() {
        // SAFETY: a null pointer is rejected before any access.
        let err = unsafe { MemRegion::from_raw(std::ptr::null_mut(), 8, None) }.unwrap_err();
        assert!(err.to_string().contains("null"));
    }
}
