//! Projects on a three-member Incus cluster (testkit: members in network
//! namespaces of their own, formed with join tokens), driven by Kennel's
//! own commands: `hosts`, placement spread by Incus, `new project
//! --host`, `move` (SSH follows the project to its new member's address),
//! `evacuate` and `restore`, and a member whose daemon dies: the project
//! shows "host H is offline", a start is refused at once with that, and
//! all is well again when the member is back.
//! `vm-tests` feature; needs root, incus-base and Kennel's base image.
#![cfg(feature = "vm-tests")]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kennel_testkit::incus::IncusCluster;

use crate::support::{git, Kennel};

/// Each Kennel project's member, from `hosts --json`.
fn placement(k: &Kennel) -> BTreeMap<String, String> {
    let out = k.exec_ok("--json hosts");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let mut at = BTreeMap::new();
    for h in v["hosts"].as_array().unwrap() {
        for p in h["projects"].as_array().unwrap() {
            at.insert(
                p.as_str().unwrap().to_owned(),
                h["name"].as_str().unwrap().to_owned(),
            );
        }
    }
    at
}

fn host_status(k: &Kennel, host: &str) -> String {
    let out = k.exec_ok("--json hosts");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == host)
        .map(|h| h["status"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Kennel's source volumes (custom volumes, not their snapshots), each
/// with its member, as Incus lists them.
fn volumes(cluster: &IncusCluster) -> Vec<(String, String)> {
    let out = cluster.incus(
        0,
        &[
            "storage", "volume", "list", "default", "-f", "csv", "-c", "ntL",
        ],
        b"",
    );
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            match f.as_slice() {
                [n, "custom", at] if n.starts_with("kennel-src-") => {
                    Some(((*n).to_owned(), (*at).to_owned()))
                }
                _ => None,
            }
        })
        .collect()
}

/// What a command said, on either stream.
fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `hostname` in `project` through Kennel's SSH gateway.
fn hostname(k: &Kennel, key: &std::path::Path, project: &str) -> String {
    sh(k, key, project, "hostname").trim().to_owned()
}

