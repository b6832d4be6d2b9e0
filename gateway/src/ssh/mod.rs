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
//!
//! The gateway talks to core only through [`kennel_core::Gate`] (keys,
//! entry decisions, waking, routes) and the front door (commands). Its
//! parts, after russh's own server layout:
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | settings, host key, the server and its shared state |
//! | `limits.rs` | per-address and per-user limits, failed sign-ins |
//! | `handler.rs` | russh's handler: authentication, channels, the per-channel queue |
//! | `console.rs` | command mode: one command, the prompt, unknown keys |
//! | `bridge.rs` | project mode: a session bridged to the VM's sshd |
//! | `pool.rs` | waking projects and the per-project upstream pool |

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kennel_core::keys::PublicKey;
use kennel_core::model::{Identity, User};
use kennel_core::names::ProjectName;
use kennel_core::provision::{Progress, ProgressSink};
use kennel_core::Gate;
use russh::keys::{HashAlg, PrivateKey};
use russh::server::Msg;
use russh::{ChannelId, ChannelWriteHalf, MethodKind, MethodSet, Pty, Sig};
use tokio::sync::mpsc;

mod bridge;
mod console;
mod handler;
mod limits;
mod pool;

pub use crate::vmlink::{Upstream, UpstreamError};

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

/// Limits of the gateway.
#[derive(Debug, Clone)]
pub struct SshSettings {
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

/// Shared by every connection.
struct Shared {
    /// All of core the gateway sees: commands go through its front door.
    gate: Gate,
    settings: SshSettings,
    counters: Mutex<Counters>,
    /// Connections into VMs (shared with the HTTPS gateway by `links`).
    links: Arc<crate::vmlink::VmLinks>,
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
    /// A gateway running commands through `gate`.
    pub fn new(gate: Gate, settings: SshSettings) -> Self {
        let links = crate::vmlink::VmLinks::new(gate.clone());
        Self::with_links(gate, settings, links)
    }

    /// A gateway whose connections into VMs are `links` (shared with the
    /// HTTPS gateway).
    pub fn with_links(
        gate: Gate,
        settings: SshSettings,
        links: Arc<crate::vmlink::VmLinks>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                gate,
                settings,
                counters: Mutex::new(Counters::default()),
                links,
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Its connections into VMs.
    pub fn links(&self) -> Arc<crate::vmlink::VmLinks> {
        self.shared.links.clone()
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
            methods: auth_methods(),
            inactivity_timeout: Some(self.shared.settings.idle_timeout),
            keepalive_interval: Some(Duration::from_secs(30)),
            auth_rejection_time: Duration::from_millis(500),
            auth_rejection_time_initial: Some(Duration::ZERO),
            // Clients may send packets of up to this much data (russh's
            // default is 32 KiB): fewer packets, so fewer trips through
            // the handler and the bridge per byte relayed (bench/ssh.sh).
            maximum_packet_size: CLIENT_PACKET,
            preferred: russh::Preferred {
                // AES-GCM runs on AES-NI: in the bridged path's profile
                // (bench/ssh.sh) aws-lc's AES-GCM takes 3 % of the CPU where
                // its chacha20-poly1305 takes 19 % for the same bytes.
                // Clients put chacha20 first, so offering only AES-GCM
                // steers them.
                cipher: std::borrow::Cow::Borrowed(&[
                    russh::cipher::AES_256_GCM,
                    russh::cipher::AES_128_GCM,
                ]),
                ..russh::Preferred::default()
            },
            ..Default::default()
        });
        let running = self.accept(config, &listener);
        tokio::select! {
            () = running => Ok(()),
            () = shutdown => Ok(()),
        }
    }

    /// Accepts connections until dropped, each served on a task of its
    /// own through a read buffer ([`READ_BUFFER`]). A failed accept (out
    /// of descriptors, say) is logged and tried again after a pause; it
    /// does not end the gateway.
    async fn accept(
        mut self,
        config: Arc<russh::server::Config>,
        listener: &tokio::net::TcpListener,
    ) {
        use russh::server::Server as _;
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "the SSH gateway could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handler = self.new_client(Some(peer));
            let config = config.clone();
            tokio::spawn(async move {
                let stream = tokio::io::BufReader::with_capacity(READ_BUFFER, socket);
                match russh::server::run_stream(config, stream, handler).await {
                    Ok(session) => {
                        if let Err(e) = session.await {
                            tracing::debug!(error = %e, %peer, "SSH connection ended");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, %peer, "SSH connection setup failed"),
                }
            });
        }
    }
}

