//! QoS 1 and 2 flows of one session as plain state machines: packet identifiers, the receive
//! maximum in both directions, exactly-once bookkeeping, and what to resend when a session
//! resumes. No sockets, clock or log: the connection feeds events in and sends what comes out.
//!
//! Inbound (client to broker), MQTT 3.1.1 §4.3 and 5.0 §4.3, §4.9:
//! - QoS 1: the PUBLISH is ingested, then acknowledged with PUBACK once durable.
//! - QoS 2: the PUBLISH is ingested once, acknowledged with PUBREC once durable; its packet id
//!   stays taken until PUBREL, answered by PUBCOMP. A re-sent PUBLISH with that id in between
//!   is answered with PUBREC again and never ingested twice.
//! - Acknowledgements go out in the order the PUBLISH packets arrived (§4.6), which holds
//!   because ingest completes in arrival order.
//! - More than `receive_maximum` unacknowledged QoS 1/2 PUBLISH packets is a protocol
//!   violation: DISCONNECT with 0x93.
//!
//! Outbound (broker to client): at most the client's receive maximum in flight; every in-flight
//! message keeps its packet id until PUBACK (QoS 1) or PUBCOMP (QoS 2); on resume, unacknowledged
//! PUBLISH packets are re-sent with DUP set and PUBREL re-sent for those past PUBREC, in their
//! original order (§4.4).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::reason;
use super::subscriptions::QoS;

/// The receive maximum when the client states none (MQTT 5.0 §3.1.2.11.3): 65,535.
pub const RECEIVE_MAXIMUM_DEFAULT: u16 = u16::MAX;

/// A QoS flow the peer got wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QosError {
    #[error("packet identifier 0 is not allowed")]
    ZeroPacketId,
    #[error("more than {limit} unacknowledged QoS 1 and 2 publishes")]
    ReceiveMaximumExceeded { limit: u16 },
    #[error("packet identifier {0} is already in use")]
    PacketIdInUse(u16),
    #[error("packet identifier {0} is not in flight")]
    PacketIdNotFound(u16),
    #[error("{ack} for packet identifier {id}, which awaits another acknowledgement")]
    UnexpectedAck { ack: &'static str, id: u16 },
}

impl QosError {
    /// The MQTT 5.0 reason code to answer or disconnect with.
    pub fn reason_code(&self) -> u8 {
        match self {
            QosError::ZeroPacketId | QosError::UnexpectedAck { .. } => reason::PROTOCOL_ERROR,
            QosError::ReceiveMaximumExceeded { .. } => RECEIVE_MAXIMUM_EXCEEDED,
            QosError::PacketIdInUse(_) => PACKET_ID_IN_USE,
            QosError::PacketIdNotFound(_) => PACKET_ID_NOT_FOUND,
        }
    }
}

/// 0x91: Packet Identifier in use.
pub const PACKET_ID_IN_USE: u8 = 0x91;
/// 0x92: Packet Identifier not found.
pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
/// 0x93: Receive Maximum exceeded.
pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;

/// What to do with a QoS 1 or 2 PUBLISH the client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundAction {
    /// A new message: ingest it, then call [`Inbound::on_ingested`].
    Ingest,
    /// A QoS 2 message already ingested and acknowledged: send PUBREC again, ingest nothing.
    ResendPubrec,
    /// A QoS 2 message whose ingest is still under way: its PUBREC will follow; do nothing.
    AlreadyIngesting,
}

/// The acknowledgement that completes an inbound ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundAck {
    Puback(u16),
    Pubrec(u16),
}

/// Inbound QoS state of one session.
#[derive(Debug, Clone)]
pub struct Inbound {
    receive_maximum: u16,
    /// Publishes being ingested, oldest first.
    ingesting: VecDeque<(u16, QoS)>,
    /// QoS 2 packet ids acknowledged with PUBREC, awaiting PUBREL.
    awaiting_pubrel: BTreeSet<u16>,
}

