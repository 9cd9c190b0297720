//! Runs the shared conformance suite against the memory backend: built
//! directly, and opened from config through the registry (which adds the
//! contract-check and metrics layer users get).

use std::sync::Arc;

use kvpool_backend_memory::{MemoryBackend, MemoryConfig};
use kvpool_conformance::Subject;
use kvpool_core::size::ByteSize;
use kvpool_core::{Config, KvBackend};

const CAPACITY: u64 = 64 << 20;

fn main() -> std::process::ExitCode {
    kvpool_conformance::run_all(&[
        Subject::new("memory", Some(CAPACITY), || async {
            let backend = MemoryBackend::new(MemoryConfig {
                capacity: ByteSize(CAPACITY),
                ..MemoryConfig::default()
            })?;
            Ok(Arc::new(backend) as Arc<dyn KvBackend>)
        }),
        Subject::new("memory_opened_from_config", Some(CAPACITY), || async {
            let config = Config::from_extra_config(serde_json::json!({
                "backend": "memory",
                "memory": { "capacity": CAPACITY },
            }))?;
            kvpool_core::open(&config).await
        }),
    ])
}
