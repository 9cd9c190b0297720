//! `metrics_port`: Prometheus text over plain HTTP from each worker process.
//!
//! Deliberately minimal: one `GET /metrics` per connection, request heads bounded, anything
//! else a 404. Worker ranks of one engine share a host, so each listens on
//! `metrics_port + rank`.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use kvpool_core::error::{Error, ErrorKind, Result};
use kvpool_core::metrics;

const MAX_HEAD: usize = 8 << 10;

/// Serves until dropped.
#[derive(Debug)]
pub(crate) struct MetricsServer {
    task: JoinHandle<()>,
    addr: SocketAddr,
}

impl MetricsServer {
    /// Binds `0.0.0.0:port` on the current Tokio runtime.
    pub(crate) fn bind(port: u16) -> Result<MetricsServer> {
        let std_listener = std::net::TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
            Error::new(
                ErrorKind::ConfigInvalid,
                format!("cannot serve metrics on port {port} (`metrics_port` plus the rank)"),
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
        let task = tokio::spawn(async move {
            loop {
                if let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(answer(stream));
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

async fn answer(mut stream: TcpStream) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_HEAD {
            return;
        }
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
    let _ = stream.write_all(reply.as_bytes()).await;
}
