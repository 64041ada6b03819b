//! Garbage collection of a `file://` store's interrupted uploads: `LocalFileSystem` stages every
//! upload as `<key>#<n>` and renames it on completion, so a kill leaves the staging file, which
//! the store's LIST does not show. GC removes those past the grace period and keeps younger
//! ones (an upload in progress), and never touches what the manifest names.

use object_store::{ObjectStoreExt, PutPayload};
use silt_tiering::{ArchiveStore, GcPolicy, Manifest, gc};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_file_uploads_are_removed_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("objects");
    let store = ArchiveStore::open(&format!("file://{}", root.display())).unwrap();
    let partition_dir = root.join(gc::partition_dir("t", 3)).join("date=2026-11-22");
    std::fs::create_dir_all(&partition_dir).unwrap();
    let staged = partition_dir.join("00000000000000000000-00000000000000000009-ab.parquet#1");
    std::fs::write(&staged, vec![7u8; 300]).unwrap();
    // A crash during a manifest commit leaves the manifest's own staging file.
    let mut manifest = Manifest::new("t", 3);
    manifest.commit(&store).await.unwrap();
    let manifest_staged = root.join(format!("{}#2", Manifest::key("t", 3)));
    std::fs::write(&manifest_staged, b"{").unwrap();
    // Another partition's staging file is not this partition's business.
    let neighbour_dir = root.join(gc::partition_dir("t", 30));
    std::fs::create_dir_all(&neighbour_dir).unwrap();
    let neighbour = neighbour_dir.join("x.parquet#1");
    std::fs::write(&neighbour, b"x").unwrap();
    // A real object whose name merely contains '#' followed by letters is an object, not staging.
    let odd_key = store.key(&format!("{}/odd#name.parquet", gc::partition_dir("t", 3)));
    store
        .store()
        .put(&odd_key, PutPayload::from(vec![1u8; 5]))
        .await
        .unwrap();

    let now = silt_log::now_ms();
    let report = gc::collect(&store, &mut manifest, &GcPolicy::default(), now)
        .await
        .unwrap();
    assert_eq!(report.uploads_aborted, 0, "{report:?}: young uploads stay");
    assert!(staged.exists() && manifest_staged.exists());

    let later = now + 2 * gc::GC_GRACE_MS_DEFAULT;
    let report = gc::collect(&store, &mut manifest, &GcPolicy::default(), later)
        .await
        .unwrap();
    assert_eq!(report.uploads_aborted, 2, "{report:?}");
    assert_eq!(
        report.orphans_deleted, 1,
        "{report:?}: the unnamed odd#name object"
    );
    assert_eq!(report.bytes_freed, 300 + 1 + 5, "{report:?}");
    assert!(!staged.exists() && !manifest_staged.exists());
    assert!(neighbour.exists(), "another partition's file stays");
    assert!(
        Manifest::load(&store, "t", 3).await.unwrap().is_some(),
        "the manifest itself stays"
    );
}
