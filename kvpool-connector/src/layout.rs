//! Where each block's KV bytes sit in the engine's cache tensors, and the one byte order every
//! engine stores them in.
//!
//! vLLM 0.33 hands one tensor per layer whose logical shape is `[blocks, heads, tokens,
//! content]` (K and V side by side in `content`) whatever its physical order; Ascend hands a
//! `(k, v)` pair per layer, each `[blocks, tokens, heads, head_size]`. A block is therefore not
//! always one contiguous run: its bytes are derived from the strides, never assumed.
//!
//! The value stored under a block's key is canonical: for each tensor in registration order,
//! the block's elements in the tensor's *logical* order (as if it were contiguous). Two
//! engines whose physical layouts differ (vLLM's six `KVCacheLayout`s, a CPU and a GPU
//! instance) so store identical bytes for identical KV and can share a pool. In the common
//! layouts logical and address order agree and a block is one or a few runs; where they do not
//! (vLLM's `NHD` layouts, whose logical view is head-major but whose pages are token-major),
//! host KV is gathered piece by piece and device KV is copied in address order into staging
//! and reordered there on the CPU.

use std::any::Any;
use std::sync::Arc;

use kvpool_core::buffer::{IoVec, IoVecMut, MemRegion};
use kvpool_core::error::{Error, Result};

use crate::device::{Copy, Device};

/// One cache tensor as the engine describes it. Dimension 0 indexes blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorDesc {
    /// The layer it belongs to, for error messages.
    pub layer: String,
    /// Address of element `[0, 0, ...]`: a host address, or a device address on `device`.
    pub ptr: usize,
    /// Shape, in elements.
    pub shape: Vec<usize>,
    /// Strides, in elements (PyTorch's `stride()`).
    pub strides: Vec<isize>,
    /// Bytes per element.
    pub elem_size: usize,
    /// Where the memory is.
    pub device: Device,
}

/// A run of bytes, relative to the start of a block in its tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    offset: usize,
    len: usize,
}

/// A copy inside one block's bytes, from its address-order image to its canonical value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Move {
    image: usize,
    value: usize,
    len: usize,
}

#[derive(Debug)]
struct TensorPlan {
    /// Host tensors: the region holding it, and the offset of block 0 in it.
    region: Option<(Arc<MemRegion>, usize)>,
    /// Address of block 0 (host or device).
    addr: usize,
    /// Bytes from one block to the next.
    block_stride: usize,
    /// The block's bytes in canonical (logical) order.
    pieces: Vec<Run>,
    /// The block's bytes in address order: what a device copy moves.
    runs: Vec<Run>,
}

/// A run of a block's image: bytes of tensor `tensor` at `offset` from the block's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ImageRun {
    tensor: usize,
    offset: usize,
    len: usize,
}

/// The registered cache: for each block, where its value's bytes are.
#[derive(Debug)]
pub struct KvLayout {
    /// A block's bytes in the order device copies move them: address order over all tensors
    /// when they share one block stride (then a block-outermost layout is one run), else each
    /// tensor's runs in registration order.
    image: Vec<ImageRun>,
    tensors: Vec<TensorPlan>,
    regions: Vec<Arc<MemRegion>>,
    device: Device,
    num_blocks: usize,
    value_len: usize,
    /// How a block's address-order image becomes its value; `None` when they are the same.
    reorder: Option<Vec<Move>>,
}

