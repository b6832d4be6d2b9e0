//! Checkpoints: `checkpoint`, `checkpoints`, `rollback`, `checkpoint rm`
//! (and `cp NAME@LABEL`, in `create.rs`).
//!
//! A checkpoint is a provisioner operation (the disk copy-on-write, the
//! source copied) plus a row in the store saying who took it, why and what
//! it cost. Each runs under the project's VM lock, like every VM
//! operation. The row is written after the files are complete: files
//! without a row (a crash in between) are half-made, and the provisioner
//! cleans them up (it merges a disk layer without a row into its child).

use super::{Call, Executor};
use crate::command::SlugName;
use crate::model::{Checkpoint, Project, ProjectState, User};
use crate::names::ProjectName;
use crate::outcome::{CommandError, Outcome, Reply};
use crate::provision::{CheckpointTaken, ProgressSink};
use crate::store::repo;

/// What Kennel calls the checkpoint it takes before a rollback.
const AUTO_PREFIX: &str = "auto-";

impl Executor {
    /// `checkpoint NAME [LABEL] [--note TEXT]`.
    pub(super) async fn checkpoint_cmd(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        label: Option<SlugName>,
        note: Option<String>,
    ) -> Outcome {
        call.project(name)?;
        let _vm = self.lock_vm(name).await;
        let project = self.project_now(name).await?;
        not_busy(&project)?;
        self.check_checkpoint_quota(&project).await?;
        let label = match label {
            Some(l) => {
                if self.checkpoint_row(name, l.as_str()).await?.is_some() {
                    return Err(CommandError::Conflict(format!(
                        "{name} has a checkpoint '{l}' already; pick another label, or remove it with 'checkpoint rm {name} {l}'"
                    )));
                }
                l.as_str().to_owned()
            }
            None => self.free_label(name, "c").await?,
        };
        let (checkpoint, cost) = self
            .take_checkpoint(
                &project,
                &label,
                note.as_deref(),
                None,
                call.user,
                call.progress,
            )
            .await?;
        let notes = self.prune_checkpoints(name).await?;
        Ok(Reply::CheckpointTaken {
            project: name.to_string(),
            checkpoint,
            cost,
            notes,
        })
    }

    /// `checkpoints NAME`.
    pub(super) async fn checkpoints_cmd(&self, call: &Call<'_>, name: &ProjectName) -> Outcome {
        call.project(name)?;
        let n = name.clone();
        let checkpoints = self
            .store
            .call(move |c| repo::checkpoints_of(c, &n))
            .await?;
        Ok(Reply::Checkpoints {
            project: name.to_string(),
            checkpoints,
        })
    }

