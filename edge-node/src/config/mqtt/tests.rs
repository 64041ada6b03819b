//! Tests of the `[mqtt]` section: defaults, every key, validation errors that name the key,
//! overrides, and printing.

use std::path::PathBuf;
use std::time::Duration;

use silt_gateways::mqtt::RouteSpec;
use silt_gateways::mqtt::server::Limits;

use super::super::{EdgeConfig, Override, Sources};
use super::{MqttTls, TlsClientAuth, defaults};

fn file(text: &str) -> Sources {
    Sources {
        file: Some((PathBuf::from("/etc/silt/edge.toml"), text.to_string())),
        overrides: Vec::new(),
        hostname: None,
    }
}

fn resolve(text: &str) -> EdgeConfig {
    EdgeConfig::resolve(&file(&format!("data_dir = \"/var/lib/silt\"\n{text}"))).unwrap()
}

fn error(text: &str) -> String {
    EdgeConfig::resolve(&file(&format!("data_dir = \"/var/lib/silt\"\n{text}")))
        .unwrap_err()
        .to_string()
}

#[test]
fn defaults_run_no_broker() {
    let config = resolve("");
    let mqtt = &config.mqtt;
    assert!(!mqtt.enabled());
    assert_eq!(mqtt.listen, None);
    assert_eq!(mqtt.tls, None);
    assert!(
        !mqtt.allow_anonymous,
        "anonymous access is off unless asked for"
    );
    assert_eq!(mqtt.password_file, None);
    assert_eq!(mqtt.acl_file, None);
    assert_eq!(mqtt.state_dir, PathBuf::from("/var/lib/silt.mqtt"));
    assert_eq!(mqtt.default_partitions, defaults::DEFAULT_PARTITIONS);
    assert_eq!(mqtt.ingest_queue_bytes, 8 << 20);
    assert!(mqtt.routes.is_empty());
    assert_eq!(mqtt.route_table.routes().len(), 0);
    assert_eq!(mqtt.limits, Limits::default());
    assert_eq!(config.retention_check, Duration::from_secs(30));
}

#[test]
fn parses_every_key() {
    let config = resolve(
        r##"
        [log]
        retention_check_ms = 200
        [mqtt]
        listen = "0.0.0.0:1883"
        tls_listen = "0.0.0.0:8883"
        tls_cert = "/etc/silt/mqtt.crt"
        tls_key = "/etc/silt/mqtt.key"
        tls_client_ca = "/etc/silt/clients.crt"
        tls_require_client_cert = true
        allow_anonymous = true
        password_file = "/etc/silt/mqtt.passwd"
        acl_file = "/etc/silt/mqtt.acl"
        state_dir = "/srv/mqtt-state"
        default_partitions = 8
        ingest_queue_bytes = "16MiB"
        [[mqtt.routes]]
        filter = "sensors/+/temp"
        topic = "temperatures"
        key = "{level:1}"
        [[mqtt.routes]]
        filter = "#"
        topic = "everything"
        [mqtt.limits]
        max_packet_bytes = "256KiB"
        receive_maximum = 10
        max_inflight_out = 20
        max_queued_messages = 30
        max_queued_bytes = "1MiB"
        max_connections = 40
        connect_rate_per_sec = 50
        connect_timeout_ms = 2500
        max_keep_alive_secs = 60
        max_session_expiry_secs = 3600
        topic_alias_maximum = 0
        max_subscriptions_per_client = 70
        max_retained_messages = 80
        "##,
    );
    assert_eq!(config.retention_check, Duration::from_millis(200));
    let mqtt = &config.mqtt;
    assert!(mqtt.enabled());
    assert_eq!(mqtt.listen, Some("0.0.0.0:1883".parse().unwrap()));
    assert_eq!(
        mqtt.tls,
        Some(MqttTls {
            listen: "0.0.0.0:8883".parse().unwrap(),
            cert: "/etc/silt/mqtt.crt".into(),
            key: "/etc/silt/mqtt.key".into(),
            client_auth: TlsClientAuth::Required {
                ca: "/etc/silt/clients.crt".into()
            },
        })
    );
    assert!(mqtt.allow_anonymous);
    assert_eq!(mqtt.password_file, Some("/etc/silt/mqtt.passwd".into()));
    assert_eq!(mqtt.acl_file, Some("/etc/silt/mqtt.acl".into()));
    assert_eq!(mqtt.state_dir, PathBuf::from("/srv/mqtt-state"));
    assert_eq!(mqtt.default_partitions, 8);
    assert_eq!(mqtt.ingest_queue_bytes, 16 << 20);
    assert_eq!(
        mqtt.routes,
        [
            RouteSpec {
                filter: "sensors/+/temp".into(),
                log_topic: "temperatures".into(),
                key: "{level:1}".into(),
            },
            RouteSpec {
                filter: "#".into(),
                log_topic: "everything".into(),
                key: "{topic}".into(),
            },
        ]
    );
    assert_eq!(mqtt.route_table.routes()[0].log_topic(), "temperatures");
    assert_eq!(
        mqtt.limits,
        Limits {
            max_packet_bytes: 256 << 10,
            receive_maximum: 10,
            max_inflight_out: 20,
            max_queued_messages: 30,
            max_queued_bytes: 1 << 20,
            max_connections: 40,
            connect_rate_per_sec: 50,
            connect_timeout: Duration::from_millis(2500),
            max_keep_alive_secs: 60,
            max_session_expiry_secs: 3600,
            topic_alias_maximum: 0,
            max_subscriptions_per_client: 70,
            max_retained_messages: 80,
        }
    );
}

