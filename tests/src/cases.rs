//! The cases. Each promise of the `KvBackend` contract is one case; the doc
//! line of each case names the promise.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kvpool_core::{
    BlockHash, BlockKey, Capabilities, ClearScope, ErrorKind, GetOutcome, IoVec, IoVecMut,
    KvBackend, MemRegion, Namespace, PutOutcome,
};
use rand::{Rng, RngCore, SeedableRng};

pub(crate) struct Ctx {
    pub backend: Arc<dyn KvBackend>,
    pub capacity: Option<u64>,
    namespace: Arc<Namespace>,
}

impl Ctx {
    pub fn new(backend: Arc<dyn KvBackend>, capacity: Option<u64>) -> Self {
        // A fresh namespace per case isolates runs that share a server.
        let model = format!("conformance-{:016x}", rand::random::<u64>());
        Ctx {
            backend,
            capacity,
            namespace: Arc::new(Namespace::single_rank(&model).expect("valid model name")),
        }
    }

    fn key(&self, i: u64) -> BlockKey {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&i.to_le_bytes());
        h[8..16].copy_from_slice(&0x6b76_706f_6f6cu64.to_le_bytes());
        BlockKey::new(self.namespace.clone(), BlockHash(h))
    }

    fn keys(&self, range: std::ops::Range<u64>) -> Vec<BlockKey> {
        range.map(|i| self.key(i)).collect()
    }
}

/// Deterministic bytes for key `i` of length `len`, so any reader can check them.
fn value(i: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::SmallRng::seed_from_u64(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ len as u64)
        .fill_bytes(&mut v);
    v
}

fn region(bytes: Vec<u8>) -> Arc<MemRegion> {
    MemRegion::from_vec(bytes)
}

async fn put_values(ctx: &Ctx, items: &[(u64, usize)]) -> Vec<PutOutcome> {
    let batch = items
        .iter()
        .map(|&(i, len)| (ctx.key(i), IoVec::whole(&region(value(i, len)))))
        .collect();
    ctx.backend.put(batch).await.expect("put call")
}

/// Loads each `(i, len)` into a fresh buffer pre-filled with 0xAA; returns outcomes and buffers.
async fn get_values(ctx: &Ctx, items: &[(u64, usize)]) -> Vec<(GetOutcome, Arc<MemRegion>)> {
    let regions: Vec<_> = items
        .iter()
        .map(|&(_, len)| region(vec![0xAA; len]))
        .collect();
    let batch = items
        .iter()
        .zip(&regions)
        .map(|(&(i, _), r)| (ctx.key(i), IoVecMut::whole(r)))
        .collect();
    let out = ctx.backend.get_into(batch).await.expect("get call");
    assert_eq!(out.len(), items.len(), "one outcome per key");
    out.into_iter().zip(regions).collect()
}

fn assert_stored(out: &[PutOutcome]) {
    for (i, o) in out.iter().enumerate() {
        assert!(
            matches!(o, PutOutcome::Stored),
            "item {i}: expected Stored, got {o:?}"
        );
    }
}

fn assert_hit_with(o: &(GetOutcome, Arc<MemRegion>), i: u64, len: usize) {
    assert!(
        matches!(o.0, GetOutcome::Hit),
        "key {i}: expected Hit, got {:?}",
        o.0
    );
    assert!(
        o.1.read(0, len).unwrap() == value(i, len),
        "key {i}: wrong bytes"
    );
}

fn untouched(r: &MemRegion) -> bool {
    r.read(0, r.len()).unwrap().iter().all(|&b| b == 0xAA)
}

type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

pub(crate) struct Case {
    pub name: &'static str,
    pub applies: fn(&Capabilities, Option<u64>) -> bool,
    pub run: fn(Ctx) -> CaseFuture,
}

fn always(_: &Capabilities, _: Option<u64>) -> bool {
    true
}

macro_rules! case {
    ($name:ident, $applies:expr) => {
        Case {
            name: stringify!($name),
            applies: $applies,
            run: |ctx| Box::pin(async move { $name(ctx).await }),
        }
    };
    ($name:ident) => {
        case!($name, always)
    };
}

