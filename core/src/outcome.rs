//! What running a command produces: a structured [`Reply`] or a
//! [`CommandError`], and the exit code each maps to.
//!
//! Front ends never format these themselves; [`crate::render`] does.

use serde::Serialize;

use crate::catalog::{StackInfo, TemplateInfo};
use crate::command::ParseError;
use crate::model::{AccessRequest, Identity, Project, Share, SshKeyRecord, User, Visibility};
use crate::provision::{ProvisionError, VmStatus};
use crate::store::StoreError;

/// How to reach a project: the strings an editor or terminal needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Connection {
    pub project: String,
    /// `ssh myapp@HOST -p PORT`
    pub ssh_command: String,
    pub ssh_config: String,
    pub vscode_url: String,
    pub zed_url: String,
    pub jetbrains_hint: String,
    pub https_url: String,
    pub source_path: String,
    pub host_key_fingerprints: Vec<String>,
}

/// A user with what `users` and `whoami` show about them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserSummary {
    #[serde(flatten)]
    pub user: User,
    pub identities: Vec<Identity>,
    pub active_keys: usize,
}

/// One user's quota beside what they use (`quota`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuotaLine {
    pub user: String,
    pub quota: crate::model::Quota,
    /// Which limits are the user's own rather than their role's.
    pub personal: crate::store::repo::Personal,
    pub usage: crate::model::Usage,
}

/// One project moved between hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Moved {
    pub project: String,
    pub from: String,
    pub to: String,
    /// Whether it runs again (it ran before the move).
    pub running: bool,
}

