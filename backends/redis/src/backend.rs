use std::ops::Range;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use kvpool_core::batch::{check_value_len, repeat_failure, Outcomes, Repeats};
use kvpool_core::{
    BackendInfo, BlockKey, Capabilities, Error, ErrorKind, GetOutcome, IoVec, IoVecMut, KvBackend,
    PutOutcome, Result,
};
use tokio::sync::Semaphore;

use crate::config::RedisConfig;
use crate::conn::{Out, Pool, Reply, Val};
use crate::SCHEME;
use kvpool_core::frame::{self, HEADER_LEN};

/// Redis refuses a bulk string longer than `proto-max-bulk-len`, 512 MiB by default,
/// and the header rides in the same string.
pub const MAX_VALUE_SIZE: usize = (512 << 20) - HEADER_LEN;

/// A KV block store on a redis server or Redis Cluster.
///
/// Each value is one redis string, `key_prefix` + the core's key string, holding a
/// checksummed header and the bytes. Batches go out as pipelines of `SETNX` / `GET`
/// (single-key commands, so a cluster routes each key to its slot), split so that no
/// pipeline exceeds `pipeline_bytes` or `pipeline_keys`; pipelines run concurrently over the
/// connection pool with at most `max_inflight_bytes` of values in flight across all calls.
#[derive(Debug)]
pub struct RedisBackend {
    info: BackendInfo,
    /// `None` once closed; dropping the pool closes the connections.
    pool: RwLock<Option<Arc<Pool>>>,
    prefix: String,
    /// Cluster mode: a server-side scan reaches one node only.
    cluster: bool,
    ttl_ms: u64,
    pipeline_bytes: usize,
    pipeline_keys: usize,
    parallel: usize,
    inflight: Semaphore,
    inflight_max: u32,
}

/// One key of a batch: its index in the caller's batch and its redis key
/// (`key_prefix` + the core's key string).
struct Item {
    index: usize,
    key: String,
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl RedisBackend {
    /// Validates `cfg` and connects to the server or cluster it names.
    ///
    /// # Errors
    /// `ConfigInvalid` naming the key for bad settings or rejected credentials;
    /// `Unavailable` when the server cannot be reached.
    pub async fn connect(cfg: RedisConfig) -> Result<Self> {
        cfg.validate()?;
        let pool = Pool::connect(&cfg).await?;
        let description = format!(
            "{}, {} connections, key prefix {:?}{}",
            pool.endpoint(),
            cfg.pool_size,
            cfg.key_prefix,
            if cfg.ttl_ms > 0 {
                format!(", ttl {} ms", cfg.ttl_ms)
            } else {
                String::new()
            }
        );
        let inflight_max =
            u32::try_from(cfg.max_inflight_bytes.0).expect("validated to fit in u32");
        Ok(RedisBackend {
            info: BackendInfo {
                scheme: SCHEME,
                description,
                capabilities: Capabilities {
                    shared: true,
                    // Whether redis keeps data over a restart is the server's setting
                    // (RDB, AOF), invisible from here; a cache must not promise it.
                    persistent: false,
                    remove: true,
                    requires_registration: false,
                    // The server evicts under its own maxmemory policy.
                    capacity_bound: false,
                    max_batch: None,
                    max_value_size: Some(MAX_VALUE_SIZE),
                    // TOUCH moves a looked-up key to the recent end of the LRU; redis has
                    // no pin, so a hold is only a hint.
                    holds_for_load: false,
                },
            },
            pool: RwLock::new(Some(Arc::new(pool))),
            prefix: cfg.key_prefix,
            cluster: !cfg.cluster_nodes.is_empty(),
            ttl_ms: cfg.ttl_ms,
            pipeline_bytes: usize::try_from(cfg.pipeline_bytes.0).unwrap_or(usize::MAX),
            pipeline_keys: cfg.pipeline_keys,
            parallel: cfg.pool_size,
            inflight: Semaphore::new(inflight_max as usize),
            inflight_max,
        })
    }

    fn pool(&self) -> Result<Arc<Pool>> {
        self.pool
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| Error::closed(SCHEME))
    }

