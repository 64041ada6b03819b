//! Sparse indexes of one segment: offset -> file position, and timestamp -> offset.
//!
//! Both are derived data. They live in memory while a segment is written, are written to disk
//! when the segment closes or the log shuts down cleanly, and are rebuilt from the segment
//! whenever they are missing, stale or invalid. So they never need an fsync on the append path.
//!
//! On-disk format (covered by the data directory's format version; pinned by a test):
//! - `<base:020>.index`: entries of 8 bytes, big-endian `relative_offset: u32`,
//!   `position: u32`, both strictly increasing.
//! - `<base:020>.timeindex`: entries of 16 bytes, big-endian `max_timestamp: i64`,
//!   `relative_offset: u32`, `position: u32`, all strictly increasing. An entry says: every
//!   batch that starts before `position` has a max timestamp at most `max_timestamp`.

/// One offset index entry: the batch at `position` starts at `base + relative_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OffsetEntry {
    pub(crate) relative_offset: u32,
    pub(crate) position: u32,
}

/// One time index entry; see the module docs for its meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    pub(crate) max_timestamp: i64,
    pub(crate) relative_offset: u32,
    pub(crate) position: u32,
}

/// What the two kinds of entries have in common: a fixed big-endian encoding, a position in
/// the segment, and every field strictly increasing from one entry to the next.
pub(crate) trait Entry: Copy + std::fmt::Debug {
    const BYTES: usize;
    fn position(&self) -> u32;
    /// Whether `self` may come after `previous`: every field strictly greater.
    fn follows(&self, previous: &Self) -> bool;
    fn write(&self, out: &mut Vec<u8>);
    /// Reads an entry from exactly `Self::BYTES` bytes.
    fn read(bytes: &[u8]) -> Self;
}

impl Entry for OffsetEntry {
    const BYTES: usize = 8;

    fn position(&self) -> u32 {
        self.position
    }

    fn follows(&self, previous: &Self) -> bool {
        self.relative_offset > previous.relative_offset && self.position > previous.position
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.relative_offset.to_be_bytes());
        out.extend_from_slice(&self.position.to_be_bytes());
    }

    fn read(bytes: &[u8]) -> Self {
        OffsetEntry {
            relative_offset: read_u32(&bytes[0..4]),
            position: read_u32(&bytes[4..8]),
        }
    }
}

impl Entry for TimeEntry {
    const BYTES: usize = 16;

    fn position(&self) -> u32 {
        self.position
    }

    fn follows(&self, previous: &Self) -> bool {
        self.max_timestamp > previous.max_timestamp
            && self.relative_offset > previous.relative_offset
            && self.position > previous.position
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.max_timestamp.to_be_bytes());
        out.extend_from_slice(&self.relative_offset.to_be_bytes());
        out.extend_from_slice(&self.position.to_be_bytes());
    }

    fn read(bytes: &[u8]) -> Self {
        let mut timestamp = [0u8; 8];
        timestamp.copy_from_slice(&bytes[0..8]);
        TimeEntry {
            max_timestamp: i64::from_be_bytes(timestamp),
            relative_offset: read_u32(&bytes[8..12]),
            position: read_u32(&bytes[12..16]),
        }
    }
}

fn read_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// A sparse index: entries in strictly increasing order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SparseIndex<E> {
    entries: Vec<E>,
}

/// Offset index: one entry per `index_interval_bytes` of log data.
pub(crate) type OffsetIndex = SparseIndex<OffsetEntry>;
/// Time index: entries where the running max timestamp grew, at most one per
/// `index_interval_bytes`.
pub(crate) type TimeIndex = SparseIndex<TimeEntry>;

impl<E> Default for SparseIndex<E> {
    fn default() -> Self {
        SparseIndex {
            entries: Vec::new(),
        }
    }
}

impl<E: Entry> SparseIndex<E> {
    /// Appends `entry` if it follows the last one, and reports whether it did. A reopened
    /// segment rescans batches its loaded index already covers; those add nothing.
    pub(crate) fn push_if_new(&mut self, entry: E) -> bool {
        if self.entries.last().is_some_and(|last| !entry.follows(last)) {
            return false;
        }
        self.entries.push(entry);
        true
    }

    pub(crate) fn last(&self) -> Option<E> {
        self.entries.last().copied()
    }

    /// Drops entries at or beyond `position`, after the segment was truncated there.
    pub(crate) fn truncate_to_position(&mut self, position: u32) {
        let keep = self
            .entries
            .partition_point(|entry| entry.position() < position);
        self.entries.truncate(keep);
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * E::BYTES);
        for entry in &self.entries {
            entry.write(&mut out);
        }
        out
    }

    /// Decodes an index file, checking that it could describe a segment of `segment_bytes`.
    pub(crate) fn decode(bytes: &[u8], segment_bytes: u64) -> Result<Self, &'static str> {
        if !bytes.len().is_multiple_of(E::BYTES) {
            return Err("length is not a whole number of entries");
        }
        let mut index = SparseIndex::default();
        for chunk in bytes.chunks_exact(E::BYTES) {
            let entry = E::read(chunk);
            if u64::from(entry.position()) >= segment_bytes {
                return Err("entry points past the end of the segment");
            }
            if !index.push_if_new(entry) {
                return Err("entries do not increase");
            }
        }
        Ok(index)
    }
}

