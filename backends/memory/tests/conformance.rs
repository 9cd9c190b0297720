//! Runs the shared conformance suite against the memory backend.

use std::sync::Arc;

use kvpool_backend_memory::{MemoryBackend, MemoryConfig};
use kvpool_conformance::Subject;
use kvpool_core::size::ByteSize;
use kvpool_core::KvBackend;

const CAPACITY: u64 = 64 << 20;

fn main() -> std::process::ExitCode {
    kvpool_conformance::run(Subject::new("memory", Some(CAPACITY), || async {
        let backend = MemoryBackend::new(MemoryConfig {
            capacity: ByteSize(CAPACITY),
            ..MemoryConfig::default()
        })?;
        Ok(Arc::new(backend) as Arc<dyn KvBackend>)
    }))
}
