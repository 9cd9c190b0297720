//! Master HA: two `mooncake_master --enable_ha` behind a real etcd, the
//! backend opened with `etcd://`, and the leader killed under load. Reads must
//! never return wrong bytes, work must resume on the new leader without a
//! restart, and the gap is measured.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvpool_backend_mooncake::{MooncakeBackend, MooncakeConfig};
use kvpool_conformance::fixtures::etcd::Etcd;
use kvpool_conformance::fixtures::mooncake_ha::MooncakeHaPair;
use kvpool_core::size::ByteSize;
use kvpool_core::{
    BlockHash, BlockKey, ErrorKind, GetOutcome, IoVec, IoVecMut, KvBackend, MemRegion, Namespace,
    PutOutcome,
};
use parking_lot::Mutex;

fn config(address: String, segment: u64) -> MooncakeConfig {
    MooncakeConfig {
        master_server_address: address,
        global_segment_size: ByteSize(segment),
        local_hostname: "127.0.0.1".into(),
        // Short, so calls against the dead leader end quickly.
        rpc_timeout_ms: Some(1_000),
        connect_timeout_ms: Some(500),
        transfer_timeout_ms: Some(1_000),
        no_space_retry_ms: 200,
        ..MooncakeConfig::default()
    }
}

fn key(ns: &Arc<Namespace>, i: u64) -> BlockKey {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&i.to_le_bytes());
    BlockKey::new(ns.clone(), BlockHash(h))
}

