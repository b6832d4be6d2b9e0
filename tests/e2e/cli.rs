//! `kennel` end to end through the built binary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::{Child, Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::Command;
use predicates::prelude::*;

fn kennel(dir: &std::path::Path) -> Command {
    let mut c = Command::cargo_bin("kennel").unwrap();
    c.current_dir(dir)
        .env_remove("KENNEL_CONFIG")
        .env("HOME", dir);
    c
}

#[test]
fn help_lists_commands() {
    let d = tempfile::tempdir().unwrap();
    kennel(d.path())
        .args(["exec", "help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("new project <name>"))
        .stdout(predicate::str::contains("request-access <ssh-public-key>"));
}

#[test]
fn a_read_only_command_makes_no_data_directory() {
    let d = tempfile::tempdir().unwrap();
    kennel(d.path())
        .args(["exec", "projects"])
        .assert()
        .code(4)
        .stderr(predicate::str::contains("no Kennel daemon answers for"))
        .stderr(predicate::str::contains("--data-dir"));
    assert!(!d.path().join("kennel-data").exists(), "made a data dir");
    // `--json` means JSON, this too: one object with its kind, on stdout.
    let out = kennel(d.path())
        .args(["exec", "--json", "projects"])
        .assert()
        .code(4)
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"]["kind"], "not_found", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--data-dir"),
        "{v}"
    );
    assert!(!d.path().join("kennel-data").exists(), "made a data dir");
    // Help and usage errors need no data, and make none either.
    kennel(d.path())
        .args(["exec", "help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("new project <name>"));
    kennel(d.path()).args(["exec", "prjects"]).assert().code(2);
    assert!(!d.path().join("kennel-data").exists(), "made a data dir");
}

#[test]
fn the_cli_reaches_a_daemon_started_elsewhere_by_its_data_dir() {
    let d = tempfile::tempdir().unwrap();
    let home = d.path().join("srv");
    std::fs::create_dir_all(&home).unwrap();
    let mut serve = StdCommand::new(assert_cmd::cargo::cargo_bin("kennel"))
        .current_dir(&home)
        .env_remove("KENNEL_CONFIG")
        .env("HOME", d.path())
        .env("KENNEL_VM__BACKEND", "none")
        .env("KENNEL_SSH__LISTEN", "127.0.0.1:0")
        .env("KENNEL_HTTPS__LISTEN", "127.0.0.1:0")
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sock = home.join("kennel-data/control.sock");
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let elsewhere = d.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    kennel(&elsewhere)
        .arg("--data-dir")
        .arg(home.join("kennel-data"))
        .args(["exec", "whoami"])
        .assert()
        .success()
        .stdout(predicate::str::contains("admin"));
    kennel(&elsewhere)
        .env("KENNEL_DATA_DIR", home.join("kennel-data"))
        .args(["exec", "projects"])
        .assert()
        .success();
    assert!(!elsewhere.join("kennel-data").exists());
    let _ = StdCommand::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status();
    let _ = serve.wait();
}

#[test]
fn json_projects_on_a_fresh_install() {
    let d = tempfile::tempdir().unwrap();
    // A command that writes makes the data directory.
    kennel(d.path())
        .args([
            "exec",
            "key",
            "add",
            "ssh-ed25519",
            "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
        ])
        .assert()
        .success();
    let out = kennel(d.path())
        .args(["exec", "--json", "projects"])
        .assert()
        .success();
    let v: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["projects"], serde_json::json!([]));
    // `--json` inside the line works too.
    kennel(d.path())
        .args(["exec", "projects", "--json"])
        .assert()
        .success()
        .stdout(predicate::str::starts_with("{"));
    assert!(d.path().join("kennel-data/kennel.db").exists());
}

#[test]
fn exit_codes_follow_the_error_kinds() {
    let d = tempfile::tempdir().unwrap();
    kennel(d.path())
        .args(["exec", "prjects"])
        .assert()
        .code(2)
        .stdout(predicate::str::contains("Did you mean 'projects'"));
    kennel(d.path())
        .args(["exec", "new", "project", "Bad_Name"])
        .assert()
        .code(2)
        .stdout(predicate::str::contains("1 to 40 characters"));
    // A member may not list requests: the first write makes the data
    // dir and the local admin; add a member via a request.
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl bob@laptop";
    kennel(d.path())
        .args(["exec", "key", "add", key, "--user", "admin"])
        .assert()
        .success();
    kennel(d.path())
        .args(["exec", "--as", "nobody", "projects"])
        .assert()
        .code(4)
        .stdout(predicate::str::contains("no user 'nobody'"));
    // With VMs off, VM operations say so plainly, and nothing is recorded.
    kennel(d.path())
        .args(["exec", "new project demo"])
        .env("KENNEL_VM__BACKEND", "none")
        .assert()
        .code(7)
        .stdout(predicate::str::contains(
            "VMs are not available on this host",
        ));
    kennel(d.path())
        .args(["exec", "new project demo --stack cobol"])
        .assert()
        .code(4)
        .stdout(predicate::str::contains("there is no stack 'cobol'"));
    kennel(d.path())
        .args(["exec", "--json", "projects"])
        .assert()
        .success()
        .stdout(predicate::str::contains("\"projects\":[]"));
    kennel(d.path())
        .args(["exec", "--json", "status", "nothere"])
        .assert()
        .code(4)
        .stdout(predicate::str::contains("\"kind\":\"not_found\""));
}

#[test]
fn config_shows_sources_and_rejects_unknown_fields() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("kennel.toml"), "[vm]\ndefault_cpus = 4\n").unwrap();
    kennel(d.path())
        .arg("config")
        .env("KENNEL_SSH__PUBLIC_HOST", "dev.example.org")
        .assert()
        .success()
        .stdout(predicate::str::contains("vm.default_cpus = 4  # TOML file"))
        .stdout(predicate::str::contains(
            "ssh.public_host = \"dev.example.org\"  # `KENNEL_`",
        ))
        .stdout(predicate::str::contains("vm.backend = \"auto\"  # default"));
    std::fs::write(d.path().join("kennel.toml"), "[vm]\ncpu = 4\n").unwrap();
    kennel(d.path())
        .arg("config")
        .assert()
        .code(1)
        .stderr(predicate::str::contains("unknown field"));
}

