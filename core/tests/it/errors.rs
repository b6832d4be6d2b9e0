//! One mapping from an error to its kind, HTTP status, exit code and
//! metrics label, the same for every front end; and the cases that used
//! to disagree across front ends, each from its real cause.

use kennel_core::command::ParseError;
use kennel_core::model::{Frontend, Identity};
use kennel_core::outcome::ErrorKind;
use kennel_core::provision::{ProvisionError, Stage};
use kennel_core::testing::World;
use kennel_core::{exit_code, CommandError, StoreError};

fn usage() -> CommandError {
    CommandError::Usage(ParseError::Usage {
        command: "new project",
        problem: "a name is needed".into(),
    })
}

/// The table, as docs/api.md and `ErrorKind`'s own doc give it.
#[test]
fn every_error_maps_to_one_kind_status_exit_code_and_label() {
    let io = || std::io::Error::other("disk on fire");
    let table: Vec<(CommandError, &str, u16, i32)> = vec![
        (usage(), "usage", 400, 2),
        (CommandError::Refused("no".into()), "refused", 403, 3),
        (CommandError::NotFound("none".into()), "not_found", 404, 4),
        (CommandError::Conflict("taken".into()), "conflict", 409, 5),
        (
            ProvisionError::Invalid {
                stage: Stage::Validated,
                message: "/srv/x exists and is not empty".into(),
            }
            .into(),
            "invalid",
            422,
            6,
        ),
        (
            ProvisionError::Unavailable("no KVM, no QEMU".into()).into(),
            "unavailable",
            503,
            7,
        ),
        (ProvisionError::NoVm("p".into()).into(), "conflict", 409, 5),
        (
            ProvisionError::Boot(Box::new(io())).into(),
            "failed",
            500,
            1,
        ),
        (
            ProvisionError::Disk(Box::new(io())).into(),
            "failed",
            500,
            1,
        ),
        (
            ProvisionError::Stop(Box::new(io())).into(),
            "failed",
            500,
            1,
        ),
        (
            ProvisionError::Destroy(Box::new(io())).into(),
            "failed",
            500,
            1,
        ),
        (
            ProvisionError::Source {
                stage: Stage::Cloning,
                source: Box::new(io()),
            }
            .into(),
            "failed",
            500,
            1,
        ),
        (CommandError::Store(StoreError::Full), "unavailable", 503, 7),
        (
            CommandError::Store(StoreError::Closed),
            "unavailable",
            503,
            7,
        ),
    ];
    for (e, kind, status, exit) in table {
        let k = e.kind();
        assert_eq!(k.as_str(), kind, "{e}");
        assert_eq!(k.http_status(), status, "{e}");
        assert_eq!(k.exit_code(), exit, "{e}");
        assert_eq!(exit_code(&Err(e)), exit);
    }
}

#[test]
fn kinds_are_distinct_and_callers_get_4xx() {
    let mut names = std::collections::BTreeSet::new();
    for k in ErrorKind::ALL {
        assert!(names.insert(k.as_str()), "{k} twice");
        assert_ne!(k.exit_code(), 0, "{k}");
        let status = k.http_status();
        if k.is_callers() {
            assert!((400..500).contains(&status), "{k}: {status}");
        } else {
            assert!((500..600).contains(&status), "{k}: {status}");
        }
        // The JSON name is the serde name.
        assert_eq!(
            serde_json::to_value(k).unwrap(),
            serde_json::Value::String(k.as_str().into())
        );
    }
}

#[test]
fn a_failure_carries_its_cause_to_the_user_once() {
    let e: CommandError = ProvisionError::Boot(Box::new(std::io::Error::other(
        "qemu-system-x86_64 exited with status 1",
    )))
    .into();
    let text = e.to_string();
    assert_eq!(
        text, "booting failed: qemu-system-x86_64 exited with status 1",
        "{text}"
    );
}

/// A member reusing a taken name and anyone renaming into one are told
/// the same kind: a conflict, not a refusal.
#[tokio::test]
async fn a_taken_name_is_a_conflict_from_policy_and_from_rename() {
    let w = World::new().build();
    w.run(&w.admin, "new project web --stack rust")
        .await
        .unwrap();
    w.run(&w.admin, "new project site --stack rust")
        .await
        .unwrap();
    let bob = Identity::new(Frontend::Discord, "77");
    let key = kennel_core::keys::testing::ed25519(3, Some("bob"));
    let Ok(kennel_core::Reply::RequestFiled { request, .. }) =
        w.run(&bob, &format!("request-access {key}")).await
    else {
        panic!()
    };
    w.run(&w.admin, &format!("approve {}", request.id))
        .await
        .unwrap();
    let member = w.run(&bob, "new project web --stack rust").await;
    let admin = w.run(&w.admin, "rename site web").await;
    for out in [&member, &admin] {
        match out {
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
                assert!(e.to_string().contains("already exists"), "{e}");
            }
            Ok(r) => panic!("{r:?}"),
        }
    }
}
