//! Idle stop with a recording provisioner and a clock the test moves:
//! the default limit, presences and guest CPU keeping a VM up, per-project
//! limits, the note and notice, and a restarted daemon resuming timers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::{Duration, Instant};

use kennel_core::model::{IdleStop, ProjectState};
use kennel_core::names::ProjectName;
use kennel_core::store::repo;
use kennel_core::testing::World;
use kennel_core::{Event, Executor};

const MIN: Duration = Duration::from_secs(60);

fn name(s: &str) -> ProjectName {
    ProjectName::new(s).unwrap()
}

async fn state(w: &World, p: &str) -> (ProjectState, Option<String>) {
    let n = name(p);
    let p = w
        .store
        .call(move |c| repo::project_by_name(c, &n))
        .await
        .unwrap()
        .unwrap();
    (p.state, p.state_note)
}

async fn stopped(e: &Executor, at: Instant) -> Vec<String> {
    e.check_idle(at)
        .await
        .unwrap()
        .stopped
        .iter()
        .map(|n| n.to_string())
        .collect()
}

async fn world_with(p: &str) -> World {
    let w = World::new().build();
    w.run(&w.admin, &format!("new project {p} --stack rust"))
        .await
        .unwrap();
    w
}

#[tokio::test]
async fn an_idle_vm_stops_after_the_default_limit_with_a_note_an_audit_entry_and_a_notice() {
    let w = world_with("app").await;
    let mut events = w.exec.subscribe();
    let t0 = Instant::now();
    assert!(stopped(&w.exec, t0).await.is_empty());
    assert!(stopped(&w.exec, t0 + 29 * MIN).await.is_empty());
    assert_eq!(state(&w, "app").await.0, ProjectState::Running);
    assert_eq!(stopped(&w.exec, t0 + 31 * MIN).await, ["app"]);
    assert_eq!(
        state(&w, "app").await,
        (ProjectState::Stopped, Some("idle 30m".into()))
    );
    let list = w.text(&w.admin, "projects").await;
    assert!(list.contains("stopped (idle 30m)"), "{list}");
    // Kennel did it, and says why.
    let audit = w.store.call(|c| repo::recent_audit(c, 20)).await.unwrap();
    assert!(
        audit.iter().any(|e| e.identity.contains("system")
            && e.action == "stop"
            && e.target.as_deref() == Some("app")
            && e.detail.as_deref() == Some("idle 30m")),
        "{audit:?}"
    );
    // The owner's chats hear of it.
    let notice = loop {
        match events.recv().await.unwrap() {
            Event::IdleStopped {
                project,
                identities,
                after,
                ..
            } => break (project, identities, after),
            _ => continue,
        }
    };
    assert_eq!(notice.0, name("app"));
    assert!(notice.1.contains(&w.admin), "{:?}", notice.1);
    assert_eq!(
        kennel_core::idle::idle_notice(&notice.0, notice.2),
        "app was stopped after 30m idle; ssh or https wakes it"
    );
    // A person's start clears the note and restarts the clock.
    w.run(&w.admin, "start app").await.unwrap();
    assert_eq!(state(&w, "app").await, (ProjectState::Running, None));
    let t1 = Instant::now();
    assert!(stopped(&w.exec, t1 + 29 * MIN).await.is_empty());
}

#[tokio::test]
async fn someone_inside_keeps_it_up_and_leaving_starts_the_clock() {
    let w = world_with("app").await;
    let gate = w.exec.gate();
    let here = gate.presence(&name("app"));
    let t0 = Instant::now();
    assert!(stopped(&w.exec, t0 + 120 * MIN).await.is_empty());
    let status = w.text(&w.admin, "status app").await;
    assert!(status.contains("in use now"), "{status}");
    drop(here);
    let left = t0 + 120 * MIN;
    assert!(stopped(&w.exec, left + 29 * MIN).await.is_empty());
    assert_eq!(stopped(&w.exec, left + 31 * MIN).await, ["app"]);
}

#[tokio::test]
async fn a_busy_guest_with_nobody_connected_is_not_stopped() {
    let w = world_with("build").await;
    let t0 = Instant::now();
    let cpu = |secs: u64| {
        w.vms
            .cpu
            .lock()
            .unwrap()
            .insert("build".into(), Duration::from_secs(secs));
    };
    // Half a core, look after look, for two hours.
    for i in 0..=24u32 {
        cpu(u64::from(i) * 150);
        let at = t0 + i * 5 * MIN;
        assert!(stopped(&w.exec, at).await.is_empty(), "at {i}");
    }
    // Then the build ends: a trickle (1 %) is idle.
    let end = t0 + 120 * MIN;
    for i in 1..=6u32 {
        cpu(24 * 150 + u64::from(i) * 3);
        let at = end + i * 5 * MIN;
        let s = stopped(&w.exec, at).await;
        if i < 6 {
            assert!(s.is_empty(), "at {i}: {s:?}");
        } else {
            assert_eq!(s, ["build"]);
        }
    }
}

#[tokio::test]
async fn a_project_limit_overrides_the_default_and_status_shows_it() {
    let w = world_with("app").await;
    let t0 = Instant::now();
    let out = w.text(&w.admin, "idle app 2h").await;
    assert!(out.contains("stops after 2h"), "{out}");
    let status = w.text(&w.admin, "status app").await;
    assert!(
        status.contains("idle stop") && status.contains("after 2h"),
        "{status}"
    );
    let idle_line = status
        .lines()
        .find(|l| l.contains("idle stop"))
        .unwrap_or_default();
    assert!(!idle_line.contains("(the default)"), "{status}");
    assert!(stopped(&w.exec, t0 + 61 * MIN).await.is_empty());
    w.text(&w.admin, "idle app never").await;
    assert!(stopped(&w.exec, t0 + 1000 * MIN).await.is_empty());
    let status = w.text(&w.admin, "status app").await;
    assert!(status.contains("never"), "{status}");
    let out = w.text(&w.admin, "idle app default").await;
    assert!(out.contains("(the default)"), "{out}");
    assert_eq!(stopped(&w.exec, t0 + 1001 * MIN).await, ["app"]);
    let out = w.text(&w.admin, "idle app 3s").await;
    assert!(out.contains("from 10s to 30 days"), "{out}");
    let out = w.text(&w.admin, "idle app whenever").await;
    assert!(out.contains("not a duration"), "{out}");
}

#[tokio::test]
async fn the_configured_default_can_be_never() {
    let settings = kennel_core::Settings {
        idle_stop: IdleStop::Never,
        ..Default::default()
    };
    let w = World::new().settings(settings).build();
    w.run(&w.admin, "new project app --stack rust")
        .await
        .unwrap();
    assert!(stopped(&w.exec, Instant::now() + 10_000 * MIN)
        .await
        .is_empty());
    let status = w.text(&w.admin, "status app").await;
    assert!(status.contains("never (the default)"), "{status}");
}

#[tokio::test]
async fn a_restarted_daemon_resumes_timers_and_stops_nothing_early() {
    let w = world_with("app").await;
    let t0 = Instant::now();
    stopped(&w.exec, t0).await;
    // 20 minutes idle are written down; then the daemon goes away.
    w.exec.record_idle(t0 + 20 * MIN).await.unwrap();
    let again = w.restarted();
    let t1 = Instant::now();
    // However long it was down, the new one goes on from 20 minutes.
    assert!(stopped(&again, t1).await.is_empty());
    assert!(stopped(&again, t1 + 9 * MIN).await.is_empty());
    assert_eq!(stopped(&again, t1 + 11 * MIN).await, ["app"]);
}
