//! A real Incus daemon of a test's own: `incusd` with a private
//! `INCUS_DIR`, its own bridge (a free 10.x.y.0/24) and a `dir` storage
//! pool, stopped and cleaned up when dropped. Needs root and incus-base
//! (scripts/install-deps.sh test installs it from bookworm-backports).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One running `incusd`.
#[derive(Debug)]
pub struct IncusDaemon {
    dir: tempfile::TempDir,
    child: Child,
    bridge: String,
    subnet: String,
}

const INCUSD: &str = "/usr/libexec/incus/incusd";

impl IncusDaemon {
    /// Starts a daemon and initialises it (bridge, storage pool, the
    /// default profile with both).
    pub fn start() -> IncusDaemon {
        assert!(
            Path::new(INCUSD).is_file(),
            "{INCUSD} is missing: install incus-base (on Debian 12 from bookworm-backports; scripts/install-deps.sh test does this)"
        );
        crate::require("incus", "incus-base");
        crate::require("dnsmasq", "dnsmasq-base");
        assert!(
            rustix::process::geteuid().is_root(),
            "a real Incus daemon needs root: run the tests as root (scripts/test.sh)"
        );
        // Under /var/tmp, not /tmp: incusd mounts into its directory and
        // some hosts mount /tmp noexec/nosuid.
        let dir = tempfile::Builder::new()
            .prefix("kennel-incus-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let log = std::fs::File::create(dir.path().join("incusd.log")).unwrap();
        let child = Command::new(INCUSD)
            .args(["--group", "root"])
            .env("INCUS_DIR", dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let (bridge, subnet) = free_bridge();
        let d = IncusDaemon {
            dir,
            child,
            bridge,
            subnet,
        };
        let ready = d.incus(&["admin", "waitready", "--timeout", "60"]);
        assert!(ready.status.success(), "incusd did not start: {}", d.log());
        let preseed = format!(
            "networks:\n- name: {b}\n  type: bridge\n  config:\n    ipv4.address: {s}.1/24\n    ipv4.nat: \"false\"\n    ipv6.address: none\nstorage_pools:\n- name: default\n  driver: dir\nprofiles:\n- name: default\n  devices:\n    root: {{path: /, pool: default, type: disk}}\n    eth0: {{name: eth0, network: {b}, type: nic}}\n",
            b = d.bridge,
            s = d.subnet
        );
        let out = d.incus_stdin(&["admin", "init", "--preseed"], preseed.as_bytes());
        assert!(out.status.success(), "incus admin init: {}", text(&out));
        d
    }

    /// The daemon's Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("unix.socket")
    }

    /// Its directory (`INCUS_DIR`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The managed bridge instances are attached to.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The bridge's /24, as `10.x.y`.
    pub fn subnet(&self) -> &str {
        &self.subnet
    }

    /// Runs the `incus` client against this daemon.
    pub fn incus(&self, args: &[&str]) -> Output {
        self.incus_stdin(args, b"")
    }

    /// Runs the `incus` client with `stdin`.
    pub fn incus_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        use std::io::Write;
        let mut c = Command::new("incus")
            .args(args)
            .env("INCUS_DIR", self.dir.path())
            .env("INCUS_CONF", self.dir.path().join("client"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _ = c.stdin.take().unwrap().write_all(stdin);
        c.wait_with_output().unwrap()
    }

    /// Listens on HTTPS at `127.0.0.1:port` too and trusts the client
    /// certificate `client_cert` (PEM); the server's certificate (PEM).
    pub fn serve_https(&self, port: u16, client_cert: &Path) -> String {
        let addr = format!("127.0.0.1:{port}");
        let out = self.incus(&["config", "set", "core.https_address", &addr]);
        assert!(out.status.success(), "{}", text(&out));
        let cert = client_cert.to_str().unwrap();
        let out = self.incus(&[
            "config",
            "trust",
            "add-certificate",
            cert,
            "--name",
            "kennel",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "incusd did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::fs::read_to_string(self.dir.path().join("server.crt")).unwrap()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("incusd.log")).unwrap_or_default()
    }
}

impl Drop for IncusDaemon {
    fn drop(&mut self) {
        // Instances first (LXC keeps containers running without incusd),
        // then the daemon, its bridge and its mounts.
        let _ = self.incus(&["stop", "--all", "--force"]);
        let _ = self.incus(&["admin", "shutdown", "--timeout", "20"]);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let dir = self.dir.path().to_string_lossy().into_owned();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&dir))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
    }
}

/// A bridge name and a 10.x.y /24 that no interface or route uses yet.
fn free_bridge() -> (String, String) {
    let routes = Command::new("ip")
        .args(["-4", "route", "show", "table", "all"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let addrs = Command::new("ip")
        .args(["-4", "addr"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let seed = std::process::id() as usize
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as usize)
            .unwrap_or(0);
    for i in 0..200 {
        let n = (seed + i * 7919) % 40_000;
        let subnet = format!("10.{}.{}", 180 + n / 256 % 70, n % 256);
        if !routes.contains(&format!("{subnet}.")) && !addrs.contains(&format!("{subnet}.")) {
            let bridge = format!("kinc{}", n % 100_000);
            return (bridge, subnet);
        }
    }
    panic!("no free 10.x.y.0/24 for a test bridge");
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
