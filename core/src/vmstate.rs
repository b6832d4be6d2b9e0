//! The VM state service: the one place a project's VM is started,
//! stopped or woken, and where the store is kept true to the VMs.
//!
//! Every caller goes through here: the `start`, `stop` and `restart`
//! commands, the SSH gateway at each of its entry points, the HTTPS
//! gateway, and the idle supervisor ([`crate::idle`]). An operation is for an
//! [`Actor`], a person or Kennel itself, so a wake needs no command
//! rights: whoever may *enter* a project (policy's `may_enter`, decided by
//! the caller) may wake it.
//!
//! Every operation that changes a project's VM holds that project's VM
//! lock (`Executor::lock_vm`): start, stop, restart, wake, idle stop, and
//! in their command families `rm`, `port`, `checkpoint`, `rollback`,
//! `checkpoint rm`, and `rename` and `cp` (which hold both names' locks,
//! taken in name order). Each checks, locks, and
//! checks again (`Executor::project_now`), so what waited acts on what the
//! holder left: two entry points waking a project at once boot it once, an
//! `rm` after a wake in flight removes the VM the wake booted, and a
//! `rename` after an idle stop moves a stopped VM.
//!
//! Routes stay true: a project whose VM is not running has no route, so
//! the gateways start it instead of dialling a dead address; an adopted VM
//! gets its route (and the current keys) back. What a restarted daemon
//! finds is reconciled here ([`Executor::reconcile`]), and VMs that die
//! under a running project are noticed by the watcher
//! ([`Executor::watch_vms`]).

use std::time::Duration;

use tracing::Instrument;

use crate::executor::{Call, Executor};
use crate::model::{AuditOutcome, Identity, Project, ProjectState, User};
use crate::names::ProjectName;
use crate::outcome::{CommandError, Outcome, Reply};
use crate::provision::{Progress, ProgressSink, Stage, VmSpec, VmStatus};
use crate::store::repo;
use crate::store::StoreError;

/// On whose behalf a VM operation runs.
#[derive(Debug, Clone)]
pub enum Actor {
    /// A person, as a front end identified them.
    User { identity: Identity, user: User },
    /// Kennel itself, and why (for the log and the audit).
    System { why: &'static str },
}

impl Actor {
    fn identity(&self) -> Identity {
        match self {
            Actor::User { identity, .. } => identity.clone(),
            Actor::System { .. } => Identity::system(),
        }
    }

    fn user(&self) -> Option<&User> {
        match self {
            Actor::User { user, .. } => Some(user),
            Actor::System { .. } => None,
        }
    }
}

/// What [`Executor::ensure_running`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Woke {
    /// The VM was running already.
    AlreadyRunning,
    /// The VM was started, and runs now.
    Started(VmStatus),
}

/// What [`Executor::reconcile`] did, for the log and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Running VMs adopted, with their routes and keys restored.
    pub adopted: Vec<ProjectName>,
    /// Projects whose VM was gone, now stopped.
    pub stopped: Vec<ProjectName>,
    /// Of those, the ones that were running (or starting) when the VMs
    /// went away (a host restart, a crash): `vm.autostart` starts them.
    pub interrupted: Vec<ProjectName>,
    /// Creates cut off by the restart, rolled back (the source is kept).
    pub rolled_back: Vec<ProjectName>,
    /// Other operations cut off (a destroy): marked failed.
    pub failed: Vec<ProjectName>,
}

/// The note shown beside "stopped" when a VM died by itself.
pub const EXITED_NOTE: &str = "the VM exited unexpectedly; 'start' brings it back";

impl Executor {
    /// `start NAME`.
    pub(crate) async fn start_cmd(&self, call: &Call<'_>, name: &ProjectName) -> Outcome {
        let project = call.project(name)?;
        let _vm = self.lock_vm(name).await;
        self.boot_vm(&project, call.progress).await?;
        Ok(Reply::Connection {
            connection: self.connection(&project),
        })
    }

    /// `stop NAME`.
    pub(crate) async fn stop_cmd(&self, call: &Call<'_>, name: &ProjectName) -> Outcome {
        call.project(name)?;
        let _vm = self.lock_vm(name).await;
        self.halt_vm(name, call.progress).await?;
        Ok(Reply::Stopped {
            project: name.to_string(),
        })
    }

    /// `restart NAME`: stop and start under one lock.
    pub(crate) async fn restart_cmd(&self, call: &Call<'_>, name: &ProjectName) -> Outcome {
        let project = call.project(name)?;
        let _vm = self.lock_vm(name).await;
        self.set_state(name, ProjectState::Stopping).await?;
        self.vms.stop(name).await?;
        self.set_state(name, ProjectState::Stopped).await?;
        self.boot_vm(&project, call.progress).await?;
        Ok(Reply::Connection {
            connection: self.connection(&project),
        })
    }

