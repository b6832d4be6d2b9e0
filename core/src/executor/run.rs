//! `resize`, `run` and `run stop`: changing a project's VM and running
//! a command in it.

use std::time::{Duration, Instant};

use super::{Call, Executor};
use crate::command::Size;
use crate::guest::{GuestError, GuestJob, RunEnd, TailSink};
use crate::model::{ProjectState, Resources};
use crate::names::ProjectName;
use crate::outcome::{CommandError, Outcome, Reply};
use crate::policy;
use crate::provision::{ProvisionError, Stage};
use crate::store::repo;
use crate::vmstate::Actor;

/// A signal's number from the name sshd reports (`TERM`), as shells
/// count exit codes (128 + it); 0 when unknown.
fn signal_number(name: &str) -> i32 {
    match name.trim_start_matches("SIG") {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "ABRT" => 6,
        "FPE" => 8,
        "KILL" => 9,
        "USR1" => 10,
        "SEGV" => 11,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        _ => 0,
    }
}

/// How a command in the guest ended, as a shell counts it: the exit code
/// (128 + the signal's number for a signal), the signal, and whether the
/// time limit ended it (`timeout` in the guest answers 124, or 137 when
/// it had to KILL).
pub(super) fn ended(
    end: &RunEnd,
    elapsed: Duration,
    timeout: Duration,
    stopped: bool,
) -> (i32, Option<String>, bool) {
    let (exit_code, signal) = match end {
        RunEnd::Exited(c) => (*c, None),
        RunEnd::Signalled(s) => (128 + signal_number(s), Some(s.clone())),
    };
    let timed_out = !stopped
        && elapsed + Duration::from_millis(500) >= timeout
        && matches!(exit_code, 124 | 137);
    (exit_code, signal, timed_out)
}

