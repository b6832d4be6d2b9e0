//! The chat bots against the fake Discord and a real Synapse. One binary,
//! one module per bot.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

mod discord;
mod matrix;
