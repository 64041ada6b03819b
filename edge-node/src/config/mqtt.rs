//! The `[mqtt]` section: the broker's listeners, TLS, authentication files, ingest routes and
//! limits, raw and validated.
//!
//! Durations are integers with their unit in the key (`connect_timeout_ms`); byte counts take
//! units (`"8MiB"`) like the log's; booleans may be written as `true`/`false` strings, as env
//! vars and flags are. `[[mqtt.routes]]` can only be a list of tables; from a flag or env var
//! it is written as a TOML inline array: `--set 'mqtt.routes=[{filter="a/#", topic="a"}]'`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use silt_gateways::mqtt::route::{DEFAULT_KEY_TEMPLATE, ROUTES_MAX};
use silt_gateways::mqtt::server::Limits;
use silt_gateways::mqtt::{RouteError, RouteSpec, RouteTable};
use silt_log::PARTITIONS_MAX;

use super::{ConfigError, Scalar, toml_int};

/// Defaults of the `[mqtt]` keys that are not the broker's [`Limits`].
pub(crate) mod defaults {
    /// Partitions of a log topic the broker creates on first use: one, as Kafka's
    /// `num.partitions`. Every partition is its own fsync stream, and on one disk (an SD card
    /// above all) group commit works best when every publisher shares the same fsync: with
    /// 10 publishers, four partitions measured 30% fewer QoS 1 messages per second than one.
    /// Raise it for consumer parallelism downstream, per topic or here.
    pub(crate) const DEFAULT_PARTITIONS: u32 = 1;
    /// Bytes of records waiting for the disk, all partitions together: eight default-sized
    /// batches, a small share of a Pi's memory, and enough to keep the disk busy.
    pub(crate) const INGEST_QUEUE_BYTES: u64 = 8 << 20;
    /// Appended to the data directory's name for the broker's state directory (see
    /// [`state_dir_for`](super::state_dir_for)).
    pub(crate) const STATE_DIR_SUFFIX: &str = ".mqtt";
}

/// Largest MQTT packet the protocol can express: a 5-byte fixed header and the largest
/// remaining length (268,435,455).
const PACKET_BYTES_MAX: u64 = 268_435_460;
/// Smallest `mqtt.limits.max_packet_bytes`: room for a CONNECT with a short client id and
/// credentials; below this, clients could not even connect.
const PACKET_BYTES_MIN: u64 = 64;

/// The validated `[mqtt]` section.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MqttConfig {
    /// Plain TCP listener; `None` for none.
    pub(crate) listen: Option<SocketAddr>,
    /// TLS listener and its certificates; `None` for none.
    pub(crate) tls: Option<MqttTls>,
    /// Whether a CONNECT without credentials is accepted. Off by default: only `silt dev`
    /// turns it on.
    pub(crate) allow_anonymous: bool,
    pub(crate) password_file: Option<PathBuf>,
    pub(crate) acl_file: Option<PathBuf>,
    /// Where the broker keeps sessions and retained messages; never inside the log's data
    /// directory.
    pub(crate) state_dir: PathBuf,
    /// Partitions of a log topic created on first use.
    pub(crate) default_partitions: u32,
    /// Most bytes of records queued for the log.
    pub(crate) ingest_queue_bytes: usize,
    /// The routes as configured, for printing.
    pub(crate) routes: Vec<RouteSpec>,
    /// The same routes, compiled.
    pub(crate) route_table: RouteTable,
    pub(crate) limits: Limits,
}

impl MqttConfig {
    /// Whether any MQTT listener is configured; without one the node runs no broker.
    pub(crate) fn enabled(&self) -> bool {
        self.listen.is_some() || self.tls.is_some()
    }
}

/// The TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MqttTls {
    pub(crate) listen: SocketAddr,
    /// PEM certificate chain, leaf first.
    pub(crate) cert: PathBuf,
    /// PEM private key of the leaf certificate.
    pub(crate) key: PathBuf,
    pub(crate) client_auth: TlsClientAuth,
}

/// Whether TLS clients present certificates, and which CA signs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TlsClientAuth {
    /// No client certificates are asked for.
    None,
    /// A client may present a certificate signed by `ca`; one that does not still connects
    /// with a user name and password.
    Optional { ca: PathBuf },
    /// Every client must present a certificate signed by `ca`.
    Required { ca: PathBuf },
}

