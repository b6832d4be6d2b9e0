//! The executor: runs a parsed command for an identity.
//!
//! Front ends reach it through [`crate::frontdoor`]. It resolves the
//! identity to a user, asks [`crate::policy`], then does the work with the
//! store and the provisioner, records what matters in the audit log, and
//! returns a structured [`Outcome`] (prose is [`crate::render`]'s job).
//! Events that other front ends must hear about (an access request filed
//! in Discord that admins see in Matrix) go out on a broadcast channel.
//!
//! [`Executor::authorized`] asks policy and dispatches, one line per
//! command, to the command's family:
//!
//! | file | commands |
//! |---|---|
//! | `projects.rs` | projects, status, rm, ssh, logs, port, rename |
//! | `create.rs` | new project, cp |
//! | `sharing.rs` | share, unshare, public, private |
//! | `links.rs` | share --link, shares, unshare ID (and the gateway's side of links) |
//! | `access.rs` | whoami, users, keys, key add/rm, request-access, requests, approve, deny |
//! | `secrets.rs` | secret set/rm, secrets, deploy-key |
//! | `confirm.rs` | yes (and the questions it answers) |
//! | `run.rs` | resize, run, run stop |
//! | [`crate::vmstate`] | start, stop, restart: the VM state service |

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::broadcast;
use tracing::Instrument;

use crate::catalog::Catalog;
use crate::command::Command;
use crate::hostpath::HostPathError;
use crate::model::{
    AccessRequest, AuditOutcome, Identity, Project, ProjectState, RequestState, Resources, Role,
    User, Visibility,
};
use crate::names::{ProjectName, UserName};
use crate::outcome::{CommandError, Connection, Outcome, Reply};
use crate::policy::{self, Relation};
use crate::provision::{ProgressSink, ProvisionError, Provisioner, Stage};
use crate::store::repo::{self, AuditEntry};
use crate::store::{write_tx, Store, StoreError};

mod access;
pub mod agents;
mod checkpoints;
mod confirm;
mod create;
mod domains;
pub mod egress;
mod hosts;
pub mod links;
mod projects;
mod run;
mod secrets;
mod sharing;

/// Addresses and defaults the executor puts into replies and new projects.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Host name users SSH to (`ssh myapp@HOST`).
    pub ssh_host: String,
    pub ssh_port: u16,
    /// Domain of the HTTPS gateway (`https://myapp.DOMAIN`).
    pub domain: String,
    pub https_port: u16,
    /// Where project sources live by default (`<root>/<name>`).
    pub projects_root: PathBuf,
    pub default_resources: Resources,
    pub default_app_port: u16,
    /// Fingerprints of the SSH gateway's host keys, shown so users can verify.
    pub host_key_fingerprints: Vec<String>,
    /// Identities that become admins the first time they speak.
    pub admins: Vec<Identity>,
    /// How many `new project`s build at once; later ones wait in line.
    pub max_parallel_creates: usize,
    /// How long a `yes` may follow the question.
    pub confirm_secs: i64,
    /// Access requests that may wait for an admin at once, from everyone;
    /// past it, new ones are refused until admins decide some.
    pub max_pending_requests: u32,
    /// New access requests per hour, from everyone.
    pub max_requests_per_hour: u32,
    /// How long a running VM may sit idle before Kennel stops it, unless
    /// its project says otherwise (`idle NAME ...`).
    pub idle_stop: crate::model::IdleStop,
    /// Guest CPU use (the VMM's, in percent of one host core since the
    /// last look) above which a VM counts as in use with nobody connected.
    pub idle_cpu_percent: u32,
    /// Checkpoints kept per project before the oldest automatic ones go.
    pub checkpoint_keep: u32,
    /// The LLM gateway's limits per user: requests in any minute and
    /// tokens per (UTC) day; 0 is no limit.
    pub llm_requests_per_minute: u32,
    pub llm_tokens_per_day: u64,
    /// The agents the operator configured (`[agents.NAME] command`), in
    /// order: the first is the default; `{task}` in a word is the task.
    pub agents: Vec<(String, Vec<String>)>,
    /// Kennel's public addresses: a custom domain's A/AAAA record may
    /// point at one (besides those its own host name resolves to).
    pub public_addresses: Vec<std::net::IpAddr>,
    /// The egress mode of projects that name none (`vm.egress`).
    pub egress: crate::egress::EgressMode,
    /// Egress asks said to a project's owner per hour, at most.
    pub egress_asks_per_hour: u32,
    /// How long `egress NAME allow-once` lasts, in seconds.
    pub egress_once_secs: i64,
}

