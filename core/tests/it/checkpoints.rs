//! Checkpoints through the executor: labels, the list, rollback's
//! question and its order of work, `cp NAME@LABEL`, pruning, who may do
//! what, and bad input that changes nothing.

use kennel_core::model::ProjectState;
use kennel_core::outcome::{CommandError, Reply};
use kennel_core::testing::World;
use kennel_core::{Outcome, Settings};

fn labels(o: &Outcome) -> Vec<String> {
    match o {
        Ok(Reply::Checkpoints { checkpoints, .. }) => {
            checkpoints.iter().map(|c| c.label.clone()).collect()
        }
        other => panic!("expected a list, got {other:?}"),
    }
}

#[tokio::test]
async fn take_list_roll_back_and_undo() {
    let w = World::new().build();
    let a = w.admin.clone();
    w.run(&a, "new project app").await.unwrap();
    let Ok(Reply::CheckpointTaken {
        checkpoint, cost, ..
    }) = w
        .run(&a, "checkpoint app --note 'before the upgrade'")
        .await
    else {
        panic!()
    };
    assert_eq!(checkpoint.label, "c1");
    assert_eq!(checkpoint.note.as_deref(), Some("before the upgrade"));
    assert_eq!(checkpoint.auto_reason, None);
    assert_eq!(checkpoint.taken_by.as_deref(), Some("root"));
    assert_eq!(cost.disk_bytes, 1 << 20);
    let Ok(Reply::CheckpointTaken { checkpoint, .. }) = w.run(&a, "checkpoint app stable").await
    else {
        panic!()
    };
    assert_eq!(checkpoint.label, "stable");
    // A label is one project's once.
    let o = w.run(&a, "checkpoint app stable").await;
    assert!(
        matches!(o, Err(CommandError::Conflict(ref m)) if m.contains("checkpoint rm app stable")),
        "{o:?}"
    );
    assert_eq!(
        labels(&w.run(&a, "checkpoints app").await),
        ["c1", "stable"]
    );
    let text = w.text(&a, "checkpoints app").await;
    assert!(text.contains("before the upgrade"), "{text}");

    // Rollback asks first, naming the checkpoint; nothing happens yet.
    let before = w.vms.calls().len();
    let Ok(Reply::Confirm { prompt, .. }) = w.run(&a, "rollback app c1").await else {
        panic!()
    };
    assert!(prompt.contains("checkpoint c1"), "{prompt}");
    assert_eq!(w.vms.calls().len(), before);
    // Yes: stopped, the present checkpointed, restored, started again.
    let Ok(Reply::RolledBack {
        undo, restarted, ..
    }) = w.run(&a, "yes").await
    else {
        panic!()
    };
    assert_eq!(undo, "auto-1");
    assert!(restarted);
    let calls = w.vms.calls();
    assert_eq!(
        calls[before..],
        [
            "stop app",
            "checkpoint app auto-1",
            "restore app c1",
            "start app"
        ]
    );
    let Ok(Reply::Checkpoints { checkpoints, .. }) = w.run(&a, "checkpoints app").await else {
        panic!()
    };
    let auto = checkpoints.iter().find(|c| c.label == "auto-1").unwrap();
    assert_eq!(auto.auto_reason.as_deref(), Some("before rollback to c1"));
    // Undo: roll back to what was there before.
    let Ok(Reply::RolledBack { undo, .. }) = w.run(&a, "rollback app auto-1 --yes").await else {
        panic!()
    };
    assert_eq!(undo, "auto-2");
    assert!(w.vms.overlaps().is_empty(), "{:?}", w.vms.overlaps());

    // Removed: gone from the list, its files removed.
    let Ok(Reply::CheckpointRemoved { .. }) = w.run(&a, "checkpoint rm app stable").await else {
        panic!()
    };
    assert!(w
        .vms
        .calls()
        .contains(&"remove_checkpoint app stable".to_owned()));
    assert_eq!(
        labels(&w.run(&a, "checkpoints app").await),
        ["c1", "auto-1", "auto-2"]
    );
}

#[tokio::test]
async fn a_stopped_project_rolls_back_without_starting() {
    let w = World::new().build();
    let a = w.admin.clone();
    w.run(&a, "new project app").await.unwrap();
    w.run(&a, "checkpoint app").await.unwrap();
    w.run(&a, "stop app").await.unwrap();
    let before = w.vms.calls().len();
    let Ok(Reply::RolledBack { restarted, .. }) = w.run(&a, "rollback app c1 --yes").await else {
        panic!()
    };
    assert!(!restarted);
    assert_eq!(
        w.vms.calls()[before..],
        ["checkpoint app auto-1", "restore app c1"]
    );
    let state: String = w
        .store
        .call(|c| {
            Ok(
                c.query_row("SELECT state FROM projects WHERE name = 'app'", [], |r| {
                    r.get(0)
                })?,
            )
        })
        .await
        .unwrap();
    assert_eq!(state, ProjectState::Stopped.as_str());
}

#[tokio::test]
async fn the_app_port_goes_back_with_a_rollback() {
    let w = World::new().build();
    let a = w.admin.clone();
    w.run(&a, "new project app").await.unwrap();
    w.run(&a, "checkpoint app").await.unwrap();
    w.run(&a, "port app 9000").await.unwrap();
    w.run(&a, "rollback app c1 --yes").await.unwrap();
    let Ok(Reply::Status { project, .. }) = w.run(&a, "status app").await else {
        panic!()
    };
    assert_eq!(project.app_port, 8080);
    // And forward again with the automatic checkpoint.
    w.run(&a, "rollback app auto-1 --yes").await.unwrap();
    let Ok(Reply::Status { project, .. }) = w.run(&a, "status app").await else {
        panic!()
    };
    assert_eq!(project.app_port, 9000);
}

