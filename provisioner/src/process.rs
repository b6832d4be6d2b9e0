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
    /// A file its standard input reads (none: empty input).
    pub stdin: Option<PathBuf>,
}

impl Cmd {
    /// A command with no arguments yet.
    pub fn new(program: &str) -> Self {
        Self {
            program: program.to_owned(),
            args: Vec::new(),
            cwd: None,
            env: Vec::new(),
            stdin: None,
        }
    }

    /// Reads standard input from `file`.
    #[must_use]
    pub fn stdin_file(self, file: &Path) -> Self {
        self.with_stdin(Some(file))
    }

    /// Reads standard input from `file`, if there is one.
    #[must_use]
    pub fn with_stdin(mut self, file: Option<&Path>) -> Self {
        self.stdin = file.map(Path::to_owned);
        self
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
    #[error("cannot read {path} as the input of {program}: {source}")]
    Input {
        program: String,
        path: PathBuf,
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

    /// Like [`Runner::run`], but calls `on_line` with each line the
    /// program writes to standard error as it writes it, so a long build
    /// can say what it is doing. The default reports nothing until done.
    fn run_lines(&self, cmd: &Cmd, on_line: &mut dyn FnMut(&str)) -> Result<Output, RunError> {
        let out = self.run(cmd)?;
        out.stderr.lines().for_each(&mut *on_line);
        Ok(out)
    }
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

impl SystemRunner {
    #[allow(unsafe_code)]
    fn command(cmd: &Cmd) -> Command {
        let mut c = Command::new(&cmd.program);
        c.args(&cmd.args);
        if let Some(d) = &cmd.cwd {
            c.current_dir(d);
        }
        for (k, v) in &cmd.env {
            c.env(k, v);
        }
        // A build (mmdebstrap, apt-get) must not outlive the daemon that
        // asked for it: a re-parented mmdebstrap went on for 20 s and left
        // its mounts behind. SIGTERM lets it run its own cleanup.
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches
        // no memory of the parent; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::TERM,
                ))
                .map_err(std::io::Error::from)
            });
        }
        c
    }

    /// The standard input `cmd` asks for: its file, or nothing.
    fn stdin_of(cmd: &Cmd) -> Result<std::process::Stdio, RunError> {
        match &cmd.stdin {
            None => Ok(std::process::Stdio::null()),
            Some(path) => std::fs::File::open(path)
                .map(std::process::Stdio::from)
                .map_err(|source| RunError::Input {
                    program: cmd.program.clone(),
                    path: path.clone(),
                    source,
                }),
        }
    }

    fn finish(
        cmd: &Cmd,
        status: std::process::ExitStatus,
        stdout: String,
        stderr: String,
    ) -> Result<Output, RunError> {
        if !status.success() {
            return Err(RunError::Failed {
                command: cmd.display(),
                status: status.to_string(),
                stderr: tail(&stderr, 15),
            });
        }
        Ok(Output { stdout, stderr })
    }
}

impl Runner for SystemRunner {
    fn run(&self, cmd: &Cmd) -> Result<Output, RunError> {
        tracing::debug!(command = %cmd.display(), "running");
        let out = Self::command(cmd)
            .stdin(Self::stdin_of(cmd)?)
            .output()
            .map_err(|source| RunError::Spawn {
                program: cmd.program.clone(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        Self::finish(cmd, out.status, stdout, stderr)
    }

    fn run_lines(&self, cmd: &Cmd, on_line: &mut dyn FnMut(&str)) -> Result<Output, RunError> {
        use std::io::{BufRead, Read};
        use std::process::Stdio;
        tracing::debug!(command = %cmd.display(), "running");
        let spawn = |source| RunError::Spawn {
            program: cmd.program.clone(),
            source,
        };
        let mut child = Self::command(cmd)
            .stdin(Self::stdin_of(cmd)?)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn)?;
        // Standard output is drained on its own thread so a chatty program
        // cannot block on a full pipe while we read its standard error.
        let out_reader = child.stdout.take().map(|mut o| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = o.read_to_end(&mut v);
                String::from_utf8_lossy(&v).into_owned()
            })
        });
        let mut stderr = String::new();
        if let Some(err) = child.stderr.take() {
            let mut r = std::io::BufReader::new(err);
            let mut buf = Vec::new();
            while r.read_until(b'\n', &mut buf).map_err(spawn)? > 0 {
                let line = String::from_utf8_lossy(&buf);
                on_line(line.trim_end());
                stderr.push_str(&line);
                buf.clear();
            }
        }
        let status = child.wait().map_err(spawn)?;
        let stdout = out_reader.and_then(|t| t.join().ok()).unwrap_or_default();
        Self::finish(cmd, status, stdout, stderr)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_command_reads_its_input_file_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.txt");
        std::fs::write(&input, "from a file\n").unwrap();
        let out = SystemRunner
            .run(&Cmd::new("cat").stdin_file(&input))
            .unwrap();
        assert_eq!(out.stdout, "from a file\n");
        let mut lines = Vec::new();
        let out = SystemRunner
            .run_lines(&Cmd::new("cat").stdin_file(&input), &mut |l| {
                lines.push(l.to_owned());
            })
            .unwrap();
        assert_eq!(out.stdout, "from a file\n");
        // No input file: empty input, never the daemon's own.
        assert_eq!(SystemRunner.run(&Cmd::new("cat")).unwrap().stdout, "");
        let e = SystemRunner
            .run(&Cmd::new("cat").stdin_file(&dir.path().join("gone")))
            .unwrap_err();
        assert!(e.to_string().contains("gone"), "{e}");
    }
}