/// The successful result of a command.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    /// The command list, or one command explained.
    Help {
        topic: Option<&'static str>,
    },
    Whoami {
        identity: Identity,
        user: Option<UserSummary>,
    },
    Projects {
        projects: Vec<Project>,
        /// The tag the list was narrowed to (`projects --tag T`).
        tag: Option<String>,
    },
    /// A project's tags after `tag` or `untag`.
    Tagged {
        project: String,
        tags: Vec<String>,
    },
    Status {
        project: Project,
        /// How to reach it: the SSH string and the app's URL.
        connection: Connection,
        shares: Vec<Share>,
        vm: Option<VmStatus>,
        idle: crate::idle::IdleView,
        egress: crate::executor::egress::EgressView,
    },
    UserRenamed {
        from: String,
        to: String,
    },
    /// A project's egress policy (`changed`: as just set).
    Egress {
        project: String,
        egress: crate::executor::egress::EgressView,
        changed: bool,
    },
    /// A project's idle limit, as set.
    IdleSet {
        project: String,
        idle: crate::idle::IdleView,
    },
    /// A new project, ready.
    Created {
        project: Project,
        connection: Connection,
        notes: Vec<String>,
    },
    Connection {
        connection: Connection,
    },
    Logs {
        project: String,
        lines: Vec<String>,
    },
    /// A destructive command that needs confirming first.
    Confirm {
        prompt: String,
        confirm_with: String,
    },
    /// A project's VM was already running (a wake that had nothing to do).
    Running {
        project: String,
    },
    Stopped {
        project: String,
    },
    /// A project is gone; its source was deleted only if `purged`.
    Removed {
        project: String,
        source_path: String,
        purged: bool,
    },
    Renamed {
        from: String,
        to: String,
        /// `ssh to@HOST[ -p PORT]`, the SSH string from now on.
        ssh: String,
        https_url: String,
    },
    Shared {
        project: String,
        user: String,
        ssh: bool,
        web: bool,
    },
    Unshared {
        project: String,
        user: String,
    },
    VisibilitySet {
        project: String,
        https_url: String,
        visibility: Visibility,
    },
    PortSet {
        project: String,
        https_url: String,
        port: u16,
    },
    /// `resize`: the resources before and after, and what took effect
    /// at once.
    Resized {
        project: String,
        before: crate::model::Resources,
        after: crate::model::Resources,
        /// The disk grew on the running VM (its filesystem too).
        disk_now: bool,
        /// CPUs or memory changed and wait for the next start.
        restart_needed: bool,
        /// Whether the VM runs (so `restart` is what applies the rest).
        running: bool,
    },
    /// `run`: how the command ended, and its output's last lines.
    Ran {
        project: String,
        /// The command as given, quoted back.
        command: String,
        /// As a shell reports it: the status, 128 + the signal's number
        /// when a signal ended it, 124 when the time limit did.
        exit_code: i32,
        /// The signal that ended it, if one did (`TERM`, `KILL`).
        signal: Option<String>,
        timed_out: bool,
        /// Stopped by `run stop`.
        stopped: bool,
        /// Its output's last lines (all of it went out as it came, where
        /// the front end streams).
        tail: Vec<String>,
        /// Lines before the tail were left out.
        cut: bool,
        /// All the output went to the asker as it came (SSH, the API,
        /// the console): text answers leave the tail out.
        streamed: bool,
        output_bytes: u64,
        elapsed_ms: u64,
    },
    /// `share NAME --link`: the link, shown this once.
    LinkCreated {
        project: String,
        id: i64,
        url: String,
        port: Option<u16>,
        expires_at: crate::model::Timestamp,
        note: Option<String>,
    },
    LinkRevoked {
        project: String,
        id: i64,
    },
    /// `domain add`: served now, or waiting for an admin.
    DomainAdded {
        project: String,
        host: String,
        url: String,
        pending: bool,
    },
    DomainApproved {
        project: String,
        host: String,
        url: String,
    },
    DomainRemoved {
        project: String,
        host: String,
    },
    Domains {
        domains: Vec<crate::model::CustomDomain>,
    },
    /// `shares NAME`.
    Shares {
        project: String,
        users: Vec<Share>,
        links: Vec<crate::model::ShareLink>,
    },
    /// `run stop`: how many commands were told to stop.
    RunStopped {
        project: String,
        count: usize,
    },
    /// `agent`: how the run ended, what it changed, and the way back.
    AgentRan {
        project: String,
        agent: String,
        /// The checkpoint taken before it.
        checkpoint: String,
        exit_code: i32,
        signal: Option<String>,
        timed_out: bool,
        /// Stopped by `agent stop`.
        stopped: bool,
        elapsed_ms: u64,
        /// LLM tokens the project's VM used while it ran (through the gateway).
        tokens: u64,
        /// `git diff --stat HEAD` in the VM afterwards (empty: no change
        /// or no git repository).
        diffstat: Vec<String>,
        tail: Vec<String>,
        cut: bool,
        streamed: bool,
        output_bytes: u64,
    },
    AgentStopped {
        project: String,
        was_running: bool,
    },
    AgentRuns {
        project: String,
        runs: Vec<crate::model::AgentRun>,
    },
    SecretStored {
        name: String,
    },
    SecretDeleted {
        name: String,
    },
    /// The names of a user's secrets (never their values).
    Secrets {
        names: Vec<String>,
    },
    /// A user's LLM gateway use today and the limits (0: none).
    LlmUsage {
        user: crate::names::UserName,
        day: String,
        requests: u64,
        tokens: u64,
        requests_per_minute: u32,
        tokens_per_day: u64,
    },
    /// The user's public deploy key, to add to a git host.
    DeployKey {
        public_key: String,
    },
    /// A one-time sign-in link: a secret, for the asker's eyes only.
    LoginLink {
        url: String,
        minutes: i64,
    },
    LoggedOut {
        sessions: usize,
    },
    Sessions {
        sessions: Vec<crate::model::WebSession>,
    },
    /// A new API token: shown this once.
    TokenCreated {
        token: String,
        #[serde(flatten)]
        info: crate::model::ApiToken,
    },
    Tokens {
        tokens: Vec<crate::model::ApiToken>,
    },
    TokenRemoved {
        label: String,
    },
    /// ssh_config text for the caller's projects, and their aliases.
    SshConfig {
        config: String,
        aliases: Vec<String>,
    },
    Keys {
        user: String,
        keys: Vec<SshKeyRecord>,
    },
    KeyAdded {
        key: SshKeyRecord,
    },
    KeyRevoked {
        key: SshKeyRecord,
    },
    RequestFiled {
        request: AccessRequest,
        new: bool,
    },
    Requests {
        requests: Vec<AccessRequest>,
    },
    Decided {
        request: AccessRequest,
        user: Option<String>,
    },
    Users {
        users: Vec<UserSummary>,
    },
    /// Quotas and use: one row per user asked about.
    Quotas {
        quotas: Vec<QuotaLine>,
        /// Whether the command set limits (then one row, the user's).
        changed: bool,
    },
    Stacks {
        stacks: Vec<StackInfo>,
    },
    /// The hosts projects run on (`hosts`).
    Hosts {
        hosts: Vec<crate::provision::HostInfo>,
    },
    /// A project on another host (`move`).
    Moved {
        moved: Moved,
    },
    /// A host emptied (`evacuate`) or back with its projects (`restore`).
    HostEvacuated {
        host: String,
        moved: Vec<Moved>,
        /// Projects that could not move, and why.
        failed: Vec<(String, String)>,
        restored: bool,
    },
    CheckpointTaken {
        project: String,
        checkpoint: crate::model::Checkpoint,
        /// What it cost (times, bytes, whether the source was reflinked).
        cost: crate::provision::CheckpointTaken,
        notes: Vec<String>,
    },
    Checkpoints {
        project: String,
        checkpoints: Vec<crate::model::Checkpoint>,
    },
    RolledBack {
        project: String,
        label: String,
        /// The automatic checkpoint of what was there before: rolling back
        /// to it undoes the rollback.
        undo: String,
        /// Whether the VM was started again.
        restarted: bool,
        notes: Vec<String>,
    },
    CheckpointRemoved {
        project: String,
        label: String,
    },
    Templates {
        templates: Vec<TemplateInfo>,
    },
}