impl KvLayout {
    /// Plans the layout of `tensors` (every layer's, in registration order).
    ///
    /// Host tensors that share memory (K and V views of one allocation, layers of one buffer)
    /// end up in one region, so a backend that registers memory sees each byte once. Device
    /// tensors get no region: backends never address device memory.
    ///
    /// # Safety
    ///
    /// Every tensor's memory must stay valid for reads and writes while the layout, or any
    /// descriptor made from it, lives; `owner` is dropped with the last region and should keep
    /// the tensors alive.
    ///
    /// # Errors
    /// `InvalidArgument` naming the layer: no tensors, tensors on different devices, mismatched
    /// block counts, a null pointer, zero-sized or negative-stride dimensions, elements of one
    /// block that overlap, or an extent that overflows.
    pub unsafe fn new(
        tensors: &[TensorDesc],
        owner: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Result<KvLayout> {
        // SAFETY: forwarded from the caller.
        let mut layouts = unsafe { Self::grouped(tensors, &[], owner)? };
        Ok(layouts.remove(0))
    }

    /// As [`new`](Self::new), for tensors of several KV-cache groups: `groups[i]` is the group
    /// of `tensors[i]` (empty: all in group 0), and the result holds one layout per group
    /// `0..=max(groups)`, each planning its group's tensors in order. Groups of a hybrid model
    /// share memory (a block id belongs to one group at a time), so the host regions are
    /// planned once over every tensor and shared: [`regions`](Self::regions) of every layout
    /// is the same list, to be registered once.
    ///
    /// # Safety
    /// As for [`new`](Self::new).
    ///
    /// # Errors
    /// As for [`new`](Self::new); also a `groups` list of the wrong length, or a group with no
    /// tensor.
    pub unsafe fn grouped(
        tensors: &[TensorDesc],
        groups: &[u32],
        owner: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Result<Vec<KvLayout>> {
        let Some(first) = tensors.first() else {
            return Err(Error::invalid_argument("no KV-cache tensors to register"));
        };
        if !groups.is_empty() && groups.len() != tensors.len() {
            return Err(Error::invalid_argument(format!(
                "{} KV-cache tensors but {} group indices; each tensor needs its group",
                tensors.len(),
                groups.len()
            )));
        }
        let group_of = |i: usize| groups.get(i).copied().unwrap_or(0) as usize;
        let num_groups = groups.iter().max().map_or(1, |&g| g as usize + 1);
        let device = first.device;
        let num_blocks = first.shape.first().copied().unwrap_or(0);
        let mut spans = Vec::with_capacity(tensors.len());
        for t in tensors {
            let span = checked_span(t)?;
            if t.device != device {
                return Err(Error::invalid_argument(format!(
                    "layer {:?} is on {} but layer {:?} is on {device}; every cache tensor of \
                     a worker must be on one device",
                    t.layer, t.device, first.layer
                )));
            }
            if t.shape[0] != num_blocks {
                return Err(Error::invalid_argument(format!(
                    "layer {:?} has {} blocks but earlier layers have {num_blocks}; every cache \
                     tensor must index the same blocks",
                    t.layer, t.shape[0]
                )));
            }
            spans.push(span);
        }

        let (regions, homes) = if device.is_host() {
            // SAFETY: forwarded from the caller.
            unsafe { host_regions(&spans, owner)? }
        } else {
            (Vec::new(), vec![None; tensors.len()])
        };

        let mut plans: Vec<Vec<TensorPlan>> = (0..num_groups).map(|_| Vec::new()).collect();
        let mut value_lens = vec![0usize; num_groups];
        for (i, (t, home)) in tensors.iter().zip(homes).enumerate() {
            let pieces = block_pieces(t);
            let runs = address_order(&pieces).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "KV-cache tensor of layer {:?}: elements of one block overlap (strides \
                     {:?}); kvpool stores each byte of a block once",
                    t.layer, t.strides
                ))
            })?;
            let g = group_of(i);
            value_lens[g] += pieces.iter().map(|r| r.len).sum::<usize>();
            plans[g].push(TensorPlan {
                region: home,
                addr: t.ptr,
                block_stride: t.strides[0] as usize * t.elem_size,
                pieces,
                runs,
            });
        }
        let mut layouts = Vec::with_capacity(num_groups);
        for (g, (tensors, value_len)) in plans.into_iter().zip(value_lens).enumerate() {
            if tensors.is_empty() {
                return Err(Error::invalid_argument(format!(
                    "KV-cache group {g} has no tensor on this worker; every group must have \
                     layers on every worker"
                )));
            }
            let image = image_order(&tensors);
            let reorder = reorder_plan(&tensors, &image);
            layouts.push(KvLayout {
                image,
                tensors,
                regions: regions.clone(),
                device,
                num_blocks,
                value_len,
                reorder,
            });
        }
        Ok(layouts)
    }

    /// The regions to register with a backend: empty for device tensors.
    pub fn regions(&self) -> &[Arc<MemRegion>] {
        &self.regions
    }

    /// Where the tensors are.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Blocks in the cache.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Bytes in one block's value.
    pub fn value_len(&self) -> usize {
        self.value_len
    }

    pub(crate) fn check_block(&self, block: u32) -> Result<usize> {
        let b = block as usize;
        if b >= self.num_blocks {
            return Err(Error::invalid_argument(format!(
                "block id {block} is outside the registered cache of {} blocks",
                self.num_blocks
            )));
        }
        Ok(b)
    }

    fn host_pieces(
        &self,
        block: u32,
        mut push: impl FnMut(&Arc<MemRegion>, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let b = self.check_block(block)?;
        for t in &self.tensors {
            let Some((region, base)) = &t.region else {
                return Err(Error::invalid_argument(format!(
                    "the KV cache is on {}: backends cannot address it directly",
                    self.device
                )));
            };
            let start = base + b * t.block_stride;
            for p in &t.pieces {
                push(region, start + p.offset, p.len)?;
            }
        }
        Ok(())
    }

    /// The gather descriptor of host `block`'s value.
    pub fn gather(&self, block: u32) -> Result<IoVec> {
        let mut iov = IoVec::new();
        self.host_pieces(block, |region, off, len| iov.push(region, off, len))?;
        Ok(iov)
    }

    /// The scatter descriptor of host `block`'s value.
    pub fn scatter(&self, block: u32) -> Result<IoVecMut> {
        let mut iov = IoVecMut::new();
        self.host_pieces(block, |region, off, len| iov.push(region, off, len))?;
        Ok(iov)
    }

    /// The copies between `block` and its address-order image at host address `staging`
    /// (`value_len` bytes), runs that touch on both sides merged into one.
    pub fn device_copies(&self, block: u32, staging: usize, out: &mut Vec<Copy>) -> Result<()> {
        let b = self.check_block(block)?;
        let mut host = staging;
        for r in &self.image {
            let t = &self.tensors[r.tensor];
            let device = (t.addr + b * t.block_stride + r.offset) as u64;
            match out.last_mut() {
                Some(last)
                    if last.device + last.len as u64 == device && last.host + last.len == host =>
                {
                    last.len += r.len
                }
                _ => out.push(Copy {
                    device,
                    host,
                    len: r.len,
                }),
            }
            host += r.len;
        }
        Ok(())
    }

    /// Whether a block's address-order image differs from its value.
    pub fn needs_reorder(&self) -> bool {
        self.reorder.is_some()
    }

    /// Turns a block's address-order `image` into its canonical value in `value`.
    ///
    /// # Panics
    /// Never for buffers of `value_len` bytes; the caller sizes them.
    pub fn image_to_value(&self, image: &[u8], value: &mut [u8]) {
        match &self.reorder {
            None => value.copy_from_slice(image),
            Some(moves) => {
                for m in moves {
                    value[m.value..m.value + m.len]
                        .copy_from_slice(&image[m.image..m.image + m.len]);
                }
            }
        }
    }

    /// Turns a block's canonical `value` into its address-order `image`.
    pub fn value_to_image(&self, value: &[u8], image: &mut [u8]) {
        match &self.reorder {
            None => image.copy_from_slice(value),
            Some(moves) => {
                for m in moves {
                    image[m.image..m.image + m.len]
                        .copy_from_slice(&value[m.value..m.value + m.len]);
                }
            }
        }
    }
}

