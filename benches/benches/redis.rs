//! The redis backend against `redis-benchmark` on the same server in the same run.
//!
//! Starts a `redis-server` (fixture of `kvpool-conformance`), then for each shape
//! (value size, clients `-c`, pipeline depth `-P`) measures SET and GET throughput of
//! `redis-benchmark -t set,get -d SIZE -n N -c C -P P -r KEYS` and of kvpool's redis
//! backend doing the same: C concurrent callers, each issuing `put`/`get_into` batches of
//! P keys over a pool of C connections, N requests in all. Rounds alternate the two
//! tools and the median of each is reported, with kvpool / redis-benchmark.
//!
//! ```sh
//! cargo bench -p kvpool-benches --bench redis            # full run
//! cargo bench -p kvpool-benches --bench redis -- --quick # a smoke run
//! ```
//!
//! `KVPOOL_REDIS_BENCH_ROUNDS=5` changes the number of rounds (3),
//! `KVPOOL_REDIS_BENCH_THREADS=2` the tokio workers of kvpool's side (1, as
//! redis-benchmark is one thread), `KVPOOL_REDIS_BENCH_SIZE=4096` runs one shape only; `KVPOOL_REDIS_BENCH_ONLY=kvpool`
//! (or `redis-benchmark`) runs one side only, for profiling.
//!
//! kvpool does more per request than redis-benchmark: it gathers the value from the
//! caller's memory into the command, computes and checks a checksum, and scatters a
//! verified value back into the caller's memory, where redis-benchmark sends one prebuilt
//! buffer and discards the replies. The ratio says what that costs.

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use kvpool::{BlockHash, BlockKey, GetOutcome, IoVec, IoVecMut, KvBackend, MemRegion, Namespace};
use kvpool_backend_redis::{RedisBackend, RedisConfig};
use kvpool_conformance::fixtures::redis::RedisServer;

#[derive(Debug, Clone, Copy)]
struct Shape {
    size: usize,
    clients: usize,
    pipeline: usize,
    requests: usize,
}