    /// Makes sure `name`'s VM runs, starting it for `actor` if it does not,
    /// with progress. The caller has decided that `actor` may enter the
    /// project; this needs no other right. A project with a route whose
    /// VMM is alive is running, so that path costs one store read and one
    /// process check.
    pub async fn ensure_running(
        &self,
        actor: &Actor,
        name: &ProjectName,
        progress: &dyn ProgressSink,
    ) -> Result<Woke, CommandError> {
        if self.looks_running(name).await? {
            return Ok(Woke::AlreadyRunning);
        }
        let _vm = self.lock_vm(name).await;
        // Someone else may have started it while this waited.
        if self.looks_running(name).await? {
            return Ok(Woke::AlreadyRunning);
        }
        let n = name.clone();
        let project = self
            .store
            .call(move |c| repo::project_by_name(c, &n))
            .await?
            .ok_or_else(|| CommandError::NotFound(format!("there is no project '{name}'")))?;
        if matches!(
            project.state,
            ProjectState::Creating | ProjectState::Destroying
        ) {
            return Err(CommandError::Conflict(format!(
                "{name} is {}; try again when that is done",
                project.state
            )));
        }
        let span = tracing::info_span!("wake", project = %name,
            actor = actor.user().map_or("kennel", |u| u.name.as_str()));
        let out = async {
            tracing::info!("starting a stopped VM on entry");
            self.boot_vm(&project, progress).await
        }
        .instrument(span)
        .await;
        let (outcome, detail) = match &out {
            Ok(_) => (AuditOutcome::Ok, None),
            Err(e) => (
                AuditOutcome::Failed,
                Some(crate::redact::redact(&e.to_string()).into_owned()),
            ),
        };
        let why = match actor {
            Actor::System { why } => Some(*why),
            Actor::User { .. } => None,
        };
        self.audit_entry(
            &actor.identity(),
            actor.user(),
            "start",
            Some(name.to_string()),
            outcome,
            detail.or(why.map(str::to_owned)),
        )
        .await;
        out.map(Woke::Started)
    }

    /// Stops `name`'s VM for `actor` (the idle supervisor, an operator).
    pub async fn stop_vm(
        &self,
        actor: &Actor,
        name: &ProjectName,
        progress: &dyn ProgressSink,
    ) -> Result<(), CommandError> {
        let _vm = self.lock_vm(name).await;
        let out = self.halt_vm(name, progress).await;
        let outcome = if out.is_ok() {
            AuditOutcome::Ok
        } else {
            AuditOutcome::Failed
        };
        let detail = match (&out, actor) {
            (Err(e), _) => Some(crate::redact::redact(&e.to_string()).into_owned()),
            (Ok(()), Actor::System { why }) => Some((*why).to_owned()),
            (Ok(()), Actor::User { .. }) => None,
        };
        self.audit_entry(
            &actor.identity(),
            actor.user(),
            "stop",
            Some(name.to_string()),
            outcome,
            detail,
        )
        .await;
        out
    }

    /// Whether the store says running, with a route, and the VMM lives.
    async fn looks_running(&self, name: &ProjectName) -> Result<bool, StoreError> {
        let n = name.clone();
        let (project, route) = self
            .store
            .call(move |c| Ok((repo::project_by_name(c, &n)?, repo::route(c, &n)?)))
            .await?;
        let recorded = project.is_some_and(|p| p.state == ProjectState::Running) && route.is_some();
        Ok(recorded && self.vms.vm_alive(name).await != Some(false))
    }

