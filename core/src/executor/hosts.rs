//! The cluster commands (admins): `hosts`, `move`, `evacuate`, `restore`.
//!
//! Placement, membership and moving disks are the engine's (Incus);
//! what is Kennel's is that a project is stopped for a move under its VM
//! lock, its state and route stay true, and it runs again afterwards if
//! it ran before, exactly as a `restart` would leave it.

use crate::command::HostName;
use crate::model::ProjectState;
use crate::names::ProjectName;
use crate::outcome::{CommandError, Moved, Outcome, Reply};
use crate::provision::{Progress, ProgressSink, Stage, VmPlace};

use super::{Call, Executor};

impl Executor {
    /// `hosts`.
    pub(super) async fn hosts_cmd(&self) -> Outcome {
        let hosts = self.vms.hosts().await?;
        Ok(Reply::Hosts { hosts })
    }

    /// `move NAME HOST`.
    pub(super) async fn move_cmd(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        host: &HostName,
    ) -> Outcome {
        call.project(name)?;
        // Checked before anything stops: a move that cannot happen
        // leaves the project as it was.
        self.online_host(host).await?;
        let moved = self
            .move_one(name, Some(host.as_str()), None, call.progress)
            .await?;
        Ok(Reply::Moved { moved })
    }

    /// `evacuate HOST`: out of placement first (nothing new lands there
    /// while it empties), then every project of Kennel's on it moves to
    /// the least busy other host. A project that cannot move is reported
    /// and the rest go on.
    pub(super) async fn evacuate_cmd(&self, call: &Call<'_>, host: &HostName) -> Outcome {
        let host = self.known_host(host).await?;
        // What runs there now is what runs again elsewhere; read before
        // the engine stops anything.
        let on_host: Vec<VmPlace> = self
            .vms
            .placements()
            .await
            .into_iter()
            .filter(|p| p.host == host)
            .collect();
        let mut running = Vec::new();
        for p in &on_host {
            if let Ok(name) = ProjectName::new(&p.project) {
                if self
                    .project_now(&name)
                    .await
                    .is_ok_and(|p| p.state == ProjectState::Running)
                {
                    running.push(name);
                }
            }
        }
        self.vms.set_host_evacuated(&host, true).await?;
        let mut moved = Vec::new();
        let mut failed = Vec::new();
        for p in on_host {
            let Ok(name) = ProjectName::new(&p.project) else {
                continue;
            };
            // Kennel's own projects only: the engine moves the rest.
            if self.project_now(&name).await.is_err() {
                continue;
            }
            let was_running = running.contains(&name);
            match self
                .move_one_from(&name, None, Some(&host), was_running, call.progress)
                .await
            {
                Ok(m) => moved.push(m),
                Err(e) => failed.push((name.to_string(), e.to_string())),
            }
        }
        Ok(Reply::HostEvacuated {
            host,
            moved,
            failed,
            restored: false,
        })
    }

    /// `restore HOST`: back in placement, and what `evacuate` moved off
    /// it moves home.
    pub(super) async fn restore_cmd(&self, call: &Call<'_>, host: &HostName) -> Outcome {
        let host = self.known_host(host).await?;
        self.vms.set_host_evacuated(&host, false).await?;
        let mut moved = Vec::new();
        let mut failed = Vec::new();
        for p in self.vms.placements().await {
            if p.evacuated_from.as_deref() != Some(host.as_str()) {
                continue;
            }
            let Ok(name) = ProjectName::new(&p.project) else {
                continue;
            };
            if self.project_now(&name).await.is_err() {
                continue;
            }
            match self.move_one(&name, Some(&host), None, call.progress).await {
                Ok(m) => moved.push(m),
                Err(e) => failed.push((name.to_string(), e.to_string())),
            }
        }
        Ok(Reply::HostEvacuated {
            host,
            moved,
            failed,
            restored: true,
        })
    }

    /// Checks that `host` exists and takes projects (`--host`, `move`).
    pub(super) async fn online_host(&self, host: &HostName) -> Result<(), CommandError> {
        let hosts = self.vms.hosts().await?;
        match hosts.iter().find(|h| h.name == host.as_str()) {
            Some(h) if h.online() => Ok(()),
            Some(h) => Err(CommandError::Conflict(format!(
                "host {host} is {}; choose an online host (see 'hosts')",
                h.status
            ))),
            None => Err(no_such_host(host, &hosts)),
        }
    }

    /// The host as the backend names it, or a clear error listing them.
    async fn known_host(&self, host: &HostName) -> Result<String, CommandError> {
        let hosts = self.vms.hosts().await?;
        if hosts.iter().any(|h| h.name == host.as_str()) {
            return Ok(host.to_string());
        }
        Err(no_such_host(host, &hosts))
    }

    /// Moves one project, stopping it first and starting it again if it
    /// ran, under its VM lock.
    async fn move_one(
        &self,
        name: &ProjectName,
        to: Option<&str>,
        evacuated_from: Option<&str>,
        progress: &dyn ProgressSink,
    ) -> Result<Moved, CommandError> {
        let ran = self
            .project_now(name)
            .await
            .is_ok_and(|p| matches!(p.state, ProjectState::Running | ProjectState::Starting));
        self.move_one_from(name, to, evacuated_from, ran, progress)
            .await
    }

    async fn move_one_from(
        &self,
        name: &ProjectName,
        to: Option<&str>,
        evacuated_from: Option<&str>,
        start_after: bool,
        progress: &dyn ProgressSink,
    ) -> Result<Moved, CommandError> {
        let _vm = self.lock_vm(name).await;
        let project = self.project_now(name).await?;
        if matches!(
            project.state,
            ProjectState::Creating | ProjectState::Destroying
        ) {
            return Err(CommandError::Conflict(format!(
                "{name} is {}; move it when that is done",
                project.state
            )));
        }
        let from = self
            .vms
            .placements()
            .await
            .into_iter()
            .find(|p| p.project == name.as_str())
            .map(|p| p.host)
            .unwrap_or_default();
        if to.is_some_and(|t| t == from) {
            return Err(CommandError::Conflict(format!(
                "{name} is on {from} already"
            )));
        }
        if project.state != ProjectState::Stopped {
            self.halt_vm(name, progress).await?;
        }
        progress.report(Progress {
            stage: Stage::Disk,
            percent: None,
            detail: Some(format!(
                "moving {name} from {from} to {}",
                to.unwrap_or("the least busy host")
            )),
        });
        let host = self.vms.move_vm(name, to, evacuated_from).await?;
        tracing::info!(project = %name, from = %from, to = %host, "moved");
        let running = if start_after {
            self.boot_vm(&project, progress).await?;
            true
        } else {
            false
        };
        Ok(Moved {
            project: name.to_string(),
            from,
            to: host,
            running,
        })
    }
}

/// There is no host by that name: the names there are.
fn no_such_host(host: &HostName, hosts: &[crate::provision::HostInfo]) -> CommandError {
    let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    CommandError::NotFound(format!(
        "there is no host '{host}'; the hosts are {}",
        names.join(", ")
    ))
}
