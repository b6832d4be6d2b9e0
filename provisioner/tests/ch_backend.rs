//! The Cloud Hypervisor client and backend against the CH API double.
//!
//! This test binary is also the fake `cloud-hypervisor`: started with
//! `--api-socket path=X` it serves the double on X until `vmm.shutdown`.
//! So the backend spawns a real process, waits for its socket, and drives
//! it exactly as it would drive cloud-hypervisor.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kennel_provisioner::vmm::ch::client::{ChApiError, ChClient};
use kennel_provisioner::vmm::ch::types::{RestoreConfig, VmResize, VmSnapshotConfig, VmState};
use kennel_provisioner::vmm::ch::{vm_config, CloudHypervisor};
use kennel_provisioner::vmm::{Machine, NetAttach, Vmm, VmmError, VmmState};
use kennel_testkit::ch_double::{ChDouble, State};

fn machine(dir: &Path, net: NetAttach) -> Machine {
    Machine {
        name: "demo".into(),
        vcpus: 2,
        memory_mib: 512,
        kernel: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.cpio"),
        cmdline: "console=ttyS0 root=/dev/vda".into(),
        disk: dir.join("disk.qcow2"),
        config_disk: dir.join("config.img"),
        virtiofs_socket: dir.join("virtiofs.sock"),
        console_log: dir.join("console.log"),
        control_socket: dir.join("ch.sock"),
        pid_file: dir.join("vmm.pid"),
        vmm_log: dir.join("vmm.log"),
        net,
    }
}

fn tap() -> NetAttach {
    NetAttach::Tap {
        tap: "kt-demo".into(),
        mac: "52:54:00:12:34:56".into(),
        guest_ip: "10.90.0.2".into(),
        prefix: 24,
        gateway: "10.90.0.1".into(),
    }
}

/// Something listening on the virtio-fs socket path, as virtiofsd would.
fn fake_virtiofsd(path: &Path) -> std::os::unix::net::UnixListener {
    std::os::unix::net::UnixListener::bind(path).unwrap()
}

fn api_status(e: &ChApiError) -> (u16, String) {
    match e {
        ChApiError::Api {
            status, messages, ..
        } => (*status, messages.join(" | ")),
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn client_covers_the_api_and_maps_errors() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("api.sock");
    let double = ChDouble::start(&sock).await.unwrap();
    let c = ChClient::new(&sock);
    let m = machine(d.path(), tap());
    let _vfs = fake_virtiofsd(&m.virtiofs_socket);

    assert_eq!(c.ping().await.unwrap().version, "54.0.0");
    // Nothing created yet: 404s, outermost message first.
    let (status, msg) = api_status(&c.info().await.unwrap_err());
    assert_eq!(status, 404);
    assert!(msg.starts_with("Error from API"), "{msg}");
    assert_eq!(api_status(&c.boot().await.unwrap_err()).0, 404);

    c.create(&vm_config(&m).unwrap()).await.unwrap();
    let (status, msg) = api_status(&c.create(&vm_config(&m).unwrap()).await.unwrap_err());
    assert_eq!(
        (status, msg.contains("already created")),
        (500, true),
        "{msg}"
    );
    let (status, msg) = api_status(&c.pause().await.unwrap_err());
    assert_eq!(status, 500, "{msg}");

    c.boot().await.unwrap();
    let info = c.info().await.unwrap();
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.config.memory.unwrap().shared, Some(true));
    c.resize(&VmResize {
        desired_vcpus: Some(2),
        ..VmResize::default()
    })
    .await
    .unwrap();
    c.pause().await.unwrap();
    assert_eq!(c.info().await.unwrap().state, VmState::Paused);
    c.snapshot(&VmSnapshotConfig {
        destination_url: "file:///snap".into(),
    })
    .await
    .unwrap();
    c.resume().await.unwrap();
    c.power_button().await.unwrap();
    c.reboot().await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(c.info().await.unwrap().state, VmState::Shutdown);
    assert_eq!(api_status(&c.shutdown().await.unwrap_err()).0, 500);
    c.delete().await.unwrap();
    assert_eq!(double.state().await, State::NotCreated);
    c.restore(&RestoreConfig {
        source_url: "file:///snap".into(),
        prefault: None,
        resume: Some(true),
    })
    .await
    .unwrap();
    assert_eq!(c.info().await.unwrap().state, VmState::Running);

    // Every body the client sent passed the double's spec checks; the
    // create body carries what a real CH needs.
    let reqs = double.requests().await;
    let create = reqs
        .iter()
        .find(|r| r.endpoint == "vm.create")
        .unwrap()
        .body
        .clone()
        .unwrap();
    assert_eq!(create["memory"]["shared"], true);
    assert_eq!(create["serial"]["mode"], "File");
    assert_eq!(create["console"]["mode"], "Off");
    assert_eq!(create["disks"][0]["image_type"], "Qcow2");
    assert_eq!(create["disks"][0]["backing_files"], true);
    assert_eq!(create["disks"][1]["readonly"], true);
    assert_eq!(create["fs"][0]["tag"], "workspace");
    assert!(
        create["net"][0].get("ip").is_none(),
        "the TAP is on the bridge; no host IP on it"
    );
    assert!(reqs
        .iter()
        .all(|r| r.method == "PUT" || r.endpoint == "vm.info" || r.endpoint == "vmm.ping"));

    // vmm.shutdown answers 200 with an empty body, and the server goes away.
    c.vmm_shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(matches!(c.ping().await, Err(ChApiError::Connect { .. })));
}

