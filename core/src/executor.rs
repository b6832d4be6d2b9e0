//! The executor: runs a parsed command for an identity.
//!
//! Every front end hands it (identity, text, progress sink). It resolves
//! the identity to a user, asks [`crate::policy`], then does the work with
//! the store and the provisioner, records what matters in the audit log,
//! and returns a structured [`Outcome`]. Events that other front ends must
//! hear about (an access request filed in Discord that admins see in
//! Matrix) go out on a broadcast channel.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::broadcast;
use tracing::Instrument;

use crate::catalog::Catalog;
use crate::command::{self, Command, Invocation};
use crate::hostpath::{Beneath, HostPathError};
use crate::model::{
    AccessRequest, AuditOutcome, Identity, Project, ProjectState, RequestState, Resources, Role,
    User, Visibility,
};
use crate::names::{ProjectName, UserName};
use crate::outcome::{CommandError, Connection, Outcome, Reply, UserSummary};
use crate::policy::{self, Relation};
use crate::provision::{
    CreateRequest, Progress, ProgressSink, ProvisionError, Provisioner, Stage, VmSpec,
};
use crate::store::repo::{self, AuditEntry, NewProjectRow};
use crate::store::{write_tx, Store, StoreError};

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
}

/// Runs commands. Cheap to clone; share one per daemon.
#[derive(Clone)]
pub struct Executor {
    pub(crate) store: Store,
    pub(crate) vms: Arc<dyn Provisioner>,
    catalog: Arc<dyn Catalog>,
    settings: Arc<Settings>,
    events: broadcast::Sender<Event>,
    /// Limits concurrent creates; `waiting` counts the line.
    creates: Arc<tokio::sync::Semaphore>,
    waiting: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("backend", &self.vms.backend())
            .finish_non_exhaustive()
    }
}