impl Settings {
    /// The addresses replies print, built in one place ([`crate::urls`]).
    pub fn urls(&self) -> crate::urls::Urls {
        crate::urls::Urls {
            ssh_host: self.ssh_host.clone(),
            ssh_port: self.ssh_port,
            domain: self.domain.clone(),
            https_port: self.https_port,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ssh_host: "127.0.0.1".into(),
            ssh_port: 2222,
            domain: "localhost".into(),
            https_port: 8443,
            projects_root: PathBuf::from("kennel-data/projects"),
            default_resources: Resources {
                vcpus: 2,
                memory_mib: 2048,
                disk_mib: 20 * 1024,
            },
            default_app_port: 8080,
            host_key_fingerprints: Vec::new(),
            admins: Vec::new(),
            max_parallel_creates: 2,
            confirm_secs: 300,
            max_pending_requests: 20,
            max_requests_per_hour: 30,
            idle_stop: crate::model::IdleStop::Secs { secs: 30 * 60 },
            idle_cpu_percent: 5,
            checkpoint_keep: 10,
            llm_requests_per_minute: 60,
            llm_tokens_per_day: 2_000_000,
            agents: Vec::new(),
            public_addresses: Vec::new(),
            egress: crate::egress::EgressMode::Open,
            egress_asks_per_hour: 10,
            egress_once_secs: crate::egress::ONCE_SECS,
        }
    }
}

/// Something other front ends may need to tell people about.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new access request: admins should see it.
    AccessRequested(AccessRequest),
    /// A request was approved or denied: the requester should be told.
    RequestDecided(AccessRequest),
    /// Something admins should see and act on (a custom domain waiting
    /// for approval), said once in the admins' rooms.
    AdminNotice(String),
    /// Kennel stopped an idle project's VM: its owner should be told, in
    /// the chats `identities` name (see [`crate::idle::idle_notice`]).
    IdleStopped {
        project: ProjectName,
        owner: UserName,
        identities: Vec<Identity>,
        after: crate::model::IdleStop,
    },
    /// A line a project's VM sent its owner (`/kennel/v1/notify`), for the
    /// chats `identities` name.
    ProjectNotice {
        project: ProjectName,
        owner: UserName,
        identities: Vec<Identity>,
        text: String,
    },
    /// A closed project's VM tried a destination nobody decided on: its
    /// owner should be asked, in the chats `identities` name.
    EgressAsked {
        project: ProjectName,
        owner: UserName,
        identities: Vec<Identity>,
        dest: String,
    },
}

/// Runs commands. Cheap to clone; share one per daemon.
#[derive(Clone)]
pub struct Executor {
    pub(crate) store: Store,
    pub(crate) vms: Arc<dyn Provisioner>,
    catalog: Arc<dyn Catalog>,
    settings: Arc<Settings>,
    pub(crate) events: broadcast::Sender<Event>,
    /// Limits concurrent creates; `line` is who waits for one.
    creates: Arc<tokio::sync::Semaphore>,
    line: Arc<create::Line>,
    /// One lock per project: its VM operations run one at a time.
    vm_locks: Arc<std::sync::Mutex<HashMap<ProjectName, Arc<tokio::sync::Mutex<()>>>>>,
    /// Who is in which VM, and when each was last used (idle stop).
    pub(crate) activity: Arc<crate::idle::Activity>,
    /// The way into VMs `run` uses, once the SSH gateway is wired.
    guest: Arc<std::sync::OnceLock<Arc<dyn crate::guest::GuestShell>>>,
    /// What `run` runs now, for `run stop`.
    running: Arc<crate::guest::Running>,
    /// The agent runs going now (`agent`, `agent stop`).
    agent_runs: Arc<agents::AgentRuns>,
    /// The resolver custom domains are checked with, once wired.
    dns: Arc<std::sync::OnceLock<Arc<dyn crate::dns::Dns>>>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("backend", &self.vms.backend())
            .finish_non_exhaustive()
    }
}

