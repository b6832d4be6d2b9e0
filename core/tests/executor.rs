//! The executor end to end over an in-memory store and a recording provisioner.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use kennel_core::catalog::{StackInfo, StaticCatalog};
use kennel_core::keys::testing::ed25519;
use kennel_core::model::{Frontend, Identity, ProjectState, RequestState};
use kennel_core::outcome::{CommandError, Reply};
use kennel_core::provision::testing::RecordingProvisioner;
use kennel_core::provision::NoProgress;
use kennel_core::{Event, Executor, Outcome, Settings, Store};

struct World {
    exec: Executor,
    vms: Arc<RecordingProvisioner>,
    admin: Identity,
}

async fn world() -> World {
    let store = Store::open_in_memory().unwrap();
    let vms = Arc::new(RecordingProvisioner::default());
    let catalog = Arc::new(StaticCatalog {
        stacks: vec![StackInfo {
            name: "rust".into(),
            summary: "Rust".into(),
            app_port: 8000,
            broken: None,
        }],
        templates: vec![],
    });
    let admin = Identity::new(Frontend::Matrix, "@root:example.org");
    let settings = Settings {
        admins: vec![admin.clone()],
        ..Settings::default()
    };
    let exec = Executor::new(store, vms.clone(), catalog, settings);
    World { exec, vms, admin }
}

impl World {
    async fn run(&self, who: &Identity, line: &str) -> Outcome {
        self.exec.run_line(who, line, &NoProgress).await.outcome
    }
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
        .exec
        .store()
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
    assert_eq!(confirm_with, "rm demo --yes");
    assert!(w.vms.has_vm("demo"));
    let Ok(Reply::Done { message }) = w.run(&ann, &confirm_with).await else {
        panic!()
    };
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
    assert!(refused(&w.run(&b, "status alpha").await).contains("no project"));
    assert!(refused(&w.run(&b, "status nothere").await).contains("no project"));
    w.run(&a, "share alpha u2002 --web").await.unwrap();
    w.run(&b, "status alpha").await.unwrap();
    assert!(refused(&w.run(&b, "ssh alpha").await).contains("web app only"));
    assert!(refused(&w.run(&b, "rm alpha --yes").await).contains("only the owner"));
    let Ok(Reply::Projects { projects }) = w.run(&b, "projects").await else {
        panic!()
    };
    assert_eq!(projects.len(), 1);
    let Ok(Reply::Projects { projects }) = w.run(&w_admin, "projects").await else {
        panic!()
    };
    assert_eq!(projects.len(), 1);
}

#[tokio::test]
async fn a_failed_create_rolls_back_the_record() {
    let w = world().await;
    w.vms.fail_next_create("the VM never became ready");
    let o = w.run(&w.admin, "new project flaky").await;
    assert!(matches!(o, Err(CommandError::Provision(_))), "{o:?}");
    assert!(o.unwrap_err().to_string().contains("never became ready"));
    let Ok(Reply::Projects { projects }) = w.run(&w.admin, "projects").await else {
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
