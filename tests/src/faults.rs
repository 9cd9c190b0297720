//! The fault matrix: the same faults applied to every backend, one cell per
//! (backend, fault), with what each cell saw printed as a markdown table.
//!
//! A backend describes itself as a [`FaultSubject`]: for each [`Fault`] it
//! builds an [`Env`] (a fresh server, a backend with short timeouts, and the
//! hooks that fault needs) or says why the fault does not apply to it. Every
//! cell asserts that no call panicked, that no hit handed back wrong bytes,
//! and that service came back within [`RECOVERY_BOUND`] where the fault
//! allows recovery; error kinds, calls over the timeout and recovery times are
//! recorded for the table, not asserted, since they are what the table is for.
//!
//! ```ignore
//! fn main() -> std::process::ExitCode {
//!     kvpool_conformance::faults::run_matrix(vec![FaultSubject::new("redis", timeout, setup)])
//! }
//! ```

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvpool_core::{
    BlockHash, BlockKey, GetOutcome, IoVec, IoVecMut, KvBackend, MemRegion, Namespace, PutOutcome,
};
use libtest_mimic::{Arguments, Failed, Trial};
use rand::{RngCore, SeedableRng};

use crate::fixtures::mooncake::MooncakeMaster;
use crate::fixtures::moto::MotoServer;
use crate::fixtures::redis::RedisServer;

/// How long after a restart (or SIGCONT, or freeing the disk) the first
/// successful round trip must come.
pub const RECOVERY_BOUND: Duration = Duration::from_secs(15);

/// What a call may take beyond the backend's configured timeout before it
/// counts as "over the timeout": scheduling on a loaded 2-core CI machine,
/// and a connect attempt that starts just before the request deadline.
pub const SLACK: Duration = Duration::from_secs(1);

/// Size of the values of the warm-up and probe calls.
const VALUE_LEN: usize = 64 << 10;

/// A fault the matrix applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// The server gets SIGKILL while a large batch put and a batch get are in flight.
    KillMidBatch,
    /// The server gets SIGKILL, then starts again (empty) on the same port.
    KillRestart,
    /// The server gets SIGSTOP for longer than the backend's timeout, then SIGCONT.
    Stall,
    /// Bytes of stored values are flipped where they rest, behind the backend's back.
    Corrupt,
    /// The filesystem under the backend fills up, then space is freed.
    DiskFull,
}

impl Fault {
    /// Every fault, in table order.
    pub const ALL: [Fault; 5] = [
        Fault::KillMidBatch,
        Fault::KillRestart,
        Fault::Stall,
        Fault::Corrupt,
        Fault::DiskFull,
    ];

    /// The name in test names and the table.
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillMidBatch => "kill mid-batch",
            Fault::KillRestart => "kill + restart",
            Fault::Stall => "stall (SIGSTOP)",
            Fault::Corrupt => "corrupt at rest",
            Fault::DiskFull => "disk full",
        }
    }

    fn test_name(self) -> &'static str {
        match self {
            Fault::KillMidBatch => "kill_mid_batch",
            Fault::KillRestart => "kill_restart",
            Fault::Stall => "stall",
            Fault::Corrupt => "corrupt_at_rest",
            Fault::DiskFull => "disk_full",
        }
    }
}

/// The server process behind a backend.
pub trait ServerControl: Send {
    /// SIGKILL.
    fn kill(&mut self);
    /// Starts it again on the same port(s); returns once it accepts connections.
    fn restart(&mut self);
    /// Its process id while it runs, for SIGSTOP and SIGCONT.
    fn pid(&self) -> Option<u32>;
}

impl ServerControl for RedisServer {
    fn kill(&mut self) {
        RedisServer::kill(self);
    }
    fn restart(&mut self) {
        RedisServer::restart(self);
    }
    fn pid(&self) -> Option<u32> {
        RedisServer::pid(self)
    }
}

impl ServerControl for MooncakeMaster {
    fn kill(&mut self) {
        MooncakeMaster::kill(self);
    }
    fn restart(&mut self) {
        MooncakeMaster::restart(self);
    }
    fn pid(&self) -> Option<u32> {
        MooncakeMaster::pid(self)
    }
}