/// `[mqtt]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMqtt {
    listen: Option<String>,
    tls_listen: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    tls_client_ca: Option<String>,
    tls_require_client_cert: Option<Flag>,
    allow_anonymous: Option<Flag>,
    password_file: Option<String>,
    acl_file: Option<String>,
    state_dir: Option<String>,
    default_partitions: Option<Scalar>,
    ingest_queue_bytes: Option<Scalar>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    limits: RawLimits,
}

/// One `[[mqtt.routes]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    /// MQTT topic filter.
    filter: String,
    /// Log topic.
    topic: String,
    /// Key template; the MQTT topic name when absent.
    key: Option<String>,
}

/// `[mqtt.limits]`: one key per field of [`Limits`], durations with their unit.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_packet_bytes: Option<Scalar>,
    receive_maximum: Option<Scalar>,
    max_inflight_out: Option<Scalar>,
    max_queued_messages: Option<Scalar>,
    max_queued_bytes: Option<Scalar>,
    max_connections: Option<Scalar>,
    connect_rate_per_sec: Option<Scalar>,
    connect_timeout_ms: Option<Scalar>,
    max_keep_alive_secs: Option<Scalar>,
    max_session_expiry_secs: Option<Scalar>,
    topic_alias_maximum: Option<Scalar>,
    max_subscriptions_per_client: Option<Scalar>,
    max_retained_messages: Option<Scalar>,
}

/// What the rest of the config tells the `[mqtt]` section.
pub(super) struct Context<'a> {
    pub(super) data_dir: &'a Path,
    pub(super) admin_listen: SocketAddr,
    /// The log's largest batch: the ingest queue must hold at least one.
    pub(super) max_batch_bytes: usize,
}

impl RawMqtt {
    pub(super) fn validate(self, context: &Context<'_>) -> Result<MqttConfig, ConfigError> {
        let listen = self
            .listen
            .as_deref()
            .map(|text| socket_addr("mqtt.listen", text, "0.0.0.0:1883"))
            .transpose()?;
        let tls = self.tls(listen, context.admin_listen)?;
        if let Some(listen) = listen {
            check_distinct("mqtt.listen", listen, "admin_listen", context.admin_listen)?;
        }
        let flag = |value: Option<Flag>| value.map(|flag| flag.0).unwrap_or(false);
        let state_dir = match self.state_dir {
            Some(dir) => path("mqtt.state_dir", dir)?,
            None => state_dir_for(context.data_dir)?,
        };
        check_outside_data_dir(&state_dir, context.data_dir)?;

        let default_partitions = match &self.default_partitions {
            Some(value) => value.integer("mqtt.default_partitions", 1, PARTITIONS_MAX.into())?,
            None => defaults::DEFAULT_PARTITIONS.into(),
        };
        let queue_min = context.max_batch_bytes as u64;
        let ingest_queue_bytes = match &self.ingest_queue_bytes {
            Some(value) => value.bytes("mqtt.ingest_queue_bytes", queue_min, u32::MAX.into())?,
            None => defaults::INGEST_QUEUE_BYTES.max(queue_min),
        };
        let routes: Vec<RouteSpec> = self
            .routes
            .into_iter()
            .map(|route| RouteSpec {
                filter: route.filter,
                log_topic: route.topic,
                key: route
                    .key
                    .unwrap_or_else(|| DEFAULT_KEY_TEMPLATE.to_string()),
            })
            .collect();
        let route_table = RouteTable::new(&routes).map_err(route_error)?;
        Ok(MqttConfig {
            listen,
            tls,
            allow_anonymous: flag(self.allow_anonymous),
            password_file: self
                .password_file
                .map(|file| path("mqtt.password_file", file))
                .transpose()?,
            acl_file: self
                .acl_file
                .map(|file| path("mqtt.acl_file", file))
                .transpose()?,
            state_dir,
            default_partitions: u32::try_from(default_partitions).expect("at most PARTITIONS_MAX"),
            ingest_queue_bytes: usize::try_from(ingest_queue_bytes)
                .expect("at most u32::MAX, which fits usize on 32-bit ARM"),
            routes,
            route_table,
            limits: self.limits.validate()?,
        })
    }

