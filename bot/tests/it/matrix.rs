//! The Matrix bot against a real Synapse (PyPI matrix-synapse, SQLite) on
//! loopback, with matrix-sdk clients as the people talking to it, the
//! executor over an in-memory store and a fake provisioner that reports
//! progress slowly, and the real SSH gateway with OpenSSH's client.
//!
//! One homeserver serves the whole story, in order: history is not
//! answered; DMs (encrypted, as clients make them) and group rooms;
//! unknown users; access requests decided by reaction and by typed
//! commands; `new project` with progress edits; limits; a homeserver
//! restart.

#![cfg(feature = "matrix")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use std::time::Duration;

use kennel_bot::config::MatrixConfig;
use kennel_bot::desk::{Desk, Limits};
use kennel_core::model::{Frontend, Identity};
use kennel_core::Settings;
use kennel_testkit::matrix_client::{person, Person};
use kennel_testkit::ssh::{keygen, run_ssh};
use kennel_testkit::synapse::Synapse;
use matrix_sdk::ruma::api::client::room::create_room::v3::{Request as CreateRoom, RoomPreset};
use matrix_sdk::ruma::events::reaction::ReactionEventContent;
use matrix_sdk::ruma::events::relation::Annotation;
use matrix_sdk::ruma::events::room::member::MembershipState;
use matrix_sdk::ruma::{OwnedRoomId, UserId};