pub(crate) const CASES: &[Case] = &[
    case!(round_trip),
    case!(exists_reports_presence),
    case!(exists_for_load_answers_as_exists_does),
    case!(held_key_loads_after_eviction_pressure, |c, cap| c
        .holds_for_load
        && c.capacity_bound
        && cap.is_some()),
    case!(value_lens_reports_lengths),
    case!(batch_mixing_hits_and_misses_keeps_order),
    case!(reput_of_existing_key_keeps_value),
    case!(duplicate_key_in_one_batch_is_stored_once),
    case!(remove_deletes_and_ignores_absent, |c, _| c.remove),
    case!(clear_local_empties_only_a_store_of_this_process),
    case!(empty_batches_are_noops),
    case!(value_sizes_from_1_byte_to_16_mib, fits_16_mib),
    case!(many_small_keys),
    case!(gather_and_scatter_across_slices),
    case!(length_mismatch_is_invalid_argument_and_writes_nothing),
    case!(empty_value_is_invalid_argument),
    case!(concurrent_writers_and_readers_on_same_keys),
    case!(eviction_keeps_usage_under_capacity, |c, cap| c
        .capacity_bound
        && cap.is_some()),
    case!(close_then_use_is_closed),
];

fn fits_16_mib(c: &Capabilities, cap: Option<u64>) -> bool {
    let need = 16 << 20;
    c.max_value_size.is_none_or(|m| m >= need) && cap.is_none_or(|cap| cap >= 2 * need as u64)
}

/// A stored value reads back byte for byte.
async fn round_trip(ctx: Ctx) {
    let items = [(1, 1000), (2, 4096), (3, 65_537)];
    assert_stored(&put_values(&ctx, &items).await);
    for (o, &(i, len)) in get_values(&ctx, &items).await.iter().zip(&items) {
        assert_hit_with(o, i, len);
    }
}

/// `exists` answers per key, in input order.
async fn exists_reports_presence(ctx: Ctx) {
    assert_eq!(
        ctx.backend.exists(&ctx.keys(0..3)).await.unwrap(),
        [false; 3]
    );
    assert_stored(&put_values(&ctx, &[(1, 100)]).await);
    assert_eq!(
        ctx.backend.exists(&ctx.keys(0..3)).await.unwrap(),
        [false, true, false]
    );
}

/// `exists_for_load` answers what `exists` answers, in input order, whatever the hold (zero
/// included), and the keys it found load intact.
async fn exists_for_load_answers_as_exists_does(ctx: Ctx) {
    let hold = std::time::Duration::from_secs(5);
    assert_eq!(
        ctx.backend.exists_for_load(&[], hold).await.unwrap(),
        Vec::<bool>::new()
    );
    let items = [(1, 100), (2, 4096), (4, 1)];
    assert_stored(&put_values(&ctx, &items).await);
    let keys: Vec<_> = [2, 0, 1, 5, 4].iter().map(|&i| ctx.key(i)).collect();
    let want = [true, false, true, false, true];
    assert_eq!(ctx.backend.exists(&keys).await.unwrap(), want);
    assert_eq!(
        ctx.backend.exists_for_load(&keys, hold).await.unwrap(),
        want
    );
    assert_eq!(
        ctx.backend
            .exists_for_load(&keys, std::time::Duration::ZERO)
            .await
            .unwrap(),
        want
    );
    for (o, &(i, len)) in get_values(&ctx, &items).await.iter().zip(&items) {
        assert_hit_with(o, i, len);
    }
}

/// With `holds_for_load`, a key that `exists_for_load` found still loads, byte for byte,
/// after writes of four times the capacity (which evict a key nobody held; see
/// `eviction_keeps_usage_under_capacity`), and none of those writes failed for the hold.
async fn held_key_loads_after_eviction_pressure(ctx: Ctx) {
    let capacity = ctx
        .capacity
        .expect("capacity-bound subjects declare a capacity");
    let len = (capacity / 16) as usize;
    assert_stored(&put_values(&ctx, &[(0, len)]).await);
    // Mooncake's lease is its master's (10 s by default): the writes below take less.
    let hold = std::time::Duration::from_secs(30);
    assert_eq!(
        ctx.backend
            .exists_for_load(&ctx.keys(0..1), hold)
            .await
            .unwrap(),
        [true]
    );
    for i in 1..64u64 {
        let out = put_values(&ctx, &[(i, len)]).await;
        assert!(
            matches!(out[0], PutOutcome::Stored),
            "put {i} beside a held key: {:?}",
            out[0]
        );
    }
    assert!(
        ctx.backend.exists(&ctx.keys(1..2)).await.unwrap() == [false],
        "four times the capacity was written, yet the oldest key nobody held survived"
    );
    assert_hit_with(&get_values(&ctx, &[(0, len)]).await[0], 0, len);
}

/// `value_lens` gives each present value's length and `None` for absent keys.
async fn value_lens_reports_lengths(ctx: Ctx) {
    assert_stored(&put_values(&ctx, &[(1, 100), (3, 7777)]).await);
    assert_eq!(
        ctx.backend.value_lens(&ctx.keys(0..4)).await.unwrap(),
        [None, Some(100), None, Some(7777)]
    );
}

