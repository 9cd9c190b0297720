//! Building the `object_store` client a config names, and turning its errors into
//! kvpool's.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use kvpool_core::{Error, ErrorKind, Result};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::client::{HttpError, HttpErrorKind};
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::config::{ObjectConfig, StoreKind, Target};

fn config_error(key: &str, msg: impl std::fmt::Display) -> Error {
    Error::config_invalid(format!("{key} {msg}")).with_context("section", "object")
}

/// The store `target` names, configured from `cfg` over the provider's environment
/// variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`): keys set in the config win.
/// The store, and whether its credentials are left to the cloud instance's metadata
/// service (no keys given anywhere): then a failing open says so.
pub(crate) fn build(cfg: &ObjectConfig, target: &Target) -> Result<(Arc<dyn ObjectStore>, bool)> {
    let mut instance_credentials = false;
    let client = ClientOptions::new()
        .with_timeout(cfg.request_timeout())
        .with_connect_timeout(cfg.connect_timeout())
        .with_allow_http(cfg.allow_http);
    // A cache would rather miss than wait: short backoff, bounded by the request timeout.
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: cfg.retries as usize,
        retry_timeout: cfg.request_timeout(),
    };
    let built_error = |e: object_store::Error| {
        config_error(
            "object.url",
            format!("{:?} cannot be opened: {e}", cfg.location()),
        )
    };
    let option_error = |key: &str, e: object_store::Error| {
        config_error(
            &format!("object.options.{key}"),
            format!("is not a setting of this store: {e}"),
        )
    };
    let url = target.url.as_str();
    let store: Arc<dyn ObjectStore> = match &target.kind {
        StoreKind::S3 => {
            ensure_crypto_provider();
            let mut b = AmazonS3Builder::from_env().with_url(url);
            for (key, value) in &cfg.options {
                let k: AmazonS3ConfigKey = key.parse().map_err(|e| option_error(key, e))?;
                b = b.with_config(k, value);
            }
            if let Some(endpoint) = &cfg.endpoint {
                b = b.with_endpoint(endpoint);
            }
            if let Some(region) = &cfg.region {
                b = b.with_region(region);
            }
            if let (Some(id), Some(secret)) = (&cfg.access_key_id, &cfg.secret_access_key) {
                b = b.with_access_key_id(id).with_secret_access_key(secret);
                if let Some(token) = &cfg.session_token {
                    b = b.with_token(token);
                }
            }
            let set = |k: AmazonS3ConfigKey| b.get_config_value(&k).is_some_and(|v| !v.is_empty());
            let has_keys = set(AmazonS3ConfigKey::AccessKeyId);
            let unsigned = b
                .get_config_value(&AmazonS3ConfigKey::SkipSignature)
                .is_some_and(|v| v == "true");
            let other_provider = set(AmazonS3ConfigKey::WebIdentityTokenFile)
                || set(AmazonS3ConfigKey::ContainerCredentialsRelativeUri)
                || set(AmazonS3ConfigKey::ContainerCredentialsFullUri);
            if !has_keys && !unsigned && !other_provider {
                // Without keys the client asks the cloud's instance metadata service, which
                // an S3-compatible server elsewhere does not have: it would fail on the
                // first request with an unhelpful connection error.
                if set(AmazonS3ConfigKey::Endpoint) || set(AmazonS3ConfigKey::S3Endpoint) {
                    return Err(config_error(
                        "object.access_key_id",
                        "and object.secret_access_key are missing (nor are AWS_ACCESS_KEY_ID \
                         and AWS_SECRET_ACCESS_KEY set): an S3-compatible endpoint needs \
                         credentials",
                    ));
                }
                instance_credentials = true;
            }
            Arc::new(
                b.with_client_options(client)
                    .with_retry(retry)
                    .build()
                    .map_err(built_error)?,
            )
        }
        // The two builders share method names but no trait, hence a macro.
        StoreKind::Gcs | StoreKind::Azure => {
            ensure_crypto_provider();
            macro_rules! cloud_store {
                ($builder:ty) => {{
                    let mut b = <$builder>::from_env().with_url(url);
                    for (key, value) in &cfg.options {
                        b = b.with_config(key.parse().map_err(|e| option_error(key, e))?, value);
                    }
                    Arc::new(
                        b.with_client_options(client)
                            .with_retry(retry)
                            .build()
                            .map_err(built_error)?,
                    ) as Arc<dyn ObjectStore>
                }};
            }
            if matches!(target.kind, StoreKind::Gcs) {
                cloud_store!(GoogleCloudStorageBuilder)
            } else {
                cloud_store!(MicrosoftAzureBuilder)
            }
        }
        StoreKind::File(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| {
                let kind = io_kind(&e).unwrap_or(ErrorKind::ConfigInvalid);
                Error::new(
                    kind,
                    format!(
                        "object.url: cannot create the directory {}: {e}",
                        dir.display()
                    ),
                )
                .with_context("section", "object")
            })?;
            Arc::new(LocalFileSystem::new_with_prefix(dir).map_err(built_error)?)
        }
        StoreKind::Memory => Arc::new(InMemory::new()),
    };
    Ok((store, instance_credentials))
}