impl Inbound {
    /// `receive_maximum` is what the broker announced (or enforces for 3.1.1 clients).
    pub fn new(receive_maximum: u16) -> Self {
        Inbound {
            receive_maximum: receive_maximum.max(1),
            ingesting: VecDeque::new(),
            awaiting_pubrel: BTreeSet::new(),
        }
    }

    /// QoS 1 and 2 publishes not yet fully acknowledged, counted against the receive maximum.
    pub fn unacknowledged(&self) -> usize {
        self.ingesting.len() + self.awaiting_pubrel.len()
    }

    /// Whether as many publishes as the receive maximum are being ingested. A 3.1.1
    /// connection stops reading QoS 1 and 2 publishes while it is (3.1.1 has no Receive
    /// Maximum to announce, so a client may send more); ingests finish without the client.
    pub fn ingest_full(&self) -> bool {
        self.ingesting.len() >= usize::from(self.receive_maximum)
    }

    /// A PUBLISH with QoS 1 or 2 and packet id `id` arrived from a 5.0 client, which was told
    /// the receive maximum: one more than it unacknowledged is a protocol error.
    pub fn on_publish(&mut self, id: u16, qos: QoS) -> Result<InboundAction, QosError> {
        self.accept(id, qos, true)
    }

    /// [`Inbound::on_publish`] for a 3.1.1 client, which was told no limit: the count is not
    /// refused (the connection bounds the ingests with [`Inbound::ingest_full`]; QoS 2 ids
    /// awaiting PUBREL are at most the 65,535 packet ids).
    pub fn on_publish_v311(&mut self, id: u16, qos: QoS) -> Result<InboundAction, QosError> {
        self.accept(id, qos, false)
    }

    fn accept(
        &mut self,
        id: u16,
        qos: QoS,
        enforce_maximum: bool,
    ) -> Result<InboundAction, QosError> {
        if id == 0 {
            return Err(QosError::ZeroPacketId);
        }
        debug_assert!(qos != QoS::AtMostOnce, "QoS 0 publishes carry no packet id");
        if qos == QoS::ExactlyOnce {
            if self.awaiting_pubrel.contains(&id) {
                return Ok(InboundAction::ResendPubrec);
            }
            if self
                .ingesting
                .iter()
                .any(|&(pending, pending_qos)| pending == id && pending_qos == QoS::ExactlyOnce)
            {
                return Ok(InboundAction::AlreadyIngesting);
            }
        }
        if enforce_maximum && self.unacknowledged() >= usize::from(self.receive_maximum) {
            return Err(QosError::ReceiveMaximumExceeded {
                limit: self.receive_maximum,
            });
        }
        self.ingesting.push_back((id, qos));
        Ok(InboundAction::Ingest)
    }

    /// The oldest ingest under way finished durably: returns the acknowledgement to send.
    /// Ingests complete in arrival order, so `id` must be the oldest.
    pub fn on_ingested(&mut self, id: u16) -> Result<InboundAck, QosError> {
        match self.ingesting.front() {
            Some(&(front, qos)) if front == id => {
                self.ingesting.pop_front();
                if qos == QoS::ExactlyOnce {
                    self.awaiting_pubrel.insert(id);
                    Ok(InboundAck::Pubrec(id))
                } else {
                    Ok(InboundAck::Puback(id))
                }
            }
            _ => Err(QosError::PacketIdNotFound(id)),
        }
    }

    /// The oldest ingest under way failed (for example, the disk budget is full): the id is
    /// released without a PUBREL flow, and the caller answers with a failure reason code (5.0)
    /// or no acknowledgement (3.1.1).
    pub fn on_ingest_failed(&mut self, id: u16) -> Result<QoS, QosError> {
        match self.ingesting.front() {
            Some(&(front, qos)) if front == id => {
                self.ingesting.pop_front();
                Ok(qos)
            }
            _ => Err(QosError::PacketIdNotFound(id)),
        }
    }

