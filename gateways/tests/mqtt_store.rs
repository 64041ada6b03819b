//! The MQTT broker's durable state store against real files: every op survives a reopen, a
//! torn or corrupt tail is cut off at the last good entry, compaction keeps the state, limits
//! are enforced, a model agrees with the store under random ops and reopens, and a process
//! killed with SIGKILL keeps everything it synced.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use silt_gateways::mqtt::store::{
    JOURNAL_FILE_NAME, JOURNAL_HEADER_BYTES, Op, Store, StoreError, StoreLimits, StoreState,
    StoredMessage, StoredProperties, StoredQos2, StoredSession, StoredSubscription, StoredWill,
    StoredWillFiring, TailFault,
};

fn open(dir: &Path) -> Store {
    Store::open(dir, StoreLimits::default()).unwrap()
}

fn journal(dir: &Path) -> PathBuf {
    dir.join(JOURNAL_FILE_NAME)
}

fn file_len(dir: &Path) -> u64 {
    fs::metadata(journal(dir)).unwrap().len()
}

fn message(topic: &str, payload: &[u8]) -> StoredMessage {
    StoredMessage {
        topic: topic.to_owned(),
        payload: Bytes::copy_from_slice(payload),
        qos: 1,
        retain: false,
        published_at_ms: 1_700_000_000_000,
        expiry_interval_secs: Some(3600),
        properties: StoredProperties {
            payload_format_utf8: Some(true),
            content_type: Some("application/json".to_owned()),
            response_topic: Some("reply/here".to_owned()),
            correlation_data: Some(Bytes::from_static(b"\x00corr\xff")),
            user_properties: vec![
                ("site".to_owned(), "north".to_owned()),
                ("site".to_owned(), "".to_owned()),
            ],
        },
        subscription_ids: Vec::new(),
    }
}

fn will(topic: &str, token: u64) -> StoredWill {
    StoredWill {
        message: StoredMessage {
            published_at_ms: 0,
            ..message(topic, b"gone")
        },
        delay_secs: 30,
        token,
        firing: None,
    }
}

fn subscription(filter: &str, qos: u8) -> StoredSubscription {
    StoredSubscription {
        filter: filter.to_owned(),
        qos,
        no_local: true,
        retain_as_published: false,
        retain_handling: 2,
        subscription_id: Some(7),
    }
}

fn open_op(client_id: &str) -> Op {
    Op::SessionOpen {
        client_id: client_id.to_owned(),
        protocol_level: 5,
        expiry_secs: 3600,
    }
}

fn enqueue(client_id: &str, seq: u64, payload: &[u8]) -> Op {
    Op::Enqueue {
        client_id: client_id.to_owned(),
        seq,
        message: message("sensors/1", payload),
    }
}

/// A simple model of the store's semantics, written independently of it.
fn model_apply(state: &mut StoreState, op: &Op) {
    match op {
        Op::SessionOpen {
            client_id,
            protocol_level,
            expiry_secs,
        } => {
            let session =
                state
                    .sessions
                    .entry(client_id.clone())
                    .or_insert_with(|| StoredSession {
                        client_id: client_id.clone(),
                        protocol_level: *protocol_level,
                        expiry_secs: *expiry_secs,
                        disconnected_at_ms: None,
                        subscriptions: Vec::new(),
                        queue: BTreeMap::new(),
                        qos2: BTreeMap::new(),
                        will: None,
                    });
            session.protocol_level = *protocol_level;
            session.expiry_secs = *expiry_secs;
            session.disconnected_at_ms = None;
        }
        Op::SessionClosed { client_id, at_ms } => {
            if let Some(session) = state.sessions.get_mut(client_id) {
                session.disconnected_at_ms = Some(*at_ms);
            }
        }
        Op::SessionRemove { client_id } => {
            state.sessions.remove(client_id);
        }
        Op::Subscribe {
            client_id,
            subscription,
        } => {
            if let Some(session) = state.sessions.get_mut(client_id) {
                let subscriptions = &mut session.subscriptions;
                match subscriptions
                    .iter()
                    .position(|s| s.filter == subscription.filter)
                {
                    Some(i) => subscriptions[i] = subscription.clone(),
                    None => subscriptions.push(subscription.clone()),
                }
            }
        }
        Op::Unsubscribe { client_id, filter } => {
            if let Some(session) = state.sessions.get_mut(client_id) {
                session.subscriptions.retain(|s| &s.filter != filter);
            }
        }
        Op::Enqueue {
            client_id,
            seq,
            message,
        } => {
            if let Some(session) = state.sessions.get_mut(client_id) {
                session.queue.insert(*seq, message.clone());
            }
        }
        Op::Dequeue { client_id, seq } => {
            if let Some(session) = state.sessions.get_mut(client_id) {
                session.queue.remove(seq);
            }
        }
        Op::Retain { message } => {
            let mut message = message.clone();
            message.subscription_ids.clear();
            state.retained.insert(message.topic.clone(), message);
        }
        Op::ClearRetained { topic } => {
            state.retained.remove(topic);
        }
        Op::Qos2Set {
            client_id,
            packet_id,
            state: qos2,
        } => {
            if let Some(session) = state.sessions.get_mut(client_id) {
                session.qos2.insert(*packet_id, qos2.clone());
            }
        }
        Op::Qos2Release {
            client_id,
            packet_id,
        } => {
            if let Some(session) = state.sessions.get_mut(client_id) {
                session.qos2.remove(packet_id);
            }
        }
        Op::WillSet { client_id, will } => {
            if let Some(session) = state.sessions.get_mut(client_id) {
                session.will = Some(will.clone());
            }
        }
        Op::WillFiring {
            client_id,
            token,
            firing,
        } => {
            if let Some(session) = state.sessions.get_mut(client_id)
                && let Some(will) = &mut session.will
                && will.token == *token
            {
                will.firing = Some(firing.clone());
            }
        }
        Op::WillClear { client_id, token } => {
            if let Some(session) = state.sessions.get_mut(client_id)
                && session
                    .will
                    .as_ref()
                    .is_some_and(|will| token.is_none_or(|token| token == will.token))
            {
                session.will = None;
            }
        }
    }
}

fn model_of(ops: &[Op]) -> StoreState {
    let mut state = StoreState::default();
    for op in ops {
        model_apply(&mut state, op);
    }
    state
}

