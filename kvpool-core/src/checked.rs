//! The always-on layer every opened backend is wrapped in.
//!
//! It enforces the parts of the contract that depend only on declared
//! [`Capabilities`](crate::Capabilities) (batch and value size limits, non-empty values), so a
//! caller gets the same clear error from every backend, and it records
//! [`metrics`] for every call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::backend::{BackendInfo, GetOutcome, KvBackend, PutOutcome};
use crate::buffer::{IoVec, IoVecMut, MemRegion};
use crate::error::{Error, Result};
use crate::key::BlockKey;
use crate::metrics::{self, Metrics};

/// A backend wrapped with contract checks and metrics.
#[derive(Debug)]
pub struct CheckedBackend {
    inner: Arc<dyn KvBackend>,
    metrics: &'static Metrics,
}

impl CheckedBackend {
    /// Wraps `inner`, recording into the process-wide metrics.
    pub fn new(inner: Arc<dyn KvBackend>) -> Self {
        CheckedBackend {
            inner,
            metrics: metrics::global(),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &Arc<dyn KvBackend> {
        &self.inner
    }

    fn scheme(&self) -> &'static str {
        self.inner.info().scheme
    }

    fn check_batch(&self, op: &'static str, n: usize) -> Result<()> {
        match self.inner.info().capabilities.max_batch {
            Some(max) if n > max => Err(Error::invalid_argument(format!(
                "a batch of {n} keys exceeds the {} backend's limit of {max}; split it",
                self.scheme()
            ))
            .with_operation(op)
            .with_context("backend", self.scheme())),
            _ => Ok(()),
        }
    }

    fn check_value_len(&self, op: &'static str, key: &BlockKey, len: usize) -> Result<()> {
        if len == 0 {
            return Err(Error::invalid_argument("a value must be at least 1 byte")
                .with_operation(op)
                .with_context("key", key));
        }
        if let Some(max) = self.inner.info().capabilities.max_value_size {
            if len > max {
                return Err(Error::invalid_argument(format!(
                    "a value of {len} bytes exceeds the {} backend's limit of {max} bytes",
                    self.scheme()
                ))
                .with_operation(op)
                .with_context("key", key));
            }
        }
        Ok(())
    }

    fn record<T>(&self, op: &'static str, started: Instant, result: &Result<T>) {
        self.metrics
            .observe_call(self.scheme(), op, started.elapsed());
        if let Err(e) = result {
            self.metrics.add_error(self.scheme(), op, e.kind());
        }
    }
}

#[async_trait]
impl KvBackend for CheckedBackend {
    fn info(&self) -> &BackendInfo {
        self.inner.info()
    }

    async fn register(&self, region: &Arc<MemRegion>) -> Result<()> {
        self.inner.register(region).await
    }

    async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>> {
        self.check_batch("exists", keys.len())?;
        let started = Instant::now();
        let result = self.inner.exists(keys).await;
        self.record("exists", started, &result);
        if let Ok(found) = &result {
            let present = found.iter().filter(|p| **p).count() as u64;
            let scheme = self.scheme();
            self.metrics.add_keys(scheme, "exists", "present", present);
            self.metrics
                .add_keys(scheme, "exists", "absent", found.len() as u64 - present);
        }
        result
    }

    async fn exists_for_load(&self, keys: &[BlockKey], hold: Duration) -> Result<Vec<bool>> {
        self.check_batch("exists_for_load", keys.len())?;
        let started = Instant::now();
        let result = self.inner.exists_for_load(keys, hold).await;
        self.record("exists_for_load", started, &result);
        if let Ok(found) = &result {
            let present = found.iter().filter(|p| **p).count() as u64;
            let scheme = self.scheme();
            self.metrics
                .add_keys(scheme, "exists_for_load", "present", present);
            self.metrics.add_keys(
                scheme,
                "exists_for_load",
                "absent",
                found.len() as u64 - present,
            );
        }
        result
    }

    async fn value_lens(&self, keys: &[BlockKey]) -> Result<Vec<Option<usize>>> {
        self.check_batch("value_lens", keys.len())?;
        let started = Instant::now();
        let result = self.inner.value_lens(keys).await;
        self.record("value_lens", started, &result);
        result
    }

    async fn put(&self, items: Vec<(BlockKey, IoVec)>) -> Result<Vec<PutOutcome>> {
        self.check_batch("put", items.len())?;
        // Invalid values fail alone; the rest of the batch goes through.
        let mut outcomes: Vec<Option<PutOutcome>> = Vec::with_capacity(items.len());
        let mut valid = Vec::with_capacity(items.len());
        for (key, iov) in items {
            match self.check_value_len("put", &key, iov.len()) {
                Ok(()) => {
                    outcomes.push(None);
                    valid.push((key, iov));
                }
                Err(e) => outcomes.push(Some(PutOutcome::Failed(e))),
            }
        }
        let lens: Vec<usize> = valid.iter().map(|(_, v)| v.len()).collect();
        let expected = valid.len();
        let started = Instant::now();
        let result = if valid.is_empty() {
            Ok(Vec::new())
        } else {
            self.inner.put(valid).await
        };
        self.record("put", started, &result);
        let inner = result?;
        if inner.len() != expected {
            return Err(outcome_count_error(
                self.scheme(),
                "put",
                expected,
                inner.len(),
            ));
        }
        let scheme = self.scheme();
        let mut inner = inner.into_iter().zip(lens);
        let mut stored_bytes = 0u64;
        let out = outcomes
            .into_iter()
            .map(|slot| {
                let outcome = match slot {
                    Some(failed) => failed,
                    None => {
                        let (o, len) = inner.next().expect("counted above");
                        if matches!(o, PutOutcome::Stored) {
                            stored_bytes += len as u64;
                        }
                        o
                    }
                };
                let label = match &outcome {
                    PutOutcome::Stored => "stored",
                    PutOutcome::Exists => "exists",
                    PutOutcome::Failed(e) => {
                        self.metrics.add_error(scheme, "put", e.kind());
                        "failed"
                    }
                };
                self.metrics.add_keys(scheme, "put", label, 1);
                outcome
            })
            .collect();
        self.metrics.add_bytes(scheme, "put", stored_bytes);
        Ok(out)
    }