    /// A PUBREL arrived. `Ok(())` means answer PUBCOMP with success; an unknown id is answered
    /// with PUBCOMP 0x92 (5.0) and is not a reason to disconnect.
    pub fn on_pubrel(&mut self, id: u16) -> Result<(), QosError> {
        if self.awaiting_pubrel.remove(&id) {
            Ok(())
        } else {
            Err(QosError::PacketIdNotFound(id))
        }
    }

    /// Marks the QoS 2 message `id` as stored and awaiting PUBREL, wherever its ingest
    /// stood: a session restored after a restart, or a connection that closed after the log
    /// took the message but before its PUBREC went out. A re-sent PUBLISH with this id then
    /// gets PUBREC again, never a second append.
    pub fn mark_received(&mut self, id: u16) {
        self.ingesting
            .retain(|&(pending, qos)| !(pending == id && qos == QoS::ExactlyOnce));
        self.awaiting_pubrel.insert(id);
    }

    /// QoS 2 ids awaiting PUBREL: they survive a reconnect with a kept session.
    pub fn awaiting_pubrel(&self) -> impl Iterator<Item = u16> + '_ {
        self.awaiting_pubrel.iter().copied()
    }

    /// Drops ingests that were under way when the connection went (the client re-sends those
    /// publishes with DUP set), keeping the QoS 2 ids awaiting PUBREL.
    pub fn on_disconnect(&mut self) {
        self.ingesting.clear();
    }
}

/// Which acknowledgement an outbound message awaits. The message is kept for as long as it may have
/// to be sent again, and no longer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage<M> {
    /// QoS 1, PUBLISH sent.
    Puback(M),
    /// QoS 2, PUBLISH sent.
    Pubrec(M),
    /// QoS 2, PUBREC received and PUBREL sent: only the id matters now.
    Pubcomp,
}

/// What to send again for one in-flight message when a session resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend<'a, M> {
    /// PUBLISH again, with DUP set.
    Publish { id: u16, qos: QoS, message: &'a M },
    /// PUBREL again.
    Pubrel { id: u16 },
}

#[derive(Debug, Clone)]
struct InFlight<M> {
    stage: Stage<M>,
    /// Send order, for resending in the original order.
    sequence: u64,
}

/// Outbound QoS state of one session, over messages of type `M`.
#[derive(Debug, Clone)]
pub struct Outbound<M> {
    receive_maximum: u16,
    in_flight: BTreeMap<u16, InFlight<M>>,
    last_id: u16,
    sequence: u64,
}

impl<M> Outbound<M> {
    /// `receive_maximum` is the client's (5.0) or the broker's in-flight window (3.1.1).
    pub fn new(receive_maximum: u16) -> Self {
        Outbound {
            receive_maximum: receive_maximum.max(1),
            in_flight: BTreeMap::new(),
            last_id: 0,
            sequence: 0,
        }
    }

    /// Whether another QoS 1 or 2 message may be sent now.
    pub fn has_capacity(&self) -> bool {
        self.in_flight.len() < usize::from(self.receive_maximum)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Takes a packet id for `message` (QoS 1 or 2) and records it in flight. `None` when the
    /// window is full: the caller queues the message until an acknowledgement frees a slot.
    pub fn send(&mut self, qos: QoS, message: M) -> Option<u16> {
        debug_assert!(qos != QoS::AtMostOnce, "QoS 0 messages are not tracked");
        if !self.has_capacity() {
            return None;
        }
        let id = self.next_free_id()?;
        self.sequence += 1;
        let stage = if qos == QoS::ExactlyOnce {
            Stage::Pubrec(message)
        } else {
            Stage::Puback(message)
        };
        self.in_flight.insert(
            id,
            InFlight {
                stage,
                sequence: self.sequence,
            },
        );
        Some(id)
    }

    /// The next id after the last one handed out that is not in flight; ids are 1..=65535.
    fn next_free_id(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            self.last_id = self.last_id.checked_add(1).unwrap_or(1);
            if !self.in_flight.contains_key(&self.last_id) {
                return Some(self.last_id);
            }
        }
        None
    }

