//! Mooncake's transfer engine, protocol "tcp" with metadata "P2PHANDSHAKE".
//!
//! - Handshake: one short TCP exchange with a segment owner's `te_endpoint`:
//!   `u64 LE length (1 + json)`, `u8 type` (1 = metadata), the JSON segment
//!   descriptor; the owner answers with its own and shuts down its side.
//! - Data: persistent connections to the owner's `tcp_data_port`; a request is
//!   `{u64 size, u64 addr, u8 opcode, 7 pad}` (opcode 0 READ, 1 WRITE, `|0x80`
//!   for v2 framing, which adds an 8-byte status `"MCTV" << 32 | code`).
//!
//! Requests to one peer are pipelined on a connection: the owner serves a
//! connection's requests in order, so a batch costs one round trip per lane
//! instead of one per value. Neither side copies a value through a buffer of
//! its own: the owner `writev`s answers straight from its segment and the
//! reader `readv`s them straight into the destinations, so the kernel's copies
//! are the only ones (what a layerwise load of thousands of small values, on
//! cores the forward also uses, is paced by).

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use kvpool_core::buffer::copy_segments;
use kvpool_core::{IoVec, IoVecMut, MemRegion};
use parking_lot::Mutex;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

const HANDSHAKE_METADATA: u8 = 1;
/// `MC_HANDSHAKE_MAX_LENGTH`.
const HANDSHAKE_MAX: u64 = 1 << 20;
const OP_READ: u8 = 0;
const OP_WRITE: u8 = 1;
const V2: u8 = 0x80;
const STATUS_MAGIC: u64 = 0x4d43_5456 << 32;
const STATUS_OK: u64 = STATUS_MAGIC;
const STATUS_REJECTED: u64 = STATUS_MAGIC | 1;
const HEADER_LEN: usize = 24;
/// Connections per peer, as the official initiator (`MC_TCP_LANES_PER_PEER`).
const LANES: usize = 4;
/// Values up to this size are coalesced with their header into one write.
const SMALL: usize = 64 << 10;
const IO_BUFFER: usize = 256 << 10;

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransferError {
    #[error("cannot connect to {what} {addr}: {source}")]
    Connect {
        what: &'static str,
        addr: String,
        source: io::Error,
    },
    #[error("connecting to {what} {addr} took longer than {ms} ms (ASCEND_CONNECT_TIMEOUT)")]
    ConnectTimeout {
        what: &'static str,
        addr: String,
        ms: u128,
    },
    #[error("a transfer with {addr} took longer than {ms} ms (ASCEND_TRANSFER_TIMEOUT)")]
    Timeout { addr: String, ms: u128 },
    #[error("the connection to {addr} broke: {source}")]
    Io { addr: String, source: io::Error },
    #[error("the handshake with {addr} failed: {why}")]
    Handshake { addr: String, why: String },
    #[error("{addr} rejected {op} of {size} bytes at {at:#x} (status {status:#x}): the address is outside its segment")]
    Rejected {
        addr: String,
        op: &'static str,
        size: u64,
        at: u64,
        status: u64,
    },
}

/// This process's segment: the memory it contributes, addressed by peers at
/// `base + offset`. `base` is the real address, as the official client
/// advertises, which keeps addresses unique across the process's segments.
#[derive(Debug)]
pub(crate) struct LocalSegment {
    region: Arc<MemRegion>,
    base: u64,
}

impl LocalSegment {
    pub(crate) fn new(region: Arc<MemRegion>) -> Self {
        let base = region.as_ptr() as u64;
        LocalSegment { region, base }
    }

    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    pub(crate) fn size(&self) -> u64 {
        self.region.len() as u64
    }

    /// The local pointer for `[addr, addr + len)`, when it lies inside.
    pub(crate) fn locate(&self, addr: u64, len: u64) -> Option<*mut u8> {
        let off = addr.checked_sub(self.base)?;
        let end = off.checked_add(len)?;
        if len == 0 || end > self.size() {
            return None;
        }
        // SAFETY: `off + len <= region.len()` was just checked.
        Some(unsafe { self.region.as_ptr().add(off as usize) })
    }

