//! The VM state service: wakes for a person or for Kennel itself, one
//! boot however many entry points ask at once, routes kept true, and the
//! gate's entry decision for the web.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use kennel_core::keys::testing::ed25519;
use kennel_core::model::{Frontend, Identity, ProjectState};
use kennel_core::names::ProjectName;
use kennel_core::policy::Entry;
use kennel_core::provision::NoProgress;
use kennel_core::store::repo;
use kennel_core::testing::World;
use kennel_core::{Actor, CommandError, Woke};

fn name(s: &str) -> ProjectName {
    ProjectName::new(s).unwrap()
}

async fn stopped_project(w: &World, p: &str) {
    w.run(&w.admin, &format!("new project {p} --stack rust"))
        .await
        .unwrap();
    w.run(&w.admin, &format!("stop {p}")).await.unwrap();
    let route = w.store.call({
        let n = name(p);
        move |c| repo::route(c, &n)
    });
    assert!(
        route.await.unwrap().is_none(),
        "a stopped project has no route"
    );
}

fn starts(w: &World, p: &str) -> usize {
    w.vms
        .calls()
        .iter()
        .filter(|c| *c == &format!("start {p}"))
        .count()
}

#[tokio::test]
async fn kennel_itself_can_wake_and_stop_a_project_and_the_audit_says_so() {
    let w = World::new().build();
    stopped_project(&w, "idle").await;
    let system = Actor::System {
        why: "a visitor opened https://idle.localhost",
    };
    let woke = w
        .exec
        .ensure_running(&system, &name("idle"), &NoProgress)
        .await;
    assert!(matches!(woke, Ok(Woke::Started(_))), "{woke:?}");
    let gate = w.exec.gate();
    let reach = gate.reach(&name("idle")).await.unwrap();
    assert!(reach.is_some(), "a woken project has its route back");
    // Running now: nothing to do, no second boot.
    let again = w
        .exec
        .ensure_running(&system, &name("idle"), &NoProgress)
        .await;
    assert!(matches!(again, Ok(Woke::AlreadyRunning)), "{again:?}");
    assert_eq!(starts(&w, "idle"), 1);
    let idle = Actor::System {
        why: "idle for 30 minutes",
    };
    w.exec
        .stop_vm(&idle, &name("idle"), &NoProgress)
        .await
        .unwrap();
    let p = w
        .store
        .call(|c| repo::project_by_name(c, &ProjectName::new("idle").unwrap()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.state, ProjectState::Stopped);
    assert!(gate.reach(&name("idle")).await.unwrap().is_none());
    let audit = w.store.call(|c| repo::recent_audit(c, 10)).await.unwrap();
    let by_kennel: Vec<_> = audit
        .iter()
        .filter(|e| e.identity.contains("system") && e.target.as_deref() == Some("idle"))
        .map(|e| (e.action.as_str(), e.detail.clone().unwrap_or_default()))
        .collect();
    assert!(
        by_kennel.contains(&("start", "a visitor opened https://idle.localhost".into()))
            && by_kennel.contains(&("stop", "idle for 30 minutes".into())),
        "{audit:?}"
    );
}

#[tokio::test]
async fn many_entry_points_waking_at_once_boot_the_vm_once() {
    let w = World::new().build();
    stopped_project(&w, "busy").await;
    *w.vms.start_delay.lock().unwrap() = Duration::from_millis(300);
    let admin = w.exec.resolve(&w.admin).await.unwrap().unwrap();
    let actor = Actor::User {
        identity: w.admin.clone(),
        user: admin,
    };
    let n = name("busy");
    let wake = || w.exec.ensure_running(&actor, &n, &NoProgress);
    let (a, b, c, d, e) = tokio::join!(wake(), wake(), wake(), wake(), wake());
    let results = [a, b, c, d, e];
    let started = results
        .iter()
        .filter(|r| matches!(r, Ok(Woke::Started(_))))
        .count();
    assert_eq!(started, 1, "{results:?}");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(starts(&w, "busy"), 1);
}

#[tokio::test]
async fn a_web_share_may_enter_and_wake_over_the_web_but_not_run_start() {
    let w = World::new().build();
    stopped_project(&w, "site").await;
    // bob: a member with a web-only share.
    let bob_id = Identity::new(Frontend::Discord, "42");
    let key = ed25519(4, Some("bob"));
    let Ok(kennel_core::Reply::RequestFiled { request, .. }) =
        w.run(&bob_id, &format!("request-access {key}")).await
    else {
        panic!()
    };
    w.run(&w.admin, &format!("approve {}", request.id))
        .await
        .unwrap();
    let bob = w.exec.resolve(&bob_id).await.unwrap().unwrap();
    w.run(&w.admin, &format!("share site {} --web", bob.name))
        .await
        .unwrap();
    let gate = w.exec.gate();
    gate.may_enter(Some(&bob), &name("site"), Entry::Web)
        .await
        .unwrap();
    let ssh = gate.may_enter(Some(&bob), &name("site"), Entry::Ssh).await;
    assert!(matches!(ssh, Err(CommandError::Refused(_))), "{ssh:?}");
    let other_port = gate
        .may_enter(Some(&bob), &name("site"), Entry::WebOtherPort)
        .await;
    assert!(
        other_port.is_ok(),
        "a web share opens the other ports too: {other_port:?}"
    );
    // Starting by command needs more than a web share...
    let start = w.run(&bob_id, "start site").await;
    assert!(matches!(start, Err(CommandError::Refused(_))), "{start:?}");
    // ...but whoever may enter may wake it.
    let actor = Actor::User {
        identity: bob_id.clone(),
        user: bob.clone(),
    };
    let woke = gate.wake(&actor, &name("site"), &NoProgress).await;
    assert!(matches!(woke, Ok(Woke::Started(_))), "{woke:?}");
    // A stranger may not enter a private project, and learns nothing more
    // than about one that does not exist.
    let private = gate.may_enter(None, &name("site"), Entry::Web).await;
    let missing = gate.may_enter(None, &name("nosuch"), Entry::Web).await;
    assert_eq!(
        private.unwrap_err().to_string().replace("site", "X"),
        missing.unwrap_err().to_string().replace("nosuch", "X")
    );
}

#[tokio::test]
async fn a_wake_refuses_a_project_being_removed() {
    let w = World::new().build();
    stopped_project(&w, "going").await;
    w.store
        .call(|c| {
            repo::set_project_state(
                c,
                &ProjectName::new("going").unwrap(),
                ProjectState::Destroying,
            )
        })
        .await
        .unwrap();
    let woke = w
        .exec
        .ensure_running(&Actor::System { why: "test" }, &name("going"), &NoProgress)
        .await;
    assert!(matches!(woke, Err(CommandError::Conflict(_))), "{woke:?}");
    assert_eq!(starts(&w, "going"), 0);
}

/// Waits until the recording provisioner has seen `call`.
async fn until_called(w: &World, call: &str) {
    for _ in 0..500 {
        if w.vms.calls().iter().any(|c| c == call) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never called: {call}; calls: {:?}", w.vms.calls());
}

fn position(w: &World, call: &str) -> usize {
    w.vms
        .calls()
        .iter()
        .position(|c| c == call)
        .unwrap_or_else(|| panic!("no {call} in {:?}", w.vms.calls()))
}

async fn state(w: &World, p: &str) -> Option<ProjectState> {
    let n = name(p);
    w.store
        .call(move |c| repo::project_by_name(c, &n))
        .await
        .unwrap()
        .map(|p| p.state)
}

#[tokio::test]
async fn an_rm_waits_for_a_wake_in_flight_and_removes_what_it_booted() {
    let w = World::new().build();
    stopped_project(&w, "waking").await;
    *w.vms.start_delay.lock().unwrap() = Duration::from_millis(300);
    let system = Actor::System {
        why: "someone ran ssh waking@HOST",
    };
    let waking = name("waking");
    let wake = w.exec.ensure_running(&system, &waking, &NoProgress);
    let rm = async {
        until_called(&w, "start waking").await;
        w.run(&w.admin, "rm waking --yes").await
    };
    let (woke, removed) = tokio::join!(wake, rm);
    assert!(matches!(woke, Ok(Woke::Started(_))), "{woke:?}");
    assert!(removed.is_ok(), "{removed:?}");
    assert_eq!(w.vms.overlaps(), Vec::<String>::new());
    assert!(position(&w, "start waking") < position(&w, "destroy waking"));
    assert!(!w.vms.has_vm("waking"), "the VM the wake booted is gone");
    assert_eq!(state(&w, "waking").await, None);
    // And a wake after the rm finds nothing to boot.
    let late = w
        .exec
        .ensure_running(&system, &name("waking"), &NoProgress)
        .await;
    assert!(matches!(late, Err(CommandError::NotFound(_))), "{late:?}");
}

#[tokio::test]
async fn a_rename_waits_for_an_idle_stop_and_moves_the_stopped_vm() {
    let w = World::new().build();
    w.run(&w.admin, "new project sleepy --stack rust")
        .await
        .unwrap();
    *w.vms.op_delay.lock().unwrap() = Duration::from_millis(300);
    let idle = Actor::System {
        why: "idle for 30 minutes",
    };
    let sleepy = name("sleepy");
    let stop = w.exec.stop_vm(&idle, &sleepy, &NoProgress);
    let rename = async {
        until_called(&w, "stop sleepy").await;
        w.run(&w.admin, "rename sleepy dozy").await
    };
    let (stopped, renamed) = tokio::join!(stop, rename);
    assert!(stopped.is_ok(), "{stopped:?}");
    assert!(renamed.is_ok(), "{renamed:?}");
    assert_eq!(w.vms.overlaps(), Vec::<String>::new());
    assert!(position(&w, "stop sleepy") < position(&w, "rename sleepy"));
    assert_eq!(state(&w, "sleepy").await, None);
    assert_eq!(state(&w, "dozy").await, Some(ProjectState::Stopped));
    assert!(w.vms.has_vm("dozy") && !w.vms.has_vm("sleepy"));
    let status = kennel_core::provision::Provisioner::status(&*w.vms, &name("dozy")).await;
    assert_eq!(
        status.map(|s| s.state).ok(),
        Some(kennel_core::provision::VmState::Stopped)
    );
}

#[tokio::test]
async fn two_copies_of_one_project_run_one_after_the_other() {
    let w = World::new().build();
    w.run(&w.admin, "new project orig --stack rust")
        .await
        .unwrap();
    *w.vms.op_delay.lock().unwrap() = Duration::from_millis(200);
    let (a, b) = tokio::join!(
        w.run(&w.admin, "cp orig left"),
        w.run(&w.admin, "cp orig right")
    );
    assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    assert_eq!(w.vms.overlaps(), Vec::<String>::new());
    for p in ["orig", "left", "right"] {
        assert_eq!(state(&w, p).await, Some(ProjectState::Running), "{p}");
        assert!(w.vms.has_vm(p), "{p}");
    }
}

#[tokio::test]
async fn a_wake_waits_for_a_copy_and_a_port_change_for_a_stop() {
    let w = World::new().build();
    stopped_project(&w, "src").await;
    *w.vms.op_delay.lock().unwrap() = Duration::from_millis(300);
    let cp = w.run(&w.admin, "cp src dst");
    let wake = async {
        until_called(&w, "copy src").await;
        let system = Actor::System { why: "a visitor" };
        w.exec
            .ensure_running(&system, &name("src"), &NoProgress)
            .await
    };
    let (copied, woke) = tokio::join!(cp, wake);
    assert!(copied.is_ok(), "{copied:?}");
    assert!(matches!(woke, Ok(Woke::Started(_))), "{woke:?}");
    assert!(position(&w, "copy src") < position(&w, "start src"));
    let stop = w.run(&w.admin, "stop src");
    let port = async {
        until_called(&w, "stop src").await;
        w.run(&w.admin, "port src 9000").await
    };
    let (stopped, ported) = tokio::join!(stop, port);
    assert!(stopped.is_ok() && ported.is_ok(), "{stopped:?} {ported:?}");
    assert_eq!(w.vms.overlaps(), Vec::<String>::new());
    assert_eq!(state(&w, "src").await, Some(ProjectState::Stopped));
}