impl ServerControl for MotoServer {
    fn kill(&mut self) {
        MotoServer::kill(self);
    }
    fn restart(&mut self) {
        MotoServer::restart(self);
    }
    fn pid(&self) -> Option<u32> {
        MotoServer::pid(self)
    }
}

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Flips bytes of the stored values of `keys` where they rest. It may close and
/// reopen the backend to get at its files; it returns the backend to go on with.
pub type CorruptFn = Box<
    dyn FnMut(Arc<dyn KvBackend>, Vec<BlockKey>) -> BoxFuture<Result<Arc<dyn KvBackend>, String>>
        + Send,
>;

/// Gives the full filesystem its space back.
pub type FreeDiskFn = Box<dyn FnMut() -> Result<(), String> + Send>;

/// What one cell runs against. Dropped at the end of the cell, which stops
/// its servers.
pub struct Env {
    /// The backend under test, with the subject's short timeouts.
    pub backend: Arc<dyn KvBackend>,
    /// The server to kill, restart or stall.
    pub server: Option<Box<dyn ServerControl>>,
    /// For [`Fault::Corrupt`].
    pub corrupt: Option<CorruptFn>,
    /// For [`Fault::DiskFull`]: the backend's filesystem is small and filling
    /// it is up to the cell; this frees space afterwards.
    pub free_disk: Option<FreeDiskFn>,
    /// Anything else that must live as long as the cell (a second backend, a
    /// mount, a directory). Dropped after the backend is closed.
    pub keep: Vec<Box<dyn std::any::Any + Send>>,
}

impl Env {
    /// An environment with just a backend.
    pub fn new(backend: Arc<dyn KvBackend>) -> Self {
        Env {
            backend,
            server: None,
            corrupt: None,
            free_disk: None,
            keep: Vec::new(),
        }
    }

    /// Sets [`Env::server`].
    pub fn with_server(mut self, server: impl ServerControl + 'static) -> Self {
        self.server = Some(Box::new(server));
        self
    }

    /// Sets [`Env::corrupt`] to `flip`, whose futures are boxed here.
    pub fn with_corrupt<F, Fut>(mut self, mut flip: F) -> Self
    where
        F: FnMut(Arc<dyn KvBackend>, Vec<BlockKey>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Arc<dyn KvBackend>, String>> + Send + 'static,
    {
        self.corrupt = Some(Box::new(move |backend, keys| Box::pin(flip(backend, keys))));
        self
    }

    /// Adds `thing` to [`Env::keep`].
    pub fn keeping(mut self, thing: impl std::any::Any + Send) -> Self {
        self.keep.push(Box::new(thing));
        self
    }
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("backend", &self.backend)
            .field("server", &self.server.is_some())
            .finish_non_exhaustive()
    }
}

/// What a subject answers for one fault.
#[derive(Debug)]
pub enum Setup {
    /// Run the fault against this.
    Run(Env),
    /// The fault does not apply; the reason goes in the table.
    NotApplicable(String),
}

type SetupFn = dyn Fn(Fault) -> BoxFuture<Setup> + Send + Sync;

/// One backend (in one configuration) of the matrix.
#[derive(Clone)]
pub struct FaultSubject {
    name: &'static str,
    timeout: Duration,
    setup: Arc<SetupFn>,
}