impl Executor {
    /// Wires an executor.
    pub fn new(
        store: Store,
        vms: Arc<dyn Provisioner>,
        catalog: Arc<dyn Catalog>,
        settings: Settings,
    ) -> Self {
        let (events, _) = broadcast::channel(256);
        let creates = Arc::new(tokio::sync::Semaphore::new(
            settings.max_parallel_creates.max(1),
        ));
        Self {
            store,
            vms,
            catalog,
            settings: Arc::new(settings),
            events,
            creates,
            line: Arc::default(),
            vm_locks: Arc::default(),
            activity: Arc::default(),
            guest: Arc::default(),
            running: Arc::default(),
            agent_runs: Arc::default(),
            dns: Arc::default(),
        }
    }

    /// The stacks and templates on offer (for completions in chat).
    pub fn catalog(&self) -> &dyn Catalog {
        self.catalog.as_ref()
    }

    /// The catalog, shared (for a second executor in tests).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn catalog_arc(&self) -> Arc<dyn Catalog> {
        self.catalog.clone()
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Subscribes to events (access requests, decisions).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Returns the local console's admin user, creating it on a fresh
    /// install (the first user is the admin).
    pub async fn local_admin(&self) -> Result<User, StoreError> {
        self.store
            .call(|conn| {
                write_tx(conn, |tx| {
                    let me = Identity::local_console();
                    if let Some(u) = repo::user_by_identity(tx, &me)? {
                        return Ok(u);
                    }
                    // Whoever can run the console owns the data dir: an
                    // admin, whether or not other users exist already.
                    let name = repo::free_user_name(tx, "admin")?;
                    let u = repo::create_user(tx, &name, Role::Admin)?;
                    repo::link_identity(tx, &me, u.id)?;
                    tracing::info!(user = %u.name, "created the local admin user");
                    Ok(u)
                })
            })
            .await
    }

    /// Asks policy whether `who` may run `cmd`, without running it (a front
    /// end deciding whether to show a form first, e.g. Discord's deny modal).
    pub async fn authorize(&self, who: &Identity, cmd: &Command) -> Result<(), CommandError> {
        let user = self.resolve(who).await?;
        let rel = match cmd.project() {
            Some(name) => self.relation(user.as_ref(), name).await?.0,
            None => Relation::NoProject,
        };
        policy::authorize(
            user.as_ref().map(|u| u.role),
            user.as_ref().map(|u| &u.name),
            cmd,
            rel,
        )?;
        Ok(())
    }

    /// The user called `name`, or that there is none.
    pub async fn user_named(&self, name: &UserName) -> Result<User, CommandError> {
        let n = name.clone();
        self.store
            .call(move |c| repo::user_by_name(c, &n))
            .await?
            .ok_or_else(|| {
                CommandError::NotFound(format!("there is no user '{name}'; see 'users'"))
            })
    }

    /// Resolves an identity to a user; configured admin identities get an
    /// admin user the first time they speak.
    pub async fn resolve(&self, who: &Identity) -> Result<Option<User>, StoreError> {
        let who = who.clone();
        let bootstrap = self.settings.admins.contains(&who);
        self.store
            .call(move |conn| {
                if let Some(u) = repo::user_by_identity(conn, &who)? {
                    return Ok(Some(u));
                }
                if !bootstrap {
                    return Ok(None);
                }
                write_tx(conn, |tx| {
                    let name = repo::free_user_name(tx, identity_hint(&who, "", None))?;
                    let u = repo::create_user(tx, &name, Role::Admin)?;
                    repo::link_identity(tx, &who, u.id)?;
                    tracing::info!(user = %u.name, identity = %who, "created a configured admin");
                    Ok(Some(u))
                })
            })
            .await
    }

