//! `kennel serve` starts the chat bots from its configuration and stops
//! them on SIGTERM: the Discord bot against the local fake of Discord, the
//! Matrix bot against a real Synapse, whose log at the default level holds
//! only what an operator needs. The wiring, not the bots' behaviour
//! (bot/tests/ has that). No VMs: `vm.backend = "none"`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::{Command, Stdio};

#[cfg(feature = "discord")]
use kennel_testkit::discord_fake::{user, FakeDiscord};

#[cfg(feature = "discord")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_the_discord_bot_from_its_configuration() {
    let d = FakeDiscord::start(100, 200, 300).await;
    let tmp = tempfile::tempdir().unwrap();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_kennel"))
        .arg("serve")
        .current_dir(tmp.path())
        .env_remove("KENNEL_CONFIG")
        .env("KENNEL_VM__BACKEND", "none")
        .env("KENNEL_SSH__LISTEN", "127.0.0.1:0")
        .env("KENNEL_HTTPS__LISTEN", "127.0.0.1:0")
        .env("KENNEL_DISCORD__TOKEN", "test-token")
        .env("KENNEL_DISCORD__GUILDS", "[300]")
        .env("KENNEL_DISCORD__API_BASE", &d.api_base)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    d.wait_call(0, "slash commands registered by kennel serve", |c| {
        c.method == "PUT" && c.path == "/applications/200/guilds/300/commands"
    })
    .await;
    let from = d.calls().len();
    let (_, token) = d.slash(&user(12, "ann", false), 500, "help", &[]).await;
    let (_, answer) = d
        .wait_call(from, "the answer to /help", |c| {
            c.method == "PATCH" && c.path == format!("/webhooks/200/{token}/messages/@original")
        })
        .await;
    assert!(
        answer.body["content"]
            .as_str()
            .unwrap()
            .contains("new project"),
        "{answer:?}"
    );
    Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || serve.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// The Matrix bot from `kennel serve` at the configured default level (no
/// `RUST_LOG`): it answers a DM, and its log has Kennel's own lines and no
/// ERROR from matrix-sdk's expected 404s (account data not set, a room
/// without encryption state), nor its sync span on every line.
#[cfg(feature = "matrix")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_the_matrix_bot_and_logs_only_what_needs_attention() {
    use kennel_testkit::matrix_client::person;
    use kennel_testkit::synapse::Synapse;
    use matrix_sdk::ruma::UserId;

    let hs = tokio::task::spawn_blocking(Synapse::start).await.unwrap();
    let bot = UserId::parse(hs.register("kennel", "bot-pw", false)).unwrap();
    let ann = person(&hs, "ann").await;
    let tmp = tempfile::tempdir().unwrap();
    let log_path = tmp.path().join("serve.log");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_kennel"))
        .arg("serve")
        .current_dir(tmp.path())
        .env_remove("KENNEL_CONFIG")
        .env_remove("RUST_LOG")
        .env("KENNEL_VM__BACKEND", "none")
        .env("KENNEL_SSH__LISTEN", "127.0.0.1:0")
        .env("KENNEL_HTTPS__LISTEN", "127.0.0.1:0")
        .env("KENNEL_MATRIX__HOMESERVER", &hs.url)
        .env("KENNEL_MATRIX__USER", bot.as_str())
        .env("KENNEL_MATRIX__PASSWORD", "bot-pw")
        .env("KENNEL_MATRIX__INVITE_FROM", "[\"localhost\"]")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let dm = ann.dm(&bot).await;
    let reply = ann.ask(&bot, &dm, "whoami").await;
    assert!(reply.body.contains("ann"), "{reply:?}");
    let reply = ann.ask(&bot, &dm, "help").await;
    assert!(reply.body.contains("new project"), "{reply:?}");
    Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || serve.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("Matrix bot listening"), "{log}");
    for line in log.lines() {
        assert!(
            !line.contains("ERROR") && !line.contains("matrix_sdk"),
            "a line an operator need not see at the default level: {line}\n{log}"
        );
    }
    drop(hs);
}
