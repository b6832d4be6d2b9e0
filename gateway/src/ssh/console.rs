//! Command mode: `ssh HOST command`, the interactive prompt, and what an
//! unknown key may do (ask for access).

use kennel_core::command::Command;
use kennel_core::outcome::ErrorKind;
use kennel_core::{exit_code, render, Format};
use tokio::sync::mpsc;

use super::{unknown_key, Bridge, Op, Said, StderrSink, Who};

impl Bridge {
    /// An unknown key: only `request-access [note]`.
    pub(super) async fn unknown(&self, mut rx: mpsc::Receiver<Op>) -> u32 {
        let Who::Unknown { key, identity } = &self.who else {
            return 1;
        };
        match Self::request(&mut rx).await.0 {
            Some(Op::Exec(line)) => {
                let line = String::from_utf8_lossy(&line).trim().to_owned();
                let rest = line.strip_prefix("request-access").map(str::trim);
                match rest {
                    Some(_) if !self.shared.may_file_request(self.ip) => {
                        self.stdout(&format!(
                            "refused: this address has filed {} access requests in the last hour, its limit; wait, or ask an admin directly\r\n",
                            self.shared.settings.max_requests_per_ip
                        ))
                        .await;
                        exit_of(ErrorKind::RateLimited)
                    }
                    Some(note) => {
                        let cmd = Command::RequestAccess {
                            key: key.clone(),
                            note: (!note.is_empty()).then(|| note.to_owned()),
                        };
                        let out = self
                            .shared
                            .gate
                            .run(identity, None, cmd, &kennel_core::provision::NoProgress)
                            .await;
                        self.stdout(&format!(
                            "{}\r\n",
                            render(&out, Format::Plain).replace('\n', "\r\n")
                        ))
                        .await;
                        u32::try_from(exit_code(&out)).unwrap_or(1)
                    }
                    None => {
                        self.stderr(&unknown_key(self.shared.gate.settings())).await;
                        exit_of(ErrorKind::Refused)
                    }
                }
            }
            _ => {
                self.stderr(&unknown_key(self.shared.gate.settings())).await;
                exit_of(ErrorKind::Refused)
            }
        }
    }

    /// Runs one line of the command language for the user, through core's
    /// front door, with progress on the client's stderr.
    pub(super) async fn run_line(&self, line: &str) -> (String, u32) {
        let Who::Known { user, identity } = &self.who else {
            return (String::new(), 1);
        };
        let (sink, mut rx) = StderrSink::new();
        let work = self.shared.gate.front_door(
            identity,
            user.clone(),
            line,
            kennel_core::Style::PLAIN,
            &sink,
        );
        tokio::pin!(work);
        let answered = loop {
            tokio::select! {
                Some(said) = rx.recv() => match said {
                    Said::Progress(line) => self.stderr(&line).await,
                    Said::Output(bytes) => {
                        let _ = self.client.data_bytes(bytes).await;
                    }
                },
                a = &mut work => break a,
            }
        };
        (answered.text, u32::try_from(answered.exit).unwrap_or(1))
    }

    /// Command mode: one command (`ssh HOST projects`), or a prompt.
    pub(super) async fn console(&self, mut rx: mpsc::Receiver<Op>) -> u32 {
        let (req, pty) = Self::request(&mut rx).await;
        match req {
            Some(Op::Exec(line)) => {
                let (out, code) = self.run_line(String::from_utf8_lossy(&line).trim()).await;
                // Not a command, from a login name one typo away from a
                // project: the person meant the project.
                if code == 2 {
                    if let Some(hint) = self.near_miss().await {
                        self.stderr(&format!("{hint}\r\n")).await;
                        return exit_of(ErrorKind::NotFound);
                    }
                }
                self.stdout(&format!("{out}\n")).await;
                code
            }
            Some(Op::Shell) => {
                self.prompt(rx, pty).await;
                0
            }
            Some(Op::Subsystem(name)) => {
                let urls = self.shared.gate.settings().urls();
                self.stderr(&format!(
                    "the {name} subsystem is only available inside a project: {}\r\n",
                    urls.sftp("PROJECT")
                ))
                .await;
                exit_of(ErrorKind::Usage)
            }
            _ => 0,
        }
    }

