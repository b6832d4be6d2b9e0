//! Keeping the store true to the VMs: what a restarted daemon finds
//! (reconcile) and VMs that die under a running project (the watcher).
//!
//! Both act for the system, not for a person, and both keep routes true: a
//! project whose VM is not running has no route, so the gateways start it
//! instead of dialling a dead address; an adopted VM gets its route (and
//! the current keys) back, so whatever is shown running can be entered.

use std::time::Duration;

use crate::executor::Executor;
use crate::model::ProjectState;
use crate::names::ProjectName;
use crate::store::repo;
use crate::store::StoreError;

/// What [`Executor::reconcile`] did, for the log and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Running VMs adopted, with their routes and keys restored.
    pub adopted: Vec<ProjectName>,
    /// Projects whose VM was gone, now stopped.
    pub stopped: Vec<ProjectName>,
    /// Creates cut off by the restart, rolled back (the source is kept).
    pub rolled_back: Vec<ProjectName>,
    /// Other operations cut off (a destroy): marked failed.
    pub failed: Vec<ProjectName>,
}

/// The note shown beside "stopped" when a VM died by itself.
pub const EXITED_NOTE: &str = "the VM exited unexpectedly; 'start' brings it back";

impl Executor {
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
                        "a create was cut off by a restart; rolling it back (the source is kept)");
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
                    self.set_state(&name, ProjectState::Failed).await?;
                    done.failed.push(name);
                }
                (
                    false,
                    ProjectState::Running | ProjectState::Starting | ProjectState::Stopping,
                ) => {
                    self.set_state(&name, ProjectState::Stopped).await?;
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
    /// an operation (starting, stopping, ...) are left to that operation.
    pub async fn check_vms(&self) -> Result<Vec<ProjectName>, StoreError> {
        let projects = self.store.call(|c| repo::list_projects(c, None)).await?;
        let mut died = Vec::new();
        for p in projects
            .into_iter()
            .filter(|p| p.state == ProjectState::Running)
        {
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
