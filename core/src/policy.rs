//! Who may run what: the one place access decisions are made.
//!
//! [`authorize`] is pure: given the caller's role (or none, for an unknown
//! identity), the command, and the caller's relation to the project it
//! names, it allows or refuses with a reason. The executor looks the
//! relation up in the store; quotas are checked by [`check_quota`].

use crate::command::Command;
use crate::model::{Quota, Resources, Role, Usage};
use crate::names::UserName;

/// How the caller stands to the project a command names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// The command names no project.
    NoProject,
    /// The caller owns it.
    Owner,
    /// It is shared with the caller.
    Shared { ssh: bool, web: bool },
    /// It exists, but the caller has no part in it.
    Stranger,
    /// No project of that name exists.
    Missing,
}

/// Why policy said no, with the reason shown to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The caller may not do this.
    #[error("{0}")]
    Denied(String),
    /// The name asked for belongs to another project: a conflict with
    /// what exists (as `rename` into it is), not a lack of rights.
    #[error("a project named '{0}' already exists; pick another name")]
    Taken(String),
}

impl Refusal {
    /// The reason, as the caller is told it.
    pub fn reason(&self) -> String {
        self.to_string()
    }
}

const UNKNOWN: &str = "Kennel does not know you yet. Ask for access with 'request-access <your SSH public key> [note]'; an admin will approve or deny it.";
const ADMIN_ONLY: &str = "only admins may do that";

/// Decides whether `role` (None: an unknown identity) may run `cmd`.
/// `me` is the caller's user name, to tell "my keys" from someone else's.
pub fn authorize(
    role: Option<Role>,
    me: Option<&UserName>,
    cmd: &Command,
    rel: Relation,
) -> Result<(), Refusal> {
    use Command::*;
    let refuse = |r: &str| Err(Refusal::Denied(r.to_owned()));
    // Anyone, known or not.
    // `yes` re-runs the confirmed command through this policy again.
    if matches!(cmd, Help { .. } | Whoami | RequestAccess { .. } | Yes) {
        return Ok(());
    }
    let Some(role) = role else {
        return refuse(UNKNOWN);
    };
    if role == Role::Admin {
        return Ok(());
    }
    // From here on: a member.
    let not_yours = |name: &str| {
        Err(Refusal::Denied(format!(
            "there is no project '{name}' that you own or that is shared with you; see 'projects'"
        )))
    };
    let owner_only = |name: &str| {
        Err(Refusal::Denied(format!(
            "only the owner of '{name}' or an admin may do that"
        )))
    };
    let project = cmd
        .project()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let someone_else = |u: &Option<UserName>| u.as_ref().is_some_and(|u| Some(u) != me);
    match cmd {
        Projects { .. } | Stacks | Templates | KeyRm { .. } | SecretSet { .. } | SecretRm { .. } | Secrets
        | DeployKey | Login | Logout | Sessions | TokenCreate { .. } | Tokens | TokenRm { .. }
        | SshConfig => Ok(()),
        LlmUsage { user } => {
            if someone_else(user) {
                refuse("only admins may see another user's LLM use; 'llm usage' shows yours")
            } else {
                Ok(())
            }
        }
        Quota { user, change } => {
            if !change.is_empty() {
                refuse("only admins may set quotas; 'quota' shows yours")
            } else if someone_else(user) {
                refuse("only admins may see another user's quota; 'quota' shows yours")
            } else {
                Ok(())
            }
        }
        Keys { user } | KeyAdd { user, .. } => {
            if someone_else(user) {
                refuse("only admins may see or change another user's keys")
            } else {
                Ok(())
            }
        }
        NewProject(n) => match (&n.git, rel) {
            _ if n.host.is_some() => {
                refuse("only admins may choose a project's host (--host); leave it out and Kennel places it")
            }
            (Some(g), _) if g.is_local() => refuse(
                "only admins may clone from file:// URLs or host paths; use an https:// or ssh:// URL",
            ),
            (_, Relation::Missing) => Ok(()),
            _ => Err(Refusal::Taken(project.clone())),
        },
        Status { .. } => match rel {
            Relation::Owner | Relation::Shared { .. } => Ok(()),
            _ => not_yours(&project),
        },
        // Who works in the VM may take a checkpoint and see them; rolling
        // back and removing one are the owner's.
        Ssh { .. }
        | Logs { .. }
        | Start { .. }
        | Stop { .. }
        | Restart { .. }
        | Checkpoint { .. }
        | Checkpoints { .. }
        | Run { .. }
        | RunStop { .. }
        | Agent { .. }
        | AgentStop { .. }
        | Agents { .. } => match rel {
            Relation::Owner | Relation::Shared { ssh: true, .. } => Ok(()),
            Relation::Shared { .. } => Err(Refusal::Denied(format!(
                "'{project}' is shared with you for the web app only; ask its owner for SSH access"
            ))),
            _ => not_yours(&project),
        },
        Rm { .. }
        | Share { .. }
        | Unshare { .. }
        | Public { .. }
        | Private { .. }
        | Port { .. }
        | Idle { .. }
        | Egress { .. }
        | Tag { .. }
        | Untag { .. }
        | Cp { .. }
        | Rename { .. }
        | Rollback { .. }
        | Resize { .. }
        | ShareLink { .. }
        | DomainAdd { .. }
        | DomainRm { .. }
        | Domains { name: Some(_) }
        | Shares { .. }
        | UnshareLink { .. }
        | CheckpointRm { .. } => {
            match rel {
                Relation::Owner => Ok(()),
                Relation::Shared { .. } => owner_only(&project),
                _ => not_yours(&project),
            }
        }
        Domains { name: None } => Ok(()),
        Requests { .. }
        | Approve { .. }
        | Deny { .. }
        | Users
        | UserRename { .. }
        | DomainApprove { .. }
        | Hosts
        | Move { .. }
        | Evacuate { .. }
        | Restore { .. } => {
            refuse(ADMIN_ONLY)
        }
        Help { .. } | Whoami | RequestAccess { .. } | Yes => Ok(()),
    }
}