    /// "there is no project 'demoo'; did you mean 'demo'?" when the login
    /// name is no project but close to one this user may enter.
    async fn near_miss(&self) -> Option<String> {
        let (Some(missing), Who::Known { user, .. }) = (&self.missing, &self.who) else {
            return None;
        };
        let near = self.shared.gate.near_project(user, missing).await?;
        let urls = self.shared.gate.settings().urls();
        Some(format!(
            "there is no project '{missing}'; did you mean '{near}'? ({})",
            urls.ssh_command(near.as_str())
        ))
    }

    /// An interactive prompt with line editing and history.
    pub(super) async fn prompt(&self, mut rx: mpsc::Receiver<Op>, pty: bool) {
        let nl = if pty { "\r\n" } else { "\n" };
        let name = match &self.who {
            Who::Known { user, .. } => user.name.to_string(),
            Who::Unknown { .. } => String::new(),
        };
        self.stdout(&format!(
            "Kennel — signed in as {name}. Type 'help', or 'exit' to leave.{nl}kennel> "
        ))
        .await;
        let mut line = String::new();
        // Bytes typed past the longest line the parser reads: counted, not kept.
        let mut dropped = 0usize;
        let mut history: Vec<String> = Vec::new();
        let mut pos = 0usize; // position in history when browsing
        let mut esc: Vec<u8> = Vec::new();
        while let Some(op) = rx.recv().await {
            let bytes = match op {
                Op::Data(b) => b,
                Op::Eof => return,
                _ => continue,
            };
            for b in bytes {
                if !esc.is_empty() || b == 0x1b {
                    esc.push(b);
                    if esc.len() == 3 {
                        let (up, down) = (esc == b"\x1b[A", esc == b"\x1b[B");
                        esc.clear();
                        if pty && (up || down) && !history.is_empty() {
                            pos = if up {
                                pos.saturating_sub(1)
                            } else {
                                (pos + 1).min(history.len())
                            };
                            line = history.get(pos).cloned().unwrap_or_default();
                            self.stdout(&format!("\r\x1b[Kkennel> {line}")).await;
                        }
                    }
                    continue;
                }
                match b {
                    b'\r' | b'\n' => {
                        if !pty && b == b'\r' {
                            continue;
                        }
                        self.stdout(nl).await;
                        let cmd = std::mem::take(&mut line);
                        if std::mem::take(&mut dropped) > 0 {
                            let e = kennel_core::ParseError::TooLong {
                                bytes: cmd.len() + dropped,
                            };
                            self.stdout(&format!("{e}{nl}kennel> ")).await;
                            continue;
                        }
                        let cmd = cmd.trim();
                        if cmd == "exit" || cmd == "quit" {
                            return;
                        }
                        if !cmd.is_empty() {
                            let (out, _) = self.run_line(cmd).await;
                            self.stdout(&format!(
                                "{}{nl}",
                                if pty { out.replace('\n', "\r\n") } else { out }
                            ))
                            .await;
                            history.push(cmd.to_owned());
                        }
                        pos = history.len();
                        self.stdout("kennel> ").await;
                    }
                    0x7f | 0x08 => {
                        // Erase on screen only what was really in the line.
                        let erased = line.pop().is_some();
                        if erased && pty {
                            self.stdout("\x08 \x08").await;
                        }
                    }
                    0x03 => {
                        line.clear();
                        dropped = 0;
                        self.stdout(&format!("^C{nl}kennel> ")).await;
                    }
                    0x04 if line.is_empty() => return,
                    c if c >= 0x20 && line.len() >= kennel_core::command::MAX_LINE_BYTES => {
                        dropped += 1;
                    }
                    c if c >= 0x20 => {
                        line.push(char::from(c));
                        if pty {
                            self.stdout(&char::from(c).to_string()).await;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The exit status of a session that ended with an error of `kind`.
fn exit_of(kind: ErrorKind) -> u32 {
    u32::try_from(kind.exit_code()).unwrap_or(1)
}