/// How much an SSH connection (a client's, or the gateway's into a VM)
/// reads from its socket at once. russh reads a packet's first block, then
/// the rest, each straight from the socket; through this buffer one read
/// takes in whatever has arrived (often more than one packet). Measured
/// with the direct data path (bench/ssh.sh 128, relay CPU per GiB, one
/// run): 64 KiB 4.00 and 4.24 s, 256 KiB 4.40 s, against 4.40 and 4.56 s
/// for the build before both changes.
pub(crate) const READ_BUFFER: usize = 64 * 1024;

/// The most data a client's SSH packet may carry to the gateway: the most
/// russh takes without logging an error (it wants one TCP segment's worth;
/// bench/ssh.sh measured 128 KiB, which it logs against, at 1.76 s of relay
/// CPU per GiB against 1.92 s at 32 KiB).
const CLIENT_PACKET: u32 = 65_535;

impl russh::server::Server for SshGateway {
    type Handler = Conn;

    fn new_client(&mut self, peer: Option<SocketAddr>) -> Conn {
        ::metrics::counter!("kennel_ssh_connections_total").increment(1);
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
            missing: None,
            refusal: None,
            proven_unknown: None,
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
    /// The login name, when it looks like a project name but is none (a
    /// typo in `ssh demoo@HOST`): command mode then says so.
    missing: Option<ProjectName>,
    /// Why this user may not enter the project they named.
    refusal: Option<Refusal>,
    /// The first unknown key this client proved it holds: declined, so
    /// the client goes on to its next key; used for the request-access
    /// session only if none of its keys is registered.
    proven_unknown: Option<(PublicKey, Identity)>,
    channels: HashMap<ChannelId, Queue>,
}

/// A client channel's way to its bridge: the ordered queue of what the
/// client asked, and, once the VM's channel is open, the way straight to
/// it for the client's data.
struct Queue {
    ops: mpsc::Sender<Op>,
    to_vm: Arc<ToVm>,
}

/// The client's data straight into the VM's channel, without the trip
/// through the bridge's task: one task hop less per packet of an upload
/// (bench/ssh.sh). The bridge sets `channel` once it has replayed the
/// requests before the session's own; data goes straight only while no
/// data waits in the queue, so it never passes data queued earlier.
struct ToVm {
    channel: std::sync::OnceLock<Arc<ChannelWriteHalf<russh::client::Msg>>>,
    /// Data operations in the queue the bridge has not written yet.
    queued: AtomicUsize,
    /// The bytes carried to the VM (one metric handle, not a look-up per
    /// packet).
    bytes: ::metrics::Counter,
}

impl ToVm {
    fn new() -> Self {
        Self {
            channel: std::sync::OnceLock::new(),
            queued: AtomicUsize::new(0),
            bytes: metrics::to_vm(),
        }
    }
}

/// Public keys; and keyboard-interactive with no prompts, which a client
/// reaches only after all its keys were declined, and which is accepted
/// only if one of them was proven (then: the request-access session).
fn auth_methods() -> MethodSet {
    MethodSet::from(&[MethodKind::PublicKey, MethodKind::KeyboardInteractive][..])
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("ip", &self.ip)
            .finish_non_exhaustive()
    }
}

/// What an unknown key is told: how to ask, with the gateway's real
/// public address.
fn unknown_key(settings: &kennel_core::Settings) -> String {
    format!(
        "Kennel does not know this SSH key yet.\r\nAsk for access with this same key:\r\n\r\n    {}\r\n\r\nAn admin approves or denies it in chat; then connect again.\r\n",
        settings
            .urls()
            .ssh_console("request-access [a note for the admins]")
    )
}

/// Copies both ways until either side ends: `a` is the client's channel,
/// `b` the VM's side. `kind` labels the channel in the metrics.
pub(crate) async fn splice<A, B>(kind: &'static str, mut a: A, mut b: B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _open = metrics::ChannelGauge::open(kind);
    if let Ok((to_vm, from_vm)) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
        metrics::bytes(to_vm, from_vm);
    }
}

