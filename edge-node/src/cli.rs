//! The command line and the `SILT_*` environment, turned into config [`Sources`].
//!
//! Every key of the config file can be set three ways, lowest precedence first:
//! - in the file (`--config FILE`, or `SILT_CONFIG`);
//! - by env var: `SILT_NODE_ID`, `SILT_DATA_DIR`, `SILT_ADMIN_LISTEN` for the top-level keys,
//!   and `SILT_<SECTION>__<KEY>` for keys inside a section, as `SILT_LOG__BUDGET_BYTES` for
//!   `log.budget_bytes`, with `__` between nested tables too: `SILT_MQTT__LIMITS__MAX_PACKET_BYTES`
//!   is `mqtt.limits.max_packet_bytes`; in `[topic_defaults]`, whose keys are Kafka's dotted
//!   names, `_` stands for `.`: `SILT_TOPIC_DEFAULTS__SEGMENT_BYTES` is
//!   `topic_defaults.segment.bytes`;
//! - by flag: `--node-id`, `--data-dir`, `--admin-listen`, `--mqtt-listen`, and
//!   `--set KEY=VALUE` for any key by its dotted path, as `--set log.budget_bytes=1000000`.
//!   The named flags are applied after `--set`.
//!
//! `silt-edge dump` is a subcommand with flags of its own; it reads a data directory and does
//! not take the node's config.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{self, ConfigError, Override, Sources};

/// Silt edge node: takes events in over MQTT and QUIC, keeps them in a durable local log and
/// forwards them to a core cluster.
#[derive(Debug, Parser)]
#[command(
    name = "silt-edge",
    version,
    after_help = ENV_HELP,
    args_conflicts_with_subcommands = true
)]
pub(crate) struct Cli {
    /// Without a command, runs the node.
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
    /// Config file (TOML).
    #[arg(long, value_name = "FILE", env = "SILT_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Data directory: where the log lives [config key: data_dir].
    #[arg(long, value_name = "DIR", env = "SILT_DATA_DIR")]
    pub(crate) data_dir: Option<String>,
    /// This node's id; defaults to the hostname [config key: node_id].
    #[arg(long, value_name = "ID", env = "SILT_NODE_ID")]
    pub(crate) node_id: Option<String>,
    /// Admin (metrics, health) listen address [config key: admin_listen].
    #[arg(long, value_name = "ADDR", env = "SILT_ADMIN_LISTEN")]
    pub(crate) admin_listen: Option<String>,
    /// MQTT (plain TCP) listen address, e.g. 0.0.0.0:1883; without it (or mqtt.tls_listen)
    /// the node runs no broker [config key: mqtt.listen; env: SILT_MQTT__LISTEN].
    #[arg(long, value_name = "ADDR")]
    pub(crate) mqtt_listen: Option<String>,
    /// The core's uplink address, host:port; without it the node ships nothing
    /// [config key: uplink.addr; env: SILT_UPLINK__ADDR].
    #[arg(long, value_name = "ADDR")]
    pub(crate) uplink: Option<String>,
    /// CA certificate (PEM) the core's uplink certificate must chain to, e.g. the core's
    /// `<data-dir>/tls/ca.pem` [config key: uplink.ca].
    #[arg(long, value_name = "FILE")]
    pub(crate) uplink_ca: Option<String>,
    /// Name the core's certificate must carry; defaults to the host of --uplink
    /// [config key: uplink.server_name].
    #[arg(long, value_name = "NAME")]
    pub(crate) uplink_server_name: Option<String>,
    /// Client certificate (PEM) for mutual TLS, e.g. from `silt-core issue-cert`
    /// [config key: uplink.cert].
    #[arg(long, value_name = "FILE")]
    pub(crate) uplink_cert: Option<String>,
    /// The client certificate's private key [config key: uplink.key].
    #[arg(long, value_name = "FILE")]
    pub(crate) uplink_key: Option<String>,
    /// Override any config key by its dotted path, e.g. `--set log.budget_bytes=2GiB` or
    /// `--set topic_defaults.retention.ms=86400000`. Repeatable; later ones win.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub(crate) set: Vec<(String, String)>,
    /// Validate the config, print it fully resolved as TOML, and exit.
    #[arg(long)]
    pub(crate) check_config: bool,
}