    /// Copies `src` into the segment at `addr`.
    pub(crate) fn write_from(&self, addr: u64, src: &IoVec) -> bool {
        let Some(dst) = self.locate(addr, src.len() as u64) else {
            return false;
        };
        let from = src
            .slices()
            .iter()
            .map(|s| (s.as_ptr() as *const u8, s.len()));
        // SAFETY: the destination range is inside the segment; the master
        // allocated it to this put alone, and sources are caller memory.
        unsafe { copy_segments(from, std::iter::once((dst, src.len()))) };
        true
    }

    /// Copies `[addr, addr + dst.len())` out of the segment into `dst`.
    pub(crate) fn read_into(&self, addr: u64, dst: &IoVecMut) -> bool {
        let Some(src) = self.locate(addr, dst.len() as u64) else {
            return false;
        };
        let to = dst.slices().iter().map(|s| (s.as_ptr(), s.len()));
        // SAFETY: the range is inside the segment and leased to this reader.
        unsafe { copy_segments(std::iter::once((src as *const u8, dst.len())), to) };
        true
    }
}

/// Sets the congestion control on a socket; a kernel without it keeps its default.
fn set_congestion(stream: &TcpStream, algorithm: &str) {
    if algorithm.is_empty() {
        return;
    }
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    // SAFETY: a valid socket and a buffer of the stated length.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            algorithm.as_ptr().cast(),
            algorithm.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(
            algorithm,
            error = %io::Error::last_os_error(),
            "TCP_CONGESTION not applied; keeping the system default"
        );
    }
}

fn descriptor(
    name: &str,
    data_host: &str,
    data_port: u16,
    segment: Option<&LocalSegment>,
) -> serde_json::Value {
    let buffers: Vec<_> = segment
        .map(|s| json!({"addr": s.base(), "length": s.size(), "name": name}))
        .into_iter()
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    json!({
        "buffers": buffers,
        "name": name,
        "protocol": "tcp",
        "rdma_server_name": "",
        "tcp_data_host": data_host,
        "tcp_data_port": data_port,
        "tcp_proto_version": 2,
        "timestamp": format!("{}.{:06}", now.as_secs(), now.subsec_micros()),
    })
}

fn handshake_frame(desc: &serde_json::Value) -> Vec<u8> {
    let mut text = desc.to_string();
    text.push('\n');
    let mut out = Vec::with_capacity(9 + text.len());
    out.extend_from_slice(&(text.len() as u64 + 1).to_le_bytes());
    out.push(HANDSHAKE_METADATA);
    out.extend_from_slice(text.as_bytes());
    out
}

pub(crate) async fn read_handshake<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> io::Result<(u8, serde_json::Value)> {
    let len = stream.read_u64_le().await?;
    if len == 0 || len > HANDSHAKE_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("handshake frame of {len} bytes"),
        ));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body).await?;
    let json = serde_json::from_slice(&body[1..])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((body[0], json))
}

/// The handshake daemon and TCP data server of a segment owner.
#[derive(Debug)]
pub(crate) struct TransferServer {
    endpoint: String,
    tasks: Vec<JoinHandle<()>>,
}

impl TransferServer {
    /// Listens on `host` (ephemeral ports) and serves `segment`.
    pub(crate) async fn start(
        host: &str,
        segment: Arc<LocalSegment>,
        congestion: String,
    ) -> io::Result<Self> {
        let handshake = TcpListener::bind((host, 0)).await?;
        let data = TcpListener::bind((host, 0)).await?;
        let hs_port = handshake.local_addr()?.port();
        let data_port = data.local_addr()?.port();
        let endpoint = format!("{host}:{hs_port}");
        let desc = descriptor(&endpoint, host, data_port, Some(&segment));
        let congestion: Arc<str> = congestion.into();
        let tasks = vec![
            tokio::spawn(serve_handshakes(handshake, desc)),
            tokio::spawn(serve_data(data, segment, congestion)),
        ];
        Ok(TransferServer { endpoint, tasks })
    }

    /// `host:handshake_port`: the segment's `te_endpoint`, and its TE name.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl Drop for TransferServer {
    fn drop(&mut self) {
        // Aborting an accept loop drops its JoinSet, which aborts its sessions.
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn serve_handshakes(listener: TcpListener, desc: serde_json::Value) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut stream, peer)) = accepted else { continue };
                let desc = desc.clone();
                sessions.spawn(async move {
                    let answer = async {
                        let (kind, _) = read_handshake(&mut stream).await?;
                        let mut frame = handshake_frame(&desc);
                        frame[8] = kind;
                        stream.write_all(&frame).await?;
                        stream.shutdown().await?;
                        // The initiator closes when it has read the answer.
                        let mut sink = [0u8; 64];
                        while stream.read(&mut sink).await? > 0 {}
                        io::Result::Ok(())
                    };
                    match tokio::time::timeout(Duration::from_secs(30), answer).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "handshake failed"),
                        Err(_) => tracing::debug!(%peer, "handshake timed out"),
                    }
                });
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