/// Requests per second, and CPU seconds per million requests of the client and the server.
#[derive(Debug, Default, Clone, Copy)]
struct Rate {
    rps: f64,
    client_cpu: f64,
    server_cpu: f64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Rates {
    set: Rate,
    get: Rate,
}

/// CPU seconds used so far by `pid`; with `children`, by its waited-for children instead.
fn cpu_seconds(pid: &str, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name, which may contain spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    // utime, stime are fields 14, 15 of the line (11, 12 here); cutime, cstime 16, 17.
    let at = if children { 13 } else { 11 };
    let ticks: f64 = fields.get(at..at + 2).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    ticks / 100.0
}

/// Measures `f`, which runs `requests` requests, with the client's CPU read by `client`.
fn measured(
    server: &RedisServer,
    requests: usize,
    client: impl Fn() -> f64,
    f: impl FnOnce(),
) -> Rate {
    let pid = server.pid().expect("the server runs").to_string();
    let (c0, s0) = (client(), cpu_seconds(&pid, false));
    let started = Instant::now();
    f();
    let secs = started.elapsed().as_secs_f64();
    let (c1, s1) = (client(), cpu_seconds(&pid, false));
    let per_million = 1e6 / requests as f64;
    Rate {
        rps: requests as f64 / secs,
        client_cpu: (c1 - c0) * per_million,
        server_cpu: (s1 - s0) * per_million,
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick" || a == "--test");
    let (rounds, scale) = if quick { (1, 10) } else { (3, 1) };
    let rounds = std::env::var("KVPOOL_REDIS_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(rounds);
    let shapes = [
        Shape {
            size: 512 << 10,
            clients: 4,
            pipeline: 4,
            requests: 4_000 / scale,
        },
        Shape {
            size: 4 << 10,
            clients: 8,
            pipeline: 16,
            requests: 400_000 / scale,
        },
    ];
    let server = RedisServer::plain();
    // One worker by default: redis-benchmark is one thread too, and the server needs the
    // other core of a 2-core machine. KVPOOL_REDIS_BENCH_THREADS=N uses N workers.
    let threads: usize = std::env::var("KVPOOL_REDIS_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    println!("redis backend vs redis-benchmark, same server, median of {rounds} rounds");
    let size_filter = std::env::var("KVPOOL_REDIS_BENCH_SIZE").ok();
    for shape in shapes {
        if size_filter
            .as_ref()
            .is_some_and(|f| *f != shape.size.to_string())
        {
            continue;
        }
        let mut theirs = Vec::new();
        let mut ours = Vec::new();
        let only = std::env::var("KVPOOL_REDIS_BENCH_ONLY").unwrap_or_default();
        for _ in 0..rounds {
            if only != "kvpool" {
                server.cli(&["FLUSHALL"]);
                theirs.push(redis_benchmark(&server, shape));
            }
            if only != "redis-benchmark" {
                server.cli(&["FLUSHALL"]);
                ours.push(kvpool_run(&rt, &server, shape));
            }
        }
        let none = Rate {
            rps: f64::NAN,
            client_cpu: f64::NAN,
            server_cpu: f64::NAN,
        };
        theirs.resize(
            theirs.len().max(1),
            Rates {
                set: none,
                get: none,
            },
        );
        ours.resize(
            ours.len().max(1),
            Rates {
                set: none,
                get: none,
            },
        );
        server.cli(&["FLUSHALL"]);
        let (t, o) = (median(&theirs), median(&ours));
        let label = format!(
            "{} KiB, -c {} -P {}, {} requests",
            shape.size >> 10,
            shape.clients,
            shape.pipeline,
            shape.requests
        );
        for (op, t, o) in [("SET", t.set, o.set), ("GET", t.get, o.get)] {
            println!(
                "{label}: {op} redis-benchmark {:>8.0} req/s ({:5.2} GB/s)  kvpool {:>8.0} req/s \
                 ({:5.2} GB/s)  ratio {:.2}",
                t.rps,
                t.rps * shape.size as f64 / 1e9,
                o.rps,
                o.rps * shape.size as f64 / 1e9,
                o.rps / t.rps
            );
            println!(
                "{:width$}  CPU s per 1M requests: client {:>6.1} vs {:>6.1}, server {:>6.1} vs {:>6.1}",
                "",
                t.client_cpu,
                o.client_cpu,
                t.server_cpu,
                o.server_cpu,
                width = label.len() + 4
            );
        }
    }
}

fn median(runs: &[Rates]) -> Rates {
    let pick = |f: fn(&Rates) -> Rate| {
        let mut v: Vec<Rate> = runs.iter().map(f).collect();
        v.sort_by(|a, b| a.rps.total_cmp(&b.rps));
        v[v.len() / 2]
    };
    Rates {
        set: pick(|r| r.set),
        get: pick(|r| r.get),
    }
}

/// `redis-benchmark`'s SET and GET rates, on the same server-side work as kvpool's: SETs
/// of keys that do not exist yet (kvpool's keys name new content), then GETs of keys that
/// exist, on a server holding as many keys as kvpool's GETs find.
fn redis_benchmark(server: &RedisServer, s: Shape) -> Rates {
    let children = || cpu_seconds("self", true);
    // Keys drawn from a space this large are new for practically every SET.
    let set = measured(server, s.requests, children, || {
        run_redis_benchmark(server, s, "set", s.requests, 1_000_000_000)
    });
    // Every key of a small space written (untimed) before the timed GETs read it.
    let keys = (s.requests / 8).max(1);
    run_redis_benchmark(server, s, "set", keys * 16, keys);
    let get = measured(server, s.requests, children, || {
        run_redis_benchmark(server, s, "get", s.requests, keys)
    });
    Rates { set, get }
}

fn run_redis_benchmark(server: &RedisServer, s: Shape, test: &str, n: usize, keys: usize) {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &server.port().to_string()])
        .args(["-t", test, "-q"])
        .args(["-d", &s.size.to_string()])
        .args(["-n", &n.to_string()])
        .args(["-c", &s.clients.to_string()])
        .args(["-P", &s.pipeline.to_string()])
        .args(["-r", &keys.to_string()])
        .output()
        .expect("redis-benchmark (apt-get install redis-tools)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

type Regions = Vec<(Arc<MemRegion>, Arc<MemRegion>)>;

/// kvpool's put and get_into rates on the same shape: `clients` callers, each with batches
/// of `pipeline` keys, over a pool of `clients` connections.
fn kvpool_run(rt: &tokio::runtime::Runtime, server: &RedisServer, s: Shape) -> Rates {
    let me = || cpu_seconds("self", false);
    let backend = Arc::new(
        rt.block_on(RedisBackend::connect(RedisConfig {
            url: Some(server.url()),
            pool_size: s.clients,
            ..RedisConfig::default()
        }))
        .expect("connect to the bench server"),
    );
    let batches = (s.requests / s.clients).div_ceil(s.pipeline);
    let requests = batches * s.pipeline * s.clients;
    let ns = Arc::new(Namespace::single_rank("redis-bench").expect("a namespace"));
    // keys[client][batch]: every key distinct, so every put stores.
    let keys: Vec<Vec<Vec<BlockKey>>> = (0..s.clients)
        .map(|c| {
            (0..batches)
                .map(|b| {
                    let first = (c * batches + b) * s.pipeline;
                    (first..first + s.pipeline)
                        .map(|i| {
                            let mut h = [0u8; 32];
                            h[..8].copy_from_slice(&(i as u64).to_le_bytes());
                            BlockKey::new(ns.clone(), BlockHash(h))
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    // One source and one destination region per client, each one batch long,
    // page-aligned like an engine's KV tensors.
    let regions: Regions = (0..s.clients)
        .map(|c| {
            let src = MemRegion::alloc(s.size * s.pipeline);
            let fill: Vec<u8> = (0..s.size * s.pipeline)
                .map(|i| (i * 131 + c) as u8)
                .collect();
            src.write(0, &fill).expect("fill");
            (src, MemRegion::alloc(s.size * s.pipeline))
        })
        .collect();
    let set = measured(server, requests, me, || {
        rt.block_on(each_client(s, &keys, |c, batch| {
            let backend = backend.clone();
            let src = regions[c].0.clone();
            async move {
                let items = batch
                    .into_iter()
                    .enumerate()
                    .map(|(i, k)| (k, IoVec::single(&src, i * s.size, s.size).unwrap()))
                    .collect();
                let out = backend.put(items).await.expect("put");
                assert!(out.iter().all(|o| o.is_present()), "{out:?}");
            }
        }))
    });
    // GETs cycle over an eighth of the keys written, as redis-benchmark's GETs draw from a
    // key space of requests / 8: the same working set on the server.
    let hot: Vec<Vec<Vec<BlockKey>>> = keys
        .iter()
        .map(|client| {
            let n = client.len().div_ceil(8);
            (0..client.len()).map(|b| client[b % n].clone()).collect()
        })
        .collect();
    let get = measured(server, requests, me, || {
        rt.block_on(each_client(s, &hot, |c, batch| {
            let backend = backend.clone();
            let dst = regions[c].1.clone();
            async move {
                let items = batch
                    .into_iter()
                    .enumerate()
                    .map(|(i, k)| (k, IoVecMut::single(&dst, i * s.size, s.size).unwrap()))
                    .collect();
                let out = backend.get_into(items).await.expect("get");
                assert!(out.iter().all(|o| matches!(o, GetOutcome::Hit)), "{out:?}");
            }
        }))
    });
    // Every batch of a client was written from, and read into, the same region.
    for (c, (src, dst)) in regions.iter().enumerate() {
        assert!(
            src.read(0, src.len()).unwrap() == dst.read(0, dst.len()).unwrap(),
            "client {c} read back different bytes"
        );
    }
    rt.block_on(backend.close()).expect("close");
    Rates { set, get }
}

/// Runs `op` on every batch of every client, the clients concurrently, each client's
/// batches one after another.
async fn each_client<F, Fut>(s: Shape, keys: &[Vec<Vec<BlockKey>>], op: F)
where
    F: Fn(usize, Vec<BlockKey>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tasks: Vec<_> = (0..s.clients)
        .map(|c| {
            let batches: Vec<Fut> = keys[c].iter().map(|b| op(c, b.clone())).collect();
            tokio::spawn(async move {
                for b in batches {
                    b.await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a client task");
    }
}
