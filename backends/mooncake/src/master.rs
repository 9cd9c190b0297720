//! Typed calls to `mooncake_master`, with its failures turned into kvpool errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvpool_core::{Error, ErrorKind, Result};

use crate::ha::Leader;
use crate::rpc::{RpcError, RpcPool, ERRC_INVALID_ARGUMENTS, ERRC_NOT_REGISTERED};
use crate::types::*;

/// The store version this client speaks (`ServiceReady`'s answer; the
/// official client requires the same exact string).
pub(crate) const STORE_VERSION: &str = "2.0.0";

/// The least time a revoke gets after its put used up the RPC timeout: enough
/// for a master that answers, short enough not to double a stalled one's.
const MIN_REVOKE_BUDGET: Duration = Duration::from_millis(100);

/// A master and the tenant our keys live in.
#[derive(Debug)]
pub(crate) struct Master {
    pool: RpcPool,
    tenant: String,
    /// An HA cluster's leader: calls that cannot reach the master look it up again.
    leader: Option<Arc<Leader>>,
}

impl Master {
    pub(crate) fn new(pool: RpcPool, tenant: String) -> Self {
        Master {
            pool,
            tenant,
            leader: None,
        }
    }

    /// Follows `leader` when the master stops answering.
    pub(crate) fn following(mut self, leader: Option<Arc<Leader>>) -> Self {
        self.leader = leader;
        self
    }

    pub(crate) fn addr(&self) -> String {
        self.pool.addr()
    }

    pub(crate) fn reset(&self) {
        self.pool.reset();
    }

    /// Moves to another master, as following a new HA leader does.
    #[cfg(test)]
    pub(crate) fn repoint(&self, to: &str) -> bool {
        self.pool.repoint(&self.pool.addr(), to)
    }

    /// A call that may run twice: reads, mounts, pings, removes. When an HA
    /// master cannot be reached and etcd names another leader, it is retried
    /// there once (within its own RPC timeout).
    async fn call<R: Rpc>(&self, op: &'static str, args: &R::Args) -> Result<R::Ret> {
        self.call_with::<R>(op, args, true, None).await
    }

    /// A call that must not be repeated on another master, sent only to the
    /// master of generation `pin` when given (the steps of a put: a put
    /// started on one leader cannot be ended on the next). A failure still
    /// moves the pool to the new leader for later calls.
    async fn call_once<R: Rpc>(
        &self,
        op: &'static str,
        args: &R::Args,
        pin: Option<u64>,
    ) -> Result<R::Ret> {
        self.call_with::<R>(op, args, false, pin).await
    }

    /// Which master calls go to now: pass it as the `pin` of every step of one put.
    pub(crate) fn epoch(&self) -> u64 {
        self.pool.generation()
    }

    async fn call_with<R: Rpc>(
        &self,
        op: &'static str,
        args: &R::Args,
        may_repeat: bool,
        pin: Option<u64>,
    ) -> Result<R::Ret> {
        let addr = self.pool.addr();
        let e = match self.pool.call::<R>(args, pin).await {
            Ok(ret) => return Ok(ret),
            Err(e) => e,
        };
        let Some(leader) = &self.leader else {
            return Err(rpc_error(e, &addr, op));
        };
        if !e.unreachable() {
            return Err(rpc_error(e, &addr, op));
        }
        let moved = leader.follow(&self.pool, &addr).await;
        // After a timeout the call's time is spent: the next call goes to the new leader.
        if !(moved && may_repeat && !matches!(e, RpcError::Timeout { .. })) {
            return Err(rpc_error(e, &addr, op));
        }
        let addr = self.pool.addr();
        self.pool
            .call::<R>(args, None)
            .await
            .map_err(|e| rpc_error(e, &addr, op))
    }