impl OffsetIndex {
    /// The entry of the last indexed batch starting at or before `relative_offset`; the start
    /// of the segment when none does.
    pub(crate) fn lookup(&self, relative_offset: u32) -> OffsetEntry {
        let after = self
            .entries
            .partition_point(|entry| entry.relative_offset <= relative_offset);
        match after {
            0 => OffsetEntry {
                relative_offset: 0,
                position: 0,
            },
            n => self.entries[n - 1],
        }
    }
}

impl TimeIndex {
    /// Where to start scanning for the first record with a timestamp at or after `target`:
    /// the position of the last entry whose max timestamp is below `target`, because every
    /// batch before it is too old. The start of the segment when there is none.
    pub(crate) fn scan_start(&self, target: i64) -> u32 {
        let below = self
            .entries
            .partition_point(|entry| entry.max_timestamp < target);
        match below {
            0 => 0,
            n => self.entries[n - 1].position,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn offset_entry(relative_offset: u32, position: u32) -> OffsetEntry {
        OffsetEntry {
            relative_offset,
            position,
        }
    }

    #[test]
    fn pinned_bytes() {
        let mut offsets = OffsetIndex::default();
        assert!(offsets.push_if_new(offset_entry(1, 4096)));
        assert_eq!(offsets.encode(), [0, 0, 0, 1, 0, 0, 0x10, 0]);
        let mut times = TimeIndex::default();
        assert!(times.push_if_new(TimeEntry {
            max_timestamp: 258,
            relative_offset: 2,
            position: 3,
        }));
        assert_eq!(
            times.encode(),
            [0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 2, 0, 0, 0, 3]
        );
    }

    #[test]
    fn decode_rejects_bad_files() {
        assert!(OffsetIndex::decode(&[0; 7], 100).is_err());
        let mut offsets = OffsetIndex::default();
        assert!(offsets.push_if_new(offset_entry(1, 50)));
        assert!(OffsetIndex::decode(&offsets.encode(), 50).is_err());
        let mut doubled = offsets.encode();
        doubled.extend_from_slice(&offsets.encode());
        assert!(OffsetIndex::decode(&doubled, 100).is_err());
        assert!(TimeIndex::decode(&[1; 15], 100).is_err());
    }

    proptest! {
        /// Lookup returns the greatest entry at or below the target, as a linear scan would.
        #[test]
        fn offset_lookup_matches_linear_scan(
            gaps in proptest::collection::vec((1u32..1000, 1u32..100_000), 0..200),
            target in 0u32..300_000,
        ) {
            let mut index = OffsetIndex::default();
            let (mut offset, mut position) = (0u32, 0u32);
            for (offset_gap, position_gap) in gaps {
                offset += offset_gap;
                position += position_gap;
                prop_assert!(index.push_if_new(offset_entry(offset, position)));
            }
            let expected = index
                .entries
                .iter()
                .rev()
                .find(|entry| entry.relative_offset <= target)
                .copied()
                .unwrap_or(offset_entry(0, 0));
            prop_assert_eq!(index.lookup(target), expected);
            let decoded = OffsetIndex::decode(&index.encode(), u64::from(position) + 1).unwrap();
            prop_assert_eq!(decoded, index);
        }

        /// The scan start never skips a batch whose max timestamp reaches the target.
        #[test]
        fn time_scan_start_is_safe_and_tight(
            steps in proptest::collection::vec((1i64..1000, 1u32..100, 1u32..10_000), 0..200),
            target in -10i64..200_000,
        ) {
            let mut index = TimeIndex::default();
            let (mut timestamp, mut offset, mut position) = (0i64, 0u32, 0u32);
            for (time_gap, offset_gap, position_gap) in steps {
                timestamp += time_gap;
                offset += offset_gap;
                position += position_gap;
                let entry = TimeEntry { max_timestamp: timestamp, relative_offset: offset, position };
                prop_assert!(index.push_if_new(entry));
            }
            let start = index.scan_start(target);
            // Safe: the entry at `start` (if any) has a timestamp below target.
            if start > 0 {
                let entry = index.entries.iter().find(|e| e.position == start).unwrap();
                prop_assert!(entry.max_timestamp < target);
            }
            // Tight: no later entry is also below target.
            prop_assert!(index
                .entries
                .iter()
                .filter(|e| e.position > start)
                .all(|e| e.max_timestamp >= target));
            let decoded = TimeIndex::decode(&index.encode(), u64::from(position) + 1).unwrap();
            prop_assert_eq!(decoded, index);
        }
    }
}
