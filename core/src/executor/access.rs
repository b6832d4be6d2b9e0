//! Who people are and how they get in: whoami, users, SSH keys, access
//! requests and their decisions, and keeping each VM's keys in step.

use super::{identity_hint, Call, Event, Executor, MAX_REQUEST_NOTE_CHARS};
use crate::command::QuotaChange;
use crate::keys::{Fingerprint, PublicKey};
use crate::model::{RequestState, Role, User};
use crate::names::{ProjectName, UserName};
use crate::outcome::{CommandError, Outcome, QuotaLine, Reply, UserSummary};
use crate::provision::ProvisionError;
use crate::store::repo;
use crate::store::StoreError;

impl Executor {
    pub(super) async fn whoami(&self, call: &Call<'_>) -> Outcome {
        let user = match call.user {
            Some(u) => Some(self.summary(u.clone()).await?),
            None => None,
        };
        Ok(Reply::Whoami {
            identity: call.who.clone(),
            user,
        })
    }

    pub(super) async fn users(&self) -> Outcome {
        let users = self.store.call(|c| repo::list_users(c)).await?;
        let mut out = Vec::with_capacity(users.len());
        for u in users {
            out.push(self.summary(u).await?);
        }
        Ok(Reply::Users { users: out })
    }

    /// `quota [USER] [--projects N] [--cpus N] [--memory SIZE] [--disk
    /// SIZE]`: without a user, an admin sees everyone's and a member
    /// their own; a change (admins, policy checked) sets the user's own
    /// limits, `default` handing one back to the role.
    pub(super) async fn quota(
        &self,
        call: &Call<'_>,
        user: Option<UserName>,
        change: QuotaChange,
    ) -> Outcome {
        let me = call.user()?.clone();
        // (The parser wants a user with a change.)
        let name = match user {
            Some(u) => Some(u),
            None if call.is_admin() => None,
            None => Some(me.name.clone()),
        };
        let changed = !change.is_empty();
        let quotas = self
            .store
            .write(move |tx| {
                let users = match &name {
                    Some(n) => match repo::user_by_name(tx, n)? {
                        Some(u) => vec![u],
                        None => {
                            return Ok(Err(CommandError::NotFound(format!(
                                "there is no user '{n}'; see 'users'"
                            ))))
                        }
                    },
                    None => repo::list_users(tx)?,
                };
                if changed {
                    for u in &users {
                        repo::set_user_quota(tx, u.id, &change)?;
                    }
                }
                let mut out = Vec::with_capacity(users.len());
                for u in users {
                    let (quota, personal) = repo::quota_of(tx, u.id, u.role)?;
                    out.push(QuotaLine {
                        usage: repo::usage_of(tx, u.id)?,
                        user: u.name.to_string(),
                        quota,
                        personal,
                    });
                }
                Ok(Ok(out))
            })
            .await??;
        Ok(Reply::Quotas { quotas, changed })
    }

    /// `user rename FROM TO`: the name changes, nothing else (identities,
    /// keys, projects, shares and secrets hang on the user's id); the
    /// provisioner moves what it keeps by name (the deploy key).
    pub(super) async fn user_rename(&self, from: &UserName, to: &UserName) -> Outcome {
        let (a, b) = (from.clone(), to.clone());
        let renamed = self
            .store
            .write(move |tx| {
                if repo::user_by_name(tx, &b)?.is_some() {
                    return Ok(Err(CommandError::Conflict(format!(
                        "there is a user named {b} already; pick another name"
                    ))));
                }
                if repo::user_by_name(tx, &a)?.is_none() {
                    return Ok(Err(CommandError::NotFound(format!(
                        "there is no user '{a}'; see 'users'"
                    ))));
                }
                repo::rename_user(tx, &a, &b)?;
                Ok(Ok(()))
            })
            .await?;
        renamed?;
        self.vms.rename_user(from, to).await?;
        Ok(Reply::UserRenamed {
            from: from.to_string(),
            to: to.to_string(),
        })
    }

    pub(super) async fn keys(&self, call: &Call<'_>, target: Option<UserName>) -> Outcome {
        let user = call.user;
        let u = self.target_user(user, target).await?;
        let id = u.id;
        let keys = self.store.call(move |c| repo::keys_of(c, id)).await?;
        Ok(Reply::Keys {
            user: u.name.to_string(),
            keys,
        })
    }

