//! The master client against a real `mooncake_master` (and against fake
//! servers for the failures a real one will not produce on demand).

use std::time::{Duration, Instant};

use kvpool_conformance::fixtures::mooncake::MooncakeMaster;
use kvpool_core::ErrorKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::codec;
use crate::master::{Master, STORE_VERSION};
use crate::rpc::{RpcPool, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN};
use crate::types::*;

fn master(addr: String) -> Master {
    let pool = RpcPool::new(addr, 4, Duration::from_secs(2), Duration::from_secs(5));
    Master::new(pool, "default".into())
}

fn segment(base: u64, size: u64) -> Segment {
    Segment {
        id: Uuid::random(),
        name: format!("127.0.0.1:{}", base >> 32),
        base,
        size,
        // The master never contacts the endpoint; readers would.
        te_endpoint: format!("127.0.0.1:{}", base >> 32),
        protocol: "tcp".into(),
        host_id: String::new(),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn memory(replicas: &[ReplicaDescriptor]) -> &BufferDescriptor {
    match &replicas[0].location {
        ReplicaLocation::Memory(d) => d,
        other => panic!("not a memory replica: {other:?}"),
    }
}

#[test]
fn every_rpc_against_a_real_master() {
    let fixture = MooncakeMaster::start();
    rt().block_on(async {
        let m = master(fixture.address());
        m.service_ready().await.unwrap();
        let storage = m.storage_config().await.unwrap();
        assert_eq!(storage.quota_bytes, 0);

        let me = Uuid::random();
        let seg = segment(0x7e00_0000_0000, 16 << 20);
        m.mount(&seg, me).await.unwrap();
        // Not yet in the master's ok set: the first ping asks for a remount.
        assert_eq!(m.ping(me).await.unwrap().client_status, CLIENT_NEED_REMOUNT);
        m.remount(std::slice::from_ref(&seg), me).await.unwrap();
        assert_eq!(m.ping(me).await.unwrap().client_status, 1);

        let cfg = ReplicateConfig::default();
        let reps = m.put_start(me, "k1", 1000, &cfg).await.unwrap().unwrap();
        let d = memory(&reps);
        assert_eq!(d.size, 1000);
        assert!(d.buffer_address >= seg.base && d.buffer_address + 1000 <= seg.base + seg.size);
        assert_eq!(d.transport_endpoint, seg.te_endpoint);
        assert_eq!(reps[0].status, 2, "PROCESSING until PutEnd");
        assert_eq!(m.exist("k1").await.unwrap(), Ok(false));
        assert_eq!(
            m.replica_list("k1").await.unwrap(),
            Err(ErrorCode::REPLICA_IS_NOT_READY)
        );
        assert_eq!(
            m.put_start(me, "k1", 1000, &cfg).await.unwrap(),
            Err(ErrorCode::OBJECT_ALREADY_EXISTS)
        );
        m.put_end(me, "k1").await.unwrap().unwrap();
        assert_eq!(m.exist("k1").await.unwrap(), Ok(true));
        let list = m.replica_list("k1").await.unwrap().unwrap();
        assert_eq!(list.replicas[0].status, REPLICA_COMPLETE);
        assert_eq!(list.lease_ttl_ms, 10_000);

        // Revoke: the key disappears.
        m.put_start(me, "k2", 10, &cfg).await.unwrap().unwrap();
        m.put_revoke(me, "k2").await.unwrap().unwrap();
        assert_eq!(m.exist("k2").await.unwrap(), Ok(false));

        // Batches, with a 300-byte key to force 2-byte lengths both ways.
        let long = "L".repeat(300);
        let items = vec![
            ("b1".to_string(), 100),
            (long.clone(), 200),
            ("b3".to_string(), 300),
        ];
        let started = m
            .batch_put_start(None, me, &items, &cfg, Duration::ZERO)
            .await
            .unwrap();
        assert!(started.iter().all(Result::is_ok), "{started:?}");
        let metas = items[..2]
            .iter()
            .map(|(k, _)| ObjectMeta {
                key: k.clone(),
                object_checksum: None,
            })
            .collect();
        assert_eq!(
            m.batch_put_end(None, me, metas).await.unwrap(),
            vec![Ok(()), Ok(())]
        );
        assert_eq!(
            m.batch_put_revoke(None, me, vec!["b3".into()])
                .await
                .unwrap(),
            vec![Ok(())]
        );
        let keys = vec!["b1".into(), long.clone(), "b3".into(), "k1".into()];
        assert_eq!(
            m.batch_exist(keys.clone()).await.unwrap(),
            vec![Ok(true), Ok(true), Ok(false), Ok(true)]
        );
        let lists = m.batch_replica_list("get_into", keys).await.unwrap();
        assert_eq!(memory(&lists[1].as_ref().unwrap().replicas).size, 200);
        assert_eq!(lists[2], Err(ErrorCode::OBJECT_NOT_FOUND));

        // Leased keys refuse a plain remove; force removes them.
        assert_eq!(
            m.remove_one("k1", false).await.unwrap(),
            Err(ErrorCode::OBJECT_HAS_LEASE)
        );
        m.remove_one("k1", true).await.unwrap().unwrap();
        assert_eq!(
            m.batch_remove(vec!["b1".into(), "nope".into()], true)
                .await
                .unwrap(),
            vec![Ok(()), Err(ErrorCode::OBJECT_NOT_FOUND)]
        );

        // Unmount drops what lived in the segment.
        assert_eq!(m.exist(&long).await.unwrap(), Ok(true));
        m.unmount(seg.id, me).await.unwrap();
        assert_eq!(m.exist(&long).await.unwrap(), Ok(false));
        assert_eq!(
            m.put_start(me, "k3", 10, &cfg).await.unwrap(),
            Err(ErrorCode::NO_AVAILABLE_HANDLE)
        );
    });
}

/// A full segment answers NO_AVAILABLE_HANDLE until the master's eviction
/// thread frees room; the client retries with backoff and gets through.
#[test]
fn put_start_retries_while_the_master_evicts() {
    let fixture = MooncakeMaster::start();
    rt().block_on(async {
        let m = master(fixture.address());
        let me = Uuid::random();
        let seg = segment(0x7d00_0000_0000, 1 << 20);
        m.mount(&seg, me).await.unwrap();
        let cfg = ReplicateConfig::default();
        let mut saw_full = false;
        for i in 0..40 {
            let key = format!("ev{i}");
            let item = [(key.clone(), 100 << 10)];
            // Without retry, a full segment is visible...
            let once = m
                .batch_put_start(None, me, &item, &cfg, Duration::ZERO)
                .await
                .unwrap();
            let r = match once.into_iter().next().unwrap() {
                Err(ErrorCode::NO_AVAILABLE_HANDLE) => {
                    saw_full = true;
                    // ...and with retry it gets through once eviction ran.
                    let again = m
                        .batch_put_start(None, me, &item, &cfg, Duration::from_secs(5))
                        .await
                        .unwrap();
                    again.into_iter().next().unwrap()
                }
                other => other,
            };
            r.unwrap_or_else(|e| panic!("put {i}: {e}"));
            let meta = vec![ObjectMeta {
                key,
                object_checksum: None,
            }];
            assert_eq!(m.batch_put_end(None, me, meta).await.unwrap(), vec![Ok(())]);
        }
        assert!(saw_full, "40 x 100 KiB into 1 MiB never hit a full segment");
        let present = m
            .batch_exist((0..40).map(|i| format!("ev{i}")).collect())
            .await
            .unwrap();
        assert_eq!(present[0], Ok(false), "the oldest was evicted");
        assert_eq!(present[39], Ok(true), "the newest is there");
    });
}

/// A fake master answering every request with `answer(request body)`, or
/// never, when `answer` gives `None`.
async fn fake_master(
    answer: fn(u32) -> Option<(u8, Vec<u8>)>,
) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                loop {
                    let mut h = [0u8; REQUEST_HEADER_LEN];
                    if s.read_exact(&mut h).await.is_err() {
                        return;
                    }
                    let len = u32::from_le_bytes(h[12..16].try_into().unwrap());
                    let mut body = vec![0u8; len as usize];
                    s.read_exact(&mut body).await.unwrap();
                    let fid = u32::from_le_bytes(h[8..12].try_into().unwrap());
                    let Some((err, reply)) = answer(fid) else {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    };
                    let mut r = vec![0x15, 0, err, 0];
                    r.extend_from_slice(&h[4..8]);
                    r.extend_from_slice(&(reply.len() as u32).to_le_bytes());
                    r.extend_from_slice(&0u32.to_le_bytes());
                    assert_eq!(r.len(), RESPONSE_HEADER_LEN);
                    r.extend_from_slice(&reply);
                    s.write_all(&r).await.unwrap();
                }
            });
        }
    });
    (addr, task)
}

