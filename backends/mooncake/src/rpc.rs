//! coro_rpc framing and a small pool of connections to the master.
//!
//! The master runs each connection's requests one after another, so
//! parallelism comes from several connections, as the official client does;
//! a call takes an idle connection (or opens one), and returns it only after
//! a clean exchange, so a connection in an unknown state is never reused.

use std::io;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::codec::{self, CodecError};
use crate::types::Rpc;

const MAGIC: u8 = 0x15;
pub(crate) const REQUEST_HEADER_LEN: usize = 20;
pub(crate) const RESPONSE_HEADER_LEN: usize = 16;
/// The largest response body accepted: far above any batch the backend sends,
/// and small enough that a corrupt length cannot exhaust memory.
const MAX_BODY: u32 = 256 << 20;

/// coro_rpc request header: magic, version, serialize type, msg type, seq,
/// function id, body length, attachment length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestHeader {
    pub seq: u32,
    pub function_id: u32,
    pub length: u32,
    pub attach_length: u32,
}

impl RequestHeader {
    pub(crate) fn write(&self, out: &mut [u8; REQUEST_HEADER_LEN]) {
        out[..4].copy_from_slice(&[MAGIC, 0, 0, 0]);
        out[4..8].copy_from_slice(&self.seq.to_le_bytes());
        out[8..12].copy_from_slice(&self.function_id.to_le_bytes());
        out[12..16].copy_from_slice(&self.length.to_le_bytes());
        out[16..20].copy_from_slice(&self.attach_length.to_le_bytes());
    }

    #[cfg(test)]
    pub(crate) fn parse(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, RpcError> {
        if b[0] != MAGIC || b[1] != 0 || b[2] != 0 {
            return Err(RpcError::Protocol(format!(
                "bad request header {:02x?}",
                &b[..4]
            )));
        }
        let u = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Ok(RequestHeader {
            seq: u(4),
            function_id: u(8),
            length: u(12),
            attach_length: u(16),
        })
    }
}

/// coro_rpc response header: magic, version, err_code, msg type, seq, body
/// length, attachment length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ResponseHeader {
    pub err_code: u8,
    pub seq: u32,
    pub length: u32,
    pub attach_length: u32,
}

impl ResponseHeader {
    pub(crate) fn parse(b: &[u8; RESPONSE_HEADER_LEN]) -> Result<Self, RpcError> {
        if b[0] != MAGIC {
            return Err(RpcError::Protocol(format!(
                "the peer is not a coro_rpc server (first byte {:#04x}, expected 0x15)",
                b[0]
            )));
        }
        let u = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        Ok(ResponseHeader {
            err_code: b[2],
            seq: u(4),
            length: u(8),
            attach_length: u(12),
        })
    }
}

/// Why an RPC failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RpcError {
    #[error("cannot connect to the master at {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connecting to the master at {addr} took longer than {ms} ms")]
    ConnectTimeout { addr: String, ms: u128 },
    #[error("the master at {addr} did not answer {method} within {ms} ms")]
    Timeout {
        addr: String,
        method: &'static str,
        ms: u128,
    },
    #[error("the connection to the master broke during {method}: {source}")]
    Io {
        method: &'static str,
        source: io::Error,
    },
    #[error("{0}")]
    Protocol(String),
    #[error("cannot decode the master's answer to {method}: {source}")]
    Codec {
        method: &'static str,
        source: CodecError,
    },
    #[error("the master refused {method}: coro_rpc error {code}: {message}")]
    Remote {
        method: &'static str,
        code: u16,
        message: String,
    },
    #[error(
        "the HA master's leader changed during a put; {method} was not sent to the new leader, \
         which does not know the put (the value was not stored; retry it)"
    )]
    Moved { method: &'static str },
}

impl RpcError {
    /// The master could not be reached or did not answer: with HA, time to
    /// ask etcd for the leader.
    pub(crate) fn unreachable(&self) -> bool {
        matches!(
            self,
            RpcError::Connect { .. }
                | RpcError::ConnectTimeout { .. }
                | RpcError::Io { .. }
                | RpcError::Timeout { .. }
        )
    }
}

