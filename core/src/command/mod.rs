//! The command language: one grammar for chat, SSH, the HTTP API and the CLI.
//!
//! [`parse`] is a pure function from a line of text to an [`Invocation`]
//! (a typed [`Command`] plus output options). The grammar lives in one table
//! ([`SPECS`]) that also generates help and usage lines, so they cannot
//! drift apart. Every command prints back to a canonical line
//! (`Display`) that parses to itself.

pub mod lex;
mod spec;
mod values;

use std::fmt;

pub use spec::{ArgKind, ArgSpec, CommandSpec, FlagSpec, SPECS};
pub use values::{GitSource, HostName, Limit, QuotaChange, Size, SlugName};

use crate::keys::{Fingerprint, PublicKey};
use crate::names::{ProjectName, UserName};

/// A change to a project's egress policy (`egress NAME ACTION ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressChange {
    /// `open`, `closed`, or `default` (`None`: vm.egress).
    Mode(Option<crate::egress::EgressMode>),
    /// `allow DEST...`; `once`: for an hour (`allow-once`).
    Allow {
        dests: Vec<crate::egress::Destination>,
        once: bool,
    },
    /// `deny DEST...`: refused, and remembered.
    Deny(Vec<crate::egress::Destination>),
    /// `forget DEST...`: off the list (asked about again).
    Forget(Vec<crate::egress::Destination>),
}

/// A parsed command line: what to do, and how to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    /// Answer with JSON instead of text (`--json`).
    pub json: bool,
}

/// Options of `new project`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewProjectArgs {
    pub name: ProjectName,
    pub stack: Option<SlugName>,
    pub git: Option<GitSource>,
    pub path: Option<String>,
    pub template: Option<SlugName>,
    pub cpus: Option<u32>,
    pub memory: Option<Size>,
    pub disk: Option<Size>,
    /// Use an existing non-empty directory as the source.
    pub adopt: bool,
    /// The host to make it on (admins, backends with several hosts).
    pub host: Option<HostName>,
}

