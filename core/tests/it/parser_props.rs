//! Property tests of the command language: nothing panics, and every
//! command prints to a line that parses back to itself.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kennel_core::command::{
    parse, Command, GitSource, HostName, Limit, NewProjectArgs, QuotaChange, Size, SlugName,
};
use kennel_core::keys::{Fingerprint, PublicKey};
use kennel_core::names::{ProjectName, UserName};
use proptest::prelude::*;

fn project() -> impl Strategy<Value = ProjectName> {
    "[a-z][a-z0-9-]{0,38}[a-z0-9]".prop_filter_map("valid", |s| ProjectName::new(&s).ok())
}
fn user() -> impl Strategy<Value = UserName> {
    "[a-z][a-z0-9._-]{0,20}".prop_map(|s| UserName::new(&s).unwrap())
}
fn slug() -> impl Strategy<Value = SlugName> {
    "[a-z][a-z0-9-]{0,15}".prop_map(|s| SlugName::new(&s).unwrap())
}
/// Free text as people type it, minus what chat normalization rewrites
/// (smart quotes, odd spaces, control characters), trimmed and non-empty.
fn note() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 .,!?'\"`\\\\@#:/-]{1,40}".prop_filter_map("non-blank", |s| {
        let t = s.trim().to_owned();
        (!t.is_empty()).then_some(t)
    })
}
fn key() -> impl Strategy<Value = PublicKey> {
    (any::<[u8; 32]>(), prop::option::of("[a-z]{1,8}@[a-z]{1,8}")).prop_map(|(bytes, comment)| {
        use ssh_key::public::{Ed25519PublicKey, KeyData};
        let line = ssh_key::PublicKey::new(KeyData::Ed25519(Ed25519PublicKey(bytes)), "")
            .to_openssh()
            .unwrap();
        let line = match comment {
            Some(c) => format!("{line} {c}"),
            None => line,
        };
        PublicKey::parse(&line).unwrap()
    })
}
fn size(min: u64) -> impl Strategy<Value = Size> {
    (min..=1_048_576u64).prop_map(|mib| Size { mib })
}

fn more_commands() -> impl Strategy<Value = Command> {
    prop_oneof![
        Just(Command::Yes),
        Just(Command::Secrets),
        Just(Command::DeployKey),
        (project(), prop::option::of(slug()), project())
            .prop_map(|(name, at, new_name)| { Command::Cp { name, at, new_name } }),
        (
            project(),
            prop::option::of(slug()),
            prop::option::of(note())
        )
            .prop_map(|(name, label, note)| Command::Checkpoint { name, label, note }),
        project().prop_map(|name| Command::Checkpoints { name }),
        (project(), slug(), any::<bool>()).prop_map(|(name, label, yes)| Command::Rollback {
            name,
            label,
            yes
        }),
        (project(), slug()).prop_map(|(name, label)| Command::CheckpointRm { name, label }),
        (project(), project()).prop_map(|(name, new_name)| Command::Rename { name, new_name }),
        (slug(), "[!-~]{1,40}").prop_map(|(name, value)| Command::SecretSet { name, value }),
        slug().prop_map(|name| Command::SecretRm { name }),
        (
            project(),
            prop::option::of(1u32..=64),
            prop::option::of(size(256)),
            prop::option::of(size(1024))
        )
            .prop_filter_map("changes something", |(name, cpus, memory, disk)| {
                (cpus.is_some() || memory.is_some() || disk.is_some()).then_some(Command::Resize {
                    name,
                    cpus,
                    memory,
                    disk,
                })
            }),
        (
            // `run stop X` is the command that stops runs.
            project().prop_filter("not 'stop'", |p| p.as_str() != "stop"),
            prop::collection::vec("[!-~][ -~]{0,11}", 1..6),
            prop::option::of(1u64..=86_400)
        )
            .prop_map(|(name, argv, timeout)| Command::Run {
                name,
                argv,
                timeout_secs: timeout.unwrap_or(600),
            }),
        project().prop_map(|name| Command::RunStop { name }),
        (
            project(),
            prop::option::of((1u16..=65535).prop_filter("not sshd", |p| *p != 22)),
            prop::option::of(1u64..=90 * 86_400),
            prop::option::of(note())
        )
            .prop_map(|(name, port, expires, note)| Command::ShareLink {
                name,
                port,
                expires_secs: expires.unwrap_or(7 * 86_400),
                note,
            }),
        project().prop_map(|name| Command::Shares { name }),
        (project(), 1i64..=i64::MAX).prop_map(|(name, id)| Command::UnshareLink { name, id }),
        (project(), host()).prop_map(|(name, host)| Command::DomainAdd { name, host }),
        (project(), host()).prop_map(|(name, host)| Command::DomainRm { name, host }),
        host().prop_map(|host| Command::DomainApprove { host }),
        prop::option::of(project()).prop_map(|name| Command::Domains { name }),
        (project(), tags()).prop_map(|(name, tags)| Command::Tag { name, tags }),
        (project(), tags()).prop_map(|(name, tags)| Command::Untag { name, tags }),
        (
            prop::option::of(user()),
            prop::option::of(limit(false)),
            prop::option::of(limit(false)),
            prop::option::of(limit(true)),
            prop::option::of(limit(true)),
        )
            .prop_map(|(user, projects, vcpus, memory_mib, disk_mib)| {
                let change = QuotaChange {
                    projects,
                    vcpus,
                    memory_mib,
                    disk_mib,
                };
                // A change names its user.
                let user =
                    user.or_else(|| (!change.is_empty()).then(|| UserName::new("ann").unwrap()));
                Command::Quota { user, change }
            }),
    ]
}

