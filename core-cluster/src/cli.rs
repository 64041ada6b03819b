//! The command line and the `SILT_*` environment, turned into config [`Sources`].
//!
//! Every key of the config file can be set three ways, lowest precedence first:
//! - in the file (`--config FILE`, or `SILT_CONFIG`);
//! - by env var: `SILT_NODE_ID`, `SILT_DATA_DIR`, `SILT_ADMIN_LISTEN`, `SILT_OBJECT_STORE` for
//!   the top-level keys, and `SILT_<SECTION>__<KEY>` for keys inside a section, as
//!   `SILT_KAFKA__DEFAULT_PARTITIONS` for `kafka.default_partitions`; in `[topic_defaults]`,
//!   whose keys are Kafka's dotted names, `_` stands for `.`:
//!   `SILT_TOPIC_DEFAULTS__RETENTION_MS` is `topic_defaults.retention.ms`;
//! - by flag: `--node-id`, `--data-dir`, `--admin-listen`, `--object-store`, `--kafka-listen`,
//!   `--uplink-listen`, and `--set KEY=VALUE` for any key by its dotted path, as
//!   `--set kafka.default_partitions=3`. The named flags are applied after `--set`.
//!
//! It mirrors `silt-edge`'s command line, so both nodes are configured the same way.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};

use crate::config::{self, ConfigError, Override, Sources};

/// Silt core node: serves the Kafka protocol to consumers and producers, receives the edges'
/// uplinks, and keeps the core log.
#[derive(Debug, Parser)]
#[command(name = "silt-core", version, after_help = ENV_HELP, arg_required_else_help = true)]
pub(crate) struct Cli {
    /// Config file (TOML).
    #[arg(long, value_name = "FILE", env = "SILT_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Data directory: where the log lives [config key: data_dir].
    #[arg(long, value_name = "DIR", env = "SILT_DATA_DIR")]
    pub(crate) data_dir: Option<String>,
    /// This node's broker id, an integer; default 1 [config key: node_id].
    #[arg(long, value_name = "N", env = "SILT_NODE_ID")]
    pub(crate) node_id: Option<String>,
    /// Admin (metrics, health) listen address [config key: admin_listen].
    #[arg(long, value_name = "ADDR", env = "SILT_ADMIN_LISTEN")]
    pub(crate) admin_listen: Option<String>,
    /// Object store URL for the cold tier, e.g. file:///var/lib/silt-archive or
    /// s3://bucket/prefix [config key: object_store].
    #[arg(long, value_name = "URL", env = "SILT_OBJECT_STORE")]
    pub(crate) object_store: Option<String>,
    /// Kafka protocol listen address, e.g. 0.0.0.0:9092 [config key: kafka.listen; env:
    /// SILT_KAFKA__LISTEN].
    #[arg(long, value_name = "ADDR")]
    pub(crate) kafka_listen: Option<String>,
    /// Uplink (QUIC, UDP) listen address [config key: uplink.listen; env: SILT_UPLINK__LISTEN].
    #[arg(long, value_name = "ADDR")]
    pub(crate) uplink_listen: Option<String>,
    /// Override any config key by its dotted path, e.g. `--set kafka.default_partitions=3` or
    /// `--set topic_defaults.retention.ms=86400000`. Repeatable; later ones win.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub(crate) set: Vec<(String, String)>,
    /// Validate the config, print it fully resolved as TOML, and exit.
    #[arg(long)]
    pub(crate) check_config: bool,
}

const ENV_HELP: &str = "\
Every config key is also read from the environment, below flags and above the file:
SILT_NODE_ID, SILT_DATA_DIR, SILT_ADMIN_LISTEN and SILT_OBJECT_STORE for the top-level keys,
and SILT_<SECTION>__<KEY> for keys in a section, e.g. SILT_KAFKA__LISTEN=0.0.0.0:9092,
SILT_KAFKA__DEFAULT_PARTITIONS=3 or SILT_TOPIC_DEFAULTS__RETENTION_MS=86400000 (in
topic_defaults, '_' stands for '.').

Other commands:
  silt-core issue-cert --data-dir DIR --edge-id ID --out DIR
      Sign a client certificate for an edge with the core's uplink CA (mutual TLS).";

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
            (
                "object_store",
                &self.object_store,
                "--object-store",
                "SILT_OBJECT_STORE",
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
        // These have no env var of their own: SILT_KAFKA__LISTEN is the section form.
        let sectioned = [
            ("kafka.listen", &self.kafka_listen, "--kafka-listen"),
            ("uplink.listen", &self.uplink_listen, "--uplink-listen"),
        ];
        for (key, value, flag) in sectioned {
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
    use crate::config::CoreConfig;

    fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        vars.iter()
            .map(|(name, value)| (OsString::from(name), OsString::from(value)))
            .collect()
    }

    fn resolve(args: &[&str], vars: &[(&str, &str)]) -> Result<CoreConfig, ConfigError> {
        let matches = Cli::command()
            .try_get_matches_from(std::iter::once("silt-core").chain(args.iter().copied()))
            .unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();
        CoreConfig::resolve(&cli.sources(&matches, env(vars))?)
    }

    #[test]
    fn flags_win_over_env_which_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core.toml");
        std::fs::write(
            &path,
            "data_dir = \"/file\"\n[kafka]\nlisten = \"127.0.0.1:1001\"\ndefault_partitions = 2\n",
        )
        .unwrap();
        let path = path.to_str().unwrap();
        let config = resolve(&["--config", path], &[]).unwrap();
        assert_eq!(config.kafka.listen, "127.0.0.1:1001".parse().unwrap());
        assert_eq!(config.kafka.default_partitions, 2);

        let vars = [
            ("SILT_KAFKA__LISTEN", "127.0.0.1:1002"),
            ("SILT_KAFKA__DEFAULT_PARTITIONS", "3"),
            ("SILT_UPLINK__LISTEN", "127.0.0.1:1003"),
            ("SILT_TOPIC_DEFAULTS__RETENTION_MS", "1000"),
        ];
        let config = resolve(&["--config", path], &vars).unwrap();
        assert_eq!(config.kafka.listen, "127.0.0.1:1002".parse().unwrap());
        assert_eq!(config.kafka.default_partitions, 3);
        assert_eq!(config.uplink.listen, "127.0.0.1:1003".parse().unwrap());
        assert_eq!(config.log.topic_defaults.retention_ms, Some(1000));

        let config = resolve(
            &[
                "--config",
                path,
                "--kafka-listen",
                "127.0.0.1:1004",
                "--set",
                "kafka.listen=127.0.0.1:1005",
                "--uplink-listen",
                "127.0.0.1:1006",
                "--node-id",
                "9",
                "--data-dir",
                "/flag",
                "--object-store",
                "file:///archive",
            ],
            &vars,
        )
        .unwrap();
        assert_eq!(
            config.kafka.listen,
            "127.0.0.1:1004".parse().unwrap(),
            "--kafka-listen is applied after --set"
        );
        assert_eq!(config.uplink.listen, "127.0.0.1:1006".parse().unwrap());
        assert_eq!(config.node_id, 9);
        assert_eq!(config.log.data_dir, PathBuf::from("/flag"));
        assert_eq!(config.object_store.unwrap().url, "file:///archive");
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let message = resolve(
            &["--data-dir", "/d"],
            &[("SILT_KAFKA__DEFAULT_PARTITIONS", "many")],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            message,
            "config key kafka.default_partitions: expected a non-negative integer, got \"many\" \
             (from SILT_KAFKA__DEFAULT_PARTITIONS)"
        );
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