async fn serve_data(listener: TcpListener, segment: Arc<LocalSegment>, congestion: Arc<str>) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                set_congestion(&stream, &congestion);
                let segment = segment.clone();
                sessions.spawn(async move {
                    if let Err(e) = serve_session(stream, &segment).await {
                        tracing::debug!(%peer, error = %e, "data session ended");
                    }
                });
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

/// Answers of a data session not yet sent, in order: statuses, and reads' bytes sent straight
/// from the segment. Copying a layer-sized value into a send buffer first cost the owner as
/// much CPU as the kernel's copy; `writev` sends many answers at once without it.
#[derive(Default)]
struct Answers {
    /// Statuses.
    small: Vec<u8>,
    pieces: Vec<Piece>,
    bytes: usize,
}

enum Piece {
    /// A range of `Answers::small`.
    Small(usize, usize),
    /// Bytes of the segment.
    Segment(*const u8, usize),
}

// SAFETY: a segment piece points into the session's segment, which outlives the session and
// is not freed while it is served, whichever thread polls it.
unsafe impl Send for Piece {}

impl Answers {
    fn status(&mut self, status: u64) {
        let at = self.small.len();
        self.small.extend_from_slice(&status.to_le_bytes());
        match self.pieces.last_mut() {
            Some(Piece::Small(_, end)) if *end == at => *end = self.small.len(),
            _ => self.pieces.push(Piece::Small(at, self.small.len())),
        }
        self.bytes += 8;
    }

    /// # Safety
    ///
    /// `[ptr, ptr + len)` lies inside the session's segment.
    unsafe fn segment(&mut self, ptr: *const u8, len: usize) {
        self.pieces.push(Piece::Segment(ptr, len));
        self.bytes += len;
    }

    fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Whether to send now even with requests waiting to be served.
    fn full(&self) -> bool {
        self.bytes >= IO_BUFFER || self.pieces.len() >= MAX_IOV
    }

    async fn send<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> io::Result<()> {
        // The first piece not yet sent, and how much of it is.
        let (mut next, mut sent) = (0usize, 0usize);
        while next < self.pieces.len() {
            let end = self.pieces.len().min(next + MAX_IOV);
            let bufs: Vec<IoSlice<'_>> = self.pieces[next..end]
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    let skip = if k == 0 { sent } else { 0 };
                    match *p {
                        Piece::Small(a, b) => IoSlice::new(&self.small[a + skip..b]),
                        // SAFETY: inside the segment (`segment`'s contract).
                        Piece::Segment(ptr, len) => IoSlice::new(unsafe {
                            std::slice::from_raw_parts(ptr.add(skip), len - skip)
                        }),
                    }
                })
                .collect();
            let mut n = stream.write_vectored(&bufs).await?;
            drop(bufs);
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            while n > 0 {
                let len = match self.pieces[next] {
                    Piece::Small(a, b) => b - a,
                    Piece::Segment(_, len) => len,
                };
                let take = n.min(len - sent);
                n -= take;
                sent += take;
                if sent == len {
                    next += 1;
                    sent = 0;
                }
            }
        }
        self.small.clear();
        self.pieces.clear();
        self.bytes = 0;
        Ok(())
    }
}

/// One data connection: requests in order until the peer closes.
pub(crate) async fn serve_session<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    segment: &LocalSegment,
) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(IO_BUFFER, stream);
    let mut out = Answers::default();
    loop {
        let mut header = [0u8; HEADER_LEN];
        match reader.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        let size = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        let addr = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let v2 = header[16] & V2 != 0;
        let op = header[16] & !V2;
        let Some(ptr) = segment
            .locate(addr, size)
            .filter(|_| op == OP_READ || op == OP_WRITE)
        else {
            if v2 {
                out.status(STATUS_REJECTED);
            }
            out.send(reader.get_mut()).await?;
            // As the official server: a rejected request ends the session.
            return Ok(());
        };
        let size = size as usize;
        if op == OP_WRITE {
            // SAFETY: the range is inside the segment; the master granted it
            // to the writer, and nobody reads it until PutEnd.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr, size) };
            reader.read_exact(dst).await?;
            if v2 {
                out.status(STATUS_OK);
            }
        } else {
            if v2 {
                out.status(STATUS_OK);
            }
            // SAFETY: inside the segment (`locate`); a reader holds a lease on it.
            unsafe { out.segment(ptr, size) };
        }
        // Answer once the pipelined requests already received are served.
        if (reader.buffer().is_empty() || out.full()) && !out.is_empty() {
            out.send(reader.get_mut()).await?;
        }
    }
}