    fn redis_key(&self, key: &BlockKey) -> String {
        redis_key(&self.prefix, key)
    }

    /// The checksum seed of an item: its key without the prefix (see `frame`).
    fn seed(&self, item: &Item) -> u64 {
        frame::seed(&item.key[self.prefix.len()..])
    }

    fn items<'a, I>(&self, keys: I) -> Vec<Item>
    where
        I: IntoIterator<Item = &'a BlockKey>,
    {
        keys.into_iter()
            .enumerate()
            .map(|(index, k)| Item {
                index,
                key: self.redis_key(k),
            })
            .collect()
    }

    fn plan(&self, costs: impl IntoIterator<Item = usize>) -> Vec<(Range<usize>, usize)> {
        plan(costs, self.pipeline_bytes, self.pipeline_keys)
    }

    /// Runs one pipeline per planned run, `pool_size` at a time, each once its bytes fit
    /// under `max_inflight_bytes`; commands are encoded only then, so values are copied no
    /// earlier than they can be sent.
    ///
    /// Each item of the batch is `per_item` commands: `encode(item, part, out)` makes one,
    /// `decode(item, part, reply, acc)` folds its reply into the item's accumulator as it
    /// arrives, and `finish(item, acc)` makes the item's result once its run is done.
    #[allow(clippy::too_many_arguments)]
    async fn run_plan<A, T, E, D, F>(
        &self,
        op: &'static str,
        pool: &Pool,
        plan: Vec<(Range<usize>, usize)>,
        per_item: usize,
        encode: E,
        decode: D,
        finish: F,
    ) -> Result<Vec<T>>
    where
        A: Default + Send,
        T: Send,
        E: Fn(usize, usize, &mut Out<'_>) + Sync,
        D: Fn(usize, usize, Reply<'_>, &mut A) + Sync,
        F: Fn(usize, A) -> Result<T> + Sync,
    {
        let (encode, decode, finish) = (&encode, &decode, &finish);
        let runs = stream::iter(plan)
            .map(|(range, bytes)| async move {
                let permits = u32::try_from(bytes)
                    .unwrap_or(u32::MAX)
                    .clamp(1, self.inflight_max);
                let _permit = self
                    .inflight
                    .acquire_many(permits)
                    .await
                    .map_err(|_| Error::closed(SCHEME))?;
                let first = range.start;
                let mut acc: Vec<A> = range.clone().map(|_| A::default()).collect();
                pool.run(
                    op,
                    range.len() * per_item,
                    &|i, out| encode(first + i / per_item, i % per_item, out),
                    &mut |i, reply| {
                        decode(
                            first + i / per_item,
                            i % per_item,
                            reply,
                            &mut acc[i / per_item],
                        )
                    },
                )
                .await?;
                range
                    .zip(acc)
                    .map(|(item, a)| finish(item, a))
                    .collect::<Result<Vec<T>>>()
            })
            .buffered(self.parallel)
            .try_collect::<Vec<Vec<T>>>()
            .await?;
        Ok(runs.into_iter().flatten().collect())
    }

    /// Per-key outcome of a `GET` reply for a destination of `dst.len()` bytes.
    fn decode(&self, pool: &Pool, item: &Item, reply: Reply<'_>, dst: &IoVecMut) -> GetOutcome {
        let corrupted = |why: String| {
            GetOutcome::Failed(
                Error::new(ErrorKind::Corrupted, why)
                    .with_operation("get_into")
                    .with_context("key", &item.key),
            )
        };
        let stored = match reply {
            Ok(Val::Nil) => return GetOutcome::Miss,
            Ok(Val::Bulk(stored)) => stored,
            Ok(other) => return corrupted(format!("redis answered GET with {other:?}")),
            Err(e) => {
                return GetOutcome::Failed(pool.error("get_into", e).with_context("key", &item.key))
            }
        };
        let declared = match frame::declared_len(stored, stored.len()) {
            Ok(len) => len,
            Err(why) => return corrupted(why.to_string()),
        };
        if declared != dst.len() {
            return GetOutcome::Failed(
                Error::invalid_argument(format!(
                    "destination holds {} bytes but the value has {declared}",
                    dst.len()
                ))
                .with_operation("get_into")
                .with_context("key", &item.key),
            );
        }
        // Verified whole before a byte reaches the destination, so a failed key leaves
        // its destination as it was.
        match frame::verify(stored, self.seed(item)) {
            Ok(payload) => match dst.copy_from_slice(payload) {
                Ok(()) => GetOutcome::Hit,
                Err(e) => GetOutcome::Failed(e.with_operation("get_into")),
            },
            Err(why) => corrupted(why.to_string()),
        }
    }

    /// Encodes `cmd key` for `item`.
    fn key_command(item: &Item, cmd: &[u8], out: &mut Out<'_>) {
        out.command(2);
        out.arg(cmd);
        out.arg(item.key.as_bytes());
    }
}

/// The result an item gets once its run is done; every command was answered by then
/// (`Pool::run` fails the run otherwise), so a missing one is a bug, reported as an error.
/// Scans the keys matching `ARGV[1]` and unlinks them; returns how many.
const CLEAR_SCRIPT: &str = "local cursor, n = '0', 0 \
    repeat \
      local r = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000) \
      cursor = r[1] \
      for _, k in ipairs(r[2]) do redis.call('UNLINK', k); n = n + 1 end \
    until cursor == '0' \
    return n";

/// `s` as a literal in a redis glob pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn answered<T>(op: &'static str, acc: Option<T>) -> Result<T> {
    acc.ok_or_else(|| {
        Error::new(
            ErrorKind::Unexpected,
            "a command of the pipeline got no reply",
        )
        .with_operation(op)
    })
}

/// Splits `costs` (bytes per item, in order) into runs of at most `max_bytes` and
/// `max_keys`, each with its total; an item larger than `max_bytes` goes alone.
fn plan(
    costs: impl IntoIterator<Item = usize>,
    max_bytes: usize,
    max_keys: usize,
) -> Vec<(Range<usize>, usize)> {
    let mut out = Vec::new();
    let (mut start, mut bytes, mut i) = (0, 0usize, 0);
    for cost in costs {
        if i > start && (bytes + cost > max_bytes || i - start >= max_keys) {
            out.push((start..i, bytes));
            start = i;
            bytes = 0;
        }
        bytes += cost;
        i += 1;
    }
    if i > start {
        out.push((start..i, bytes));
    }
    out
}

/// `prefix` + the core's key string, built in one allocation: this runs once per key of
/// every call.
fn redis_key(prefix: &str, key: &BlockKey) -> String {
    let ns = key.namespace().key_prefix();
    let mut k = String::with_capacity(prefix.len() + ns.len() + 64);
    k.push_str(prefix);
    k.push_str(ns);
    for b in key.hash().as_bytes() {
        k.push(HEX[(b >> 4) as usize] as char);
        k.push(HEX[(b & 15) as usize] as char);
    }
    k
}

/// The error for a STRLEN or GETRANGE reply that is neither a length nor a header.
fn unexpected_lens<T>(pool: &Pool, cmd: &str, reply: Reply<'_>) -> Result<T> {
    Err(match reply {
        Err(e) => pool.error("value_lens", e),
        Ok(other) => Error::new(
            ErrorKind::Unexpected,
            format!("redis answered {cmd} with {other:?}"),
        )
        .with_operation("value_lens"),
    })
}

/// A reply that must be an integer; anything else fails the call.
fn integer(pool: &Pool, op: &'static str, reply: Reply<'_>) -> Result<i64> {
    match reply {
        Ok(Val::Int(n)) => Ok(n),
        Ok(other) => Err(Error::new(
            ErrorKind::Unexpected,
            format!("redis answered {other:?} where an integer was expected"),
        )
        .with_operation(op)),
        Err(e) => Err(pool.error(op, e)),
    }
}

#[async_trait]
impl KvBackend for RedisBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>> {
        let pool = self.pool()?;
        let items = self.items(keys);
        let plan = self.plan(items.iter().map(|i| i.key.len()));
        self.run_plan(
            "exists",
            &pool,
            plan,
            1,
            |i, _, out| Self::key_command(&items[i], b"EXISTS", out),
            |_, _, reply, acc: &mut Option<Result<bool>>| {
                *acc = Some(integer(&pool, "exists", reply).map(|n| n > 0));
            },
            |_, acc| answered("exists", acc)?,
        )
        .await
    }