/// What to do instead of running the node.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Print every record of a stopped node's data directory as JSON lines.
    Dump(DumpArgs),
    /// Add a user to an MQTT password file, or change its password (mosquitto_passwd format).
    Passwd(PasswdArgs),
}

/// Flags of `silt-edge passwd`.
#[derive(Debug, Args)]
pub(crate) struct PasswdArgs {
    /// The password file (`mqtt.password_file`); created if missing.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
    /// The user name.
    #[arg(value_name = "USER")]
    pub(crate) username: String,
    /// Remove the user instead.
    #[arg(long, short = 'D')]
    pub(crate) delete: bool,
}

/// Flags of `silt-edge dump`.
#[derive(Debug, Args)]
#[command(after_long_help = DUMP_HELP)]
pub(crate) struct DumpArgs {
    /// Data directory to read; the node that owns it must be stopped.
    #[arg(long, value_name = "DIR", env = "SILT_DATA_DIR")]
    pub(crate) data_dir: PathBuf,
    /// Print only this topic.
    #[arg(long, value_name = "TOPIC")]
    pub(crate) topic: Option<String>,
    /// Print only this partition of --topic.
    #[arg(long, value_name = "PARTITION", requires = "topic")]
    pub(crate) partition: Option<u32>,
}

const DUMP_HELP: &str = "\
Output: one JSON object per record, one per line, topics in name order, partitions in number
order, records in offset order from the log start:

  {\"topic\":\"t\",\"partition\":0,\"offset\":7,\"timestamp\":1700000000000,\"key\":\"k\",
   \"value\":{\"base64\":\"/wA=\"},\"headers\":[[\"h\",\"x\"],[\"h\",null]]}

- timestamp: the record's timestamp, in milliseconds since the Unix epoch.
- key, value and header values: a JSON string when the bytes are valid UTF-8, else an object
  {\"base64\": \"...\"} (standard alphabet, padded); null when null.
- headers: [key, value] pairs in the record's order, repeated keys kept.
- Transaction control batches are not records and are skipped.

The node must be stopped: dump opens the data directory as the node does, and fails while a
node holds it. After an unclean stop, dump first runs the recovery the node would run at its
next start (a torn tail is truncated); it closes the directory cleanly when done.

Exit status: 0 when every record was printed, or when stdout was closed early (as by | head);
1 when the data directory cannot be opened or read (missing, in use by a running node,
corrupt); 2 for bad usage, including a --topic or --partition that does not exist.";

const ENV_HELP: &str = "\
Every config key is also read from the environment, below flags and above the file:
SILT_NODE_ID, SILT_DATA_DIR and SILT_ADMIN_LISTEN for the top-level keys, and
SILT_<SECTION>__<KEY> for keys in a section, e.g. SILT_LOG__BUDGET_BYTES=2GiB,
SILT_MQTT__LISTEN=0.0.0.0:1883, SILT_MQTT__LIMITS__MAX_CONNECTIONS=500 or
SILT_TOPIC_DEFAULTS__RETENTION_MS=86400000 (in topic_defaults, '_' stands for '.').";

/// Prefix of every env var the edge reads.
const ENV_PREFIX: &str = "SILT_";
/// Separates the section from the key in `SILT_<SECTION>__<KEY>`.
const ENV_SECTION_SEPARATOR: &str = "__";

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.to_string()))
        }
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

impl Cli {
    /// Parses the process's arguments, exiting with clap's message and code 2 if they are bad.
    pub(crate) fn parse_args() -> (Cli, ArgMatches) {
        let matches = Cli::command().get_matches();
        let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
        (cli, matches)
    }

