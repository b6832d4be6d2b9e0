//! The whole path from Matrix to a real guest: `kennel serve` with its
//! Matrix bot logged in to a real Synapse, a person DMs `new project`,
//! watches the progress message being edited into the final answer, and
//! the VM it names answers over SSH with /workspace mounted, and `run`
//! in it answers in the chat with the output and the exit code, a share
//! link comes with its QR code as an image, a coding agent from the image
//! (gptme) edits the source through Kennel's LLM gateway with the owner's
//! key, in a thread, and `rollback` undoes it, and a line a script in the
//! VM posts to the metadata service reaches the owner's DM.
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

    // An OpenAI-compatible upstream scripted as a model would answer gptme:
    // first an edit (gptme's `save` block), then its `complete` tool.
    let llm = crate::support::llm_upstream_scripted(vec![
        format!("I will update the file.\n```save hello.txt\n{EDITED}\n```\n"),
        "Done.\n```complete\n```\n".into(),
    ]);
    let mut k = Kennel::new(tmp.path());
    k.env = vec![
        (
            "KENNEL_LLM__OPENAI_URL".into(),
            format!("http://127.0.0.1:{}/v1", llm.port),
        ),
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
    let asked = ann.say(&dm, "new project hello --stack python").await;
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
    let k = out.1;

    // A coding agent from the chat: ann's own OpenAI key (set in the DM)
    // is added on the host; gptme in the VM edits a committed file.
    let src = tmp.path().join("kennel-data/projects/hello");
    std::fs::write(src.join("hello.txt"), "the original\n").unwrap();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            // The source belongs to the VM's user, not the test's.
            .args(["-c", "safe.directory=*", "-C"])
            .arg(&src)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
    };
    git(&["add", "hello.txt"]);
    git(&["commit", "-q", "-m", "hello"]);
    // What the test wrote as root belongs to the source's owner, as a
    // person's own edits would.
    let owned = std::process::Command::new("chown")
        .args(["-R", "--reference"])
        .arg(&src)
        .arg(&src)
        .status()
        .unwrap();
    assert!(owned.success());
    ann.ask(&bot, &dm, &format!("secret set openai-api-key {ANN_KEY}"))
        .await;
    let asked = ann
        .say(&dm, "agent hello make hello.txt say it was edited")
        .await;
    let progress = ann
        .wait_within(AGENT_WAIT, "the agent's progress message", |s| {
            s.sender == bot && s.in_reply_to.as_ref() == Some(&asked)
        })
        .await;
    assert_eq!(
        progress.thread.as_ref(),
        Some(&asked),
        "the run is in a thread under the request"
    );
    let mut edits = vec![progress.body.clone()];
    while !edits.last().unwrap().contains("Agent gptme in hello") {
        let e = ann
            .wait_within(AGENT_WAIT, "the agent's next edit", |s| {
                s.replaces.as_ref() == Some(&progress.id)
            })
            .await;
        edits.push(e.body);
    }
    let summary = edits.last().unwrap().clone();
    let (state, k) = tokio::task::spawn_blocking(move || {
        let out = k.ssh_ok(
            "hello",
            "cd /workspace; id; git status --short; git diff --stat HEAD; ls -la; cat hello.txt",
        );
        (out, k)
    })
    .await
    .unwrap();
    eprintln!("the source in the VM after the run:\n{state}");
    assert!(edits.len() >= 2, "progress before the summary: {edits:#?}");
    assert!(summary.contains("finished in"), "{edits:#?}");
    assert!(summary.contains("hello.txt"), "the diffstat: {summary}");
    assert!(summary.contains("rollback hello agent-1"), "{summary}");
    assert_eq!(
        std::fs::read_to_string(src.join("hello.txt"))
            .unwrap()
            .trim(),
        EDITED
    );
    {
        let seen = llm.seen.lock().unwrap();
        let asked_llm: Vec<&String> = seen
            .iter()
            .filter(|r| r.contains("/chat/completions "))
            .collect();
        assert!(asked_llm.len() >= 2, "{seen:#?}");
        assert!(
            asked_llm.iter().all(|r| r
                .to_ascii_lowercase()
                .contains(&format!("authorization: bearer {ANN_KEY}"))),
            "{asked_llm:#?}"
        );
    }
    // The way back, from the chat.
    ann.say(&dm, "rollback hello agent-1 --yes").await;
    let back = ann
        .wait_within(AGENT_WAIT, "the rollback's answer", |s| {
            s.sender == bot && s.body.contains("is back at checkpoint agent-1")
        })
        .await;
    assert!(back.body.contains("hello"), "{}", back.body);
    assert_eq!(
        std::fs::read_to_string(src.join("hello.txt")).unwrap(),
        "the original\n"
    );

    // A script in the VM tells the owner: a line in ann's DM.
    let k = tokio::task::spawn_blocking(move || {
        k.ssh_ok(
            "hello",
            "curl -sf --retry 5 --retry-all-errors -d 'tests are green' http://169.254.169.254/kennel/v1/notify",
        );
        k
    })
    .await
    .unwrap();
    let notice = ann
        .wait_within(AGENT_WAIT, "the VM's notice", |s| {
            s.sender == bot && s.body.contains("tests are green")
        })
        .await;
    assert_eq!(notice.body, "[hello] tests are green");
    drop(k);
    drop(hs);
}

/// What the scripted model has gptme write.
const EDITED: &str = "edited by the agent";
/// ann's own OpenAI key: it reaches the upstream, never the VM.
const ANN_KEY: &str = "sk-ann-0123456789abcdef";
/// A step of a real guest under emulation (gptme's start, a rollback's
/// restart) may take minutes on a loaded host.
const AGENT_WAIT: std::time::Duration = std::time::Duration::from_secs(600);
