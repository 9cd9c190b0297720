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

#[test]
fn groups_share_one_region_and_each_plans_its_own_tensors() {
    // Two layers of different groups over one buffer, as vLLM lays out hybrid groups, and a
    // third layer of group 0 in a buffer of its own.
    let mut shared = vec![0u8; 8 * 64];
    let mut own = vec![0u8; 8 * 32];
    let s = shared.as_mut_ptr() as usize;
    let tensors = [
        desc("full.0", s, vec![8, 64], vec![64, 1], 1),
        desc("swa.1", s, vec![8, 64], vec![64, 1], 1),
        desc(
            "full.2",
            own.as_mut_ptr() as usize,
            vec![8, 32],
            vec![32, 1],
            1,
        ),
    ];
    // SAFETY: the buffers outlive the layouts.
    let layouts = unsafe { KvLayout::grouped(&tensors, &[0, 1, 0], None) }.unwrap();
    assert_eq!(layouts.len(), 2);
    assert_eq!(layouts[0].value_len(), 64 + 32);
    assert_eq!(layouts[1].value_len(), 64);
    // One list of regions, the same for every group: registered once.
    assert_eq!(layouts[0].regions().len(), 2);
    let ids = |l: &KvLayout| l.regions().iter().map(|r| r.id()).collect::<Vec<_>>();
    assert_eq!(ids(&layouts[0]), ids(&layouts[1]));

    // SAFETY: as above (the calls fail before any use).
    let err = unsafe { KvLayout::grouped(&tensors, &[0, 1], None) }.unwrap_err();
    assert!(
        err.to_string()
            .contains("3 KV-cache tensors but 2 group indices"),
        "{err}"
    );
    // SAFETY: as above.
    let err = unsafe { KvLayout::grouped(&tensors, &[0, 2, 0], None) }.unwrap_err();
    assert!(
        err.to_string().contains("KV-cache group 1 has no tensor"),
        "{err}"
    );
}
