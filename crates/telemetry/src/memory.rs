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
    tikv_jemalloc_ctl::background_thread::write(true)
        .map_err(|e| format!("jemalloc background purging not enabled: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_purging_can_be_turned_on() {
        return_freed_memory().unwrap();
        assert!(tikv_jemalloc_ctl::background_thread::read().unwrap());
    }
}
