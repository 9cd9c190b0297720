//! Runs the shared conformance suite against the object backend: on a local directory
//! (built directly, and opened from config through the registry, which adds the
//! contract-check and metrics layer users get), in memory, and on a real S3 API server
//! (moto, started here) with both put modes. A missing moto fails the run.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvpool_backend_object::{ObjectBackend, ObjectConfig, PutMode};
use kvpool_conformance::fixtures::moto::{self, MotoServer};
use kvpool_conformance::Subject;
use kvpool_core::{Config, KvBackend};
use tempfile::TempDir;

/// Every case's directory, deleted when the suite ends: cases close their backends on
/// their own schedule, so a directory cannot go with the case.
static DIRS: Mutex<Vec<TempDir>> = Mutex::new(Vec::new());

fn fresh_dir() -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix("kvpool-object-conformance-")
        .tempdir()
        .expect("a temporary directory");
    let path = dir.path().to_path_buf();
    DIRS.lock().unwrap_or_else(|e| e.into_inner()).push(dir);
    path
}

fn file_url(dir: &std::path::Path) -> String {
    format!("file://{}", dir.display())
}

fn subject(name: &'static str, cfg: impl Fn() -> ObjectConfig + Send + Sync + 'static) -> Subject {
    Subject::new(name, None, move || {
        let cfg = cfg();
        async move { Ok(Arc::new(ObjectBackend::open(cfg).await?) as Arc<dyn KvBackend>) }
    })
}

fn s3(moto: &MotoServer, bucket: &str, put_mode: PutMode) -> ObjectConfig {
    ObjectConfig {
        url: Some(format!("s3://{bucket}/conformance")),
        endpoint: Some(moto.endpoint()),
        allow_http: true,
        access_key_id: Some(moto::ACCESS_KEY_ID.into()),
        secret_access_key: Some(moto::SECRET_ACCESS_KEY.into()),
        put_mode,
        ..ObjectConfig::default()
    }
}

fn main() -> std::process::ExitCode {
    let moto = MotoServer::start();
    moto.create_bucket("kvpool-conformance");
    let create = s3(&moto, "kvpool-conformance", PutMode::Create);
    let head = ObjectConfig {
        key_prefix: "head-then-put/".into(),
        ..s3(&moto, "kvpool-conformance", PutMode::HeadThenPut)
    };
    let code = kvpool_conformance::run_all(&[
        subject("object_file", || ObjectConfig {
            url: Some(file_url(&fresh_dir())),
            ..ObjectConfig::default()
        }),
        Subject::new("object_file_opened_from_config", None, || async {
            let config = Config::from_extra_config(serde_json::json!({
                "backend": "object",
                "object": { "url": file_url(&fresh_dir()), "key_prefix": "pool/" },
            }))?;
            kvpool_core::open(&config).await
        }),
        subject("object_memory", || ObjectConfig {
            url: Some("memory://".into()),
            ..ObjectConfig::default()
        }),
        subject("object_s3_moto", move || create.clone()),
        subject("object_s3_moto_head_then_put", move || head.clone()),
    ]);
    drop(moto);
    DIRS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    code
}
