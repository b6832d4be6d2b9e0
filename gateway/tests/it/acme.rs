//! ACME certificates against a real Pebble (Debian `pebble`) with
//! validation on: per-host TLS-ALPN-01 for names that are Kennel's or a
//! project's (never for other names), kept across restarts, renewed when
//! due; and a DNS-01 wildcard through a hook command. Verified by the real
//! `curl` against Pebble's issuing root.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kennel_core::testing::World;
use kennel_core::Settings;
use kennel_gateway::https::acme::AcmeSettings;
use kennel_gateway::https::{tls, HttpsGateway, HttpsSettings};
use kennel_testkit::pebble::Pebble;
use kennel_testkit::require;

const DOMAIN: &str = "acme.test";

/// A listener on 127.0.0.1:`port` (0: any free port), bound before
/// Pebble picks its own ports, so they cannot meet.
async fn listen(port: u16) -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap()
}

/// A gateway on `listener` whose certificates come from `s`; stops when
/// the sender is dropped.
async fn gateway(
    w: &World,
    listener: tokio::net::TcpListener,
    s: AcmeSettings,
) -> tokio::sync::oneshot::Sender<()> {
    let config = tls::server_config(&tls::TlsSource::Acme {
        settings: s,
        domain: DOMAIN.into(),
    })
    .unwrap();
    let gw = HttpsGateway::new(&w.exec.gate(), HttpsSettings::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gw.run(listener, config, async move {
        let _ = stopped.await;
    }));
    stop
}

fn settings(p: &Pebble, dir: &Path) -> AcmeSettings {
    let mut s = AcmeSettings::new(p.directory.clone(), dir.to_owned());
    s.ca_roots = Some(p.api_roots.clone());
    s.contact = vec!["mailto:ops@acme.test".into()];
    s
}

/// curl for `https://HOST:PORT/PATH` trusting only `root`: the status
/// code, or curl's exit code when it fails (60: the certificate is not
/// valid for the name).
async fn curl(root: &Path, port: u16, host: &str, path: &str) -> Result<String, i32> {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(root)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .await
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(out.status.code().unwrap_or(-1))
    }
}

