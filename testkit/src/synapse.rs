//! A real Synapse homeserver for tests: PyPI `matrix-synapse` with SQLite,
//! on a free loopback port, in a temporary directory, killed on drop.
//!
//! Synapse is installed into a virtualenv by `scripts/install-deps.sh test`
//! (`$KENNEL_SYNAPSE_VENV`, default `~/.cache/kennel/synapse`). The test
//! settings go into a second `--config-path` file layered over the
//! generated one: loopback only, a registration shared secret, no
//! federation, no key servers, rate limits off.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The domain part of every user id on the test server.
pub const SERVER_NAME: &str = "localhost";

/// A running Synapse.
#[derive(Debug)]
pub struct Synapse {
    child: Option<Child>,
    dir: tempfile::TempDir,
    venv: PathBuf,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    port: u16,
}

fn venv() -> PathBuf {
    std::env::var_os("KENNEL_SYNAPSE_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kennel/synapse"))
        })
        .unwrap_or_else(|| PathBuf::from(".cache/kennel/synapse"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

const LIMITS_OFF: &str = "{per_second: 10000, burst_count: 10000}";

impl Synapse {
    /// Generates a configuration, starts the server and waits until it
    /// answers. Panics, naming what to install, if Synapse is missing.
    pub fn start() -> Synapse {
        let venv = venv();
        let python = venv.join("bin/python");
        let ok = Command::new(&python)
            .args(["-c", "import synapse"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "Synapse is not installed in {}: run `scripts/install-deps.sh test` (it pip-installs matrix-synapse into that virtualenv)",
            venv.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let main = d.join("homeserver.yaml");
        let out = Command::new(&python)
            .args([
                "-m",
                "synapse.app.homeserver",
                "--server-name",
                SERVER_NAME,
                "--config-path",
            ])
            .arg(&main)
            .arg("--data-directory")
            .arg(d)
            .args(["--generate-config", "--report-stats=no"])
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "synapse --generate-config failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let overrides = format!(
            r#"
listeners:
  - port: {port}
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: {db}
registration_shared_secret: "kennel-test-secret"
enable_registration: false
report_stats: false
federation_domain_whitelist: []
trusted_key_servers: []
suppress_key_server_warning: true
presence:
  enabled: false
rc_message: {l}
rc_registration: {l}
rc_login:
  address: {l}
  account: {l}
  failed_attempts: {l}
rc_joins:
  local: {l}
  remote: {l}
rc_joins_per_room: {l}
rc_invites:
  per_room: {l}
  per_user: {l}
  per_issuer: {l}
rc_admin_redaction: {l}
rc_3pid_validation: {l}
rc_room_creation: {l}
rc_key_requests: {l}
"#,
            db = d.join("homeserver.db").display(),
            l = LIMITS_OFF,
        );
        let test_cfg = d.join("test.yaml");
        std::fs::write(&test_cfg, overrides).unwrap();
        let mut s = Synapse {
            child: None,
            dir,
            venv,
            url: format!("http://127.0.0.1:{port}"),
            port,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("stderr.log"))
            .unwrap();
        let child = Command::new(self.venv.join("bin/python"))
            .args(["-m", "synapse.app.homeserver", "--config-path"])
            .arg(d.join("homeserver.yaml"))
            .arg("--config-path")
            .arg(d.join("test.yaml"))
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_healthy(self.port);
    }

    /// Starts the server again after [`stop`](Self::stop), same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn wait_healthy(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("synapse exited ({status}): {}", self.log_tail());
            }
            if health(port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("synapse did not answer within 90 s: {}", self.log_tail());
    }

    /// The end of Synapse's stderr and log file, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for f in ["stderr.log", "homeserver.log"] {
            let text = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(30);
            out.push_str(&format!(
                "--- {f}\n{}\n",
                lines.get(from..).unwrap_or_default().join("\n")
            ));
        }
        out
    }

    /// The server's directory (configuration, database, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Registers `@name:localhost` with `password` through the shared
    /// secret; returns the user id.
    pub fn register(&self, name: &str, password: &str, admin: bool) -> String {
        let out = Command::new(self.venv.join("bin/register_new_matrix_user"))
            .args([
                "-u",
                name,
                "-p",
                password,
                "--shared-secret",
                "kennel-test-secret",
            ])
            .arg(if admin { "--admin" } else { "--no-admin" })
            .arg(&self.url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "register_new_matrix_user {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        format!("@{name}:{SERVER_NAME}")
    }

    /// Stops the server (SIGTERM, then SIGKILL) — to test reconnects.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn health(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
}

impl Drop for Synapse {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