    /// The TLS listener: `tls_listen` needs a certificate and key, and the other TLS keys
    /// mean nothing without it.
    fn tls(
        &self,
        listen: Option<SocketAddr>,
        admin_listen: SocketAddr,
    ) -> Result<Option<MqttTls>, ConfigError> {
        let require_client_cert = self.tls_require_client_cert.map(|flag| flag.0);
        let Some(text) = &self.tls_listen else {
            let stray = [
                ("mqtt.tls_cert", self.tls_cert.is_some()),
                ("mqtt.tls_key", self.tls_key.is_some()),
                ("mqtt.tls_client_ca", self.tls_client_ca.is_some()),
                (
                    "mqtt.tls_require_client_cert",
                    require_client_cert.is_some(),
                ),
            ];
            if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(ConfigError::key(
                    key,
                    "only valid with mqtt.tls_listen (the TLS listener's address)",
                ));
            }
            return Ok(None);
        };
        let tls_listen = socket_addr("mqtt.tls_listen", text, "0.0.0.0:8883")?;
        if let Some(listen) = listen {
            check_distinct("mqtt.tls_listen", tls_listen, "mqtt.listen", listen)?;
        }
        check_distinct("mqtt.tls_listen", tls_listen, "admin_listen", admin_listen)?;
        let required = |key: &str, value: &Option<String>| match value {
            Some(text) => path(key, text.clone()),
            None => Err(ConfigError::key(
                key,
                "required with mqtt.tls_listen: a PEM file",
            )),
        };
        let cert = required("mqtt.tls_cert", &self.tls_cert)?;
        let key = required("mqtt.tls_key", &self.tls_key)?;
        let ca = self
            .tls_client_ca
            .clone()
            .map(|file| path("mqtt.tls_client_ca", file))
            .transpose()?;
        let client_auth = match (ca, require_client_cert.unwrap_or(false)) {
            (None, false) => TlsClientAuth::None,
            (None, true) => {
                return Err(ConfigError::key(
                    "mqtt.tls_require_client_cert",
                    "needs mqtt.tls_client_ca, the PEM file of the CA that signs client \
                     certificates",
                ));
            }
            (Some(ca), false) => TlsClientAuth::Optional { ca },
            (Some(ca), true) => TlsClientAuth::Required { ca },
        };
        Ok(Some(MqttTls {
            listen: tls_listen,
            cert,
            key,
            client_auth,
        }))
    }
}

