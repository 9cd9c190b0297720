//! The tiered backend: reads top-down with promotion, writes through a write-back queue.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};

use kvpool_core::backend::{BackendInfo, Capabilities, GetOutcome, KvBackend, PutOutcome};
use kvpool_core::batch::Outcomes;
use kvpool_core::buffer::{IoVec, IoVecMut, MemRegion};
use kvpool_core::config::Config;
use kvpool_core::error::{Error, ErrorKind, Result};
use kvpool_core::key::BlockKey;
use kvpool_core::metrics;

use crate::config::TieredConfig;
use crate::SCHEME;

const MAX_TIERS: usize = 8;
const TIER_NAMES: [&str; MAX_TIERS] = [
    "tier0", "tier1", "tier2", "tier3", "tier4", "tier5", "tier6", "tier7",
];

fn all_tiers_down() -> Error {
    Error::new(
        ErrorKind::Unavailable,
        "every tier of the tiered pool is backing off after failures",
    )
    .set_temporary()
}

#[derive(Debug, Default)]
struct Health {
    failures: u32,
    down_until: Option<Instant>,
}

struct Tier {
    backend: Arc<dyn KvBackend>,
    name: &'static str,
    health: Mutex<Health>,
}

impl Tier {
    fn available(&self) -> bool {
        let h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        h.down_until.is_none_or(|t| Instant::now() >= t)
    }
}

struct Shared {
    tiers: Vec<Tier>,
    backoff: Duration,
    max_backoff: Duration,
}

impl Shared {
    fn failed(&self, t: usize, op: &'static str, e: &Error) {
        let tier = &self.tiers[t];
        metrics::global().add_error(SCHEME, tier.name, e.kind());
        let mut h = tier.health.lock().unwrap_or_else(|e| e.into_inner());
        h.failures = h.failures.saturating_add(1);
        let factor = 1u32 << (h.failures - 1).min(16);
        let wait = self.backoff.saturating_mul(factor).min(self.max_backoff);
        h.down_until = Some(Instant::now() + wait);
        tracing::warn!(tier = t, op, error = %e, backoff_ms = wait.as_millis() as u64,
            "tiered: tier failed; skipping it until the backoff ends");
    }

    fn succeeded(&self, t: usize) {
        let mut h = self.tiers[t]
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if h.failures != 0 {
            *h = Health::default();
        }
    }

    /// Puts `items` into tiers `range`, counting failures; used by write-back and promotion.
    async fn put_into(
        &self,
        tiers: std::ops::Range<usize>,
        items: &[(BlockKey, Bytes)],
        what: &'static str,
    ) {
        for t in tiers {
            if !self.tiers[t].available() {
                continue;
            }
            let batch: Vec<(BlockKey, IoVec)> = items
                .iter()
                .map(|(k, v)| (k.clone(), IoVec::whole(&MemRegion::from_vec(v.to_vec()))))
                .collect();
            match self.tiers[t].backend.put(batch).await {
                Ok(outcomes) => {
                    self.succeeded(t);
                    let stored = outcomes.iter().filter(|o| o.is_present()).count() as u64;
                    metrics::global().add_keys(SCHEME, what, self.tiers[t].name, stored);
                }
                Err(e) => self.failed(t, what, &e),
            }
        }
    }
}

type AskFuture<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Option<T>>>> + Send>>;

struct WriteBack {
    items: Vec<(BlockKey, Bytes)>,
}

/// The `tiered` backend.
pub struct TieredBackend {
    info: BackendInfo,
    shared: Arc<Shared>,
    queue: mpsc::Sender<WriteBack>,
    promote: bool,
    promote_budget: Arc<Semaphore>,
    promote_max: usize,
    drained: Arc<tokio::sync::Notify>,
    pending: Arc<std::sync::atomic::AtomicUsize>,
    closed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for TieredBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredBackend")
            .field("description", &self.info.description)
            .finish_non_exhaustive()
    }
}

