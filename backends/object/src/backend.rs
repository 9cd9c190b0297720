use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use kvpool_core::batch::{check_value_len, repeat_failure, Outcomes, Repeats};
use kvpool_core::{
    BackendInfo, BlockKey, Capabilities, Error, ErrorKind, GetOutcome, IoVec, IoVecMut, KvBackend,
    PutOutcome, Result,
};
use object_store::path::{Path, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::Semaphore;

use crate::config::{ObjectConfig, PutMode, StoreKind};
use crate::store::{self, classify};
use crate::SCHEME;
use kvpool_core::frame::{self, Invalid, HEADER_LEN};

/// S3 takes at most 5 GiB in one PUT, and the header rides in the same object; the other
/// stores allow more, but one limit for all keeps a pool movable between them.
pub const MAX_VALUE_SIZE: usize = (5 << 30) - HEADER_LEN;

/// A KV block store on an object store: S3 or an S3-compatible server, GCS, Azure Blob
/// Storage, a local directory, or memory (tests).
///
/// Each value is one object named `<url prefix>/<key_prefix><key string>`, holding a
/// checksummed header and the bytes (the redis backend's format). Every key of a batch is
/// one request (the stores have no multi-key GET or PUT; removal uses bulk delete where
/// the store has it); requests run concurrently, at most `max_concurrent_requests` at a
/// time across all calls.
#[derive(Debug)]
pub struct ObjectBackend {
    info: BackendInfo,
    /// `None` once closed.
    inner: RwLock<Option<Arc<Inner>>>,
    permits: Arc<Semaphore>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    /// Folders every object lives in: the URL's prefix and the folders of `key_prefix`.
    dir: Path,
    /// The last segment of `key_prefix`, which starts each object's name.
    leaf_prefix: String,
    create: bool,
    parallel: usize,
    timeout: Duration,
    permits: Arc<Semaphore>,
    /// With head-then-put, a put holds its key's stripe from the HEAD to the PUT, so
    /// writers of one key in this process take turns and exactly one of them stores it;
    /// writers in other processes can still both write (the same bytes).
    stripes: Vec<tokio::sync::Mutex<()>>,
}

const STRIPES: usize = 256;

impl std::fmt::Debug for Inner {
    // By hand: the store's own Debug shows its configuration, access key id included.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("store", &self.store.to_string())
            .field("dir", &self.dir)
            .field("leaf_prefix", &self.leaf_prefix)
            .field("create", &self.create)
            .field("parallel", &self.parallel)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// How `put` keeps the first value, as the open resolved [`PutMode::Auto`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolved {
    Create,
    HeadThenPut,
}

impl ObjectBackend {
    /// Validates `cfg`, builds the store client and checks that the store is reachable and
    /// writable by writing and deleting a probe object (which also resolves
    /// `put_mode = "auto"`).
    ///
    /// # Errors
    /// `ConfigInvalid` naming the key for bad settings, missing or rejected credentials, or
    /// a bucket that does not exist; `Unavailable` when the store cannot be reached;
    /// `Timeout` when it does not answer within `request_timeout_ms`.
    pub async fn open(cfg: ObjectConfig) -> Result<Self> {
        let target = cfg.target()?;
        let (store, instance_credentials) = store::build(&cfg, &target)?;
        let (dir, leaf_prefix) = split_key_prefix(&target.prefix, &cfg.key_prefix);
        let permits = Arc::new(Semaphore::new(cfg.max_concurrent_requests));
        let mut inner = Inner {
            store,
            dir,
            leaf_prefix,
            create: true,
            parallel: cfg.max_concurrent_requests,
            timeout: cfg.request_timeout(),
            permits: permits.clone(),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        };
        let location = cfg.location();
        let resolved = inner.probe(cfg.put_mode).await.map_err(|e| {
            // A failed request to the metadata service itself (for a token or for the
            // role's credentials) means there are none here: a config problem, not an
            // outage of the store.
            let shown = e.to_string();
            let imds = instance_credentials
                && (shown.contains("/latest/api/token")
                    || shown.contains("/latest/meta-data/iam/security-credentials"));
            let e = if imds && e.kind() != ErrorKind::ConfigInvalid {
                Error::new(
                    ErrorKind::ConfigInvalid,
                    format!(
                        "no S3 credentials were given (object.access_key_id and \
                         object.secret_access_key, or AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY), so they were asked of the cloud instance's \
                         metadata service, and the store could not be used: {}",
                        e.message()
                    ),
                )
                .set_source(e)
            } else {
                e
            };
            e.with_operation("open").with_context("store", &location)
        })?;
        inner.create = resolved == Resolved::Create;
        let in_memory = target.kind == StoreKind::Memory;
        let description = format!(
            "{location}, {} requests in flight, put mode {}{}",
            cfg.max_concurrent_requests,
            match resolved {
                Resolved::Create => "create",
                Resolved::HeadThenPut => "head_then_put",
            },
            if cfg.key_prefix.is_empty() {
                String::new()
            } else {
                format!(", key prefix {:?}", cfg.key_prefix)
            }
        );
        Ok(ObjectBackend {
            info: BackendInfo {
                scheme: SCHEME,
                description,
                capabilities: Capabilities {
                    // memory:// lives and dies with this process; every other store is
                    // seen by other processes and hosts and outlives them.
                    shared: !in_memory,
                    persistent: !in_memory,
                    remove: true,
                    requires_registration: false,
                    // Object stores grow; lifecycle rules, not kvpool, expire objects.
                    capacity_bound: false,
                    max_batch: None,
                    max_value_size: Some(MAX_VALUE_SIZE),
                    holds_for_load: false,
                },
            },
            inner: RwLock::new(Some(Arc::new(inner))),
            permits,
        })
    }

    fn inner(&self) -> Result<Arc<Inner>> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| Error::closed(SCHEME))
    }
}

