//! The QoS flow state machines against a model of the spec, under random event sequences:
//! packet ids stay unique and non-zero, windows are respected, a QoS 2 message is ingested once
//! per packet-id lifetime, and resends come in the original order.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;
use silt_gateways::mqtt::{Inbound, InboundAck, InboundAction, Outbound, QoS, QosError, Resend};

#[derive(Debug, Clone)]
enum InboundEvent {
    Publish { id: u16, exactly_once: bool },
    IngestOldest,
    Pubrel { id: u16 },
    Disconnect,
}

fn inbound_event() -> impl Strategy<Value = InboundEvent> {
    prop_oneof![
        4 => (1u16..6, any::<bool>()).prop_map(|(id, exactly_once)| InboundEvent::Publish { id, exactly_once }),
        3 => Just(InboundEvent::IngestOldest),
        2 => (0u16..6).prop_map(|id| InboundEvent::Pubrel { id }),
        1 => Just(InboundEvent::Disconnect),
    ]
}

#[derive(Debug, Clone)]
enum OutboundEvent {
    Send { exactly_once: bool },
    Puback { pick: usize },
    Pubrec { pick: usize },
    Pubcomp { pick: usize },
    Stray { id: u16 },
}

fn outbound_event() -> impl Strategy<Value = OutboundEvent> {
    prop_oneof![
        4 => any::<bool>().prop_map(|exactly_once| OutboundEvent::Send { exactly_once }),
        2 => any::<usize>().prop_map(|pick| OutboundEvent::Puback { pick }),
        2 => any::<usize>().prop_map(|pick| OutboundEvent::Pubrec { pick }),
        2 => any::<usize>().prop_map(|pick| OutboundEvent::Pubcomp { pick }),
        1 => any::<u16>().prop_map(|id| OutboundEvent::Stray { id }),
    ]
}