/// Every command Kennel understands. Each variant's doc says when it is valid;
/// who may run it is decided by [`crate::policy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Lists commands, or explains one (`topic` is a canonical command name).
    Help { topic: Option<&'static str> },
    /// Says who Kennel thinks you are. Valid for anyone.
    Whoami,
    /// Creates a project with its VM. Members within quota; admins always.
    /// Boxed because it is much larger than the other variants.
    NewProject(Box<NewProjectArgs>),
    /// Lists the hosts projects run on: state, load, projects. Admins.
    Hosts,
    /// Moves a project's VM to another host (stopped for the move and
    /// started again if it ran). Admins.
    Move { name: ProjectName, host: HostName },
    /// Moves every project off a host and takes it out of placement. Admins.
    Evacuate { host: HostName },
    /// Puts an evacuated host back and moves its projects home. Admins.
    Restore { host: HostName },
    /// Lists the projects you own or that are shared with you (all, for
    /// admins); with a tag, only those carrying it.
    Projects { tag: Option<SlugName> },
    /// Shows a project's state, resources and addresses.
    Status { name: ProjectName },
    /// Boots a stopped project's VM.
    Start { name: ProjectName },
    /// Shuts a project's VM down gracefully.
    Stop { name: ProjectName },
    /// Stops then starts a project's VM.
    Restart { name: ProjectName },
    /// Destroys a project's VM and disk; the source stays unless `purge`.
    /// Without `yes` it only asks for confirmation.
    Rm {
        name: ProjectName,
        purge: bool,
        yes: bool,
    },
    /// Prints how to connect to a project over SSH and from editors.
    Ssh { name: ProjectName },
    /// Shows the tail of a project's VM console log.
    Logs { name: ProjectName, lines: u32 },
    /// Shares a project with a user, for SSH and/or the web app (both if neither is given).
    Share {
        name: ProjectName,
        user: UserName,
        ssh: bool,
        web: bool,
    },
    /// Removes a user's share of a project.
    Unshare { name: ProjectName, user: UserName },
    /// Makes a one-use link to a project's web app (or one port of it)
    /// for someone without an account.
    ShareLink {
        name: ProjectName,
        port: Option<u16>,
        expires_secs: u64,
        note: Option<String>,
    },
    /// Serves a project's app at a host name of the caller's own, once its
    /// DNS points here (and, for members, an admin approved it).
    DomainAdd { name: ProjectName, host: String },
    /// Stops serving a project at a custom domain.
    DomainRm { name: ProjectName, host: String },
    /// Approves a member's custom domain. Admins only.
    DomainApprove { host: String },
    /// Lists custom domains: a project's, or all you may see.
    Domains { name: Option<ProjectName> },
    /// Lists a project's shares with users and its live share links.
    Shares { name: ProjectName },
    /// Revokes a share link; sessions it started end at once.
    UnshareLink { name: ProjectName, id: i64 },
    /// Makes a project's web app reachable by anyone with the URL.
    Public { name: ProjectName },
    /// Makes a project's web app reachable only by its owner and shares (the default).
    Private { name: ProjectName },
    /// Sets the port the HTTPS gateway forwards to inside the VM.
    Port { name: ProjectName, port: u16 },
    /// Sets how long a project's VM may sit idle before Kennel stops it
    /// (`None`: back to the configured default).
    Idle {
        name: ProjectName,
        limit: Option<crate::model::IdleStop>,
    },
    /// Shows a project's egress policy (`change: None`) or changes it.
    Egress {
        name: ProjectName,
        change: Option<EgressChange>,
    },
    /// Adds tags to a project (`tag NAME TAG...`).
    Tag {
        name: ProjectName,
        tags: Vec<SlugName>,
    },
    /// Removes tags from a project.
    Untag {
        name: ProjectName,
        tags: Vec<SlugName>,
    },
    /// Changes a project's CPUs, memory or disk, within its owner's quota.
    /// The disk only grows: at once where the VM runs and its backend can
    /// (the guest's filesystem grows with it), else at the next start;
    /// CPUs and memory take effect at the next start.
    Resize {
        name: ProjectName,
        cpus: Option<u32>,
        memory: Option<Size>,
        disk: Option<Size>,
    },
    /// Runs one command in a project's VM as `dev` in `/workspace`, its
    /// words passed as given (no shell unless it is `sh -c ...`), streaming
    /// its output; the answer carries its exit code. A stopped VM is woken.
    Run {
        name: ProjectName,
        argv: Vec<String>,
        /// Seconds it may run before Kennel stops it.
        timeout_secs: u64,
    },
    /// Stops the commands `run` is running in a project's VM.
    RunStop { name: ProjectName },
    /// Runs a coding agent in a project's VM on `task`, after a checkpoint.
    Agent {
        name: ProjectName,
        /// An operator agent (`[agents.NAME]`); none: the project's
        /// `.kennel/agent`, else the first configured.
        with: Option<SlugName>,
        task: String,
        timeout_secs: u64,
    },
    /// Stops a project's agent run.
    AgentStop { name: ProjectName },
    /// A project's agent runs.
    Agents { name: ProjectName },
    /// Shows quotas and what is used of them: everyone's, one user's, or
    /// (for a member) their own; an admin's change sets a user's own
    /// limits.
    Quota {
        user: Option<UserName>,
        change: QuotaChange,
    },
    /// Lists your SSH keys (an admin may name another user).
    Keys { user: Option<UserName> },
    /// Adds an SSH key to your account (an admin may add one for another user).
    KeyAdd {
        key: PublicKey,
        label: Option<String>,
        user: Option<UserName>,
    },
    /// Revokes an SSH key by fingerprint.
    KeyRm { fingerprint: Fingerprint },
    /// Asks the admins for access with your public key. Valid for anyone.
    RequestAccess {
        key: PublicKey,
        note: Option<String>,
    },
    /// Lists access requests: pending ones, or all with `all`. Admins only.
    Requests { all: bool },
    /// Approves a pending access request. Admins only.
    /// `as NAME` names the new user (else the key's comment or the chat
    /// name gives it).
    Approve { id: i64, name: Option<UserName> },
    /// Denies a pending access request, with an optional reason. Admins only.
    Deny { id: i64, reason: Option<String> },
    /// Lists users. Admins only.
    Users,
    /// Renames a user. Admins only.
    UserRename { from: UserName, to: UserName },
    /// Lists the stacks projects can be built on.
    Stacks,
    /// Lists the project templates.
    Templates,
    /// Confirms the command Kennel last asked this identity to confirm
    /// (valid for 5 minutes).
    Yes,
    /// Copies a project: a copy-on-write clone of its disk and a copy of
    /// its source, as a new project of the caller's.
    Cp {
        name: ProjectName,
        /// `NAME@LABEL`: a copy of that checkpoint instead of the present.
        at: Option<SlugName>,
        new_name: ProjectName,
    },
    /// Takes a checkpoint of a project: its VM's disk and its source.
    Checkpoint {
        name: ProjectName,
        label: Option<SlugName>,
        note: Option<String>,
    },
    /// Lists a project's checkpoints.
    Checkpoints { name: ProjectName },
    /// Rolls a project back to a checkpoint (disk and source), asking
    /// first; the present is checkpointed automatically before.
    Rollback {
        name: ProjectName,
        label: SlugName,
        yes: bool,
    },
    /// Removes a checkpoint.
    CheckpointRm { name: ProjectName, label: SlugName },
    /// Renames a project; its routes follow.
    Rename {
        name: ProjectName,
        new_name: ProjectName,
    },
    /// Stores a secret of the caller's (e.g. `git-token` for https clones).
    SecretSet { name: SlugName, value: String },
    /// Deletes a secret of the caller's.
    SecretRm { name: SlugName },
    /// Lists the names of the caller's secrets (never their values).
    Secrets,
    /// The day's LLM gateway use of a user (yourself by default) and the
    /// limits that apply.
    LlmUsage { user: Option<UserName> },
    /// Shows the public half of the caller's deploy key for ssh:// clones,
    /// making one on first use.
    DeployKey,
    /// A one-time link that signs a browser in.
    Login,
    /// Signs every browser of the caller out.
    Logout,
    /// Lists the caller's signed-in browsers.
    Sessions,
    /// Makes an HTTP API token of the caller's (shown once).
    TokenCreate {
        label: Option<SlugName>,
        /// Seconds it lives; `None`: until removed.
        expires: Option<u64>,
    },
    /// Lists the caller's API tokens (never the tokens).
    Tokens,
    /// Revokes one of the caller's API tokens.
    TokenRm { label: SlugName },
    /// An ssh_config `Host` block for each project the caller may enter
    /// by SSH.
    SshConfig,
}