    pub(super) async fn key_add(
        &self,
        call: &Call<'_>,
        key: PublicKey,
        label: Option<String>,
        target: Option<UserName>,
    ) -> Outcome {
        let user = call.user;
        let u = self.target_user(user, target).await?;
        let fp = key.fingerprint().clone();
        let added = self
            .store
            .write(move |tx| repo::add_key(tx, u.id, &key, label.as_deref()))
            .await;
        match added {
            Ok(key) => {
                self.sync_access(self.ssh_projects_of(u.id).await).await;
                Ok(Reply::KeyAdded { key })
            }
            Err(StoreError::AlreadyExists { .. }) => Err(CommandError::Conflict(format!(
                "key {fp} is registered to another user; each key belongs to one person"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn key_rm(&self, call: &Call<'_>, fingerprint: &Fingerprint) -> Outcome {
        let (user, is_admin) = (call.user, call.is_admin());
        let me = user.map(|u| u.name.clone());
        let fp = fingerprint.clone();
        let revoked = self
            .store
            .write(move |tx| {
                match repo::key_by_fingerprint(tx, &fp)? {
                    Some(k) if is_admin || Some(&k.user) == me.as_ref() => {}
                    _ => return Ok(None),
                }
                repo::revoke_key(tx, &fp)
            })
            .await?;
        match revoked {
            Some(key) => {
                let holder = key.user.clone();
                let uid = self
                    .store
                    .call(move |c| repo::user_by_name(c, &holder))
                    .await?
                    .map(|u| u.id);
                if let Some(uid) = uid {
                    self.sync_access(self.ssh_projects_of(uid).await).await;
                }
                Ok(Reply::KeyRevoked { key })
            }
            None => Err(CommandError::NotFound(format!(
                "you have no key {fingerprint}; see 'keys'"
            ))),
        }
    }

    /// Files an access request for `key` (refused past the limits).
    pub(super) async fn request_access(
        &self,
        call: &Call<'_>,
        key: PublicKey,
        note: Option<String>,
    ) -> Outcome {
        let user = call.user;
        if let Some(n) = &note {
            let chars = n.chars().count();
            if chars > MAX_REQUEST_NOTE_CHARS {
                return Err(CommandError::Refused(format!(
                    "the note is {chars} characters long; keep it to {MAX_REQUEST_NOTE_CHARS} (say who you are and why)"
                )));
            }
        }
        let who2 = call.who.clone();
        let uid = user.map(|u| u.id);
        let me = user.map(|u| u.name.clone());
        let (max_pending, per_hour) = (
            self.settings.max_pending_requests,
            self.settings.max_requests_per_hour,
        );
        let r = self
            .store
            .write(move |tx| {
                // Already asked: the same request, whatever the limits.
                let (pending, recent, mine) = repo::request_counts(tx, key.fingerprint(), 3600)?;
                if !mine {
                    if pending >= max_pending {
                        return Ok(Err(format!(
                            "{pending} access requests are already waiting for an admin; Kennel takes no more until some are decided. Try again later"
                        )));
                    }
                    if recent >= per_hour {
                        return Ok(Err(format!(
                            "Kennel took {recent} access requests in the last hour, its limit; try again in an hour"
                        )));
                    }
                }
                if let Some(k) = repo::key_by_fingerprint(tx, key.fingerprint())? {
                    if Some(&k.user) == me.as_ref()
                        && k.state == crate::model::KeyState::Active
                    {
                        return Ok(Err(format!(
                            "key {} already gives you access; nothing to request",
                            k.fingerprint
                        )));
                    }
                    if Some(&k.user) != me.as_ref() {
                        return Ok(Err(format!(
                            "key {} is already registered; if it is yours, just use it",
                            k.fingerprint
                        )));
                    }
                }
                repo::file_request(tx, &who2, uid, &key, note.as_deref()).map(Ok)
            })
            .await?;
        match r {
            Ok((request, new)) => {
                if new {
                    tracing::info!(request = request.id, "access request filed");
                    let _ = self.events.send(Event::AccessRequested(request.clone()));
                }
                Ok(Reply::RequestFiled { request, new })
            }
            Err(msg) => Err(CommandError::Conflict(msg)),
        }
    }

    pub(super) async fn requests(&self, all: bool) -> Outcome {
        let requests = self
            .store
            .call(move |c| repo::list_requests(c, all))
            .await?;
        Ok(Reply::Requests { requests })
    }

    pub(super) async fn summary(&self, user: User) -> Result<UserSummary, StoreError> {
        let id = user.id;
        let (identities, keys) = self
            .store
            .call(move |c| Ok((repo::identities_of(c, id)?, repo::keys_of(c, id)?)))
            .await?;
        Ok(UserSummary {
            user,
            identities,
            active_keys: keys
                .iter()
                .filter(|k| k.state == crate::model::KeyState::Active)
                .count(),
        })
    }

    pub(super) async fn target_user(
        &self,
        me: Option<&User>,
        target: Option<UserName>,
    ) -> Result<User, CommandError> {
        match target {
            None => me
                .cloned()
                .ok_or_else(|| CommandError::Refused("Kennel does not know you yet".into())),
            Some(t) => {
                let n = t.clone();
                self.store
                    .call(move |c| repo::user_by_name(c, &n))
                    .await?
                    .ok_or_else(|| CommandError::NotFound(format!("there is no user '{t}'")))
            }
        }
    }

    /// Re-installs the keys of everyone with SSH access in each project's VM,
    /// after access changed (so a revoked key stops working at once).
    pub(crate) async fn sync_access(&self, projects: Vec<ProjectName>) {
        for p in projects {
            let keys = match self.authorized_keys(&p).await {
                Ok(k) => k,
                Err(e) => {
                    tracing::error!(project = %p, error = %e, "cannot read the keys to install");
                    continue;
                }
            };
            match self.vms.sync_keys(&p, &keys).await {
                Ok(()) | Err(ProvisionError::Unavailable(_)) => {}
                Err(e) => {
                    tracing::error!(project = %p, error = %e, "could not update the VM's keys; they apply at its next start")
                }
            }
        }
    }

    /// Projects a user reaches over SSH.
    pub(super) async fn ssh_projects_of(&self, user: crate::model::UserId) -> Vec<ProjectName> {
        self.store
            .call(move |c| repo::ssh_projects_of(c, user))
            .await
            .unwrap_or_default()
    }

    pub(super) async fn decide(
        &self,
        call: &Call<'_>,
        id: i64,
        state: RequestState,
        reason: Option<String>,
        name: Option<UserName>,
    ) -> Outcome {
        let me = call.user()?.clone();
        let result = self
            .store
            .write(move |tx| {
                let Some(req) = repo::request_by_id(tx, id)? else {
                    return Ok(Err(CommandError::NotFound(format!("there is no access request #{id}; see 'requests'"))));
                };
                if req.state != RequestState::Pending {
                    let by = req.decided_by.as_ref().map_or("someone".to_owned(), ToString::to_string);
                    return Ok(Err(CommandError::Conflict(format!(
                        "request #{id} was already {} by {by}; nothing changed",
                        req.state
                    ))));
                }
                let mut granted_to = None;
                if state == RequestState::Approved {
                    let user = match repo::user_by_identity(tx, &req.identity)? {
                        Some(u) => u,
                        None => {
                            let name = match &name {
                                Some(n) if repo::user_by_name(tx, n)?.is_some() => {
                                    return Ok(Err(CommandError::Conflict(format!(
                                        "there is a user named {n} already; pick another name, or have {n} add this key with 'key add'"
                                    ))))
                                }
                                Some(n) => n.clone(),
                                None => {
                                    let seen = repo::identity_name(tx, &req.identity)?;
                                    repo::free_user_name(
                                        tx,
                                        identity_hint(
                                            &req.identity,
                                            &req.openssh,
                                            seen.as_deref(),
                                        ),
                                    )?
                                }
                            };
                            let u = repo::create_user(tx, &name, Role::Member)?;
                            repo::link_identity(tx, &req.identity, u.id)?;
                            u
                        }
                    };
                    let key = crate::keys::PublicKey::parse(&req.openssh)?;
                    match repo::add_key(tx, user.id, &key, None) {
                        Ok(_) => {}
                        Err(StoreError::AlreadyExists { .. }) => {
                            return Ok(Err(CommandError::Conflict(format!(
                                "key {} of request #{id} was registered to another user meanwhile; deny this request",
                                req.fingerprint
                            ))))
                        }
                        Err(e) => return Err(e),
                    }
                    granted_to = Some(user);
                }
                repo::decide_request(tx, id, state, me.id, reason.as_deref(), granted_to.as_ref().map(|u| u.id))?;
                let req = repo::request_by_id(tx, id)?.ok_or(StoreError::Invalid {
                    what: "a request vanished while being decided".into(),
                })?;
                Ok(Ok((req, granted_to.map(|u| u.name.to_string()))))
            })
            .await??;
        let (request, user) = result;
        tracing::info!(request = request.id, state = %request.state, "access request decided");
        let _ = self.events.send(Event::RequestDecided(request.clone()));
        if let Some(u) = &user {
            let n = UserName::new(u).ok();
            let uid = match n {
                Some(n) => self
                    .store
                    .call(move |c| repo::user_by_name(c, &n))
                    .await?
                    .map(|u| u.id),
                None => None,
            };
            if let Some(uid) = uid {
                self.sync_access(self.ssh_projects_of(uid).await).await;
            }
        }
        Ok(Reply::Decided { request, user })
    }
}