impl std::fmt::Debug for FaultSubject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultSubject")
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl FaultSubject {
    /// `timeout` is the longest the backend is configured to spend on one call
    /// (its request timeout); `setup` builds a fresh environment per fault.
    pub fn new<F, Fut>(name: &'static str, timeout: Duration, setup: F) -> Self
    where
        F: Fn(Fault) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Setup> + Send + 'static,
    {
        FaultSubject {
            name,
            timeout,
            setup: Arc::new(move |f| Box::pin(setup(f))),
        }
    }
}

/// What one cell saw.
#[derive(Debug, Clone)]
pub struct Cell {
    /// The subject's name.
    pub backend: &'static str,
    /// The fault.
    pub fault: Fault,
    /// Why the fault does not apply, if it does not.
    pub not_applicable: Option<String>,
    /// Calls that panicked (must be 0).
    pub panics: u32,
    /// Hits whose bytes differ from what was stored (must be 0).
    pub wrong_bytes: u32,
    /// Error kinds seen, whole-call or per key, with whether marked temporary.
    pub kinds: BTreeSet<(&'static str, bool)>,
    /// Calls made while the fault was in effect and after.
    pub calls: u32,
    /// Of those, calls that took longer than the timeout plus [`SLACK`].
    pub over_timeout: u32,
    /// The longest call.
    pub slowest: Duration,
    /// From the end of the fault (server ready, SIGCONT, space freed) to the
    /// first successful put-and-get; `None` where the fault has no end.
    pub recovery: Option<Duration>,
    /// A remark for the table.
    pub note: String,
    /// The message of the last error seen, for a failure's explanation.
    pub last_error: String,
}

impl Cell {
    fn new(backend: &'static str, fault: Fault) -> Self {
        Cell {
            backend,
            fault,
            not_applicable: None,
            panics: 0,
            wrong_bytes: 0,
            kinds: BTreeSet::new(),
            calls: 0,
            over_timeout: 0,
            slowest: Duration::ZERO,
            recovery: None,
            note: String::new(),
            last_error: String::new(),
        }
    }
}

impl Cell {
    fn saw(&mut self, e: &kvpool_core::Error) {
        self.kinds.insert((e.kind().as_str(), e.is_temporary()));
        self.last_error = e.to_string();
    }
}

static CELLS: Mutex<Vec<Cell>> = Mutex::new(Vec::new());

/// Runs every fault against every subject as a libtest-compatible binary and
/// prints the table after the trials; with `KVPOOL_FAULT_MATRIX_OUT` set, also
/// writes it to that file.
pub fn run_matrix(subjects: Vec<FaultSubject>) -> std::process::ExitCode {
    let args = Arguments::from_args();
    let trials = subjects
        .iter()
        .flat_map(|s| Fault::ALL.iter().map(move |&f| trial(s.clone(), f)))
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let mut cells = CELLS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if !cells.is_empty() {
        let order = |c: &Cell| (subjects.iter().position(|s| s.name == c.backend), c.fault);
        cells.sort_by_key(order);
        let table = table(&cells);
        println!("\nFault matrix:\n\n{table}");
        if let Ok(path) = std::env::var("KVPOOL_FAULT_MATRIX_OUT") {
            if let Err(e) = std::fs::write(&path, &table) {
                eprintln!("cannot write the table to {path}: {e}");
            }
        }
    }
    conclusion.exit_code()
}

fn trial(subject: FaultSubject, fault: Fault) -> Trial {
    Trial::test(
        format!("{}::{}", subject.name, fault.test_name()),
        move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| Failed::from(format!("a tokio runtime: {e}")))?;
            // Servers are started here, on the trial's own thread (see
            // `fixtures::die_with_parent`), and stopped when the env drops.
            let cell = rt.block_on(async {
                let mut cell = Cell::new(subject.name, fault);
                match (subject.setup)(fault).await {
                    Setup::NotApplicable(why) => cell.not_applicable = Some(why),
                    Setup::Run(env) => run_cell(&mut cell, env, subject.timeout, fault).await,
                }
                cell
            });
            drop(rt);
            CELLS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(cell.clone());
            verdict(&cell)
        },
    )
}

fn verdict(cell: &Cell) -> Result<(), Failed> {
    let mut problems = Vec::new();
    if cell.panics > 0 {
        problems.push(format!("{} calls panicked", cell.panics));
    }
    if cell.wrong_bytes > 0 {
        problems.push(format!("{} hits handed back wrong bytes", cell.wrong_bytes));
    }
    if cell.note.starts_with("FAILED") {
        problems.push(cell.note.clone());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} × {}: {}",
            cell.backend,
            cell.fault.name(),
            problems.join("; ")
        )
        .into())
    }
}

/// The namespace, keys and values of one cell.
struct Probe {
    backend: Arc<dyn KvBackend>,
    ns: Arc<Namespace>,
    timeout: Duration,
}

