//! Behaviour against real servers beyond the shared suite: credentials, TLS, faults,
//! memory limits, foreign and corrupt values, key prefix and TTL, unix sockets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvpool_backend_redis::{RedisBackend, RedisConfig, HEADER_LEN};
use kvpool_conformance::fixtures::redis::{RedisCluster, RedisOptions, RedisServer};
use kvpool_core::{
    BlockHash, BlockKey, ErrorKind, GetOutcome, IoVec, IoVecMut, KvBackend, KvBackendExt,
    MemRegion, Namespace, PutOutcome,
};

fn config(url: String) -> RedisConfig {
    RedisConfig {
        url: Some(url),
        ..RedisConfig::default()
    }
}

fn keys(n: u64) -> Vec<BlockKey> {
    let ns = Arc::new(
        Namespace::single_rank(&format!("servers-{:016x}", rand_u64())).expect("a namespace"),
    );
    (0..n)
        .map(|i| {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&i.to_le_bytes());
            BlockKey::new(ns.clone(), BlockHash(h))
        })
        .collect()
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

fn value(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (j as u64).wrapping_mul(31).wrapping_add(i * 7) as u8)
        .collect()
}

async fn put(b: &RedisBackend, items: &[(&BlockKey, Vec<u8>)]) -> Vec<PutOutcome> {
    let batch = items
        .iter()
        .map(|(k, v)| ((*k).clone(), IoVec::whole(&MemRegion::from_vec(v.clone()))))
        .collect();
    b.put(batch).await.expect("put call")
}

