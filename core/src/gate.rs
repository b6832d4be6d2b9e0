//! What the gateways need from core, and no more: who a key belongs to,
//! whether a person may enter a project (over SSH or the web), waking a
//! project's VM, counting it as in use, how to reach it, and recording a
//! login.
//!
//! Every front end (the SSH and HTTPS gateways, the chat bots' desk)
//! holds a [`Gate`] and nothing else of core: not the executor, the store
//! or the provisioner's files. The key and host-key paths are the
//! provisioner's to know, the route is the VM state service's to keep
//! true, and commands go through the front door.

use crate::executor::Executor;
use crate::keys::Fingerprint;
use crate::model::{AuditOutcome, Identity, Project, User};
use crate::names::ProjectName;
use crate::outcome::CommandError;
use crate::policy::{self, Entry};
use crate::provision::ProgressSink;
use crate::store::repo;
use crate::store::StoreError;
use crate::vmstate::{Actor, Woke};

/// The script in a project's source that its guest runs at every boot
/// (images/base/overlay/usr/sbin/kennel-init).
pub const START_SCRIPT: &str = ".kennel/start";

/// How a gateway reaches a running project's VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmReach {
    /// `host:port` of the VM's sshd, as the host reaches it.
    pub ssh_addr: String,
    /// `host:port` of the VM's app port.
    pub app_addr: String,
    /// The project's private key and the VM's pinned host key.
    pub keys: Option<crate::provision::VmKeys>,
}

/// Core as a gateway sees it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Gate {
    pub(crate) exec: Executor,
}

impl Executor {
    /// The narrow interface for gateways.
    pub fn gate(&self) -> Gate {
        Gate { exec: self.clone() }
    }
}

impl Gate {
    /// The user whose *active* key this is; `None` for an unknown or
    /// revoked key. An error means "could not tell": callers fail closed.
    pub async fn user_by_key(&self, fp: &Fingerprint) -> Result<Option<User>, StoreError> {
        let fp = fp.clone();
        self.exec
            .store
            .call(move |c| repo::user_by_active_key(c, &fp))
            .await
    }

    /// Notes the name the chat network shows for `who` (a Discord
    /// username), so a user approved from its request is named after it.
    /// A front end calls this before an identity's `request-access`.
    pub async fn remember_name(&self, who: &Identity, name: &str) -> Result<(), StoreError> {
        let (who, name) = (who.clone(), name.to_owned());
        self.exec
            .store
            .call(move |c| repo::remember_identity_name(c, &who, &name))
            .await
    }

    /// Whether a project of that name exists.
    pub async fn project_exists(&self, name: &ProjectName) -> Result<bool, StoreError> {
        let n = name.clone();
        self.exec
            .store
            .call(move |c| Ok(repo::project_by_name(c, &n)?.is_some()))
            .await
    }

    /// Whether `user` (or a visitor nobody knows, `None`) may enter
    /// `name` by `entry`: policy's one entry decision over the project's
    /// owner, shares and visibility. Returns the project when allowed.
    pub async fn may_enter(
        &self,
        user: Option<&User>,
        name: &ProjectName,
        entry: Entry,
    ) -> Result<Project, CommandError> {
        let (rel, found) = self.exec.relation(user, name).await?;
        let visibility = found
            .as_ref()
            .map_or(crate::model::Visibility::Private, |p| p.visibility);
        policy::may_enter(user.map(|u| u.role), rel, visibility, entry, name.as_str())?;
        found.ok_or_else(|| CommandError::NotFound(format!("there is no project '{name}'")))
    }

    /// For a name that is no project: the closest project `user` may
    /// enter by SSH (a typo in `ssh demoo@HOST`), if one is close.
    pub async fn near_project(&self, user: &User, name: &ProjectName) -> Option<ProjectName> {
        let (id, admin) = (user.id, user.role == crate::model::Role::Admin);
        let names = self
            .exec
            .store
            .call(move |c| {
                if admin {
                    Ok(repo::list_projects(c, None)?
                        .into_iter()
                        .map(|p| p.name)
                        .collect())
                } else {
                    repo::ssh_projects_of(c, id)
                }
            })
            .await
            .ok()?;
        names
            .into_iter()
            .map(|n| (strsim::levenshtein(n.as_str(), name.as_str()), n))
            .filter(|(d, _)| *d <= 2)
            .min_by_key(|(d, _)| *d)
            .map(|(_, n)| n)
    }

    /// Whether `p`'s guest starts its app at boot: its source has the
    /// start script the guest's init runs (`.kennel/start`, looked at
    /// without following links: the source is the user's).
    pub fn starts_app_on_boot(&self, p: &Project) -> bool {
        std::fs::symlink_metadata(std::path::Path::new(&p.source_path).join(START_SCRIPT))
            .is_ok_and(|m| m.is_file())
    }

