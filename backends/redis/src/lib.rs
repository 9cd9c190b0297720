//! kvpool's `redis` backend: a shared block store on a redis (or Valkey) server or a
//! Redis Cluster, over TCP, TLS or a unix socket, with AUTH.
//!
//! See `README.md` for its configuration and capabilities.

mod backend;
mod config;
mod conn;
mod resp;

pub use backend::{RedisBackend, MAX_VALUE_SIZE};
pub use config::{redact_url, RedisConfig, DEFAULT_URL};

use std::sync::Arc;

use kvpool_core::config::BackendSection;
use kvpool_core::registry::{BackendFactory, OpenFuture};
use kvpool_core::{Config, KvBackend};

/// The scheme `"backend": "redis"` selects; also the name of its config section.
pub const SCHEME: &str = "redis";

/// Bytes of kvpool's header stored before each value (magic, length, checksum).
pub const HEADER_LEN: usize = kvpool_core::frame::HEADER_LEN;

fn open(config: Config) -> OpenFuture {
    Box::pin(async move {
        let cfg: RedisConfig = config.section(SCHEME)?;
        let backend: Arc<dyn KvBackend> = Arc::new(RedisBackend::connect(cfg).await?);
        Ok(backend)
    })
}

inventory::submit! {
    BackendFactory {
        scheme: SCHEME,
        description: "redis server or Redis Cluster (TCP, TLS, unix socket), shared between hosts",
        open,
    }
}

inventory::submit! {
    BackendSection {
        scheme: SCHEME,
        extra_layers: None,
    }
}

/// Entry points for the fuzz targets in `fuzz/`: the reply parser runs on untrusted bytes
/// exactly as the fast path reads them off a server. Not an API; every call must return
/// without panicking.
#[doc(hidden)]
pub mod fuzzing {
    use crate::resp::{parse, Frame, Parsed};

    /// Parses `data` as a stream of replies, as the fast path does, and checks each frame:
    /// it re-encodes to bytes that parse to the same frame, and one byte less of it is never
    /// a frame (so a reply split across reads is never taken early).
    pub fn decode_replies(mut data: &[u8]) {
        loop {
            match parse(data) {
                Ok(Parsed::Frame(frame, used)) => {
                    assert!(used > 0 && used <= data.len(), "{used} of {}", data.len());
                    assert!(
                        !matches!(parse(&data[..used - 1]), Ok(Parsed::Frame(..))),
                        "a frame one byte short parsed"
                    );
                    let again = encode(&frame);
                    assert_eq!(parse(&again), Ok(Parsed::Frame(frame, again.len())));
                    data = &data[used..];
                }
                Ok(Parsed::Incomplete(need)) => {
                    assert!(need > data.len(), "asked for {need} with {}", data.len());
                    return;
                }
                Err(_) => return,
            }
        }
    }

    fn encode(frame: &Frame<'_>) -> Vec<u8> {
        match frame {
            Frame::Simple(s) => [b"+", *s, b"\r\n"].concat(),
            Frame::Error(line) => line.to_vec(),
            Frame::Int(n) => format!(":{n}\r\n").into_bytes(),
            Frame::Nil => b"$-1\r\n".to_vec(),
            Frame::Bulk(b) => [format!("${}\r\n", b.len()).as_bytes(), b, b"\r\n"].concat(),
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn hostile_and_valid_inputs_return() {
            for data in [
                &b"+OK\r\n-ERR x\r\n:42\r\n$-1\r\n$3\r\nabc\r\n"[..],
                b"$3\r\nab",
                b":-\r\n",
                b"$99999999999999999999\r\n",
                b"*1\r\n",
                b"",
            ] {
                super::decode_replies(data);
            }
        }
    }
}
