//! `agent`, `agent stop`, `agents` through the executor, with a guest that
//! echoes what it is asked to run: the checkpoint comes first, the task is
//! one argument, the answer says how to undo it, one run per project, and
//! policy as for SSH entry.

use std::sync::Arc;

use kennel_core::guest::EchoGuest;
use kennel_core::outcome::{CommandError, Reply};
use kennel_core::testing::World;
use kennel_core::Settings;

fn world() -> World {
    let w = World::new()
        .settings(Settings {
            agents: vec![
                (
                    "echo".into(),
                    vec![
                        "agent-cli".into(),
                        "--message={task}".into(),
                        "--yes".into(),
                    ],
                ),
                ("fails".into(), vec!["false".into(), "{task}".into()]),
            ],
            ..Settings::default()
        })
        .build();
    w.exec.set_guest_shell(Arc::new(EchoGuest));
    w
}

#[tokio::test]
async fn an_agent_run_checkpoints_first_and_says_how_to_undo_it() {
    let w = world();
    let a = w.admin.clone();
    w.run(&a, "new project app").await.unwrap();
    let o = w.run(&a, "agent app fix the failing test; rm -rf /").await;
    let Ok(Reply::AgentRan {
        agent,
        checkpoint,
        exit_code,
        tail,
        ..
    }) = &o
    else {
        panic!("{o:?}")
    };
    assert_eq!(agent, "echo");
    assert_eq!(checkpoint, "agent-1");
    assert_eq!(*exit_code, 0);
    // The task went as one word of the configured command, no shell.
    assert!(
        tail.iter()
            .any(|l| l == "guest says: agent-cli --message=fix the failing test; rm -rf / --yes"),
        "{tail:?}"
    );
    let text = w.text(&a, "agent app tidy up").await;
    assert!(text.contains("rollback app agent-2"), "{text}");
    // Both checkpoints exist, and the runs are listed.
    let cps = w.text(&a, "checkpoints app").await;
    assert!(cps.contains("agent-1") && cps.contains("agent-2"), "{cps}");
    let runs = w.text(&a, "agents app").await;
    assert!(
        runs.contains("fix the failing test") && runs.contains("exit 0"),
        "{runs}"
    );
    // Another configured agent, by name; its exit status is the answer's.
    let o = w.run(&a, "agent app --with fails try").await;
    assert!(
        matches!(o, Ok(Reply::AgentRan { exit_code: 3, .. })),
        "{o:?}"
    );
    assert_eq!(kennel_core::exit_code(&o), 3);
}

#[tokio::test]
async fn bad_input_and_policy() {
    let w = world();
    let a = w.admin.clone();
    w.run(&a, "new project app").await.unwrap();
    let o = w.run(&a, "agent app --with nosuch do it").await;
    assert!(
        matches!(o, Err(CommandError::NotFound(ref m)) if m.contains("echo, fails")),
        "{o:?}"
    );
    let e = w.text(&a, "agent app").await;
    assert!(e.contains("missing <task>"), "{e}");
    let e = w.text(&a, "agent nosuch do it").await;
    assert!(e.contains("nosuch"), "{e}");
    // Someone the project is not shared with may not run an agent in it.
    let bob = w.member("bob", 7).await;
    let o = w.run(&bob, "agent app do it").await;
    assert!(o.is_err(), "{o:?}");
    let o = w.run(&bob, "agents app").await;
    assert!(o.is_err(), "{o:?}");
    // Nothing runs: stop says so.
    let t = w.text(&a, "agent stop app").await;
    assert!(t.contains("No agent runs in app"), "{t}");
}

#[tokio::test]
async fn without_an_agent_the_answer_says_what_to_add() {
    let w = World::new().build();
    w.exec.set_guest_shell(Arc::new(EchoGuest));
    let a = w.admin.clone();
    w.run(&a, "new project app").await.unwrap();
    let o = w.run(&a, "agent app do it").await;
    assert!(
        matches!(o, Err(CommandError::NotFound(ref m)) if m.contains(".kennel/agent") && m.contains("[agents.NAME]")),
        "{o:?}"
    );
    // Nothing was checkpointed for a run that never started.
    let cps = w.text(&a, "checkpoints app").await;
    assert!(!cps.contains("agent-1"), "{cps}");
}