/// Merges the host tensors' spans into regions; returns them and, per tensor, its region and
/// offset in it.
///
/// # Safety
/// As [`KvLayout::new`].
#[allow(clippy::type_complexity)]
unsafe fn host_regions(
    spans: &[(usize, usize)],
    owner: Option<Arc<dyn Any + Send + Sync>>,
) -> Result<(Vec<Arc<MemRegion>>, Vec<Option<(Arc<MemRegion>, usize)>>)> {
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| spans[i].0);
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for &i in &order {
        let (start, end) = spans[i];
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let mut regions = Vec::with_capacity(merged.len());
    for &(start, end) in &merged {
        let holder = owner
            .clone()
            .map(|o| Box::new(o) as Box<dyn Any + Send + Sync>);
        // SAFETY: the caller guarantees every tensor's memory is valid; merged spans cover
        // only tensor memory.
        let region = unsafe { MemRegion::from_raw(start as *mut u8, end - start, holder)? };
        regions.push(region);
    }
    let homes = spans
        .iter()
        .map(|&(start, _)| {
            let idx = merged.partition_point(|m| m.0 <= start) - 1;
            Some((regions[idx].clone(), start - merged[idx].0))
        })
        .collect();
    Ok((regions, homes))
}

/// The tensor's byte extent `[start, end)`, after checking it is well-formed.
fn checked_span(t: &TensorDesc) -> Result<(usize, usize)> {
    let bad = |why: String| {
        Err(Error::invalid_argument(format!(
            "KV-cache tensor of layer {:?}: {why}",
            t.layer
        )))
    };
    if t.ptr == 0 {
        return bad("null data pointer".into());
    }
    if t.shape.is_empty() || t.shape.len() != t.strides.len() {
        return bad(format!(
            "shape {:?} and strides {:?} do not describe a tensor with a block dimension",
            t.shape, t.strides
        ));
    }
    if t.elem_size == 0 {
        return bad("element size 0".into());
    }
    if t.shape.contains(&0) {
        return bad(format!("shape {:?} has an empty dimension", t.shape));
    }
    if t.strides.iter().any(|&s| s < 0) {
        return bad(format!(
            "negative strides {:?} are not supported",
            t.strides
        ));
    }
    // The largest element offset, in elements; overflow means a nonsense description.
    let mut last = 0usize;
    for (&n, &s) in t.shape.iter().zip(&t.strides) {
        let step = (n - 1).checked_mul(s as usize);
        last = match step.and_then(|x| last.checked_add(x)) {
            Some(v) => v,
            None => return bad("extent overflows the address space".into()),
        };
    }
    let end = last
        .checked_add(1)
        .and_then(|e| e.checked_mul(t.elem_size))
        .and_then(|bytes| t.ptr.checked_add(bytes));
    match end {
        Some(end) if end <= isize::MAX as usize => Ok((t.ptr, end)),
        _ => bad("extent overflows the address space".into()),
    }
}

