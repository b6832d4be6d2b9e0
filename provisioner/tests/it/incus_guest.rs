//! Kennel's own guest as an Incus container on a real daemon: the base
//! image built by Kennel's recipe, imported once under its alias; an
//! instance made from Kennel's spec (limits, `/workspace` shared from the
//! host, proxy devices on loopback); the guest config contract written
//! through the API; then the guest's own boot steps (systemd, kennel-init)
//! give a `dev` with the host owner's uid, sshd with the pinned host key
//! behind the proxy, `/workspace` ownership both ways; a clean stop and a
//! start again keep all of it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kennel_provisioner::incus::api::{InstanceType, StateAction};
use kennel_provisioner::incus::spec::{self, Placement, ProjectInstance, Workspace};
use kennel_provisioner::incus::{image, IncusClient};
use kennel_provisioner::process::SystemRunner;
use kennel_testkit::incus::IncusDaemon;

const LONG: Duration = Duration::from_secs(300);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `127.0.0.1:port` answers with an SSH banner.
fn wait_banner(port: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 64];
            if let Ok(n) = s.read(&mut buf) {
                if buf.get(..n).unwrap_or_default().starts_with(b"SSH-2.0-") {
                    let _ = s.write_all(b"SSH-2.0-probe\r\n");
                    return started.elapsed();
                }
            }
        }
        assert!(started.elapsed() < limit, "no sshd behind port {port}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `ssh dev@127.0.0.1 -p port command`, knowing the guest only by
/// `host_pub`.
fn ssh(dir: &Path, port: u16, key: &Path, host_pub: &str, command: &str) -> String {
    let known = dir.join("known_hosts");
    std::fs::write(&known, format!("[127.0.0.1]:{port} {host_pub}\n")).unwrap();
    let out = std::process::Command::new("ssh")
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .args(["-o", "IdentitiesOnly=yes", "-p", &port.to_string(), "-i"])
        .arg(key)
        .args(["dev@127.0.0.1", command])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kennels_guest_boots_as_an_incus_container() {
    let (_kernel, infos) = crate::images::build(&["base"]);
    let base = infos.into_iter().next().unwrap();
    let daemon = IncusDaemon::start();
    let c = IncusClient::unix(&daemon.socket(), "default");
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();

    // The image: imported once, found again by its alias.
    let runner: Arc<dyn kennel_provisioner::process::Runner> = Arc::new(SystemRunner);
    let t = Instant::now();
    let fp = image::ensure(&c, runner.clone(), &base, dir.path(), &mut |s| {
        eprintln!("{s}")
    })
    .await
    .unwrap();
    eprintln!("imported {} in {:?}", base.id, t.elapsed());
    let again = image::ensure(&c, runner, &base, dir.path(), &mut |s| {
        panic!("imported again: {s}")
    })
    .await
    .unwrap();
    assert_eq!(fp, again);

    // The host source, owned by a user who is not root.
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("hello.txt"), "hi\n").unwrap();
    for p in [&src, &src.join("hello.txt")] {
        std::os::unix::fs::chown(p, Some(1234), Some(1234)).unwrap();
    }
    let (key, key_pub) = kennel_testkit::ssh::keygen(dir.path(), "project");
    let (host_key, host_pub) = kennel_testkit::ssh::keygen(dir.path(), "host");
    let host_pub = host_pub
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");

    let (ssh_port, app_port) = (free_port(), free_port());
    let place = Placement {
        instance_type: InstanceType::Container,
        storage_pool: "default".into(),
        network: daemon.bridge().into(),
    };
    let post = spec::instance_post(
        &place,
        &ProjectInstance {
            name: "proj1".into(),
            image: fp.clone(),
            vcpus: 1,
            memory_mib: 1024,
            disk_gib: 8,
            workspace: Workspace::HostPath(src.display().to_string()),
            listen: "127.0.0.1".parse().unwrap(),
            ssh_port,
            app_port,
            guest_app_port: 8000,
            guest_ip: None,
            labels: BTreeMap::from([("owner".into(), "alice".into())]),
        },
    );
    c.create_instance(&post, None, LONG).await.unwrap();
    let root = (0, 0, 0o600);
    c.push_dir("proj1", spec::CONFIG_DIR, (0, 0, 0o700))
        .await
        .unwrap();
    let files = [
        (
            "env",
            spec::guest_env("proj1", 1234, 1234, false).into_bytes(),
        ),
        ("authorized_keys", format!("{key_pub}\n").into_bytes()),
        ("ssh_host_ed25519_key", std::fs::read(&host_key).unwrap()),
        (
            "ssh_host_ed25519_key.pub",
            format!("{host_pub}\n").into_bytes(),
        ),
    ];
    for (name, content) in files {
        c.push_file(
            "proj1",
            &format!("{}/{name}", spec::CONFIG_DIR),
            content,
            root,
        )
        .await
        .unwrap();
    }
    let t = Instant::now();
    c.change_state("proj1", StateAction::Start, false, Duration::ZERO)
        .await
        .unwrap();
    let ready = wait_banner(ssh_port, Duration::from_secs(120));
    eprintln!("start to SSH banner: {ready:?} ({:?} in all)", t.elapsed());

    let out = ssh(
        dir.path(),
        ssh_port,
        &key,
        &host_pub,
        "id -u; id -g; hostname; stat -c %u /workspace/hello.txt; cat /workspace/hello.txt; \
         echo made > /workspace/from-guest; mkdir /workspace/dir; systemctl is-system-running --wait || true; \
         ip -4 -o addr show dev eth0",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        &lines[..5],
        ["1234", "1234", "proj1", "1234", "hi"],
        "{out}"
    );
    assert!(
        lines[5] == "running" || lines[5] == "degraded",
        "{out}\n{}",
        ssh(
            dir.path(),
            ssh_port,
            &key,
            &host_pub,
            "systemctl --failed --no-legend"
        )
    );
    assert!(
        out.contains(&format!("inet {}.", daemon.subnet())),
        "no DHCP address: {out}"
    );
    // What the guest made belongs to the host user.
    for p in ["from-guest", "dir"] {
        let m = std::fs::metadata(src.join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (1234, 1234), "{p}");
    }
    let failed = ssh(
        dir.path(),
        ssh_port,
        &key,
        &host_pub,
        "systemctl --failed --no-legend --plain",
    );
    assert!(
        !failed.contains("kennel-"),
        "Kennel's units failed: {failed}"
    );

    // A clean stop (the guest's systemd powers off), then a start: the
    // same host key, the same account.
    let t = Instant::now();
    c.change_state("proj1", StateAction::Stop, false, Duration::from_secs(60))
        .await
        .unwrap();
    eprintln!("clean stop: {:?}", t.elapsed());
    assert!(!c.instance_state("proj1").await.unwrap().running());
    c.change_state("proj1", StateAction::Start, false, Duration::ZERO)
        .await
        .unwrap();
    let wake = wait_banner(ssh_port, Duration::from_secs(120));
    eprintln!("wake to SSH banner: {wake:?}");
    assert_eq!(
        ssh(dir.path(), ssh_port, &key, &host_pub, "id -u").trim(),
        "1234"
    );

    c.change_state("proj1", StateAction::Stop, true, Duration::from_secs(30))
        .await
        .unwrap();
    c.delete_instance("proj1", LONG).await.unwrap();
    // The source is the host's: deleting the instance leaves it.
    assert!(src.join("from-guest").exists());
}