/// What a handshake told us about a segment owner.
#[derive(Debug)]
struct Peer {
    data_addr: String,
    v2: bool,
    idle: Mutex<Vec<TcpStream>>,
    lanes: Semaphore,
}

/// One transfer within a pipelined batch.
pub(crate) enum Op {
    Read { addr: u64, dst: IoVecMut },
    Write { addr: u64, src: IoVec },
}

impl Op {
    fn len(&self) -> usize {
        match self {
            Op::Read { dst, .. } => dst.len(),
            Op::Write { src, .. } => src.len(),
        }
    }
}

/// The initiator side: handshakes (cached per endpoint) and data connections.
pub(crate) struct TransferClient {
    my_handshake: Vec<u8>,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    connect_timeout: Duration,
    transfer_timeout: Duration,
    congestion: String,
}

impl std::fmt::Debug for TransferClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferClient")
            .field("peers", &self.peers.lock().len())
            .finish()
    }
}

impl TransferClient {
    /// `name` is our own TE name (our endpoint, or `host:0` for a pure
    /// client); owners ignore the descriptor we send but it must parse.
    pub(crate) fn new(
        name: &str,
        host: &str,
        segment: Option<&LocalSegment>,
        connect_timeout: Duration,
        transfer_timeout: Duration,
        congestion: String,
    ) -> Self {
        TransferClient {
            my_handshake: handshake_frame(&descriptor(name, host, 0, segment)),
            peers: Mutex::new(HashMap::new()),
            connect_timeout,
            transfer_timeout,
            congestion,
        }
    }

    /// Forgets every peer, e.g. after the master restarted.
    pub(crate) fn reset(&self) {
        self.peers.lock().clear();
    }