/// Ops of every kind, each with a visible effect.
fn every_op() -> Vec<Op> {
    vec![
        open_op("alpha"),
        open_op("beta"),
        Op::Subscribe {
            client_id: "alpha".to_owned(),
            subscription: subscription("sensors/+", 1),
        },
        Op::Subscribe {
            client_id: "alpha".to_owned(),
            subscription: subscription("$share/g/sensors/#", 2),
        },
        Op::Subscribe {
            client_id: "alpha".to_owned(),
            subscription: subscription("other", 0),
        },
        // Re-subscribing replaces in place.
        Op::Subscribe {
            client_id: "alpha".to_owned(),
            subscription: StoredSubscription {
                subscription_id: None,
                ..subscription("sensors/+", 2)
            },
        },
        Op::Unsubscribe {
            client_id: "alpha".to_owned(),
            filter: "other".to_owned(),
        },
        enqueue("alpha", 1, b"one"),
        enqueue("alpha", 2, b"two"),
        enqueue("alpha", 3, &[0xff; 300]),
        Op::Dequeue {
            client_id: "alpha".to_owned(),
            seq: 2,
        },
        Op::SessionClosed {
            client_id: "alpha".to_owned(),
            at_ms: 42,
        },
        enqueue("beta", 9, b"beta's"),
        Op::SessionRemove {
            client_id: "beta".to_owned(),
        },
        Op::Retain {
            message: StoredMessage {
                retain: true,
                properties: StoredProperties::default(),
                expiry_interval_secs: None,
                ..message("status/a", b"on")
            },
        },
        Op::Retain {
            message: message("status/b", b"off"),
        },
        Op::Retain {
            message: message("status/c", b""),
        },
        Op::ClearRetained {
            topic: "status/c".to_owned(),
        },
        Op::Qos2Set {
            client_id: "alpha".to_owned(),
            packet_id: 7,
            state: StoredQos2::Intent {
                log_topic: "mqtt".to_owned(),
                partition: 3,
                from_offset: 1 << 40,
                token: u64::MAX - 1,
            },
        },
        Op::Qos2Set {
            client_id: "alpha".to_owned(),
            packet_id: 8,
            state: StoredQos2::Intent {
                log_topic: "mqtt".to_owned(),
                partition: 0,
                from_offset: 5,
                token: 1,
            },
        },
        // Setting again replaces.
        Op::Qos2Set {
            client_id: "alpha".to_owned(),
            packet_id: 8,
            state: StoredQos2::Received,
        },
        Op::Qos2Set {
            client_id: "alpha".to_owned(),
            packet_id: 65535,
            state: StoredQos2::Received,
        },
        Op::Qos2Release {
            client_id: "alpha".to_owned(),
            packet_id: 65535,
        },
        // A copy with subscription ids (kind 15).
        Op::Enqueue {
            client_id: "alpha".to_owned(),
            seq: 4,
            message: StoredMessage {
                subscription_ids: vec![7, 268_435_455],
                ..message("sensors/2", b"four")
            },
        },
        Op::WillSet {
            client_id: "alpha".to_owned(),
            will: will("wills/alpha", 11),
        },
        // Marks the will as firing.
        Op::WillFiring {
            client_id: "alpha".to_owned(),
            token: 11,
            firing: StoredWillFiring {
                log_topic: "mqtt".to_owned(),
                partition: 1,
                from_offset: 99,
            },
        },
    ]
}

#[test]
fn every_op_round_trips_through_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ops = every_op();
    let mut store = open(dir.path());
    assert!(store.recovery().created);
    store.apply(&ops).unwrap();
    let expected = model_of(&ops);
    assert_eq!(store.state(), &expected);

    // Spot checks that do not rely on the model.
    let alpha = &store.state().sessions["alpha"];
    assert_eq!(alpha.disconnected_at_ms, Some(42));
    let filters: Vec<&str> = alpha
        .subscriptions
        .iter()
        .map(|s| s.filter.as_str())
        .collect();
    assert_eq!(filters, ["sensors/+", "$share/g/sensors/#"]);
    assert_eq!(alpha.subscriptions[0].qos, 2);
    assert_eq!(alpha.subscriptions[0].subscription_id, None);
    assert_eq!(alpha.queue.keys().copied().collect::<Vec<_>>(), [1, 3, 4]);
    assert_eq!(alpha.queue[&3].payload.len(), 300);
    assert_eq!(alpha.queue[&4].subscription_ids, [7, 268_435_455]);
    let alpha_will = alpha.will.as_ref().unwrap();
    assert_eq!(alpha_will.token, 11);
    assert_eq!(alpha_will.firing.as_ref().unwrap().from_offset, 99);
    assert!(!store.state().sessions.contains_key("beta"));
    let retained: Vec<&str> = store.state().retained.keys().map(String::as_str).collect();
    assert_eq!(retained, ["status/a", "status/b"]);

    // Opening again connects the session, keeping subscriptions and queue.
    store.apply(&[open_op("alpha")]).unwrap();
    assert_eq!(store.state().sessions["alpha"].disconnected_at_ms, None);
    assert_eq!(store.state().sessions["alpha"].queue.len(), 3);
    drop(store);

    let mut all = ops.clone();
    all.push(open_op("alpha"));
    let store = open(dir.path());
    assert_eq!(store.state(), &model_of(&all));
    assert!(!store.recovery().created);
    assert_eq!(store.recovery().truncated_bytes, 0);
    assert_eq!(store.recovery().tail_fault, None);
}

#[test]
fn synced_state_is_in_the_file_without_a_clean_close() {
    let dir = tempfile::tempdir().unwrap();
    let copy = tempfile::tempdir().unwrap();
    let ops = every_op();
    let mut store = open(dir.path());
    store.apply(&ops).unwrap();
    store.sync().unwrap();
    assert_eq!(store.journal_bytes(), file_len(dir.path()));
    // Copy the file while the store is still open: what a crash right now would leave.
    fs::copy(journal(dir.path()), journal(copy.path())).unwrap();
    let reopened = open(copy.path());
    assert_eq!(reopened.state(), store.state());
    assert_eq!(reopened.recovery().entries_replayed, ops.len() as u64);
}

