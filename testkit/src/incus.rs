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
        prerequisites();
        // Under /var/tmp, not /tmp: incusd mounts into its directory and
        // some hosts mount /tmp noexec/nosuid.
        let dir = tempfile::Builder::new()
            .prefix("kennel-incus-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let child = spawn_incusd(dir.path(), None);
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
        // Creating the bridge, incusd reads every interface of the host;
        // another test's daemon deleting a container's veth meanwhile
        // fails it ("ip -d -j link show vethX: Device does not exist").
        // Incus reverts the half-made network: the same preseed again.
        let mut attempt = 0;
        loop {
            let out = d.incus_stdin(&["admin", "init", "--preseed"], preseed.as_bytes());
            if out.status.success() {
                break;
            }
            let why = text(&out);
            attempt += 1;
            assert!(
                attempt < 5 && vanished_interface(&why),
                "incus admin init: {why}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
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
        incus_at(self.dir.path(), args, stdin)
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
        kill_mentioning(self.dir.path());
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        unmount_under(self.dir.path());
    }
}

fn prerequisites() {
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
}

/// Starts `incusd` on `dir` (in network namespace `netns`), logging to
/// `dir/incusd.log`.
fn spawn_incusd(dir: &Path, netns: Option<&str>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("incusd.log"))
        .unwrap();
    let mut cmd = match netns {
        // `ip netns exec` execs (through sh) incusd: the child's pid is
        // incusd's. It mounts a fresh sysfs (so /sys/class/net is the
        // namespace's), which hides the cgroup mounts under it: without
        // them LXC cannot set limits ("Failed to setup cgroup limits"),
        // so they are mounted again as this host has them.
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args([
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                &cgroup_mounts_then_exec(),
                INCUSD,
            ]);
            c
        }
        None => Command::new(INCUSD),
    };
    if netns.is_none() {
        cmd.args(["--group", "root"]);
    }
    cmd.env("INCUS_DIR", dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// A shell script that mounts the cgroup filesystems this host has under
/// `/sys/fs/cgroup` (v1, hybrid or v2 alike, read from its mount table)
/// and then execs `$0` with `--group root`.
fn cgroup_mounts_then_exec() -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut script = String::from("set -e\n");
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [source, target, fstype, options, ..] = f.as_slice() else {
            continue;
        };
        if !(target.starts_with("/sys/fs/cgroup")
            && matches!(*fstype, "tmpfs" | "cgroup" | "cgroup2"))
        {
            continue;
        }
        // The tmpfs holding the hierarchies is often read-only: the
        // directories for them are made in it first.
        let options = if *fstype == "tmpfs" {
            options
                .split(',')
                .map(|o| if o == "ro" { "rw" } else { o })
                .collect::<Vec<_>>()
                .join(",")
        } else {
            (*options).to_owned()
        };
        // Mount table fields have no spaces or quotes (they are escaped
        // as octal): safe inside single quotes.
        script.push_str(&format!(
            "mkdir -p '{target}'; mount -t '{fstype}' -o '{options}' '{source}' '{target}'\n"
        ));
    }
    script.push_str("exec \"$0\" --group root\n");
    script
}

