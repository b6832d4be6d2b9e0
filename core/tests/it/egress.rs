//! `egress`: the policy per project as the executor keeps it, what the
//! provisioner is handed (at boot and on each change), who may change
//! what, and asks from a closed project's VM reaching its owner once.

use kennel_core::egress::{EgressAsked, EgressMode, Verdict};
use kennel_core::executor::Settings;
use kennel_core::names::ProjectName;
use kennel_core::store::repo;
use kennel_core::testing::World;
use kennel_core::Event;

fn name(s: &str) -> ProjectName {
    ProjectName::new(s).unwrap()
}

fn policy_of(w: &World, p: &str) -> kennel_core::egress::EgressPolicy {
    w.vms.egress.lock().unwrap().get(p).cloned().unwrap()
}

#[tokio::test]
async fn a_project_is_open_by_default_and_its_owner_closes_it_and_keeps_a_list() {
    let w = World::new().build();
    let ann = w.member("@ann:example.org", 1).await;
    w.run(&ann, "new project app --stack rust").await.unwrap();
    // Handed to the provisioner before the VM booted: open, the default.
    assert_eq!(policy_of(&w, "app").mode, EgressMode::Open);
    let out = w.text(&ann, "egress app").await;
    assert!(
        out.contains("may reach anything") && out.contains("(open, the default)"),
        "{out}"
    );
    let status = w.text(&ann, "status app").await;
    assert!(
        status.contains("egress") && status.contains("open (the default)"),
        "{status}"
    );

    let out = w.text(&ann, "egress app closed").await;
    assert!(
        out.contains("Done.") && out.contains("only what its list allows"),
        "{out}"
    );
    assert_eq!(policy_of(&w, "app").mode, EgressMode::Closed);
    w.run(
        &ann,
        "egress app allow api.example.com *.cdn.example 203.0.113.0/24:443",
    )
    .await
    .unwrap();
    w.run(&ann, "egress app deny evil.example").await.unwrap();
    let out = w.text(&ann, "egress app allow-once pypi.org").await;
    assert!(out.contains("pypi.org"), "{out}");
    let p = policy_of(&w, "app");
    assert_eq!(p.rules.len(), 5, "{p:?}");
    assert!(!p.private_ok);
    let once = p
        .rules
        .iter()
        .find(|r| r.dest.to_string() == "pypi.org")
        .unwrap();
    let left = once.expires_at.unwrap() - kennel_core::model::now();
    assert!((3590..=3600).contains(&left), "{left}");
    assert!(p
        .rules
        .iter()
        .any(|r| r.dest.to_string() == "evil.example" && r.verdict == Verdict::Deny));
    // A deny replaces an allow of the same destination, forget drops it.
    w.run(&ann, "egress app deny api.example.com")
        .await
        .unwrap();
    w.run(&ann, "egress app forget *.cdn.example")
        .await
        .unwrap();
    let out = w.text(&ann, "egress app").await;
    assert!(out.contains("(closed)"), "{out}");
    assert!(!out.contains("cdn.example"), "{out}");
    assert_eq!(
        policy_of(&w, "app")
            .rules
            .iter()
            .filter(|r| r.verdict == Verdict::Deny)
            .count(),
        2
    );
    // A restart hands the same policy again before the boot.
    w.vms.egress.lock().unwrap().clear();
    w.run(&ann, "restart app").await.unwrap();
    assert_eq!(policy_of(&w, "app").mode, EgressMode::Closed);
    // Every change is in the audit log.
    let audit = w.store.call(|c| repo::recent_audit(c, 50)).await.unwrap();
    assert!(
        audit.iter().filter(|e| e.action == "egress").count() >= 6,
        "{audit:?}"
    );
    // `default` follows vm.egress again.
    w.run(&ann, "egress app default").await.unwrap();
    assert_eq!(policy_of(&w, "app").mode, EgressMode::Open);
}