#[test]
fn ops_on_unknown_sessions_change_nothing_and_are_not_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    store.apply(&[open_op("known")]).unwrap();
    let bytes = store.journal_bytes();
    let before = store.state().clone();
    store
        .apply(&[
            enqueue("ghost", 1, b"x"),
            Op::Subscribe {
                client_id: "ghost".to_owned(),
                subscription: subscription("a/b", 1),
            },
            Op::SessionClosed {
                client_id: "ghost".to_owned(),
                at_ms: 1,
            },
            Op::Dequeue {
                client_id: "known".to_owned(),
                seq: 5,
            },
            Op::Unsubscribe {
                client_id: "known".to_owned(),
                filter: "never".to_owned(),
            },
            Op::SessionRemove {
                client_id: "ghost".to_owned(),
            },
            Op::ClearRetained {
                topic: "nothing/here".to_owned(),
            },
        ])
        .unwrap();
    assert_eq!(store.state(), &before);
    assert_eq!(store.journal_bytes(), bytes);
}

/// Builds a journal whose last entry is a long enqueue; returns the state before it, the
/// journal length before it, and the whole file.
fn journal_with_last_entry(dir: &Path) -> (StoreState, u64, Vec<u8>) {
    let mut store = open(dir);
    store.apply(&every_op()).unwrap();
    store.sync().unwrap();
    let before = store.state().clone();
    let len_before = file_len(dir);
    store
        .apply(&[enqueue("alpha", 77, b"the last entry")])
        .unwrap();
    store.sync().unwrap();
    drop(store);
    (before, len_before, fs::read(journal(dir)).unwrap())
}

#[test]
fn a_torn_last_entry_is_truncated_at_every_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (before, len_before, full) = journal_with_last_entry(dir.path());
    assert!(full.len() as u64 > len_before + 8);
    for cut in len_before..full.len() as u64 {
        let torn = tempfile::tempdir().unwrap();
        fs::write(journal(torn.path()), &full[..cut as usize]).unwrap();
        let store = open(torn.path());
        assert_eq!(store.state(), &before, "cut at {cut}");
        let recovery = *store.recovery();
        assert_eq!(recovery.kept_bytes, len_before);
        assert_eq!(recovery.truncated_bytes, cut - len_before, "cut at {cut}");
        let fault = (cut > len_before).then_some(TailFault::Incomplete);
        assert_eq!(recovery.tail_fault, fault, "cut at {cut}");
        drop(store);
        assert_eq!(file_len(torn.path()), len_before, "cut at {cut}");
        // The file is good now: a second open finds nothing to cut.
        let again = open(torn.path());
        assert_eq!(again.recovery().truncated_bytes, 0);
        assert_eq!(again.state(), &before);
    }
}

#[test]
fn a_flipped_byte_in_the_last_entry_truncates_it() {
    let dir = tempfile::tempdir().unwrap();
    let (before, len_before, full) = journal_with_last_entry(dir.path());
    for index in len_before as usize..full.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let bad = tempfile::tempdir().unwrap();
            let mut bytes = full.clone();
            bytes[index] ^= mask;
            fs::write(journal(bad.path()), &bytes).unwrap();
            let store = open(bad.path());
            assert_eq!(store.state(), &before, "byte {index} ^ {mask:#x}");
            assert!(store.recovery().tail_fault.is_some());
            assert_eq!(
                store.recovery().truncated_bytes,
                full.len() as u64 - len_before
            );
            drop(store);
            assert_eq!(file_len(bad.path()), len_before);
        }
    }
}

#[test]
fn a_corrupt_entry_in_the_middle_cuts_the_journal_there() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    store.apply(&[open_op("a")]).unwrap();
    store.sync().unwrap();
    let state_one = store.state().clone();
    let first_end = file_len(dir.path());
    store.apply(&[enqueue("a", 1, b"second")]).unwrap();
    store.apply(&[enqueue("a", 2, b"third")]).unwrap();
    store.sync().unwrap();
    drop(store);
    let mut bytes = fs::read(journal(dir.path())).unwrap();
    // A byte inside the second entry's body.
    bytes[first_end as usize + 12] ^= 0x10;
    fs::write(journal(dir.path()), &bytes).unwrap();
    let store = open(dir.path());
    assert_eq!(store.state(), &state_one);
    assert_eq!(
        store.recovery().tail_fault,
        Some(TailFault::ChecksumMismatch)
    );
    assert_eq!(
        store.recovery().truncated_bytes,
        bytes.len() as u64 - first_end
    );
    drop(store);
    assert_eq!(file_len(dir.path()), first_end);
}

#[test]
fn a_zero_filled_tail_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    store.apply(&every_op()).unwrap();
    store.sync().unwrap();
    let state = store.state().clone();
    let len = file_len(dir.path());
    drop(store);
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(journal(dir.path()))
        .unwrap();
    file.write_all(&[0; 4096]).unwrap();
    drop(file);
    let store = open(dir.path());
    assert_eq!(store.state(), &state);
    assert_eq!(store.recovery().tail_fault, Some(TailFault::EmptyEntry));
    assert_eq!(store.recovery().truncated_bytes, 4096);
    drop(store);
    assert_eq!(file_len(dir.path()), len);
}

#[test]
fn an_intact_entry_that_cannot_be_decoded_is_an_error_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    // An entry of an op kind this build does not know, with a correct checksum.
    let body = [200u8, 1, 2, 3];
    let mut entry = Vec::new();
    entry.extend_from_slice(&(body.len() as u32).to_le_bytes());
    entry.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    entry.extend_from_slice(&body);
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(journal(dir.path()))
        .unwrap();
    file.write_all(&entry).unwrap();
    drop(file);
    let before = fs::read(journal(dir.path())).unwrap();
    let error = Store::open(dir.path(), StoreLimits::default()).unwrap_err();
    assert!(
        matches!(error, StoreError::Undecodable { offset, .. } if offset == JOURNAL_HEADER_BYTES),
        "{error}"
    );
    assert!(error.to_string().contains(JOURNAL_FILE_NAME), "{error}");
    assert_eq!(fs::read(journal(dir.path())).unwrap(), before);
}

#[test]
fn compaction_keeps_the_state_and_shrinks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    store.apply(&every_op()).unwrap();
    // Churn: 3,000 messages of 1 KiB queued and delivered leave ~3 MiB of garbage.
    let payload = [7u8; 1024];
    for seq in 100..3100 {
        store.apply(&[enqueue("alpha", seq, &payload)]).unwrap();
        if seq >= 110 {
            store
                .apply(&[Op::Dequeue {
                    client_id: "alpha".to_owned(),
                    seq: seq - 10,
                }])
                .unwrap();
        }
    }
    store.sync().unwrap();
    let state = store.state().clone();
    let before = file_len(dir.path());
    assert!(before > 3_000_000, "{before}");
    assert!(store.maybe_compact().unwrap());
    let after = file_len(dir.path());
    assert!(after < before / 10, "{after} of {before}");
    assert_eq!(after, store.journal_bytes());
    assert_eq!(after, store.live_bytes());
    assert_eq!(store.state(), &state);
    // Nothing more to gain.
    assert!(!store.maybe_compact().unwrap());
    // Appending after a compaction goes to the new file.
    store.apply(&[enqueue("alpha", 5000, b"after")]).unwrap();
    store.sync().unwrap();
    let state = store.state().clone();
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.state(), &state);
    assert!(!store.recovery().compacted);
}

