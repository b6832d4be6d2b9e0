//! `kennel serve` starts the chat bots from its configuration and stops
//! them on SIGTERM: the Discord bot against the local fake of Discord, the
//! Matrix bot against a real Synapse, whose log at the default level holds
//! only what an operator needs. The wiring, not the bots' behaviour
//! (bot/tests/ has that), and the Matrix bot under load: 50 people sending
//! 1,000 commands. No VMs: `vm.backend = "none"`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::{Child, Command, Stdio};

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
    let mut serve = serve_matrix(&hs, bot.as_str(), tmp.path(), &log_path);
    let dm = ann.dm(&bot).await;
    let reply = ann.ask(&bot, &dm, "whoami").await;
    assert!(reply.body.contains("ann"), "{reply:?}");
    let reply = ann.ask(&bot, &dm, "help").await;
    assert!(reply.body.contains("new project"), "{reply:?}");
    Command::new("kill")
        .args(["-TERM", &serve.0.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || serve.0.wait().unwrap())
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

/// A `kennel serve` killed when the test ends, passing or not.
#[cfg(feature = "matrix")]
struct Daemon(Child);

#[cfg(feature = "matrix")]
impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `kennel serve` in `dir` with the Matrix bot as `bot` (password
/// `bot-pw`) on `hs`, at the default log level, its log in `log`.
#[cfg(feature = "matrix")]
fn serve_matrix(
    hs: &kennel_testkit::synapse::Synapse,
    bot: &str,
    dir: &std::path::Path,
    log: &std::path::Path,
) -> Daemon {
    Daemon(
        Command::new(env!("CARGO_BIN_EXE_kennel"))
            .arg("serve")
            .current_dir(dir)
            .env_remove("KENNEL_CONFIG")
            .env_remove("RUST_LOG")
            .env("KENNEL_VM__BACKEND", "none")
            .env("KENNEL_SSH__LISTEN", "127.0.0.1:0")
            .env("KENNEL_HTTPS__LISTEN", "127.0.0.1:0")
            .env("KENNEL_METRICS__LISTEN", "127.0.0.1:0")
            .env("KENNEL_MATRIX__HOMESERVER", &hs.url)
            .env("KENNEL_MATRIX__USER", bot)
            .env("KENNEL_MATRIX__PASSWORD", "bot-pw")
            .env("KENNEL_MATRIX__INVITE_FROM", "[\"localhost\"]")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// 50 people on a real Synapse, each in a DM with the bot, send 20
/// `whoami` each at once (1,000 commands).
/// Every command gets exactly one reply: its answer, or the rate limit's
/// (`bot.commands_per_minute`, burst `bot.burst`); the daemon stays up
/// and logs no error. Prints the load row (what held, CPU, RSS).
#[cfg(feature = "matrix")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_matrix_bot_answers_1000_commands_from_50_people_once_each() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use kennel_testkit::matrix_client::signed_in;
    use kennel_testkit::synapse::Synapse;
    use matrix_sdk::ruma::UserId;

    const PEOPLE: usize = 50;
    const EACH: usize = 20;
    let hs = Arc::new(tokio::task::spawn_blocking(Synapse::start).await.unwrap());
    let bot = UserId::parse(hs.register("kennel", "bot-pw", false)).unwrap();
    let names: Vec<String> = (0..PEOPLE).map(|i| format!("p{i}")).collect();
    {
        let (hs, names) = (hs.clone(), names.clone());
        tokio::task::spawn_blocking(move || {
            std::thread::scope(|s| {
                for chunk in names.chunks(10) {
                    let hs = &hs;
                    s.spawn(move || {
                        for n in chunk {
                            hs.register(n, "secret-pw", false);
                        }
                    });
                }
            });
        })
        .await
        .unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let log_path = tmp.path().join("serve.log");
    let mut serve = serve_matrix(&hs, bot.as_str(), tmp.path(), &log_path);
    // Everyone signs in and opens a DM with the bot, ten at a time (a
    // room is a dozen events for the homeserver to make).
    let mut people = Vec::new();
    for batch in names.chunks(10) {
        let mut joining = tokio::task::JoinSet::new();
        for name in batch {
            let (hs, name, bot) = (hs.clone(), name.clone(), bot.clone());
            joining.spawn(async move {
                let p = signed_in(&hs, &name).await;
                let dm = p.dm(&bot).await;
                (name, Arc::new(p), dm)
            });
        }
        while let Some(r) = joining.join_next().await {
            match r {
                Ok((name, p, dm)) => {
                    let i: usize = name.trim_start_matches('p').parse().unwrap();
                    people.push((i, p, dm));
                }
                Err(e) => {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    panic!("{e}\nserve log:\n{log}\nsynapse:\n{}", hs.log_tail());
                }
            }
        }
    }
    people.sort_by_key(|p| p.0);

    let meter = crate::support::meter::Meter::start(serve.0.id());
    let started = Instant::now();
    let mut sending = tokio::task::JoinSet::new();
    for (i, p, dm) in people.clone() {
        sending.spawn(async move {
            // All of one person's at once, as a script would. (A send
            // the loaded homeserver is slow to answer is sent again with
            // its transaction id: `say`.)
            let mut each = tokio::task::JoinSet::new();
            for _ in 0..EACH {
                let (p, dm) = (p.clone(), dm.clone());
                each.spawn(async move { p.say(&dm, "whoami").await });
            }
            let mut ids = Vec::new();
            while let Some(id) = each.join_next().await {
                ids.push(id.unwrap());
            }
            (i, ids)
        });
    }
    let mut sent = vec![Vec::new(); PEOPLE];
    while let Some(r) = sending.join_next().await {
        let (i, ids) = r.unwrap();
        sent[i] = ids;
    }
    let sent_in = started.elapsed();
    let mut replying = tokio::task::JoinSet::new();
    for (i, p, dm) in people.clone() {
        let (bot, ids) = (bot.clone(), sent[i].clone());
        replying.spawn(async move {
            let got = p
                .replies(
                    &bot,
                    &dm,
                    &ids,
                    Duration::from_secs(3),
                    Duration::from_secs(180),
                )
                .await;
            (i, ids, got)
        });
    }
    let (mut answered, mut limited, mut twice, mut missing, mut odd) = (0, 0, 0, 0, Vec::new());
    while let Some(r) = replying.join_next().await {
        let (i, ids, got) = r.unwrap();
        for id in ids {
            match got.get(&id).map(Vec::as_slice) {
                None | Some([]) => missing += 1,
                Some([one]) => {
                    if one.contains(&format!("p{i}")) {
                        answered += 1;
                    } else if one.contains("faster than Kennel takes them") {
                        limited += 1;
                    } else {
                        odd.push(one.clone());
                    }
                }
                Some(more) => {
                    twice += 1;
                    odd.push(format!("{} replies: {more:?}", more.len()));
                }
            }
        }
    }
    eprintln!(
        "sent {} commands in {:.1} s; all replies in {:.1} s",
        PEOPLE * EACH,
        sent_in.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    for l in log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
    {
        eprintln!("serve: {l}");
    }
    crate::support::meter::header();
    meter.report(
        "matrix: 1000 cmds, 50 people",
        &format!("{answered} answered, {limited} rate-limited"),
        missing + twice + odd.len(),
    );
    assert_eq!(
        (missing, twice),
        (0, 0),
        "every command gets one reply: {odd:?}"
    );
    assert!(odd.is_empty(), "{odd:?}");
    assert_eq!(answered + limited, PEOPLE * EACH);
    assert!(
        answered >= PEOPLE * 5,
        "at least the burst of each is answered"
    );
    assert!(limited > 0, "20 at once is over the rate limit");
    // Still up, and nothing an operator must look at.
    assert!(serve.0.try_wait().unwrap().is_none(), "the daemon died");
    drop(serve);
    let log = std::fs::read_to_string(&log_path).unwrap();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("not seen"))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}