impl Command {
    /// The grammar entry of this command.
    pub fn spec(&self) -> &'static CommandSpec {
        spec::spec_for(self)
    }

    /// The canonical name (`new project`, `key add`, ...), for logs and audit.
    pub fn name(&self) -> &'static str {
        self.spec().name
    }

    /// Whether its answer is for the asker alone (a sign-in link, an API
    /// token, an access request with its key): front ends with shared
    /// rooms answer it only in a direct message.
    pub fn private(&self) -> bool {
        matches!(
            self,
            Command::Login
                | Command::TokenCreate { .. }
                | Command::RequestAccess { .. }
                | Command::ShareLink { .. }
        )
    }

    /// Whether it only reads: the local CLI runs such a command without a
    /// daemon only on data that exists (it never makes a data directory
    /// to answer "No projects yet" from it). Listed one by one, so a new
    /// command is a decision.
    pub fn reads_only(&self) -> bool {
        use Command::*;
        match self {
            Help { .. }
            | Whoami
            | Projects { .. }
            | Status { .. }
            | Ssh { .. }
            | Logs { .. }
            | Keys { .. }
            | Requests { .. }
            | Users
            | Stacks
            | Templates
            | Secrets
            | LlmUsage { .. }
            | Sessions
            | Tokens
            | SshConfig
            | Shares { .. }
            | Domains { .. }
            | Checkpoints { .. }
            | Hosts
            | Agents { .. }
            | Egress { change: None, .. } => true,
            Quota { change, .. } => change.is_empty(),
            Egress {
                change: Some(_), ..
            } => false,
            NewProject(_)
            | Move { .. }
            | Evacuate { .. }
            | Restore { .. }
            | DomainAdd { .. }
            | DomainRm { .. }
            | DomainApprove { .. }
            | ShareLink { .. }
            | UnshareLink { .. }
            | Resize { .. }
            | Run { .. }
            | RunStop { .. }
            | Agent { .. }
            | AgentStop { .. }
            | Checkpoint { .. }
            | Rollback { .. }
            | CheckpointRm { .. }
            | Start { .. }
            | Stop { .. }
            | Restart { .. }
            | Rm { .. }
            | Share { .. }
            | Unshare { .. }
            | Public { .. }
            | Private { .. }
            | Port { .. }
            | Idle { .. }
            | Tag { .. }
            | Untag { .. }
            | KeyAdd { .. }
            | KeyRm { .. }
            | RequestAccess { .. }
            | Approve { .. }
            | Deny { .. }
            | UserRename { .. }
            | Yes
            | Cp { .. }
            | Rename { .. }
            | SecretSet { .. }
            | SecretRm { .. }
            | DeployKey
            | Login
            | Logout
            | TokenCreate { .. }
            | TokenRm { .. } => false,
        }
    }

    /// The project this command is about, if any.
    pub fn project(&self) -> Option<&ProjectName> {
        use Command::*;
        match self {
            Status { name }
            | Start { name }
            | Stop { name }
            | Restart { name }
            | Rm { name, .. }
            | Ssh { name }
            | Logs { name, .. }
            | Share { name, .. }
            | Unshare { name, .. }
            | Public { name }
            | Private { name }
            | Port { name, .. }
            | Idle { name, .. }
            | Egress { name, .. }
            | Tag { name, .. }
            | Untag { name, .. }
            | Cp { name, .. }
            | Rename { name, .. }
            | Checkpoint { name, .. }
            | Checkpoints { name }
            | Rollback { name, .. }
            | CheckpointRm { name, .. }
            | Resize { name, .. }
            | ShareLink { name, .. }
            | DomainAdd { name, .. }
            | DomainRm { name, .. }
            | Shares { name }
            | UnshareLink { name, .. }
            | Run { name, .. }
            | RunStop { name }
            | Agent { name, .. }
            | AgentStop { name }
            | Agents { name }
            | Move { name, .. } => Some(name),
            NewProject(n) => Some(&n.name),
            Domains { name } => name.as_ref(),
            // Listed one by one: a new command that names a project must
            // be added above, or policy would treat it as project-less.
            Help { .. }
            | Whoami
            | Projects { .. }
            | Quota { .. }
            | DomainApprove { .. }
            | Keys { .. }
            | KeyAdd { .. }
            | KeyRm { .. }
            | RequestAccess { .. }
            | Requests { .. }
            | Approve { .. }
            | Deny { .. }
            | Users
            | UserRename { .. }
            | Stacks
            | Templates
            | Yes
            | SecretSet { .. }
            | SecretRm { .. }
            | Secrets
            | LlmUsage { .. }
            | DeployKey
            | Login
            | Logout
            | Sessions
            | TokenCreate { .. }
            | Tokens
            | TokenRm { .. }
            | Hosts
            | Evacuate { .. }
            | Restore { .. }
            | SshConfig => None,
        }
    }
}

