//! Core's integration tests: the executor, policy, store, idle stop and VM
//! state service over an in-memory (or real-file) store and a recording
//! provisioner. One binary, one module per area.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod agents;
mod checkpoints;
mod egress;
mod errors;
mod executor;
mod hosts;
mod idle;
mod parser_props;
mod policy;
mod store;
mod vmstate;
