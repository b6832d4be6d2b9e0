//! Builds Kennel's parts from the configuration.

use std::sync::Arc;

use anyhow::{Context, Result};
use kennel_core::provision::Unavailable;
use kennel_core::{Executor, Settings, Store};

use crate::config::Config;
use crate::datadir::DataDir;

/// The executor's settings from the configuration.
pub fn settings(config: &Config) -> Result<Settings> {
    Ok(Settings {
        ssh_host: config.ssh.public_host.clone(),
        ssh_port: config.ssh.public_port.unwrap_or(config.ssh.listen.port()),
        domain: config.https.domain.clone(),
        https_port: config
            .https
            .public_port
            .unwrap_or(config.https.listen.port()),
        projects_root: config.projects_root(),
        default_resources: config.default_resources()?,
        default_app_port: 8080,
        host_key_fingerprints: Vec::new(),
        admins: config.admin_identities()?,
    })
}

/// Opens the store in the data dir (the caller holds the lock).
pub fn store(dir: &DataDir) -> Result<Store> {
    Store::open(&dir.db())
        .with_context(|| format!("cannot open the store in {}", dir.root().display()))
}

/// The executor, with the parts this build has.
pub fn executor(config: &Config, store: Store) -> Result<Executor> {
    let vms = Arc::new(Unavailable {
        reason: "the provisioner is not built yet".into(),
    });
    let catalog = Arc::new(kennel_provisioner::catalog::DirCatalog {
        stacks: kennel_provisioner::stacks::Stacks::load(&config.images.stacks_dir),
    });
    Ok(Executor::new(store, vms, catalog, settings(config)?))
}