/// A word of a command as a shell would take it back: bare when plain,
/// else in single quotes.
fn shown(w: &str) -> String {
    let plain = !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        w.to_owned()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

impl Executor {
    /// `resize NAME [--cpus N] [--memory SIZE] [--disk SIZE]`.
    pub(super) async fn resize(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        cpus: Option<u32>,
        memory: Option<Size>,
        disk: Option<Size>,
    ) -> Outcome {
        call.project(name)?;
        let _vm = self.lock_vm(name).await;
        let p = self.project_now(name).await?;
        if matches!(p.state, ProjectState::Creating | ProjectState::Destroying) {
            return Err(CommandError::Conflict(format!(
                "{name} is {}; try again when that is done",
                p.state
            )));
        }
        let before = p.resources;
        let after = Resources {
            vcpus: cpus.unwrap_or(before.vcpus),
            memory_mib: memory.map_or(before.memory_mib, |s| s.mib),
            disk_mib: disk.map_or(before.disk_mib, |s| s.mib),
        };
        if after.disk_mib < before.disk_mib {
            return Err(ProvisionError::Invalid {
                stage: Stage::Disk,
                message: format!(
                    "disks only grow: {name}'s is {}, and shrinking it would cut off its filesystem; keep --disk at {} or more",
                    Size { mib: before.disk_mib },
                    Size { mib: before.disk_mib },
                ),
            }
            .into());
        }
        if after == before {
            return Ok(self.resized(&p, before, after, Default::default()));
        }
        // The owner's quota, with this project counted at its new size;
        // an admin's word goes past it, as an admin's `new project` does.
        if !call.is_admin() {
            let owner = p.owner.clone();
            self.store
                .call(move |c| {
                    let Some(u) = repo::user_by_name(c, &owner)? else {
                        return Ok(Ok(()));
                    };
                    let (quota, _) = repo::quota_of(c, u.id, u.role)?;
                    let mut usage = repo::usage_of(c, u.id)?;
                    usage.projects = usage.projects.saturating_sub(1);
                    usage.vcpus = usage.vcpus.saturating_sub(before.vcpus);
                    usage.memory_mib = usage.memory_mib.saturating_sub(before.memory_mib);
                    usage.disk_mib = usage.disk_mib.saturating_sub(before.disk_mib);
                    Ok(policy::check_quota(&quota, &usage, &after))
                })
                .await??;
        }
        let done = self.vms.resize(name, &after).await?;
        let (n, port) = (name.clone(), p.app_port);
        self.store
            .call(move |c| repo::set_shape(c, &n, after, port))
            .await?;
        tracing::info!(
            vcpus = after.vcpus,
            memory_mib = after.memory_mib,
            disk_mib = after.disk_mib,
            disk_now = done.disk_now,
            "resized"
        );
        Ok(self.resized(&p, before, after, done))
    }

    fn resized(
        &self,
        p: &crate::model::Project,
        before: Resources,
        after: Resources,
        done: crate::provision::ResizedVm,
    ) -> Reply {
        let running = p.state == ProjectState::Running;
        Reply::Resized {
            project: p.name.to_string(),
            before,
            after,
            disk_now: done.disk_now,
            restart_needed: running
                && ((before.vcpus != after.vcpus && !done.cpus_now)
                    || (before.memory_mib != after.memory_mib && !done.memory_now)),
            running,
        }
    }

    /// `run NAME COMMAND...`: wakes the VM if it sleeps, runs the command
    /// as `dev` in `/workspace`, streams its output to the asker.
    pub(super) async fn run_cmd(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        argv: Vec<String>,
        timeout_secs: u64,
    ) -> Outcome {
        call.project(name)?;
        let user = call.user()?.clone();
        let shell = self.guest_shell()?;
        // The command counts as use: idle stop leaves the VM running.
        let _in_use = self.presence(name);
        let actor = Actor::User {
            identity: call.who.clone(),
            user,
        };
        self.ensure_running(&actor, name, call.progress).await?;
        let ticket = self.running.enter(name);
        let timeout = Duration::from_secs(timeout_secs);
        let job = GuestJob {
            argv: argv.clone(),
            timeout,
        };
        let out = TailSink::new(Some(call.progress));
        let started = Instant::now();
        tracing::info!(program = argv.first().map_or("", String::as_str), "run");
        let end = shell.run(name, &job, &out, ticket.stop.clone()).await?;
        let elapsed = started.elapsed();
        let stopped = *ticket.stop.borrow();
        drop(ticket);
        let (exit_code, signal, timed_out) = ended(&end, elapsed, timeout, stopped);
        let (tail, cut, total) = out.finish();
        Ok(Reply::Ran {
            project: name.to_string(),
            command: argv.iter().map(|w| shown(w)).collect::<Vec<_>>().join(" "),
            exit_code: if timed_out { 124 } else { exit_code },
            signal,
            timed_out,
            stopped,
            tail,
            cut,
            streamed: call.progress.streams_output(),
            output_bytes: total,
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// The way into VMs, once the SSH gateway is wired.
    pub(super) fn guest_shell(
        &self,
    ) -> Result<std::sync::Arc<dyn crate::guest::GuestShell>, GuestError> {
        self.guest
            .get()
            .cloned()
            .ok_or_else(|| GuestError::Unavailable("no SSH gateway runs to reach them".into()))
    }

    /// `run stop NAME`.
    pub(super) fn run_stop(&self, call: &Call<'_>, name: &ProjectName) -> Outcome {
        call.project(name)?;
        Ok(Reply::RunStopped {
            project: name.to_string(),
            count: self.running.stop_all(name),
        })
    }

    /// Wires the way into VMs that `run` uses (the SSH gateway's VM
    /// links); set once, after the gateway is made.
    pub fn set_guest_shell(&self, shell: std::sync::Arc<dyn crate::guest::GuestShell>) {
        let _ = self.guest.set(shell);
    }
}

#[cfg(test)]
mod tests {
    use super::signal_number;

    #[test]
    fn commands_show_as_a_shell_reads_them() {
        assert_eq!(super::shown("--release"), "--release");
        assert_eq!(super::shown("a b"), "'a b'");
        assert_eq!(super::shown("it's"), "'it'\\''s'");
        assert_eq!(super::shown(""), "''");
    }

    #[test]
    fn signals_count_as_shells_count_them() {
        assert_eq!(signal_number("TERM"), 15);
        assert_eq!(signal_number("SIGKILL"), 9);
        assert_eq!(signal_number("WINCH"), 0);
    }
}