/// The folders of `<prefix>/<key_prefix>` and the part of `key_prefix` after its last `/`.
fn split_key_prefix(prefix: &Path, key_prefix: &str) -> (Path, String) {
    let (folders, leaf) = match key_prefix.rfind('/') {
        Some(i) => (&key_prefix[..i], &key_prefix[i + 1..]),
        None => ("", key_prefix),
    };
    let mut dir = prefix.clone();
    dir.extend(
        folders
            .split('/')
            .filter(|s| !s.is_empty())
            .map(PathPart::from),
    );
    (dir, leaf.to_string())
}

/// What one GET found, before the destination is touched.
enum Fetched {
    Body(Bytes),
    /// The object's payload has another length than the destination (or the object is
    /// shorter than a header); its body was not read.
    Size(u64),
}

impl Inner {
    /// The object holding `key`, and the checksum seed of its key string.
    fn name(&self, key: &BlockKey) -> (Path, u64) {
        let key_string = key.to_key_string();
        let seed = frame::seed(&key_string);
        let leaf = if self.leaf_prefix.is_empty() {
            key_string
        } else {
            format!("{}{key_string}", self.leaf_prefix)
        };
        (self.dir.clone().join(leaf), seed)
    }

    /// Runs one request under a permit and the request timeout. The outer error is the
    /// permit (backend closed) or the timeout; the inner one is the store's.
    async fn call<T>(
        &self,
        op: &'static str,
        name: &Path,
        request: impl Future<Output = object_store::Result<T>>,
    ) -> Result<object_store::Result<T>> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::closed(SCHEME))?;
        tokio::time::timeout(self.timeout, request)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "the store did not answer within {} ms (object.request_timeout_ms)",
                        self.timeout.as_millis()
                    ),
                )
                .with_operation(op)
                .with_context("object", name)
            })
    }

    /// Writes a probe object the way `put` will and removes it again: proves at open that
    /// the store is reachable, the credentials work and the bucket exists, instead of
    /// failing every later put. With `Auto`, a second create-only write of the same object
    /// tells whether the store enforces the condition: S3-compatible servers that ignore
    /// `If-None-Match` overwrite silently.
    async fn probe(&self, mode: PutMode) -> Result<Resolved> {
        static PROBES: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = self.dir.clone().join(format!(
            ".kvpool-probe-{}-{nanos}-{}",
            std::process::id(),
            PROBES.fetch_add(1, Ordering::Relaxed)
        ));
        let put = |create: bool| {
            let opts = if create {
                object_store::PutMode::Create.into()
            } else {
                object_store::PutOptions::default()
            };
            let name = name.clone();
            async move {
                self.store
                    .put_opts(&name, PutPayload::from_static(b"kvpool probe"), opts)
                    .await
            }
        };
        let unsupported = |e: &object_store::Error| {
            matches!(
                e,
                object_store::Error::NotImplemented { .. }
                    | object_store::Error::NotSupported { .. }
            )
        };
        let resolved = match mode {
            PutMode::HeadThenPut => {
                self.call("open", &name, put(false))
                    .await?
                    .map_err(|e| classify("open", e))?;
                Resolved::HeadThenPut
            }
            PutMode::Create => match self.call("open", &name, put(true)).await? {
                Ok(_) => Resolved::Create,
                Err(e) if unsupported(&e) => {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "object.put_mode is \"create\" but the store has no create-only \
                             put ({e}); use \"head_then_put\" or \"auto\""
                        ),
                    ))
                }
                Err(e) => return Err(classify("open", e)),
            },
            PutMode::Auto => match self.call("open", &name, put(true)).await? {
                Err(e) if unsupported(&e) => {
                    self.call("open", &name, put(false))
                        .await?
                        .map_err(|e| classify("open", e))?;
                    Resolved::HeadThenPut
                }
                Err(e) => return Err(classify("open", e)),
                Ok(_) => match self.call("open", &name, put(true)).await? {
                    Err(object_store::Error::AlreadyExists { .. }) => Resolved::Create,
                    Err(e) if !unsupported(&e) => return Err(classify("open", e)),
                    other => {
                        tracing::warn!(
                            outcome = ?other.map(drop),
                            "the object store does not enforce create-only puts; \
                             put checks for the key first (put_mode head_then_put)"
                        );
                        Resolved::HeadThenPut
                    }
                },
            },
        };
        match self.call("open", &name, self.store.delete(&name)).await {
            Ok(Ok(())) => {}
            // Left behind: harmless (its name is no key's), but say so.
            Ok(Err(e)) => {
                tracing::warn!(object = %name, error = %e, "could not delete the probe object")
            }
            Err(e) => {
                tracing::warn!(object = %name, error = %e, "could not delete the probe object")
            }
        }
        Ok(resolved)
    }

    /// Stores one value; a present key keeps its value.
    async fn put_one(&self, key: &BlockKey, iov: &IoVec) -> PutOutcome {
        let (name, seed) = self.name(key);
        let failed = |e: Error| PutOutcome::Failed(e.with_context("object", &name));
        let _turn = if self.create {
            None
        } else {
            // The seed is a hash of the key: spread enough to pick a stripe.
            Some(self.stripes[(seed % STRIPES as u64) as usize].lock().await)
        };
        if !self.create {
            match self.call("put", &name, self.store.head(&name)).await {
                Ok(Ok(_)) => return PutOutcome::Exists,
                Ok(Err(object_store::Error::NotFound { .. })) => {}
                Ok(Err(e)) => return failed(classify("put", e)),
                Err(e) => return failed(e),
            }
        }
        // The copy into one buffer is the only one: object_store sends it as is. It is
        // made here, under the request's permit, so no more than max_concurrent_requests
        // encoded values exist at once.
        let request = async {
            let body = frame::encode(seed, iov.len(), iov.chunks());
            let opts = if self.create {
                object_store::PutMode::Create.into()
            } else {
                object_store::PutOptions::default()
            };
            self.store
                .put_opts(&name, PutPayload::from(body), opts)
                .await
        };
        match self.call("put", &name, request).await {
            Ok(Ok(_)) => PutOutcome::Stored,
            // Another writer stored the key first: keys name their content, so it is ours.
            Ok(Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            )) => PutOutcome::Exists,
            Ok(Err(e)) => failed(classify("put", e)),
            Err(e) => failed(e),
        }
    }

    /// Loads one value into `dst`, verified whole before a byte of it is written.
    async fn get_one(&self, key: &BlockKey, dst: &IoVecMut) -> GetOutcome {
        let (name, seed) = self.name(key);
        let want = dst.len();
        let request = async {
            let got = self.store.get(&name).await?;
            if frame::payload_len(got.meta.size) != Some(want) {
                // Dropping the body unread: no reason to download a value we cannot use.
                return Ok(Fetched::Size(got.meta.size));
            }
            got.bytes().await.map(Fetched::Body)
        };
        let corrupted = |why: &str| {
            GetOutcome::Failed(
                Error::new(ErrorKind::Corrupted, why)
                    .with_operation("get_into")
                    .with_context("object", &name),
            )
        };
        let stored = match self.call("get_into", &name, request).await {
            Ok(Ok(Fetched::Body(stored))) => stored,
            Ok(Ok(Fetched::Size(size))) => {
                return match frame::payload_len(size) {
                    Some(len) => GetOutcome::Failed(
                        Error::invalid_argument(format!(
                            "destination holds {want} bytes but the value has {len}"
                        ))
                        .with_operation("get_into")
                        .with_context("object", &name),
                    ),
                    None => corrupted(&format!(
                        "the object is {size} bytes, shorter than kvpool's {HEADER_LEN}-byte \
                         header; it was not written by kvpool"
                    )),
                }
            }
            Ok(Err(object_store::Error::NotFound { .. })) => return GetOutcome::Miss,
            Ok(Err(e)) => {
                return GetOutcome::Failed(classify("get_into", e).with_context("object", &name))
            }
            Err(e) => return GetOutcome::Failed(e.with_context("object", &name)),
        };
        match frame::verify(&stored, seed) {
            Ok(payload) => match dst.copy_from_slice(payload) {
                Ok(()) => GetOutcome::Hit,
                Err(e) => GetOutcome::Failed(e.with_operation("get_into")),
            },
            Err(invalid) => {
                if let Invalid::Damaged(_) = invalid {
                    // kvpool wrote it and it no longer checks out: a later put would keep
                    // reporting Exists over bad bytes, so drop it and let the key be
                    // stored again. An object kvpool did not write is left alone.
                    match self.call("get_into", &name, self.store.delete(&name)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(object = %name, error = %e, "could not delete a corrupted object")
                        }
                        Err(e) => {
                            tracing::warn!(object = %name, error = %e, "could not delete a corrupted object")
                        }
                    }
                }
                corrupted(invalid.message())
            }
        }
    }

    /// `Some(payload length)` of a present object, `None` when absent.
    async fn len_one(&self, op: &'static str, key: &BlockKey) -> Result<Option<usize>> {
        let (name, _) = self.name(key);
        match self.call(op, &name, self.store.head(&name)).await? {
            // An object kvpool did not write is present, with a length a get_into of it
            // reports as Corrupted rather than as a hit.
            Ok(meta) => Ok(Some(
                frame::payload_len(meta.size)
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| usize::try_from(meta.size).unwrap_or(usize::MAX).max(1)),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(classify(op, e).with_context("object", &name)),
        }
    }
}