    /// Runs a command for an identity.
    pub async fn execute(
        &self,
        who: &Identity,
        cmd: Command,
        progress: &dyn ProgressSink,
    ) -> Outcome {
        let user = self.resolve(who).await?;
        self.execute_as(who, user, cmd, progress).await
    }

    /// Runs a command as a known user (the local console's `--as`).
    pub async fn execute_as(
        &self,
        who: &Identity,
        user: Option<User>,
        cmd: Command,
        progress: &dyn ProgressSink,
    ) -> Outcome {
        let span = tracing::info_span!(
            "command",
            command = cmd.name(),
            user = user.as_ref().map_or("-", |u| u.name.as_str()),
            identity = %who,
            project = cmd.project().map_or("-", ProjectName::as_str),
        );
        async move {
            let out = self.authorized(who, user.as_ref(), cmd.clone(), progress, 0).await;
            metrics::counter!(
                "kennel_commands_total",
                "frontend" => who.frontend.as_str(),
                "command" => cmd.name(),
                "outcome" => match &out {
                    Ok(_) => "ok",
                    Err(e) => e.kind().as_str(),
                },
            )
            .increment(1);
            match &out {
                Ok(_) => tracing::debug!("done"),
                Err(e) if e.kind().is_callers() => {
                    tracing::debug!(error = %crate::redact::redact(&e.to_string()), "not done");
                }
                Err(e) => {
                    // The whole chain: "database query failed" alone does
                    // not tell an operator that the disk is full.
                    tracing::error!(error = %crate::redact::redact(&e.detailed()), "command failed");
                }
            }
            // Scripts' calls over the HTTP API are all audited, reads too:
            // a token can be lost, and its use is what an operator looks for.
            if audited(&cmd) || who.frontend == crate::model::Frontend::Http {
                let outcome = match &out {
                    Ok(_) => AuditOutcome::Ok,
                    Err(CommandError::Refused(_)) => AuditOutcome::Refused,
                    Err(_) => AuditOutcome::Failed,
                };
                let detail = out
                    .as_ref()
                    .err()
                    .map(|e| crate::redact::redact(&e.to_string()).into_owned());
                self.audit(who, user.as_ref(), &cmd, outcome, detail).await;
            }
            out
        }
        .instrument(span)
        .await
    }

    async fn audit(
        &self,
        who: &Identity,
        user: Option<&User>,
        cmd: &Command,
        outcome: AuditOutcome,
        detail: Option<String>,
    ) {
        let target = cmd.project().map(|p| p.to_string()).or_else(|| match cmd {
            Command::Approve { id, .. } | Command::Deny { id, .. } => {
                Some(format!("request #{id}"))
            }
            Command::KeyRm { fingerprint } => Some(fingerprint.to_string()),
            Command::KeyAdd { key, .. } | Command::RequestAccess { key, .. } => {
                Some(key.fingerprint().to_string())
            }
            Command::Share { user, .. } | Command::Unshare { user, .. } => Some(user.to_string()),
            Command::UserRename { from, .. } => Some(from.to_string()),
            // The name only: a secret's value never reaches a log.
            Command::SecretSet { name, .. } | Command::SecretRm { name } => Some(name.to_string()),
            Command::TokenRm { label } => Some(label.to_string()),
            Command::DomainApprove { host } => Some(host.clone()),
            Command::Evacuate { host } | Command::Restore { host } => Some(host.to_string()),
            Command::TokenCreate { label, .. } => label.as_ref().map(ToString::to_string),
            _ => None,
        });
        self.audit_entry(who, user, cmd.name(), target, outcome, detail)
            .await;
    }

