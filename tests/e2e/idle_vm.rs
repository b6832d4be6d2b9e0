//! Idle stop on real guests (QEMU/TCG), with a 20 s limit: a VM nobody
//! uses stops by itself and `ssh p@HOST true` wakes it; an open session
//! keeps it up past the limit; fifty parallel connections to a stopped
//! project start it once; a CPU-busy guest with nobody connected is not
//! stopped; a daemon restart (even after a long time down) stops nothing
//! early.
//! `vm-tests` feature; needs what tests/e2e/vm.rs needs.
#![cfg(feature = "vm-tests")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::{Duration, Instant};

use crate::support::{Kennel, Steps};

const LIMIT: Duration = Duration::from_secs(20);
/// The limit, plus the supervisor's look (5 s), plus a clean shutdown.
const STOPS_WITHIN: Duration = Duration::from_secs(90);

fn project(k: &Kennel, name: &str) {
    k.exec_ok(&format!(
        "new project {name} --stack base --cpus 1 --memory 512M --disk 2G"
    ));
    let out = k.exec_ok(&format!("idle {name} 20s"));
    assert!(out.contains("stops after 20s"), "{out}");
}

#[test]
fn idle_vms_stop_by_themselves_and_wake_on_the_next_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    let log = tmp.path().join("serve.log");
    k.start_serve_logged(&log);
    let key = k.admin_key("me");
    project(&k, "nap");

    let mut steps = Steps::new("idle_vms_stop_by_themselves_and_wake_on_the_next_connection");

    // An open session keeps it up well past the limit.
    steps.run("An open session keeps it up well past the limit", || {
        let session = Instant::now();
        let out = k
            .gateway_ssh(&key, "nap@127.0.0.1", "sleep 35; echo still-here")
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("still-here"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(session.elapsed() > LIMIT + Duration::from_secs(10));
        assert_eq!(k.state("nap").0, "running");
    });

    // Then nobody: it stops by itself, not before the limit, and says why.
    steps.run(
        "Then nobody: it stops by itself, not before the limit",
        || {
            let took = k.wait_state("nap", "stopped", STOPS_WITHIN);
            assert!(
                took >= LIMIT - Duration::from_secs(1),
                "stopped after {took:?}"
            );
            assert_eq!(k.state("nap").1.as_deref(), Some("idle 20s"));
            assert!(!crate::support::vm_running(&k, "nap"), "the VMM is gone");
            let list = k.exec_ok("projects");
            assert!(list.contains("stopped (idle 20s)"), "{list}");
        },
    );

    // `ssh nap@HOST true` wakes it.
    steps.run("`ssh nap@HOST true` wakes it", || {
        let out = k
            .gateway_ssh(&key, "nap@127.0.0.1", "true")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(k.state("nap"), ("running".into(), None));
    });

    // Stopped again, fifty connections at once start it once.
    steps.run(
        "Stopped again, fifty connections at once start it once",
        || {
            k.wait_state("nap", "stopped", STOPS_WITHIN);
            let starts = |log: &std::path::Path| {
                std::fs::read_to_string(log)
                    .unwrap()
                    .matches("starting a stopped VM on entry")
                    .count()
            };
            let before = starts(&log);
            let children: Vec<_> = (0..50)
                .map(|i| {
                    k.gateway_ssh(&key, "nap@127.0.0.1", &format!("echo {i}"))
                        .stdout(std::process::Stdio::piped())
                        .stderr(std::process::Stdio::piped())
                        .spawn()
                        .unwrap()
                })
                .collect();
            let mut failed = Vec::new();
            for (i, c) in children.into_iter().enumerate() {
                let out = c.wait_with_output().unwrap();
                if !out.status.success()
                    || String::from_utf8_lossy(&out.stdout).trim() != i.to_string()
                {
                    failed.push((i, String::from_utf8_lossy(&out.stderr).into_owned()));
                }
            }
            assert!(failed.is_empty(), "{failed:?}");
            assert_eq!(starts(&log) - before, 1, "one boot for fifty connections");
        },
    );
    steps.finish();
}

#[test]
fn a_busy_guest_with_nobody_connected_is_not_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    k.start_serve_logged(&tmp.path().join("serve.log"));
    let key = k.admin_key("me");
    project(&k, "build");
    // A "build" left running under nohup, and nobody connected.
    let out = k
        .gateway_ssh(
            &key,
            "build@127.0.0.1",
            "nohup sh -c 'while :; do :; done' >/dev/null 2>&1 & echo $! > /tmp/busy.pid",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(LIMIT * 2);
    assert_eq!(k.state("build").0, "running", "stopped while busy");
    // The build ends: now it is idle, and stops.
    let out = k
        .gateway_ssh(&key, "build@127.0.0.1", "kill $(cat /tmp/busy.pid)")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    k.wait_state("build", "stopped", STOPS_WITHIN);
}

#[test]
fn a_daemon_restart_stops_nothing_early() {
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    k.start_serve_logged(&tmp.path().join("serve.log"));
    let key = k.admin_key("me");
    project(&k, "keep");
    let out = k
        .gateway_ssh(&key, "keep@127.0.0.1", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last_use = Instant::now();
    // Idle 8 s, then the daemon is down for longer than the rest of the
    // limit: the VM runs on meanwhile, nobody watching it.
    std::thread::sleep(Duration::from_secs(8));
    k.kill_serve("-TERM");
    std::thread::sleep(Duration::from_secs(15));
    assert!(crate::support::vm_running(&k, "keep"));
    k.start_serve_logged(&tmp.path().join("serve.log"));
    let restarted = Instant::now();
    // The new daemon goes on from about 8 s idle: 12 s are left. A timer
    // counting the time it was down (23 s) would stop it at once.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        k.state("keep").0,
        "running",
        "stopped early after a restart"
    );
    let took = k.wait_state("keep", "stopped", STOPS_WITHIN);
    let idle_watched = restarted.elapsed();
    assert!(
        idle_watched >= Duration::from_secs(10),
        "stopped {took:?} after the check, {idle_watched:?} after the restart"
    );
    assert!(last_use.elapsed() > LIMIT);
}
