//! The local admin console: `kennel exec`, served by the daemon over its
//! control socket, or run in-process when no daemon holds the data dir.
//!
//! The protocol is JSON lines over a 0600 Unix socket: the client sends one
//! [`Request`]; the daemon answers with zero or more `progress` lines and
//! one `done` line. Whoever can open the socket is the local admin.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;

use anyhow::{Context, Result};
use kennel_core::model::Identity;
use kennel_core::names::UserName;
use kennel_core::outcome::CommandError;
use kennel_core::provision::{Progress, ProgressSink};
use kennel_core::{Answered, Executor, Format, Style};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

/// One console command.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub line: String,
    /// Run as this user instead of the local admin.
    #[serde(default)]
    pub as_user: Option<String>,
    /// Answer in JSON whatever the line says.
    #[serde(default)]
    pub json: bool,
}

/// A line of the daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Progress(Progress),
    /// A `run`'s output, as it came (lossy UTF-8).
    Output(String),
    Done {
        exit: i32,
        output: String,
    },
}

/// Runs a console request against an executor, through core's front door.
pub async fn run(exec: &Executor, req: &Request, progress: &dyn ProgressSink) -> (i32, String) {
    let style = Style {
        format: Format::Plain,
        force_json: req.json,
    };
    let who = Identity::local_console();
    let user = match &req.as_user {
        None => exec
            .local_admin()
            .await
            .map(Some)
            .map_err(CommandError::from),
        Some(name) => match UserName::new(name) {
            Ok(n) => exec.user_named(&n).await.map(Some),
            Err(e) => {
                let out: kennel_core::Outcome =
                    Err(CommandError::Usage(kennel_core::ParseError::Usage {
                        command: "exec --as",
                        problem: e.to_string(),
                    }));
                let a = Answered::new(out, style.force_json, style.format);
                return (a.exit, a.text);
            }
        },
    };
    let user = match user {
        Ok(u) => u,
        Err(e) => {
            let a = Answered::new(Err(e), style.force_json, style.format);
            return (a.exit, a.text);
        }
    };
    let a = exec
        .front_door(&who, Some(user), &req.line, style, progress)
        .await;
    (a.exit, a.text)
}

/// Progress printed on stderr (in-process `kennel exec`).
#[derive(Debug, Clone, Copy)]
pub struct StderrProgress;

impl ProgressSink for StderrProgress {
    fn report(&self, p: Progress) {
        eprintln!("… {p}");
    }

    fn output(&self, bytes: &[u8]) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(bytes);
        let _ = out.flush();
    }

    fn streams_output(&self) -> bool {
        true
    }
}

struct ChannelProgress(mpsc::UnboundedSender<Response>);

impl ProgressSink for ChannelProgress {
    fn report(&self, p: Progress) {
        let _ = self.0.send(Response::Progress(p));
    }

    fn output(&self, bytes: &[u8]) {
        let _ = self.0.send(Response::Output(
            String::from_utf8_lossy(bytes).into_owned(),
        ));
    }

    fn streams_output(&self) -> bool {
        true
    }
}

/// Serves the control socket until the task is dropped.
pub async fn serve(exec: Executor, path: &Path) -> Result<()> {
    // We hold the data-dir lock, so a socket file left here is stale.
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .context("cannot restrict the control socket to its owner")?;
    tracing::info!(socket = %path.display(), "control socket ready");
    loop {
        let (stream, _) = listener.accept().await.context("control socket accept")?;
        let exec = exec.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(exec, stream).await {
                tracing::warn!(error = %e, "control connection failed");
            }
        });
    }
}

async fn handle(exec: Executor, stream: tokio::net::UnixStream) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let Some(line) = lines.next_line().await? else {
        return Ok(());
    };
    let req: Request = serde_json::from_str(&line).context("bad control request")?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let worker = {
        let tx = tx.clone();
        tokio::spawn(async move {
            let (exit, output) = run(&exec, &req, &ChannelProgress(tx.clone())).await;
            let _ = tx.send(Response::Done { exit, output });
        })
    };
    drop(tx);
    while let Some(msg) = rx.recv().await {
        let mut s = serde_json::to_string(&msg)?;
        s.push('\n');
        write.write_all(s.as_bytes()).await?;
    }
    worker.await?;
    Ok(())
}

/// Sends a request to a running daemon. `Ok(None)` if no daemon listens.
pub fn call_daemon(socket: &Path, req: &Request) -> Result<Option<(i32, String)>> {
    let mut stream = match StdUnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e).with_context(|| format!("cannot connect to {}", socket.display())),
    };
    let mut s = serde_json::to_string(req)?;
    s.push('\n');
    stream.write_all(s.as_bytes())?;
    for line in BufReader::new(stream).lines() {
        match serde_json::from_str::<Response>(&line?)? {
            Response::Progress(p) => eprintln!("… {p}"),
            Response::Output(text) => {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
            }
            Response::Done { exit, output } => return Ok(Some((exit, output))),
        }
    }
    anyhow::bail!("the daemon closed the control connection without an answer")
}