#[test]
fn another_store_version_is_a_clear_error() {
    rt().block_on(async {
        let (addr, _task) = fake_master(|_| {
            let mut body = Vec::new();
            let v: Expected<String> = Ok("1.9.9".into());
            codec::pack(&ServiceReady::meta().ret, &v, &mut body);
            Some((0, body))
        })
        .await;
        let e = master(addr).service_ready().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let msg = e.to_string();
        assert!(
            msg.contains("\"1.9.9\"") && msg.contains(STORE_VERSION),
            "{msg}"
        );
    });
}

#[test]
fn argument_type_rejection_names_the_version_mismatch() {
    rt().block_on(async {
        let (addr, _task) = fake_master(|_| {
            let mut body = Vec::new();
            codec::pack(
                &codec::TypeCode::of::<String>(),
                &"invalid rpc arg".to_string(),
                &mut body,
            );
            Some((4, body))
        })
        .await;
        let e = master(addr).exist("k").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("0.3.13"), "{e}");
    });
}

#[test]
fn a_silent_master_times_out_and_a_missing_one_is_unavailable() {
    rt().block_on(async {
        let (addr, _task) = fake_master(|_| None).await;
        let pool = RpcPool::new(addr, 2, Duration::from_secs(1), Duration::from_millis(300));
        let m = Master::new(pool, "default".into());
        let t = Instant::now();
        let e = m.exist("k").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let e = master(addr).service_ready().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.is_temporary());
    });
}

