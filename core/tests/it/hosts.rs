//! The cluster commands over a recording provisioner with fake hosts:
//! who may run them, what they leave running, and how a host that went
//! away shows.

use kennel_core::model::ProjectState;
use kennel_core::outcome::{CommandError, Reply};
use kennel_core::store::repo;
use kennel_core::testing::World;

async fn state(w: &World, p: &str) -> (ProjectState, Option<String>) {
    let n = kennel_core::names::ProjectName::new(p).unwrap();
    let p = w
        .store
        .call(move |c| repo::project_by_name(c, &n))
        .await
        .unwrap()
        .unwrap();
    (p.state, p.state_note)
}

#[tokio::test]
async fn one_host_backends_say_the_cluster_commands_need_incus() {
    let w = World::new().build();
    for line in ["hosts", "evacuate m1", "restore m1"] {
        let e = w.run(&w.admin, line).await.unwrap_err();
        assert!(
            e.to_string().contains("vm.backend = \"incus\""),
            "{line}: {e}"
        );
    }
    let e = w
        .run(&w.admin, "new project a --stack rust --host m1")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("one host"), "{e}");
    w.run(&w.admin, "new project a --stack rust").await.unwrap();
    let e = w.run(&w.admin, "move a m2").await.unwrap_err();
    assert!(e.to_string().contains("one host"), "{e}");
    // Nothing was stopped for it.
    assert_eq!(state(&w, "a").await.0, ProjectState::Running);
}