    /// Writes one audit line; a failure to write it is logged, not fatal.
    pub(crate) async fn audit_entry(
        &self,
        who: &Identity,
        user: Option<&User>,
        action: &'static str,
        target: Option<String>,
        outcome: AuditOutcome,
        detail: Option<String>,
    ) {
        let who = who.clone();
        let uid = user.map(|u| u.id);
        let r = self
            .store
            .call(move |conn| {
                repo::audit(
                    conn,
                    &AuditEntry {
                        user: uid,
                        identity: &who,
                        action,
                        target: target.as_deref(),
                        outcome,
                        detail: detail.as_deref(),
                    },
                )
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not write the audit log");
        }
    }

    /// Holds `name`'s VM lock: one VM operation per project at a time.
    pub(crate) async fn lock_vm(&self, name: &ProjectName) -> tokio::sync::OwnedMutexGuard<()> {
        self.vm_lock(name).lock_owned().await
    }

    /// `name`'s VM lock, made on first use.
    fn vm_lock(&self, name: &ProjectName) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .vm_locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.entry(name.clone()).or_default().clone()
    }

    /// The VM lock of `name` if nobody holds it now (the VM watcher: a
    /// VM in the middle of an operation is that operation's business).
    pub(crate) fn try_lock_vm(
        &self,
        name: &ProjectName,
    ) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.vm_lock(name).try_lock_owned().ok()
    }

    /// Holds the VM locks of two projects (`cp`, `rename`), taken in name
    /// order so that two operations needing the same pair cannot each hold
    /// one and wait for the other.
    pub(crate) async fn lock_vm_pair(
        &self,
        a: &ProjectName,
        b: &ProjectName,
    ) -> [tokio::sync::OwnedMutexGuard<()>; 2] {
        let (first, second) = if a <= b { (a, b) } else { (b, a) };
        let one = self.lock_vm(first).await;
        let two = self.lock_vm(second).await;
        [one, two]
    }

    /// The project as the store has it now: after waiting for a VM lock,
    /// what the holder did (removed or renamed it) is what counts.
    pub(crate) async fn project_now(&self, name: &ProjectName) -> Result<Project, CommandError> {
        let n = name.clone();
        self.store
            .call(move |c| repo::project_by_name(c, &n))
            .await?
            .ok_or_else(|| {
                CommandError::NotFound(format!("there is no project '{name}'; see 'projects'"))
            })
    }

    pub(crate) async fn relation(
        &self,
        user: Option<&User>,
        name: &ProjectName,
    ) -> Result<(Relation, Option<Project>), StoreError> {
        let name = name.clone();
        let uid = user.map(|u| u.id);
        self.store
            .call(move |conn| {
                let Some(p) = repo::project_by_name(conn, &name)? else {
                    return Ok((Relation::Missing, None));
                };
                let Some(uid) = uid else {
                    return Ok((Relation::Stranger, Some(p)));
                };
                let owner = repo::user_by_name(conn, &p.owner)?.map(|u| u.id);
                let rel = if owner == Some(uid) {
                    Relation::Owner
                } else if let Some((ssh, web)) = repo::share_of(conn, p.id, uid)? {
                    Relation::Shared { ssh, web }
                } else {
                    Relation::Stranger
                };
                Ok((rel, Some(p)))
            })
            .await
    }

    /// Runs `cmd` if policy allows. `confirmed` is the confirmation step the
    /// caller reached with `yes` (0 when not confirming).
    pub(crate) async fn authorized(
        &self,
        who: &Identity,
        user: Option<&User>,
        cmd: Command,
        progress: &dyn ProgressSink,
        confirmed: u32,
    ) -> Outcome {
        let (rel, found) = match cmd.project() {
            Some(name) => self.relation(user, name).await?,
            None => (Relation::NoProject, None),
        };
        policy::authorize(user.map(|u| u.role), user.map(|u| &u.name), &cmd, rel)?;
        let call = Call {
            who,
            user,
            found,
            progress,
            confirmed,
        };
        match cmd {
            Command::Help { topic } => Ok(Reply::Help { topic }),
            Command::Whoami => self.whoami(&call).await,
            Command::Projects { tag } => self.projects(&call, tag).await,
            Command::Tag { name, tags } => self.tag(&call, &name, tags).await,
            Command::Egress { name, change } => self.egress_cmd(&call, &name, change).await,
            Command::Quota { user, change } => self.quota(&call, user, change).await,
            Command::Untag { name, tags } => self.untag(&call, &name, tags).await,
            Command::Status { name } => self.status(&call, &name).await,
            Command::NewProject(args) => self.new_project(&call, *args).await,
            Command::Start { name } => self.start_cmd(&call, &name).await,
            Command::Stop { name } => self.stop_cmd(&call, &name).await,
            Command::Restart { name } => self.restart_cmd(&call, &name).await,
            Command::Rm { name, purge, yes } => self.rm(&call, &name, purge, yes).await,
            Command::Ssh { name } => self.ssh(&call, &name),
            Command::Logs { name, lines } => self.logs(&call, &name, lines).await,
            Command::Share {
                name,
                user,
                ssh,
                web,
            } => self.share(&call, &name, &user, ssh, web).await,
            Command::Unshare { name, user } => self.unshare(&call, &name, &user).await,
            Command::ShareLink {
                name,
                port,
                expires_secs,
                note,
            } => {
                self.share_link(&call, &name, port, expires_secs, note)
                    .await
            }
            Command::Shares { name } => self.shares_cmd(&call, &name).await,
            Command::DomainAdd { name, host } => self.domain_add(&call, &name, &host).await,
            Command::DomainRm { name, host } => self.domain_rm(&call, &name, &host).await,
            Command::DomainApprove { host } => self.domain_approve(&call, &host).await,
            Command::Domains { name } => self.domains_cmd(&call, name.as_ref()).await,
            Command::UnshareLink { name, id } => self.unshare_link(&call, &name, id).await,
            Command::Public { name } => self.set_visibility(&call, &name, Visibility::Public).await,
            Command::Private { name } => {
                self.set_visibility(&call, &name, Visibility::Private).await
            }
            Command::Port { name, port } => self.port(&call, &name, port).await,
            Command::Resize {
                name,
                cpus,
                memory,
                disk,
            } => self.resize(&call, &name, cpus, memory, disk).await,
            Command::Run {
                name,
                argv,
                timeout_secs,
            } => self.run_cmd(&call, &name, argv, timeout_secs).await,
            Command::RunStop { name } => self.run_stop(&call, &name),
            Command::Agent {
                name,
                with,
                task,
                timeout_secs,
            } => {
                self.agent_cmd(&call, &name, with.as_ref(), &task, timeout_secs)
                    .await
            }
            Command::AgentStop { name } => self.agent_stop(&call, &name),
            Command::Agents { name } => self.agents_cmd(&call, &name).await,
            Command::Idle { name, limit } => self.idle_cmd(&call, &name, limit).await,
            Command::Keys { user } => self.keys(&call, user).await,
            Command::KeyAdd { key, label, user } => self.key_add(&call, key, label, user).await,
            Command::KeyRm { fingerprint } => self.key_rm(&call, &fingerprint).await,
            Command::RequestAccess { key, note } => self.request_access(&call, key, note).await,
            Command::Requests { all } => self.requests(all).await,
            Command::Approve { id, name } => {
                self.decide(&call, id, RequestState::Approved, None, name)
                    .await
            }
            Command::Deny { id, reason } => {
                self.decide(&call, id, RequestState::Denied, reason, None)
                    .await
            }
            Command::Users => self.users().await,
            Command::UserRename { from, to } => self.user_rename(&from, &to).await,
            Command::Yes => self.yes(&call).await,
            Command::Cp { name, at, new_name } => {
                self.cp(&call, &name, at.as_ref(), &new_name).await
            }
            Command::Checkpoint { name, label, note } => {
                self.checkpoint_cmd(&call, &name, label, note).await
            }
            Command::Checkpoints { name } => self.checkpoints_cmd(&call, &name).await,
            Command::Rollback { name, label, yes } => {
                self.rollback_cmd(&call, &name, &label, yes).await
            }
            Command::CheckpointRm { name, label } => {
                self.checkpoint_rm_cmd(&call, &name, &label).await
            }
            Command::Rename { name, new_name } => self.rename(&call, &name, &new_name).await,
            Command::SecretSet { name, value } => self.secret_set(&call, &name, value).await,
            Command::SecretRm { name } => self.secret_rm(&call, &name).await,
            Command::Secrets => self.secrets(&call).await,
            Command::LlmUsage { user } => self.llm_usage(&call, user.as_ref()).await,
            Command::DeployKey => self.deploy_key(&call).await,
            Command::Login => self.login(&call).await,
            Command::Logout => self.logout(&call).await,
            Command::Sessions => self.sessions(&call).await,
            Command::TokenCreate { label, expires } => {
                self.token_create(&call, label, expires).await
            }
            Command::Tokens => self.tokens(&call).await,
            Command::TokenRm { label } => self.token_rm(&call, &label).await,
            Command::SshConfig => self.ssh_config(&call).await,
            Command::Hosts => self.hosts_cmd().await,
            Command::Move { name, host } => self.move_cmd(&call, &name, &host).await,
            Command::Evacuate { host } => self.evacuate_cmd(&call, &host).await,
            Command::Restore { host } => self.restore_cmd(&call, &host).await,
            Command::Stacks => Ok(Reply::Stacks {
                stacks: self.catalog.stacks(),
            }),
            Command::Templates => Ok(Reply::Templates {
                templates: self.catalog.templates(),
            }),
        }
    }

    /// Records a project's state; a project whose VM is not running loses
    /// its route, so no gateway dials a dead address.
    pub(crate) async fn set_state(
        &self,
        name: &ProjectName,
        state: ProjectState,
    ) -> Result<(), StoreError> {
        self.set_state_noted(name, state, None).await
    }

    /// [`Executor::set_state`] with why Kennel set it (shown beside the
    /// state until the next change).
    pub(crate) async fn set_state_noted(
        &self,
        name: &ProjectName,
        state: ProjectState,
        note: Option<String>,
    ) -> Result<(), StoreError> {
        let n = name.clone();
        self.store
            .call(move |c| {
                repo::set_project_state_noted(c, &n, state, note.as_deref())?;
                if matches!(state, ProjectState::Stopped | ProjectState::Failed) {
                    repo::clear_route(c, &n)?;
                }
                Ok(())
            })
            .await
    }

    /// Records where the gateways reach a project's VM.
    pub(crate) async fn record_route(
        &self,
        project: &ProjectName,
        status: &crate::provision::VmStatus,
    ) -> Result<(), StoreError> {
        let (Some(ssh), Some(app)) = (status.ssh_addr.clone(), status.app_addr.clone()) else {
            return Ok(());
        };
        let p = project.clone();
        self.store
            .call(move |c| repo::set_route(c, &p, &ssh, &app))
            .await
    }

    /// The public keys of everyone who may enter `project` over SSH.
    pub(crate) async fn authorized_keys(
        &self,
        project: &ProjectName,
    ) -> Result<Vec<String>, StoreError> {
        let p = project.clone();
        self.store
            .call(move |c| repo::ssh_keys_for_project(c, &p))
            .await
    }

    /// How to reach a project: the SSH string and editor links.
    pub fn connection(&self, p: &Project) -> Connection {
        let s = &self.settings;
        let urls = s.urls();
        let name = p.name.as_str();
        let alias = format!("kennel-{name}");
        Connection {
            project: name.to_owned(),
            ssh_command: urls.ssh_command(name),
            ssh_config: format!(
                "Host {alias}\n    HostName {}\n    Port {}\n    User {name}",
                s.ssh_host, s.ssh_port
            ),
            vscode_url: format!("vscode://vscode-remote/ssh-remote+{alias}/workspace"),
            zed_url: format!("ssh://{name}@{}:{}/workspace", s.ssh_host, s.ssh_port),
            jetbrains_hint: format!(
                "New SSH connection: user {name}, host {}, port {}, project directory /workspace",
                s.ssh_host, s.ssh_port
            ),
            https_url: urls.app(&p.name),
            source_path: p.source_path.clone(),
            host_key_fingerprints: s.host_key_fingerprints.clone(),
        }
    }
}

