//! The SSH gateway (russh): `ssh HOST [command]` speaks the command
//! language; `ssh PROJECT@HOST` lands in the project's VM, with everything
//! editors use bridged to the VM's sshd.
//!
//! Authentication is by public key only and fails closed: a key gets in
//! only if the store says it is active for a user; any error looking it up
//! denies. An unknown key is let into a restricted session that can do one
//! thing: file an access request with that key (`ssh HOST request-access
//! [note]`); anything else gets a message saying so.
//!
//! Each client channel is a bridge task fed by an ordered queue of what the
//! client asked (pty, env, shell/exec/subsystem, data, window changes,
//! signals, EOF). Handlers only enqueue and reply, so a stopped VM can be
//! started (progress on stderr) and its connection opened without losing
//! order. One upstream connection per VM is shared by every channel to it:
//! a new channel costs ~0.09 s under TCG, a new connection 0.5-1 s.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kennel_core::command::Command;
use kennel_core::keys::{Fingerprint, PublicKey};
use kennel_core::model::{AuditOutcome, Frontend, Identity, User};
use kennel_core::names::ProjectName;
use kennel_core::provision::{Progress, ProgressSink};
use kennel_core::store::repo::{self, AuditEntry};
use kennel_core::{exit_code, render, Executor, Format};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{
    client, Channel, ChannelId, ChannelMsg, ChannelWriteHalf, MethodKind, MethodSet, Pty, Sig,
};
use tokio::sync::mpsc;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum SshGatewayError {
    #[error("cannot read or write the host key {path}")]
    HostKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the host key {path} is not a valid OpenSSH private key: {message}")]
    BadHostKey { path: PathBuf, message: String },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Limits and paths of the gateway.
#[derive(Debug, Clone)]
pub struct SshSettings {
    /// Where project keys (`keys/projects/<p>/id_ed25519`) and VM host keys
    /// (`vms/<p>/ssh_host_ed25519_key.pub`) are.
    pub data_dir: PathBuf,
    pub max_connections_per_ip: usize,
    pub max_connections_per_user: usize,
    /// Failed authentications an address may have per ten minutes.
    pub max_auth_failures_per_ip: u32,
    /// Access requests an address may file per hour (unknown keys are
    /// free to make, so the address is what is counted).
    pub max_requests_per_ip: u32,
    pub idle_timeout: Duration,
}

impl Default for SshSettings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("kennel-data"),
            max_connections_per_ip: 64,
            max_connections_per_user: 64,
            max_auth_failures_per_ip: 20,
            max_requests_per_ip: 5,
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// Loads the gateway's ed25519 host key, making it on first start (0600).
pub fn host_key(path: &Path) -> Result<PrivateKey, SshGatewayError> {
    let io = |source| SshGatewayError::HostKey {
        path: path.to_owned(),
        source,
    };
    if path.exists() {
        return russh::keys::load_secret_key(path, None).map_err(|e| SshGatewayError::BadHostKey {
            path: path.to_owned(),
            message: e.to_string(),
        });
    }
    let key =
        PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519).map_err(|e| {
            SshGatewayError::BadHostKey {
                path: path.to_owned(),
                message: e.to_string(),
            }
        })?;
    let pem = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| SshGatewayError::BadHostKey {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        f.write_all(pem.as_bytes()).map_err(io)?;
    }
    Ok(key)
}

/// `SHA256:...` of a host key, for `doctor` and replies.
pub fn host_key_fingerprint(key: &PrivateKey) -> String {
    key.public_key().fingerprint(HashAlg::Sha256).to_string()
}

#[derive(Debug, Default)]
struct Counters {
    per_ip: HashMap<IpAddr, usize>,
    per_user: HashMap<String, usize>,
    failures: HashMap<IpAddr, (u32, Instant)>,
    /// Access requests filed per address, and since when.
    requests: HashMap<IpAddr, (u32, Instant)>,
}