    async fn peer(&self, endpoint: &str) -> Result<Arc<Peer>, TransferError> {
        if let Some(p) = self.peers.lock().get(endpoint) {
            return Ok(p.clone());
        }
        let desc = tokio::time::timeout(self.connect_timeout, self.handshake(endpoint))
            .await
            .map_err(|_| TransferError::ConnectTimeout {
                what: "segment owner",
                addr: endpoint.into(),
                ms: self.connect_timeout.as_millis(),
            })??;
        let bad = |why: String| TransferError::Handshake {
            addr: endpoint.into(),
            why,
        };
        if desc.get("protocol").and_then(|p| p.as_str()) != Some("tcp") {
            return Err(bad(format!(
                "the owner's segment is not served over tcp: {}",
                desc.get("protocol").unwrap_or(&serde_json::Value::Null)
            )));
        }
        let port = desc
            .get("tcp_data_port")
            .and_then(|p| p.as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
            .ok_or_else(|| bad("the descriptor has no tcp_data_port".into()))?;
        // 0.3.13 sends tcp_data_host; older owners imply the host of `name`.
        let host = desc
            .get("tcp_data_host")
            .and_then(|h| h.as_str())
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| {
                endpoint
                    .rsplit_once(':')
                    .map_or(endpoint, |(h, _)| h)
                    .to_owned()
            });
        let v2 = desc
            .get("tcp_proto_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(1)
            >= 2;
        let data_addr = match host.parse::<std::net::Ipv6Addr>() {
            Ok(_) => SocketAddr::new(host.parse().expect("parsed above"), port).to_string(),
            Err(_) => format!("{host}:{port}"),
        };
        let peer = Arc::new(Peer {
            data_addr,
            v2,
            idle: Mutex::new(Vec::new()),
            lanes: Semaphore::new(LANES),
        });
        self.peers
            .lock()
            .entry(endpoint.to_owned())
            .or_insert(peer.clone());
        Ok(peer)
    }

    async fn handshake(&self, endpoint: &str) -> Result<serde_json::Value, TransferError> {
        let io_err = |source| TransferError::Io {
            addr: endpoint.into(),
            source,
        };
        let mut stream =
            TcpStream::connect(endpoint)
                .await
                .map_err(|source| TransferError::Connect {
                    what: "segment owner",
                    addr: endpoint.into(),
                    source,
                })?;
        stream.write_all(&self.my_handshake).await.map_err(io_err)?;
        let (kind, desc) = read_handshake(&mut stream).await.map_err(io_err)?;
        if kind != HANDSHAKE_METADATA {
            return Err(TransferError::Handshake {
                addr: endpoint.into(),
                why: format!("answered with handshake type {kind}, expected 1 (metadata)"),
            });
        }
        Ok(desc)
    }

    async fn connect(&self, peer: &Peer) -> Result<TcpStream, TransferError> {
        let stream =
            tokio::time::timeout(self.connect_timeout, TcpStream::connect(&peer.data_addr))
                .await
                .map_err(|_| TransferError::ConnectTimeout {
                    what: "data port",
                    addr: peer.data_addr.clone(),
                    ms: self.connect_timeout.as_millis(),
                })?
                .map_err(|source| TransferError::Connect {
                    what: "data port",
                    addr: peer.data_addr.clone(),
                    source,
                })?;
        let _ = stream.set_nodelay(true);
        set_congestion(&stream, &self.congestion);
        Ok(stream)
    }

    /// Runs `ops` against the owner at `endpoint`, spread over up to
    /// [`LANES`] pipelined connections. One result per op, in order.
    pub(crate) async fn run(
        self: &Arc<Self>,
        endpoint: &str,
        ops: Vec<Op>,
    ) -> Vec<Result<(), TransferError>> {
        let n = ops.len();
        let peer = match self.peer(endpoint).await {
            Ok(p) => p,
            Err(e) => {
                let msg = e.to_string();
                return std::iter::once(Err(e))
                    .chain((1..n).map(|_| {
                        Err(TransferError::Handshake {
                            addr: endpoint.into(),
                            why: msg.clone(),
                        })
                    }))
                    .collect();
            }
        };
        // Contiguous groups of about equal bytes, one per lane.
        let total: usize = ops.iter().map(Op::len).sum();
        let lanes = LANES.min(n).min(total / (256 << 10) + 1).max(1);
        let per_lane = total.div_ceil(lanes);
        let mut groups: Vec<Vec<(usize, Op)>> = vec![Vec::new()];
        let mut acc = 0;
        for (i, op) in ops.into_iter().enumerate() {
            if acc >= per_lane && groups.len() < lanes {
                groups.push(Vec::new());
                acc = 0;
            }
            acc += op.len();
            groups.last_mut().expect("one group").push((i, op));
        }
        let mut results: Vec<Option<Result<(), TransferError>>> = (0..n).map(|_| None).collect();
        let mut set = JoinSet::new();
        for group in groups {
            let this = self.clone();
            let peer = peer.clone();
            let endpoint = endpoint.to_owned();
            set.spawn(async move {
                let idx: Vec<usize> = group.iter().map(|(i, _)| *i).collect();
                let ops: Vec<Op> = group.into_iter().map(|(_, op)| op).collect();
                let out = this.run_lane(&endpoint, &peer, ops).await;
                (idx, out)
            });
        }
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((idx, out)) => {
                    for (i, r) in idx.into_iter().zip(out) {
                        results[i] = Some(r);
                    }
                }
                Err(e) => tracing::error!(error = %e, "a transfer task panicked"),
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(TransferError::Io {
                        addr: endpoint.into(),
                        source: io::Error::other("the transfer task failed"),
                    })
                })
            })
            .collect()
    }

    async fn run_lane(
        &self,
        endpoint: &str,
        peer: &Peer,
        ops: Vec<Op>,
    ) -> Vec<Result<(), TransferError>> {
        let n = ops.len();
        let _lane = peer.lanes.acquire().await.expect("never closed");
        let idle = peer.idle.lock().pop();
        let reused = idle.is_some();
        let mut conn = match idle {
            Some(c) => c,
            None => match self.connect(peer).await {
                Ok(c) => c,
                Err(e) => {
                    self.forget(endpoint);
                    return fail_all(e, n, &peer.data_addr);
                }
            },
        };
        let work = pipeline(&mut conn, peer.v2, &peer.data_addr, &ops);
        let mut outcome = tokio::time::timeout(self.transfer_timeout, work).await;
        if reused && matches!(outcome, Ok(Err(TransferError::Io { .. }))) {
            // An idle connection the owner (or a middlebox) closed meanwhile.
            // Both reads and writes of a granted range are idempotent, so the
            // batch is sent again once, on a fresh connection.
            match self.connect(peer).await {
                Ok(c) => {
                    conn = c;
                    let work = pipeline(&mut conn, peer.v2, &peer.data_addr, &ops);
                    outcome = tokio::time::timeout(self.transfer_timeout, work).await;
                }
                Err(e) => outcome = Ok(Err(e)),
            }
        }
        match outcome {
            Ok(Ok(results)) => {
                // Only a stream that ended on a frame boundary is reused.
                if results.iter().all(Result::is_ok) {
                    peer.idle.lock().push(conn);
                }
                results
            }
            Ok(Err(e)) => {
                self.forget(endpoint);
                fail_all(e, n, &peer.data_addr)
            }
            Err(_) => {
                self.forget(endpoint);
                fail_all(
                    TransferError::Timeout {
                        addr: peer.data_addr.clone(),
                        ms: self.transfer_timeout.as_millis(),
                    },
                    n,
                    &peer.data_addr,
                )
            }
        }
    }

    /// A failed peer is handshaken again next time: it may have restarted.
    fn forget(&self, endpoint: &str) {
        self.peers.lock().remove(endpoint);
    }
}