/// A segment owner whose data port accepts and then never answers: each
/// transfer ends at ASCEND_TRANSFER_TIMEOUT with a Timeout, and a put whose
/// transfer failed is revoked (the key can be put again, not "exists").
#[test]
fn a_stalled_owner_times_out_transfers_and_puts_are_revoked() {
    use crate::backend::MooncakeBackend;
    use kvpool_core::{BlockHash, BlockKey, GetOutcome, IoVec, IoVecMut, KvBackend, MemRegion};
    use kvpool_core::{Namespace, PutOutcome};
    use std::sync::Arc;

    let fixture = MooncakeMaster::start();
    rt().block_on(async {
        // The fake owner: a handshake daemon pointing at a silent data port.
        let data = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let data_port = data.local_addr().unwrap().port();
        let hs = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = hs.local_addr().unwrap().to_string();
        let base = 0x7c00_0000_0000u64;
        let desc = serde_json::json!({
            "buffers": [{"addr": base, "length": 16 << 20, "name": endpoint}],
            "name": endpoint, "protocol": "tcp", "rdma_server_name": "",
            "tcp_data_host": "127.0.0.1", "tcp_data_port": data_port, "tcp_proto_version": 2,
        })
        .to_string();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    Ok((s, _)) = data.accept() => held.push(s),
                    Ok((mut s, _)) = hs.accept() => {
                        let n = s.read_u64_le().await.unwrap();
                        let mut b = vec![0u8; n as usize];
                        s.read_exact(&mut b).await.unwrap();
                        let mut out = ((desc.len() + 1) as u64).to_le_bytes().to_vec();
                        out.push(1);
                        out.extend_from_slice(desc.as_bytes());
                        s.write_all(&out).await.unwrap();
                        s.shutdown().await.unwrap();
                    }
                }
            }
        });
        let m = master(fixture.address());
        let me = Uuid::random();
        let seg = Segment {
            te_endpoint: endpoint.clone(),
            name: endpoint.clone(),
            ..segment(base, 16 << 20)
        };
        m.mount(&seg, me).await.unwrap();

        let env = |k: &str| match k {
            "ASCEND_TRANSFER_TIMEOUT" => Some("500".to_string()),
            "ASCEND_CONNECT_TIMEOUT" => Some("500".to_string()),
            _ => None,
        };
        let cfg = crate::MooncakeConfig {
            master_server_address: fixture.address(),
            local_hostname: "127.0.0.1".into(),
            ..Default::default()
        };
        let kv = MooncakeBackend::open_with_env(cfg, &env).await.unwrap();
        let ns = Arc::new(Namespace::single_rank("stalled").unwrap());
        let key = BlockKey::new(ns.clone(), BlockHash([1; 32]));
        let region = MemRegion::from_vec(vec![5u8; 1000]);
        for attempt in 0..2 {
            let t = Instant::now();
            let out = kv
                .put(vec![(key.clone(), IoVec::whole(&region))])
                .await
                .unwrap();
            match &out[0] {
                PutOutcome::Failed(e) => assert_eq!(e.kind(), ErrorKind::Timeout, "{e}"),
                other => panic!("attempt {attempt}: {other:?}"),
            }
            assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
            assert_eq!(
                kv.exists(std::slice::from_ref(&key)).await.unwrap(),
                [false]
            );
        }

        // A complete key in the stalled segment: the read times out too.
        let other = BlockKey::new(ns, BlockHash([2; 32]));
        let name = other.to_key_string();
        m.put_start(me, &name, 1000, &ReplicateConfig::default())
            .await
            .unwrap()
            .unwrap();
        m.put_end(me, &name).await.unwrap().unwrap();
        let t = Instant::now();
        let dst = MemRegion::alloc(1000);
        let out = kv
            .get_into(vec![(other, IoVecMut::whole(&dst))])
            .await
            .unwrap();
        match &out[0] {
            GetOutcome::Failed(e) => assert_eq!(e.kind(), ErrorKind::Timeout, "{e}"),
            o => panic!("{o:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        kv.close().await.unwrap();
    });
}

