//! The SSH gateway in-process on 127.0.0.1:0, driven by OpenSSH's real
//! `ssh` client: command mode, exit codes, unknown keys and access
//! requests, refusals, a store that has gone away, many sessions at once.
//! (Sessions into real VMs are tested in the root crate's tests/ssh_vm.rs.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use kennel_core::catalog::StaticCatalog;
use kennel_core::keys::PublicKey;
use kennel_core::model::Identity;
use kennel_core::provision::testing::RecordingProvisioner;
use kennel_core::provision::NoProgress;
use kennel_core::{Executor, Settings, Store};
use kennel_gateway::ssh::{host_key, SshGateway, SshSettings};
use kennel_testkit::require;
use kennel_testkit::ssh::{keygen, run_ssh};

struct Gw {
    dir: tempfile::TempDir,
    port: u16,
    exec: Executor,
    store: Store,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn gateway() -> Gw {
    require("ssh", "openssh-client");
    require("ssh-keygen", "openssh-client");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_in_memory().unwrap();
    let exec = Executor::new(
        store.clone(),
        Arc::new(RecordingProvisioner::default()),
        Arc::new(StaticCatalog::default()),
        Settings::default(),
    );
    let key = host_key(&dir.path().join("keys/host")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let gw = SshGateway::new(
        exec.clone(),
        SshSettings {
            data_dir: dir.path().to_owned(),
            ..Default::default()
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gw.run(listener, key, async move {
        let _ = stopped.await;
    }));
    Gw {
        dir,
        port,
        exec,
        store,
        stop: Some(stop),
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Gw {
    async fn ssh(&self, key: &Path, user: &str, args: &[&str], stdin: Option<&str>) -> Output {
        run_ssh(
            self.port,
            key.to_owned(),
            user.to_owned(),
            args.iter().map(|a| (*a).to_owned()).collect(),
            stdin.map(str::to_owned),
        )
        .await
    }

    /// Gives the console admin `public` as an SSH key.
    async fn admin_key(&self, public: &str) {
        let admin = self.exec.local_admin().await.unwrap();
        let line = format!("key add \"{public}\"");
        let out = self
            .exec
            .execute_as(
                &Identity::local_console(),
                Some(admin),
                kennel_core::parse(&line).unwrap().command,
                &NoProgress,
            )
            .await;
        assert!(out.is_ok(), "{out:?}");
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_mode_exit_codes_and_json() {
    let gw = gateway().await;
    let (key, public) = keygen(gw.dir.path(), "admin");
    gw.admin_key(&public).await;
    let out = gw.ssh(&key, "anyone", &["whoami"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("You are admin"),
        "{}",
        text(&out.stdout)
    );
    let out = gw
        .ssh(&key, "anyone", &["--", "--json", "projects"], None)
        .await;
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(v["ok"], true);
    let out = gw.ssh(&key, "anyone", &["prjects"], None).await;
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
    assert!(text(&out.stdout).contains("Did you mean 'projects'"));
    let out = gw.ssh(&key, "anyone", &["status", "nothere"], None).await;
    assert_eq!(out.status.code(), Some(1), "failures exit 1");
    // The prompt, without a pty: one command per line.
    let out = gw
        .ssh(&key, "anyone", &[], Some("whoami\nstacks\nexit\n"))
        .await;
    assert!(
        text(&out.stdout).contains("kennel> ") && text(&out.stdout).contains("You are admin"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_get_a_message_and_can_request_access() {
    let gw = gateway().await;
    let (admin, public) = keygen(gw.dir.path(), "admin");
    gw.admin_key(&public).await;
    let (stranger, stranger_pub) = keygen(gw.dir.path(), "stranger");
    let out = gw.ssh(&stranger, "anyone", &["projects"], None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("request-access"),
        "{}",
        text(&out.stderr)
    );
    let out = gw.ssh(&stranger, "anyone", &[], None).await;
    assert!(
        text(&out.stderr).contains("does not know this SSH key"),
        "no shell for unknown keys"
    );
    let out = gw
        .ssh(
            &stranger,
            "anyone",
            &["request-access", "it", "is", "me"],
            None,
        )
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("Access request #1 filed"),
        "{}",
        text(&out.stdout)
    );
    let out = gw.ssh(&admin, "anyone", &["requests"], None).await;
    let listed = text(&out.stdout);
    let fp = PublicKey::parse(&stranger_pub)
        .unwrap()
        .fingerprint()
        .to_string();
    assert!(
        listed.contains(&fp) && listed.contains("it is me"),
        "{listed}"
    );
    // Approved, the same key is a user.
    gw.ssh(&admin, "anyone", &["approve", "1"], None).await;
    let out = gw.ssh(&stranger, "anyone", &["whoami"], None).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stdout).contains("(member)"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_a_share_is_refused_and_a_closed_store_refuses_everyone() {
    let gw = gateway().await;
    let (admin, public) = keygen(gw.dir.path(), "admin");
    gw.admin_key(&public).await;
    let (member, member_pub) = keygen(gw.dir.path(), "member");
    gw.ssh(&member, "x", &["request-access"], None).await;
    gw.ssh(&admin, "x", &["approve", "1"], None).await;
    let out = gw
        .ssh(&admin, "x", &["new", "project", "secret"], None)
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let out = gw.ssh(&member, "secret", &["true"], None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no project 'secret' that you own or that is shared"),
        "{}",
        text(&out.stderr)
    );
    let _ = member_pub;
    // The store goes away: nobody gets in, not even the admin.
    gw.store.close();
    let out = gw.ssh(&admin, "x", &["whoami"], None).await;
    assert_eq!(
        out.status.code(),
        Some(255),
        "authentication must fail: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sessions_at_once() {
    let gw = gateway().await;
    let (key, public) = keygen(gw.dir.path(), "admin");
    gw.admin_key(&public).await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..50 {
        set.spawn(run_ssh(
            gw.port,
            key.clone(),
            "anyone".into(),
            vec!["whoami".into()],
            None,
        ));
    }
    let mut outs = Vec::new();
    while let Some(o) = set.join_next().await {
        outs.push(o.unwrap());
    }
    let ok = outs.iter().filter(|o| o.status.code() == Some(0)).count();
    assert_eq!(
        ok,
        50,
        "{:?}",
        outs.iter()
            .find(|o| o.status.code() != Some(0))
            .map(|o| text(&o.stderr))
    );
}
