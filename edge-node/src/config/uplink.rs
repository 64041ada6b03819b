//! The `[uplink]` section: where the edge ships its log, how it trusts the core, and the
//! uplink's limits. No `uplink.addr` means no uplink: the node keeps its log locally only.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Compression, ConfigError, Scalar, put_compression, toml_int};

/// Defaults of the `[uplink]` keys.
pub(crate) mod defaults {
    /// Bytes of batches shipped but not yet acknowledged, per partition: enough to fill a
    /// long fat link (8 MiB at 100 ms RTT is 80 MB/s), a small share of a Pi's memory.
    pub(crate) const INFLIGHT_BYTES: u64 = 8 << 20;
    /// Most uncompressed batch bytes in one `Data` frame.
    pub(crate) const FRAME_BYTES: u64 = 1 << 20;
    /// Appended to the data directory's name for the uplink's cursor directory.
    pub(crate) const STATE_DIR_SUFFIX: &str = ".uplink";
}

/// The validated `[uplink]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UplinkConfig {
    /// The core's uplink address, `host:port`, resolved on every connection attempt.
    pub(crate) addr: String,
    /// The CA (PEM) the core's certificate must chain to.
    pub(crate) ca: PathBuf,
    /// The name the core's certificate must carry; defaults to the host part of `addr`.
    pub(crate) server_name: String,
    /// Client certificate and key for mutual TLS.
    pub(crate) client_cert: Option<(PathBuf, PathBuf)>,
    pub(crate) inflight_bytes: u64,
    pub(crate) frame_bytes: u64,
    /// zstd per frame (`uplink.compression`, default level 1), applied to frames whose
    /// batches are mostly stored uncompressed.
    pub(crate) compression: Compression,
    /// Where the per-partition cursors live; never inside the log's data directory.
    pub(crate) state_dir: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUplink {
    addr: Option<String>,
    ca: Option<String>,
    server_name: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    inflight_bytes: Option<Scalar>,
    frame_bytes: Option<Scalar>,
    compression: Option<String>,
    compression_level: Option<Scalar>,
    state_dir: Option<String>,
}

impl RawUplink {
    pub(super) fn validate(self, data_dir: &Path) -> Result<Option<UplinkConfig>, ConfigError> {
        let Some(addr) = self.addr.filter(|addr| !addr.trim().is_empty()) else {
            return Ok(None);
        };
        let host = match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            _ => {
                return Err(ConfigError::key(
                    "uplink.addr",
                    format!("expected host:port such as core.example.com:7100, got {addr:?}"),
                ));
            }
        };
        let ca = match self.ca {
            Some(ca) if !ca.trim().is_empty() => PathBuf::from(ca),
            _ => {
                return Err(ConfigError::key(
                    "uplink.ca",
                    "required with uplink.addr: the CA file (PEM) of the core's certificate, \
                     e.g. <core data dir>/tls/ca.pem",
                ));
            }
        };
        let client_cert = match (self.cert, self.key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
            (Some(_), None) => {
                return Err(ConfigError::key("uplink.key", "required with uplink.cert"));
            }
            (None, Some(_)) => {
                return Err(ConfigError::key("uplink.cert", "required with uplink.key"));
            }
        };
        let inflight_bytes = match &self.inflight_bytes {
            Some(value) => value.bytes("uplink.inflight_bytes", 1024, 1 << 30)?,
            None => defaults::INFLIGHT_BYTES,
        };
        let frame_bytes = match &self.frame_bytes {
            Some(value) => value.bytes(
                "uplink.frame_bytes",
                1024,
                silt_wire::DATA_RAW_BYTES_MAX as u64,
            )?,
            None => defaults::FRAME_BYTES,
        };
        let compression = Compression::parse(
            "uplink",
            self.compression.as_deref(),
            self.compression_level.as_ref(),
        )?;
        let state_dir = match self.state_dir {
            Some(dir) => PathBuf::from(dir),
            None => {
                let Some(name) = data_dir.file_name() else {
                    return Err(ConfigError::key(
                        "uplink.state_dir",
                        "required when data_dir has no final name to derive it from",
                    ));
                };
                let mut name = name.to_os_string();
                name.push(defaults::STATE_DIR_SUFFIX);
                data_dir.with_file_name(name)
            }
        };
        if state_dir.starts_with(data_dir) || data_dir.starts_with(&state_dir) {
            return Err(ConfigError::key(
                "uplink.state_dir",
                format!(
                    "must be outside data_dir ({}), and not contain it: the log owns every \
                     entry of its data directory; got {}",
                    data_dir.display(),
                    state_dir.display()
                ),
            ));
        }
        Ok(Some(UplinkConfig {
            addr,
            ca,
            server_name: self.server_name.unwrap_or(host),
            client_cert,
            inflight_bytes,
            frame_bytes,
            compression,
            state_dir,
        }))
    }
}