#[async_trait]
impl KvBackend for ObjectBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>> {
        let inner = self.inner()?;
        // By index: a closure over `&BlockKey` trips async-trait's Send inference.
        stream::iter(0..keys.len())
            .map(|i| {
                let inner = &inner;
                async move { Ok(inner.len_one("exists", &keys[i]).await?.is_some()) }
            })
            .buffered(inner.parallel)
            .try_collect()
            .await
    }

    async fn value_lens(&self, keys: &[BlockKey]) -> Result<Vec<Option<usize>>> {
        let inner = self.inner()?;
        stream::iter(0..keys.len())
            .map(|i| inner.len_one("value_lens", &keys[i]))
            .buffered(inner.parallel)
            .try_collect()
            .await
    }

    async fn put(&self, items: Vec<(BlockKey, IoVec)>) -> Result<Vec<PutOutcome>> {
        let inner = self.inner()?;
        // A key repeated in one batch is written once: the first copy decides, the others
        // report what a later call would. Sent together, the copies would race and either
        // could win.
        let mut repeats = Repeats::with_capacity(items.len());
        let mut work = Vec::with_capacity(items.len());
        let mut outcomes = Outcomes::new(items.len(), "put");
        for (index, (key, iov)) in items.iter().enumerate() {
            let checked = check_value_len(key, iov.len(), MAX_VALUE_SIZE, |len| {
                format!(
                    "a value of {len} bytes exceeds the object backend's limit of \
                     {MAX_VALUE_SIZE} bytes (S3's 5 GiB single PUT less the header)"
                )
            });
            if let Err(e) = checked {
                outcomes.set(index, PutOutcome::Failed(e));
                continue;
            }
            if repeats.first(index, key) {
                work.push(index);
            }
        }
        let stored: Vec<(usize, PutOutcome)> = stream::iter(work)
            .map(|index| {
                let inner = &inner;
                let (key, iov) = &items[index];
                async move { (index, inner.put_one(key, iov).await) }
            })
            .buffered(inner.parallel)
            .collect()
            .await;
        for (index, outcome) in stored {
            outcomes.set(index, outcome);
        }
        repeats.settle(&mut outcomes, repeat_failure);
        Ok(outcomes.into_vec())
    }

    async fn get_into(&self, items: Vec<(BlockKey, IoVecMut)>) -> Result<Vec<GetOutcome>> {
        let inner = self.inner()?;
        Ok(stream::iter(0..items.len())
            .map(|i| inner.get_one(&items[i].0, &items[i].1))
            .buffered(inner.parallel)
            .collect()
            .await)
    }

    async fn remove(&self, keys: &[BlockKey]) -> Result<()> {
        let inner = self.inner()?;
        if keys.is_empty() {
            return Ok(());
        }
        let names: Vec<object_store::Result<Path>> =
            keys.iter().map(|k| Ok(inner.name(k).0)).collect();
        // One permit for the whole stream: S3 and Azure send up to 1,000 keys per bulk
        // request, and the stores bound their own concurrency inside it.
        let _permit = inner
            .permits
            .acquire()
            .await
            .map_err(|_| Error::closed(SCHEME))?;
        // A generous bound for the whole stream: one request time per 1,000 keys.
        let requests = u32::try_from(keys.len() / 1000 + 1).unwrap_or(u32::MAX);
        let limit = inner.timeout.saturating_mul(requests);
        let results: Vec<object_store::Result<Path>> = tokio::time::timeout(
            limit,
            inner
                .store
                .delete_stream(stream::iter(names).boxed())
                .collect(),
        )
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "deleting {} objects did not finish within {} ms",
                    keys.len(),
                    limit.as_millis()
                ),
            )
            .with_operation("remove")
        })?;
        for r in results {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(classify("remove", e)),
            }
        }
        Ok(())
    }

    /// `Local` clears only a store of this process (`memory://`); `All` deletes every object
    /// of this backend's folder and key prefix, whoever wrote it.
    async fn clear(&self, scope: kvpool_core::ClearScope) -> Result<bool> {
        let inner = self.inner()?;
        if scope == kvpool_core::ClearScope::Local && self.info.capabilities.shared {
            return Ok(false);
        }
        let _permit = inner
            .permits
            .acquire()
            .await
            .map_err(|_| Error::closed(SCHEME))?;
        let leaf = inner.leaf_prefix.clone();
        let ours = inner
            .store
            .list(Some(&inner.dir))
            .map_ok(|meta| meta.location)
            .try_filter(move |path| {
                let mine = path.filename().is_some_and(|f| f.starts_with(&leaf));
                std::future::ready(mine)
            })
            .boxed();
        // Listing and deleting run in pages; bound the whole pass generously.
        let limit = inner.timeout.saturating_mul(100);
        let results: Vec<object_store::Result<Path>> =
            tokio::time::timeout(limit, inner.store.delete_stream(ours).collect())
                .await
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Timeout,
                        format!("clearing did not finish within {} ms", limit.as_millis()),
                    )
                    .with_operation("clear")
                })?;
        for r in results {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(classify("clear", e)),
            }
        }
        Ok(true)
    }

    async fn close(&self) -> Result<()> {
        // In-flight calls hold their own reference and finish; waiters for a permit fail
        // with Closed.
        self.inner.write().unwrap_or_else(|e| e.into_inner()).take();
        self.permits.close();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_prefix_folders_become_path_segments() {
        let root = Path::from("pool");
        let (dir, leaf) = split_key_prefix(&root, "");
        assert_eq!((dir.as_ref(), leaf.as_str()), ("pool", ""));
        let (dir, leaf) = split_key_prefix(&root, "a/b/kv-");
        assert_eq!((dir.as_ref(), leaf.as_str()), ("pool/a/b", "kv-"));
        let (dir, leaf) = split_key_prefix(&Path::default(), "a//");
        assert_eq!((dir.as_ref(), leaf.as_str()), ("a", ""));
    }
}
