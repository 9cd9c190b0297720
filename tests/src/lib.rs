//! The conformance suite: one case per promise of the [`KvBackend`] contract.
//!
//! Every backend crate runs it from its own `tests/conformance.rs`
//! (`harness = false`):
//!
//! ```ignore
//! fn main() -> std::process::ExitCode {
//!     kvpool_conformance::run(Subject::new("memory", Some(CAPACITY), || async { ... }))
//! }
//! ```
//!
//! Cases that a backend's [`Capabilities`](kvpool_core::Capabilities) exclude
//! are reported as *ignored*, never as passed. Each case opens a fresh
//! backend and works in a namespace of its own (a random model name), so
//! shared backends (redis, mooncake) can run the suite concurrently and
//! repeatedly against one server.

mod cases;
pub mod faults;
pub mod fixtures;
pub mod race;

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;

use kvpool_core::{KvBackend, Result};
use libtest_mimic::{Arguments, Trial};

type OpenFn =
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Arc<dyn KvBackend>>> + Send>> + Send + Sync;

/// The backend under test.
#[derive(Clone)]
pub struct Subject {
    name: &'static str,
    capacity_bytes: Option<u64>,
    open: Arc<OpenFn>,
}

impl std::fmt::Debug for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subject")
            .field("name", &self.name)
            .field("capacity_bytes", &self.capacity_bytes)
            .finish()
    }
}

impl Subject {
    /// `open` builds a fresh backend for each case. `capacity_bytes` is the
    /// configured capacity of a capacity-bound backend (the eviction case
    /// writes several times this much).
    pub fn new<F, Fut>(name: &'static str, capacity_bytes: Option<u64>, open: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Arc<dyn KvBackend>>> + Send + 'static,
    {
        Subject {
            name,
            capacity_bytes,
            open: Arc::new(move || Box::pin(open())),
        }
    }

    async fn open(&self) -> Arc<dyn KvBackend> {
        match (self.open)().await {
            Ok(b) => b,
            Err(e) => panic!("could not open the {} backend under test: {e}", self.name),
        }
    }
}

/// Runs every case against `subject` as a libtest-compatible test binary.
pub fn run(subject: Subject) -> ExitCode {
    run_all(&[subject])
}

/// Runs every case against each subject (say, a backend built directly and
/// the same backend opened from config through `kvpool_core::open`).
pub fn run_all(subjects: &[Subject]) -> ExitCode {
    let args = Arguments::from_args();
    let trials = subjects.iter().flat_map(trials).collect();
    libtest_mimic::run(&args, trials).exit_code()
}

/// Every case as a trial, those excluded by capabilities marked ignored.
pub fn trials(subject: &Subject) -> Vec<Trial> {
    let caps = {
        let rt = runtime();
        let backend = rt.block_on(subject.open());
        let caps = backend.info().capabilities;
        let _ = rt.block_on(backend.close());
        caps
    };
    cases::CASES
        .iter()
        .map(|case| {
            let subject = subject.clone();
            let applies = (case.applies)(&caps, subject.capacity_bytes);
            let run = case.run;
            Trial::test(format!("{}::{}", subject.name, case.name), move || {
                let rt = runtime();
                rt.block_on(async {
                    let backend = subject.open().await;
                    let ctx = cases::Ctx::new(backend.clone(), subject.capacity_bytes);
                    run(ctx).await;
                    let _ = backend.close().await;
                });
                Ok(())
            })
            .with_ignored_flag(!applies)
        })
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}
