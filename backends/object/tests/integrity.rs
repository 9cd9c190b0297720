//! What the conformance suite does not cover: objects damaged or written behind the
//! backend's back (on a local directory and on a real S3 API server), persistence and key
//! prefixes, a store that goes away, and configurations that must fail at open with an
//! error a user can act on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use kvpool_backend_object::{ObjectBackend, ObjectConfig, PutMode, HEADER_LEN};
use kvpool_conformance::fixtures::moto::{self, MotoServer};
use kvpool_conformance::fixtures::ports::free_port;
use kvpool_core::{
    BlockHash, BlockKey, Config, ErrorKind, GetOutcome, IoVecMut, KvBackend, KvBackendExt,
    MemRegion, Namespace, PutOutcome,
};
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStoreExt, PutPayload};

const SECRET: &str = "sekrit-value-never-printed";

fn key(i: u8) -> BlockKey {
    let ns = Arc::new(Namespace::single_rank("integrity-model").expect("a namespace"));
    let mut h = [0u8; 32];
    h[0] = i;
    h[31] = 0x5a;
    BlockKey::new(ns, BlockHash(h))
}

fn value(i: u8, len: usize) -> Bytes {
    (0..len).map(|j| (j as u8).wrapping_mul(31) ^ i).collect()
}

fn file_config(dir: &Path) -> ObjectConfig {
    ObjectConfig {
        url: Some(format!("file://{}", dir.display())),
        ..ObjectConfig::default()
    }
}

fn s3_config(moto: &MotoServer, url: &str) -> ObjectConfig {
    ObjectConfig {
        url: Some(url.into()),
        endpoint: Some(moto.endpoint()),
        allow_http: true,
        access_key_id: Some(moto::ACCESS_KEY_ID.into()),
        secret_access_key: Some(moto::SECRET_ACCESS_KEY.into()),
        ..ObjectConfig::default()
    }
}

/// Loads `key` into a destination of `len` bytes filled with 0xAA; the outcome and what
/// the destination holds afterwards.
async fn get(backend: &dyn KvBackend, key: &BlockKey, len: usize) -> (GetOutcome, Vec<u8>) {
    let region = MemRegion::from_vec(vec![0xAA; len]);
    let mut out = backend
        .get_into(vec![(key.clone(), IoVecMut::whole(&region))])
        .await
        .expect("get_into answers");
    (out.remove(0), region.read(0, len).expect("read back"))
}

fn assert_corrupted(outcome: &GetOutcome, dst: &[u8], why: &str) {
    match outcome {
        GetOutcome::Failed(e) => {
            assert_eq!(e.kind(), ErrorKind::Corrupted, "{e}");
            assert!(e.to_string().contains(why), "{why:?} not in: {e}");
        }
        other => panic!("expected Corrupted, got {other:?}"),
    }
    assert!(
        dst.iter().all(|&b| b == 0xAA),
        "a corrupted object wrote into the destination"
    );
}