    /// TOUCH in place of EXISTS: the same answer, and each present key's LRU clock is
    /// refreshed (EXISTS leaves it alone), so `allkeys-lru` or `volatile-lru` eviction reaches
    /// a looked-up key last. Redis has no pin: under enough pressure it can still evict the
    /// key before the load, and `hold` is not used.
    async fn exists_for_load(&self, keys: &[BlockKey], hold: Duration) -> Result<Vec<bool>> {
        if hold.is_zero() {
            return self.exists(keys).await;
        }
        let pool = self.pool()?;
        let items = self.items(keys);
        let plan = self.plan(items.iter().map(|i| i.key.len()));
        self.run_plan(
            "exists_for_load",
            &pool,
            plan,
            1,
            |i, _, out| Self::key_command(&items[i], b"TOUCH", out),
            |_, _, reply, acc: &mut Option<Result<bool>>| {
                *acc = Some(integer(&pool, "exists_for_load", reply).map(|n| n > 0));
            },
            |_, acc| answered("exists_for_load", acc)?,
        )
        .await
    }

    async fn value_lens(&self, keys: &[BlockKey]) -> Result<Vec<Option<usize>>> {
        let pool = self.pool()?;
        let items = self.items(keys);
        let plan = self.plan(items.iter().map(|i| i.key.len()));
        let header_end = (HEADER_LEN - 1).to_string();
        /// The replies of one key: its STRLEN, then the stored header if it has one.
        #[derive(Default)]
        struct Lens {
            strlen: Option<Result<Option<usize>>>,
            header: Option<Result<Option<[u8; HEADER_LEN]>>>,
        }
        self.run_plan(
            "value_lens",
            &pool,
            plan,
            2,
            // The length our header declares, checked against the stored length.
            |i, part, out| {
                let key = items[i].key.as_bytes();
                if part == 0 {
                    out.command(2);
                    out.arg(b"STRLEN");
                    out.arg(key);
                } else {
                    out.command(4);
                    out.arg(b"GETRANGE");
                    out.arg(key);
                    out.arg(b"0");
                    out.arg(header_end.as_bytes());
                }
            },
            |_, part, reply, acc: &mut Lens| {
                // A key of another redis type: present, and never a hit.
                let wrong_type = matches!(&reply, Err(e) if e.code() == Some("WRONGTYPE"));
                if part == 0 {
                    acc.strlen = Some(match reply {
                        _ if wrong_type => Ok(Some(1)),
                        Ok(Val::Int(n)) => Ok(usize::try_from(n).ok()),
                        other => unexpected_lens(&pool, "STRLEN", other),
                    });
                } else {
                    acc.header = Some(match reply {
                        _ if wrong_type => Ok(None),
                        Ok(Val::Bulk(head)) => Ok(head.try_into().ok()),
                        other => unexpected_lens(&pool, "GETRANGE", other),
                    });
                }
            },
            |_, acc| {
                let strlen = answered("value_lens", acc.strlen)??;
                let header = answered("value_lens", acc.header)??;
                Ok(match (strlen, header) {
                    (None | Some(0), _) => None,
                    // A value kvpool did not write is present, with its raw length; a
                    // get_into of it reports Corrupted.
                    (Some(n), Some(head)) => Some(frame::declared_len(&head, n).unwrap_or(n)),
                    (Some(n), None) => Some(n),
                })
            },
        )
        .await
    }