/// The bytes of block 0 of `t` in logical element order, relative to the block's start, with
/// pieces that follow each other in memory merged.
fn block_pieces(t: &TensorDesc) -> Vec<Run> {
    let dims = &t.shape[1..];
    let strides = &t.strides[1..];
    // The longest suffix of dimensions that is one contiguous run.
    let mut inner = dims.len();
    let mut run_elems = 1usize;
    while inner > 0 {
        let d = inner - 1;
        if strides[d] as usize == run_elems || dims[d] == 1 {
            run_elems *= dims[d];
            inner = d;
        } else {
            break;
        }
    }
    let run_len = run_elems * t.elem_size;
    let outer = &dims[..inner];
    let count: usize = outer.iter().product();
    let mut pieces: Vec<Run> = Vec::with_capacity(count);
    let mut index = vec![0usize; outer.len()];
    for _ in 0..count {
        let elem: usize = index
            .iter()
            .zip(strides)
            .map(|(&i, &s)| i * s as usize)
            .sum();
        let offset = elem * t.elem_size;
        match pieces.last_mut() {
            Some(last) if last.offset + last.len == offset => last.len += run_len,
            _ => pieces.push(Run {
                offset,
                len: run_len,
            }),
        }
        // Odometer increment, last dimension fastest.
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < outer[d] {
                break;
            }
            index[d] = 0;
        }
    }
    pieces
}

/// `pieces` sorted by address and merged; `None` when two of them overlap.
fn address_order(pieces: &[Run]) -> Option<Vec<Run>> {
    let mut sorted = pieces.to_vec();
    sorted.sort_unstable_by_key(|r| r.offset);
    let mut runs: Vec<Run> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match runs.last_mut() {
            Some(last) if last.offset + last.len > r.offset => return None,
            Some(last) if last.offset + last.len == r.offset => last.len += r.len,
            _ => runs.push(r),
        }
    }
    Some(runs)
}

/// The order of a block's bytes in its image (see [`KvLayout`]'s `image`).
fn image_order(plans: &[TensorPlan]) -> Vec<ImageRun> {
    let mut image: Vec<ImageRun> = plans
        .iter()
        .enumerate()
        .flat_map(|(tensor, t)| {
            t.runs.iter().map(move |r| ImageRun {
                tensor,
                offset: r.offset,
                len: r.len,
            })
        })
        .collect();
    let stride = plans.first().map(|t| t.block_stride);
    if plans.iter().any(|t| Some(t.block_stride) != stride) {
        return image;
    }
    // One block stride: the address order at block 0 is every block's.
    let at = |r: &ImageRun| plans[r.tensor].addr + r.offset;
    let mut sorted = image.clone();
    sorted.sort_by_key(at);
    let overlap = sorted.windows(2).any(|w| at(&w[0]) + w[0].len > at(&w[1]));
    if !overlap {
        image = sorted;
    }
    image
}

/// How each piece lands in the block's image and in its value (the tensors' pieces,
/// concatenated); `None` when image and value are the same bytes.
fn reorder_plan(plans: &[TensorPlan], image: &[ImageRun]) -> Option<Vec<Move>> {
    // Image offset of each (tensor, run), found by the run's offset within its tensor.
    let mut starts: Vec<Vec<(usize, usize)>> = vec![Vec::new(); plans.len()];
    let mut at = 0usize;
    for r in image {
        starts[r.tensor].push((r.offset, at));
        at += r.len;
    }
    for s in &mut starts {
        s.sort_unstable();
    }
    let mut moves = Vec::new();
    let mut value = 0usize;
    let mut identity = true;
    for (t, plan) in plans.iter().enumerate() {
        for p in &plan.pieces {
            let runs = &starts[t];
            let i = runs.partition_point(|&(off, _)| off <= p.offset) - 1;
            let (run_offset, run_at) = runs[i];
            let image = run_at + (p.offset - run_offset);
            identity &= image == value;
            moves.push(Move {
                image,
                value,
                len: p.len,
            });
            value += p.len;
        }
    }
    (!identity).then_some(moves)
}

#[cfg(test)]
mod tests;