    async fn get_into(&self, items: Vec<(BlockKey, IoVecMut)>) -> Result<Vec<GetOutcome>> {
        self.check_batch("get", items.len())?;
        let lens: Vec<usize> = items.iter().map(|(_, v)| v.len()).collect();
        let expected = items.len();
        let started = Instant::now();
        let result = self.inner.get_into(items).await;
        self.record("get", started, &result);
        let out = result?;
        if out.len() != expected {
            return Err(outcome_count_error(
                self.scheme(),
                "get",
                expected,
                out.len(),
            ));
        }
        let scheme = self.scheme();
        let mut loaded = 0u64;
        for (o, len) in out.iter().zip(lens) {
            let label = match o {
                GetOutcome::Hit => {
                    loaded += len as u64;
                    "hit"
                }
                GetOutcome::Miss => "miss",
                GetOutcome::Failed(e) => {
                    self.metrics.add_error(scheme, "get", e.kind());
                    "failed"
                }
            };
            self.metrics.add_keys(scheme, "get", label, 1);
        }
        self.metrics.add_bytes(scheme, "get", loaded);
        Ok(out)
    }

    async fn remove(&self, keys: &[BlockKey]) -> Result<()> {
        self.check_batch("remove", keys.len())?;
        let started = Instant::now();
        let result = self.inner.remove(keys).await;
        self.record("remove", started, &result);
        result
    }

    async fn clear(&self, scope: crate::backend::ClearScope) -> Result<bool> {
        self.inner.clear(scope).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

fn outcome_count_error(scheme: &str, op: &'static str, expected: usize, got: usize) -> Error {
    Error::new(
        crate::ErrorKind::Unexpected,
        format!("backend answered {got} outcomes for {expected} keys"),
    )
    .with_operation(op)
    .with_context("backend", scheme)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Capabilities;
    use crate::key::{BlockHash, Namespace};
    use crate::ErrorKind;

    /// Declares limits and counts the keys that reach it, so the test can
    /// tell what the layer stopped.
    #[derive(Debug)]
    struct Limited {
        info: BackendInfo,
        reached: parking_lot::Mutex<usize>,
    }

    #[async_trait]
    impl KvBackend for Limited {
        fn info(&self) -> &BackendInfo {
            &self.info
        }
        async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>> {
            *self.reached.lock() += keys.len();
            Ok(vec![false; keys.len()])
        }
        async fn value_lens(&self, keys: &[BlockKey]) -> Result<Vec<Option<usize>>> {
            Ok(vec![None; keys.len()])
        }
        async fn put(&self, items: Vec<(BlockKey, IoVec)>) -> Result<Vec<PutOutcome>> {
            *self.reached.lock() += items.len();
            Ok(items.iter().map(|_| PutOutcome::Stored).collect())
        }
        async fn get_into(&self, items: Vec<(BlockKey, IoVecMut)>) -> Result<Vec<GetOutcome>> {
            Ok(items.iter().map(|_| GetOutcome::Miss).collect())
        }
        async fn remove(&self, _: &[BlockKey]) -> Result<()> {
            Ok(())
        }
    }

    fn key(i: u8) -> BlockKey {
        BlockKey::new(
            Arc::new(Namespace::single_rank("m").unwrap()),
            BlockHash([i; 32]),
        )
    }

    #[tokio::test]
    async fn limits_from_capabilities_are_enforced_per_call_and_per_key() {
        let inner = Arc::new(Limited {
            info: BackendInfo {
                scheme: "limited",
                description: String::new(),
                capabilities: Capabilities {
                    max_batch: Some(2),
                    max_value_size: Some(8),
                    ..Capabilities::default()
                },
            },
            reached: Default::default(),
        });
        let checked = CheckedBackend::new(inner.clone());

        let err = checked.exists(&[key(1), key(2), key(3)]).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("limit of 2"), "{err}");
        assert_eq!(
            *inner.reached.lock(),
            0,
            "an oversized batch never reaches the backend"
        );

        let big = MemRegion::alloc(9);
        let ok = MemRegion::alloc(8);
        let out = checked
            .put(vec![
                (key(1), IoVec::whole(&big)),
                (key(2), IoVec::whole(&ok)),
            ])
            .await
            .unwrap();
        match &out[0] {
            PutOutcome::Failed(e) => assert!(e.to_string().contains("limit of 8 bytes"), "{e}"),
            other => panic!("expected the 9-byte value to fail, got {other:?}"),
        }
        assert!(matches!(out[1], PutOutcome::Stored));
        assert_eq!(
            *inner.reached.lock(),
            1,
            "only the valid value reaches the backend"
        );

        let text = crate::metrics::global().encode();
        assert!(
            text.contains(r#"kvpool_keys_total{backend="limited",op="put",outcome="failed"} 1"#),
            "{text}"
        );
    }
}
