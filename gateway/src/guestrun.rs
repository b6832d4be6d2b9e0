//! `run NAME COMMAND...` in a VM: [`kennel_core::guest::GuestShell`] over
//! the pooled SSH connection into each VM (`dev`, the project key, the
//! VM's pinned host key).
//!
//! The command's words travel as one exec request that the guest's shell
//! reads: each word is quoted (`shell-words`), so it arrives as given,
//! whatever it holds. The guest's coreutils `timeout` bounds it (TERM,
//! then KILL 5 s later), so a time limit holds even if Kennel goes away;
//! `run stop` and a caller who leaves send that `timeout` a TERM over a
//! second channel, by the pid the wrapper reports first on stderr.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kennel_core::guest::{GuestError, GuestJob, GuestShell, OutputSink, RunEnd};
use kennel_core::names::ProjectName;
use russh::{client, ChannelMsg};
use tokio::sync::watch;

use crate::vmlink::{Upstream, VmLinks};

/// What the wrapper writes to stderr before the command starts.
const PID_MARK: &[u8] = b"\x1ekennel-run ";

/// The line the guest's shell runs for `job`: the login environment
/// (PATH from profiles, quietly), `/workspace`, the pid, then the command
/// under `timeout`.
pub fn command_line(job: &GuestJob) -> Result<String, GuestError> {
    if job.argv.iter().any(|w| w.contains('\0')) {
        return Err(GuestError::Invalid(
            "a word of the command holds a NUL byte".into(),
        ));
    }
    let words = shell_words::join(&job.argv);
    Ok(format!(
        ". /etc/profile >/dev/null 2>&1; [ -r \"$HOME/.profile\" ] && . \"$HOME/.profile\" >/dev/null 2>&1; \
         cd /workspace || exit 125; printf '\\036kennel-run %s\\n' \"$$\" >&2; \
         exec timeout -k 5s -- {}s {words}",
        job.timeout.as_secs().max(1)
    ))
}

/// Sends TERM to the guest's `timeout` (which passes it on) over a
/// channel of its own.
async fn terminate(h: Arc<client::Handle<Upstream>>, pid: u32) {
    let Ok(ch) = h.channel_open_session().await else {
        return;
    };
    let _ = ch.exec(true, format!("kill -TERM {pid}")).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut ch = ch;
        while ch.wait().await.is_some() {}
    })
    .await;
}

/// Ends the guest's command if the run is dropped before it ended (the
/// caller went away).
struct EndOnDrop {
    handle: Arc<client::Handle<Upstream>>,
    pid: Option<u32>,
    ended: bool,
}

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        if let (false, Some(pid)) = (self.ended, self.pid) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(terminate(self.handle.clone(), pid));
            }
        }
    }
}

fn sig_name(s: &russh::Sig) -> String {
    match s {
        russh::Sig::Custom(n) => n.clone(),
        other => format!("{other:?}"),
    }
}

#[async_trait]
impl GuestShell for VmLinks {
    async fn run(
        &self,
        project: &ProjectName,
        job: &GuestJob,
        out: &dyn OutputSink,
        mut stop: watch::Receiver<bool>,
    ) -> Result<RunEnd, GuestError> {
        let line = command_line(job)?;
        let unreachable = |message: String| GuestError::Unreachable {
            project: project.to_string(),
            message,
        };
        let lost = |message: String| GuestError::Lost {
            project: project.to_string(),
            message,
        };
        // The pooled connection, made again once if it died.
        let mut handle = self
            .upstream(project)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut ch = match handle.channel_open_session().await {
            Ok(c) => c,
            Err(_) => {
                self.forget(project);
                handle = self
                    .upstream(project)
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
                handle
                    .channel_open_session()
                    .await
                    .map_err(|e| unreachable(e.to_string()))?
            }
        };
        ch.exec(true, line)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut guard = EndOnDrop {
            handle: handle.clone(),
            pid: None,
            ended: false,
        };
        // stderr up to the pid line; after it, stderr is the command's.
        let mut head: Option<Vec<u8>> = Some(Vec::new());
        let mut end: Option<RunEnd> = None;
        // `run stop` asked (the TERM goes once the pid is known), and
        // whether the switch is still worth watching.
        let (mut stop_asked, mut watching) = (false, true);
        // The guest's `timeout` ends it; this is for a guest that hangs.
        let grace = Duration::from_secs(30);
        let deadline = tokio::time::sleep(job.timeout + grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                msg = ch.wait() => match msg {
                    Some(ChannelMsg::Data { data }) => out.output(&data),
                    Some(ChannelMsg::ExtendedData { data, .. }) => match head.as_mut() {
                        None => out.output(&data),
                        Some(buf) => {
                            buf.extend_from_slice(&data);
                            if !buf.starts_with(PID_MARK) && !PID_MARK.starts_with(buf) {
                                // No wrapper line (it failed early): all output.
                                out.output(buf);
                                head = None;
                            } else if let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                                let (first, rest) = buf.split_at(nl + 1);
                                guard.pid = std::str::from_utf8(first)
                                    .ok()
                                    .and_then(|l| l.get(PID_MARK.len()..))
                                    .and_then(|p| p.trim().parse().ok());
                                if !rest.is_empty() {
                                    out.output(rest);
                                }
                                head = None;
                                if let (true, Some(pid)) = (stop_asked, guard.pid) {
                                    tokio::spawn(terminate(handle.clone(), pid));
                                }
                            }
                        }
                    },
                    Some(ChannelMsg::ExitStatus { exit_status }) => {
                        end = Some(RunEnd::Exited(i32::try_from(exit_status).unwrap_or(255)));
                    }
                    Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                        end = Some(RunEnd::Signalled(sig_name(&signal_name)));
                    }
                    Some(_) => {}
                    None => break,
                },
                changed = stop.changed(), if watching => {
                    watching = false;
                    if changed.is_ok() && *stop.borrow() {
                        stop_asked = true;
                        if let Some(pid) = guard.pid {
                            tokio::spawn(terminate(handle.clone(), pid));
                        }
                    }
                }
                () = &mut deadline => {
                    return Err(lost(format!(
                        "it had not ended {} s after its time limit",
                        grace.as_secs()
                    )));
                }
            }
        }
        guard.ended = end.is_some();
        end.ok_or_else(|| lost("the channel closed without an exit status".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_arrive_as_given() {
        let argv = ["sh", "-c", "echo $HOME; rm -rf '/' \"x\"", "--json", "a\\b"];
        let job = GuestJob {
            argv: argv.iter().map(|w| (*w).to_owned()).collect(),
            timeout: Duration::from_secs(600),
        };
        let line = command_line(&job).unwrap();
        let words = line.split("-- 600s ").nth(1).unwrap();
        // A real shell reads them back word for word.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf '[%s]' {words}"))
            .output()
            .unwrap();
        let want: String = argv.iter().map(|w| format!("[{w}]")).collect();
        assert_eq!(String::from_utf8_lossy(&out.stdout), want);
        let nul = GuestJob {
            argv: vec!["a\0b".into()],
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(command_line(&nul), Err(GuestError::Invalid(_))));
    }
}