#[test]
fn client_ca_alone_makes_client_certificates_optional() {
    let config = resolve(
        "[mqtt]\ntls_listen = \"127.0.0.1:8883\"\ntls_cert = \"c\"\ntls_key = \"k\"\ntls_client_ca = \"ca\"",
    );
    let tls = config.mqtt.tls.clone().unwrap();
    assert_eq!(tls.client_auth, TlsClientAuth::Optional { ca: "ca".into() });
    assert!(config.mqtt.listen.is_none());
    assert!(
        config.mqtt.enabled(),
        "a TLS listener alone runs the broker"
    );
}

#[test]
fn bad_values_name_the_key() {
    let tls = "tls_listen = \"0.0.0.0:8883\"\ntls_cert = \"c\"\ntls_key = \"k\"\n";
    let cases: Vec<(String, &str)> = vec![
        (
            "[mqtt]\nlisten = \"localhost:1883\"".into(),
            "config key mqtt.listen: expected an IP address and port such as 0.0.0.0:1883",
        ),
        (
            "[mqtt]\ntls_listen = \"0.0.0.0:8883\"\ntls_key = \"k\"".into(),
            "config key mqtt.tls_cert: required with mqtt.tls_listen",
        ),
        (
            "[mqtt]\ntls_listen = \"0.0.0.0:8883\"\ntls_cert = \"c\"".into(),
            "config key mqtt.tls_key: required with mqtt.tls_listen",
        ),
        (
            "[mqtt]\ntls_cert = \"c\"".into(),
            "config key mqtt.tls_cert: only valid with mqtt.tls_listen",
        ),
        (
            "[mqtt]\ntls_require_client_cert = false".into(),
            "config key mqtt.tls_require_client_cert: only valid with mqtt.tls_listen",
        ),
        (
            format!("[mqtt]\n{tls}tls_require_client_cert = true"),
            "config key mqtt.tls_require_client_cert: needs mqtt.tls_client_ca",
        ),
        (
            format!("[mqtt]\n{tls}listen = \"0.0.0.0:8883\""),
            "config key mqtt.tls_listen: 0.0.0.0:8883 is also mqtt.listen",
        ),
        (
            "[mqtt]\nlisten = \"127.0.0.1:9644\"".into(),
            "config key mqtt.listen: 127.0.0.1:9644 is also admin_listen",
        ),
        (
            "[mqtt]\nallow_anonymous = \"yes\"".into(),
            "config key mqtt.allow_anonymous: expected true or false, got \"yes\"",
        ),
        (
            "[mqtt]\npassword_file = \"\"".into(),
            "config key mqtt.password_file: must not be empty",
        ),
        (
            "[mqtt]\nstate_dir = \"/var/lib/silt/mqtt\"".into(),
            "config key mqtt.state_dir: must be outside data_dir (/var/lib/silt)",
        ),
        (
            "[mqtt]\nstate_dir = \"/var\"".into(),
            "config key mqtt.state_dir: must be outside data_dir",
        ),
        (
            "[mqtt]\ndefault_partitions = 0".into(),
            "config key mqtt.default_partitions: must be between 1 and 10000, got 0",
        ),
        (
            "[mqtt]\ningest_queue_bytes = \"64KiB\"".into(),
            "config key mqtt.ingest_queue_bytes: must be between 1048588 and 4294967295",
        ),
        (
            "[[mqtt.routes]]\nfilter = \"a/#\"\ntopic = \"a\"\n\
             [[mqtt.routes]]\nfilter = \"b\"\ntopic = \"b\"\n\
             [[mqtt.routes]]\nfilter = \"c\"\ntopic = \"c\"\nkey = \"{nope}\""
                .into(),
            "config key mqtt.routes[2].key: invalid key template \"{nope}\": unknown placeholder",
        ),
        (
            "[[mqtt.routes]]\nfilter = \"a/#/b\"\ntopic = \"a\"".into(),
            "config key mqtt.routes[0].filter: invalid MQTT topic filter \"a/#/b\"",
        ),
        (
            "[[mqtt.routes]]\nfilter = \"a\"\ntopic = \"bad topic\"".into(),
            "config key mqtt.routes[0].topic: invalid topic name \"bad topic\"",
        ),
        (
            "[[mqtt.routes]]\ntopic = \"a\"".into(),
            "config key mqtt.routes[0]: missing field `filter`",
        ),
        (
            "[[mqtt.routes]]\nfilter = \"a\"\ntopic = \"a\"\nlog_topic = \"b\"".into(),
            "config key mqtt.routes[0].log_topic: unknown field `log_topic`",
        ),
        (
            "[mqtt.limits]\nmax_packet_bytes = 10".into(),
            "config key mqtt.limits.max_packet_bytes: must be between 64 and 268435460, got 10",
        ),
        (
            "[mqtt.limits]\nreceive_maximum = 0".into(),
            "config key mqtt.limits.receive_maximum: must be between 1 and 65535, got 0",
        ),
        (
            "[mqtt.limits]\ntopic_alias_maximum = 70000".into(),
            "config key mqtt.limits.topic_alias_maximum: must be between 0 and 65535",
        ),
        (
            "[mqtt.limits]\nconnect_timeout_ms = \"soon\"".into(),
            "config key mqtt.limits.connect_timeout_ms: expected a non-negative integer",
        ),
        (
            "[mqtt.limits]\nconnect_timeout = 5".into(),
            "config key mqtt.limits.connect_timeout: unknown field",
        ),
        (
            "[log]\nretention_check_ms = 0".into(),
            "config key log.retention_check_ms: must be between 1 and 4294967295, got 0",
        ),
    ];
    for (text, expected) in cases {
        let message = error(&text);
        assert!(message.starts_with(expected), "{text}:\n{message}");
    }
}