/// `command` in `project` through Kennel's SSH gateway; its output.
fn sh(k: &Kennel, key: &std::path::Path, project: &str, command: &str) -> String {
    let out = k
        .gateway_ssh(key, &format!("{project}@127.0.0.1"), command)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh {project}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn projects_spread_move_evacuate_and_outlive_a_dead_member() {
    let mut cluster = IncusCluster::start(3);
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    let first = 43000 + (std::process::id() % 500) as u16 * 2;
    k.env.extend([
        ("KENNEL_VM__BACKEND".to_owned(), "incus".to_owned()),
        (
            "KENNEL_INCUS__ADDRESS".to_owned(),
            cluster.socket(0).display().to_string(),
        ),
        ("KENNEL_INCUS__NETWORK".to_owned(), "kbr".to_owned()),
        (
            "KENNEL_INCUS__LISTEN_ADDRESS".to_owned(),
            "member".to_owned(),
        ),
        (
            "KENNEL_INCUS__PORTS".to_owned(),
            format!("{first}-{}", first + 40),
        ),
    ]);
    k.start_serve_logged(&tmp.path().join("serve.log"));
    let key = k.admin_key("me");

    let hosts = k.exec_ok("hosts");
    for m in ["m1", "m2", "m3"] {
        assert!(hosts.contains(m), "{hosts}");
    }
    assert_eq!(host_status(&k, "m1"), "online");

    // Incus places: three projects, three members. `--host` chooses.
    for p in ["a", "b", "c"] {
        k.exec_ok(&format!("new project {p}"));
    }
    let at = placement(&k);
    let used: std::collections::BTreeSet<&String> = at.values().collect();
    assert_eq!(used.len(), 3, "{at:?}");
    // The source: cloned on Kennel's host, copied into a storage volume
    // on the project's member, owned by the guest's dev both ways.
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    std::fs::write(repo.join("hello.txt"), "hello\n").unwrap();
    // Its devcontainer.json's create step runs once the volume holds the
    // source (it reads a file of it).
    std::fs::create_dir_all(repo.join(".devcontainer")).unwrap();
    std::fs::write(
        repo.join(".devcontainer/devcontainer.json"),
        r#"{ "postCreateCommand": "cat hello.txt > created.txt", "remoteEnv": { "GREETING": "hi" } }"#,
    )
    .unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    let out = k.exec_ok(&format!(
        "new project d --host m2 --git file://{}",
        repo.display()
    ));
    assert!(out.contains("storage volume kennel-src-d"), "{out}");
    assert!(
        out.contains("devcontainer postCreateCommand finished"),
        "{out}"
    );
    assert_eq!(placement(&k)["d"], "m2");
    // Through the gateway, to the proxy on m2's own address.
    assert_eq!(hostname(&k, &key, "d"), "d");
    assert_eq!(
        sh(
            &k,
            &key,
            "d",
            "cat /workspace/hello.txt; echo mine > /workspace/mine.txt; stat -c %U /workspace /workspace/hello.txt /workspace/mine.txt; git -C /workspace log --format=%s; cat /workspace/created.txt; echo $GREETING"
        ),
        "hello\ndev\ndev\ndev\nfirst\nhello\nhi\n"
    );
    assert!(
        volumes(&cluster).contains(&("kennel-src-d".into(), "m2".into())),
        "{:?}",
        volumes(&cluster)
    );
    // No host directory to share here.
    let e = k.exec("new project e --path e");
    assert!(!e.status.success());
    assert!(said(&e).contains("storage volumes"), "{e:?}");
    // A checkpoint holds the volume too.
    k.exec_ok("checkpoint d first");
    sh(&k, &key, "d", "echo later > /workspace/mine.txt");
    k.exec_ok("rollback d first --yes");
    assert_eq!(sh(&k, &key, "d", "cat /workspace/mine.txt"), "mine\n");
    let status = k.exec_ok("--json status d");
    assert!(
        status.contains(&format!("{}:", cluster.address(1))),
        "{status}"
    );

    // move: stopped, moved, running again, reached on m3's address.
    let moved = k.exec("move d m3");
    if !moved.status.success() {
        let log = std::fs::read_to_string(tmp.path().join("serve.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let members: Vec<String> = (0..3)
            .map(|i| {
                let l = cluster.log(i);
                let t: Vec<&str> = l.lines().rev().take(15).collect();
                t.into_iter().rev().collect::<Vec<_>>().join("\n")
            })
            .collect();
        panic!(
            "move d m3: {}\nthe daemon's log:\n{}\nthe members' logs:\n{}",
            said(&moved),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            members.join("\n---\n")
        );
    }
    let out = String::from_utf8_lossy(&moved.stdout).into_owned();
    assert!(out.contains("from m2 to m3"), "{out}");
    assert_eq!(placement(&k)["d"], "m3");
    assert_eq!(k.state("d").0, "running");
    assert_eq!(hostname(&k, &key, "d"), "d");
    // Still dev's to write (the copy kept the id map its files are
    // stored under).
    sh(&k, &key, "d", "touch /workspace/after-move");
    // Its volume went with it (none left behind), checkpoint and all.
    assert_eq!(sh(&k, &key, "d", "cat /workspace/mine.txt"), "mine\n");
    let of_d: Vec<_> = volumes(&cluster)
        .into_iter()
        .filter(|(n, _)| n == "kennel-src-d")
        .collect();
    assert_eq!(of_d, [("kennel-src-d".into(), "m3".into())]);
    // cp: a volume of its own, beside it; a purge deletes it.
    k.exec_ok("cp d@first dcopy");
    assert_eq!(placement(&k)["dcopy"], "m3");
    assert_eq!(sh(&k, &key, "dcopy", "cat /workspace/mine.txt"), "mine\n");
    let out = k.exec_ok("rm dcopy --purge --yes");
    assert!(
        out.contains("DELETES") && out.contains("storage volume kennel-src-dcopy (pool default)"),
        "{out}"
    );
    k.exec_ok("yes");
    assert!(
        !volumes(&cluster)
            .iter()
            .any(|(n, _)| n == "kennel-src-dcopy"),
        "{:?}",
        volumes(&cluster)
    );
    let e = k.exec("move d m9");
    assert!(!e.status.success());
    assert!(
        String::from_utf8_lossy(&e.stdout).contains("m1, m2, m3")
            || String::from_utf8_lossy(&e.stderr).contains("m1, m2, m3")
    );

    // evacuate m1: what ran there runs elsewhere; restore brings it home.
    let on_m1: Vec<String> = placement(&k)
        .into_iter()
        .filter(|(_, h)| h == "m1")
        .map(|(p, _)| p)
        .collect();
    assert!(!on_m1.is_empty());
    let out = k.exec_ok("evacuate m1");
    assert!(out.contains("m1 is evacuated"), "{out}");
    assert_eq!(host_status(&k, "m1"), "evacuated");
    for p in &on_m1 {
        assert_ne!(placement(&k)[p], "m1");
        assert_eq!(k.state(p).0, "running");
        assert_eq!(&hostname(&k, &key, p), p);
    }
    let out = k.exec_ok("restore m1");
    assert!(out.contains("back in service"), "{out}");
    assert_eq!(host_status(&k, "m1"), "online");
    for p in &on_m1 {
        assert_eq!(placement(&k)[p], "m1");
        assert_eq!(&hostname(&k, &key, p), p);
    }

    // m3's daemon dies with d stopped on it: shown offline, a start is
    // refused at once, saying why; the others go on.
    k.exec_ok("stop d");
    cluster.kill(2);
    let deadline = Instant::now() + Duration::from_secs(60);
    while host_status(&k, "m3") != "offline" {
        assert!(Instant::now() < deadline, "m3 never offline");
        std::thread::sleep(Duration::from_secs(1));
    }
    let (state, note) = k.state("d");
    assert_eq!(state, "stopped");
    assert_eq!(note.as_deref(), Some("host m3 is offline"));
    let t = Instant::now();
    let out = k.exec("start d");
    assert!(!out.status.success());
    assert!(said(&out).contains("host m3 is offline"), "{out:?}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(k.state("d").0, "stopped");
    let other = on_m1.first().unwrap();
    assert_eq!(&hostname(&k, &key, other), other);

    cluster.revive(2);
    let deadline = Instant::now() + Duration::from_secs(90);
    while host_status(&k, "m3") != "online" {
        assert!(Instant::now() < deadline, "m3 never back");
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(k.state("d").1, None);
    k.exec_ok("start d");
    assert_eq!(hostname(&k, &key, "d"), "d");

    // rename: the volume takes the new name. rm keeps it (a source is
    // deleted only by a purge), and a new project of that name is told.
    k.exec_ok("rename d dd");
    assert_eq!(sh(&k, &key, "dd", "cat /workspace/mine.txt"), "mine\n");
    // A checkpoint from before the move and the rename still rolls back
    // (its disk's config names the member and the volume as they were).
    sh(&k, &key, "dd", "echo renamed > /workspace/mine.txt");
    k.exec_ok("rollback dd first --yes");
    assert_eq!(sh(&k, &key, "dd", "cat /workspace/mine.txt"), "mine\n");
    for p in ["a", "b", "c", "dd"] {
        k.exec_ok(&format!("rm {p}"));
        k.exec_ok("yes");
    }
    let left: Vec<String> = volumes(&cluster).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        left,
        [
            "kennel-src-a",
            "kennel-src-b",
            "kennel-src-c",
            "kennel-src-dd"
        ],
    );
    let e = k.exec("new project dd");
    assert!(!e.status.success());
    assert!(
        said(&e).contains("left from an earlier project dd"),
        "{e:?}"
    );
}
