//! `kennel serve` starts the Discord bot from its configuration (here
//! against the local fake of Discord, testkit) and stops it on SIGTERM:
//! the wiring, not the bot's behaviour (bot/tests/discord.rs has that).
//! No VMs: `vm.backend = "none"`.
#![cfg(feature = "discord")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::{Command, Stdio};

use kennel_testkit::discord_fake::{user, FakeDiscord};

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
