//! Commands run in a project's VM (`run NAME COMMAND...`): the trait the
//! executor calls ([`GuestShell`], implemented over SSH by the gateway's
//! VM links), what a run ends with, and the bookkeeping of what runs now,
//! so `run stop` can end it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::names::ProjectName;

/// How a command in the guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// It exited with this status.
    Exited(i32),
    /// A signal ended it (its name, as sshd reports it: `TERM`, `KILL`).
    Signalled(String),
}

/// One command to run in a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestJob {
    /// The program and its arguments, as given (no shell in between).
    pub argv: Vec<String>,
    /// How long it may run; the guest ends it then (TERM, KILL 5 s later).
    pub timeout: Duration,
}

/// Why a command could not be run in a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// This Kennel has no way into VMs (no SSH gateway wired).
    #[error("this Kennel cannot run commands in VMs: {0}")]
    Unavailable(String),
    /// The VM's sshd could not be reached or refused the project key.
    #[error("cannot reach {project}'s VM: {message}")]
    Unreachable { project: String, message: String },
    /// A word of the command cannot be passed on (a NUL byte).
    #[error("{0}")]
    Invalid(String),
    /// The connection broke before the command's end was known.
    #[error("the connection to {project}'s VM broke before the command ended: {message}")]
    Lost { project: String, message: String },
}

/// Where a running command's output goes as it comes (stdout and stderr
/// together, in order of arrival).
pub trait OutputSink: Send + Sync {
    fn output(&self, bytes: &[u8]);
}

/// Runs commands in project VMs.
#[async_trait]
pub trait GuestShell: Send + Sync {
    /// Runs `job` in `project`'s (running) VM as `dev` in `/workspace`,
    /// sending its output to `out` as it comes, until it ends or `stop`
    /// turns true (then the guest ends it: TERM, KILL 5 s later).
    async fn run(
        &self,
        project: &ProjectName,
        job: &GuestJob,
        out: &dyn OutputSink,
        stop: watch::Receiver<bool>,
    ) -> Result<RunEnd, GuestError>;
}

/// A run's id and its stop switch.
type Switch = (u64, watch::Sender<bool>);

/// The commands running now, per project, each with its stop switch.
#[derive(Debug, Default)]
pub(crate) struct Running {
    next: std::sync::atomic::AtomicU64,
    by_project: Mutex<HashMap<ProjectName, Vec<Switch>>>,
}

/// A run's place in [`Running`]; leaving drops it from there.
pub(crate) struct RunTicket<'a> {
    running: &'a Running,
    project: ProjectName,
    id: u64,
    /// Turns true on `run stop`.
    pub stop: watch::Receiver<bool>,
}

impl Running {
    /// Records a run in `project`.
    pub(crate) fn enter(&self, project: &ProjectName) -> RunTicket<'_> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        self.by_project
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(project.clone())
            .or_default()
            .push((id, tx));
        RunTicket {
            running: self,
            project: project.clone(),
            id,
            stop: rx,
        }
    }

    /// Stops every run in `project`; returns how many there were.
    pub(crate) fn stop_all(&self, project: &ProjectName) -> usize {
        let map = self
            .by_project
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let runs = map.get(project).map(Vec::as_slice).unwrap_or_default();
        for (_, tx) in runs {
            let _ = tx.send(true);
        }
        runs.len()
    }
}

impl Drop for RunTicket<'_> {
    fn drop(&mut self) {
        let mut map = self
            .running
            .by_project
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(runs) = map.get_mut(&self.project) {
            runs.retain(|(id, _)| *id != self.id);
            if runs.is_empty() {
                map.remove(&self.project);
            }
        }
    }
}

/// A command's output as it comes: its tail kept for the answer, and all
/// of it passed on to `progress` when there is one.
pub(crate) struct TailSink<'a> {
    progress: Option<&'a dyn crate::provision::ProgressSink>,
    tail: Mutex<Tail>,
}

impl<'a> TailSink<'a> {
    pub(crate) fn new(progress: Option<&'a dyn crate::provision::ProgressSink>) -> Self {
        Self {
            progress,
            tail: Mutex::new(Tail::default()),
        }
    }

    /// The kept lines, whether lines before them were left out, and the
    /// bytes seen in all.
    pub(crate) fn finish(self) -> (Vec<String>, bool, u64) {
        let t = self
            .tail
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let total = t.total;
        let (lines, cut) = t.finish();
        (lines, cut, total)
    }
}

impl OutputSink for TailSink<'_> {
    fn output(&self, bytes: &[u8]) {
        self.tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(bytes);
        if let Some(p) = self.progress {
            p.output(bytes);
        }
    }
}

