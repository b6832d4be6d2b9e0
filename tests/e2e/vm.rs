//! End to end on real guests: `kennel serve` and `kennel exec` with QEMU
//! (TCG here), the C or Rust virtiofsd, and OpenSSH's client.
//!
//! Needs root, qemu-system-x86_64, qemu-img, virtiofsd, ssh, mmdebstrap;
//! enabled by the `vm-tests` feature (the README's test command turns it
//! on and installs them). Images come from the shared test cache
//! (`$KENNEL_TEST_CACHE`, default `~/.cache/kennel/test-data`), built on
//! demand by content hash.
#![cfg(feature = "vm-tests")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Instant;

use crate::support::{vm_pid, vm_running, Kennel, Netns, Steps};

#[test]
fn lifecycle_isolation_and_adoption_on_real_guests() {
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    k.start_serve();

    // A source owned by a host user (not root), with a file in it.
    let src = tmp.path().join("kennel-data/projects/alpha");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("from-host.txt"), "hello from the host\n").unwrap();
    for p in [&src, &src.join("from-host.txt")] {
        std::os::unix::fs::chown(p, Some(4242), Some(4242)).unwrap();
    }

    let mut steps = Steps::new("lifecycle_isolation_and_adoption_on_real_guests");
    steps.run("new project alpha adopts it", || {
        let t = Instant::now();
        let out =
            k.exec_ok("new project alpha --adopt --stack base --cpus 1 --memory 512M --disk 4G");
        eprintln!("new project alpha: {:?}", t.elapsed());
        assert!(out.contains("ssh alpha@127.0.0.1"), "{out}");
    });

    // In the VM: dev has the source owner's uid; host files are visible;
    // files dev creates belong to that owner on the host.
    steps.run("In the VM: dev has the source owner's uid", || {
        let id = k.ssh_ok("alpha", "id -u; cat /workspace/from-host.txt; echo made-in-vm > /workspace/from-guest.txt; mountpoint /workspace");
        assert!(id.starts_with("4242\nhello from the host\n"), "{id}");
        let meta = std::fs::metadata(src.join("from-guest.txt")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4242, 4242));
        // Edits on the host show at once (no cache).
        std::fs::write(src.join("from-host.txt"), "edited\n").unwrap();
        assert_eq!(
            k.ssh_ok("alpha", "cat /workspace/from-host.txt"),
            "edited\n"
        );
    });

    // Under emulation guests see x86-64-v2 (vm.emulated_cpu unset), not
    // TCG's `max`, whose AVX2 and the like QEMU emulates slowly.
    steps.run("Under emulation the guest's CPU is x86-64-v2", || {
        let pid = vm_pid(&k, "alpha").unwrap();
        let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let argv: Vec<String> = argv
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let cpu = argv
            .iter()
            .position(|a| a == "-cpu")
            .and_then(|i| argv.get(i + 1))
            .unwrap();
        let flags = k.ssh_ok("alpha", "grep -m1 '^flags' /proc/cpuinfo");
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        if cpu != "host" {
            assert_eq!(cpu, kennel_provisioner::vmm::qemu::TCG_CPU);
            assert!(has("sse4_2") && has("popcnt") && has("ssse3"), "{flags}");
            assert!(!has("avx2") && !has("avx"), "{flags}");
        }
    });

    // The root disk persists across stop and start.
    steps.run("The root disk persists across stop and start", || {
        k.ssh_ok("alpha", "echo kept > /home/dev/persist");
        k.exec_ok("stop alpha");
        assert!(!vm_running(&k, "alpha"));
        k.exec_ok("start alpha");
        assert_eq!(k.ssh_ok("alpha", "cat /home/dev/persist"), "kept\n");
    });

    // A second VM; neither can reach the other.
    steps.run("A second VM; neither can reach the other", || {
        k.exec_ok("new project beta --stack base --cpus 1 --memory 512M --disk 4G");
        k.ssh_ok("beta", "true");
        // beta's forwards listen on the host at its own 127.77.x.y only. From alpha,
        // that address is alpha's own loopback; 10.0.2.2 is the host's
        // 127.0.0.1; the host's external address does not have them either.
        let beta = k.addr("beta").replace(':', "/");
        let port = beta.rsplit('/').next().unwrap().to_owned();
        let mut targets = vec![beta.clone(), format!("10.0.2.2/{port}")];
        let host_ips = Command::new("hostname").arg("-I").output().unwrap();
        if let Some(ip) = String::from_utf8_lossy(&host_ips.stdout)
            .split_whitespace()
            .find(|ip| ip.contains('.'))
        {
            targets.push(format!("{ip}/{port}"));
        }
        for target in &targets {
            let out = k.ssh(
                "alpha",
                &format!("timeout 3 bash -c '</dev/tcp/{target}' && echo REACHED"),
            );
            assert!(
                !String::from_utf8_lossy(&out.stdout).contains("REACHED"),
                "alpha reached {target}"
            );
        }
    });

    // Kennel killed outright: the VMs keep running and are adopted.
    steps.run("Kennel killed outright", || {
        k.kill_serve("-KILL");
        assert!(vm_running(&k, "alpha") && vm_running(&k, "beta"));
        k.start_serve();
        let status = k.exec_ok("--json status alpha");
        let v: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
        assert_eq!(v["project"]["state"], "running", "{v}");
        assert_eq!(v["vm"]["ready"], true, "{v}");
        assert_eq!(k.ssh_ok("alpha", "cat /home/dev/persist"), "kept\n");
    });

    // Destroy: VM, disk and keys go; the source stays.
    steps.run("Destroy", || {
        k.exec_ok("rm alpha --yes");
        k.exec_ok("rm beta --yes");
        assert!(!vm_running(&k, "alpha") && !vm_running(&k, "beta"));
        assert!(std::fs::read_dir(tmp.path().join("kennel-data/vms"))
            .unwrap()
            .next()
            .is_none());
        assert_eq!(
            std::fs::read_to_string(src.join("from-guest.txt")).unwrap(),
            "made-in-vm\n"
        );
    });
    steps.finish();
}

