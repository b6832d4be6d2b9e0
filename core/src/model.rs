//! The domain model: users and their chat identities, SSH keys, access
//! requests, projects, shares, quotas and audit events.
//!
//! These are plain data types. Validation of user-supplied values lives in
//! [`crate::names`] and [`crate::keys`]; persistence in [`crate::store`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::keys::Fingerprint;
use crate::names::{ProjectName, UserName};

/// Seconds since the Unix epoch, as stored in SQLite.
pub type Timestamp = i64;

/// Returns the current time as a [`Timestamp`].
pub fn now() -> Timestamp {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Formats a timestamp as RFC 3339 (UTC) for people.
pub fn format_time(ts: Timestamp) -> String {
    time::OffsetDateTime::from_unix_timestamp(ts)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ts.to_string())
}

/// Declares a string-backed enum with `as_str`, `Display` and `FromStr`,
/// so the spelling used in SQL, JSON and text is written down once.
macro_rules! str_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The stable spelling used in the store, JSON and text.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($s => Ok($name::$variant),)+
                    _ => Err(UnknownValue { kind: stringify!($name), value: s.to_owned() }),
                }
            }
        }
    };
}

/// A stored value that is not one of an enum's spellings (a corrupt row).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} value {value:?}")]
pub struct UnknownValue {
    /// The enum that was being read.
    pub kind: &'static str,
    /// What was found.
    pub value: String,
}

str_enum! {
    /// What a user may do: admins act on everything, members on their own
    /// projects and those shared with them.
    Role { Admin => "admin", Member => "member" }
}

str_enum! {
    /// The front end an identity comes from.
    Frontend {
        /// The local admin console (`kennel exec`) or control socket.
        Cli => "cli",
        Matrix => "matrix",
        Discord => "discord",
        /// An SSH key fingerprint that knocked on the gateway.
        Ssh => "ssh",
        /// A script with an API token (`/api/v1`): every call is audited.
        Http => "http",
        /// A person signed in to the dashboard in a browser; the external
        /// id is the user's name.
        Web => "web",
        /// Kennel itself: the watcher, the idle supervisor, a wake on a web
        /// visitor's behalf. Never linked to a user; seen in the audit log.
        System => "system",
    }
}

str_enum! {
    /// Whether a key may be used to log in.
    KeyState { Active => "active", Revoked => "revoked" }
}

str_enum! {
    /// Where an access request stands.
    RequestState { Pending => "pending", Approved => "approved", Denied => "denied" }
}

str_enum! {
    /// Who may reach a project's web app without a share.
    Visibility { Private => "private", Public => "public" }
}

str_enum! {
    /// The lifecycle state of a project's VM as Kennel last recorded it.
    ProjectState {
        Creating => "creating",
        Starting => "starting",
        Running => "running",
        Stopping => "stopping",
        Stopped => "stopped",
        Failed => "failed",
        Destroying => "destroying",
    }
}

str_enum! {
    /// How an audited action ended.
    AuditOutcome { Ok => "ok", Refused => "refused", Failed => "failed" }
}

/// A stable numeric id of a user.
pub type UserId = i64;

/// A person (or bot) known to Kennel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub id: UserId,
    pub name: UserName,
    pub role: Role,
    pub created_at: Timestamp,
}

/// Who is talking, as a front end knows them: (front end, external id), for
/// example (matrix, `@ann:example.org`) or (ssh, `SHA256:...`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub frontend: Frontend,
    pub external_id: String,
}

impl Identity {
    /// Builds an identity from its parts.
    pub fn new(frontend: Frontend, external_id: impl Into<String>) -> Self {
        Self {
            frontend,
            external_id: external_id.into(),
        }
    }

    /// Kennel acting by itself, as the audit log names it.
    pub fn system() -> Self {
        Self::new(Frontend::System, "kennel")
    }

    /// The local admin console's identity.
    pub fn local_console() -> Self {
        Self::new(Frontend::Cli, "local")
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.frontend, self.external_id)
    }
}

/// An SSH public key registered for a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SshKeyRecord {
    pub id: i64,
    pub user: UserName,
    pub fingerprint: Fingerprint,
    pub algorithm: String,
    /// The key in OpenSSH `authorized_keys` form (`type base64 [comment]`).
    pub openssh: String,
    pub label: Option<String>,
    pub state: KeyState,
    pub created_at: Timestamp,
}

/// A request for access filed by a person with their public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessRequest {
    pub id: i64,
    pub identity: Identity,
    /// The user the identity belonged to when the request was filed, if any.
    pub user: Option<UserName>,
    pub fingerprint: Fingerprint,
    pub algorithm: String,
    pub openssh: String,
    pub note: Option<String>,
    pub state: RequestState,
    pub decided_by: Option<UserName>,
    pub decided_at: Option<Timestamp>,
    pub reason: Option<String>,
    pub created_at: Timestamp,
}

/// Resources a project asks for. Memory and disk are in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

/// When an idle project's VM is stopped by Kennel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IdleStop {
    /// Never: the VM runs until someone stops it.
    Never,
    /// After this long without a connection or guest CPU use.
    #[serde(rename = "after")]
    Secs { secs: u64 },
}

impl IdleStop {
    /// The shortest limit: the supervisor looks every few seconds.
    pub const MIN_SECS: u64 = 10;
    /// The longest limit short of `never`.
    pub const MAX_SECS: u64 = 30 * 24 * 3600;

