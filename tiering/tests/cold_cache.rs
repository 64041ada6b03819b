//! The chunk cache under a bound smaller than one chunk (`tiering.cold_cache_bytes = 0`): it
//! keeps the chunk fetched last, so a read slicing many ranges out of one row group GETs it
//! once, and evicts it for the next one.

use std::sync::Arc;

use bytes::Bytes;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use silt_tiering::ChunkCache;

#[tokio::test]
async fn a_cache_smaller_than_a_chunk_keeps_the_chunk_fetched_last() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let key = Path::from("topic=t/partition=0/object.parquet");
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    store
        .put(&key, Bytes::from(data.clone()).into())
        .await
        .unwrap();
    let cache = ChunkCache::new(0);

    let (first, fetched) = cache.get(&store, &key, 0..2048).await.unwrap();
    assert!(fetched);
    assert_eq!(&first[..], &data[..2048]);
    assert!(cache.contains(&key, 0), "the chunk fetched last stays");
    assert_eq!(cache.bytes(), 2048);

    let (again, fetched) = cache.get(&store, &key, 0..2048).await.unwrap();
    assert!(
        !fetched,
        "a second range of the same chunk is served from memory"
    );
    assert_eq!(again, first);

    let (second, fetched) = cache.get(&store, &key, 2048..4096).await.unwrap();
    assert!(fetched);
    assert_eq!(&second[..], &data[2048..]);
    assert!(!cache.contains(&key, 0), "the older chunk is evicted");
    assert!(cache.contains(&key, 2048));
    assert_eq!(cache.bytes(), 2048, "at most the one chunk over the bound");

    let (_, fetched) = cache.get(&store, &key, 0..2048).await.unwrap();
    assert!(fetched, "an evicted chunk is fetched again");
}

#[tokio::test]
async fn a_bounded_cache_stays_within_its_bound() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let key = Path::from("object.parquet");
    store
        .put(&key, Bytes::from(vec![7u8; 10_000]).into())
        .await
        .unwrap();
    let cache = ChunkCache::new(3_000);
    for start in (0..10_000u64).step_by(1_000) {
        cache.get(&store, &key, start..start + 1_000).await.unwrap();
        assert!(cache.bytes() <= 3_000, "{} over 3000", cache.bytes());
    }
    assert!(cache.contains(&key, 9_000) && cache.contains(&key, 7_000));
    assert!(!cache.contains(&key, 6_000), "least recently used evicted");
}
