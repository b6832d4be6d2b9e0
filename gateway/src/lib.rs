//! Kennel's gateways: the SSH gateway (russh), where `ssh myapp@host` lands
//! in a project's VM and `ssh host` speaks the command language, and the
//! HTTPS gateway (hyper + rustls), which forwards `https://myapp.DOMAIN` to
//! the VM's app port.
//!
//! Neither is built yet: `kennel serve` says so when it starts. Both will
//! read routes and keys from `kennel_core`'s store and run commands through
//! its executor; they hold no business logic of their own.