    /// Parses `30m`, `2h`, `1h 30m`, `90s`, or `never` (`off`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("never") || t.eq_ignore_ascii_case("off") {
            return Ok(Self::Never);
        }
        let d = humantime::parse_duration(t).map_err(|_| {
            format!(
                "'{}' is not a duration; say e.g. 30m, 2h or never",
                t.chars().take(20).collect::<String>()
            )
        })?;
        let secs = d.as_secs();
        if !(Self::MIN_SECS..=Self::MAX_SECS).contains(&secs) {
            return Err(format!(
                "an idle limit must be from {}s to 30 days, or never",
                Self::MIN_SECS
            ));
        }
        Ok(Self::Secs { secs })
    }

    /// The limit as a duration; `None` for never.
    pub fn duration(self) -> Option<std::time::Duration> {
        match self {
            Self::Never => None,
            Self::Secs { secs } => Some(std::time::Duration::from_secs(secs)),
        }
    }

    /// How it is stored: seconds, 0 for never.
    pub fn to_secs(self) -> u64 {
        match self {
            Self::Never => 0,
            Self::Secs { secs } => secs,
        }
    }

    /// Back from the store's seconds.
    pub fn from_secs(secs: u64) -> Self {
        if secs == 0 {
            Self::Never
        } else {
            Self::Secs { secs }
        }
    }
}

impl std::fmt::Display for IdleStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Never => f.write_str("never"),
            Self::Secs { secs } => write!(
                f,
                "{}",
                humantime::format_duration(std::time::Duration::from_secs(*secs))
            ),
        }
    }
}

/// A project: its source, stack, VM shape and who owns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Project {
    pub id: i64,
    pub name: ProjectName,
    pub owner: UserName,
    pub stack: String,
    pub git_url: Option<String>,
    pub source_path: String,
    pub template: Option<String>,
    pub resources: Resources,
    pub app_port: u16,
    pub visibility: Visibility,
    pub state: ProjectState,
    /// Why Kennel put the project in its state, when it did (not a person).
    pub state_note: Option<String>,
    /// The project's own idle limit; `None` follows the configured default.
    pub idle_stop: Option<IdleStop>,
    /// Labels the owner gave it (`tag`), sorted.
    pub tags: Vec<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// The most tags one project carries.
pub const MAX_TAGS: usize = 16;

/// A project shared with a user, for SSH and/or the web app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Share {
    pub project: ProjectName,
    pub user: UserName,
    pub ssh: bool,
    pub web: bool,
}

/// Limits per role. `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Quota {
    pub role: Role,
    pub projects: Option<u32>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_mib: Option<u64>,
}

/// What a user already holds, to compare against a [`Quota`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub projects: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEvent {
    pub id: i64,
    pub at: Timestamp,
    pub user: Option<UserName>,
    pub identity: String,
    pub action: String,
    pub target: Option<String>,
    pub outcome: AuditOutcome,
    pub detail: Option<String>,
}

/// One `agent` run of a project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentRun {
    pub id: i64,
    pub user: Option<UserName>,
    pub agent: String,
    pub task: String,
    /// The checkpoint taken before it (`rollback NAME LABEL` undoes it).
    pub checkpoint: String,
    pub started_at: Timestamp,
    pub ended_at: Option<Timestamp>,
    pub exit_code: Option<i32>,
    pub tokens: Option<u64>,
    /// `git diff --stat`'s last line (files changed, insertions, deletions).
    pub diffstat: Option<String>,
}

/// A checkpoint of a project: its VM's disk and its source at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    pub label: String,
    pub note: Option<String>,
    /// Why Kennel took it itself (e.g. before a rollback); `None` when a
    /// person did.
    pub auto_reason: Option<String>,
    /// Who took it (`None` for Kennel, or a user since removed).
    pub taken_by: Option<String>,
    pub taken_at: Timestamp,
    /// The source's git HEAD at the time, if it is a repository.
    pub git_head: Option<String>,
    /// Bytes of its own: the disk layer (what the VM wrote since the
    /// checkpoint before) and the source copy.
    pub disk_bytes: u64,
    pub source_bytes: u64,
    /// Bytes of older checkpoints' disk layers it reads through (shared
    /// with them), when it was taken.
    pub disk_shared_bytes: u64,
    /// Whether the source copy shares its extents with the source
    /// (reflinks) until either changes.
    pub source_reflinked: bool,
    /// The project's shape and app port when it was taken (a rollback
    /// restores them).
    pub resources: Resources,
    pub app_port: u16,
}

/// An HTTP API token, as `tokens` shows it (never the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiToken {
    pub label: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub last_used_at: Option<Timestamp>,
}

/// A share link of a project, as `shares` shows it (never its token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShareLink {
    pub id: i64,
    /// `None`: the project's app (its main host).
    pub port: Option<u16>,
    pub note: Option<String>,
    pub created_by: Option<UserName>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    /// When a browser redeemed it (it works once).
    pub redeemed_at: Option<Timestamp>,
    pub last_used_at: Option<Timestamp>,
    /// Pages opened through it.
    pub visits: u64,
}

/// A custom domain of a project (`domains`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CustomDomain {
    pub host: String,
    pub project: ProjectName,
    /// `pending` (waiting for an admin) or `active` (served).
    pub state: String,
    pub requested_by: Option<UserName>,
    pub created_at: Timestamp,
}

/// The most custom domains one project may have.
pub const MAX_DOMAINS_PER_PROJECT: u32 = 10;

/// The most live share links one project may have.
pub const MAX_LINKS_PER_PROJECT: u32 = 20;

/// Who a share link's session lets in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkVisitor {
    pub link_id: i64,
    pub project: ProjectName,
    pub port: Option<u16>,
}

/// A signed-in browser, as `sessions` shows it (never its token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WebSession {
    pub host: String,
    pub created_at: Timestamp,
    pub last_seen_at: Timestamp,
    pub expires_at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_through_their_spelling() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(*r));
        }
        for s in ProjectState::ALL {
            assert_eq!(s.as_str().parse::<ProjectState>(), Ok(*s));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn time_formats_as_rfc3339() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
    }
}