#[test]
fn doctor_reports_every_check() {
    let d = tempfile::tempdir().unwrap();
    let out = kennel(d.path())
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    assert!(matches!(out.status.code(), Some(0 | 1)), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in [
        "kvm",
        "qemu-system-x86_64",
        "virtiofsd",
        "mmdebstrap",
        "networking",
        "disk space",
        "service",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    assert!(
        v["backend"].as_str().unwrap().contains("qemu")
            || v["backend"].as_str().unwrap().contains("cloud-hypervisor")
    );
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `kennel serve` in `d` (loopback ports, no metrics listener unless
/// `env` asks), once its control socket is open.
fn serve(d: &std::path::Path, env: &[(&str, &str)], stderr: Stdio) -> Daemon {
    let child = StdCommand::new(assert_cmd::cargo::cargo_bin("kennel"))
        .current_dir(d)
        .env("HOME", d)
        .env_remove("KENNEL_CONFIG")
        .env("KENNEL_SSH__LISTEN", "127.0.0.1:0")
        .env("KENNEL_HTTPS__LISTEN", "127.0.0.1:0")
        .env("KENNEL_METRICS__LISTEN", "")
        .envs(env.iter().copied())
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let daemon = Daemon(child);
    let sock = d.join("kennel-data/control.sock");
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the daemon did not open its control socket"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon
}

#[test]
fn exec_goes_through_a_running_daemon_and_serve_stops_on_sigterm() {
    let d = tempfile::tempdir().unwrap();
    let mut daemon = serve(
        d.path(),
        &[
            ("KENNEL_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,kennel_core::executor=debug"),
        ],
        Stdio::piped(),
    );
    let sock = d.path().join("kennel-data/control.sock");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The data dir is the daemon's: exec must use the socket (an in-process
    // run would fail on the lock).
    kennel(d.path())
        .args(["exec", "whoami"])
        .assert()
        .success()
        .stdout(predicate::str::contains("You are admin"));
    kennel(d.path())
        .args(["exec", "frobnicate"])
        .assert()
        .code(2);
    // SIGTERM: graceful stop, socket removed.
    StdCommand::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status()
        .unwrap();
    let status = daemon.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists());
    // `log_format = "json"`: every stderr line is one JSON object.
    let mut log = String::new();
    std::io::Read::read_to_string(&mut daemon.0.stderr.take().unwrap(), &mut log).unwrap();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let ready = events
        .iter()
        .find(|e| e["fields"]["message"] == "kennel serve ready")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(ready["level"], "INFO");
    assert!(ready["fields"]["socket"]
        .as_str()
        .unwrap()
        .ends_with("control.sock"));
    assert!(
        events
            .iter()
            .any(|e| e["fields"]["message"] == "kennel serve stopped"),
        "{log}"
    );
    // A command's events carry its span's fields, for a shipper to index.
    let done = events
        .iter()
        .find(|e| e["fields"]["message"] == "done" && e["span"]["command"] == "whoami")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(done["span"]["user"], "admin", "{done}");
    assert_eq!(done["spans"][0]["name"], "command", "{done}");
}

#[test]
fn the_annotated_example_config_is_valid() {
    let d = tempfile::tempdir().unwrap();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/kennel.example.toml");
    kennel(d.path())
        .arg("--config")
        .arg(&example)
        .arg("config")
        .assert()
        .success()
        .stdout(predicate::str::contains("vm.stop_timeout_secs = 30"));
}

#[test]
fn ssh_limits_come_from_the_config() {
    let d = tempfile::tempdir().unwrap();
    kennel(d.path())
        .env("KENNEL_SSH__MAX_CONNECTIONS_PER_IP", "7")
        .arg("config")
        .assert()
        .success()
        .stdout(predicate::str::contains("ssh.max_connections_per_ip = 7"))
        .stdout(predicate::str::contains(
            "ssh.max_auth_failures_per_ip = 20",
        ))
        .stdout(predicate::str::contains("ssh.idle_timeout_secs = 3600"));
}

#[test]
fn acme_comes_from_the_config_and_refuses_a_second_source() {
    let d = tempfile::tempdir().unwrap();
    kennel(d.path())
        .env("KENNEL_HTTPS__ACME__DIRECTORY", "https://acme.example/dir")
        .arg("config")
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "https.acme.directory = \"https://acme.example/dir\"",
        ));
    kennel(d.path())
        .env("KENNEL_HTTPS__ACME__DIRECTORY", "http://plain.example/dir")
        .arg("config")
        .assert()
        .failure()
        .stderr(predicate::str::contains("must be an https:// URL"));
    kennel(d.path())
        .env("KENNEL_HTTPS__ACME__DIRECTORY", "https://acme.example/dir")
        .env("KENNEL_HTTPS__CERT", "/etc/cert.pem")
        .env("KENNEL_HTTPS__KEY", "/etc/key.pem")
        .arg("config")
        .assert()
        .failure()
        .stderr(predicate::str::contains("two sources of certificates"));
}

#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let d = tempfile::tempdir().unwrap();
    let bin = assert_cmd::cargo::cargo_bin("kennel");
    // `kennel exec help | true`: the reader is gone before kennel writes.
    let out = StdCommand::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' exec help | true; echo \"status ${{PIPESTATUS:-0}}\"",
            bin.display()
        ))
        .current_dir(d.path())
        .env_remove("KENNEL_CONFIG")
        .env("HOME", d.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("Broken pipe"), "{err}");
    // The same through the daemon's answer path: a tiny pipe closed at once.
    let mut child = StdCommand::new(&bin)
        .args(["exec", "help"])
        .current_dir(d.path())
        .env_remove("KENNEL_CONFIG")
        .env("HOME", d.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(out.status.code(), Some(101), "no panic exit");
}

