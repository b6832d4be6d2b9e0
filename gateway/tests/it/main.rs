//! The gateways' integration tests: HTTPS (curl, Chromium, Pebble) and SSH
//! (OpenSSH's client), in-process. One binary, one module per area.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod acme;
mod https;
mod meta;
mod ssh_console;
