//! The access policy as a table: (role, command, relation) → allowed or refused.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kennel_core::model::Role;
use kennel_core::names::UserName;
use kennel_core::parse;
use kennel_core::policy::{authorize, Relation};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

#[derive(Debug, Clone, Copy)]
enum Who {
    Unknown,
    Member,
    Admin,
}

use Relation::*;
use Who::*;

const SHARED_BOTH: Relation = Shared {
    ssh: true,
    web: true,
};
const SHARED_WEB: Relation = Shared {
    ssh: false,
    web: true,
};

/// (who, command, relation, allowed, a word the refusal must contain)
fn table() -> Vec<(Who, String, Relation, bool, &'static str)> {
    let k = |c: &str| c.replace("KEY", KEY);
    vec![
        (Unknown, "help".into(), NoProject, true, ""),
        (Unknown, "whoami".into(), NoProject, true, ""),
        (
            Unknown,
            k("request-access KEY let me in"),
            NoProject,
            true,
            "",
        ),
        (
            Unknown,
            "projects".into(),
            NoProject,
            false,
            "request-access",
        ),
        (Unknown, "status a".into(), Owner, false, "request-access"),
        (
            Unknown,
            "new project a".into(),
            Missing,
            false,
            "request-access",
        ),
        (Member, "projects".into(), NoProject, true, ""),
        (Member, "stacks".into(), NoProject, true, ""),
        (Member, "new project a".into(), Missing, true, ""),
        (
            Member,
            "new project a".into(),
            Owner,
            false,
            "already exists",
        ),
        (
            Member,
            "new project a --git https://h/r.git".into(),
            Missing,
            true,
            "",
        ),
        (
            Member,
            "new project a --git file:///srv/r".into(),
            Missing,
            false,
            "only admins",
        ),
        (Member, "status a".into(), Owner, true, ""),
        (Member, "status a".into(), SHARED_WEB, true, ""),
        (Member, "status a".into(), Stranger, false, "no project"),
        (Member, "status a".into(), Missing, false, "no project"),
        (Member, "ssh a".into(), SHARED_BOTH, true, ""),
        (Member, "ssh a".into(), SHARED_WEB, false, "web app only"),
        (Member, "start a".into(), SHARED_BOTH, true, ""),
        (Member, "logs a".into(), Stranger, false, "no project"),
        (Member, "rm a --yes".into(), Owner, true, ""),
        (
            Member,
            "rm a --yes".into(),
            SHARED_BOTH,
            false,
            "only the owner",
        ),
        (Member, "share a bob".into(), Owner, true, ""),
        (
            Member,
            "share a bob".into(),
            SHARED_BOTH,
            false,
            "only the owner",
        ),
        (Member, "public a".into(), Owner, true, ""),
        (Member, "port a 3000".into(), Stranger, false, "no project"),
        (Member, "keys".into(), NoProject, true, ""),
        (Member, "keys --user ann".into(), NoProject, true, ""),
        (
            Member,
            "keys --user bob".into(),
            NoProject,
            false,
            "only admins",
        ),
        (Member, k("key add KEY"), NoProject, true, ""),
        (
            Member,
            k("key add KEY --user bob"),
            NoProject,
            false,
            "only admins",
        ),
        (Member, "requests".into(), NoProject, false, "only admins"),
        (Member, "approve 1".into(), NoProject, false, "only admins"),
        (Member, "deny 1 no".into(), NoProject, false, "only admins"),
        (Member, "users".into(), NoProject, false, "only admins"),
        (Admin, "requests".into(), NoProject, true, ""),
        (Admin, "approve 1".into(), NoProject, true, ""),
        (Admin, "rm a --yes".into(), Stranger, true, ""),
        (Admin, "status a".into(), Missing, true, ""),
        (
            Admin,
            "new project a --git file:///srv/r".into(),
            Missing,
            true,
            "",
        ),
        (Admin, k("key add KEY --user bob"), NoProject, true, ""),
    ]
}

#[test]
fn policy_table() {
    let me = UserName::new("ann").unwrap();
    for (who, line, rel, allowed, word) in table() {
        let cmd = parse(&line)
            .unwrap_or_else(|e| panic!("{line}: {e}"))
            .command;
        let role = match who {
            Unknown => None,
            Member => Some(Role::Member),
            Admin => Some(Role::Admin),
        };
        let r = authorize(role, role.map(|_| &me), &cmd, rel);
        assert_eq!(r.is_ok(), allowed, "{who:?} {line} {rel:?}: {r:?}");
        if let Err(e) = r {
            assert!(
                e.reason().contains(word),
                "{who:?} {line}: reason {:?} lacks {word:?}",
                e.reason()
            );
        }
    }
}

#[test]
fn who_may_enter_a_project_over_ssh_and_the_web() {
    use kennel_core::model::Visibility::{self, Private, Public};
    use kennel_core::policy::{may_enter, Entry};
    let member = Some(Role::Member);
    let admin = Some(Role::Admin);
    // (role, relation, visibility, entry, allowed)
    let rows: Vec<(Option<Role>, Relation, Visibility, Entry, bool)> = vec![
        (member, Owner, Private, Entry::Ssh, true),
        (member, Owner, Private, Entry::Web, true),
        (member, Owner, Private, Entry::WebOtherPort, true),
        (member, SHARED_WEB, Private, Entry::Web, true),
        (member, SHARED_WEB, Private, Entry::WebOtherPort, true),
        (member, SHARED_WEB, Private, Entry::Ssh, false),
        (
            member,
            Shared {
                ssh: true,
                web: false,
            },
            Private,
            Entry::Ssh,
            true,
        ),
        (
            member,
            Shared {
                ssh: true,
                web: false,
            },
            Private,
            Entry::Web,
            false,
        ),
        (member, Stranger, Private, Entry::Web, false),
        (member, Stranger, Public, Entry::Web, true),
        (member, Stranger, Public, Entry::WebOtherPort, false),
        (member, Stranger, Public, Entry::Ssh, false),
        (None, Stranger, Public, Entry::Web, true),
        (None, Stranger, Private, Entry::Web, false),
        (None, Stranger, Public, Entry::WebOtherPort, false),
        (None, Stranger, Public, Entry::Ssh, false),
        (admin, Stranger, Private, Entry::Ssh, true),
        (admin, Stranger, Private, Entry::Web, true),
        (admin, Stranger, Private, Entry::WebOtherPort, true),
        (member, Missing, Public, Entry::Web, false),
    ];
    for (role, rel, vis, entry, allowed) in rows {
        let got = may_enter(role, rel, vis, entry, "app");
        assert_eq!(
            got.is_ok(),
            allowed,
            "{role:?} {rel:?} {vis:?} {entry:?}: {got:?}"
        );
        if let Err(r) = got {
            assert!(r.reason().contains("app") || role.is_none(), "{r}");
        }
    }
}