#[test]
fn a_data_dir_with_no_name_needs_an_explicit_state_dir() {
    let sources = Sources {
        file: None,
        overrides: vec![Override {
            key: "data_dir".into(),
            value: "/".into(),
            origin: "--data-dir".into(),
        }],
        hostname: None,
    };
    let message = EdgeConfig::resolve(&sources).unwrap_err().to_string();
    assert!(
        message.starts_with("config key mqtt.state_dir: required when data_dir (/)"),
        "{message}"
    );
}

#[test]
fn overrides_reach_nested_keys_and_routes() {
    let mut sources = file(
        "data_dir = \"/d\"\n[mqtt]\nlisten = \"0.0.0.0:1883\"\n[mqtt.limits]\nmax_connections = 5",
    );
    let set = |key: &str, value: &str, origin: &str| Override {
        key: key.into(),
        value: value.into(),
        origin: origin.into(),
    };
    sources.overrides = vec![
        set(
            "mqtt.limits.max_connections",
            "6",
            "SILT_MQTT__LIMITS__MAX_CONNECTIONS",
        ),
        set("mqtt.allow_anonymous", "true", "--set mqtt.allow_anonymous"),
        set(
            "mqtt.routes",
            "[{filter = \"a/#\", topic = \"a\", key = \"{client_id}\"}]",
            "--set mqtt.routes",
        ),
        set("mqtt.listen", "127.0.0.1:0", "--mqtt-listen"),
    ];
    let config = EdgeConfig::resolve(&sources).unwrap();
    assert_eq!(config.mqtt.limits.max_connections, 6);
    assert!(config.mqtt.allow_anonymous);
    assert_eq!(config.mqtt.listen, Some("127.0.0.1:0".parse().unwrap()));
    assert_eq!(config.mqtt.routes[0].key, "{client_id}");

    sources.overrides = vec![set("mqtt.routes", "a/#", "--set mqtt.routes")];
    let message = EdgeConfig::resolve(&sources).unwrap_err().to_string();
    assert!(
        message.starts_with("config key mqtt.routes: expected a TOML array of tables"),
        "{message}"
    );
    assert!(message.ends_with("(from --set mqtt.routes)"), "{message}");

    // An error inside an overridden value names the override as its origin.
    sources.overrides = vec![set(
        "mqtt.routes",
        "[{filter = \"a\", topic = \"a\", key = \"{x}\"}]",
        "SILT_MQTT__ROUTES",
    )];
    let message = EdgeConfig::resolve(&sources).unwrap_err().to_string();
    assert!(
        message.starts_with("config key mqtt.routes[0].key:"),
        "{message}"
    );
    assert!(message.ends_with("(from SILT_MQTT__ROUTES)"), "{message}");

    sources.overrides = vec![set("mqtt.listen.port", "1", "--set")];
    let message = EdgeConfig::resolve(&sources).unwrap_err().to_string();
    assert!(
        message.starts_with("config key mqtt.listen: expected a table"),
        "{message}"
    );
}

