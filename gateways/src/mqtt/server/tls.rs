//! TLS for the MQTT listener: a rustls server configuration from PEM files, and the client
//! certificate's Common Name for brokers that use it as the user name.
//!
//! The configuration is built on ring's provider explicitly, not on a process-wide default,
//! so it works whether or not anything installed one and the edge binary never links
//! aws-lc. Client certificates, when asked for, are verified with webpki against the CA
//! bundle the operator names; [`peer_common_name`] is mosquitto's `use_identity_as_username`.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN protocol name MQTT clients offer (`mqtt`, as registered with IANA). Clients
/// offering no ALPN at all are accepted too; a client offering only other protocols is
/// refused with TLS's `no_application_protocol` alert.
pub const ALPN_MQTT: &[u8] = b"mqtt";

/// The largest PEM file read: a public CA bundle is about 200 KiB.
pub const PEM_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Whether and how the listener asks clients for certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificates: clients authenticate in CONNECT, if at all.
    None,
    /// A client may present a certificate, which must then chain to a CA in `ca`; a client
    /// without one still connects (and authenticates in CONNECT).
    Optional { ca: PathBuf },
    /// Every client must present a certificate chaining to a CA in `ca`.
    Required { ca: PathBuf },
}

/// Why the TLS configuration cannot be built. Each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be opened or read (missing, permissions, a directory).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is over [`PEM_FILE_BYTES_MAX`].
    #[error("{} is larger than the {max_bytes}-byte limit for a PEM file", path.display())]
    TooLarge { path: PathBuf, max_bytes: u64 },
    /// The file is not well-formed PEM.
    #[error("{} is not valid PEM: {detail}", path.display())]
    BadPem { path: PathBuf, detail: String },
    /// The file has no `CERTIFICATE` block.
    #[error("{} has no certificate in it (expected a PEM `BEGIN CERTIFICATE` block)", path.display())]
    NoCertificate { path: PathBuf },
    /// The file has no private key block.
    #[error(
        "{} has no private key in it (expected a PEM `BEGIN PRIVATE KEY`, \
         `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY` block)",
        path.display()
    )]
    NoPrivateKey { path: PathBuf },
    /// The key is encrypted with a passphrase, which a broker starting unattended cannot
    /// supply.
    #[error("the private key in {} is encrypted; decrypt it with `openssl pkey`", path.display())]
    EncryptedKey { path: PathBuf },
    /// The key is of a kind or encoding ring cannot use.
    #[error("the private key in {} cannot be used: {source}", path.display())]
    UnusableKey {
        path: PathBuf,
        source: rustls::Error,
    },
    /// The first certificate is not a certificate rustls can read, or its public key is not
    /// the private key's.
    #[error(
        "the certificate in {} does not fit the private key in {}: {source}",
        cert.display(),
        key.display()
    )]
    CertificateKeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    /// A certificate in the CA file is unusable as a trust anchor.
    #[error("a CA certificate in {} cannot be used: {source}", path.display())]
    BadCaCertificate {
        path: PathBuf,
        source: rustls::Error,
    },
    /// The client certificate verifier refused the CA bundle.
    #[error("cannot verify client certificates against {}: {source}", path.display())]
    Verifier {
        path: PathBuf,
        source: VerifierBuilderError,
    },
    /// rustls refused the protocol versions (a bug rather than a configuration fault).
    #[error("cannot build the TLS configuration: {0}")]
    Config(rustls::Error),
}

/// Builds the server configuration for a TLS listener.
///
/// `cert_chain` holds the server certificate first, then any intermediates; `private_key`
/// its key (PKCS#8, PKCS#1 or SEC1; one file may hold both). TLS 1.2 and 1.3 with rustls'
/// safe defaults, ALPN `mqtt` or none (see [`ALPN_MQTT`]).
pub fn server_config(
    cert_chain: &Path,
    private_key: &Path,
    client_auth: ClientAuth,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified_key = load_certified_key(cert_chain, private_key, &provider)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let builder = match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Optional { ca } => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(load_roots(&ca)?),
                provider.clone(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|source| TlsError::Verifier { path: ca, source })?;
            builder.with_client_cert_verifier(verifier)
        }
        ClientAuth::Required { ca } => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(load_roots(&ca)?),
                provider.clone(),
            )
            .build()
            .map_err(|source| TlsError::Verifier { path: ca, source })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified_key)));
    config.alpn_protocols = vec![ALPN_MQTT.to_vec()];
    Ok(Arc::new(config))
}

