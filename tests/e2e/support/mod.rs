//! Shared helpers for the end-to-end tests on real guests: a `kennel`
//! binary with its own data directory (images from the shared test cache),
//! run directly or inside a network namespace.
#![allow(dead_code)]

pub mod meter;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kennel_testkit::require;

/// OpenSSH client options for tests: batch mode, host keys not checked.
pub const SSH_OPTS: [&str; 8] = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "BatchMode=yes",
];

pub struct Kennel {
    pub dir: PathBuf,
    bin: PathBuf,
    serve: Option<Child>,
    /// Run everything inside this network namespace (bridge-mode tests).
    pub netns: Option<String>,
    pub network: &'static str,
    /// The SSH gateway's port for this test's daemon.
    pub ssh_port: u16,
    /// The HTTPS gateway's port for this test's daemon.
    pub https_port: u16,
    /// Extra environment for every `kennel` run (configuration overrides).
    pub env: Vec<(String, String)>,
}

impl Kennel {
    pub fn new(dir: &Path) -> Self {
        Self::with_images(dir, true)
    }

    /// Like [`Kennel::new`]; with `shared_images` false the data dir gets
    /// an image store of its own (empty: the first project builds the
    /// kernel and its image), still with the shared package cache.
    pub fn with_images(dir: &Path, shared_images: bool) -> Self {
        assert!(
            rustix::process::geteuid().is_root(),
            "VM tests need root (virtiofsd, image builds); run scripts/test.sh as root"
        );
        require("qemu-system-x86_64", "qemu-system-x86");
        require("qemu-img", "qemu-utils");
        require("virtiofsd", "qemu-system-common");
        require("ssh", "openssh-client");
        require("mmdebstrap", "mmdebstrap");
        let data = dir.join("kennel-data");
        std::fs::create_dir_all(&data).unwrap();
        let cache = std::env::var_os("KENNEL_TEST_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/kennel/test-data")
            });
        if shared_images {
            std::fs::create_dir_all(cache.join("images")).unwrap();
            std::os::unix::fs::symlink(cache.join("images"), data.join("images")).unwrap();
        }
        Self {
            dir: dir.to_owned(),
            bin: PathBuf::from(env!("CARGO_BIN_EXE_kennel")),
            serve: None,
            netns: None,
            network: "user",
            ssh_port: free_port(),
            https_port: free_port(),
            env: Vec::new(),
        }
    }

    /// `program` run inside the test's network namespace, if any.
    pub fn in_ns(&self, program: &Path) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    pub fn cmd(&self) -> Command {
        let mut c = self.in_ns(&self.bin);
        let cache = std::env::var_os("KENNEL_TEST_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/kennel/test-data")
            });
        c.current_dir(&self.dir)
            .env_remove("KENNEL_CONFIG")
            .env("KENNEL_VM__BACKEND", "qemu")
            .env("KENNEL_VM__NETWORK", self.network)
            .env("KENNEL_SSH__LISTEN", format!("127.0.0.1:{}", self.ssh_port))
            .env("KENNEL_SSH__PUBLIC_PORT", "2222")
            .env(
                "KENNEL_HTTPS__LISTEN",
                format!("127.0.0.1:{}", self.https_port),
            )
            .env("KENNEL_IMAGES__APT_CACHE", cache.join("apt"))
            // Three guests boot at once under TCG on two cores here: a
            // boot (one with an app starting beside sshd took over 120 s),
            // a wake and an app's start may take minutes, not the default 2.
            .env("KENNEL_VM__BOOT_TIMEOUT_SECS", "300")
            .env("KENNEL_HTTPS__WAKE_WAIT_SECS", "300")
            .env("KENNEL_HTTPS__APP_START_WAIT_SECS", "300")
            .env("RUST_LOG", "warn");
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    pub fn exec(&self, line: &str) -> Output {
        let out = self.cmd().args(["exec", line]).output().unwrap();
        eprintln!(
            "$ kennel exec '{line}' -> {:?}\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn exec_ok(&self, line: &str) -> String {
        let out = self.exec(line);
        assert!(out.status.success(), "`{line}` failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn start_serve(&mut self) {
        let child = self
            .cmd()
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.serve = Some(child);
        self.wait_for_socket(None);
    }

    /// Starts `kennel serve` with its standard error (the log) going to
    /// `log` (appended), at `RUST_LOG=info` (debug for idle stop).
    pub fn start_serve_logged(&mut self, log: &Path) {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = self
            .cmd()
            .env("RUST_LOG", "info,kennel_core::idle=debug")
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        self.serve = Some(child);
        self.wait_for_socket(Some(log));
    }

    /// Waits until the daemon answers on its socket (the file may be stale
    /// from a killed daemon); fails at once, with the end of its log when
    /// it keeps one, if the daemon exits first.
    fn wait_for_socket(&mut self, log: Option<&Path>) {
        let sock = self.dir.join("kennel-data/control.sock");
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if let Some(status) = self
                .serve
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "kennel serve exited ({status}) before it answered; the log's end:\n{}",
                    log.map(|l| log_tail(l, 20)).unwrap_or_default()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "kennel serve did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kennel exec LINE` started, its progress (standard error) piped.
    pub fn exec_spawn(&self, line: &str) -> Child {
        self.cmd()
            .args(["exec", line])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The daemon's pid, if it runs.
    pub fn serve_pid(&self) -> Option<u32> {
        self.serve.as_ref().map(Child::id)
    }

    pub fn kill_serve(&mut self, signal: &str) {
        if let Some(mut c) = self.serve.take() {
            Command::new("kill")
                .args([signal, &c.id().to_string()])
                .status()
                .unwrap();
            c.wait().unwrap();
        }
    }

    pub fn key(&self, project: &str) -> PathBuf {
        self.dir
            .join(format!("kennel-data/keys/projects/{project}/id_ed25519"))
    }

    /// The host address of a project's sshd, from `status --json`.
    pub fn addr(&self, project: &str) -> String {
        let out = self.exec_ok(&format!("--json status {project}"));
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["vm"]["ssh_addr"].as_str().unwrap().to_owned()
    }

    /// Runs a command in a project's VM over SSH with its project key.
    pub fn ssh(&self, project: &str, command: &str) -> Output {
        self.ssh_as(project, &self.key(project), command)
    }

    /// Runs a command in a project's VM over SSH with `key` (and only it).
    pub fn ssh_as(&self, project: &str, key: &Path, command: &str) -> Output {
        let addr = self.addr(project);
        let (ip, port) = addr.rsplit_once(':').unwrap();
        self.in_ns(Path::new("ssh"))
            .args(SSH_OPTS)
            .args(["-o", "ConnectTimeout=60"])
            .args(["-o", "IdentitiesOnly=yes", "-i"])
            .arg(key)
            .args(["-p", port, &format!("dev@{ip}"), command])
            .output()
            .unwrap()
    }

    /// `ssh -p GATEWAY -i key target command` through the SSH gateway,
    /// batch mode, host keys not checked; stdin from /dev/null.
    pub fn gateway_ssh(&self, key: &Path, target: &str, command: &str) -> Command {
        let mut c = self.in_ns(Path::new("ssh"));
        c.args(SSH_OPTS)
            .args(["-o", "IdentitiesOnly=yes"])
            .args(["-p", &self.ssh_port.to_string(), "-i"])
            .arg(key)
            .arg(target)
            .arg(command)
            .stdin(Stdio::null());
        c
    }

    /// A user key for this test (`<dir>/NAME`, ed25519), added to the
    /// local admin's account.
    pub fn admin_key(&self, name: &str) -> PathBuf {
        let key = self.dir.join(name);
        assert!(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .unwrap()
            .success());
        let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        self.exec_ok(&format!("key add \"{}\"", public.trim()));
        key
    }

    /// A project's recorded state and note, from `projects --json` (the
    /// store alone: `status` also asks the VMM and the guest, which costs
    /// the guest CPU that idle stop would count as use).
    pub fn state(&self, project: &str) -> (String, Option<String>) {
        let out = self
            .cmd()
            .args(["exec", "--json projects"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let p = v["projects"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == project))
            .cloned()
            .unwrap_or_default();
        (
            p["state"].as_str().unwrap_or_default().to_owned(),
            p["state_note"].as_str().map(str::to_owned),
        )
    }

    /// Waits up to `limit` for `project` to be in `state`; how long it took.
    pub fn wait_state(&self, project: &str, state: &str, limit: Duration) -> Duration {
        let t = Instant::now();
        loop {
            if self.state(project).0 == state {
                return t.elapsed();
            }
            if t.elapsed() >= limit {
                // The daemon's log, when the test keeps one, says why.
                panic!(
                    "{project} not {state} after {limit:?}: {:?}\nthe log's end:\n{}",
                    self.state(project),
                    log_tail(&self.dir.join("serve.log"), 30)
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    pub fn ssh_ok(&self, project: &str, command: &str) -> String {
        let out = self.ssh(project, command);
        assert!(
            out.status.success(),
            "ssh {project} `{command}`: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Kennel {
    fn drop(&mut self) {
        // Leave no VM behind, whatever happened.
        if let Ok(rd) = std::fs::read_dir(self.dir.join("kennel-data/vms")) {
            for e in rd.filter_map(Result::ok) {
                let p = e.file_name().to_string_lossy().into_owned();
                let _ = self.cmd().args(["exec", &format!("rm {p} --yes")]).output();
            }
        }
        self.kill_serve("-TERM");
        // Its host guard's table (nothing else of this test uses it now).
        let gid = kennel_provisioner::hostguard::guest_gid(&self.dir.join("kennel-data"));
        let _ = Command::new("nft")
            .args([
                "delete",
                "table",
                "inet",
                &kennel_provisioner::hostguard::table(gid),
            ])
            .output();
    }
}

/// The last `lines` lines of a log file (empty if it cannot be read).
fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Whether this test's VM for `project` runs (matched by its own disk path,
/// so VMs of other tests with the same name do not count).
pub fn vm_running(k: &Kennel, project: &str) -> bool {
    vm_pid(k, project).is_some()
}

/// The pid of the VMM running `project`'s disk, if one does.
pub fn vm_pid(k: &Kennel, project: &str) -> Option<u32> {
    let disk = k.dir.join(format!("kennel-data/vms/{project}/disk.qcow2"));
    let out = Command::new("pgrep")
        .args(["-f", &format!("file={}", disk.display())])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
}

/// A network namespace the test makes and removes itself.
pub struct Netns(pub String);

impl Netns {
    pub fn new() -> Self {
        require("ip", "iproute2");
        require("bridge", "iproute2");
        require("nft", "nftables");
        let name = format!("kennel-test-{}", std::process::id());
        assert!(Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success());
        assert!(Command::new("ip")
            .args(["netns", "exec", &name, "ip", "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success());
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// Real git in `dir`, as a test author: asserts it succeeds.
pub fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.org",
            "-c",
            "protocol.file.allow=always",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The steps of a long scenario on a real guest, which is too dear to boot
/// again for every check: each step runs even when an earlier one failed,
/// its failure is named, and [`Steps::finish`] fails the test with every
/// failed step, so one broken check does not hide the others.
///
/// ```text
/// let mut steps = Steps::new("editors");
/// steps.run("exit status", || { ... });
/// steps.run("sftp and scp", || { ... });
/// steps.finish();
/// ```
#[derive(Debug)]
pub struct Steps {
    scenario: &'static str,
    failed: Vec<(String, String)>,
    ran: usize,
}

impl Steps {
    pub fn new(scenario: &'static str) -> Self {
        Self {
            scenario,
            failed: Vec::new(),
            ran: 0,
        }
    }

    /// Runs one step; `None` when it failed (recorded, with its message).
    pub fn run<T>(&mut self, name: &str, step: impl FnOnce() -> T) -> Option<T> {
        self.ran += 1;
        eprintln!("[{}] step {}: {name}", self.scenario, self.ran);
        let started = Instant::now();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)) {
            Ok(v) => {
                eprintln!(
                    "[{}] step {}: {name}: ok in {:.1} s",
                    self.scenario,
                    self.ran,
                    started.elapsed().as_secs_f64()
                );
                Some(v)
            }
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "(no message)".into());
                eprintln!(
                    "[{}] step {}: {name}: FAILED: {why}",
                    self.scenario, self.ran
                );
                self.failed.push((name.to_owned(), why));
                None
            }
        }
    }

    /// Fails the test if any step failed, naming each.
    pub fn finish(self) {
        if self.failed.is_empty() {
            return;
        }
        let list: Vec<String> = self
            .failed
            .iter()
            .map(|(name, why)| format!("  - {name}: {why}"))
            .collect();
        panic!(
            "{}: {} of {} steps failed:\n{}",
            self.scenario,
            self.failed.len(),
            self.ran,
            list.join("\n")
        );
    }
}

/// `curl` to `https://HOST:PORT/PATH` on the test's HTTPS gateway (its dev
/// CA trusted, HOST resolved to loopback) with `extra` arguments.
/// Returns ("CODE VERSION", body), and prints both.
pub fn curl(k: &Kennel, host: &str, path: &str, extra: &[&str]) -> (String, String) {
    kennel_testkit::require("curl", "curl");
    let ca = k.dir.join("kennel-data/tls/dev-ca/ca.pem");
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "300", "--cacert"])
        .arg(&ca)
        .arg("--resolve")
        .arg(format!("{host}:{}:127.0.0.1", k.https_port))
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(extra)
        .arg(format!("https://{host}:{}{path}", k.https_port))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
    eprintln!(
        "curl {host}{path} -> {code}\n{body}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code.to_owned(), body.to_owned())
}

/// An OpenAI-compatible upstream for the LLM gateway, written for the
/// tests: answers every `POST …/chat/completions` with the last user
/// message's text, upper-cased, and a `usage` of 30 tokens; keeps each
/// request it received (head and body).
pub struct LlmUpstream {
    pub port: u16,
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

pub fn llm_upstream() -> LlmUpstream {
    llm_upstream_scripted(Vec::new())
}

/// [`llm_upstream`] that answers the Nth chat completion with `script[N]`
/// (the last one again after the end), streamed as server-sent events when
/// the request asks for a stream, as a real agent CLI does; other routes
/// (the Responses API) get a 404. An empty script echoes upper-cased.
pub fn llm_upstream_scripted(script: Vec<String>) -> LlmUpstream {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let record = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut head = String::new();
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
            }
            let mut body = vec![0u8; len];
            let _ = r.read_exact(&mut body);
            let body = String::from_utf8_lossy(&body).into_owned();
            let asked: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let n = {
                let mut seen = record.lock().unwrap();
                seen.push(format!("{head}\n{body}"));
                seen.iter()
                    .filter(|r| r.contains("/chat/completions "))
                    .count()
            };
            if !head.contains("/chat/completions ") {
                let _ = write!(
                    s,
                    "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
                );
                continue;
            }
            let text = match script.get(n.saturating_sub(1)).or(script.last()) {
                Some(t) => t.clone(),
                None => asked["messages"]
                    .as_array()
                    .and_then(|m| m.last())
                    .and_then(|m| m["content"].as_str())
                    .unwrap_or_default()
                    .to_uppercase(),
            };
            let usage = serde_json::json!({"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30});
            if asked["stream"] == serde_json::json!(true) {
                let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
                    serde_json::json!({
                        "id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                    })
                };
                let mut events = vec![
                    chunk(serde_json::json!({"role": "assistant", "content": text}), serde_json::Value::Null),
                    chunk(serde_json::json!({}), serde_json::json!("stop")),
                    serde_json::json!({"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [], "usage": usage}),
                ]
                .into_iter()
                .map(|e| format!("data: {e}\n\n"))
                .collect::<String>();
                events.push_str("data: [DONE]\n\n");
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{events}"
                );
                continue;
            }
            let answer = serde_json::json!({
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                "usage": usage,
            })
            .to_string();
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    LlmUpstream { port, seen }
}
