//! `resize` and `run` on a real guest (QEMU, TCG here): the disk grown on
//! the running VM and seen by `df` in the guest, CPUs and memory after a
//! restart seen by `nproc` and `/proc/meminfo`; `run` from the CLI (exit
//! codes, the words as given, files owned by the source's owner), from
//! the HTTP API streamed (NDJSON output lines) and not, a time-out, and
//! `run stop`; and the host guard: a guest reaches Kennel's gateways on
//! the host and none of its other services.
#![cfg(feature = "vm-tests")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use crate::support::{Kennel, Steps};

/// `POST /api/v1/exec` with a bearer token; the body and the HTTP code.
fn api(k: &Kennel, token: &str, line: &str, stream: bool) -> (String, String) {
    kennel_testkit::require("curl", "curl");
    let ca = k.dir.join("kennel-data/tls/dev-ca/ca.pem");
    let mut c = std::process::Command::new("curl");
    c.args(["-sS", "--max-time", "120", "--cacert"])
        .arg(&ca)
        .arg("--resolve")
        .arg(format!("localhost:{}:127.0.0.1", k.https_port))
        .args(["-w", "\n%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .args(["-H", "Content-Type: text/plain", "--data-binary", line]);
    if stream {
        c.args(["-H", "Accept: application/x-ndjson"]);
    }
    let out = c
        .arg(format!("https://localhost:{}/api/v1/exec", k.https_port))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "api `{line}` ->\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
    (code.to_owned(), body.to_owned())
}

/// The guest's root filesystem size in MiB.
fn root_mib(k: &Kennel) -> u64 {
    let out = k.exec_ok("run box df -B1M --output=size /");
    out.lines()
        .filter_map(|l| l.trim().parse().ok())
        .next()
        .unwrap_or_else(|| panic!("no size in {out}"))
}

#[test]
fn resize_and_run_on_a_real_guest() {
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    k.start_serve();
    let src = tmp.path().join("kennel-data/projects/box");
    let mut steps = Steps::new("resize_and_run_on_a_real_guest");
    steps.run("new project box", || {
        // An empty directory a host user made: Kennel fills it with a
        // repository, and it stays theirs.
        std::fs::create_dir_all(&src).unwrap();
        let chown = std::process::Command::new("chown")
            .args(["-hR", "4242:4242"])
            .arg(&src)
            .status()
            .unwrap();
        assert!(chown.success());
        k.exec_ok("new project box --adopt --stack base --cpus 1 --memory 512M --disk 3G");
        assert_eq!(std::fs::metadata(src.join(".git")).unwrap().uid(), 4242);
    });
    steps.run(
        "run from the CLI: exit codes, words as given, /workspace",
        || {
            let out = k.exec("run box sh -c 'pwd; id -un; echo \"$1\"; exit 3' x '--json $HOME'");
            assert_eq!(out.status.code(), Some(3));
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("/workspace\ndev\n--json $HOME\n"), "{text}");
            assert!(text.contains("exited with 3"), "{text}");
            assert_eq!(k.exec("run box false").status.code(), Some(1));
            let missing = k.exec("run box no-such-program");
            assert_eq!(missing.status.code(), Some(127));
            // What it makes in /workspace belongs to the source's owner.
            k.exec_ok("run box touch made-by-run");
            assert_eq!(
                std::fs::metadata(src.join("made-by-run")).unwrap().uid(),
                4242
            );
        },
    );
    let token = steps
        .run("an API token", || {
            let out = k.exec_ok("token create runner --json");
            let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
            v["token"].as_str().unwrap().to_owned()
        })
        .unwrap_or_default();
    steps.run("run over the API, streamed and not", || {
        let (code, body) = api(
            &k,
            &token,
            "run box sh -c 'echo out-line; echo err-line >&2; exit 4'",
            true,
        );
        assert_eq!(code, "200", "{body}");
        let lines: Vec<serde_json::Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let streamed: String = lines.iter().filter_map(|v| v["output"].as_str()).collect();
        assert!(
            streamed.contains("out-line\n") && streamed.contains("err-line\n"),
            "{body}"
        );
        let last = lines.last().unwrap();
        assert_eq!(last["exit_code"], 4, "{body}");
        let (code, body) = api(&k, &token, "run box echo plain", false);
        assert_eq!(code, "200", "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["tail"][0], "plain", "{body}");
    });
    steps.run("a time limit ends it", || {
        let t = Instant::now();
        let (code, body) = api(&k, &token, "run box --timeout 3s sleep 60", false);
        assert_eq!(code, "200", "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["timed_out"], true, "{body}");
        assert_eq!(v["exit_code"], 124, "{body}");
        assert!(t.elapsed() < Duration::from_secs(120), "{:?}", t.elapsed());
    });
    steps.run("run stop", || {
        let child = k.cmd().args(["exec", "run box sleep 300"]).spawn().unwrap();
        let t = Instant::now();
        loop {
            let out = k.exec_ok("run stop box");
            if out.contains("Stopping the command") {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(180), "{out}");
            std::thread::sleep(Duration::from_millis(300));
        }
        let out = child.wait_with_output().unwrap();
        assert_ne!(out.status.code(), Some(0), "{out:?}");
        assert!(t.elapsed() < Duration::from_secs(180));
    });
    steps.run("a caller who goes away stops it", || {
        let sleeping = || {
            let out = k.exec("run box sh -c 'cat /proc/[0-9]*/comm 2>/dev/null | grep -cx sleep'");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<u32>().ok())
                .unwrap_or(99)
        };
        // curl gives up after 20 s of a streamed `run` (time enough for the
        // command to start on a loaded host).
        let ca = k.dir.join("kennel-data/tls/dev-ca/ca.pem");
        let curl = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "20", "--cacert"])
            .arg(&ca)
            .arg("--resolve")
            .arg(format!("localhost:{}:127.0.0.1", k.https_port))
            .arg("-H")
            .arg(format!("Authorization: Bearer {token}"))
            .args([
                "-H",
                "Accept: application/x-ndjson",
                "--data-binary",
                "run box sleep 120",
            ])
            .arg(format!("https://localhost:{}/api/v1/exec", k.https_port))
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while sleeping() != 1 {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the command never ran"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        let out = curl.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(28), "curl timed out: {out:?}");
        // The command in the VM ends with it.
        let t = Instant::now();
        while sleeping() != 0 {
            assert!(t.elapsed() < Duration::from_secs(30), "sleep still runs");
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    steps.run(
        "the host's own services are out of the guest's reach",
        || {
            // A service on the host's loopback, and one on all its addresses.
            let lo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let any = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
            let reach = |port: u16| {
                k.exec(&format!(
                    "run box --timeout 20s bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}'"
                ))
                .status
                .code()
            };
            for port in [
                lo.local_addr().unwrap().port(),
                any.local_addr().unwrap().port(),
            ] {
                let t = Instant::now();
                assert_eq!(reach(port), Some(1), "port {port} was reachable");
                // Refused at once (a reset), not left to time out.
                assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
            }
            // Kennel's own gateways stay reachable.
            assert_eq!(reach(k.https_port), Some(0));
            assert_eq!(reach(k.ssh_port), Some(0));
        },
    );
    steps.run("the disk grows on the running VM", || {
        let before = root_mib(&k);
        let out = k.exec_ok("resize box --disk 4G");
        assert!(out.contains("disk 3G → 4G"), "{out}");
        assert!(out.contains("grew at once"), "{out}");
        let after = root_mib(&k);
        assert!(after >= before + 900, "{before} MiB → {after} MiB");
        let out = k.exec("resize box --disk 2G");
        assert_eq!(out.status.code(), Some(6), "invalid");
        assert!(String::from_utf8_lossy(&out.stdout).contains("disks only grow"));
    });
    steps.run("CPUs and memory after a restart", || {
        let out = k.exec_ok("resize box --cpus 2 --memory 1G");
        assert!(out.contains("restart box"), "{out}");
        assert_eq!(k.exec_ok("run box nproc").lines().next(), Some("1"));
        k.exec_ok("restart box");
        assert_eq!(k.exec_ok("run box nproc").lines().next(), Some("2"));
        let mem = k.exec_ok("run box grep MemTotal /proc/meminfo");
        let kb: u64 = mem
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{mem}"));
        assert!(kb > 900_000, "{mem}");
        // The disk kept its size across the restart.
        assert!(root_mib(&k) > 3500);
    });
    steps.finish();
}