impl RawLimits {
    fn validate(self) -> Result<Limits, ConfigError> {
        let defaults = Limits::default();
        let u16_max = u64::from(u16::MAX);
        let u32_max = u64::from(u32::MAX);
        // Counts held in `usize` stay within u32 so a config means the same on 32-bit ARM.
        let get = |value: &Option<Scalar>, key: &str, min: u64, max: u64, default: u64| {
            value
                .as_ref()
                .map_or(Ok(default), |value| value.integer(key, min, max))
        };
        let as_u16 = |n: u64| u16::try_from(n).expect("range-checked");
        let as_u32 = |n: u64| u32::try_from(n).expect("range-checked");
        let as_usize = |n: u64| usize::try_from(n).expect("range-checked to u32");
        Ok(Limits {
            max_packet_bytes: as_u32(match &self.max_packet_bytes {
                Some(value) => value.bytes(
                    "mqtt.limits.max_packet_bytes",
                    PACKET_BYTES_MIN,
                    PACKET_BYTES_MAX,
                )?,
                None => defaults.max_packet_bytes.into(),
            }),
            // 0 is a protocol error for both receive maximums.
            receive_maximum: as_u16(get(
                &self.receive_maximum,
                "mqtt.limits.receive_maximum",
                1,
                u16_max,
                defaults.receive_maximum.into(),
            )?),
            max_inflight_out: as_u16(get(
                &self.max_inflight_out,
                "mqtt.limits.max_inflight_out",
                1,
                u16_max,
                defaults.max_inflight_out.into(),
            )?),
            max_queued_messages: as_usize(get(
                &self.max_queued_messages,
                "mqtt.limits.max_queued_messages",
                0,
                u32_max,
                defaults.max_queued_messages as u64,
            )?),
            max_queued_bytes: as_usize(match &self.max_queued_bytes {
                Some(value) => value.bytes("mqtt.limits.max_queued_bytes", 0, u32_max)?,
                None => defaults.max_queued_bytes as u64,
            }),
            max_connections: as_usize(get(
                &self.max_connections,
                "mqtt.limits.max_connections",
                1,
                u32_max,
                defaults.max_connections as u64,
            )?),
            connect_rate_per_sec: as_u32(get(
                &self.connect_rate_per_sec,
                "mqtt.limits.connect_rate_per_sec",
                1,
                u32_max,
                defaults.connect_rate_per_sec.into(),
            )?),
            connect_timeout: Duration::from_millis(get(
                &self.connect_timeout_ms,
                "mqtt.limits.connect_timeout_ms",
                1,
                u32_max,
                duration_ms(defaults.connect_timeout),
            )?),
            max_keep_alive_secs: as_u16(get(
                &self.max_keep_alive_secs,
                "mqtt.limits.max_keep_alive_secs",
                0,
                u16_max,
                defaults.max_keep_alive_secs.into(),
            )?),
            max_session_expiry_secs: as_u32(get(
                &self.max_session_expiry_secs,
                "mqtt.limits.max_session_expiry_secs",
                0,
                u32_max,
                defaults.max_session_expiry_secs.into(),
            )?),
            topic_alias_maximum: as_u16(get(
                &self.topic_alias_maximum,
                "mqtt.limits.topic_alias_maximum",
                0,
                u16_max,
                defaults.topic_alias_maximum.into(),
            )?),
            max_subscriptions_per_client: as_usize(get(
                &self.max_subscriptions_per_client,
                "mqtt.limits.max_subscriptions_per_client",
                1,
                u32_max,
                defaults.max_subscriptions_per_client as u64,
            )?),
            max_retained_messages: as_usize(get(
                &self.max_retained_messages,
                "mqtt.limits.max_retained_messages",
                0,
                u32_max,
                defaults.max_retained_messages as u64,
            )?),
        })
    }
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The default broker state directory: beside the data directory, named after it
/// (`/var/lib/silt` -> `/var/lib/silt.mqtt`).
///
/// Not inside it: the log owns every entry of its data directory. On open it takes any
/// directory with a valid topic name for a topic, and removes one without `topic.json` as a
/// half-created topic; any other name is refused as a foreign file. `<data_dir>/mqtt` would
/// even collide with the default route's log topic, `mqtt`.
pub(super) fn state_dir_for(data_dir: &Path) -> Result<PathBuf, ConfigError> {
    let Some(name) = data_dir.file_name() else {
        return Err(ConfigError::key(
            "mqtt.state_dir",
            format!(
                "required when data_dir ({}) has no final name to derive it from",
                data_dir.display()
            ),
        ));
    };
    let mut name = name.to_os_string();
    name.push(defaults::STATE_DIR_SUFFIX);
    Ok(data_dir.with_file_name(name))
}

fn check_outside_data_dir(state_dir: &Path, data_dir: &Path) -> Result<(), ConfigError> {
    if state_dir.starts_with(data_dir) || data_dir.starts_with(state_dir) {
        return Err(ConfigError::key(
            "mqtt.state_dir",
            format!(
                "must be outside data_dir ({}), and not contain it: the log owns every entry \
                 of its data directory; got {}",
                data_dir.display(),
                state_dir.display()
            ),
        ));
    }
    Ok(())
}

fn socket_addr(key: &str, text: &str, example: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        ConfigError::key(
            key,
            format!("expected an IP address and port such as {example}, got {text:?}"),
        )
    })
}

/// Two listeners on one fixed port would fail to bind; port 0 picks a free port each time.
fn check_distinct(
    key: &str,
    addr: SocketAddr,
    other_key: &str,
    other: SocketAddr,
) -> Result<(), ConfigError> {
    if addr == other && addr.port() != 0 {
        return Err(ConfigError::key(
            key,
            format!("{addr} is also {other_key}; each listener needs its own address"),
        ));
    }
    Ok(())
}

fn path(key: &str, text: String) -> Result<PathBuf, ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError::key(key, "must not be empty"));
    }
    Ok(PathBuf::from(text))
}

/// Names the `[[mqtt.routes]]` key at fault; indexes count from 0, as in the file's order.
fn route_error(error: RouteError) -> ConfigError {
    let key = match &error {
        RouteError::Filter { index, .. } => format!("mqtt.routes[{index}].filter"),
        RouteError::LogTopic { index, .. } => format!("mqtt.routes[{index}].topic"),
        RouteError::KeyTemplate { index, .. } => format!("mqtt.routes[{index}].key"),
        RouteError::TooMany { .. } => "mqtt.routes".to_string(),
    };
    let message = match error {
        RouteError::Filter { filter, source, .. } => {
            format!("invalid MQTT topic filter {filter:?}: {source}")
        }
        RouteError::LogTopic { source, .. } => source.to_string(),
        RouteError::KeyTemplate {
            template, source, ..
        } => format!("invalid key template {template:?}: {source}"),
        RouteError::TooMany { count } => {
            format!("{count} routes, more than the limit of {ROUTES_MAX}")
        }
    };
    ConfigError::key(&key, message)
}

