//! Kennel's gateways: the SSH gateway (russh), where `ssh myapp@host` lands
//! in a project's VM and `ssh host` speaks the command language, and the
//! HTTPS gateway (hyper + rustls), where `https://myapp.DOMAIN` reaches the
//! app in the VM and `https://DOMAIN` is Kennel's own host.
//!
//! Both talk to core through `kennel_core::Gate` (keys, sessions, the one
//! entry decision, routes, waking a stopped VM through the VM state
//! service) and run commands through core's front door.

pub mod dns;
pub mod guestrun;
pub mod https;
pub mod meta;
pub mod ssh;
pub mod vmlink;
pub use russh::keys::PrivateKey as HostKey;