#[test]
#[ignore = "exploration: batch exists latency by chunking"]
fn explore_exists_chunking() {
    let fixture = MooncakeMaster::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let m = std::sync::Arc::new(master(fixture.address()));
        let keys: Vec<String> = (0..32)
            .map(|i| {
                format!(
                    "kvpool-model@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@{:064x}",
                    i
                )
            })
            .collect();
        for chunk in [32usize, 16, 8, 4, 2, 1] {
            for _ in 0..50 {
                m.batch_exist(keys.clone()).await.unwrap();
            }
            let n = 400;
            let t = Instant::now();
            for _ in 0..n {
                let mut set = tokio::task::JoinSet::new();
                for c in keys.chunks(chunk) {
                    let m = m.clone();
                    let c = c.to_vec();
                    set.spawn(async move { m.batch_exist(c).await.unwrap() });
                }
                while set.join_next().await.is_some() {}
            }
            println!(
                "chunk {chunk}: {:.1} us/call",
                t.elapsed().as_secs_f64() / n as f64 * 1e6
            );
        }
    });
}

/// The official client's checksums (`MOONCAKE_STORE_CHECKSUM=1`) are the
/// CRC-64 kvpool computes: kvpool verifies them on read, detects a corrupted
/// replica, and its own checksummed puts read back through the official client.
#[test]
fn checksums_match_the_official_client_and_catch_corruption() {
    use crate::backend::MooncakeBackend;
    use kvpool_core::{BlockHash, BlockKey, GetOutcome, IoVec, IoVecMut, KvBackend, MemRegion};
    use kvpool_core::{Namespace, PutOutcome};
    use std::io::{BufRead, Write};
    use std::sync::Arc;

    let fixture = MooncakeMaster::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = crate::MooncakeConfig {
            master_server_address: fixture.address(),
            local_hostname: "127.0.0.1".into(),
            global_segment_size: kvpool_core::size::ByteSize(32 << 20),
            checksum: true,
            ..Default::default()
        };
        let kv = MooncakeBackend::open(cfg).await.unwrap();
        let python = std::env::var("KVPOOL_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/official_client.py"
        );
        let mut child = std::process::Command::new(python)
            .args([script, &fixture.address(), "0"])
            .env("MOONCAKE_STORE_CHECKSUM", "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut cmd = |line: &str| {
            if !line.is_empty() {
                writeln!(stdin, "{line}").unwrap();
            }
            let mut out = String::new();
            stdout.read_line(&mut out).unwrap();
            out.trim().to_string()
        };
        assert_eq!(cmd(""), "ready 0");

        let ns = Arc::new(Namespace::single_rank("checksum").unwrap());
        let key = BlockKey::new(ns.clone(), BlockHash([7; 32]));
        let value: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(cmd(&format!("put {} {hex}", key.to_key_string())), "ok 0");

        let m = master(fixture.address());
        let list = m.replica_list(&key.to_key_string()).await.unwrap().unwrap();
        assert_eq!(
            list.object_checksum,
            Some(crate::checksum::crc64([&value[..]])),
            "the official client's checksum is our CRC-64"
        );
        let dst = MemRegion::alloc(value.len());
        let out = kv
            .get_into(vec![(key.clone(), IoVecMut::whole(&dst))])
            .await
            .unwrap();
        assert!(out[0].is_hit(), "{:?}", out[0]);
        assert_eq!(dst.read(0, value.len()).unwrap(), value);

        // Flip a byte of the replica in our segment: the read is refused.
        let d = match &list.replicas[0].location {
            ReplicaLocation::Memory(d) => d.clone(),
            other => panic!("{other:?}"),
        };
        let seg = kv.inner_segment().unwrap();
        let p = seg.locate(d.buffer_address + 10, 1).unwrap();
        // SAFETY: inside our segment; nobody else touches this key now.
        unsafe { *p ^= 0xff };
        let out = kv
            .get_into(vec![(key, IoVecMut::whole(&dst))])
            .await
            .unwrap();
        match &out[0] {
            GetOutcome::Failed(e) => assert_eq!(e.kind(), ErrorKind::Corrupted, "{e}"),
            other => panic!("{other:?}"),
        }

        // kvpool's checksummed put reads back through the official client,
        // which verifies checksums too.
        let key2 = BlockKey::new(ns, BlockHash([8; 32]));
        let r = MemRegion::from_vec(value.clone());
        let put = kv
            .put(vec![(key2.clone(), IoVec::whole(&r))])
            .await
            .unwrap();
        assert!(matches!(put[0], PutOutcome::Stored));
        let list = m
            .replica_list(&key2.to_key_string())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            list.object_checksum,
            Some(crate::checksum::crc64([&value[..]]))
        );
        assert_eq!(
            cmd(&format!("get {}", key2.to_key_string())),
            format!("ok {hex}")
        );
        assert_eq!(cmd("close"), "ok 0");
        let _ = child.wait();
        kv.close().await.unwrap();
    });
}

