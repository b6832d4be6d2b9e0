//! The provisioner's integration tests: stack detection, the git URL
//! guard against a real `git daemon`, real image builds. One binary, one
//! module per area (the Cloud Hypervisor double is `ch_backend`, a binary
//! of its own).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod detect;
mod git_guard;
mod images;
mod incus_client;
#[cfg(all(feature = "incus-tests", feature = "image-tests"))]
mod incus_guest;
#[cfg(feature = "incus-tests")]
mod incus_real;
mod incus_schema;
