//! Kennel's end-to-end tests, in one test binary so the workspace's large
//! dependency graph is linked once for all of them (one module per area;
//! see tests/README.md for what each needs).
//!
//! Every test here runs the built `kennel` binary or real programs beside
//! it. The modules that boot real guests are compiled with the `vm-tests`
//! feature (the README's test command turns it on); a filter picks an
//! area: `cargo test --test e2e -- vm::`.
// matrix-sdk's futures nest deeply (matrix_vm).
#![recursion_limit = "256"]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

mod bots_serve;
mod checkpoint_vm;
mod cli;
mod crash_vm;
mod egress_vm;
mod faults_vm;
mod guest_vm;
mod https_vm;
mod idle_vm;
mod incus_cluster_vm;
mod incus_vm;
mod install;
mod load_vm;
mod matrix_vm;
mod new_project;
mod run_vm;
mod ssh_vm;
mod vm;
