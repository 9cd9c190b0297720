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
        let image = image_order(&plans);
        let reorder = reorder_plan(&plans, &image);
        Ok(KvLayout {
            image,
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

    fn desc(
        layer: &str,
        ptr: usize,
        shape: Vec<usize>,
        strides: Vec<isize>,
        elem: usize,
    ) -> TensorDesc {
        TensorDesc {
            layer: layer.into(),
            ptr,
            shape,
            strides,
            elem_size: elem,
            device: Device::Host,
        }
    }

    #[test]
    fn contiguous_tensor_has_one_run_per_block() {
        let mut buf = vec![0u16; 4 * 2 * 3 * 5];
        let t = desc(
            "l0",
            buf.as_mut_ptr() as usize,
            vec![4, 2, 3, 5],
            contiguous_strides(&[4, 2, 3, 5]),
            2,
        );
        // SAFETY: `buf` outlives the layout.
        let layout = unsafe { KvLayout::new(&[t], None) }.unwrap();
        assert_eq!(layout.num_blocks(), 4);
        assert_eq!(layout.value_len(), 2 * 3 * 5 * 2);
        assert!(!layout.needs_reorder());
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
        let t = desc(
            "l0",
            buf.as_mut_ptr() as usize,
            vec![b, h, n, c],
            vec![(n * c) as isize, (b * n * c) as isize, c as isize, 1],
            1,
        );
        // SAFETY: `buf` outlives the layout.
        let layout = unsafe { KvLayout::new(&[t], None) }.unwrap();
        let g = layout.gather(1).unwrap();
        let offsets: Vec<usize> = g.slices().iter().map(|s| s.offset()).collect();
        assert_eq!(offsets, vec![n * c, b * n * c + n * c]);
        let bytes = g.to_vec();
        assert_eq!(bytes.len(), h * n * c);
        // Head 1 of block 1 starts at physical element (1 * b + 1) * n * c.
        assert_eq!(bytes[n * c], ((b + 1) * n * c) as u8);
        assert!(!layout.needs_reorder());
    }

    #[test]
    fn k_and_v_views_of_one_allocation_share_a_region() {
        let mut buf = vec![0u8; 2 * 4 * 16];
        let base = buf.as_mut_ptr() as usize;
        let k = desc("l0", base, vec![4, 16], vec![16, 1], 1);
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
        let good = desc(
            "model.layers.3.attn",
            buf.as_mut_ptr() as usize,
            vec![4, 16],
            vec![16, 1],
            1,
        );
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
            // Two elements of one block at the same address.
            TensorDesc {
                shape: vec![4, 2, 8],
                strides: vec![16, 0, 1],
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
        let err = unsafe { KvLayout::new(&[good.clone(), other], None) }.unwrap_err();
        assert!(err.to_string().contains("blocks"), "{err}");
        let gpu = TensorDesc {
            device: Device::Cuda { ordinal: 0 },
            layer: "l9".into(),
            ..good.clone()
        };
        // SAFETY: rejected before any region is made.
        let err = unsafe { KvLayout::new(&[good, gpu], None) }
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("l9") && err.contains("cuda:0") && err.contains("one device"),
            "{err}"
        );
    }

    /// vLLM 0.33's six `KVCacheLayout`s: the per-layer view strides its
    /// `compute_layout_strides` + `create_kv_cache_views` produce for logical `[L, B, H, N, C]`,
    /// given as the permutation of those dimensions, outermost first.
    const LAYOUTS: [(&str, [usize; 5]); 6] = [
        ("LBHNC", [0, 1, 2, 3, 4]),
        ("LBNHC", [0, 1, 3, 2, 4]),
        ("LHBNC", [0, 2, 1, 3, 4]),
        ("BLHNC", [1, 0, 2, 3, 4]),
        ("BLNHC", [1, 0, 3, 2, 4]),
        ("BHLNC", [1, 2, 0, 3, 4]),
    ];

    /// One allocation holding `dims = [L, B, H, N, C]` in the physical order `perm`, and one
    /// `[B, H, N, C]` view per layer, as vLLM builds them; the value of element
    /// `(l, b, h, n, c)` is a function of those indices, so every layout holds the same KV.
    fn vllm_cache(dims: [usize; 5], perm: [usize; 5]) -> (Vec<u8>, Vec<TensorDesc>) {
        let mut phys_strides = [0usize; 5];
        let mut acc = 1;
        for &d in perm.iter().rev() {
            phys_strides[d] = acc;
            acc *= dims[d];
        }
        let mut buf = vec![0u8; acc];
        let [l, b, h, n, c] = dims;
        for li in 0..l {
            for bi in 0..b {
                for hi in 0..h {
                    for ni in 0..n {
                        for ci in 0..c {
                            let at = li * phys_strides[0]
                                + bi * phys_strides[1]
                                + hi * phys_strides[2]
                                + ni * phys_strides[3]
                                + ci * phys_strides[4];
                            buf[at] = (li * 131 + bi * 31 + hi * 17 + ni * 7 + ci) as u8;
                        }
                    }
                }
            }
        }
        let base = buf.as_ptr() as usize;
        let views = (0..l)
            .map(|li| {
                desc(
                    &format!("layers.{li}"),
                    base + li * phys_strides[0],
                    vec![b, h, n, c],
                    phys_strides[1..].iter().map(|&s| s as isize).collect(),
                    1,
                )
            })
            .collect();
        (buf, views)
    }

    #[test]
    fn every_vllm_layout_stores_the_same_bytes_for_the_same_kv() {
        let dims = [3, 5, 2, 4, 6];
        let mut reference: Option<Vec<Vec<u8>>> = None;
        for (name, perm) in LAYOUTS {
            let (buf, views) = vllm_cache(dims, perm);
            // SAFETY: `buf` outlives the layout.
            let layout = unsafe { KvLayout::new(&views, None) }.unwrap();
            assert_eq!(layout.value_len(), 3 * 2 * 4 * 6, "{name}");
            let values: Vec<Vec<u8>> = (0..5).map(|b| layout.gather(b).unwrap().to_vec()).collect();
            // Canonical = per layer, head-major, then token, then content.
            assert_eq!(
                values[1][0], 31,
                "{name}: layer 0, block 1, head 0, token 0"
            );
            assert_eq!(
                values[1][6],
                (31 + 7) as u8,
                "{name}: token 1 of head 0 follows token 0"
            );
            assert_eq!(
                values[1][4 * 6],
                (31 + 17) as u8,
                "{name}: head 1 after head 0's tokens"
            );
            // The device path (address-order image, reordered) gives the same value.
            for (b, value) in values.iter().enumerate() {
                let mut copies = Vec::new();
                layout
                    .device_copies(b as u32, 0x1000_0000, &mut copies)
                    .unwrap();
                let mut image = Vec::with_capacity(layout.value_len());
                for c in &copies {
                    let off = c.device as usize - buf.as_ptr() as usize;
                    assert_eq!(
                        c.host - 0x1000_0000,
                        image.len(),
                        "{name}: image is packed in order"
                    );
                    image.extend_from_slice(&buf[off..off + c.len]);
                }
                let mut from_image = vec![0u8; layout.value_len()];
                layout.image_to_value(&image, &mut from_image);
                assert_eq!(&from_image, value, "{name}: block {b}");
                let mut back = vec![0u8; layout.value_len()];
                layout.value_to_image(value, &mut back);
                assert_eq!(back, image, "{name}: value_to_image inverts image_to_value");
            }
            match &reference {
                None => reference = Some(values),
                Some(r) => assert_eq!(&values, r, "{name} stores other bytes than LBHNC"),
            }
            // Token-major pages need reordering, and so does BHLNC, whose block holds each head's
            // layers together; block-outermost layouts copy one run a block.
            assert_eq!(
                layout.needs_reorder(),
                name.contains("NH") || name == "BHLNC",
                "{name}"
            );
            let mut copies = Vec::new();
            layout.device_copies(2, 0, &mut copies).unwrap();
            let expected_runs = match name {
                "BLHNC" | "BLNHC" | "BHLNC" => 1,
                "LHBNC" => 3 * 2,
                _ => 3,
            };
            assert_eq!(
                copies.len(),
                expected_runs,
                "{name}: device copies per block"
            );
        }
    }

    #[test]
    fn kernel_blocks_grouped_head_major_store_what_an_unsplit_cache_stores() {
        // vLLM's view with manager block 8 = 2 kernel blocks of 4 tokens: [B*2, H, 4, C],
        // then `group_kernel_blocks` and a transpose to [B, H, 2, 4, C] (head, then token).
        let (b, h, n, c) = (3usize, 2usize, 8usize, 5usize);
        let (kn, r) = (4usize, 2usize);
        // Unsplit LBHNC cache: [B, H, N, C] contiguous.
        let mut unsplit = vec![0u8; b * h * n * c];
        // Split cache: [B*r, H, kn, C] contiguous.
        let mut split = vec![0u8; b * r * h * kn * c];
        for bi in 0..b {
            for hi in 0..h {
                for ni in 0..n {
                    for ci in 0..c {
                        let v = (bi * 50 + hi * 20 + ni * 2 + ci) as u8;
                        unsplit[((bi * h + hi) * n + ni) * c + ci] = v;
                        let (ri, ki) = (ni / kn, ni % kn);
                        split[(((bi * r + ri) * h + hi) * kn + ki) * c + ci] = v;
                    }
                }
            }
        }
        let a = desc(
            "l0",
            unsplit.as_mut_ptr() as usize,
            vec![b, h, n, c],
            contiguous_strides(&[b, h, n, c]),
            1,
        );
        let s = contiguous_strides(&[b, r, h, kn, c]);
        let grouped = desc(
            "l0",
            split.as_mut_ptr() as usize,
            vec![b, h, r, kn, c],
            vec![s[0], s[2], s[1], s[3], s[4]],
            1,
        );
        // SAFETY: the buffers outlive the layouts.
        let (la, lb) = unsafe {
            (
                KvLayout::new(&[a], None).unwrap(),
                KvLayout::new(&[grouped], None).unwrap(),
            )
        };
        for blk in 0..b as u32 {
            assert_eq!(
                la.gather(blk).unwrap().to_vec(),
                lb.gather(blk).unwrap().to_vec()
            );
        }
    }

    #[test]
    fn device_tensors_get_no_regions_and_no_host_descriptors() {
        let t = TensorDesc {
            device: Device::Cuda { ordinal: 1 },
            ..desc("l0", 0x7000_0000, vec![4, 16], vec![16, 1], 2)
        };
        // SAFETY: device memory is never dereferenced by the layout.
        let layout = unsafe { KvLayout::new(&[t], None) }.unwrap();
        assert!(layout.regions().is_empty());
        assert_eq!(layout.device(), Device::Cuda { ordinal: 1 });
        let err = layout.gather(0).unwrap_err().to_string();
        assert!(err.contains("cuda:1"), "{err}");
        let mut copies = Vec::new();
        layout.device_copies(3, 0x10, &mut copies).unwrap();
        assert_eq!(
            copies,
            vec![Copy {
                device: 0x7000_0000 + 3 * 32,
                host: 0x10,
                len: 32
            }]
        );
    }
}