/// Why a line did not parse. `Display` gives the whole message, usage included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Nothing but decoration was sent.
    Empty,
    /// The first word is not a command.
    UnknownCommand {
        word: String,
        suggestion: Option<&'static str>,
    },
    /// The command is known but its arguments are wrong.
    Usage {
        command: &'static str,
        problem: String,
    },
    /// Quotes do not balance.
    Lex(lex::UnclosedQuote),
    /// The line is longer than any command needs ([`MAX_LINE_BYTES`]).
    TooLong { bytes: usize },
}

/// The longest line any front end hands the parser: room for the longest
/// accepted public key (RSA 16384, about 2.8 KB) and a note, far below
/// what would cost memory. Front ends that collect a line themselves (the
/// SSH prompt) stop collecting past it.
pub const MAX_LINE_BYTES: usize = 8 * 1024;

impl std::error::Error for ParseError {}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Empty => write!(f, "no command given. Try 'help'."),
            ParseError::UnknownCommand { word, suggestion } => {
                write!(f, "unknown command '{}'.", crate::redact::excerpt(word))?;
                if let Some(s) = suggestion {
                    let usage = spec::by_name(s).map(CommandSpec::usage).unwrap_or_default();
                    write!(f, " Did you mean '{s}'? Usage: {usage}")?;
                } else {
                    write!(f, " Try 'help' for the list of commands.")?;
                }
                Ok(())
            }
            ParseError::Usage { command, problem } => {
                let usage = spec::by_name(command)
                    .map(CommandSpec::usage)
                    .unwrap_or_default();
                write!(f, "{command}: {problem}. Usage: {usage}")
            }
            ParseError::Lex(e) => write!(f, "{e}"),
            ParseError::TooLong { bytes } => write!(
                f,
                "that line is {bytes} bytes long; Kennel reads commands of up to {MAX_LINE_BYTES} bytes"
            ),
        }
    }
}

