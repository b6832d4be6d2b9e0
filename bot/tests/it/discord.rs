//! The Discord bot: the real serenity client against the local fake of
//! Discord's gateway and REST API (testkit), the executor over an
//! in-memory store with a fake provisioner that reports progress slowly,
//! and the real SSH gateway with OpenSSH's client. Discord itself cannot
//! run here; the fake records every REST call and the test asserts on
//! what the bot sent.

#![cfg(feature = "discord")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use std::time::Duration;

use kennel_bot::config::DiscordConfig;
use kennel_bot::desk::{Desk, Limits};
use kennel_core::model::{Frontend, Identity};
use kennel_testkit::discord_fake::{user, Call, FakeDiscord};
use kennel_testkit::ssh::{keygen, run_ssh};

const BOT: u64 = 100;
const APP: u64 = 200;
const GUILD: u64 = 300;
const ADMIN_CHANNEL: u64 = 400;
const CHANNEL: u64 = 500;

fn is_callback(c: &Call, id: u64) -> bool {
    c.method == "POST" && c.path == format!("/interactions/{id}/token-{id}/callback")
}

fn is_original_edit(c: &Call, token: &str) -> bool {
    c.method == "PATCH" && c.path == format!("/webhooks/{APP}/{token}/messages/@original")
}

