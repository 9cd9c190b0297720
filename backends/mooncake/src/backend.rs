//! The backend's state and the data path of the [`KvBackend`] calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kvpool_core::batch::{check_value_len, Outcomes, Repeats};
use kvpool_core::{
    BackendInfo, BlockKey, Error, ErrorKind, GetOutcome, IoVec, IoVecMut, KvBackend, PutOutcome,
    Result,
};
use parking_lot::Mutex;
use tokio::task::JoinSet;

use crate::config::{MooncakeConfig, Timeouts};
use crate::master::{app_error, Master};
use crate::transfer::{LocalSegment, Op, TransferClient, TransferError};
use crate::types::*;
use crate::SCHEME;

// Parts of this backend (backend/*.rs), children of this module so they
// reach its private state.
mod open;

use open::Owner;

/// A client of an unmodified `mooncake_master`: master RPC over coro_rpc, data
/// over the transfer engine's TCP protocol.
///
/// With `global_segment_size > 0` it is a *segment owner*: it contributes
/// that much memory to the pool, serves it to peers (handshake daemon + TCP
/// data server), and keeps the master's heartbeat. With `0` it is a *pure
/// client* that stores into other owners' segments.
#[derive(Debug)]
pub struct MooncakeBackend {
    info: BackendInfo,
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: MooncakeConfig,
    master: Master,
    client_id: Uuid,
    owner: Mutex<Option<Owner>>,
    segment: Option<Arc<LocalSegment>>,
    /// Our `te_endpoint` when we own a segment: replicas there are local.
    endpoint: Option<String>,
    transfer: Arc<TransferClient>,
    replicate: ReplicateConfig,
    timeouts: Timeouts,
    /// Store checksums with puts (`checksum` or `MOONCAKE_STORE_CHECKSUM=1`).
    checksum: bool,
    closed: AtomicBool,
}

impl MooncakeBackend {
    /// This client's segment endpoint (`host:port`), when it owns one.
    pub fn segment_endpoint(&self) -> Option<&str> {
        self.inner.endpoint.as_deref()
    }

    #[cfg(test)]
    pub(crate) fn inner_segment(&self) -> Option<&Arc<LocalSegment>> {
        self.inner.segment.as_ref()
    }
}

/// The replica a reader should use: a complete one in memory.
fn readable(list: &ReplicaList) -> Option<&BufferDescriptor> {
    list.replicas.iter().find_map(|r| match &r.location {
        ReplicaLocation::Memory(d) if r.status == REPLICA_COMPLETE => Some(d),
        _ => None,
    })
}

fn is_absent(code: ErrorCode) -> bool {
    code == ErrorCode::OBJECT_NOT_FOUND || code == ErrorCode::REPLICA_IS_NOT_READY
}

fn transfer_error(e: TransferError, op: &'static str) -> Error {
    let kind = match &e {
        TransferError::ConnectTimeout { .. } | TransferError::Timeout { .. } => ErrorKind::Timeout,
        TransferError::Connect { .. }
        | TransferError::Io { .. }
        | TransferError::Handshake { .. } => ErrorKind::Unavailable,
        TransferError::Rejected { .. } => ErrorKind::Unexpected,
    };
    Error::new(kind, e.to_string())
        .with_operation(op)
        .with_context("backend", SCHEME)
}

/// Where one key's transfer goes.
enum Plan<T> {
    Done(T),
    Local(u64),
    Remote(String, u64),
}

