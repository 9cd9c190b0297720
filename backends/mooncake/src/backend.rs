use std::collections::HashMap;
use std::net::{ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kvpool_core::batch::{check_value_len, Outcomes, Repeats};
use kvpool_core::size::ByteSize;
use kvpool_core::{
    BackendInfo, BlockKey, Capabilities, Error, ErrorKind, GetOutcome, IoVec, IoVecMut, KvBackend,
    MemRegion, PutOutcome, Result,
};
use parking_lot::Mutex;
use tokio::task::{JoinHandle, JoinSet};

use crate::config::{check_ascend_buffer_pool, MooncakeConfig, Timeouts};
use crate::master::{app_error, Master};
use crate::rpc::RpcPool;
use crate::transfer::{LocalSegment, Op, TransferClient, TransferError, TransferServer};
use crate::types::*;
use crate::SCHEME;

/// How often a segment owner pings the master (the official client's cadence;
/// the master drops an owner's segment after `client_ttl`, 10 s by default).
const HEARTBEAT: Duration = Duration::from_secs(1);

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

#[derive(Debug)]
struct Owner {
    segment: Segment,
    _server: TransferServer,
    heartbeat: JoinHandle<()>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropped without close(): unmount in the background if a runtime is
        // still there, so peers stop being sent to a server that is gone;
        // otherwise the master expires the segment after its client TTL.
        if let Some(owner) = self.owner.get_mut().take() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                let pool = RpcPool::new(
                    self.cfg.master_server_address.clone(),
                    1,
                    self.timeouts.connect,
                    Duration::from_secs(2),
                );
                let master = Master::new(pool, self.cfg.tenant_id.clone());
                let (seg, client) = (owner.segment.id, self.client_id);
                handle.spawn(async move {
                    let _ = master.unmount(seg, client).await;
                });
            }
        }
    }
}

impl MooncakeBackend {
    /// Connects to the master (and, for an owner, mounts the segment),
    /// reading `ASCEND_CONNECT_TIMEOUT`, `ASCEND_TRANSFER_TIMEOUT`,
    /// `ASCEND_BUFFER_POOL`, `MC_RPC_TIMEOUT_MS` and `VLLM_HOST_IP` from the
    /// environment.
    pub async fn open(cfg: MooncakeConfig) -> Result<Self> {
        let env = |k: &str| std::env::var(k).ok();
        Self::open_with_env(cfg, &env).await
    }