proptest! {
    #[test]
    fn inbound_matches_the_spec_model(
        receive_maximum in 1u16..5,
        events in proptest::collection::vec(inbound_event(), 1..80),
    ) {
        let mut inbound = Inbound::new(receive_maximum);
        // Model: ingests under way (FIFO) and QoS 2 ids awaiting PUBREL.
        let mut ingesting: VecDeque<(u16, bool)> = VecDeque::new();
        let mut awaiting_pubrel: Vec<u16> = Vec::new();
        for event in events {
            match event {
                InboundEvent::Publish { id, exactly_once } => {
                    let qos = if exactly_once { QoS::ExactlyOnce } else { QoS::AtLeastOnce };
                    let result = inbound.on_publish(id, qos);
                    let expected = if exactly_once && awaiting_pubrel.contains(&id) {
                        Ok(InboundAction::ResendPubrec)
                    } else if exactly_once && ingesting.contains(&(id, true)) {
                        Ok(InboundAction::AlreadyIngesting)
                    } else if ingesting.len() + awaiting_pubrel.len() >= usize::from(receive_maximum) {
                        Err(QosError::ReceiveMaximumExceeded { limit: receive_maximum })
                    } else {
                        ingesting.push_back((id, exactly_once));
                        Ok(InboundAction::Ingest)
                    };
                    prop_assert_eq!(result, expected);
                }
                InboundEvent::IngestOldest => {
                    let Some(&(id, exactly_once)) = ingesting.front() else { continue };
                    ingesting.pop_front();
                    let ack = inbound.on_ingested(id).unwrap();
                    if exactly_once {
                        awaiting_pubrel.push(id);
                        prop_assert_eq!(ack, InboundAck::Pubrec(id));
                    } else {
                        prop_assert_eq!(ack, InboundAck::Puback(id));
                    }
                }
                InboundEvent::Pubrel { id } => {
                    let known = awaiting_pubrel.iter().position(|&pending| pending == id);
                    let result = inbound.on_pubrel(id);
                    match known {
                        Some(index) => {
                            awaiting_pubrel.remove(index);
                            prop_assert_eq!(result, Ok(()));
                        }
                        None => prop_assert_eq!(result, Err(QosError::PacketIdNotFound(id))),
                    }
                }
                InboundEvent::Disconnect => {
                    inbound.on_disconnect();
                    ingesting.clear();
                }
            }
            prop_assert_eq!(inbound.unacknowledged(), ingesting.len() + awaiting_pubrel.len());
            prop_assert!(inbound.unacknowledged() <= usize::from(receive_maximum));
        }
    }

    #[test]
    fn outbound_matches_the_spec_model(
        receive_maximum in 1u16..6,
        events in proptest::collection::vec(outbound_event(), 1..120),
    ) {
        let mut outbound = Outbound::new(receive_maximum);
        // Model: id -> (send order, exactly once, past PUBREC, message).
        let mut model: BTreeMap<u16, (u64, bool, bool, u64)> = BTreeMap::new();
        let mut sent = 0u64;
        let pick = |model: &BTreeMap<u16, (u64, bool, bool, u64)>, pick: usize| {
            (!model.is_empty()).then(|| *model.keys().nth(pick % model.len()).unwrap())
        };
        for event in events {
            match event {
                OutboundEvent::Send { exactly_once } => {
                    let qos = if exactly_once { QoS::ExactlyOnce } else { QoS::AtLeastOnce };
                    sent += 1;
                    match outbound.send(qos, sent) {
                        Some(id) => {
                            prop_assert!(id != 0);
                            prop_assert!(!model.contains_key(&id), "id {} reused while in flight", id);
                            prop_assert!(model.len() < usize::from(receive_maximum));
                            model.insert(id, (sent, exactly_once, false, sent));
                        }
                        None => prop_assert_eq!(model.len(), usize::from(receive_maximum)),
                    }
                }
                OutboundEvent::Puback { pick: index } => {
                    let Some(id) = pick(&model, index) else { continue };
                    let (_, exactly_once, _, message) = model[&id];
                    let result = outbound.on_puback(id);
                    if exactly_once {
                        prop_assert_eq!(result, Err(QosError::UnexpectedAck { ack: "PUBACK", id }));
                    } else {
                        prop_assert_eq!(result, Ok(message));
                        model.remove(&id);
                    }
                }
                OutboundEvent::Pubrec { pick: index } => {
                    let Some(id) = pick(&model, index) else { continue };
                    let (_, exactly_once, past_pubrec, message) = model[&id];
                    let result = outbound.on_pubrec(id);
                    if exactly_once && !past_pubrec {
                        prop_assert_eq!(result, Ok(message));
                        model.get_mut(&id).unwrap().2 = true;
                    } else {
                        prop_assert_eq!(result, Err(QosError::UnexpectedAck { ack: "PUBREC", id }));
                    }
                }
                OutboundEvent::Pubcomp { pick: index } => {
                    let Some(id) = pick(&model, index) else { continue };
                    let (_, _, past_pubrec, _) = model[&id];
                    let result = outbound.on_pubcomp(id);
                    if past_pubrec {
                        prop_assert_eq!(result, Ok(()));
                        model.remove(&id);
                    } else {
                        prop_assert_eq!(result, Err(QosError::UnexpectedAck { ack: "PUBCOMP", id }));
                    }
                }
                OutboundEvent::Stray { id } => {
                    if !model.contains_key(&id) {
                        prop_assert_eq!(outbound.on_puback(id), Err(QosError::PacketIdNotFound(id)));
                        prop_assert_eq!(outbound.on_pubcomp(id), Err(QosError::PacketIdNotFound(id)));
                    }
                }
            }
            prop_assert_eq!(outbound.in_flight(), model.len());
            // Resends: every message in flight, in send order, PUBREL once past PUBREC.
            let mut expected: Vec<_> = model.iter().collect();
            expected.sort_by_key(|(_, (order, ..))| *order);
            let resend = outbound.resend();
            prop_assert_eq!(resend.len(), expected.len());
            for (got, (&id, &(_, exactly_once, past_pubrec, message))) in resend.iter().zip(expected) {
                if past_pubrec {
                    prop_assert_eq!(*got, Resend::Pubrel { id });
                } else {
                    let qos = if exactly_once { QoS::ExactlyOnce } else { QoS::AtLeastOnce };
                    prop_assert_eq!(*got, Resend::Publish { id, qos, message: &message });
                }
            }
        }
    }
}
