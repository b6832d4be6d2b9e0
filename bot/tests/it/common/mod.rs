//! Setup shared by the bots' tests: an executor over an in-memory store
//! with a fake provisioner that reports progress slowly and a `rust`
//! stack, and the real SSH gateway on a free loopback port.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kennel_core::model::Identity;
use kennel_core::provision::testing::RecordingProvisioner;
use kennel_core::testing::World;
use kennel_core::Executor;

/// An executor whose `admin` is a configured admin; each create step
/// pauses `stage_delay` so progress edits can be watched.
pub fn executor(admin: Identity, stage_delay: Duration) -> (Executor, Arc<RecordingProvisioner>) {
    // An agent the operator configured, for `agent` over a guest that echoes.
    let settings = kennel_core::Settings {
        agents: vec![("echo".into(), vec!["agent-cli".into(), "{task}".into()])],
        ..Default::default()
    };
    let w = World::new()
        .admin(admin)
        .settings(settings)
        .stage_delay(stage_delay)
        .build();
    (w.exec, w.vms)
}

/// Starts the SSH gateway for `exec` with its keys under `dir`; returns its port.
pub async fn ssh_gateway(exec: &Executor, dir: &Path) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let host_key = kennel_gateway::ssh::host_key(&dir.join("host")).unwrap();
    let gw = kennel_gateway::ssh::SshGateway::new(
        exec.gate(),
        kennel_gateway::ssh::SshSettings::default(),
    );
    tokio::spawn(gw.run(listener, host_key, std::future::pending()));
    port
}
