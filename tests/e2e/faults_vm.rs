//! Faults and attacks on a real daemon with real guests (QEMU/TCG):
//! links a guest or a host user plants on the way to a host path, a daemon
//! killed (`kill -9`) mid-boot and mid-image-build, a VMM killed under a
//! running project, credentials in a git URL, a refused purge.
//! `vm-tests` feature; needs what tests/e2e/vm.rs needs.
#![cfg(feature = "vm-tests")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::BufRead;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{vm_running, Kennel, Steps};

const SMALL: &str = "--stack base --cpus 1 --memory 512M --disk 2G";

fn refused(k: &Kennel, line: &str, want: &str) {
    let out = k.exec(line);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "`{line}` should be refused: {text}");
    assert!(text.contains(want), "`{line}`: expected {want:?} in {text}");
}

/// `projects --json` as (name, state, note) rows.
fn projects(k: &Kennel) -> Vec<(String, String, Option<String>)> {
    let v: serde_json::Value = serde_json::from_str(k.exec_ok("--json projects").trim()).unwrap();
    v["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["state"].as_str().unwrap().to_owned(),
                p["state_note"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

fn gateway_ssh(k: &Kennel, key: &Path, target: &str, command: &str) -> std::process::Output {
    kennel_testkit::ssh::client(k.ssh_port, key, "ERROR")
        .arg(target)
        .arg(command)
        .output()
        .unwrap()
}

/// Every host path Kennel acts on for a user is reached without following
/// links: ones a guest writes into its own source, ones made on the host,
/// and ones swapped in after a project was created (at its next use).
#[test]
fn host_paths_never_follow_links() {
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    k.start_serve();
    let root = tmp.path().join("kennel-data/projects");
    let secret = tmp.path().join("host-secret");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("keep.txt"), "mine").unwrap();

    k.exec_ok(&format!("new project p {SMALL}"));
    // A link made inside the guest lands in the host-side source.
    k.ssh_ok("p", &format!("ln -s {} /workspace/evil", secret.display()));
    assert!(std::fs::symlink_metadata(root.join("p/evil"))
        .unwrap()
        .file_type()
        .is_symlink());
    refused(
        &k,
        &format!(
            "new project evil --path {}/p/evil/.ssh {SMALL}",
            root.display()
        ),
        "inside the source of project 'p'",
    );
    // Links made on the host, on the way or at the end.
    std::os::unix::fs::symlink(&secret, root.join("hostlink")).unwrap();
    refused(
        &k,
        &format!("new project h1 --path hostlink/.ssh {SMALL}"),
        "symbolic link",
    );
    refused(
        &k,
        &format!("new project h2 --path hostlink --adopt {SMALL}"),
        "symbolic link",
    );
    // cp to a name whose directory is a link.
    std::os::unix::fs::symlink(&secret, root.join("q")).unwrap();
    refused(&k, "cp p q", "symbolic link");
    assert!(!secret.join(".ssh").exists(), "nothing was made outside");
    assert_eq!(std::fs::read_dir(&secret).unwrap().count(), 1);

    let mut steps = Steps::new("host_paths_never_follow_links");

    // Swapped in after the check: the source becomes a link while stopped;
    // the next start refuses to share it, and no virtiofsd serves it.
    steps.run("Swapped in after the check", || {
        k.exec_ok("stop p");
        std::fs::rename(root.join("p"), tmp.path().join("p-real")).unwrap();
        std::os::unix::fs::symlink(&secret, root.join("p")).unwrap();
        refused(&k, "start p", "symbolic link");
        let serving = Command::new("pgrep")
            .args(["-f", &format!("virtiofsd.*{}", secret.display())])
            .output()
            .unwrap();
        assert!(
            !serving.status.success(),
            "virtiofsd shares the link's target"
        );
        // A purge through the link is refused before anything changes.
        k.exec_ok("rm p --purge --yes");
        refused(&k, "yes", "nothing was changed");
        let rows = projects(&k);
        assert!(
            rows.iter().any(|(n, s, _)| n == "p" && s != "destroying"),
            "{rows:?}"
        );
        assert!(secret.join("keep.txt").exists());
        // Put back, it starts again with its files.
        std::fs::remove_file(root.join("p")).unwrap();
        std::fs::rename(tmp.path().join("p-real"), root.join("p")).unwrap();
        k.exec_ok("start p");
        assert!(k.ssh_ok("p", "ls -la /workspace").contains("evil"));
    });
    steps.finish();
}

/// `kill -9` of the daemon while a VM boots, then of a VMM under a running
/// project: nothing is left half made, what is shown running can be
/// entered, and a dead VM is shown stopped and comes back with `start`.
#[test]
fn a_daemon_killed_mid_boot_and_a_killed_vmm_leave_the_truth() {
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    let log = tmp.path().join("serve.log");
    k.start_serve_logged(&log);
    let (key, public) = kennel_testkit::ssh::keygen(tmp.path(), "me");
    k.exec_ok(&format!("key add \"{public}\""));
    k.exec_ok(&format!("new project r {SMALL}"));
    k.ssh_ok("r", "echo kept > /workspace/kept.txt");

    let mut steps = Steps::new("a_daemon_killed_mid_boot_and_a_killed_vmm_leave_the_truth");

    // Credentials in a git URL: refused, and never written anywhere.
    steps.run(
        "Credentials in a git URL: refused, and never written anywhere",
        || {
            let out = k.exec("new project x --git https://user:s3cr3tpw@127.0.0.1:9/repo.git");
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!out.status.success());
            assert!(
                said.contains("secret set git-token") && !said.contains("s3cr3tpw"),
                "{said}"
            );
        },
    );

    // Killed after "booting": the create is rolled back at restart.
    steps.run(
        "Killed after \"booting\": the create is rolled back at restart",
        || {
            let mut child = k.exec_spawn(&format!("new project kb {SMALL}"));
            let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
            let mut seen = Vec::new();
            for line in stderr.lines() {
                let line = line.unwrap();
                seen.push(line.clone());
                if line.contains("booting") {
                    break;
                }
            }
            assert!(seen.iter().any(|l| l.contains("booting")), "{seen:?}");
            k.kill_serve("-KILL");
            let _ = child.wait();
            k.start_serve_logged(&log);
            let rows = projects(&k);
            assert!(!rows.iter().any(|(n, ..)| n == "kb"), "{rows:?}");
            assert!(!vm_running(&k, "kb"), "no VM left of the cut-off create");
            assert!(
                tmp.path().join("kennel-data/projects/kb").exists(),
                "the source is kept"
            );
            assert!(!tmp.path().join("kennel-data/vms/kb").exists());
            // The adopted VM is running and can be entered through the gateway.
            assert!(
                rows.iter().any(|(n, s, _)| n == "r" && s == "running"),
                "{rows:?}"
            );
            let out = gateway_ssh(&k, &key, "r@127.0.0.1", "cat /workspace/kept.txt");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "kept\n",
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        },
    );

    // The VMM killed under the running project: shown stopped, saying why.
    steps.run("The VMM killed under the running project", || {
        let pid = std::fs::read_to_string(tmp.path().join("kennel-data/vms/r/vmm.pid")).unwrap();
        assert!(Command::new("kill")
            .args(["-KILL", pid.trim()])
            .status()
            .unwrap()
            .success());
        let t = Instant::now();
        let noticed = loop {
            let rows = projects(&k);
            let r = rows.into_iter().find(|(n, ..)| n == "r").unwrap();
            if r.1 == "stopped" || t.elapsed() > Duration::from_secs(120) {
                break r;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        assert_eq!(noticed.1, "stopped", "{noticed:?}");
        assert!(noticed.2.unwrap().contains("exited unexpectedly"));
        // start brings it back, disk and source intact.
        k.exec_ok("start r");
        assert_eq!(k.ssh_ok("r", "cat /workspace/kept.txt"), "kept\n");
    });

    // The log never carried the password.
    steps.run("The log never carried the password", || {
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(!logged.contains("s3cr3tpw"));
        for f in ["kennel.db", "kennel.db-wal"] {
            let bytes = std::fs::read(tmp.path().join("kennel-data").join(f)).unwrap_or_default();
            assert!(
                !bytes.windows(8).any(|w| w == b"s3cr3tpw"),
                "the password is in {f}"
            );
        }
    });
    steps.finish();
}

/// The first project on an empty image store builds the kernel and its
/// image, showing the build as progress; `kill -9` of the daemon during
/// the build ends the build too, and the restarted daemon removes its
/// mounts and half-made image.
#[test]
fn a_daemon_killed_during_an_image_build_leaves_no_mounts_or_half_image() {
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::with_images(tmp.path(), false);
    let log = tmp.path().join("serve.log");
    k.start_serve_logged(&log);
    let images = tmp.path().join("kennel-data/images");
    let mut child = k.exec_spawn(&format!("new project ib {SMALL}"));
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut building = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        if line.contains("building the base image") {
            building.push(line.clone());
        }
        // mmdebstrap has mounted /proc, /sys and /dev/pts in its chroot.
        if line.contains("installing essential packages") {
            break;
        }
    }
    assert!(
        building.len() >= 3,
        "the build is shown as it goes: {building:#?}"
    );
    assert!(
        building.iter().all(|l| l.contains("s)")),
        "with the time so far: {building:#?}"
    );
    k.kill_serve("-KILL");
    let _ = child.wait();
    // The build dies with the daemon (its parent-death signal).
    let t = Instant::now();
    let needle = format!("{}/.tmp-", images.display());
    while Command::new("pgrep")
        .args(["-f", &needle])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
    {
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "the image build outlived the daemon"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    k.start_serve_logged(&log);
    let left: Vec<_> = std::fs::read_dir(&images)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-") || n.starts_with("base-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&needle), "mounts are left under {needle}");
    let logged = std::fs::read_to_string(&log).unwrap();
    for l in logged
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
    {
        eprintln!("serve: {l}");
    }
    assert!(logged.contains("create was cut off"), "{logged}");
    assert!(
        logged.contains("removed what an interrupted image build left"),
        "{logged}"
    );
    assert!(projects(&k).is_empty());
}

/// A data directory lost and restored from `kennel backup` (taken while
/// the daemon ran): the project is back in the store with its keys, and
/// `start` builds it a new VM over the source, which was never touched.
#[test]
fn a_restored_data_dir_gets_its_projects_back_and_start_rebuilds_the_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    k.start_serve();
    k.exec_ok(&format!("new project kept {SMALL}"));
    let data = tmp.path().join("kennel-data");
    let src = data.join("projects/kept");
    std::fs::write(src.join("notes.txt"), "mine\n").unwrap();
    let bk = tmp.path().join("backup");
    let out = k.cmd().arg("backup").arg(&bk).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 projects"),
        "{out:?}"
    );
    k.exec_ok("stop kept");
    k.kill_serve("-TERM");
    // The data directory is lost; the projects root (the operator's own
    // backup) and the shared image cache are put back.
    let lost = tmp.path().join("lost");
    std::fs::rename(&data, &lost).unwrap();
    std::fs::create_dir_all(data.join("projects")).unwrap();
    std::fs::rename(lost.join("projects/kept"), &src).unwrap();
    std::os::unix::fs::symlink(
        std::fs::read_link(lost.join("images")).unwrap(),
        data.join("images"),
    )
    .unwrap();
    let out = k.cmd().arg("restore").arg(&bk).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    k.start_serve();
    let (state, _) = k.state("kept");
    assert_eq!(state, "stopped");
    let out = k.exec_ok("start kept");
    assert!(out.contains("kept"), "{out}");
    assert_eq!(k.ssh_ok("kept", "cat /workspace/notes.txt"), "mine\n");
    assert!(vm_running(&k, "kept"));
    std::fs::remove_dir_all(&lost).ok();
}

