use std::collections::hash_map::{Entry, HashMap};
use std::io::Write;
use std::ops::Range;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use kvpool_core::{
    BackendInfo, BlockKey, Capabilities, Error, ErrorKind, GetOutcome, IoVec, IoVecMut, KvBackend,
    PutOutcome, Result,
};
use redis::{Pipeline, RedisWrite, Value};
use tokio::sync::Semaphore;

use crate::config::RedisConfig;
use crate::conn::{Pool, Reply};
use crate::frame::{self, HEADER_LEN};
use crate::SCHEME;

/// Redis refuses a bulk string longer than `proto-max-bulk-len`, 512 MiB by default,
/// and the header rides in the same string.
pub const MAX_VALUE_SIZE: usize = (512 << 20) - HEADER_LEN;

/// A KV block store on a redis server or Redis Cluster.
///
/// Each value is one redis string, `key_prefix` + the core's key string, holding a
/// checksummed header and the bytes. Batches go out as pipelines of `SET NX` / `GET`
/// (single-key commands, so a cluster routes each key to its slot), split so that no
/// pipeline exceeds `pipeline_bytes` or `pipeline_keys`; pipelines run concurrently over the
/// connection pool with at most `max_inflight_bytes` of values in flight across all calls.
#[derive(Debug)]
pub struct RedisBackend {
    info: BackendInfo,
    /// `None` once closed; dropping the pool closes the connections.
    pool: RwLock<Option<Arc<Pool>>>,
    prefix: String,
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
                },
            },
            pool: RwLock::new(Some(Arc::new(pool))),
            prefix: cfg.key_prefix,
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
    /// under `max_inflight_bytes`; `build` makes a run's pipeline only then, so values are
    /// encoded no earlier than they can be sent. Returns each run's replies.
    async fn run_plan<'a, T, B, F>(
        &'a self,
        op: &'static str,
        pool: &'a Pool,
        plan: Vec<(Range<usize>, usize)>,
        build: B,
        finish: F,
    ) -> Result<Vec<T>>
    where
        B: Fn(Range<usize>) -> Pipeline + Sync + 'a,
        F: Fn(Range<usize>, Vec<Reply>) -> Result<Vec<T>> + Sync + 'a,
        T: Send,
    {
        let build = &build;
        let finish = &finish;
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
                let replies = pool.run(op, build(range.clone())).await?;
                finish(range, replies)
            })
            .buffered(self.parallel)
            .try_collect::<Vec<Vec<T>>>()
            .await?;
        Ok(runs.into_iter().flatten().collect())
    }

    /// Per-key outcome of a `GET` reply for a destination of `dst.len()` bytes.
    fn decode(&self, pool: &Pool, item: &Item, reply: Reply, dst: &IoVecMut) -> GetOutcome {
        let corrupted = |why: String| {
            GetOutcome::Failed(
                Error::new(ErrorKind::Corrupted, why)
                    .with_operation("get_into")
                    .with_context("key", &item.key),
            )
        };
        let stored = match reply {
            Ok(Value::Nil) => return GetOutcome::Miss,
            Ok(Value::BulkString(stored)) => stored,
            Ok(other) => return corrupted(format!("redis answered GET with {other:?}")),
            Err(e) => {
                return GetOutcome::Failed(pool.error("get_into", e).with_context("key", &item.key))
            }
        };
        let declared = match frame::declared_len(&stored, stored.len()) {
            Ok(len) => len,
            Err(why) => return corrupted(why),
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
        match frame::verify(&stored, self.seed(item)) {
            Ok(payload) => match dst.copy_from_slice(payload) {
                Ok(()) => GetOutcome::Hit,
                Err(e) => GetOutcome::Failed(e.with_operation("get_into")),
            },
            Err(why) => corrupted(why),
        }
    }

    /// A pipeline of one single-key command per item.
    fn key_commands(&self, items: &[Item], cmd: &str, extra: &[&str]) -> Pipeline {
        let mut pipe = redis::pipe();
        for item in items {
            let mut c = redis::cmd(cmd);
            c.arg(&item.key);
            for a in extra {
                c.arg(*a);
            }
            pipe.add_command(c);
        }
        pipe
    }
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

/// Replies that must each be an integer, as `i64`s; anything else fails the call.
fn integers(pool: &Pool, op: &'static str, replies: Vec<Reply>) -> Result<Vec<i64>> {
    replies
        .into_iter()
        .map(|r| match r {
            Ok(Value::Int(n)) => Ok(n),
            Ok(other) => Err(Error::new(
                ErrorKind::Unexpected,
                format!("redis answered {other:?} where an integer was expected"),
            )
            .with_operation(op)),
            Err(e) => Err(pool.error(op, e)),
        })
        .collect()
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
            |r| self.key_commands(&items[r], "EXISTS", &[]),
            |_, replies| {
                Ok(integers(&pool, "exists", replies)?
                    .into_iter()
                    .map(|n| n > 0)
                    .collect())
            },
        )
        .await
    }

    async fn value_lens(&self, keys: &[BlockKey]) -> Result<Vec<Option<usize>>> {
        let pool = self.pool()?;
        let items = self.items(keys);
        let plan = self.plan(items.iter().map(|i| i.key.len()));
        let header_end = (HEADER_LEN - 1).to_string();
        self.run_plan(
            "value_lens",
            &pool,
            plan,
            |r| {
                // The length our header declares, checked against the stored length.
                let mut pipe = redis::pipe();
                for item in &items[r] {
                    pipe.cmd("STRLEN").arg(&item.key);
                    pipe.cmd("GETRANGE").arg(&item.key).arg(0).arg(&header_end);
                }
                pipe
            },
            |_, replies| {
                let mut out = Vec::with_capacity(replies.len() / 2);
                let mut replies = replies.into_iter();
                while let (Some(strlen), Some(head)) = (replies.next(), replies.next()) {
                    out.push(match (strlen, head) {
                        (Ok(Value::Int(0)), _) => None,
                        (Ok(Value::Int(n)), Ok(Value::BulkString(head))) => {
                            let n = n as usize;
                            // A value kvpool did not write is present, with its raw length;
                            // a get_into of it reports Corrupted.
                            Some(frame::declared_len(&head, n).unwrap_or(n))
                        }
                        // A key of another redis type: present, and never a hit.
                        (Err(e), _) if e.code() == Some("WRONGTYPE") => Some(1),
                        (Err(e), _) | (_, Err(e)) => return Err(pool.error("value_lens", e)),
                        (a, b) => {
                            return Err(Error::new(
                                ErrorKind::Unexpected,
                                format!("redis answered STRLEN/GETRANGE with {a:?}, {b:?}"),
                            )
                            .with_operation("value_lens"))
                        }
                    });
                }
                Ok(out)
            },
        )
        .await
    }

    async fn put(&self, items: Vec<(BlockKey, IoVec)>) -> Result<Vec<PutOutcome>> {
        let pool = self.pool()?;
        let mut outcomes: Vec<Option<PutOutcome>> = (0..items.len()).map(|_| None).collect();
        // A key repeated in one batch is sent once: the first copy decides, the others
        // report `Exists`, exactly as if they came in later calls.
        let mut first: HashMap<&BlockKey, usize, foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(items.len(), Default::default());
        let mut repeats = Vec::new();
        let mut work = Vec::with_capacity(items.len());
        for (index, (key, iov)) in items.iter().enumerate() {
            let len = iov.len();
            let invalid = if len == 0 {
                Some("a value must be at least 1 byte".to_string())
            } else if len > MAX_VALUE_SIZE {
                Some(format!(
                    "a value of {len} bytes exceeds the redis backend's limit of \
                     {MAX_VALUE_SIZE} bytes (proto-max-bulk-len less the header)"
                ))
            } else {
                None
            };
            if let Some(why) = invalid {
                outcomes[index] = Some(PutOutcome::Failed(
                    Error::invalid_argument(why)
                        .with_operation("put")
                        .with_context("key", key),
                ));
                continue;
            }
            match first.entry(key) {
                Entry::Occupied(e) => repeats.push((index, *e.get())),
                Entry::Vacant(e) => {
                    e.insert(index);
                    work.push(Item {
                        index,
                        key: self.redis_key(key),
                    });
                }
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
                |r| {
                    let mut pipe = redis::pipe();
                    for w in &work[r] {
                        let iov = &items[w.index].1;
                        let hdr = frame::header(self.seed(w), iov.len(), iov.chunks());
                        let mut c = redis::cmd("SET");
                        c.arg(&w.key);
                        // The value goes straight from the caller's slices into the command
                        // buffer: one copy, no intermediate Vec.
                        c.reserve_space_for_args([HEADER_LEN + iov.len()]);
                        {
                            let mut arg = c.writer_for_next_arg();
                            arg.write_all(&hdr).expect("writing to a Vec");
                            for chunk in iov.chunks() {
                                arg.write_all(chunk).expect("writing to a Vec");
                            }
                        }
                        // NX: keys name their content, so a present key keeps its value.
                        c.arg("NX");
                        if self.ttl_ms > 0 {
                            c.arg("PX").arg(&ttl);
                        }
                        pipe.add_command(c);
                    }
                    pipe
                },
                |r, replies| {
                    Ok(work[r]
                        .iter()
                        .zip(replies)
                        .map(|(w, reply)| {
                            let outcome = match reply {
                                Ok(Value::Okay) => PutOutcome::Stored,
                                Ok(Value::SimpleString(s)) if s == "OK" => PutOutcome::Stored,
                                Ok(Value::Nil) => PutOutcome::Exists,
                                Ok(other) => PutOutcome::Failed(
                                    Error::new(
                                        ErrorKind::Unexpected,
                                        format!("redis answered SET with {other:?}"),
                                    )
                                    .with_operation("put"),
                                ),
                                Err(e) => PutOutcome::Failed(
                                    pool.error("put", e).with_context("key", &w.key),
                                ),
                            };
                            (w.index, outcome)
                        })
                        .collect())
                },
            )
            .await?;
        for (index, outcome) in stored {
            outcomes[index] = Some(outcome);
        }
        for (index, first) in repeats {
            outcomes[index] = Some(match &outcomes[first] {
                Some(PutOutcome::Failed(e)) => PutOutcome::Failed(
                    Error::new(
                        e.kind(),
                        format!("the same key earlier in the batch failed: {}", e.message()),
                    )
                    .with_operation("put"),
                ),
                _ => PutOutcome::Exists,
            });
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every item has an outcome"))
            .collect())
    }

    async fn get_into(&self, items: Vec<(BlockKey, IoVecMut)>) -> Result<Vec<GetOutcome>> {
        let pool = self.pool()?;
        let work = self.items(items.iter().map(|(k, _)| k));
        let plan = self.plan(
            work.iter()
                .map(|w| items[w.index].1.len() + HEADER_LEN + w.key.len()),
        );
        // Each run is decoded and scattered as soon as it arrives, so no more than
        // max_inflight_bytes of replies exist at once.
        self.run_plan(
            "get_into",
            &pool,
            plan,
            // Pipelined GETs rather than MGET: measured no faster, and MGET answers nil
            // for a key of another type, which must be Corrupted, not a miss.
            |r| self.key_commands(&work[r], "GET", &[]),
            |r, replies| {
                Ok(work[r]
                    .iter()
                    .zip(replies)
                    .map(|(w, reply)| self.decode(&pool, w, reply, &items[w.index].1))
                    .collect())
            },
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
            |r| self.key_commands(&items[r], "UNLINK", &[]),
            |_, replies| integers(&pool, "remove", replies).map(|_| Vec::<()>::new()),
        )
        .await?;
        Ok(())
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