/// The SSH gateway's metrics (docs/operations.md lists them).
pub(crate) mod metrics {
    /// Counts a channel into a VM and keeps it in the open gauge while it
    /// lives.
    pub(crate) struct ChannelGauge(&'static str);

    impl ChannelGauge {
        pub(crate) fn open(kind: &'static str) -> Self {
            ::metrics::counter!("kennel_ssh_channels_total", "kind" => kind).increment(1);
            ::metrics::gauge!("kennel_ssh_channels_open", "kind" => kind).increment(1.0);
            Self(kind)
        }
    }

    impl Drop for ChannelGauge {
        fn drop(&mut self) {
            ::metrics::gauge!("kennel_ssh_channels_open", "kind" => self.0).decrement(1.0);
        }
    }

    /// Bytes carried between clients and VMs.
    pub(crate) fn bytes(to: u64, from: u64) {
        to_vm().increment(to);
        from_vm().increment(from);
    }

    /// The count of bytes carried to VMs.
    pub(crate) fn to_vm() -> ::metrics::Counter {
        ::metrics::counter!("kennel_ssh_bytes_total", "direction" => "to_vm")
    }

    /// The count of bytes carried from VMs.
    pub(crate) fn from_vm() -> ::metrics::Counter {
        ::metrics::counter!("kennel_ssh_bytes_total", "direction" => "from_vm")
    }
}

/// One client session channel.
struct Bridge {
    shared: Arc<Shared>,
    /// The client's address, for per-address limits.
    ip: Option<IpAddr>,
    who: Who,
    target: Target,
    missing: Option<ProjectName>,
    refusal: Option<Refusal>,
    client: ChannelWriteHalf<Msg>,
    /// For exit signals and agent channels towards the client.
    session: russh::server::Handle,
    id: ChannelId,
    span: tracing::Span,
}

/// What a command says while it runs: progress for the client's
/// stderr, a `run`'s output for its stdout.
enum Said {
    Progress(String),
    Output(Vec<u8>),
}

/// The most of a `run`'s output waiting for a slow client; past it, the
/// client is told that some was left out.
const MAX_QUEUED_OUTPUT: usize = 8 << 20;

/// Progress lines on the client's stderr, `run` output on its stdout.
struct StderrSink {
    tx: mpsc::UnboundedSender<Said>,
    /// Output bytes sent and not yet written to the client.
    queued: Arc<std::sync::atomic::AtomicUsize>,
    dropped: std::sync::atomic::AtomicBool,
}

impl StderrSink {
    fn new() -> (Self, SaidRx) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (
            Self {
                tx,
                queued: queued.clone(),
                dropped: std::sync::atomic::AtomicBool::new(false),
            },
            SaidRx { rx, queued },
        )
    }
}

/// The client's side of a [`StderrSink`].
struct SaidRx {
    rx: mpsc::UnboundedReceiver<Said>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

impl SaidRx {
    async fn recv(&mut self) -> Option<Said> {
        let said = self.rx.recv().await?;
        if let Said::Output(b) = &said {
            self.queued
                .fetch_sub(b.len(), std::sync::atomic::Ordering::Relaxed);
        }
        Some(said)
    }
}

impl ProgressSink for StderrSink {
    fn report(&self, p: Progress) {
        let _ = self.tx.send(Said::Progress(format!("… {p}\r\n")));
    }

    fn output(&self, bytes: &[u8]) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.queued.load(Relaxed) > MAX_QUEUED_OUTPUT {
            if !self.dropped.swap(true, Relaxed) {
                let _ = self.tx.send(Said::Progress(
                    "… output left out here: the command writes faster than this connection reads\r\n".into(),
                ));
            }
            return;
        }
        self.dropped.store(false, Relaxed);
        self.queued.fetch_add(bytes.len(), Relaxed);
        let _ = self.tx.send(Said::Output(bytes.to_vec()));
    }

    fn streams_output(&self) -> bool {
        true
    }
}

/// Why a signed-in session may not go on: told to the client before the
/// session ends, which exits with the kind's code.
#[derive(Debug, Clone)]
struct Refusal {
    kind: kennel_core::outcome::ErrorKind,
    message: String,
}
