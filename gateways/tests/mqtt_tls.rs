//! The MQTT TLS listener's configuration: rcgen makes a CA, a server certificate and client
//! certificates in a temp dir; a real tokio-rustls client (ring provider) connects over
//! 127.0.0.1 to a tokio-rustls acceptor built by `server_config`. Checks the handshake, ALPN,
//! required and optional client certificates, the client's Common Name, and that bad files
//! give errors naming them.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use rcgen::string::PrintableString;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use silt_gateways::mqtt::server::tls::{
    ClientAuth, TlsError, certificate_common_name, peer_common_name, server_config,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Every network step of a test gets this long; a refused handshake must fail, not hang.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate authority that signs certificates for the tests.
struct Authority {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let certificate = params.self_signed(&key).unwrap();
        Authority {
            der: certificate.der().clone(),
            pem: certificate.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate with the given subject and purpose, and its key.
    fn sign(&self, subject: DistinguishedName, purpose: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name = subject;
        params.extended_key_usages = vec![purpose];
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            der: certificate.der().clone(),
            pem: certificate.pem(),
            key_der: key.serialize_der(),
            key_pem: key.serialize_pem(),
        }
    }

    fn client(&self, common_name: &str) -> Leaf {
        let mut subject = DistinguishedName::new();
        subject.push(DnType::OrganizationName, "Silt test plant");
        subject.push(DnType::CommonName, common_name);
        self.sign(subject, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

struct Leaf {
    der: CertificateDer<'static>,
    pem: String,
    key_der: Vec<u8>,
    key_pem: String,
}

impl Leaf {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// A CA, a server certificate for `localhost`, and their PEM files in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
    ca: Authority,
    ca_file: PathBuf,
    server_cert_file: PathBuf,
    server_key_file: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("Silt test CA");
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, "localhost");
        let server = ca.sign(subject, ExtendedKeyUsagePurpose::ServerAuth);
        let ca_file = write(dir.path(), "ca.pem", &ca.pem);
        // The chain file holds the server certificate, then the CA, as operators often do.
        let server_cert_file = write(
            dir.path(),
            "server.pem",
            &format!("{}{}", server.pem, ca.pem),
        );
        let server_key_file = write(dir.path(), "server.key", &server.key_pem);
        Pki {
            dir,
            ca,
            ca_file,
            server_cert_file,
            server_key_file,
        }
    }

    fn config(&self, client_auth: ClientAuth) -> Arc<rustls::ServerConfig> {
        server_config(&self.server_cert_file, &self.server_key_file, client_auth).unwrap()
    }

    fn required(&self) -> ClientAuth {
        ClientAuth::Required {
            ca: self.ca_file.clone(),
        }
    }

    fn optional(&self) -> ClientAuth {
        ClientAuth::Optional {
            ca: self.ca_file.clone(),
        }
    }
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// What the server saw of one accepted connection.
#[derive(Debug)]
struct Accepted {
    common_name: Option<String>,
    alpn: Option<Vec<u8>>,
}

/// Accepts one TLS connection, answers `ping` with `pong`, and reports what it saw, or the
/// handshake's error.
async fn serve_one(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> io::Result<Accepted> {
    let (tcp, _) = listener.accept().await?;
    let mut tls = TlsAcceptor::from(config).accept(tcp).await?;
    let (_, connection) = tls.get_ref();
    let accepted = Accepted {
        common_name: peer_common_name(connection),
        alpn: connection.alpn_protocol().map(<[u8]>::to_vec),
    };
    let mut ping = [0u8; 4];
    tls.read_exact(&mut ping).await?;
    assert_eq!(&ping, b"ping");
    tls.write_all(b"pong").await?;
    tls.shutdown().await?;
    Ok(accepted)
}

/// A client trusting `pki`'s CA, presenting `certificate` if given, offering `alpn`.
fn client_config(pki: &Pki, certificate: Option<&Leaf>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    client_config_for(pki, certificate, alpn, rustls::DEFAULT_VERSIONS)
}

/// Like [`client_config`], speaking only the given TLS versions.
fn client_config_for(
    pki: &Pki,
    certificate: Option<&Leaf>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.der.clone()).unwrap();
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots);
    let mut config = match certificate {
        Some(leaf) => builder
            .with_client_auth_cert(vec![leaf.der.clone()], leaf.key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Arc::new(config)
}

/// Connects, sends `ping` and reads `pong`; any failure, the server's refusal included, is
/// an error.
async fn ping(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = TlsConnector::from(config).connect(name, tcp).await?;
    tls.write_all(b"ping").await?;
    tls.flush().await?;
    let mut pong = [0u8; 4];
    // With TLS 1.3 the client finishes its half of the handshake before the server has
    // checked the client's certificate, so a refusal shows up here, as an alert or EOF.
    tls.read_exact(&mut pong).await?;
    if &pong != b"pong" {
        return Err(io::Error::other("the server did not answer pong"));
    }
    Ok(())
}

/// One connection from a client to a server built with `server`: both sides' results.
async fn exchange(
    server: Arc<rustls::ServerConfig>,
    client: Arc<ClientConfig>,
) -> (io::Result<Accepted>, io::Result<()>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(serve_one(listener, server));
    let client_result = tokio::time::timeout(STEP_TIMEOUT, ping(addr, client))
        .await
        .expect("the client neither finished nor failed in time");
    let server_result = tokio::time::timeout(STEP_TIMEOUT, server_task)
        .await
        .expect("the server neither finished nor failed in time")
        .unwrap();
    (server_result, client_result)
}

#[tokio::test]
async fn handshake_works_without_client_certificates() {
    // Nothing here installs a process-wide provider: the config must not need one.
    assert!(rustls::crypto::CryptoProvider::get_default().is_none());
    let pki = Pki::new();
    let server = pki.config(ClientAuth::None);
    let (accepted, client) = exchange(server.clone(), client_config(&pki, None, &[])).await;
    client.unwrap();
    let accepted = accepted.unwrap();
    assert_eq!(accepted.common_name, None);
    assert_eq!(accepted.alpn, None);

    // A certificate offered to a server that does not ask for one is never sent.
    let leaf = pki.ca.client("sensor-1");
    let (accepted, client) = exchange(server, client_config(&pki, Some(&leaf), &[])).await;
    client.unwrap();
    assert_eq!(accepted.unwrap().common_name, None);
}

#[tokio::test]
async fn alpn_mqtt_or_none_is_accepted() {
    let pki = Pki::new();
    let server = pki.config(ClientAuth::None);
    let (accepted, client) = exchange(server.clone(), client_config(&pki, None, &[b"mqtt"])).await;
    client.unwrap();
    assert_eq!(accepted.unwrap().alpn.as_deref(), Some(&b"mqtt"[..]));
    let (accepted, client) = exchange(
        server.clone(),
        client_config(&pki, None, &[b"x-other", b"mqtt"]),
    )
    .await;
    client.unwrap();
    assert_eq!(accepted.unwrap().alpn.as_deref(), Some(&b"mqtt"[..]));
    // A client that speaks only something else is told so in the handshake.
    let (accepted, client) = exchange(server, client_config(&pki, None, &[b"h2"])).await;
    assert!(client.is_err());
    assert!(accepted.is_err());
}

#[tokio::test]
async fn required_accepts_a_client_of_the_ca_and_names_it() {
    let pki = Pki::new();
    let leaf = pki.ca.client("sensor-42");
    let (accepted, client) = exchange(
        pki.config(pki.required()),
        client_config(&pki, Some(&leaf), &[b"mqtt"]),
    )
    .await;
    client.unwrap();
    let accepted = accepted.unwrap();
    assert_eq!(accepted.common_name.as_deref(), Some("sensor-42"));
    assert_eq!(accepted.alpn.as_deref(), Some(&b"mqtt"[..]));
}

#[tokio::test]
async fn required_refuses_clients_without_a_certificate_or_from_another_ca() {
    let pki = Pki::new();
    let server = pki.config(pki.required());
    let (accepted, client) = exchange(server.clone(), client_config(&pki, None, &[])).await;
    assert!(
        client.is_err(),
        "a client without a certificate got through"
    );
    let error = accepted.unwrap_err();
    assert!(error.to_string().contains("certificate"), "{error}");

    let stranger = Authority::new("Someone else's CA").client("sensor-42");
    let (accepted, client) = exchange(server, client_config(&pki, Some(&stranger), &[])).await;
    assert!(client.is_err(), "a client of another CA got through");
    assert!(accepted.is_err());
}

#[tokio::test]
async fn tls12_clients_get_the_same_checks() {
    let pki = Pki::new();
    let server = pki.config(pki.required());
    let tls12 = &[&rustls::version::TLS12];
    let leaf = pki.ca.client("legacy-plc");
    let (accepted, client) = exchange(
        server.clone(),
        client_config_for(&pki, Some(&leaf), &[], tls12),
    )
    .await;
    client.unwrap();
    assert_eq!(accepted.unwrap().common_name.as_deref(), Some("legacy-plc"));
    let (accepted, client) = exchange(server, client_config_for(&pki, None, &[], tls12)).await;
    assert!(
        client.is_err(),
        "a TLS 1.2 client without a certificate got through"
    );
    assert!(accepted.is_err());
}

#[tokio::test]
async fn optional_accepts_clients_with_or_without_a_certificate() {
    let pki = Pki::new();
    let server = pki.config(pki.optional());
    let (accepted, client) = exchange(server.clone(), client_config(&pki, None, &[])).await;
    client.unwrap();
    assert_eq!(accepted.unwrap().common_name, None);

    let leaf = pki.ca.client("gateway-7");
    let (accepted, client) = exchange(server.clone(), client_config(&pki, Some(&leaf), &[])).await;
    client.unwrap();
    assert_eq!(accepted.unwrap().common_name.as_deref(), Some("gateway-7"));

    // A certificate that is presented is still verified.
    let stranger = Authority::new("Someone else's CA").client("gateway-7");
    let (accepted, client) = exchange(server, client_config(&pki, Some(&stranger), &[])).await;
    assert!(client.is_err(), "a client of another CA got through");
    assert!(accepted.is_err());
}

fn subject_with(common_name: Option<DnValue>) -> DistinguishedName {
    let mut subject = DistinguishedName::new();
    subject.push(
        DnType::CountryName,
        DnValue::PrintableString(PrintableString::try_from("DE").unwrap()),
    );
    subject.push(DnType::OrganizationName, "Silt");
    if let Some(common_name) = common_name {
        subject.push(DnType::CommonName, common_name);
    }
    subject.push(DnType::OrganizationalUnitName, "line 1");
    subject
}

#[test]
fn common_names_read_in_every_string_type_certificates_use() {
    let ca = Authority::new("Silt test CA");
    let cases: Vec<(DnValue, &str)> = vec![
        (DnValue::Utf8String("pümp-3 ✓".into()), "pümp-3 ✓"),
        (
            DnValue::PrintableString("pump 3".try_into().unwrap()),
            "pump 3",
        ),
        (
            DnValue::TeletexString("pump-3".try_into().unwrap()),
            "pump-3",
        ),
        (DnValue::BmpString("pümp-3".try_into().unwrap()), "pümp-3"),
        (
            DnValue::UniversalString("pümp-3 🚰".try_into().unwrap()),
            "pümp-3 🚰",
        ),
        (
            DnValue::Ia5String("pump-3@plant".try_into().unwrap()),
            "pump-3@plant",
        ),
    ];
    for (value, expected) in cases {
        let leaf = ca.sign(
            subject_with(Some(value.clone())),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        assert_eq!(
            certificate_common_name(leaf.der.as_ref()).as_deref(),
            Some(expected),
            "{value:?}"
        );
    }
    // No Common Name in the subject (the issuer's is not taken instead), and one with
    // U+0000, which would read differently to different parsers.
    let leaf = ca.sign(subject_with(None), ExtendedKeyUsagePurpose::ClientAuth);
    assert_eq!(certificate_common_name(leaf.der.as_ref()), None);
    let leaf = ca.sign(
        subject_with(Some(DnValue::Utf8String("admin\0.evil".into()))),
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    assert_eq!(certificate_common_name(leaf.der.as_ref()), None);
    assert_eq!(
        certificate_common_name(ca.der.as_ref()).as_deref(),
        Some("Silt test CA")
    );
}

fn config_error(cert: &Path, key: &Path, client_auth: ClientAuth) -> TlsError {
    server_config(cert, key, client_auth).unwrap_err()
}

#[test]
fn bad_files_give_errors_that_name_them() {
    let pki = Pki::new();
    let dir = pki.dir.path();
    let missing = dir.join("missing.pem");
    let (cert, key) = (&pki.server_cert_file, &pki.server_key_file);

    let error = config_error(&missing, key, ClientAuth::None);
    assert!(matches!(error, TlsError::Read { .. }), "{error}");
    assert!(error.to_string().contains("missing.pem"), "{error}");

    let error = config_error(key, key, ClientAuth::None);
    assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");
    assert!(error.to_string().contains("server.key"), "{error}");

    let error = config_error(cert, cert, ClientAuth::None);
    assert!(matches!(error, TlsError::NoPrivateKey { .. }), "{error}");
    assert!(error.to_string().contains("server.pem"), "{error}");

    let other_key = write(
        dir,
        "other.key",
        &KeyPair::generate().unwrap().serialize_pem(),
    );
    let error = config_error(cert, &other_key, ClientAuth::None);
    assert!(
        matches!(error, TlsError::CertificateKeyMismatch { .. }),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains("server.pem") && message.contains("other.key"),
        "{message}"
    );

    let garbage = write(
        dir,
        "garbage.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    );
    let error = config_error(&garbage, key, ClientAuth::None);
    assert!(matches!(error, TlsError::BadPem { .. }), "{error}");
    assert!(error.to_string().contains("garbage.pem"), "{error}");

    let unterminated = write(
        dir,
        "cut.key",
        "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n",
    );
    let error = config_error(cert, &unterminated, ClientAuth::None);
    assert!(matches!(error, TlsError::BadPem { .. }), "{error}");
    // The key's bytes stay out of the message.
    assert!(!error.to_string().contains("MIGHAgEAMBMG"), "{error}");

    let encrypted = write(
        dir,
        "encrypted.key",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
    );
    let error = config_error(cert, &encrypted, ClientAuth::None);
    assert!(matches!(error, TlsError::EncryptedKey { .. }), "{error}");

    let junk_key = write(
        dir,
        "junk.key",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    let error = config_error(cert, &junk_key, ClientAuth::None);
    assert!(matches!(error, TlsError::UnusableKey { .. }), "{error}");
    assert!(error.to_string().contains("junk.key"), "{error}");

    let error = config_error(
        cert,
        key,
        ClientAuth::Required {
            ca: missing.clone(),
        },
    );
    assert!(matches!(error, TlsError::Read { .. }), "{error}");
    assert!(error.to_string().contains("missing.pem"), "{error}");
    let empty = write(dir, "empty.pem", "");
    let error = config_error(cert, key, ClientAuth::Optional { ca: empty });
    assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");
    assert!(error.to_string().contains("empty.pem"), "{error}");

    // The limit is checked without reading a huge file (sparse).
    let huge = dir.join("huge.pem");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(4 * 1024 * 1024 + 1)
        .unwrap();
    let error = config_error(&huge, key, ClientAuth::None);
    assert!(matches!(error, TlsError::TooLarge { .. }), "{error}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn common_name_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = certificate_common_name(&bytes);
    }

    #[test]
    fn common_name_never_panics_on_damaged_certificates(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        static CERTIFICATE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
            Authority::new("ca").client("sensor-9").der.to_vec()
        });
        let mut bytes = CERTIFICATE.clone();
        for (index, value) in flips {
            let at = index.index(bytes.len());
            bytes[at] = value;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        let _ = certificate_common_name(&bytes);
    }
}