/// The section as TOML that validates back to the same config.
pub(super) fn to_toml(config: Option<&UplinkConfig>) -> toml::Table {
    let mut table = toml::Table::new();
    let Some(config) = config else {
        return table;
    };
    table.insert("addr".into(), config.addr.clone().into());
    table.insert("ca".into(), config.ca.to_string_lossy().into_owned().into());
    table.insert("server_name".into(), config.server_name.clone().into());
    if let Some((cert, key)) = &config.client_cert {
        table.insert("cert".into(), cert.to_string_lossy().into_owned().into());
        table.insert("key".into(), key.to_string_lossy().into_owned().into());
    }
    table.insert("inflight_bytes".into(), toml_int(config.inflight_bytes));
    table.insert("frame_bytes".into(), toml_int(config.frame_bytes));
    put_compression(&mut table, config.compression);
    table.insert(
        "state_dir".into(),
        config.state_dir.to_string_lossy().into_owned().into(),
    );
    table
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::config::{EdgeConfig, Sources};

    fn resolve(text: &str) -> Result<EdgeConfig, String> {
        EdgeConfig::resolve(&Sources {
            file: Some((PathBuf::from("/etc/silt/edge.toml"), text.to_string())),
            overrides: Vec::new(),
            hostname: Some("pi-7".into()),
        })
        .map_err(|error| error.to_string())
    }

    #[test]
    fn off_without_an_address_and_defaults_with_one() {
        assert_eq!(resolve("data_dir = \"/d/log\"").unwrap().uplink, None);
        let config = resolve(
            "data_dir = \"/d/log\"\n[uplink]\naddr = \"core.example:7100\"\nca = \"/d/ca.pem\"",
        )
        .unwrap();
        let uplink = config.uplink.clone().unwrap();
        assert_eq!(uplink.server_name, "core.example");
        assert_eq!(uplink.state_dir, PathBuf::from("/d/log.uplink"));
        assert_eq!(uplink.inflight_bytes, super::defaults::INFLIGHT_BYTES);
        assert_eq!(uplink.client_cert, None);
        assert_eq!(
            uplink.compression,
            crate::config::Compression::Zstd {
                level: silt_wire::ZSTD_LEVEL
            }
        );
        // The printed config reads back the same.
        let printed = config.to_toml();
        assert_eq!(resolve(&printed).unwrap(), config);
    }

    #[test]
    fn a_zstd_level_is_kept_and_printed() {
        for (section, expected) in [
            (
                "compression_level = -5",
                crate::config::Compression::Zstd { level: -5 },
            ),
            (
                "compression = \"zstd\"\ncompression_level = 19",
                crate::config::Compression::Zstd { level: 19 },
            ),
            ("compression = \"none\"", crate::config::Compression::None),
        ] {
            let config = resolve(&format!(
                "data_dir = \"/d/log\"\n[uplink]\naddr = \"h:1\"\nca = \"/c\"\n{section}"
            ))
            .unwrap();
            assert_eq!(config.uplink.as_ref().unwrap().compression, expected);
            assert_eq!(resolve(&config.to_toml()).unwrap(), config, "{section}");
        }
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("addr = \"nohost\"\nca = \"/c\"", "config key uplink.addr"),
            ("addr = \"h:1\"", "config key uplink.ca"),
            (
                "addr = \"h:1\"\nca = \"/c\"\ncert = \"/x\"",
                "config key uplink.key",
            ),
            (
                "addr = \"h:1\"\nca = \"/c\"\nstate_dir = \"/d/log/s\"",
                "config key uplink.state_dir",
            ),
            (
                "addr = \"h:1\"\nca = \"/c\"\nframe_bytes = \"1GiB\"",
                "config key uplink.frame_bytes",
            ),
            (
                "addr = \"h:1\"\nca = \"/c\"\ncompression = \"lz4\"",
                "config key uplink.compression",
            ),
            (
                "addr = \"h:1\"\nca = \"/c\"\ncompression_level = 20",
                "config key uplink.compression_level",
            ),
            (
                "addr = \"h:1\"\nca = \"/c\"\ncompression_level = -8",
                "config key uplink.compression_level",
            ),
            (
                "addr = \"h:1\"\nca = \"/c\"\ncompression_level = 4294967297",
                "config key uplink.compression_level",
            ),
            (
                "addr = \"h:1\"\nca = \"/c\"\ncompression = \"none\"\ncompression_level = 3",
                "config key uplink.compression_level",
            ),
            ("adr = \"h:1\"", "config key uplink.adr"),
        ];
        for (section, expected) in cases {
            let message =
                resolve(&format!("data_dir = \"/d/log\"\n[uplink]\n{section}")).unwrap_err();
            assert!(message.starts_with(expected), "{section}: {message}");
        }
    }
}
