//! Retention planning: which closed segments of a partition may go, as a pure function of
//! their sizes and timestamps, the limits and the time. The partition log does the deleting.
//!
//! Kafka's rules: only a prefix of closed segments is ever deleted (the active segment stays);
//! by time, a segment goes when its largest timestamp is older than the limit; by size, the
//! oldest segments go while the partition would still hold at least the limit without them.

/// What the planner needs to know of one closed segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSummary {
    pub base_offset: u64,
    /// One past the segment's last offset.
    pub next_offset: u64,
    pub size_bytes: u64,
    /// Largest batch max timestamp, in ms.
    pub max_timestamp: i64,
}

/// The limits one retention pass applies; `None` switches a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionLimits {
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
}

/// How many of the oldest `closed` segments to delete. `total_bytes` is the size of the whole
/// partition, active segment included; `deletable_below` (when set) protects every segment
/// that is not wholly below that offset, such as data not yet archived.
pub fn segments_to_delete(
    closed: &[SegmentSummary],
    total_bytes: u64,
    limits: RetentionLimits,
    now_ms: i64,
    deletable_below: Option<u64>,
) -> usize {
    let mut remaining_bytes = total_bytes;
    let mut count = 0;
    for segment in closed {
        if deletable_below.is_some_and(|bound| segment.next_offset > bound) {
            break;
        }
        let expired = limits.retention_ms.is_some_and(|retention_ms| {
            let retention_ms = i64::try_from(retention_ms).unwrap_or(i64::MAX);
            now_ms.saturating_sub(segment.max_timestamp) > retention_ms
        });
        let oversized = limits.retention_bytes.is_some_and(|retention_bytes| {
            remaining_bytes.saturating_sub(segment.size_bytes) >= retention_bytes
        });
        if !(expired || oversized) {
            break;
        }
        remaining_bytes -= segment.size_bytes;
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(specs: &[(u64, i64)]) -> Vec<SegmentSummary> {
        let mut base = 0;
        specs
            .iter()
            .map(|&(size_bytes, max_timestamp)| {
                let segment = SegmentSummary {
                    base_offset: base,
                    next_offset: base + 10,
                    size_bytes,
                    max_timestamp,
                };
                base += 10;
                segment
            })
            .collect()
    }

    #[test]
    fn time_deletes_only_an_expired_prefix() {
        let closed = segments(&[(100, 1_000), (100, 5_000), (100, 1_000)]);
        let limits = RetentionLimits {
            retention_ms: Some(2_000),
            retention_bytes: None,
        };
        // The third segment is old too, but the second is not, so deletion stops there.
        assert_eq!(segments_to_delete(&closed, 400, limits, 4_000, None), 1);
        assert_eq!(segments_to_delete(&closed, 400, limits, 3_000, None), 0);
        assert_eq!(segments_to_delete(&closed, 400, limits, 10_000, None), 3);
    }

    #[test]
    fn size_keeps_at_least_the_limit() {
        let closed = segments(&[(100, 0), (100, 0), (100, 0)]);
        let limits = RetentionLimits {
            retention_ms: None,
            retention_bytes: Some(250),
        };
        // 400 bytes in all: dropping one leaves 300 >= 250; dropping two would leave 200.
        assert_eq!(segments_to_delete(&closed, 400, limits, 0, None), 1);
        let limits = RetentionLimits {
            retention_ms: None,
            retention_bytes: Some(100),
        };
        assert_eq!(segments_to_delete(&closed, 400, limits, 0, None), 3);
    }

    #[test]
    fn bound_protects_unarchived_segments() {
        let closed = segments(&[(100, 0), (100, 0), (100, 0)]);
        let limits = RetentionLimits {
            retention_ms: Some(1),
            retention_bytes: None,
        };
        assert_eq!(segments_to_delete(&closed, 400, limits, 100, Some(20)), 2);
        assert_eq!(segments_to_delete(&closed, 400, limits, 100, Some(19)), 1);
        assert_eq!(
            segments_to_delete(&closed, 400, RetentionLimits::default(), 100, None),
            0
        );
    }
}
