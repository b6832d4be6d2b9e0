//! Fuzzes the configuration file: any TOML text gives a configuration or
//! an error, never a panic (the daemon's own loader, `src/config.rs`,
//! compiled into this target).
#![no_main]
#![allow(dead_code)]

#[path = "../../src/config.rs"]
mod config;

// The configuration names the provisioner's backend choices; only that
// plain-data file is compiled in, under the crate name config.rs uses,
// so this target does not build the provisioner (libgit2, hyper, QMP).
extern crate self as kennel_provisioner;
#[path = "../../provisioner/src/choice.rs"]
mod choice;
mod select {
    pub use crate::choice::{BackendChoice, InstanceType, Listen, NetworkChoice, WorkspaceChoice};
}
#[path = "../../src/logging.rs"]
mod logging;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = config::parse_toml(text) {
        // What parsed also answers the questions the daemon asks of it.
        let _ = c.metrics.addr();
        let _ = c.idle_stop();
        let _ = c.egress();
        let _ = c.egress_once_secs();
        let _ = c.default_resources();
        let _ = c.default_owner();
        let _ = c.admin_identities();
        let _ = c.projects_root();
    }
});
