//! Opening a client: connecting to the master and, for a segment owner,
//! serving and mounting the segment and keeping its heartbeat.

use std::net::{ToSocketAddrs, UdpSocket};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use kvpool_core::size::ByteSize;
use kvpool_core::{BackendInfo, Capabilities, Error, ErrorKind, MemRegion, Result};
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use super::{Inner, MooncakeBackend};
use crate::config::{check_ascend_buffer_pool, MooncakeConfig};
use crate::ha::{parse_master_address, Leader, MasterAddress};
use crate::master::Master;
use crate::rpc::RpcPool;
use crate::transfer::{LocalSegment, TransferClient, TransferServer};
use crate::types::*;
use crate::SCHEME;

/// How often a segment owner pings the master (the official client's cadence;
/// the master drops an owner's segment after `client_ttl`, 10 s by default).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// The ping cadence while the master is unreachable: a new HA leader (or a
/// restarted master) gets the segment back within this of starting to serve,
/// and pure clients can store into it no sooner.
const HEARTBEAT_FAILING: Duration = Duration::from_millis(250);

/// What a segment owner holds while its segment is mounted.
#[derive(Debug)]
pub(super) struct Owner {
    pub(super) segment: Segment,
    _server: TransferServer,
    pub(super) heartbeat: JoinHandle<()>,
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
                // The leader as last seen: a goodbye needs no etcd lookup.
                let pool = RpcPool::new(
                    self.master.addr(),
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
    /// `ASCEND_BUFFER_POOL`, `MC_RPC_TIMEOUT_MS`, `VLLM_HOST_IP` and, for an
    /// `etcd://` address, `MC_STORE_CLUSTER_ID` from the environment.
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
        let (addr, leader) = match parse_master_address(&cfg.master_server_address)? {
            MasterAddress::Direct(addr) => (addr, None),
            MasterAddress::Etcd(endpoints) => {
                let cluster = env("MC_STORE_CLUSTER_ID").unwrap_or_default();
                let leader = Leader::connect(endpoints, &cluster, timeouts.connect).await?;
                let view = leader.current();
                tracing::info!(
                    leader = view.leader.as_str(),
                    version = view.version,
                    "mooncake master leader resolved through etcd"
                );
                (view.leader, Some(Arc::new(leader)))
            }
        };
        let pool = RpcPool::new(
            addr.clone(),
            cfg.rpc_connections,
            timeouts.connect,
            timeouts.rpc,
        );
        let master = Master::new(pool, cfg.tenant_id.clone()).following(leader.clone());
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
            // Mapped lazily and faulted in behind the open: a 1 GiB segment no longer
            // holds start-up for the 0.6 s a memset of it took.
            let region = MemRegion::alloc(size);
            region.populate_in_background();
            let local = Arc::new(LocalSegment::new(region));
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
            let heartbeat = tokio::spawn(heartbeat(
                Master::new(
                    RpcPool::new(
                        master.addr(),
                        1,
                        timeouts.connect.min(Duration::from_secs(3)),
                        timeouts.rpc.min(Duration::from_secs(3)),
                    ),
                    cfg.tenant_id.clone(),
                )
                .following(leader.clone()),
                segment.clone(),
                client_id,
            ));
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
        if let Err(e) = master.check_put_layout(client_id, &replicate).await {
            if let Some(owner) = &owner {
                let _ = master.unmount(owner.segment.id, client_id).await;
            }
            return Err(e);
        }
        let checksum = cfg.checksum
            || env("MOONCAKE_STORE_CHECKSUM").is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            });
        let master_text = match &leader {
            Some(_) => format!(
                "master {} (leader {addr})",
                cfg.master_server_address.trim()
            ),
            None => format!("master {addr}"),
        };
        let description = match &endpoint {
            Some(ep) => format!("{master_text}, segment owner of {} at {ep}", ByteSize(size)),
            None => format!("{master_text}, pure client"),
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
                // BatchGetReplicaList's read lease: the master evicts no leased object.
                holds_for_load: true,
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

/// Pings every second (every 250 ms while failing) on a connection of its
/// own; remounts on NEED_REMOUNT (the first ping after a mount, and after the
/// master restarted or expired us). `master` follows an HA leader: a new
/// leader knows nothing of our segment, and its first ping answers NEED_REMOUNT.
async fn heartbeat(master: Master, segment: Segment, client: Uuid) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry = tokio::time::interval(HEARTBEAT_FAILING);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        if failing {
            retry.tick().await;
        } else {
            tick.tick().await;
        }
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
                    tracing::warn!(error = %e, "mooncake heartbeat failed; retrying every 250 ms");
                }
                failing = true;
                master.reset();
            }
        }
    }
}