/// A batch of hits and misses answers each key in order; misses leave their
/// destination untouched.
async fn batch_mixing_hits_and_misses_keeps_order(ctx: Ctx) {
    assert_stored(&put_values(&ctx, &[(10, 300), (12, 500), (15, 700)]).await);
    let asked = [
        (10, 300),
        (11, 300),
        (12, 500),
        (13, 64),
        (14, 64),
        (15, 700),
    ];
    let out = get_values(&ctx, &asked).await;
    for (o, &(i, len)) in out.iter().zip(&asked) {
        if [10, 12, 15].contains(&i) {
            assert_hit_with(o, i, len);
        } else {
            assert!(
                matches!(o.0, GetOutcome::Miss),
                "key {i}: expected Miss, got {:?}",
                o.0
            );
            assert!(
                untouched(&o.1),
                "key {i}: a miss wrote into its destination"
            );
        }
    }
}

/// Putting a present key reports `Exists` and keeps the first value.
async fn reput_of_existing_key_keeps_value(ctx: Ctx) {
    assert_stored(&put_values(&ctx, &[(1, 256)]).await);
    let other = region(vec![0x55; 256]);
    let out = ctx
        .backend
        .put(vec![(ctx.key(1), IoVec::whole(&other))])
        .await
        .unwrap();
    assert!(matches!(out[0], PutOutcome::Exists), "got {:?}", out[0]);
    assert_hit_with(&get_values(&ctx, &[(1, 256)]).await[0], 1, 256);
}

/// One key twice in a batch is stored once; the second reports `Exists`.
async fn duplicate_key_in_one_batch_is_stored_once(ctx: Ctx) {
    let a = region(value(1, 128));
    let out = ctx
        .backend
        .put(vec![
            (ctx.key(1), IoVec::whole(&a)),
            (ctx.key(1), IoVec::whole(&a)),
        ])
        .await
        .unwrap();
    assert!(matches!(out[0], PutOutcome::Stored), "got {:?}", out[0]);
    assert!(matches!(out[1], PutOutcome::Exists), "got {:?}", out[1]);
}

/// `remove` deletes keys; removing an absent key is not an error.
async fn remove_deletes_and_ignores_absent(ctx: Ctx) {
    assert_stored(&put_values(&ctx, &[(1, 100), (2, 100)]).await);
    ctx.backend.remove(&ctx.keys(1..4)).await.unwrap();
    assert_eq!(
        ctx.backend.exists(&ctx.keys(1..3)).await.unwrap(),
        [false, false]
    );
    let out = get_values(&ctx, &[(1, 100)]).await;
    assert!(matches!(out[0].0, GetOutcome::Miss));
    // The key can be stored again after removal.
    assert_stored(&put_values(&ctx, &[(1, 100)]).await);
    assert_hit_with(&get_values(&ctx, &[(1, 100)]).await[0], 1, 100);
}

/// `clear(Local)` empties a store only this process sees (and says so), and leaves a shared
/// store's objects in place; a cleared store takes new values.
async fn clear_local_empties_only_a_store_of_this_process(ctx: Ctx) {
    assert_stored(&put_values(&ctx, &[(1, 100), (2, 100)]).await);
    let shared = ctx.backend.info().capabilities.shared;
    let cleared = ctx.backend.clear(ClearScope::Local).await.unwrap();
    let present = ctx.backend.exists(&ctx.keys(1..3)).await.unwrap();
    if shared {
        assert_eq!(
            present,
            [true, true],
            "a shared store keeps every instance's objects"
        );
    } else {
        assert!(cleared, "a store of this process is in the local scope");
        assert_eq!(present, [false, false]);
        assert!(matches!(
            get_values(&ctx, &[(1, 100)]).await[0].0,
            GetOutcome::Miss
        ));
        assert_stored(&put_values(&ctx, &[(1, 100)]).await);
        assert_hit_with(&get_values(&ctx, &[(1, 100)]).await[0], 1, 100);
    }
}

/// Empty batches succeed with empty results.
async fn empty_batches_are_noops(ctx: Ctx) {
    assert!(ctx.backend.exists(&[]).await.unwrap().is_empty());
    assert!(ctx.backend.value_lens(&[]).await.unwrap().is_empty());
    assert!(ctx.backend.put(Vec::new()).await.unwrap().is_empty());
    assert!(ctx.backend.get_into(Vec::new()).await.unwrap().is_empty());
    ctx.backend.remove(&[]).await.unwrap();
}