    /// `ServiceReady`; a version other than ours is a clear error.
    pub(crate) async fn service_ready(&self) -> Result<()> {
        let version = self.call::<ServiceReady>("open", &()).await?;
        match version {
            Ok(v) if v == STORE_VERSION => Ok(()),
            Ok(v) => Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "mooncake_master at {} speaks store version {v:?}, but kvpool speaks \
                     {STORE_VERSION:?} (mooncake_master 0.3.13); run a matching master",
                    self.addr()
                ),
            )),
            Err(code) => Err(app_error(code, "open", "ServiceReady")),
        }
    }

    /// Proves the master encodes the put path as kvpool decodes it: `ServiceReady`'s version
    /// string is the same ("2.0.0") across releases whose struct layouts differ, and a
    /// client that misreads them puts nothing (users of mismatched official clients see 0%
    /// hit rates and no error). A start of a 1-byte sentinel object, revoked at once,
    /// decodes the reply types every put uses. Inconclusive (and `Ok`) when the cluster has
    /// no free segment yet.
    pub(crate) async fn check_put_layout(
        &self,
        client: Uuid,
        config: &ReplicateConfig,
    ) -> Result<()> {
        let key = format!("kvpool-layout-probe-{client:?}");
        let args = (
            client,
            vec![key.clone()],
            vec![1u64],
            config.clone(),
            self.tenant.clone(),
        );
        match self.call_once::<BatchPutStart>("open", &args, None).await {
            Ok(started) => {
                if started.first().is_some_and(|r| r.is_ok()) {
                    let _ = self.batch_put_revoke(None, client, vec![key]).await;
                }
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::Unexpected => Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "mooncake_master at {} says store version {STORE_VERSION:?}, as \
                     mooncake_master 0.3.13 does, but encodes puts differently: it is another \
                     release (0.3.14 is known to differ), and kvpool speaks 0.3.13's layouts. \
                     Run mooncake_master from mooncake-transfer-engine-non-cuda==0.3.13.post1 \
                     (the probe's error: {e})",
                    self.addr()
                ),
            )),
            Err(e) => Err(e),
        }
    }

    /// `GetStorageConfig` (used only to check the connection and log the SSD tier).
    pub(crate) async fn storage_config(&self) -> Result<StorageConfig> {
        self.call::<GetStorageConfig>("open", &())
            .await?
            .map_err(|c| app_error(c, "open", "GetStorageConfig"))
    }

    pub(crate) async fn mount(&self, segment: &Segment, client: Uuid) -> Result<()> {
        self.call::<MountSegment>("open", &(segment.clone(), client))
            .await?
            .map_err(|c| app_error(c, "open", "MountSegment"))
    }

    pub(crate) async fn remount(&self, segments: &[Segment], client: Uuid) -> Result<()> {
        self.call::<ReMountSegment>("heartbeat", &(segments.to_vec(), client))
            .await?
            .map_err(|c| app_error(c, "heartbeat", "ReMountSegment"))
    }

    pub(crate) async fn unmount(&self, segment: Uuid, client: Uuid) -> Result<()> {
        self.call::<UnmountSegment>("close", &(segment, client))
            .await?
            .map_err(|c| app_error(c, "close", "UnmountSegment"))
    }

    pub(crate) async fn ping(&self, client: Uuid) -> Result<PingResponse> {
        self.call::<Ping>("heartbeat", &client)
            .await?
            .map_err(|c| app_error(c, "heartbeat", "Ping"))
    }

    #[allow(dead_code)] // the single-key forms are kept for tests and tools
    pub(crate) async fn exist(&self, key: &str) -> Result<Expected<bool>> {
        self.call::<ExistKey>("exists", &(key.to_owned(), self.tenant.clone()))
            .await
    }

    pub(crate) async fn batch_exist(&self, keys: Vec<String>) -> Result<Vec<Expected<bool>>> {
        let n = keys.len();
        let out = self
            .call::<BatchExistKey>("exists", &(keys, self.tenant.clone()))
            .await?;
        check_len(out, n, "exists", "BatchExistKey")
    }

    #[allow(dead_code)]
    pub(crate) async fn replica_list(&self, key: &str) -> Result<Expected<ReplicaList>> {
        self.call::<GetReplicaList>("get_into", &(key.to_owned(), self.tenant.clone()))
            .await
    }

    pub(crate) async fn batch_replica_list(
        &self,
        op: &'static str,
        keys: Vec<String>,
    ) -> Result<Vec<Expected<ReplicaList>>> {
        let n = keys.len();
        let out = self
            .call::<BatchGetReplicaList>(op, &(keys, self.tenant.clone()))
            .await?;
        check_len(out, n, op, "BatchGetReplicaList")
    }

    #[allow(dead_code)]
    pub(crate) async fn put_start(
        &self,
        client: Uuid,
        key: &str,
        len: u64,
        config: &ReplicateConfig,
    ) -> Result<Expected<Vec<ReplicaDescriptor>>> {
        let args = (
            client,
            key.to_owned(),
            len,
            config.clone(),
            self.tenant.clone(),
        );
        self.call_once::<PutStart>("put", &args, None).await
    }

    /// `BatchPutStart`, retrying the keys the master answers
    /// NO_AVAILABLE_HANDLE for (it evicts asynchronously) with exponential
    /// backoff for up to `retry_for`; only to the master of `pin` when given.
    pub(crate) async fn batch_put_start(
        &self,
        pin: Option<u64>,
        client: Uuid,
        items: &[(String, u64)],
        config: &ReplicateConfig,
        retry_for: Duration,
    ) -> Result<Vec<Expected<Vec<ReplicaDescriptor>>>> {
        let started = Instant::now();
        let op_started = started;
        let mut out: Vec<Option<Expected<Vec<ReplicaDescriptor>>>> = vec![None; items.len()];
        let mut todo: Vec<usize> = (0..items.len()).collect();
        let mut backoff = Duration::from_millis(5);
        loop {
            let keys = todo.iter().map(|&i| items[i].0.clone()).collect();
            let lens = todo.iter().map(|&i| items[i].1).collect();
            let args = (client, keys, lens, config.clone(), self.tenant.clone());
            let got = match self.call_once::<BatchPutStart>("put", &args, pin).await {
                Ok(got) => check_len(got, todo.len(), "put", "BatchPutStart"),
                Err(e) => Err(e),
            };
            let got = match got {
                Ok(got) => got,
                Err(e) => {
                    // Keys started by an earlier round, and those of this
                    // round whose outcome is unknown, must not stay
                    // PROCESSING: revoke them (the master refuses to revoke
                    // another client's put, so this cannot hurt anyone).
                    let mut started: Vec<String> = out
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| matches!(r, Some(Ok(_))))
                        .map(|(i, _)| items[i].0.clone())
                        .collect();
                    started.extend(todo.iter().map(|&i| items[i].0.clone()));
                    self.revoke_quietly(pin, client, started, op_started).await;
                    return Err(e);
                }
            };
            let mut again = Vec::new();
            for (i, r) in todo.into_iter().zip(got) {
                if r == Err(ErrorCode::NO_AVAILABLE_HANDLE) && started.elapsed() < retry_for {
                    again.push(i);
                } else {
                    out[i] = Some(r);
                }
            }
            if again.is_empty() {
                break;
            }
            todo = again;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every key answered"))
            .collect())
    }

    /// Best effort, within what is left of the RPC timeout of the put that
    /// began at `op_started` (at least [`MIN_REVOKE_BUDGET`]): a stalled
    /// master must not hold the caller for a second timeout, and the master
    /// discards what this misses after its put timeout.
    pub(crate) async fn revoke_quietly(
        &self,
        pin: Option<u64>,
        client: Uuid,
        keys: Vec<String>,
        op_started: Instant,
    ) {
        if keys.is_empty() {
            return;
        }
        let budget = self
            .pool
            .rpc_timeout()
            .saturating_sub(op_started.elapsed())
            .max(MIN_REVOKE_BUDGET);
        let revoked = tokio::time::timeout(budget, self.batch_put_revoke(pin, client, keys)).await;
        let error = match revoked {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {budget:?}"),
        };
        tracing::warn!(
            error,
            "PutRevoke failed; the master discards the keys after its put timeout"
        );
    }

    pub(crate) async fn batch_put_end(
        &self,
        pin: Option<u64>,
        client: Uuid,
        metas: Vec<ObjectMeta>,
    ) -> Result<Vec<Expected<()>>> {
        let n = metas.len();
        let args = (client, metas, REPLICA_TYPE_ALL, self.tenant.clone());
        let out = self.call_once::<BatchPutEnd>("put", &args, pin).await?;
        check_len(out, n, "put", "BatchPutEnd")
    }

    pub(crate) async fn batch_put_revoke(
        &self,
        pin: Option<u64>,
        client: Uuid,
        keys: Vec<String>,
    ) -> Result<Vec<Expected<()>>> {
        let n = keys.len();
        let args = (client, keys, REPLICA_TYPE_ALL, self.tenant.clone());
        let out = self.call_once::<BatchPutRevoke>("put", &args, pin).await?;
        check_len(out, n, "put", "BatchPutRevoke")
    }

    #[allow(dead_code)]
    pub(crate) async fn put_end(&self, client: Uuid, key: &str) -> Result<Expected<()>> {
        let meta = ObjectMeta {
            key: key.to_owned(),
            object_checksum: None,
        };
        let args = (client, meta, REPLICA_TYPE_ALL, self.tenant.clone());
        self.call_once::<PutEnd>("put", &args, None).await
    }

    #[allow(dead_code)]
    pub(crate) async fn put_revoke(&self, client: Uuid, key: &str) -> Result<Expected<()>> {
        let args = (
            client,
            key.to_owned(),
            REPLICA_TYPE_ALL,
            self.tenant.clone(),
        );
        self.call_once::<PutRevoke>("put", &args, None).await
    }

    #[allow(dead_code)]
    pub(crate) async fn remove_one(&self, key: &str, force: bool) -> Result<Expected<()>> {
        self.call::<Remove>("remove", &(key.to_owned(), force, self.tenant.clone()))
            .await
    }

    /// `RemoveAll` of our tenant; how many objects went (a plain count, not an `Expected`).
    pub(crate) async fn remove_all(&self, force: bool) -> Result<i64> {
        self.call::<RemoveAll>("clear", &(force, self.tenant.clone()))
            .await
    }

    pub(crate) async fn batch_remove(
        &self,
        keys: Vec<String>,
        force: bool,
    ) -> Result<Vec<Expected<()>>> {
        let n = keys.len();
        let out = self
            .call::<BatchRemove>("remove", &(keys, force, self.tenant.clone()))
            .await?;
        check_len(out, n, "remove", "BatchRemove")
    }
}

