//! An S3 protocol server for end-to-end tests: s3s-fs over a directory, served over HTTP on a
//! free 127.0.0.1 port from a thread of the test process, with authentication on. A binary
//! under test reaches it as an operator's S3-compatible endpoint: `s3://BUCKET/prefix` plus
//! the `AWS_*` variables of [`S3Server::env`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use tokio::sync::oneshot;

/// The credentials s3s-fs checks (SigV4).
pub const ACCESS_KEY: &str = "silt-e2e-access-key";
pub const SECRET_KEY: &str = "silt-e2e-secret-key";
/// The one bucket the server holds (s3s-fs serves each top-level directory as a bucket).
pub const BUCKET: &str = "silt-archive";

/// A running s3s-fs server; stopped when dropped. A second server over the same root is a
/// restarted endpoint with the same objects.
#[derive(Debug)]
pub struct S3Server {
    pub addr: SocketAddr,
    root: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl S3Server {
    /// Serves `root` (created, with the bucket's directory, if missing).
    ///
    /// # Panics
    /// If the directory or the listener cannot be set up.
    pub fn start(root: &Path) -> S3Server {
        std::fs::create_dir_all(root.join(BUCKET)).expect("cannot create the bucket directory");
        let fs = s3s_fs::FileSystem::new(root).expect("s3s-fs cannot open its root");
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("cannot build the S3 server's runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("cannot bind the S3 server");
        let addr = listener.local_addr().expect("a bound address");
        let (shutdown, mut stop) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                loop {
                    let socket = tokio::select! {
                        _ = &mut stop => return,
                        accepted = listener.accept() => match accepted {
                            Ok((socket, _)) => socket,
                            Err(_) => continue,
                        },
                    };
                    let service = service.clone();
                    tokio::spawn(async move {
                        let _ = ConnBuilder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(socket), service)
                            .await;
                    });
                }
            });
            // Open connections' tasks are cancelled with the runtime.
            runtime.shutdown_background();
        });
        S3Server {
            addr,
            root: root.to_path_buf(),
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// `s3://BUCKET/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The `AWS_*` variables a client needs to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", format!("http://{}", self.addr)),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
    }

    /// Where the server keeps the object `key` (s3s-fs stores each object as the file
    /// `<root>/<bucket>/<key>`, and its metadata and part files outside the bucket).
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.join(BUCKET).join(key)
    }

    /// Every object key under `prefix` (a directory-like prefix, e.g. `archive/v1`), sorted:
    /// what a LIST of the bucket would answer.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let bucket = self.root.join(BUCKET);
        let mut keys = Vec::new();
        let mut pending = vec![bucket.join(prefix)];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry.expect("a readable directory entry").path();
                if path.is_dir() {
                    pending.push(path);
                } else {
                    let key = path.strip_prefix(&bucket).expect("under the bucket");
                    keys.push(key.to_str().expect("a UTF-8 key").to_string());
                }
            }
        }
        keys.sort();
        keys
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