impl Shared {
    /// Makes sure `p`'s VM runs before a channel into it is opened: every
    /// entry point (a session, `ssh -L`, a Unix-socket forward, `ssh -J`)
    /// comes here, for a user allowed to enter the project. A project with
    /// a route is running (stopped ones have none), so that path costs one
    /// store read.
    async fn wake(&self, identity: &Identity, user: &User, p: &ProjectName) -> Result<(), String> {
        let project = self
            .exec
            .ssh_access(user, p)
            .await
            .map_err(|e| e.to_string())?;
        let n = p.clone();
        if let Ok(Some(_)) = self.exec.store().call(move |c| repo::route(c, &n)).await {
            return Ok(());
        }
        self.exec
            .ensure_running(
                identity,
                user,
                &project,
                &kennel_core::provision::NoProgress,
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Counts an access request against the address; false past its limit.
    fn may_file_request(&self, ip: Option<IpAddr>) -> bool {
        let (Some(ip), Ok(mut c)) = (ip, self.counters.lock()) else {
            return false;
        };
        let e = c.requests.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() > Duration::from_secs(3600) {
            *e = (0, Instant::now());
        }
        if e.0 >= self.settings.max_requests_per_ip {
            return false;
        }
        e.0 += 1;
        true
    }
}

/// A project's place in the upstream pool: its connection, if made, behind
/// the lock its (one) connect holds.
type PoolSlot = Arc<tokio::sync::Mutex<Option<Arc<client::Handle<Upstream>>>>>;

/// Shared by every connection.
struct Shared {
    exec: Executor,
    settings: SshSettings,
    counters: Mutex<Counters>,
    /// One pooled connection per project's VM, each behind its own lock:
    /// sessions into one project wait for its one connect, and a VM that
    /// does not answer never holds up sessions into another.
    upstreams: Mutex<HashMap<String, PoolSlot>>,
    next_id: AtomicU64,
}

/// The SSH gateway.
#[derive(Clone)]
pub struct SshGateway {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SshGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshGateway").finish_non_exhaustive()
    }
}

impl SshGateway {
    /// A gateway running commands through `exec`.
    pub fn new(exec: Executor, settings: SshSettings) -> Self {
        Self {
            shared: Arc::new(Shared {
                exec,
                settings,
                counters: Mutex::new(Counters::default()),
                upstreams: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        key: PrivateKey,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        let config = Arc::new(russh::server::Config {
            keys: vec![key],
            methods: MethodSet::from(&[MethodKind::PublicKey][..]),
            inactivity_timeout: Some(self.shared.settings.idle_timeout),
            keepalive_interval: Some(Duration::from_secs(30)),
            auth_rejection_time: Duration::from_millis(500),
            auth_rejection_time_initial: Some(Duration::ZERO),
            preferred: russh::Preferred {
                // AES-GCM runs on AES-NI; chacha20 is pure Rust here. Clients
                // put chacha20 first, so offering only AES-GCM steers them.
                cipher: std::borrow::Cow::Borrowed(&[
                    russh::cipher::AES_256_GCM,
                    russh::cipher::AES_128_GCM,
                ]),
                ..russh::Preferred::default()
            },
            ..Default::default()
        });
        let mut server = self;
        let running = russh::server::Server::run_on_socket(&mut server, config, &listener);
        tokio::select! {
            r = running => r,
            () = shutdown => Ok(()),
        }
    }
}

impl russh::server::Server for SshGateway {
    type Handler = Conn;

    fn new_client(&mut self, peer: Option<SocketAddr>) -> Conn {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let ip = peer.map(|p| p.ip());
        let mut too_many = false;
        if let Some(ip) = ip {
            if let Ok(mut c) = self.shared.counters.lock() {
                let n = c.per_ip.entry(ip).or_default();
                *n += 1;
                too_many = *n > self.shared.settings.max_connections_per_ip;
            }
        }
        Conn {
            shared: self.shared.clone(),
            id,
            ip,
            too_many,
            who: None,
            target: Target::Console,
            refusal: None,
            channels: HashMap::new(),
        }
    }
}

/// Who authenticated.
#[derive(Debug, Clone)]
enum Who {
    Known {
        user: User,
        identity: Identity,
    },
    /// A key Kennel does not know: may only request access.
    Unknown {
        key: PublicKey,
        identity: Identity,
    },
}

#[derive(Debug, Clone)]
enum Target {
    Console,
    Project(ProjectName),
}

/// What a client asked of a channel, in order.
#[derive(Debug)]
enum Op {
    Pty {
        term: String,
        cols: u32,
        rows: u32,
        px: u32,
        py: u32,
        modes: Vec<(Pty, u32)>,
    },
    Env(String, String),
    Shell,
    Exec(Vec<u8>),
    Subsystem(String),
    Data(Vec<u8>),
    Window {
        cols: u32,
        rows: u32,
        px: u32,
        py: u32,
    },
    Signal(Sig),
    Eof,
    /// The client offers its agent (`ssh -A`).
    Agent,
}

/// One client connection.
pub struct Conn {
    shared: Arc<Shared>,
    id: u64,
    ip: Option<IpAddr>,
    too_many: bool,
    who: Option<Who>,
    target: Target,
    /// Why this user may not enter the project they named.
    refusal: Option<String>,
    channels: HashMap<ChannelId, mpsc::Sender<Op>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("ip", &self.ip)
            .finish_non_exhaustive()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Ok(mut c) = self.shared.counters.lock() {
            if let Some(ip) = self.ip {
                if let Some(n) = c.per_ip.get_mut(&ip) {
                    *n = n.saturating_sub(1);
                }
            }
            if let Some(Who::Known { user, .. }) = &self.who {
                if let Some(n) = c.per_user.get_mut(user.name.as_str()) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }
}

/// What an unknown key is told: how to ask, with the gateway's real
/// public address.
fn unknown_key(settings: &kennel_core::Settings) -> String {
    let port = match settings.ssh_port {
        22 => String::new(),
        p => format!("-p {p} "),
    };
    format!(
        "Kennel does not know this SSH key yet.\r\nAsk for access with this same key:\r\n\r\n    ssh {port}{} request-access [a note for the admins]\r\n\r\nAn admin approves or denies it in chat; then connect again.\r\n",
        settings.ssh_host
    )
}

impl Conn {
    fn failed_auth(&self) {
        if let (Some(ip), Ok(mut c)) = (self.ip, self.shared.counters.lock()) {
            let e = c.failures.entry(ip).or_insert((0, Instant::now()));
            if e.1.elapsed() > Duration::from_secs(600) {
                *e = (0, Instant::now());
            }
            e.0 += 1;
        }
    }

    fn blocked(&self) -> bool {
        let limit = self.shared.settings.max_auth_failures_per_ip;
        match (self.ip, self.shared.counters.lock()) {
            (Some(ip), Ok(c)) => c.failures.get(&ip).is_some_and(|(n, since)| {
                *n >= limit && since.elapsed() < Duration::from_secs(600)
            }),
            _ => false,
        }
    }

    fn span(&self) -> tracing::Span {
        let user = match &self.who {
            Some(Who::Known { user, .. }) => user.name.to_string(),
            Some(Who::Unknown { .. }) => "(unknown key)".into(),
            None => "-".into(),
        };
        let project = match &self.target {
            Target::Project(p) => p.to_string(),
            Target::Console => "-".into(),
        };
        tracing::info_span!("ssh", session = self.id, user = %user, project = %project)
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    /// Sent before authentication: the one place a refused client can be
    /// told why (OpenSSH prints it), instead of a bare "Permission denied".
    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        let s = &self.shared.settings;
        if self.too_many {
            return Ok(Some(format!(
                "Kennel: too many connections from your address (the limit is {}); close some and try again.\r\n",
                s.max_connections_per_ip
            )));
        }
        if self.blocked() {
            return Ok(Some(format!(
                "Kennel: too many failed sign-ins from your address (the limit is {} per 10 minutes); wait and try again.\r\n",
                s.max_auth_failures_per_ip
            )));
        }
        Ok(None)
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.too_many || self.blocked() {
            tracing::warn!(session = self.id, ip = ?self.ip, "refused: too many connections or failed attempts");
            return Ok(Auth::reject());
        }
        let fp = Fingerprint::of(key.public_key);
        let identity = Identity::new(Frontend::Ssh, fp.as_str());
        let store = self.shared.exec.store().clone();
        let lookup = {
            let fp = fp.clone();
            store.call(move |c| repo::user_by_active_key(c, &fp)).await
        };
        let found = match lookup {
            Ok(u) => u,
            Err(e) => {
                // Fail closed: no store, no entry.
                tracing::error!(session = self.id, error = %e, "key lookup failed; refusing");
                self.failed_auth();
                return Ok(Auth::reject());
            }
        };
        // `ssh PROJECT@HOST` enters a project; any other name is the console.
        if let Ok(name) = ProjectName::new(user) {
            let n = name.clone();
            match store.call(move |c| repo::project_by_name(c, &n)).await {
                Ok(Some(_)) => self.target = Target::Project(name),
                Ok(None) => {}
                Err(_) => return Ok(Auth::reject()),
            }
        }
        match found {
            Some(u) => {
                if let Ok(mut c) = self.shared.counters.lock() {
                    let n = c.per_user.entry(u.name.to_string()).or_default();
                    *n += 1;
                    if *n > self.shared.settings.max_connections_per_user {
                        // Signed in, so the session can say why before it ends.
                        self.refusal = Some(format!(
                            "you have too many connections open (the limit is {}); close some and try again",
                            self.shared.settings.max_connections_per_user
                        ));
                    }
                }
                if let Target::Project(p) = &self.target {
                    if let Err(e) = self.shared.exec.ssh_access(&u, p).await {
                        self.refusal = Some(e.to_string());
                    }
                }
                self.who = Some(Who::Known { user: u, identity });
            }
            None => {
                let Ok(openssh) = key.public_key.to_openssh() else {
                    return Ok(Auth::reject());
                };
                match PublicKey::parse(&openssh) {
                    Ok(pk) => self.who = Some(Who::Unknown { key: pk, identity }),
                    Err(_) => {
                        self.failed_auth();
                        return Ok(Auth::reject());
                    }
                }
            }
        }
        Ok(Auth::Accept)
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        let span = self.span();
        let _e = span.enter();
        tracing::info!("ssh session authenticated");
        if let (Some(Who::Known { user, identity }), Target::Project(p), None) =
            (&self.who, &self.target, &self.refusal)
        {
            let (uid, identity, project) = (user.id, identity.clone(), p.to_string());
            let _ = self
                .shared
                .exec
                .store()
                .call(move |c| {
                    repo::audit(
                        c,
                        &AuditEntry {
                            user: Some(uid),
                            identity: &identity,
                            action: "ssh login",
                            target: Some(&project),
                            outcome: AuditOutcome::Ok,
                            detail: None,
                        },
                    )
                })
                .await;
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(who) = self.who.clone() else {
            return Ok(());
        };
        let id = channel.id();
        // Requests arrive through the handler methods; the channel's own
        // message queue is not read, and dropping it keeps it from filling.
        let (read, write) = channel.split();
        drop(read);
        let (tx, rx) = mpsc::channel(64);
        self.channels.insert(id, tx);
        let bridge = Bridge {
            shared: self.shared.clone(),
            ip: self.ip,
            who,
            target: self.target.clone(),
            refusal: self.refusal.clone(),
            client: write,
            session: _session.handle(),
            id,
            span: self.span(),
        };
        tokio::spawn(bridge.run(rx));
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        orig_addr: &str,
        orig_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(Who::Known { user, identity }) = self.who.clone() else {
            return Ok(());
        };
        let shared = self.shared.clone();
        let (host, orig_addr) = (host.to_owned(), orig_addr.to_owned());
        // Answered from a task of its own: waking a stopped VM takes
        // seconds, and the connection's other channels go on meanwhile.
        match self.target.clone() {
            // `ssh -L` inside a project: forwarded by the VM's sshd.
            Target::Project(p) if self.refusal.is_none() => {
                tokio::spawn(async move {
                    if let Err(e) = shared.wake(&identity, &user, &p).await {
                        tracing::warn!(project = %p, error = %e, "cannot start the VM for a forward");
                        return;
                    }
                    let upstream = match shared.upstream(&p).await {
                        Ok(u) => u,
                        Err(e) => {
                            tracing::warn!(project = %p, error = %e, "cannot reach the VM for a forward");
                            return;
                        }
                    };
                    let Ok(up) = upstream
                        .channel_open_direct_tcpip(host, port, orig_addr, orig_port)
                        .await
                    else {
                        return;
                    };
                    reply.accept().await;
                    splice(channel.into_stream(), up.into_stream()).await;
                });
            }
            // `ssh -J HOST project`: a raw path to the project's sshd.
            Target::Console => {
                let Ok(p) = ProjectName::new(&host) else {
                    return Ok(());
                };
                if port != 22 {
                    tracing::info!(project = %host, user = %user.name, "refused a jump");
                    return Ok(());
                }
                tokio::spawn(async move {
                    if let Err(e) = shared.wake(&identity, &user, &p).await {
                        tracing::info!(project = %p, user = %user.name, error = %e, "refused a jump");
                        return;
                    }
                    let n = p.clone();
                    let route = shared.exec.store().call(move |c| repo::route(c, &n)).await;
                    let Ok(Some(route)) = route else {
                        return;
                    };
                    let Ok(tcp) = tokio::net::TcpStream::connect(&route.ssh_addr).await else {
                        return;
                    };
                    reply.accept().await;
                    splice(channel.into_stream(), tcp).await;
                });
            }
            Target::Project(_) => {}
        }
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // VS Code Remote-SSH forwards to a Unix socket in the VM.
        let (Target::Project(p), None, Some(Who::Known { user, identity })) =
            (self.target.clone(), &self.refusal, self.who.clone())
        else {
            return Ok(());
        };
        let shared = self.shared.clone();
        let socket_path = socket_path.to_owned();
        tokio::spawn(async move {
            if let Err(e) = shared.wake(&identity, &user, &p).await {
                tracing::warn!(project = %p, error = %e, "cannot start the VM for a forward");
                return;
            }
            let Ok(upstream) = shared.upstream(&p).await else {
                return;
            };
            let Ok(up) = upstream.channel_open_direct_streamlocal(socket_path).await else {
                return;
            };
            reply.accept().await;
            splice(channel.into_stream(), up.into_stream()).await;
        });
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let op = Op::Pty {
            term: term.to_owned(),
            cols: col_width,
            rows: row_height,
            px: pix_width,
            py: pix_height,
            modes: modes.to_vec(),
        };
        self.push(channel, op, session).await
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.push(channel, Op::Env(name.to_owned(), value.to_owned()), session)
            .await
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.push(channel, Op::Shell, session).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.push(channel, Op::Exec(data.to_vec()), session).await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.push(channel, Op::Subsystem(name.to_owned()), session)
            .await
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send(
            channel,
            Op::Window {
                cols: col_width,
                rows: row_height,
                px: pix_width,
                py: pix_height,
            },
        )
        .await;
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send(channel, Op::Signal(signal)).await;
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send(channel, Op::Data(data.to_vec())).await;
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send(channel, Op::Eof).await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Dropping the queue ends the bridge, which closes upstream.
        self.channels.remove(&channel);
        Ok(())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // Relayed only inside projects (there is nothing to sign for in
        // command mode).
        if matches!(self.target, Target::Project(_)) && self.refusal.is_none() {
            Ok(self.send(channel, Op::Agent).await)
        } else {
            Ok(false)
        }
    }

    async fn tcpip_forward(
        &mut self,
        _address: &str,
        _port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(false)
    }
}

impl Conn {
    /// Queues a request and tells the client it was accepted.
    async fn push(
        &mut self,
        channel: ChannelId,
        op: Op,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        if self.send(channel, op).await {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn send(&mut self, channel: ChannelId, op: Op) -> bool {
        match self.channels.get(&channel) {
            // Bounded: a fast uploader waits for the VM instead of filling memory.
            Some(tx) => tx.send(op).await.is_ok(),
            None => false,
        }
    }
}

/// Copies both ways until either side ends.
async fn splice<A, B>(mut a: A, mut b: B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
}

/// One client session channel.
struct Bridge {
    shared: Arc<Shared>,
    /// The client's address, for per-address limits.
    ip: Option<IpAddr>,
    who: Who,
    target: Target,
    refusal: Option<String>,
    client: ChannelWriteHalf<Msg>,
    /// For exit signals and agent channels towards the client.
    session: russh::server::Handle,
    id: ChannelId,
    span: tracing::Span,
}

/// Progress lines on the client's stderr.
struct StderrSink(mpsc::UnboundedSender<String>);

impl ProgressSink for StderrSink {
    fn report(&self, p: Progress) {
        let _ = self.0.send(format!("… {p}\r\n"));
    }
}

impl Bridge {
    async fn run(self, rx: mpsc::Receiver<Op>) {
        let span = self.span.clone();
        let _e = span.enter();
        let code = match (&self.who, self.target.clone(), self.refusal.clone()) {
            (_, _, Some(why)) => {
                self.stderr(&format!("{why}\r\n")).await;
                Some(1)
            }
            (Who::Unknown { .. }, _, _) => Some(self.unknown(rx).await),
            (Who::Known { .. }, Target::Console, _) => Some(self.console(rx).await),
            (Who::Known { user, identity }, Target::Project(p), _) => {
                let (user, identity) = (user.clone(), identity.clone());
                self.project(&user, &identity, &p, rx).await
            }
        };
        // None: the remote process ended by a signal, already passed on.
        if let Some(code) = code {
            let _ = self.client.exit_status(code).await;
        }
        let _ = self.client.eof().await;
        let _ = self.client.close().await;
    }

    async fn stdout(&self, text: &str) {
        let _ = self.client.data_bytes(text.as_bytes().to_vec()).await;
    }

    async fn stderr(&self, text: &str) {
        let _ = self
            .client
            .extended_data_bytes(1, text.as_bytes().to_vec())
            .await;
    }

    /// Waits for the session's request (shell, exec, subsystem), remembering a pty.
    async fn request(rx: &mut mpsc::Receiver<Op>) -> (Option<Op>, bool) {
        let mut pty = false;
        while let Some(op) = rx.recv().await {
            match op {
                Op::Pty { .. } => pty = true,
                Op::Shell | Op::Exec(_) | Op::Subsystem(_) => return (Some(op), pty),
                _ => {}
            }
        }
        (None, pty)
    }

    /// An unknown key: only `request-access [note]`.
    async fn unknown(&self, mut rx: mpsc::Receiver<Op>) -> u32 {
        let Who::Unknown { key, identity } = &self.who else {
            return 1;
        };
        match Self::request(&mut rx).await.0 {
            Some(Op::Exec(line)) => {
                let line = String::from_utf8_lossy(&line).trim().to_owned();
                let rest = line.strip_prefix("request-access").map(str::trim);
                match rest {
                    Some(_) if !self.shared.may_file_request(self.ip) => {
                        self.stdout(&format!(
                            "refused: this address has filed {} access requests in the last hour, its limit; wait, or ask an admin directly\r\n",
                            self.shared.settings.max_requests_per_ip
                        ))
                        .await;
                        1
                    }
                    Some(note) => {
                        let cmd = Command::RequestAccess {
                            key: key.clone(),
                            note: (!note.is_empty()).then(|| note.to_owned()),
                        };
                        let out = self
                            .shared
                            .exec
                            .execute_as(identity, None, cmd, &kennel_core::provision::NoProgress)
                            .await;
                        self.stdout(&format!(
                            "{}\r\n",
                            render(&out, Format::Plain).replace('\n', "\r\n")
                        ))
                        .await;
                        u32::try_from(exit_code(&out)).unwrap_or(1)
                    }
                    None => {
                        self.stderr(&unknown_key(self.shared.exec.settings())).await;
                        1
                    }
                }
            }
            _ => {
                self.stderr(&unknown_key(self.shared.exec.settings())).await;
                1
            }
        }
    }

    /// Runs one line of the command language for the user, through core's
    /// front door, with progress on the client's stderr.
    async fn run_line(&self, line: &str) -> (String, u32) {
        let Who::Known { user, identity } = &self.who else {
            return (String::new(), 1);
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink = StderrSink(tx);
        let work = self.shared.exec.front_door(
            identity,
            Some(Some(user.clone())),
            line,
            kennel_core::Style::PLAIN,
            &sink,
        );
        tokio::pin!(work);
        let answered = loop {
            tokio::select! {
                Some(line) = rx.recv() => self.stderr(&line).await,
                a = &mut work => break a,
            }
        };
        (answered.text, u32::try_from(answered.exit).unwrap_or(1))
    }

    /// Command mode: one command (`ssh HOST projects`), or a prompt.
    async fn console(&self, mut rx: mpsc::Receiver<Op>) -> u32 {
        let (req, pty) = Self::request(&mut rx).await;
        match req {
            Some(Op::Exec(line)) => {
                let (out, code) = self.run_line(String::from_utf8_lossy(&line).trim()).await;
                self.stdout(&format!("{out}\n")).await;
                code
            }
            Some(Op::Shell) => {
                self.prompt(rx, pty).await;
                0
            }
            Some(Op::Subsystem(name)) => {
                self.stderr(&format!(
                    "the {name} subsystem is only available inside a project: ssh PROJECT@HOST\r\n"
                ))
                .await;
                1
            }
            _ => 0,
        }
    }

    /// An interactive prompt with line editing and history.
    async fn prompt(&self, mut rx: mpsc::Receiver<Op>, pty: bool) {
        let nl = if pty { "\r\n" } else { "\n" };
        let name = match &self.who {
            Who::Known { user, .. } => user.name.to_string(),
            Who::Unknown { .. } => String::new(),
        };
        self.stdout(&format!(
            "Kennel — signed in as {name}. Type 'help', or 'exit' to leave.{nl}kennel> "
        ))
        .await;
        let mut line = String::new();
        // Bytes typed past the longest line the parser reads: counted, not kept.
        let mut dropped = 0usize;
        let mut history: Vec<String> = Vec::new();
        let mut pos = 0usize; // position in history when browsing
        let mut esc: Vec<u8> = Vec::new();
        while let Some(op) = rx.recv().await {
            let bytes = match op {
                Op::Data(b) => b,
                Op::Eof => return,
                _ => continue,
            };
            for b in bytes {
                if !esc.is_empty() || b == 0x1b {
                    esc.push(b);
                    if esc.len() == 3 {
                        let (up, down) = (esc == b"\x1b[A", esc == b"\x1b[B");
                        esc.clear();
                        if pty && (up || down) && !history.is_empty() {
                            pos = if up {
                                pos.saturating_sub(1)
                            } else {
                                (pos + 1).min(history.len())
                            };
                            line = history.get(pos).cloned().unwrap_or_default();
                            self.stdout(&format!("\r\x1b[Kkennel> {line}")).await;
                        }
                    }
                    continue;
                }
                match b {
                    b'\r' | b'\n' => {
                        if !pty && b == b'\r' {
                            continue;
                        }
                        self.stdout(nl).await;
                        let cmd = std::mem::take(&mut line);
                        if std::mem::take(&mut dropped) > 0 {
                            let e = kennel_core::ParseError::TooLong {
                                bytes: cmd.len() + dropped,
                            };
                            self.stdout(&format!("{e}{nl}kennel> ")).await;
                            continue;
                        }
                        let cmd = cmd.trim();
                        if cmd == "exit" || cmd == "quit" {
                            return;
                        }
                        if !cmd.is_empty() {
                            let (out, _) = self.run_line(cmd).await;
                            self.stdout(&format!(
                                "{}{nl}",
                                if pty { out.replace('\n', "\r\n") } else { out }
                            ))
                            .await;
                            history.push(cmd.to_owned());
                        }
                        pos = history.len();
                        self.stdout("kennel> ").await;
                    }
                    0x7f | 0x08 => {
                        // Erase on screen only what was really in the line.
                        let erased = line.pop().is_some();
                        if erased && pty {
                            self.stdout("\x08 \x08").await;
                        }
                    }
                    0x03 => {
                        line.clear();
                        dropped = 0;
                        self.stdout(&format!("^C{nl}kennel> ")).await;
                    }
                    0x04 if line.is_empty() => return,
                    c if c >= 0x20 && line.len() >= kennel_core::command::MAX_LINE_BYTES => {
                        dropped += 1;
                    }
                    c if c >= 0x20 => {
                        line.push(char::from(c));
                        if pty {
                            self.stdout(&char::from(c).to_string()).await;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Project mode: bridge everything to the VM's sshd. `None` when the
    /// remote process ended by a signal (passed on as such).
    async fn project(
        &self,
        user: &User,
        identity: &Identity,
        p: &ProjectName,
        mut rx: mpsc::Receiver<Op>,
    ) -> Option<u32> {
        let project = match self.shared.exec.ssh_access(user, p).await {
            Ok(project) => project,
            Err(e) => {
                self.stderr(&format!("{e}\r\n")).await;
                return Some(1);
            }
        };
        // Requests up to the session's own (shell, exec, subsystem) decide
        // the connection: a forwarded agent needs one of its own.
        let mut early = Vec::new();
        while let Some(op) = rx.recv().await {
            let done = matches!(op, Op::Shell | Op::Exec(_) | Op::Subsystem(_));
            early.push(op);
            if done {
                break;
            }
        }
        if early.is_empty() {
            return Some(0);
        }
        let wants_agent = early.iter().any(|o| matches!(o, Op::Agent));
        // A stopped VM is started, with progress on stderr.
        let (tx, mut lines) = mpsc::unbounded_channel();
        let sink = StderrSink(tx);
        let start = self
            .shared
            .exec
            .ensure_running(identity, user, &project, &sink);
        tokio::pin!(start);
        let started = loop {
            tokio::select! {
                Some(l) = lines.recv() => self.stderr(&l).await,
                o = &mut start => break o,
            }
        };
        if let Err(e) = started {
            self.stderr(&format!("cannot start {p}: {e}\r\n")).await;
            return Some(1);
        }
        let up = match self.open_upstream(p, wants_agent).await {
            Ok(c) => c,
            Err(e) => {
                self.stderr(&format!("cannot open a session in {p}: {e}\r\n"))
                    .await;
                return Some(1);
            }
        };
        let (mut up_read, up_write) = up.split();
        let client = &self.client;
        let session = &self.session;
        let id = self.id;
        // VM → client.
        let from_vm = async {
            let mut code = Some(0u32);
            while let Some(msg) = up_read.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        let _ = client.data_bytes(data.to_vec()).await;
                    }
                    ChannelMsg::ExtendedData { data, ext } => {
                        let _ = client.extended_data_bytes(ext, data.to_vec()).await;
                    }
                    ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status),
                    ChannelMsg::ExitSignal {
                        signal_name,
                        core_dumped,
                        error_message,
                        lang_tag,
                    } => {
                        let _ = session
                            .exit_signal_request(
                                id,
                                signal_name,
                                core_dumped,
                                error_message,
                                lang_tag,
                            )
                            .await;
                        code = None;
                    }
                    ChannelMsg::Eof => {
                        let _ = client.eof().await;
                    }
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            code
        };
        // Client → VM: what came before the session request, then the rest.
        let to_vm = async {
            let mut early = early.into_iter();
            loop {
                let op = match early.next() {
                    Some(op) => op,
                    None => match rx.recv().await {
                        Some(op) => op,
                        None => break,
                    },
                };
                let r = match op {
                    Op::Pty {
                        term,
                        cols,
                        rows,
                        px,
                        py,
                        modes,
                    } => {
                        up_write
                            .request_pty(false, &term, cols, rows, px, py, &modes)
                            .await
                    }
                    Op::Env(k, v) => up_write.set_env(false, k, v).await,
                    Op::Shell => up_write.request_shell(false).await,
                    Op::Exec(c) => up_write.exec(false, c).await,
                    Op::Subsystem(s) => up_write.request_subsystem(false, s).await,
                    Op::Data(d) => up_write.data_bytes(d).await,
                    Op::Window { cols, rows, px, py } => {
                        up_write.window_change(cols, rows, px, py).await
                    }
                    Op::Signal(s) => up_write.signal(s).await,
                    Op::Eof => up_write.eof().await,
                    Op::Agent => up_write.agent_forward(false).await,
                };
                if r.is_err() {
                    break;
                }
            }
            // The client closed its channel.
            let _ = up_write.close().await;
        };
        tokio::pin!(to_vm);
        tokio::pin!(from_vm);
        tokio::select! {
            code = &mut from_vm => code,
            () = &mut to_vm => from_vm.await,
        }
    }

    /// A session channel in the VM: on the pooled connection, or on one of
    /// its own when the client forwards its agent (the VM's sshd opens agent
    /// channels per connection, so they must lead back to this client).
    async fn open_upstream(
        &self,
        p: &ProjectName,
        agent: bool,
    ) -> Result<Channel<client::Msg>, String> {
        if agent {
            let handle = self
                .shared
                .connect(p, Some(self.session.clone()))
                .await
                .map_err(|e| e.to_string())?;
            return handle
                .channel_open_session()
                .await
                .map_err(|e| e.to_string());
        }
        let upstream = self.shared.upstream(p).await.map_err(|e| e.to_string())?;
        match upstream.channel_open_session().await {
            Ok(c) => Ok(c),
            Err(_) => {
                // The pooled connection may have died with its VM: once more.
                self.shared.forget(p).await;
                let upstream = self.shared.upstream(p).await.map_err(|e| e.to_string())?;
                upstream
                    .channel_open_session()
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// The gateway's client side towards a VM: trusts only the VM's own host key.
pub struct Upstream {
    host_key: Option<russh::keys::PublicKey>,
    /// The client whose agent this connection relays, if any.
    agent_to: Option<russh::server::Handle>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("agent", &self.agent_to.is_some())
            .finish_non_exhaustive()
    }
}

impl client::Handler for Upstream {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(match (key, &self.host_key) {
            (russh::keys::PublicKeyOrCertificate::PublicKey { key, .. }, Some(pinned)) => {
                key.key_data() == pinned.key_data()
            }
            _ => false,
        })
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: Channel<client::Msg>,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        // The VM's sshd wants the agent: open one to the client and splice.
        if let Some(client) = &self.agent_to {
            if let Ok(to_client) = client.channel_open_agent().await {
                reply.accept().await;
                tokio::spawn(splice(channel.into_stream(), to_client.into_stream()));
            }
        }
        Ok(())
    }
}

/// Why the VM could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the project has no VM address yet (is it created?)")]
    NoRoute,
    #[error("cannot read the project key {0}")]
    Key(PathBuf),
    #[error("connecting to the VM's sshd at {addr} failed: {message}")]
    Connect { addr: String, message: String },
    #[error("the VM refused the project key")]
    Refused,
}

impl Shared {
    /// The pooled connection to a project's VM, made if needed.
    async fn upstream(
        &self,
        p: &ProjectName,
    ) -> Result<Arc<client::Handle<Upstream>>, UpstreamError> {
        let slot = self
            .upstreams
            .lock()
            .map_err(|_| UpstreamError::NoRoute)?
            .entry(p.to_string())
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(h) = slot.as_ref().filter(|h| !h.is_closed()) {
            return Ok(h.clone());
        }
        let handle = Arc::new(self.connect(p, None).await?);
        *slot = Some(handle.clone());
        Ok(handle)
    }

    /// A new connection to a project's VM, relaying agent channels to
    /// `agent_to` if given.
    async fn connect(
        &self,
        p: &ProjectName,
        agent_to: Option<russh::server::Handle>,
    ) -> Result<client::Handle<Upstream>, UpstreamError> {
        let n = p.clone();
        let route = self
            .exec
            .store()
            .call(move |c| repo::route(c, &n))
            .await
            .ok()
            .flatten()
            .ok_or(UpstreamError::NoRoute)?;
        let key_path = self
            .settings
            .data_dir
            .join("keys/projects")
            .join(p.as_str())
            .join("id_ed25519");
        let key = russh::keys::load_secret_key(&key_path, None)
            .map_err(|_| UpstreamError::Key(key_path.clone()))?;
        let host_key = std::fs::read_to_string(
            self.settings
                .data_dir
                .join("vms")
                .join(p.as_str())
                .join("ssh_host_ed25519_key.pub"),
        )
        .ok()
        .and_then(|t| russh::keys::PublicKey::from_openssh(t.trim()).ok());
        let config = Arc::new(client::Config {
            keepalive_interval: Some(Duration::from_secs(30)),
            // russh's default order (chacha20 first) is kept for the VM leg:
            // measured under TCG, AES-GCM there cost throughput (17.0 vs
            // 20.9 MiB/s), as the guest's AES instructions are emulated.
            ..Default::default()
        });
        let connect = client::connect(
            config,
            route.ssh_addr.as_str(),
            Upstream { host_key, agent_to },
        );
        let mut handle = tokio::time::timeout(Duration::from_secs(20), connect)
            .await
            .map_err(|_| UpstreamError::Connect {
                addr: route.ssh_addr.clone(),
                message: "timed out".into(),
            })?
            .map_err(|e| UpstreamError::Connect {
                addr: route.ssh_addr.clone(),
                message: e.to_string(),
            })?;
        let auth = handle
            .authenticate_publickey("dev", PrivateKeyWithHashAlg::new(Arc::new(key), None))
            .await
            .map_err(|e| UpstreamError::Connect {
                addr: route.ssh_addr.clone(),
                message: e.to_string(),
            })?;
        if !auth.success() {
            return Err(UpstreamError::Refused);
        }
        Ok(handle)
    }

    async fn forget(&self, p: &ProjectName) {
        if let Ok(mut pool) = self.upstreams.lock() {
            pool.remove(p.as_str());
        }
    }
}