/// Runs the `incus` client against the daemon of `dir`.
fn incus_at(dir: &Path, args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut c = Command::new("incus")
        .args(args)
        .env("INCUS_DIR", dir)
        .env("INCUS_CONF", dir.join("client"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = c.stdin.take().unwrap().write_all(stdin);
    c.wait_with_output().unwrap()
}

/// Unmounts (lazily) everything mounted under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let dir = dir.to_string_lossy().into_owned();
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

/// Ends every process whose command line mentions `dir` (the dnsmasq of
/// a daemon's bridge outlives a killed daemon).
fn kill_mentioning(dir: &Path) {
    let _ = Command::new("pkill")
        .args(["-KILL", "-f", &dir.to_string_lossy()])
        .status();
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

/// Whether incusd failed because an interface went away while it looked
/// at it (a race with another daemon on the same host, not a fault).
fn vanished_interface(why: &str) -> bool {
    why.contains("link show") && why.contains("does not exist")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A cluster of Incus members, each in a network namespace of its own
/// (`10.x.y.11`, `.12`, … on a host bridge at `10.x.y.1`), formed with
/// join tokens like a real one. Members can be killed and revived.
#[derive(Debug)]
pub struct IncusCluster {
    root: tempfile::TempDir,
    bridge: String,
    subnet: String,
    members: Vec<ClusterMember>,
}

#[derive(Debug)]
struct ClusterMember {
    name: String,
    netns: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl IncusCluster {
    /// Starts `n` members and forms the cluster: a `dir` pool and a
    /// bridge for instances on every member, heartbeats that call a
    /// member offline after 11 s (Incus's least).
    pub fn start(n: usize) -> IncusCluster {
        prerequisites();
        let root = tempfile::Builder::new()
            .prefix("kennel-incus-cluster-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let (bridge, subnet) = free_bridge();
        run("ip", &["link", "add", &bridge, "type", "bridge"]);
        run(
            "ip",
            &["addr", "add", &format!("{subnet}.1/24"), "dev", &bridge],
        );
        run("ip", &["link", "set", &bridge, "up"]);
        let mut c = IncusCluster {
            root,
            bridge,
            subnet,
            members: Vec::new(),
        };
        for i in 0..n {
            let name = format!("m{}", i + 1);
            let netns = format!("{}-{name}", c.bridge);
            let veth = format!("{}v{i}", c.bridge);
            run("ip", &["netns", "add", &netns]);
            run(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
                ],
            );
            run("ip", &["link", "set", &veth, "master", &c.bridge, "up"]);
            let addr = format!("{}/24", c.address(i));
            run("ip", &["-n", &netns, "addr", "add", &addr, "dev", "eth0"]);
            run("ip", &["-n", &netns, "link", "set", "eth0", "up"]);
            run("ip", &["-n", &netns, "link", "set", "lo", "up"]);
            let dir = c.root.path().join(&name);
            std::fs::create_dir_all(&dir).unwrap();
            let child = spawn_incusd(&dir, Some(&netns));
            c.members.push(ClusterMember {
                name,
                netns,
                dir,
                child: Some(child),
            });
        }
        for i in 0..n {
            c.wait_ready(i);
            // Listening first, on its own: changing the address restarts
            // the listeners and may cut the answer short (seen on 6.0).
            let listen = format!("{}:8443", c.address(i));
            let _ = c.incus(i, &["config", "set", "core.https_address", &listen], b"");
            let out = c.incus(i, &["config", "get", "core.https_address"], b"");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                listen,
                "{}",
                c.log(i)
            );
        }
        let first = "config: {}\ncluster:\n  server_name: m1\n  enabled: true\nstorage_pools:\n- name: default\n  driver: dir\nnetworks:\n- name: kbr\n  type: bridge\n  config:\n    ipv4.address: 10.250.0.1/24\n    ipv4.nat: \"false\"\n    ipv6.address: none\nprofiles:\n- name: default\n  devices:\n    root: {path: /, pool: default, type: disk}\n    eth0: {name: eth0, network: kbr, type: nic}\n";
        let out = c.incus(0, &["admin", "init", "--preseed"], first.as_bytes());
        assert!(out.status.success(), "m1: {}", text(&out));
        let out = c.incus(
            0,
            &["config", "set", "cluster.offline_threshold", "11"],
            b"",
        );
        assert!(out.status.success(), "{}", text(&out));
        for i in 1..n {
            let name = c.members[i].name.clone();
            let out = c.incus(0, &["cluster", "add", &name, "--quiet"], b"");
            assert!(out.status.success(), "{}", text(&out));
            let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let join = format!(
                "cluster:\n  enabled: true\n  server_name: {name}\n  server_address: {}:8443\n  cluster_token: {token}\n  member_config:\n  - entity: storage-pool\n    name: default\n    key: source\n    value: \"\"\n",
                c.address(i)
            );
            let out = c.incus(i, &["admin", "init", "--preseed"], join.as_bytes());
            assert!(out.status.success(), "{name}: {}\n{}", text(&out), c.log(i));
        }
        c
    }

    /// Member `i`'s name (`m1`, `m2`, …).
    pub fn name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    /// Member `i`'s address on the host bridge.
    pub fn address(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, 11 + i)
    }

    /// Member `i`'s Unix socket (any member answers for the cluster).
    pub fn socket(&self, i: usize) -> PathBuf {
        self.members[i].dir.join("unix.socket")
    }

    /// Runs the `incus` client against member `i`.
    pub fn incus(&self, i: usize, args: &[&str], stdin: &[u8]) -> Output {
        incus_at(&self.members[i].dir, args, stdin)
    }

    /// Member `i`'s daemon log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.members[i].dir.join("incusd.log")).unwrap_or_default()
    }

    fn wait_ready(&self, i: usize) {
        let out = self.incus(i, &["admin", "waitready", "--timeout", "60"], b"");
        assert!(
            out.status.success(),
            "{} did not start: {}",
            self.name(i),
            self.log(i)
        );
    }

    /// Kills member `i`'s daemon outright (its instances keep running,
    /// as when a host's daemon dies).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i`'s daemon again.
    pub fn revive(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "{} runs", self.name(i));
        let m = &self.members[i];
        let child = spawn_incusd(&m.dir, Some(&m.netns));
        self.members[i].child = Some(child);
        self.wait_ready(i);
    }
}

impl Drop for IncusCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                let m = &self.members[i];
                self.members[i].child = Some(spawn_incusd(&m.dir, Some(&m.netns)));
            }
        }
        for i in 0..self.members.len() {
            let _ = self.incus(i, &["admin", "waitready", "--timeout", "20"], b"");
        }
        let _ = self.incus(0, &["stop", "--all", "--force"], b"");
        for i in 0..self.members.len() {
            let _ = self.incus(i, &["admin", "shutdown", "--timeout", "10"], b"");
        }
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        kill_mentioning(self.root.path());
        for m in &self.members {
            let _ = Command::new("ip").args(["netns", "del", &m.netns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
        unmount_under(self.root.path());
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", text(&out));
}