fn fail_all(e: TransferError, n: usize, addr: &str) -> Vec<Result<(), TransferError>> {
    let msg = e.to_string();
    std::iter::once(Err(e))
        .chain((1..n).map(|_| {
            Err(TransferError::Io {
                addr: addr.into(),
                source: io::Error::other(msg.clone()),
            })
        }))
        .collect()
}

/// A data connection whose answers can be read straight into many buffers at once.
///
/// Answers are read without a buffer in between: a value of a few tens of KiB (a layer's
/// page) copied once more through a read buffer cost the reader as much CPU as the kernel's
/// own copy, and on a host whose cores also run the forward that copy is the transfer's pace.
pub(crate) trait ScatterRead: AsyncRead + AsyncWrite + Unpin {
    /// Reads into `bufs` in order; `Ok(0)` at the end of the stream. The default fills the
    /// first non-empty buffer only.
    fn poll_read_scatter(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        let Some(first) = bufs.iter_mut().find(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        let mut buf = ReadBuf::new(first);
        ready!(Pin::new(self).poll_read(cx, &mut buf))?;
        Poll::Ready(Ok(buf.filled().len()))
    }
}

impl ScatterRead for TcpStream {
    /// One `readv` fills the answers of many pipelined requests.
    fn poll_read_scatter(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.poll_read_ready(cx))?;
            match self.try_read_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done),
            }
        }
    }
}

impl ScatterRead for tokio::io::DuplexStream {}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> ScatterRead for tokio::io::Join<R, W> {}

/// `readv` takes at most this many buffers (`IOV_MAX`).
const MAX_IOV: usize = 1024;

/// A stretch of memory an answer fills: a status, or (part of) a read's destination.
struct Part {
    start: *mut u8,
    len: usize,
    /// The request whose status this is.
    status_of: Option<usize>,
}

// SAFETY: a part points into memory that the pipeline writing it has to itself for its whole
// run (a get's destinations, the pipeline's own statuses), whichever thread polls it.
unsafe impl Send for Part {}

