//! `silt group list|describe|reset-offsets`.

use std::collections::BTreeMap;

use clap::{Args, Subcommand};

use super::{Common, KafkaError, connect, time::parse_rfc3339};
use crate::kafka::group;
use crate::kafka::{EARLIEST, LATEST};

#[derive(Debug, Subcommand)]
pub(crate) enum GroupCommand {
    /// List consumer groups with their state.
    List(Common),
    /// Show a group's members, and for each partition it has committed: the committed offset,
    /// the log end offset and the lag.
    Describe(DescribeArgs),
    /// Move a group's committed offsets for a topic. Prints the plan; `--execute` applies it.
    /// The group must have no active members.
    ResetOffsets(ResetArgs),
}

#[derive(Debug, Args)]
pub(crate) struct DescribeArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long)]
    group: String,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("to").required(true)))]
pub(crate) struct ResetArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long)]
    group: String,
    #[arg(long)]
    topic: String,
    #[arg(long, group = "to")]
    to_earliest: bool,
    #[arg(long, group = "to")]
    to_latest: bool,
    #[arg(long, group = "to", value_name = "OFFSET")]
    to_offset: Option<i64>,
    /// The first offset at or after this RFC 3339 time.
    #[arg(long, group = "to", value_name = "TIME", value_parser = parse_rfc3339)]
    to_datetime: Option<i64>,
    /// Apply the plan (without it, only print it).
    #[arg(long)]
    execute: bool,
}

pub(crate) async fn run(command: GroupCommand) -> Result<(), KafkaError> {
    match command {
        GroupCommand::List(common) => {
            let mut cluster = connect(&common).await?;
            for listing in group::list(&mut cluster).await? {
                let state = if listing.state.is_empty() {
                    "-"
                } else {
                    &listing.state
                };
                println!("{}\t{}", listing.group, state);
            }
            Ok(())
        }
        GroupCommand::Describe(args) => describe(args).await,
        GroupCommand::ResetOffsets(args) => reset(args).await,
    }
}

async fn describe(args: DescribeArgs) -> Result<(), KafkaError> {
    let mut cluster = connect(&args.common).await?;
    let coordinator = cluster.coordinator(&args.group).await?;
    let described = group::describe(&mut cluster, coordinator, &args.group).await?;
    let Some(info) = described.groups.first() else {
        return Err(KafkaError::Protocol(
            "DescribeGroups returned no group".into(),
        ));
    };
    KafkaError::check(info.error_code, || {
        format!("describing group {:?}", args.group)
    })?;
    println!(
        "Group: {}\tState: {}\tProtocol: {}",
        args.group,
        info.group_state.as_str(),
        if info.protocol_data.is_empty() {
            "-"
        } else {
            info.protocol_data.as_str()
        }
    );
    // Which member owns each (topic, partition), from the assignments.
    let mut owners: BTreeMap<(String, i32), String> = BTreeMap::new();
    for member in &info.members {
        let assignment = group::decode_versioned::<
            kafka_protocol::messages::ConsumerProtocolAssignment,
        >(&member.member_assignment)
        .ok()
        .flatten();
        let mut owned = Vec::new();
        for assigned in assignment.iter().flat_map(|a| a.assigned_partitions.iter()) {
            let topic = assigned.topic.0.as_str().to_string();
            for &partition in &assigned.partitions {
                owners.insert(
                    (topic.clone(), partition),
                    member.member_id.as_str().to_string(),
                );
                owned.push(format!("{topic}[{partition}]"));
            }
        }
        println!(
            "Member: {}\tClient: {}\tHost: {}\tAssignment: {}",
            member.member_id.as_str(),
            member.client_id.as_str(),
            member.client_host.as_str(),
            if owned.is_empty() {
                "-".to_string()
            } else {
                owned.join(",")
            }
        );
    }
    let committed = group::committed_all(&mut cluster, coordinator, &args.group).await?;
    println!("TOPIC\tPARTITION\tCURRENT-OFFSET\tLOG-END-OFFSET\tLAG\tCONSUMER-ID");
    let mut by_topic: BTreeMap<String, Vec<(i32, i64)>> = BTreeMap::new();
    for (topic, partition, offset) in committed {
        by_topic.entry(topic).or_default().push((partition, offset));
    }
    for (topic, partitions) in by_topic {
        let meta = cluster.topic(&topic, false).await?;
        let ids: Vec<i32> = partitions.iter().map(|(p, _)| *p).collect();
        let ends = cluster.list_offsets(&meta, &ids, LATEST).await?;
        for (partition, offset) in partitions {
            let end = ends.get(&partition).copied().flatten();
            let owner = owners
                .get(&(topic.clone(), partition))
                .map_or("-", String::as_str);
            println!(
                "{topic}\t{partition}\t{offset}\t{}\t{}\t{owner}",
                end.map_or("-".to_string(), |e| e.to_string()),
                end.map_or("-".to_string(), |e| (e - offset).max(0).to_string()),
            );
        }
    }
    Ok(())
}

async fn reset(args: ResetArgs) -> Result<(), KafkaError> {
    let mut cluster = connect(&args.common).await?;
    let coordinator = cluster.coordinator(&args.group).await?;
    let described = group::describe(&mut cluster, coordinator, &args.group).await?;
    if let Some(info) = described.groups.first() {
        KafkaError::check(info.error_code, || {
            format!("describing group {:?}", args.group)
        })?;
        let state = info.group_state.as_str();
        if !info.members.is_empty() || !matches!(state, "Empty" | "Dead" | "") {
            return Err(KafkaError::Unsupported(format!(
                "group {:?} is {state} with {} active member(s); stop its consumers before resetting offsets",
                args.group,
                info.members.len()
            )));
        }
    }
    let topic = cluster.topic(&args.topic, false).await?;
    let partitions: Vec<i32> = topic.partitions.iter().map(|p| p.partition).collect();
    let earliest = cluster.list_offsets(&topic, &partitions, EARLIEST).await?;
    let latest = cluster.list_offsets(&topic, &partitions, LATEST).await?;
    let target: BTreeMap<i32, i64> = if let Some(time) = args.to_datetime {
        let found = cluster.list_offsets(&topic, &partitions, time).await?;
        partitions
            .iter()
            .map(|p| (*p, found[p].or(latest[p]).unwrap_or(0)))
            .collect()
    } else {
        partitions
            .iter()
            .map(|p| {
                let (low, high) = (earliest[p].unwrap_or(0), latest[p].unwrap_or(0));
                let offset = if args.to_earliest {
                    low
                } else if args.to_latest {
                    high
                } else {
                    // Kafka clamps an explicit offset into the log's range.
                    args.to_offset.unwrap_or(0).clamp(low, high)
                };
                (*p, offset)
            })
            .collect()
    };
    println!("TOPIC\tPARTITION\tNEW-OFFSET");
    for (partition, offset) in &target {
        println!("{}\t{partition}\t{offset}", args.topic);
    }
    if args.execute {
        group::commit_offsets(
            &mut cluster,
            coordinator,
            &args.group,
            &args.topic,
            -1,
            "",
            &target,
        )
        .await?;
        eprintln!(
            "silt: reset the offsets of group {:?} for topic {:?}",
            args.group, args.topic
        );
    } else {
        eprintln!("silt: dry run; add --execute to apply");
    }
    Ok(())
}
