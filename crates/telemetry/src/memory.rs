//! The binaries' memory allocator, and giving freed memory back to the OS.
//!
//! glibc's malloc keeps what a burst freed: after an HTTP/2 header flood (issue 12,
//! finding 3) the edge stayed ~30 MiB above its 11 MiB baseline a minute later, though
//! nothing of the flood was alive, and `malloc_trim` is an FFI call the workspace's
//! `unsafe_code = "forbid"` does not allow. jemalloc returns unused pages on a clock of
//! its own: a dirty page is purged ([`DIRTY_DECAY`], jemalloc's default, with the lazy
//! "muzzy" stage off, its default too, so purged pages leave RSS at once). Its purging
//! runs only when the allocator is called, unless a background thread does it:
//! [`return_freed_memory`] starts that thread, so an edge that goes quiet after a flood
//! shrinks too. Each binary's `main.rs` declares the allocator:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: netbore_telemetry::memory::Jemalloc = netbore_telemetry::memory::Jemalloc;
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use tikv_jemallocator::Jemalloc;

/// How long a freed page stays resident before jemalloc gives it back (its default
/// `dirty_decay_ms`; the purge follows a smooth curve over this time). Well inside the
/// minute after a flood by which issue 12 wants the memory back.
pub const DIRTY_DECAY: Duration = Duration::from_secs(10);

/// Turns on jemalloc's background purging thread. Call once at start, from a binary
/// whose global allocator is [`Jemalloc`]; an error (a jemalloc built without
/// background threads) only means memory returns while the process is busy, so the
/// caller logs it and goes on.
pub fn return_freed_memory() -> Result<(), String> {
    JEMALLOC_IS_GLOBAL.store(true, Ordering::Relaxed);
    tikv_jemalloc_ctl::background_thread::write(true)
        .map_err(|e| format!("jemalloc background purging not enabled: {e}"))
}

/// Set by [`return_freed_memory`]: the process allocates through jemalloc, so its
/// statistics describe the process's heap (in a test binary on the system allocator
/// they would describe almost nothing).
static JEMALLOC_IS_GLOBAL: AtomicBool = AtomicBool::new(false);

/// The heap as jemalloc sees it: what separates live data from memory the allocator
/// keeps (size-class rounding, dirty pages not yet purged, its own metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes the program holds in live allocations.
    pub allocated: u64,
    /// Bytes in pages the allocator holds for those allocations (rounding and
    /// fragmentation included).
    pub active: u64,
    /// Bytes of the allocator's own bookkeeping.
    pub metadata: u64,
    /// Bytes of physically resident pages the allocator maps (dirty pages included).
    pub resident: u64,
}

/// jemalloc's statistics now, when it is the global allocator (`None` otherwise).
pub fn heap_stats() -> Option<HeapStats> {
    use tikv_jemalloc_ctl::{epoch, stats};
    if !JEMALLOC_IS_GLOBAL.load(Ordering::Relaxed) {
        return None;
    }
    // The statistics are a snapshot taken when the epoch advances.
    epoch::advance().ok()?;
    Some(HeapStats {
        allocated: stats::allocated::read().ok()? as u64,
        active: stats::active::read().ok()? as u64,
        metadata: stats::metadata::read().ok()? as u64,
        resident: stats::resident::read().ok()? as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_purging_can_be_turned_on() {
        return_freed_memory().unwrap();
        assert!(tikv_jemalloc_ctl::background_thread::read().unwrap());
    }

    // This test binary allocates through jemalloc too, as the binaries do.
    #[global_allocator]
    static ALLOCATOR: Jemalloc = Jemalloc;

    /// The statistics see a live allocation come and go.
    #[test]
    fn heap_stats_follow_a_live_allocation() {
        return_freed_memory().unwrap();
        let before = heap_stats().unwrap();
        let v = vec![1u8; 8 << 20];
        let during = heap_stats().unwrap();
        assert!(
            during.allocated >= before.allocated + (8 << 20) - (1 << 20),
            "{before:?} {during:?}"
        );
        assert!(
            during.resident >= during.active && during.active >= during.allocated,
            "{during:?}"
        );
        drop(v);
        let after = heap_stats().unwrap();
        assert!(
            after.allocated + (7 << 20) <= during.allocated,
            "{during:?} {after:?}"
        );
    }
}
