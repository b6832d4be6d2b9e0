//! Kennel's own connections into project VMs, through each VM's sshd with
//! the project key (pinned to the VM's host key): one pooled connection
//! per project, each behind its own lock, so a VM that does not answer
//! holds up only what goes into that project. The SSH gateway opens its
//! sessions and forwards on them; the HTTPS gateway reaches a VM's other
//! ports through them. The metadata service keeps a link of its own into
//! each running VM ([`VmLinks::metadata_link`]), which carries the guest's
//! connections to Kennel back out to the host.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kennel_core::names::ProjectName;
use kennel_core::Gate;
use russh::keys::PrivateKeyWithHashAlg;
use russh::{client, Channel};

use crate::ssh::splice;

/// A project's place in the pool: its connection, if made, behind the
/// lock its (one) connect holds.
type PoolSlot = Arc<tokio::sync::Mutex<Option<Arc<client::Handle<Upstream>>>>>;

/// The pool of connections into VMs.
pub struct VmLinks {
    gate: Gate,
    upstreams: Mutex<HashMap<String, PoolSlot>>,
}

impl std::fmt::Debug for VmLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmLinks").finish_non_exhaustive()
    }
}

impl VmLinks {
    /// An empty pool; routes and keys come from `gate`.
    pub fn new(gate: Gate) -> Arc<Self> {
        Arc::new(Self {
            gate,
            upstreams: Mutex::new(HashMap::new()),
        })
    }
}

/// How long connecting to a VM's sshd (TCP, key exchange) may take.
/// Right after boot a guest under emulation shares its one slow CPU
/// with the units that wait for readiness (udev, journald), and
/// sshd starts a process per connection: on a loaded host without KVM
/// that took over 20 s, so the limit is generous; a VM that is down
/// fails at once (connection refused), not after it.
const CONNECT_LIMIT: Duration = Duration::from_secs(60);

/// Where, in the guest, a VM's link to Kennel's metadata service listens:
/// the VM's sshd makes this socket (a `streamlocal-forward`, as
/// `ssh -R /path:…` would) and carries each connection to it back over the
/// link. The images' `kennel-metadata.socket` (169.254.169.254:80) leads
/// there; the directory belongs to `dev` (made by kennel-init).
pub const GUEST_METADATA_SOCKET: &str = "/run/kennel/meta/metadata.sock";

/// Serves a connection the guest made to the metadata service.
pub type MetaServe = Arc<dyn Fn(russh::ChannelStream<client::Msg>) + Send + Sync>;

/// The gateway's client side towards a VM: trusts only the VM's own host key.
pub struct Upstream {
    host_key: Option<russh::keys::PublicKey>,
    /// The client whose agent this connection relays, if any.
    agent_to: Option<russh::server::Handle>,
    /// What serves the guest's metadata connections, on a metadata link.
    meta: Option<MetaServe>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("agent", &self.agent_to.is_some())
            .field("metadata", &self.meta.is_some())
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
                tokio::spawn(splice(
                    "agent",
                    to_client.into_stream(),
                    channel.into_stream(),
                ));
            }
        }
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        channel: Channel<client::Msg>,
        socket_path: &str,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        // Only the one socket this link asked for, and only on a metadata
        // link; anything else is refused (dropping `reply` refuses).
        if let Some(serve) = self
            .meta
            .as_ref()
            .filter(|_| socket_path == GUEST_METADATA_SOCKET)
        {
            reply.accept().await;
            serve(channel.into_stream());
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
    #[error("nothing in the VM answers on port {port}: {message}")]
    Port { port: u16, message: String },
    #[error("the VM's sshd refused the metadata forward to {GUEST_METADATA_SOCKET}: {0}")]
    Forward(String),
}

