//! The executor end to end over an in-memory store and a recording provisioner.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kennel_core::keys::testing::ed25519;
use kennel_core::model::{Frontend, Identity, ProjectState, RequestState};
use kennel_core::outcome::{CommandError, Reply};
use kennel_core::provision::NoProgress;
use kennel_core::testing::World;
use kennel_core::{Event, Outcome, Settings, Store};

async fn world() -> World {
    World::new().build()
}

async fn world_with(base: Settings) -> World {
    World::new().settings(base).build()
}

fn refused(o: &Outcome) -> String {
    match o {
        Err(CommandError::Refused(r)) => r.clone(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn access_request_round_trip_then_a_project() {
    let w = world().await;
    let ann = Identity::new(Frontend::Discord, "1001");
    let key = ed25519(9, Some("ann@laptop"));
    let mut events = w.exec.subscribe();

    // Unknown: only help, whoami, request-access.
    assert!(refused(&w.run(&ann, "projects").await).contains("request-access"));
    let Ok(Reply::RequestFiled { request, new: true }) =
        w.run(&ann, &format!("request-access {key} please")).await
    else {
        panic!()
    };
    assert_eq!(request.note.as_deref(), Some("please"));
    assert!(
        matches!(events.recv().await.unwrap(), Event::AccessRequested(r) if r.id == request.id)
    );
    // Pasting the same key again is the same request.
    let Ok(Reply::RequestFiled { new: false, .. }) =
        w.run(&ann, &format!("request-access {key}")).await
    else {
        panic!()
    };

    // A configured admin approves; the requester becomes a member with the key.
    let Ok(Reply::Decided {
        request: decided,
        user: Some(name),
    }) = w.run(&w.admin, &format!("approve {}", request.id)).await
    else {
        panic!()
    };
    assert_eq!(decided.state, RequestState::Approved);
    assert_eq!(name, "u1001");
    assert!(matches!(
        events.recv().await.unwrap(),
        Event::RequestDecided(_)
    ));
    // Deciding twice changes nothing and says so.
    let again = w
        .run(&w.admin, &format!("deny {} too late", request.id))
        .await;
    assert!(
        matches!(again, Err(CommandError::Conflict(ref m)) if m.contains("already approved")),
        "{again:?}"
    );
    let user = w
        .store
        .call({
            let fp = key.fingerprint().clone();
            move |c| kennel_core::store::repo::user_by_active_key(c, &fp)
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(user.name.as_str(), "u1001");

    // Now a member: a project, within quota.
    let Ok(Reply::Created {
        project,
        connection,
        ..
    }) = w.run(&ann, "new project demo --stack rust").await
    else {
        panic!()
    };
    assert_eq!(project.state, ProjectState::Running);
    assert_eq!(project.app_port, 8000);
    assert_eq!(connection.ssh_command, "ssh demo@127.0.0.1 -p 2222");
    assert!(w.vms.has_vm("demo"));
    // rm asks first, then destroys the VM but keeps the source.
    let Ok(Reply::Confirm { confirm_with, .. }) = w.run(&ann, "rm demo").await else {
        panic!()
    };
    assert_eq!(confirm_with, "yes");
    assert!(w.vms.has_vm("demo"));
    let out = w.run(&ann, "yes").await;
    assert!(
        matches!(out, Ok(Reply::Removed { purged: false, .. })),
        "{out:?}"
    );
    let message = kennel_core::render(&out, kennel_core::Format::Plain);
    assert!(message.contains("source is still at"), "{message}");
    assert!(!w.vms.has_vm("demo"));
    assert!(!w.vms.calls().iter().any(|c| c.starts_with("purge")));
}

#[tokio::test]
async fn members_see_only_their_projects_and_shares() {
    let w = world().await;
    let w_admin = w.admin.clone();
    // The admin creates users through requests.
    for (i, id) in ["2001", "2002"].iter().enumerate() {
        let who = Identity::new(Frontend::Discord, *id);
        let k = ed25519(20 + i as u8, None);
        let Ok(Reply::RequestFiled { request, .. }) =
            w.run(&who, &format!("request-access {k}")).await
        else {
            panic!()
        };
        w.run(&w_admin, &format!("approve {}", request.id))
            .await
            .unwrap();
    }
    let a = Identity::new(Frontend::Discord, "2001");
    let b = Identity::new(Frontend::Discord, "2002");
    w.run(&a, "new project alpha").await.unwrap();
    // A member's clones may reach only public hosts; an admin's anywhere.
    let guarded = |w: &kennel_core::testing::World| {
        w.vms
            .last_create
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .public_hosts_only
    };
    assert!(guarded(&w), "a member's create is guarded");
    assert!(refused(&w.run(&b, "status alpha").await).contains("no project"));
    assert!(refused(&w.run(&b, "status nothere").await).contains("no project"));
    w.run(&a, "share alpha u2002 --web").await.unwrap();
    w.run(&b, "status alpha").await.unwrap();
    assert!(refused(&w.run(&b, "ssh alpha").await).contains("web app only"));
    assert!(refused(&w.run(&b, "rm alpha --yes").await).contains("only the owner"));
    let Ok(Reply::Projects { projects, .. }) = w.run(&b, "projects").await else {
        panic!()
    };
    assert_eq!(projects.len(), 1);
    let Ok(Reply::Projects { projects, .. }) = w.run(&w_admin, "projects").await else {
        panic!()
    };
    assert_eq!(projects.len(), 1);
    w.run(&w_admin, "new project beta").await.unwrap();
    assert!(!guarded(&w), "an admin's create is not");
}

#[tokio::test]
async fn a_failed_create_rolls_back_the_record() {
    let w = world().await;
    w.vms.fail_next_create("the VM never became ready");
    let o = w.run(&w.admin, "new project flaky").await;
    assert!(matches!(o, Err(CommandError::Provision(_))), "{o:?}");
    assert!(o.unwrap_err().to_string().contains("never became ready"));
    let Ok(Reply::Projects { projects, .. }) = w.run(&w.admin, "projects").await else {
        panic!()
    };
    assert!(projects.is_empty());
    // The name is free again.
    w.run(&w.admin, "new project flaky").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_creates_with_one_name_one_wins() {
    let w = world().await;
    let (x, y) = tokio::join!(
        w.run(&w.admin, "new project twin"),
        w.run(&w.admin, "new project twin")
    );
    let wins = [&x, &y].iter().filter(|o| o.is_ok()).count();
    assert_eq!(wins, 1, "{x:?} {y:?}");
    let loser = if x.is_ok() { y } else { x };
    let msg = loser.unwrap_err().to_string();
    assert!(msg.contains("already exists"), "{msg}");
}

#[tokio::test]
async fn quotas_and_unknown_stacks_are_refused_before_anything_is_built() {
    let w = world().await;
    let who = Identity::new(Frontend::Discord, "3001");
    let k = ed25519(33, None);
    let Ok(Reply::RequestFiled { request, .. }) = w.run(&who, &format!("request-access {k}")).await
    else {
        panic!()
    };
    w.run(&w.admin, &format!("approve {}", request.id))
        .await
        .unwrap();
    let o = w.run(&who, "new project big --cpus 64").await;
    assert!(refused(&o).contains("vCPU quota"), "{o:?}");
    let o = w.run(&who, "new project x --stack cobol").await;
    assert!(
        matches!(o, Err(CommandError::NotFound(ref m)) if m.contains("known stacks: rust")),
        "{o:?}"
    );
    assert!(w.vms.calls().is_empty());
}

#[tokio::test]
async fn keys_belong_to_one_user() {
    let w = world().await;
    let k = ed25519(40, Some("root@host"));
    let Ok(Reply::KeyAdded { key }) = w.run(&w.admin, &format!("key add {k} work laptop")).await
    else {
        panic!()
    };
    assert_eq!(key.label.as_deref(), Some("work laptop"));
    let stranger = Identity::new(Frontend::Matrix, "@eve:example.org");
    let o = w.run(&stranger, &format!("request-access {k}")).await;
    assert!(matches!(o, Err(CommandError::Conflict(_))), "{o:?}");
    let Ok(Reply::KeyRevoked { .. }) = w
        .run(&w.admin, &format!("key rm {}", k.fingerprint()))
        .await
    else {
        panic!()
    };
}

#[tokio::test]
async fn purge_asks_twice_and_names_the_path() {
    let w = world().await;
    w.run(&w.admin, "new project gone").await.unwrap();
    let Ok(Reply::Confirm { prompt, .. }) = w.run(&w.admin, "rm gone --purge").await else {
        panic!()
    };
    assert!(
        prompt.contains("DELETES") && prompt.contains("gone"),
        "{prompt}"
    );
    let Ok(Reply::Confirm { prompt, .. }) = w.run(&w.admin, "yes").await else {
        panic!()
    };
    assert!(prompt.starts_with("Last check"), "{prompt}");
    assert!(!w.vms.calls().iter().any(|c| c.starts_with("purge")));
    let out = w.run(&w.admin, "yes").await;
    assert!(
        matches!(out, Ok(Reply::Removed { purged: true, .. })),
        "{out:?}"
    );
    let message = kennel_core::render(&out, kennel_core::Format::Plain);
    assert!(message.contains("was deleted"), "{message}");
    assert!(w.vms.calls().iter().any(|c| c == "purge gone"));
    // --yes skips the first question, never the purge one.
    w.run(&w.admin, "new project gone2").await.unwrap();
    let Ok(Reply::Confirm { prompt, .. }) = w.run(&w.admin, "rm gone2 --purge --yes").await else {
        panic!()
    };
    assert!(prompt.starts_with("Last check"), "{prompt}");
    // Nothing pending after an answer; a stranger's yes confirms nothing.
    let stranger = Identity::new(Frontend::Matrix, "@eve:example.org");
    assert!(matches!(
        w.run(&stranger, "yes").await,
        Err(CommandError::NotFound(_))
    ));
    w.run(&w.admin, "yes").await.unwrap();
    assert!(matches!(
        w.run(&w.admin, "yes").await,
        Err(CommandError::NotFound(_))
    ));
}

#[tokio::test]
async fn confirmations_expire() {
    let w = world_with(Settings {
        confirm_secs: -1,
        ..Settings::default()
    })
    .await;
    w.run(&w.admin, "new project stale").await.unwrap();
    w.run(&w.admin, "rm stale").await.unwrap();
    assert!(
        matches!(w.run(&w.admin, "yes").await, Err(CommandError::NotFound(ref m)) if m.contains("nothing to confirm"))
    );
    assert!(w.vms.has_vm("stale"));
}

#[tokio::test]
async fn paths_stay_under_the_root_and_existing_sources_need_adopt() {
    let root = tempfile::tempdir().unwrap();
    let w = world_with(Settings {
        projects_root: root.path().to_owned(),
        ..Settings::default()
    })
    .await;
    let o = w.run(&w.admin, "new project p1 --path /etc").await;
    assert!(
        matches!(o, Err(CommandError::Refused(ref m)) if m.contains("inside")),
        "{o:?}"
    );
    let o = w.run(&w.admin, "new project p1 --path ../escape").await;
    assert!(
        matches!(o, Err(CommandError::Refused(ref m)) if m.contains("..")),
        "{o:?}"
    );
    std::fs::create_dir_all(root.path().join("p1")).unwrap();
    std::fs::write(root.path().join("p1/mine.txt"), "x").unwrap();
    let o = w.run(&w.admin, "new project p1").await;
    assert!(
        matches!(o, Err(CommandError::Conflict(ref m)) if m.contains("--adopt")),
        "{o:?}"
    );
    let Ok(Reply::Created { project, .. }) = w.run(&w.admin, "new project p1 --adopt").await else {
        panic!()
    };
    assert_eq!(
        project.source_path,
        root.path().join("p1").display().to_string()
    );
    // Once p1 is a project, its name is what is wrong, with or without
    // --adopt: not "pass --adopt" first and "already exists" after it.
    for line in ["new project p1", "new project p1 --adopt"] {
        let o = w.run(&w.admin, line).await;
        assert!(
            matches!(o, Err(CommandError::Conflict(ref m)) if m.contains("a project named 'p1' already exists") && !m.contains("--adopt")),
            "{line}: {o:?}"
        );
    }
    let o = w.run(&w.admin, "new project p2 --template nope").await;
    assert!(
        matches!(o, Err(CommandError::NotFound(ref m)) if m.contains("no template")),
        "{o:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_beyond_the_limit_wait_in_line_and_are_told_so() {
    use std::sync::Mutex;
    struct Sink(Mutex<Vec<String>>);
    impl kennel_core::provision::ProgressSink for Sink {
        fn report(&self, p: kennel_core::provision::Progress) {
            self.0.lock().unwrap().push(p.to_string());
        }
    }
    let w = world_with(Settings {
        max_parallel_creates: 1,
        ..Settings::default()
    })
    .await;
    *w.vms.create_delay.lock().unwrap() = std::time::Duration::from_millis(300);
    let (s1, s2, s3) = (
        Sink(Mutex::new(vec![])),
        Sink(Mutex::new(vec![])),
        Sink(Mutex::new(vec![])),
    );
    let (a, b, c) = tokio::join!(
        w.exec.front_door(
            &w.admin,
            None,
            "new project q1",
            kennel_core::Style::PLAIN,
            &s1
        ),
        async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            w.exec
                .front_door(
                    &w.admin,
                    None,
                    "new project q2",
                    kennel_core::Style::PLAIN,
                    &s2,
                )
                .await
        },
        async {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            w.exec
                .front_door(
                    &w.admin,
                    None,
                    "new project q3",
                    kennel_core::Style::PLAIN,
                    &s3,
                )
                .await
        }
    );
    assert!(a.outcome.is_ok() && b.outcome.is_ok() && c.outcome.is_ok());
    let second = s2.0.lock().unwrap().join(" | ");
    assert!(second.contains("queued (1 in line"), "{second}");
    // The third is told its place, and again as the line moves.
    let third = s3.0.lock().unwrap().join(" | ");
    let (two, one) = (
        third.find("queued (2 in line"),
        third.find("queued (1 in line"),
    );
    assert!(two.is_some() && one > two, "{third}");
    assert!(!s1.0.lock().unwrap().join(" ").contains("queued"));
}

#[tokio::test]
async fn cp_rename_and_secrets() {
    let w = world().await;
    w.run(&w.admin, "new project orig").await.unwrap();
    let Ok(Reply::Created { project, .. }) = w.run(&w.admin, "cp orig twin").await else {
        panic!()
    };
    assert_eq!(project.name.as_str(), "twin");
    assert!(w.vms.calls().contains(&"copy orig".to_owned()));
    let o = w.run(&w.admin, "cp orig twin").await;
    assert!(matches!(o, Err(CommandError::Conflict(_))), "{o:?}");
    w.run(&w.admin, "rename twin triplet").await.unwrap();
    assert!(w.vms.has_vm("triplet") && !w.vms.has_vm("twin"));
    let o = w.run(&w.admin, "rename triplet orig").await;
    assert!(
        matches!(o, Err(CommandError::Conflict(ref m)) if m.contains("already exists")),
        "{o:?}"
    );
    let Ok(Reply::Status { .. }) = w.run(&w.admin, "status triplet").await else {
        panic!()
    };

    let out = w.run(&w.admin, "secret set git-token ghp_s3cr3t").await;
    assert!(matches!(out, Ok(Reply::SecretStored { .. })), "{out:?}");
    let message = kennel_core::render(&out, kennel_core::Format::Plain);
    assert!(!message.contains("ghp_s3cr3t"));
    let out = w.run(&w.admin, "secrets").await;
    assert!(matches!(out, Ok(Reply::Secrets { .. })), "{out:?}");
    let message = kennel_core::render(&out, kennel_core::Format::Plain);
    assert!(
        message.contains("git-token") && !message.contains("ghp_s3cr3t"),
        "{message}"
    );
    let audit = w
        .store
        .call(|c| kennel_core::store::repo::recent_audit(c, 50))
        .await
        .unwrap();
    assert!(audit
        .iter()
        .all(|a| !format!("{a:?}").contains("ghp_s3cr3t")));
    w.run(&w.admin, "secret rm git-token").await.unwrap();
    assert!(matches!(
        w.run(&w.admin, "secret rm git-token").await,
        Err(CommandError::NotFound(_))
    ));
    let out = w.run(&w.admin, "deploy-key").await;
    assert!(matches!(out, Ok(Reply::DeployKey { .. })), "{out:?}");
    let message = kennel_core::render(&out, kennel_core::Format::Plain);
    assert!(message.contains("ssh-ed25519"), "{message}");
}

#[tokio::test]
async fn routes_are_recorded_and_access_changes_reach_running_vms() {
    let w = world().await;
    w.run(&w.admin, "new project routed").await.unwrap();
    let name = kennel_core::names::ProjectName::new("routed").unwrap();
    let n = name.clone();
    let route = w
        .store
        .call(move |c| kennel_core::store::repo::route(c, &n))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(route.ssh_addr, "127.0.0.1:10022");
    assert_eq!(route.app_addr, "127.0.0.1:10080");

    // A member with a key gets a share: the VM's keys are re-synced with hers.
    let who = Identity::new(Frontend::Discord, "5001");
    let k = ed25519(50, None);
    let Ok(Reply::RequestFiled { request, .. }) = w.run(&who, &format!("request-access {k}")).await
    else {
        panic!()
    };
    w.run(&w.admin, &format!("approve {}", request.id))
        .await
        .unwrap();
    w.run(&w.admin, "share routed u5001 --ssh").await.unwrap();
    assert!(
        w.vms.calls().contains(&"sync_keys routed 1".to_owned()),
        "{:?}",
        w.vms.calls()
    );
    // Her key is revoked: synced again without it.
    w.run(&who, &format!("key rm {}", k.fingerprint()))
        .await
        .unwrap();
    assert_eq!(
        w.vms
            .calls()
            .iter()
            .filter(|c| c.starts_with("sync_keys routed 0"))
            .count(),
        1,
        "{:?}",
        w.vms.calls()
    );
    // The route goes with the project.
    w.run(&w.admin, "rm routed --yes").await.unwrap();
    let gone = w
        .store
        .call(move |c| kennel_core::store::repo::route(c, &name))
        .await
        .unwrap();
    assert!(gone.is_none());
}

#[tokio::test]
async fn the_vm_watcher_leaves_a_vm_in_the_middle_of_a_rename_alone() {
    let w = world().await;
    w.run(&w.admin, "new project app").await.unwrap();
    // The store shows the new name running while the VM is moved (stopped,
    // then started again under it).
    *w.vms.op_delay.lock().unwrap() = std::time::Duration::from_millis(400);
    let exec = w.exec.clone();
    let admin = w.admin.clone();
    let rename = tokio::spawn(async move {
        let out = exec
            .front_door(
                &admin,
                None,
                "rename app moved",
                kennel_core::Style::PLAIN,
                &NoProgress,
            )
            .await;
        kennel_core::render(&out.outcome, kennel_core::Format::Plain)
    });
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    assert!(w.exec.check_vms().await.unwrap().is_empty());
    let said = rename.await.unwrap();
    assert!(said.contains("app is now moved"), "{said}");
    let Ok(Reply::Projects { projects, .. }) = w.run(&w.admin, "projects").await else {
        panic!()
    };
    assert_eq!(projects[0].state, ProjectState::Running);
    assert!(w.exec.check_vms().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_vm_that_dies_is_shown_stopped_with_why_and_loses_its_route() {
    let w = world().await;
    w.run(&w.admin, "new project app").await.unwrap();
    assert!(w.exec.check_vms().await.unwrap().is_empty());
    w.vms.crash("app");
    let died = w.exec.check_vms().await.unwrap();
    assert_eq!(died.len(), 1);
    let Ok(Reply::Projects { projects, .. }) = w.run(&w.admin, "projects").await else {
        panic!()
    };
    assert_eq!(projects[0].state, ProjectState::Stopped);
    assert!(projects[0]
        .state_note
        .as_deref()
        .unwrap()
        .contains("exited unexpectedly"));
    let shown = kennel_core::render(
        &w.run(&w.admin, "projects").await,
        kennel_core::Format::Plain,
    );
    assert!(
        shown.contains("stopped (the VM exited unexpectedly"),
        "{shown}"
    );
    let store = w.store.clone();
    let route = |s: Store| async move {
        s.call(|c| kennel_core::store::repo::route(c, &"app".parse().unwrap()))
            .await
            .unwrap()
    };
    assert!(
        route(store.clone()).await.is_none(),
        "no route to a dead VM"
    );
    // Noticed once; start brings it back and clears the note.
    assert!(w.exec.check_vms().await.unwrap().is_empty());
    w.run(&w.admin, "start app").await.unwrap();
    let Ok(Reply::Projects { projects, .. }) = w.run(&w.admin, "projects").await else {
        panic!()
    };
    assert_eq!(projects[0].state, ProjectState::Running);
    assert_eq!(projects[0].state_note, None);
    assert!(route(store).await.is_some());
}

#[tokio::test]
async fn reconcile_adopts_with_routes_stops_the_gone_and_rolls_back_cut_off_creates() {
    use kennel_core::store::repo;
    let w = world().await;
    for p in ["up", "down", "half"] {
        w.run(&w.admin, &format!("new project {p}")).await.unwrap();
    }
    let store = w.store.clone();
    // As a daemon killed mid-create leaves it: state creating, no route.
    store
        .call(|c| {
            repo::set_project_state(c, &"half".parse().unwrap(), ProjectState::Creating)?;
            repo::clear_route(c, &"up".parse().unwrap())
        })
        .await
        .unwrap();
    let found = vec![
        ("up".to_owned(), true),
        ("down".to_owned(), false),
        ("half".to_owned(), true),
    ];
    let done = w.exec.reconcile(&found).await.unwrap();
    assert_eq!(done.adopted.len(), 1, "{done:?}");
    assert_eq!(done.stopped.len(), 1, "{done:?}");
    assert_eq!(done.rolled_back.len(), 1, "{done:?}");
    let up = store
        .call(|c| repo::route(c, &"up".parse().unwrap()))
        .await
        .unwrap();
    assert!(up.is_some(), "an adopted VM gets its route back");
    let down = store
        .call(|c| repo::route(c, &"down".parse().unwrap()))
        .await
        .unwrap();
    assert!(down.is_none(), "a gone VM has no route");
    assert!(!w.vms.has_vm("half"), "the half-made VM is removed");
    assert!(w.vms.calls().iter().any(|c| c == "destroy half"));
    let Ok(Reply::Projects { projects, .. }) = w.run(&w.admin, "projects").await else {
        panic!()
    };
    let names: Vec<_> = projects.iter().map(|p| p.name.to_string()).collect();
    assert_eq!(names, ["down", "up"]);
    // The name of the rolled-back project is free again.
    w.run(&w.admin, "new project half").await.unwrap();
}

#[tokio::test]
async fn access_requests_are_limited_in_number_and_note_length() {
    let w = world_with(Settings {
        max_pending_requests: 3,
        ..Settings::default()
    })
    .await;
    let note = "x".repeat(60_000);
    let stranger = Identity::new(Frontend::Ssh, "SHA256:stranger");
    let o = w
        .run(
            &stranger,
            &format!("request-access {} {note}", ed25519(1, None)),
        )
        .await;
    assert!(o.is_err(), "a 60 KB note is refused");
    let o = w
        .exec
        .execute(
            &stranger,
            kennel_core::Command::RequestAccess {
                key: ed25519(1, None),
                note: Some(note),
            },
            &NoProgress,
        )
        .await;
    assert!(refused(&o).contains("keep it to 500"), "{o:?}");
    for i in 0..3u8 {
        let who = Identity::new(Frontend::Ssh, format!("SHA256:k{i}"));
        w.run(
            &who,
            &format!("request-access {} hi", ed25519(10 + i, None)),
        )
        .await
        .unwrap();
    }
    let who = Identity::new(Frontend::Ssh, "SHA256:k9");
    let o = w
        .run(&who, &format!("request-access {} hi", ed25519(30, None)))
        .await;
    assert!(
        matches!(&o, Err(CommandError::Conflict(m)) if m.contains("already waiting")),
        "{o:?}"
    );
    // Asking again with a pending key is not a new request, so not refused.
    let who = Identity::new(Frontend::Ssh, "SHA256:k0");
    let o = w
        .run(&who, &format!("request-access {} again", ed25519(10, None)))
        .await;
    assert!(
        matches!(o, Ok(Reply::RequestFiled { new: false, .. })),
        "{o:?}"
    );
}

#[tokio::test]
async fn credentials_in_git_urls_never_reach_the_store_the_log_or_the_answer() {
    let w = world().await;
    let o = w
        .run(
            &w.admin,
            "new project x --git https://user:s3cr3tpw@git.example.com/repo.git",
        )
        .await;
    let text = o.as_ref().unwrap_err().to_string();
    assert!(!text.contains("s3cr3tpw"), "{text}");
    assert!(text.contains("secret set git-token"), "{text}");
    assert!(text.contains("https://git.example.com/repo.git"), "{text}");
    let audit = w
        .store
        .call(|c| kennel_core::store::repo::recent_audit(c, 50))
        .await
        .unwrap();
    assert!(!format!("{audit:?}").contains("s3cr3tpw"));
    let Ok(Reply::Projects { projects, .. }) = w.run(&w.admin, "projects").await else {
        panic!()
    };
    assert!(projects.is_empty());
    // A token as the user name is a credential too.
    let o = w
        .run(
            &w.admin,
            "new project x --git https://ghp_abc123@github.com/me/x",
        )
        .await;
    assert!(!o.unwrap_err().to_string().contains("ghp_abc123"));
}

#[tokio::test]
async fn long_lines_are_refused_and_bad_input_is_quoted_short() {
    let w = world().await;
    let huge = "x".repeat(200_000);
    let o = w.run(&w.admin, &huge).await;
    let text = o.unwrap_err().to_string();
    assert!(text.len() < 300, "{}", text.len());
    assert!(text.contains("8192 bytes"), "{text}");
    for line in [
        format!("new project {}", "a".repeat(5000)),
        format!("status {}", "b".repeat(5000)),
        format!("new project ok --cpus {}", "9".repeat(5000)),
        format!("{} project", "z".repeat(5000)),
        format!("projects {}", "q".repeat(5000)),
    ] {
        let text = w.run(&w.admin, &line).await.unwrap_err().to_string();
        assert!(
            text.len() < 600,
            "{} bytes for {:.40}: {:.200}",
            text.len(),
            line,
            text
        );
    }
}

#[tokio::test]
async fn a_refused_purge_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let w = world_with(Settings {
        projects_root: root.path().join("projects"),
        ..Settings::default()
    })
    .await;
    std::fs::create_dir_all(root.path().join("projects")).unwrap();
    w.run(&w.admin, "new project keep").await.unwrap();
    // The source became a link since (a guest could have made it one).
    let src = root.path().join("projects/keep");
    let _ = std::fs::remove_dir_all(&src);
    std::os::unix::fs::symlink(root.path(), &src).unwrap();
    w.run(&w.admin, "rm keep --purge --yes").await.unwrap();
    let o = w.run(&w.admin, "yes").await;
    assert!(refused(&o).contains("nothing was changed"), "{o:?}");
    let Ok(Reply::Projects { projects, .. }) = w.run(&w.admin, "projects").await else {
        panic!()
    };
    assert_eq!(
        projects[0].state,
        ProjectState::Running,
        "not left destroying"
    );
    assert!(w.vms.has_vm("keep"));
    assert!(!w.vms.calls().iter().any(|c| c.starts_with("destroy")));
}

#[tokio::test]
async fn a_source_may_not_be_inside_or_around_another_or_behind_a_link() {
    let root = tempfile::tempdir().unwrap();
    let w = world_with(Settings {
        projects_root: root.path().join("projects"),
        ..Settings::default()
    })
    .await;
    let projects = root.path().join("projects");
    std::fs::create_dir_all(projects.join("outer")).unwrap();
    w.run(&w.admin, "new project outer --adopt").await.unwrap();
    let o = w
        .run(&w.admin, "new project inner --path outer/deeper")
        .await;
    assert!(
        refused(&o).contains("inside the source of project 'outer'"),
        "{o:?}"
    );
    // A link made on the host (or by a guest) on the way is refused.
    let outside = root.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, projects.join("evil")).unwrap();
    let o = w.run(&w.admin, "new project evil --path evil/.ssh").await;
    assert!(refused(&o).contains("symbolic link"), "{o:?}");
    let o = w
        .run(&w.admin, "new project evil2 --path evil --adopt")
        .await;
    assert!(refused(&o).contains("symbolic link"), "{o:?}");
    // The name is checked before the path: an existing project is named.
    let o = w.run(&w.admin, "new project outer --adopt").await;
    assert!(
        matches!(&o, Err(CommandError::Conflict(m)) if m.contains("already exists")),
        "{o:?}"
    );
}

#[tokio::test]
async fn users_from_ssh_requests_are_named_by_their_key_or_by_the_admin() {
    let w = world().await;
    let file = |n: u8, comment: &str| {
        let key = ed25519(n, Some(comment));
        let who = Identity::new(Frontend::Ssh, format!("SHA256:knock{n}"));
        let w = &w;
        async move {
            let Ok(Reply::RequestFiled { request, .. }) =
                w.run(&who, &format!("request-access {key}")).await
            else {
                panic!()
            };
            request.id
        }
    };
    // The key's comment names the user, not its fingerprint.
    let id = file(21, "bob@laptop").await;
    let Ok(Reply::Decided {
        user: Some(name), ..
    }) = w.run(&w.admin, &format!("approve {id}")).await
    else {
        panic!()
    };
    assert_eq!(name, "bob");
    // The admin names one.
    let id = file(22, "root@build-7").await;
    let taken = w.run(&w.admin, &format!("approve {id} as bob")).await;
    assert!(
        matches!(taken, Err(CommandError::Conflict(ref m)) if m.contains("a user named bob already")),
        "{taken:?}"
    );
    let Ok(Reply::Decided {
        user: Some(name), ..
    }) = w.run(&w.admin, &format!("approve {id} as carol")).await
    else {
        panic!()
    };
    assert_eq!(name, "carol");
    let bad = w.run(&w.admin, &format!("approve {id} carol")).await;
    assert!(
        matches!(bad, Err(CommandError::Usage(ref m)) if m.to_string().contains("approve ID as NAME")),
        "{bad:?}"
    );
    // Admins rename users; keys and identities follow.
    let out = w.text(&w.admin, "user rename bob robert").await;
    assert!(out.contains("bob is now robert"), "{out}");
    let keys = w.text(&w.admin, "keys --user robert").await;
    assert!(keys.contains("SHA256:"), "{keys}");
    let taken = w.run(&w.admin, "user rename robert carol").await;
    assert!(matches!(taken, Err(CommandError::Conflict(_))), "{taken:?}");
    let none = w.run(&w.admin, "user rename nobody x").await;
    assert!(matches!(none, Err(CommandError::NotFound(_))), "{none:?}");
    let robert = Identity::new(Frontend::Ssh, "SHA256:knock21");
    let refused = w.run(&robert, "user rename carol c2").await;
    assert!(
        matches!(refused, Err(CommandError::Refused(_))),
        "{refused:?}"
    );
    let who = w.text(&robert, "whoami").await;
    assert!(who.contains("robert"), "{who}");
}

/// Every reply that prints an address prints it whole: with the HTTPS
/// port when it is not 443 and `-p` when SSH's is not 22.
#[tokio::test]
async fn every_reply_with_an_address_keeps_non_default_ports() {
    let w = world_with(Settings {
        ssh_host: "kennel.example.org".into(),
        ssh_port: 2222,
        domain: "example.org".into(),
        https_port: 8443,
        ..Settings::default()
    })
    .await;
    let app = "https://web.example.org:8443";
    let ssh = "ssh web@kennel.example.org -p 2222";
    for (line, wants) in [
        ("new project web --stack rust", vec![app, ssh]),
        ("ssh web", vec![app, ssh]),
        ("status web", vec![app]),
        ("start web", vec![app, ssh]),
        ("public web", vec![app]),
        ("private web", vec![app]),
        ("port web 3000", vec![app]),
        ("login", vec!["https://example.org:8443/login/"]),
        (
            "rename web site",
            vec![
                "https://site.example.org:8443",
                "ssh site@kennel.example.org -p 2222",
            ],
        ),
    ] {
        let text = w.text(&w.admin, line).await;
        for want in wants {
            assert!(text.contains(want), "{line}: no {want} in {text}");
        }
    }
    let Ok(Reply::Connection { connection }) = w.run(&w.admin, "ssh site").await else {
        panic!()
    };
    assert_eq!(connection.https_url, "https://site.example.org:8443");
    assert_eq!(
        connection.ssh_command,
        "ssh site@kennel.example.org -p 2222"
    );
    assert!(
        connection.zed_url.contains(":2222/"),
        "{}",
        connection.zed_url
    );
    assert!(connection.ssh_config.contains("Port 2222"));
    // Default ports are left out rather than spelled.
    let w = world_with(Settings {
        ssh_host: "kennel.example.org".into(),
        ssh_port: 22,
        domain: "example.org".into(),
        https_port: 443,
        ..Settings::default()
    })
    .await;
    let text = w.text(&w.admin, "new project web --stack rust").await;
    assert!(
        text.contains("https://web.example.org") && !text.contains(":443"),
        "{text}"
    );
    assert!(
        text.contains("ssh web@kennel.example.org") && !text.contains("-p 22"),
        "{text}"
    );
    let text = w.text(&w.admin, "public web").await;
    assert!(text.contains("https://web.example.org"), "{text}");
}

#[tokio::test]
async fn tags_label_projects_and_narrow_the_list() {
    let w = world().await;
    let ann = w.member("6001", 61).await;
    let bob = w.member("6002", 62).await;
    w.run(&ann, "new project shop").await.unwrap();
    w.run(&ann, "new project blog").await.unwrap();

    // Tagging twice or repeating a tag keeps one of each, sorted.
    let Ok(Reply::Tagged { tags, .. }) = w.run(&ann, "tag shop web team-x web").await else {
        panic!()
    };
    assert_eq!(tags, ["team-x", "web"]);
    let Ok(Reply::Tagged { tags, .. }) = w.run(&ann, "tag shop web").await else {
        panic!()
    };
    assert_eq!(tags, ["team-x", "web"]);
    w.run(&ann, "tag blog web").await.unwrap();

    // `projects --tag` narrows the list; the list and status show tags.
    let names = |o: Outcome| match o {
        Ok(Reply::Projects { projects, .. }) => projects
            .iter()
            .map(|p| (p.name.to_string(), p.tags.join(" ")))
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        names(w.run(&ann, "projects --tag team-x").await),
        [("shop".to_owned(), "team-x web".to_owned())]
    );
    assert_eq!(names(w.run(&ann, "projects --tag web").await).len(), 2);
    assert!(w
        .text(&ann, "projects --tag nope")
        .await
        .contains("No projects of yours are tagged nope"));
    assert!(w.text(&ann, "projects").await.contains("team-x web"));
    assert!(w.text(&ann, "status shop").await.contains("team-x web"));
    let status = w.run(&ann, "status shop").await;
    let v = serde_json::from_str::<serde_json::Value>(&kennel_core::render::render(
        &status,
        kennel_core::render::Format::Json,
    ))
    .unwrap();
    assert_eq!(v["project"]["tags"], serde_json::json!(["team-x", "web"]));

    // Another member sees no tags of projects not theirs and may not tag
    // them; a shared user may not either (the owner's labels).
    assert!(names(w.run(&bob, "projects --tag web").await).is_empty());
    assert!(refused(&w.run(&bob, "tag shop mine").await).contains("no project"));
    w.run(&ann, "share shop u6002").await.unwrap();
    assert_eq!(names(w.run(&bob, "projects --tag web").await).len(), 1);
    assert!(refused(&w.run(&bob, "untag shop web").await).contains("only the owner"));

    // Bad tags and too many change nothing.
    for bad in [
        "tag shop Web",
        "tag shop 9lives",
        "tag shop",
        "projects --tag -x",
    ] {
        let o = w.run(&ann, bad).await;
        assert!(matches!(o, Err(CommandError::Usage(_))), "{bad}: {o:?}");
    }
    let many: Vec<String> = (0..15).map(|i| format!("t{i}")).collect();
    let o = w.run(&ann, &format!("tag shop {}", many.join(" "))).await;
    assert!(refused(&o).contains("at most 16 tags"), "{o:?}");
    let Ok(Reply::Tagged { tags, .. }) = w.run(&ann, "tag shop x").await else {
        panic!()
    };
    assert_eq!(tags, ["team-x", "web", "x"]);

    // Untag: some of several is fine; only missing ones is an error.
    let Ok(Reply::Tagged { tags, .. }) = w.run(&ann, "untag shop x gone").await else {
        panic!()
    };
    assert_eq!(tags, ["team-x", "web"]);
    let o = w.run(&ann, "untag shop gone").await;
    assert!(
        matches!(&o, Err(CommandError::NotFound(m)) if m.contains("its tags: team-x, web")),
        "{o:?}"
    );

    // Tags follow a rename and go with rm.
    w.run(&ann, "rename shop store").await.unwrap();
    assert_eq!(
        names(w.run(&ann, "projects --tag team-x").await),
        [("store".to_owned(), "team-x web".to_owned())]
    );
    w.run(&ann, "rm store --yes").await.unwrap();
    assert!(names(w.run(&ann, "projects --tag team-x").await).is_empty());
    w.run(&ann, "new project store").await.unwrap();
    assert!(names(w.run(&ann, "projects --tag team-x").await).is_empty());
}

#[tokio::test]
async fn an_admin_sets_a_users_own_quota_and_hands_it_back() {
    let w = world().await;
    let ann = w.member("7001", 71).await;
    let bob = w.member("7002", 72).await;
    let quotas = |o: Outcome| match o {
        Ok(Reply::Quotas { quotas, .. }) => quotas,
        other => panic!("{other:?}"),
    };

    // Everyone's for an admin; a member sees their own, by default the role's.
    let all = quotas(w.run(&w.admin, "quota").await);
    assert!(all.iter().any(|q| q.user == "u7001") && all.iter().any(|q| q.user == "u7002"));
    let mine = quotas(w.run(&ann, "quota").await);
    assert_eq!(mine.len(), 1);
    assert_eq!(
        (mine[0].quota.projects, mine[0].personal.projects),
        (Some(5), false)
    );
    assert_eq!(mine[0].quota.vcpus, Some(8));

    // One project and 2 vCPUs for ann: her second project is refused.
    let set = quotas(w.run(&w.admin, "quota u7001 --projects 1 --cpus 2").await);
    assert_eq!(set[0].quota.projects, Some(1));
    assert_eq!(set[0].quota.vcpus, Some(2));
    assert!(set[0].personal.projects && set[0].personal.vcpus && !set[0].personal.disk_mib);
    w.run(&ann, "new project one").await.unwrap();
    let o = w.run(&ann, "new project two").await;
    assert!(refused(&o).contains("project quota (1 projects"), "{o:?}");
    assert!(w.text(&ann, "quota").await.contains("1 / 1 *"));
    // Bob keeps the role's.
    w.run(&bob, "new project b1").await.unwrap();
    w.run(&bob, "new project b2").await.unwrap();

    // Unlimited, then back to the role's.
    w.run(
        &w.admin,
        "quota u7001 --projects unlimited --cpus unlimited",
    )
    .await
    .unwrap();
    w.run(&ann, "new project two").await.unwrap();
    let back = quotas(
        w.run(&w.admin, "quota u7001 --projects default --cpus default")
            .await,
    );
    assert_eq!(back[0].quota.projects, Some(5));
    assert!(!back[0].personal.projects && !back[0].personal.vcpus);
    let mem = quotas(w.run(&w.admin, "quota u7001 --memory 32G --disk 2T").await);
    assert_eq!(mem[0].quota.memory_mib, Some(32 * 1024));
    assert_eq!(mem[0].quota.disk_mib, Some(2 * 1024 * 1024));

    // Members may not set quotas or see another's; bad values change nothing.
    assert!(refused(&w.run(&ann, "quota u7001 --cpus 64").await).contains("only admins"));
    assert!(refused(&w.run(&ann, "quota u7002").await).contains("only admins"));
    for bad in [
        "quota --cpus 4",
        "quota u7001 --cpus many",
        "quota u7001 --memory lots",
        "quota u7001 --projects -1",
    ] {
        let o = w.run(&w.admin, bad).await;
        assert!(matches!(o, Err(CommandError::Usage(_))), "{bad}: {o:?}");
    }
    let o = w.run(&w.admin, "quota nobody --cpus 1").await;
    assert!(matches!(o, Err(CommandError::NotFound(_))), "{o:?}");
    assert_eq!(
        quotas(w.run(&ann, "quota").await)[0].quota.memory_mib,
        Some(32 * 1024)
    );
}

#[tokio::test]
async fn an_approved_user_is_named_after_the_chat_name_their_front_end_saw() {
    let w = world().await;
    let gate = w.exec.gate();
    let name_of = |o: Outcome| match o {
        Ok(Reply::Decided {
            user: Some(name), ..
        }) => name.to_string(),
        other => panic!("{other:?}"),
    };
    let approve = |who: Identity, seed: u8| {
        let w = &w;
        async move {
            let k = ed25519(seed, None);
            let Ok(Reply::RequestFiled { request, .. }) =
                w.run(&who, &format!("request-access {k}")).await
            else {
                panic!()
            };
            w.run(&w.admin, &format!("approve {}", request.id)).await
        }
    };
    // A Discord user whose username Kennel saw is named after it; a
    // second "ann" gets the next free name; without one, the id.
    let ann = Identity::new(Frontend::Discord, "100000000000000003");
    gate.remember_name(&ann, "ann").await.unwrap();
    assert_eq!(name_of(approve(ann, 81).await), "ann");
    let other = Identity::new(Frontend::Discord, "100000000000000004");
    gate.remember_name(&other, "Ann").await.unwrap();
    assert_eq!(name_of(approve(other, 82).await), "ann2");
    let quiet = Identity::new(Frontend::Discord, "100000000000000005");
    assert_eq!(name_of(approve(quiet, 83).await), "u100000000000000005");
    // A name with nothing usable in it falls back to the id too.
    let odd = Identity::new(Frontend::Discord, "100000000000000006");
    gate.remember_name(&odd, "___").await.unwrap();
    assert_eq!(name_of(approve(odd, 84).await), "u100000000000000006");
    // An admin's `as NAME` still wins.
    let named = Identity::new(Frontend::Discord, "100000000000000007");
    gate.remember_name(&named, "zed").await.unwrap();
    let k = ed25519(85, None);
    let Ok(Reply::RequestFiled { request, .. }) =
        w.run(&named, &format!("request-access {k}")).await
    else {
        panic!()
    };
    let o = w
        .run(&w.admin, &format!("approve {} as zoe", request.id))
        .await;
    assert_eq!(name_of(o), "zoe");
}

/// The name Kennel gave `who`.
async fn name_of(w: &World, who: &Identity) -> String {
    match w.run(who, "whoami").await {
        Ok(Reply::Whoami { user: Some(u), .. }) => u.user.name.to_string(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn resize_grows_within_the_owners_quota_and_never_shrinks_a_disk() {
    let w = world().await;
    let ann = w.member("3001", 31).await;
    let name = name_of(&w, &ann).await;
    w.run(&w.admin, &format!("quota {name} --cpus 6 --disk 60G"))
        .await
        .unwrap();
    w.run(&ann, "new project app --stack rust --cpus 2 --disk 20G")
        .await
        .unwrap();
    // The disk grows at once on the running VM; CPUs wait for a restart.
    let Ok(Reply::Resized {
        before,
        after,
        disk_now: true,
        restart_needed: true,
        running: true,
        ..
    }) = w.run(&ann, "resize app --cpus 4 --disk 30G").await
    else {
        panic!()
    };
    assert_eq!((before.vcpus, after.vcpus), (2, 4));
    assert_eq!(after.disk_mib, 30 * 1024);
    assert!(w
        .vms
        .calls()
        .contains(&format!("resize app 4 {} {}", after.memory_mib, 30 * 1024)));
    // This project counts at its new size, not twice.
    let e = w.run(&ann, "resize app --cpus 7").await.unwrap_err();
    assert!(e.to_string().contains("vCPU quota"), "{e}");
    assert!(w.run(&ann, "resize app --cpus 6").await.is_ok());
    // Shrinking is refused with the reason; nothing changed.
    let e = w.run(&ann, "resize app --disk 10G").await.unwrap_err();
    assert!(e.to_string().contains("disks only grow"), "{e}");
    assert_eq!(e.kind().as_str(), "invalid");
    // Someone it is shared with may not resize it.
    let bob = w.member("3002", 32).await;
    let bob_name = name_of(&w, &bob).await;
    w.run(&ann, &format!("share app {bob_name}")).await.unwrap();
    assert!(refused(&w.run(&bob, "resize app --cpus 1").await).contains("owner"));
}

/// A guest that prints what it was asked to run, then ends as told.
#[derive(Debug, Default)]
struct FakeGuest;

#[async_trait::async_trait]
impl kennel_core::guest::GuestShell for FakeGuest {
    async fn run(
        &self,
        _project: &kennel_core::names::ProjectName,
        job: &kennel_core::guest::GuestJob,
        out: &dyn kennel_core::guest::OutputSink,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<kennel_core::guest::RunEnd, kennel_core::guest::GuestError> {
        use kennel_core::guest::RunEnd;
        for w in &job.argv {
            out.output(format!("{w}\n").as_bytes());
        }
        match job.argv.first().map(String::as_str) {
            Some("false") => Ok(RunEnd::Exited(1)),
            Some("sleep") => {
                let _ = stop.changed().await;
                Ok(RunEnd::Signalled("TERM".into()))
            }
            _ => Ok(RunEnd::Exited(0)),
        }
    }
}

#[tokio::test]
async fn run_streams_output_answers_the_exit_code_and_run_stop_ends_it() {
    let w = world().await;
    let ann = w.member("3101", 41).await;
    // No way into VMs wired: said so.
    assert!(refused(&w.run(&ann, "run app ls").await).contains("no project 'app'"));
    w.run(&ann, "new project app --stack rust").await.unwrap();
    let e = w.run(&ann, "run app ls").await.unwrap_err();
    assert_eq!(e.kind().as_str(), "unavailable", "{e}");
    w.exec.set_guest_shell(std::sync::Arc::new(FakeGuest));

    // A stopped VM is woken first.
    w.run(&ann, "stop app").await.unwrap();
    let out = w.run(&ann, "run app false --verbose").await;
    assert_eq!(kennel_core::exit_code(&out), 1);
    let Ok(Reply::Ran {
        tail,
        timed_out: false,
        stopped: false,
        ..
    }) = &out
    else {
        panic!("{out:?}")
    };
    assert_eq!(tail, &["false", "--verbose"]);
    assert!(
        w.vms
            .calls()
            .iter()
            .filter(|c| c.starts_with("start app"))
            .count()
            >= 1
    );
    let text = kennel_core::render(&out, kennel_core::Format::Plain);
    assert!(text.contains("exited with 1"), "{text}");

    // `run stop` ends what runs, from another front end.
    let exec = w.exec.clone();
    let who = ann.clone();
    let long = tokio::spawn(async move {
        exec.front_door(
            &who,
            None,
            "run app sleep 100",
            kennel_core::Style::PLAIN,
            &NoProgress,
        )
        .await
        .outcome
    });
    let mut stopped = 0;
    for _ in 0..100 {
        if let Ok(Reply::RunStopped { count, .. }) = w.run(&ann, "run stop app").await {
            stopped = count;
            if count > 0 {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(stopped, 1);
    let out = long.await.unwrap();
    assert_eq!(kennel_core::exit_code(&out), 143);
    assert!(
        matches!(out, Ok(Reply::Ran { stopped: true, .. })),
        "{out:?}"
    );

    // Whoever may not enter by SSH may not run.
    let bob = w.member("3102", 42).await;
    let bob_name = name_of(&w, &bob).await;
    w.run(&ann, &format!("share app {bob_name} --web"))
        .await
        .unwrap();
    assert!(refused(&w.run(&bob, "run app ls").await).contains("web app only"));
}

#[tokio::test]
async fn custom_domains_need_their_dns_pointing_here_and_members_need_an_admin() {
    use kennel_core::dns::{testing::FakeDns, DnsAnswer};
    let w = World::new()
        .settings(Settings {
            public_addresses: vec!["203.0.113.7".parse().unwrap()],
            ..Settings::default()
        })
        .build();
    w.run(&w.admin, "new project web --stack rust")
        .await
        .unwrap();
    // No resolver wired: said so.
    let e = w
        .run(&w.admin, "domain add web app.example.com")
        .await
        .unwrap_err();
    assert_eq!(e.kind().as_str(), "unavailable", "{e}");
    let dns = std::sync::Arc::new(FakeDns::default());
    w.exec.set_dns(dns.clone());
    let mut events = w.exec.subscribe();
    // No record: the exact record to add.
    let e = w
        .run(&w.admin, "domain add web App.Example.com.")
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("`app.example.com. CNAME web.localhost.`"),
        "{msg}"
    );
    assert!(msg.contains("`app.example.com. A 203.0.113.7`"), "{msg}");
    assert_eq!(e.kind().as_str(), "invalid");
    // Pointing elsewhere: said where.
    dns.set(
        "app.example.com",
        DnsAnswer {
            cname: None,
            addrs: vec!["198.51.100.1".parse().unwrap()],
        },
    );
    let e = w
        .run(&w.admin, "domain add web app.example.com")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("points to 198.51.100.1 now"), "{e}");
    // Kennel's own names are never custom domains.
    let e = w
        .run(&w.admin, "domain add web shop.localhost")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Kennel's own names"), "{e}");
    // A CNAME to the project's host: an admin's is served at once.
    dns.set(
        "app.example.com",
        DnsAnswer {
            cname: Some("web.localhost".into()),
            addrs: vec![],
        },
    );
    let Ok(Reply::DomainAdded {
        pending: false,
        url,
        ..
    }) = w.run(&w.admin, "domain add web app.example.com").await
    else {
        panic!()
    };
    assert_eq!(url, "https://app.example.com:8443");
    let gate = w.exec.gate();
    assert_eq!(
        gate.custom_domain("app.example.com")
            .await
            .unwrap()
            .map(|p| p.to_string()),
        Some("web".into())
    );
    // One project per host.
    w.run(&w.admin, "new project shop --stack rust")
        .await
        .unwrap();
    let e = w
        .run(&w.admin, "domain add shop app.example.com")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("belongs to another project"), "{e}");

    // A member's, by an A record to Kennel's address: waits for an admin,
    // who hears of it.
    let ann = w.member("3201", 51).await;
    w.run(&ann, "new project blog --stack rust").await.unwrap();
    dns.set(
        "blog.example.org",
        DnsAnswer {
            cname: None,
            addrs: vec!["203.0.113.7".parse().unwrap()],
        },
    );
    let Ok(Reply::DomainAdded { pending: true, .. }) =
        w.run(&ann, "domain add blog blog.example.org").await
    else {
        panic!()
    };
    let notice = loop {
        match events.recv().await.unwrap() {
            kennel_core::Event::AdminNotice(t) => break t,
            _ => continue,
        }
    };
    assert!(
        notice.contains("domain approve blog.example.org"),
        "{notice}"
    );
    assert_eq!(gate.custom_domain("blog.example.org").await.unwrap(), None);
    assert!(refused(&w.run(&ann, "domain approve blog.example.org").await).contains("admins"));
    // The member sees their own; an admin, all.
    let Ok(Reply::Domains { domains }) = w.run(&ann, "domains").await else {
        panic!()
    };
    assert_eq!(
        domains.iter().map(|d| d.host.as_str()).collect::<Vec<_>>(),
        ["blog.example.org"]
    );
    let Ok(Reply::Domains { domains }) = w.run(&w.admin, "domains").await else {
        panic!()
    };
    assert_eq!(domains.len(), 2);
    w.run(&w.admin, "domain approve blog.example.org")
        .await
        .unwrap();
    assert!(gate
        .custom_domain("blog.example.org")
        .await
        .unwrap()
        .is_some());
    // Not on someone else's project; removed by its owner.
    assert!(
        refused(&w.run(&ann, "domain add web other.example.org").await)
            .contains("no project 'web'")
    );
    w.run(&ann, "domain rm blog blog.example.org")
        .await
        .unwrap();
    assert_eq!(gate.custom_domain("blog.example.org").await.unwrap(), None);
    assert!(w
        .run(&ann, "domain rm blog blog.example.org")
        .await
        .is_err());
}
