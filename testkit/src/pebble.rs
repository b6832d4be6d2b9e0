//! Pebble, Let's Encrypt's ACME test server (Debian `pebble`), with its
//! companion `pebble-challtestsrv` as the DNS server: every name resolves
//! to 127.0.0.1, and DNS-01 TXT records are set over its management API.
//! Challenge validation stays on: Pebble really connects back to the
//! gateway (TLS-ALPN-01) or looks the record up (DNS-01).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::require;

/// A running Pebble and its DNS server; both stop when dropped.
#[derive(Debug)]
pub struct Pebble {
    dir: tempfile::TempDir,
    /// The ACME directory URL.
    pub directory: String,
    /// PEM roots that Pebble's own HTTPS (the ACME API) is signed by.
    pub api_roots: PathBuf,
    management: u16,
    /// challtestsrv's management API (`/set-txt`, `/clear-txt`).
    pub dns_management: String,
    /// challtestsrv's DNS server (UDP and TCP).
    pub dns: std::net::SocketAddr,
    children: Vec<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

fn wait_for(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Pebble {
    /// Starts Pebble validating TLS-ALPN-01 on `tls_port` (where the
    /// gateway under test listens). Panics, naming the package, if Pebble
    /// is missing.
    pub fn start(tls_port: u16) -> Pebble {
        let pebble = require("pebble", "pebble");
        let challtestsrv = require("pebble-challtestsrv", "pebble");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Pebble's own HTTPS: a CA of this test and a leaf for 127.0.0.1.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "Pebble API test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let api_roots = d.join("api-ca.pem");
        std::fs::write(&api_roots, ca_cert.pem()).unwrap();
        std::fs::write(d.join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(d.join("key.pem"), leaf_key.serialize_pem()).unwrap();

        let (api, management, dns, dns_mgmt) = (free_port(), free_port(), free_port(), free_port());
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{api}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": d.join("cert.pem"),
                "privateKey": d.join("key.pem"),
                "httpPort": free_port(),
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        std::fs::write(d.join("pebble.json"), config.to_string()).unwrap();
        let log = |name: &str| std::fs::File::create(d.join(name)).unwrap();
        let dns_srv = Command::new(challtestsrv)
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{dns_mgmt}")])
            .stdout(log("challtestsrv.log"))
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let server = Command::new(pebble)
            .arg("-config")
            .arg(d.join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            // Validate at once rather than after a random sleep; accept
            // every nonce (instant-acme retries bad ones, but tests should
            // not depend on a 5% chance).
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .unwrap();
        let me = Pebble {
            directory: format!("https://127.0.0.1:{api}/dir"),
            api_roots,
            management,
            dns_management: format!("http://127.0.0.1:{dns_mgmt}"),
            dns: std::net::SocketAddr::from(([127, 0, 0, 1], dns)),
            children: vec![dns_srv, server],
            dir,
        };
        wait_for(dns_mgmt, "pebble-challtestsrv");
        wait_for(api, "pebble");
        wait_for(management, "pebble's management API");
        me
    }

    /// Pebble's issuing root (made at its start), to verify what it
    /// issued: written to a file for `curl --cacert`.
    pub fn issuing_root(&self) -> PathBuf {
        let path = self.dir.path().join("issuing-root.pem");
        let out = Command::new("curl")
            .args(["-sSf", "--cacert"])
            .arg(&self.api_roots)
            .arg(format!("https://127.0.0.1:{}/roots/0", self.management))
            .output()
            .unwrap();
        assert!(out.status.success(), "cannot read Pebble's root: {out:?}");
        std::fs::write(&path, &out.stdout).unwrap();
        path
    }

    /// Pebble's log so far, for failure messages.
    pub fn log(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!("{}\n{}", read("pebble.log"), read("pebble.err"))
    }

    /// The directory Pebble's files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
