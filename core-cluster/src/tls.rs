//! The core's TLS material: a development CA and server certificate created on first start
//! when none is configured, edge client certificates issued from that CA, and the rustls
//! server configuration of the uplink.
//!
//! Files under the TLS directory (`<data-dir>/tls/` unless configured):
//! `ca.pem` (give it to edges as `--uplink-ca`), `ca-key.pem` (mode 0600, signs edge
//! certificates), `server.pem` and `server-key.pem`. Each is written to a temporary name,
//! fsync'd and renamed, so a crash never leaves half a key. The CA's issuer fields are fixed
//! ([`ca_params`]), so the CA can sign again from its key alone after a restart.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

pub(crate) const CA_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";
const SERVER_CERT_FILE: &str = "server.pem";
const SERVER_KEY_FILE: &str = "server-key.pem";
/// Largest PEM file read.
const PEM_FILE_BYTES_MAX: u64 = 4 << 20;

/// Paths of a server certificate, its key, and the CA that signs edge certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerTls {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    /// When set, edges must present a certificate chaining to this CA (mutual TLS), and the
    /// edge id they claim must be one of its DNS names.
    pub(crate) client_ca: Option<PathBuf>,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "silt development CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "silt");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Creates the development CA and a server certificate in `dir` unless `ca.pem` already