/// The last lines of a command's output, bounded in lines and bytes, for
/// the answer (chat shows these; SSH and the API stream all of it) and for
/// a chat's progress message: terminal control dropped, secrets redacted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    lines: std::collections::VecDeque<String>,
    partial: Vec<u8>,
    /// Bytes seen in all.
    pub total: u64,
    /// Whether lines were dropped from the front.
    pub cut: bool,
    max_lines: usize,
}

/// Lines of output an answer keeps.
pub const TAIL_LINES: usize = 30;
/// The longest line an answer keeps (longer ones are cut).
const TAIL_LINE_BYTES: usize = 400;

impl Default for Tail {
    fn default() -> Self {
        Self::new(TAIL_LINES)
    }
}

impl Tail {
    /// A tail that keeps the last `max_lines` lines.
    pub fn new(max_lines: usize) -> Self {
        Self {
            lines: std::collections::VecDeque::new(),
            partial: Vec::new(),
            total: 0,
            cut: false,
            max_lines,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.total = self.total.saturating_add(bytes.len() as u64);
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.partial);
                self.keep(line);
            } else if self.partial.len() < TAIL_LINE_BYTES {
                self.partial.push(b);
            }
        }
    }

    /// A line as shown: the last drawing of a '\r' redraw (progress
    /// bars), without colours or other terminal control, secrets redacted.
    fn clean(line: &[u8]) -> String {
        let text = String::from_utf8_lossy(line);
        let text = text.rsplit('\r').find(|s| !s.is_empty()).unwrap_or("");
        let mut plain = String::with_capacity(text.len());
        let mut escape = false;
        for c in text.chars() {
            if escape {
                // An escape sequence ends at its final letter (a title's
                // at a bell).
                escape = !c.is_ascii_alphabetic() && c != '~' && c != '\u{7}';
            } else if c == '\u{1b}' {
                escape = true;
            } else if !c.is_control() || c == '\t' {
                plain.push(c);
            }
        }
        crate::redact::redact(&plain).into_owned()
    }

    fn keep(&mut self, line: Vec<u8>) {
        self.lines.push_back(Self::clean(&line));
        if self.lines.len() > self.max_lines {
            self.lines.pop_front();
            self.cut = true;
        }
    }

    /// The last lines as they stand, the one being written included.
    pub fn lines_now(&self) -> Vec<String> {
        let mut all: Vec<String> = self.lines.iter().cloned().collect();
        if !self.partial.is_empty() {
            all.push(Self::clean(&self.partial));
        }
        let skip = all.len().saturating_sub(self.max_lines);
        all.split_off(skip)
    }

    /// The kept lines, an unfinished last line included.
    pub fn finish(mut self) -> (Vec<String>, bool) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.keep(line);
        }
        (self.lines.into(), self.cut)
    }
}

/// A guest for tests of the front ends: prints `guest says: WORDS`, and
/// exits 3 for `false`, 0 otherwise.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
pub struct EchoGuest;

#[cfg(any(test, feature = "testing"))]
#[async_trait]
impl GuestShell for EchoGuest {
    async fn run(
        &self,
        _project: &ProjectName,
        job: &GuestJob,
        out: &dyn OutputSink,
        _stop: watch::Receiver<bool>,
    ) -> Result<RunEnd, GuestError> {
        out.output(format!("guest says: {}\n", job.argv.join(" ")).as_bytes());
        Ok(RunEnd::Exited(
            if job.argv.first().map(String::as_str) == Some("false") {
                3
            } else {
                0
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_lines_and_an_unfinished_one() {
        let mut t = Tail::default();
        for i in 0..50 {
            t.push(format!("line {i}\n").as_bytes());
        }
        t.push(b"50 %\r100 %");
        let (lines, cut) = t.finish();
        assert!(cut);
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines.last().map(String::as_str), Some("100 %"));
        assert_eq!(lines.first().map(String::as_str), Some("line 21"));
    }

    #[test]
    fn run_stop_reaches_every_run_of_the_project_and_only_those() {
        let r = Running::default();
        let a = ProjectName::new("a").unwrap();
        let b = ProjectName::new("b").unwrap();
        let one = r.enter(&a);
        let two = r.enter(&a);
        let other = r.enter(&b);
        assert_eq!(r.stop_all(&a), 2);
        assert!(*one.stop.borrow() && *two.stop.borrow());
        assert!(!*other.stop.borrow());
        drop((one, two));
        assert_eq!(r.stop_all(&a), 0);
    }
}
