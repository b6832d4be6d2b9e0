//! Web sign-in: one-time login links (from the `login` command), one-time
//! hand-over codes (from Kennel's host to a project's host), and session
//! cookies, one per host. Secrets are 256 random bits, shown once; the
//! store keeps only their SHA-256, so a copy of the database signs nobody
//! in. HTTP API tokens (`token create`) are the same kind of secret.

use sha2::{Digest, Sha256};

use crate::executor::{Call, Executor};
use crate::gate::Gate;
use crate::model::User;
use crate::outcome::{CommandError, Outcome, Reply};
use crate::store::repo;
use crate::store::StoreError;

/// How long a login link works.
pub const LOGIN_LINK_SECS: i64 = 600;
/// How long a hand-over code works (it is used by a redirect at once).
pub const HANDOFF_SECS: i64 = 60;
/// How long a web session lasts.
pub const SESSION_SECS: i64 = 7 * 24 * 3600;

/// A new secret: 32 random bytes as 64 hex digits.
pub fn new_token() -> String {
    use rand::RngExt;
    let bytes: [u8; 32] = rand::rng().random();
    hex(&bytes)
}

/// What the store keeps of a secret.
pub fn token_hash(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

/// The SHA-256 of `bytes`, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// Whether `s` looks like one of Kennel's secrets (checked before any
/// store lookup, so junk costs nothing).
pub fn looks_like_token(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Executor {
    /// `login`: a one-time link to sign a browser in.
    pub(crate) async fn login(&self, call: &Call<'_>) -> Outcome {
        let user = call.user()?.clone();
        let token = new_token();
        let (hash, host) = (token_hash(&token), self.settings().domain.clone());
        let expires = crate::model::now() + LOGIN_LINK_SECS;
        self.store
            .call(move |c| repo::add_web_link(c, &hash, "login", user.id, &host, expires))
            .await?;
        Ok(Reply::LoginLink {
            url: self.settings().urls().login(&token),
            minutes: LOGIN_LINK_SECS / 60,
        })
    }

    /// `logout`: signs every browser of the caller out.
    pub(crate) async fn logout(&self, call: &Call<'_>) -> Outcome {
        let uid = call.user()?.id;
        let ended = self
            .store
            .call(move |c| repo::revoke_web_sessions_of(c, uid))
            .await?;
        Ok(Reply::LoggedOut { sessions: ended })
    }

    /// `sessions`: the caller's signed-in browsers.
    pub(crate) async fn sessions(&self, call: &Call<'_>) -> Outcome {
        let uid = call.user()?.id;
        let sessions = self
            .store
            .call(move |c| repo::web_sessions_of(c, uid))
            .await?;
        Ok(Reply::Sessions { sessions })
    }

    /// `https://DOMAIN[:PORT]`, Kennel's own host.
    pub fn kennel_url(&self) -> String {
        self.settings().urls().kennel()
    }
}

impl Executor {
    /// `token create [label] [--expires D]`: a new API token, shown once.
    pub(crate) async fn token_create(
        &self,
        call: &Call<'_>,
        label: Option<crate::command::SlugName>,
        expires: Option<u64>,
    ) -> Outcome {
        let uid = call.user()?.id;
        let label = label.map_or_else(|| "default".to_owned(), |l| l.to_string());
        let token = new_token();
        let hash = token_hash(&token);
        let expires_at = expires
            .and_then(|e| i64::try_from(e).ok())
            .map(|e| crate::model::now() + e);
        let l = label.clone();
        let info = self
            .store
            .call(move |c| repo::add_api_token(c, uid, &l, &hash, expires_at))
            .await
            .map_err(|e| match e {
                StoreError::AlreadyExists { .. } => CommandError::Conflict(format!(
                    "you have a token named '{label}' already; give the new one another label, or revoke it with 'token rm {label}'"
                )),
                e => e.into(),
            })?;
        Ok(Reply::TokenCreated { token, info })
    }

    /// `tokens`: the caller's live API tokens.
    pub(crate) async fn tokens(&self, call: &Call<'_>) -> Outcome {
        let uid = call.user()?.id;
        let tokens = self
            .store
            .call(move |c| repo::api_tokens_of(c, uid))
            .await?;
        Ok(Reply::Tokens { tokens })
    }

    /// `token rm LABEL`.
    pub(crate) async fn token_rm(
        &self,
        call: &Call<'_>,
        label: &crate::command::SlugName,
    ) -> Outcome {
        let uid = call.user()?.id;
        let l = label.to_string();
        if self
            .store
            .call(move |c| repo::revoke_api_token(c, uid, &l))
            .await?
        {
            Ok(Reply::TokenRemoved {
                label: label.to_string(),
            })
        } else {
            Err(CommandError::NotFound(format!(
                "you have no token named '{label}' ('tokens' lists yours)"
            )))
        }
    }
}

impl Gate {
    /// The user and label of a live API token (`Authorization: Bearer`).
    pub async fn api_user(&self, token: &str) -> Result<Option<(User, String)>, StoreError> {
        if !looks_like_token(token) {
            return Ok(None);
        }
        let hash = token_hash(token);
        self.store()
            .call(move |c| repo::api_token_user(c, &hash))
            .await
    }
}

/// A new session: the cookie value to set (shown once).
#[derive(Debug)]
pub struct NewSession {
    pub user: User,
    pub token: String,
}

impl Gate {
    /// The user a login link signs in, without using it up (the confirm
    /// page shows who will be signed in).
    pub async fn peek_login(&self, token: &str) -> Result<Option<User>, StoreError> {
        self.link_user(token, "login", &self.settings().domain.clone(), false)
            .await
    }

    /// Uses a login link up and starts a session on Kennel's host.
    pub async fn consume_login(&self, token: &str) -> Result<Option<NewSession>, StoreError> {
        let host = self.settings().domain.clone();
        match self.link_user(token, "login", &host, true).await? {
            Some(user) => self.start_session(user, &host).await.map(Some),
            None => Ok(None),
        }
    }

    /// A one-time code that signs `user` in on `host` (a project's host),
    /// handed over by a redirect.
    pub async fn mint_handoff(&self, user: &User, host: &str) -> Result<String, StoreError> {
        let code = new_token();
        let (hash, uid, h) = (token_hash(&code), user.id, host.to_owned());
        let expires = crate::model::now() + HANDOFF_SECS;
        self.store()
            .call(move |c| repo::add_web_link(c, &hash, "handoff", uid, &h, expires))
            .await?;
        Ok(code)
    }

    /// Uses a hand-over code up on `host` and starts a session there.
    pub async fn consume_handoff(
        &self,
        code: &str,
        host: &str,
    ) -> Result<Option<NewSession>, StoreError> {
        match self.link_user(code, "handoff", host, true).await? {
            Some(user) => self.start_session(user, host).await.map(Some),
            None => Ok(None),
        }
    }

    /// The user of a session cookie on `host`.
    pub async fn session_user(&self, token: &str, host: &str) -> Result<Option<User>, StoreError> {
        if !looks_like_token(token) {
            return Ok(None);
        }
        let (hash, h) = (token_hash(token), host.to_owned());
        self.store()
            .call(move |c| repo::web_session_user(c, &hash, &h))
            .await
    }

    /// Ends a session (signing out in the browser).
    pub async fn end_session(&self, token: &str) -> Result<(), StoreError> {
        if !looks_like_token(token) {
            return Ok(());
        }
        let hash = token_hash(token);
        self.store()
            .call(move |c| repo::revoke_web_session(c, &hash).map(|_| ()))
            .await
    }

    async fn link_user(
        &self,
        token: &str,
        kind: &'static str,
        host: &str,
        consume: bool,
    ) -> Result<Option<User>, StoreError> {
        if !looks_like_token(token) {
            return Ok(None);
        }
        let (hash, h) = (token_hash(token), host.to_owned());
        self.store()
            .write(move |tx| repo::web_link_user(tx, &hash, kind, &h, consume))
            .await
    }

    async fn start_session(&self, user: User, host: &str) -> Result<NewSession, StoreError> {
        let token = new_token();
        let (hash, uid, h) = (token_hash(&token), user.id, host.to_owned());
        let expires = crate::model::now() + SESSION_SECS;
        self.store()
            .call(move |c| repo::add_web_session(c, &hash, uid, &h, expires))
            .await?;
        Ok(NewSession { user, token })
    }
}
