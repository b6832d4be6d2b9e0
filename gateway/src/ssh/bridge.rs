//! Project mode: one client session bridged to the VM's sshd, after the
//! VM is woken (progress on stderr); requests are replayed in order.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kennel_core::model::{Identity, User};
use kennel_core::names::ProjectName;
use kennel_core::policy::Entry;
use kennel_core::Actor;
use russh::{client, Channel, ChannelMsg};
use tokio::sync::mpsc;

use super::{Bridge, Op, Said, StderrSink, Target, ToVm, Who};

impl Bridge {
    pub(super) async fn run(self, rx: mpsc::Receiver<Op>, to_vm: Arc<ToVm>) {
        let span = self.span.clone();
        let _e = span.enter();
        let code = match (&self.who, self.target.clone(), self.refusal.clone()) {
            (_, _, Some(why)) => {
                self.stderr(&format!("{}\r\n", why.message)).await;
                Some(u32::try_from(why.kind.exit_code()).unwrap_or(1))
            }
            (Who::Unknown { .. }, _, _) => Some(self.unknown(rx).await),
            (Who::Known { .. }, Target::Console, _) => Some(self.console(rx).await),
            (Who::Known { user, identity }, Target::Project(p), _) => {
                let (user, identity) = (user.clone(), identity.clone());
                self.project(&user, &identity, &p, rx, &to_vm).await
            }
        };
        // None: the remote process ended by a signal, already passed on.
        if let Some(code) = code {
            let _ = self.client.exit_status(code).await;
        }
        let _ = self.client.eof().await;
        let _ = self.client.close().await;
    }

    pub(super) async fn stdout(&self, text: &str) {
        let _ = self.client.data_bytes(text.as_bytes().to_vec()).await;
    }

    pub(super) async fn stderr(&self, text: &str) {
        let _ = self
            .client
            .extended_data_bytes(1, text.as_bytes().to_vec())
            .await;
    }

    /// Waits for the session's request (shell, exec, subsystem), remembering a pty.
    pub(super) async fn request(rx: &mut mpsc::Receiver<Op>) -> (Option<Op>, bool) {
        let mut pty = false;
        while let Some(op) = rx.recv().await {
            match op {
                Op::Pty { .. } => pty = true,
                Op::Shell | Op::Exec(_) | Op::Subsystem(_) => return (Some(op), pty),
                _ => {}
            }
        }
        (None, pty)
    }

