//! `agent NAME TASK…`, `agent stop NAME`, `agents NAME`: a coding agent
//! run in a project's VM (as `dev` in `/workspace`, through the same way
//! in as `run`), after a checkpoint that undoes it.
//!
//! The agent is the project's own `.kennel/agent` (run with the task as
//! its one argument) or one the operator configured (`[agents.NAME]
//! command = ["…", "{task}"]`, the task replacing `{task}` inside one
//! word, never through a shell line). Its LLM requests go through the
//! metadata service, with the owner's key added on the host.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{Call, Executor};
use crate::command::SlugName;
use crate::guest::{GuestJob, RunEnd, TailSink};
use crate::model::{Project, UserId};
use crate::names::ProjectName;
use crate::outcome::{CommandError, Outcome, Reply};
use crate::store::repo;
use crate::vmstate::Actor;

/// The script in a project's source that is its own agent.
pub const AGENT_SCRIPT: &str = ".kennel/agent";
/// Agent runs one user may have going at once, over all projects.
pub const AGENTS_PER_USER: usize = 2;
/// The label prefix of the checkpoint before each run.
pub const AGENT_PREFIX: &str = "agent-";

/// The agent runs going now: one per project, with who asked and the
/// switch that stops it.
#[derive(Debug, Default)]
pub(crate) struct AgentRuns {
    by_project: Mutex<HashMap<ProjectName, (UserId, watch::Sender<bool>)>>,
}

/// Holds a project's run slot; frees it when dropped.
struct Slot<'a> {
    runs: &'a AgentRuns,
    project: ProjectName,
    stop: watch::Receiver<bool>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.runs
            .by_project
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.project);
    }
}

impl AgentRuns {
    fn begin(&self, project: &ProjectName, user: UserId) -> Result<Slot<'_>, CommandError> {
        let mut m = self
            .by_project
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.contains_key(project) {
            return Err(CommandError::Conflict(format!(
                "an agent runs in {project} already; wait for it, or 'agent stop {project}'"
            )));
        }
        if m.values().filter(|(u, _)| *u == user).count() >= AGENTS_PER_USER {
            return Err(CommandError::Refused(format!(
                "you have {AGENTS_PER_USER} agent runs going; wait for one to end or stop one with 'agent stop NAME'"
            )));
        }
        let (tx, rx) = watch::channel(false);
        m.insert(project.clone(), (user, tx));
        Ok(Slot {
            runs: self,
            project: project.clone(),
            stop: rx,
        })
    }

    fn stop(&self, project: &ProjectName) -> bool {
        let m = self
            .by_project
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.get(project).is_some_and(|(_, tx)| tx.send(true).is_ok())
    }
}

/// `word` with `{task}` replaced: still one argument.
fn fill(word: &str, task: &str) -> String {
    word.replace("{task}", task)
}

