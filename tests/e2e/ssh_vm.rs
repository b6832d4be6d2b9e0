//! The SSH gateway into real guests (QEMU/TCG) with OpenSSH's own tools:
//! `ssh PROJECT@HOST` exit status, sftp, scp both ways, `ssh -L` to a
//! server in the VM, ProxyJump, a 64 MiB transfer with matching SHA-256,
//! an interactive `ssh -tt` session driven by expect (and resized), and a
//! Unix-socket forward's data path.
//! `vm-tests` feature; needs what tests/e2e/vm.rs needs, plus expect.
#![cfg(feature = "vm-tests")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::support::{Kennel, Steps};
use kennel_testkit::require;

use crate::support::SSH_OPTS as OPTS;

fn ssh(
    k: &Kennel,
    key: &Path,
    target: &str,
    extra: &[&str],
    command: &str,
    stdin: Option<&Path>,
) -> Output {
    let mut c = Command::new("ssh");
    c.args(OPTS)
        .args(["-p", &k.ssh_port.to_string(), "-i"])
        .arg(key)
        .args(extra)
        .arg(target)
        .arg(command);
    if let Some(f) = stdin {
        c.stdin(std::fs::File::open(f).unwrap());
    } else {
        c.stdin(Stdio::null());
    }
    c.output().unwrap()
}