/// The value of `--set mqtt.routes=...` or `SILT_MQTT__ROUTES`: a TOML inline array.
pub(super) fn parse_routes_override(value: &str) -> Result<toml::Value, ConfigError> {
    let error = || {
        ConfigError::key(
            "mqtt.routes",
            format!(
                "expected a TOML array of tables such as [{{filter = \"a/#\", topic = \"a\"}}], \
                 got {value:?}"
            ),
        )
    };
    let mut table: toml::Table =
        toml::from_str(&format!("routes = {value}")).map_err(|_| error())?;
    match table.remove("routes") {
        Some(array @ toml::Value::Array(_)) => Ok(array),
        _ => Err(error()),
    }
}

impl MqttConfig {
    /// The section as TOML that reads back to the same config.
    pub(super) fn to_toml(&self) -> toml::Table {
        let mut mqtt = toml::Table::new();
        let mut put = |key: &str, value: toml::Value| {
            mqtt.insert(key.to_string(), value);
        };
        let text = |path: &Path| toml::Value::String(path.to_string_lossy().into_owned());
        if let Some(listen) = self.listen {
            put("listen", listen.to_string().into());
        }
        if let Some(tls) = &self.tls {
            put("tls_listen", tls.listen.to_string().into());
            put("tls_cert", text(&tls.cert));
            put("tls_key", text(&tls.key));
            match &tls.client_auth {
                TlsClientAuth::None => {}
                TlsClientAuth::Optional { ca } => {
                    put("tls_client_ca", text(ca));
                    put("tls_require_client_cert", false.into());
                }
                TlsClientAuth::Required { ca } => {
                    put("tls_client_ca", text(ca));
                    put("tls_require_client_cert", true.into());
                }
            }
        }
        put("allow_anonymous", self.allow_anonymous.into());
        if let Some(file) = &self.password_file {
            put("password_file", text(file));
        }
        if let Some(file) = &self.acl_file {
            put("acl_file", text(file));
        }
        put("state_dir", text(&self.state_dir));
        put("default_partitions", toml_int(self.default_partitions));
        put("ingest_queue_bytes", toml_int(self.ingest_queue_bytes));
        let routes: Vec<toml::Value> = self
            .routes
            .iter()
            .map(|route| {
                let mut table = toml::Table::new();
                table.insert("filter".into(), route.filter.clone().into());
                table.insert("topic".into(), route.log_topic.clone().into());
                table.insert("key".into(), route.key.clone().into());
                table.into()
            })
            .collect();
        if !routes.is_empty() {
            put("routes", routes.into());
        }
        put("limits", limits_to_toml(&self.limits).into());
        mqtt
    }
}

fn limits_to_toml(limits: &Limits) -> toml::Table {
    let entries = [
        ("max_packet_bytes", toml_int(limits.max_packet_bytes)),
        ("receive_maximum", toml_int(limits.receive_maximum)),
        ("max_inflight_out", toml_int(limits.max_inflight_out)),
        ("max_queued_messages", toml_int(limits.max_queued_messages)),
        ("max_queued_bytes", toml_int(limits.max_queued_bytes)),
        ("max_connections", toml_int(limits.max_connections)),
        (
            "connect_rate_per_sec",
            toml_int(limits.connect_rate_per_sec),
        ),
        (
            "connect_timeout_ms",
            toml_int(duration_ms(limits.connect_timeout)),
        ),
        ("max_keep_alive_secs", toml_int(limits.max_keep_alive_secs)),
        (
            "max_session_expiry_secs",
            toml_int(limits.max_session_expiry_secs),
        ),
        ("topic_alias_maximum", toml_int(limits.topic_alias_maximum)),
        (
            "max_subscriptions_per_client",
            toml_int(limits.max_subscriptions_per_client),
        ),
        (
            "max_retained_messages",
            toml_int(limits.max_retained_messages),
        ),
    ];
    entries
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect()
}

/// A boolean written as a TOML boolean or as the string `true` or `false`: env vars and
/// flags are always strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flag(bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FlagVisitor;
        impl Visitor<'_> for FlagVisitor {
            type Value = Flag;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true or false")
            }
            fn visit_bool<E: de::Error>(self, value: bool) -> Result<Flag, E> {
                Ok(Flag(value))
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Flag, E> {
                match value.trim() {
                    "true" => Ok(Flag(true)),
                    "false" => Ok(Flag(false)),
                    _ => Err(E::custom(format!("expected true or false, got {value:?}"))),
                }
            }
        }
        deserializer.deserialize_any(FlagVisitor)
    }
}

#[cfg(test)]
mod tests;
