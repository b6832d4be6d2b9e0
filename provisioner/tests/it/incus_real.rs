//! The Incus client against a real Incus daemon of the test's own
//! (testkit's `IncusDaemon`): an image imported from a tarball, a
//! container created, started, addressed by DHCP, stopped, renamed and
//! deleted; and the same daemon over HTTPS with a client certificate, a
//! pinned server certificate, and what happens when either is wrong.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use kennel_provisioner::incus::api::{
    InstanceSource, InstanceType, InstancesPost, MemberAction, StateAction,
};
use kennel_provisioner::incus::{IncusClient, IncusError};
use kennel_testkit::incus::IncusDaemon;

const LONG: Duration = Duration::from_secs(120);

/// A unified image tarball: `metadata.yaml` and a rootfs of a static
/// busybox whose init asks the bridge for an address.
fn busybox_image(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("image/rootfs");
    for d in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "run", "var",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("/bin/busybox", root.join("sbin/init")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::fs::write(
        root.join("etc/inittab"),
        "::sysinit:/bin/busybox udhcpc -i eth0 -b -s /etc/dhcp.sh\n::respawn:/bin/busybox sleep 3600\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/dhcp.sh"),
        "#!/bin/sh\n[ \"$1\" = bound ] && /bin/busybox ip addr add \"$ip/$mask\" dev \"$interface\"\nexit 0\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        root.join("etc/dhcp.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(
        dir.join("image/metadata.yaml"),
        "architecture: x86_64\ncreation_date: 1700000000\nproperties:\n  description: kennel test busybox\n",
    )
    .unwrap();
    let tarball = dir.join("image.tar.gz");
    let st = std::process::Command::new("tar")
        .args(["-C"])
        .arg(dir.join("image"))
        .args(["--numeric-owner", "-czf"])
        .arg(&tarball)
        .args(["metadata.yaml", "rootfs"])
        .status()
        .unwrap();
    assert!(st.success());
    tarball
}

fn post(name: &str, fingerprint: &str) -> InstancesPost {
    InstancesPost {
        name: name.into(),
        kind: InstanceType::Container,
        source: InstanceSource::image(fingerprint),
        config: BTreeMap::new(),
        devices: BTreeMap::new(),
        profiles: vec!["default".into()],
        description: "kennel test".into(),
        start: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_lives_and_dies_through_the_client() {
    let daemon = IncusDaemon::start();
    let dir = tempfile::tempdir().unwrap();
    let c = IncusClient::unix(&daemon.socket(), "default");

    let s = c.server().await.unwrap();
    assert_eq!(s.auth, "trusted");
    assert!(s.environment.driver.contains("lxc"), "{:?}", s.environment);
    assert_eq!(c.members().await.unwrap(), vec![]);

    let fp = c
        .import_image(&busybox_image(dir.path()), LONG)
        .await
        .unwrap();
    c.add_image_alias("kennel/busybox", &fp).await.unwrap();
    assert_eq!(
        c.image_alias("kennel/busybox")
            .await
            .unwrap()
            .unwrap()
            .target,
        fp
    );
    assert_eq!(c.image(&fp).await.unwrap().unwrap().kind, "container");

    c.create_instance(&post("bb1", &fp), None, LONG)
        .await
        .unwrap();
    let i = c.instance("bb1").await.unwrap().unwrap();
    assert_eq!(i.status, "Running");
    assert_eq!(i.kind, "container");
    // The bridge's DHCP gives it an address in the daemon's subnet.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ip = loop {
        let st = c.instance_state("bb1").await.unwrap();
        assert!(st.running());
        if let Some(ip) = st.ipv4("eth0") {
            break ip;
        }
        assert!(
            Instant::now() < deadline,
            "no address: {st:?}\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        ip.to_string().starts_with(&format!("{}.", daemon.subnet())),
        "{ip}"
    );

    let e = c
        .change_state("bb1", StateAction::Start, false, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(e, IncusError::AlreadyRunning { .. }), "{e}");
    let e = c
        .create_instance(&post("bb1", &fp), None, LONG)
        .await
        .unwrap_err();
    assert!(matches!(e, IncusError::Exists { .. }), "{e}");

    c.change_state("bb1", StateAction::Stop, true, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(!c.instance_state("bb1").await.unwrap().running());
    c.rename_instance("bb1", "bb2", LONG).await.unwrap();
    assert!(c.instance("bb1").await.unwrap().is_none());
    c.change_state("bb2", StateAction::Start, false, Duration::ZERO)
        .await
        .unwrap();
    c.change_state("bb2", StateAction::Stop, true, Duration::from_secs(30))
        .await
        .unwrap();
    c.delete_instance("bb2", LONG).await.unwrap();
    assert!(c.instances().await.unwrap().is_empty());
    let e = c.delete_instance("bb2", LONG).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

fn client_cert(dir: &Path, name: &str) -> (Vec<u8>, Vec<u8>, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let path = dir.join(format!("{name}.crt"));
    std::fs::write(&path, cert.pem()).unwrap();
    (
        cert.pem().into_bytes(),
        key.serialize_pem().into_bytes(),
        path,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_daemon_over_https_with_a_client_certificate() {
    let daemon = IncusDaemon::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, cert_path) = client_cert(dir.path(), "kennel");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server_pem = daemon.serve_https(port, &cert_path);
    let url = format!("https://127.0.0.1:{port}");

    let c = IncusClient::https(&url, &cert, &key, server_pem.as_bytes(), "default").unwrap();
    let s = c.server().await.unwrap();
    assert_eq!(s.auth, "trusted", "{s:?}");
    assert!(c.instances().await.unwrap().is_empty());

    // Another server certificate pinned: no connection at all.
    let (other, _, _) = client_cert(dir.path(), "impostor");
    let c = IncusClient::https(&url, &cert, &key, &other, "default").unwrap();
    let e = c.server().await.unwrap_err();
    assert!(matches!(e, IncusError::Connect { .. }), "{e}");

    // A client certificate the cluster does not trust: refused.
    let (stranger, stranger_key, _) = client_cert(dir.path(), "stranger");
    let c = IncusClient::https(
        &url,
        &stranger,
        &stranger_key,
        server_pem.as_bytes(),
        "default",
    )
    .unwrap();
    assert_eq!(c.server().await.unwrap().auth, "untrusted");
    let e = c.instances().await.unwrap_err();
    assert!(matches!(e, IncusError::Api { status: 403, .. }), "{e}");
}

/// Where each instance lives.
async fn locations(c: &IncusClient) -> BTreeMap<String, String> {
    c.instances()
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.name, i.location))
        .collect()
}

async fn member_status(c: &IncusClient, name: &str) -> String {
    c.member(name).await.unwrap().status
}

/// Polls member `name` until its status is `want`, for up to a minute.
async fn until_status(c: &IncusClient, name: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if member_status(c, name).await == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never became {want}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_places_moves_evacuates_and_outlives_a_dead_member() {
    let mut cluster = kennel_testkit::incus::IncusCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let c = IncusClient::unix(&cluster.socket(0), "default");
    assert!(c.server().await.unwrap().environment.server_clustered);
    let members = c.members().await.unwrap();
    assert_eq!(
        members
            .iter()
            .map(|m| (m.server_name.as_str(), m.online()))
            .collect::<Vec<_>>(),
        [("m1", true), ("m2", true), ("m3", true)],
    );
    let fp = c
        .import_image(&busybox_image(dir.path()), LONG)
        .await
        .unwrap();

    // Placement is Incus's: three instances land on three members.
    for n in ["a", "b", "c"] {
        c.create_instance(&post(n, &fp), None, LONG).await.unwrap();
    }
    let at = locations(&c).await;
    let used: std::collections::BTreeSet<_> = at.values().collect();
    assert_eq!(used.len(), 3, "{at:?}");

    // `--host`: on the member asked for; `move`: a stopped one elsewhere.
    c.create_instance(&post("d", &fp), Some("m2"), LONG)
        .await
        .unwrap();
    assert_eq!(locations(&c).await["d"], "m2");
    c.change_state("d", StateAction::Stop, true, Duration::from_secs(30))
        .await
        .unwrap();
    c.move_instance("d", "m3", LONG).await.unwrap();
    assert_eq!(locations(&c).await["d"], "m3");
    let e = c.move_instance("d", "m9", LONG).await.unwrap_err();
    assert!(!e.is_not_found() || e.to_string().contains("m9"), "{e}");

    // Evacuate m2: what ran there runs elsewhere; restore brings it back.
    let on_m2: Vec<String> = locations(&c)
        .await
        .into_iter()
        .filter(|(_, l)| l == "m2")
        .map(|(n, _)| n)
        .collect();
    assert_eq!(on_m2.len(), 1, "{on_m2:?}");
    c.member_state("m2", MemberAction::Evacuate, LONG)
        .await
        .unwrap();
    assert_eq!(member_status(&c, "m2").await, "Evacuated");
    let after = locations(&c).await;
    assert_ne!(after[&on_m2[0]], "m2", "{after:?}");
    assert!(c.instance_state(&on_m2[0]).await.unwrap().running());
    c.member_state("m2", MemberAction::Restore, LONG)
        .await
        .unwrap();
    assert_eq!(member_status(&c, "m2").await, "Online");
    assert_eq!(locations(&c).await[&on_m2[0]], "m2");

    // A member dies: its instances are reported on an offline host, and
    // a start fails at once saying so; it comes back by itself.
    let on_m3: String = locations(&c)
        .await
        .into_iter()
        .find(|(n, l)| l == "m3" && n != "d")
        .map(|(n, _)| n)
        .unwrap();
    cluster.kill(2);
    until_status(&c, "m3", "Offline").await;
    let e = c.instance_state(&on_m3).await.unwrap_err();
    assert!(
        matches!(&e, IncusError::MemberOffline { member } if member == "m3"),
        "{e}"
    );
    assert_eq!(e.to_string(), "host m3 is offline");
    let started = Instant::now();
    let e = c
        .change_state("d", StateAction::Start, false, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(&e, IncusError::MemberOffline { .. }), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The rest of the cluster goes on.
    let on_m1 = locations(&c)
        .await
        .into_iter()
        .find(|(_, l)| l == "m1")
        .unwrap()
        .0;
    assert!(c.instance_state(&on_m1).await.unwrap().running());

    cluster.revive(2);
    until_status(&c, "m3", "Online").await;
    // Online to the cluster may come a moment before the member answers
    // forwarded requests ("Server isn't ready yet").
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        match c.instance_state(&on_m3).await {
            Ok(st) => break st,
            Err(e) if e.to_string().contains("isn't ready") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert!(st.running());
    c.change_state("d", StateAction::Start, false, Duration::ZERO)
        .await
        .unwrap();
}