#[test]
fn printed_mqtt_section_reads_back_the_same() {
    let config = resolve(
        r#"
        [log]
        retention_check_ms = 250
        [mqtt]
        listen = "127.0.0.1:1883"
        tls_listen = "127.0.0.1:8883"
        tls_cert = "c.pem"
        tls_key = "k.pem"
        tls_client_ca = "ca.pem"
        password_file = "p"
        [[mqtt.routes]]
        filter = "a/+"
        topic = "a"
        key = "{level:1}"
        [mqtt.limits]
        connect_timeout_ms = 1234
        "#,
    );
    let printed = config.to_toml();
    let reread = EdgeConfig::resolve(&file(&printed)).unwrap();
    assert_eq!(reread, config, "{printed}");
    for line in [
        "[mqtt]",
        "listen = \"127.0.0.1:1883\"",
        "allow_anonymous = false",
        "state_dir = \"/var/lib/silt.mqtt\"",
        "[[mqtt.routes]]",
        "key = \"{level:1}\"",
        "[mqtt.limits]",
        "connect_timeout_ms = 1234",
        "max_packet_bytes = 1048576",
        "retention_check_ms = 250",
    ] {
        assert!(printed.contains(line), "{line} in:\n{printed}");
    }

    let plain = resolve("");
    let printed = plain.to_toml();
    assert!(!printed.contains("listen = \"0"), "{printed}");
    assert_eq!(EdgeConfig::resolve(&file(&printed)).unwrap(), plain);
}