#[test]
fn open_compacts_a_journal_that_is_mostly_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    store.apply(&[open_op("a")]).unwrap();
    let payload = vec![1u8; 64 * 1024];
    for seq in 0..40 {
        store.apply(&[enqueue("a", seq, &payload)]).unwrap();
        store
            .apply(&[Op::Dequeue {
                client_id: "a".to_owned(),
                seq,
            }])
            .unwrap();
    }
    let state = store.state().clone();
    drop(store);
    assert!(file_len(dir.path()) > 2 << 20);
    let store = open(dir.path());
    assert!(store.recovery().compacted);
    assert_eq!(store.state(), &state);
    assert_eq!(file_len(dir.path()), store.live_bytes());
}

#[test]
fn a_foreign_file_is_refused_and_left_alone() {
    for contents in [
        &b"this is somebody else's file, with more than twelve bytes"[..],
        b"SIL",
        b"SILTMQSX\x01\x00\x00\x00",
    ] {
        let dir = tempfile::tempdir().unwrap();
        fs::write(journal(dir.path()), contents).unwrap();
        let error = Store::open(dir.path(), StoreLimits::default()).unwrap_err();
        assert!(matches!(error, StoreError::Foreign { .. }), "{error}");
        assert!(error.to_string().contains(JOURNAL_FILE_NAME), "{error}");
        assert_eq!(fs::read(journal(dir.path())).unwrap(), contents);
    }
}

#[test]
fn a_newer_format_version_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let contents = b"SILTMQST\x02\x00\x00\x00more";
    fs::write(journal(dir.path()), contents).unwrap();
    let error = Store::open(dir.path(), StoreLimits::default()).unwrap_err();
    assert!(
        matches!(error, StoreError::UnsupportedVersion { version: 2, .. }),
        "{error}"
    );
    assert_eq!(fs::read(journal(dir.path())).unwrap(), contents);
}

#[test]
fn an_empty_file_or_a_missing_directory_gives_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(journal(dir.path()), b"").unwrap();
    let store = open(dir.path());
    assert!(store.recovery().created);
    assert_eq!(store.state(), &StoreState::default());
    assert_eq!(file_len(dir.path()), JOURNAL_HEADER_BYTES);

    let nested = dir.path().join("a/b/c");
    let mut store = open(&nested);
    store.apply(&[open_op("x")]).unwrap();
    store.sync().unwrap();
    drop(store);
    assert!(open(&nested).state().sessions.contains_key("x"));
}

#[test]
fn a_leftover_compaction_file_is_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    store.apply(&every_op()).unwrap();
    store.sync().unwrap();
    let state = store.state().clone();
    drop(store);
    let tmp = dir.path().join(format!("{JOURNAL_FILE_NAME}.tmp"));
    fs::write(&tmp, b"half a compaction").unwrap();
    let store = open(dir.path());
    assert_eq!(store.state(), &state);
    assert!(!tmp.exists());
}

#[test]
fn an_oversize_entry_refuses_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let limits = StoreLimits {
        entry_bytes_max: 1024,
        ..StoreLimits::default()
    };
    let mut store = Store::open(dir.path(), limits).unwrap();
    let bytes = store.journal_bytes();
    let error = store
        .apply(&[
            open_op("a"),
            enqueue("a", 1, b"small"),
            enqueue("a", 2, &[0; 2048]),
        ])
        .unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::EntryTooLarge {
                index: 2,
                max: 1024,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(store.state(), &StoreState::default());
    assert_eq!(store.journal_bytes(), bytes);
    // A subscription filter or retained topic counts too.
    store.apply(&[open_op("a")]).unwrap();
    let long_filter = "f/".repeat(600);
    assert!(matches!(
        store.apply(&[Op::Subscribe {
            client_id: "a".to_owned(),
            subscription: subscription(&long_filter, 1),
        }]),
        Err(StoreError::EntryTooLarge { .. })
    ));
    store.apply(&[enqueue("a", 1, &[0; 800])]).unwrap();
    store.sync().unwrap();
    let state = store.state().clone();
    drop(store);
    assert_eq!(Store::open(dir.path(), limits).unwrap().state(), &state);
}

#[test]
fn an_entry_over_a_lowered_limit_fails_open_instead_of_being_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    store
        .apply(&[open_op("a"), enqueue("a", 1, &[5; 4096])])
        .unwrap();
    store.sync().unwrap();
    let state = store.state().clone();
    drop(store);
    let before = fs::read(journal(dir.path())).unwrap();
    let small = StoreLimits {
        entry_bytes_max: 1024,
        ..StoreLimits::default()
    };
    let error = Store::open(dir.path(), small).unwrap_err();
    assert!(
        matches!(error, StoreError::StoredEntryTooLarge { max: 1024, .. }),
        "{error}"
    );
    assert_eq!(fs::read(journal(dir.path())).unwrap(), before);
    assert_eq!(open(dir.path()).state(), &state);
}

#[test]
fn the_journal_cap_refuses_growth_but_never_draining() {
    let dir = tempfile::tempdir().unwrap();
    let limits = StoreLimits {
        entry_bytes_max: 4096,
        journal_bytes_max: 64 * 1024,
    };
    let mut store = Store::open(dir.path(), limits).unwrap();
    store.apply(&[open_op("a")]).unwrap();
    let payload = [3u8; 1000];
    let mut seq = 0;
    let full = loop {
        match store.apply(&[enqueue("a", seq, &payload)]) {
            Ok(()) => seq += 1,
            Err(error) => break error,
        }
        assert!(seq < 1000, "the cap was never reached");
    };
    assert!(matches!(full, StoreError::JournalFull { .. }), "{full}");
    assert!(full.to_string().contains(JOURNAL_FILE_NAME), "{full}");
    assert!(store.journal_bytes() <= limits.journal_bytes_max);
    assert_eq!(store.state().sessions["a"].queue.len() as u64, seq);
    // Draining is always accepted, even right at the cap.
    for drained in 0..seq / 2 {
        store
            .apply(&[Op::Dequeue {
                client_id: "a".to_owned(),
                seq: drained,
            }])
            .unwrap();
    }
    // Churn at half capacity runs forever: the cap compacts as needed.
    for oldest in seq / 2..seq / 2 + 500 {
        store.apply(&[enqueue("a", seq, &payload)]).unwrap();
        store
            .apply(&[Op::Dequeue {
                client_id: "a".to_owned(),
                seq: oldest,
            }])
            .unwrap();
        seq += 1;
        assert!(store.journal_bytes() <= limits.journal_bytes_max + 4096);
    }
    store.sync().unwrap();
    let state = store.state().clone();
    drop(store);
    assert_eq!(Store::open(dir.path(), limits).unwrap().state(), &state);
}