/// Why a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The line did not parse.
    #[error("{0}")]
    Usage(#[from] ParseError),
    /// Policy said no.
    #[error("refused: {0}")]
    Refused(String),
    /// The thing named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with current state (a name taken, a project
    /// busy).
    #[error("{0}")]
    Conflict(String),
    /// A VM operation failed: the user's request ([`ProvisionError::Invalid`])
    /// or the host. The message carries the whole chain, for the user.
    #[error("{}", crate::outcome::chain(.0))]
    Provision(#[source] ProvisionError),
    /// The store failed; details go to the log, not the user.
    #[error("{}", store_message(.0))]
    Store(#[from] StoreError),
    /// A command could not be run in a VM (`run`).
    #[error("{0}")]
    Guest(#[from] crate::guest::GuestError),
}

impl From<ProvisionError> for CommandError {
    fn from(e: ProvisionError) -> Self {
        CommandError::Provision(e)
    }
}

/// What a user is told when the store fails: a full disk says so (nothing
/// of theirs was half-saved); anything else is for the operator's log.
fn store_message(e: &StoreError) -> &'static str {
    match e {
        StoreError::Full => {
            "Kennel's disk is full, so this change was not saved (nothing else was lost); tell an operator"
        }
        _ => "Kennel could not read or write its database; an operator should check the server log",
    }
}

/// An error and every cause under it, `outer: inner: innermost`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        // A message that already ends with its cause is not told twice.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// The classes of failure, decided once for every front end: the `kind`
/// in JSON answers, the HTTP API's status, the CLI's (and SSH command
/// mode's) exit code and the metrics' `outcome` label all come from here.
///
/// | kind | who is to act | HTTP | exit |
/// |---|---|---|---|
/// | `usage` | the caller: the line does not parse | 400 | 2 |
/// | `unauthorized` | the caller: no or bad credentials (API) | 401 | 3 |
/// | `refused` | the caller: policy says no | 403 | 3 |
/// | `not_found` | the caller: no such thing | 404 | 4 |
/// | `conflict` | the caller: a name taken, a project busy | 409 | 5 |
/// | `rate_limited` | the caller: too many calls; wait | 429 | 8 |
/// | `invalid` | the caller: a VM operation cannot be done as asked | 422 | 6 |
/// | `unavailable` | the operator: no VMs here, the store is down | 503 | 7 |
/// | `failed` | the operator: a VM operation failed on the host | 500 | 1 |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Usage,
    Unauthorized,
    Refused,
    NotFound,
    Conflict,
    RateLimited,
    Invalid,
    Unavailable,
    Failed,
}

impl ErrorKind {
    /// Every kind, for tables and tests.
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::Usage,
        ErrorKind::Unauthorized,
        ErrorKind::Refused,
        ErrorKind::NotFound,
        ErrorKind::Conflict,
        ErrorKind::RateLimited,
        ErrorKind::Invalid,
        ErrorKind::Unavailable,
        ErrorKind::Failed,
    ];

    /// The stable name in JSON answers and the metrics' label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Usage => "usage",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Refused => "refused",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Failed => "failed",
        }
    }

    /// The HTTP API's status.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::Usage => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Refused => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::RateLimited => 429,
            ErrorKind::Invalid => 422,
            ErrorKind::Unavailable => 503,
            ErrorKind::Failed => 500,
        }
    }

    /// The exit code of `kennel exec` and of SSH command mode.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Failed => 1,
            ErrorKind::Usage => 2,
            ErrorKind::Unauthorized | ErrorKind::Refused => 3,
            ErrorKind::NotFound => 4,
            ErrorKind::Conflict => 5,
            ErrorKind::RateLimited => 8,
            ErrorKind::Invalid => 6,
            ErrorKind::Unavailable => 7,
        }
    }

    /// Whether the caller caused it (and not the host): logged at debug,
    /// not error.
    pub fn is_callers(self) -> bool {
        !matches!(self, ErrorKind::Unavailable | ErrorKind::Failed)
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl CommandError {
    /// The class of this failure; see [`ErrorKind`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            CommandError::Usage(_) => ErrorKind::Usage,
            CommandError::Refused(_) => ErrorKind::Refused,
            CommandError::NotFound(_) => ErrorKind::NotFound,
            CommandError::Conflict(_) => ErrorKind::Conflict,
            CommandError::Provision(e) => e.kind(),
            CommandError::Store(_) => ErrorKind::Unavailable,
            CommandError::Guest(e) => match e {
                crate::guest::GuestError::Unavailable(_) => ErrorKind::Unavailable,
                crate::guest::GuestError::Invalid(_) => ErrorKind::Usage,
                crate::guest::GuestError::Unreachable { .. }
                | crate::guest::GuestError::Lost { .. } => ErrorKind::Failed,
            },
        }
    }

    /// What an operator's log gets: the whole chain, store errors too.
    pub fn detailed(&self) -> String {
        match self {
            CommandError::Store(e) => chain(e),
            other => other.to_string(),
        }
    }
}

impl From<crate::policy::Refusal> for CommandError {
    fn from(r: crate::policy::Refusal) -> Self {
        match r {
            crate::policy::Refusal::Denied(why) => CommandError::Refused(why),
            taken @ crate::policy::Refusal::Taken(_) => CommandError::Conflict(taken.to_string()),
        }
    }
}

/// A command's result.
pub type Outcome = Result<Reply, CommandError>;

/// The process exit code for an outcome: 0 done, else its kind's
/// ([`ErrorKind::exit_code`]).
pub fn exit_code(o: &Outcome) -> i32 {
    match o {
        // `run`: the command's own, as a shell gives it.
        Ok(Reply::Ran { exit_code, .. } | Reply::AgentRan { exit_code, .. }) => *exit_code,
        Ok(_) => 0,
        Err(e) => e.kind().exit_code(),
    }
}