/// One command's call: who asked, as which user, and the project the
/// command names as policy found it.
pub(crate) struct Call<'a> {
    pub who: &'a Identity,
    pub user: Option<&'a User>,
    /// The project the command names, if it exists.
    pub found: Option<Project>,
    pub progress: &'a dyn ProgressSink,
    /// The confirmation step reached with `yes` (0 when not confirming).
    pub confirmed: u32,
}

impl Call<'_> {
    /// The project the command names: policy passed, but for admins a
    /// missing project is still missing.
    pub fn project(&self, name: &ProjectName) -> Result<Project, CommandError> {
        self.found.clone().ok_or_else(|| {
            CommandError::NotFound(format!("there is no project '{name}'; see 'projects'"))
        })
    }

    /// The user who asked; commands that keep something per person need one.
    pub fn user(&self) -> Result<&User, CommandError> {
        self.user
            .ok_or_else(|| CommandError::Refused("Kennel does not know you yet".into()))
    }

    pub fn is_admin(&self) -> bool {
        self.user.is_some_and(|u| u.role == Role::Admin)
    }
}

/// A user-name hint from an identity: a Matrix localpart, else the id.
/// What to name a new user after: a Matrix ID's localpart, a chat ID; for
/// a key that knocked over SSH, its comment's name (`ann@laptop` → ann),
/// never its fingerprint.
/// A chat name its front end saw (`seen`, a Discord username) comes
/// first when it has a letter or digit in it.
fn identity_hint<'a>(who: &'a Identity, openssh: &'a str, seen: Option<&'a str>) -> &'a str {
    let usable = |n: &&str| n.chars().any(|c| c.is_ascii_alphanumeric());
    if let Some(seen) = seen.filter(usable) {
        return seen;
    }
    let id = who.external_id.as_str();
    if who.frontend == crate::model::Frontend::Ssh {
        return openssh
            .split_whitespace()
            .nth(2)
            .and_then(|c| c.split('@').next())
            .filter(usable)
            .unwrap_or("user");
    }
    id.strip_prefix('@')
        .and_then(|s| s.split(':').next())
        .unwrap_or(id)
}

/// The longest note an access request may carry.
pub const MAX_REQUEST_NOTE_CHARS: usize = 500;

/// A host path that could not be looked at (not the user's fault).
fn host_path_failed(e: HostPathError) -> CommandError {
    CommandError::Provision(ProvisionError::Source {
        stage: Stage::Validated,
        source: Box::new(e),
    })
}

/// Whether a command changes something worth an audit line.
fn audited(cmd: &Command) -> bool {
    !matches!(
        cmd,
        Command::Help { .. }
            | Command::Whoami
            | Command::Projects { .. }
            | Command::Status { .. }
            | Command::Ssh { .. }
            | Command::Logs { .. }
            | Command::Keys { .. }
            | Command::Requests { .. }
            | Command::Users
            | Command::Stacks
            | Command::Templates
            | Command::Yes
            | Command::Secrets
            | Command::LlmUsage { .. }
            | Command::Sessions
            | Command::Tokens
            | Command::SshConfig
            | Command::Shares { .. }
            | Command::Domains { .. }
            | Command::Checkpoints { .. }
            | Command::Agents { .. }
    ) && !matches!(cmd, Command::Quota { change, .. } if change.is_empty())
}