/// coro_rpc `errc::invalid_rpc_arguments`: the body did not match the types
/// the master expects (a different master version).
pub(crate) const ERRC_INVALID_ARGUMENTS: u16 = 4;
/// coro_rpc `errc::function_not_registered`.
pub(crate) const ERRC_NOT_REGISTERED: u16 = 11;

struct Conn {
    stream: TcpStream,
    seq: u32,
    /// The pool's address generation when this connection was opened.
    generation: u64,
}

/// The master a pool talks to; it changes when an HA leader does.
struct Target {
    addr: String,
    generation: u64,
}

/// Connections to one master.
pub(crate) struct RpcPool {
    target: Mutex<Target>,
    connect_timeout: Duration,
    rpc_timeout: Duration,
    idle: Mutex<Vec<Conn>>,
    slots: Semaphore,
}

impl std::fmt::Debug for RpcPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcPool")
            .field("addr", &self.addr())
            .finish()
    }
}

impl RpcPool {
    pub(crate) fn new(
        addr: String,
        connections: usize,
        connect_timeout: Duration,
        rpc_timeout: Duration,
    ) -> Self {
        RpcPool {
            target: Mutex::new(Target {
                addr,
                generation: 0,
            }),
            connect_timeout,
            rpc_timeout,
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(connections.max(1)),
        }
    }

    /// The master's address now.
    /// How long one call may take.
    pub(crate) fn rpc_timeout(&self) -> Duration {
        self.rpc_timeout
    }

    pub(crate) fn addr(&self) -> String {
        self.target.lock().addr.clone()
    }

    /// Points the pool at `to` if it still points at `from`; true when it
    /// moved. Connections to the old address are dropped, now or when their
    /// call ends, so no call after this one reaches the old master.
    pub(crate) fn repoint(&self, from: &str, to: &str) -> bool {
        let mut target = self.target.lock();
        if target.addr != from || target.addr == to {
            return false;
        }
        target.addr = to.to_owned();
        target.generation += 1;
        drop(target);
        self.reset();
        true
    }

    /// Drops idle connections, so the next call reconnects.
    pub(crate) fn reset(&self) {
        self.idle.lock().clear();
    }

    async fn connect(&self) -> Result<Conn, RpcError> {
        let (addr, generation) = {
            let t = self.target.lock();
            (t.addr.clone(), t.generation)
        };
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| RpcError::ConnectTimeout {
                addr: addr.clone(),
                ms: self.connect_timeout.as_millis(),
            })?
            .map_err(|source| RpcError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            seq: 0,
            generation,
        })
    }

    /// The address generation: it grows each time the pool is repointed.
    pub(crate) fn generation(&self) -> u64 {
        self.target.lock().generation
    }

    /// Calls `R` and decodes its return value; sent only to the master of
    /// generation `pin` when one is given ([`RpcError::Moved`] otherwise): the
    /// steps of one put must all reach the master that started it.
    pub(crate) async fn call<R: Rpc>(
        &self,
        args: &R::Args,
        pin: Option<u64>,
    ) -> Result<R::Ret, RpcError> {
        let meta = R::meta();
        let mut frame = vec![0u8; REQUEST_HEADER_LEN];
        if !R::NO_ARGS {
            codec::pack(&meta.args, args, &mut frame);
        }
        let length = u32::try_from(frame.len() - REQUEST_HEADER_LEN)
            .map_err(|_| RpcError::Protocol(format!("{} request over 4 GiB", R::NAME)))?;

        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| RpcError::Protocol("the connection pool is closed".into()))?;
        let generation = self.target.lock().generation;
        let idle = self
            .idle
            .lock()
            .pop()
            .filter(|c| c.generation == generation);
        let mut conn = match idle {
            Some(c) => c,
            None => self.connect().await?,
        };
        if pin.is_some_and(|g| g != conn.generation) {
            // Unused, so still at a frame boundary, and of the current master.
            if conn.generation == self.generation() {
                self.idle.lock().push(conn);
            }
            return Err(RpcError::Moved { method: R::NAME });
        }
        let header = RequestHeader {
            seq: conn.seq,
            function_id: meta.function_id,
            length,
            attach_length: 0,
        };
        conn.seq = conn.seq.wrapping_add(1);
        let head: &mut [u8; REQUEST_HEADER_LEN] = (&mut frame[..REQUEST_HEADER_LEN])
            .try_into()
            .expect("header length");
        header.write(head);

        let exchange = exchange(&mut conn.stream, &frame, header.seq, R::NAME);
        let body = match tokio::time::timeout(self.rpc_timeout, exchange).await {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => {
                // A broken connection usually means the master restarted:
                // the idle ones are stale too, so the next call reconnects.
                if matches!(e, RpcError::Io { .. }) {
                    self.reset();
                }
                return Err(e);
            }
            Err(_) => {
                return Err(RpcError::Timeout {
                    addr: self.addr(),
                    method: R::NAME,
                    ms: self.rpc_timeout.as_millis(),
                })
            }
        };
        // The exchange completed: the stream is at a frame boundary again,
        // and reusable unless the pool moved to another master meanwhile.
        if conn.generation == self.target.lock().generation {
            self.idle.lock().push(conn);
        }
        let (err_code, body) = body;
        if err_code != 0 {
            return Err(remote_error(R::NAME, err_code, &body));
        }
        codec::unpack(&meta.ret, &body).map_err(|source| RpcError::Codec {
            method: R::NAME,
            source,
        })
    }
}