#[tokio::test]
async fn copies_from_a_checkpoint() {
    let w = World::new().build();
    let a = w.admin.clone();
    w.run(&a, "new project app").await.unwrap();
    w.run(&a, "checkpoint app good").await.unwrap();
    let Ok(Reply::Created { project, .. }) = w.run(&a, "cp app@good fork").await else {
        panic!()
    };
    assert_eq!(project.name.as_str(), "fork");
    assert!(w
        .vms
        .calls()
        .contains(&"copy_checkpoint app good".to_owned()));
    let o = w.run(&a, "cp app@nope other").await;
    assert!(
        matches!(o, Err(CommandError::NotFound(ref m)) if m.contains("checkpoints app")),
        "{o:?}"
    );
    let o = w.run(&a, "cp app@ other").await;
    assert!(matches!(o, Err(CommandError::Usage(_))), "{o:?}");
}

#[tokio::test]
async fn bad_input_changes_nothing() {
    let w = World::new().build();
    let a = w.admin.clone();
    w.run(&a, "new project app").await.unwrap();
    let before = w.vms.calls().len();
    for (line, what) in [
        ("rollback app nope --yes", "no checkpoint 'nope'"),
        ("checkpoint rm app nope", "no checkpoint 'nope'"),
        ("checkpoint ghost", "no project 'ghost'"),
        ("rollback ghost c1 --yes", "no project 'ghost'"),
    ] {
        let o = w.run(&a, line).await;
        assert!(
            matches!(&o, Err(CommandError::NotFound(m)) if m.contains(what)),
            "{line}: {o:?}"
        );
    }
    for line in [
        "checkpoint app Bad_Label",
        "checkpoint app ../x",
        "checkpoint app --note ''",
    ] {
        let o = w.run(&a, line).await;
        assert!(matches!(o, Err(CommandError::Usage(_))), "{line}: {o:?}");
    }
    assert_eq!(w.vms.calls().len(), before);
}

#[tokio::test]
async fn who_may_do_what() {
    let w = World::new().build();
    let owner = w.member("4001", 41).await;
    let guest = w.member("4002", 42).await;
    let web_only = w.member("4003", 43).await;
    w.run(&owner, "new project app").await.unwrap();
    w.run(&owner, "share app u4002 --ssh").await.unwrap();
    w.run(&owner, "share app u4003 --web").await.unwrap();
    // Who works in the VM may take checkpoints and see them.
    w.run(&guest, "checkpoint app").await.unwrap();
    assert_eq!(labels(&w.run(&guest, "checkpoints app").await), ["c1"]);
    // Rolling back and removing are the owner's.
    for line in ["rollback app c1 --yes", "checkpoint rm app c1"] {
        let o = w.run(&guest, line).await;
        assert!(
            matches!(&o, Err(CommandError::Refused(m)) if m.contains("only the owner")),
            "{o:?}"
        );
    }
    let o = w.run(&web_only, "checkpoint app").await;
    assert!(matches!(o, Err(CommandError::Refused(_))), "{o:?}");
    w.run(&owner, "checkpoint rm app c1").await.unwrap();
}

#[tokio::test]
async fn automatic_checkpoints_are_pruned_first_and_named_ones_never() {
    let w = World::new()
        .settings(Settings {
            checkpoint_keep: 2,
            ..Settings::default()
        })
        .build();
    let a = w.admin.clone();
    w.run(&a, "new project app").await.unwrap();
    w.run(&a, "checkpoint app one").await.unwrap();
    w.run(&a, "rollback app one --yes").await.unwrap(); // auto-1
    w.run(&a, "rollback app one --yes").await.unwrap(); // auto-2: auto-1 goes
    assert_eq!(
        labels(&w.run(&a, "checkpoints app").await),
        ["one", "auto-2"]
    );
    w.run(&a, "checkpoint app two").await.unwrap(); // auto-2 goes
    let Ok(Reply::CheckpointTaken { notes, .. }) = w.run(&a, "checkpoint app three").await else {
        panic!()
    };
    assert!(
        notes
            .iter()
            .any(|n| n.contains("named ones are never removed")),
        "{notes:?}"
    );
    assert_eq!(
        labels(&w.run(&a, "checkpoints app").await),
        ["one", "two", "three"]
    );
}

#[tokio::test]
async fn checkpoints_count_against_the_disk_quota_and_go_with_the_project() {
    let w = World::new().build();
    let who = w.member("5001", 51).await;
    // Members' default disk quota, filled by the project itself.
    w.run(&who, "new project app").await.unwrap();
    let quota = w
        .store
        .call(|c| {
            c.execute(
                "UPDATE quotas SET disk_mib = (SELECT disk_mib FROM projects WHERE name = 'app') + 1",
                [],
            )?;
            Ok(())
        })
        .await;
    quota.unwrap();
    w.run(&who, "checkpoint app").await.unwrap(); // 1 MiB: now at the quota
    let o = w.run(&who, "checkpoint app").await;
    assert!(
        matches!(&o, Err(CommandError::Refused(m)) if m.contains("checkpoint rm app")),
        "{o:?}"
    );
    // rm says the checkpoints go too.
    let Ok(Reply::Confirm { prompt, .. }) = w.run(&who, "rm app").await else {
        panic!()
    };
    assert!(prompt.contains("its checkpoint"), "{prompt}");
    w.run(&who, "yes").await.unwrap();
    let left: i64 = w
        .store
        .call(|c| Ok(c.query_row("SELECT COUNT(*) FROM checkpoints", [], |r| r.get(0))?))
        .await
        .unwrap();
    assert_eq!(left, 0);
}