/// Loads `key` into a buffer of `len` bytes filled with 0xAA.
async fn get(b: &RedisBackend, key: &BlockKey, len: usize) -> (GetOutcome, Vec<u8>) {
    let region = MemRegion::from_vec(vec![0xAA; len]);
    let mut out = b
        .get_into(vec![(key.clone(), IoVecMut::whole(&region))])
        .await
        .expect("get call");
    (out.remove(0), region.read(0, len).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_password_is_a_clear_config_error() {
    let server = RedisServer::start(RedisOptions {
        password: Some("right-password".into()),
        ..RedisOptions::default()
    });
    let err = RedisBackend::connect(RedisConfig {
        password: Some("wrong-password".into()),
        ..config(server.url())
    })
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{msg}");
    assert!(!err.is_temporary(), "{msg}");
    assert!(msg.contains("rejected the credentials"), "{msg}");
    assert!(msg.contains("redis.password"), "{msg}");
    assert!(
        !msg.contains("wrong-password") && !msg.contains("right-password"),
        "{msg}"
    );

    let err = RedisBackend::connect(config(server.url()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    assert!(err.to_string().contains("requires a password"), "{err}");

    // A password in the URL works, and never shows in the description or Debug.
    let url = format!("redis://:right-password@127.0.0.1:{}", server.port());
    let b = RedisBackend::connect(config(url)).await.unwrap();
    let shown = format!("{} {b:?}", b.info());
    assert!(!shown.contains("right-password"), "{shown}");
    assert!(shown.contains(":***@127.0.0.1"), "{shown}");
    let k = keys(1);
    assert!(matches!(
        put(&b, &[(&k[0], value(0, 100))]).await[0],
        PutOutcome::Stored
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_server_is_unavailable_connection_refused() {
    // Started and stopped, so nothing listens on its port.
    let port = {
        let mut s = RedisServer::plain();
        s.kill();
        s.port()
    };
    let started = Instant::now();
    let err = RedisBackend::connect(config(format!("redis://127.0.0.1:{port}")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.is_temporary(), "{err}");
    assert!(err.to_string().contains("connection refused"), "{err}");
    assert!(err.to_string().contains("is redis-server running"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_the_ca_is_a_clear_error() {
    let server = RedisServer::start(RedisOptions {
        tls: true,
        ..RedisOptions::default()
    });
    let err = RedisBackend::connect(config(server.url()))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{msg}");
    assert!(!err.is_temporary(), "{msg}");
    assert!(
        msg.contains("TLS") && msg.contains("redis.tls_ca_file"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_gives_errors_not_hangs_and_a_new_one_is_used_without_reopening() {
    let mut server = RedisServer::plain();
    let b = Arc::new(
        RedisBackend::connect(RedisConfig {
            request_timeout_ms: 1_500,
            retries: 2,
            retry_backoff_ms: 20,
            ..config(server.url())
        })
        .await
        .unwrap(),
    );
    let k = Arc::new(keys(64));
    // Load running while the server dies: every call ends, as a result or an error.
    let load = {
        let (b, k) = (b.clone(), k.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed, mut slowest) = (0u32, 0u32, Duration::ZERO);
            let run = Instant::now();
            let mut round = 0u64;
            while run.elapsed() < Duration::from_millis(1_500) {
                let i = round % 64;
                round += 1;
                let started = Instant::now();
                let r = b
                    .put(vec![(
                        k[i as usize].clone(),
                        IoVec::whole(&MemRegion::from_vec(value(i, 64 << 10))),
                    )])
                    .await;
                slowest = slowest.max(started.elapsed());
                match r {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        assert!(
                            matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
                            "{e}"
                        );
                        failed += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (ok, failed, slowest)
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.kill();
    let started = Instant::now();
    let err = b.exists(&k[..4]).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(2_500),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.is_temporary(), "{err}");
    let (ok, failed, slowest) = load.await.expect("no panic under faults");
    assert!(ok > 0 && failed > 0, "ok {ok}, failed {failed}");
    assert!(
        slowest < Duration::from_millis(2_500),
        "a call took {slowest:?}"
    );

    // A new server on the same port: the same backend recovers without being reopened.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match b.put_bytes(k[0].clone(), value(0, 1000).into()).await {
            Ok(o) => {
                assert!(o.is_present());
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "did not recover: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (o, bytes) = get(&b, &k[0], 1000).await;
    assert!(o.is_hit(), "{o:?}");
    assert_eq!(bytes, value(0, 1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_keys_are_misses_not_errors() {
    let server = RedisServer::start(RedisOptions {
        maxmemory: Some((8 << 20, "allkeys-lru".into())),
        ..RedisOptions::default()
    });
    let b = RedisBackend::connect(config(server.url())).await.unwrap();
    let k = keys(64);
    let len = 512 << 10;
    for (i, key) in k.iter().enumerate() {
        let out = put(&b, &[(key, value(i as u64, len))]).await;
        assert!(
            matches!(out[0], PutOutcome::Stored),
            "put {i}: {:?}",
            out[0]
        );
    }
    let (mut hits, mut misses) = (0, 0);
    for (i, key) in k.iter().enumerate() {
        match get(&b, key, len).await {
            (GetOutcome::Hit, bytes) => {
                assert_eq!(bytes, value(i as u64, len), "key {i}");
                hits += 1;
            }
            (GetOutcome::Miss, bytes) => {
                assert!(bytes.iter().all(|&x| x == 0xAA));
                misses += 1;
            }
            (GetOutcome::Failed(e), _) => panic!("key {i}: evicted keys must be misses: {e}"),
        }
    }
    assert!(misses > 32, "32 MiB into 8 MiB evicted only {misses}");
    assert!(hits > 0, "nothing survived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_noeviction_server_fails_keys_with_no_space() {
    let server = RedisServer::start(RedisOptions {
        maxmemory: Some((4 << 20, "noeviction".into())),
        ..RedisOptions::default()
    });
    let b = RedisBackend::connect(config(server.url())).await.unwrap();
    let k = keys(32);
    let items: Vec<_> = k
        .iter()
        .enumerate()
        .map(|(i, key)| (key, value(i as u64, 512 << 10)))
        .collect();
    let out = put(&b, &items).await;
    let failed: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            PutOutcome::Failed(e) => Some(e),
            _ => None,
        })
        .collect();
    assert!(!failed.is_empty(), "16 MiB fit in 4 MiB?");
    assert!(out.iter().any(PutOutcome::is_present), "nothing was stored");
    for e in failed {
        assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
        assert!(
            e.to_string().contains("maxmemory-policy allkeys-lru"),
            "{e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_corrupt_and_moved_values_are_corrupted_never_hits() {
    let server = RedisServer::plain();
    let b = RedisBackend::connect(RedisConfig {
        key_prefix: "t:".into(),
        ..config(server.url())
    })
    .await
    .unwrap();
    let k = keys(5);
    let name = |i: usize| format!("t:{}", k[i].to_key_string());
    let corrupted = |o: &GetOutcome| match o {
        GetOutcome::Failed(e) => e.kind() == ErrorKind::Corrupted,
        _ => false,
    };

    // Written by someone else.
    server.cli(&["SET", &name(0), "not a kvpool value"]);
    let (o, bytes) = get(&b, &k[0], 18).await;
    assert!(corrupted(&o), "{o:?}");
    assert!(bytes.iter().all(|&x| x == 0xAA), "a failed get wrote bytes");
    assert_eq!(b.exists(&k[..1]).await.unwrap(), [true]);
    assert_eq!(b.value_lens(&k[..1]).await.unwrap(), [Some(18)]);

    // Ours, with one byte changed on the server.
    assert!(put(&b, &[(&k[1], value(1, 4096))]).await[0].is_present());
    server.cli(&["SETRANGE", &name(1), &(HEADER_LEN + 100).to_string(), "X"]);
    let (o, bytes) = get(&b, &k[1], 4096).await;
    assert!(corrupted(&o), "{o:?}");
    assert!(o_message(&o).contains("checksum mismatch"), "{o:?}");
    assert!(bytes.iter().all(|&x| x == 0xAA));

    // Ours, truncated.
    assert!(put(&b, &[(&k[2], value(2, 4096))]).await[0].is_present());
    server.cli(&["SET", &name(2), "KVPR"]);
    assert!(corrupted(&get(&b, &k[2], 4096).await.0));

    // Ours, copied to another key: the checksum is bound to the key.
    assert!(put(&b, &[(&k[3], value(3, 4096))]).await[0].is_present());
    server.cli(&["COPY", &name(3), &name(4)]);
    let (o, _) = get(&b, &k[4], 4096).await;
    assert!(corrupted(&o), "{o:?}");
    assert!(get(&b, &k[3], 4096).await.0.is_hit());

    // Another redis type under the key.
    server.cli(&["DEL", &name(0)]);
    server.cli(&["LPUSH", &name(0), "x"]);
    assert!(corrupted(&get(&b, &k[0], 4096).await.0));
    assert_eq!(b.value_lens(&k[..1]).await.unwrap(), [Some(1)]);
}

fn o_message(o: &GetOutcome) -> String {
    match o {
        GetOutcome::Failed(e) => e.to_string(),
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_live_under_the_prefix_and_expire_after_ttl() {
    let server = RedisServer::plain();
    let b = RedisBackend::connect(RedisConfig {
        key_prefix: "pool-a/".into(),
        ttl_ms: 60_000,
        ..config(server.url())
    })
    .await
    .unwrap();
    let k = keys(1);
    assert!(put(&b, &[(&k[0], value(0, 10))]).await[0].is_present());
    let name = format!("pool-a/{}", k[0].to_key_string());
    let pttl: i64 = server.cli(&["PTTL", &name]).trim().parse().unwrap();
    assert!(pttl > 50_000 && pttl <= 60_000, "PTTL {pttl}");
    assert_eq!(
        server.cli(&["STRLEN", &name]).trim(),
        (HEADER_LEN + 10).to_string()
    );
    // Another prefix is another pool.
    let other = RedisBackend::connect(config(server.url())).await.unwrap();
    assert_eq!(other.exists(&k).await.unwrap(), [false]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_batches_go_out_in_bounded_pipelines() {
    let server = RedisServer::plain();
    let b = RedisBackend::connect(RedisConfig {
        max_inflight_bytes: kvpool_core::size::ByteSize(2 << 20),
        pipeline_bytes: kvpool_core::size::ByteSize(1 << 20),
        pipeline_keys: 3,
        pool_size: 2,
        ..config(server.url())
    })
    .await
    .unwrap();
    let k = keys(40);
    // 40 values of 700 KiB (28 MiB) with at most 2 MiB in flight; one of 3 MiB, more
    // than the whole budget, goes alone.
    let mut items: Vec<_> = k
        .iter()
        .enumerate()
        .map(|(i, key)| (key, value(i as u64, 700 << 10)))
        .collect();
    items[17].1 = value(17, 3 << 20);
    assert!(put(&b, &items).await.iter().all(PutOutcome::is_present));
    let regions: Vec<_> = items
        .iter()
        .map(|(_, v)| MemRegion::from_vec(vec![0; v.len()]))
        .collect();
    let out = b
        .get_into(
            items
                .iter()
                .zip(&regions)
                .map(|((key, _), r)| ((*key).clone(), IoVecMut::whole(r)))
                .collect(),
        )
        .await
        .unwrap();
    for (i, ((o, r), (_, v))) in out.iter().zip(&regions).zip(&items).enumerate() {
        assert!(o.is_hit(), "key {i}: {o:?}");
        assert!(r.read(0, v.len()).unwrap() == *v, "key {i}: wrong bytes");
    }
    b.remove(&k).await.unwrap();
    assert!(b.exists(&k).await.unwrap().iter().all(|p| !p));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_round_trip() {
    let server = RedisServer::start(RedisOptions {
        unix_socket: true,
        ..RedisOptions::default()
    });
    let url = format!("unix://{}", server.unix_socket().display());
    let b = RedisBackend::connect(config(url)).await.unwrap();
    let k = keys(1);
    assert!(put(&b, &[(&k[0], value(0, 5000))]).await[0].is_present());
    let (o, bytes) = get(&b, &k[0], 5000).await;
    assert!(o.is_hit(), "{o:?}");
    assert_eq!(bytes, value(0, 5000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_lost_a_master_is_unavailable_not_a_hang() {
    let mut cluster = RedisCluster::start(3);
    let b = RedisBackend::connect(RedisConfig {
        cluster_nodes: cluster.urls(),
        request_timeout_ms: 3_000,
        retries: 1,
        ..RedisConfig::default()
    })
    .await
    .unwrap();
    let k = keys(32);
    assert!(b.exists(&k).await.unwrap().iter().all(|p| !p));
    cluster.nodes()[0].kill();
    // The survivors mark the cluster failed after cluster-node-timeout (1 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cluster.nodes()[1]
        .cli(&["cluster", "info"])
        .contains("cluster_state:fail")
    {
        assert!(Instant::now() < deadline, "the cluster never noticed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = Instant::now();
    let err = b.exists(&k).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(err.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("CLUSTERDOWN")
            || msg.contains("connection refused")
            || msg.contains("lost the connection"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_and_database_number_from_the_url_are_used() {
    let server = RedisServer::start(RedisOptions {
        password: Some("admin-password".into()),
        ..RedisOptions::default()
    });
    server.cli(&["ACL", "SETUSER", "alice", "on", ">alice-pw", "~*", "+@all"]);
    let url = format!("redis://127.0.0.1:{}/3", server.port());
    let b = RedisBackend::connect(RedisConfig {
        username: Some("alice".into()),
        password: Some("alice-pw".into()),
        ..config(url.clone())
    })
    .await
    .unwrap();
    let k = keys(2);
    assert!(put(&b, &[(&k[0], value(0, 100)), (&k[1], value(1, 100))])
        .await
        .iter()
        .all(PutOutcome::is_present));
    // The keys went to database 3 (SELECT after AUTH), none to database 0.
    assert_eq!(server.cli(&["-n", "3", "DBSIZE"]).trim(), "2");
    assert_eq!(server.cli(&["-n", "0", "DBSIZE"]).trim(), "0");
    let (o, bytes) = get(&b, &k[1], 100).await;
    assert!(o.is_hit(), "{o:?}");
    assert_eq!(bytes, value(1, 100));

    let err = RedisBackend::connect(RedisConfig {
        username: Some("alice".into()),
        password: Some("not-alice-pw".into()),
        ..config(url)
    })
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    assert!(
        err.to_string().contains("rejected the credentials"),
        "{err}"
    );
}

/// A server on a loopback port that answers `PING` and then `reply` to every later
/// command of a connection, for as long as the test runs.
fn fake_server(reply: &'static [u8]) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 64 << 10];
                let mut first = true;
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {
                    let answer = if first { &b"+PONG\r\n"[..] } else { reply };
                    first = false;
                    if stream.write_all(answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_reply_is_a_clear_error_not_a_panic_or_a_hang() {
    let k = keys(1);
    // A RESP3 map, an array, a bulk string with a broken length, an integer that is not.
    for reply in [
        &b"%1\r\n+a\r\n+b\r\n"[..],
        b"*1\r\n$1\r\nx\r\n",
        b"$-7\r\n",
        b":12x4\r\n",
        b"$3\r\nabcdef\r\n",
    ] {
        let port = fake_server(reply);
        let b = RedisBackend::connect(RedisConfig {
            pool_size: 1,
            request_timeout_ms: 3_000,
            ..config(format!("redis://127.0.0.1:{port}"))
        })
        .await
        .unwrap();
        let started = Instant::now();
        let region = MemRegion::from_vec(vec![0xAA; 10]);
        let err = b
            .get_into(vec![(k[0].clone(), IoVecMut::whole(&region))])
            .await
            .unwrap_err();
        let shown = String::from_utf8_lossy(reply);
        assert_eq!(err.kind(), ErrorKind::Unexpected, "{shown:?}: {err}");
        assert!(!err.is_temporary(), "{shown:?}: {err}");
        assert!(
            err.to_string().contains("malformed reply"),
            "{shown:?}: {err}"
        );
        assert!(started.elapsed() < Duration::from_secs(2), "{shown:?}");
        assert_eq!(region.read(0, 10).unwrap(), vec![0xAA; 10], "{shown:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_larger_than_the_connection_buffers_round_trip_repeatedly() {
    let server = RedisServer::plain();
    let b = RedisBackend::connect(RedisConfig {
        pool_size: 1,
        ..config(server.url())
    })
    .await
    .unwrap();
    let k = keys(4);
    // 6 MiB values grow a connection's buffers past what it keeps; small ones after
    // them use the same, shrunk connection.
    let sizes = [6 << 20, 1, 4096, (6 << 20) + 3];
    for round in 0..2 {
        let items: Vec<_> = k
            .iter()
            .zip(sizes)
            .enumerate()
            .map(|(i, (key, len))| (key, value(i as u64 + round, len)))
            .collect();
        if round == 0 {
            assert!(put(&b, &items).await.iter().all(PutOutcome::is_present));
        }
        for (i, (key, v)) in items.iter().enumerate() {
            let (o, bytes) = get(&b, key, v.len()).await;
            assert!(o.is_hit(), "round {round}, key {i}: {o:?}");
            // Round 1 asks for other bytes than were stored: only round 0 matches.
            assert_eq!(bytes == *v, round == 0, "round {round}, key {i}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_callers_than_connections_share_them() {
    let server = RedisServer::plain();
    let b = Arc::new(
        RedisBackend::connect(RedisConfig {
            pool_size: 2,
            ..config(server.url())
        })
        .await
        .unwrap(),
    );
    let k = keys(64);
    let tasks: Vec<_> = k
        .chunks(4)
        .enumerate()
        .map(|(t, chunk)| {
            let (b, chunk) = (b.clone(), chunk.to_vec());
            tokio::spawn(async move {
                for round in 0..5u64 {
                    let i = t as u64 * 100 + round;
                    let items: Vec<_> = chunk.iter().map(|key| (key, value(i, 3000))).collect();
                    if round == 0 {
                        assert!(put(&b, &items).await.iter().all(PutOutcome::is_present));
                    }
                    for key in &chunk {
                        let (o, bytes) = get(&b, key, 3000).await;
                        assert!(o.is_hit(), "task {t}: {o:?}");
                        assert_eq!(bytes, value(t as u64 * 100, 3000), "task {t}");
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// `clear(All)` unlinks every key under `key_prefix` (glob characters in it taken literally)
/// and nothing else; `clear(Local)` leaves a shared server alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_all_unlinks_exactly_the_keys_under_the_prefix() {
    let server = RedisServer::plain();
    let b = RedisBackend::connect(RedisConfig {
        key_prefix: "pool[1]*:".into(),
        ..config(server.url())
    })
    .await
    .unwrap();
    let k = keys(3);
    for (i, key) in k.iter().enumerate() {
        assert!(matches!(
            put(&b, &[(key, value(i as u64, 64))]).await[0],
            PutOutcome::Stored
        ));
    }
    // A key the glob would match were the prefix not escaped, and an unrelated one.
    assert_eq!(server.raw("SET pool1x:other 1").trim(), "+OK");
    assert_eq!(server.raw("SET unrelated 1").trim(), "+OK");

    assert!(!b.clear(kvpool_core::ClearScope::Local).await.unwrap());
    assert_eq!(b.exists(&k).await.unwrap(), [true; 3]);
    assert!(b.clear(kvpool_core::ClearScope::All).await.unwrap());
    assert_eq!(b.exists(&k).await.unwrap(), [false; 3]);
    assert_eq!(server.raw("EXISTS pool1x:other unrelated").trim(), ":2");

    let unprefixed = RedisBackend::connect(RedisConfig {
        key_prefix: String::new(),
        ..config(server.url())
    })
    .await
    .unwrap();
    let e = unprefixed
        .clear(kvpool_core::ClearScope::All)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("key_prefix"), "{e}");
}