    /// `rollback NAME LABEL [--yes]`: asks first; then checkpoints the
    /// present (so the rollback can be undone), stops the VM if it runs,
    /// puts disk, source, resources and app port back, and starts it again.
    pub(super) async fn rollback_cmd(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        label: &SlugName,
        yes: bool,
    ) -> Outcome {
        call.project(name)?;
        let target = self.existing_checkpoint(name, label.as_str()).await?;
        if !yes {
            let again = crate::command::Command::Rollback {
                name: name.clone(),
                label: label.clone(),
                yes: true,
            }
            .to_string();
            let prompt = format!(
                "This puts the disk and the source of {name} back as they were at checkpoint {label} ({}{}). What changed since is kept in an automatic checkpoint first, so the rollback can itself be undone. A running VM restarts.",
                crate::model::format_time(target.taken_at),
                target
                    .taken_by
                    .as_ref()
                    .map(|u| format!(", by {u}"))
                    .unwrap_or_default()
            );
            return self.ask(call.who, prompt, &again, 1).await;
        }
        let _vm = self.lock_vm(name).await;
        let project = self.project_now(name).await?;
        not_busy(&project)?;
        let target = self.existing_checkpoint(name, label.as_str()).await?;
        let undo = self.free_label(name, AUTO_PREFIX).await?;
        // Stopped first: the present's checkpoint and the rollback need no
        // live disk switch (every backend can), and nothing writes meanwhile.
        let was_running = project.state == ProjectState::Running;
        if was_running {
            self.halt_vm(name, call.progress).await?;
        }
        let rolled = async {
            let why = format!("before rollback to {label}");
            self.take_checkpoint(&project, &undo, None, Some(&why), call.user, call.progress)
                .await?;
            crate::fault::point("rollback");
            self.vms
                .restore_checkpoint(name, label.as_str(), call.progress)
                .await?;
            // The VM keeps its app port in its own record too (for its
            // next boots): it goes back with the rest.
            if target.app_port != project.app_port {
                self.vms.set_app_port(name, target.app_port).await?;
            }
            let (n, shape) = (name.clone(), target.resources);
            let port = target.app_port;
            self.store
                .call(move |c| repo::set_shape(c, &n, shape, port))
                .await?;
            Ok::<_, CommandError>(())
        }
        .await;
        if was_running {
            // Rolled back or not, a VM that ran runs again.
            let project = self.project_now(name).await?;
            let booted = self.boot_vm(&project, call.progress).await;
            rolled?;
            booted?;
        } else {
            rolled?;
        }
        let notes = self.prune_checkpoints(name).await?;
        Ok(Reply::RolledBack {
            project: name.to_string(),
            label: label.to_string(),
            undo,
            restarted: was_running,
            notes,
        })
    }

    /// `checkpoint rm NAME LABEL`.
    pub(super) async fn checkpoint_rm_cmd(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        label: &SlugName,
    ) -> Outcome {
        call.project(name)?;
        let _vm = self.lock_vm(name).await;
        self.project_now(name).await?;
        self.existing_checkpoint(name, label.as_str()).await?;
        self.drop_checkpoint(name, label.as_str()).await?;
        Ok(Reply::CheckpointRemoved {
            project: name.to_string(),
            label: label.to_string(),
        })
    }

    /// The checkpoint `label` of `name`, or a clear not-found.
    pub(crate) async fn existing_checkpoint(
        &self,
        name: &ProjectName,
        label: &str,
    ) -> Result<Checkpoint, CommandError> {
        self.checkpoint_row(name, label).await?.ok_or_else(|| {
            CommandError::NotFound(format!(
                "{name} has no checkpoint '{label}'; see 'checkpoints {name}'"
            ))
        })
    }

    async fn checkpoint_row(
        &self,
        name: &ProjectName,
        label: &str,
    ) -> Result<Option<Checkpoint>, CommandError> {
        let (n, l) = (name.clone(), label.to_owned());
        Ok(self
            .store
            .call(move |c| repo::checkpoint(c, &n, &l))
            .await?)
    }

    /// The first free label `PREFIX1`, `PREFIX2`, ... of a project.
    pub(super) async fn free_label(
        &self,
        name: &ProjectName,
        prefix: &str,
    ) -> Result<String, CommandError> {
        let n = name.clone();
        let taken: Vec<String> = self
            .store
            .call(move |c| repo::checkpoints_of(c, &n))
            .await?
            .into_iter()
            .map(|c| c.label)
            .collect();
        Ok((1..)
            .map(|i| format!("{prefix}{i}"))
            .find(|l| !taken.contains(l))
            .unwrap_or_else(|| format!("{prefix}0")))
    }

    /// The owner's usage, checkpoints included, must leave room.
    pub(super) async fn check_checkpoint_quota(
        &self,
        project: &Project,
    ) -> Result<(), CommandError> {
        let owner = project.owner.clone();
        let over = self
            .store
            .call(move |c| {
                let Some(user) = repo::user_by_name(c, &owner)? else {
                    return Ok(None);
                };
                let (quota, _) = repo::quota_of(c, user.id, user.role)?;
                let usage = repo::usage_of(c, user.id)?;
                Ok(quota
                    .disk_mib
                    .filter(|max| usage.disk_mib >= *max)
                    .map(|max| (max, usage.disk_mib)))
            })
            .await?;
        match over {
            Some((max, used)) => Err(CommandError::Refused(format!(
                "{}'s disk quota is used up ({used} of {max} MiB, checkpoints included); remove checkpoints with 'checkpoint rm {} LABEL' or ask an admin",
                project.owner, project.name
            ))),
            None => Ok(()),
        }
    }

