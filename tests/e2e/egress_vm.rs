//! Egress policy on a real guest (QEMU, user-mode networking and Kennel's
//! bridge), with Kennel
//! in a network namespace of its own and a "world" namespace standing for
//! the internet: dnsmasq answering `*.world.test` and a web server on
//! three addresses (IPv4 and IPv6), nothing outside this machine.
//!
//! open reaches it all; closed reaches none of it, by name, by address,
//! over IPv6 or through another resolver, while Kennel's metadata service
//! still answers; the name's owner is asked; an allow lets exactly that
//! name through; a deny is remembered (NXDOMAIN, even from the world's own
//! resolver, which the guest cannot reach); allow-once runs out; turning
//! open again lets everything through.

#![cfg(feature = "vm-tests")]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kennel_testkit::require;

use crate::support::Kennel;

/// A network namespace with a name of its own, removed when dropped.
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Self {
        let name = format!("kennel-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Self(name)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.0));
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills a child when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The world: `world` namespace joined to `kennel`'s by a veth pair,
/// 198.18.0.2 (DNS and web), .3 and .4 (web), 2001:2::2 (web).
fn world(kennel: &Ns, world: &Ns, root: &std::path::Path, tag: char) -> Vec<Killed> {
    require("dnsmasq", "dnsmasq-base");
    require("python3", "python3");
    let (k, w) = (&kennel.0, &world.0);
    let (vk, vw) = (
        format!("{tag}k{}", std::process::id()),
        format!("{tag}w{}", std::process::id()),
    );
    run(
        "ip",
        &["link", "add", &vk, "type", "veth", "peer", "name", &vw],
    );
    run("ip", &["link", "set", &vk, "netns", k]);
    run("ip", &["link", "set", &vw, "netns", w]);
    run("ip", &["-n", k, "addr", "add", "198.18.0.1/24", "dev", &vk]);
    run(
        "ip",
        &["-n", k, "addr", "add", "2001:2::1/64", "dev", &vk, "nodad"],
    );
    run("ip", &["-n", k, "link", "set", &vk, "up"]);
    run(
        "ip",
        &["-n", k, "route", "add", "default", "via", "198.18.0.2"],
    );
    for a in ["198.18.0.2/24", "198.18.0.3/24", "198.18.0.4/24"] {
        run("ip", &["-n", w, "addr", "add", a, "dev", &vw]);
    }
    run(
        "ip",
        &["-n", w, "addr", "add", "2001:2::2/64", "dev", &vw, "nodad"],
    );
    run("ip", &["-n", w, "link", "set", &vw, "up"]);
    // Kennel's namespace resolves through the world's DNS.
    let etc = PathBuf::from(format!("/etc/netns/{k}"));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("resolv.conf"), "nameserver 198.18.0.2\n").unwrap();
    let web = root.join("www");
    std::fs::create_dir_all(&web).unwrap();
    std::fs::write(web.join("hello"), "hello from the world\n").unwrap();
    let dns = Command::new("ip")
        .args([
            "netns",
            "exec",
            w,
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
        ])
        .args([
            "--listen-address=198.18.0.2",
            "--bind-interfaces",
            "--port=53",
            "--user=root",
        ])
        .arg(format!("--pid-file={}", root.join("dnsmasq.pid").display()))
        .args([
            "--address=/api.world.test/198.18.0.2",
            "--address=/other.world.test/198.18.0.3",
            "--address=/once.world.test/198.18.0.4",
            "--address=/v6.world.test/2001:2::2",
            "--local-ttl=30",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = Command::new("ip")
        .args([
            "netns",
            "exec",
            w,
            "python3",
            "-m",
            "http.server",
            "80",
            "--bind",
            "::",
        ])
        .current_dir(&web)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    vec![Killed(dns), Killed(http)]
}

fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// What `curl` in the guest got from `url` (its body, or `FAILED: why`).
fn fetch(k: &Kennel, url: &str) -> String {
    let out = k.ssh("eg", &format!("curl -sS -g -m 8 {url} 2>&1 || echo FAILED"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn reached(k: &Kennel, url: &str) -> bool {
    fetch(k, url).contains("hello from the world")
}

/// The response code the guest gets asking `server` (over TCP, by hand)
/// for other.world.test's A record: 0 answered, 3 NXDOMAIN, 5 REFUSED.
fn rcode_from(k: &Kennel, server: &str) -> String {
    let query = r"\x00\x22\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05other\x05world\x04test\x00\x00\x01\x00\x01";
    let out = k.ssh(
        "eg",
        &format!(
            "exec 3<>/dev/tcp/{server}/53 && printf '{query}' >&3 && timeout 5 head -c 6 <&3 | od -An -tu1 | awk '{{print $6 % 16}}'"
        ),
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn a_closed_project_reaches_only_what_its_owner_allows() {
    scenario("user");
}

/// The same on Kennel's bridge (a TAP per VM, what Cloud Hypervisor
/// uses): the rules match the guest's address on the forward path. The
/// bridge has no IPv6 and the host no resolver for guests, so the open
/// part reaches the world by address only.
#[test]
fn a_closed_bridged_project_reaches_only_what_its_owner_allows() {
    scenario("bridge");
}

fn scenario(network: &'static str) {
    let user = network == "user";
    let tmp = tempfile::tempdir().unwrap();
    let kns = Ns::new(&format!("egk{network}"));
    let wns = Ns::new(&format!("egw{network}"));
    let _world = world(&kns, &wns, tmp.path(), if user { 'e' } else { 'b' });
    let mut k = Kennel::new(tmp.path());
    k.netns = Some(kns.0.clone());
    k.network = network;
    k.env.push(("KENNEL_VM__EGRESS_ONCE".into(), "20s".into()));
    k.start_serve_logged(&tmp.path().join("serve.log"));
    k.exec_ok("new project eg --stack base --cpus 1 --memory 512M --disk 2G");

    // Open (the default): the world by name, by address, over IPv6.
    let first = if user {
        "http://api.world.test/hello"
    } else {
        "http://198.18.0.2/hello"
    };
    let mut last = String::new();
    let t = Instant::now();
    while !last.contains("hello from the world") {
        if t.elapsed() > Duration::from_secs(60) {
            let diag = k.ssh("eg", "cat /etc/resolv.conf; curl -sS -m 5 http://198.18.0.2/hello; getent ahosts api.world.test; ip route");
            panic!(
                "the world does not answer the open guest: {last}\n{}{}",
                String::from_utf8_lossy(&diag.stdout),
                String::from_utf8_lossy(&diag.stderr)
            );
        }
        last = fetch(&k, first);
    }
    assert!(reached(&k, "http://198.18.0.3/hello"));
    if user {
        assert!(
            reached(&k, "http://[2001:2::2]/hello"),
            "{}",
            fetch(&k, "http://[2001:2::2]/hello")
        );
    }
    assert_eq!(
        rcode_from(&k, "198.18.0.2"),
        "0",
        "the world's resolver answers an open guest"
    );

    // Closed, applied to the running VM.
    let out = k.exec_ok("egress eg closed");
    assert!(out.contains("only what its list allows"), "{out}");
    let status = k.exec_ok("status eg");
    assert!(status.contains("closed"), "{status}");
    let by_name = fetch(&k, "http://api.world.test/hello");
    assert!(
        !by_name.contains("hello from"),
        "closed, by name: {by_name}"
    );
    assert!(
        !reached(&k, "http://198.18.0.3/hello"),
        "closed, by address"
    );
    assert!(
        !reached(&k, "http://[2001:2::2]/hello"),
        "closed, over IPv6"
    );
    // Another resolver is Kennel's too: the name was not decided on.
    assert_eq!(
        rcode_from(&k, "198.18.0.2"),
        "5",
        "the world's resolver reached from a closed guest"
    );
    assert_eq!(
        rcode_from(&k, "203.0.113.53"),
        "5",
        "a made-up resolver reached from a closed guest"
    );
    // Kennel's own metadata service still answers.
    eventually(
        Duration::from_secs(90),
        "the metadata service answers a closed guest",
        || {
            let out = k.ssh(
                "eg",
                "curl -sS -m 20 http://metadata.kennel.internal/kennel/v1/me",
            );
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|me| me["project"] == "eg")
        },
    );
    // The owner was asked about the name.
    eventually(Duration::from_secs(30), "the ask is on record", || {
        k.exec_ok("egress eg")
            .contains("Asked, not decided yet: api.world.test")
    });
    // The refusals are counted, per project, in Kennel's metrics.
    eventually(
        Duration::from_secs(40),
        "denied connections in the metrics",
        || {
            let out = Command::new("ip")
                .args(["netns", "exec", &kns.0, "curl", "-sS", "-m", "5"])
                .arg("http://127.0.0.1:9464/metrics")
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).lines().any(|l| {
                l.starts_with("kennel_egress_denied_total{project=\"eg\"}")
                    && l.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()) > Some(0.0)
            })
        },
    );

    // Allowed: exactly that name.
    k.exec_ok("egress eg allow api.world.test");
    eventually(Duration::from_secs(30), "the allowed name answers", || {
        reached(&k, "http://api.world.test/hello")
    });
    assert!(
        !reached(&k, "http://other.world.test/hello"),
        "a name not allowed"
    );
    assert!(
        !reached(&k, "http://198.18.0.3/hello"),
        "an address not allowed"
    );
    // Denied: remembered, and said as NXDOMAIN by whichever server.
    k.exec_ok("egress eg deny other.world.test");
    assert_eq!(rcode_from(&k, "198.18.0.2"), "3");
    let shown = k.exec_ok("egress eg");
    assert!(
        shown.contains("other.world.test") && shown.contains("deny"),
        "{shown}"
    );
    // A block by address, on one port.
    k.exec_ok("egress eg allow 198.18.0.3:80");
    assert!(reached(&k, "http://198.18.0.3/hello"));

    // Allow-once (20 s here) runs out.
    k.exec_ok("egress eg allow-once once.world.test");
    assert!(reached(&k, "http://once.world.test/hello"));
    std::thread::sleep(Duration::from_secs(23));
    assert!(
        !reached(&k, "http://198.18.0.4/hello"),
        "allow-once still lets it through"
    );
    assert!(
        !reached(&k, "http://once.world.test/hello"),
        "allow-once still resolves"
    );

    // A restart keeps the policy (the table and resolver come back).
    k.exec_ok("restart eg");
    eventually(
        Duration::from_secs(120),
        "the allowed name after a restart",
        || reached(&k, "http://api.world.test/hello"),
    );
    assert!(!reached(&k, "http://[2001:2::2]/hello"));

    // Open again: everything.
    k.exec_ok("egress eg open");
    if user {
        assert!(reached(&k, "http://[2001:2::2]/hello"));
    }
    assert!(reached(&k, "http://198.18.0.4/hello"));
    // A closed VM's refusals were counted.
    let audit = k.exec_ok("egress eg");
    assert!(audit.contains("(open)"), "{audit}");
    k.exec_ok("rm eg --yes");
}