    /// Boots a project's VM, keeping its state and route true. The caller
    /// holds the project's VM lock.
    pub(crate) async fn boot_vm(
        &self,
        project: &Project,
        progress: &dyn ProgressSink,
    ) -> Result<VmStatus, CommandError> {
        let name = project.name.clone();
        // The egress policy is in place before the guest runs.
        self.arm_egress(project).await?;
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
                // Idle time starts over with every boot.
                self.activity.started(&name, std::time::Instant::now());
                let n = name.clone();
                self.store
                    .call(move |c| repo::record_idle(c, &[(n, 0)]))
                    .await?;
                Ok(status)
            }
            // Nothing happened to the VM: it is as it was, on a host that
            // does not answer (`projects` says so while it does not); it
            // starts when the host is back.
            Err(e @ crate::provision::ProvisionError::HostOffline { .. }) => {
                self.set_state(&name, ProjectState::Stopped).await?;
                Err(e.into())
            }
            Err(e) => {
                self.set_state(&name, ProjectState::Failed).await?;
                Err(e.into())
            }
        }
    }

    /// Stops a project's VM, keeping its state and route true. The caller
    /// holds the project's VM lock.
    pub(crate) async fn halt_vm(
        &self,
        name: &ProjectName,
        progress: &dyn ProgressSink,
    ) -> Result<(), CommandError> {
        self.set_state(name, ProjectState::Stopping).await?;
        progress.report(Progress {
            stage: Stage::Stopping,
            percent: None,
            detail: None,
        });
        match self.vms.stop(name).await {
            Ok(()) => {
                crate::fault::point("stopping");
                self.set_state(name, ProjectState::Stopped).await?;
                self.activity.stopped(name);
                Ok(())
            }
            Err(e) => {
                self.set_state(name, ProjectState::Failed).await?;
                Err(e.into())
            }
        }
    }

    /// Brings the store in line with the VMs found at start (`found`:
    /// project name, whether its VM runs). Running VMs are adopted with
    /// their routes and keys; a project whose VM is gone is stopped; a
    /// create that the restart cut off is rolled back (VM, disk and the
    /// project's row; the source stays), since its VM never became ready
    /// from Kennel's point of view.
    pub async fn reconcile(&self, found: &[(String, bool)]) -> Result<Reconciled, StoreError> {
        let projects = self.store.call(|c| repo::list_projects(c, None)).await?;
        let mut done = Reconciled::default();
        for p in projects {
            let running = found.iter().any(|(n, r)| n == p.name.as_str() && *r);
            let name = p.name.clone();
            match (running, p.state) {
                (_, ProjectState::Creating) => {
                    tracing::warn!(project = %name, source = %p.source_path,
                        "a create was cut off by a restart; rolling it back (a source it finished making is kept)");
                    if let Err(e) = self.vms.destroy(&name).await {
                        tracing::warn!(project = %name, error = %e, "could not remove the half-made VM");
                    }
                    let n = name.clone();
                    self.store
                        .call(move |c| repo::delete_project(c, &n))
                        .await?;
                    done.rolled_back.push(name);
                }
                (true, _) => {
                    match self.vms.status(&name).await {
                        Ok(status) => self.record_route(&name, &status).await?,
                        Err(e) => {
                            tracing::warn!(project = %name, error = %e, "cannot read an adopted VM's address")
                        }
                    }
                    let n = name.clone();
                    self.store
                        .call(move |c| repo::set_project_state(c, &n, ProjectState::Running))
                        .await?;
                    self.sync_access(vec![name.clone()]).await;
                    done.adopted.push(name);
                }
                (false, ProjectState::Destroying) => {
                    let note = format!("a restart cut off its removal; run 'rm {name}' again to finish it (with --purge if that was asked)");
                    self.set_state_noted(&name, ProjectState::Failed, Some(note))
                        .await?;
                    done.failed.push(name);
                }
                (
                    false,
                    ProjectState::Running | ProjectState::Starting | ProjectState::Stopping,
                ) => {
                    self.set_state(&name, ProjectState::Stopped).await?;
                    if p.state != ProjectState::Stopping {
                        done.interrupted.push(name.clone());
                    }
                    done.stopped.push(name);
                }
                (false, _) => {
                    // Stopped or failed already: make sure no route is left.
                    let n = name.clone();
                    self.store.call(move |c| repo::clear_route(c, &n)).await?;
                }
            }
        }
        Ok(done)
    }

    /// Looks once at every project recorded as running and marks those
    /// whose VMM is gone as stopped, saying why. Projects in the middle of
    /// an operation (starting, stopping, renaming: their VM lock is held)
    /// are left to that operation.
    pub async fn check_vms(&self) -> Result<Vec<ProjectName>, StoreError> {
        let projects = self.store.call(|c| repo::list_projects(c, None)).await?;
        let mut died = Vec::new();
        for p in projects
            .into_iter()
            .filter(|p| p.state == ProjectState::Running)
        {
            // Not while an operation holds the VM (a rename, say, stops and
            // starts it under the new name the store already shows).
            let Some(_held) = self.try_lock_vm(&p.name) else {
                continue;
            };
            if self.vms.vm_alive(&p.name).await != Some(false) {
                continue;
            }
            let n = p.name.clone();
            // Only if nobody changed it meanwhile (a stop that just ran).
            let changed = self
                .store
                .write(move |tx| {
                    let now = repo::project_by_name(tx, &n)?;
                    if now.is_some_and(|p| p.state == ProjectState::Running) {
                        repo::set_project_state_noted(
                            tx,
                            &n,
                            ProjectState::Stopped,
                            Some(EXITED_NOTE),
                        )?;
                        repo::clear_route(tx, &n)?;
                        return Ok(true);
                    }
                    Ok(false)
                })
                .await?;
            if changed {
                self.activity.stopped(&p.name);
                tracing::warn!(project = %p.name, owner = %p.owner, "the VM exited unexpectedly; marked stopped");
                died.push(p.name);
            }
        }
        Ok(died)
    }

    /// Runs [`Executor::check_vms`] every `every` until `shutdown` ends.
    pub async fn watch_vms(
        &self,
        every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = tick.tick() => {
                    if let Err(e) = self.check_vms().await {
                        tracing::warn!(error = %e, "cannot check the VMs");
                    }
                }
            }
        }
    }
}