    /// Takes the in-flight entry for `id` out if `take` accepts its stage, giving back what
    /// `take` returns; otherwise leaves it and names the unexpected `ack`.
    fn advance<T>(
        &mut self,
        id: u16,
        ack: &'static str,
        take: impl FnOnce(Stage<M>) -> Result<(T, Option<Stage<M>>), Stage<M>>,
    ) -> Result<T, QosError> {
        let flight = self
            .in_flight
            .remove(&id)
            .ok_or(QosError::PacketIdNotFound(id))?;
        match take(flight.stage) {
            Ok((value, next)) => {
                if let Some(stage) = next {
                    self.in_flight.insert(
                        id,
                        InFlight {
                            stage,
                            sequence: flight.sequence,
                        },
                    );
                }
                Ok(value)
            }
            Err(stage) => {
                self.in_flight.insert(
                    id,
                    InFlight {
                        stage,
                        sequence: flight.sequence,
                    },
                );
                Err(QosError::UnexpectedAck { ack, id })
            }
        }
    }

    /// PUBACK arrived: the QoS 1 message is delivered and returned.
    pub fn on_puback(&mut self, id: u16) -> Result<M, QosError> {
        self.advance(id, "PUBACK", |stage| match stage {
            Stage::Puback(message) => Ok((message, None)),
            other => Err(other),
        })
    }

    /// PUBREC arrived: send PUBREL next. The message is returned, since only the id is needed
    /// from now on. A PUBREC with a failure reason code (5.0) ends the flow instead: use
    /// [`Outbound::on_pubrec_failure`].
    pub fn on_pubrec(&mut self, id: u16) -> Result<M, QosError> {
        self.advance(id, "PUBREC", |stage| match stage {
            Stage::Pubrec(message) => Ok((message, Some(Stage::Pubcomp))),
            other => Err(other),
        })
    }

    /// PUBREC with a failure reason code: the receiver refused the message and the flow ends.
    pub fn on_pubrec_failure(&mut self, id: u16) -> Result<M, QosError> {
        self.advance(id, "PUBREC", |stage| match stage {
            Stage::Pubrec(message) => Ok((message, None)),
            other => Err(other),
        })
    }

    /// PUBCOMP arrived: the QoS 2 flow is complete.
    pub fn on_pubcomp(&mut self, id: u16) -> Result<(), QosError> {
        self.advance(id, "PUBCOMP", |stage| match stage {
            Stage::Pubcomp => Ok(((), None)),
            other => Err(other),
        })
    }