/// exists there, and returns the server's TLS paths. The server certificate names
/// `localhost`, `127.0.0.1`, `::1` and `extra_names`.
pub(crate) fn ensure_dev_tls(dir: &Path, extra_names: &[String]) -> anyhow::Result<ServerTls> {
    let tls = ServerTls {
        cert: dir.join(SERVER_CERT_FILE),
        key: dir.join(SERVER_KEY_FILE),
        client_ca: None,
    };
    if dir.join(CA_FILE).exists() && tls.cert.exists() && tls.key.exists() {
        return Ok(tls);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca_key = if dir.join(CA_KEY_FILE).exists() {
        load_key_pair(&dir.join(CA_KEY_FILE))?
    } else {
        let ca_key = KeyPair::generate().context("cannot generate the CA key")?;
        let ca_cert = ca_params()
            .self_signed(&ca_key)
            .context("cannot sign the CA certificate")?;
        write_durable(
            &dir.join(CA_KEY_FILE),
            ca_key.serialize_pem().as_bytes(),
            true,
        )?;
        write_durable(&dir.join(CA_FILE), ca_cert.pem().as_bytes(), false)?;
        ca_key
    };
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    names.extend(extra_names.iter().cloned());
    let mut params = CertificateParams::new(names).context("invalid server name")?;
    params
        .distinguished_name
        .push(DnType::CommonName, "silt-core");
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().context("cannot generate the server key")?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let cert = params
        .signed_by(&key, &issuer)
        .context("cannot sign the server certificate")?;
    write_durable(&tls.key, key.serialize_pem().as_bytes(), true)?;
    write_durable(&tls.cert, cert.pem().as_bytes(), false)?;
    tracing::info!(dir = %dir.display(), "created a development CA and server certificate");
    Ok(tls)
}

/// Issues a client certificate for edge `edge_id` from the CA in `tls_dir` into `out`:
/// `<edge_id>.pem`, `<edge_id>-key.pem` and a copy of `ca.pem`. Returns the certificate path.
pub(crate) fn issue_edge_cert(
    tls_dir: &Path,
    edge_id: &str,
    out: &Path,
) -> anyhow::Result<PathBuf> {
    if edge_id.is_empty()
        || edge_id.len() > silt_wire::EDGE_ID_BYTES_MAX
        || !edge_id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.')
    {
        bail!("edge id {edge_id:?} must be 1-255 characters of a-z, A-Z, 0-9, '-' and '.'");
    }
    let ca_key_path = tls_dir.join(CA_KEY_FILE);
    if !ca_key_path.exists() {
        bail!(
            "{} does not exist: start silt-core once with this data directory to create its CA",
            ca_key_path.display()
        );
    }
    let ca_key = load_key_pair(&ca_key_path)?;
    let mut params = CertificateParams::new(vec![edge_id.to_string()])
        .with_context(|| format!("edge id {edge_id:?} is not a valid DNS name"))?;
    params.distinguished_name.push(DnType::CommonName, edge_id);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().context("cannot generate the edge key")?;
    let cert = params
        .signed_by(&key, &Issuer::new(ca_params(), ca_key))
        .context("cannot sign the edge certificate")?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let cert_path = out.join(format!("{edge_id}.pem"));
    write_durable(
        &out.join(format!("{edge_id}-key.pem")),
        key.serialize_pem().as_bytes(),
        true,
    )?;
    write_durable(&cert_path, cert.pem().as_bytes(), false)?;
    let ca = std::fs::read(tls_dir.join(CA_FILE)).context("cannot read the CA certificate")?;
    write_durable(&out.join(CA_FILE), &ca, false)?;
    Ok(cert_path)
}

/// The uplink's rustls server configuration: TLS 1.3 (QUIC), ALPN `silt-uplink/1`, ring.
pub(crate) fn server_config(tls: &ServerTls) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = load_certs(&tls.cert)?;
    let key_pem = read_limited(&tls.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .with_context(|| format!("{} holds no usable private key", tls.key.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("cannot build the TLS configuration")?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs(ca)? {
                roots
                    .add(cert)
                    .with_context(|| format!("a CA certificate in {} is unusable", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| {
                    format!("cannot verify client certificates against {}", ca.display())
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).with_context(|| {
        format!(
            "the certificate {} does not fit the key {}",
            tls.cert.display(),
            tls.key.display()
        )
    })?;
    config.alpn_protocols = vec![silt_wire::ALPN.to_vec()];
    Ok(config)
}

/// The DNS names of a peer's end-entity certificate (its subject alternative names).
pub(crate) fn certificate_dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(names)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(name) => Some(name.to_string()),
            _ => None,
        })
        .collect()
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read_limited(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not valid PEM", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

fn load_key_pair(path: &Path) -> anyhow::Result<KeyPair> {
    let pem = String::from_utf8(read_limited(path)?)
        .with_context(|| format!("{} is not PEM text", path.display()))?;
    KeyPair::from_pem(&pem).with_context(|| format!("{} holds no usable key", path.display()))
}

fn read_limited(path: &Path) -> anyhow::Result<Vec<u8>> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if size > PEM_FILE_BYTES_MAX {
        bail!(
            "{} is larger than {PEM_FILE_BYTES_MAX} bytes",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Writes `bytes` to `path` atomically and durably (tmp, fsync, rename, fsync directory).
fn write_durable(path: &Path, bytes: &[u8], private: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))?;
    Ok(())
}

/// `silt-core issue-cert`: issues an edge client certificate from the core's CA.
#[derive(Debug, clap::Parser)]
#[command(
    name = "silt-core issue-cert",
    about = "Issue a client certificate for an edge from the core's uplink CA"
)]
struct IssueCert {
    /// The core's data directory; its CA lives in `<data-dir>/tls/` unless --tls-dir says.
    #[arg(long, value_name = "DIR", required_unless_present = "tls_dir")]
    data_dir: Option<PathBuf>,
    /// The directory holding `ca.pem` and `ca-key.pem` (the core's `uplink.tls_dir`).
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// The edge's node id; the certificate names it, and the core accepts it only for that
    /// edge id.
    #[arg(long, value_name = "ID")]
    edge_id: String,
    /// Where to write `<edge-id>.pem`, `<edge-id>-key.pem` and `ca.pem`.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// Runs `silt-core issue-cert` with `args` (after the subcommand name).
pub(crate) fn issue_cert_main(
    args: impl Iterator<Item = std::ffi::OsString>,
) -> anyhow::Result<()> {
    use clap::Parser as _;
    let cli = IssueCert::parse_from(std::iter::once("silt-core issue-cert".into()).chain(args));
    let tls_dir = match (cli.tls_dir, cli.data_dir) {
        (Some(dir), _) => dir,
        (None, Some(data_dir)) => data_dir.join(silt_log::TLS_DIR_NAME),
        (None, None) => bail!("--data-dir or --tls-dir is required"),
    };
    let cert = issue_edge_cert(&tls_dir, &cli.edge_id, &cli.out)?;
    println!("{}", cert.display());
    Ok(())
}