    /// Takes the checkpoint's files, then records it.
    pub(super) async fn take_checkpoint(
        &self,
        project: &Project,
        label: &str,
        note: Option<&str>,
        auto_reason: Option<&str>,
        by: Option<&User>,
        progress: &dyn ProgressSink,
    ) -> Result<(Checkpoint, CheckpointTaken), CommandError> {
        let name = &project.name;
        let cost = self.vms.checkpoint(name, label, progress).await?;
        crate::fault::point("checkpoint-taken");
        let (n, l) = (name.clone(), label.to_owned());
        let (note, why) = (note.map(str::to_owned), auto_reason.map(str::to_owned));
        let (by, resources, app_port) = (by.map(|u| u.id), project.resources, project.app_port);
        let c = cost.clone();
        let row = self
            .store
            .write(move |tx| {
                repo::insert_checkpoint(
                    tx,
                    &repo::NewCheckpoint {
                        project: &n,
                        label: &l,
                        note: note.as_deref(),
                        auto_reason: why.as_deref(),
                        taken_by: by,
                        git_head: c.git_head.as_deref(),
                        disk_bytes: c.disk_bytes,
                        source_bytes: c.source_bytes,
                        disk_shared_bytes: c.disk_shared_bytes,
                        source_reflinked: c.reflinked,
                        resources,
                        app_port,
                    },
                )?;
                repo::checkpoint(tx, &n, &l)
            })
            .await?;
        let row = row.ok_or_else(|| {
            CommandError::NotFound(format!("{name} was removed while it was checkpointed"))
        })?;
        tracing::info!(project = %name, label, disk_bytes = cost.disk_bytes,
            source_bytes = cost.source_bytes, paused_ms = cost.paused_ms, "checkpoint taken");
        Ok((row, cost))
    }

    /// Removes a checkpoint's files, then its row.
    async fn drop_checkpoint(&self, name: &ProjectName, label: &str) -> Result<(), CommandError> {
        self.vms.remove_checkpoint(name, label).await?;
        let (n, l) = (name.clone(), label.to_owned());
        self.store
            .call(move |c| repo::delete_checkpoint(c, &n, &l))
            .await?;
        Ok(())
    }

    /// Past `checkpoint.keep`, removes the oldest automatic checkpoints;
    /// named ones stay, and the answer says so.
    async fn prune_checkpoints(&self, name: &ProjectName) -> Result<Vec<String>, CommandError> {
        let keep = usize::try_from(self.settings.checkpoint_keep.max(1)).unwrap_or(usize::MAX);
        let n = name.clone();
        let all = self
            .store
            .call(move |c| repo::checkpoints_of(c, &n))
            .await?;
        let mut count = all.len();
        let mut notes = Vec::new();
        for c in all.iter().filter(|c| c.auto_reason.is_some()) {
            if count <= keep {
                break;
            }
            self.drop_checkpoint(name, &c.label).await?;
            notes.push(format!(
                "removed the automatic checkpoint {} (more than {keep} kept)",
                c.label
            ));
            count -= 1;
        }
        if count > keep {
            notes.push(format!(
                "{name} has {count} checkpoints, more than the {keep} kept; named ones are never removed without asking: 'checkpoint rm {name} LABEL'"
            ));
        }
        Ok(notes)
    }
}

/// A project being made or removed has no disk to checkpoint.
fn not_busy(project: &Project) -> Result<(), CommandError> {
    if matches!(
        project.state,
        ProjectState::Creating | ProjectState::Destroying
    ) {
        return Err(CommandError::Conflict(format!(
            "{} is {}; try again when that is done",
            project.name, project.state
        )));
    }
    Ok(())
}
