//! `silt topic create|list|describe|delete`.

use std::time::Duration;

use clap::{Args, Subcommand};
use kafka_protocol::messages::{
    CreateTopicsRequest, DeleteTopicsRequest, DescribeConfigsRequest, TopicName,
    create_topics_request::{CreatableTopic, CreatableTopicConfig},
    describe_configs_request::DescribeConfigsResource,
};
use kafka_protocol::protocol::StrBytes;

use super::{Common, KafkaError, connect};
use crate::kafka::{Cluster, EARLIEST, LATEST};

const CREATE_TOPICS_VERSION: i16 = 5;
/// DeleteTopics v6 names topics by id or name in a new list.
const DELETE_TOPICS_VERSION: i16 = 5;
const DESCRIBE_CONFIGS_VERSION: i16 = 4;
/// DescribeConfigs' resource type for topics.
const TOPIC_RESOURCE: i8 = 2;
/// How long the broker may take to create or delete a topic.
const ADMIN_TIMEOUT_MS: i32 = 30_000;

#[derive(Debug, Subcommand)]
pub(crate) enum TopicCommand {
    /// Create a topic.
    Create(CreateArgs),
    /// List topic names, one per line.
    List(Common),
    /// Show a topic's partitions (leader, replicas, offsets) and its non-default configs.
    Describe(NamedArgs),
    /// Delete a topic and all its data.
    Delete(NamedArgs),
}

#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long)]
    topic: String,
    /// Partition count; the broker's default when absent.
    #[arg(long)]
    partitions: Option<u32>,
    /// Replication factor; the broker's default when absent.
    #[arg(long)]
    replication_factor: Option<u16>,
    /// A topic config as `key=value` (Kafka's names, e.g. `retention.ms=86400000`); repeatable.
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_config)]
    configs: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub(crate) struct NamedArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long)]
    topic: String,
}