#[test]
fn invalid_limits_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for limits in [
        StoreLimits {
            entry_bytes_max: 0,
            ..StoreLimits::default()
        },
        StoreLimits {
            journal_bytes_max: 3,
            ..StoreLimits::default()
        },
    ] {
        let error = Store::open(dir.path(), limits).unwrap_err();
        assert!(matches!(error, StoreError::InvalidLimits(_)), "{error}");
    }
}

/// Pins the on-disk format: changing these bytes is a migration.
#[test]
fn the_journal_format_is_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    store
        .apply(&[
            Op::SessionOpen {
                client_id: "c".to_owned(),
                protocol_level: 5,
                expiry_secs: 60,
            },
            Op::Subscribe {
                client_id: "c".to_owned(),
                subscription: StoredSubscription {
                    filter: "a/+".to_owned(),
                    qos: 1,
                    no_local: false,
                    retain_as_published: true,
                    retain_handling: 0,
                    subscription_id: Some(9),
                },
            },
            Op::Retain {
                message: StoredMessage {
                    topic: "t".to_owned(),
                    payload: Bytes::from_static(b"hi"),
                    qos: 0,
                    retain: true,
                    published_at_ms: 1,
                    expiry_interval_secs: None,
                    properties: StoredProperties {
                        user_properties: vec![("k".to_owned(), "v".to_owned())],
                        ..StoredProperties::default()
                    },
                    subscription_ids: Vec::new(),
                },
            },
        ])
        .unwrap();
    store.sync().unwrap();
    let expected: Vec<u8> = [
        &b"SILTMQST"[..],
        &[1, 0, 0, 0],
        // SessionOpen: length 11, CRC-32C, kind 1, "c", level 5, expiry 60.
        &[11, 0, 0, 0],
        &SESSION_OPEN_CRC.to_le_bytes(),
        &[1, 1, 0, 0, 0, b'c', 5, 60, 0, 0, 0],
        // Subscribe: kind 4, "c", "a/+", qos 1, no local 0, retain as published 1,
        // retain handling 0, subscription id Some(9).
        &[22, 0, 0, 0],
        &SUBSCRIBE_CRC.to_le_bytes(),
        &[
            4, 1, 0, 0, 0, b'c', 3, 0, 0, 0, b'a', b'/', b'+', 1, 0, 1, 0, 1, 9, 0, 0, 0,
        ],
        // Retain: kind 8, topic "t", payload "hi", qos 0, retain 1, published at 1, then no
        // expiry, format, content type, response topic or correlation data, then one user
        // property ("k", "v").
        &[41, 0, 0, 0],
        &RETAIN_CRC.to_le_bytes(),
        &[8, 1, 0, 0, 0, b't', 2, 0, 0, 0, b'h', b'i', 0, 1],
        &[1, 0, 0, 0, 0, 0, 0, 0],
        &[0, 0, 0, 0, 0],
        &[1, 0, 0, 0, 1, 0, 0, 0, b'k', 1, 0, 0, 0, b'v'],
    ]
    .concat();
    assert_eq!(fs::read(journal(dir.path())).unwrap(), expected);
}

/// Pins the bytes of the inbound QoS 2 entries (added to format version 1: older builds
/// refuse a journal holding them as undecodable rather than misread it).
#[test]
fn the_qos2_entries_are_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let ops = [
        Op::SessionOpen {
            client_id: "c".to_owned(),
            protocol_level: 5,
            expiry_secs: 60,
        },
        Op::Qos2Set {
            client_id: "c".to_owned(),
            packet_id: 0x0102,
            state: StoredQos2::Intent {
                log_topic: "m".to_owned(),
                partition: 2,
                from_offset: 7,
                token: 0x0A0B,
            },
        },
        Op::Qos2Set {
            client_id: "c".to_owned(),
            packet_id: 3,
            state: StoredQos2::Received,
        },
        Op::Qos2Release {
            client_id: "c".to_owned(),
            packet_id: 3,
        },
    ];
    store.apply(&ops).unwrap();
    store.sync().unwrap();
    let bytes = fs::read(journal(dir.path())).unwrap();
    let bodies: Vec<&[u8]> = {
        let mut bodies = Vec::new();
        let mut at = JOURNAL_HEADER_BYTES as usize;
        while at < bytes.len() {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            bodies.push(&bytes[at + 8..at + 8 + len]);
            at += 8 + len;
        }
        bodies
    };
    assert_eq!(bodies.len(), 4);
    // Qos2Set: kind 10, "c", packet id 0x0102 (LE), tag 0 (intent), log topic "m",
    // partition 2, from offset 7, token 0x0A0B.
    let intent: Vec<u8> = [
        &[10, 1, 0, 0, 0, b'c', 2, 1, 0, 1, 0, 0, 0, b'm'][..],
        &[2, 0, 0, 0],
        &[7, 0, 0, 0, 0, 0, 0, 0],
        &[0x0B, 0x0A, 0, 0, 0, 0, 0, 0],
    ]
    .concat();
    assert_eq!(bodies[1], &intent[..]);
    // Qos2Set: kind 10, "c", packet id 3, tag 1 (received).
    assert_eq!(bodies[2], &[10, 1, 0, 0, 0, b'c', 3, 0, 1]);
    // Qos2Release: kind 11, "c", packet id 3.
    assert_eq!(bodies[3], &[11, 1, 0, 0, 0, b'c', 3, 0]);
    drop(store);
    let reopened = open(dir.path());
    assert!(reopened.state().sessions["c"].qos2.contains_key(&0x0102));
    assert!(!reopened.state().sessions["c"].qos2.contains_key(&3));
}