    async fn put(&self, items: Vec<(BlockKey, IoVec)>) -> Result<Vec<PutOutcome>> {
        let pool = self.pool()?;
        let mut outcomes = Outcomes::new(items.len(), "put");
        // A key repeated in one batch is sent once: the first copy decides, the others
        // report `Exists`, exactly as if they came in later calls.
        let mut repeats = Repeats::with_capacity(items.len());
        let mut work = Vec::with_capacity(items.len());
        for (index, (key, iov)) in items.iter().enumerate() {
            let checked = check_value_len(key, iov.len(), MAX_VALUE_SIZE, |len| {
                format!(
                    "a value of {len} bytes exceeds the redis backend's limit of \
                     {MAX_VALUE_SIZE} bytes (proto-max-bulk-len less the header)"
                )
            });
            if let Err(e) = checked {
                outcomes.set(index, PutOutcome::Failed(e));
                continue;
            }
            if repeats.first(index, key) {
                work.push(Item {
                    index,
                    key: self.redis_key(key),
                });
            }
        }
        let plan = self.plan(
            work.iter()
                .map(|w| items[w.index].1.len() + HEADER_LEN + w.key.len()),
        );
        let ttl = self.ttl_ms.to_string();
        let stored = self
            .run_plan(
                "put",
                &pool,
                plan,
                1,
                |i, _, out| {
                    let w = &work[i];
                    let iov = &items[w.index].1;
                    let hdr = frame::header(self.seed(w), iov.len(), iov.chunks());
                    let value = std::iter::once(&hdr[..]).chain(iov.chunks());
                    // Keys name their content, so a present key keeps its value: SETNX, or
                    // SET ... NX when the value also needs an expiry. SETNX is the same
                    // operation as SET NX for the server (redis's docs call it deprecated in
                    // favour of SET NX, yet every redis and Valkey keeps it), with one
                    // argument less to parse: at 4 KiB values, where the server's core is
                    // the bottleneck, redis spent ~6.5 µs per SETNX against ~7.1 per SET NX
                    // in the redis bench.
                    if self.ttl_ms > 0 {
                        out.command(6);
                        out.arg(b"SET");
                        out.arg(w.key.as_bytes());
                        out.arg_parts(HEADER_LEN + iov.len(), value);
                        out.arg(b"NX");
                        out.arg(b"PX");
                        out.arg(ttl.as_bytes());
                    } else {
                        out.command(3);
                        out.arg(b"SETNX");
                        out.arg(w.key.as_bytes());
                        out.arg_parts(HEADER_LEN + iov.len(), value);
                    }
                },
                |i, _, reply, acc: &mut Option<PutOutcome>| {
                    *acc = Some(match reply {
                        // SET NX answers OK or nil, SETNX 1 or 0.
                        Ok(Val::Simple(b"OK") | Val::Int(1)) => PutOutcome::Stored,
                        Ok(Val::Nil | Val::Int(0)) => PutOutcome::Exists,
                        Ok(other) => PutOutcome::Failed(
                            Error::new(
                                ErrorKind::Unexpected,
                                format!("redis answered SET with {other:?}"),
                            )
                            .with_operation("put"),
                        ),
                        Err(e) => PutOutcome::Failed(
                            pool.error("put", e).with_context("key", &work[i].key),
                        ),
                    });
                },
                |i, acc| Ok((work[i].index, answered("put", acc)?)),
            )
            .await?;
        for (index, outcome) in stored {
            outcomes.set(index, outcome);
        }
        repeats.settle(&mut outcomes, repeat_failure);
        Ok(outcomes.into_vec())
    }