async fn the_virtiofs_trap_is_real_and_the_backend_avoids_it() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("api.sock");
    let double = ChDouble::start_with_trap(&sock, Duration::from_millis(300))
        .await
        .unwrap();
    let c = ChClient::new(&sock);
    let m = machine(d.path(), tap());
    // A client that boots without the socket trips it: the API blocks.
    c.create(&vm_config(&m).unwrap()).await.unwrap();
    let t = Instant::now();
    let e = c.boot().await.unwrap_err();
    assert!(api_status(&e).1.contains("vhost-user socket"), "{e}");
    assert!(double.trapped().await);
    assert!(t.elapsed() >= Duration::from_millis(250));

    // The backend refuses to boot without the socket, before spawning anything.
    let ch = CloudHypervisor {
        binary: std::env::current_exe().unwrap(),
    };
    let d2 = tempfile::tempdir().unwrap();
    let m2 = machine(d2.path(), tap());
    let e = ch.boot(&m2).await.unwrap_err();
    assert!(
        matches!(e, VmmError::NoSocket(ref p) if p.ends_with("virtiofs.sock")),
        "{e}"
    );
    assert!(!m2.pid_file.exists(), "nothing was started");
}

async fn backend_boots_reports_and_force_stops_a_vmm_process() {
    let d = tempfile::tempdir().unwrap();
    let m = machine(d.path(), tap());
    let _vfs = fake_virtiofsd(&m.virtiofs_socket);
    let ch = CloudHypervisor {
        binary: std::env::current_exe().unwrap(),
    };
    let t = Instant::now();
    let pid = ch.boot(&m).await.unwrap();
    eprintln!(
        "    spawned fake cloud-hypervisor {pid}, booted in {:?}",
        t.elapsed()
    );
    assert_eq!(
        std::fs::read_to_string(&m.pid_file).unwrap().trim(),
        pid.to_string()
    );
    assert_eq!(ch.state(&m).await.unwrap(), VmmState::Running);
    ch.force_stop(&m).await.unwrap();
    assert_eq!(ch.state(&m).await.unwrap(), VmmState::Gone);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z")
    );
}