    /// Gathers the file, env vars and flags into [`Sources`], in precedence order.
    pub(crate) fn sources(
        &self,
        matches: &ArgMatches,
        env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Sources, ConfigError> {
        let file = self.config.as_deref().map(config::read_file).transpose()?;
        let mut env_overrides = Vec::new();
        let mut flag_overrides: Vec<Override> = self
            .set
            .iter()
            .map(|(key, value)| Override {
                key: key.clone(),
                value: value.clone(),
                origin: format!("--set {key}"),
            })
            .collect();
        // clap reads these from the flag or, failing that, the env var; which one decides
        // their precedence against `--set` and `SILT_<SECTION>__<KEY>`.
        let named = [
            ("data_dir", &self.data_dir, "--data-dir", "SILT_DATA_DIR"),
            ("node_id", &self.node_id, "--node-id", "SILT_NODE_ID"),
            (
                "admin_listen",
                &self.admin_listen,
                "--admin-listen",
                "SILT_ADMIN_LISTEN",
            ),
        ];
        for (key, value, flag, var) in named {
            let Some(value) = value else { continue };
            let from_env = matches.value_source(key) == Some(ValueSource::EnvVariable);
            let (list, origin) = if from_env {
                (&mut env_overrides, var)
            } else {
                (&mut flag_overrides, flag)
            };
            list.push(Override {
                key: key.to_string(),
                value: value.clone(),
                origin: origin.to_string(),
            });
        }
        // `--mqtt-listen` has no env var of its own: SILT_MQTT__LISTEN is the section form.
        if let Some(listen) = &self.mqtt_listen {
            flag_overrides.push(Override {
                key: "mqtt.listen".to_string(),
                value: listen.clone(),
                origin: "--mqtt-listen".to_string(),
            });
        }
        let uplink_flags = [
            (&self.uplink, "uplink.addr", "--uplink"),
            (&self.uplink_ca, "uplink.ca", "--uplink-ca"),
            (
                &self.uplink_server_name,
                "uplink.server_name",
                "--uplink-server-name",
            ),
            (&self.uplink_cert, "uplink.cert", "--uplink-cert"),
            (&self.uplink_key, "uplink.key", "--uplink-key"),
        ];
        for (value, key, flag) in uplink_flags {
            if let Some(value) = value {
                flag_overrides.push(Override {
                    key: key.to_string(),
                    value: value.clone(),
                    origin: flag.to_string(),
                });
            }
        }
        env_overrides.extend(section_env_overrides(env)?);
        env_overrides.extend(flag_overrides);
        Ok(Sources {
            file,
            overrides: env_overrides,
            hostname: config::hostname(),
        })
    }
}

/// The `SILT_<SECTION>__<KEY>` overrides in `env`, sorted by name so the result does not
/// depend on the environment's order.
fn section_env_overrides(
    env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<Vec<Override>, ConfigError> {
    let mut overrides = Vec::new();
    for (name, value) in env {
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let Some((section, key)) = rest.split_once(ENV_SECTION_SEPARATOR) else {
            continue;
        };
        let section = section.to_ascii_lowercase();
        let mut key = key.to_ascii_lowercase();
        if section == "topic_defaults" {
            key = key.replace('_', ".");
        } else {
            key = key.replace(ENV_SECTION_SEPARATOR, ".");
        }
        let key = format!("{section}.{key}");
        let value = value.into_string().map_err(|_| ConfigError {
            key: Some(key.clone()),
            message: "value is not valid UTF-8".to_string(),
            origin: Some(name.to_string()),
        })?;
        overrides.push(Override {
            key,
            value,
            origin: name.to_string(),
        });
    }
    overrides.sort_by(|a, b| a.origin.cmp(&b.origin));
    Ok(overrides)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EdgeConfig;

    fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        vars.iter()
            .map(|(name, value)| (OsString::from(name), OsString::from(value)))
            .collect()
    }

    fn resolve(args: &[&str], vars: &[(&str, &str)]) -> Result<EdgeConfig, ConfigError> {
        let matches = Cli::command()
            .try_get_matches_from(std::iter::once("silt-edge").chain(args.iter().copied()))
            .unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();
        EdgeConfig::resolve(&cli.sources(&matches, env(vars))?)
    }

    #[test]
    fn section_env_vars_map_to_dotted_keys() {
        let overrides = section_env_overrides(env(&[
            ("SILT_TOPIC_DEFAULTS__SEGMENT_BYTES", "4096"),
            ("SILT_LOG__BUDGET_BYTES", "2GiB"),
            ("SILT_MQTT__LIMITS__MAX_PACKET_BYTES", "4096"),
            ("SILT_NODE_ID", "not-a-section-key"),
            ("SILT_BATCHCAT", "/usr/bin/true"),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        let keys: Vec<_> = overrides
            .iter()
            .map(|o| (o.key.as_str(), o.value.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("log.budget_bytes", "2GiB"),
                ("mqtt.limits.max_packet_bytes", "4096"),
                ("topic_defaults.segment.bytes", "4096")
            ]
        );
    }

    #[test]
    fn flags_win_over_env_which_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        std::fs::write(
            &path,
            "data_dir = \"/file\"\n[log]\nbudget_bytes = 1\nfs_reserve_bytes = 2\n",
        )
        .unwrap();
        let path = path.to_str().unwrap();

        let config = resolve(&["--config", path], &[]).unwrap();
        assert_eq!(config.log.budget.unwrap().bytes_max, 1);

        let vars = [
            ("SILT_LOG__BUDGET_BYTES", "10"),
            ("SILT_LOG__FS_RESERVE_BYTES", "20"),
        ];
        let config = resolve(&["--config", path], &vars).unwrap();
        assert_eq!(config.log.budget.unwrap().bytes_max, 10);
        assert_eq!(config.log.fs_reserve_bytes, 20);

        let config = resolve(
            &[
                "--config",
                path,
                "--set",
                "log.budget_bytes=100",
                "--data-dir",
                "/flag",
            ],
            &vars,
        )
        .unwrap();
        assert_eq!(config.log.budget.unwrap().bytes_max, 100);
        assert_eq!(config.log.fs_reserve_bytes, 20);
        assert_eq!(config.log.data_dir, PathBuf::from("/flag"));

        // The named flag is applied after `--set`.
        let config = resolve(&["--set", "data_dir=/set", "--data-dir", "/flag"], &[]).unwrap();
        assert_eq!(config.log.data_dir, PathBuf::from("/flag"));
    }

    #[test]
    fn mqtt_keys_come_from_the_file_env_and_flags_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        std::fs::write(
            &path,
            "data_dir = \"/d\"\n[mqtt]\nlisten = \"127.0.0.1:1001\"\n[mqtt.limits]\nmax_connections = 1\n",
        )
        .unwrap();
        let path = path.to_str().unwrap();
        let config = resolve(&["--config", path], &[]).unwrap();
        assert_eq!(config.mqtt.listen, Some("127.0.0.1:1001".parse().unwrap()));

        let vars = [
            ("SILT_MQTT__LISTEN", "127.0.0.1:1002"),
            ("SILT_MQTT__LIMITS__MAX_CONNECTIONS", "2"),
            ("SILT_MQTT__ALLOW_ANONYMOUS", "true"),
            ("SILT_LOG__RETENTION_CHECK_MS", "200"),
        ];
        let config = resolve(&["--config", path], &vars).unwrap();
        assert_eq!(config.mqtt.listen, Some("127.0.0.1:1002".parse().unwrap()));
        assert_eq!(config.mqtt.limits.max_connections, 2);
        assert!(config.mqtt.allow_anonymous);
        assert_eq!(
            config.retention_check,
            std::time::Duration::from_millis(200)
        );

        let config = resolve(
            &[
                "--config",
                path,
                "--mqtt-listen",
                "127.0.0.1:1003",
                "--set",
                "mqtt.listen=127.0.0.1:1004",
                "--set",
                "mqtt.limits.max_connections=3",
            ],
            &vars,
        )
        .unwrap();
        assert_eq!(
            config.mqtt.listen,
            Some("127.0.0.1:1003".parse().unwrap()),
            "--mqtt-listen is applied after --set"
        );
        assert_eq!(config.mqtt.limits.max_connections, 3);

        let message = resolve(&["--data-dir", "/d", "--mqtt-listen", "nowhere"], &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "config key mqtt.listen: expected an IP address and port such as 0.0.0.0:1883, \
             got \"nowhere\" (from --mqtt-listen)"
        );
        let message = resolve(
            &["--data-dir", "/d"],
            &[("SILT_MQTT__LIMITS__RECEIVE_MAXIMUM", "0")],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            message,
            "config key mqtt.limits.receive_maximum: must be between 1 and 65535, got 0 \
             (from SILT_MQTT__LIMITS__RECEIVE_MAXIMUM)"
        );
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let message = resolve(&["--data-dir", "/d"], &[("SILT_LOG__BUDGET_POLICY", "foo")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "config key log.budget_policy: expected reject or drop-oldest, got \"foo\" \
             (from SILT_LOG__BUDGET_POLICY)"
        );
    }

    #[test]
    fn set_needs_key_and_value() {
        let result = Cli::command().try_get_matches_from(["silt-edge", "--set", "novalue"]);
        assert!(
            result
                .unwrap_err()
                .to_string()
                .contains("expected KEY=VALUE")
        );
        assert_eq!(parse_key_value("a.b=c=d"), Ok(("a.b".into(), "c=d".into())));
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
