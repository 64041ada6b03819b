//! A latency histogram of fixed size with bounded relative error, in the manner of HDR
//! histograms: a load run records millions of acknowledgement latencies, and keeping every
//! sample would make memory grow with the run's length.
//!
//! Values (nanoseconds) below `2 * SUB_BUCKETS` are counted exactly. Above that, each power of
//! two is split into `SUB_BUCKETS` equal buckets, so a bucket is at most 1/128 of its values
//! wide: a percentile is reported as its bucket's highest value, at most 0.8% above the true
//! sample. The maximum and minimum are kept exactly.

use std::time::Duration;

/// Buckets per power of two; 128 bounds the relative error of a percentile by 1/128.
const SUB_BUCKETS: u64 = 128;
/// log2 of [`SUB_BUCKETS`].
const SUB_BUCKET_BITS: u32 = 7;
/// Values at or above 2^`MAGNITUDE_MAX` ns (about 18 minutes) share the top bucket; the
/// exact maximum is still kept, and no acknowledgement wait comes close.
const MAGNITUDE_MAX: u32 = 40;
/// Values below this are their own bucket.
const EXACT_BELOW: u64 = 2 * SUB_BUCKETS;
/// Buckets in all: the exact range, then `SUB_BUCKETS` for each power of two from
/// 2^(`SUB_BUCKET_BITS` + 1) up to the cap.
const BUCKETS: usize =
    (EXACT_BELOW + (MAGNITUDE_MAX - SUB_BUCKET_BITS - 1) as u64 * SUB_BUCKETS) as usize;