impl Inner {
    fn check_open(&self, op: &'static str) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::closed(SCHEME).with_operation(op))
        } else {
            Ok(())
        }
    }

    fn is_local(&self, d: &BufferDescriptor) -> bool {
        self.endpoint.as_deref() == Some(d.transport_endpoint.as_str())
    }

    /// Runs remote ops grouped by owner, owners in parallel; one result per op.
    async fn run_remote(
        &self,
        ops: Vec<(String, Op)>,
    ) -> Vec<std::result::Result<(), TransferError>> {
        let n = ops.len();
        let mut by_peer: HashMap<String, (Vec<usize>, Vec<Op>)> = HashMap::new();
        for (i, (endpoint, op)) in ops.into_iter().enumerate() {
            let e = by_peer.entry(endpoint).or_default();
            e.0.push(i);
            e.1.push(op);
        }
        let mut results = Outcomes::new(n, "transfer");
        if by_peer.len() == 1 {
            let (endpoint, (idx, ops)) = by_peer.into_iter().next().expect("one peer");
            for (i, r) in idx.into_iter().zip(self.transfer.run(&endpoint, ops).await) {
                results.set(i, r);
            }
        } else {
            let mut set = JoinSet::new();
            for (endpoint, (idx, ops)) in by_peer {
                let transfer = self.transfer.clone();
                set.spawn(async move { (idx, transfer.run(&endpoint, ops).await) });
            }
            while let Some(Ok((idx, out))) = set.join_next().await {
                for (i, r) in idx.into_iter().zip(out) {
                    results.set(i, r);
                }
            }
        }
        results.into_vec_with(|_| {
            Err(TransferError::Io {
                addr: String::new(),
                source: std::io::Error::other("the transfer task failed"),
            })
        })
    }

    async fn put_unique(&self, items: Vec<(String, IoVec)>) -> Result<Vec<PutOutcome>> {
        let n = items.len();
        let request: Vec<(String, u64)> = items
            .iter()
            .map(|(k, v)| (k.clone(), v.len() as u64))
            .collect();
        let retry = Duration::from_millis(self.cfg.no_space_retry_ms);
        // Every step of this put goes to the master that starts it: after an
        // HA failover the new leader knows nothing of it, and ending it there
        // could end another put of the same key.
        let pin = Some(self.master.epoch());
        let op_started = Instant::now();
        let started = self
            .master
            .batch_put_start(pin, self.client_id, &request, &self.replicate, retry)
            .await?;

        let mut outcomes = Outcomes::new(n, "put");
        // Per key: transfers left to succeed; any failure revokes the key.
        let mut failed: Vec<Option<Error>> = (0..n).map(|_| None).collect();
        let mut remote: Vec<(String, Op)> = Vec::new();
        let mut remote_key: Vec<usize> = Vec::new();
        for (i, r) in started.into_iter().enumerate() {
            let replicas = match r {
                Ok(replicas) => replicas,
                Err(ErrorCode::OBJECT_ALREADY_EXISTS) => {
                    outcomes.set(i, PutOutcome::Exists);
                    continue;
                }
                Err(code) => {
                    outcomes.set(i, PutOutcome::Failed(app_error(code, "put", "PutStart")));
                    continue;
                }
            };
            let src = &items[i].1;
            for rep in replicas {
                let d = match rep.location {
                    ReplicaLocation::Memory(d) => d,
                    other => {
                        failed[i] = Some(Error::new(
                            ErrorKind::Unsupported,
                            format!(
                                "the master placed a replica on {} storage, which this client \
                                 cannot write",
                                other.kind()
                            ),
                        ));
                        continue;
                    }
                };
                if d.size != src.len() as u64 {
                    failed[i] = Some(Error::new(
                        ErrorKind::Unexpected,
                        format!(
                            "the master allocated {} bytes for a {}-byte value",
                            d.size,
                            src.len()
                        ),
                    ));
                } else if self.is_local(&d) {
                    let segment = self.segment.as_ref().expect("local implies a segment");
                    if !segment.write_from(d.buffer_address, src) {
                        failed[i] = Some(Error::new(
                            ErrorKind::Unexpected,
                            format!(
                                "the master allocated {:#x}+{} outside our segment",
                                d.buffer_address, d.size
                            ),
                        ));
                    }
                } else {
                    remote_key.push(i);
                    remote.push((
                        d.transport_endpoint,
                        Op::Write {
                            addr: d.buffer_address,
                            src: src.clone(),
                        },
                    ));
                }
            }
        }
        if !remote.is_empty() {
            for (i, r) in remote_key.into_iter().zip(self.run_remote(remote).await) {
                if let Err(e) = r {
                    if failed[i].is_none() {
                        failed[i] = Some(transfer_error(e, "put"));
                    }
                }
            }
        }

        // Every started key is now either ended or revoked.
        let mut end: Vec<usize> = Vec::new();
        let mut revoke: Vec<usize> = Vec::new();
        for (i, failure) in failed.iter().enumerate() {
            if outcomes.is_set(i) {
                continue;
            }
            if failure.is_some() {
                revoke.push(i);
            } else {
                end.push(i);
            }
        }
        let mut outer: Option<Error> = None;
        if !end.is_empty() {
            let metas = end
                .iter()
                .map(|&i| ObjectMeta {
                    key: items[i].0.clone(),
                    object_checksum: self
                        .checksum
                        .then(|| crate::checksum::crc64(items[i].1.chunks())),
                })
                .collect();
            match self.master.batch_put_end(pin, self.client_id, metas).await {
                Ok(res) => {
                    for (&i, r) in end.iter().zip(res) {
                        match r {
                            Ok(()) => outcomes.set(i, PutOutcome::Stored),
                            Err(code) => {
                                failed[i] = Some(app_error(code, "put", "PutEnd"));
                                revoke.push(i);
                            }
                        }
                    }
                }
                Err(e) => {
                    // Unknown whether the master ended them: the master
                    // refuses to revoke an ended put, and cleans up the rest.
                    revoke.extend(end.iter().copied());
                    outer = Some(e);
                }
            }
        }
        if !revoke.is_empty() {
            let keys = revoke.iter().map(|&i| items[i].0.clone()).collect();
            self.master
                .revoke_quietly(pin, self.client_id, keys, op_started)
                .await;
            for &i in &revoke {
                let e = failed[i].take().unwrap_or_else(|| {
                    Error::new(ErrorKind::Unavailable, "the put could not be ended")
                });
                outcomes.set(i, PutOutcome::Failed(e.with_operation("put")));
            }
        }
        if let Some(e) = outer {
            return Err(e);
        }
        Ok(outcomes.into_vec())
    }

    async fn get_into(&self, items: Vec<(BlockKey, IoVecMut)>) -> Result<Vec<GetOutcome>> {
        let keys: Vec<String> = items.iter().map(|(k, _)| k.to_key_string()).collect();
        let asked = Instant::now();
        let lists = self.master.batch_replica_list("get_into", keys).await?;
        let mut plans: Vec<Plan<GetOutcome>> = Vec::with_capacity(items.len());
        let mut lease = Duration::MAX;
        let sums: Vec<Option<u64>> = lists
            .iter()
            .map(|r| r.as_ref().ok().and_then(|l| l.object_checksum))
            .collect();
        for ((_, dst), r) in items.iter().zip(&lists) {
            let plan = match r {
                Err(code) if is_absent(*code) => Plan::Done(GetOutcome::Miss),
                Err(code) => Plan::Done(GetOutcome::Failed(app_error(
                    *code,
                    "get_into",
                    "GetReplicaList",
                ))),
                Ok(list) => match readable(list) {
                    None => Plan::Done(GetOutcome::Miss),
                    Some(d) if d.size != dst.len() as u64 => {
                        Plan::Done(GetOutcome::Failed(Error::invalid_argument(format!(
                            "destination holds {} bytes but the value has {}",
                            dst.len(),
                            d.size
                        ))))
                    }
                    Some(d) => {
                        lease = lease.min(Duration::from_millis(list.lease_ttl_ms));
                        if self.is_local(d) {
                            Plan::Local(d.buffer_address)
                        } else {
                            Plan::Remote(d.transport_endpoint.clone(), d.buffer_address)
                        }
                    }
                },
            };
            plans.push(plan);
        }

        let mut out = Outcomes::new(items.len(), "get_into");
        let mut remote: Vec<(String, Op)> = Vec::new();
        let mut remote_idx = Vec::new();
        let dsts: Vec<IoVecMut> = items.iter().map(|(_, d)| d.clone()).collect();
        for (i, (plan, (_, dst))) in plans.into_iter().zip(items).enumerate() {
            match plan {
                Plan::Done(o) => out.set(i, o),
                Plan::Local(addr) => {
                    let segment = self.segment.as_ref().expect("local implies a segment");
                    out.set(
                        i,
                        if segment.read_into(addr, &dst) {
                            GetOutcome::Hit
                        } else {
                            GetOutcome::Failed(Error::new(
                                ErrorKind::Unexpected,
                                format!("the master named {addr:#x} outside our segment"),
                            ))
                        },
                    );
                }
                Plan::Remote(endpoint, addr) => {
                    remote_idx.push(i);
                    remote.push((endpoint, Op::Read { addr, dst }));
                }
            }
        }
        if !remote.is_empty() {
            for (i, r) in remote_idx.into_iter().zip(self.run_remote(remote).await) {
                out.set(
                    i,
                    match r {
                        Ok(()) => GetOutcome::Hit,
                        Err(e) => GetOutcome::Failed(transfer_error(e, "get_into")),
                    },
                );
            }
        }
        // Past the lease the master may have evicted and reused the memory:
        // the bytes cannot be trusted (the official client fails the same way).
        let took = asked.elapsed();
        Ok(out
            .into_vec()
            .into_iter()
            .zip(sums.iter().zip(&dsts))
            .map(|(o, (sum, dst))| match (o, sum) {
                (GetOutcome::Hit, Some(want)) => {
                    let chunks = dst.slices().iter().map(|s| {
                        // SAFETY: in bounds (checked at push), just written
                        // by this get, which has exclusive use of it.
                        unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, s.len()) }
                    });
                    let got = crate::checksum::crc64(chunks);
                    if got == *want {
                        GetOutcome::Hit
                    } else {
                        GetOutcome::Failed(
                            Error::new(
                                ErrorKind::Corrupted,
                                format!(
                                    "the value's CRC-64 is {got:#018x} but the writer stored \
                                     {want:#018x}"
                                ),
                            )
                            .with_operation("get_into"),
                        )
                    }
                }
                (o, _) => o,
            })
            .map(|o| match o {
                GetOutcome::Hit if took > lease => GetOutcome::Failed(
                    Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "the read took {} ms, longer than the master's {} ms lease; the \
                             bytes may have been overwritten",
                            took.as_millis(),
                            lease.as_millis()
                        ),
                    )
                    .with_operation("get_into"),
                ),
                other => other,
            })
            .collect())
    }
}