    async fn get_into(&self, items: Vec<(BlockKey, IoVecMut)>) -> Result<Vec<GetOutcome>> {
        let pool = self.pool()?;
        let work = self.items(items.iter().map(|(k, _)| k));
        let plan = self.plan(
            work.iter()
                .map(|w| items[w.index].1.len() + HEADER_LEN + w.key.len()),
        );
        // Each reply is verified and scattered as soon as it arrives, so no more than
        // max_inflight_bytes of replies exist at once.
        self.run_plan(
            "get_into",
            &pool,
            plan,
            1,
            // Pipelined GETs rather than MGET: measured no faster, and MGET answers nil
            // for a key of another type, which must be Corrupted, not a miss.
            |i, _, out| Self::key_command(&work[i], b"GET", out),
            |i, _, reply, acc: &mut Option<GetOutcome>| {
                let w = &work[i];
                *acc = Some(self.decode(&pool, w, reply, &items[w.index].1));
            },
            |_, acc| answered("get_into", acc),
        )
        .await
    }

    async fn remove(&self, keys: &[BlockKey]) -> Result<()> {
        let pool = self.pool()?;
        let items = self.items(keys);
        let plan = self.plan(items.iter().map(|i| i.key.len()));
        // UNLINK frees a large value's memory off the server's main thread.
        self.run_plan(
            "remove",
            &pool,
            plan,
            1,
            |i, _, out| Self::key_command(&items[i], b"UNLINK", out),
            |_, _, reply, acc: &mut Option<Result<i64>>| {
                *acc = Some(integer(&pool, "remove", reply));
            },
            |_, acc| answered("remove", acc)?.map(drop),
        )
        .await?;
        Ok(())
    }

