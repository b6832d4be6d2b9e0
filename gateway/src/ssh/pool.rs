//! Waking projects, and the upstream pool: one connection per project's
//! VM, each behind its own lock, so a VM that does not answer holds up
//! only sessions into that project.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kennel_core::model::{Identity, User};
use kennel_core::names::ProjectName;
use kennel_core::policy::Entry;
use kennel_core::provision::ProgressSink;
use kennel_core::Actor;
use russh::keys::PrivateKeyWithHashAlg;
use russh::{client, Channel};

use super::{splice, Shared};

impl Shared {
    /// Makes sure `p`'s VM runs before a channel into it is opened: every
    /// entry point (a session, `ssh -L`, a Unix-socket forward, `ssh -J`)
    /// comes here, for a user allowed to enter the project, and goes to
    /// core's VM state service, which starts it if needed (once, however
    /// many entry points ask at the same time).
    pub(super) async fn wake(
        &self,
        identity: &Identity,
        user: &User,
        p: &ProjectName,
        progress: &dyn ProgressSink,
    ) -> Result<(), String> {
        self.gate
            .may_enter(Some(user), p, Entry::Ssh)
            .await
            .map_err(|e| e.to_string())?;
        let actor = Actor::User {
            identity: identity.clone(),
            user: user.clone(),
        };
        self.gate
            .wake(&actor, p, progress)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
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
    pub(super) async fn upstream(
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
    pub(super) async fn connect(
        &self,
        p: &ProjectName,
        agent_to: Option<russh::server::Handle>,
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

    pub(super) async fn forget(&self, p: &ProjectName) {
        if let Ok(mut pool) = self.upstreams.lock() {
            pool.remove(p.as_str());
        }
    }
}
