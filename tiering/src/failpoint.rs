//! Failpoints for crash tests: named places where a test can make the process die by SIGKILL.
//!
//! [`hit`] kills the process (a real `kill -9`: no destructors, no flush, no buffered output)
//! when the environment variable [`FAILPOINT_ENV`] equals the failpoint's name, and does
//! nothing otherwise. The variable is read once per process. The points in this crate:
//!
//! | name | where | what a crash there leaves |
//! |------|-------|---------------------------|
//! | `offload.after_upload` | `offload_next`, object uploaded, manifest not committed | an orphan object for GC |
//! | `offload.after_commit` | end of `offload_next`, the caller's local delete not done | data in both tiers |
//! | `retention.after_manifest` | `retention::enforce`, log start committed in the manifest, local start and objects not yet moved | keys in `expired`, a local log start behind the manifest's |
//! | `compact.after_upload` | `compact_next`, merged object uploaded, manifest not committed | an orphan object for GC |
//! | `compact.after_commit` | `compact_next`, manifest committed with the old objects in `replaced` | replaced objects GC deletes after the grace |
//! | `gc.mid_delete` | `gc::collect`, after the first of several deletions | orphans or expired keys still to delete |
//!
//! The core's offload loop may add its own points with the same function.

use std::sync::OnceLock;

/// The environment variable naming the failpoint to die at.
pub const FAILPOINT_ENV: &str = "SILT_TIER_FAILPOINT";

/// Object uploaded, manifest not yet committed.
pub const OFFLOAD_AFTER_UPLOAD: &str = "offload.after_upload";
/// Manifest committed; the caller's local deletion not yet done.
pub const OFFLOAD_AFTER_COMMIT: &str = "offload.after_commit";
/// Log start advanced in the committed manifest; expired objects not yet deleted.
pub const RETENTION_AFTER_MANIFEST: &str = "retention.after_manifest";
/// Merged object uploaded, manifest not yet committed.
pub const COMPACT_AFTER_UPLOAD: &str = "compact.after_upload";
/// Manifest naming the merged object committed; the replaced objects not yet deleted.
pub const COMPACT_AFTER_COMMIT: &str = "compact.after_commit";
/// Some garbage deleted, the rest not.
pub const GC_MID_DELETE: &str = "gc.mid_delete";

static ARMED: OnceLock<Option<String>> = OnceLock::new();

/// Dies by SIGKILL if [`FAILPOINT_ENV`] names `name`; otherwise returns at once.
pub fn hit(name: &str) {
    let armed = ARMED.get_or_init(|| std::env::var(FAILPOINT_ENV).ok());
    if armed.as_deref() == Some(name) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
        // SIGKILL cannot be caught or ignored; delivery to ourselves is immediate, but the
        // compiler cannot know that.
        loop {
            std::thread::park();
        }
    }
}
