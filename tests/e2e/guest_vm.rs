//! The box people work in, on a real guest (QEMU/TCG): systemd is PID 1
//! and the system is running; `systemd-run` starts a unit; Docker works
//! with no registry (an image imported from the guest's own files, `docker
//! run`, a two-service `docker compose up` whose published port answers
//! through the HTTPS gateway); a devcontainer.json's `dockerComposeFile`
//! brings its other service up at boot; a stop goes through systemd, and
//! with the virtio-fs share killed first the guest still powers itself off.
//!
//! Needs what `tests/e2e/vm.rs` needs. `vm-tests` feature.
#![cfg(feature = "vm-tests")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::{curl, Kennel, Steps};

/// Units that may fail in a Kennel VM here, each with why. Anything else
/// failed makes the system "degraded" and the test fail.
const MAY_FAIL: &[(&str, &str)] = &[];

/// A devcontainer.json whose other service Compose starts; `app` is the VM.
const DEVCONTAINER: &str = r#"{
  // The VM is "app"; "cache" runs in Docker beside it.
  "name": "box",
  "dockerComposeFile": "compose.yaml",
  "service": "app",
}"#;

const DEVCONTAINER_COMPOSE: &str = r#"services:
  app:
    image: kennel-test/bb
    command: ["/bin/busybox", "sleep", "infinity"]
  cache:
    image: kennel-test/bb
    command: ["/bin/busybox", "sh", "-c", "mkdir -p /www && echo cache up > /www/index.html && exec /bin/busybox httpd -f -p 8000 -h /www"]
    ports: ["8082:8000"]
"#;

/// Two services: `web` serves what it fetched from `api` over Compose's
/// network, on a published port.
const COMPOSE: &str = r#"services:
  api:
    image: kennel-test/bb
    command: ["/bin/busybox", "sh", "-c", "mkdir -p /www && echo api says hi > /www/index.html && exec /bin/busybox httpd -f -p 8000 -h /www"]
  web:
    image: kennel-test/bb
    depends_on: [api]
    command: ["/bin/busybox", "sh", "-c", "mkdir -p /www && until /bin/busybox wget -q -O /www/index.html http://api:8000/; do sleep 0.5; done && exec /bin/busybox httpd -f -p 8000 -h /www"]
    ports: ["8081:8000"]
"#;

/// Makes the image `kennel-test/bb` with no registry: the guest's busybox
/// (with a link per applet) and the libraries it links, imported as a
/// root filesystem.
const IMPORT: &str = "set -e; rm -rf /tmp/bb; mkdir -p /tmp/bb/bin; cp /usr/bin/busybox /tmp/bb/bin/; \
for a in $(/usr/bin/busybox --list); do [ \"$a\" = busybox ] || ln -s busybox /tmp/bb/bin/$a; done; \
for l in $(ldd /usr/bin/busybox | grep -o '/[^ ]*'); do cp --parents \"$l\" /tmp/bb/; done; \
tar -C /tmp/bb -c . | docker import - kennel-test/bb >/dev/null; docker image ls --format '{{.Repository}}' kennel-test/bb";

/// The project's own agent: a script given the task as its one argument,
/// which asks the LLM (Kennel's gateway, through the environment every
/// SDK reads) what to write and edits the source with the answer.
const AGENT: &str = r#"#!/bin/sh
set -eu
echo "agent: task is $1"
answer=$(curl -sS --fail -m 60 "$OPENAI_BASE_URL/chat/completions" \
  -H "authorization: Bearer $OPENAI_API_KEY" -H 'content-type: application/json' \
  -d "{\"model\":\"kennel-test\",\"messages\":[{\"role\":\"user\",\"content\":\"$1\"}]}")
printf '%s\n' "$answer" | sed -n 's/.*"content":"\([^"]*\)".*/\1/p' > agent-note.txt
echo "agent: wrote agent-note.txt"
"#;

/// The owner's own LLM key in the test: it reaches the upstream and
/// nothing in the VM.
const OWNER_KEY: &str = "sk-kennel-test-owner-0451";