/// Parses one line of text (as a person typed it in chat, SSH or a shell).
pub fn parse(text: &str) -> Result<Invocation, ParseError> {
    parse_addressed(text, &[])
}

/// Whether `text` asks for a JSON answer (`--json` anywhere before a
/// `--`), by the parser's own rule, even when the rest of it does not
/// parse: a script that sent a bad line still gets its error as JSON.
pub fn wants_json(text: &str) -> bool {
    if text.len() > MAX_LINE_BYTES {
        return false;
    }
    let line = lex::normalize(text, &[]);
    match lex::tokenize(&line) {
        Ok(tokens) => spec::asks_json(&tokens),
        Err(_) => line
            .split_whitespace()
            .take_while(|w| *w != "--")
            .any(|w| w == "--json"),
    }
}

/// Like [`parse`], also stripping front-end specific addresses such as a
/// Discord mention `<@123>` or a Matrix display name.
pub fn parse_addressed(text: &str, extra_prefixes: &[&str]) -> Result<Invocation, ParseError> {
    if text.len() > MAX_LINE_BYTES {
        return Err(ParseError::TooLong { bytes: text.len() });
    }
    let line = lex::normalize(text, extra_prefixes);
    let tokens = lex::tokenize(&line).map_err(ParseError::Lex)?;
    spec::parse_tokens(tokens)
}

impl fmt::Display for Invocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.json && matches!(self.command, Command::Run { .. }) {
            // After `run NAME`, every word is the command's own: `--json`
            // goes before them.
            let line = self.command.to_string();
            let rest = line.strip_prefix(self.command.name()).unwrap_or(&line);
            return write!(f, "{} --json{rest}", self.command.name());
        }
        write!(f, "{}", self.command)?;
        if self.json {
            write!(f, " --json")?;
        }
        Ok(())
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        spec::write_canonical(self, f)
    }
}