/// A custom domain's host name.
fn host() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,10}[a-z0-9]\\.[a-z]{2,6}"
}

/// A quota limit; sizes in MiB from 1.
fn limit(size: bool) -> impl Strategy<Value = Limit> {
    let at = if size { 1u64..=1 << 30 } else { 0u64..=10_000 };
    prop_oneof![
        Just(Limit::Default),
        Just(Limit::Unlimited),
        at.prop_map(Limit::At)
    ]
}

/// One to five distinct tags (the parser drops repeats).
fn tags() -> impl Strategy<Value = Vec<SlugName>> {
    prop::collection::btree_set(slug(), 1..=5).prop_map(|s| s.into_iter().collect())
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![first_commands(), more_commands()]
}

fn first_commands() -> impl Strategy<Value = Command> {
    let topics: Vec<&'static str> = kennel_core::command::SPECS.iter().map(|s| s.name).collect();
    prop_oneof![
        prop::option::of(prop::sample::select(topics)).prop_map(|topic| Command::Help { topic }),
        Just(Command::Whoami),
        prop::option::of(slug()).prop_map(|tag| Command::Projects { tag }),
        Just(Command::Users),
        Just(Command::Stacks),
        Just(Command::Templates),
        Just(Command::Hosts),
        (project(), "[a-z0-9][a-z0-9.-]{0,20}").prop_map(|(name, h)| Command::Move {
            name,
            host: HostName::new(&h).unwrap()
        }),
        "[a-zA-Z0-9][a-zA-Z0-9_-]{0,20}".prop_map(|h| Command::Evacuate {
            host: HostName::new(&h).unwrap()
        }),
        "[a-z0-9][a-z0-9_-]{0,20}".prop_map(|h| Command::Restore {
            host: HostName::new(&h).unwrap()
        }),
        (
            project(),
            prop::option::of(slug()),
            prop::option::of(prop::sample::select(vec![
                "https://git.example.com/me/app.git",
                "git@github.com:me/app.git",
                "file:///srv/x y",
            ])),
            prop::option::of("/[a-z/ ]{1,20}"),
            prop::option::of(slug()),
            prop::option::of(1u32..=64),
            prop::option::of(size(256)),
            (
                prop::option::of(size(1024)),
                any::<bool>(),
                prop::option::of("[a-z0-9][a-z0-9._-]{0,20}")
            ),
        )
            .prop_map(
                |(name, stack, git, path, template, cpus, memory, (disk, adopt, host))| {
                    Command::NewProject(Box::new(NewProjectArgs {
                        name,
                        stack,
                        git: git.and_then(|g| GitSource::new(g).ok()),
                        path,
                        template,
                        cpus,
                        memory,
                        disk,
                        adopt,
                        host: host.and_then(|h| HostName::new(&h).ok()),
                    }))
                }
            ),
        project().prop_map(|name| Command::Status { name }),
        project().prop_map(|name| Command::Start { name }),
        project().prop_map(|name| Command::Stop { name }),
        project().prop_map(|name| Command::Restart { name }),
        (project(), any::<bool>(), any::<bool>()).prop_map(|(name, purge, yes)| Command::Rm {
            name,
            purge,
            yes
        }),
        project().prop_map(|name| Command::Ssh { name }),
        (project(), 1u32..=10_000).prop_map(|(name, lines)| Command::Logs { name, lines }),
        (
            project(),
            user(),
            prop::sample::select(vec![(true, true), (true, false), (false, true)])
        )
            .prop_map(|(name, user, (ssh, web))| Command::Share {
                name,
                user,
                ssh,
                web
            }),
        (project(), user()).prop_map(|(name, user)| Command::Unshare { name, user }),
        project().prop_map(|name| Command::Public { name }),
        project().prop_map(|name| Command::Private { name }),
        (
            project(),
            (1u16..=65535).prop_filter("not sshd", |p| *p != 22)
        )
            .prop_map(|(name, port)| Command::Port { name, port }),
        prop::option::of(user()).prop_map(|user| Command::Keys { user }),
        (key(), prop::option::of(note()), prop::option::of(user()))
            .prop_map(|(key, label, user)| Command::KeyAdd { key, label, user }),
        key().prop_map(|k| Command::KeyRm {
            fingerprint: Fingerprint::new(k.fingerprint().as_str()).unwrap()
        }),
        (key(), prop::option::of(note()))
            .prop_map(|(key, note)| Command::RequestAccess { key, note }),
        any::<bool>().prop_map(|all| Command::Requests { all }),
        ((1i64..=i64::MAX), proptest::option::of(user()))
            .prop_map(|(id, name)| Command::Approve { id, name }),
        (1i64..=i64::MAX, prop::option::of(note()))
            .prop_map(|(id, reason)| Command::Deny { id, reason }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn no_input_panics(s in any::<String>()) {
        let _ = parse(&s);
    }

    #[test]
    fn no_command_like_input_panics(s in "(!kennel |@kennel: )?(new project|key add|request-access|deny|help|share|rm|logs) [ -~\u{201C}\u{201D}\u{00A0}]{0,80}") {
        let _ = parse(&s);
    }

    #[test]
    fn every_command_prints_and_reparses_to_itself(cmd in command(), json in any::<bool>()) {
        let inv = kennel_core::Invocation { command: cmd, json };
        let line = inv.to_string();
        let back = parse(&line).map_err(|e| TestCaseError::fail(format!("{line}: {e}")))?;
        prop_assert_eq!(back, inv, "{}", line);
    }
}