fn check_len<T>(out: Vec<T>, n: usize, op: &'static str, method: &str) -> Result<Vec<T>> {
    if out.len() == n {
        Ok(out)
    } else {
        Err(Error::new(
            ErrorKind::Unexpected,
            format!(
                "the master answered {method} for {n} keys with {} results",
                out.len()
            ),
        )
        .with_operation(op))
    }
}

/// An application error code from the master as a kvpool error.
pub(crate) fn app_error(code: ErrorCode, op: &'static str, method: &str) -> Error {
    let kind = match code {
        ErrorCode::NO_AVAILABLE_HANDLE => ErrorKind::NoSpace,
        ErrorCode(-901) => ErrorKind::Timeout,
        ErrorCode(-900) => ErrorKind::Unavailable,
        ErrorCode(-1700) => ErrorKind::NoSpace,
        ErrorCode(-400) | ErrorCode(-600) => ErrorKind::InvalidArgument,
        ErrorCode::LEASE_EXPIRED => ErrorKind::Timeout,
        _ => ErrorKind::Unexpected,
    };
    let hint = match code {
        ErrorCode::NO_AVAILABLE_HANDLE => {
            "; the pool is full and eviction did not free room in time (add segments or \
             lower the eviction watermark)"
        }
        ErrorCode(-1700) => "; the tenant's quota is used up",
        _ => "",
    };
    Error::new(
        kind,
        format!("mooncake_master answered {method} with {code}{hint}"),
    )
    .with_operation(op)
    .with_context("backend", "mooncake")
}

fn rpc_error(e: RpcError, addr: &str, op: &'static str) -> Error {
    let kind = match &e {
        RpcError::Connect { .. } | RpcError::Io { .. } | RpcError::Moved { .. } => {
            ErrorKind::Unavailable
        }
        RpcError::ConnectTimeout { .. } | RpcError::Timeout { .. } => ErrorKind::Timeout,
        RpcError::Remote { code, .. } if *code == ERRC_INVALID_ARGUMENTS => {
            return Error::new(
                ErrorKind::Unsupported,
                format!(
                    "mooncake_master rejected the argument types ({e}); its RPC types differ from \
                     those of mooncake_master 0.3.13 (store {STORE_VERSION}), which kvpool speaks"
                ),
            )
            .with_operation(op)
            .with_context("master", addr);
        }
        RpcError::Remote { code, .. } if *code == ERRC_NOT_REGISTERED => ErrorKind::Unsupported,
        RpcError::Remote { .. } | RpcError::Protocol(_) | RpcError::Codec { .. } => {
            ErrorKind::Unexpected
        }
    };
    Error::new(kind, e.to_string())
        .with_operation(op)
        .with_context("master", addr)
}
