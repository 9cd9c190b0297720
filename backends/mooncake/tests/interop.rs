//! Interop with the official client, `mooncake.store.MooncakeDistributedStore`
//! from PyPI `mooncake-transfer-engine-non-cuda==0.3.13.post1`, through one
//! unmodified `mooncake_master`, in both directions and both ownerships:
//!
//! - the official client owns the segment, kvpool is a pure client;
//! - kvpool owns the segment, the official client is a pure client, so its
//!   puts land in kvpool's memory over kvpool's TCP data server and its gets
//!   read from there.
//!
//! The Python side is `tests/python/official_client.py`, run with `python3`
//! (or `$KVPOOL_TEST_PYTHON`); a missing `mooncake` module fails the test.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use kvpool_backend_mooncake::MooncakeBackend;
use kvpool_conformance::fixtures::mooncake::MooncakeMaster;
use kvpool_core::{
    BlockHash, BlockKey, GetOutcome, IoVec, IoVecMut, KvBackend, MemRegion, Namespace, PutOutcome,
};
use rand::RngCore;

/// The official client in a child process.
struct Official {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Official {
    fn start(master: &str, segment: u64) -> Self {
        let python = std::env::var("KVPOOL_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/official_client.py"
        );
        let log = std::env::temp_dir().join(format!(
            "kvpool-official-client-{}.log",
            rand::random::<u32>()
        ));
        let mut child = Command::new(&python)
            .arg(script)
            .arg(master)
            .arg(segment.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let me = Official {
            child,
            stdin,
            lines,
        };
        let ready = me.line().unwrap_or_else(|| {
            panic!(
                "the official client did not start (is `pip install \
                 mooncake-transfer-engine-non-cuda==0.3.13.post1` done?); its log: {}",
                log.display()
            )
        });
        assert_eq!(
            ready,
            "ready 0",
            "official setup failed; log: {}",
            log.display()
        );
        me
    }

    fn line(&self) -> Option<String> {
        self.lines.recv_timeout(Duration::from_secs(60)).ok()
    }

    fn cmd(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let line = self
            .line()
            .expect("the official client answered within 60 s");
        match line.strip_prefix("ok ") {
            Some(rest) => rest.to_string(),
            None => panic!(
                "official client: {line} (for {})",
                &cmd[..cmd.len().min(80)]
            ),
        }
    }

    fn put(&mut self, key: &BlockKey, value: &[u8]) {
        let rc = self.cmd(&format!("put {} {}", key.to_key_string(), hex(value)));
        assert_eq!(rc, "0", "official put");
    }

    fn get(&mut self, key: &BlockKey) -> Option<Vec<u8>> {
        let out = self.cmd(&format!("get {}", key.to_key_string()));
        (out != "-").then(|| unhex(&out))
    }
}

impl Drop for Official {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

fn keys(n: usize) -> Vec<BlockKey> {
    let ns = Arc::new(
        Namespace::new(
            &format!("/models/interop-{:08x}", rand::random::<u32>()),
            0,
            0,
            0,
            0,
        )
        .unwrap(),
    );
    (0..n)
        .map(|_| {
            let mut h = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut h);
            BlockKey::new(ns.clone(), BlockHash(h))
        })
        .collect()
}

async fn kv_put(b: &dyn KvBackend, items: &[(&BlockKey, &[u8])]) {
    let batch = items
        .iter()
        .map(|(k, v)| ((*k).clone(), IoVec::whole(&MemRegion::from_vec(v.to_vec()))))
        .collect();
    for (i, o) in b.put(batch).await.unwrap().iter().enumerate() {
        assert!(matches!(o, PutOutcome::Stored), "kvpool put {i}: {o:?}");
    }
}

async fn kv_get(b: &dyn KvBackend, key: &BlockKey, len: usize) -> Option<Vec<u8>> {
    let r = MemRegion::alloc(len);
    match b
        .get_into(vec![(key.clone(), IoVecMut::whole(&r))])
        .await
        .unwrap()
        .pop()
        .unwrap()
    {
        GetOutcome::Hit => Some(r.read(0, len).unwrap()),
        GetOutcome::Miss => None,
        GetOutcome::Failed(e) => panic!("kvpool get: {e}"),
    }
}

#[test]
fn official_owner_and_kvpool_pure_client_read_each_others_keys() {
    let master = MooncakeMaster::start();
    let mut official = Official::start(&master.address(), 64 << 20);
    common::rt().block_on(async {
        let kv = MooncakeBackend::open(common::config(&master, 0))
            .await
            .unwrap();
        let k = keys(14);

        // Official puts -> kvpool reads identical bytes (over TCP from the
        // official client's segment).
        let a = random(1000);
        let b = random(300 << 10);
        official.put(&k[0], &a);
        official.put(&k[1], &b);
        assert_eq!(kv.exists(&k[..3]).await.unwrap(), [true, true, false]);
        assert_eq!(
            kv.value_lens(&k[..3]).await.unwrap(),
            [Some(1000), Some(300 << 10), None]
        );
        assert_eq!(kv_get(&kv, &k[0], 1000).await.unwrap(), a);
        assert_eq!(kv_get(&kv, &k[1], 300 << 10).await.unwrap(), b);

        // kvpool puts -> the official client reads identical bytes.
        let c = random(1000);
        let d = random(512 << 10);
        kv_put(&kv, &[(&k[2], &c), (&k[3], &d)]).await;
        assert_eq!(official.get(&k[2]).unwrap(), c);
        assert_eq!(official.get(&k[3]).unwrap(), d);
        assert_eq!(
            official.cmd(&format!("exist {}", k[3].to_key_string())),
            "1"
        );

        // A kvpool batch, read back by the official batch get.
        let small: Vec<Vec<u8>> = (0..8).map(|_| random(4096)).collect();
        let items: Vec<(&BlockKey, &[u8])> = k[4..12]
            .iter()
            .zip(&small)
            .map(|(k, v)| (k, &v[..]))
            .collect();
        kv_put(&kv, &items).await;
        let names: Vec<String> = k[4..12].iter().map(BlockKey::to_key_string).collect();
        let got = official.cmd(&format!("getb {}", names.join(",")));
        let got: Vec<Vec<u8>> = got.split(',').map(unhex).collect();
        assert_eq!(got, small);

        // kvpool removes -> the official client misses.
        let e = random(100);
        kv_put(&kv, &[(&k[12], &e)]).await;
        kv.remove(&k[12..13]).await.unwrap();
        assert_eq!(official.get(&k[12]), None);
        // A key just read holds the reader's lease: removing it is refused
        // (temporarily) while the other keys of the call are removed.
        let err = kv.remove(&[k[13].clone(), k[2].clone()]).await.unwrap_err();
        assert_eq!(err.kind(), kvpool_core::ErrorKind::Unavailable, "{err}");
        assert!(err.is_temporary());
        assert_eq!(official.get(&k[2]).unwrap(), c);
        kv.close().await.unwrap();
    });
    assert_eq!(official.cmd("close"), "0");
}

#[test]
fn kvpool_owner_serves_the_official_pure_client() {
    let master = MooncakeMaster::start();
    common::rt().block_on(async {
        let kv = MooncakeBackend::open(common::config(&master, 64 << 20))
            .await
            .unwrap();
        // Started after kvpool mounted: kvpool's is the only segment.
        let mut official = Official::start(&master.address(), 0);
        let k = keys(12);

        // Official puts land in kvpool's memory (kvpool's TCP data server),
        // and kvpool reads them locally.
        let a = random(5000);
        official.put(&k[0], &a);
        assert_eq!(kv_get(&kv, &k[0], 5000).await.unwrap(), a);
        let vals: Vec<Vec<u8>> = (0..4).map(|_| random(70_000)).collect();
        let names: Vec<String> = k[1..5].iter().map(BlockKey::to_key_string).collect();
        let hexes: Vec<String> = vals.iter().map(|v| hex(v)).collect();
        assert_eq!(
            official.cmd(&format!("putb {} {}", names.join(","), hexes.join(","))),
            "0"
        );
        for (key, v) in k[1..5].iter().zip(&vals) {
            assert_eq!(&kv_get(&kv, key, v.len()).await.unwrap(), v);
        }

        // kvpool puts into its own segment; the official client reads them
        // over TCP from kvpool's data server, singly and in a batch.
        let b = random(300 << 10);
        kv_put(&kv, &[(&k[5], &b)]).await;
        assert_eq!(official.get(&k[5]).unwrap(), b);
        let small: Vec<Vec<u8>> = (0..5).map(|_| random(4096)).collect();
        let items: Vec<(&BlockKey, &[u8])> = k[6..11]
            .iter()
            .zip(&small)
            .map(|(k, v)| (k, &v[..]))
            .collect();
        kv_put(&kv, &items).await;
        let names: Vec<String> = k[6..11].iter().map(BlockKey::to_key_string).collect();
        let got: Vec<Vec<u8>> = official
            .cmd(&format!("getb {}", names.join(",")))
            .split(',')
            .map(unhex)
            .collect();
        assert_eq!(got, small);

        // The official client writes into kvpool's segment and reads it back.
        let c = random(200_000);
        official.put(&k[11], &c);
        assert_eq!(official.get(&k[11]).unwrap(), c);

        assert_eq!(official.cmd("close"), "0");
        // kvpool's close unmounts: its keys are gone for everyone.
        kv.close().await.unwrap();
        let reader = MooncakeBackend::open(common::config(&master, 0))
            .await
            .unwrap();
        assert_eq!(reader.exists(&k[5..6]).await.unwrap(), [false]);
    });
}