    /// `Local`: nothing (the server is shared). `All`: every key under `key_prefix`, by a
    /// script on the server that scans and unlinks them (it holds the server while it runs,
    /// as any script does; vLLM resets with generation paused). Refused in cluster mode,
    /// where a script reaches one node, and with an empty `key_prefix`, which would name
    /// every key of the database.
    async fn clear(&self, scope: kvpool_core::ClearScope) -> Result<bool> {
        let pool = self.pool()?;
        if scope == kvpool_core::ClearScope::Local {
            return Ok(false);
        }
        let refuse = |why: &str| {
            Err(Error::new(
                ErrorKind::Unsupported,
                format!("redis: cannot clear the pool: {why}"),
            )
            .with_operation("clear"))
        };
        if self.cluster {
            return refuse("in cluster mode a server-side scan reaches one node only");
        }
        if self.prefix.is_empty() {
            return refuse("`redis.key_prefix` is empty, so kvpool's keys cannot be told apart");
        }
        let pattern = format!("{}*", glob_escape(&self.prefix));
        let mut removed: Option<Result<i64>> = None;
        pool.run(
            "clear",
            1,
            &|_, out| {
                out.command(4);
                out.arg(b"EVAL");
                out.arg(CLEAR_SCRIPT.as_bytes());
                out.arg(b"0");
                out.arg(pattern.as_bytes());
            },
            &mut |_, reply| removed = Some(integer(&pool, "clear", reply)),
        )
        .await?;
        let removed = answered("clear", removed)??;
        tracing::info!(removed, prefix = self.prefix.as_str(), "redis pool cleared");
        Ok(true)
    }

    async fn close(&self) -> Result<()> {
        // In-flight calls hold their own reference and finish; the connections close
        // when the last one lets go.
        self.pool.write().unwrap_or_else(|e| e.into_inner()).take();
        self.inflight.close();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvpool_core::{BlockHash, Namespace};

    #[test]
    fn plans_respect_bytes_and_keys_and_send_big_values_alone() {
        assert!(plan([], 10, 2).is_empty());
        assert_eq!(
            plan([4, 4, 4, 30, 1, 1, 1], 10, 2),
            vec![(0..2, 8), (2..3, 4), (3..4, 30), (4..6, 2), (6..7, 1)]
        );
        assert_eq!(plan([5, 5, 5], 10, 100), vec![(0..2, 10), (2..3, 5)]);
    }

    #[test]
    fn redis_keys_are_the_prefix_and_the_core_key_string() {
        let ns = Arc::new(Namespace::single_rank("Qwen/Qwen3-8B").unwrap());
        let mut h = [0u8; 32];
        h[0] = 0x3f;
        h[31] = 0xab;
        let key = BlockKey::new(ns, BlockHash(h));
        let k = redis_key("kvpool:", &key);
        assert_eq!(k, format!("kvpool:{}", key.to_key_string()));
        assert!(k.ends_with("3f000000000000000000000000000000000000000000000000000000000000ab"));
    }
}
