//! kvpool's `mooncake` backend: a pure-Rust client of an unmodified
//! Mooncake Store (`mooncake_master` 0.3.13, store version "2.0.0").
//!
//! It speaks the master's coro_rpc/struct_pack RPC and the transfer engine's
//! TCP data plane with P2P handshakes, so `"backend": "mooncake"` needs no
//! C++ build. See `README.md` for configuration, modes and limits.

mod backend;
// Public only for kvpool-benches' checksum bench.
#[doc(hidden)]
pub mod checksum;
mod codec;
mod config;
mod ha;
mod master;
mod rpc;
mod sources;
mod transfer;
mod types;

#[cfg(test)]
mod capture_tests;
#[cfg(test)]
mod master_tests;
#[cfg(test)]
mod transfer_tests;

pub use backend::MooncakeBackend;
pub use config::MooncakeConfig;

use std::sync::Arc;

use kvpool_core::config::BackendSection;
use kvpool_core::registry::{BackendFactory, OpenFuture};
use kvpool_core::{Config, KvBackend};

/// The scheme `"backend": "mooncake"` selects.
pub const SCHEME: &str = "mooncake";

fn open(config: Config) -> OpenFuture {
    Box::pin(async move {
        let cfg: MooncakeConfig = config.section(SCHEME)?;
        let backend: Arc<dyn KvBackend> = Arc::new(MooncakeBackend::open(cfg).await?);
        Ok(backend)
    })
}

inventory::submit! {
    BackendFactory {
        scheme: SCHEME,
        description: "Mooncake Store: pure-Rust client of mooncake_master (tcp transfer engine)",
        open,
    }
}

// mooncake.json and its environment overrides are Mooncake's, so this crate reads them.
inventory::submit! {
    BackendSection {
        scheme: SCHEME,
        extra_layers: Some(sources::layers),
    }
}

/// Entry points for the `cargo fuzz` targets in `fuzz/`: each decodes
/// untrusted bytes exactly as the client does off the network. Not an API;
/// every call must return (`Ok` or `Err`) without panicking or allocating
/// more than the input justifies.
#[doc(hidden)]
pub mod fuzzing {
    use crate::rpc::{ResponseHeader, RESPONSE_HEADER_LEN};

    /// Decodes `data` as a coro_rpc response (header, then body) and the body
    /// as the return type of every master RPC the client makes.
    pub fn decode_master_response(data: &[u8]) {
        if let Some(head) = data.first_chunk::<RESPONSE_HEADER_LEN>() {
            let _ = ResponseHeader::parse(head);
        }
        crate::types::unpack_every_ret(data);
    }

    /// Decodes `data` as etcd's HTTP answer to the HA leader lookup, as the
    /// client does at open and after a failover.
    pub fn decode_etcd_reply(data: &[u8]) {
        let key = crate::ha::master_view_key("");
        if let Ok((_, body)) = crate::ha::split_http(data) {
            let _ = crate::ha::decode_range_reply(&body, &key);
        }
        let _ = crate::ha::decode_range_reply(data, &key);
    }

    /// Decodes `data` as every byte stream the TCP data plane reads from a
    /// peer: a handshake frame; a segment owner's request stream, served
    /// against a small segment; and an owner's answers to a pipelined batch,
    /// in v1 and v2 framing.
    pub fn decode_data_plane(data: &[u8]) {
        use crate::transfer::{pipeline, read_handshake, serve_session, LocalSegment, Op};
        use kvpool_core::{IoVec, IoVecMut, MemRegion};

        thread_local! {
            static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a current-thread runtime");
            static SEGMENT: LocalSegment = LocalSegment::new(MemRegion::alloc(4096));
        }
        RT.with(|rt| {
            SEGMENT.with(|segment| {
                let requests = rebase(data, segment.base());
                rt.block_on(async {
                    let _ = read_handshake(&mut &data[..]).await;
                    let stream = tokio::io::join(&requests[..], tokio::io::sink());
                    let _ = serve_session(stream, segment).await;
                    let (dst, src) = (MemRegion::alloc(64), MemRegion::alloc(16));
                    for v2 in [false, true] {
                        let ops = [
                            Op::Read {
                                addr: 0x1000,
                                dst: IoVecMut::whole(&dst),
                            },
                            Op::Write {
                                addr: 0x2000,
                                src: IoVec::whole(&src),
                            },
                            Op::Read {
                                addr: 0x3000,
                                dst: IoVecMut::whole(&dst),
                            },
                        ];
                        let mut conn = tokio::io::join(data, tokio::io::sink());
                        let _ = pipeline(&mut conn, v2, "fuzz", &ops).await;
                    }
                })
            })
        });
    }

    /// Peers address a segment by `base + offset`, and the base is a real
    /// pointer; adding it to every request's address lets the fuzzer reach
    /// the paths that serve a request inside the segment.
    fn rebase(data: &[u8], base: u64) -> Vec<u8> {
        let mut out = data.to_vec();
        let mut at = 0usize;
        while let Some(head) = at.checked_add(24).and_then(|end| out.get_mut(at..end)) {
            let size = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
            let addr = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
            head[8..16].copy_from_slice(&addr.wrapping_add(base).to_le_bytes());
            let write = head[16] & 0x7f == 1;
            at += 24;
            if write {
                at = at.saturating_add(usize::try_from(size).unwrap_or(usize::MAX));
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn hostile_inputs_return() {
            for data in [
                &[][..],
                &[0x15; 16][..],
                &[0xff; 64][..],
                &[
                    0x15, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
                ][..],
            ] {
                super::decode_master_response(data);
                super::decode_etcd_reply(data);
                super::decode_data_plane(data);
            }
        }
    }
}