#[test]
fn a_vm_that_never_becomes_ready_is_rolled_back() {
    let tmp = tempfile::tempdir().unwrap();
    let k = Kennel::new(tmp.path());
    let out = k
        .cmd()
        .env("KENNEL_VM__BOOT_TIMEOUT_SECS", "1")
        .args([
            "exec",
            "new project slow --stack base --memory 512M --disk 2G",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("did not become ready within 1 s"), "{text}");
    assert!(!vm_running(&k, "slow"));
    assert!(std::fs::read_dir(tmp.path().join("kennel-data/vms"))
        .unwrap()
        .next()
        .is_none());
    assert!(!tmp.path().join("kennel-data/keys/projects/slow").exists());
    assert!(
        tmp.path().join("kennel-data/projects/slow").exists(),
        "the source stays"
    );
    let projects = k.exec_ok("--json projects");
    assert!(projects.contains("\"projects\":[]"), "{projects}");
}

#[test]
fn bridge_mode_isolates_vms_in_a_namespace() {
    let ns = Netns::new();
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    k.netns = Some(ns.0.clone());
    k.network = "bridge";
    k.exec_ok("new project bra --stack base --cpus 1 --memory 512M --disk 2G");
    k.exec_ok("new project brb --stack base --cpus 1 --memory 512M --disk 2G");
    let (a, b) = (k.addr("bra"), k.addr("brb"));
    assert!(a.starts_with("10.90.0.") && a.ends_with(":22"), "{a}");
    let b_ip = b.trim_end_matches(":22").to_owned();
    // The host side reaches both VMs directly.
    assert_eq!(k.ssh_ok("brb", "hostname"), "brb\n");
    let addrs = k.ssh_ok("bra", "ip -br addr show eth0");
    assert!(addrs.contains(a.trim_end_matches(":22")), "{addrs}");
    // VM to VM is blocked on the bridge (isolated ports).
    let out = k.ssh(
        "bra",
        &format!("timeout 3 bash -c '</dev/tcp/{b_ip}/22' && echo REACHED"),
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("REACHED"),
        "bra reached brb"
    );
    // The host's own services are out of reach from the bridge, but for
    // Kennel's gateways: a listener on another port, and one on the
    // HTTPS gateway's port, both on all the host's addresses.
    let listen = |port: u16| {
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "python3", "-c"])
            .arg(format!(
                "import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('0.0.0.0', {port}))\ns.listen()\ntime.sleep(60)"
            ))
            .spawn()
            .unwrap()
    };
    let mut other = listen(17777);
    let mut gateway = listen(k.https_port);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let reach = |port: u16| {
        let out = k.ssh(
            "bra",
            &format!("timeout 3 bash -c '</dev/tcp/10.90.0.1/{port}' && echo REACHED"),
        );
        String::from_utf8_lossy(&out.stdout).contains("REACHED")
    };
    let (to_other, to_gateway) = (reach(17777), reach(k.https_port));
    let _ = (other.kill(), gateway.kill());
    let _ = (other.wait(), gateway.wait());
    assert!(!to_other, "a guest reached a host service on the bridge");
    assert!(to_gateway, "a guest could not reach Kennel's HTTPS gateway");
    let links = Command::new("ip")
        .args(["netns", "exec", &ns.0, "bridge", "-d", "link"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&links.stdout)
            .matches("isolated on")
            .count(),
        2
    );
    let rules = Command::new("ip")
        .args([
            "netns", "exec", &ns.0, "nft", "list", "table", "inet", "kennel",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&rules.stdout).contains("masquerade"));
    k.exec_ok("rm bra --yes");
    k.exec_ok("rm brb --yes");
    let links = Command::new("ip")
        .args(["netns", "exec", &ns.0, "ip", "-br", "link"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("kt"),
        "TAPs are removed with their VMs"
    );
}