    /// What to send again when the session resumes, in the order first sent.
    pub fn resend(&self) -> Vec<Resend<'_, M>> {
        let mut flights: Vec<_> = self.in_flight.iter().collect();
        flights.sort_by_key(|(_, flight)| flight.sequence);
        flights
            .into_iter()
            .map(|(&id, flight)| match &flight.stage {
                Stage::Puback(message) => Resend::Publish {
                    id,
                    qos: QoS::AtLeastOnce,
                    message,
                },
                Stage::Pubrec(message) => Resend::Publish {
                    id,
                    qos: QoS::ExactlyOnce,
                    message,
                },
                Stage::Pubcomp => Resend::Pubrel { id },
            })
            .collect()
    }

    /// Updates the window when a resumed connection states a new receive maximum. Messages
    /// already in flight stay; new ones wait until the count drops below the new window.
    pub fn set_receive_maximum(&mut self, receive_maximum: u16) {
        self.receive_maximum = receive_maximum.max(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_qos2_id_marked_received_is_not_ingested_again() {
        let mut inbound = Inbound::new(10);
        // Restored after a restart: nothing under way, the id awaits PUBREL.
        inbound.mark_received(3);
        assert_eq!(
            inbound.on_publish(3, QoS::ExactlyOnce),
            Ok(InboundAction::ResendPubrec)
        );
        // Stored while its connection closed: it leaves the ingests under way.
        assert_eq!(
            inbound.on_publish(4, QoS::ExactlyOnce),
            Ok(InboundAction::Ingest)
        );
        inbound.mark_received(4);
        assert_eq!(inbound.unacknowledged(), 2);
        inbound.on_disconnect();
        assert_eq!(
            inbound.on_publish(4, QoS::ExactlyOnce),
            Ok(InboundAction::ResendPubrec)
        );
        assert_eq!(inbound.on_pubrel(3), Ok(()));
        assert_eq!(inbound.on_pubrel(4), Ok(()));
        assert_eq!(inbound.unacknowledged(), 0);
        assert_eq!(
            inbound.on_publish(4, QoS::ExactlyOnce),
            Ok(InboundAction::Ingest),
            "a released id is free for a new message"
        );
    }

    #[test]
    fn qos1_inbound_acks_in_order_after_ingest() {
        let mut inbound = Inbound::new(10);
        assert_eq!(
            inbound.on_publish(1, QoS::AtLeastOnce),
            Ok(InboundAction::Ingest)
        );
        assert_eq!(
            inbound.on_publish(2, QoS::AtLeastOnce),
            Ok(InboundAction::Ingest)
        );
        assert_eq!(inbound.on_ingested(2), Err(QosError::PacketIdNotFound(2)));
        assert_eq!(inbound.on_ingested(1), Ok(InboundAck::Puback(1)));
        assert_eq!(inbound.on_ingested(2), Ok(InboundAck::Puback(2)));
        assert_eq!(inbound.unacknowledged(), 0);
    }

    #[test]
    fn qos2_inbound_is_ingested_once() {
        let mut inbound = Inbound::new(10);
        assert_eq!(
            inbound.on_publish(7, QoS::ExactlyOnce),
            Ok(InboundAction::Ingest)
        );
        // The client re-sends before the PUBREC: nothing more to ingest.
        assert_eq!(
            inbound.on_publish(7, QoS::ExactlyOnce),
            Ok(InboundAction::AlreadyIngesting)
        );
        assert_eq!(inbound.on_ingested(7), Ok(InboundAck::Pubrec(7)));
        // And again after it: PUBREC again, still no ingest.
        assert_eq!(
            inbound.on_publish(7, QoS::ExactlyOnce),
            Ok(InboundAction::ResendPubrec)
        );
        assert_eq!(inbound.unacknowledged(), 1);
        assert_eq!(inbound.on_pubrel(7), Ok(()));
        assert_eq!(inbound.on_pubrel(7), Err(QosError::PacketIdNotFound(7)));
        assert_eq!(
            QosError::PacketIdNotFound(7).reason_code(),
            PACKET_ID_NOT_FOUND
        );
        // Once released, the id starts a new message.
        assert_eq!(
            inbound.on_publish(7, QoS::ExactlyOnce),
            Ok(InboundAction::Ingest)
        );
    }

    #[test]
    fn a_v311_client_is_never_refused_for_the_count_and_ingests_are_bounded_by_the_caller() {
        let mut inbound = Inbound::new(2);
        inbound.on_publish_v311(1, QoS::ExactlyOnce).unwrap();
        inbound.on_ingested(1).unwrap();
        assert!(!inbound.ingest_full(), "a pending PUBREL is not an ingest");
        inbound.on_publish_v311(2, QoS::AtLeastOnce).unwrap();
        inbound.on_publish_v311(3, QoS::AtLeastOnce).unwrap();
        assert!(inbound.ingest_full());
        assert_eq!(inbound.unacknowledged(), 3);
        // Past the maximum: still accepted (the connection stops reading before this).
        assert_eq!(
            inbound.on_publish_v311(4, QoS::AtLeastOnce),
            Ok(InboundAction::Ingest)
        );
        inbound.on_ingested(2).unwrap();
        inbound.on_ingested(3).unwrap();
        inbound.on_ingested(4).unwrap();
        assert!(!inbound.ingest_full());
        // The other checks still apply.
        assert_eq!(
            inbound.on_publish_v311(0, QoS::AtLeastOnce),
            Err(QosError::ZeroPacketId)
        );
    }

    #[test]
    fn receive_maximum_counts_ingests_and_pending_pubrels() {
        let mut inbound = Inbound::new(2);
        inbound.on_publish(1, QoS::ExactlyOnce).unwrap();
        inbound.on_ingested(1).unwrap();
        inbound.on_publish(2, QoS::AtLeastOnce).unwrap();
        let error = inbound.on_publish(3, QoS::AtLeastOnce).unwrap_err();
        assert_eq!(error, QosError::ReceiveMaximumExceeded { limit: 2 });
        assert_eq!(error.reason_code(), RECEIVE_MAXIMUM_EXCEEDED);
        inbound.on_pubrel(1).unwrap();
        assert_eq!(
            inbound.on_publish(3, QoS::AtLeastOnce),
            Ok(InboundAction::Ingest)
        );
        assert_eq!(
            inbound.on_publish(0, QoS::AtLeastOnce),
            Err(QosError::ZeroPacketId)
        );
    }

    #[test]
    fn failed_ingest_releases_the_id_without_ack() {
        let mut inbound = Inbound::new(1);
        inbound.on_publish(5, QoS::ExactlyOnce).unwrap();
        assert_eq!(inbound.on_ingest_failed(5), Ok(QoS::ExactlyOnce));
        assert_eq!(inbound.unacknowledged(), 0);
        assert_eq!(inbound.on_pubrel(5), Err(QosError::PacketIdNotFound(5)));
    }

    #[test]
    fn disconnect_keeps_only_pubrel_state() {
        let mut inbound = Inbound::new(10);
        inbound.on_publish(1, QoS::ExactlyOnce).unwrap();
        inbound.on_ingested(1).unwrap();
        inbound.on_publish(2, QoS::AtLeastOnce).unwrap();
        inbound.on_disconnect();
        assert_eq!(inbound.awaiting_pubrel().collect::<Vec<_>>(), vec![1]);
        assert_eq!(inbound.unacknowledged(), 1);
    }

    #[test]
    fn outbound_window_ids_and_flows() {
        let mut outbound = Outbound::new(2);
        let a = outbound.send(QoS::AtLeastOnce, "a").unwrap();
        let b = outbound.send(QoS::ExactlyOnce, "b").unwrap();
        assert_ne!(a, b);
        assert!(!outbound.has_capacity());
        assert_eq!(outbound.send(QoS::AtLeastOnce, "c"), None);
        assert_eq!(
            outbound.on_pubcomp(b),
            Err(QosError::UnexpectedAck {
                ack: "PUBCOMP",
                id: b
            })
        );
        assert_eq!(outbound.on_pubrec(b), Ok("b"));
        assert_eq!(
            outbound.resend(),
            vec![
                Resend::Publish {
                    id: a,
                    qos: QoS::AtLeastOnce,
                    message: &"a"
                },
                Resend::Pubrel { id: b },
            ]
        );
        assert_eq!(outbound.on_puback(a), Ok("a"));
        assert_eq!(outbound.on_puback(a), Err(QosError::PacketIdNotFound(a)));
        assert_eq!(outbound.on_pubcomp(b), Ok(()));
        assert_eq!(outbound.in_flight(), 0);
    }

    #[test]
    fn outbound_ids_skip_those_in_flight_and_wrap_without_zero() {
        let mut outbound = Outbound::new(u16::MAX);
        let first = outbound.send(QoS::AtLeastOnce, 0u32).unwrap();
        for n in 1..u32::from(u16::MAX) {
            let id = outbound.send(QoS::AtLeastOnce, n).unwrap();
            assert_ne!(id, 0);
        }
        // Every id is taken: the window is full.
        assert!(!outbound.has_capacity());
        outbound.on_puback(first).unwrap();
        assert_eq!(outbound.send(QoS::AtLeastOnce, 99), Some(first));
    }
}
