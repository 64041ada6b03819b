//! `silt bench quic`: the bandwidth of a bare QUIC stream over loopback, with the uplink's
//! transport (quinn, TLS 1.3 on rustls with ring, a 16 MiB stream receive window) and nothing
//! else: no log to read or write, no compression, no acks but QUIC's own. It is the link
//! baseline of `scripts/bench-uplink`: on one machine the "link" of an uplink is this
//! stream, whose encryption, packetisation and UDP syscalls cost CPU like the rest.
//!
//! The receiver and the sender each run on their own tokio runtime (two workers each, on
//! their own threads), as `silt-core` and `silt-edge` would. A run sends `--total-bytes` on one
//! stream in `--chunk-bytes` writes of shared bytes (no copy before quinn's) and is timed
//! from the stream's opening until the receiver has read the last byte and answered.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

#[derive(Debug, Args)]
pub(crate) struct QuicBench {
    /// Bytes sent per run.
    #[arg(long, default_value_t = 1 << 30)]
    total_bytes: u64,
    /// Size of each write.
    #[arg(long, default_value_t = 1 << 20)]
    chunk_bytes: usize,
    /// Runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
}

/// The stream receive window of the core's uplink endpoint.
const STREAM_RECEIVE_WINDOW_BYTES: u32 = 16 << 20;
const ALPN: &[u8] = b"silt-bench-quic";
/// Ends the bench if the link stalls (nothing on loopback should take this long).
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

pub(crate) fn run(options: &QuicBench) -> anyhow::Result<()> {
    if options.runs == 0 || options.total_bytes == 0 {
        bail!("--runs and --total-bytes must be positive");
    }
    if !(1..=64 << 20).contains(&options.chunk_bytes) {
        bail!("--chunk-bytes must be between 1 and 64 MiB");
    }
    let mut runs = Vec::with_capacity(options.runs);
    for run in 1..=options.runs {
        let mb_s = one_run(options.total_bytes, options.chunk_bytes)?;
        if !options.json {
            println!("run {run}: {mb_s:.0} MB/s over one QUIC stream on loopback");
        }
        runs.push(mb_s);
    }
    let median = super::median(runs.iter().copied());
    if options.json {
        println!(
            "{}",
            serde_json::json!({ "runs_mb_s": runs, "median_mb_s": median })
        );
    } else {
        println!(
            "median of {}: {median:.0} MB/s ({} bytes per run, {}-byte writes)",
            options.runs, options.total_bytes, options.chunk_bytes
        );
    }
    Ok(())
}

fn runtime(name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")
}

fn one_run(total_bytes: u64, chunk_bytes: usize) -> anyhow::Result<f64> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .context("cannot make a certificate")?;
    let cert = CertificateDer::from(certified.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));

    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(STREAM_RECEIVE_WINDOW_BYTES.into());
    server.transport_config(Arc::new(transport));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![ALPN.to_vec()];
    let client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls)?));

    let receiver_rt = runtime("bench-quic-recv")?;
    let sender_rt = runtime("bench-quic-send")?;
    let endpoint = {
        let _entered = receiver_rt.enter();
        quinn::Endpoint::server(server, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?
    };
    let addr = endpoint.local_addr()?;
    let receiver = receiver_rt.spawn(receive(endpoint));
    let sent = sender_rt.block_on(async move {
        tokio::time::timeout(RUN_TIMEOUT, send(addr, client, total_bytes, chunk_bytes))
            .await
            .context("the QUIC stream stalled")?
    });
    let received = receiver_rt
        .block_on(async { tokio::time::timeout(RUN_TIMEOUT, receiver).await })
        .context("the receiver stalled")?
        .context("the receiver panicked")?;
    let (elapsed, received) = (sent?, received?);
    if received != total_bytes {
        bail!("the receiver read {received} of {total_bytes} bytes");
    }
    Ok(super::mb_per_s(total_bytes, elapsed))
}

/// Accepts one connection and one stream, reads it to its end and answers with one byte.
async fn receive(endpoint: quinn::Endpoint) -> anyhow::Result<u64> {
    let incoming = endpoint.accept().await.context("no connection came")?;
    let connection = incoming.await?;
    let (mut send, mut recv) = connection.accept_bi().await?;
    let mut received = 0u64;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        received += chunk.bytes.len() as u64;
    }
    send.write_all(&[1]).await?;
    send.finish()?;
    // The sender closes the connection once it has the answer.
    connection.closed().await;
    endpoint.wait_idle().await;
    Ok(received)
}

async fn send(
    addr: SocketAddr,
    client: quinn::ClientConfig,
    total_bytes: u64,
    chunk_bytes: usize,
) -> anyhow::Result<Duration> {
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    endpoint.set_default_client_config(client);
    let connection = endpoint.connect(addr, "localhost")?.await?;
    // Incompressible, and not all one byte value.
    let chunk = Bytes::from(
        (0..chunk_bytes)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
            .collect::<Vec<u8>>(),
    );
    let started = Instant::now();
    let (mut send, mut recv) = connection.open_bi().await?;
    let mut left = total_bytes;
    while left > 0 {
        let len = chunk_bytes.min(usize::try_from(left).unwrap_or(usize::MAX));
        send.write_chunk(chunk.slice(..len)).await?;
        left -= len as u64;
    }
    send.finish()?;
    let answer = recv.read_to_end(1).await?;
    let elapsed = started.elapsed();
    if answer != [1] {
        bail!("the receiver did not answer");
    }
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    Ok(elapsed)
}