/// Only the client that started a put may end or revoke it, which is what
/// makes revoking after an RPC with an unknown outcome safe.
#[test]
fn only_the_putting_client_may_end_or_revoke() {
    let fixture = MooncakeMaster::start();
    rt().block_on(async {
        let m = master(fixture.address());
        let a = Uuid::random();
        let b = Uuid::random();
        let seg = segment(0x7e00_0000_0000, 16 << 20);
        m.mount(&seg, a).await.unwrap();
        let cfg = ReplicateConfig::default();
        m.put_start(a, "x", 100, &cfg).await.unwrap().unwrap();
        assert_eq!(m.put_revoke(b, "x").await.unwrap(), Err(ErrorCode(-601)));
        assert_eq!(m.put_end(b, "x").await.unwrap(), Err(ErrorCode(-601)));
        m.put_end(a, "x").await.unwrap().unwrap();
        assert_eq!(m.exist("x").await.unwrap(), Ok(true));
        // Revoking a put that did end leaves the value alone.
        assert!(m.put_revoke(a, "x").await.unwrap().is_err());
        assert_eq!(m.exist("x").await.unwrap(), Ok(true));
    });
}

/// After a failover a put's later steps must not reach the new leader, which
/// never saw its start (and could end another put of the same key instead).
#[test]
fn put_steps_pinned_to_the_old_leader_are_not_sent_to_the_new_one() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEW_LEADER_CALLS: AtomicUsize = AtomicUsize::new(0);
    fn ready(_: u32) -> Option<(u8, Vec<u8>)> {
        let mut body = Vec::new();
        let v: Expected<String> = Ok(STORE_VERSION.into());
        codec::pack(&ServiceReady::meta().ret, &v, &mut body);
        Some((0, body))
    }
    rt().block_on(async {
        let (old, _old_task) = fake_master(ready).await;
        let (new, _new_task) = fake_master(|fid| {
            NEW_LEADER_CALLS.fetch_add(1, Ordering::SeqCst);
            ready(fid)
        })
        .await;
        let m = master(old);
        m.service_ready().await.unwrap();
        let pin = Some(m.epoch());
        assert!(m.repoint(&new));
        assert_ne!(Some(m.epoch()), pin);
        let me = Uuid::random();
        let meta = vec![ObjectMeta {
            key: "k".into(),
            object_checksum: None,
        }];
        let e = m.batch_put_end(pin, me, meta).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.is_temporary());
        assert!(e.to_string().contains("leader changed"), "{e}");
        let e = m
            .batch_put_start(
                pin,
                me,
                &[("k".into(), 1)],
                &ReplicateConfig::default(),
                Duration::ZERO,
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("leader changed"), "{e}");
        assert_eq!(NEW_LEADER_CALLS.load(Ordering::SeqCst), 0);
        // Unpinned calls, and the next put, go to the new leader.
        m.service_ready().await.unwrap();
        assert_eq!(NEW_LEADER_CALLS.load(Ordering::SeqCst), 1);
        assert_eq!(m.addr(), new);
    });
}
