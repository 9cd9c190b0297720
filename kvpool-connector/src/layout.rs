//! Where each block's KV bytes sit in the engine's cache tensors.
//!
//! vLLM 0.33 hands one tensor per layer whose dimension 0 indexes blocks (`[blocks, heads,
//! block_size, 2 × head_size]`, K and V side by side); Ascend hands a `(k, v)` pair per layer,
//! each `[blocks, block_size, heads, head_size]`. The physical order may differ from the
//! logical one, so a block is not always one contiguous run: its byte runs are derived from the
//! strides, never assumed.
//!
//! The value stored under a block's key is the concatenation, in registration order, of that
//! block's bytes in every tensor of every layer, so one key carries the whole block for this
//! rank and a load is one scatter.

use std::any::Any;
use std::sync::Arc;

use kvpool_core::buffer::{IoVec, IoVecMut, MemRegion};
use kvpool_core::error::{Error, Result};

/// One cache tensor as the engine describes it. Dimension 0 indexes blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorDesc {
    /// The layer it belongs to, for error messages.
    pub layer: String,
    /// Address of element `[0, 0, ...]`.
    pub ptr: usize,
    /// Shape, in elements.
    pub shape: Vec<usize>,
    /// Strides, in elements (PyTorch's `stride()`).
    pub strides: Vec<isize>,
    /// Bytes per element.
    pub elem_size: usize,
}

/// A run of bytes, relative to the start of the tensor's region.
#[derive(Debug, Clone, Copy)]
struct Run {
    offset: usize,
    len: usize,
}

#[derive(Debug)]
struct TensorPlan {
    region: Arc<MemRegion>,
    /// Offset of block 0 in the region.
    base: usize,
    /// Bytes from one block to the next.
    block_stride: usize,
    /// The block's runs, relative to the block's start.
    runs: Vec<Run>,
}

/// The registered cache: regions, and for each block the runs that make up its value.
#[derive(Debug)]
pub struct KvLayout {
    tensors: Vec<TensorPlan>,
    regions: Vec<Arc<MemRegion>>,
    num_blocks: usize,
    value_len: usize,
}

impl KvLayout {
    /// Plans the layout of `tensors` (every layer's, in registration order).
    ///
    /// Tensors that share memory (K and V views of one allocation, layers of one buffer) end up
    /// in one region, so a backend that registers memory sees each byte once.
    ///
    /// # Safety
    ///
    /// Every tensor's memory must stay valid for reads and writes while the layout, or any
    /// descriptor made from it, lives; `owner` is dropped with the last region and should keep
    /// the tensors alive.
    ///
    /// # Errors
    /// `InvalidArgument` naming the layer: no tensors, mismatched block counts, a null pointer,
    /// zero-sized or negative-stride dimensions, or an extent that overflows.
    pub unsafe fn new(
        tensors: &[TensorDesc],
        owner: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Result<KvLayout> {
        if tensors.is_empty() {
            return Err(Error::invalid_argument("no KV-cache tensors to register"));
        }
        let mut spans = Vec::with_capacity(tensors.len());
        let mut num_blocks = None;
        for t in tensors {
            let span = checked_span(t)?;
            match num_blocks {
                None => num_blocks = Some(t.shape[0]),
                Some(n) if n != t.shape[0] => {
                    return Err(Error::invalid_argument(format!(
                        "layer {:?} has {} blocks but earlier layers have {n}; every cache \
                         tensor must index the same blocks",
                        t.layer, t.shape[0]
                    )))
                }
                Some(_) => {}
            }
            spans.push(span);
        }
        let num_blocks = num_blocks.unwrap_or(0);

        // Merge overlapping or touching spans into regions.
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

        let mut plans = Vec::with_capacity(tensors.len());
        let mut value_len = 0usize;
        for (t, &(start, _)) in tensors.iter().zip(&spans) {
            let idx = merged.partition_point(|m| m.0 <= start) - 1;
            let region = regions[idx].clone();
            let runs = block_runs(t);
            value_len += runs.iter().map(|r| r.len).sum::<usize>();
            plans.push(TensorPlan {
                base: t.ptr - merged[idx].0,
                block_stride: t.strides[0] as usize * t.elem_size,
                region,
                runs,
            });
        }
        Ok(KvLayout {
            tensors: plans,
            regions,
            num_blocks,
            value_len,
        })
    }

    /// The regions to register with a backend.
    pub fn regions(&self) -> &[Arc<MemRegion>] {
        &self.regions
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

    fn for_each_run(&self, block: usize, mut f: impl FnMut(&Arc<MemRegion>, usize, usize)) {
        for t in &self.tensors {
            let start = t.base + block * t.block_stride;
            for run in &t.runs {
                f(&t.region, start + run.offset, run.len);
            }
        }
    }

    /// The gather descriptor of `block`'s value.
    pub fn gather(&self, block: u32) -> Result<IoVec> {
        let b = self.check_block(block)?;
        let mut iov = IoVec::new();
        let mut res = Ok(());
        self.for_each_run(b, |region, off, len| {
            if res.is_ok() {
                res = iov.push(region, off, len);
            }
        });
        res.map(|()| iov)
    }

    /// The scatter descriptor of `block`'s value.
    pub fn scatter(&self, block: u32) -> Result<IoVecMut> {
        let b = self.check_block(block)?;
        let mut iov = IoVecMut::new();
        let mut res = Ok(());
        self.for_each_run(b, |region, off, len| {
            if res.is_ok() {
                res = iov.push(region, off, len);
            }
        });
        res.map(|()| iov)
    }
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

/// The runs of block 0 of `t`, relative to the block's start, in address order.
///
/// Address order, not logical element order: a block is then one run in the common layouts
/// (vLLM's default keeps each block's page contiguous even though its logical view is
/// strided), and the stored value is the block's page exactly as Ascend Store stores it.
/// Instances sharing a pool must therefore use the same KV-cache layout and dtype, as with
/// Ascend Store.
fn block_runs(t: &TensorDesc) -> Vec<Run> {
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
    let mut offsets: Vec<usize> = Vec::with_capacity(count);
    let mut index = vec![0usize; outer.len()];
    for _ in 0..count {
        let elem: usize = index
            .iter()
            .zip(strides)
            .map(|(&i, &s)| i * s as usize)
            .sum();
        offsets.push(elem * t.elem_size);
        // Odometer increment, last dimension fastest.
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < outer[d] {
                break;
            }
            index[d] = 0;
        }
    }
    offsets.sort_unstable();
    let mut runs: Vec<Run> = Vec::with_capacity(count);
    for offset in offsets {
        match runs.last_mut() {
            Some(last) if last.offset + last.len == offset => last.len += run_len,
            _ => runs.push(Run {
                offset,
                len: run_len,
            }),
        }
    }
    runs
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
