//! A local S3 endpoint for benchmarks: s3s-fs serving a directory over HTTP on 127.0.0.1, with
//! authentication on (one access key), each top-level directory a bucket.
//!
//! ```sh
//! cargo run -p silt-tiering --example s3-server -- --root DIR --bucket silt-archive \
//!     --listen 127.0.0.1:0 --access-key KEY --secret-key SECRET
//! ```
//!
//! It prints `listening on http://ADDR` once it accepts connections (so a script can bind
//! port 0 and read the port), then serves until killed. Point silt-core at it with
//! `AWS_ENDPOINT_URL=http://ADDR AWS_ALLOW_HTTP=true AWS_REGION=us-east-1` and the two keys.

use std::io::Write as _;
use std::path::PathBuf;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;

struct Options {
    root: PathBuf,
    bucket: String,
    listen: String,
    access_key: String,
    secret_key: String,
}

const USAGE: &str = "usage: s3-server --root DIR [--bucket NAME] [--listen ADDR] \
                     [--access-key KEY] [--secret-key SECRET]";

fn parse() -> Result<Options, String> {
    let mut options = Options {
        root: PathBuf::new(),
        bucket: "silt-archive".into(),
        listen: "127.0.0.1:0".into(),
        access_key: "silt-bench-access-key".into(),
        secret_key: "silt-bench-secret-key".into(),
    };
    let mut root = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.into());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--root" => root = Some(PathBuf::from(value)),
            "--bucket" => options.bucket = value,
            "--listen" => options.listen = value,
            "--access-key" => options.access_key = value,
            "--secret-key" => options.secret_key = value,
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    options.root = root.ok_or_else(|| format!("--root is required\n{USAGE}"))?;
    if options.bucket.is_empty() || options.bucket.contains('/') {
        return Err(format!(
            "--bucket {:?} is not a bucket name",
            options.bucket
        ));
    }
    Ok(options)
}

#[tokio::main]
async fn main() {
    let options = match parse() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    if let Err(message) = serve(options).await {
        eprintln!("s3-server: {message}");
        std::process::exit(1);
    }
}

async fn serve(options: Options) -> Result<(), String> {
    let bucket_dir = options.root.join(&options.bucket);
    std::fs::create_dir_all(&bucket_dir)
        .map_err(|error| format!("cannot create {}: {error}", bucket_dir.display()))?;
    let fs = s3s_fs::FileSystem::new(&options.root)
        .map_err(|error| format!("cannot serve {}: {error:?}", options.root.display()))?;
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(
        options.access_key.as_str(),
        options.secret_key.as_str(),
    ));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind(&options.listen)
        .await
        .map_err(|error| format!("cannot listen on {}: {error}", options.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|error| format!("cannot read the listener's address: {error}"))?;
    println!("listening on http://{addr}");
    let _ = std::io::stdout().flush();
    loop {
        let (socket, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: wait a moment rather than spin.
                eprintln!("s3-server: accept failed: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let service = service.clone();
        tokio::spawn(async move {
            let _ = ConnBuilder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}
