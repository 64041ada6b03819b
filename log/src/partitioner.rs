//! Kafka's default partitioner for keyed records: `murmur2(key) & 0x7fffffff % partitions`.
//!
//! Every place Silt picks a partition from a key (MQTT ingest, the uplink into the core) uses
//! this, so a key lands in the same partition as a Kafka producer would put it, and per-key
//! order holds across producers of both kinds.

/// Kafka's `Utils.murmur2`: MurmurHash2, 32-bit, seed `0x9747b28c`, as a signed value.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut hash = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        hash = hash.wrapping_mul(M);
        hash ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (index, &byte) in tail.iter().enumerate().rev() {
            hash ^= u32::from(byte) << (8 * index);
        }
        hash = hash.wrapping_mul(M);
    }
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(M);
    hash ^= hash >> 15;
    hash as i32
}

/// The partition Kafka's default partitioner picks for `key` among `partitions` (at least 1).
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    ((murmur2(key) & 0x7fff_ffff) as u32) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors of Kafka's own `UtilsTest.testMurmur2`, also what kafka-python computes.
    #[test]
    fn matches_kafka() {
        let cases: [(&[u8], i32); 7] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
            (b"", 275_646_681),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key), expected, "{:?}", String::from_utf8_lossy(key));
        }
        assert_eq!(murmur2(b"sensors/room1/temp") as u32, 1_263_728_998);
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        assert_eq!(partition_for_key(b"abc", 1), 0);
        assert_eq!(partition_for_key(b"abc", 7), 479_470_107 % 7);
        // Negative hashes are made positive by masking, as Kafka's `toPositive` does.
        assert_eq!(
            partition_for_key(b"21", 10),
            ((-973_932_308i32 & 0x7fff_ffff) % 10) as u32
        );
        for partitions in 1..50 {
            assert!(partition_for_key(b"key", partitions) < partitions);
        }
    }
}