impl TieredBackend {
    /// Opens every tier (through the registry, each with the check layer) and starts the
    /// write-back task on the current Tokio runtime.
    ///
    /// # Errors
    /// `ConfigInvalid` for fewer than 2 or more than 8 tiers, a tier that is itself `tiered`,
    /// or a tier's own configuration error (named with its index); a tier's open error.
    pub async fn open(cfg: TieredConfig) -> Result<TieredBackend> {
        if cfg.tiers.len() < 2 || cfg.tiers.len() > MAX_TIERS {
            return Err(Error::config_invalid(format!(
                "tiered.tiers has {} entries; a tiered pool needs 2 to {MAX_TIERS} tiers, \
                 fastest first",
                cfg.tiers.len()
            )));
        }
        if cfg.write_back_queue == 0 {
            return Err(Error::config_invalid(
                "tiered.write_back_queue must be at least 1",
            ));
        }
        let mut tiers = Vec::with_capacity(cfg.tiers.len());
        for (i, value) in cfg.tiers.iter().enumerate() {
            let tier_config =
                Config::from_extra_config(value.clone()).map_err(|e| e.with_context("tier", i))?;
            if tier_config.backend == SCHEME {
                return Err(Error::config_invalid(format!(
                    "tiered.tiers[{i}] is itself tiered; list its tiers directly"
                )));
            }
            let backend = kvpool_core::registry::open(&tier_config)
                .await
                .map_err(|e| e.with_context("tier", i))?;
            tiers.push(Tier {
                backend,
                name: TIER_NAMES[i],
                health: Mutex::new(Health::default()),
            });
        }
        let caps: Vec<Capabilities> = tiers
            .iter()
            .map(|t| t.backend.info().capabilities)
            .collect();
        let min_opt = |f: fn(&Capabilities) -> Option<usize>| caps.iter().filter_map(f).min();
        let capabilities = Capabilities {
            shared: caps.iter().any(|c| c.shared),
            persistent: caps.iter().any(|c| c.persistent),
            remove: caps.iter().all(|c| c.remove),
            requires_registration: caps.iter().any(|c| c.requires_registration),
            // The stack as a whole keeps what the last tier keeps; upper-tier eviction loses
            // nothing, so it is not bound the way one capacity-bound backend is.
            capacity_bound: false,
            max_batch: min_opt(|c| c.max_batch),
            max_value_size: min_opt(|c| c.max_value_size),
            // A key is held by the tier that found it, which the load reaches first.
            holds_for_load: caps.iter().all(|c| c.holds_for_load),
        };
        let description = tiers
            .iter()
            .map(|t| {
                format!(
                    "{} ({})",
                    t.backend.info().scheme,
                    t.backend.info().description
                )
            })
            .collect::<Vec<_>>()
            .join(" -> ");
        let shared = Arc::new(Shared {
            tiers,
            backoff: Duration::from_millis(cfg.retry_backoff_ms.max(1)),
            max_backoff: Duration::from_millis(cfg.max_backoff_ms.max(cfg.retry_backoff_ms.max(1))),
        });
        let (queue, mut rx) = mpsc::channel::<WriteBack>(cfg.write_back_queue);
        let drained = Arc::new(tokio::sync::Notify::new());
        let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        {
            let shared = shared.clone();
            let drained = drained.clone();
            let pending = pending.clone();
            let lower = 1..shared.tiers.len();
            tokio::spawn(async move {
                while let Some(job) = rx.recv().await {
                    shared
                        .put_into(lower.clone(), &job.items, "write_back")
                        .await;
                    pending.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    drained.notify_waiters();
                }
            });
        }
        let promote_max = cfg.promote_max_inflight.0.min(u32::MAX as u64 / 2) as usize;
        Ok(TieredBackend {
            info: BackendInfo {
                scheme: SCHEME,
                description,
                capabilities,
            },
            shared,
            queue,
            promote: cfg.promote,
            promote_budget: Arc::new(Semaphore::new(promote_max)),
            promote_max,
            drained,
            pending,
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::closed(SCHEME));
        }
        Ok(())
    }

