//! The daemon killed (`kill -9`) at every step of `new project` and of
//! `cp`, `rename`, `stop` and `rm`, held there by a fault point (the
//! `fault-points` feature, which `vm-tests` turns on) so that the kill
//! lands exactly at that step. After each restart: no orphan VMM,
//! virtiofsd, TAP, slot, disk, keys or half-made directory; the store says
//! what is true; sources are intact; the other projects' VMs still run.
//! `vm-tests` feature; needs what tests/e2e/vm.rs needs.
#![cfg(feature = "vm-tests")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{git, vm_running, Kennel, Steps};

const SMALL: &str = "--stack base --cpus 1 --memory 512M --disk 2G";

/// Starts the daemon held at fault point `point`, runs `line` until the
/// daemon says it holds there, kills the daemon (`kill -9`) and starts it
/// again without the hold. Returns the progress `line` showed.
pub(crate) fn kill_at(k: &mut Kennel, log: &Path, point: &str, line: &str) -> String {
    kill_at_shown(k, log, point, line, "")
}

/// [`kill_at`], and the kill waits until `line`'s progress shows `shown`
/// too: the daemon logs that it holds as soon as the stage's progress is
/// sent, which a loaded host can deliver to the client a moment later.
pub(crate) fn kill_at_shown(
    k: &mut Kennel,
    log: &Path,
    point: &str,
    line: &str,
    shown: &str,
) -> String {
    k.kill_serve("-KILL");
    k.env.push(("KENNEL_FAULT_HOLD".into(), point.into()));
    let before = std::fs::read_to_string(log).unwrap_or_default().len();
    k.start_serve_logged(log);
    k.env.pop();
    let mut child = k.exec_spawn(line);
    // The progress, read as it comes.
    let progress = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let mut stderr = child.stderr.take().unwrap();
        let progress = progress.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = std::io::Read::read(&mut stderr, &mut buf) {
                progress.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let shows = |want: &str| String::from_utf8_lossy(&progress.lock().unwrap()).contains(want);
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let new = text.get(before..).unwrap_or_default();
        if new.contains("fault point: holding")
            && new.contains(&format!("point=\"{point}\""))
            && shows(shown)
        {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("`{line}` ended ({status}) before reaching fault point {point}:\n{new}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "`{line}` never reached fault point {point} showing {shown:?}:\n{new}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    k.kill_serve("-KILL");
    child.wait().unwrap();
    reader.join().unwrap();
    k.start_serve_logged(log);
    let shown = progress.lock().unwrap().clone();
    String::from_utf8_lossy(&shown).into_owned()
}

/// Processes whose command line names this test's VM directory for `name`.
fn processes_of(k: &Kennel, name: &str) -> String {
    let dir = k.dir.join(format!("kennel-data/vms/{name}/"));
    let out = Command::new("pgrep")
        .args(["-a", "-f", &dir.display().to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn slots(k: &Kennel) -> Vec<String> {
    let db = rusqlite::Connection::open_with_flags(
        k.dir.join("kennel-data/kennel.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut q = db.prepare("SELECT project FROM vm_slots").unwrap();
    q.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// (state, note) of `name`, or None when the store has no such project.
fn project(k: &Kennel, name: &str) -> Option<(String, Option<String>)> {
    let v: serde_json::Value = serde_json::from_str(k.exec_ok("--json projects").trim()).unwrap();
    v["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .map(|p| {
            (
                p["state"].as_str().unwrap().to_owned(),
                p["state_note"].as_str().map(str::to_owned),
            )
        })
}

/// Nothing of `name`'s VM is left: no process, VM directory, keys or slot.
fn no_vm_left(k: &Kennel, name: &str, at: &str) {
    let data = k.dir.join("kennel-data");
    assert_eq!(processes_of(k, name), "", "{at}: processes of {name} left");
    assert!(
        !data.join("vms").join(name).exists(),
        "{at}: vms/{name} left"
    );
    assert!(
        !data.join("keys/projects").join(name).exists(),
        "{at}: keys/projects/{name} left"
    );
    assert!(
        !slots(k).contains(&name.to_owned()),
        "{at}: the slot of {name} is still taken"
    );
}

/// The witness project still runs and answers, with its file.
fn witness_answers(k: &Kennel, at: &str) {
    assert_eq!(
        project(k, "w").map(|p| p.0),
        Some("running".into()),
        "{at}: the witness"
    );
    assert_eq!(k.ssh_ok("w", "cat /workspace/w.txt"), "w\n", "{at}");
}

fn no_taps_left() {
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // This test uses user-mode networking: it makes no TAPs at all.
    assert!(!text.contains(": kt"), "TAPs left: {text}");
}

#[test]
fn a_daemon_killed_at_every_step_leaves_no_orphans_and_the_truth() {
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    let log = tmp.path().join("serve.log");
    let projects = tmp.path().join("kennel-data/projects");
    k.start_serve_logged(&log);

    // A repository to clone, with enough history that the clone reports.
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    for i in 0..20 {
        std::fs::write(repo.join(format!("f{i}.txt")), format!("file {i}\n")).unwrap();
        git(&repo, &["add", "."]);
        git(&repo, &["commit", "-q", "-m", &format!("c{i}")]);
    }
    let url = format!("file://{}", repo.display());

    // The witness, running, and one to copy and rename, stopped, with a
    // file on its disk (not in the source) to follow.
    k.exec_ok(&format!("new project w {SMALL}"));
    k.ssh_ok("w", "echo w > /workspace/w.txt");
    k.exec_ok(&format!("new project s {SMALL}"));
    k.ssh_ok(
        "s",
        "echo s > /workspace/s.txt; echo disk > ~/disk.txt; sync",
    );
    k.exec_ok("stop s");

    // Each kill is a step of its own: one that fails is named, and the
    // others still run.
    let mut steps = Steps::new("a_daemon_killed_at_every_step_leaves_no_orphans_and_the_truth");

    // new project, killed as each stage begins.
    // The fault points up to "ready" are the stages of `new project`.
    let stages = kennel_core::fault::POINTS
        .iter()
        .take_while(|p| **p != "stopping");
    for (i, stage) in stages.enumerate() {
        let name = format!("n{i}");
        let at = format!("new project killed at {stage}");
        steps.run(&at.clone(), || {
            // "ready" holds once the VM is ready, before the store and the
            // requester are told: the last step shown is the boot.
            let want = if *stage == "ready" { "booting" } else { stage };
            let shown = kill_at_shown(
                &mut k,
                &log,
                stage,
                &format!("new project {name} --git {url} {SMALL}"),
                want,
            );
            assert!(shown.contains(want), "{at}: progress showed {shown}");
            let src = projects.join(&name);
            // Never finished from the store's point of view: rolled back.
            assert_eq!(project(&k, &name), None, "{at}");
            no_vm_left(&k, &name, &at);
            // The clone is whole (kept, as a failed create keeps it) or gone;
            // never half made.
            if src.exists() {
                let out = Command::new("git")
                    .args(["-c", "safe.directory=*", "-C"])
                    .arg(&src)
                    .args(["status", "--porcelain"])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success() && out.stdout.is_empty(),
                    "{at}: a half-made clone is left: {out:?}"
                );
                assert!(src.join("f19.txt").exists(), "{at}: the clone is not whole");
            }
            witness_answers(&k, &at);
            // The name can be used again at once.
            if *stage == "ready" {
                k.exec_ok(&format!("new project {name} --path {name} --adopt {SMALL}"));
                assert!(k.ssh_ok(&name, "ls /workspace").contains("f19.txt"));
            }
        });
    }
    steps.run("the first stages leave no source at all", || {
        for i in 0..2 {
            assert!(!projects.join(format!("n{i}")).exists(), "n{i}");
        }
    });

    // cp, killed after the disk and source were copied.
    steps.run("cp, killed after the disk and source were copied", || {
        let at = "cp killed while copying";
        kill_at(&mut k, &log, "copying", "cp s c");
        assert_eq!(project(&k, "c"), None, "{at}");
        no_vm_left(&k, "c", at);
        assert!(
            !projects.join("c").exists(),
            "{at}: a half-made copy is left"
        );
        assert_eq!(project(&k, "s").map(|p| p.0), Some("stopped".into()));
        witness_answers(&k, at);
    });

    // rename, killed after the store was told, before the VM moved.
    steps.run(
        "rename, killed after the store was told, before the VM moved",
        || {
            let at = "rename killed before the VM moved";
            kill_at(&mut k, &log, "renaming", "rename s s2");
            assert_eq!(project(&k, "s"), None, "{at}");
            assert_eq!(
                project(&k, "s2").map(|p| p.0),
                Some("stopped".into()),
                "{at}"
            );
            no_vm_left(&k, "s", at);
            k.exec_ok("start s2");
            assert_eq!(
                k.ssh_ok("s2", "cat ~/disk.txt /workspace/s.txt"),
                "disk\ns\n"
            );
            witness_answers(&k, at);
        },
    );

    // rename, killed after the VM directory moved, before its record did.
    steps.run(
        "rename, killed after the VM directory moved, before its record did",
        || {
            let at = "rename killed while the VM moved";
            kill_at(&mut k, &log, "renaming-vm", "rename s2 s3");
            assert_eq!(project(&k, "s2"), None, "{at}");
            assert!(project(&k, "s3").is_some(), "{at}");
            no_vm_left(&k, "s2", at);
            k.exec_ok("start s3");
            assert_eq!(
                k.ssh_ok("s3", "cat ~/disk.txt /workspace/s.txt"),
                "disk\ns\n"
            );
            witness_answers(&k, at);
        },
    );

    // stop, killed after the VM stopped, before the store was told.
    steps.run(
        "stop, killed after the VM stopped, before the store was told",
        || {
            let at = "stop killed after the VM stopped";
            kill_at(&mut k, &log, "stopping", "stop s3");
            assert_eq!(
                project(&k, "s3").map(|p| p.0),
                Some("stopped".into()),
                "{at}"
            );
            assert!(!vm_running(&k, "s3"), "{at}");
            assert_eq!(processes_of(&k, "s3"), "", "{at}");
            witness_answers(&k, at);
        },
    );

    // rm, killed after the VM was destroyed, before the store was told.
    steps.run(
        "rm, killed after the VM was destroyed, before the store was told",
        || {
            let at = "rm killed after the VM was destroyed";
            kill_at(&mut k, &log, "destroying", "rm s3 --yes");
            let (state, note) = project(&k, "s3").expect(at);
            assert_eq!(state, "failed", "{at}");
            assert!(
                note.as_deref().unwrap_or_default().contains("rm s3"),
                "{at}: the note says what to do: {note:?}"
            );
            no_vm_left(&k, "s3", at);
            k.exec_ok("rm s3 --yes");
            assert_eq!(project(&k, "s3"), None);
            // A rename keeps the source where it was.
            assert!(projects.join("s/s.txt").exists(), "the source is kept");
            witness_answers(&k, at);
            no_taps_left();
        },
    );

    // What the restarts did, as the daemon logged it.
    steps.run("What the restarts did, as the daemon logged it", || {
        let logged = std::fs::read_to_string(&log).unwrap();
        for l in logged
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        {
            eprintln!("serve: {l}");
        }
        for said in [
            "removed a half-made source that a restart cut off",
            "finished a rename that a restart cut off",
            "a create was cut off by a restart",
        ] {
            assert!(logged.contains(said), "the log says {said:?}");
        }
    });
    steps.finish();
}
