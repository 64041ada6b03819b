//! The TLS listener end to end: mosquitto_pub over TLS with a client certificate, whose Common
//! Name becomes the user name the ACL sees; without a certificate (when one is required), or
//! with one from another CA, the handshake fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use silt_tests::{Running, START_TIMEOUT, silt_edge};

struct Authority {
    issuer: Issuer<'static, KeyPair>,
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
            pem: certificate.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate and key, as PEM files in `dir`.
    fn sign(
        &self,
        dir: &Path,
        name: &str,
        common_name: &str,
        purpose: ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![purpose];
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key_file = dir.join(format!("{name}.key"));
        std::fs::write(&cert, certificate.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert, key_file)
    }
}

/// mosquitto_pub over TLS; true if the broker acknowledged the QoS 1 publish.
fn publish_tls(port: u16, ca: &Path, client: Option<&(PathBuf, PathBuf)>, topic: &str) -> bool {
    let mut command = Command::new("mosquitto_pub");
    command.args(["-h", "localhost", "-p", &port.to_string(), "-V", "mqttv5"]);
    command.args(["-t", topic, "-m", "over tls", "-q", "1", "--cafile"]);
    command.arg(ca);
    if let Some((cert, key)) = client {
        command.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    let output = command
        .output()
        .expect("mosquitto_pub (Debian package mosquitto-clients) must be installed");
    output.status.success()
}

#[test]
fn client_certificates_name_the_user_on_the_tls_listener() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new("Silt test CA");
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let server = ca.sign(
        dir.path(),
        "server",
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let sensor = ca.sign(
        dir.path(),
        "sensor",
        "sensor-7",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let other_ca = Authority::new("Someone else's CA");
    let stranger = other_ca.sign(
        dir.path(),
        "stranger",
        "sensor-7",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    // The certificate's name is the user: it may publish under its own name only.
    let acl = dir.path().join("mqtt.acl");
    std::fs::write(&acl, "allow publish user:sensor-7 plant/%u/#\n").unwrap();

    let mut edge = Running::start({
        let mut command = Command::new(silt_edge());
        command
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--set", "mqtt.tls_listen=127.0.0.1:0"])
            .args(["--set", &format!("mqtt.tls_cert={}", server.0.display())])
            .args(["--set", &format!("mqtt.tls_key={}", server.1.display())])
            .args([
                "--set",
                &format!("mqtt.tls_client_ca={}", ca_file.display()),
            ])
            .args(["--set", "mqtt.tls_require_client_cert=true"])
            .args(["--set", &format!("mqtt.acl_file={}", acl.display())]);
        command
    });
    let started = edge.wait_for_stderr("silt-edge started", START_TIMEOUT);
    let port: u16 = started
        .split_whitespace()
        .find_map(|field| field.strip_prefix("mqtt_tls="))
        .and_then(|addr| addr.rsplit(':').next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no mqtt_tls= in {started}"));

    assert!(publish_tls(
        port,
        &ca_file,
        Some(&sensor),
        "plant/sensor-7/temp"
    ));
    // The ACL sees the certificate's name: another user's topic is refused (5.0 PUBACK 0x87;
    // mosquitto_pub 2.0 exits 0 all the same, so the log below is what shows it).
    publish_tls(port, &ca_file, Some(&sensor), "plant/sensor-8/temp");
    assert!(
        !publish_tls(port, &ca_file, None, "plant/sensor-7/temp"),
        "no certificate"
    );
    assert!(
        !publish_tls(port, &ca_file, Some(&stranger), "plant/sensor-7/temp"),
        "wrong CA"
    );
    edge.stop_cleanly();

    let dump = Command::new(silt_edge())
        .args(["dump", "--topic", "mqtt", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let records = String::from_utf8(dump.stdout).unwrap();
    assert_eq!(records.lines().count(), 1, "{records}");
    assert!(records.contains("plant/sensor-7/temp"), "{records}");
}