/// Values from 1 byte to 16 MiB round-trip.
async fn value_sizes_from_1_byte_to_16_mib(ctx: Ctx) {
    let sizes = [
        1usize,
        2,
        63,
        4096,
        4097,
        512 << 10,
        (1 << 20) + 3,
        16 << 20,
    ];
    for (i, &len) in sizes.iter().enumerate() {
        let item = [(i as u64, len)];
        assert_stored(&put_values(&ctx, &item).await);
        assert_hit_with(&get_values(&ctx, &item).await[0], i as u64, len);
    }
}

/// Thousands of small keys in batches are all stored and found.
async fn many_small_keys(ctx: Ctx) {
    const N: u64 = 4000;
    for start in (0..N).step_by(500) {
        let items: Vec<_> = (start..start + 500).map(|i| (i, 64)).collect();
        assert_stored(&put_values(&ctx, &items).await);
    }
    let present = ctx.backend.exists(&ctx.keys(0..N)).await.unwrap();
    assert_eq!(present.iter().filter(|p| **p).count() as u64, N);
    let items: Vec<_> = (0..N).step_by(7).map(|i| (i, 64)).collect();
    for (o, &(i, len)) in get_values(&ctx, &items).await.iter().zip(&items) {
        assert_hit_with(o, i, len);
    }
}

/// A value is gathered from several slices and scattered into others with
/// different split points (every layer's K and V of one block).
async fn gather_and_scatter_across_slices(ctx: Ctx) {
    let data = value(1, 10_000);
    let a = region(data[..3000].to_vec());
    let b = region([vec![0u8; 100], data[3000..].to_vec()].concat());
    let mut src = IoVec::new();
    src.push(&a, 0, 1000).unwrap();
    src.push(&a, 1000, 2000).unwrap();
    src.push(&b, 100, 7000).unwrap();
    let out = ctx.backend.put(vec![(ctx.key(1), src)]).await.unwrap();
    assert_stored(&out);

    let dst = region(vec![0xAA; 20_000]);
    let mut get = IoVecMut::new();
    get.push(&dst, 5000, 1).unwrap();
    get.push(&dst, 0, 4999).unwrap();
    get.push(&dst, 10_000, 5000).unwrap();
    let out = ctx.backend.get_into(vec![(ctx.key(1), get)]).await.unwrap();
    assert!(matches!(out[0], GetOutcome::Hit), "got {:?}", out[0]);
    assert_eq!(dst.read(5000, 1).unwrap(), data[..1]);
    assert_eq!(dst.read(0, 4999).unwrap(), data[1..5000]);
    assert_eq!(dst.read(10_000, 5000).unwrap(), data[5000..]);
    assert!(dst.read(5001, 4999).unwrap().iter().all(|&x| x == 0xAA));
}

/// A destination whose length differs from the stored value fails that key
/// with InvalidArgument, writes nothing into it, and leaves other keys alone.
async fn length_mismatch_is_invalid_argument_and_writes_nothing(ctx: Ctx) {
    assert_stored(&put_values(&ctx, &[(1, 1000), (2, 1000)]).await);
    let out = get_values(&ctx, &[(1, 999), (2, 1000), (1, 1001)]).await;
    for idx in [0, 2] {
        match &out[idx].0 {
            GetOutcome::Failed(e) => assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}"),
            other => panic!("item {idx}: expected InvalidArgument, got {other:?}"),
        }
        assert!(
            untouched(&out[idx].1),
            "item {idx}: a failed get wrote bytes"
        );
    }
    assert_hit_with(&out[1], 2, 1000);
    // The stored value is intact.
    assert_hit_with(&get_values(&ctx, &[(1, 1000)]).await[0], 1, 1000);
}

