//! The SSH gateway in-process on 127.0.0.1:0, driven by OpenSSH's real
//! `ssh` client: command mode, exit codes, unknown keys and access
//! requests, refusals, a store that has gone away, many sessions at once.
//! (Sessions into real VMs are tested in the root crate's tests/e2e/ssh_vm.rs.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::Output;

use kennel_core::keys::PublicKey;
use kennel_core::model::Identity;
use kennel_core::provision::NoProgress;
use kennel_core::testing::World;
use kennel_core::{Executor, Store};
use kennel_gateway::ssh::{host_key, SshGateway, SshSettings};
use kennel_testkit::require;
use kennel_testkit::ssh::{keygen, run_ssh};

struct Gw {
    dir: tempfile::TempDir,
    port: u16,
    exec: Executor,
    store: Store,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn gateway() -> Gw {
    gateway_with(SshSettings::default()).await
}

async fn gateway_with(settings: SshSettings) -> Gw {
    require("ssh", "openssh-client");
    require("ssh-keygen", "openssh-client");
    let dir = tempfile::tempdir().unwrap();
    let w = World::new().build();
    *w.vms.keys_dir.lock().unwrap() = Some(dir.path().join("keys/projects"));
    let (exec, store) = (w.exec, w.store);
    let key = host_key(&dir.path().join("keys/host")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let gw = SshGateway::new(exec.gate(), settings);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gw.run(listener, key, async move {
        let _ = stopped.await;
    }));
    Gw {
        dir,
        port,
        exec,
        store,
        stop: Some(stop),
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Gw {
    async fn ssh(&self, key: &Path, user: &str, args: &[&str], stdin: Option<&str>) -> Output {
        run_ssh(
            self.port,
            key.to_owned(),
            user.to_owned(),
            args.iter().map(|a| (*a).to_owned()).collect(),
            stdin.map(str::to_owned),
        )
        .await
    }

    /// Gives the console admin `public` as an SSH key.
    async fn admin_key(&self, public: &str) {
        self.admin_run(&format!("key add \"{public}\"")).await;
    }

    /// Runs `line` as the local admin; it must succeed.
    async fn admin_run(&self, line: &str) {
        let admin = self.exec.local_admin().await.unwrap();
        let out = self
            .exec
            .execute_as(
                &Identity::local_console(),
                Some(admin),
                kennel_core::parse(line).unwrap().command,
                &NoProgress,
            )
            .await;
        assert!(out.is_ok(), "{out:?}");
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_mode_exit_codes_and_json() {
    let gw = gateway().await;
    let (key, public) = keygen(gw.dir.path(), "admin");
    gw.admin_key(&public).await;
    let out = gw.ssh(&key, "anyone", &["whoami"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("You are admin"),
        "{}",
        text(&out.stdout)
    );
    let out = gw
        .ssh(&key, "anyone", &["--", "--json", "projects"], None)
        .await;
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(v["ok"], true);
    let out = gw.ssh(&key, "anyone", &["prjects"], None).await;
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
    assert!(text(&out.stdout).contains("Did you mean 'projects'"));
    let out = gw.ssh(&key, "anyone", &["status", "nothere"], None).await;
    assert_eq!(
        out.status.code(),
        Some(4),
        "a missing project exits 4 (not_found)"
    );
    // A typo in the project's name is told as such, not as a bad command.
    let out = gw
        .ssh(
            &key,
            "anyone",
            &["new", "project", "demo", "--stack", "rust"],
            None,
        )
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let out = gw.ssh(&key, "demoo", &["ls", "/workspace"], None).await;
    assert_eq!(out.status.code(), Some(4), "not_found");
    assert!(
        text(&out.stderr).contains("there is no project 'demoo'; did you mean 'demo'?"),
        "{}",
        text(&out.stderr)
    );
    // A login name far from every project is the console as before.
    let out = gw.ssh(&key, "zzzzzz", &["ls", "/workspace"], None).await;
    assert_eq!(out.status.code(), Some(2));
    // The prompt, without a pty: one command per line.
    let out = gw
        .ssh(&key, "anyone", &[], Some("whoami\nstacks\nexit\n"))
        .await;
    assert!(
        text(&out.stdout).contains("kennel> ") && text(&out.stdout).contains("You are admin"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_get_a_message_and_can_request_access() {
    let gw = gateway().await;
    let (admin, public) = keygen(gw.dir.path(), "admin");
    gw.admin_key(&public).await;
    let (stranger, stranger_pub) = keygen(gw.dir.path(), "stranger");
    let out = gw.ssh(&stranger, "anyone", &["projects"], None).await;
    assert_eq!(out.status.code(), Some(3), "refused");
    assert!(
        text(&out.stderr).contains("ssh -p 2222 127.0.0.1 request-access"),
        "{}",
        text(&out.stderr)
    );
    let out = gw.ssh(&stranger, "anyone", &[], None).await;
    assert!(
        text(&out.stderr).contains("does not know this SSH key"),
        "no shell for unknown keys"
    );
    let out = gw
        .ssh(
            &stranger,
            "anyone",
            &["request-access", "it", "is", "me"],
            None,
        )
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("Access request #1 filed")
            && text(&out.stdout).contains("then connect again with this key")
            && !text(&out.stdout).contains("told here"),
        "{}",
        text(&out.stdout)
    );
    let out = gw.ssh(&admin, "anyone", &["requests"], None).await;
    let listed = text(&out.stdout);
    let fp = PublicKey::parse(&stranger_pub)
        .unwrap()
        .fingerprint()
        .to_string();
    assert!(
        listed.contains(&fp) && listed.contains("it is me"),
        "{listed}"
    );
    // Approved, the same key is a user.
    gw.ssh(&admin, "anyone", &["approve", "1"], None).await;
    let out = gw.ssh(&stranger, "anyone", &["whoami"], None).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stdout).contains("(member)"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_a_share_is_refused_and_a_closed_store_refuses_everyone() {
    let gw = gateway().await;
    let (admin, public) = keygen(gw.dir.path(), "admin");
    gw.admin_key(&public).await;
    let (member, member_pub) = keygen(gw.dir.path(), "member");
    gw.ssh(&member, "x", &["request-access"], None).await;
    gw.ssh(&admin, "x", &["approve", "1"], None).await;
    let out = gw
        .ssh(&admin, "x", &["new", "project", "secret"], None)
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let out = gw.ssh(&member, "secret", &["true"], None).await;
    assert_eq!(out.status.code(), Some(3), "refused");
    assert!(
        text(&out.stderr).contains("no project 'secret' that you own or that is shared"),
        "{}",
        text(&out.stderr)
    );
    let _ = member_pub;
    // The store goes away: nobody gets in, not even the admin.
    gw.store.close();
    let out = gw.ssh(&admin, "x", &["whoami"], None).await;
    assert_eq!(
        out.status.code(),
        Some(255),
        "authentication must fail: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sessions_at_once() {
    let gw = gateway().await;
    let (key, public) = keygen(gw.dir.path(), "admin");
    gw.admin_key(&public).await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..50 {
        set.spawn(run_ssh(
            gw.port,
            key.clone(),
            "anyone".into(),
            vec!["whoami".into()],
            None,
        ));
    }
    let mut outs = Vec::new();
    while let Some(o) = set.join_next().await {
        outs.push(o.unwrap());
    }
    let ok = outs.iter().filter(|o| o.status.code() == Some(0)).count();
    assert_eq!(
        ok,
        50,
        "{:?}",
        outs.iter()
            .find(|o| o.status.code() != Some(0))
            .map(|o| text(&o.stderr))
    );
}

/// `ssh -T` to the gateway with `key` at OpenSSH log level `level`.
fn ssh_cmd(port: u16, key: &Path, level: &str) -> std::process::Command {
    let mut c = kennel_testkit::ssh::client(port, key, level);
    c.arg("-T");
    c
}

/// An `ssh -N` connection held open (no session), until dropped.
struct Held(std::process::Child);

impl Held {
    fn open(port: u16, key: &Path) -> Self {
        use std::io::BufRead;
        // At DEBUG, ssh says when it has signed in: wait for that.
        let mut child = kennel_testkit::ssh::client(port, key, "DEBUG")
            .args(["-N", "anyone@127.0.0.1"])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut lines = stderr.lines();
        let signed_in = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("Authenticated to"));
        assert!(signed_in, "the held connection did not sign in");
        // Keep draining what it says later, so it never blocks on the pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self(child)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_say_which_limit_was_reached() {
    let gw = gateway_with(SshSettings {
        max_connections_per_ip: 1,
        ..SshSettings::default()
    })
    .await;
    let (key, public) = keygen(gw.dir.path(), "admin");
    gw.admin_key(&public).await;
    let held = Held::open(gw.port, &key);
    let out = ssh_cmd(gw.port, &key, "INFO")
        .args(["anyone@127.0.0.1", "whoami"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("too many connections from your address (the limit is 1)"),
        "{}",
        text(&out.stderr)
    );
    drop(held);

    let gw = gateway_with(SshSettings {
        max_connections_per_user: 1,
        ..SshSettings::default()
    })
    .await;
    let (key, public) = keygen(gw.dir.path(), "admin");
    gw.admin_key(&public).await;
    let held = Held::open(gw.port, &key);
    let out = gw.ssh(&key, "anyone", &["whoami"], None).await;
    assert_eq!(out.status.code(), Some(8), "rate_limited");
    assert!(
        text(&out.stderr).contains("you have too many connections open (the limit is 1)"),
        "{}",
        text(&out.stderr)
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_requests_are_limited_per_address_and_in_size() {
    let gw = gateway().await;
    let note = "n".repeat(60_000);
    let (k0, _) = keygen(gw.dir.path(), "k0");
    let out = gw
        .ssh(&k0, "anyone", &["request-access", &note], None)
        .await;
    assert_eq!(out.status.code(), Some(3), "refused");
    assert!(
        text(&out.stdout).contains("keep it to 500"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stdout).len() < 1000,
        "the note is not echoed back"
    );
    let mut last = String::new();
    for i in 1..=6 {
        let (k, _) = keygen(gw.dir.path(), &format!("k{i}"));
        let out = gw.ssh(&k, "anyone", &["request-access", "hi"], None).await;
        last = text(&out.stdout);
    }
    assert!(
        last.contains("this address has filed 5 access requests in the last hour"),
        "{last}"
    );
    let filed = gw
        .store
        .call(|c| kennel_core::store::repo::list_requests(c, true))
        .await
        .unwrap();
    assert_eq!(filed.len(), 4, "the refused ones were not filed");
}

/// Peak memory of this process (the gateway runs in it), in KiB.
fn peak_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_prompt_line_is_refused_without_being_held_or_echoed() {
    let gw = gateway().await;
    let (key, public) = keygen(gw.dir.path(), "admin");
    gw.admin_key(&public).await;
    // From a file, so the test itself holds no copy of the line.
    let file = gw.dir.path().join("huge-line");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..128 {
            f.write_all(&chunk).unwrap();
        }
        f.write_all(b"\nwhoami\nexit\n").unwrap();
    }
    let before = peak_kib();
    let out = ssh_cmd(gw.port, &key, "ERROR")
        .arg("anyone@127.0.0.1")
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    let said = text(&out.stdout);
    assert!(
        said.contains("Kennel reads commands of up to 8192 bytes"),
        "{:.300}",
        said
    );
    assert!(
        said.contains("You are admin"),
        "the session goes on: {:.300}",
        said
    );
    assert!(said.len() < 4096, "{} bytes came back", said.len());
    // The 128 MiB line was never held by the gateway (in this process).
    let grown = peak_kib().saturating_sub(before);
    assert!(grown < 64 << 10, "peak memory grew by {grown} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_never_answers_does_not_hold_up_another_project() {
    use kennel_core::store::repo;
    let gw = gateway().await;
    let (key, public) = keygen(gw.dir.path(), "admin");
    gw.admin_key(&public).await;
    let admin = Identity::local_console();
    for p in ["stuck", "other"] {
        let out = gw
            .exec
            .front_door(
                &admin,
                None,
                &format!("new project {p}"),
                kennel_core::Style::PLAIN,
                &NoProgress,
            )
            .await;
        assert!(out.outcome.is_ok(), "{:?}", out.outcome);
        let dir = gw.dir.path().join("keys/projects").join(p);
        std::fs::create_dir_all(&dir).unwrap();
        keygen(&dir, "id_ed25519");
    }
    // "stuck" accepts TCP and never says a word; "other" refuses at once.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stuck_addr = blackhole.local_addr().unwrap().to_string();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    gw.store
        .call(move |c| {
            repo::set_route(c, &"stuck".parse().unwrap(), &stuck_addr, "127.0.0.1:1")?;
            repo::set_route(c, &"other".parse().unwrap(), &closed, "127.0.0.1:1")
        })
        .await
        .unwrap();
    let into = |p: &str| {
        ssh_cmd(gw.port, &key, "ERROR")
            .arg(format!("{p}@127.0.0.1"))
            .arg("true")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut stuck = into("stuck");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let other = into("other").wait_with_output().unwrap();
    // The session into "other" ended (it cannot reach its VM) while the
    // one into "stuck" is still waiting for its VM's answer.
    if stuck.try_wait().unwrap().is_some() {
        let out = stuck.wait_with_output().unwrap();
        panic!(
            "the stuck session ended first: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("connecting to the VM's sshd"),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    let _ = stuck.kill();
    let _ = stuck.wait();
    drop(blackhole);
}

/// OpenSSH's `ssh` with no configuration files, trusting any host key,
/// passwords off.
fn bare_ssh() -> std::process::Command {
    let mut c = std::process::Command::new("ssh");
    c.args(["-F", "/dev/null", "-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
        .args(["-o", "PasswordAuthentication=no"]);
    c
}

/// `ssh` with no `-i`: keys come from an `ssh-agent` holding `keys` (in
/// that order), as most people's do.
fn ssh_with_agent(port: u16, agent_keys: &[&Path], dir: &Path, args: &[&str]) -> Output {
    require("ssh-agent", "openssh-client");
    require("ssh-add", "openssh-client");
    let sock = dir.join(format!("agent-{}.sock", agent_keys.len()));
    let _ = std::fs::remove_file(&sock);
    let mut agent = std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for k in agent_keys {
        let ok = std::process::Command::new("ssh-add")
            .arg("-q")
            .arg(k)
            .env("SSH_AUTH_SOCK", &sock)
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let out = bare_ssh()
        // No key files of this machine's user: only the agent's.
        .args(["-o", "IdentityFile=/nonexistent"])
        .args(["-T", "-p", &port.to_string(), "anyone@127.0.0.1"])
        .args(args)
        .env("SSH_AUTH_SOCK", &sock)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_are_declined_so_the_registered_one_is_tried() {
    let gw = gateway().await;
    let d = gw.dir.path().to_owned();
    let (one, _) = keygen(&d, "stray-one");
    let (two, _) = keygen(&d, "stray-two");
    let (mine, public) = keygen(&d, "mine");
    gw.admin_key(&public).await;
    // The agent offers two unknown keys first, the registered one last.
    let port = gw.port;
    let (a, b, c, dd) = (one.clone(), two.clone(), mine.clone(), d.clone());
    let out =
        tokio::task::spawn_blocking(move || ssh_with_agent(port, &[&a, &b, &c], &dd, &["whoami"]))
            .await
            .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("You are admin"),
        "{}",
        text(&out.stdout)
    );
    // The same with -i order.
    let out = tokio::task::spawn_blocking(move || {
        bare_ssh()
            .args(["-o", "IdentitiesOnly=yes"])
            .arg("-i")
            .arg(&one)
            .arg("-i")
            .arg(&two)
            .arg("-i")
            .arg(&mine)
            .args(["-T", "-p", &port.to_string(), "anyone@127.0.0.1", "whoami"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("You are admin"),
        "{}",
        text(&out.stdout)
    );
    // Only unknown keys: the request-access session, with a proven key.
    let (a, b) = (d.join("stray-one"), d.join("stray-two"));
    let out = tokio::task::spawn_blocking(move || ssh_with_agent(port, &[&a, &b], &d, &["whoami"]))
        .await
        .unwrap();
    assert!(
        text(&out.stderr).contains("does not know this SSH key"),
        "{} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_config_prints_a_host_block_per_project_that_ssh_reads() {
    let gw = gateway().await;
    let (key, public) = keygen(gw.dir.path(), "admin");
    gw.admin_key(&public).await;
    for name in ["web", "shop"] {
        gw.admin_run(&format!("new project {name} --stack rust"))
            .await;
    }
    let out = gw.ssh(&key, "anyone", &["ssh-config"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let cfg = gw.dir.path().join("kennel_config");
    std::fs::write(&cfg, &out.stdout).unwrap();
    for name in ["web", "shop"] {
        let g = std::process::Command::new("ssh")
            .arg("-G")
            .arg("-F")
            .arg(&cfg)
            .arg(format!("kennel-{name}"))
            .output()
            .unwrap();
        assert!(g.status.success(), "{}", text(&g.stderr));
        let g = text(&g.stdout);
        assert!(g.lines().any(|l| l == format!("user {name}")), "{g}");
        assert!(g.lines().any(|l| l.starts_with("hostname ")), "{g}");
        assert!(
            g.lines()
                .any(|l| l.starts_with("hostkeyalias kennel-gateway-")),
            "{g}"
        );
    }
    // JSON names the aliases.
    let out = gw
        .ssh(&key, "anyone", &["--", "--json", "ssh-config"], None)
        .await;
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(v["aliases"].as_array().unwrap().len(), 2, "{v}");
}