    /// Project mode: bridge everything to the VM's sshd. `None` when the
    /// remote process ended by a signal (passed on as such).
    pub(super) async fn project(
        &self,
        user: &User,
        identity: &Identity,
        p: &ProjectName,
        mut rx: mpsc::Receiver<Op>,
        direct: &ToVm,
    ) -> Option<u32> {
        if let Err(e) = self.shared.gate.may_enter(Some(user), p, Entry::Ssh).await {
            self.stderr(&format!("{e}\r\n")).await;
            return Some(exit_of(&e));
        }
        // Requests up to the session's own (shell, exec, subsystem) decide
        // the connection: a forwarded agent needs one of its own.
        let mut early = Vec::new();
        while let Some(op) = rx.recv().await {
            let done = matches!(op, Op::Shell | Op::Exec(_) | Op::Subsystem(_));
            early.push(op);
            if done {
                break;
            }
        }
        if early.is_empty() {
            return Some(0);
        }
        let wants_agent = early.iter().any(|o| matches!(o, Op::Agent));
        // In use from here until the session ends (idle stop).
        let _here = self.shared.gate.presence(p);
        // A stopped VM is started, with progress on stderr.
        let (sink, mut lines) = StderrSink::new();
        let actor = Actor::User {
            identity: identity.clone(),
            user: user.clone(),
        };
        let start = self.shared.gate.wake(&actor, p, &sink);
        tokio::pin!(start);
        let started = loop {
            tokio::select! {
                Some(said) = lines.recv() => if let Said::Progress(l) = said {
                    self.stderr(&l).await;
                },
                o = &mut start => break o,
            }
        };
        if let Err(e) = started {
            self.stderr(&format!("cannot start {p}: {e}\r\n")).await;
            return Some(exit_of(&e));
        }
        let up = match self.open_upstream(p, wants_agent).await {
            Ok(c) => c,
            Err(e) => {
                self.stderr(&format!("cannot open a session in {p}: {e}\r\n"))
                    .await;
                return Some(1);
            }
        };
        let _open = super::metrics::ChannelGauge::open("session");
        let (mut up_read, up_write) = up.split();
        let up_write = Arc::new(up_write);
        let from_vm_bytes = super::metrics::from_vm();
        let client = &self.client;
        let session = &self.session;
        let id = self.id;
        // VM → client.
        let from_vm = async {
            let mut code = Some(0u32);
            while let Some(msg) = up_read.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        from_vm_bytes.increment(data.len() as u64);
                        let _ = client.data_bytes(data).await;
                    }
                    ChannelMsg::ExtendedData { data, ext } => {
                        from_vm_bytes.increment(data.len() as u64);
                        let _ = client.extended_data_bytes(ext, data).await;
                    }
                    ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status),
                    ChannelMsg::ExitSignal {
                        signal_name,
                        core_dumped,
                        error_message,
                        lang_tag,
                    } => {
                        let _ = session
                            .exit_signal_request(
                                id,
                                signal_name,
                                core_dumped,
                                error_message,
                                lang_tag,
                            )
                            .await;
                        code = None;
                    }
                    ChannelMsg::Eof => {
                        let _ = client.eof().await;
                    }
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            code
        };
        // Client → VM: what came before the session request, then the rest.
        let to_vm = async {
            let mut early = early.into_iter();
            loop {
                let op = match early.next() {
                    Some(op) => op,
                    None => {
                        // Every request before the session's own is
                        // replayed: the client's data may go straight.
                        let _ = direct.channel.set(up_write.clone());
                        match rx.recv().await {
                            Some(op) => op,
                            None => break,
                        }
                    }
                };
                let r = match op {
                    Op::Pty {
                        term,
                        cols,
                        rows,
                        px,
                        py,
                        modes,
                    } => {
                        up_write
                            .request_pty(false, &term, cols, rows, px, py, &modes)
                            .await
                    }
                    Op::Env(k, v) => up_write.set_env(false, k, v).await,
                    Op::Shell => up_write.request_shell(false).await,
                    Op::Exec(c) => up_write.exec(false, c).await,
                    Op::Subsystem(s) => up_write.request_subsystem(false, s).await,
                    Op::Data(d) => {
                        direct.bytes.increment(d.len() as u64);
                        let r = up_write.data_bytes(d).await;
                        direct.queued.fetch_sub(1, Ordering::AcqRel);
                        r
                    }
                    Op::Window { cols, rows, px, py } => {
                        up_write.window_change(cols, rows, px, py).await
                    }
                    Op::Signal(s) => up_write.signal(s).await,
                    Op::Eof => up_write.eof().await,
                    Op::Agent => up_write.agent_forward(false).await,
                };
                if r.is_err() {
                    break;
                }
            }
            // The client closed its channel.
            let _ = up_write.close().await;
        };
        tokio::pin!(to_vm);
        tokio::pin!(from_vm);
        tokio::select! {
            code = &mut from_vm => code,
            () = &mut to_vm => from_vm.await,
        }
    }

    /// A session channel in the VM: on the pooled connection, or on one of
    /// its own when the client forwards its agent (the VM's sshd opens agent
    /// channels per connection, so they must lead back to this client).
    pub(super) async fn open_upstream(
        &self,
        p: &ProjectName,
        agent: bool,
    ) -> Result<Channel<client::Msg>, String> {
        if agent {
            let handle = self
                .shared
                .connect(p, Some(self.session.clone()))
                .await
                .map_err(|e| e.to_string())?;
            return handle
                .channel_open_session()
                .await
                .map_err(|e| e.to_string());
        }
        let upstream = self.shared.upstream(p).await.map_err(|e| e.to_string())?;
        match upstream.channel_open_session().await {
            Ok(c) => Ok(c),
            Err(_) => {
                // The pooled connection may have died with its VM: once more.
                self.shared.forget(p).await;
                let upstream = self.shared.upstream(p).await.map_err(|e| e.to_string())?;
                upstream
                    .channel_open_session()
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// The exit status of a session Kennel ended itself, from core's one
/// mapping ([`kennel_core::outcome::ErrorKind::exit_code`]).
fn exit_of(e: &kennel_core::CommandError) -> u32 {
    u32::try_from(e.kind().exit_code()).unwrap_or(1)
}