/// rustls needs a process-wide crypto provider: the workspace builds it with ring only
/// (see the workspace `Cargo.toml`). Installing fails harmlessly when one already is.
fn ensure_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The kind a local I/O error deserves, when it is one we recognize.
fn io_kind(e: &std::io::Error) -> Option<ErrorKind> {
    use std::io::ErrorKind as Io;
    Some(match e.kind() {
        Io::StorageFull | Io::QuotaExceeded => ErrorKind::NoSpace,
        Io::PermissionDenied | Io::ReadOnlyFilesystem => ErrorKind::ConfigInvalid,
        Io::TimedOut => ErrorKind::Timeout,
        _ => return None,
    })
}

/// kvpool's error for a failed store request. Connection trouble, timeouts and server
/// errors are temporary; rejected credentials and a missing bucket are configuration.
pub(crate) fn classify(op: &'static str, e: object_store::Error) -> Error {
    use object_store::Error as E;
    let (kind, hint) = match &e {
        E::NotFound { .. } => (
            ErrorKind::ConfigInvalid,
            "the bucket or container in object.url does not exist",
        ),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => (
            ErrorKind::ConfigInvalid,
            "the store refused the credentials (object.access_key_id, \
             object.secret_access_key, or the provider's environment variables)",
        ),
        E::NotSupported { .. } | E::NotImplemented { .. } => {
            (ErrorKind::Unsupported, "the store does not support this")
        }
        E::InvalidPath { .. } => (ErrorKind::InvalidArgument, "the object name is invalid"),
        E::UnknownConfigurationKey { .. } => (ErrorKind::ConfigInvalid, "bad object.options"),
        E::AlreadyExists { .. } | E::Precondition { .. } | E::NotModified { .. } => (
            ErrorKind::Unexpected,
            "a condition failed where none was set",
        ),
        _ => match transport_kind(&e) {
            Some(HttpErrorKind::Timeout) => {
                (ErrorKind::Timeout, "the store did not answer in time")
            }
            Some(HttpErrorKind::Connect) => (ErrorKind::Unavailable, "cannot connect to the store"),
            Some(_) => (ErrorKind::Unavailable, "the connection to the store failed"),
            None => match io_error(&e).and_then(io_kind) {
                Some(kind) => (kind, "the local file system refused"),
                // Server errors and throttling that outlasted the retries.
                None => (ErrorKind::Unavailable, "the store failed the request"),
            },
        },
    };
    // The store's own message follows as the source (Display prints it after ours).
    let mut err = Error::new(kind, hint).with_operation(op);
    if kind == ErrorKind::Unavailable || kind == ErrorKind::Timeout {
        err = err.set_temporary();
    }
    err.set_source(e)
}

fn sources(e: &object_store::Error) -> impl Iterator<Item = &(dyn StdError + 'static)> {
    std::iter::successors(e.source(), |s: &&(dyn StdError + 'static)| (*s).source())
}

/// The HTTP transport's classification of the failure, when it is one.
fn transport_kind(e: &object_store::Error) -> Option<HttpErrorKind> {
    sources(e).find_map(|s| s.downcast_ref::<HttpError>().map(HttpError::kind))
}

fn io_error(e: &object_store::Error) -> Option<&std::io::Error> {
    sources(e).find_map(|s| s.downcast_ref::<std::io::Error>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(cfg: ObjectConfig) -> Result<(Arc<dyn ObjectStore>, bool)> {
        build(&cfg, &cfg.target()?)
    }

    #[test]
    fn gcs_and_azure_stores_are_built_from_url_and_options_without_a_request() {
        // Building sends nothing: credentials are fetched on the first request.
        let (store, _) = built(ObjectConfig {
            url: Some("az://container/prefix".into()),
            options: [
                ("azure_storage_account_name".to_string(), "acct".to_string()),
                (
                    "azure_storage_account_key".to_string(),
                    "c2VjcmV0".to_string(),
                ),
            ]
            .into(),
            ..ObjectConfig::default()
        })
        .unwrap();
        assert!(store.to_string().contains("container"), "{store}");
        let e = built(ObjectConfig {
            url: Some("az://container".into()),
            options: [("azure_no_such_key".to_string(), "x".to_string())].into(),
            ..ObjectConfig::default()
        })
        .map(drop)
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        assert!(
            e.to_string().contains("object.options.azure_no_such_key"),
            "{e}"
        );
        let e = built(ObjectConfig {
            url: Some("gs://bucket".into()),
            options: [("aws_region".to_string(), "x".to_string())].into(),
            ..ObjectConfig::default()
        })
        .map(drop)
        .unwrap_err();
        assert!(e.to_string().contains("object.options.aws_region"), "{e}");
    }

    #[test]
    fn s3_keys_from_the_config_mean_no_instance_credentials() {
        let (store, instance) = built(ObjectConfig {
            url: Some("s3://bucket".into()),
            access_key_id: Some("id".into()),
            secret_access_key: Some("secret".into()),
            ..ObjectConfig::default()
        })
        .unwrap();
        assert_eq!(store.to_string(), "AmazonS3(bucket)");
        assert!(!instance);
    }

    #[test]
    fn store_errors_get_kvpool_kinds() {
        let e = classify(
            "put",
            object_store::Error::PermissionDenied {
                path: "p".into(),
                source: "403".into(),
            },
        );
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        assert!(e.to_string().contains("credentials"), "{e}");
        let e = classify(
            "get_into",
            object_store::Error::Generic {
                store: "S3",
                source: Box::new(std::io::Error::new(std::io::ErrorKind::StorageFull, "full")),
            },
        );
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        let e = classify(
            "get_into",
            object_store::Error::Generic {
                store: "S3",
                source: "500 Internal Server Error".into(),
            },
        );
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.is_temporary());
        assert_eq!(e.operation(), "get_into");
    }
}
