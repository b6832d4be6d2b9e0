//! Checkpoints on a real guest (QEMU, TCG here): a live checkpoint of a
//! running VM, a rollback that brings back both a file in `/workspace`
//! (the host source) and one in the VM's home (its disk), the automatic
//! checkpoint that undoes it, `cp NAME@LABEL`, links in the source kept
//! as links, and a removed checkpoint's layer merged at the next start.
#![cfg(feature = "vm-tests")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crate::support::{git, Kennel, Steps};

/// The files in a VM's directory named `disk.*` other than `disk.qcow2`:
/// a new layer not yet renamed to it (none once a checkpoint is done).
fn other_disk_files(vm: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(vm)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("disk.") && n != "disk.qcow2")
        .collect()
}

#[test]
fn checkpoint_roll_back_undo_and_copy_on_a_real_guest() {
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    k.start_serve();
    // A repository for a source, with a link that leads out of the root.
    let src = tmp.path().join("kennel-data/projects/keep");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), "one\n").unwrap();
    std::os::unix::fs::symlink("/etc", src.join("out")).unwrap();
    git(&src, &["init", "-q", "-b", "main"]);
    git(&src, &["add", "a.txt"]);
    git(&src, &["commit", "-q", "-m", "first"]);
    let head = String::from_utf8(
        std::process::Command::new("git")
            .current_dir(&src)
            .args(["rev-parse", "HEAD"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    // Owned by a host user, as sources are: dev in the VM gets that uid.
    let chown = std::process::Command::new("chown")
        .args(["-hR", "4242:4242"])
        .arg(&src)
        .status()
        .unwrap();
    assert!(chown.success());
    let data = tmp.path().join("kennel-data");

    let mut steps = Steps::new("checkpoint_roll_back_undo_and_copy_on_a_real_guest");
    steps.run("new project keep", || {
        k.exec_ok("new project keep --adopt --stack base --cpus 1 --memory 512M --disk 4G");
        k.ssh_ok("keep", "echo one > ~/home.txt");
    });
    steps.run("a live checkpoint", || {
        let out = k.exec_ok("checkpoint keep first --note 'both files at one'");
        assert!(out.contains("Checkpoint first of keep taken"), "{out}");
        assert!(out.contains("paused for"), "{out}");
        let list = k.exec_ok("checkpoints keep");
        assert!(list.contains("both files at one"), "{list}");
        assert!(list.contains(&head[..12]), "the git HEAD: {list}");
        // The source copy keeps the link a link.
        let copied = data.join("vms/keep/checkpoints/first/source/out");
        assert_eq!(
            std::fs::read_link(&copied).unwrap(),
            std::path::PathBuf::from("/etc")
        );
    });
    steps.run("a second live checkpoint in the same boot", || {
        // What is written between two live checkpoints of one boot lives
        // in the layer the second one freezes: the guest still reads it,
        // from the disk rather than its cache.
        k.ssh_ok(
            "keep",
            "head -c 4M /dev/urandom > ~/mid.bin && sha256sum < ~/mid.bin > ~/mid.sum && sync",
        );
        let out = k.exec_ok("checkpoint keep second");
        assert!(out.contains("Checkpoint second of keep taken"), "{out}");
        let seen = k.ssh_ok(
            "keep",
            "sync && echo 3 | sudo tee /proc/sys/vm/drop_caches >/dev/null && sha256sum < ~/mid.bin | cmp - ~/mid.sum && cat ~/home.txt && rm ~/mid.bin ~/mid.sum",
        );
        assert_eq!(seen, "one\n");
        k.exec_ok("checkpoint rm keep second");
        // The new layer took the disk's name; no other name is left.
        let left = other_disk_files(&data.join("vms/keep"));
        assert!(left.is_empty(), "{left:?}");
    });
    steps.run("changes after it", || {
        k.ssh_ok(
            "keep",
            "echo two > /workspace/a.txt; echo two > ~/home.txt; echo new > /workspace/new.txt; echo new > ~/new.txt",
        );
        // What the guest writes to /workspace is on the host at once.
        assert_eq!(std::fs::read_to_string(src.join("a.txt")).unwrap(), "two\n");
        assert_eq!(std::fs::read_to_string(src.join("new.txt")).unwrap(), "new\n");
    });
    steps.run("rollback to it: disk and source", || {
        let out = k.exec_ok("rollback keep first --yes");
        assert!(out.contains("back at checkpoint first"), "{out}");
        assert!(out.contains("rollback keep auto-1"), "{out}");
        let seen = k.ssh_ok(
            "keep",
            "cat /workspace/a.txt ~/home.txt; ls /workspace/new.txt ~/new.txt 2>&1 | wc -l; test -e ~/new.txt || echo no-home-new",
        );
        assert!(seen.starts_with("one\none\n"), "{seen}");
        assert!(seen.contains("no-home-new"), "{seen}");
        assert_eq!(std::fs::read_to_string(src.join("a.txt")).unwrap(), "one\n");
        assert!(!src.join("new.txt").exists());
        assert_eq!(
            std::fs::read_link(src.join("out")).unwrap(),
            std::path::PathBuf::from("/etc")
        );
    });
    steps.run("the automatic checkpoint undoes it", || {
        k.exec_ok("rollback keep auto-1 --yes");
        let seen = k.ssh_ok("keep", "cat /workspace/a.txt ~/home.txt ~/new.txt");
        assert_eq!(seen, "two\ntwo\nnew\n");
        assert!(src.join("new.txt").exists());
    });
    steps.run("cp keep@first", || {
        let out = k.exec_ok("cp keep@first fork");
        assert!(out.contains("ssh fork@"), "{out}");
        let seen = k.ssh_ok("fork", "cat /workspace/a.txt ~/home.txt");
        assert_eq!(seen, "one\none\n");
        k.exec_ok("rm fork --yes");
    });
    steps.run(
        "removed checkpoints' layers are merged at the next start",
        || {
            // Both are read through (first by auto-1 and auto-2, auto-2 by
            // nothing since the last rollback) while the VM runs.
            k.exec_ok("checkpoint rm keep first");
            k.exec_ok("checkpoint rm keep auto-2");
            assert!(!data.join("vms/keep/checkpoints/first").exists());
            k.exec_ok("stop keep");
            k.exec_ok("start keep");
            for gone in ["first.qcow2", "auto-2.qcow2"] {
                assert!(
                    !data.join("vms/keep/checkpoints").join(gone).exists(),
                    "{gone}"
                );
            }
            let seen = k.ssh_ok("keep", "cat /workspace/a.txt ~/home.txt ~/new.txt");
            assert_eq!(seen, "two\ntwo\nnew\n");
            let list = k.exec_ok("checkpoints keep");
            let labels: Vec<&str> = list
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().next())
                .collect();
            assert_eq!(labels, ["auto-1"], "{list}");
        },
    );
    steps.run("rename keeps the checkpoints usable", || {
        k.ssh_ok("keep", "echo three > ~/home.txt");
        k.exec_ok("rename keep kept");
        k.exec_ok("rollback kept auto-1 --yes");
        let seen = k.ssh_ok("kept", "cat ~/home.txt");
        assert_eq!(seen, "two\n");
    });
    steps.finish();
}

/// `kill -9` of the daemon inside `checkpoint` and `rollback`: the
/// project is as before or as after, never a mix, and a VM paused for the
/// checkpoint goes on after the restart.
#[test]
fn a_daemon_killed_inside_checkpoint_or_rollback_leaves_before_or_after() {
    use crate::crash_vm::kill_at;
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    let log = tmp.path().join("serve.log");
    k.start_serve_logged(&log);
    let data = tmp.path().join("kennel-data");
    let cks = data.join("vms/ck/checkpoints");
    k.exec_ok("new project ck --stack base --cpus 1 --memory 512M --disk 2G");
    let write = |k: &Kennel, v: &str| {
        k.ssh_ok(
            "ck",
            &format!("echo {v} > /workspace/f.txt && echo {v} > ~/f.txt && sync"),
        );
    };
    let seen = |k: &Kennel| k.ssh_ok("ck", "cat /workspace/f.txt ~/f.txt");
    let listed = |k: &Kennel| k.exec_ok("checkpoints ck");
    write(&k, "a");

    let mut steps =
        Steps::new("a_daemon_killed_inside_checkpoint_or_rollback_leaves_before_or_after");
    for (point, label) in [
        ("checkpoint-switched", "k1"),
        ("checkpoint-files", "k2"),
        ("checkpoint-taken", "k3"),
    ] {
        steps.run(&format!("checkpoint killed at {point}"), || {
            kill_at(&mut k, &log, point, &format!("checkpoint ck {label}"));
            // The paused VM went on; the checkpoint was never taken.
            assert_eq!(seen(&k), "a\na\n", "{point}");
            assert!(!listed(&k).contains(label), "{point}");
            // Its files go before the next boot; the disk is whole.
            k.exec_ok("stop ck");
            k.exec_ok("start ck");
            assert_eq!(seen(&k), "a\na\n", "{point}");
            let left = other_disk_files(&data.join("vms/ck"));
            assert!(left.is_empty(), "{point}: {left:?}");
            assert!(!cks.join(label).exists(), "{point}");
            assert!(!cks.join(format!("{label}.qcow2")).exists(), "{point}");
            // The label is free again.
            k.exec_ok(&format!("checkpoint ck {label}"));
            k.exec_ok(&format!("checkpoint rm ck {label}"));
        });
    }
    steps.run("a checkpoint to roll back to", || {
        k.exec_ok("checkpoint ck good");
        write(&k, "b");
    });
    for (point, after) in [
        ("rollback", false),
        ("rollback-journal", true),
        ("rollback-disk", true),
        ("rollback-source", true),
    ] {
        steps.run(&format!("rollback killed at {point}"), || {
            kill_at(&mut k, &log, point, "rollback ck good --yes");
            // Stopped for the rollback; the next start finishes it, or
            // finds it never began.
            k.exec_ok("start ck");
            let want = if after { "a\na\n" } else { "b\nb\n" };
            assert_eq!(seen(&k), want, "{point}");
            assert!(!data.join("vms/ck/rollback.json").exists(), "{point}");
            let projects = data.join("projects");
            assert!(!projects.join("ck.kennel-rollback").exists(), "{point}");
            assert!(!projects.join("ck.kennel-replaced").exists(), "{point}");
            write(&k, "b");
        });
    }
    steps.run("the restarts said what they did", || {
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(
            logged.contains("resumed a VM that a restart left paused"),
            "the log says so"
        );
    });
    steps.finish();
}
