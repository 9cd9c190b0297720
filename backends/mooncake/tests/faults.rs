//! Failures: the master killed mid-run, and a segment owner that dies.
//! Every call must end with an error (Unavailable or Timeout) in bounded
//! time, never panic or hang, and work must resume once a master is back.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvpool_backend_mooncake::{MooncakeBackend, MooncakeConfig};
use kvpool_conformance::fixtures::mooncake::MooncakeMaster;
use kvpool_core::size::ByteSize;
use kvpool_core::{
    BlockHash, BlockKey, ErrorKind, GetOutcome, IoVec, IoVecMut, KvBackend, MemRegion, Namespace,
    PutOutcome,
};

fn keys(n: u8) -> Vec<BlockKey> {
    let ns =
        Arc::new(Namespace::single_rank(&format!("faults-{:08x}", rand::random::<u32>())).unwrap());
    (0..n)
        .map(|i| BlockKey::new(ns.clone(), BlockHash([i; 32])))
        .collect()
}

/// Short timeouts, so a fault shows within the test's patience.
fn config(master: &MooncakeMaster, segment: u64) -> MooncakeConfig {
    MooncakeConfig {
        rpc_timeout_ms: Some(1_000),
        connect_timeout_ms: Some(500),
        transfer_timeout_ms: Some(1_000),
        no_space_retry_ms: 500,
        ..common::config(master, segment)
    }
}

async fn put(b: &dyn KvBackend, key: &BlockKey, v: &[u8]) -> kvpool_core::Result<PutOutcome> {
    let r = MemRegion::from_vec(v.to_vec());
    Ok(b.put(vec![(key.clone(), IoVec::whole(&r))])
        .await?
        .remove(0))
}

async fn get(b: &dyn KvBackend, key: &BlockKey, len: usize) -> kvpool_core::Result<GetOutcome> {
    let r = MemRegion::alloc(len);
    Ok(b.get_into(vec![(key.clone(), IoVecMut::whole(&r))])
        .await?
        .remove(0))
}

fn is_down(e: &kvpool_core::Error) -> bool {
    matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout) && e.is_temporary()
}

#[test]
fn master_killed_mid_run_errors_promptly_and_work_resumes_after_restart() {
    let mut master = MooncakeMaster::start();
    common::rt().block_on(async {
        let owner = MooncakeBackend::open(config(&master, 32 << 20))
            .await
            .unwrap();
        let client = MooncakeBackend::open(config(&master, 0)).await.unwrap();
        let k = keys(8);
        let v = vec![7u8; 10_000];
        assert!(put(&client, &k[0], &v).await.unwrap().is_present());
        assert!(get(&client, &k[0], v.len()).await.unwrap().is_hit());

        master.kill();
        for b in [&owner as &dyn KvBackend, &client] {
            let t = Instant::now();
            let e = b.exists(&k[..1]).await.unwrap_err();
            assert!(is_down(&e), "exists: {e}");
            let e = put(b, &k[1], &v).await.unwrap_err();
            assert!(is_down(&e), "put: {e}");
            let e = get(b, &k[0], v.len()).await.unwrap_err();
            assert!(is_down(&e), "get: {e}");
            let e = b.remove(&k[..1]).await.unwrap_err();
            assert!(is_down(&e), "remove: {e}");
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "four calls against a dead master took {:?}",
                t.elapsed()
            );
        }

        // A master comes back, empty: the owner's heartbeat remounts its
        // segment, and the pure client stores into it again.
        master.restart();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match put(&client, &k[2], &v).await {
                Ok(PutOutcome::Stored) => break,
                other => {
                    assert!(Instant::now() < deadline, "no recovery: {other:?}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        match get(&client, &k[2], v.len()).await.unwrap() {
            GetOutcome::Hit => {}
            other => panic!("after recovery: {other:?}"),
        }
        // The restarted master forgot the old keys: misses, not errors.
        assert_eq!(client.exists(&k[..1]).await.unwrap(), [false]);
        assert!(matches!(
            get(&owner, &k[0], v.len()).await.unwrap(),
            GetOutcome::Miss
        ));
        owner.close().await.unwrap();
        client.close().await.unwrap();
    });
}

/// An owner process killed without unmounting: until the master's client TTL
/// expires its segment, reads of its keys fail promptly (connection refused),
/// and afterwards they are misses.
#[test]
fn keys_of_a_dead_segment_owner_become_misses() {
    let master = MooncakeMaster::start_with(&["--client_ttl=2"]);
    let exe = std::env::current_exe().unwrap();
    // The owner: this test binary re-run as a child that owns a segment.
    let mut child = KillOnDrop(
        std::process::Command::new(exe)
            .args(["--exact", "owner_process", "--nocapture", "--ignored"])
            .env("KVPOOL_TEST_OWNER_MASTER", master.address())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let ready = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("OWNER READY"))
    });
    assert!(ready.join().unwrap(), "the owner process did not start");
    common::rt().block_on(async {
        let client = MooncakeBackend::open(config(&master, 0)).await.unwrap();
        let k = owner_keys();
        let v = vec![3u8; 50_000];
        assert!(put(&client, &k[0], &v).await.unwrap().is_present());
        assert!(get(&client, &k[0], v.len()).await.unwrap().is_hit());

        child.0.kill().unwrap();
        child.0.wait().unwrap();
        let t = Instant::now();
        loop {
            let started = Instant::now();
            match get(&client, &k[0], v.len()).await {
                Ok(GetOutcome::Miss) => break,
                Ok(GetOutcome::Failed(e)) => assert!(is_down(&e), "{e}"),
                Err(e) => panic!("the master is up: {e}"),
                Ok(GetOutcome::Hit) => panic!("read a value from a dead owner"),
            }
            assert!(started.elapsed() < Duration::from_secs(3), "a read hung");
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "the key never became a miss"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(client.exists(&k[..1]).await.unwrap(), [false]);
    });
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn owner_keys() -> Vec<BlockKey> {
    let ns = Arc::new(Namespace::single_rank("faults-owner").unwrap());
    vec![BlockKey::new(ns, BlockHash([9; 32]))]
}

/// Not a test on its own: the owner process of the test above.
#[test]
#[ignore = "run as a child process by keys_of_a_dead_segment_owner_become_misses"]
fn owner_process() {
    let Ok(addr) = std::env::var("KVPOOL_TEST_OWNER_MASTER") else {
        return;
    };
    common::rt().block_on(async {
        let cfg = MooncakeConfig {
            master_server_address: addr,
            global_segment_size: ByteSize(16 << 20),
            local_hostname: "127.0.0.1".into(),
            ..MooncakeConfig::default()
        };
        let _owner = MooncakeBackend::open(cfg).await.unwrap();
        println!("OWNER READY");
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
}