#[tokio::test]
async fn members_cannot_open_private_ranges_and_others_cannot_touch_it() {
    let w = World::new().build();
    let ann = w.member("@ann:example.org", 1).await;
    let bob = w.member("@bob:example.org", 2).await;
    w.run(&ann, "new project app --stack rust").await.unwrap();
    for dest in [
        "10.0.0.0/8",
        "127.0.0.1",
        "169.254.169.254:80",
        "[fd00::1]:22",
    ] {
        let out = w.text(&ann, &format!("egress app allow {dest}")).await;
        assert!(out.contains("only an admin may allow it"), "{dest}: {out}");
    }
    let out = w.text(&bob, "egress app closed").await;
    assert!(
        out.contains("not yours") || out.contains("no project"),
        "{out}"
    );
    let out = w.text(&bob, "egress app").await;
    assert!(
        out.contains("not yours") || out.contains("no project"),
        "{out}"
    );
    // An admin may.
    w.run(&w.admin, "egress app allow 10.1.2.0/24:5432")
        .await
        .unwrap();
    // Words that are not destinations, and actions that are not.
    for (line, says) in [
        ("egress app allow", "needs one or more destinations"),
        ("egress app allow localhost", "give a full name"),
        ("egress app allow x.com:70000", "port"),
        ("egress app deny x.com:443", "denied whole"),
        ("egress app closed x.com", "takes no destinations"),
        ("egress app shut", "open, closed, default"),
    ] {
        let out = w.text(&ann, line).await;
        assert!(out.contains(says), "{line}: {out}");
    }
}

#[tokio::test]
async fn a_closed_vms_ask_reaches_its_owner_once_and_a_decision_clears_it() {
    let w = World::new()
        .settings(Settings {
            egress: EgressMode::Closed,
            egress_asks_per_hour: 2,
            ..Settings::default()
        })
        .build();
    let ann = w.member("@ann:example.org", 1).await;
    w.run(&ann, "new project app --stack rust").await.unwrap();
    let out = w.text(&ann, "egress app").await;
    assert!(out.contains("(closed, the default)"), "{out}");
    let mut events = w.exec.subscribe();
    let ask = |d: &str| EgressAsked {
        project: name("app"),
        dest: d.into(),
    };
    w.exec.egress_asked(ask("api.example.com")).await;
    w.exec.egress_asked(ask("api.example.com")).await;
    let (dest, ids) = loop {
        if let Event::EgressAsked {
            dest, identities, ..
        } = events.recv().await.unwrap()
        {
            break (dest, identities);
        }
    };
    assert_eq!(dest, "api.example.com");
    assert!(ids.contains(&ann), "{ids:?}");
    let line = kennel_core::executor::egress::ask_line(&name("app"), &dest);
    assert!(
        line.contains("app tried to reach api.example.com")
            && line.contains("'egress app allow api.example.com'")
            && line.contains("allow-once")
            && line.contains("deny"),
        "{line}"
    );
    // Asked once: the second ask of the same name said nothing.
    assert!(events.try_recv().is_err());
    let out = w.text(&ann, "egress app").await;
    assert!(
        out.contains("Asked, not decided yet: api.example.com"),
        "{out}"
    );
    // At most two asks an hour per project.
    w.exec.egress_asked(ask("b.example.com")).await;
    w.exec.egress_asked(ask("c.example.com")).await;
    let out = w.text(&ann, "egress app").await;
    assert!(
        out.contains("b.example.com") && !out.contains("c.example.com"),
        "{out}"
    );
    // A decision takes the ask off; the audit log has the asks.
    w.run(&ann, "egress app allow api.example.com")
        .await
        .unwrap();
    let out = w.text(&ann, "egress app").await;
    assert!(!out.contains("Asked, not decided yet: api"), "{out}");
    let audit = w.store.call(|c| repo::recent_audit(c, 50)).await.unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e.action == "egress ask" && e.detail.as_deref() == Some("api.example.com")),
        "{audit:?}"
    );
}