/// Deterministic bytes for key `i`, so any read can be checked.
fn value(i: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::SmallRng::seed_from_u64(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ len as u64)
        .fill_bytes(&mut v);
    v
}

/// What a get of one key came to.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    Hit,
    Miss,
    Failed,
}

impl Probe {
    fn key(&self, i: u64) -> BlockKey {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&i.to_le_bytes());
        h[8..16].copy_from_slice(b"faultmtx");
        BlockKey::new(self.ns.clone(), BlockHash(h))
    }

    fn keys(&self, range: std::ops::Range<u64>) -> Vec<BlockKey> {
        range.map(|i| self.key(i)).collect()
    }

    /// Times one call, run as a task of its own so a panic is counted, not
    /// propagated. `None` when it panicked.
    async fn call<T: Send + 'static>(
        &self,
        cell: &mut Cell,
        fut: impl Future<Output = kvpool_core::Result<T>> + Send + 'static,
    ) -> Option<kvpool_core::Result<T>> {
        let started = Instant::now();
        let joined = tokio::spawn(fut).await;
        let took = started.elapsed();
        cell.calls += 1;
        cell.slowest = cell.slowest.max(took);
        if took > self.timeout + SLACK {
            cell.over_timeout += 1;
        }
        match joined {
            Ok(Err(e)) => {
                cell.saw(&e);
                Some(Err(e))
            }
            Ok(ok) => Some(ok),
            Err(e) => {
                if e.is_panic() {
                    cell.panics += 1;
                }
                None
            }
        }
    }

    fn put_future(
        &self,
        items: &[(u64, usize)],
    ) -> impl Future<Output = kvpool_core::Result<Vec<PutOutcome>>> + Send + 'static {
        let backend = self.backend.clone();
        let batch: Vec<_> = items
            .iter()
            .map(|&(i, len)| {
                (
                    self.key(i),
                    IoVec::whole(&MemRegion::from_vec(value(i, len))),
                )
            })
            .collect();
        async move { backend.put(batch).await }
    }

    /// Puts; how many keys are present afterwards.
    async fn put(&self, cell: &mut Cell, items: &[(u64, usize)]) -> usize {
        let fut = self.put_future(items);
        match self.call(cell, fut).await {
            Some(Ok(out)) => count_puts(cell, &out),
            _ => 0,
        }
    }

    /// Loads into destinations pre-filled with 0xAA; the outcomes and what the
    /// destinations hold afterwards.
    fn get_future(
        &self,
        items: &[(u64, usize)],
    ) -> impl Future<Output = kvpool_core::Result<Vec<(GetOutcome, Vec<u8>)>>> + Send + 'static
    {
        let backend = self.backend.clone();
        let regions: Vec<_> = items
            .iter()
            .map(|&(_, len)| MemRegion::from_vec(vec![0xAA; len]))
            .collect();
        let batch: Vec<_> = items
            .iter()
            .zip(&regions)
            .map(|(&(i, _), r)| (self.key(i), IoVecMut::whole(r)))
            .collect();
        async move {
            let out = backend.get_into(batch).await?;
            out.into_iter()
                .zip(regions)
                .map(|(o, r)| Ok((o, r.read(0, r.len())?)))
                .collect()
        }
    }

    /// Gets and checks every hit's bytes; one [`Read`] per key (all `Failed`
    /// when the whole call failed).
    async fn get(&self, cell: &mut Cell, items: &[(u64, usize)]) -> Vec<Read> {
        let fut = self.get_future(items);
        match self.call(cell, fut).await {
            Some(Ok(out)) => check_gets(cell, items, out),
            _ => items.iter().map(|_| Read::Failed).collect(),
        }
    }

    async fn exists(&self, cell: &mut Cell, range: std::ops::Range<u64>) {
        let backend = self.backend.clone();
        let keys = self.keys(range);
        let _ = self
            .call(cell, async move { backend.exists(&keys).await })
            .await;
    }

    /// Puts and gets fresh keys until one round trip succeeds; the time it took.
    async fn recover(&self, cell: &mut Cell, first_key: u64) -> Option<Duration> {
        let started = Instant::now();
        let mut i = first_key;
        while started.elapsed() < RECOVERY_BOUND {
            if self.put(cell, &[(i, VALUE_LEN)]).await == 1
                && self.get(cell, &[(i, VALUE_LEN)]).await == [Read::Hit]
            {
                return Some(started.elapsed());
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

fn count_puts(cell: &mut Cell, out: &[PutOutcome]) -> usize {
    let mut present = 0;
    for o in out {
        match o {
            PutOutcome::Stored | PutOutcome::Exists => present += 1,
            PutOutcome::Failed(e) => {
                cell.saw(e);
            }
        }
    }
    present
}

fn check_gets(
    cell: &mut Cell,
    items: &[(u64, usize)],
    out: Vec<(GetOutcome, Vec<u8>)>,
) -> Vec<Read> {
    if out.len() != items.len() {
        cell.note = format!(
            "FAILED: {} outcomes for a batch of {}",
            out.len(),
            items.len()
        );
        return items.iter().map(|_| Read::Failed).collect();
    }
    items
        .iter()
        .zip(out)
        .map(|(&(i, len), (o, bytes))| match o {
            GetOutcome::Hit => {
                if bytes != value(i, len) {
                    cell.wrong_bytes += 1;
                }
                Read::Hit
            }
            GetOutcome::Miss => Read::Miss,
            GetOutcome::Failed(e) => {
                cell.saw(&e);
                Read::Failed
            }
        })
        .collect()
}

/// Sends SIGCONT on drop, so a cell that fails mid-stall leaves no stopped server.
struct Resume(Option<u32>);

impl Drop for Resume {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            signal(pid, libc::SIGCONT);
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) takes plain integers; the pid is a child we started and
    // have not reaped (the fixture reaps it only on kill or drop).
    unsafe { libc::kill(pid, sig) == 0 }
}

async fn run_cell(cell: &mut Cell, mut env: Env, timeout: Duration, fault: Fault) {
    let probe = Probe {
        backend: env.backend.clone(),
        ns: Arc::new(
            Namespace::single_rank(&format!("faults-{:016x}", rand::random::<u64>()))
                .expect("a valid model name"),
        ),
        timeout,
    };
    // The warm-up must work, or the cell measures nothing; its calls are not
    // part of the fault.
    let warm: Vec<_> = (0..16).map(|i| (i, VALUE_LEN)).collect();
    let mut setup = Cell::new(cell.backend, fault);
    if fault != Fault::DiskFull && probe.put(&mut setup, &warm).await != warm.len() {
        cell.note = format!("FAILED: the warm-up put did not store ({:?})", setup.kinds);
        return;
    }
    cell.panics += setup.panics;
    cell.wrong_bytes += setup.wrong_bytes;

    // `None`: the cell stopped early; its note says why.
    let _: Option<()> = match fault {
        Fault::KillMidBatch => kill_mid_batch(cell, &probe, &mut env).await,
        Fault::KillRestart => kill_restart(cell, &probe, &mut env, &warm).await,
        Fault::Stall => stall(cell, &probe, &mut env, &warm).await,
        Fault::Corrupt => corrupt(cell, probe, &mut env).await,
        Fault::DiskFull => disk_full(cell, &probe, &mut env).await,
    };
    // A close against a dead or stopped server must not hang the suite either; one
    // that takes long is reported, since a process exit waits for it.
    let backend = env.backend.clone();
    let started = Instant::now();
    let closed = tokio::time::timeout(timeout + SLACK, backend.close()).await;
    cell.calls += 1;
    if closed.is_err() {
        cell.over_timeout += 1;
        cell.slowest = cell.slowest.max(started.elapsed());
        let _ = write!(cell.note, "; close ran past {:.1?}", timeout + SLACK);
    }
}

fn no_server(cell: &mut Cell) -> Option<()> {
    cell.note = "FAILED: the subject gave no server to act on".into();
    None
}

async fn kill_mid_batch(cell: &mut Cell, probe: &Probe, env: &mut Env) -> Option<()> {
    let Some(server) = env.server.as_mut() else {
        return no_server(cell);
    };
    // 16 MiB out and 1 MiB in, so the kill lands while bytes move.
    let big: Vec<_> = (100..164).map(|i| (i, 256 << 10)).collect();
    let warm: Vec<_> = (0..16).map(|i| (i, VALUE_LEN)).collect();
    let put = tokio::spawn(probe.put_future(&big));
    let get = tokio::spawn(probe.get_future(&warm));
    tokio::time::sleep(Duration::from_millis(3)).await;
    let in_flight = !put.is_finished() || !get.is_finished();
    let killed_at = Instant::now();
    server.kill();
    let put_took = match put.await {
        Ok(Ok(out)) => {
            count_puts(cell, &out);
            killed_at.elapsed()
        }
        other => joined_failure(cell, other.map(|r| r.map(drop)), killed_at),
    };
    let get_took = match get.await {
        Ok(Ok(out)) => {
            check_gets(cell, &warm, out);
            killed_at.elapsed()
        }
        other => joined_failure(cell, other.map(|r| r.map(drop)), killed_at),
    };
    for (what, took) in [("put", put_took), ("get", get_took)] {
        cell.calls += 1;
        cell.slowest = cell.slowest.max(took);
        if took > probe.timeout + SLACK {
            cell.over_timeout += 1;
            let _ = write!(cell.note, "{what} ended {took:.1?} after the kill; ");
        }
    }
    // Against the dead server: every call ends, none hangs.
    probe.exists(cell, 0..4).await;
    probe.put(cell, &[(200, VALUE_LEN), (201, VALUE_LEN)]).await;
    probe.get(cell, &warm[..4]).await;
    if !in_flight {
        cell.note
            .push_str("the batch finished before the kill landed");
    }
    Some(())
}

/// Records a call spawned as a task that failed or panicked; the time since `since`.
fn joined_failure(
    cell: &mut Cell,
    joined: Result<kvpool_core::Result<()>, tokio::task::JoinError>,
    since: Instant,
) -> Duration {
    match joined {
        Ok(Err(e)) => {
            cell.saw(&e);
        }
        Err(e) => cell.panics += u32::from(e.is_panic()),
        Ok(Ok(())) => {}
    }
    since.elapsed()
}

async fn kill_restart(
    cell: &mut Cell,
    probe: &Probe,
    env: &mut Env,
    warm: &[(u64, usize)],
) -> Option<()> {
    let Some(server) = env.server.as_mut() else {
        return no_server(cell);
    };
    server.kill();
    probe.exists(cell, 0..4).await;
    probe.get(cell, &warm[..2]).await;
    server.restart();
    cell.recovery = probe.recover(cell, 1_000).await;
    if cell.recovery.is_none() {
        cell.note = format!(
            "FAILED: no successful round trip within {RECOVERY_BOUND:?} (last error: {})",
            cell.last_error
        );
        return Some(());
    }
    // The server came back empty: old keys are misses (or, for a tier that
    // kept them, correct hits; `get` checks the bytes).
    probe.get(cell, warm).await;
    Some(())
}

async fn stall(cell: &mut Cell, probe: &Probe, env: &mut Env, warm: &[(u64, usize)]) -> Option<()> {
    let Some(pid) = env.server.as_ref().and_then(|s| s.pid()) else {
        return no_server(cell);
    };
    if !signal(pid, libc::SIGSTOP) {
        cell.note = "FAILED: SIGSTOP was refused".into();
        return Some(());
    }
    let resume = Resume(Some(pid));
    probe.exists(cell, 0..4).await;
    probe.get(cell, &warm[..4]).await;
    probe.put(cell, &[(300, VALUE_LEN), (301, VALUE_LEN)]).await;
    drop(resume);
    cell.recovery = probe.recover(cell, 2_000).await;
    if cell.recovery.is_none() {
        cell.note = format!(
            "FAILED: no successful round trip within {RECOVERY_BOUND:?} (last error: {})",
            cell.last_error
        );
        return Some(());
    }
    // Whatever the stall cut short must not have left wrong bytes behind.
    probe.get(cell, warm).await;
    probe.get(cell, &[(300, VALUE_LEN), (301, VALUE_LEN)]).await;
    Some(())
}

async fn corrupt(cell: &mut Cell, mut probe: Probe, env: &mut Env) -> Option<()> {
    let Some(flip) = env.corrupt.as_mut() else {
        cell.note = "FAILED: the subject gave no way to corrupt a value".into();
        return Some(());
    };
    let damaged: Vec<_> = (0..4).map(|i| (i, VALUE_LEN)).collect();
    let intact: Vec<_> = (4..8).map(|i| (i, VALUE_LEN)).collect();
    match flip(probe.backend.clone(), probe.keys(0..4)).await {
        Ok(backend) => {
            probe.backend = backend.clone();
            env.backend = backend;
        }
        Err(e) => {
            cell.note = format!("FAILED: could not corrupt the values: {e}");
            return Some(());
        }
    }
    let first = probe.get(cell, &damaged).await;
    let caught = first.iter().filter(|r| **r != Read::Hit).count();
    // A second read: a damaged value must not come back later either.
    probe.get(cell, &damaged).await;
    let others = probe.get(cell, &intact).await;
    let _ = write!(
        cell.note,
        "{caught}/4 damaged values refused; {}/4 intact ones hit",
        others.iter().filter(|r| **r == Read::Hit).count()
    );
    Some(())
}

async fn disk_full(cell: &mut Cell, probe: &Probe, env: &mut Env) -> Option<()> {
    let Some(free) = env.free_disk.as_mut() else {
        cell.note = "FAILED: the subject gave no small filesystem".into();
        return Some(());
    };
    // 2 MiB batches until puts fail; the filesystems are tens of MiB.
    let len = 256 << 10;
    let mut stored = Vec::new();
    let mut full = false;
    for batch in 0..64u64 {
        let items: Vec<_> = (0..8).map(|j| (10_000 + batch * 8 + j, len)).collect();
        let fut = probe.put_future(&items);
        let Some(Ok(out)) = probe.call(cell, fut).await else {
            full = true;
            break;
        };
        for (&item, o) in items.iter().zip(&out) {
            if o.is_present() {
                stored.push(item);
            }
        }
        if count_puts(cell, &out) < items.len() {
            full = true;
            break;
        }
    }
    if !full {
        cell.note = "FAILED: 128 MiB of puts never filled the filesystem".into();
        return Some(());
    }
    // What was stored before the disk filled reads back whole (or not at all).
    for chunk in stored.chunks(8) {
        probe.get(cell, chunk).await;
    }
    if let Err(e) = free() {
        cell.note = format!("FAILED: could not free space: {e}");
        return Some(());
    }
    cell.recovery = probe.recover(cell, 50_000).await;
    if cell.recovery.is_none() {
        cell.note = format!(
            "FAILED: no successful round trip within {RECOVERY_BOUND:?} of freeing space \
             (last error: {})",
            cell.last_error
        );
    } else {
        let _ = write!(cell.note, "full after {} MiB", stored.len() / 4);
    }
    Some(())
}

/// The markdown table of `cells`.
pub fn table(cells: &[Cell]) -> String {
    let mut out = String::from(
        "| backend | fault | panics | wrong bytes | error kinds (t: temporary, p: permanent) \
         | calls over timeout | slowest call | recovery | notes |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for c in cells {
        if let Some(why) = &c.not_applicable {
            let _ = writeln!(
                out,
                "| {} | {} | n/a | n/a | n/a | n/a | n/a | n/a | {why} |",
                c.backend,
                c.fault.name()
            );
            continue;
        }
        let kinds = if c.kinds.is_empty() {
            "none".to_string()
        } else {
            c.kinds
                .iter()
                .map(|(k, t)| format!("{k} ({})", if *t { "t" } else { "p" }))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let recovery = c
            .recovery
            .map_or_else(|| "—".to_string(), |d| format!("{:.2} s", d.as_secs_f64()));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {kinds} | {} of {} | {:.2} s | {recovery} | {} |",
            c.backend,
            c.fault.name(),
            c.panics,
            c.wrong_bytes,
            c.over_timeout,
            c.calls,
            c.slowest.as_secs_f64(),
            c.note.trim_end_matches("; ")
        );
    }
    out
}