#[test]
fn stacks_detect_explains_a_repository_before_a_project_exists() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("shop");
    for (f, text) in [
        ("composer.json", "{}"),
        ("composer.lock", "{}"),
        ("artisan", ""),
        ("package.json", "{}"),
        ("app/Models/User.php", "<?php"),
        ("resources/js/app.js", ""),
        (".nvmrc", "20\n"),
        (
            ".devcontainer/devcontainer.json",
            "{\n  // Laravel\n  \"name\": \"shop\",\n  \"image\": \"php:8.3\",\n  \"postCreateCommand\": [\"composer\", \"install\"],\n  \"forwardPorts\": [8080, 5173,],\n}\n",
        ),
    ] {
        let p = repo.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let stacks = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks");
    let out = kennel(d.path())
        .env("KENNEL_IMAGES__STACKS_DIR", &stacks)
        .args(["stacks", "detect", "--json"])
        .arg(&repo)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["stack"], "php", "{v}");
    assert_eq!(v["evidence"][0], "composer.json", "{v}");
    assert_eq!(v["app_port"], 8080, "{v}");
    assert!(
        v["warnings"][0]
            .as_str()
            .unwrap()
            .starts_with("also found node"),
        "{v}"
    );
    assert!(
        v["devcontainer"][0]
            .as_str()
            .unwrap()
            .contains("(shop): postCreateCommand once on the first boot"),
        "{v}"
    );
    assert!(
        v["devcontainer"]
            .to_string()
            .contains("image does not apply"),
        "{v}"
    );
    // The node pin is not the php image's concern.
    assert_eq!(v["pin_warnings"].as_array().unwrap().len(), 0, "{v}");
    // Text, and a clear refusal for what is not a directory.
    kennel(d.path())
        .env("KENNEL_IMAGES__STACKS_DIR", &stacks)
        .args(["stacks", "detect"])
        .arg(&repo)
        .assert()
        .success()
        .stdout(predicate::str::contains("shop: php (composer.json"))
        .stdout(predicate::str::contains(
            "app port: 8080 (.devcontainer/devcontainer.json forwardPorts)",
        ));
    kennel(d.path())
        .args(["stacks", "detect"])
        .arg(repo.join("artisan"))
        .assert()
        .failure()
        .stderr(predicate::str::contains("is not a directory"));
}

