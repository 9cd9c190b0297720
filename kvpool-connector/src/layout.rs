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

/// The registered cache: for each block, where its value's bytes are.
#[derive(Debug)]
pub struct KvLayout {
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
        let Some(first) = tensors.first() else {
            return Err(Error::invalid_argument("no KV-cache tensors to register"));
        };
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

        let mut plans = Vec::with_capacity(tensors.len());
        let mut value_len = 0usize;
        for (t, home) in tensors.iter().zip(homes) {
            let pieces = block_pieces(t);
            let runs = address_order(&pieces).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "KV-cache tensor of layer {:?}: elements of one block overlap (strides \
                     {:?}); kvpool stores each byte of a block once",
                    t.layer, t.strides
                ))
            })?;
            value_len += pieces.iter().map(|r| r.len).sum::<usize>();
            plans.push(TensorPlan {
                region: home,
                addr: t.ptr,
                block_stride: t.strides[0] as usize * t.elem_size,
                pieces,
                runs,
            });
        }
        let reorder = reorder_plan(&plans);
        Ok(KvLayout {
            tensors: plans,
            regions,
            device,
            num_blocks,
            value_len,
            reorder,
        })
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

    fn check_block(&self, block: u32) -> Result<usize> {
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
        for t in &self.tensors {
            let start = t.addr + b * t.block_stride;
            for r in &t.runs {
                let device = (start + r.offset) as u64;
                match out.last_mut() {
                    Some(last)
                        if last.device + last.len as u64 == device
                            && last.host + last.len == host =>
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
                    value[m.value..m.value + m.len].copy_from_slice(&image[m.image..m.image + m.len]);
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
                    image[m.image..m.image + m.len].copy_from_slice(&value[m.value..m.value + m.len]);
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

/// How each tensor's pieces land in the block's image (its runs, concatenated) and in its value
/// (its pieces, concatenated); `None` when image and value are the same bytes.
fn reorder_plan(plans: &[TensorPlan]) -> Option<Vec<Move>> {
    let mut moves = Vec::new();
    let mut base = 0usize;
    let mut identity = true;
    for t in plans {
        // Where each run starts in the image.
        let mut run_at = Vec::with_capacity(t.runs.len());
        let mut at = base;
        for r in &t.runs {
            run_at.push(at);
            at += r.len;
        }
        let mut value = base;
        for p in &t.pieces {
            let i = t.runs.partition_point(|r| r.offset <= p.offset) - 1;
            let image = run_at[i] + (p.offset - t.runs[i].offset);
            identity &= image == value;
            moves.push(Move {
                image,
                value,
                len: p.len,
            });
            value += p.len;
        }
        base = at;
    }
    (!identity).then_some(moves)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contiguous_strides(shape: &[usize]) -> Vec<isize> {
        let mut strides = vec![0isize; shape.len()];
        let mut acc = 1isize;
        for d in (0..shape.len()).rev() {
            strides[d] = acc;
            acc *= shape[d] as isize;
        }
        strides
    }

    #[test]
    fn contiguous_tensor_has_one_run_per_block() {
        let mut buf = vec![0u16; 4 * 2 * 3 * 5];
        let t = TensorDesc {
            layer: "l0".into(),
            ptr: buf.as_mut_ptr() as usize,
            shape: vec![4, 2, 3, 5],
            strides: contiguous_strides(&[4, 2, 3, 5]),
            elem_size: 2,
        };
        // SAFETY: `buf` outlives the layout.
        let layout = unsafe { KvLayout::new(&[t], None) }.unwrap();
        assert_eq!(layout.num_blocks(), 4);
        assert_eq!(layout.value_len(), 2 * 3 * 5 * 2);
        let g = layout.gather(2).unwrap();
        assert_eq!(g.slices().len(), 1);
        assert_eq!(g.slices()[0].offset(), 2 * 30 * 2);
        assert!(layout.gather(4).is_err());
    }

    #[test]
    fn heads_outermost_layout_gives_one_run_per_head() {
        // Physical order [heads, blocks, tokens, content]; logical [blocks, heads, tokens, content].
        let (b, h, n, c) = (3usize, 2usize, 4usize, 8usize);
        let mut buf: Vec<u8> = (0..b * h * n * c).map(|i| i as u8).collect();
        let t = TensorDesc {
            layer: "l0".into(),
            ptr: buf.as_mut_ptr() as usize,
            shape: vec![b, h, n, c],
            strides: vec![(n * c) as isize, (b * n * c) as isize, c as isize, 1],
            elem_size: 1,
        };
        // SAFETY: `buf` outlives the layout.
        let layout = unsafe { KvLayout::new(&[t], None) }.unwrap();
        let g = layout.gather(1).unwrap();
        let offsets: Vec<usize> = g.slices().iter().map(|s| s.offset()).collect();
        assert_eq!(offsets, vec![n * c, b * n * c + n * c]);
        let bytes = g.to_vec();
        assert_eq!(bytes.len(), h * n * c);
        // Head 1 of block 1 starts at physical element (1 * b + 1) * n * c.
        assert_eq!(bytes[n * c], ((b + 1) * n * c) as u8);
    }

    #[test]
    fn vllm_default_layout_block_is_one_page() {
        // Logical [blocks, heads, tokens, 2 * head_size], physical [blocks, tokens, heads, ..].
        let (b, h, n, c) = (4usize, 4usize, 16usize, 64usize);
        let mut buf = vec![0u16; b * h * n * c];
        let t = TensorDesc {
            layer: "l0".into(),
            ptr: buf.as_mut_ptr() as usize,
            shape: vec![b, h, n, c],
            strides: vec![(h * n * c) as isize, c as isize, (h * c) as isize, 1],
            elem_size: 2,
        };
        // SAFETY: `buf` outlives the layout.
        let layout = unsafe { KvLayout::new(&[t], None) }.unwrap();
        let g = layout.gather(3).unwrap();
        assert_eq!(g.slices().len(), 1);
        assert_eq!(g.slices()[0].offset(), 3 * h * n * c * 2);
        assert_eq!(g.len(), h * n * c * 2);
    }

    #[test]
    fn k_and_v_views_of_one_allocation_share_a_region() {
        let mut buf = vec![0u8; 2 * 4 * 16];
        let base = buf.as_mut_ptr() as usize;
        let k = TensorDesc {
            layer: "l0".into(),
            ptr: base,
            shape: vec![4, 16],
            strides: vec![16, 1],
            elem_size: 1,
        };
        let v = TensorDesc {
            ptr: base + 64,
            ..k.clone()
        };
        // SAFETY: `buf` outlives the layout.
        let layout = unsafe { KvLayout::new(&[k, v], None) }.unwrap();
        assert_eq!(layout.regions().len(), 1);
        assert_eq!(layout.value_len(), 32);
        let g = layout.gather(3).unwrap();
        let offsets: Vec<usize> = g.slices().iter().map(|s| s.offset()).collect();
        assert_eq!(offsets, vec![48, 64 + 48]);
    }

    #[test]
    fn malformed_descriptions_are_rejected_with_the_layer_named() {
        let mut buf = vec![0u8; 64];
        let good = TensorDesc {
            layer: "model.layers.3.attn".into(),
            ptr: buf.as_mut_ptr() as usize,
            shape: vec![4, 16],
            strides: vec![16, 1],
            elem_size: 1,
        };
        let cases = [
            TensorDesc {
                ptr: 0,
                ..good.clone()
            },
            TensorDesc {
                shape: vec![4, 0],
                ..good.clone()
            },
            TensorDesc {
                strides: vec![16, -1],
                ..good.clone()
            },
            TensorDesc {
                strides: vec![16],
                ..good.clone()
            },
            TensorDesc {
                strides: vec![isize::MAX, 1],
                ..good.clone()
            },
        ];
        for case in cases {
            // SAFETY: rejected before any region is made.
            let err = unsafe { KvLayout::new(&[case], None) }.unwrap_err();
            assert!(err.to_string().contains("model.layers.3.attn"), "{err}");
        }
        let other = TensorDesc {
            shape: vec![3, 16],
            ..good.clone()
        };
        // SAFETY: rejected before any region is made.
        let err = unsafe { KvLayout::new(&[good, other], None) }.unwrap_err();
        assert!(err.to_string().contains("blocks"), "{err}");
    }
}
