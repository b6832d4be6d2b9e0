//! Running external programs (apt-get, dpkg-deb, mmdebstrap, mkfs.ext4,
//! qemu-img) behind a small trait, so builders can be tested with a fake
//! that records calls and injects failures.
//!
//! Arguments are passed as a vector, never through a shell.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A program to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<OsString>,
    pub cwd: Option<PathBuf>,
    pub env: Vec<(String, String)>,
}

impl Cmd {
    /// A command with no arguments yet.
    pub fn new(program: &str) -> Self {
        Self {
            program: program.to_owned(),
            args: Vec::new(),
            cwd: None,
            env: Vec::new(),
        }
    }

    /// Adds one argument.
    #[must_use]
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Adds arguments.
    #[must_use]
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, it: I) -> Self {
        self.args.extend(it.into_iter().map(Into::into));
        self
    }

    /// Runs in `dir`.
    #[must_use]
    pub fn cwd(mut self, dir: &Path) -> Self {
        self.cwd = Some(dir.to_owned());
        self
    }

    /// Sets an environment variable.
    #[must_use]
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    /// `program arg arg ...`, for logs and errors.
    pub fn display(&self) -> String {
        let mut s = self.program.clone();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
}

/// Why a program did not run to success.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start {program}; is it installed? (kennel doctor says how)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        /// The last lines of its standard error.
        stderr: String,
    },
}

/// What a successful run printed.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// Runs programs to completion.
pub trait Runner: Send + Sync {
    /// Runs `cmd`, failing if it exits non-zero.
    fn run(&self, cmd: &Cmd) -> Result<Output, RunError>;
}

/// Runs real processes.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemRunner;

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines
        .get(lines.len().saturating_sub(n)..)
        .unwrap_or_default()
        .join("\n")
}

impl Runner for SystemRunner {
    fn run(&self, cmd: &Cmd) -> Result<Output, RunError> {
        let mut c = Command::new(&cmd.program);
        c.args(&cmd.args);
        if let Some(d) = &cmd.cwd {
            c.current_dir(d);
        }
        for (k, v) in &cmd.env {
            c.env(k, v);
        }
        tracing::debug!(command = %cmd.display(), "running");
        let out = c.output().map_err(|source| RunError::Spawn {
            program: cmd.program.clone(),
            source,
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(RunError::Failed {
                command: cmd.display(),
                status: out.status.to_string(),
                stderr: tail(&stderr, 15),
            });
        }
        Ok(Output { stdout, stderr })
    }
}

/// A runner for tests: records commands, answers from a script.
#[derive(Debug, Default)]
pub struct FakeRunner {
    pub calls: std::sync::Mutex<Vec<String>>,
    /// (substring of the command line, stdout to answer, or Err(stderr) to fail)
    pub script: Vec<(String, Result<String, String>)>,
}

impl Runner for FakeRunner {
    fn run(&self, cmd: &Cmd) -> Result<Output, RunError> {
        let line = cmd.display();
        if let Ok(mut c) = self.calls.lock() {
            c.push(line.clone());
        }
        match self.script.iter().find(|(k, _)| line.contains(k.as_str())) {
            Some((_, Ok(out))) => Ok(Output {
                stdout: out.clone(),
                stderr: String::new(),
            }),
            Some((_, Err(e))) => Err(RunError::Failed {
                command: line,
                status: "exit status: 1".into(),
                stderr: e.clone(),
            }),
            None => Ok(Output::default()),
        }
    }
}