#[async_trait]
impl KvBackend for MooncakeBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>> {
        self.inner.check_open("exists")?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let names = keys.iter().map(BlockKey::to_key_string).collect();
        self.inner
            .master
            .batch_exist(names)
            .await?
            .into_iter()
            .map(|r| r.map_err(|code| app_error(code, "exists", "BatchExistKey")))
            .collect()
    }

    /// BatchGetReplicaList in place of BatchExistKey: the master grants every object it lists
    /// a read lease (`--default_kv_lease_ttl`, 10 s by default, answered as `lease_ttl_ms`)
    /// and evicts no leased object, so what this finds stays until the load. The lease's
    /// length is the master's, whatever `hold` asks; a leased object also refuses `remove`
    /// (without force) until it ends, and a put that only leased objects could make room for
    /// fails with NO_AVAILABLE_HANDLE meanwhile.
    async fn exists_for_load(&self, keys: &[BlockKey], hold: Duration) -> Result<Vec<bool>> {
        self.inner.check_open("exists_for_load")?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        if hold.is_zero() {
            return self.exists(keys).await;
        }
        let names = keys.iter().map(BlockKey::to_key_string).collect();
        self.inner
            .master
            .batch_replica_list("exists_for_load", names)
            .await?
            .into_iter()
            .map(|r| match r {
                Ok(list) => Ok(readable(&list).is_some()),
                Err(code) if is_absent(code) => Ok(false),
                Err(code) => Err(app_error(code, "exists_for_load", "GetReplicaList")),
            })
            .collect()
    }

    async fn value_lens(&self, keys: &[BlockKey]) -> Result<Vec<Option<usize>>> {
        self.inner.check_open("value_lens")?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let names = keys.iter().map(BlockKey::to_key_string).collect();
        self.inner
            .master
            .batch_replica_list("value_lens", names)
            .await?
            .into_iter()
            .map(|r| match r {
                Ok(list) => Ok(readable(&list).map(|d| d.size as usize)),
                Err(code) if is_absent(code) => Ok(None),
                Err(code) => Err(app_error(code, "value_lens", "GetReplicaList")),
            })
            .collect()
    }

    async fn put(&self, items: Vec<(BlockKey, IoVec)>) -> Result<Vec<PutOutcome>> {
        self.inner.check_open("put")?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut outcomes = Outcomes::new(items.len(), "put");
        let mut repeats = Repeats::with_capacity(items.len());
        // Each key once, with its index in `items`.
        let mut unique: Vec<(String, IoVec)> = Vec::new();
        let mut unique_index = Vec::new();
        for (i, (key, value)) in items.into_iter().enumerate() {
            // No upper bound here: the master refuses what no segment can hold.
            if let Err(e) = check_value_len(&key, value.len(), usize::MAX, |len| {
                format!("a value of {len} bytes is too large")
            }) {
                outcomes.set(i, PutOutcome::Failed(e));
                continue;
            }
            let name = key.to_key_string();
            if repeats.first(i, key) {
                unique_index.push(i);
                unique.push((name, value));
            }
        }
        let stored = if unique.is_empty() {
            Vec::new()
        } else {
            // A spawned task runs to the end even if the caller drops this
            // future, so every started put is ended or revoked.
            let inner = self.inner.clone();
            tokio::spawn(async move { inner.put_unique(unique).await })
                .await
                .map_err(|e| {
                    Error::new(ErrorKind::Unexpected, format!("the put task failed: {e}"))
                })??
        };
        for (i, outcome) in unique_index.into_iter().zip(stored) {
            outcomes.set(i, outcome);
        }
        // A repeat shares its first's fate; a failure is restated for it.
        repeats.settle(&mut outcomes, |e| {
            Error::new(
                e.kind(),
                format!("same key earlier in the batch: {}", e.message()),
            )
        });
        Ok(outcomes.into_vec())
    }

    async fn get_into(&self, items: Vec<(BlockKey, IoVecMut)>) -> Result<Vec<GetOutcome>> {
        self.inner.check_open("get_into")?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.inner.get_into(items).await
    }

    /// `Local` leaves the shared pool alone; `All` is the master's `RemoveAll` of this tenant
    /// (forced, so objects being read go too), as vLLM's own Mooncake connector resets it.
    async fn clear(&self, scope: kvpool_core::ClearScope) -> Result<bool> {
        self.inner.check_open("clear")?;
        if scope == kvpool_core::ClearScope::Local {
            return Ok(false);
        }
        let removed = self.inner.master.remove_all(true).await?;
        if removed < 0 {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("mooncake_master refused RemoveAll (code {removed})"),
            ));
        }
        tracing::info!(removed, "mooncake pool cleared");
        Ok(true)
    }

    async fn remove(&self, keys: &[BlockKey]) -> Result<()> {
        self.inner.check_open("remove")?;
        if keys.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = keys.iter().map(BlockKey::to_key_string).collect();
        let results = self.inner.master.batch_remove(names.clone(), false).await?;
        let mut leased = Vec::new();
        for (name, r) in names.into_iter().zip(results) {
            match r {
                Ok(()) => {}
                Err(code) if is_absent(code) => {}
                Err(ErrorCode::OBJECT_HAS_LEASE) => leased.push(name),
                Err(code) => return Err(app_error(code, "remove", "BatchRemove")),
            }
        }
        if leased.is_empty() {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "{} of the keys are being read (a read lease lasts up to the master's \
                     default_kv_lease_ttl) and were kept; the others were removed; retry later",
                    leased.len()
                ),
            )
            .with_operation("remove")
            .with_context("key", &leased[0]))
        }
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let owner = self.inner.owner.lock().take();
        if let Some(owner) = owner {
            owner.heartbeat.abort();
            let unmount = self
                .inner
                .master
                .unmount(owner.segment.id, self.inner.client_id);
            match tokio::time::timeout(self.inner.timeouts.connect, unmount).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(
                    error = %e,
                    "UnmountSegment failed; the master drops the segment after its client TTL"
                ),
                Err(_) => tracing::warn!(
                    "UnmountSegment timed out; the master drops the segment after its client TTL"
                ),
            }
            drop(owner);
        }
        self.inner.transfer.reset();
        self.inner.master.reset();
        Ok(())
    }
}