    /// [`open`](Self::open) with the environment given as a function.
    pub async fn open_with_env(
        cfg: MooncakeConfig,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Result<Self> {
        cfg.validate()?;
        check_ascend_buffer_pool(env("ASCEND_BUFFER_POOL"))?;
        let timeouts = cfg.timeouts(env)?;
        let addr = cfg.master_server_address.trim().to_owned();
        let pool = RpcPool::new(
            addr.clone(),
            cfg.rpc_connections,
            timeouts.connect,
            timeouts.rpc,
        );
        let master = Master::new(pool, cfg.tenant_id.clone());
        master.service_ready().await?;
        if let Ok(storage) = master.storage_config().await {
            tracing::debug!(?storage, "mooncake master storage config");
        }

        let host = if !cfg.local_hostname.trim().is_empty() {
            cfg.local_hostname.trim().to_owned()
        } else if let Some(ip) = env("VLLM_HOST_IP").filter(|v| !v.trim().is_empty()) {
            ip.trim().to_owned()
        } else {
            route_to(&addr).unwrap_or_else(|| "127.0.0.1".into())
        };
        let client_id = Uuid::random();
        let size = cfg.global_segment_size.0;
        let (owner, segment, endpoint) = if size > 0 {
            let size = usize::try_from(size).map_err(|_| {
                Error::config_invalid(format!(
                    "mooncake.global_segment_size {} does not fit in memory",
                    cfg.global_segment_size
                ))
            })?;
            let local = Arc::new(LocalSegment::new(MemRegion::alloc(size)));
            let server = TransferServer::start(&host, local.clone(), cfg.tcp_congestion.clone())
                .await
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Unavailable,
                        format!("cannot listen on {host} for the segment's peers"),
                    )
                    .set_source(e)
                })?;
            let endpoint = server.endpoint().to_owned();
            let segment = Segment {
                id: Uuid::random(),
                name: endpoint.clone(),
                base: local.base(),
                size: local.size(),
                te_endpoint: endpoint.clone(),
                protocol: "tcp".into(),
                host_id: String::new(),
            };
            master.mount(&segment, client_id).await?;
            let heartbeat =
                tokio::spawn(heartbeat(cfg.clone(), timeouts, segment.clone(), client_id));
            let owner = Owner {
                segment,
                _server: server,
                heartbeat,
            };
            (Some(owner), Some(local), Some(endpoint))
        } else {
            (None, None, None)
        };

        let my_name = endpoint.clone().unwrap_or_else(|| format!("{host}:0"));
        let transfer = Arc::new(TransferClient::new(
            &my_name,
            &host,
            segment.as_deref(),
            timeouts.connect,
            timeouts.transfer,
            cfg.tcp_congestion.clone(),
        ));
        let replicate = ReplicateConfig {
            replica_num: cfg.replica_num,
            // Like the official client: our own segment first, so an owner's
            // puts are local copies and survive other owners leaving.
            preferred_segment: endpoint.clone().unwrap_or_default(),
            prefer_alloc_in_same_node: cfg.alloc_in_same_node,
            ..ReplicateConfig::default()
        };
        let checksum = cfg.checksum
            || env("MOONCAKE_STORE_CHECKSUM").is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            });
        let description = match &endpoint {
            Some(ep) => format!("master {addr}, segment owner of {} at {ep}", ByteSize(size)),
            None => format!("master {addr}, pure client"),
        };
        let info = BackendInfo {
            scheme: SCHEME,
            description,
            capabilities: Capabilities {
                shared: true,
                persistent: false,
                remove: true,
                requires_registration: false,
                capacity_bound: true,
                max_batch: None,
                max_value_size: None,
            },
        };
        Ok(MooncakeBackend {
            info,
            inner: Arc::new(Inner {
                cfg,
                master,
                client_id,
                owner: Mutex::new(owner),
                segment,
                endpoint,
                transfer,
                replicate,
                timeouts,
                checksum,
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// This client's segment endpoint (`host:port`), when it owns one.
    pub fn segment_endpoint(&self) -> Option<&str> {
        self.inner.endpoint.as_deref()
    }

    #[cfg(test)]
    pub(crate) fn inner_segment(&self) -> Option<&Arc<LocalSegment>> {
        self.inner.segment.as_ref()
    }
}

/// The local address of the route to `addr`: the address peers reach us at
/// in the master's network. A UDP connect sends no packet.
fn route_to(addr: &str) -> Option<String> {
    let target = addr.to_socket_addrs().ok()?.next()?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip().to_string())
}

/// Pings every second on a connection of its own; remounts on NEED_REMOUNT
/// (the first ping after a mount, and after the master restarted or expired us).
async fn heartbeat(cfg: MooncakeConfig, timeouts: Timeouts, segment: Segment, client: Uuid) {
    let pool = RpcPool::new(
        cfg.master_server_address.clone(),
        1,
        timeouts.connect.min(Duration::from_secs(3)),
        timeouts.rpc.min(Duration::from_secs(3)),
    );
    let master = Master::new(pool, cfg.tenant_id);
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let result = match master.ping(client).await {
            Ok(r) if r.client_status == CLIENT_NEED_REMOUNT => {
                master.remount(std::slice::from_ref(&segment), client).await
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) if failing => {
                tracing::info!(master = master.addr(), "mooncake master reachable again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "mooncake heartbeat failed; retrying every second");
                }
                failing = true;
                master.reset();
            }
        }
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
        let started = self
            .master
            .batch_put_start(self.client_id, &request, &self.replicate, retry)
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
        for i in 0..n {
            if outcomes.is_set(i) {
                continue;
            }
            if failed[i].is_some() {
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
            match self.master.batch_put_end(self.client_id, metas).await {
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
            self.master.revoke_quietly(self.client_id, keys).await;
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
            .map(
                |(o, (sum, dst))| match (o, sum) {
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
                },
            )
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
