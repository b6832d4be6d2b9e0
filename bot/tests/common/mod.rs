//! Setup shared by the bots' tests: an executor over an in-memory store
//! with a fake provisioner that reports progress slowly and a `rust`
//! stack, and the real SSH gateway on a free loopback port.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kennel_core::catalog::{StackInfo, StaticCatalog};
use kennel_core::model::Identity;
use kennel_core::provision::testing::RecordingProvisioner;
use kennel_core::{Executor, Settings, Store};

/// An executor whose `admin` is a configured admin; each create step
/// pauses `stage_delay` so progress edits can be watched.
pub fn executor(admin: Identity, stage_delay: Duration) -> (Executor, Arc<RecordingProvisioner>) {
    let vms = Arc::new(RecordingProvisioner::default());
    *vms.stage_delay.lock().unwrap() = stage_delay;
    let exec = Executor::new(
        Store::open_in_memory().unwrap(),
        vms.clone(),
        Arc::new(StaticCatalog {
            stacks: vec![StackInfo {
                name: "rust".into(),
                summary: "Rust".into(),
                app_port: 8000,
                broken: None,
            }],
            templates: vec![],
        }),
        Settings {
            admins: vec![admin],
            ..Settings::default()
        },
    );
    (exec, vms)
}

/// Starts the SSH gateway for `exec` with its keys under `dir`; returns its port.
pub async fn ssh_gateway(exec: &Executor, dir: &Path) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let host_key = kennel_gateway::ssh::host_key(&dir.join("host")).unwrap();
    let gw = kennel_gateway::ssh::SshGateway::new(
        exec.clone(),
        kennel_gateway::ssh::SshSettings {
            data_dir: dir.to_owned(),
            ..Default::default()
        },
    );
    tokio::spawn(gw.run(listener, host_key, std::future::pending()));
    port
}