fn world(port: u16) -> World {
    World::new()
        .settings(Settings {
            domain: DOMAIN.into(),
            https_port: port,
            ..Settings::default()
        })
        .build()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

async fn wait_until(what: &str, pebble: &Pebble, mut ok: impl FnMut() -> bool) {
    for _ in 0..300 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{what} did not happen in 30 s; Pebble's log:\n{}",
        pebble.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_certificates_for_projects_only_kept_and_renewed() {
    require("curl", "curl");
    let first = listen(0).await;
    let port = first.local_addr().unwrap().port();
    let pebble = Pebble::start(port);
    let w = world(port);
    let out = w.run(&w.admin, "new project app --stack rust").await;
    assert!(out.is_ok(), "{out:?}");
    let data = tempfile::tempdir().unwrap();
    let acme_dir = data.path().join("acme");
    let certs = acme_dir.join("certs");

    // First start: each name Kennel serves is certified at its first
    // handshake, by TLS-ALPN-01 answered on the gateway's own port.
    let stop = gateway(&w, first, settings(&pebble, &acme_dir)).await;
    let root = pebble.issuing_root();
    let host = format!("app.{DOMAIN}");
    assert_eq!(
        curl(&root, port, DOMAIN, "/healthz").await,
        Ok("200".into()),
        "{}",
        pebble.log()
    );
    // Private, and no session: 401, over a certificate curl trusts.
    assert_eq!(curl(&root, port, &host, "/").await, Ok("401".into()));
    let other_port = format!("app--3000.{DOMAIN}");
    assert_eq!(curl(&root, port, &other_port, "/").await, Ok("401".into()));
    // Not a project: nothing is ordered for it, and the handshake shows
    // Kennel's own certificate, which curl refuses for that name.
    let stranger = format!("nosuch.{DOMAIN}");
    assert_eq!(curl(&root, port, &stranger, "/").await, Err(60));
    assert!(!certs.join(format!("{stranger}.pem")).exists());
    assert!(!pebble.log().contains(&stranger), "{}", pebble.log());
    // Kept in the data dir, keys private.
    let app_pem = certs.join(format!("{host}.pem"));
    let first = std::fs::read_to_string(&app_pem).unwrap();
    assert_eq!(mode(&certs.join(format!("{host}.key"))), 0o600);
    assert_eq!(mode(&acme_dir.join("account.json")), 0o600);
    let account = std::fs::read_to_string(acme_dir.join("account.json")).unwrap();
    drop(stop);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A restart serves what is stored: with no orders allowed at all,
    // the names still verify.
    let mut s = settings(&pebble, &acme_dir);
    s.orders_per_hour = 0;
    let stop = gateway(&w, listen(port).await, s).await;
    assert_eq!(curl(&root, port, &host, "/").await, Ok("401".into()));
    assert_eq!(std::fs::read_to_string(&app_pem).unwrap(), first);
    drop(stop);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Renewal: with every certificate due, the renewal check orders new
    // ones with the same account; the new one is served.
    let mut s = settings(&pebble, &acme_dir);
    s.renew_before = Duration::from_secs(100 * 365 * 86_400);
    s.check_every = Duration::from_secs(1);
    s.orders_per_hour = 10;
    let _stop = gateway(&w, listen(port).await, s).await;
    wait_until("renewal", &pebble, || {
        std::fs::read_to_string(&app_pem).unwrap() != first
    })
    .await;
    assert_eq!(curl(&root, port, &host, "/").await, Ok("401".into()));
    assert_eq!(
        std::fs::read_to_string(acme_dir.join("account.json")).unwrap(),
        account,
        "the account is reused"
    );
}

/// Sends challtestsrv a management call (`/add-a`, `/set-default-ipv4`).
async fn dns_set(pebble: &Pebble, path: &str, body: serde_json::Value) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--fail", "--data"])
        .arg(body.to_string())
        .arg(format!("{}{path}", pebble.dns_management))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_domain_is_checked_in_dns_then_certified_and_served() {
    require("curl", "curl");
    let listener = listen(0).await;
    let port = listener.local_addr().unwrap().port();
    let pebble = Pebble::start(port);
    // Only the names given below resolve.
    dns_set(&pebble, "/set-default-ipv4", serde_json::json!({"ip": ""})).await;
    for host in [DOMAIN.to_owned(), format!("web.{DOMAIN}")] {
        dns_set(
            &pebble,
            "/add-a",
            serde_json::json!({"host": format!("{host}."), "addresses": ["127.0.0.1"]}),
        )
        .await;
    }
    let w = world(port);
    w.run(&w.admin, "new project web --stack rust")
        .await
        .unwrap();
    w.exec.set_dns(std::sync::Arc::new(
        kennel_gateway::dns::HickoryDns::new(Some(pebble.dns)).unwrap(),
    ));
    // No record yet: the one to add, said exactly.
    let e = w
        .run(&w.admin, "domain add web shop.example.net")
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("`shop.example.net. CNAME web.{DOMAIN}.`")),
        "{msg}"
    );
    assert!(msg.contains("`shop.example.net. A 127.0.0.1`"), "{msg}");
    // An A record to Kennel's address: served, and certified by the CA
    // at the first visit (TLS-ALPN-01, on the gateway's own port).
    dns_set(
        &pebble,
        "/add-a",
        serde_json::json!({"host": "shop.example.net.", "addresses": ["127.0.0.1"]}),
    )
    .await;
    w.run(&w.admin, "domain add web shop.example.net")
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let acme_dir = data.path().join("acme");
    let _stop = gateway(&w, listener, settings(&pebble, &acme_dir)).await;
    let root = pebble.issuing_root();
    assert_eq!(
        curl(&root, port, "shop.example.net", "/").await,
        Ok("401".into()),
        "{}",
        pebble.log()
    );
    assert!(acme_dir.join("certs/shop.example.net.pem").exists());
    // Removed: no longer served (a name Kennel does not serve gets no
    // certificate of its own, and nothing else is ordered for it).
    w.run(&w.admin, "domain rm web shop.example.net")
        .await
        .unwrap();
    dns_set(
        &pebble,
        "/add-a",
        serde_json::json!({"host": "other.example.net.", "addresses": ["127.0.0.1"]}),
    )
    .await;
    // (curl: 60, a certificate for another name; 35, none at all.)
    let other = curl(&root, port, "other.example.net", "/").await;
    assert!(matches!(other, Err(35 | 60)), "{other:?}");
    assert!(
        !pebble.log().contains("other.example.net"),
        "{}",
        pebble.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns01_wildcard_through_the_hook() {
    require("curl", "curl");
    let listener = listen(0).await;
    let port = listener.local_addr().unwrap().port();
    let pebble = Pebble::start(port);
    let w = world(port);
    let data = tempfile::tempdir().unwrap();
    // The operator's hook: publishes the TXT record in the DNS server
    // Pebble asks (challtestsrv's management API).
    let hook: PathBuf = data.path().join("dns-hook");
    let calls = data.path().join("hook-calls");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nset -e\necho \"$1 $2\" >> {calls}\ncase \"$1\" in\n  set) curl -sSf -X POST -d \"{{\\\"host\\\":\\\"$2\\\",\\\"value\\\":\\\"$3\\\"}}\" {api}/set-txt ;;\n  clear) curl -sSf -X POST -d \"{{\\\"host\\\":\\\"$2\\\"}}\" {api}/clear-txt ;;\nesac\n",
            calls = calls.display(),
            api = pebble.dns_management
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let acme_dir = data.path().join("acme");
    let mut s = settings(&pebble, &acme_dir);
    s.dns_hook = Some(hook);
    s.dns_wait = Duration::ZERO;
    let _stop = gateway(&w, listener, s).await;
    // Ordered at start, not at a handshake.
    let wildcard = acme_dir.join("certs/_wildcard.pem");
    wait_until("the wildcard order", &pebble, || wildcard.exists()).await;
    let root = pebble.issuing_root();
    for host in [
        DOMAIN.to_owned(),
        format!("any.{DOMAIN}"),
        format!("x--8080.{DOMAIN}"),
    ] {
        let r = curl(&root, port, &host, "/healthz").await;
        assert!(r.is_ok(), "{host}: {r:?}");
    }
    let calls = std::fs::read_to_string(&calls).unwrap();
    let record = format!("_acme-challenge.{DOMAIN}.");
    assert!(calls.contains(&format!("set {record}")), "{calls}");
    assert!(calls.contains(&format!("clear {record}")), "{calls}");
}
