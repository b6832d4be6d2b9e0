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
    },
    Status {
        project: Project,
        shares: Vec<Share>,
        vm: Option<VmStatus>,
        idle: crate::idle::IdleView,
    },
    UserRenamed {
        from: String,
        to: String,
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
        /// `to@HOST`, what `ssh` takes now.
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
    Stacks {
        stacks: Vec<StackInfo>,
    },
    Templates {
        templates: Vec<TemplateInfo>,
    },
}

/// Why a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The line did not parse (exit 2).
    #[error("{0}")]
    Usage(#[from] ParseError),
    /// Policy said no (exit 1).
    #[error("refused: {0}")]
    Refused(String),
    /// The thing named does not exist (exit 1).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with current state (exit 1).
    #[error("{0}")]
    Conflict(String),
    /// A VM operation failed (exit 1).
    #[error("{0}")]
    Provision(#[from] ProvisionError),
    /// The store failed; details go to the log, not the user (exit 1).
    #[error("{}", store_message(.0))]
    Store(#[from] StoreError),
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

impl CommandError {
    /// A stable machine-readable kind for JSON answers.
    pub fn kind(&self) -> &'static str {
        match self {
            CommandError::Usage(_) => "usage",
            CommandError::Refused(_) => "refused",
            CommandError::NotFound(_) => "not_found",
            CommandError::Conflict(_) => "conflict",
            CommandError::Provision(_) => "provision",
            CommandError::Store(_) => "internal",
        }
    }
}

impl From<crate::policy::Refusal> for CommandError {
    fn from(r: crate::policy::Refusal) -> Self {
        CommandError::Refused(r.0)
    }
}

/// A command's result.
pub type Outcome = Result<Reply, CommandError>;

/// The process exit code for an outcome: 0 done, 1 refused or failed, 2 usage.
pub fn exit_code(o: &Outcome) -> i32 {
    match o {
        Ok(_) => 0,
        Err(CommandError::Usage(_)) => 2,
        Err(_) => 1,
    }
}