fn content(c: &Call) -> String {
    c.body["content"]
        .as_str()
        .or_else(|| c.body["data"]["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// The callback of interaction `id`, after call index `from`.
async fn callback(d: &FakeDiscord, from: usize, id: u64, what: &str) -> Call {
    d.wait_call(from, what, |c| is_callback(c, id)).await.1
}

/// The last edit of a deferred response: waits until one is not progress.
async fn final_edit(d: &FakeDiscord, from: usize, token: &str) -> (Vec<String>, usize) {
    let mut from = from;
    let mut seen = Vec::new();
    loop {
        let (i, c) = d
            .wait_call(from, "an edit of the original response", |c| {
                is_original_edit(c, token)
            })
            .await;
        seen.push(content(&c));
        if !content(&c).contains('⏳') {
            return (seen, i + 1);
        }
        from = i + 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discord_bot_against_a_fake_discord() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let d = FakeDiscord::start(BOT, APP, GUILD).await;
    let root = user(11, "root", false);
    let ann = user(12, "ann", false);
    let carol = user(14, "carol", false);

    let (exec, vms) = crate::common::executor(
        Identity::new(Frontend::Discord, "11"),
        Duration::from_millis(500),
    );
    let keys = tempfile::tempdir().unwrap();
    let ssh_port = crate::common::ssh_gateway(&exec, keys.path()).await;

    let cfg = DiscordConfig {
        token: Some("test-token".into()),
        guilds: vec![GUILD],
        admin_channel: Some(ADMIN_CHANNEL),
        api_base: Some(d.api_base.clone()),
        limits: Limits {
            edit_interval_ms: 200,
            burst: 50,
            ..Limits::default()
        },
    };
    assert_eq!(cfg.problem(), None);
    let desk = Arc::new(Desk::new(exec.gate(), cfg.limits.clone()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let bot = tokio::spawn(kennel_bot::discord::run(cfg, desk, async move {
        let _ = stopped.await;
    }));

    // Slash commands registered in the guild.
    let (_, reg) = d
        .wait_call(0, "slash command registration", |c| {
            c.method == "PUT" && c.path == format!("/applications/{APP}/guilds/{GUILD}/commands")
        })
        .await;
    let names: Vec<&str> = reg
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in [
        "new",
        "projects",
        "status",
        "ssh",
        "rm",
        "request-access",
        "help",
    ] {
        assert!(names.contains(&n), "{names:?}");
    }
    d.wait_connected().await;

    // Autocomplete for stacks.
    let from = d.calls().len();
    let (id, _) = d.autocomplete(&ann, CHANNEL, "new", "stack", "ru").await;
    let c = callback(&d, from, id, "autocomplete").await;
    assert_eq!(c.body["type"], 8, "{c:?}");
    assert_eq!(c.body["data"]["choices"][0]["value"], "rust", "{c:?}");

    // An unknown user may not create projects.
    let from = d.calls().len();
    let (id, token) = d
        .slash(
            &ann,
            CHANNEL,
            "new",
            &[("name", "early"), ("stack", "rust")],
        )
        .await;
    let c = callback(&d, from, id, "deferred /new").await;
    assert_eq!(c.body["type"], 5, "{c:?}");
    assert_eq!(c.body["data"]["flags"], 64, "ephemeral: {c:?}");
    let (seen, _) = final_edit(&d, from, &token).await;
    assert!(
        seen.last().unwrap().contains("does not know you yet"),
        "{seen:?}"
    );

    // Access request → admin channel with buttons.
    let (ann_key, ann_pub) = keygen(keys.path(), "ann");
    let from = d.calls().len();
    let (_, token) = d
        .slash(
            &ann,
            CHANNEL,
            "request-access",
            &[("key", &ann_pub), ("note", "ann's laptop")],
        )
        .await;
    let (seen, _) = final_edit(&d, from, &token).await;
    assert!(seen.last().unwrap().contains("#1"), "{seen:?}");
    let (_, posted) = d
        .wait_call(from, "the request in the admin channel", |c| {
            c.method == "POST" && c.path == format!("/channels/{ADMIN_CHANNEL}/messages")
        })
        .await;
    let text = content(&posted);
    assert!(
        text.contains("Access request #1")
            && text.contains("SHA256:")
            && text.contains("ann's laptop"),
        "{text}"
    );
    let buttons = &posted.body["components"][0]["components"];
    assert_eq!(buttons[0]["custom_id"], "kennel:approve:1", "{posted:?}");
    assert_eq!(buttons[1]["custom_id"], "kennel:deny:1", "{posted:?}");
    let admin_msg = kennel_testkit::discord_fake::message(
        777,
        ADMIN_CHANNEL,
        user(BOT, "kennel", true),
        &text,
        posted.body["components"].clone(),
    );

    // A non-admin's click is refused, to them alone.
    let from = d.calls().len();
    let (id, _) = d.click(&carol, &admin_msg, "kennel:approve:1").await;
    let c = callback(&d, from, id, "refusal").await;
    assert_eq!(c.body["type"], 4, "{c:?}");
    assert_eq!(c.body["data"]["flags"], 64, "{c:?}");
    assert!(content(&c).contains("refused"), "{c:?}");
    let (id, _) = d.click(&carol, &admin_msg, "kennel:deny:1").await;
    let c = callback(&d, from, id, "refusal of deny").await;
    assert!(content(&c).contains("only admins"), "{c:?}");

    // The admin approves: message updated, buttons off, requester DM'd.
    let from = d.calls().len();
    let (id, _) = d.click(&root, &admin_msg, "kennel:approve:1").await;
    let c = callback(&d, from, id, "approval").await;
    assert_eq!(c.body["type"], 7, "{c:?}");
    assert!(content(&c).contains("Approved by"), "{c:?}");
    assert_eq!(
        c.body["data"]["components"][0]["components"][0]["disabled"], true,
        "{c:?}"
    );
    d.wait_call(from, "a DM channel with ann", |c| {
        c.path == "/users/@me/channels" && c.body["recipient_id"] == "12"
    })
    .await;
    let (_, dm) = d
        .wait_call(from, "ann's DM", |c| {
            c.method == "POST" && c.path == format!("/channels/{}/messages", 12 + 7)
        })
        .await;
    assert!(content(&dm).contains("approved"), "{dm:?}");
    // A second click changes nothing and says so.
    let from = d.calls().len();
    let (id, _) = d.click(&root, &admin_msg, "kennel:approve:1").await;
    let c = callback(&d, from, id, "second click").await;
    assert_eq!(c.body["data"]["flags"], 64, "{c:?}");
    assert!(content(&c).contains("already approved"), "{c:?}");
    // The key logs in to the SSH gateway.
    let out = run_ssh(ssh_port, ann_key, "ann".into(), vec!["whoami".into()], None).await;
    assert!(out.status.success(), "{out:?}");
    // Named after her Discord username, not her id (u12).
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("You are ann (member)"), "{said}");

    // Deny with a reason, through the modal.
    let (_, carol_pub) = keygen(keys.path(), "carol");
    let from = d.calls().len();
    d.slash(&carol, CHANNEL, "request-access", &[("key", &carol_pub)])
        .await;
    let (_, posted) = d
        .wait_call(from, "carol's request", |c| {
            c.method == "POST" && c.path == format!("/channels/{ADMIN_CHANNEL}/messages")
        })
        .await;
    assert!(content(&posted).contains("#2"), "{posted:?}");
    let msg2 = kennel_testkit::discord_fake::message(
        778,
        ADMIN_CHANNEL,
        user(BOT, "kennel", true),
        &content(&posted),
        posted.body["components"].clone(),
    );
    let from = d.calls().len();
    let (id, _) = d.click(&root, &msg2, "kennel:deny:2").await;
    let c = callback(&d, from, id, "the deny modal").await;
    assert_eq!(c.body["type"], 9, "{c:?}");
    assert_eq!(c.body["data"]["custom_id"], "kennel:deny-reason:2", "{c:?}");
    let (id, _) = d
        .submit_modal(
            &root,
            &msg2,
            "kennel:deny-reason:2",
            "reason",
            "not a team member",
        )
        .await;
    let c = callback(&d, from, id, "the modal's answer").await;
    assert_eq!(c.body["type"], 7, "{c:?}");
    assert!(
        content(&c).contains("Denied by") && content(&c).contains("not a team member"),
        "{c:?}"
    );
    let (_, dm) = d
        .wait_call(from, "carol's DM", |c| {
            c.method == "POST" && c.path == format!("/channels/{}/messages", 14 + 7)
        })
        .await;
    assert!(
        content(&dm).contains("denied") && content(&dm).contains("not a team member"),
        "{dm:?}"
    );

    // /new: deferred, edited with progress, ending with the SSH string.
    let from = d.calls().len();
    let (id, token) = d
        .slash(
            &ann,
            CHANNEL,
            "new",
            &[("name", "myapp"), ("stack", "rust")],
        )
        .await;
    assert_eq!(
        callback(&d, from, id, "deferred /new").await.body["type"],
        5
    );
    let (seen, _) = final_edit(&d, from, &token).await;
    assert!(seen.iter().any(|s| s.contains("booting")), "{seen:#?}");
    assert!(
        seen.last().unwrap().contains("ssh myapp@127.0.0.1 -p 2222"),
        "{seen:#?}"
    );
    assert!(seen.len() <= 8, "{seen:#?}");

    // The gateway drops the connection; the bot resumes and keeps answering.
    d.drop_connection();
    for _ in 0..200 {
        if d.sessions().1 >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(d.sessions(), (1, 1), "identifies, resumes");
    let from = d.calls().len();
    let (_, token) = d.slash(&ann, CHANNEL, "projects", &[]).await;
    let (seen, _) = final_edit(&d, from, &token).await;
    assert!(seen.last().unwrap().contains("myapp"), "{seen:?}");

    // A message that mentions the bot is a command too; others are ignored.
    let from = d.calls().len();
    d.say(&ann, CHANNEL, "projects please", vec![]).await;
    d.say(
        &ann,
        CHANNEL,
        &format!("<@{BOT}> whoami"),
        vec![user(BOT, "kennel", true)],
    )
    .await;
    let (i, reply) = d
        .wait_call(from, "a reply in the channel", |c| {
            c.method == "POST" && c.path == format!("/channels/{CHANNEL}/messages")
        })
        .await;
    assert!(content(&reply).contains("discord:12"), "{reply:?}");
    assert!(
        !d.calls()[from..i]
            .iter()
            .any(|c| c.path.contains(&format!("/channels/{CHANNEL}/"))),
        "answered an unaddressed message"
    );

    // Kennel stops the idle project and tells its owner by DM.
    let from = d.calls().len();
    let now = std::time::Instant::now();
    exec.check_idle(now).await.unwrap();
    let idle = exec
        .check_idle(now + Duration::from_secs(31 * 60))
        .await
        .unwrap();
    assert_eq!(idle.stopped.len(), 1, "{idle:?}");
    let (_, dm) = d
        .wait_call(from, "ann's idle notice", |c| {
            c.method == "POST" && c.path == format!("/channels/{}/messages", 12 + 7)
        })
        .await;
    assert_eq!(
        content(&dm),
        "myapp was stopped after 30m idle; ssh or https wakes it",
        "{dm:?}"
    );

    // A line a script in the VM posts to the metadata service
    // (`/kennel/v1/notify`): to the owner by DM.
    let from = d.calls().len();
    let gate = exec.gate();
    let who = gate
        .vm_who(&kennel_core::names::ProjectName::new("myapp").unwrap())
        .await
        .unwrap()
        .unwrap();
    gate.notify_owner(&who, "tests are green").await;
    let (_, dm) = d
        .wait_call(from, "ann's notice from the VM", |c| {
            c.method == "POST" && c.path == format!("/channels/{}/messages", 12 + 7)
        })
        .await;
    assert_eq!(content(&dm), "[myapp] tests are green", "{dm:?}");

    // A closed project's VM asked for a name nobody decided on: its owner
    // is asked by DM, with buttons; someone else's click is refused, the
    // owner's allows it (the message says so, its buttons go).
    let from = d.calls().len();
    exec.egress_asked(kennel_core::egress::EgressAsked {
        project: kennel_core::names::ProjectName::new("myapp").unwrap(),
        dest: "api.example.com".into(),
    })
    .await;
    let (_, ask) = d
        .wait_call(from, "ann's egress ask", |c| {
            c.method == "POST"
                && c.path == format!("/channels/{}/messages", 12 + 7)
                && content(c).contains("tried to reach")
        })
        .await;
    assert!(
        content(&ask).contains("myapp tried to reach api.example.com"),
        "{ask:?}"
    );
    let buttons = &ask.body["components"][0]["components"];
    assert_eq!(
        buttons[0]["custom_id"], "kennel:egress:allow myapp api.example.com",
        "{ask:?}"
    );
    assert_eq!(
        buttons[1]["custom_id"],
        "kennel:egress:allow-once myapp api.example.com"
    );
    assert_eq!(
        buttons[2]["custom_id"],
        "kennel:egress:deny myapp api.example.com"
    );
    let ask_msg = kennel_testkit::discord_fake::message(
        779,
        12 + 7,
        user(BOT, "kennel", true),
        &content(&ask),
        ask.body["components"].clone(),
    );
    let from = d.calls().len();
    let (id, _) = d
        .click(
            &carol,
            &ask_msg,
            "kennel:egress:allow myapp api.example.com",
        )
        .await;
    let c = callback(&d, from, id, "carol's click on ann's ask").await;
    assert_eq!(c.body["data"]["flags"], 64, "{c:?}");
    let (id, _) = d
        .click(&ann, &ask_msg, "kennel:egress:allow myapp api.example.com")
        .await;
    let c = callback(&d, from, id, "ann's allow").await;
    assert_eq!(c.body["type"], 7, "{c:?}");
    assert!(
        content(&c).contains("api.example.com allowed by <@12>"),
        "{c:?}"
    );
    assert_eq!(c.body["data"]["components"], serde_json::json!([]), "{c:?}");
    let allowed = vms.egress.lock().unwrap().get("myapp").cloned().unwrap();
    assert!(
        allowed
            .rules
            .iter()
            .any(|r| r.dest.to_string() == "api.example.com"
                && r.verdict == kennel_core::egress::Verdict::Allow),
        "{allowed:?}"
    );

    // /checkpoint, then /rollback asks with a button; the click rolls back.
    let from = d.calls().len();
    let (_, token) = d
        .slash(
            &ann,
            CHANNEL,
            "checkpoint",
            &[("name", "myapp"), ("label", "good"), ("note", "before it")],
        )
        .await;
    let (seen, _) = final_edit(&d, from, &token).await;
    assert!(
        seen.last()
            .unwrap()
            .contains("Checkpoint good of myapp taken"),
        "{seen:?}"
    );
    let from = d.calls().len();
    let (id, _) = d
        .slash(
            &ann,
            CHANNEL,
            "rollback",
            &[("name", "myapp"), ("label", "good")],
        )
        .await;
    let c = callback(&d, from, id, "the rollback question").await;
    let button = &c.body["data"]["components"][0]["components"][0];
    assert_eq!(button["custom_id"], "kennel:rollback:myapp@good", "{c:?}");
    assert!(content(&c).contains("checkpoint good"), "{c:?}");
    let question = kennel_testkit::discord_fake::message(
        778,
        CHANNEL,
        user(BOT, "kennel", true),
        &content(&c),
        c.body["data"]["components"].clone(),
    );
    let from = d.calls().len();
    let (_, token) = d.click(&ann, &question, "kennel:rollback:myapp@good").await;
    let (seen, _) = final_edit(&d, from, &token).await;
    assert!(
        seen.last().unwrap().contains("back at checkpoint good"),
        "{seen:?}"
    );
    assert!(vms.calls().contains(&"restore myapp good".to_owned()));

    // /tag, then /projects with that tag lists the project and its tags;
    // a tag nobody has lists nothing, and says so.
    let from = d.calls().len();
    let (_, token) = d
        .slash(
            &ann,
            CHANNEL,
            "tag",
            &[("name", "myapp"), ("tags", "web team-x")],
        )
        .await;
    let (seen, _) = final_edit(&d, from, &token).await;
    assert!(
        seen.last().unwrap().contains("myapp's tags: team-x, web"),
        "{seen:?}"
    );
    let from = d.calls().len();
    let (_, token) = d.slash(&ann, CHANNEL, "projects", &[("tag", "web")]).await;
    let (seen, _) = final_edit(&d, from, &token).await;
    let listed = seen.last().unwrap();
    assert!(
        listed.contains("myapp") && listed.contains("team-x web"),
        "{seen:?}"
    );
    let from = d.calls().len();
    let (_, token) = d.slash(&ann, CHANNEL, "projects", &[("tag", "api")]).await;
    let (seen, _) = final_edit(&d, from, &token).await;
    assert!(
        seen.last()
            .unwrap()
            .contains("No projects of yours are tagged api"),
        "{seen:?}"
    );
    let from = d.calls().len();
    let (_, token) = d
        .slash(
            &ann,
            CHANNEL,
            "untag",
            &[("name", "myapp"), ("tags", "web")],
        )
        .await;
    let (seen, _) = final_edit(&d, from, &token).await;
    assert!(
        seen.last().unwrap().contains("myapp's tags: team-x."),
        "{seen:?}"
    );

    // /run runs the command as typed (its words its own) and answers
    // with the output and the exit code; /link answers with the link.
    exec.set_guest_shell(Arc::new(kennel_core::guest::EchoGuest));
    let from = d.calls().len();
    let (_, token) = d
        .slash(
            &ann,
            CHANNEL,
            "run",
            &[("name", "myapp"), ("command", "echo hi --there")],
        )
        .await;
    let (seen, _) = final_edit(&d, from, &token).await;
    let ran = seen.last().unwrap();
    assert!(ran.contains("guest says: echo hi --there"), "{seen:?}");
    assert!(ran.contains("exited with 0"), "{seen:?}");
    // /agent: a checkpoint, the agent's run with its output as progress,
    // and the summary with two buttons; "Roll back" puts the project back
    // and says so below the summary, which stays.
    let from = d.calls().len();
    let (_, token) = d
        .slash(
            &ann,
            CHANNEL,
            "agent",
            &[("name", "myapp"), ("task", "fix \"the\" test")],
        )
        .await;
    let (seen, next) = final_edit(&d, from, &token).await;
    let summary = seen.last().unwrap();
    assert!(
        summary.contains("guest says: agent-cli fix \"the\" test"),
        "{seen:?}"
    );
    assert!(summary.contains("rollback myapp agent-1"), "{seen:?}");
    let last = d.calls()[next - 1].clone();
    let buttons = &last.body["components"][0]["components"];
    assert_eq!(
        buttons[0]["custom_id"], "kennel:keep:myapp@agent-1",
        "{last:?}"
    );
    assert_eq!(
        buttons[1]["custom_id"], "kennel:undo:myapp@agent-1",
        "{last:?}"
    );
    let ran = kennel_testkit::discord_fake::message(
        781,
        CHANNEL,
        user(BOT, "kennel", true),
        summary,
        last.body["components"].clone(),
    );
    let from = d.calls().len();
    let (id, token) = d.click(&ann, &ran, "kennel:undo:myapp@agent-1").await;
    let c = callback(&d, from, id, "the click's update").await;
    assert_eq!(c.body["type"], 7, "an update of the summary: {c:?}");
    assert_eq!(c.body["data"]["components"], serde_json::json!([]), "{c:?}");
    assert!(
        c.body["data"]["content"].is_null(),
        "the summary stays: {c:?}"
    );
    let (_, back) = d
        .wait_call(from, "the rollback's answer below the summary", |c| {
            c.method == "POST" && c.path == format!("/webhooks/{APP}/{token}")
        })
        .await;
    assert!(
        content(&back).contains("myapp is back at checkpoint agent-1"),
        "{back:?}"
    );

    let from = d.calls().len();
    let (_, token) = d
        .slash(
            &ann,
            CHANNEL,
            "link",
            &[("name", "myapp"), ("note", "for carol")],
        )
        .await;
    let (seen, _) = final_edit(&d, from, &token).await;
    assert!(seen.last().unwrap().contains("/__kennel/link/"), "{seen:?}");

    // /rm asks with a button; the click destroys.
    let from = d.calls().len();
    let (id, _) = d.slash(&ann, CHANNEL, "rm", &[("name", "myapp")]).await;
    let c = callback(&d, from, id, "the rm question").await;
    assert_eq!(c.body["type"], 4, "{c:?}");
    let button = &c.body["data"]["components"][0]["components"][0];
    assert_eq!(button["custom_id"], "kennel:rm:myapp", "{c:?}");
    let question = kennel_testkit::discord_fake::message(
        779,
        CHANNEL,
        user(BOT, "kennel", true),
        &content(&c),
        c.body["data"]["components"].clone(),
    );
    let from = d.calls().len();
    let (_, token) = d.click(&ann, &question, "kennel:rm:myapp").await;
    let (seen, _) = final_edit(&d, from, &token).await;
    assert!(seen.last().unwrap().contains("myapp is gone"), "{seen:?}");
    assert!(vms.calls().contains(&"destroy myapp".to_owned()));

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), bot)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
