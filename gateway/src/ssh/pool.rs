//! Waking projects, and the upstream pool: one connection per project's
//! VM, each behind its own lock, so a VM that does not answer holds up
//! only sessions into that project.

use std::sync::Arc;

use kennel_core::model::{Identity, User};
use kennel_core::names::ProjectName;
use kennel_core::policy::Entry;
use kennel_core::provision::ProgressSink;
use kennel_core::{Actor, Presence};
use russh::client;

use super::Shared;
use crate::vmlink::{Upstream, UpstreamError};

impl Shared {
    /// Makes sure `p`'s VM runs before a channel into it is opened: every
    /// entry point (a session, `ssh -L`, a Unix-socket forward, `ssh -J`)
    /// comes here, for a user allowed to enter the project, and goes to
    /// core's VM state service, which starts it if needed (once, however
    /// many entry points ask at the same time). The presence it returns
    /// keeps the project from being stopped for idleness while the
    /// channel lives: hold it as long as the channel.
    pub(super) async fn wake(
        &self,
        identity: &Identity,
        user: &User,
        p: &ProjectName,
        progress: &dyn ProgressSink,
    ) -> Result<Presence, String> {
        self.gate
            .may_enter(Some(user), p, Entry::Ssh)
            .await
            .map_err(|e| e.to_string())?;
        let here = self.gate.presence(p);
        let actor = Actor::User {
            identity: identity.clone(),
            user: user.clone(),
        };
        self.gate
            .wake(&actor, p, progress)
            .await
            .map(|_| here)
            .map_err(|e| e.to_string())
    }
}

impl Shared {
    /// The pooled connection to a project's VM, made if needed.
    pub(super) async fn upstream(
        &self,
        p: &ProjectName,
    ) -> Result<Arc<client::Handle<Upstream>>, UpstreamError> {
        self.links.upstream(p).await
    }

    /// A new connection to a project's VM, relaying agent channels to
    /// `agent_to`.
    pub(super) async fn connect(
        &self,
        p: &ProjectName,
        agent_to: Option<russh::server::Handle>,
    ) -> Result<client::Handle<Upstream>, UpstreamError> {
        self.links.connect(p, agent_to).await
    }

    pub(super) async fn forget(&self, p: &ProjectName) {
        self.links.forget(p);
    }
}
