//! Incus as the engine under Kennel's projects: one server, or a cluster
//! that does membership, placement, storage, moves and evacuation.
//! Kennel drives it over its REST API ([`client`]) and never runs a
//! cluster protocol of its own.

pub mod api;
pub mod client;
pub mod events;
pub mod image;
pub mod spec;

pub use client::{IncusClient, IncusError};