/// An empty value fails that key with InvalidArgument and stores nothing.
async fn empty_value_is_invalid_argument(ctx: Ctx) {
    let r = region(vec![1, 2, 3]);
    let out = ctx
        .backend
        .put(vec![
            (ctx.key(1), IoVec::single(&r, 0, 0).unwrap()),
            (ctx.key(2), IoVec::whole(&r)),
        ])
        .await
        .unwrap();
    match &out[0] {
        PutOutcome::Failed(e) => assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert!(matches!(out[1], PutOutcome::Stored), "got {:?}", out[1]);
    assert_eq!(
        ctx.backend.exists(&ctx.keys(1..3)).await.unwrap(),
        [false, true]
    );
}

/// Concurrent writers and readers of the same keys: every key is stored
/// exactly once, and every hit carries the right bytes.
async fn concurrent_writers_and_readers_on_same_keys(ctx: Ctx) {
    const KEYS: u64 = 32;
    const LEN: usize = 8192;
    let ctx = Arc::new(ctx);
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let mut stored = 0u64;
            for round in 0..3u64 {
                let mut order: Vec<u64> = (0..KEYS).collect();
                order.rotate_left(((w * 7 + round) % KEYS) as usize);
                for chunk in order.chunks(8) {
                    let items: Vec<_> = chunk.iter().map(|&i| (i, LEN)).collect();
                    for o in put_values(&ctx, &items).await {
                        match o {
                            PutOutcome::Stored => stored += 1,
                            PutOutcome::Exists => {}
                            PutOutcome::Failed(e) => panic!("concurrent put failed: {e}"),
                        }
                    }
                    tokio::task::yield_now().await;
                }
            }
            stored
        }));
    }
    for r in 0..4u64 {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(r);
            for _ in 0..200 {
                let i = rng.gen_range(0..KEYS);
                let out = get_values(&ctx, &[(i, LEN)]).await;
                match &out[0].0 {
                    GetOutcome::Hit => assert_hit_with(&out[0], i, LEN),
                    GetOutcome::Miss => assert!(untouched(&out[0].1)),
                    GetOutcome::Failed(e) => panic!("concurrent get failed: {e}"),
                }
                tokio::task::yield_now().await;
            }
            0
        }));
    }
    let mut stored = 0;
    for t in tasks {
        stored += t.await.expect("task panicked");
    }
    assert_eq!(stored, KEYS, "each key must be stored exactly once");
    let items: Vec<_> = (0..KEYS).map(|i| (i, LEN)).collect();
    for (o, &(i, len)) in get_values(&ctx, &items).await.iter().zip(&items) {
        assert_hit_with(o, i, len);
    }
}

/// Writing several times the capacity evicts old values: the bytes present
/// never exceed capacity, recent values survive, old ones are gone, and
/// every value still present reads back intact.
async fn eviction_keeps_usage_under_capacity(ctx: Ctx) {
    let capacity = ctx
        .capacity
        .expect("capacity-bound subjects declare a capacity");
    let len = (capacity / 16) as usize;
    let n = 64u64;
    for i in 0..n {
        let out = put_values(&ctx, &[(i, len)]).await;
        assert!(
            matches!(out[0], PutOutcome::Stored),
            "put {i} under pressure: {:?}",
            out[0]
        );
    }
    let lens = ctx.backend.value_lens(&ctx.keys(0..n)).await.unwrap();
    let present: u64 = lens.iter().flatten().map(|&l| l as u64).sum();
    assert!(
        present <= capacity,
        "{present} bytes present over a capacity of {capacity}"
    );
    assert!(
        lens[(n - 1) as usize].is_some(),
        "the newest value was evicted"
    );
    assert!(
        lens[0].is_none(),
        "the oldest value survived 4x capacity of writes"
    );
    let kept: Vec<_> = (0..n)
        .filter(|&i| lens[i as usize].is_some())
        .map(|i| (i, len))
        .collect();
    assert!(
        kept.len() >= 8,
        "only {} values kept of 16 that fit",
        kept.len()
    );
    for (o, &(i, len)) in get_values(&ctx, &kept).await.iter().zip(&kept) {
        match &o.0 {
            GetOutcome::Hit => assert_hit_with(o, i, len),
            // Evicted between the two calls: allowed, but never wrong bytes.
            GetOutcome::Miss => assert!(untouched(&o.1)),
            GetOutcome::Failed(e) => panic!("get {i}: {e}"),
        }
    }
}

/// After `close`, every operation fails with Closed; closing again is fine.
async fn close_then_use_is_closed(ctx: Ctx) {
    assert_stored(&put_values(&ctx, &[(1, 10)]).await);
    ctx.backend.close().await.unwrap();
    let closed = |e: kvpool_core::Error| assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    closed(ctx.backend.exists(&ctx.keys(0..1)).await.unwrap_err());
    closed(ctx.backend.value_lens(&ctx.keys(0..1)).await.unwrap_err());
    let r = region(vec![1; 10]);
    closed(
        ctx.backend
            .put(vec![(ctx.key(2), IoVec::whole(&r))])
            .await
            .unwrap_err(),
    );
    closed(
        ctx.backend
            .get_into(vec![(ctx.key(1), IoVecMut::whole(&r))])
            .await
            .unwrap_err(),
    );
    closed(ctx.backend.remove(&ctx.keys(0..1)).await.unwrap_err());
    ctx.backend.close().await.unwrap();
}
