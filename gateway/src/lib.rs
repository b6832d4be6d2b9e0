//! Kennel's gateways: the SSH gateway (russh), where `ssh myapp@host` lands
//! in a project's VM and `ssh host` speaks the command language, and (in
//! its own issue) the HTTPS gateway.
//!
//! The gateways read routes and keys from `kennel_core`'s store and run
//! commands through its executor; access decisions are core's policy. They
//! never call the provisioner except, through the executor, to start a
//! stopped VM someone is entering.

pub mod ssh;
pub use russh::keys::PrivateKey as HostKey;
