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
//!
//! Every request is s3s-fs's, except one thing: a GetObject body is read from the file in
//! `--get-chunk` reads (1 MiB by default) on the blocking pool. s3s-fs itself streams a body
//! through `tokio::fs` 4 KiB at a time, one blocking-pool round trip per 4 KiB: serving the
//! 157 MB archive of `scripts/bench-tier` took it about 0.9 CPU-seconds, mostly thread wake-ups,
//! which a cold-read benchmark on a 2-CPU machine would charge to the reader. `--get-chunk 0`
//! serves s3s-fs's own body, for comparison.

use std::collections::VecDeque;
use std::future::Future as _;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::dto::*;
use s3s::stream::{ByteStream, RemainingLength};
use s3s::{S3, S3Request, S3Response, S3Result, StdError};

struct Options {
    root: PathBuf,
    bucket: String,
    listen: String,
    access_key: String,
    secret_key: String,
    get_chunk: usize,
}

const USAGE: &str = "usage: s3-server --root DIR [--bucket NAME] [--listen ADDR] \
                     [--access-key KEY] [--secret-key SECRET] [--get-chunk BYTES]";

/// The largest `--get-chunk`: one read's buffer.
const GET_CHUNK_MAX: usize = 64 << 20;

fn parse() -> Result<Options, String> {
    let mut options = Options {
        root: PathBuf::new(),
        bucket: "silt-archive".into(),
        listen: "127.0.0.1:0".into(),
        access_key: "silt-bench-access-key".into(),
        secret_key: "silt-bench-secret-key".into(),
        get_chunk: 1 << 20,
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
            "--get-chunk" => {
                options.get_chunk = value
                    .parse()
                    .ok()
                    .filter(|&chunk| chunk <= GET_CHUNK_MAX)
                    .ok_or_else(|| {
                        format!("--get-chunk {value:?}: want 0..={GET_CHUNK_MAX} bytes\n{USAGE}")
                    })?;
            }
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
    // Resolved here, so that s3s-fs (which would resolve it the same way) and the GetObject
    // bodies read the same directory.
    let root = options
        .root
        .canonicalize()
        .map_err(|error| format!("cannot resolve {}: {error}", options.root.display()))?;
    let fs = s3s_fs::FileSystem::new(&root)
        .map_err(|error| format!("cannot serve {}: {error:?}", root.display()))?;
    let server = Server {
        root,
        fs,
        get_chunk: options.get_chunk,
    };
    let mut builder = s3s::service::S3ServiceBuilder::new(server);
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

/// s3s-fs with its GetObject body read in `get_chunk`-byte reads (0: s3s-fs's own body).
struct Server {
    fs: s3s_fs::FileSystem,
    root: PathBuf,
    get_chunk: usize,
}

impl Server {
    async fn get(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        let key = Path::new(&req.input.key);
        let plain = key
            .components()
            .all(|component| matches!(component, Component::Normal(_)));
        if self.get_chunk == 0 || !plain {
            return self.fs.get_object(req).await;
        }
        let path = self.root.join(&req.input.bucket).join(key);
        // s3s-fs opens the file, checks the range and fills in every header; its body stream
        // has read nothing yet, and is replaced.
        let mut response = self.fs.get_object(req).await?;
        let output = &mut response.output;
        let length = output
            .content_length
            .and_then(|length| u64::try_from(length).ok())
            .ok_or_else(|| s3s::s3_error!(InternalError, "no content length"))?;
        let start = match &output.content_range {
            None => 0,
            Some(range) => range_start(range)
                .ok_or_else(|| s3s::s3_error!(InternalError, "content range {range:?}"))?,
        };
        let file = std::fs::File::open(&path)
            .map_err(|error| s3s::s3_error!(InternalError, "open {}: {error}", path.display()))?;
        output.body = Some(StreamingBlob::new(FileRange::new(
            file,
            start,
            start + length,
            self.get_chunk,
        )));
        Ok(response)
    }
}

/// The first byte of a `bytes FIRST-LAST/LENGTH` content range.
fn range_start(range: &str) -> Option<u64> {
    range
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// A byte range of a file, read `chunk` bytes at a time on the blocking pool, one read ahead.
struct FileRange {
    file: Arc<std::fs::File>,
    next: u64,
    end: u64,
    chunk: usize,
    reads: VecDeque<tokio::task::JoinHandle<std::io::Result<Bytes>>>,
    remaining: u64,
}

impl FileRange {
    fn new(file: std::fs::File, start: u64, end: u64, chunk: usize) -> Self {
        let mut range = Self {
            file: Arc::new(file),
            next: start,
            end,
            chunk,
            reads: VecDeque::new(),
            remaining: end - start,
        };
        range.start_reads();
        range
    }

    /// Keeps two reads started (the one the stream returns next, and one ahead).
    fn start_reads(&mut self) {
        while self.reads.len() < 2 && self.next < self.end {
            let len = (self.end - self.next).min(self.chunk as u64);
            let (file, at) = (Arc::clone(&self.file), self.next);
            self.next += len;
            self.reads.push_back(tokio::task::spawn_blocking(move || {
                let mut buf = vec![0; len as usize];
                file.read_exact_at(&mut buf, at)?;
                Ok(Bytes::from(buf))
            }));
        }
    }
}

impl Stream for FileRange {
    type Item = Result<Bytes, StdError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(read) = this.reads.front_mut() else {
            return Poll::Ready(None);
        };
        let result = ready!(Pin::new(read).poll(cx));
        this.reads.pop_front();
        let item = match result {
            Ok(Ok(bytes)) => {
                this.remaining -= bytes.len() as u64;
                this.start_reads();
                Ok(bytes)
            }
            Ok(Err(error)) => Err(error.into()),
            Err(error) => Err(error.into()),
        };
        if item.is_err() {
            // Nothing after a failed read: the client sees a short body.
            this.reads.clear();
            this.next = this.end;
        }
        Poll::Ready(Some(item))
    }
}

impl ByteStream for FileRange {
    fn remaining_length(&self) -> RemainingLength {
        RemainingLength::new_exact(usize::try_from(self.remaining).unwrap_or(usize::MAX))
    }
}

/// Implements `S3` for `Server`: GetObject as above, every operation s3s-fs serves passed
/// through to it, and the rest s3s's default (NotImplemented), as s3s-fs alone answers them.
macro_rules! s3_through_fs {
    ($($method:ident($input:ident) -> $output:ident;)*) => {
        #[async_trait::async_trait]
        impl S3 for Server {
            async fn get_object(
                &self,
                req: S3Request<GetObjectInput>,
            ) -> S3Result<S3Response<GetObjectOutput>> {
                self.get(req).await
            }
            $(
                async fn $method(
                    &self,
                    req: S3Request<$input>,
                ) -> S3Result<S3Response<$output>> {
                    self.fs.$method(req).await
                }
            )*
        }
    };
}

s3_through_fs! {
    create_bucket(CreateBucketInput) -> CreateBucketOutput;
    copy_object(CopyObjectInput) -> CopyObjectOutput;
    delete_bucket(DeleteBucketInput) -> DeleteBucketOutput;
    delete_object(DeleteObjectInput) -> DeleteObjectOutput;
    delete_objects(DeleteObjectsInput) -> DeleteObjectsOutput;
    get_bucket_location(GetBucketLocationInput) -> GetBucketLocationOutput;
    head_bucket(HeadBucketInput) -> HeadBucketOutput;
    head_object(HeadObjectInput) -> HeadObjectOutput;
    list_buckets(ListBucketsInput) -> ListBucketsOutput;
    list_objects(ListObjectsInput) -> ListObjectsOutput;
    list_objects_v2(ListObjectsV2Input) -> ListObjectsV2Output;
    put_object(PutObjectInput) -> PutObjectOutput;
    create_multipart_upload(CreateMultipartUploadInput) -> CreateMultipartUploadOutput;
    upload_part(UploadPartInput) -> UploadPartOutput;
    upload_part_copy(UploadPartCopyInput) -> UploadPartCopyOutput;
    list_parts(ListPartsInput) -> ListPartsOutput;
    complete_multipart_upload(CompleteMultipartUploadInput) -> CompleteMultipartUploadOutput;
    abort_multipart_upload(AbortMultipartUploadInput) -> AbortMultipartUploadOutput;
}