/// The files under `dir`, probe objects aside.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("a readable directory") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                todo.push(path);
            } else if !path.to_string_lossy().contains(".kvpool-probe") {
                out.push(path);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_file_is_corrupted_then_a_miss_and_can_be_stored_again() {
    let dir = tempfile::tempdir().unwrap();
    let backend = ObjectBackend::open(file_config(dir.path())).await.unwrap();
    let v = value(1, 10_000);
    assert!(matches!(
        backend.put_bytes(key(1), v.clone()).await.unwrap(),
        PutOutcome::Stored
    ));
    let stored = files(dir.path());
    assert_eq!(stored.len(), 1, "{stored:?}");
    let mut bytes = std::fs::read(&stored[0]).unwrap();
    assert_eq!(bytes.len(), HEADER_LEN + v.len());
    assert_eq!(&bytes[..4], b"KVPR");
    assert_eq!(&bytes[HEADER_LEN..], &v[..]);
    bytes[HEADER_LEN + 5000] ^= 0x01;
    std::fs::write(&stored[0], &bytes).unwrap();

    let (outcome, dst) = get(&backend, &key(1), v.len()).await;
    assert_corrupted(&outcome, &dst, "checksum mismatch");
    // The damaged object is gone, so the key reads as absent and can be stored again.
    assert_eq!(backend.exists(&[key(1)]).await.unwrap(), [false]);
    assert!(matches!(
        get(&backend, &key(1), v.len()).await.0,
        GetOutcome::Miss
    ));
    assert!(matches!(
        backend.put_bytes(key(1), v.clone()).await.unwrap(),
        PutOutcome::Stored
    ));
    assert_eq!(backend.get_bytes(&key(1)).await.unwrap(), Some(v));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_file_and_an_object_of_another_key_are_corrupted() {
    let dir = tempfile::tempdir().unwrap();
    let backend = ObjectBackend::open(file_config(dir.path())).await.unwrap();
    let v = value(2, 4096);
    backend.put_bytes(key(2), v.clone()).await.unwrap();
    let path = files(dir.path()).pop().unwrap();
    let bytes = std::fs::read(&path).unwrap();

    // Truncated by one byte: a destination of the declared length finds the object short.
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    let (outcome, dst) = get(&backend, &key(2), v.len() - 1).await;
    assert_corrupted(&outcome, &dst, "truncated");

    // Another key's intact object copied under this key's name.
    backend.put_bytes(key(3), v.clone()).await.unwrap();
    let other = files(dir.path()).pop().unwrap();
    std::fs::copy(&other, &path).unwrap();
    let (outcome, dst) = get(&backend, &key(2), v.len()).await;
    assert_corrupted(&outcome, &dst, "another key");
    assert_eq!(backend.get_bytes(&key(3)).await.unwrap(), Some(v));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_kvpool_did_not_write_is_present_corrupted_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let backend = ObjectBackend::open(file_config(dir.path())).await.unwrap();
    let path = dir.path().join(key(4).to_key_string());
    let foreign = b"an object someone else put here, long enough to hold a header".to_vec();
    std::fs::write(&path, &foreign).unwrap();

    assert_eq!(backend.exists(&[key(4)]).await.unwrap(), [true]);
    let len = backend.value_lens(&[key(4)]).await.unwrap()[0].unwrap();
    assert_eq!(len, foreign.len() - HEADER_LEN);
    let (outcome, dst) = get(&backend, &key(4), len).await;
    assert_corrupted(&outcome, &dst, "not written by kvpool");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        foreign,
        "a foreign object was changed"
    );
    // A put keeps what is there, as for any present key.
    assert!(matches!(
        backend.put_bytes(key(4), value(4, len)).await.unwrap(),
        PutOutcome::Exists
    ));
    // Shorter than a header: still present, never a hit.
    let short = dir.path().join(key(5).to_key_string());
    std::fs::write(&short, b"tiny").unwrap();
    let len = backend.value_lens(&[key(5)]).await.unwrap()[0].unwrap();
    let (outcome, dst) = get(&backend, &key(5), len).await;
    assert_corrupted(&outcome, &dst, "shorter than kvpool's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_survive_a_reopen_and_key_prefixes_keep_pools_apart() {
    let dir = tempfile::tempdir().unwrap();
    let a = ObjectConfig {
        key_prefix: "pool-a/".into(),
        ..file_config(dir.path())
    };
    let v = value(6, 3000);
    let first = ObjectBackend::open(a.clone()).await.unwrap();
    assert!(
        first.info().description.contains("put mode create"),
        "{}",
        first.info().description
    );
    first.put_bytes(key(6), v.clone()).await.unwrap();
    first.close().await.unwrap();
    assert_eq!(
        first.exists(&[key(6)]).await.unwrap_err().kind(),
        ErrorKind::Closed
    );

    let again = ObjectBackend::open(a).await.unwrap();
    assert_eq!(again.get_bytes(&key(6)).await.unwrap(), Some(v));
    let b = ObjectBackend::open(ObjectConfig {
        key_prefix: "pool-b/".into(),
        ..file_config(dir.path())
    })
    .await
    .unwrap();
    assert_eq!(b.exists(&[key(6)]).await.unwrap(), [false]);
    assert!(dir
        .path()
        .join("pool-a")
        .join(key(6).to_key_string())
        .is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3_a_flipped_byte_is_corrupted_and_auto_put_mode_finds_create() {
    let moto = MotoServer::start();
    moto.create_bucket("integrity");
    let cfg = s3_config(&moto, "s3://integrity/pool");
    let backend = ObjectBackend::open(cfg).await.unwrap();
    // moto enforces If-None-Match, so the open's probe settles on create-only puts.
    assert!(
        backend.info().description.contains("put mode create"),
        "{}",
        backend.info().description
    );
    assert!(backend.info().capabilities.shared && backend.info().capabilities.persistent);
    let shown = format!("{backend:?} {}", backend.info());
    for secret in [moto::ACCESS_KEY_ID, moto::SECRET_ACCESS_KEY] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    let v = value(7, 100_000);
    backend.put_bytes(key(7), v.clone()).await.unwrap();

    // Behind the backend's back, with a client of our own.
    let raw = AmazonS3Builder::new()
        .with_endpoint(moto.endpoint())
        .with_bucket_name("integrity")
        .with_region("us-east-1")
        .with_allow_http(true)
        .with_access_key_id(moto::ACCESS_KEY_ID)
        .with_secret_access_key(moto::SECRET_ACCESS_KEY)
        .build()
        .unwrap();
    let name = object_store::path::Path::from("pool").join(key(7).to_key_string());
    let mut bytes = raw
        .get(&name)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    assert_eq!(&bytes[HEADER_LEN..], &v[..]);
    bytes[HEADER_LEN + 12_345] ^= 0x80;
    raw.put(&name, PutPayload::from(bytes)).await.unwrap();

    let (outcome, dst) = get(&backend, &key(7), v.len()).await;
    assert_corrupted(&outcome, &dst, "checksum mismatch");
    assert_eq!(backend.exists(&[key(7)]).await.unwrap(), [false]);

    // A foreign object in the bucket: present, corrupted, left as it was.
    let foreign = object_store::path::Path::from("pool").join(key(8).to_key_string());
    raw.put(
        &foreign,
        PutPayload::from_static(b"0123456789012345678901234567890123456789"),
    )
    .await
    .unwrap();
    let len = backend.value_lens(&[key(8)]).await.unwrap()[0].unwrap();
    assert_eq!(len, 40 - HEADER_LEN);
    let (outcome, dst) = get(&backend, &key(8), len).await;
    assert_corrupted(&outcome, &dst, "magic");
    assert!(raw.head(&foreign).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_goes_away_fails_calls_as_temporary_unavailable() {
    let mut moto = MotoServer::start();
    moto.create_bucket("going-away");
    let backend = ObjectBackend::open(ObjectConfig {
        retries: 0,
        request_timeout_ms: 5_000,
        connect_timeout_ms: 1_000,
        ..s3_config(&moto, "s3://going-away")
    })
    .await
    .unwrap();
    backend.put_bytes(key(9), value(9, 1000)).await.unwrap();
    moto.kill();

    let e = backend.exists(&[key(9)]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_temporary(), "{e}");
    let (outcome, dst) = get(&backend, &key(9), 1000).await;
    match outcome {
        GetOutcome::Failed(e) => {
            assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
            assert!(e.is_temporary(), "{e}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(dst.iter().all(|&b| b == 0xAA));
    match backend.put_bytes(key(10), value(10, 10)).await.unwrap() {
        PutOutcome::Failed(e) => assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// Opens `cfg` and returns the error it must fail with, checking no secret leaks into it.
async fn open_error(cfg: ObjectConfig) -> kvpool_core::Error {
    let e = ObjectBackend::open(cfg)
        .await
        .expect_err("the open must fail");
    let shown = format!("{e} {e:?}");
    assert!(!shown.contains(SECRET), "a secret leaked: {shown}");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configurations_fail_at_open_with_errors_that_say_what_to_fix() {
    let moto = MotoServer::start();
    let with_secret = |url: &str| ObjectConfig {
        secret_access_key: Some(SECRET.into()),
        session_token: Some(SECRET.into()),
        retries: 0,
        request_timeout_ms: 5_000,
        ..s3_config(&moto, url)
    };

    let e = open_error(with_secret("s3://no-such-bucket/p")).await;
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    assert!(e.to_string().contains("does not exist"), "{e}");

    // Nothing listens on this port.
    let e = open_error(ObjectConfig {
        endpoint: Some(format!("http://127.0.0.1:{}", free_port(false))),
        ..with_secret("s3://bucket")
    })
    .await;
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_temporary(), "{e}");
    assert!(e.to_string().contains("connect"), "{e}");

    let e = open_error(ObjectConfig {
        access_key_id: None,
        secret_access_key: None,
        session_token: None,
        ..with_secret("s3://bucket")
    })
    .await;
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    assert!(e.to_string().contains("needs credentials"), "{e}");

    // No keys anywhere and no endpoint: the instance metadata service is asked (here one
    // on a loopback port nothing listens on, so no request leaves the machine; the
    // credentials are fetched before any request to the store is sent).
    let e = open_error(ObjectConfig {
        url: Some("s3://bucket-on-aws".into()),
        retries: 0,
        request_timeout_ms: 5_000,
        options: [(
            "aws_metadata_endpoint".to_string(),
            format!("http://127.0.0.1:{}", free_port(false)),
        )]
        .into(),
        ..ObjectConfig::default()
    })
    .await;
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    assert!(
        e.to_string().contains("no S3 credentials were given"),
        "{e}"
    );

    let e = open_error(ObjectConfig {
        options: [("aws_no_such_setting".to_string(), SECRET.to_string())].into(),
        ..with_secret("s3://bucket")
    })
    .await;
    assert!(
        e.to_string().contains("object.options.aws_no_such_setting"),
        "{e}"
    );

    for (url, says) in [
        ("ftp://host/x", "scheme"),
        ("s3:///x", "no bucket"),
        ("file:relative/dir", "three slashes"),
    ] {
        let e = open_error(ObjectConfig {
            url: Some(url.into()),
            ..ObjectConfig::default()
        })
        .await;
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
        assert!(e.to_string().contains(says), "{says:?} not in {e}");
    }

    // Through the registry, as `kvpool check` opens it: the section's keys are checked.
    let config = Config::from_extra_config(serde_json::json!({
        "backend": "object",
        "object": { "url": "memory://", "request_timeout_ms": "soon" },
    }));
    let e = match config {
        Ok(c) => kvpool_core::open(&c)
            .await
            .map(drop)
            .expect_err("a bad section"),
        Err(e) => e,
    };
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    assert!(e.to_string().contains("object.request_timeout_ms"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_that_cannot_be_created_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let e = open_error(file_config(&file.join("below"))).await;
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    assert!(e.to_string().contains("cannot create the directory"), "{e}");
    // Explicit create mode on a store that has it opens fine.
    let ok = ObjectBackend::open(ObjectConfig {
        put_mode: PutMode::Create,
        ..file_config(dir.path())
    })
    .await
    .unwrap();
    assert_eq!(ok.value_lens(&[key(1)]).await.unwrap(), [None]);
    // The probe object is cleaned up.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("a-file")]);
}