    /// Asks each available tier, top-down, about the keys no tier above has answered `Some`
    /// for: one batch call per tier. Tier errors are counted and treated as "not here"; the
    /// call fails only when no tier answered at all.
    async fn ask_down<T>(
        &self,
        keys: &[BlockKey],
        op: &'static str,
        ask: impl Fn(Arc<dyn KvBackend>, Vec<BlockKey>) -> AskFuture<T>,
    ) -> Result<Vec<Option<T>>> {
        let mut found: Vec<Option<T>> = (0..keys.len()).map(|_| None).collect();
        if keys.is_empty() {
            return Ok(found);
        }
        let mut missing: Vec<usize> = (0..keys.len()).collect();
        let mut first_error = None;
        let mut answered = false;
        for (t, tier) in self.shared.tiers.iter().enumerate() {
            if missing.is_empty() {
                break;
            }
            if !tier.available() {
                continue;
            }
            let batch: Vec<BlockKey> = missing.iter().map(|&i| keys[i].clone()).collect();
            match ask(tier.backend.clone(), batch).await {
                Ok(answers) => {
                    self.shared.succeeded(t);
                    answered = true;
                    let mut still = Vec::new();
                    for (&i, answer) in missing.iter().zip(answers) {
                        match answer {
                            Some(v) => found[i] = Some(v),
                            None => still.push(i),
                        }
                    }
                    missing = still;
                }
                Err(e) => {
                    self.shared.failed(t, op, &e);
                    first_error.get_or_insert(e);
                }
            }
        }
        if !answered {
            return Err(first_error.unwrap_or_else(all_tiers_down));
        }
        Ok(found)
    }

