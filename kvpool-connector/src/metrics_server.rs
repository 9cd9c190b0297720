//! `metrics_port`: Prometheus text over plain HTTP from each worker process.
//!
//! Deliberately minimal: one `GET /metrics` per connection, anything else a 404. It faces
//! whatever can reach `metrics_host` (loopback by default), so every resource a client can
//! hold is bounded: request heads (8 KiB), the time to send one and to take the reply (5 s
//! each), and connections at once (32; more wait in the kernel's backlog). Worker ranks of one
//! engine share a host, so each listens on `metrics_port + rank`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use kvpool_core::error::{Error, ErrorKind, Result};
use kvpool_core::metrics;

const MAX_HEAD: usize = 8 << 10;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 32;

/// Serves until dropped.
#[derive(Debug)]
pub(crate) struct MetricsServer {
    task: JoinHandle<()>,
    addr: SocketAddr,
}

impl MetricsServer {
    /// Binds `host:port` on the current Tokio runtime.
    pub(crate) fn bind(host: IpAddr, port: u16) -> Result<MetricsServer> {
        Self::bind_with(host, port, IO_TIMEOUT)
    }

    fn bind_with(host: IpAddr, port: u16, io_timeout: Duration) -> Result<MetricsServer> {
        let std_listener = std::net::TcpListener::bind((host, port)).map_err(|e| {
            Error::new(
                ErrorKind::ConfigInvalid,
                format!(
                    "cannot serve metrics on {host}:{port} (`metrics_host`, and `metrics_port` \
                     plus the rank)"
                ),
            )
            .set_source(e)
        })?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| Error::new(ErrorKind::Unexpected, "metrics socket").set_source(e))?;
        let addr = std_listener
            .local_addr()
            .map_err(|e| Error::new(ErrorKind::Unexpected, "metrics socket").set_source(e))?;
        let listener = TcpListener::from_std(std_listener)
            .map_err(|e| Error::new(ErrorKind::Unexpected, "metrics socket").set_source(e))?;
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let task = tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                if let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        answer(stream, io_timeout).await;
                        drop(slot);
                    });
                }
            }
        });
        Ok(MetricsServer { task, addr })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(mut stream: TcpStream, io_timeout: Duration) {
    let mut head = Vec::with_capacity(512);
    let read_head = async {
        let mut buf = [0u8; 512];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            if head.len() > MAX_HEAD {
                return false;
            }
        }
        true
    };
    if !matches!(tokio::time::timeout(io_timeout, read_head).await, Ok(true)) {
        return;
    }
    let wanted = head.starts_with(b"GET /metrics ") || head.starts_with(b"GET / ");
    let (status, body) = if wanted {
        ("200 OK", metrics::global().encode())
    } else {
        ("404 Not Found", "only GET /metrics is served\n".to_string())
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(io_timeout, stream.write_all(reply.as_bytes())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply).await;
        reply
    }

    #[tokio::test]
    async fn serves_metrics_on_loopback_and_bounds_what_clients_hold() {
        let timeout = Duration::from_millis(300);
        let server = MetricsServer::bind_with(IpAddr::from([127, 0, 0, 1]), 0, timeout).unwrap();
        let addr = server.addr();
        assert!(addr.ip().is_loopback());
        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            ok.starts_with(b"HTTP/1.1 200 OK"),
            "{}",
            String::from_utf8_lossy(&ok)
        );
        let other = get(addr, b"POST /x HTTP/1.1\r\n\r\n").await;
        assert!(other.starts_with(b"HTTP/1.1 404"));
        // A head over the bound is dropped without a reply.
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD + 1));
        assert!(get(addr, &big).await.is_empty());

        // Clients that connect and send nothing hold every slot; they are cut off after the
        // timeout, and the server answers again.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let ok = tokio::time::timeout(
            Duration::from_secs(10),
            get(addr, b"GET /metrics HTTP/1.1\r\n\r\n"),
        )
        .await
        .expect("the server answers once idle clients are cut off");
        assert!(ok.starts_with(b"HTTP/1.1 200 OK"));
        drop(idle);
    }
}
