//! Idempotent producers: per partition, the last sequence numbers each producer id wrote, so
//! a retried batch is answered with its first offsets instead of being written twice, and a
//! gap in sequences is refused. A plain state machine; the broker rebuilds it from the log's
//! batch headers the first time a partition sees an idempotent batch after a start, as Kafka
//! rebuilds its producer state from the log.

use std::collections::{HashMap, VecDeque};

use silt_gateways::kafka::KafkaError;

/// Batches remembered per producer for duplicate detection: Kafka's
/// `max.in.flight.requests.per.connection` limit for idempotence.
const RECENT_BATCHES_MAX: usize = 5;

/// A batch written by one producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProducerBatch {
    pub(crate) producer_id: i64,
    pub(crate) epoch: i16,
    pub(crate) first_sequence: i32,
    pub(crate) last_sequence: i32,
    pub(crate) base_offset: u64,
}

#[derive(Debug, Default)]
struct ProducerEntry {
    epoch: i16,
    recent: VecDeque<ProducerBatch>,
}

/// What to do with an incoming idempotent batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// Append it.
    Append,
    /// A retry of a batch already written at this base offset: answer with it, append nothing.
    Duplicate { base_offset: u64 },
}

/// One partition's producer states.
#[derive(Debug, Default)]
pub(crate) struct PartitionProducers {
    producers: HashMap<i64, ProducerEntry>,
    /// Whether the state was rebuilt from the log since the node started.
    pub(crate) loaded: bool,
}

impl PartitionProducers {
    /// Decides on a batch of `producer_id`/`epoch` with sequences `first..=last`.
    pub(crate) fn check(
        &self,
        producer_id: i64,
        epoch: i16,
        first_sequence: i32,
        last_sequence: i32,
    ) -> Result<Check, KafkaError> {
        let Some(entry) = self.producers.get(&producer_id) else {
            // Unknown here (new, or its batches were deleted by retention): accept, as Kafka
            // does since KIP-360.
            return Ok(Check::Append);
        };
        if epoch < entry.epoch {
            return Err(KafkaError::InvalidProducerEpoch);
        }
        if epoch > entry.epoch {
            return if first_sequence == 0 {
                Ok(Check::Append)
            } else {
                Err(KafkaError::OutOfOrderSequence)
            };
        }
        if let Some(batch) = entry.recent.iter().find(|batch| {
            batch.first_sequence == first_sequence && batch.last_sequence == last_sequence
        }) {
            return Ok(Check::Duplicate {
                base_offset: batch.base_offset,
            });
        }
        let last = entry.recent.back().map_or(-1, |batch| batch.last_sequence);
        let expected = if last == i32::MAX { 0 } else { last + 1 };
        if first_sequence == expected {
            Ok(Check::Append)
        } else {
            Err(KafkaError::OutOfOrderSequence)
        }
    }

    /// Records a batch that was appended (or read back from the log).
    pub(crate) fn record(&mut self, batch: ProducerBatch) {
        let entry = self.producers.entry(batch.producer_id).or_default();
        if batch.epoch != entry.epoch {
            entry.epoch = batch.epoch;
            entry.recent.clear();
        }
        entry.recent.push_back(batch);
        while entry.recent.len() > RECENT_BATCHES_MAX {
            entry.recent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(first: i32, last: i32, offset: u64) -> ProducerBatch {
        ProducerBatch {
            producer_id: 7,
            epoch: 0,
            first_sequence: first,
            last_sequence: last,
            base_offset: offset,
        }
    }

    #[test]
    fn retries_are_duplicates_and_gaps_are_refused() {
        let mut state = PartitionProducers::default();
        assert_eq!(state.check(7, 0, 0, 4), Ok(Check::Append));
        state.record(batch(0, 4, 100));
        assert_eq!(state.check(7, 0, 5, 9), Ok(Check::Append));
        state.record(batch(5, 9, 105));
        assert_eq!(
            state.check(7, 0, 0, 4),
            Ok(Check::Duplicate { base_offset: 100 })
        );
        assert_eq!(
            state.check(7, 0, 5, 9),
            Ok(Check::Duplicate { base_offset: 105 })
        );
        assert_eq!(
            state.check(7, 0, 12, 13),
            Err(KafkaError::OutOfOrderSequence)
        );
        assert_eq!(state.check(7, 1, 0, 0), Ok(Check::Append), "a new epoch");
        assert_eq!(state.check(7, 1, 3, 3), Err(KafkaError::OutOfOrderSequence));
        state.record(ProducerBatch {
            epoch: 1,
            ..batch(0, 0, 110)
        });
        assert_eq!(
            state.check(7, 0, 10, 10),
            Err(KafkaError::InvalidProducerEpoch)
        );
        assert_eq!(
            state.check(8, 0, 3, 3),
            Ok(Check::Append),
            "unknown producer"
        );
    }

    #[test]
    fn only_the_last_five_batches_are_remembered() {
        let mut state = PartitionProducers::default();
        for n in 0..7 {
            state.record(batch(n, n, n as u64));
        }
        assert_eq!(
            state.check(7, 0, 6, 6),
            Ok(Check::Duplicate { base_offset: 6 })
        );
        assert_eq!(
            state.check(7, 0, 2, 2),
            Ok(Check::Duplicate { base_offset: 2 })
        );
        assert_eq!(state.check(7, 0, 1, 1), Err(KafkaError::OutOfOrderSequence));
    }
}