/// Sends every request, then reads every answer. A rejected request ends the
/// owner's session, so the requests after it fail too.
pub(crate) async fn pipeline<S: ScatterRead>(
    conn: &mut S,
    v2: bool,
    addr: &str,
    ops: &[Op],
) -> Result<Vec<Result<(), TransferError>>, TransferError> {
    let io_err = |source| TransferError::Io {
        addr: addr.into(),
        source,
    };
    let flag = if v2 { V2 } else { 0 };
    let mut out: Vec<u8> = Vec::with_capacity(IO_BUFFER.min(ops.len() * HEADER_LEN + SMALL));
    for op in ops {
        let (size, at, code) = match op {
            Op::Read { addr, dst } => (dst.len(), *addr, OP_READ | flag),
            Op::Write { addr, src } => (src.len(), *addr, OP_WRITE | flag),
        };
        out.extend_from_slice(&(size as u64).to_le_bytes());
        out.extend_from_slice(&at.to_le_bytes());
        out.push(code);
        out.extend_from_slice(&[0u8; 7]);
        if let Op::Write { src, .. } = op {
            if size <= SMALL {
                for c in src.chunks() {
                    out.extend_from_slice(c);
                }
            } else {
                conn.write_all(&out).await.map_err(io_err)?;
                out.clear();
                for c in src.chunks() {
                    conn.write_all(c).await.map_err(io_err)?;
                }
            }
        }
        if out.len() >= IO_BUFFER {
            conn.write_all(&out).await.map_err(io_err)?;
            out.clear();
        }
    }
    if !out.is_empty() {
        conn.write_all(&out).await.map_err(io_err)?;
    }

    // The answers, in order: per request its status (v2), then a read's bytes.
    let mut statuses = vec![0u8; if v2 { 8 * ops.len() } else { 0 }];
    // Written and read only through the parts, which outlive no more than it.
    let parts: Vec<Part> = {
        let status_at = statuses.as_mut_ptr();
        let mut parts = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            if v2 {
                parts.push(Part {
                    // SAFETY: `statuses` holds 8 bytes per request.
                    start: unsafe { status_at.add(8 * i) },
                    len: 8,
                    status_of: Some(i),
                });
            }
            if let Op::Read { dst, .. } = op {
                parts.extend(dst.slices().iter().filter(|s| !s.is_empty()).map(|s| Part {
                    start: s.as_ptr(),
                    len: s.len(),
                    status_of: None,
                }));
            }
        }
        parts
    };
    let mut results: Vec<Result<(), TransferError>> = Vec::with_capacity(ops.len());
    // The first part not yet full, and how much of it is.
    let (mut next, mut filled) = (0usize, 0usize);
    while next < parts.len() {
        let end = parts.len().min(next + MAX_IOV);
        let mut bufs: Vec<IoSliceMut<'_>> = parts[next..end]
            .iter()
            .enumerate()
            .map(|(k, p)| {
                let skip = if k == 0 { filled } else { 0 };
                let (start, len) = (p.start, p.len);
                // SAFETY: the destinations were bounds-checked when their descriptors were
                // built and the region contract gives this get exclusive access to them;
                // the statuses are this function's own. No two parts overlap.
                IoSliceMut::new(unsafe {
                    std::slice::from_raw_parts_mut(start.add(skip), len - skip)
                })
            })
            .collect();
        let mut got = std::future::poll_fn(|cx| conn.poll_read_scatter(cx, &mut bufs))
            .await
            .map_err(io_err)?;
        drop(bufs);
        if got == 0 {
            return Err(io_err(io::ErrorKind::UnexpectedEof.into()));
        }
        while got > 0 {
            let Part {
                start,
                len,
                status_of,
            } = parts[next];
            let take = got.min(len - filled);
            got -= take;
            filled += take;
            if filled < len {
                break;
            }
            next += 1;
            filled = 0;
            let Some(i) = status_of else { continue };
            // Every part of the requests before `i` is full: they succeeded.
            results.resize_with(i, || Ok(()));
            // SAFETY: request `i`'s status, 8 bytes of `statuses`, now filled.
            let status = u64::from_le_bytes(unsafe { start.cast::<[u8; 8]>().read() });
            if status != STATUS_OK {
                let (name, size, at) = match &ops[i] {
                    Op::Read { addr, dst } => ("READ", dst.len(), *addr),
                    Op::Write { addr, src } => ("WRITE", src.len(), *addr),
                };
                results.push(Err(TransferError::Rejected {
                    addr: addr.into(),
                    op: name,
                    size: size as u64,
                    at,
                    status,
                }));
                return Ok(pad_failed(results, ops.len(), addr));
            }
        }
    }
    results.resize_with(ops.len(), || Ok(()));
    Ok(results)
}

fn pad_failed(
    mut results: Vec<Result<(), TransferError>>,
    n: usize,
    addr: &str,
) -> Vec<Result<(), TransferError>> {
    while results.len() < n {
        results.push(Err(TransferError::Io {
            addr: addr.into(),
            source: io::Error::other("an earlier request on the connection was rejected"),
        }));
    }
    results
}