impl Executor {
    /// Which agent runs and how: (its name as shown, argv).
    fn agent_argv(
        &self,
        project: &Project,
        with: Option<&SlugName>,
        task: &str,
    ) -> Result<(String, Vec<String>), CommandError> {
        let configured = &self.settings().agents;
        let named = |n: &str| {
            configured
                .iter()
                .find(|(name, _)| name == n)
                .map(|(name, cmd)| (name.clone(), cmd.iter().map(|w| fill(w, task)).collect()))
        };
        let names = || {
            if configured.is_empty() {
                "none is configured".to_owned()
            } else {
                configured
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        if let Some(w) = with {
            return named(w.as_str()).ok_or_else(|| {
                CommandError::NotFound(format!("there is no agent '{w}' (configured: {})", names()))
            });
        }
        // The project's own agent: a file, looked at without following
        // links (the source is the user's).
        let own = std::fs::symlink_metadata(Path::new(&project.source_path).join(AGENT_SCRIPT))
            .is_ok_and(|m| m.is_file());
        if own {
            return Ok((
                AGENT_SCRIPT.to_owned(),
                vec![format!("./{AGENT_SCRIPT}"), task.to_owned()],
            ));
        }
        configured
            .first()
            .and_then(|(n, _)| named(n))
            .ok_or_else(|| {
                CommandError::NotFound(format!(
                    "{} has no {AGENT_SCRIPT} and no agent is configured: add an executable {AGENT_SCRIPT} to the source (it gets the task as its one argument), or ask an admin for an [agents.NAME] entry",
                    project.name
                ))
            })
    }

    /// `agent NAME [--with AGENT] TASK…`.
    pub(super) async fn agent_cmd(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        with: Option<&SlugName>,
        task: &str,
        timeout_secs: u64,
    ) -> Outcome {
        call.project(name)?;
        let user = call.user()?.clone();
        let shell = self.guest_shell()?;
        let project = self.project_now(name).await?;
        let (agent, argv) = self.agent_argv(&project, with, task)?;
        let slot = self.agent_runs.begin(name, user.id)?;
        // The run counts as use: idle stop leaves the VM running.
        let _in_use = self.presence(name);
        let actor = Actor::User {
            identity: call.who.clone(),
            user: user.clone(),
        };
        // The way back first: a checkpoint of disk and source.
        let label = {
            let _vm = self.lock_vm(name).await;
            let project = self.project_now(name).await?;
            self.check_checkpoint_quota(&project).await?;
            let label = self.free_label(name, AGENT_PREFIX).await?;
            let note = format!(
                "before agent {agent}: {}",
                task.chars().take(80).collect::<String>()
            );
            self.take_checkpoint(
                &project,
                &label,
                Some(&note),
                None,
                Some(&user),
                call.progress,
            )
            .await?;
            label
        };
        call.progress
            .output(format!("kennel: checkpoint {label} taken; starting {agent}\n").as_bytes());
        self.ensure_running(&actor, name, call.progress).await?;
        let (n, uid, a, t, l) = (
            name.clone(),
            user.id,
            agent.clone(),
            task.to_owned(),
            label.clone(),
        );
        let run_id = self
            .store
            .call(move |c| repo::insert_agent_run(c, &n, Some(uid), &a, &t, &l))
            .await?;
        tracing::info!(agent = %agent, label = %label, "agent run");
        let out = TailSink::new(Some(call.progress));
        let started = Instant::now();
        let timeout = Duration::from_secs(timeout_secs);
        let job = GuestJob { argv, timeout };
        let end = shell.run(name, &job, &out, slot.stop.clone()).await;
        let elapsed = started.elapsed();
        let stopped = *slot.stop.borrow();
        let (exit_code, signal, timed_out) = match &end {
            Ok(e) => super::run::ended(e, elapsed, timeout, stopped),
            Err(_) => (-1, None, false),
        };
        // What changed in the source, asked in the VM (never on the host:
        // a repository's config can name programs to run).
        let stat = TailSink::new(None);
        let diff_job = GuestJob {
            argv: ["git", "-c", "core.quotepath=off", "diff", "--stat", "HEAD"]
                .map(String::from)
                .to_vec(),
            timeout: Duration::from_secs(60),
        };
        let diff_end = shell
            .run(name, &diff_job, &stat, watch::channel(false).1)
            .await;
        let (diff_lines, _, _) = stat.finish();
        let diffstat = match diff_end {
            Ok(RunEnd::Exited(0)) => diff_lines,
            _ => Vec::new(),
        };
        // Counts land as answers end; a moment for the last one.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let summary = diffstat.last().cloned();
        let tokens = self
            .store
            .call(move |c| repo::finish_agent_run(c, run_id, exit_code, summary.as_deref()))
            .await?;
        drop(slot);
        end?;
        let (tail, cut, output_bytes) = out.finish();
        Ok(Reply::AgentRan {
            project: name.to_string(),
            agent,
            checkpoint: label,
            exit_code: if timed_out { 124 } else { exit_code },
            signal,
            timed_out,
            stopped,
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            tokens,
            diffstat,
            tail,
            cut,
            streamed: call.progress.streams_output(),
            output_bytes,
        })
    }

    /// `agent stop NAME`.
    pub(super) fn agent_stop(&self, call: &Call<'_>, name: &ProjectName) -> Outcome {
        call.project(name)?;
        Ok(Reply::AgentStopped {
            project: name.to_string(),
            was_running: self.agent_runs.stop(name),
        })
    }

    /// `agents NAME`.
    pub(super) async fn agents_cmd(&self, call: &Call<'_>, name: &ProjectName) -> Outcome {
        call.project(name)?;
        let n = name.clone();
        let runs = self
            .store
            .call(move |c| repo::agent_runs_of(c, &n, 50))
            .await?;
        Ok(Reply::AgentRuns {
            project: name.to_string(),
            runs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_task_fills_one_word_and_stays_one_argument() {
        assert_eq!(fill("{task}", "fix it; rm -rf /"), "fix it; rm -rf /");
        assert_eq!(fill("--message={task}", "a b"), "--message=a b");
        assert_eq!(fill("--yes", "a"), "--yes");
    }

    #[test]
    fn one_run_per_project_and_a_limit_per_user() {
        let r = AgentRuns::default();
        let (a, b, c) = (
            ProjectName::new("a").unwrap(),
            ProjectName::new("b").unwrap(),
            ProjectName::new("c").unwrap(),
        );
        let one = r.begin(&a, 1).unwrap();
        assert!(r.begin(&a, 2).is_err());
        let _two = r.begin(&b, 1).unwrap();
        assert!(matches!(r.begin(&c, 1), Err(CommandError::Refused(_))));
        assert!(r.stop(&a));
        assert!(*one.stop.borrow());
        drop(one);
        assert!(!r.stop(&a));
        assert!(r.begin(&a, 1).is_ok());
    }
}
