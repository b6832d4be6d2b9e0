//! russh's server handler: authentication (fail closed), channel opens,
//! and the per-channel queue. Handlers only decide, enqueue and reply; the
//! work happens in each channel's bridge task.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kennel_core::keys::{Fingerprint, PublicKey};
use kennel_core::model::{Frontend, Identity};
use kennel_core::names::ProjectName;
use kennel_core::policy::Entry;
use kennel_core::provision::NoProgress;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, Pty, Sig};
use tokio::sync::mpsc;

use super::{splice, Bridge, Conn, Op, Queue, Target, ToVm, Who};

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    /// Sent before authentication: the one place a refused client can be
    /// told why (OpenSSH prints it), instead of a bare "Permission denied".
    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        let s = &self.shared.settings;
        if self.too_many {
            return Ok(Some(format!(
                "Kennel: too many connections from your address (the limit is {}); close some and try again.\r\n",
                s.max_connections_per_ip
            )));
        }
        if self.blocked() {
            return Ok(Some(format!(
                "Kennel: too many failed sign-ins from your address (the limit is {} per 10 minutes); wait and try again.\r\n",
                s.max_auth_failures_per_ip
            )));
        }
        Ok(None)
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.too_many || self.blocked() {
            tracing::warn!(session = self.id, ip = ?self.ip, "refused: too many connections or failed attempts");
            return Ok(Auth::reject());
        }
        let fp = Fingerprint::of(key.public_key);
        let identity = Identity::new(Frontend::Ssh, fp.as_str());
        let found = match self.shared.gate.user_by_key(&fp).await {
            Ok(u) => u,
            Err(e) => {
                // Fail closed: no store, no entry.
                tracing::error!(session = self.id, error = %e, "key lookup failed; refusing");
                self.failed_auth();
                return Ok(Auth::reject());
            }
        };
        // `ssh PROJECT@HOST` enters a project; any other name is the console.
        if let Ok(name) = ProjectName::new(user) {
            match self.shared.gate.project_exists(&name).await {
                Ok(true) => self.target = Target::Project(name),
                Ok(false) => self.missing = Some(name),
                Err(_) => return Ok(Auth::reject()),
            }
        }
        match found {
            Some(u) => {
                if let Ok(mut c) = self.shared.counters.lock() {
                    let n = c.per_user.entry(u.name.to_string()).or_default();
                    *n += 1;
                    if *n > self.shared.settings.max_connections_per_user {
                        // Signed in, so the session can say why before it ends.
                        self.refusal = Some(super::Refusal {
                            kind: kennel_core::outcome::ErrorKind::RateLimited,
                            message: format!(
                                "you have too many connections open (the limit is {}); close some and try again",
                                self.shared.settings.max_connections_per_user
                            ),
                        });
                    }
                }
                if let Target::Project(p) = &self.target {
                    if let Err(e) = self.shared.gate.may_enter(Some(&u), p, Entry::Ssh).await {
                        self.refusal = Some(super::Refusal {
                            kind: e.kind(),
                            message: e.to_string(),
                        });
                    }
                }
                self.who = Some(Who::Known { user: u, identity });
            }
            None => {
                // Declined, so an agent's next key is tried (the
                // registered one is often not the first); remembered in
                // case none is registered.
                let Ok(openssh) = key.public_key.to_openssh() else {
                    return Ok(Auth::reject());
                };
                match PublicKey::parse(&openssh) {
                    Ok(pk) => {
                        if self.proven_unknown.is_none() {
                            self.proven_unknown = Some((pk, identity));
                        }
                    }
                    Err(_) => self.failed_auth(),
                }
                return Ok(Auth::Reject {
                    proceed_with_methods: Some(super::auth_methods()),
                    partial_success: false,
                });
            }
        }
        Ok(Auth::Accept)
    }

    /// Reached when every key the client offered was declined: a client
    /// that proved it holds one (unknown) key gets the restricted
    /// request-access session with it; anyone else is refused.
    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        _user: &str,
        _submethods: &str,
        _response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        if self.too_many || self.blocked() {
            return Ok(Auth::reject());
        }
        match self.proven_unknown.take() {
            Some((key, identity)) => {
                self.who = Some(Who::Unknown { key, identity });
                Ok(Auth::Accept)
            }
            None => {
                self.failed_auth();
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        let span = self.span();
        let _e = span.enter();
        tracing::info!("ssh session authenticated");
        if let (Some(Who::Known { user, identity }), Target::Project(p), None) =
            (&self.who, &self.target, &self.refusal)
        {
            self.shared
                .gate
                .record_login(identity, user, p.as_str(), "ssh login")
                .await;
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(who) = self.who.clone() else {
            return Ok(());
        };
        let id = channel.id();
        // Requests arrive through the handler methods; the channel's own
        // message queue is not read, and dropping it keeps it from filling.
        let (read, write) = channel.split();
        drop(read);
        let (tx, rx) = mpsc::channel(64);
        let to_vm = Arc::new(ToVm::new());
        self.channels.insert(
            id,
            Queue {
                ops: tx,
                to_vm: to_vm.clone(),
            },
        );
        let bridge = Bridge {
            shared: self.shared.clone(),
            ip: self.ip,
            who,
            target: self.target.clone(),
            missing: self.missing.clone(),
            refusal: self.refusal.clone(),
            client: write,
            session: _session.handle(),
            id,
            span: self.span(),
        };
        tokio::spawn(bridge.run(rx, to_vm));
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        orig_addr: &str,
        orig_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(Who::Known { user, identity }) = self.who.clone() else {
            return Ok(());
        };
        let shared = self.shared.clone();
        let (host, orig_addr) = (host.to_owned(), orig_addr.to_owned());
        // Answered from a task of its own: waking a stopped VM takes
        // seconds, and the connection's other channels go on meanwhile.
        match self.target.clone() {
            // `ssh -L` inside a project: forwarded by the VM's sshd.
            Target::Project(p) if self.refusal.is_none() => {
                tokio::spawn(async move {
                    let _here = match shared.wake(&identity, &user, &p, &NoProgress).await {
                        Ok(here) => here,
                        Err(e) => {
                            tracing::warn!(project = %p, error = %e, "cannot start the VM for a forward");
                            return;
                        }
                    };
                    let upstream = match shared.upstream(&p).await {
                        Ok(u) => u,
                        Err(e) => {
                            tracing::warn!(project = %p, error = %e, "cannot reach the VM for a forward");
                            return;
                        }
                    };
                    let Ok(up) = upstream
                        .channel_open_direct_tcpip(host, port, orig_addr, orig_port)
                        .await
                    else {
                        return;
                    };
                    reply.accept().await;
                    splice("direct-tcpip", channel.into_stream(), up.into_stream()).await;
                });
            }
            // `ssh -J HOST project`: a raw path to the project's sshd.
            Target::Console => {
                let Ok(p) = ProjectName::new(&host) else {
                    return Ok(());
                };
                if port != 22 {
                    tracing::info!(project = %host, user = %user.name, "refused a jump");
                    return Ok(());
                }
                tokio::spawn(async move {
                    let _here = match shared.wake(&identity, &user, &p, &NoProgress).await {
                        Ok(here) => here,
                        Err(e) => {
                            tracing::info!(project = %p, user = %user.name, error = %e, "refused a jump");
                            return;
                        }
                    };
                    let Ok(Some(route)) = shared.gate.reach(&p).await else {
                        return;
                    };
                    let Ok(tcp) = tokio::net::TcpStream::connect(&route.ssh_addr).await else {
                        return;
                    };
                    reply.accept().await;
                    splice("jump", channel.into_stream(), tcp).await;
                });
            }
            Target::Project(_) => {}
        }
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // VS Code Remote-SSH forwards to a Unix socket in the VM.
        let (Target::Project(p), None, Some(Who::Known { user, identity })) =
            (self.target.clone(), &self.refusal, self.who.clone())
        else {
            return Ok(());
        };
        let shared = self.shared.clone();
        let socket_path = socket_path.to_owned();
        tokio::spawn(async move {
            let _here = match shared.wake(&identity, &user, &p, &NoProgress).await {
                Ok(here) => here,
                Err(e) => {
                    tracing::warn!(project = %p, error = %e, "cannot start the VM for a forward");
                    return;
                }
            };
            let Ok(upstream) = shared.upstream(&p).await else {
                return;
            };
            let Ok(up) = upstream.channel_open_direct_streamlocal(socket_path).await else {
                return;
            };
            reply.accept().await;
            splice(
                "direct-streamlocal",
                channel.into_stream(),
                up.into_stream(),
            )
            .await;
        });
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let op = Op::Pty {
            term: term.to_owned(),
            cols: col_width,
            rows: row_height,
            px: pix_width,
            py: pix_height,
            modes: modes.to_vec(),
        };
        self.push(channel, op, session).await
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.push(channel, Op::Env(name.to_owned(), value.to_owned()), session)
            .await
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.push(channel, Op::Shell, session).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.push(channel, Op::Exec(data.to_vec()), session).await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.push(channel, Op::Subsystem(name.to_owned()), session)
            .await
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send(
            channel,
            Op::Window {
                cols: col_width,
                rows: row_height,
                px: pix_width,
                py: pix_height,
            },
        )
        .await;
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send(channel, Op::Signal(signal)).await;
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Only a bridged session's bytes are this handler's to carry. russh
        // calls this for every channel; a jump's or a forward's bytes reach
        // its channel's stream through russh, so nothing is copied here.
        let Some(q) = self.channels.get(&channel) else {
            return Ok(());
        };
        let to_vm = &q.to_vm;
        if to_vm.queued.load(Ordering::Acquire) == 0 {
            if let Some(vm) = to_vm.channel.get() {
                // Errors end the bridge from the VM's side (its
                // channel closes), as they would through the queue.
                to_vm.bytes.increment(data.len() as u64);
                let _ = vm.data_bytes(data.to_vec()).await;
                return Ok(());
            }
        }
        to_vm.queued.fetch_add(1, Ordering::AcqRel);
        self.send(channel, Op::Data(data.to_vec())).await;
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send(channel, Op::Eof).await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Dropping the queue ends the bridge, which closes upstream.
        self.channels.remove(&channel);
        Ok(())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // Relayed only inside projects (there is nothing to sign for in
        // command mode).
        if matches!(self.target, Target::Project(_)) && self.refusal.is_none() {
            Ok(self.send(channel, Op::Agent).await)
        } else {
            Ok(false)
        }
    }

    async fn tcpip_forward(
        &mut self,
        _address: &str,
        _port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(false)
    }
}

impl Conn {
    /// Queues a request and tells the client it was accepted.
    pub(super) async fn push(
        &mut self,
        channel: ChannelId,
        op: Op,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        if self.send(channel, op).await {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    pub(super) async fn send(&mut self, channel: ChannelId, op: Op) -> bool {
        match self.channels.get(&channel) {
            // Bounded: a fast uploader waits for the VM instead of filling memory.
            Some(q) => q.ops.send(op).await.is_ok(),
            None => false,
        }
    }
}