impl VmLinks {
    /// The pooled connection to a project's VM, made if needed.
    pub async fn upstream(
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
    pub async fn connect(
        &self,
        p: &ProjectName,
        agent_to: Option<russh::server::Handle>,
    ) -> Result<client::Handle<Upstream>, UpstreamError> {
        self.connect_as(p, agent_to, None).await
    }

    /// A link that carries the guest's connections to the metadata service
    /// (made at [`GUEST_METADATA_SOCKET`] in the VM) to `serve`. The link
    /// is the VM's identity: it goes to that VM's sshd, pinned to its host
    /// key, so whatever arrives on it came from that VM. Kept open by the
    /// caller for as long as the VM runs.
    pub async fn metadata_link(
        &self,
        p: &ProjectName,
        serve: MetaServe,
    ) -> Result<client::Handle<Upstream>, UpstreamError> {
        let handle = self.connect_as(p, None, Some(serve)).await?;
        handle
            .streamlocal_forward(GUEST_METADATA_SOCKET)
            .await
            .map_err(|e| UpstreamError::Forward(e.to_string()))?;
        Ok(handle)
    }

    async fn connect_as(
        &self,
        p: &ProjectName,
        agent_to: Option<russh::server::Handle>,
        meta: Option<MetaServe>,
    ) -> Result<client::Handle<Upstream>, UpstreamError> {
        let route = self
            .gate
            .reach(p)
            .await
            .ok()
            .flatten()
            .ok_or(UpstreamError::NoRoute)?;
        let keys = route.keys.clone().ok_or(UpstreamError::NoRoute)?;
        let key = russh::keys::load_secret_key(&keys.client_key, None)
            .map_err(|_| UpstreamError::Key(keys.client_key.clone()))?;
        let host_key = keys
            .host_key
            .as_deref()
            .and_then(|t| russh::keys::PublicKey::from_openssh(t.trim()).ok());
        let config = Arc::new(client::Config {
            keepalive_interval: Some(Duration::from_secs(30)),
            preferred: vm_leg_preferred(self.gate.guest_aes()),
            ..Default::default()
        });
        let upstream = Upstream {
            host_key,
            agent_to,
            meta,
        };
        let addr = route.ssh_addr.as_str();
        // Read through a buffer, as the gateway's client connections are
        // (what a VM sends back, a download, arrives in fewer reads).
        let connect = async move {
            let socket = tokio::net::TcpStream::connect(addr).await?;
            let stream = tokio::io::BufReader::with_capacity(crate::ssh::READ_BUFFER, socket);
            client::connect_stream(config, stream, upstream).await
        };
        let mut handle = tokio::time::timeout(CONNECT_LIMIT, connect)
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

    /// Drops a project's pooled connection (it died with its VM).
    pub fn forget(&self, p: &ProjectName) {
        if let Ok(mut pool) = self.upstreams.lock() {
            pool.remove(p.as_str());
        }
    }

    /// A TCP stream to `port` on the VM's own loopback, through its sshd
    /// (a `direct-tcpip` channel on the pooled connection, made again once
    /// if that connection died), so any port of the VM is reachable
    /// without opening it on the host.
    pub async fn open_tcp(
        &self,
        p: &ProjectName,
        port: u16,
    ) -> Result<russh::ChannelStream<client::Msg>, UpstreamError> {
        let open = |h: Arc<client::Handle<Upstream>>| async move {
            h.channel_open_direct_tcpip("127.0.0.1", u32::from(port), "127.0.0.1", 0)
                .await
        };
        let ch = match open(self.upstream(p).await?).await {
            Ok(c) => c,
            Err(_) => {
                self.forget(p);
                open(self.upstream(p).await?)
                    .await
                    .map_err(|e| UpstreamError::Port {
                        port,
                        message: e.to_string(),
                    })?
            }
        };
        Ok(ch.into_stream())
    }
}

/// The algorithms of the SSH leg into a VM. Its cipher is chosen per host:
/// AES-GCM where the guest's CPU runs AES natively (KVM, containers, on a
/// host with AES-NI), where it costs both ends least; chacha20-poly1305
/// under software emulation, where the guest's AES is emulated (measured
/// under TCG: AES-GCM cost the guest's sshd throughput, 17.0 against
/// 20.9 MiB/s). The other cipher stays offered as a fallback.
fn vm_leg_preferred(guest_aes: bool) -> russh::Preferred {
    use russh::cipher::{AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305};
    static AES_FIRST: [russh::cipher::Name; 3] = [AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305];
    static CHACHA_FIRST: [russh::cipher::Name; 3] = [CHACHA20_POLY1305, AES_128_GCM, AES_256_GCM];
    russh::Preferred {
        cipher: std::borrow::Cow::Borrowed(if guest_aes { &AES_FIRST } else { &CHACHA_FIRST }),
        ..russh::Preferred::default()
    }
}

#[cfg(test)]
mod cipher_tests {
    #[test]
    fn the_vm_legs_cipher_follows_the_guests_aes() {
        let aes = super::vm_leg_preferred(true);
        assert_eq!(aes.cipher.first(), Some(&russh::cipher::AES_128_GCM));
        let emulated = super::vm_leg_preferred(false);
        assert_eq!(
            emulated.cipher.first(),
            Some(&russh::cipher::CHACHA20_POLY1305)
        );
        // Either way both stay offered, for a guest that lacks one.
        assert_eq!(aes.cipher.len(), 3);
        assert_eq!(emulated.cipher.len(), 3);
    }
}
