//! What several tiering test files share: an s3s-fs server on 127.0.0.1 with authentication
//! on, reached through `s3://` and the same `AWS_*` variables an operator would set.

// Each test file compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::path::Path;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use silt_tiering::ArchiveStore;

const ACCESS_KEY: &str = "silt-test-access-key";
const SECRET_KEY: &str = "silt-test-secret-key";
/// The one bucket the servers hold (s3s-fs serves each top-level directory as a bucket).
const BUCKET: &str = "silt-archive";

/// Starts an s3s-fs server over `root` (created with its bucket if missing) and opens
/// `s3://silt-archive/<prefix>` on it. A second call over the same `root` is a restarted
/// endpoint with the same objects.
pub(crate) async fn s3s_store_at(root: &Path, prefix: &str) -> ArchiveStore {
    std::fs::create_dir_all(root.join(BUCKET)).unwrap();
    let fs = s3s_fs::FileSystem::new(root).unwrap();
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let _ = ConnBuilder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    let env = [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_ENDPOINT_URL", format!("http://{addr}")),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("HOME", "/nonexistent".to_string()),
    ]
    .map(|(name, value)| (name.to_string(), value));
    ArchiveStore::open_with_env(&format!("s3://{BUCKET}/{prefix}"), env).unwrap()
}

/// [`s3s_store_at`] over a fresh temporary directory, kept alive by the returned guard.
pub(crate) async fn s3s_store(prefix: &str) -> (ArchiveStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = s3s_store_at(dir.path(), prefix).await;
    (store, dir)
}