async fn exchange(
    stream: &mut TcpStream,
    frame: &[u8],
    seq: u32,
    method: &'static str,
) -> Result<(u8, Vec<u8>), RpcError> {
    let io = |source| RpcError::Io { method, source };
    stream.write_all(frame).await.map_err(io)?;
    let mut head = [0u8; RESPONSE_HEADER_LEN];
    stream.read_exact(&mut head).await.map_err(io)?;
    let h = ResponseHeader::parse(&head)?;
    if h.seq != seq {
        return Err(RpcError::Protocol(format!(
            "the master answered request {} to request {seq} of {method}",
            h.seq
        )));
    }
    if h.length > MAX_BODY || h.attach_length > MAX_BODY {
        return Err(RpcError::Protocol(format!(
            "the master's answer to {method} claims {} bytes, over the {MAX_BODY}-byte limit",
            u64::from(h.length) + u64::from(h.attach_length)
        )));
    }
    let mut body = vec![0u8; h.length as usize];
    stream.read_exact(&mut body).await.map_err(io)?;
    if h.attach_length > 0 {
        // Never sent by Mooncake; skip it to stay in step.
        let mut rest = vec![0u8; h.attach_length as usize];
        stream.read_exact(&mut rest).await.map_err(io)?;
    }
    Ok((h.err_code, body))
}

/// A coro_rpc error: the body is the message, or `(u16 code, message)` when
/// the code does not fit in the header's byte.
fn remote_error(method: &'static str, err_code: u8, body: &[u8]) -> RpcError {
    let (code, message) = if err_code == u8::MAX {
        let code = codec::TypeCode::of::<(u16, String)>();
        match codec::unpack::<(u16, String)>(&code, body) {
            Ok(pair) => pair,
            Err(_) => (
                u16::from(err_code),
                String::from_utf8_lossy(body).into_owned(),
            ),
        }
    } else {
        let code = codec::TypeCode::of::<String>();
        let message = codec::unpack::<String>(&code, body)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
        (u16::from(err_code), message)
    };
    RpcError::Remote {
        method,
        code,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_error_bodies_decode() {
        // Captured: unknown function id -> errc 11.
        let body = crate::capture_tests::hex(
            "77facf9d04800c001f746865207270632066756e6374696f6e206e6f742072656769737465726564",
        );
        match remote_error("X", 11, &body) {
            RpcError::Remote { code, message, .. } => {
                assert_eq!(code, ERRC_NOT_REGISTERED);
                assert_eq!(message, "the rpc function not registered");
            }
            other => panic!("{other:?}"),
        }
    }
}
