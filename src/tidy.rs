//! Handing freed memory back before a runtime worker sleeps.
//!
//! mimalloc tidies a thread's pages only when that thread next allocates,
//! so an idle daemon kept what a burst of connections took: after the
//! phases of bench/load.sh it sat at 1.38-1.52x its idle RSS, all of it
//! free memory the allocator kept (glibc's malloc kept as much, 1.48x, and
//! gave it back to `malloc_trim`). A worker about to sleep now calls
//! `mi_collect`, at most every [`TIDY_EVERY`]. Also compiled into the HTTPS
//! gateway's bench example, so bench/https.sh measures what it costs.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How often at most a worker tidies its heap. What it frees after its
/// last tidy stays until it next goes to sleep past this, so a short
/// period leaves little behind when the load stops: with 1 s the daemon
/// settled at 1.08-1.34x its idle RSS (four runs of bench/load.sh; the
/// teardown of 1,000 connections fell within one period), with 10 ms at
/// 1.09x and 1.17x. What it costs (bench/https.sh, beside a build without
/// it, same run): 1-3 % more CPU per request, and the gateway's RSS under
/// large bodies halved (h1 19 against 40 MB, h2 22 against 54 MB).
pub const TIDY_EVERY: Duration = Duration::from_millis(10);

thread_local! {
    static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// For `on_thread_park`: tidies this thread's heap unless it did within
/// [`TIDY_EVERY`].
pub fn before_sleep() {
    let now = Instant::now();
    if LAST
        .get()
        .is_some_and(|t| now.duration_since(t) < TIDY_EVERY)
    {
        return;
    }
    LAST.set(Some(now));
    collect();
}

#[allow(unsafe_code)]
fn collect() {
    // SAFETY: mi_collect takes no pointers; it tidies the calling thread's
    // heap and the pages of threads that ended, and returns free memory to
    // the system (`true`: without waiting for mimalloc's purge delay).
    unsafe { libmimalloc_sys::mi_collect(true) }
}
