//! Share links: `share NAME --link`, `shares NAME`, `unshare NAME ID`, and
//! the gateway's side of them (redeeming a link, knowing its visitors).
//!
//! A link is a one-use secret (only its hash is stored) in a URL on the
//! project's own host (`https://NAME.DOMAIN/__kennel/link/TOKEN`, or a
//! port's host). Opening it shows a confirm page (so chat previews and
//! scanners cannot use it up); confirming redeems it and starts a link
//! session, a cookie for that host only. Every request of a link session
//! is checked against the link, so revoking or expiring it ends the
//! session at once. A link visitor has no account: no dashboard, no other
//! project, no other port.

use super::{Call, Executor};
use crate::gate::Gate;
use crate::model::{
    AuditOutcome, Frontend, Identity, LinkVisitor, Timestamp, MAX_LINKS_PER_PROJECT,
};
use crate::names::ProjectName;
use crate::outcome::{CommandError, Outcome, Reply};
use crate::store::{repo, StoreError};
use crate::web::{looks_like_token, new_token, token_hash};

impl Executor {
    /// `share NAME --link [--port P] [--expires D] [--note TEXT]`.
    pub(super) async fn share_link(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        port: Option<u16>,
        expires_secs: u64,
        note: Option<String>,
    ) -> Outcome {
        call.project(name)?;
        let by = call.user.map(|u| u.id);
        let token = new_token();
        let hash = token_hash(&token);
        let expires_at: Timestamp =
            crate::model::now().saturating_add(i64::try_from(expires_secs).unwrap_or(i64::MAX));
        let (n, nt) = (name.clone(), note.clone());
        let id = self
            .store
            .write(move |tx| {
                if repo::live_link_count(tx, &n)? >= MAX_LINKS_PER_PROJECT {
                    return Ok(Err(CommandError::Conflict(format!(
                        "{n} has {MAX_LINKS_PER_PROJECT} live share links, its limit; revoke some ('shares {n}' lists them, 'unshare {n} ID' revokes one)"
                    ))));
                }
                repo::add_share_link(tx, &n, &hash, port, nt.as_deref(), by, expires_at)
                    .map(Ok)
            })
            .await??;
        Ok(Reply::LinkCreated {
            project: name.to_string(),
            id,
            url: self.settings().urls().share_link(name, port, &token),
            port,
            expires_at,
            note,
        })
    }

    /// `shares NAME`: users it is shared with, and its live links.
    pub(super) async fn shares_cmd(&self, call: &Call<'_>, name: &ProjectName) -> Outcome {
        call.project(name)?;
        let n = name.clone();
        let (users, links) = self
            .store
            .call(move |c| Ok((repo::shares_of(c, &n)?, repo::share_links_of(c, &n)?)))
            .await?;
        Ok(Reply::Shares {
            project: name.to_string(),
            users,
            links,
        })
    }

    /// `unshare NAME ID`: revokes a link; its sessions end with it.
    pub(super) async fn unshare_link(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        id: i64,
    ) -> Outcome {
        call.project(name)?;
        let n = name.clone();
        if !self
            .store
            .call(move |c| repo::revoke_share_link(c, &n, id))
            .await?
        {
            return Err(CommandError::NotFound(format!(
                "{name} has no live share link {id}; 'shares {name}' lists them"
            )));
        }
        Ok(Reply::LinkRevoked {
            project: name.to_string(),
            id,
        })
    }
}

/// A link session just started: the cookie value (shown once) and whom
/// it lets in.
#[derive(Debug)]
pub struct LinkSession {
    pub token: String,
    pub visitor: LinkVisitor,
}

/// How the audit log names a link's visitor.
pub fn link_identity(link_id: i64) -> Identity {
    Identity::new(Frontend::Web, format!("link:{link_id}"))
}

impl Gate {
    /// Whom a live, unredeemed link would let in on the host of
    /// (`name`, `port`), without using it up (the confirm page).
    pub async fn peek_link(
        &self,
        token: &str,
        name: &ProjectName,
        port: Option<u16>,
    ) -> Result<Option<LinkVisitor>, StoreError> {
        if !looks_like_token(token) {
            return Ok(None);
        }
        let hash = token_hash(token);
        let v = self
            .store()
            .call(move |c| repo::share_link_target(c, &hash, false))
            .await?;
        Ok(v.filter(|v| &v.project == name && v.port == port))
    }

    /// Redeems a link on the host of (`name`, `port`) (a link for another
    /// project or port is refused, and not used up) and starts its
    /// session; audited.
    pub async fn redeem_link(
        &self,
        token: &str,
        name: &ProjectName,
        port: Option<u16>,
    ) -> Result<Option<LinkSession>, StoreError> {
        if self.peek_link(token, name, port).await?.is_none() {
            return Ok(None);
        }
        let hash = token_hash(token);
        let session = new_token();
        let session_hash = token_hash(&session);
        let visitor = self
            .store()
            .write(move |tx| {
                let Some(v) = repo::share_link_target(tx, &hash, true)? else {
                    return Ok(None);
                };
                repo::add_link_session(tx, &session_hash, v.link_id)?;
                Ok(Some(v))
            })
            .await?;
        let Some(visitor) = visitor else {
            return Ok(None);
        };
        self.exec
            .audit_entry(
                &link_identity(visitor.link_id),
                None,
                "link redeemed",
                Some(visitor.project.to_string()),
                AuditOutcome::Ok,
                None,
            )
            .await;
        Ok(Some(LinkSession {
            token: session,
            visitor,
        }))
    }

    /// Whom a link session cookie lets in on the host of (`name`,
    /// `port`): its link's project and port only, while the link lives.
    pub async fn link_visitor(
        &self,
        session: &str,
        name: &ProjectName,
        port: Option<u16>,
    ) -> Result<Option<LinkVisitor>, StoreError> {
        if !looks_like_token(session) {
            return Ok(None);
        }
        let hash = token_hash(session);
        let v = self
            .store()
            .call(move |c| repo::link_session_visitor(c, &hash))
            .await?;
        Ok(v.filter(|v| &v.project == name && v.port == port))
    }

    /// A page opened through a link: counted, and audited.
    pub async fn link_visited(&self, v: &LinkVisitor, path: &str) {
        let id = v.link_id;
        if let Err(e) = self.store().call(move |c| repo::link_visited(c, id)).await {
            tracing::warn!(error = %e, "cannot count a link visit");
        }
        self.exec
            .audit_entry(
                &link_identity(id),
                None,
                "link visit",
                Some(v.project.to_string()),
                AuditOutcome::Ok,
                Some(crate::redact::excerpt(path)),
            )
            .await;
    }
}

impl Gate {
    /// [`Gate::link_visitor`], with the project it lets into.
    pub async fn link_entry(
        &self,
        session: &str,
        name: &ProjectName,
        port: Option<u16>,
    ) -> Result<Option<(LinkVisitor, crate::model::Project)>, StoreError> {
        let Some(v) = self.link_visitor(session, name, port).await? else {
            return Ok(None);
        };
        let n = name.clone();
        let p = self
            .store()
            .call(move |c| repo::project_by_name(c, &n))
            .await?;
        Ok(p.map(|p| (v, p)))
    }
}