/// The entries journal bodies, in order.
fn journal_bodies(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    let mut at = JOURNAL_HEADER_BYTES as usize;
    while at < bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        bodies.push(bytes[at + 8..at + 8 + len].to_vec());
        at += 8 + len;
    }
    bodies
}

/// A bare message body as kind 6 and 8 write it: topic "t", payload "p", qos 1, no retain,
/// published at 5, and no properties.
const BARE_MESSAGE: &[u8] = &[
    1, 0, 0, 0, b't', 1, 0, 0, 0, b'p', 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

fn bare_message() -> StoredMessage {
    StoredMessage {
        topic: "t".to_owned(),
        payload: Bytes::from_static(b"p"),
        qos: 1,
        retain: false,
        published_at_ms: 5,
        expiry_interval_secs: None,
        properties: StoredProperties::default(),
        subscription_ids: Vec::new(),
    }
}

/// Pins the entries added for subscription ids and wills (format version 1 still: a copy
/// without ids keeps kind 6's bytes, so journals written before kind 15 load unchanged).
#[test]
fn the_subscription_id_and_will_entries_are_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let ops = [
        Op::SessionOpen {
            client_id: "c".to_owned(),
            protocol_level: 5,
            expiry_secs: 60,
        },
        Op::Enqueue {
            client_id: "c".to_owned(),
            seq: 1,
            message: bare_message(),
        },
        Op::Enqueue {
            client_id: "c".to_owned(),
            seq: 2,
            message: StoredMessage {
                subscription_ids: vec![3, 0x0102],
                ..bare_message()
            },
        },
        Op::WillSet {
            client_id: "c".to_owned(),
            will: StoredWill {
                message: bare_message(),
                delay_secs: 9,
                token: 0x0A0B,
                firing: None,
            },
        },
        Op::WillFiring {
            client_id: "c".to_owned(),
            token: 0x0A0B,
            firing: StoredWillFiring {
                log_topic: "m".to_owned(),
                partition: 2,
                from_offset: 7,
            },
        },
        Op::WillClear {
            client_id: "c".to_owned(),
            token: Some(0x0A0B),
        },
    ];
    store.apply(&ops).unwrap();
    store.sync().unwrap();
    let bodies = journal_bodies(&fs::read(journal(dir.path())).unwrap());
    assert_eq!(bodies.len(), 6);
    let client_and_seq = |seq: u8| [1, 0, 0, 0, b'c', seq, 0, 0, 0, 0, 0, 0, 0];
    // Enqueue without ids: kind 6, "c", seq 1, the message.
    assert_eq!(
        bodies[1],
        [&[6][..], &client_and_seq(1), BARE_MESSAGE].concat()
    );
    // Enqueue with ids: kind 15, "c", seq 2, the message, 2 ids: 3 and 0x0102.
    assert_eq!(
        bodies[2],
        [
            &[15][..],
            &client_and_seq(2),
            BARE_MESSAGE,
            &[2, 0, 0, 0, 3, 0, 0, 0, 2, 1, 0, 0]
        ]
        .concat()
    );
    // WillSet: kind 12, "c", the message, delay 9, token 0x0A0B, not firing.
    assert_eq!(
        bodies[3],
        [
            &[12, 1, 0, 0, 0, b'c'][..],
            BARE_MESSAGE,
            &[9, 0, 0, 0, 0x0B, 0x0A, 0, 0, 0, 0, 0, 0, 0]
        ]
        .concat()
    );
    // WillFiring: kind 13, "c", token, log topic "m", partition 2, from offset 7.
    assert_eq!(
        bodies[4],
        [
            &[13, 1, 0, 0, 0, b'c', 0x0B, 0x0A, 0, 0, 0, 0, 0, 0][..],
            &[1, 0, 0, 0, b'm', 2, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]
        ]
        .concat()
    );
    // WillClear: kind 14, "c", Some(token).
    assert_eq!(
        bodies[5],
        [14, 1, 0, 0, 0, b'c', 1, 0x0B, 0x0A, 0, 0, 0, 0, 0, 0]
    );
    drop(store);
    let reopened = open(dir.path());
    let session = &reopened.state().sessions["c"];
    assert_eq!(session.queue[&1].subscription_ids, Vec::<u32>::new());
    assert_eq!(session.queue[&2].subscription_ids, [3, 0x0102]);
    assert_eq!(session.will, None);
}

/// A journal written before kinds 12 to 15 existed (built here byte by byte) loads: its
/// queued copies come back without subscription ids and its sessions without a will.
#[test]
fn a_journal_from_before_the_will_and_id_entries_loads() {
    let dir = tempfile::tempdir().unwrap();
    let entry = |body: &[u8]| {
        [
            &(body.len() as u32).to_le_bytes()[..],
            &crc32c::crc32c(body).to_le_bytes(),
            body,
        ]
        .concat()
    };
    let open_body = [1, 1, 0, 0, 0, b'c', 5, 60, 0, 0, 0];
    let enqueue_body = [
        &[6, 1, 0, 0, 0, b'c', 4, 0, 0, 0, 0, 0, 0, 0][..],
        BARE_MESSAGE,
    ]
    .concat();
    let bytes = [
        &b"SILTMQST"[..],
        &[1, 0, 0, 0],
        &entry(&open_body),
        &entry(&enqueue_body),
    ]
    .concat();
    fs::create_dir_all(dir.path()).unwrap();
    fs::write(journal(dir.path()), bytes).unwrap();
    let store = open(dir.path());
    let session = &store.state().sessions["c"];
    assert_eq!(session.queue[&4], bare_message());
    assert_eq!(session.will, None);
    assert_eq!(store.recovery().tail_fault, None);
}

const SESSION_OPEN_CRC: u32 = 0x22C9_9A9F;
const SUBSCRIBE_CRC: u32 = 0xCF30_8C3C;
const RETAIN_CRC: u32 = 0x281B_BD9E;

// ---- Model-based property tests ----

#[derive(Debug, Clone)]
enum Step {
    Apply(Vec<Op>),
    Sync,
    Reopen,
    Compact,
    MaybeCompact,
}

fn client_id() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "b", "c"]).prop_map(str::to_owned)
}

fn topic() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["t/1", "t/2", "t/3", ""]).prop_map(str::to_owned)
}

fn short_string() -> impl Strategy<Value = String> {
    "[a-zé/+#$]{0,6}"
}