fn parse_config(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

pub(crate) async fn run(command: TopicCommand) -> Result<(), KafkaError> {
    match command {
        TopicCommand::Create(args) => create(args).await,
        TopicCommand::List(common) => list(common).await,
        TopicCommand::Describe(args) => describe(args).await,
        TopicCommand::Delete(args) => delete(args).await,
    }
}

async fn create(args: CreateArgs) -> Result<(), KafkaError> {
    let mut cluster = connect(&args.common).await?;
    let partitions = match args.partitions {
        Some(0) => {
            return Err(KafkaError::Unsupported(
                "--partitions must be at least 1".into(),
            ));
        }
        Some(count) => i32::try_from(count)
            .map_err(|_| KafkaError::Unsupported("--partitions is too large".into()))?,
        None => -1,
    };
    let replication = args.replication_factor.map_or(-1, |rf| rf as i16);
    create_topic(
        &mut cluster,
        &args.topic,
        partitions,
        replication,
        &args.configs,
    )
    .await?;
    let topic = cluster.topic(&args.topic, false).await?;
    eprintln!(
        "silt: created topic {:?} with {} partition(s)",
        args.topic,
        topic.partitions.len()
    );
    Ok(())
}

/// Creates `name` with `partitions` (-1: the broker's default) and `configs`; the error of a
/// topic that exists is TOPIC_ALREADY_EXISTS (36).
pub(crate) async fn create_topic(
    cluster: &mut Cluster,
    name: &str,
    partitions: i32,
    replication: i16,
    configs: &[(String, String)],
) -> Result<(), KafkaError> {
    let topic = CreatableTopic::default()
        .with_name(TopicName(StrBytes::from_string(name.to_string())))
        .with_num_partitions(partitions)
        .with_replication_factor(replication)
        .with_configs(
            configs
                .iter()
                .map(|(key, value)| {
                    CreatableTopicConfig::default()
                        .with_name(StrBytes::from_string(key.clone()))
                        .with_value(Some(StrBytes::from_string(value.clone())))
                })
                .collect(),
        );
    let request = CreateTopicsRequest::default()
        .with_topics(vec![topic])
        .with_timeout_ms(ADMIN_TIMEOUT_MS);
    let (response, _) = controller(cluster)
        .await?
        .call(
            &request,
            CREATE_TOPICS_VERSION,
            Duration::from_millis(ADMIN_TIMEOUT_MS as u64),
        )
        .await?;
    for result in &response.topics {
        if result.error_code != 0 {
            let message = result
                .error_message
                .as_ref()
                .map(|m| format!(" ({})", m.as_str()));
            return Err(KafkaError::from_code(
                result.error_code,
                format!("creating topic {name:?}{}", message.unwrap_or_default()),
            ));
        }
    }
    Ok(())
}

async fn list(common: Common) -> Result<(), KafkaError> {
    let mut cluster = connect(&common).await?;
    let mut names: Vec<String> = cluster
        .metadata(None, false)
        .await?
        .into_iter()
        .filter(|topic| !topic.is_internal)
        .map(|topic| topic.name)
        .collect();
    names.sort();
    for name in names {
        println!("{name}");
    }
    Ok(())
}

async fn describe(args: NamedArgs) -> Result<(), KafkaError> {
    let mut cluster = connect(&args.common).await?;
    let topic = cluster.topic(&args.topic, false).await?;
    let ids: Vec<i32> = topic.partitions.iter().map(|p| p.partition).collect();
    let earliest = cluster.list_offsets(&topic, &ids, EARLIEST).await?;
    let latest = cluster.list_offsets(&topic, &ids, LATEST).await?;
    let request = DescribeConfigsRequest::default().with_resources(vec![
        DescribeConfigsResource::default()
            .with_resource_type(TOPIC_RESOURCE)
            .with_resource_name(StrBytes::from_string(args.topic.clone()))
            .with_configuration_keys(None),
    ]);
    let (configs, _) = cluster
        .any()
        .await?
        .call(&request, DESCRIBE_CONFIGS_VERSION, Duration::ZERO)
        .await?;
    println!(
        "Topic: {}\tPartitionCount: {}",
        topic.name,
        topic.partitions.len()
    );
    for result in &configs.results {
        KafkaError::check(result.error_code, || {
            format!("describing configs of {:?}", args.topic)
        })?;
        let mut entries: Vec<(String, String)> = result
            .configs
            .iter()
            .map(|config| {
                (
                    config.name.as_str().to_string(),
                    config
                        .value
                        .as_ref()
                        .map_or("null".to_string(), |v| v.as_str().to_string()),
                )
            })
            .collect();
        entries.sort();
        let configs: Vec<String> = entries.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("Configs: {}", configs.join(","));
    }
    for partition in &topic.partitions {
        let list = |ids: &[i32]| ids.iter().map(i32::to_string).collect::<Vec<_>>().join(",");
        let offset = |map: &std::collections::HashMap<i32, Option<i64>>| {
            map.get(&partition.partition)
                .copied()
                .flatten()
                .map_or("-".to_string(), |o| o.to_string())
        };
        println!(
            "\tPartition: {}\tLeader: {}\tLeaderEpoch: {}\tReplicas: {}\tIsr: {}\tLogStartOffset: {}\tHighWatermark: {}",
            partition.partition,
            partition.leader,
            partition.leader_epoch,
            list(&partition.replicas),
            list(&partition.isr),
            offset(&earliest),
            offset(&latest),
        );
    }
    Ok(())
}

async fn delete(args: NamedArgs) -> Result<(), KafkaError> {
    let mut cluster = connect(&args.common).await?;
    let request = DeleteTopicsRequest::default()
        .with_topic_names(vec![TopicName(StrBytes::from_string(args.topic.clone()))])
        .with_timeout_ms(ADMIN_TIMEOUT_MS);
    let (response, _) = controller(&mut cluster)
        .await?
        .call(
            &request,
            DELETE_TOPICS_VERSION,
            Duration::from_millis(ADMIN_TIMEOUT_MS as u64),
        )
        .await?;
    for result in &response.responses {
        KafkaError::check(result.error_code, || {
            format!("deleting topic {:?}", args.topic)
        })?;
    }
    eprintln!("silt: deleted topic {:?}", args.topic);
    Ok(())
}

/// The connection admin requests go to: the controller Metadata names, else any broker.
async fn controller(cluster: &mut Cluster) -> Result<&mut crate::kafka::Connection, KafkaError> {
    let controller = cluster.controller().await?;
    match controller {
        Some(node) if node >= 0 => cluster.broker(node).await,
        _ => cluster.any().await,
    }
}
