//! kvpool's own client for standalone servers over plain TCP or a unix socket: one
//! pipeline per connection at a time, replies parsed in place from the read buffer.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use redis::{RedisError, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::command::{Out, Reply, Sink, Val};
use crate::resp::{self, Frame, Parsed};

/// Read and write buffers start this large: a pipeline of 16 blocks of 4 KiB, and its
/// replies, fit in one system call each.
const BUF_INITIAL: usize = 128 << 10;

/// Buffers that grew past this for a large value are given back after the pipeline, so
/// an idle connection does not hold hundreds of MiB.
const BUF_KEEP: usize = 4 << 20;

/// Where kvpool's own client connects, and how it logs in.
pub(super) struct FastTarget {
    pub(super) addr: FastAddr,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) db: i64,
    pub(super) connect_timeout: Duration,
}

/// The server's address: TCP gets `TCP_NODELAY`, a unix socket needs nothing.
pub(super) enum FastAddr {
    Tcp(String, u16),
    Unix(PathBuf),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One connection of kvpool's own client, used by one pipeline at a time: the pipeline
/// is written whole, then its replies are read in order, each handed to the caller
/// borrowed from the read buffer.
pub(super) struct FastConn {
    io: Box<dyn Io>,
    pub(super) wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    /// `rbuf[start..end]` holds bytes read and not yet parsed.
    start: usize,
    end: usize,
}

impl FastConn {
    /// Connects and logs in (AUTH, SELECT), all within the connect timeout.
    pub(super) async fn connect(t: &FastTarget) -> std::result::Result<FastConn, RedisError> {
        let connecting = async {
            let io: Box<dyn Io> = match &t.addr {
                FastAddr::Tcp(host, port) => {
                    let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    // Pipelines are written whole; Nagle would only hold back their tail.
                    s.set_nodelay(true)?;
                    Box::new(s)
                }
                FastAddr::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
            };
            let mut conn = FastConn {
                io,
                wbuf: Vec::with_capacity(BUF_INITIAL),
                rbuf: vec![0; BUF_INITIAL],
                start: 0,
                end: 0,
            };
            let mut commands = 0;
            if let Some(password) = &t.password {
                let mut out = Out::Resp(&mut conn.wbuf);
                match &t.username {
                    Some(user) => {
                        out.command(3);
                        out.arg(b"AUTH");
                        out.arg(user.as_bytes());
                    }
                    None => {
                        out.command(2);
                        out.arg(b"AUTH");
                    }
                }
                out.arg(password.as_bytes());
                commands += 1;
            }
            if t.db != 0 {
                let mut out = Out::Resp(&mut conn.wbuf);
                out.command(2);
                out.arg(b"SELECT");
                out.arg(t.db.to_string().as_bytes());
                commands += 1;
            }
            let mut failed = None;
            if commands > 0 {
                conn.exchange(commands, &mut |_, reply| {
                    if let Err(e) = reply {
                        failed.get_or_insert(e);
                    }
                })
                .await?;
            }
            match failed {
                Some(e) => Err(e),
                None => Ok(conn),
            }
        };
        tokio::time::timeout(t.connect_timeout, connecting)
            .await
            .map_err(|_| {
                RedisError::from(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connecting took longer than redis.connect_timeout_ms",
                ))
            })?
    }

    /// Sends the `n` commands in the write buffer and hands each reply to `sink`, in order.
    /// `Err` leaves the connection in an unknown state: the caller drops it.
    pub(super) async fn exchange(
        &mut self,
        n: usize,
        sink: &mut Sink<'_>,
    ) -> std::result::Result<(), RedisError> {
        self.io.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        if self.wbuf.capacity() > BUF_KEEP {
            self.wbuf = Vec::with_capacity(BUF_INITIAL);
        }
        for k in 0..n {
            loop {
                let need = match resp::parse(&self.rbuf[self.start..self.end]) {
                    Ok(Parsed::Frame(frame, used)) => {
                        sink(k, reply(frame));
                        self.start += used;
                        break;
                    }
                    Ok(Parsed::Incomplete(need)) => need,
                    Err(why) => return Err(protocol_error(why)),
                };
                self.fill(need).await?;
            }
        }
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
            if self.rbuf.len() > BUF_KEEP {
                self.rbuf = vec![0; BUF_INITIAL];
            }
        }
        Ok(())
    }

    /// Reads until at least `need` bytes are buffered from `start`, growing the buffer
    /// if a reply is larger than it.
    async fn fill(&mut self, need: usize) -> io::Result<()> {
        while self.end - self.start < need {
            if self.start == self.end {
                (self.start, self.end) = (0, 0);
            } else if self.rbuf.len() - self.start < need || self.end == self.rbuf.len() {
                self.rbuf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            }
            // Grown with what arrives, doubling when full, not to `need` at once: `need`
            // comes from a length the server claims (up to `resp::MAX_BULK`), and a
            // garbled or hostile one must not cost that much memory before its bytes come.
            if self.rbuf.len() < need && self.end == self.rbuf.len() {
                let grown = self.rbuf.len().saturating_mul(2).max(BUF_INITIAL);
                self.rbuf.resize(grown.min(need), 0);
            }
            let read = self.io.read(&mut self.rbuf[self.end..]).await?;
            if read == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "redis closed the connection",
                ));
            }
            self.end += read;
        }
        Ok(())
    }
}

/// The reply a frame stands for; an error line becomes the `redis` crate's error, so
/// that both clients' errors are classified by one function.
fn reply(frame: Frame<'_>) -> Reply<'_> {
    match frame {
        Frame::Nil => Ok(Val::Nil),
        Frame::Simple(s) => Ok(Val::Simple(s)),
        Frame::Int(n) => Ok(Val::Int(n)),
        Frame::Bulk(b) => Ok(Val::Bulk(b)),
        Frame::Error(line) => Err(match redis::parse_redis_value(line) {
            Ok(Value::ServerError(e)) => RedisError::from(e),
            _ => redis::make_extension_error(
                "ERR".to_string(),
                Some(String::from_utf8_lossy(line).trim_end().to_string()),
            ),
        }),
    }
}

/// A reply that is not RESP, as the `redis` crate's parse error, so that both clients'
/// malformed replies are classified alike.
pub(super) fn protocol_error(why: String) -> RedisError {
    RedisError::from((
        redis::ErrorKind::Parse,
        "malformed reply from the server",
        why,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply claiming a bulk string of almost `MAX_BULK` bytes, then closing: the read
    /// buffer grows with the bytes that came, not with the claim.
    #[tokio::test]
    async fn a_hostile_bulk_length_does_not_allocate_what_it_claims() {
        let (client, mut server) = tokio::io::duplex(64 << 10);
        let mut conn = FastConn {
            io: Box::new(client),
            wbuf: Vec::new(),
            rbuf: vec![0; BUF_INITIAL],
            start: 0,
            end: 0,
        };
        let claim = resp::MAX_BULK - 10;
        let serve = tokio::spawn(async move {
            server
                .write_all(format!("${claim}\r\n").as_bytes())
                .await
                .unwrap();
            server.write_all(&vec![b'x'; 300 << 10]).await.unwrap();
        });
        let e = conn.exchange(1, &mut |_, _| {}).await.unwrap_err();
        serve.await.unwrap();
        assert!(e.to_string().contains("closed"), "{e}");
        assert!(
            conn.rbuf.len() <= 4 * BUF_INITIAL,
            "{} bytes of buffer for 300 KiB received",
            conn.rbuf.len()
        );
    }
}