/// The guest is untrusted: virtiofsd runs sandboxed (its own mount
/// namespace, its root the project's source), so neither `..` at the top
/// of /workspace, links a guest or a host user plants (absolute or
/// relative), nor /proc tricks in the guest reach a host file outside the
/// source.
#[test]
fn the_guest_cannot_reach_outside_its_source_through_virtiofs() {
    let tmp = tempfile::tempdir().unwrap();
    let k = Kennel::new(tmp.path());
    k.exec_ok(&format!("new project jail {SMALL}"));
    let src = tmp.path().join("kennel-data/projects/jail");
    let secret = tmp.path().join("host-secret.txt");
    std::fs::write(&secret, "HOST SECRET\n").unwrap();
    std::os::unix::fs::symlink(&secret, src.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../../../host-secret.txt", src.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/", src.join("root-link")).unwrap();
    let script = "
        cat /workspace/abs-link /workspace/rel-link /workspace/root-link/host-secret.txt 2>/dev/null
        cat /workspace/../host-secret.txt /workspace/../../host-secret.txt 2>/dev/null
        ln -s /proc/self/root/ /workspace/proc-root; cat /workspace/proc-root/../host-secret.txt 2>/dev/null
        cd /workspace && cat ../../../../host-secret.txt 2>/dev/null
        [ \"$(stat -c %d:%i /workspace/..)\" = \"$(stat -c %d:%i /)\" ] && echo parent-is-guest-root
        echo done";
    let out = k.ssh_ok("jail", script);
    assert!(
        !out.contains("HOST SECRET"),
        "a host file leaked into the guest: {out}"
    );
    assert!(
        out.contains("parent-is-guest-root") && out.ends_with("done\n"),
        "{out}"
    );
    // On the host: virtiofsd's root is the source itself.
    let pid: u32 = std::fs::read_to_string(tmp.path().join("kennel-data/vms/jail/virtiofsd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let seen: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        seen.iter().any(|n| n == "abs-link"),
        "virtiofsd's / is the source: {seen:?}"
    );
    assert!(
        !seen.iter().any(|n| n == "etc" || n == "usr"),
        "virtiofsd sees the host's /: {seen:?}"
    );
    let mine = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_ne!(
        mine, theirs,
        "virtiofsd runs in a mount namespace of its own"
    );
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "HOST SECRET\n");
    k.exec_ok("rm jail --yes");
}

/// virtiofsd killed under a running project: `status` says the share is
/// gone and how to heal it, and `restart` does, with the source intact.
#[test]
fn a_killed_virtiofsd_is_reported_and_restart_heals_it() {
    let tmp = tempfile::tempdir().unwrap();
    let k = Kennel::new(tmp.path());
    k.exec_ok(&format!("new project share {SMALL}"));
    let src = tmp.path().join("kennel-data/projects/share");
    std::fs::write(src.join("kept.txt"), "kept\n").unwrap();
    let pid = std::fs::read_to_string(tmp.path().join("kennel-data/vms/share/virtiofsd.pid"))
        .unwrap()
        .trim()
        .to_owned();
    assert!(Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap()
        .success());
    let t = Instant::now();
    loop {
        let st = k.exec_ok("status share");
        if st.contains("the /workspace share (virtiofsd) has stopped") {
            assert!(st.contains("'restart share' brings it back"), "{st}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "status never said so: {st}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    k.exec_ok("restart share");
    assert!(!k.exec_ok("status share").contains("has stopped"));
    assert_eq!(k.ssh_ok("share", "cat /workspace/kept.txt"), "kept\n");
    k.exec_ok("rm share --yes");
}

/// Every VMM, virtiofsd and the daemon gone at once, as after a host
/// restart.
fn host_restart(k: &mut Kennel) {
    k.kill_serve("-KILL");
    let vms = k.dir.join("kennel-data/vms");
    for e in std::fs::read_dir(&vms).unwrap().filter_map(Result::ok) {
        for f in ["vmm.pid", "virtiofsd.pid"] {
            if let Ok(pid) = std::fs::read_to_string(e.path().join(f)) {
                let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
}

/// After a host restart every project shows stopped and starts cleanly;
/// with `vm.autostart` those that were running start again by themselves,
/// and those that were stopped stay stopped.
#[test]
fn after_a_host_restart_projects_are_stopped_or_autostarted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    k.start_serve();
    k.exec_ok(&format!("new project up {SMALL}"));
    k.exec_ok(&format!("new project down {SMALL}"));
    k.exec_ok("stop down");
    host_restart(&mut k);
    k.start_serve();
    assert_eq!(k.state("up").0, "stopped");
    assert_eq!(k.state("down").0, "stopped");
    assert!(!vm_running(&k, "up"));
    k.exec_ok("start up");
    assert!(k
        .ssh_ok("up", "mountpoint -q /workspace && echo ok")
        .contains("ok"));
    host_restart(&mut k);
    k.env.push(("KENNEL_VM__AUTOSTART".into(), "true".into()));
    k.start_serve();
    k.wait_state("up", "running", Duration::from_secs(300));
    assert!(k
        .ssh_ok("up", "mountpoint -q /workspace && echo ok")
        .contains("ok"));
    assert_eq!(
        k.state("down").0,
        "stopped",
        "a stopped project stays stopped"
    );
    assert!(!vm_running(&k, "down"));
}