async fn group_room(creator: &Person, invite: &[&UserId], name: &str) -> OwnedRoomId {
    let mut req = CreateRoom::new();
    req.invite = invite.iter().map(|u| (*u).to_owned()).collect();
    req.preset = Some(RoomPreset::PrivateChat);
    req.name = Some(name.into());
    creator
        .client
        .create_room(req)
        .await
        .unwrap()
        .room_id()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn matrix_bot_against_synapse() {
    let mut hs = tokio::task::spawn_blocking(Synapse::start).await.unwrap();
    let bot_id = UserId::parse(hs.register("kennel", "bot-pw", false)).unwrap();
    let root = person(&hs, "root").await;
    let ann = person(&hs, "ann").await;
    let bob = person(&hs, "bob").await;
    let carol = person(&hs, "carol").await;

    // The admin room exists before the bot starts, with a command in it
    // that must never be answered.
    let admin_room = group_room(&root, &[&bot_id], "kennel admins").await;
    let old = root.say(&admin_room, "!kennel projects").await;

    let (exec, vms) = crate::common::executor(
        Identity::new(Frontend::Matrix, root.id.as_str()),
        Duration::from_millis(700),
    );
    let keys = tempfile::tempdir().unwrap();
    let ssh_port = crate::common::ssh_gateway(&exec, keys.path()).await;

    let state = tempfile::tempdir().unwrap();
    let cfg = MatrixConfig {
        homeserver: Some(hs.url.clone()),
        user: bot_id.to_string(),
        password: Some("bot-pw".into()),
        admin_room: Some(admin_room.to_string()),
        invite_from: vec!["localhost".into()],
        prefix: "!kennel".into(),
        limits: Limits {
            edit_interval_ms: 300,
            burst: 30,
            max_message_bytes: 4096,
            ..Limits::default()
        },
        ..MatrixConfig::default()
    };
    assert_eq!(cfg.problem(), None);
    let desk = Arc::new(Desk::new(exec.gate(), cfg.limits.clone()));
    let bot = kennel_bot::matrix::connect(cfg.clone(), state.path(), desk.clone())
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(bot.run(async move {
        let _ = stopped.await;
    }));

    // 1. History is not answered: the first reply in the admin room is to
    // the command sent after the bot started.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let now = root.say(&admin_room, "!kennel whoami").await;
    let first = root
        .next_from(&bot_id, &admin_room, "a reply in the admin room")
        .await;
    assert_eq!(
        first.in_reply_to,
        Some(now),
        "answered history ({old}): {first:?}"
    );
    assert!(first.body.contains("admin"), "{first:?}");

    // 2. A group room: unaddressed messages are ignored.
    let group = group_room(&root, &[&bot_id, &ann.id], "team").await;
    ann.client.join_room_by_id(&group).await.unwrap();
    root.next_from(&bot_id, &group, "hello in the group").await;
    ann.say(&group, "projects").await;
    let r = ann.ask(&bot_id, &group, "!kennel help").await;
    assert!(r.body.contains("new project"), "{r:?}");
    let r = ann.ask(&bot_id, &group, &format!("{bot_id}: whoami")).await;
    assert!(r.body.contains("request-access"), "{r:?}");

    // Only a moderator (or a Kennel admin) sends the bot away.
    let r = ann.ask(&bot_id, &group, "!kennel leave").await;
    assert!(r.body.contains("Only a room moderator"), "{r:?}");
    // (root's client also saw the bot's answers to ann: wait for this one.)
    let asked = root.say(&group, "!kennel leave").await;
    let r = root
        .wait_for("goodbye", |s| s.in_reply_to.as_ref() == Some(&asked))
        .await;
    assert!(r.body.contains("Goodbye"), "{r:?}");
    let room = root.room(&group).await;
    let mut left = false;
    for _ in 0..100 {
        let m = room.get_member_no_sync(&bot_id).await.unwrap();
        if m.is_some_and(|m| *m.membership() == MembershipState::Leave) {
            left = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(left, "the bot is still in the room");

    // 3. An unknown user in an (encrypted) DM is refused politely.
    let bob_dm = bob.dm(&bot_id).await;
    let r = bob
        .ask(&bot_id, &bob_dm, "new project x --stack rust")
        .await;
    assert!(r.body.contains("does not know you yet"), "{r:?}");
    assert!(r.body.contains("request-access"), "{r:?}");
    let r = bob.ask(&bot_id, &bob_dm, "help").await;
    assert!(r.body.contains("request-access"), "{r:?}");

    // 4. Access requests: bob's approved with a reaction...
    let (bob_key, bob_pub) = keygen(keys.path(), "bob");
    let r = bob
        .ask(
            &bot_id,
            &bob_dm,
            &format!("request-access {bob_pub} bob's laptop"),
        )
        .await;
    assert!(r.body.contains("#1"), "{r:?}");
    let posted = root
        .next_from(&bot_id, &admin_room, "the request in the admin room")
        .await;
    assert!(posted.body.contains("Access request #1"), "{posted:?}");
    assert!(posted.body.contains("SHA256:"), "{posted:?}");
    assert!(posted.body.contains("bob's laptop"), "{posted:?}");
    // Before approval the key is refused by the gateway's console.
    let out = run_ssh(
        ssh_port,
        bob_key.clone(),
        "bob".into(),
        vec!["projects".into()],
        None,
    )
    .await;
    assert!(!out.status.success());
    let r = root.room(&admin_room).await;
    r.send(ReactionEventContent::new(Annotation::new(
        posted.id.clone(),
        "👍".into(),
    )))
    .await
    .unwrap();
    let edited = root
        .wait_for("the request message showing the decision", |s| {
            s.replaces.as_ref() == Some(&posted.id)
        })
        .await;
    assert!(edited.body.contains("Approved by"), "{edited:?}");
    let told = bob
        .next_from(&bot_id, &bob_dm, "bob told the outcome")
        .await;
    assert!(told.body.contains("approved"), "{told:?}");
    assert!(
        told.body
            .contains(&format!("-p {}", Settings::default().ssh_port)),
        "{told:?}"
    );
    let out = run_ssh(ssh_port, bob_key, "bob".into(), vec!["whoami".into()], None).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("bob"),
        "{out:?}"
    );

    // ...ann's with a typed approve, carol's typed deny with a reason.
    let (_, ann_pub) = keygen(keys.path(), "ann");
    let ann_dm = ann.dm(&bot_id).await;
    ann.ask(&bot_id, &ann_dm, &format!("request-access {ann_pub}"))
        .await;
    let posted = root.next_from(&bot_id, &admin_room, "ann's request").await;
    assert!(posted.body.contains("Access request #2"), "{posted:?}");
    let r = root.ask(&bot_id, &admin_room, "approve 2").await;
    assert!(r.body.contains("pproved"), "{r:?}");
    ann.next_from(&bot_id, &ann_dm, "ann told the outcome")
        .await;
    // A second decision changes nothing and says so.
    let r = root.ask(&bot_id, &admin_room, "deny 2").await;
    assert!(r.body.contains("already approved"), "{r:?}");

    let (_, carol_pub) = keygen(keys.path(), "carol");
    let carol_dm = carol.dm(&bot_id).await;
    carol
        .ask(&bot_id, &carol_dm, &format!("request-access {carol_pub}"))
        .await;
    root.next_from(&bot_id, &admin_room, "carol's request")
        .await;
    root.ask(&bot_id, &admin_room, "deny 3 we do not know you")
        .await;
    let told = carol
        .next_from(&bot_id, &carol_dm, "carol told the outcome")
        .await;
    assert!(told.body.contains("denied"), "{told:?}");
    assert!(told.body.contains("we do not know you"), "{told:?}");
    // A member cannot decide.
    let r = ann.ask(&bot_id, &ann_dm, "approve 3").await;
    assert!(r.body.contains("refused"), "{r:?}");

    // 5. new project: one message, edited with progress, ending with the
    // SSH string.
    let asked = ann.say(&ann_dm, "new project myapp --stack rust").await;
    let progress = ann
        .next_from(&bot_id, &ann_dm, "the progress message")
        .await;
    assert_eq!(progress.in_reply_to, Some(asked));
    assert!(progress.body.contains("new project myapp"), "{progress:?}");
    let mut edits = Vec::new();
    loop {
        let e = ann
            .wait_for("an edit of the progress message", |s| {
                s.replaces.as_ref() == Some(&progress.id)
            })
            .await;
        let done = !e.body.contains('⏳');
        edits.push(e.body);
        if done {
            break;
        }
    }
    let last = edits.last().unwrap();
    assert!(last.contains("ssh myapp@127.0.0.1 -p 2222"), "{edits:#?}");
    assert!(edits.iter().any(|e| e.contains("booting")), "{edits:#?}");
    // Three stages 0.7 s apart, at most one edit per 0.3 s.
    assert!(edits.len() <= 8, "{edits:#?}");
    assert!(vms.calls().contains(&"create myapp".to_owned()));

    // Kennel stops the idle project and tells its owner in their DM.
    let now = std::time::Instant::now();
    exec.check_idle(now).await.unwrap();
    let idle = exec
        .check_idle(now + Duration::from_secs(31 * 60))
        .await
        .unwrap();
    assert_eq!(idle.stopped.len(), 1, "{idle:?}");
    let told = ann
        .next_from(&bot_id, &ann_dm, "ann told of the idle stop")
        .await;
    assert_eq!(
        told.body, "myapp was stopped after 30m idle; ssh or https wakes it",
        "{told:?}"
    );

    // A closed project's VM asked for a name nobody decided on: its owner
    // is asked in their DM; a ⏳ reaction allows it for a while, and the
    // bot says so in the room.
    exec.egress_asked(kennel_core::egress::EgressAsked {
        project: kennel_core::names::ProjectName::new("myapp").unwrap(),
        dest: "api.example.com".into(),
    })
    .await;
    let ask = ann
        .next_from(&bot_id, &ann_dm, "ann asked about an egress destination")
        .await;
    assert!(
        ask.body.contains("myapp tried to reach api.example.com")
            && ask.body.contains("React ✅ to allow, ⏳ to allow once"),
        "{ask:?}"
    );
    ann.room(&ann_dm)
        .await
        .send(ReactionEventContent::new(Annotation::new(
            ask.id.clone(),
            "⏳".into(),
        )))
        .await
        .unwrap();
    let said = ann
        .next_from(&bot_id, &ann_dm, "the answer to ann's reaction")
        .await;
    assert!(
        said.body
            .contains("api.example.com allowed for a while for myapp by @ann"),
        "{said:?}"
    );
    let policy = vms.egress.lock().unwrap().get("myapp").cloned().unwrap();
    assert!(
        policy
            .rules
            .iter()
            .any(|r| r.dest.to_string() == "api.example.com" && r.expires_at.is_some()),
        "{policy:?}"
    );

    // 6. Limits: an oversized message is refused politely.
    let r = ann.ask(&bot_id, &ann_dm, &"x".repeat(5000)).await;
    assert!(r.body.contains("up to 4096 bytes"), "{r:?}");

    // 7. The homeserver restarts; the bot keeps answering.
    let hs = tokio::task::spawn_blocking(move || {
        hs.restart();
        hs
    })
    .await
    .unwrap();
    let r = ann.ask(&bot_id, &ann_dm, "projects").await;
    assert!(r.body.contains("myapp"), "{r:?}");

    let _ = stop.send(());
    running.await.unwrap().unwrap();
    drop(hs);
}