/// How someone comes into a project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    /// A shell, a forward or a jump into its VM (`ssh PROJECT@HOST`).
    Ssh,
    /// Its web app (`https://PROJECT.DOMAIN`), on its default port.
    Web,
    /// One of its other ports (`PROJECT--PORT.DOMAIN`): never public.
    WebOtherPort,
}

/// The one decision of who may enter a project: over SSH the owner, SSH
/// shares and admins; to the web app also web shares, and anyone at all
/// when the project is public (`role` None: a visitor Kennel does not
/// know). Other ports are private whatever the visibility.
pub fn may_enter(
    role: Option<Role>,
    rel: Relation,
    visibility: crate::model::Visibility,
    entry: Entry,
    name: &str,
) -> Result<(), Refusal> {
    use crate::model::Visibility;
    if role == Some(Role::Admin) {
        return Ok(());
    }
    let allowed = match (entry, rel) {
        (_, Relation::Missing | Relation::NoProject) => false,
        (_, Relation::Owner) => role.is_some(),
        (Entry::Ssh, Relation::Shared { ssh, .. }) => ssh && role.is_some(),
        (Entry::Web | Entry::WebOtherPort, Relation::Shared { web, .. })
            if web && role.is_some() =>
        {
            true
        }
        (Entry::Web, _) => visibility == Visibility::Public,
        (Entry::Ssh | Entry::WebOtherPort, _) => false,
    };
    if allowed {
        return Ok(());
    }
    Err(Refusal::Denied(match (entry, rel) {
        (Entry::Ssh, Relation::Shared { .. }) => format!(
            "'{name}' is shared with you for the web app only; ask its owner for SSH access"
        ),
        _ if role.is_none() => UNKNOWN.into(),
        // Whether it exists is not said to those who may not enter it.
        _ => format!(
            "there is no project '{name}' that you own or that is shared with you; see 'projects'"
        ),
    }))
}

/// Checks that adding `want` to `usage` stays within `quota`.
pub fn check_quota(quota: &Quota, usage: &Usage, want: &Resources) -> Result<(), Refusal> {
    let over = |what: &str, limit: String, have: String| {
        Err(Refusal::Denied(format!(
            "this would exceed your {what} quota ({limit}; you use {have}); remove a project or ask an admin"
        )))
    };
    if let Some(max) = quota.projects {
        if usage.projects.saturating_add(1) > max {
            return over(
                "project",
                format!("{max} projects"),
                usage.projects.to_string(),
            );
        }
    }
    if let Some(max) = quota.vcpus {
        if usage.vcpus.saturating_add(want.vcpus) > max {
            return over("vCPU", format!("{max} vCPUs"), usage.vcpus.to_string());
        }
    }
    if let Some(max) = quota.memory_mib {
        if usage.memory_mib.saturating_add(want.memory_mib) > max {
            return over(
                "memory",
                format!("{max} MiB"),
                format!("{} MiB", usage.memory_mib),
            );
        }
    }
    if let Some(max) = quota.disk_mib {
        if usage.disk_mib.saturating_add(want.disk_mib) > max {
            return over(
                "disk",
                format!("{max} MiB"),
                format!("{} MiB", usage.disk_mib),
            );
        }
    }
    Ok(())
}