/// `GET /metrics` over plain HTTP/1.0.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn serve_exports_prometheus_metrics_on_their_own_listener() {
    let d = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let _daemon = serve(
        d.path(),
        &[
            ("KENNEL_VM__BACKEND", "none"),
            ("KENNEL_METRICS__LISTEN", &addr),
            ("RUST_LOG", "warn"),
        ],
        Stdio::null(),
    );
    kennel(d.path()).args(["exec", "whoami"]).assert().success();
    kennel(d.path())
        .args(["exec", "status nothere"])
        .assert()
        .code(4);
    let m = scrape(&addr);
    assert!(
        m.starts_with("HTTP/1.1 200") || m.starts_with("HTTP/1.0 200"),
        "{m}"
    );
    for want in [
        "# HELP kennel_commands_total",
        "kennel_commands_total{frontend=\"cli\",command=\"whoami\",outcome=\"ok\"} 1",
        "kennel_commands_total{frontend=\"cli\",command=\"status\",outcome=\"not_found\"} 1",
        "kennel_projects{state=\"running\"} 0",
        "# TYPE kennel_store_bytes gauge",
    ] {
        assert!(m.contains(want), "{want} not in:\n{m}");
    }
    // A bad address is refused with what to write instead.
    let d2 = tempfile::tempdir().unwrap();
    kennel(d2.path())
        .env("KENNEL_METRICS__LISTEN", "not an address")
        .args(["serve"])
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "metrics.listen \"not an address\" is not an address",
        ));
}

#[test]
fn backup_while_the_daemon_runs_and_restore_into_a_fresh_data_dir() {
    let d = tempfile::tempdir().unwrap();
    let mut daemon = serve(d.path(), &[("KENNEL_VM__BACKEND", "none")], Stdio::null());
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ann@laptop";
    kennel(d.path())
        .args(["exec", "key", "add", key])
        .assert()
        .success();
    let host_key = std::fs::read(d.path().join("kennel-data/keys/ssh_host_ed25519_key")).unwrap();
    // While the daemon runs (it holds the data-dir lock).
    let bk = d.path().join("bk");
    kennel(d.path())
        .arg("backup")
        .arg(&bk)
        .assert()
        .success()
        .stdout(predicate::str::contains("1 users"));
    kennel(d.path())
        .arg("backup")
        .arg(&bk)
        .assert()
        .failure()
        .stderr(predicate::str::contains("is not empty"));
    StdCommand::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status()
        .unwrap();
    daemon.0.wait().unwrap();
    // Into a data dir that has a store: refused, nothing touched.
    kennel(d.path())
        .arg("restore")
        .arg(&bk)
        .assert()
        .failure()
        .stderr(predicate::str::contains("already holds a store"));
    // Into a fresh one: the user, the key and the gateway's host key back.
    let fresh = d.path().join("fresh");
    kennel(d.path())
        .args(["--data-dir"])
        .arg(&fresh)
        .arg("restore")
        .arg(&bk)
        .assert()
        .success()
        .stdout(predicate::str::contains("Restored the backup"));
    kennel(d.path())
        .args(["--data-dir"])
        .arg(&fresh)
        .args(["exec", "keys"])
        .assert()
        .success()
        .stdout(predicate::str::contains("ann@laptop"));
    assert_eq!(
        std::fs::read(fresh.join("keys/ssh_host_ed25519_key")).unwrap(),
        host_key
    );
    // A changed file is caught before anything is written.
    std::fs::write(bk.join("kennel.db"), b"tampered").unwrap();
    let other = d.path().join("other");
    kennel(d.path())
        .args(["--data-dir"])
        .arg(&other)
        .arg("restore")
        .arg(&bk)
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "does not match the backup's manifest",
        ));
    assert!(!other.join("kennel.db").exists());
}