/// An ssh_config with the gateway as jump host `gw` and `project` behind it
/// (as `dev`, with the project's own key); returns its path.
fn jump_config(k: &Kennel, key: &Path, project: &str) -> std::path::PathBuf {
    let cfg = k.dir.join(format!("ssh_config_{project}"));
    let common = "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n";
    std::fs::write(
        &cfg,
        format!(
            "Host gw\n  HostName 127.0.0.1\n  Port {}\n  User me\n  IdentityFile {}\n{common}Host {project}\n  User dev\n  ProxyJump gw\n  IdentityFile {}\n{common}",
            k.ssh_port,
            key.display(),
            k.key(project).display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn editors_tools_work_through_the_gateway() {
    require("sftp", "openssh-client");
    require("scp", "openssh-client");
    require("expect", "expect");
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    k.start_serve();
    let key = tmp.path().join("me");
    assert!(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    k.exec_ok(&format!("key add \"{}\"", public.trim()));
    k.exec_ok("new project web --stack base --cpus 1 --memory 512M --disk 2G");
    let port = k.ssh_port.to_string();

    let mut steps = Steps::new("editors_tools_work_through_the_gateway");

    // Exit status comes back.
    steps.run("Exit status comes back", || {
        let out = ssh(&k, &key, "web@127.0.0.1", &[], "hostname; exit 3", None);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "web\n");
    });

    // `ssh-config`'s output is the whole setup: `ssh -F` with it reaches
    // the project by its alias.
    steps.run("`ssh-config`'s output is the whole setup", || {
        let out = ssh(&k, &key, "me@127.0.0.1", &[], "ssh-config", None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cfg = tmp.path().join("kennel_config");
        std::fs::write(&cfg, &out.stdout).unwrap();
        let out = Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            .args(OPTS)
            .arg("-i")
            .arg(&key)
            // The test's Kennel tells people port 2222 but listens elsewhere;
            // -p wins over the config.
            .args(["-p", &port, "kennel-web", "hostname"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "web\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });

    // sftp in batch mode, scp both ways.
    steps.run("sftp in batch mode, scp both ways", || {
        std::fs::write(tmp.path().join("up.txt"), "up and down\n").unwrap();
        std::fs::write(
            tmp.path().join("batch"),
            "put up.txt /workspace/up.txt\nget /workspace/up.txt down.txt\n",
        )
        .unwrap();
        let sftp = Command::new("sftp")
            .current_dir(tmp.path())
            .args(OPTS)
            .args(["-P", &port, "-i"])
            .arg(&key)
            .args(["-b", "batch", "web@127.0.0.1"])
            .output()
            .unwrap();
        assert!(
            sftp.status.success(),
            "{}",
            String::from_utf8_lossy(&sftp.stderr)
        );
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("down.txt")).unwrap(),
            "up and down\n"
        );
        assert!(
            tmp.path().join("kennel-data/projects/web/up.txt").exists(),
            "sftp wrote into the project"
        );
        for (from, to) in [
            ("up.txt", "web@127.0.0.1:/tmp/scp.txt"),
            ("web@127.0.0.1:/tmp/scp.txt", "back.txt"),
        ] {
            let scp = Command::new("scp")
                .current_dir(tmp.path())
                .args(OPTS)
                .args(["-P", &port, "-i"])
                .arg(&key)
                .args([from, to])
                .output()
                .unwrap();
            assert!(
                scp.status.success(),
                "{}",
                String::from_utf8_lossy(&scp.stderr)
            );
        }
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("back.txt")).unwrap(),
            "up and down\n"
        );
    });

    // ssh -L to a server running in the VM (perl is in every image).
    steps.run("ssh -L to a server running in the VM (perl is in every image)", || {
        let server = "nohup perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalPort=>3000,Listen=>5,ReuseAddr=>1) or die; while($c=$s->accept){print $c \"HTTP/1.0 200 OK\\r\\n\\r\\nhello from the vm\\n\"; close $c}' >/dev/null 2>&1 &";
        assert!(ssh(&k, &key, "web@127.0.0.1", &[], server, None)
            .status
            .success());
        let local = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut tunnel = Command::new("ssh")
            .args(OPTS)
            .args(["-p", &port, "-i"])
            .arg(&key)
            .args([
                "-N",
                "-L",
                &format!("{local}:127.0.0.1:3000"),
                "web@127.0.0.1",
            ])
            .spawn()
            .unwrap();
        let mut body = String::new();
        for _ in 0..100 {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", local)) {
                use std::io::Read;
                body.clear();
                let _ = s.read_to_string(&mut body);
                if body.contains("hello from the vm") {
                    break;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = tunnel.kill();
        let _ = tunnel.wait();
        assert!(body.contains("hello from the vm"), "{body:?}");
    });

    // ProxyJump: the gateway as jump host, the project's own key at the end.
    steps.run("ProxyJump", || {
        let cfg = jump_config(&k, &key, "web");
        let jump = Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            .args(["-o", "BatchMode=yes", "web", "echo jumped to $(hostname)"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&jump.stdout),
            "jumped to web\n",
            "{}",
            String::from_utf8_lossy(&jump.stderr)
        );
    });

    // 64 MiB through, checksum intact.
    steps.run("64 MiB through, checksum intact", || {
        let big = tmp.path().join("big.bin");
        let dd = Command::new("dd")
            .args(["if=/dev/urandom", "bs=1M", "count=64", "status=none"])
            .arg(format!("of={}", big.display()))
            .status()
            .unwrap();
        assert!(dd.success());
        let local_sum =
            String::from_utf8_lossy(&Command::new("sha256sum").arg(&big).output().unwrap().stdout)
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned();
        let out = ssh(&k, &key, "web@127.0.0.1", &[], "sha256sum", Some(&big));
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with(&local_sum),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    });

    // An interactive shell on a pty, driven by expect; the local terminal
    // is resized and the VM's pty follows (window-change).
    steps.run("An interactive shell on a pty, driven by expect", || {
        let script = format!(
            "set timeout 30\nspawn ssh -tt {} -p {port} -i {} web@127.0.0.1\nexpect \"$ \"\nsend \"echo answer-\\$((40 + 2)); stty size\\r\"\nexpect \"answer-42\"\nexpect \"$ \"\nstty rows 50 columns 132 < $spawn_out(slave,name)\nsend \"echo size-\\$(stty size | tr ' ' x)\\r\"\nexpect {{ \"size-50x132\" {{}} timeout {{ exit 9 }} }}\nexpect \"$ \"\nsend \"exit 7\\r\"\nexpect eof\ncatch wait result\nexit [lindex $result 3]\n",
            OPTS.join(" "),
            key.display()
        );
        let exp = Command::new("expect")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert_eq!(
            exp.status.code(),
            Some(7),
            "{}",
            String::from_utf8_lossy(&exp.stdout)
        );
        assert!(String::from_utf8_lossy(&exp.stdout).contains("answer-42"));
        assert!(
            String::from_utf8_lossy(&exp.stdout).contains("size-50x132"),
            "the VM's terminal did not follow the resize: {}",
            String::from_utf8_lossy(&exp.stdout)
        );
    });

    // A Unix-socket forward's data path (direct-streamlocal, as VS Code
    // Remote-SSH uses). The socket in the VM is made by the VM's own sshd
    // for an `ssh -R` from here to an echo server on the host; the gateway
    // is then asked for `ssh -L local.sock:/tmp/remote.sock`.
    steps.run(
        "A Unix-socket forward's data path (direct-streamlocal)",
        || {
            let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let echo_port = echo.local_addr().unwrap().port();
            std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                for conn in echo.incoming().flatten() {
                    let mut line = String::new();
                    let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
                    if r.read_line(&mut line).is_ok() {
                        let _ = (&conn).write_all(format!("echo: {line}").as_bytes());
                    }
                }
            });
            let vm = k.addr("web");
            let (vm_ip, vm_port) = vm.rsplit_once(':').unwrap();
            let mut remote = Command::new("ssh")
                .args(OPTS)
                .args([
                    "-o",
                    "IdentitiesOnly=yes",
                    "-o",
                    "StreamLocalBindUnlink=yes",
                    "-i",
                ])
                .arg(k.key("web"))
                .args(["-p", vm_port, "-N", "-R"])
                .arg(format!("/tmp/remote.sock:127.0.0.1:{echo_port}"))
                .arg(format!("dev@{vm_ip}"))
                .stdin(Stdio::null())
                .spawn()
                .unwrap();
            let t = std::time::Instant::now();
            while k
                .ssh_ok("web", "test -S /tmp/remote.sock && echo yes || echo no")
                .trim()
                != "yes"
            {
                assert!(
                    t.elapsed() < std::time::Duration::from_secs(180),
                    "no socket in the VM"
                );
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            let local = tmp.path().join("local.sock");
            let mut fwd = kennel_testkit::ssh::client(k.ssh_port, &key, "ERROR")
                .args(["-N", "-L"])
                .arg(format!("{}:/tmp/remote.sock", local.display()))
                .arg("web@127.0.0.1")
                .stdin(Stdio::null())
                .spawn()
                .unwrap();
            let t = std::time::Instant::now();
            while !local.exists() {
                assert!(
                    t.elapsed() < std::time::Duration::from_secs(120),
                    "no local socket"
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let answer = {
                use std::io::{BufRead, Write};
                let mut s = std::os::unix::net::UnixStream::connect(&local).unwrap();
                s.set_read_timeout(Some(std::time::Duration::from_secs(180)))
                    .unwrap();
                s.write_all(b"through the socket\n").unwrap();
                let mut line = String::new();
                std::io::BufReader::new(s).read_line(&mut line).unwrap();
                line
            };
            let _ = fwd.kill();
            let _ = fwd.wait();
            let _ = remote.kill();
            let _ = remote.wait();
            assert_eq!(answer, "echo: through the socket\n");
        },
    );

    // Agent forwarding: the VM sees the client's agent (on a connection of
    // its own, so the agent channel leads back to this client).
    steps.run("Agent forwarding", || {
        let agent_sock = tmp.path().join("agent.sock");
        let agent = Command::new("ssh-agent")
            .arg("-a")
            .arg(&agent_sock)
            .output()
            .unwrap();
        assert!(agent.status.success());
        let agent_pid = String::from_utf8_lossy(&agent.stdout)
            .split("SSH_AGENT_PID=")
            .nth(1)
            .and_then(|r| r.split(';').next())
            .unwrap()
            .to_owned();
        assert!(Command::new("ssh-add")
            .env("SSH_AUTH_SOCK", &agent_sock)
            .arg(&key)
            .output()
            .unwrap()
            .status
            .success());
        let listed = Command::new("ssh")
            .env("SSH_AUTH_SOCK", &agent_sock)
            .args(OPTS)
            .args(["-A", "-p", &port, "-i"])
            .arg(&key)
            .args(["web@127.0.0.1", "ssh-add -l"])
            .output()
            .unwrap();
        let _ = Command::new("kill").arg(&agent_pid).status();
        let fp = String::from_utf8_lossy(
            &Command::new("ssh-keygen")
                .arg("-lf")
                .arg(key.with_extension("pub"))
                .output()
                .unwrap()
                .stdout,
        )
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
        assert!(
            String::from_utf8_lossy(&listed.stdout).contains(&fp),
            "agent not forwarded: {} {}",
            String::from_utf8_lossy(&listed.stdout),
            String::from_utf8_lossy(&listed.stderr)
        );
    });

    // A process killed by a signal is reported as such (OpenSSH exits 255).
    steps.run(
        "A process killed by a signal is reported as such (OpenSSH exits 255)",
        || {
            let out = ssh(&k, &key, "web@127.0.0.1", &[], "kill -KILL $$", None);
            assert_eq!(
                out.status.code(),
                Some(255),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        },
    );

    // Entering a stopped project starts it, with progress on stderr.
    steps.run(
        "Entering a stopped project starts it, with progress on stderr",
        || {
            k.exec_ok("stop web");
            let out = ssh(
                &k,
                &key,
                "web@127.0.0.1",
                &[],
                "cat /workspace/up.txt",
                None,
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout), "up and down\n");
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("booting"),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );

            k.exec_ok("rm web --yes");
        },
    );
    steps.finish();
}

/// A stopped project is started by whichever way someone comes in:
/// `ssh -L`, a Unix-socket forward (`direct-streamlocal`, as VS Code
/// Remote-SSH uses) and ProxyJump, not only a session.
#[test]
fn every_entry_point_wakes_a_stopped_project() {
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    k.start_serve();
    let (key, public) = kennel_testkit::ssh::keygen(tmp.path(), "me");
    k.exec_ok(&format!("key add \"{public}\""));
    k.exec_ok("new project wake --stack base --cpus 1 --memory 512M --disk 2G");
    let state = |k: &Kennel| {
        let v: serde_json::Value =
            serde_json::from_str(k.exec_ok("--json status wake").trim()).unwrap();
        v["project"]["state"].as_str().unwrap().to_owned()
    };
    let port = k.ssh_port;
    let wait_running = |k: &Kennel| {
        let t = std::time::Instant::now();
        while state(k) != "running" {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(300),
                "the project did not wake"
            );
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    };

    let mut steps = Steps::new("every_entry_point_wakes_a_stopped_project");

    // ssh -L to the VM's own sshd: the banner comes back through the tunnel.
    steps.run("ssh -L to the VM's own sshd", || {
        k.exec_ok("stop wake");
        assert_eq!(state(&k), "stopped");
        let local = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut tunnel = kennel_testkit::ssh::client(port, &key, "ERROR")
            .args([
                "-N",
                "-L",
                &format!("{local}:127.0.0.1:22"),
                "wake@127.0.0.1",
            ])
            .spawn()
            .unwrap();
        let mut banner = String::new();
        let t = std::time::Instant::now();
        while !banner.starts_with("SSH-") && t.elapsed() < std::time::Duration::from_secs(300) {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", local)) {
                use std::io::Read;
                let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(180)));
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf) {
                    banner = String::from_utf8_lossy(&buf[..n]).into_owned();
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        let _ = tunnel.kill();
        let _ = tunnel.wait();
        assert!(banner.starts_with("SSH-"), "{banner:?}");
        assert_eq!(state(&k), "running");
    });

    // A Unix-socket forward: opening it wakes the VM.
    steps.run("A Unix-socket forward", || {
        k.exec_ok("stop wake");
        let sock = tmp.path().join("fwd.sock");
        let mut fwd = kennel_testkit::ssh::client(port, &key, "ERROR")
            .args([
                "-N",
                "-L",
                &format!("{}:/run/kennel-none.sock", sock.display()),
            ])
            .arg("wake@127.0.0.1")
            .spawn()
            .unwrap();
        let t = std::time::Instant::now();
        while !sock.exists() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(120),
                "no local socket"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = std::os::unix::net::UnixStream::connect(&sock);
        wait_running(&k);
        let _ = fwd.kill();
        let _ = fwd.wait();
    });

    // ProxyJump: the gateway as jump host, the project's own key at the end.
    steps.run("ProxyJump", || {
        k.exec_ok("stop wake");
        let cfg = jump_config(&k, &key, "wake");
        let jump = Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=120",
                "wake",
                "hostname",
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&jump.stdout),
            "wake\n",
            "{}",
            String::from_utf8_lossy(&jump.stderr)
        );
    });
    steps.finish();
}