/// Counts of latencies, mergeable across clients.
#[derive(Debug, Clone)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
    min_ns: u64,
    max_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    /// An empty histogram (34 KiB, whatever is recorded into it).
    pub(crate) fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }

    /// Counts one latency.
    pub(crate) fn record(&mut self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(nanos)] += 1;
        self.total += 1;
        self.min_ns = self.min_ns.min(nanos);
        self.max_ns = self.max_ns.max(nanos);
    }

    /// Adds every count of `other`, as if its values had been recorded here.
    pub(crate) fn merge(&mut self, other: &Histogram) {
        for (count, more) in self.counts.iter_mut().zip(&other.counts) {
            *count += more;
        }
        self.total += other.total;
        self.min_ns = self.min_ns.min(other.min_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// How many latencies were recorded.
    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        self.total
    }

    /// The largest latency recorded, exactly; `None` when empty.
    pub(crate) fn max(&self) -> Option<Duration> {
        (self.total > 0).then(|| Duration::from_nanos(self.max_ns))
    }

    /// The smallest value at or below which `percentile` % of the recorded latencies lie,
    /// rounded up to the top of its bucket and never above the recorded maximum; `None`
    /// when empty. `percentile` is clamped to 0..=100.
    pub(crate) fn percentile(&self, percentile: f64) -> Option<Duration> {
        if self.total == 0 {
            return None;
        }
        let fraction = (percentile / 100.0).clamp(0.0, 1.0);
        // The rank of the sample wanted, 1-based: the nearest-rank definition, so p100 is the
        // maximum and p0 the minimum.
        let rank = ((fraction * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (bucket, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                // The top bucket also holds everything above the cap: only the maximum
                // says how far above.
                let top = if bucket == BUCKETS - 1 {
                    self.max_ns
                } else {
                    highest_in(bucket).clamp(self.min_ns, self.max_ns)
                };
                return Some(Duration::from_nanos(top));
            }
        }
        // The counts sum to `total`, so the walk above always reaches `rank`.
        unreachable!("histogram counts sum to less than its total")
    }
}

/// The bucket that counts `nanos`.
fn bucket_of(nanos: u64) -> usize {
    if nanos < EXACT_BELOW {
        return nanos as usize;
    }
    let magnitude = (63 - nanos.leading_zeros()).min(MAGNITUDE_MAX - 1);
    // How far the value is shifted so its top SUB_BUCKET_BITS + 1 bits remain: >= 1 here.
    let shift = magnitude - SUB_BUCKET_BITS;
    let top = (nanos >> shift).min(2 * SUB_BUCKETS - 1);
    (EXACT_BELOW + (shift as u64 - 1) * SUB_BUCKETS + (top - SUB_BUCKETS)) as usize
}

/// The largest value counted by `bucket`.
fn highest_in(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < EXACT_BELOW {
        return bucket;
    }
    let shift = (bucket - EXACT_BELOW) / SUB_BUCKETS + 1;
    let top = SUB_BUCKETS + (bucket - EXACT_BELOW) % SUB_BUCKETS;
    ((top + 1) << shift) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(value: u64) -> Duration {
        Duration::from_micros(value)
    }

    /// `actual` is at or above `expected` and within the histogram's relative error.
    fn assert_close(actual: Duration, expected: Duration) {
        let actual = actual.as_nanos() as f64;
        let expected = expected.as_nanos() as f64;
        assert!(
            actual >= expected && actual <= expected * (1.0 + 1.0 / SUB_BUCKETS as f64),
            "{actual} ns is not within 1/{SUB_BUCKETS} above {expected} ns"
        );
    }

    #[test]
    fn an_empty_histogram_has_no_percentiles() {
        let histogram = Histogram::new();
        assert_eq!(histogram.count(), 0);
        assert_eq!(histogram.percentile(50.0), None);
        assert_eq!(histogram.max(), None);
    }

    #[test]
    fn percentiles_of_a_uniform_spread_are_within_the_bucket_error() {
        let mut histogram = Histogram::new();
        // 1 ms to 10 ms in 1 us steps, recorded backwards: the order must not matter.
        for value in (1_000..=10_000).rev() {
            histogram.record(micros(value));
        }
        assert_eq!(histogram.count(), 9_001);
        // Nearest rank: the 4,501st of 9,001 values is 5,500 us; the 8,911th is 9,910 us.
        assert_close(histogram.percentile(50.0).unwrap(), micros(5_500));
        assert_close(histogram.percentile(99.0).unwrap(), micros(9_910));
        assert_eq!(histogram.percentile(100.0).unwrap(), micros(10_000));
        assert_eq!(histogram.max().unwrap(), micros(10_000));
        assert_close(histogram.percentile(0.0).unwrap(), micros(1_000));
    }

    #[test]
    fn a_tail_of_slow_acks_shows_in_p99_and_not_in_p50() {
        let mut histogram = Histogram::new();
        for _ in 0..980 {
            histogram.record(micros(200));
        }
        for _ in 0..20 {
            histogram.record(micros(50_000));
        }
        assert_close(histogram.percentile(50.0).unwrap(), micros(200));
        assert_close(histogram.percentile(95.0).unwrap(), micros(200));
        assert_close(histogram.percentile(99.0).unwrap(), micros(50_000));
        assert_eq!(histogram.max().unwrap(), micros(50_000));
    }

    #[test]
    fn small_values_are_exact_and_huge_ones_are_capped_but_max_is_kept() {
        let mut histogram = Histogram::new();
        histogram.record(Duration::from_nanos(3));
        histogram.record(Duration::from_secs(100_000));
        assert_eq!(histogram.percentile(50.0).unwrap(), Duration::from_nanos(3));
        assert_eq!(
            histogram.percentile(100.0).unwrap(),
            Duration::from_secs(100_000)
        );
        assert_eq!(histogram.max().unwrap(), Duration::from_secs(100_000));
    }

    #[test]
    fn merging_equals_recording_everything_in_one() {
        let mut one = Histogram::new();
        let mut left = Histogram::new();
        let mut right = Histogram::new();
        for value in 1..=5_000 {
            one.record(micros(value * 7));
            if value % 3 == 0 {
                left.record(micros(value * 7));
            } else {
                right.record(micros(value * 7));
            }
        }
        left.merge(&right);
        assert_eq!(left.count(), one.count());
        for percentile in [0.0, 1.0, 50.0, 90.0, 99.0, 99.9, 100.0] {
            assert_eq!(left.percentile(percentile), one.percentile(percentile));
        }
    }

    #[test]
    fn every_bucket_holds_exactly_the_values_that_map_to_it() {
        // Bucket boundaries: the highest value of a bucket maps to it, and one more maps to
        // the next bucket, across the exact range and every power of two up to the cap.
        for bucket in 0..BUCKETS - 1 {
            let highest = highest_in(bucket);
            assert_eq!(
                bucket_of(highest),
                bucket,
                "highest value of bucket {bucket}"
            );
            assert_eq!(
                bucket_of(highest + 1),
                bucket + 1,
                "value after bucket {bucket}"
            );
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }
}