/// Value `i`: its length and every byte depend on `i`, so a value read under
/// another key, or a stale buffer, shows.
fn value(i: u64) -> Vec<u8> {
    let len = 4096 + (i as usize * 977) % 12_288;
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[derive(Debug, Default)]
struct Tally {
    puts_ok: u64,
    hits: u64,
    misses: u64,
    wrong: u64,
    /// Misses of values stored after the kill: they went to the new leader,
    /// and must be there.
    lost_after_kill: u64,
    errors: HashMap<String, u64>,
    /// Errors that are not temporary: an HA failover must not cause any.
    permanent: Vec<String>,
    first_ok_after_kill: Option<Instant>,
    /// A stored put needs the owner's segment remounted on the new leader.
    first_put_after_kill: Option<Instant>,
    oks_after_kill: u64,
}

impl Tally {
    fn ok(&mut self, started: Instant, kill: Option<Instant>) {
        if kill.is_some_and(|k| started > k) {
            self.oks_after_kill += 1;
            self.first_ok_after_kill.get_or_insert_with(Instant::now);
        }
    }

    fn error(&mut self, e: &kvpool_core::Error) {
        *self.errors.entry(format!("{:?}", e.kind())).or_default() += 1;
        if !e.is_temporary() {
            self.permanent.push(e.to_string());
        }
    }
}

#[test]
fn a_client_follows_the_new_leader_when_the_leader_is_killed_under_load() {
    let etcd = Etcd::start();
    let rt = common::rt();

    // Before any master runs, an etcd:// open says there is no leader.
    let address = format!("etcd://{}", etcd.endpoint());
    let e = rt
        .block_on(MooncakeBackend::open(config(address.clone(), 0)))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("no mooncake_master leader"), "{e}");

    let mut masters = MooncakeHaPair::start(&etcd);
    let first = masters.leader().expect("a leader");
    let first_addr = masters.address(first);
    assert_eq!(masters.client_address(), address);

    rt.block_on(async {
        // The cluster id picks the etcd key: another cluster has no leader here.
        let env = |k: &str| (k == "MC_STORE_CLUSTER_ID").then(|| "other_cluster".to_owned());
        let e = MooncakeBackend::open_with_env(config(address.clone(), 0), &env)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("other_cluster"), "{e}");

        let owner = Arc::new(
            MooncakeBackend::open(config(address.clone(), 64 << 20))
                .await
                .unwrap(),
        );
        // Alternate addressing forms the official client accepts.
        let client = Arc::new(
            MooncakeBackend::open(config(
                format!("etcd://127.0.0.1:1;http://{}/", etcd.endpoint()),
                0,
            ))
            .await
            .unwrap(),
        );
        assert!(
            client.info().description.contains(&first_addr),
            "{}",
            client.info().description
        );

        let ns =
            Arc::new(Namespace::single_rank(&format!("ha-{:08x}", rand::random::<u32>())).unwrap());
        let tally = Arc::new(Mutex::new(Tally::default()));
        let kill_at: Arc<Mutex<Option<Instant>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let load = {
            let (owner, client) = (owner.clone(), client.clone());
            let (tally, kill_at, stop, ns) =
                (tally.clone(), kill_at.clone(), stop.clone(), ns.clone());
            tokio::spawn(async move {
                let backends: [&dyn KvBackend; 2] = [&*client, &*owner];
                let mut stored: Vec<u64> = Vec::new();
                let mut stored_after_kill: Vec<bool> = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Put value i through one backend...
                    let writer = backends[(i % 2) as usize];
                    let v = value(i);
                    let region = MemRegion::from_vec(v.clone());
                    let started = Instant::now();
                    let killed = *kill_at.lock();
                    match writer.put(vec![(key(&ns, i), IoVec::whole(&region))]).await {
                        Ok(mut out) => match out.remove(0) {
                            PutOutcome::Stored | PutOutcome::Exists => {
                                let mut t = tally.lock();
                                t.puts_ok += 1;
                                t.ok(started, killed);
                                if killed.is_some_and(|k| started > k) {
                                    t.first_put_after_kill.get_or_insert_with(Instant::now);
                                }
                                stored.push(i);
                                stored_after_kill.push(killed.is_some_and(|k| started > k));
                            }
                            PutOutcome::Failed(e) => tally.lock().error(&e),
                        },
                        Err(e) => tally.lock().error(&e),
                    }
                    // ...and read back an earlier one through the other.
                    if !stored.is_empty() {
                        let reader = backends[((i + 1) % 2) as usize];
                        let pick = if i % 3 == 0 {
                            stored.len() - 1
                        } else {
                            rand::random::<u64>() as usize % stored.len()
                        };
                        let j = stored[pick];
                        let want = value(j);
                        let region = MemRegion::alloc(want.len());
                        let started = Instant::now();
                        let killed = *kill_at.lock();
                        let got = reader
                            .get_into(vec![(key(&ns, j), IoVecMut::whole(&region))])
                            .await;
                        let mut t = tally.lock();
                        match got.map(|mut o| o.remove(0)) {
                            Ok(GetOutcome::Hit) => {
                                if region.read(0, want.len()).unwrap() == want {
                                    t.hits += 1;
                                    t.ok(started, killed);
                                } else {
                                    t.wrong += 1;
                                }
                            }
                            Ok(GetOutcome::Miss) => {
                                t.misses += 1;
                                if stored_after_kill[pick] {
                                    t.lost_after_kill += 1;
                                }
                                t.ok(started, killed);
                            }
                            Ok(GetOutcome::Failed(e)) | Err(e) => t.error(&e),
                        }
                    }
                    i += 1;
                    // Paced, so the two cores also run the masters and etcd.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                i
            })
        };

        tokio::time::sleep(Duration::from_millis(1500)).await;
        let before = tally.lock().puts_ok;
        assert!(
            before > 0,
            "no put succeeded before the kill: {:?}",
            tally.lock()
        );
        masters.kill(first);
        let killed = Instant::now();
        *kill_at.lock() = Some(killed);

        // Resumed: a good run of successes against the new leader.
        let deadline = killed + Duration::from_secs(40);
        loop {
            let (oks, puts) = {
                let t = tally.lock();
                (t.oks_after_kill, t.puts_ok)
            };
            if oks >= 200 && puts > before + 50 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no recovery 40 s after the kill: {:?}; master logs: {}",
                tally.lock(),
                masters.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let ops = load.await.unwrap();
        let second = masters.leader().expect("a new leader");
        assert_ne!(second, first);

        let t = std::mem::take(&mut *tally.lock());
        let gap = t.first_ok_after_kill.expect("a success after the kill") - killed;
        let put_gap = t.first_put_after_kill.expect("a put after the kill") - killed;
        println!(
            "master HA failover: the first operation after SIGKILL of the leader succeeded \
             {:.2} s later, the first put {:.2} s later (new leader {}); {ops} rounds: {} puts \
             stored, {} hits, {} misses, {} wrong; errors while failing over: {:?}",
            gap.as_secs_f64(),
            put_gap.as_secs_f64(),
            masters.address(second),
            t.puts_ok,
            t.hits,
            t.misses,
            t.wrong,
            t.errors,
        );
        assert_eq!(t.wrong, 0, "wrong bytes read: {t:?}");
        assert_eq!(
            t.lost_after_kill, 0,
            "values stored on the new leader went missing: {t:?}"
        );
        assert!(
            t.permanent.is_empty(),
            "permanent errors: {:?}",
            t.permanent
        );
        assert!(t.hits > 0, "{t:?}");

        // The first value went to the old leader; the new one never heard of
        // it (no oplog replication): a miss, not an error.
        assert_eq!(owner.exists(&[key(&ns, 0)]).await.unwrap(), [false]);
        let region = MemRegion::alloc(value(0).len());
        let got = client
            .get_into(vec![(key(&ns, 0), IoVecMut::whole(&region))])
            .await
            .unwrap();
        assert!(matches!(got[0], GetOutcome::Miss), "{got:?}");
        assert!(client.info().description.contains("etcd://"));
        owner.close().await.unwrap();
        client.close().await.unwrap();
    });
}
