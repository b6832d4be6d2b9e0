//! Test support shared by Kennel's crates (like Cloud Hypervisor's
//! `test_infra`): a Cloud Hypervisor API double, and helpers for tests
//! that need real host tools to fail loudly when those are missing.

#![recursion_limit = "256"]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

pub mod browser;
pub mod ch_double;
#[cfg(feature = "discord")]
pub mod discord_fake;
pub mod incus;
#[cfg(feature = "matrix")]
pub mod matrix_client;
pub mod pebble;
pub mod ssh;
pub mod synapse;
#[cfg(feature = "ws")]
pub mod ws;

use std::path::PathBuf;

/// Finds a program on PATH (plus sbin dirs) or panics naming the package
/// to install: tests never pass by skipping.
pub fn require(program: &str, package: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/lib/qemu"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{program} is missing: install it with `apt-get install {package}` (scripts/install-deps.sh test does this)")
        })
}