/// Loads the chain and key, and checks that they belong together, so that a mismatch is a
/// startup error naming both files rather than a handshake failure for every client.
fn load_certified_key(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = load_certificates(cert_path)?;
    let key_pem = read_pem_file(key_path)?;
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) if contains(&key_pem, b"ENCRYPTED PRIVATE KEY") => {
            return Err(TlsError::EncryptedKey {
                path: key_path.to_owned(),
            });
        }
        Err(pem::Error::NoItemsFound) => {
            return Err(TlsError::NoPrivateKey {
                path: key_path.to_owned(),
            });
        }
        Err(error) => return Err(bad_pem(key_path, &error)),
    };
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::UnusableKey {
            path: key_path.to_owned(),
            source,
        })?;
    let certified_key = CertifiedKey::new(chain, signing_key);
    match certified_key.keys_match() {
        // ring's keys always know their public half; `Unknown` would only mean that a
        // mismatch cannot be detected here, which the handshake then reveals.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified_key)
        }
        Err(source) => Err(TlsError::CertificateKeyMismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
            source,
        }),
    }
}

/// Every certificate of a PEM file, in order; at least one.
fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_pem_file(path)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| bad_pem(path, &error))?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certificates)
}

/// The CA bundle as trust anchors.
fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in load_certificates(path)? {
        roots
            .add(certificate)
            .map_err(|source| TlsError::BadCaCertificate {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(roots)
}

fn read_pem_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_error = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(PEM_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > PEM_FILE_BYTES_MAX {
        return Err(TlsError::TooLarge {
            path: path.to_owned(),
            max_bytes: PEM_FILE_BYTES_MAX,
        });
    }
    Ok(bytes)
}

fn bad_pem(path: &Path, error: &pem::Error) -> TlsError {
    TlsError::BadPem {
        path: path.to_owned(),
        detail: PemDetail(error).to_string(),
    }
}

/// A PEM error without the bytes of the line it quotes: for a key file those can be
/// secret, and they end up in logs.
struct PemDetail<'a>(&'a pem::Error);

impl fmt::Display for PemDetail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            pem::Error::MissingSectionEnd { .. } => f.write_str("a section has no END line"),
            pem::Error::IllegalSectionStart { .. } => f.write_str("a BEGIN line is malformed"),
            pem::Error::Base64Decode(_) => f.write_str("a section is not valid base64"),
            other => other.fmt(f),
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// The Common Name of the client certificate that the handshake verified, or `None` when the
/// client presented none, the handshake is not finished, or the subject has no Common Name
/// that reads as text. With several Common Names the first is used, as mosquitto does.
pub fn peer_common_name(conn: &ServerConnection) -> Option<String> {
    if conn.is_handshaking() {
        return None;
    }
    let end_entity = conn.peer_certificates()?.first()?;
    certificate_common_name(end_entity.as_ref())
}

/// The first Common Name (OID 2.5.4.3) of a DER certificate's subject, as text; `None` if
/// the certificate cannot be read or the value is not a text string free of U+0000.
///
/// A small DER walk rather than an X.509 crate: this is all we read from a certificate, the
/// ones it sees have already passed webpki's checks, and it keeps the edge binary small.
/// Every read is bounds-checked, so any bytes give `None` rather than a panic.
pub fn certificate_common_name(certificate_der: &[u8]) -> Option<String> {
    let (certificate, _) = der::expect(certificate_der, der::SEQUENCE)?;
    let (tbs, _) = der::expect(certificate, der::SEQUENCE)?;
    let mut rest = tbs;
    // TBSCertificate: [0] version (optional), serialNumber, signature, issuer, validity,
    // subject. Skip to the subject.
    let (tag, _, after) = der::read(rest)?;
    if tag == der::VERSION {
        rest = after;
    }
    for expected in [der::INTEGER, der::SEQUENCE, der::SEQUENCE, der::SEQUENCE] {
        let (_, after) = der::expect(rest, expected)?;
        rest = after;
    }
    let (mut subject, _) = der::expect(rest, der::SEQUENCE)?;
    // Name: SEQUENCE OF RelativeDistinguishedName (SET OF AttributeTypeAndValue).
    while !subject.is_empty() {
        let (mut rdn, after) = der::expect(subject, der::SET)?;
        subject = after;
        while !rdn.is_empty() {
            let (attribute, after) = der::expect(rdn, der::SEQUENCE)?;
            rdn = after;
            let (oid, value) = der::expect(attribute, der::OID)?;
            if oid == der::COMMON_NAME_OID {
                let (tag, contents, _) = der::read(value)?;
                return der::text(tag, contents);
            }
        }
    }
    None
}

/// Just enough DER (X.690) to walk to a certificate's subject.
mod der {
    pub(super) const INTEGER: u8 = 0x02;
    pub(super) const OID: u8 = 0x06;
    pub(super) const UTF8_STRING: u8 = 0x0C;
    pub(super) const PRINTABLE_STRING: u8 = 0x13;
    pub(super) const TELETEX_STRING: u8 = 0x14;
    pub(super) const IA5_STRING: u8 = 0x16;
    pub(super) const UNIVERSAL_STRING: u8 = 0x1C;
    pub(super) const BMP_STRING: u8 = 0x1E;
    pub(super) const SEQUENCE: u8 = 0x30;
    pub(super) const SET: u8 = 0x31;
    /// `[0] EXPLICIT`, the version field of a TBSCertificate.
    pub(super) const VERSION: u8 = 0xA0;
    /// 2.5.4.3, id-at-commonName, encoded.
    pub(super) const COMMON_NAME_OID: &[u8] = &[0x55, 0x04, 0x03];

    /// Reads one element: its tag, its contents and what follows it. Only single-byte tags
    /// and lengths of up to four bytes, which is all certificates use.
    pub(super) fn read(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        if tag & 0x1F == 0x1F {
            return None;
        }
        let (&first, mut rest) = rest.split_first()?;
        let length = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7F);
            if count == 0 || count > 4 {
                return None;
            }
            let (bytes, after) = rest.split_at_checked(count)?;
            rest = after;
            bytes
                .iter()
                .fold(0usize, |length, &byte| (length << 8) | usize::from(byte))
        };
        let (contents, after) = rest.split_at_checked(length)?;
        Some((tag, contents, after))
    }

    /// Reads one element that must have tag `tag`: its contents and what follows.
    pub(super) fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        match read(input)? {
            (found, contents, after) if found == tag => Some((contents, after)),
            _ => None,
        }
    }

    /// A directory string as text, refusing U+0000 (a classic way to make a name read
    /// differently to different parsers).
    pub(super) fn text(tag: u8, contents: &[u8]) -> Option<String> {
        let text = match tag {
            UTF8_STRING | PRINTABLE_STRING | IA5_STRING => {
                std::str::from_utf8(contents).ok()?.to_owned()
            }
            // T.61 in theory, Latin-1 or ASCII in practice: accept only ASCII.
            TELETEX_STRING if contents.is_ascii() => std::str::from_utf8(contents).ok()?.to_owned(),
            BMP_STRING => {
                let (units, []) = contents.as_chunks::<2>() else {
                    return None;
                };
                char::decode_utf16(units.iter().map(|unit| u16::from_be_bytes(*unit)))
                    .collect::<Result<String, _>>()
                    .ok()?
            }
            UNIVERSAL_STRING => {
                let (units, []) = contents.as_chunks::<4>() else {
                    return None;
                };
                units
                    .iter()
                    .map(|unit| char::from_u32(u32::from_be_bytes(*unit)))
                    .collect::<Option<String>>()?
            }
            _ => return None,
        };
        (!text.contains('\0')).then_some(text)
    }
}