fn message_strategy() -> impl Strategy<Value = StoredMessage> {
    (
        topic(),
        prop::collection::vec(any::<u8>(), 0..40),
        0u8..3,
        any::<bool>(),
        any::<i64>(),
        any::<Option<u32>>(),
        any::<Option<bool>>(),
        prop::option::of(short_string()),
        prop::option::of(short_string()),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..8)),
        prop::collection::vec((short_string(), short_string()), 0..3),
        prop::collection::vec(1u32..268_435_456, 0..3),
    )
        .prop_map(
            |(
                topic,
                payload,
                qos,
                retain,
                published_at_ms,
                expiry_interval_secs,
                payload_format_utf8,
                content_type,
                response_topic,
                correlation_data,
                user_properties,
                subscription_ids,
            )| StoredMessage {
                topic,
                payload: Bytes::from(payload),
                qos,
                retain,
                published_at_ms,
                expiry_interval_secs,
                properties: StoredProperties {
                    payload_format_utf8,
                    content_type,
                    response_topic,
                    correlation_data: correlation_data.map(Bytes::from),
                    user_properties,
                },
                subscription_ids,
            },
        )
}

fn will_firing_strategy() -> impl Strategy<Value = StoredWillFiring> {
    ("[a-z]{1,4}", any::<u32>(), any::<u64>()).prop_map(|(log_topic, partition, from_offset)| {
        StoredWillFiring {
            log_topic,
            partition,
            from_offset,
        }
    })
}

fn will_strategy() -> impl Strategy<Value = StoredWill> {
    (
        message_strategy(),
        any::<u32>(),
        0u64..3,
        prop::option::of(will_firing_strategy()),
    )
        .prop_map(|(mut message, delay_secs, token, firing)| {
            message.subscription_ids.clear();
            StoredWill {
                message,
                delay_secs,
                token,
                firing,
            }
        })
}

fn filter() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["t/+", "t/#", "$share/g/t/1", "x"]).prop_map(str::to_owned)
}

fn subscription_strategy() -> impl Strategy<Value = StoredSubscription> {
    (
        filter(),
        0u8..3,
        any::<bool>(),
        any::<bool>(),
        0u8..3,
        any::<Option<u32>>(),
    )
        .prop_map(
            |(filter, qos, no_local, retain_as_published, retain_handling, subscription_id)| {
                StoredSubscription {
                    filter,
                    qos,
                    no_local,
                    retain_as_published,
                    retain_handling,
                    subscription_id,
                }
            },
        )
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (client_id(), 3u8..6, any::<u32>()).prop_map(|(client_id, protocol_level, expiry_secs)| {
            Op::SessionOpen { client_id, protocol_level, expiry_secs }
        }),
        1 => (client_id(), any::<i64>())
            .prop_map(|(client_id, at_ms)| Op::SessionClosed { client_id, at_ms }),
        1 => client_id().prop_map(|client_id| Op::SessionRemove { client_id }),
        2 => (client_id(), subscription_strategy())
            .prop_map(|(client_id, subscription)| Op::Subscribe { client_id, subscription }),
        1 => (client_id(), filter()).prop_map(|(client_id, filter)| Op::Unsubscribe { client_id, filter }),
        4 => (client_id(), 0u64..6, message_strategy())
            .prop_map(|(client_id, seq, message)| Op::Enqueue { client_id, seq, message }),
        2 => (client_id(), 0u64..6).prop_map(|(client_id, seq)| Op::Dequeue { client_id, seq }),
        2 => message_strategy().prop_map(|message| Op::Retain { message }),
        1 => topic().prop_map(|topic| Op::ClearRetained { topic }),
        2 => (client_id(), 1u16..4, prop::option::of(("[a-z]{1,4}", any::<u32>(), any::<u64>(), any::<u64>())))
            .prop_map(|(client_id, packet_id, intent)| Op::Qos2Set {
                client_id,
                packet_id,
                state: match intent {
                    Some((log_topic, partition, from_offset, token)) => StoredQos2::Intent {
                        log_topic,
                        partition,
                        from_offset,
                        token,
                    },
                    None => StoredQos2::Received,
                },
            }),
        1 => (client_id(), 1u16..4)
            .prop_map(|(client_id, packet_id)| Op::Qos2Release { client_id, packet_id }),
        2 => (client_id(), will_strategy())
            .prop_map(|(client_id, will)| Op::WillSet { client_id, will }),
        1 => (client_id(), 0u64..3, will_firing_strategy())
            .prop_map(|(client_id, token, firing)| Op::WillFiring { client_id, token, firing }),
        1 => (client_id(), prop::option::of(0u64..3))
            .prop_map(|(client_id, token)| Op::WillClear { client_id, token }),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => prop::collection::vec(op_strategy(), 1..5).prop_map(Step::Apply),
        2 => Just(Step::Sync),
        2 => Just(Step::Reopen),
        1 => Just(Step::Compact),
        1 => Just(Step::MaybeCompact),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The store agrees with the model after every step, across reopens and compactions,
    /// and its size accounting matches the file.
    #[test]
    fn the_store_agrees_with_a_model(steps in prop::collection::vec(step_strategy(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let mut model = StoreState::default();
        for step in steps {
            match step {
                Step::Apply(ops) => {
                    store.apply(&ops).unwrap();
                    for op in &ops {
                        model_apply(&mut model, op);
                    }
                }
                Step::Sync => {
                    store.sync().unwrap();
                    prop_assert_eq!(store.journal_bytes(), file_len(dir.path()));
                }
                Step::Reopen => {
                    drop(store);
                    store = open(dir.path());
                    prop_assert_eq!(store.recovery().truncated_bytes, 0);
                }
                Step::Compact => {
                    store.compact().unwrap();
                    prop_assert_eq!(file_len(dir.path()), store.live_bytes());
                }
                Step::MaybeCompact => {
                    prop_assert!(!store.maybe_compact().unwrap());
                }
            }
            prop_assert_eq!(store.state(), &model);
            prop_assert!(store.live_bytes() <= store.journal_bytes());
        }
        store.compact().unwrap();
        prop_assert_eq!(file_len(dir.path()), store.live_bytes());
        drop(store);
        let reopened = open(dir.path());
        prop_assert_eq!(reopened.state(), &model);
    }

    /// Cutting the journal anywhere recovers exactly the ops whose entries lie wholly
    /// before the cut.
    #[test]
    fn recovery_keeps_exactly_the_valid_prefix(
        ops in prop::collection::vec(op_strategy(), 1..30),
        cut_fraction in 0.0f64..=1.0,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        // (journal length, state) after each op.
        let mut checkpoints = vec![(store.journal_bytes(), StoreState::default())];
        for op in &ops {
            store.apply(std::slice::from_ref(op)).unwrap();
            checkpoints.push((store.journal_bytes(), store.state().clone()));
        }
        store.sync().unwrap();
        drop(store);
        let full = fs::read(journal(dir.path())).unwrap();
        let span = (full.len() as u64 - JOURNAL_HEADER_BYTES) as f64;
        let cut = JOURNAL_HEADER_BYTES + (span * cut_fraction) as u64;
        fs::write(journal(dir.path()), &full[..cut as usize]).unwrap();
        let (kept, expected) = checkpoints
            .iter()
            .rev()
            .find(|(len, _)| *len <= cut)
            .unwrap();
        let store = open(dir.path());
        prop_assert_eq!(store.state(), expected);
        prop_assert_eq!(store.recovery().kept_bytes, *kept);
        prop_assert_eq!(store.recovery().truncated_bytes, cut - kept);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bodies with a valid checksum (what a bug or a future format could leave)
    /// either decode or fail open with an error naming the offset; they never panic or
    /// allocate from a length they claim.
    #[test]
    fn arbitrary_checksummed_entries_never_panic(
        bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..64), 1..4),
        corrupt_tail in prop::collection::vec(any::<u8>(), 0..32),
    ) {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()));
        let mut bytes = fs::read(journal(dir.path())).unwrap();
        for body in &bodies {
            bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
            bytes.extend_from_slice(body);
        }
        bytes.extend_from_slice(&corrupt_tail);
        fs::write(journal(dir.path()), &bytes).unwrap();
        match Store::open(dir.path(), StoreLimits::default()) {
            Ok(store) => prop_assert!(store.recovery().entries_replayed <= bodies.len() as u64),
            Err(error) => prop_assert!(
                matches!(error, StoreError::Undecodable { .. }),
                "{}",
                error
            ),
        }
    }
}