#[tokio::test]
async fn admins_place_move_evacuate_and_restore() {
    let w = World::new().build();
    w.vms.with_hosts(&["m1", "m2", "m3"]);
    let ann = w.member("ann", 1).await;

    // Members may not choose hosts nor run the cluster commands.
    let e = w
        .run(&ann, "new project x --stack rust --host m2")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, CommandError::Refused(m) if m.contains("--host")),
        "{e}"
    );
    for line in ["hosts", "evacuate m1", "restore m1"] {
        let e = w.run(&ann, line).await.unwrap_err();
        assert!(matches!(e, CommandError::Refused(_)), "{line}: {e}");
    }

    // Placement spreads; --host places.
    for p in ["a", "b", "c"] {
        w.run(&w.admin, &format!("new project {p} --stack rust"))
            .await
            .unwrap();
    }
    w.run(&w.admin, "new project d --stack rust --host m2")
        .await
        .unwrap();
    assert_eq!(w.vms.host_of("d").as_deref(), Some("m2"));
    // Sources live in volumes there: no host directory to share, and
    // nothing is made for the attempt.
    for line in [
        "new project e --stack rust --path e",
        "new project e --stack rust --adopt",
    ] {
        let e = w.run(&w.admin, line).await.unwrap_err();
        assert!(
            matches!(&e, CommandError::Refused(m) if m.contains("storage volumes") && m.contains("--path")),
            "{line}: {e}"
        );
    }
    assert!(w.vms.host_of("e").is_none());
    // rm names the volume: kept, or deleted by a purge.
    let Ok(Reply::Confirm { prompt, .. }) = w.run(&w.admin, "rm d").await else {
        panic!("rm asks first")
    };
    assert!(
        prompt.contains("and storage volume kennel-src-d are kept"),
        "{prompt}"
    );
    let Ok(Reply::Confirm { prompt, .. }) = w.run(&w.admin, "rm d --purge").await else {
        panic!("rm asks first")
    };
    assert!(
        prompt.contains("on the host and storage volume kennel-src-d."),
        "{prompt}"
    );
    let used: std::collections::BTreeSet<_> =
        ["a", "b", "c"].iter().map(|p| w.vms.host_of(p)).collect();
    assert_eq!(used.len(), 3);
    let Ok(Reply::Hosts { hosts }) = w.run(&w.admin, "hosts").await else {
        panic!()
    };
    let m2 = hosts.iter().find(|h| h.name == "m2").unwrap();
    assert_eq!(m2.projects.len(), 2, "{hosts:?}");
    let text = w.text(&w.admin, "hosts").await;
    assert!(text.contains("m2") && text.contains("online"), "{text}");

    // move: a running project runs again on the other host; a stopped
    // one stays stopped; an unknown host is refused with the list.
    let Ok(Reply::Moved { moved }) = w.run(&w.admin, "move d m3").await else {
        panic!()
    };
    assert_eq!((moved.from.as_str(), moved.to.as_str()), ("m2", "m3"));
    assert!(moved.running);
    assert_eq!(state(&w, "d").await.0, ProjectState::Running);
    let calls = w.vms.calls();
    let tail: Vec<&str> = calls.iter().rev().take(3).map(String::as_str).collect();
    assert_eq!(tail, ["start d", "move d", "stop d"]);
    w.run(&w.admin, "stop d").await.unwrap();
    w.run(&w.admin, "move d m1").await.unwrap();
    assert_eq!(state(&w, "d").await.0, ProjectState::Stopped);
    let e = w.run(&w.admin, "move d m1").await.unwrap_err();
    assert!(e.to_string().contains("on m1 already"), "{e}");
    let e = w.run(&w.admin, "move d m7").await.unwrap_err();
    assert!(e.to_string().contains("the hosts are m1, m2, m3"), "{e}");
    w.vms.set_online("m3", false);
    let e = w.run(&w.admin, "move a m3").await.unwrap_err();
    assert!(e.to_string().contains("host m3 is offline"), "{e}");
    w.vms.set_online("m3", true);

    // evacuate: everything on the host goes elsewhere, as it was.
    let on_m1: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .filter(|p| w.vms.host_of(p).as_deref() == Some("m1"))
        .map(|p| (*p).to_owned())
        .collect();
    assert_eq!(on_m1.len(), 2, "{on_m1:?}");
    let Ok(Reply::HostEvacuated { moved, failed, .. }) = w.run(&w.admin, "evacuate m1").await
    else {
        panic!()
    };
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(moved.len(), 2);
    for p in &on_m1 {
        assert_ne!(w.vms.host_of(p).as_deref(), Some("m1"));
    }
    assert_eq!(state(&w, "d").await.0, ProjectState::Stopped);
    let running = on_m1.iter().find(|p| *p != "d").unwrap();
    assert_eq!(state(&w, running).await.0, ProjectState::Running);
    // Nothing new lands on an evacuated host.
    w.run(&w.admin, "new project e --stack rust").await.unwrap();
    assert_ne!(w.vms.host_of("e").as_deref(), Some("m1"));
    let e = w.run(&w.admin, "evacuate m9").await.unwrap_err();
    assert!(e.to_string().contains("m1, m2, m3"), "{e}");

    // restore: home again.
    let Ok(Reply::HostEvacuated { moved, .. }) = w.run(&w.admin, "restore m1").await else {
        panic!()
    };
    assert_eq!(moved.len(), 2);
    for p in &on_m1 {
        assert_eq!(w.vms.host_of(p).as_deref(), Some("m1"));
    }
    assert_eq!(state(&w, running).await.0, ProjectState::Running);
}

#[tokio::test]
async fn a_project_on_an_offline_host_says_so_and_comes_back() {
    let w = World::new().build();
    w.vms.with_hosts(&["m1", "m2"]);
    w.run(&w.admin, "new project a --stack rust --host m2")
        .await
        .unwrap();
    w.run(&w.admin, "stop a").await.unwrap();
    w.vms.set_online("m2", false);

    let list = w.text(&w.admin, "projects").await;
    assert!(list.contains("host m2 is offline"), "{list}");
    let status = w.text(&w.admin, "status a").await;
    assert!(status.contains("host m2 is offline"), "{status}");
    let e = w.run(&w.admin, "start a").await.unwrap_err();
    assert!(e.to_string().contains("host m2 is offline"), "{e}");
    // Not failed: as it was, waiting for its host.
    assert_eq!(state(&w, "a").await.0, ProjectState::Stopped);

    w.vms.set_online("m2", true);
    let list = w.text(&w.admin, "projects").await;
    assert!(!list.contains("offline"), "{list}");
    w.run(&w.admin, "start a").await.unwrap();
    assert_eq!(state(&w, "a").await.0, ProjectState::Running);
}
