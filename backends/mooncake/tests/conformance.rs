//! Runs the shared conformance suite against a real `mooncake_master`, in both
//! modes: a segment owner, and a pure client storing into another process's
//! segment (opened from config through the registry, with the check layer).
//!
//! Each case gets a master of its own: cases run in parallel, and a master
//! allocates into any mounted segment, so sharing one would let a case's
//! values land in (and vanish with) another case's segment, and would make
//! the eviction case's capacity meaningless.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use kvpool_backend_mooncake::MooncakeBackend;
use kvpool_conformance::fixtures::mooncake::MooncakeMaster;
use kvpool_conformance::Subject;
use kvpool_core::{
    BackendInfo, BlockKey, Config, GetOutcome, IoVec, IoVecMut, KvBackend, PutOutcome, Result,
};

const SEGMENT: u64 = 64 << 20;

/// A backend with the master (and storage owner) it needs, stopped with it.
#[derive(Debug)]
struct Isolated {
    backend: Arc<dyn KvBackend>,
    _owner: Option<MooncakeBackend>,
    _master: MooncakeMaster,
}

#[async_trait]
impl KvBackend for Isolated {
    fn info(&self) -> &BackendInfo {
        self.backend.info()
    }
    async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>> {
        self.backend.exists(keys).await
    }
    async fn exists_for_load(
        &self,
        keys: &[BlockKey],
        hold: std::time::Duration,
    ) -> Result<Vec<bool>> {
        self.backend.exists_for_load(keys, hold).await
    }
    async fn value_lens(&self, keys: &[BlockKey]) -> Result<Vec<Option<usize>>> {
        self.backend.value_lens(keys).await
    }
    async fn put(&self, items: Vec<(BlockKey, IoVec)>) -> Result<Vec<PutOutcome>> {
        self.backend.put(items).await
    }
    async fn get_into(&self, items: Vec<(BlockKey, IoVecMut)>) -> Result<Vec<GetOutcome>> {
        self.backend.get_into(items).await
    }
    async fn remove(&self, keys: &[BlockKey]) -> Result<()> {
        self.backend.remove(keys).await
    }
    async fn clear(&self, scope: kvpool_core::ClearScope) -> Result<bool> {
        self.backend.clear(scope).await
    }
    async fn close(&self) -> Result<()> {
        self.backend.close().await
    }
}

fn main() -> std::process::ExitCode {
    kvpool_conformance::run_all(&[
        Subject::new("mooncake_owner", Some(SEGMENT), || async {
            let master = MooncakeMaster::start();
            let backend = MooncakeBackend::open(common::config(&master, SEGMENT)).await?;
            Ok(Arc::new(Isolated {
                backend: Arc::new(backend),
                _owner: None,
                _master: master,
            }) as Arc<dyn KvBackend>)
        }),
        Subject::new(
            "mooncake_client_opened_from_config",
            Some(SEGMENT),
            || async {
                let master = MooncakeMaster::start();
                let owner = MooncakeBackend::open(common::config(&master, SEGMENT)).await?;
                let config = Config::from_extra_config(serde_json::json!({
                    "backend": "mooncake",
                    "mooncake": {
                        "master_server_address": master.address(),
                        "metadata_server": "P2PHANDSHAKE",
                        "protocol": "tcp",
                        "global_segment_size": "0",
                        "local_hostname": "127.0.0.1",
                    },
                }))?;
                let backend = kvpool_core::open(&config).await?;
                Ok(Arc::new(Isolated {
                    backend,
                    _owner: Some(owner),
                    _master: master,
                }) as Arc<dyn KvBackend>)
            },
        ),
    ])
}