    /// Starts `name`'s VM if it is not running (the VM state service), for
    /// someone the caller has let in with [`Gate::may_enter`].
    pub async fn wake(
        &self,
        actor: &Actor,
        name: &ProjectName,
        progress: &dyn ProgressSink,
    ) -> Result<Woke, CommandError> {
        self.exec.ensure_running(actor, name, progress).await
    }

    /// Counts `name` as in use while the result lives (a session, a
    /// forward, a request, a WebSocket): idle stop leaves it running. Take
    /// it before [`Gate::wake`].
    pub fn presence(&self, name: &ProjectName) -> crate::idle::Presence {
        self.exec.presence(name)
    }

    /// Where a running project's VM answers, with the keys to reach it;
    /// `None` when it is not running (stopped projects have no route).
    pub async fn reach(&self, name: &ProjectName) -> Result<Option<VmReach>, StoreError> {
        let n = name.clone();
        let route = self.exec.store.call(move |c| repo::route(c, &n)).await?;
        Ok(route.map(|r| VmReach {
            ssh_addr: r.ssh_addr,
            app_addr: r.app_addr,
            keys: self.exec.vms.vm_keys(name),
        }))
    }

    /// Records that `user` entered `target` (a project, a web host;
    /// `action`: "ssh login", "web login").
    pub async fn record_login(
        &self,
        identity: &Identity,
        user: &User,
        target: &str,
        action: &'static str,
    ) {
        self.exec
            .audit_entry(
                identity,
                Some(user),
                action,
                Some(target.to_owned()),
                AuditOutcome::Ok,
                None,
            )
            .await;
    }

    /// Whether the VMs' CPUs run AES natively ([`crate::provision::Provisioner::guest_aes`]).
    pub fn guest_aes(&self) -> bool {
        self.exec.vms.guest_aes()
    }

    /// The settings in force (addresses shown to people).
    pub fn settings(&self) -> &crate::Settings {
        self.exec.settings()
    }

    /// Grows with every change to the store: a decision or route read
    /// while it stayed the same still holds.
    pub fn changes(&self) -> u64 {
        self.exec.store.changes()
    }

    /// The front door, for a front end that holds a gate (the HTTP API):
    /// one line for a user it has resolved.
    pub async fn front_door(
        &self,
        who: &Identity,
        user: User,
        line: &str,
        style: crate::frontdoor::Style,
        progress: &dyn crate::provision::ProgressSink,
    ) -> crate::frontdoor::Answered {
        self.exec
            .front_door(who, Some(Some(user)), line, style, progress)
            .await
    }

    /// How to reach a project: SSH string, editor links, app URL.
    pub fn connection(&self, p: &Project) -> crate::outcome::Connection {
        self.exec.connection(p)
    }

    /// `https://DOMAIN[:PORT]`, Kennel's own host.
    pub fn kennel_url(&self) -> String {
        self.exec.kennel_url()
    }

    /// Runs a command a front end built itself (an unknown key's
    /// `request-access`) for `who`, as `user` (`None`: nobody known yet).
    pub async fn run(
        &self,
        who: &Identity,
        user: Option<User>,
        cmd: crate::Command,
        progress: &dyn crate::provision::ProgressSink,
    ) -> crate::Outcome {
        self.exec.execute_as(who, user, cmd, progress).await
    }

    /// The front door for a command a chat bot parsed itself; `user` as
    /// [`Executor::answer`] takes it (`None`: resolve the identity here).
    pub async fn answer(
        &self,
        who: &Identity,
        user: Option<Option<User>>,
        inv: crate::Invocation,
        style: crate::frontdoor::Style,
        progress: &dyn crate::provision::ProgressSink,
    ) -> crate::frontdoor::Answered {
        self.exec.answer(who, user, inv, style, progress).await
    }

    /// Whether `who` may run `cmd`, without running it (a chat front end
    /// deciding whether to show a form first).
    pub async fn authorize(
        &self,
        who: &Identity,
        cmd: &crate::Command,
    ) -> Result<(), CommandError> {
        self.exec.authorize(who, cmd).await
    }

    /// The user an identity belongs to, if any (configured admins are
    /// made on first sight).
    pub async fn resolve(&self, who: &Identity) -> Result<Option<User>, StoreError> {
        self.exec.resolve(who).await
    }

    /// The stacks and templates on offer (completions in chat).
    pub fn catalog(&self) -> &dyn crate::catalog::Catalog {
        self.exec.catalog()
    }

    /// Events other front ends must hear about (access requests, idle
    /// stops).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::Event> {
        self.exec.subscribe()
    }

    pub(crate) fn store(&self) -> &crate::store::Store {
        &self.exec.store
    }
}