/// A parsed line's result and whether it asked for JSON.
#[derive(Debug)]
pub struct Answer {
    pub outcome: Outcome,
    pub json: bool,
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
            waiting: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        }
    }

    /// The store, for front ends that read routes and keys.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The stacks and templates on offer (for completions in chat).
    pub fn catalog(&self) -> &dyn Catalog {
        self.catalog.as_ref()
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Subscribes to events (access requests, decisions).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Parses and runs one line of text for an identity.
    pub async fn run_line(
        &self,
        who: &Identity,
        line: &str,
        progress: &dyn ProgressSink,
    ) -> Answer {
        match command::parse(line) {
            Ok(Invocation { command, json }) => Answer {
                outcome: self.execute(who, command, progress).await,
                json,
            },
            Err(e) => Answer {
                outcome: Err(e.into()),
                json: command::wants_json(line),
            },
        }
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

    /// Decides whether `user` may enter `project` over SSH (owner, an SSH
    /// share, or an admin): core's one entry decision, [`policy::may_enter`].
    pub async fn ssh_access(
        &self,
        user: &User,
        project: &ProjectName,
    ) -> Result<Project, CommandError> {
        let (rel, found) = self.relation(Some(user), project).await?;
        let visibility = found
            .as_ref()
            .map_or(crate::model::Visibility::Private, |p| p.visibility);
        policy::may_enter(
            Some(user.role),
            rel,
            visibility,
            policy::Entry::Ssh,
            project.as_str(),
        )?;
        found.ok_or_else(|| CommandError::NotFound(format!("there is no project '{project}'")))
    }

    /// Starts a project's VM if it is not running (the SSH gateway does this
    /// when someone enters a stopped project), reporting progress.
    pub async fn ensure_running(
        &self,
        who: &Identity,
        user: &User,
        project: &Project,
        progress: &dyn ProgressSink,
    ) -> Outcome {
        let running = matches!(self.vms.status(&project.name).await, Ok(s) if s.ready);
        if running {
            return Ok(Reply::Done {
                message: "running".into(),
            });
        }
        self.execute_as(
            who,
            Some(user.clone()),
            Command::Start {
                name: project.name.clone(),
            },
            progress,
        )
        .await
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
                    let name = repo::free_user_name(tx, identity_hint(&who))?;
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
            match &out {
                Ok(_) => tracing::debug!("done"),
                Err(CommandError::Usage(_) | CommandError::Refused(_) | CommandError::NotFound(_) | CommandError::Conflict(_)) => {
                    tracing::debug!(error = %out.as_ref().err().map(|e| crate::redact::redact(&e.to_string()).into_owned()).unwrap_or_default(), "not done")
                }
                Err(e) => tracing::error!(error = %crate::redact::redact(&e.to_string()), "command failed"),
            }
            if audited(&cmd) {
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
        let who = who.clone();
        let uid = user.map(|u| u.id);
        let action = cmd.name();
        let target = cmd.project().map(|p| p.to_string()).or_else(|| match cmd {
            Command::Approve { id } | Command::Deny { id, .. } => Some(format!("request #{id}")),
            Command::KeyRm { fingerprint } => Some(fingerprint.to_string()),
            Command::KeyAdd { key, .. } | Command::RequestAccess { key, .. } => {
                Some(key.fingerprint().to_string())
            }
            Command::Share { user, .. } | Command::Unshare { user, .. } => Some(user.to_string()),
            // The name only: a secret's value never reaches a log.
            Command::SecretSet { name, .. } | Command::SecretRm { name } => Some(name.to_string()),
            _ => None,
        });
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

    async fn relation(
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
    async fn authorized(
        &self,
        who: &Identity,
        user: Option<&User>,
        cmd: Command,
        progress: &dyn ProgressSink,
        confirmed: u32,
    ) -> Outcome {
        let (rel, project) = match cmd.project() {
            Some(name) => self.relation(user, name).await?,
            None => (Relation::NoProject, None),
        };
        policy::authorize(user.map(|u| u.role), user.map(|u| &u.name), &cmd, rel)?;
        // Policy passed: for admins a missing project is still missing.
        let need = |p: Option<Project>, name: &ProjectName| {
            p.ok_or_else(|| {
                CommandError::NotFound(format!("there is no project '{name}'; see 'projects'"))
            })
        };
        let is_admin = user.is_some_and(|u| u.role == Role::Admin);
        match cmd {
            Command::Help { topic } => Ok(Reply::Help { topic }),
            Command::Whoami => {
                let user = match user {
                    Some(u) => Some(self.summary(u.clone()).await?),
                    None => None,
                };
                Ok(Reply::Whoami {
                    identity: who.clone(),
                    user,
                })
            }
            Command::Projects => {
                let uid = (!is_admin).then(|| user.map(|u| u.id)).flatten();
                let projects = self
                    .store
                    .call(move |c| repo::list_projects(c, uid))
                    .await?;
                Ok(Reply::Projects { projects })
            }
            Command::Status { name } => {
                let project = need(project, &name)?;
                let n = name.clone();
                let shares = self.store.call(move |c| repo::shares_of(c, &n)).await?;
                let vm = match self.vms.status(&name).await {
                    Ok(s) => Some(s),
                    Err(ProvisionError::Unavailable(_)) => None,
                    Err(e) => return Err(e.into()),
                };
                Ok(Reply::Status {
                    project,
                    shares,
                    vm,
                })
            }
            Command::NewProject(args) => self.new_project(who, user, *args, progress).await,
            Command::Start { name } => {
                let project = need(project, &name)?;
                self.start(project, progress).await
            }
            Command::Stop { name } => {
                need(project, &name)?;
                self.set_state(&name, ProjectState::Stopping).await?;
                progress.report(Progress {
                    stage: Stage::Stopping,
                    percent: None,
                    detail: None,
                });
                match self.vms.stop(&name).await {
                    Ok(()) => {
                        self.set_state(&name, ProjectState::Stopped).await?;
                        Ok(Reply::Done {
                            message: format!("{name} is stopped. Start it with 'start {name}'."),
                        })
                    }
                    Err(e) => {
                        self.set_state(&name, ProjectState::Failed).await?;
                        Err(e.into())
                    }
                }
            }
            Command::Restart { name } => {
                let project = need(project, &name)?;
                self.set_state(&name, ProjectState::Stopping).await?;
                self.vms.stop(&name).await?;
                self.set_state(&name, ProjectState::Stopped).await?;
                self.start(project, progress).await
            }
            Command::Rm { name, purge, yes } => {
                let project = need(project, &name)?;
                let again = Command::Rm {
                    name: name.clone(),
                    purge,
                    yes: true,
                }
                .to_string();
                if !yes {
                    let mut prompt = format!("This destroys the VM and disk of {name}.");
                    if purge {
                        prompt.push_str(&format!(
                            " It also DELETES the source directory {} on the host.",
                            project.source_path
                        ));
                    } else {
                        prompt
                            .push_str(&format!(" The source at {} is kept.", project.source_path));
                    }
                    return self.ask(who, prompt, &again, 1).await;
                }
                // A purge deletes the user's files: it always asks once more,
                // naming them, even after --yes.
                if purge && confirmed < 2 {
                    let prompt = format!(
                        "Last check: this permanently DELETES {} and everything in it, together with the VM of {name}.",
                        project.source_path
                    );
                    return self.ask(who, prompt, &again, 2).await;
                }
                // What can be refused is refused before anything changes: a
                // purge outside the projects root, or through a link.
                if purge {
                    self.purgeable(&project.source_path)?;
                }
                let before = project.state;
                self.set_state(&name, ProjectState::Destroying).await?;
                progress.report(Progress {
                    stage: Stage::Destroying,
                    percent: None,
                    detail: None,
                });
                let destroyed = async {
                    self.vms.destroy(&name).await?;
                    if purge {
                        self.vms.purge_source(&name, &project.source_path).await?;
                    }
                    Ok::<(), ProvisionError>(())
                }
                .await;
                if let Err(e) = destroyed {
                    // A failed step leaves the project as it was, to be
                    // looked at or removed again.
                    self.set_state(&name, before).await?;
                    return Err(e.into());
                }
                let n = name.clone();
                self.store
                    .call(move |c| repo::delete_project(c, &n))
                    .await?;
                let message = if purge {
                    format!(
                        "{name} is gone, and its source {} was deleted.",
                        project.source_path
                    )
                } else {
                    format!(
                        "{name} is gone. Its source is still at {}.",
                        project.source_path
                    )
                };
                Ok(Reply::Done { message })
            }
            Command::Ssh { name } => {
                let project = need(project, &name)?;
                Ok(Reply::Connection {
                    connection: self.connection(&project),
                })
            }
            Command::Logs { name, lines } => {
                need(project, &name)?;
                let lines = self.vms.logs(&name, lines).await?;
                Ok(Reply::Logs {
                    project: name.to_string(),
                    lines,
                })
            }
            Command::Share {
                name,
                user: target,
                ssh,
                web,
            } => {
                let project = need(project, &name)?;
                let t = target.clone();
                let found = self
                    .store
                    .write(move |tx| {
                        let Some(u) = repo::user_by_name(tx, &t)? else {
                            return Ok(false);
                        };
                        repo::upsert_share(tx, project.id, u.id, ssh, web)?;
                        Ok(true)
                    })
                    .await?;
                if !found {
                    return Err(CommandError::NotFound(format!(
                        "there is no user '{target}'"
                    )));
                }
                let what = match (ssh, web) {
                    (true, true) => "SSH and the web app",
                    (true, false) => "SSH",
                    _ => "the web app",
                };
                self.sync_access(vec![name.clone()]).await;
                Ok(Reply::Done {
                    message: format!("{name} is shared with {target} for {what}."),
                })
            }
            Command::Unshare { name, user: target } => {
                let project = need(project, &name)?;
                let t = target.clone();
                let removed = self
                    .store
                    .write(move |tx| match repo::user_by_name(tx, &t)? {
                        Some(u) => repo::remove_share(tx, project.id, u.id),
                        None => Ok(false),
                    })
                    .await?;
                if !removed {
                    return Err(CommandError::NotFound(format!(
                        "{name} is not shared with '{target}'"
                    )));
                }
                self.sync_access(vec![name.clone()]).await;
                Ok(Reply::Done {
                    message: format!("{name} is no longer shared with {target}."),
                })
            }
            Command::Public { name } => self.visibility(project, &name, Visibility::Public).await,
            Command::Private { name } => self.visibility(project, &name, Visibility::Private).await,
            Command::Port { name, port } => {
                need(project, &name)?;
                let n = name.clone();
                self.store
                    .call(move |c| repo::set_app_port(c, &n, port))
                    .await?;
                Ok(Reply::Done {
                    message: format!(
                        "https://{name}.{} now forwards to port {port} in the VM.",
                        self.settings.domain
                    ),
                })
            }
            Command::Keys { user: target } => {
                let u = self.target_user(user, target).await?;
                let id = u.id;
                let keys = self.store.call(move |c| repo::keys_of(c, id)).await?;
                Ok(Reply::Keys {
                    user: u.name.to_string(),
                    keys,
                })
            }
            Command::KeyAdd {
                key,
                label,
                user: target,
            } => {
                let u = self.target_user(user, target).await?;
                let fp = key.fingerprint().clone();
                let added = self
                    .store
                    .write(move |tx| repo::add_key(tx, u.id, &key, label.as_deref()))
                    .await;
                match added {
                    Ok(key) => {
                        self.sync_access(self.ssh_projects_of(u.id).await).await;
                        Ok(Reply::KeyAdded { key })
                    }
                    Err(StoreError::AlreadyExists { .. }) => Err(CommandError::Conflict(format!(
                        "key {fp} is registered to another user; each key belongs to one person"
                    ))),
                    Err(e) => Err(e.into()),
                }
            }
            Command::KeyRm { fingerprint } => {
                let me = user.map(|u| u.name.clone());
                let fp = fingerprint.clone();
                let revoked = self
                    .store
                    .write(move |tx| {
                        match repo::key_by_fingerprint(tx, &fp)? {
                            Some(k) if is_admin || Some(&k.user) == me.as_ref() => {}
                            _ => return Ok(None),
                        }
                        repo::revoke_key(tx, &fp)
                    })
                    .await?;
                match revoked {
                    Some(key) => {
                        let holder = key.user.clone();
                        let uid = self
                            .store
                            .call(move |c| repo::user_by_name(c, &holder))
                            .await?
                            .map(|u| u.id);
                        if let Some(uid) = uid {
                            self.sync_access(self.ssh_projects_of(uid).await).await;
                        }
                        Ok(Reply::KeyRevoked { key })
                    }
                    None => Err(CommandError::NotFound(format!(
                        "you have no key {fingerprint}; see 'keys'"
                    ))),
                }
            }
            Command::RequestAccess { key, note } => {
                if let Some(n) = &note {
                    let chars = n.chars().count();
                    if chars > MAX_REQUEST_NOTE_CHARS {
                        return Err(CommandError::Refused(format!(
                            "the note is {chars} characters long; keep it to {MAX_REQUEST_NOTE_CHARS} (say who you are and why)"
                        )));
                    }
                }
                let who2 = who.clone();
                let uid = user.map(|u| u.id);
                let me = user.map(|u| u.name.clone());
                let (max_pending, per_hour) = (
                    self.settings.max_pending_requests,
                    self.settings.max_requests_per_hour,
                );
                let r = self
                    .store
                    .write(move |tx| {
                        // Already asked: the same request, whatever the limits.
                        let (pending, recent, mine) = repo::request_counts(tx, key.fingerprint(), 3600)?;
                        if !mine {
                            if pending >= max_pending {
                                return Ok(Err(format!(
                                    "{pending} access requests are already waiting for an admin; Kennel takes no more until some are decided. Try again later"
                                )));
                            }
                            if recent >= per_hour {
                                return Ok(Err(format!(
                                    "Kennel took {recent} access requests in the last hour, its limit; try again in an hour"
                                )));
                            }
                        }
                        if let Some(k) = repo::key_by_fingerprint(tx, key.fingerprint())? {
                            if Some(&k.user) == me.as_ref()
                                && k.state == crate::model::KeyState::Active
                            {
                                return Ok(Err(format!(
                                    "key {} already gives you access; nothing to request",
                                    k.fingerprint
                                )));
                            }
                            if Some(&k.user) != me.as_ref() {
                                return Ok(Err(format!(
                                    "key {} is already registered; if it is yours, just use it",
                                    k.fingerprint
                                )));
                            }
                        }
                        repo::file_request(tx, &who2, uid, &key, note.as_deref()).map(Ok)
                    })
                    .await?;
                match r {
                    Ok((request, new)) => {
                        if new {
                            tracing::info!(request = request.id, "access request filed");
                            let _ = self.events.send(Event::AccessRequested(request.clone()));
                        }
                        Ok(Reply::RequestFiled { request, new })
                    }
                    Err(msg) => Err(CommandError::Conflict(msg)),
                }
            }
            Command::Requests { all } => {
                let requests = self
                    .store
                    .call(move |c| repo::list_requests(c, all))
                    .await?;
                Ok(Reply::Requests { requests })
            }
            Command::Approve { id } => self.decide(user, id, RequestState::Approved, None).await,
            Command::Deny { id, reason } => {
                self.decide(user, id, RequestState::Denied, reason).await
            }
            Command::Users => {
                let users = self.store.call(repo_list_users).await?;
                let mut out = Vec::with_capacity(users.len());
                for u in users {
                    out.push(self.summary(u).await?);
                }
                Ok(Reply::Users { users: out })
            }
            Command::Yes => {
                let w = who.clone();
                let pending = self
                    .store
                    .call(move |c| repo::take_confirmation(c, &w))
                    .await?;
                let Some((line, step)) = pending else {
                    return Err(CommandError::NotFound(format!(
                        "there is nothing to confirm (a question lasts {} minutes)",
                        self.settings.confirm_secs / 60
                    )));
                };
                let cmd = command::parse(&line)?.command;
                // The confirmed command goes through policy again, and is
                // what the audit log records.
                let out = Box::pin(self.authorized(who, user, cmd.clone(), progress, step)).await;
                let outcome = match &out {
                    Ok(Reply::Confirm { .. }) => None,
                    Ok(_) => Some(AuditOutcome::Ok),
                    Err(CommandError::Refused(_)) => Some(AuditOutcome::Refused),
                    Err(_) => Some(AuditOutcome::Failed),
                };
                if let Some(o) = outcome {
                    let detail = out
                        .as_ref()
                        .err()
                        .map(|e| crate::redact::redact(&e.to_string()).into_owned());
                    self.audit(who, user, &cmd, o, detail).await;
                }
                out
            }
            Command::Cp { name, new_name } => {
                let from = need(project, &name)?;
                let user = user
                    .cloned()
                    .ok_or_else(|| CommandError::Refused("Kennel does not know you yet".into()))?;
                let root = Beneath::open(&self.settings.projects_root)
                    .map_err(|e| host_path_failed(&e))?;
                let rel = PathBuf::from(new_name.as_str());
                let source_path = root.join(&rel);
                match root.lookup(&rel) {
                    Ok(None) => {}
                    Ok(Some(_)) => {
                        return Err(CommandError::Conflict(format!(
                            "{} already exists; remove it or pick another name",
                            source_path.display()
                        )))
                    }
                    Err(e @ (HostPathError::Io { .. } | HostPathError::Root { .. })) => {
                        return Err(host_path_failed(&e))
                    }
                    Err(e) => return Err(CommandError::Refused(e.to_string())),
                }
                let source_path = source_path.to_string_lossy().into_owned();
                let reserved = self
                    .reserve(
                        &user,
                        &new_name,
                        &from.stack,
                        from.git_url.as_deref(),
                        &source_path,
                        from.template.as_deref(),
                        from.resources,
                        from.app_port,
                    )
                    .await?;
                let req = CreateRequest {
                    project: new_name.clone(),
                    owner: user.name.clone(),
                    stack: Some(from.stack.clone()),
                    git: None,
                    path: Some(source_path),
                    template: None,
                    resources: from.resources,
                    app_port: from.app_port,
                    authorized_keys: self.authorized_keys(&name).await?,
                    adopt: false,
                    git_token: None,
                    author_name: user.name.to_string(),
                    author_email: self.email_of(who, &user),
                };
                let result = self.vms.copy(&name, &req, progress).await;
                self.finish_create(reserved, result, progress).await
            }
            Command::Rename { name, new_name } => {
                need(project, &name)?;
                let (a, b) = (name.clone(), new_name.clone());
                match self
                    .store
                    .write(move |tx| repo::rename_project(tx, &a, &b))
                    .await
                {
                    Ok(()) => {}
                    Err(StoreError::AlreadyExists { .. }) => {
                        return Err(CommandError::Conflict(format!(
                            "a project named '{new_name}' already exists; pick another name"
                        )))
                    }
                    Err(e) => return Err(e.into()),
                }
                if let Err(e) = self.vms.rename(&name, &new_name).await {
                    let (a, b) = (name.clone(), new_name.clone());
                    self.store
                        .write(move |tx| repo::rename_project(tx, &b, &a))
                        .await?;
                    return Err(e.into());
                }
                Ok(Reply::Done {
                    message: format!(
                        "{name} is now {new_name}: ssh {new_name}@{} and https://{new_name}.{}.",
                        self.settings.ssh_host, self.settings.domain
                    ),
                })
            }
            Command::SecretSet { name, value } => {
                let uid = user
                    .map(|u| u.id)
                    .ok_or_else(|| CommandError::Refused("Kennel does not know you yet".into()))?;
                let n = name.to_string();
                self.store
                    .call(move |c| repo::set_secret(c, uid, &n, &value))
                    .await?;
                Ok(Reply::Done {
                    message: format!("Stored secret {name}. Kennel never shows it again; replace it with 'secret set {name} ...' or delete it with 'secret rm {name}'."),
                })
            }
            Command::SecretRm { name } => {
                let uid = user
                    .map(|u| u.id)
                    .ok_or_else(|| CommandError::Refused("Kennel does not know you yet".into()))?;
                let n = name.to_string();
                if self
                    .store
                    .call(move |c| repo::remove_secret(c, uid, &n))
                    .await?
                {
                    Ok(Reply::Done {
                        message: format!("Deleted secret {name}."),
                    })
                } else {
                    Err(CommandError::NotFound(format!(
                        "you have no secret '{name}'; see 'secrets'"
                    )))
                }
            }
            Command::Secrets => {
                let uid = user
                    .map(|u| u.id)
                    .ok_or_else(|| CommandError::Refused("Kennel does not know you yet".into()))?;
                let names = self.store.call(move |c| repo::secret_names(c, uid)).await?;
                Ok(Reply::Done {
                    message: if names.is_empty() {
                        "You have no secrets. 'secret set git-token <token>' stores a token for https:// clones.".into()
                    } else {
                        format!("Your secrets: {}", names.join(", "))
                    },
                })
            }
            Command::DeployKey => {
                let u = user
                    .ok_or_else(|| CommandError::Refused("Kennel does not know you yet".into()))?;
                let key = self.vms.deploy_key(&u.name).await?;
                Ok(Reply::Done {
                    message: format!(
                        "Your deploy key for ssh:// and git@host: clones (add it to your git host as a read-only deploy key):\n{key}"
                    ),
                })
            }
            Command::Stacks => Ok(Reply::Stacks {
                stacks: self.catalog.stacks(),
            }),
            Command::Templates => Ok(Reply::Templates {
                templates: self.catalog.templates(),
            }),
        }
    }

    async fn summary(&self, user: User) -> Result<UserSummary, StoreError> {
        let id = user.id;
        let (identities, keys) = self
            .store
            .call(move |c| Ok((repo::identities_of(c, id)?, repo::keys_of(c, id)?)))
            .await?;
        Ok(UserSummary {
            user,
            identities,
            active_keys: keys
                .iter()
                .filter(|k| k.state == crate::model::KeyState::Active)
                .count(),
        })
    }

    async fn target_user(
        &self,
        me: Option<&User>,
        target: Option<UserName>,
    ) -> Result<User, CommandError> {
        match target {
            None => me
                .cloned()
                .ok_or_else(|| CommandError::Refused("Kennel does not know you yet".into())),
            Some(t) => {
                let n = t.clone();
                self.store
                    .call(move |c| repo::user_by_name(c, &n))
                    .await?
                    .ok_or_else(|| CommandError::NotFound(format!("there is no user '{t}'")))
            }
        }
    }

    /// Records a project's state; a project whose VM is not running loses
    /// its route, so no gateway dials a dead address.
    pub(crate) async fn set_state(
        &self,
        name: &ProjectName,
        state: ProjectState,
    ) -> Result<(), StoreError> {
        let n = name.clone();
        self.store
            .call(move |c| {
                repo::set_project_state(c, &n, state)?;
                if matches!(state, ProjectState::Stopped | ProjectState::Failed) {
                    repo::clear_route(c, &n)?;
                }
                Ok(())
            })
            .await
    }

    async fn visibility(
        &self,
        project: Option<Project>,
        name: &ProjectName,
        v: Visibility,
    ) -> Outcome {
        if project.is_none() {
            return Err(CommandError::NotFound(format!(
                "there is no project '{name}'"
            )));
        }
        let n = name.clone();
        self.store
            .call(move |c| repo::set_visibility(c, &n, v))
            .await?;
        let url = format!("https://{name}.{}", self.settings.domain);
        Ok(Reply::Done {
            message: match v {
                Visibility::Public => {
                    format!("{url} is now public: anyone with the link can open it.")
                }
                Visibility::Private => {
                    format!("{url} is now private: only the owner and shares can open it.")
                }
            },
        })
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

    /// Re-installs the keys of everyone with SSH access in each project's VM,
    /// after access changed (so a revoked key stops working at once).
    pub(crate) async fn sync_access(&self, projects: Vec<ProjectName>) {
        for p in projects {
            let keys = match self.authorized_keys(&p).await {
                Ok(k) => k,
                Err(e) => {
                    tracing::error!(project = %p, error = %e, "cannot read the keys to install");
                    continue;
                }
            };
            match self.vms.sync_keys(&p, &keys).await {
                Ok(()) | Err(ProvisionError::Unavailable(_)) => {}
                Err(e) => {
                    tracing::error!(project = %p, error = %e, "could not update the VM's keys; they apply at its next start")
                }
            }
        }
    }

    /// Projects a user reaches over SSH.
    async fn ssh_projects_of(&self, user: crate::model::UserId) -> Vec<ProjectName> {
        self.store
            .call(move |c| repo::ssh_projects_of(c, user))
            .await
            .unwrap_or_default()
    }

    async fn authorized_keys(&self, project: &ProjectName) -> Result<Vec<String>, StoreError> {
        let p = project.clone();
        self.store
            .call(move |c| repo::ssh_keys_for_project(c, &p))
            .await
    }

    async fn start(&self, project: Project, progress: &dyn ProgressSink) -> Outcome {
        let name = project.name.clone();
        self.set_state(&name, ProjectState::Starting).await?;
        let spec = VmSpec {
            project: name.clone(),
            stack: project.stack.clone(),
            source_path: project.source_path.clone(),
            resources: project.resources,
            app_port: project.app_port,
            authorized_keys: self.authorized_keys(&name).await?,
        };
        match self.vms.start(&spec, progress).await {
            Ok(status) => {
                self.set_state(&name, ProjectState::Running).await?;
                self.record_route(&name, &status).await?;
                Ok(Reply::Connection {
                    connection: self.connection(&project),
                })
            }
            Err(e) => {
                self.set_state(&name, ProjectState::Failed).await?;
                Err(e.into())
            }
        }
    }

    /// Asks `who` to confirm `line` with `yes` (at `step`).
    async fn ask(&self, who: &Identity, prompt: String, line: &str, step: u32) -> Outcome {
        let w = who.clone();
        let l = line.to_owned();
        let expires = crate::model::now() + self.settings.confirm_secs;
        self.store
            .call(move |c| repo::set_confirmation(c, &w, &l, step, expires))
            .await?;
        Ok(Reply::Confirm {
            prompt: format!(
                "{prompt} Reply 'yes' within {} minutes to go ahead.",
                self.settings.confirm_secs / 60
            ),
            confirm_with: "yes".into(),
        })
    }

    /// The e-mail address for commits made on `user`'s behalf.
    fn email_of(&self, who: &Identity, user: &User) -> String {
        let id = who.external_id.as_str();
        match (
            who.frontend,
            id.strip_prefix('@').and_then(|s| s.split_once(':')),
        ) {
            (crate::model::Frontend::Matrix, Some((local, server))) => format!("{local}@{server}"),
            _ => format!("{}@{}", user.name, self.settings.domain),
        }
    }

    /// Checks the quota and records a new project in state `creating`, in
    /// one write transaction, so two creates of one name cannot both win.
    #[allow(clippy::too_many_arguments)]
    async fn reserve(
        &self,
        user: &User,
        name: &ProjectName,
        stack: &str,
        git: Option<&str>,
        source_path: &str,
        template: Option<&str>,
        resources: Resources,
        app_port: u16,
    ) -> Result<Project, CommandError> {
        let (uid, role) = (user.id, user.role);
        let (row_name, stack, git, sp, tmpl) = (
            name.clone(),
            stack.to_owned(),
            git.map(str::to_owned),
            source_path.to_owned(),
            template.map(str::to_owned),
        );
        self.store
            .write(move |tx| {
                let quota = repo::quota_for(tx, role)?;
                let usage = repo::usage_of(tx, uid)?;
                if let Err(r) = policy::check_quota(&quota, &usage, &resources) {
                    return Ok(Err(CommandError::from(r)));
                }
                match repo::insert_project(
                    tx,
                    &NewProjectRow {
                        name: &row_name,
                        owner: uid,
                        stack: &stack,
                        git_url: git.as_deref(),
                        source_path: &sp,
                        template: tmpl.as_deref(),
                        resources,
                        app_port,
                        state: ProjectState::Creating,
                    },
                ) {
                    Ok(p) => Ok(Ok(p)),
                    Err(StoreError::AlreadyExists { .. }) => Ok(Err(CommandError::Conflict(
                        format!("a project named '{row_name}' already exists; pick another name"),
                    ))),
                    Err(e) => Err(e),
                }
            })
            .await?
    }

    /// Waits for a free build slot, telling the requester their place in line.
    async fn queue(&self, progress: &dyn ProgressSink) -> tokio::sync::OwnedSemaphorePermit {
        use std::sync::atomic::Ordering;
        if let Ok(p) = self.creates.clone().try_acquire_owned() {
            return p;
        }
        let place = self.waiting.fetch_add(1, Ordering::SeqCst) + 1;
        progress.report(Progress {
            stage: Stage::Queued,
            percent: None,
            detail: Some(format!(
                "{place} in line; {} project(s) build at once",
                self.settings.max_parallel_creates
            )),
        });
        let permit = self.creates.clone().acquire_owned().await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        // The semaphore is never closed.
        #[allow(clippy::expect_used)]
        permit.expect("the create semaphore is never closed")
    }

    /// Records the outcome of a create: the project runs, or its record goes.
    async fn finish_create(
        &self,
        reserved: Project,
        result: Result<crate::provision::Created, ProvisionError>,
        progress: &dyn ProgressSink,
    ) -> Outcome {
        let name = reserved.name.clone();
        match result {
            Ok(created) => {
                self.record_route(&name, &created.status).await?;
                let (stack, src) = (created.stack.clone(), created.source_path.clone());
                let n = name.clone();
                let project = self
                    .store
                    .write(move |tx| {
                        tx.execute(
                            "UPDATE projects SET stack = ?2, source_path = ?3, state = 'running' WHERE name = ?1",
                            rusqlite::params![n.as_str(), stack, src],
                        )?;
                        repo::project_by_name(tx, &n)
                    })
                    .await?
                    .unwrap_or(reserved);
                progress.report(Progress {
                    stage: Stage::Ready,
                    percent: None,
                    detail: None,
                });
                Ok(Reply::Created {
                    connection: self.connection(&project),
                    project,
                    notes: created.notes,
                })
            }
            Err(e) => {
                self.store
                    .call(move |c| repo::delete_project(c, &name))
                    .await?;
                Err(e.into())
            }
        }
    }

    async fn new_project(
        &self,
        who: &Identity,
        user: Option<&User>,
        args: command::NewProjectArgs,
        progress: &dyn ProgressSink,
    ) -> Outcome {
        let user = user
            .cloned()
            .ok_or_else(|| CommandError::Refused("Kennel does not know you yet".into()))?;
        let d = self.settings.default_resources;
        let resources = Resources {
            vcpus: args.cpus.unwrap_or(d.vcpus),
            memory_mib: args.memory.map_or(d.memory_mib, |s| s.mib),
            disk_mib: args.disk.map_or(d.disk_mib, |s| s.mib),
        };
        // Template: must exist; gives the default stack; starts a new repo.
        let template = match &args.template {
            None => None,
            Some(t) => {
                if args.git.is_some() {
                    return Err(CommandError::Conflict(
                        "--template starts a new repository; it cannot be combined with --git"
                            .into(),
                    ));
                }
                let all = self.catalog.templates();
                match all.iter().find(|x| x.name == t.as_str()) {
                    Some(x) if x.broken.is_some() => {
                        return Err(CommandError::Conflict(format!(
                            "template {t} is broken: {}",
                            x.broken.clone().unwrap_or_default()
                        )))
                    }
                    Some(x) => Some(x.clone()),
                    None => {
                        let names: Vec<String> = all.into_iter().map(|x| x.name).collect();
                        return Err(CommandError::NotFound(format!(
                            "there is no template '{t}'; templates: {}",
                            if names.is_empty() {
                                "none installed".into()
                            } else {
                                names.join(", ")
                            }
                        )));
                    }
                }
            }
        };
        let stack = args
            .stack
            .as_ref()
            .map(ToString::to_string)
            .or_else(|| template.as_ref().map(|t| t.stack.clone()));
        let known = self.catalog.stacks();
        let stack_info = match &stack {
            None => None,
            Some(stack) => match known.iter().find(|s| &s.name == stack) {
                Some(s) if s.broken.is_some() => {
                    return Err(CommandError::Conflict(format!(
                        "stack {stack} is broken: {}",
                        s.broken.clone().unwrap_or_default()
                    )))
                }
                Some(s) => Some(s.clone()),
                None => {
                    let names: Vec<String> = known.into_iter().map(|s| s.name).collect();
                    return Err(CommandError::NotFound(format!(
                        "there is no stack '{stack}'; known stacks: {}",
                        if names.is_empty() {
                            "none installed".into()
                        } else {
                            names.join(", ")
                        }
                    )));
                }
            },
        };
        let app_port = stack_info.map_or(self.settings.default_app_port, |s| s.app_port);
        let source_path = self.source_path(&args).await?;
        let sp = source_path.to_string_lossy().into_owned();
        let reserved = self
            .reserve(
                &user,
                &args.name,
                stack.as_deref().unwrap_or("detecting"),
                args.git.as_ref().map(|g| g.as_str()),
                &sp,
                args.template.as_ref().map(|t| t.as_str()),
                resources,
                app_port,
            )
            .await?;
        progress.report(Progress {
            stage: Stage::Validated,
            percent: None,
            detail: Some(format!(
                "{} into {sp}; stack {}; {} vCPU, {} MiB memory, {} GiB disk",
                args.git
                    .as_ref()
                    .map_or_else(|| "new repository".to_owned(), |g| format!("clone {g}")),
                stack.as_deref().unwrap_or("detected from the source"),
                resources.vcpus,
                resources.memory_mib,
                resources.disk_mib / 1024
            )),
        });
        let _permit = self.queue(progress).await;
        let uid = user.id;
        let git_token = self
            .store
            .call(move |c| repo::secret(c, uid, "git-token"))
            .await?;
        let req = CreateRequest {
            project: args.name.clone(),
            owner: user.name.clone(),
            stack,
            git: args.git.map(|g| g.to_string()),
            path: Some(sp),
            template: args.template.map(|t| t.to_string()),
            resources,
            app_port,
            authorized_keys: self.authorized_keys(&args.name).await?,
            adopt: args.adopt,
            git_token,
            author_name: user.name.to_string(),
            author_email: self.email_of(who, &user),
        };
        let result = self.vms.create(&req, progress).await;
        self.finish_create(reserved, result, progress).await
    }

    /// Where a new project's source goes: `--path` (relative paths are
    /// under the projects root) or `<root>/<name>`. It must be inside the
    /// root, reached without following any link (a guest writes links into
    /// its source, which is on the host), neither inside nor around
    /// another project's source (whose guest could swap a link in later),
    /// and an existing non-empty directory needs `--adopt`.
    async fn source_path(&self, args: &command::NewProjectArgs) -> Result<PathBuf, CommandError> {
        let name = args.name.clone();
        let projects = self
            .store
            .call(move |c| {
                Ok((
                    repo::project_by_name(c, &name)?.is_some(),
                    repo::list_projects(c, None)?,
                ))
            })
            .await?;
        if projects.0 {
            return Err(CommandError::Conflict(format!(
                "a project named '{}' already exists; pick another name, or see 'status {}'",
                args.name, args.name
            )));
        }
        let root = Beneath::open(&self.settings.projects_root).map_err(|e| host_path_failed(&e))?;
        let rel = match &args.path {
            None => PathBuf::from(args.name.as_str()),
            Some(p) => root.relative(Path::new(p)).map_err(|e| match e {
                HostPathError::ParentDir(_) => CommandError::Refused("--path may not contain '..'".into()),
                _ => CommandError::Refused(format!(
                    "--path must be a directory inside {}; ask an operator to add another project root",
                    root.root().display()
                )),
            })?,
        };
        let p = root.join(&rel);
        for other in &projects.1 {
            let theirs = root
                .relative(Path::new(&other.source_path))
                .unwrap_or_else(|_| PathBuf::from(&other.source_path));
            if rel.starts_with(&theirs) || theirs.starts_with(&rel) {
                return Err(CommandError::Refused(format!(
                    "{} is {} the source of project '{}'; a project's source may not hold or be held by another's: pick another --path",
                    p.display(),
                    if rel.starts_with(&theirs) { "inside" } else { "around" },
                    other.name
                )));
            }
        }
        if args.adopt && args.git.is_some() {
            return Err(CommandError::Conflict(
                "--adopt uses an existing directory; it cannot also clone --git".into(),
            ));
        }
        let non_empty = root.check_dir(&rel).map_err(|e| match e {
            HostPathError::NotDir(p) => {
                CommandError::Conflict(format!("{} is not a directory", p.display()))
            }
            HostPathError::Io { .. } | HostPathError::Root { .. } => host_path_failed(&e),
            e => CommandError::Refused(e.to_string()),
        })?;
        if non_empty && !args.adopt {
            return Err(CommandError::Conflict(format!(
                "{} exists and is not empty; pass --adopt to use it as this project's source, or pick another --path",
                p.display()
            )));
        }
        Ok(p)
    }

    /// Whether `rm --purge` may delete `path`: inside the projects root,
    /// reached without a link.
    fn purgeable(&self, path: &str) -> Result<(), CommandError> {
        let root = Beneath::open(&self.settings.projects_root).map_err(|e| host_path_failed(&e))?;
        let refuse = |why: String| {
            CommandError::Refused(format!(
                "Kennel deletes only sources inside {} ({why}); nothing was changed. Remove the project without --purge, and delete {path} by hand if you mean it",
                root.root().display()
            ))
        };
        let rel = root
            .relative(Path::new(path))
            .map_err(|_| refuse(format!("{path} is not")))?;
        root.lookup(&rel).map_err(|e| refuse(e.to_string()))?;
        Ok(())
    }

    async fn decide(
        &self,
        me: Option<&User>,
        id: i64,
        state: RequestState,
        reason: Option<String>,
    ) -> Outcome {
        let me = me
            .cloned()
            .ok_or_else(|| CommandError::Refused("Kennel does not know you yet".into()))?;
        let result = self
            .store
            .write(move |tx| {
                let Some(req) = repo::request_by_id(tx, id)? else {
                    return Ok(Err(CommandError::NotFound(format!("there is no access request #{id}; see 'requests'"))));
                };
                if req.state != RequestState::Pending {
                    let by = req.decided_by.as_ref().map_or("someone".to_owned(), ToString::to_string);
                    return Ok(Err(CommandError::Conflict(format!(
                        "request #{id} was already {} by {by}; nothing changed",
                        req.state
                    ))));
                }
                let mut granted_to = None;
                if state == RequestState::Approved {
                    let user = match repo::user_by_identity(tx, &req.identity)? {
                        Some(u) => u,
                        None => {
                            let name = repo::free_user_name(tx, identity_hint(&req.identity))?;
                            let u = repo::create_user(tx, &name, Role::Member)?;
                            repo::link_identity(tx, &req.identity, u.id)?;
                            u
                        }
                    };
                    let key = crate::keys::PublicKey::parse(&req.openssh)?;
                    match repo::add_key(tx, user.id, &key, None) {
                        Ok(_) => {}
                        Err(StoreError::AlreadyExists { .. }) => {
                            return Ok(Err(CommandError::Conflict(format!(
                                "key {} of request #{id} was registered to another user meanwhile; deny this request",
                                req.fingerprint
                            ))))
                        }
                        Err(e) => return Err(e),
                    }
                    granted_to = Some(user);
                }
                repo::decide_request(tx, id, state, me.id, reason.as_deref(), granted_to.as_ref().map(|u| u.id))?;
                let req = repo::request_by_id(tx, id)?.ok_or(StoreError::Invalid {
                    what: "a request vanished while being decided".into(),
                })?;
                Ok(Ok((req, granted_to.map(|u| u.name.to_string()))))
            })
            .await??;
        let (request, user) = result;
        tracing::info!(request = request.id, state = %request.state, "access request decided");
        let _ = self.events.send(Event::RequestDecided(request.clone()));
        if let Some(u) = &user {
            let n = UserName::new(u).ok();
            let uid = match n {
                Some(n) => self
                    .store
                    .call(move |c| repo::user_by_name(c, &n))
                    .await?
                    .map(|u| u.id),
                None => None,
            };
            if let Some(uid) = uid {
                self.sync_access(self.ssh_projects_of(uid).await).await;
            }
        }
        Ok(Reply::Decided { request, user })
    }

    /// How to reach a project: the SSH string and editor links.
    pub fn connection(&self, p: &Project) -> Connection {
        let s = &self.settings;
        let name = p.name.as_str();
        let port_flag = if s.ssh_port == 22 {
            String::new()
        } else {
            format!(" -p {}", s.ssh_port)
        };
        let alias = format!("kennel-{name}");
        let https_port = if s.https_port == 443 {
            String::new()
        } else {
            format!(":{}", s.https_port)
        };
        Connection {
            project: name.to_owned(),
            ssh_command: format!("ssh {name}@{}{port_flag}", s.ssh_host),
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
            https_url: format!("https://{name}.{}{https_port}", s.domain),
            source_path: p.source_path.clone(),
            host_key_fingerprints: s.host_key_fingerprints.clone(),
        }
    }
}

fn repo_list_users(c: &mut rusqlite::Connection) -> Result<Vec<User>, StoreError> {
    repo::list_users(c)
}

/// A user-name hint from an identity: a Matrix localpart, else the id.
fn identity_hint(who: &Identity) -> &str {
    let id = who.external_id.as_str();
    id.strip_prefix('@')
        .and_then(|s| s.split(':').next())
        .unwrap_or(id)
}

/// The longest note an access request may carry.
pub const MAX_REQUEST_NOTE_CHARS: usize = 500;

/// A host path that could not be looked at (not the user's fault).
fn host_path_failed(e: &HostPathError) -> CommandError {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    CommandError::Provision(ProvisionError::Failed {
        stage: Stage::Validated,
        message,
    })
}

/// Whether a command changes something worth an audit line.
fn audited(cmd: &Command) -> bool {
    !matches!(
        cmd,
        Command::Help { .. }
            | Command::Whoami
            | Command::Projects
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
    )
}