// ---- Crash test ----

const CHILD_DIR_ENV: &str = "SILT_STORE_CRASH_CHILD_DIR";
const CHILD_RUN_ENV: &str = "SILT_STORE_CRASH_CHILD_RUN";
const CRASH_ROUNDS: u64 = 20;

/// The ops of one step of the crash child: deterministic in (run, step), touching every op
/// kind, with enough payload that compactions happen.
fn crash_step(run: u64, step: u64) -> Vec<Op> {
    let client = format!("c{}", step % 4);
    let seq = run * 1_000_000 + step;
    let payload = format!("{run}/{step}/").repeat(40);
    let mut ops = Vec::new();
    if step.is_multiple_of(7) {
        ops.push(open_op(&client));
    }
    ops.push(enqueue(&client, seq, payload.as_bytes()));
    if step >= 12 {
        ops.push(Op::Dequeue {
            client_id: client.clone(),
            seq: seq - 12,
        });
    }
    ops.push(Op::Retain {
        message: message(&format!("r/{}", step % 16), payload.as_bytes()),
    });
    if step.is_multiple_of(5) {
        ops.push(Op::Subscribe {
            client_id: client.clone(),
            subscription: subscription(&format!("f/{}", step % 3), (step % 3) as u8),
        });
    }
    if step.is_multiple_of(11) {
        ops.push(Op::Unsubscribe {
            client_id: client.clone(),
            filter: format!("f/{}", step % 3),
        });
    }
    if step.is_multiple_of(13) {
        ops.push(Op::SessionClosed {
            client_id: client.clone(),
            at_ms: step as i64,
        });
    }
    if step.is_multiple_of(17) {
        ops.push(Op::ClearRetained {
            topic: format!("r/{}", (step + 1) % 16),
        });
    }
    if step.is_multiple_of(29) {
        ops.push(Op::SessionRemove { client_id: client });
    }
    ops
}

/// The child's side of the crash test; a no-op unless the parent started this binary with
/// `SILT_STORE_CRASH_CHILD_DIR` set. Prints `synced <step>` after each step is durable.
#[test]
fn crash_child_entry() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let run: u64 = std::env::var(CHILD_RUN_ENV).unwrap().parse().unwrap();
    let mut store = open(Path::new(&dir));
    let mut stdout = std::io::stdout();
    for step in 0.. {
        store.apply(&crash_step(run, step)).unwrap();
        store.sync().unwrap();
        writeln!(stdout, "synced {step}").unwrap();
        stdout.flush().unwrap();
        if step % 40 == 39 {
            store.compact().unwrap();
        } else {
            store.maybe_compact().unwrap();
        }
    }
}

/// A small deterministic generator, so that a failing run can be repeated from its seed.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

#[test]
fn every_synced_step_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("crash test seed {seed}");
    let mut rng = XorShift(seed);
    let mut base = StoreState::default();
    for run in 0..CRASH_ROUNDS {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, dir.path())
            .env(CHILD_RUN_ENV, run.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(step) = line.strip_prefix("synced ")
                    && tx.send(step.parse::<u64>().unwrap()).is_err()
                {
                    break;
                }
            }
        });
        // Kill after a random number of synced steps, so that the kill lands anywhere:
        // mid write, mid fsync, mid compaction.
        let kill_after = 5 + rng.below(250);
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last_synced = None;
        while last_synced.is_none_or(|step| step + 1 < kill_after) {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let step = rx
                .recv_timeout(remaining)
                .unwrap_or_else(|_| panic!("the child kept syncing (seed {seed})"));
            last_synced = Some(step);
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        // Steps reported before the kill but read after it count too.
        while let Ok(step) = rx.try_recv() {
            last_synced = Some(step);
        }
        let last_synced = last_synced.unwrap();

        let store = open(dir.path());
        let recovered = store.state().clone();
        drop(store);
        // The recovered state is the state after every synced step plus some prefix of
        // the ops of the next step, which the child may have started before the kill.
        let mut model = base.clone();
        for step in 0..=last_synced {
            for op in crash_step(run, step) {
                model_apply(&mut model, &op);
            }
        }
        let mut candidates = vec![model.clone()];
        for op in crash_step(run, last_synced + 1) {
            model_apply(&mut model, &op);
            candidates.push(model.clone());
        }
        assert!(
            candidates.contains(&recovered),
            "run {run}: the state recovered after a kill at step {last_synced} lost synced \
             ops (seed {seed})"
        );
        base = recovered;
    }
}
