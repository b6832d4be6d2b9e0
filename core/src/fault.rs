//! Fault points: named places where the crash tests hold the daemon so
//! that `kill -9` lands exactly there (at the start of each stage of
//! `new project`, between the steps of `rm`, `rename`, `cp` and `stop`,
//! and inside `checkpoint` and `rollback`).
//!
//! Compiled in only with the `fault-points` feature, which the end-to-end
//! tests turn on and release builds leave off; without it [`point`] is
//! empty. With it, `KENNEL_FAULT_HOLD=NAME` makes the daemon log
//! "fault point: holding" and stop at point `NAME` until it is killed.

/// Every fault point, in the order a `new project` meets them, then the
/// other operations'.
pub const POINTS: &[&str] = &[
    "validated",
    "cloning",
    "stack",
    "image",
    "disk",
    "booting",
    "ready",
    "stopping",
    "destroying",
    "copying",
    "renaming",
    "renaming-vm",
    "checkpoint-switched",
    "checkpoint-files",
    "checkpoint-taken",
    "rollback",
    "rollback-journal",
    "rollback-disk",
    "rollback-source",
];

/// Holds here until killed when `KENNEL_FAULT_HOLD` names `name` (with the
/// `fault-points` feature); otherwise does nothing.
#[inline]
pub fn point(name: &'static str) {
    #[cfg(feature = "fault-points")]
    if std::env::var("KENNEL_FAULT_HOLD").is_ok_and(|v| v == name) {
        tracing::warn!(point = name, "fault point: holding here until killed");
        let hold = || loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        };
        // On a runtime worker, the worker's other tasks move elsewhere
        // first, so the rest of the daemon keeps answering.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(hold)
            }
            _ => hold(),
        }
    }
    #[cfg(not(feature = "fault-points"))]
    let _ = name;
}
