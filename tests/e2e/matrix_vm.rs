//! The whole path from Matrix to a real guest: `kennel serve` with its
//! Matrix bot logged in to a real Synapse, a person DMs `new project`,
//! watches the progress message being edited into the final answer, and
//! the VM it names answers over SSH with /workspace mounted, and `run`
//! in it answers in the chat with the output and the exit code, and a
//! share link comes with its QR code as an image.
//!
//! Needs what `tests/e2e/vm.rs` needs plus Synapse (scripts/install-deps.sh
//! test). Features `vm-tests` and `matrix`.
#![cfg(all(feature = "vm-tests", feature = "matrix"))]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crate::support::Kennel;
use kennel_testkit::matrix_client::person;
use kennel_testkit::synapse::Synapse;
use matrix_sdk::ruma::UserId;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_project_from_matrix_on_a_real_guest() {
    let tmp = tempfile::tempdir().unwrap();
    let hs = tokio::task::spawn_blocking(Synapse::start).await.unwrap();
    let bot = UserId::parse(hs.register("kennel", "bot-pw", false)).unwrap();
    let ann = person(&hs, "ann").await;

    let mut k = Kennel::new(tmp.path());
    k.env = vec![
        ("KENNEL_ADMINS".into(), format!("[\"matrix:{}\"]", ann.id)),
        ("KENNEL_MATRIX__HOMESERVER".into(), hs.url.clone()),
        ("KENNEL_MATRIX__USER".into(), bot.to_string()),
        ("KENNEL_MATRIX__PASSWORD".into(), "bot-pw".into()),
        (
            "KENNEL_MATRIX__INVITE_FROM".into(),
            "[\"localhost\"]".into(),
        ),
    ];
    let k = tokio::task::spawn_blocking(move || {
        k.start_serve();
        k
    })
    .await
    .unwrap();

    let dm = ann.dm(&bot).await;
    let asked = ann.say(&dm, "new project hello --stack rust").await;
    let progress = ann
        .wait_for("the progress message", |s| {
            s.sender == bot && s.in_reply_to.as_ref() == Some(&asked)
        })
        .await;
    let mut edits = vec![progress.body.clone()];
    while edits.last().unwrap().contains('⏳') {
        let e = ann
            .wait_for("an edit", |s| s.replaces.as_ref() == Some(&progress.id))
            .await;
        edits.push(e.body);
    }
    let last = edits.last().unwrap();
    assert!(last.contains("ssh hello@127.0.0.1 -p 2222"), "{edits:#?}");
    assert!(edits.iter().any(|e| e.contains("booting")), "{edits:#?}");

    let out = tokio::task::spawn_blocking(move || {
        let out = k.ssh_ok("hello", "mountpoint -q /workspace && echo mounted");
        (out, k)
    })
    .await
    .unwrap();
    assert!(out.0.contains("mounted"), "{}", out.0);

    // `run` from the chat: the output's last lines and the exit code.
    let asked = ann
        .say(&dm, "run hello sh -c 'echo hi-from-the-guest; exit 3'")
        .await;
    let answer = ann
        .wait_for("the run's answer", |s| {
            s.sender == bot && s.body.contains("exited with 3")
        })
        .await;
    assert!(answer.body.contains("hi-from-the-guest"), "{}", answer.body);
    let _ = asked;

    // A share link in the DM: the URL, then its QR code as an image.
    ann.say(&dm, "share hello --link --note for-carol").await;
    let link = ann
        .wait_for("the share link", |s| {
            s.sender == bot && s.body.contains("/__kennel/link/")
        })
        .await;
    assert!(
        link.body.contains("https://hello.localhost:"),
        "{}",
        link.body
    );
    ann.wait_for("the link's QR code", |s| {
        s.sender == bot && s.body == kennel_bot::matrix::QR_FILE
    })
    .await;
    drop(out.1);
    drop(hs);
}
