//! Helpers the mooncake integration tests share.
#![allow(dead_code)] // each test binary uses a different subset

use kvpool_backend_mooncake::MooncakeConfig;
use kvpool_conformance::fixtures::mooncake::MooncakeMaster;
use kvpool_core::size::ByteSize;

/// A loopback config for `master`, contributing `segment` bytes (0: pure client).
pub fn config(master: &MooncakeMaster, segment: u64) -> MooncakeConfig {
    MooncakeConfig {
        master_server_address: master.address(),
        global_segment_size: ByteSize(segment),
        local_hostname: "127.0.0.1".into(),
        ..MooncakeConfig::default()
    }
}

/// A two-worker runtime, like an engine's.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