/// Retries `f` until it returns `Some`, for up to `limit`.
fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Arms a unit whose stop (only systemd stops it: at shutdown) writes
/// `mark` on the console.
fn arm_stop_mark(k: &Kennel, project: &str, mark: &str) {
    k.ssh_ok(
        project,
        &format!(
            "sudo systemd-run --quiet --unit=kennel-test-stop-mark -p RemainAfterExit=yes \
             -p 'ExecStop=/bin/sh -c \"echo {mark} > /dev/console\"' /bin/true"
        ),
    );
}

fn console(dir: &Path, project: &str) -> String {
    std::fs::read_to_string(dir.join(format!("kennel-data/vms/{project}/console.log")))
        .unwrap_or_default()
}

#[test]
fn systemd_docker_and_compose_in_a_real_guest() {
    kennel_testkit::require("curl", "curl");
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    let llm = crate::support::llm_upstream();
    k.env.push((
        "KENNEL_LLM__OPENAI_URL".into(),
        format!("http://127.0.0.1:{}/v1", llm.port),
    ));
    k.start_serve();
    let src = tmp.path().join("kennel-data/projects/box");
    std::fs::create_dir_all(src.join(".devcontainer")).unwrap();
    std::fs::create_dir_all(src.join("two")).unwrap();
    std::fs::write(src.join(".devcontainer/devcontainer.json"), DEVCONTAINER).unwrap();
    std::fs::write(src.join(".devcontainer/compose.yaml"), DEVCONTAINER_COMPOSE).unwrap();
    std::fs::write(src.join("two/compose.yaml"), COMPOSE).unwrap();
    std::fs::create_dir_all(src.join(".kennel")).unwrap();
    std::fs::write(src.join(".kennel/agent"), AGENT).unwrap();
    std::fs::set_permissions(
        src.join(".kennel/agent"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // The source is a host user's, so `dev` (renumbered to that user) may
    // write in it.
    let chown = std::process::Command::new("chown")
        .args(["-hR", "4242:4242"])
        .arg(&src)
        .status()
        .unwrap();
    assert!(chown.success());
    let mut steps = Steps::new("systemd_docker_and_compose_in_a_real_guest");

    steps.run(
        "new project with a devcontainer.json naming a Compose file",
        || {
            let out =
                k.exec_ok("new project box --adopt --stack base --cpus 2 --memory 1G --disk 4G");
            assert!(
                out.contains("Compose services from .devcontainer/compose.yaml"),
                "{out}"
            );
        },
    );

    steps.run("systemd is PID 1 and the system is running", || {
        assert_eq!(k.ssh_ok("box", "cat /proc/1/comm").trim(), "systemd");
        let state = k.ssh_ok("box", "systemctl is-system-running --wait || true");
        let failed = k.ssh_ok(
            "box",
            "systemctl list-units --failed --plain --no-legend || true",
        );
        eprintln!(
            "is-system-running: {}\nfailed units:\n{failed}\nslowest units:\n{}",
            state.trim(),
            k.ssh_ok(
                "box",
                "systemd-analyze blame --no-pager | head -n 12; systemd-analyze --no-pager || true"
            )
        );
        for line in failed.lines().filter(|l| !l.trim().is_empty()) {
            let unit = line.split_whitespace().next().unwrap_or_default();
            assert!(
                MAY_FAIL.iter().any(|(u, _)| *u == unit),
                "unit {unit} failed: {line}"
            );
        }
        assert!(
            state.trim() == "running" || (state.trim() == "degraded" && !failed.trim().is_empty()),
            "{state}"
        );
        // Kennel's own steps are units like any other.
        let init = k.ssh_ok(
            "box",
            "systemctl is-active kennel-init.service kennel-ready.service ssh.service",
        );
        assert_eq!(
            init.split_whitespace().collect::<Vec<_>>(),
            ["active"; 3],
            "{init}"
        );
    });

    steps.run("systemd-run starts a unit; journalctl reads it", || {
        k.ssh_ok("box", "sudo systemd-run --quiet --unit=kennel-test-sleeper sh -c 'echo sleeper started; exec sleep 600'");
        let state = eventually(Duration::from_secs(90), "the unit is active", || {
            let s = k.ssh_ok("box", "systemctl is-active kennel-test-sleeper || true");
            (s.trim() == "active").then_some(s)
        });
        assert_eq!(state.trim(), "active");
        eventually(Duration::from_secs(90), "its output in the journal", || {
            // `dev` reads the system journal without sudo (adm,
            // systemd-journal), as on a machine of one's own.
            k.ssh_ok("box", "journalctl -u kennel-test-sleeper --no-pager -o cat || true")
                .contains("sleeper started")
                .then_some(())
        });
        // Docker waits on its socket: it starts when first used (here by
        // the devcontainer's Compose step), not at boot.
        let enabled = k.ssh_ok(
            "box",
            "systemctl is-enabled docker.socket docker.service containerd.service || true",
        );
        assert_eq!(
            enabled.split_whitespace().collect::<Vec<_>>(),
            ["enabled", "disabled", "disabled"],
            "{enabled}"
        );
    });

    steps.run(
        "the LLM gateway from inside the VM: the owner's key upstream, never in the VM",
        || {
            k.exec_ok(&format!("secret set openai-api-key {OWNER_KEY}"));
            // The VM's link to the metadata service comes up within
            // seconds of the VM running.
            let me = eventually(Duration::from_secs(90), "/kennel/v1/me answers", || {
                let out = k.ssh("box", "curl -sS -m 20 http://metadata.kennel.internal/kennel/v1/me");
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.contains("\"project\"").then_some(text)
            });
            let me: serde_json::Value = serde_json::from_str(me.trim()).unwrap();
            assert_eq!(me["project"], "box", "{me}");
            let out = k.ssh_ok(
                "box",
                r#"curl -sS --fail -m 60 "$OPENAI_BASE_URL/chat/completions" -H "authorization: Bearer $OPENAI_API_KEY" -H 'content-type: application/json' -d '{"model":"m","messages":[{"role":"user","content":"hello gateway"}]}'"#,
            );
            let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
            assert_eq!(v["choices"][0]["message"]["content"], "HELLO GATEWAY", "{v}");
            // Upstream: the owner's key, not the guest's placeholder.
            let seen = llm.seen.lock().unwrap().clone();
            let last = seen.last().unwrap().to_ascii_lowercase();
            assert!(
                last.contains(&format!("authorization: bearer {OWNER_KEY}")),
                "{last}"
            );
            assert!(!last.contains("kennel-metadata"), "{last}");
            // And the key is nowhere in the VM: not in a session's
            // environment, a service's, or a file Kennel could have put
            // it in.
            let found = k.ssh_ok(
                "box",
                &format!(
                    "(env; sudo cat /proc/1/environ; sudo grep -rl {OWNER_KEY} /etc /home /run /workspace /tmp 2>/dev/null) | grep -c {OWNER_KEY} || true"
                ),
            );
            assert_eq!(found.trim(), "0", "{found}");
            let usage = k.exec_ok("llm usage");
            assert!(usage.contains("1 requests, 30 tokens"), "{usage}");
        },
    );

    steps.run(
        "an agent run: checkpoint, the project's .kennel/agent through the LLM gateway, the summary, rollback",
        || {
            let out = k.exec_ok("agent box write the note");
            assert!(out.contains("agent: task is write the note"), "{out}");
            assert!(out.contains("Agent .kennel/agent in box finished"), "{out}");
            assert!(out.contains("; 30 LLM tokens."), "{out}");
            assert!(out.contains("rollback box agent-1"), "{out}");
            // The file the agent wrote, from the LLM's answer, is in the
            // source on the host.
            let note = std::fs::read_to_string(src.join("agent-note.txt")).unwrap();
            assert_eq!(note.trim(), "WRITE THE NOTE");
            let runs = k.exec_ok("agents box");
            assert!(
                runs.contains("write the note") && runs.contains("agent-1"),
                "{runs}"
            );
            // Undo it: the source is as it was before the run.
            k.exec_ok("rollback box agent-1 --yes");
            assert!(!src.join("agent-note.txt").exists());
            assert!(src.join(".kennel/agent").exists());
            k.wait_state("box", "running", Duration::from_secs(300));
        },
    );

    steps.run("docker with no registry: import, run", || {
        // This boot's attempt at devcontainer.json's Compose services had
        // no image: it is logged, and the VM came up all the same. The
        // unit runs after the VM is ready (the rollback restarted it), so
        // wait for it to have run before the image exists: active (it
        // remains so after its run) or failed; inactive is not started
        // yet. As root: systemctl then reaches systemd without D-Bus,
        // which may not be up yet either.
        eventually(
            Duration::from_secs(300),
            "the boot's compose attempt ends",
            || {
                let state = k.ssh_ok(
                    "box",
                    "sudo systemctl show -p ActiveState --value kennel-devcontainer.service 2>&1 || true",
                );
                matches!(state.trim(), "active" | "failed").then_some(())
            },
        );
        let status = k.ssh_ok("box", "cat /var/log/kennel/compose.status");
        assert_ne!(
            status.trim(),
            "0",
            "{}",
            k.ssh_ok("box", "cat /var/log/kennel/compose.log")
        );
        let out = k.ssh_ok("box", IMPORT);
        assert_eq!(out.trim(), "kennel-test/bb", "{out}");
        let out = k.ssh_ok(
            "box",
            "docker run --rm kennel-test/bb /bin/busybox echo hello from a container",
        );
        assert_eq!(out.trim(), "hello from a container");
        let v = k.ssh_ok("box", "docker compose version");
        assert!(v.contains(" 2.") || v.contains(" v2."), "{v}");
    });

    steps.run(
        "docker compose: two services, the published port through the HTTPS gateway",
        || {
            k.ssh_ok(
                "box",
                "cd /workspace/two && docker compose up --detach --quiet-pull 2>&1",
            );
            k.exec_ok("port box 8081");
            k.exec_ok("public box");
            let body = eventually(Duration::from_secs(240), "the compose app answers", || {
                let (code, body) = curl(&k, "box.localhost", "/", &[]);
                code.starts_with("200").then_some(body)
            });
            assert_eq!(body.trim(), "api says hi");
        },
    );

    steps.run(
        "devcontainer.json's Compose service comes up at boot; the VM's own does not",
        || {
            k.exec_ok("restart box");
            // Docker starts on first use after the boot; on a loaded host
            // under TCG that and Compose take minutes.
            let ps = eventually(Duration::from_secs(300), "the cache service runs", || {
                let ps = k.ssh_ok("box", "docker ps --format '{{.Names}}' 2>/dev/null || true");
                ps.contains("cache").then_some(ps)
            });
            assert!(!ps.contains("app"), "the primary service is the VM: {ps}");
            let log = k.ssh_ok(
                "box",
                "cat /var/log/kennel/compose.status /var/log/kennel/compose.log",
            );
            assert!(log.starts_with('0'), "{log}");
            let body = eventually(Duration::from_secs(180), "the cache answers", || {
                let b = k.ssh_ok("box", "curl -s localhost:8082/ || true");
                b.contains("cache up").then_some(b)
            });
            assert_eq!(body.trim(), "cache up");
        },
    );

    steps.run("a stop goes through systemd", || {
        arm_stop_mark(&k, "box", "kennel-test-stopped-by-systemd");
        k.exec_ok("stop box");
        let c = console(tmp.path(), "box");
        assert!(
            c.contains("kennel-test-stopped-by-systemd"),
            "{}",
            &c[c.len().saturating_sub(2000)..]
        );
        assert!(
            c.contains("reboot: Power down"),
            "the guest powered itself off"
        );
    });

    steps.run(
        "with virtiofsd killed first, the shutdown still completes",
        || {
            k.exec_ok("start box");
            let before = console(tmp.path(), "box")
                .matches("reboot: Power down")
                .count();
            let pid = std::fs::read_to_string(tmp.path().join("kennel-data/vms/box/virtiofsd.pid"))
                .unwrap()
                .trim()
                .to_owned();
            assert!(std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .status()
                .unwrap()
                .success());
            k.exec_ok("stop box");
            let c = console(tmp.path(), "box");
            // Releasing a share whose daemon is gone would wait forever:
            // the guest flushes its root and powers off at once instead.
            assert!(
                c.contains("kennel-shutdown: /workspace does not answer"),
                "{}",
                &c[c.len().saturating_sub(2000)..]
            );
            assert_eq!(
                c.matches("reboot: Power down").count(),
                before + 1,
                "the guest powered itself off rather than being killed: {}",
                &c[c.len().saturating_sub(2000)..]
            );
            k.exec_ok("start box");
            assert_eq!(k.ssh_ok("box", "cat /proc/1/comm").trim(), "systemd");
        },
    );

    k.exec_ok("rm box --yes");
    k.kill_serve("-TERM");
    steps.finish();
}