    /// Waits until the write-back queue is empty (tests, shutdown).
    pub async fn flush(&self) {
        use std::sync::atomic::Ordering;
        loop {
            let notified = self.drained.notified();
            if self.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    fn promote_hits(&self, hits: Vec<(usize, BlockKey, Bytes)>) {
        if !self.promote || hits.is_empty() {
            return;
        }
        for (found_in, key, value) in hits {
            let n = value.len().min(self.promote_max) as u32;
            let Ok(permit) = self.promote_budget.clone().try_acquire_many_owned(n) else {
                metrics::global().add_keys(SCHEME, "promote", "skipped", 1);
                continue;
            };
            let shared = self.shared.clone();
            tokio::spawn(async move {
                shared
                    .put_into(0..found_in, &[(key, value)], "promote")
                    .await;
                drop(permit);
            });
        }
    }
}

#[async_trait]
impl KvBackend for TieredBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    async fn register(&self, region: &Arc<MemRegion>) -> Result<()> {
        self.check_open()?;
        for t in &self.shared.tiers {
            t.backend.register(region).await?;
        }
        Ok(())
    }

    async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>> {
        self.check_open()?;
        let found = self
            .ask_down(keys, "exists", |backend, ask| {
                Box::pin(async move {
                    let present = backend.exists(&ask).await?;
                    Ok(present.into_iter().map(|p| p.then_some(())).collect())
                })
            })
            .await?;
        Ok(found.into_iter().map(|f| f.is_some()).collect())
    }

    /// Each tier holds what it found; keys it lacks are asked of the tiers below, as in
    /// [`exists`](Self::exists).
    async fn exists_for_load(&self, keys: &[BlockKey], hold: Duration) -> Result<Vec<bool>> {
        self.check_open()?;
        let found = self
            .ask_down(keys, "exists_for_load", move |backend, ask| {
                Box::pin(async move {
                    let present = backend.exists_for_load(&ask, hold).await?;
                    Ok(present.into_iter().map(|p| p.then_some(())).collect())
                })
            })
            .await?;
        Ok(found.into_iter().map(|f| f.is_some()).collect())
    }

    async fn value_lens(&self, keys: &[BlockKey]) -> Result<Vec<Option<usize>>> {
        self.check_open()?;
        self.ask_down(keys, "value_lens", |backend, ask| {
            Box::pin(async move { backend.value_lens(&ask).await })
        })
        .await
    }

    async fn put(&self, items: Vec<(BlockKey, IoVec)>) -> Result<Vec<PutOutcome>> {
        self.check_open()?;
        let top = &self.shared.tiers[0];
        let copies: Vec<(BlockKey, IoVec)> = items.clone();
        let outcomes = match top.backend.put(items).await {
            Ok(o) => {
                self.shared.succeeded(0);
                o
            }
            Err(e) => {
                // The top tier is down: write through to the lower tiers so nothing is lost.
                self.shared.failed(0, "put", &e);
                let values: Vec<(BlockKey, Bytes)> = copies
                    .iter()
                    .map(|(k, v)| (k.clone(), Bytes::from(v.to_vec())))
                    .collect();
                self.shared
                    .put_into(1..self.shared.tiers.len(), &values, "write_through")
                    .await;
                return Err(e);
            }
        };
        // Values the top tier newly stored flow down; the caller's buffers are only borrowed
        // for this call, so the bytes are copied now.
        let down: Vec<(BlockKey, Bytes)> = copies
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| matches!(o, PutOutcome::Stored))
            .map(|((k, v), _)| (k.clone(), Bytes::from(v.to_vec())))
            .collect();
        if !down.is_empty() {
            use std::sync::atomic::Ordering;
            self.pending.fetch_add(1, Ordering::AcqRel);
            match self.queue.try_send(WriteBack { items: down }) {
                Ok(()) => {}
                Err(
                    mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job),
                ) => {
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                    metrics::global().add_keys(
                        SCHEME,
                        "write_back",
                        "synchronous",
                        job.items.len() as u64,
                    );
                    self.shared
                        .put_into(1..self.shared.tiers.len(), &job.items, "write_through")
                        .await;
                }
            }
        }
        Ok(outcomes)
    }

    async fn get_into(&self, items: Vec<(BlockKey, IoVecMut)>) -> Result<Vec<GetOutcome>> {
        self.check_open()?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let n = items.len();
        let mut outcomes = Outcomes::new(n, "get_into");
        let mut failures: Vec<Option<Error>> = (0..n).map(|_| None).collect();
        let mut missing: Vec<usize> = (0..n).collect();
        let mut promotions = Vec::new();
        let mut first_error = None;
        let mut answered = false;
        for (t, tier) in self.shared.tiers.iter().enumerate() {
            if missing.is_empty() {
                break;
            }
            if !tier.available() {
                continue;
            }
            let batch: Vec<(BlockKey, IoVecMut)> =
                missing.iter().map(|&i| items[i].clone()).collect();
            match tier.backend.get_into(batch).await {
                Ok(results) => {
                    self.shared.succeeded(t);
                    answered = true;
                    let mut still = Vec::new();
                    for (&i, outcome) in missing.iter().zip(results) {
                        match outcome {
                            GetOutcome::Hit => {
                                if t > 0 {
                                    promotions.push((
                                        t,
                                        items[i].0.clone(),
                                        Bytes::from(items[i].1.to_vec()),
                                    ));
                                }
                                outcomes.set(i, GetOutcome::Hit);
                            }
                            GetOutcome::Miss => still.push(i),
                            GetOutcome::Failed(e) => {
                                // A corrupt copy here may have a good one below.
                                failures[i] = Some(e);
                                still.push(i);
                            }
                        }
                    }
                    missing = still;
                }
                Err(e) => {
                    self.shared.failed(t, "get", &e);
                    first_error.get_or_insert(e);
                }
            }
        }
        if !answered {
            return Err(first_error.unwrap_or_else(all_tiers_down));
        }
        metrics::global().add_keys(SCHEME, "promote", "found_below", promotions.len() as u64);
        self.promote_hits(promotions);
        // No tier had it: the failure of a tier that had a bad copy, else a miss.
        Ok(outcomes.into_vec_with(|i| match failures[i].take() {
            Some(e) => GetOutcome::Failed(e),
            None => GetOutcome::Miss,
        }))
    }

    async fn remove(&self, keys: &[BlockKey]) -> Result<()> {
        self.check_open()?;
        self.flush().await;
        let mut first_error = None;
        for (t, tier) in self.shared.tiers.iter().enumerate() {
            if let Err(e) = tier.backend.remove(keys).await {
                self.shared.failed(t, "remove", &e);
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Clears each tier in `scope` after pending write-backs: `Local` empties the tiers only
    /// this process sees and leaves shared ones alone; `All` empties every tier.
    async fn clear(&self, scope: kvpool_core::ClearScope) -> Result<bool> {
        self.check_open()?;
        self.flush().await;
        let mut cleared = false;
        for (t, tier) in self.shared.tiers.iter().enumerate() {
            match tier.backend.clear(scope).await {
                Ok(c) => cleared |= c,
                Err(e) => {
                    self.shared.failed(t, "clear", &e);
                    return Err(e);
                }
            }
        }
        Ok(cleared)
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return Ok(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.flush()).await;
        let mut first_error = None;
        for tier in &self.shared.tiers {
            if let Err(e) = tier.backend.close().await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