/// `resize`: the disk through `vm.resize-disk`, CPUs through `vm.resize`
/// only within the `max_vcpus` the VM booted with, memory never (Kennel
/// boots without a hotplug size) — bodies exactly as the spec has them.
async fn resize_uses_resize_disk_and_resize_where_they_apply() {
    let d = tempfile::tempdir().unwrap();
    let m = machine(d.path(), tap());
    let double = ChDouble::start(&m.control_socket).await.unwrap();
    let _vfs = fake_virtiofsd(&m.virtiofs_socket);
    let c = ChClient::new(&m.control_socket);
    c.create(&vm_config(&m).unwrap()).await.unwrap();
    c.boot().await.unwrap();
    let ch = CloudHypervisor {
        binary: PathBuf::from("/nonexistent"),
    };
    ch.grow_disk(&m, 30 << 30).await.unwrap();
    assert_eq!(double.disk_size("root").await, Some(30 << 30));
    // Fewer CPUs fit under max_vcpus; more, or more memory, wait.
    assert_eq!(ch.resize_live(&m, 1, 512).await.unwrap(), (true, true));
    assert_eq!(ch.resize_live(&m, 4, 1024).await.unwrap(), (false, false));
    let reqs = double.requests().await;
    let bodies: Vec<(String, serde_json::Value)> = reqs
        .iter()
        .filter(|r| r.endpoint.starts_with("vm.resize"))
        .map(|r| (r.endpoint.clone(), r.body.clone().unwrap()))
        .collect();
    assert_eq!(
        bodies,
        vec![
            (
                "vm.resize-disk".to_owned(),
                serde_json::json!({"id": "root", "desired_size": 30i64 << 30})
            ),
            (
                "vm.resize".to_owned(),
                serde_json::json!({"desired_vcpus": 1})
            ),
        ]
    );
    // What the double refuses, as a real CH does.
    let e = c
        .resize(&VmResize {
            desired_vcpus: Some(8),
            ..VmResize::default()
        })
        .await
        .unwrap_err();
    assert_eq!(api_status(&e).0, 500);
    let e = c
        .resize_disk(&kennel_provisioner::vmm::ch::types::VmResizeDisk {
            id: Some("nope".into()),
            desired_size: Some(1 << 30),
        })
        .await
        .unwrap_err();
    assert_eq!(api_status(&e).0, 404);
}

async fn user_networking_and_missing_shared_memory_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let user = machine(
        d.path(),
        NetAttach::User {
            host_ip: "127.77.0.2".into(),
            ssh_port: 10022,
            app_port: 18080,
            guest_app_port: 8080,
        },
    );
    let e = vm_config(&user).unwrap_err();
    assert!(e.to_string().contains("no user-mode networking"), "{e}");

    let sock = d.path().join("api.sock");
    let _double = ChDouble::start(&sock).await.unwrap();
    let c = ChClient::new(&sock);
    let m = machine(d.path(), tap());
    let _vfs = fake_virtiofsd(&m.virtiofs_socket);
    let mut cfg = vm_config(&m).unwrap();
    cfg.memory.as_mut().unwrap().shared = None;
    c.create(&cfg).await.unwrap();
    let (status, msg) = api_status(&c.boot().await.unwrap_err());
    assert_eq!(status, 500);
    assert!(msg.contains("shared memory"), "{msg}");
}

/// Fake `cloud-hypervisor --api-socket path=X`: serve the double on X.
fn fake_cloud_hypervisor(arg: &str) {
    let path = PathBuf::from(arg.strip_prefix("path=").unwrap_or(arg));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let _double = ChDouble::start(&path).await.unwrap();
        // The double removes its socket when vmm.shutdown stops it.
        while path.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--api-socket") {
        fake_cloud_hypervisor(args.get(i + 1).map_or("", String::as_str));
        return;
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    type Case = (
        &'static str,
        fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>,
    );
    let cases: Vec<Case> = vec![
        ("client_covers_the_api_and_maps_errors", || {
            Box::pin(client_covers_the_api_and_maps_errors())
        }),
        (
            "the_virtiofs_trap_is_real_and_the_backend_avoids_it",
            || Box::pin(the_virtiofs_trap_is_real_and_the_backend_avoids_it()),
        ),
        (
            "backend_boots_reports_and_force_stops_a_vmm_process",
            || Box::pin(backend_boots_reports_and_force_stops_a_vmm_process()),
        ),
        (
            "resize_uses_resize_disk_and_resize_where_they_apply",
            || Box::pin(resize_uses_resize_disk_and_resize_where_they_apply()),
        ),
        (
            "user_networking_and_missing_shared_memory_are_refused",
            || Box::pin(user_networking_and_missing_shared_memory_are_refused()),
        ),
    ];
    let (mut passed, mut failed) = (0, 0);
    for (name, case) in cases {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let result = std::panic::catch_unwind(|| {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(case());
        });
        if result.is_ok() {
            println!("test {name} ... ok");
            passed += 1;
        } else {
            println!("test {name} ... FAILED");
            failed += 1;
        }
    }
    println!("\n{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
