//! The grammar table and the parser it drives.
//!
//! Each [`CommandSpec`] names a command, its positional arguments and
//! options, a summary for help, and a builder that turns the matched words
//! into a typed [`Command`]. Usage lines and help are generated from the same
//! entries, and [`write_canonical`] prints each command back in that grammar.

use std::fmt;

use super::lex::{quote, Token};
use super::values::{GitSource, HostName, Limit, QuotaChange, Size, SlugName};
use super::{Command, Invocation, NewProjectArgs, ParseError};
use crate::keys::{Fingerprint, PublicKey};
use crate::names::{ProjectName, UserName};

/// How a positional argument consumes words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    /// One word.
    Word,
    /// An SSH public key: `type base64 [user@host]`, or all of it quoted.
    PublicKey,
    /// Everything that is left, joined by single spaces (notes, reasons).
    Rest,
    /// Another program's command line (`run NAME COMMAND...`): every word
    /// that is left, as given. Kennel's own options (`--json` too) count
    /// only before it.
    Argv,
}

/// A positional argument.
#[derive(Debug, Clone, Copy)]
pub struct ArgSpec {
    pub name: &'static str,
    pub kind: ArgKind,
    pub required: bool,
}

/// An option (`--name` or `--name VALUE`).
#[derive(Debug, Clone, Copy)]
pub struct FlagSpec {
    pub name: &'static str,
    /// The value's placeholder, or `None` for a switch.
    pub value: Option<&'static str>,
    pub help: &'static str,
}

/// One command of the language.
pub struct CommandSpec {
    /// Canonical name; one or two words.
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub args: &'static [ArgSpec],
    pub flags: &'static [FlagSpec],
    pub summary: &'static str,
    build: fn(&Matched) -> Result<Command, String>,
}

impl fmt::Debug for CommandSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandSpec")
            .field("name", &self.name)
            .finish()
    }
}

impl CommandSpec {
    /// The usage line, e.g. `rm <name> [--purge] [--yes]`.
    pub fn usage(&self) -> String {
        let mut s = self.name.to_owned();
        let flags = |s: &mut String| {
            for fl in self.flags {
                match fl.value {
                    Some(v) => s.push_str(&format!(" [--{} {v}]", fl.name)),
                    None => s.push_str(&format!(" [--{}]", fl.name)),
                }
            }
        };
        let mut flags_written = false;
        for a in self.args {
            let body = match a.kind {
                ArgKind::Rest | ArgKind::Argv => format!("{}...", a.name),
                _ => a.name.to_owned(),
            };
            // Options go before another program's words, which take all
            // that follows.
            if a.kind == ArgKind::Argv {
                flags(&mut s);
                flags_written = true;
            }
            if a.required {
                s.push_str(&format!(" <{body}>"));
            } else {
                s.push_str(&format!(" [{body}]"));
            }
        }
        if !flags_written {
            flags(&mut s);
        }
        s
    }
}

const fn word(name: &'static str) -> ArgSpec {
    ArgSpec {
        name,
        kind: ArgKind::Word,
        required: true,
    }
}
const fn opt_word(name: &'static str) -> ArgSpec {
    ArgSpec {
        name,
        kind: ArgKind::Word,
        required: false,
    }
}
const fn opt_rest(name: &'static str) -> ArgSpec {
    ArgSpec {
        name,
        kind: ArgKind::Rest,
        required: false,
    }
}
const fn rest(name: &'static str) -> ArgSpec {
    ArgSpec {
        name,
        kind: ArgKind::Rest,
        required: true,
    }
}
const fn argv(name: &'static str) -> ArgSpec {
    ArgSpec {
        name,
        kind: ArgKind::Argv,
        required: true,
    }
}
const fn pubkey() -> ArgSpec {
    ArgSpec {
        name: "ssh-public-key",
        kind: ArgKind::PublicKey,
        required: true,
    }
}
const fn switch(name: &'static str, help: &'static str) -> FlagSpec {
    FlagSpec {
        name,
        value: None,
        help,
    }
}
const fn valued(name: &'static str, value: &'static str, help: &'static str) -> FlagSpec {
    FlagSpec {
        name,
        value: Some(value),
        help,
    }
}

const NAME: &[ArgSpec] = &[word("name")];
/// How long a share link works when not told.
pub const DEFAULT_LINK_SECS: u64 = 7 * 86_400;
/// The longest `--expires` of a share link.
pub const MAX_LINK_SECS: u64 = 90 * 86_400;
/// How long `run` lets a command run when not told.
pub const DEFAULT_RUN_TIMEOUT_SECS: u64 = 600;
/// The longest `--timeout` of `run`.
pub const MAX_RUN_TIMEOUT_SECS: u64 = 24 * 3600;
/// How long `agent` lets an agent run when not told.
pub const DEFAULT_AGENT_TIMEOUT_SECS: u64 = 3600;
/// The longest task `agent` passes on.
pub const MAX_TASK_CHARS: usize = 4000;
const USER_FLAG: FlagSpec = valued("user", "USER", "another user's (admins only)");
/// Lines of console log `logs` shows when not told.
pub const DEFAULT_LOG_LINES: u32 = 50;

/// The whole language, in the order `help` lists it.
pub static SPECS: &[CommandSpec] = &[
    CommandSpec {
        name: "help",
        aliases: &["?"],
        args: &[opt_rest("command")],
        flags: &[],
        summary: "List the commands, or explain one",
        build: |m| {
            let topic = match m.arg("command") {
                None => None,
                Some(t) => Some(
                    resolve(&t.to_ascii_lowercase())
                        .map(|s| s.name)
                        .ok_or_else(|| match suggest(t) {
                            Some(s) => format!("there is no command {}; did you mean '{s}'?", q(t)),
                            None => format!("there is no command {}", q(t)),
                        })?,
                ),
            };
            Ok(Command::Help { topic })
        },
    },
    CommandSpec {
        name: "whoami",
        aliases: &[],
        args: &[],
        flags: &[],
        summary: "Show who Kennel thinks you are",
        build: |_| Ok(Command::Whoami),
    },
    CommandSpec {
        name: "new project",
        aliases: &[],
        args: NAME,
        flags: &[
            valued(
                "stack",
                "STACK",
                "stack to build on (default: detected from the source)",
            ),
            valued("git", "URL", "clone the source from this git URL"),
            valued(
                "path",
                "PATH",
                "host directory for the source (under a project root)",
            ),
            valued("template", "TEMPLATE", "start from a project template"),
            valued("cpus", "N", "virtual CPUs (1-64)"),
            valued(
                "memory",
                "SIZE",
                "guest memory, e.g. 2G (bare numbers are MiB)",
            ),
            valued(
                "disk",
                "SIZE",
                "root disk size, e.g. 20G (bare numbers are GiB)",
            ),
            switch("adopt", "use an existing non-empty --path as the source"),
            valued(
                "host",
                "HOST",
                "the host to make it on (admins; see 'hosts')",
            ),
        ],
        summary: "Create a project: source, stack, VM and SSH access",
        build: |m| {
            Ok(Command::NewProject(Box::new(NewProjectArgs {
                name: m.req("name", project)?,
                stack: m.value("stack", slug)?,
                git: m.value("git", GitSource::new)?,
                path: m.value("path", path)?,
                template: m.value("template", slug)?,
                cpus: m.value("cpus", cpus)?,
                memory: m.value("memory", memory)?,
                disk: m.value("disk", disk)?,
                adopt: m.switch("adopt"),
                host: m.value("host", HostName::new)?,
            })))
        },
    },
    CommandSpec {
        name: "hosts",
        aliases: &[],
        args: &[],
        flags: &[],
        summary: "List the hosts projects run on: state, load, projects (admins)",
        build: |_| Ok(Command::Hosts),
    },
    CommandSpec {
        name: "move",
        aliases: &[],
        args: &[word("name"), word("host")],
        flags: &[],
        summary: "Move a project's VM to another host (admins)",
        build: |m| {
            Ok(Command::Move {
                name: m.req("name", project)?,
                host: m.req("host", HostName::new)?,
            })
        },
    },
    CommandSpec {
        name: "evacuate",
        aliases: &[],
        args: &[word("host")],
        flags: &[],
        summary: "Move every project off a host and stop placing new ones there (admins)",
        build: |m| {
            Ok(Command::Evacuate {
                host: m.req("host", HostName::new)?,
            })
        },
    },
    CommandSpec {
        name: "restore",
        aliases: &[],
        args: &[word("host")],
        flags: &[],
        summary: "Put an evacuated host back and move its projects home (admins)",
        build: |m| {
            Ok(Command::Restore {
                host: m.req("host", HostName::new)?,
            })
        },
    },
    CommandSpec {
        name: "projects",
        aliases: &["ls"],
        args: &[],
        flags: &[valued("tag", "TAG", "only those with this tag")],
        summary: "List your projects and those shared with you",
        build: |m| {
            Ok(Command::Projects {
                tag: m.value("tag", slug)?,
            })
        },
    },
    CommandSpec {
        name: "status",
        aliases: &[],
        args: NAME,
        flags: &[],
        summary: "Show a project's state, resources and addresses",
        build: |m| {
            Ok(Command::Status {
                name: m.req("name", project)?,
            })
        },
    },
    CommandSpec {
        name: "start",
        aliases: &[],
        args: NAME,
        flags: &[],
        summary: "Start a project's VM",
        build: |m| {
            Ok(Command::Start {
                name: m.req("name", project)?,
            })
        },
    },
    CommandSpec {
        name: "stop",
        aliases: &[],
        args: NAME,
        flags: &[],
        summary: "Stop a project's VM",
        build: |m| {
            Ok(Command::Stop {
                name: m.req("name", project)?,
            })
        },
    },
    CommandSpec {
        name: "restart",
        aliases: &[],
        args: NAME,
        flags: &[],
        summary: "Restart a project's VM",
        build: |m| {
            Ok(Command::Restart {
                name: m.req("name", project)?,
            })
        },
    },
    CommandSpec {
        name: "rm",
        aliases: &["delete"],
        args: NAME,
        flags: &[
            switch("purge", "also delete the source directory on the host"),
            switch("yes", "do not ask for confirmation"),
        ],
        summary: "Destroy a project's VM and disk (the source stays unless --purge)",
        build: |m| {
            Ok(Command::Rm {
                name: m.req("name", project)?,
                purge: m.switch("purge"),
                yes: m.switch("yes"),
            })
        },
    },
    CommandSpec {
        name: "ssh",
        aliases: &["connect"],
        args: NAME,
        flags: &[],
        summary: "Show how to connect to a project over SSH and from editors",
        build: |m| {
            Ok(Command::Ssh {
                name: m.req("name", project)?,
            })
        },
    },
    CommandSpec {
        name: "logs",
        aliases: &[],
        args: NAME,
        flags: &[valued("lines", "N", "how many lines (default 50)")],
        summary: "Show the end of a project's VM console log",
        build: |m| {
            Ok(Command::Logs {
                name: m.req("name", project)?,
                lines: m.value("lines", lines)?.unwrap_or(DEFAULT_LOG_LINES),
            })
        },
    },
    CommandSpec {
        name: "share",
        aliases: &[],
        args: &[word("name"), opt_word("user")],
        flags: &[
            switch("ssh", "share SSH access"),
            switch("web", "share the web app"),
            switch(
                "link",
                "a one-use link for someone without an account (no user)",
            ),
            valued("port", "P", "the link opens this port's site only"),
            valued(
                "expires",
                "DURATION",
                "the link works this long (default 7d, at most 90d)",
            ),
            valued("note", "TEXT", "who the link is for, shown in 'shares'"),
        ],
        summary: "Share a project with a user (SSH and web unless one is named), or by a one-use link (--link)",
        build: |m| {
            let name = m.req("name", project)?;
            if m.switch("link") {
                if m.arg("user").is_some() {
                    return Err("a link is for someone without an account: give no user with --link, or share with the user without it".into());
                }
                if m.switch("ssh") || m.switch("web") {
                    return Err("a link opens the web app only; --ssh and --web are for users".into());
                }
                let expires_secs = match m.value("expires", duration)? {
                    Some(s) if s > MAX_LINK_SECS => {
                        return Err("--expires is at most 90d".into())
                    }
                    Some(s) => s,
                    None => DEFAULT_LINK_SECS,
                };
                return Ok(Command::ShareLink {
                    name,
                    port: m.value("port", app_port)?,
                    expires_secs,
                    note: m.value("note", note)?,
                });
            }
            if ["port", "expires", "note"]
                .iter()
                .any(|f| m.flags.iter().any(|(n, _)| n == f))
            {
                return Err("--port, --expires and --note are for links: add --link".into());
            }
            let (ssh, web) = (m.switch("ssh"), m.switch("web"));
            Ok(Command::Share {
                name,
                user: m.req("user", user)?,
                ssh: ssh || !web,
                web: web || !ssh,
            })
        },
    },
    CommandSpec {
        name: "domain add",
        aliases: &[],
        args: &[word("name"), word("host")],
        flags: &[],
        summary: "Serve a project's app at a host name of yours (its DNS must point here; members wait for an admin)",
        build: |m| {
            Ok(Command::DomainAdd {
                name: m.req("name", project)?,
                host: m.req("host", crate::dns::custom_host)?,
            })
        },
    },
    CommandSpec {
        name: "domain rm",
        aliases: &[],
        args: &[word("name"), word("host")],
        flags: &[],
        summary: "Stop serving a project at a custom domain",
        build: |m| {
            Ok(Command::DomainRm {
                name: m.req("name", project)?,
                host: m.req("host", crate::dns::custom_host)?,
            })
        },
    },
    CommandSpec {
        name: "domain approve",
        aliases: &[],
        args: &[word("host")],
        flags: &[],
        summary: "Approve a member's custom domain (admins)",
        build: |m| {
            Ok(Command::DomainApprove {
                host: m.req("host", crate::dns::custom_host)?,
            })
        },
    },
    CommandSpec {
        name: "domains",
        aliases: &[],
        args: &[opt_word("name")],
        flags: &[],
        summary: "List custom domains: a project's, or all of yours",
        build: |m| {
            Ok(Command::Domains {
                name: m.arg("name").map(project).transpose()?,
            })
        },
    },
    CommandSpec {
        name: "shares",
        aliases: &[],
        args: NAME,
        flags: &[],
        summary: "List who a project is shared with, and its share links",
        build: |m| {
            Ok(Command::Shares {
                name: m.req("name", project)?,
            })
        },
    },
    CommandSpec {
        name: "unshare",
        aliases: &[],
        args: &[word("name"), word("user")],
        flags: &[],
        summary: "Stop sharing a project with a user, or revoke a share link by its id",
        build: |m| {
            let name = m.req("name", project)?;
            let who = m.arg("user").unwrap_or_default();
            let digits = who.trim_start_matches('#');
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                return Ok(Command::UnshareLink {
                    name,
                    id: request_id(digits)?,
                });
            }
            Ok(Command::Unshare {
                name,
                user: m.req("user", user)?,
            })
        },
    },
    CommandSpec {
        name: "public",
        aliases: &[],
        args: NAME,
        flags: &[],
        summary: "Let anyone with the URL reach a project's web app",
        build: |m| {
            Ok(Command::Public {
                name: m.req("name", project)?,
            })
        },
    },
    CommandSpec {
        name: "private",
        aliases: &[],
        args: NAME,
        flags: &[],
        summary: "Limit a project's web app to its owner and shares (default)",
        build: |m| {
            Ok(Command::Private {
                name: m.req("name", project)?,
            })
        },
    },
    CommandSpec {
        name: "port",
        aliases: &[],
        args: &[word("name"), word("port")],
        flags: &[],
        summary: "Set the app port the HTTPS gateway forwards to",
        build: |m| {
            Ok(Command::Port {
                name: m.req("name", project)?,
                port: m.req("port", app_port)?,
            })
        },
    },
    CommandSpec {
        name: "idle",
        aliases: &[],
        args: &[word("name"), word("limit")],
        flags: &[],
        summary: "Stop a project's VM after it sits idle this long (30m, 2h, never, default)",
        build: |m| {
            Ok(Command::Idle {
                name: m.req("name", project)?,
                limit: m.req("limit", idle_limit)?,
            })
        },
    },
    CommandSpec {
        name: "egress",
        aliases: &[],
        args: &[word("name"), opt_word("action"), opt_rest("destinations")],
        flags: &[],
        summary: "Show who a project's VM may reach, or change it: open, closed, default, allow DEST..., allow-once DEST..., deny DEST..., forget DEST... (DEST: name, *.name, address or block, :PORT or not)",
        build: |m| {
            Ok(Command::Egress {
                name: m.req("name", project)?,
                change: egress_change(m.arg("action"), m.arg("destinations"))?,
            })
        },
    },
    CommandSpec {
        name: "tag",
        aliases: &[],
        args: &[word("name"), rest("tags")],
        flags: &[],
        summary: "Tag a project (for 'projects --tag'): one or more tags",
        build: |m| {
            Ok(Command::Tag {
                name: m.req("name", project)?,
                tags: m.req("tags", tags)?,
            })
        },
    },
    CommandSpec {
        name: "untag",
        aliases: &[],
        args: &[word("name"), rest("tags")],
        flags: &[],
        summary: "Remove tags from a project",
        build: |m| {
            Ok(Command::Untag {
                name: m.req("name", project)?,
                tags: m.req("tags", tags)?,
            })
        },
    },
    CommandSpec {
        name: "resize",
        aliases: &[],
        args: NAME,
        flags: &[
            valued("cpus", "N", "virtual CPUs (1-64), from the next start"),
            valued("memory", "SIZE", "guest memory, from the next start"),
            valued(
                "disk",
                "SIZE",
                "root disk size (grows only; at once while it runs)",
            ),
        ],
        summary: "Change a project's CPUs, memory or disk, within your quota",
        build: |m| {
            let (cpus, memory, disk) = (
                m.value("cpus", cpus)?,
                m.value("memory", memory)?,
                m.value("disk", disk)?,
            );
            if cpus.is_none() && memory.is_none() && disk.is_none() {
                return Err("say what to change: --cpus, --memory or --disk".into());
            }
            Ok(Command::Resize {
                name: m.req("name", project)?,
                cpus,
                memory,
                disk,
            })
        },
    },
    CommandSpec {
        name: "run",
        aliases: &[],
        args: &[word("name"), argv("command")],
        flags: &[valued(
            "timeout",
            "DURATION",
            "stop it after this long (default 10m; up to 24h)",
        )],
        summary: "Run a command in a project's VM, as dev in /workspace; its words go as given (options for Kennel come before them)",
        build: |m| {
            let timeout_secs = match m.value("timeout", duration)? {
                Some(s) if s > MAX_RUN_TIMEOUT_SECS => {
                    return Err("--timeout is at most 24h".into())
                }
                Some(s) => s,
                None => DEFAULT_RUN_TIMEOUT_SECS,
            };
            if m.argv.is_empty() {
                return Err("missing <command>".into());
            }
            Ok(Command::Run {
                name: m.req("name", project)?,
                argv: m.argv.clone(),
                timeout_secs,
            })
        },
    },
    CommandSpec {
        name: "run stop",
        aliases: &[],
        args: NAME,
        flags: &[],
        summary: "Stop what 'run' is running in a project's VM",
        build: |m| {
            Ok(Command::RunStop {
                name: m.req("name", project)?,
            })
        },
    },
    CommandSpec {
        name: "agent",
        aliases: &[],
        args: &[word("name"), argv("task")],
        flags: &[
            valued("with", "AGENT", "an agent the operator configured (default: the project's .kennel/agent, else the first configured)"),
            valued("timeout", "DURATION", "stop it after this long (default 1h; up to 24h)"),
        ],
        summary: "Run a coding agent on a task in a project's VM, after a checkpoint to roll back to",
        build: |m| {
            let timeout_secs = match m.value("timeout", duration)? {
                Some(s) if s > MAX_RUN_TIMEOUT_SECS => {
                    return Err("--timeout is at most 24h".into())
                }
                Some(s) => s,
                None => DEFAULT_AGENT_TIMEOUT_SECS,
            };
            let task = m.argv.join(" ");
            if task.trim().is_empty() {
                return Err("missing <task>: say what the agent should do".into());
            }
            if task.chars().count() > MAX_TASK_CHARS || task.contains('\0') {
                return Err(format!("a task is at most {MAX_TASK_CHARS} characters"));
            }
            Ok(Command::Agent {
                name: m.req("name", project)?,
                with: m.value("with", slug)?,
                task,
                timeout_secs,
            })
        },
    },
    CommandSpec {
        name: "agent stop",
        aliases: &[],
        args: NAME,
        flags: &[],
        summary: "Stop a project's agent run",
        build: |m| {
            Ok(Command::AgentStop {
                name: m.req("name", project)?,
            })
        },
    },
    CommandSpec {
        name: "agents",
        aliases: &[],
        args: NAME,
        flags: &[],
        summary: "A project's agent runs: when, who, task, result, the checkpoint before each",
        build: |m| {
            Ok(Command::Agents {
                name: m.req("name", project)?,
            })
        },
    },
    CommandSpec {
        name: "quota",
        aliases: &["quotas"],
        args: &[opt_word("user")],
        flags: &[
            valued("projects", "N", "how many projects (or unlimited, default)"),
            valued("cpus", "N", "vCPUs in all"),
            valued("memory", "SIZE", "memory in all, e.g. 32G"),
            valued("disk", "SIZE", "disk in all, checkpoints included"),
        ],
        summary: "Show quotas and use; admins set a user's own limits",
        build: |m| {
            let change = QuotaChange {
                projects: m.value("projects", Limit::parse_count)?,
                vcpus: m.value("cpus", Limit::parse_count)?,
                memory_mib: m.value("memory", |s| Limit::parse_size(s, 'M'))?,
                disk_mib: m.value("disk", |s| Limit::parse_size(s, 'G'))?,
            };
            let user = m.arg("user").map(user).transpose()?;
            if user.is_none() && !change.is_empty() {
                return Err("name the user whose quota to set".into());
            }
            Ok(Command::Quota { user, change })
        },
    },
    CommandSpec {
        name: "keys",
        aliases: &[],
        args: &[],
        flags: &[USER_FLAG],
        summary: "List your SSH keys",
        build: |m| {
            Ok(Command::Keys {
                user: m.value("user", user)?,
            })
        },
    },
    CommandSpec {
        name: "key add",
        aliases: &[],
        args: &[pubkey(), opt_rest("label")],
        flags: &[USER_FLAG],
        summary: "Add an SSH public key to your account",
        build: |m| {
            Ok(Command::KeyAdd {
                key: m.req("ssh-public-key", key)?,
                label: m.text("label"),
                user: m.value("user", user)?,
            })
        },
    },
    CommandSpec {
        name: "key rm",
        aliases: &[],
        args: &[word("fingerprint")],
        flags: &[],
        summary: "Revoke an SSH key by its fingerprint",
        build: |m| {
            Ok(Command::KeyRm {
                fingerprint: m.req("fingerprint", |s| {
                    Fingerprint::new(s).map_err(|e| e.to_string())
                })?,
            })
        },
    },
    CommandSpec {
        name: "request-access",
        aliases: &["request"],
        args: &[pubkey(), opt_rest("note")],
        flags: &[],
        summary: "Ask the admins for access with your SSH public key",
        build: |m| {
            Ok(Command::RequestAccess {
                key: m.req("ssh-public-key", key)?,
                note: m.text("note"),
            })
        },
    },
    CommandSpec {
        name: "requests",
        aliases: &[],
        args: &[],
        flags: &[switch("all", "include decided requests")],
        summary: "List pending access requests (admins)",
        build: |m| {
            Ok(Command::Requests {
                all: m.switch("all"),
            })
        },
    },
    CommandSpec {
        name: "approve",
        aliases: &[],
        args: &[word("id"), opt_rest("as NAME")],
        flags: &[],
        summary: "Approve an access request (admins); 'as NAME' names a new user",
        build: |m| {
            let name = match m.text("as NAME") {
                None => None,
                Some(t) => match t.split_whitespace().collect::<Vec<_>>().as_slice() {
                    ["as", n] => Some(user(n)?),
                    _ => return Err("say 'approve ID' or 'approve ID as NAME'".into()),
                },
            };
            Ok(Command::Approve {
                id: m.req("id", request_id)?,
                name,
            })
        },
    },
    CommandSpec {
        name: "deny",
        aliases: &[],
        args: &[word("id"), opt_rest("reason")],
        flags: &[],
        summary: "Deny an access request, with an optional reason (admins)",
        build: |m| {
            Ok(Command::Deny {
                id: m.req("id", request_id)?,
                reason: m.text("reason"),
            })
        },
    },
    CommandSpec {
        name: "users",
        aliases: &[],
        args: &[],
        flags: &[],
        summary: "List users (admins)",
        build: |_| Ok(Command::Users),
    },
    CommandSpec {
        name: "user rename",
        aliases: &[],
        args: &[word("user"), word("new-name")],
        flags: &[],
        summary: "Rename a user (admins)",
        build: |m| {
            Ok(Command::UserRename {
                from: m.req("user", user)?,
                to: m.req("new-name", user)?,
            })
        },
    },
    CommandSpec {
        name: "stacks",
        aliases: &[],
        args: &[],
        flags: &[],
        summary: "List the stacks projects can be built on",
        build: |_| Ok(Command::Stacks),
    },
    CommandSpec {
        name: "templates",
        aliases: &[],
        args: &[],
        flags: &[],
        summary: "List the project templates",
        build: |_| Ok(Command::Templates),
    },
    CommandSpec {
        name: "yes",
        aliases: &["confirm"],
        args: &[],
        flags: &[],
        summary: "Confirm what Kennel just asked you to confirm (within 5 minutes)",
        build: |_| Ok(Command::Yes),
    },
    CommandSpec {
        name: "cp",
        aliases: &["copy"],
        args: &[word("name"), word("new-name")],
        flags: &[],
        summary: "Copy a project, or one of its checkpoints (NAME@LABEL): disk and source",
        build: |m| {
            let (name, at) = m.req("name", project_at)?;
            Ok(Command::Cp {
                name,
                at,
                new_name: m.req("new-name", project)?,
            })
        },
    },
    CommandSpec {
        name: "checkpoint",
        aliases: &["snapshot"],
        args: &[word("name"), opt_word("label")],
        flags: &[valued("note", "TEXT", "why, for the list (quote it)")],
        summary: "Take a checkpoint of a project: its disk and its source, to roll back to",
        build: |m| {
            Ok(Command::Checkpoint {
                name: m.req("name", project)?,
                label: m.arg("label").map(slug).transpose()?,
                note: m.value("note", note)?,
            })
        },
    },
    CommandSpec {
        name: "checkpoints",
        aliases: &["snapshots"],
        args: NAME,
        flags: &[],
        summary: "List a project's checkpoints",
        build: |m| {
            Ok(Command::Checkpoints {
                name: m.req("name", project)?,
            })
        },
    },
    CommandSpec {
        name: "rollback",
        aliases: &[],
        args: &[word("name"), word("label")],
        flags: &[switch("yes", "do not ask for confirmation")],
        summary: "Put a project's disk and source back as they were at a checkpoint",
        build: |m| {
            Ok(Command::Rollback {
                name: m.req("name", project)?,
                label: m.req("label", slug)?,
                yes: m.switch("yes"),
            })
        },
    },
    CommandSpec {
        name: "checkpoint rm",
        aliases: &[],
        args: &[word("name"), word("label")],
        flags: &[],
        summary: "Remove a checkpoint",
        build: |m| {
            Ok(Command::CheckpointRm {
                name: m.req("name", project)?,
                label: m.req("label", slug)?,
            })
        },
    },
    CommandSpec {
        name: "rename",
        aliases: &["mv"],
        args: &[word("name"), word("new-name")],
        flags: &[],
        summary: "Rename a project; its SSH and web addresses follow",
        build: |m| {
            Ok(Command::Rename {
                name: m.req("name", project)?,
                new_name: m.req("new-name", project)?,
            })
        },
    },
    CommandSpec {
        name: "secret set",
        aliases: &[],
        args: &[word("name"), word("value")],
        flags: &[],
        summary: "Store a secret, e.g. git-token for https:// clones (never shown again)",
        build: |m| {
            Ok(Command::SecretSet {
                name: m.req("name", slug)?,
                value: m.req("value", secret_value)?,
            })
        },
    },
    CommandSpec {
        name: "secret rm",
        aliases: &[],
        args: &[word("name")],
        flags: &[],
        summary: "Delete a secret",
        build: |m| {
            Ok(Command::SecretRm {
                name: m.req("name", slug)?,
            })
        },
    },
    CommandSpec {
        name: "secrets",
        aliases: &[],
        args: &[],
        flags: &[],
        summary: "List the names of your secrets",
        build: |_| Ok(Command::Secrets),
    },
    CommandSpec {
        name: "llm usage",
        aliases: &[],
        args: &[opt_word("user")],
        flags: &[],
        summary: "Show today's LLM gateway use (requests, tokens) and your limits",
        build: |m| {
            Ok(Command::LlmUsage {
                user: m.arg("user").map(user).transpose()?,
            })
        },
    },
    CommandSpec {
        name: "deploy-key",
        aliases: &[],
        args: &[],
        flags: &[],
        summary: "Show your deploy key for ssh:// git clones (add it to your git host)",
        build: |_| Ok(Command::DeployKey),
    },
    CommandSpec {
        name: "login",
        aliases: &[],
        args: &[],
        flags: &[],
        summary: "Get a one-time link that signs your browser in to private apps and the dashboard",
        build: |_| Ok(Command::Login),
    },
    CommandSpec {
        name: "logout",
        aliases: &[],
        args: &[],
        flags: &[],
        summary: "Sign all your browsers out",
        build: |_| Ok(Command::Logout),
    },
    CommandSpec {
        name: "sessions",
        aliases: &[],
        args: &[],
        flags: &[],
        summary: "List the browsers you are signed in with",
        build: |_| Ok(Command::Sessions),
    },
    CommandSpec {
        name: "ssh-config",
        aliases: &[],
        args: &[],
        flags: &[],
        summary: "Print ssh_config Host blocks for your projects (ssh HOST ssh-config > ~/.ssh/kennel_config)",
        build: |_| Ok(Command::SshConfig),
    },
    CommandSpec {
        name: "token create",
        aliases: &[],
        args: &[opt_word("label")],
        flags: &[valued(
            "expires",
            "DURATION",
            "e.g. 30d, 12h (default: until removed)",
        )],
        summary: "Make a token for the HTTP API (shown once)",
        build: |m| {
            Ok(Command::TokenCreate {
                label: m.arg("label").map(slug).transpose()?,
                expires: m.value("expires", duration)?,
            })
        },
    },
    CommandSpec {
        name: "tokens",
        aliases: &[],
        args: &[],
        flags: &[],
        summary: "List your HTTP API tokens",
        build: |_| Ok(Command::Tokens),
    },
    CommandSpec {
        name: "token rm",
        aliases: &[],
        args: &[word("label")],
        flags: &[],
        summary: "Revoke an HTTP API token",
        build: |m| {
            Ok(Command::TokenRm {
                label: m.req("label", slug)?,
            })
        },
    },
];

/// A duration such as `90s`, `45m`, `12h` or `30d`, in seconds.
fn duration(s: &str) -> Result<u64, String> {
    let bad = || format!("{} is not a duration (e.g. 30d, 12h, 45m)", q(s));
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    match n.checked_mul(mult) {
        Some(secs) if secs > 0 && secs <= 5 * 365 * 86_400 => Ok(secs),
        _ => Err(format!("{} is out of range (1s to 5 years)", q(s))),
    }
}

fn secret_value(v: &str) -> Result<String, String> {
    if v.is_empty() || v.chars().any(char::is_control) {
        Err("the secret value is empty or has control characters".into())
    } else {
        Ok(v.to_owned())
    }
}

// ------------------------------------------------------------ value converters

fn project(s: &str) -> Result<ProjectName, String> {
    ProjectName::new(s).map_err(|e| e.to_string())
}
fn user(s: &str) -> Result<UserName, String> {
    UserName::new(s).map_err(|e| e.to_string())
}
fn key(s: &str) -> Result<PublicKey, String> {
    PublicKey::parse(s).map_err(|e| e.to_string())
}
fn slug(s: &str) -> Result<SlugName, String> {
    SlugName::new(s)
}
/// `egress NAME [ACTION [DEST...]]`.
fn egress_change(
    action: Option<&str>,
    dests: Option<&str>,
) -> Result<Option<super::EgressChange>, String> {
    use super::EgressChange;
    use crate::egress::{DestHost, Destination, EgressMode};
    let Some(action) = action else {
        return Ok(None);
    };
    let list = || -> Result<Vec<Destination>, String> {
        let mut out: Vec<Destination> = Vec::new();
        for w in dests.unwrap_or_default().split_whitespace() {
            let d = Destination::parse(w)?;
            if !out.contains(&d) {
                out.push(d);
            }
        }
        if out.is_empty() {
            return Err(format!("'{action}' needs one or more destinations: a name (api.example.com, *.example.com), an address or a block (203.0.113.0/24), with :PORT or not"));
        }
        if out.len() > 32 {
            return Err("give at most 32 destinations at once".into());
        }
        Ok(out)
    };
    let mode = |m: Option<EgressMode>| {
        if dests.is_some() {
            return Err(format!("'{action}' takes no destinations"));
        }
        Ok(Some(EgressChange::Mode(m)))
    };
    match action {
        "open" => mode(Some(EgressMode::Open)),
        "closed" | "close" => mode(Some(EgressMode::Closed)),
        "default" => mode(None),
        "allow" => Ok(Some(EgressChange::Allow {
            dests: list()?,
            once: false,
        })),
        "allow-once" => Ok(Some(EgressChange::Allow {
            dests: list()?,
            once: true,
        })),
        "deny" => {
            let l = list()?;
            if let Some(d) = l
                .iter()
                .find(|d| matches!(d.host, DestHost::Name(_)) && d.port.is_some())
            {
                return Err(format!("a name is denied whole: deny {} without :PORT, or allow only the ports it may use", match &d.host { DestHost::Name(n) => n.as_str(), DestHost::Net { .. } => "" }));
            }
            Ok(Some(EgressChange::Deny(l)))
        }
        "forget" => Ok(Some(EgressChange::Forget(list()?))),
        other => Err(format!(
            "egress takes open, closed, default, allow, allow-once, deny or forget, not '{other}'"
        )),
    }
}

/// Tags: slugs separated by spaces, each named once.
fn tags(s: &str) -> Result<Vec<SlugName>, String> {
    let mut out: Vec<SlugName> = Vec::new();
    for w in s.split_whitespace() {
        let t = slug(w)?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.is_empty() {
        return Err("name at least one tag".into());
    }
    if out.len() > crate::model::MAX_TAGS {
        return Err(format!(
            "a project carries at most {} tags",
            crate::model::MAX_TAGS
        ));
    }
    Ok(out)
}
/// `NAME` or `NAME@LABEL` (a checkpoint of the project).
fn project_at(s: &str) -> Result<(ProjectName, Option<SlugName>), String> {
    match s.split_once('@') {
        None => Ok((project(s)?, None)),
        Some((name, label)) => {
            let label = SlugName::new(label)
                .map_err(|e| format!("after '@' comes a checkpoint's label: {e}"))?;
            Ok((project(name)?, Some(label)))
        }
    }
}
/// A checkpoint's note: one line of text, not too long.
fn note(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() || s.chars().count() > 200 || s.chars().any(char::is_control) {
        return Err("a note is one line of 1 to 200 characters".into());
    }
    Ok(s.to_owned())
}
fn path(s: &str) -> Result<String, String> {
    if s.is_empty() || s.chars().any(char::is_control) {
        return Err(format!("{} is not a path", q(s)));
    }
    Ok(s.to_owned())
}
fn cpus(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n @ 1..=64) => Ok(n),
        _ => Err(format!(
            "--cpus must be a whole number from 1 to 64, not {}",
            q(s)
        )),
    }
}
fn memory(s: &str) -> Result<Size, String> {
    let size = Size::parse(s, 'M')?;
    if size.mib < 256 {
        return Err("--memory must be at least 256M".into());
    }
    Ok(size)
}
fn disk(s: &str) -> Result<Size, String> {
    let size = Size::parse(s, 'G')?;
    if size.mib < 1024 {
        return Err("--disk must be at least 1G".into());
    }
    Ok(size)
}
fn lines(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n @ 1..=10_000) => Ok(n),
        _ => Err(format!(
            "--lines must be a number from 1 to 10000, not {}",
            q(s)
        )),
    }
}
fn app_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(22) => Err("port 22 is the VM's sshd; pick the port your app listens on".into()),
        Ok(p @ 1..=65535) => Ok(p),
        _ => Err(format!("{} is not a port (1-65535)", q(s))),
    }
}
fn idle_limit(s: &str) -> Result<Option<crate::model::IdleStop>, String> {
    if s.eq_ignore_ascii_case("default") {
        return Ok(None);
    }
    crate::model::IdleStop::parse(s).map(Some)
}
fn request_id(s: &str) -> Result<i64, String> {
    let t = s.trim_start_matches('#');
    match t.parse::<i64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{} is not a request id; see 'requests'", q(s))),
    }
}

/// A bad value quoted back: a short prefix, credentials removed.
pub(super) fn q(s: &str) -> String {
    format!("{:?}", crate::redact::excerpt(s))
}

// ------------------------------------------------------------ matching

/// The words matched to a spec's arguments and options.
#[derive(Debug, Default)]
pub(super) struct Matched {
    args: Vec<(&'static str, String)>,
    flags: Vec<(&'static str, Option<String>)>,
    /// The words of an [`ArgKind::Argv`] argument.
    argv: Vec<String>,
}

impl Matched {
    fn arg(&self, name: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
    fn req<T>(&self, name: &str, conv: impl Fn(&str) -> Result<T, String>) -> Result<T, String> {
        conv(self.arg(name).ok_or_else(|| format!("missing <{name}>"))?)
    }
    fn text(&self, name: &str) -> Option<String> {
        self.arg(name)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    }
    fn switch(&self, name: &str) -> bool {
        self.flags.iter().any(|(n, _)| *n == name)
    }
    fn value<T>(
        &self,
        name: &str,
        conv: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        match self.flags.iter().find(|(n, _)| *n == name) {
            Some((_, Some(v))) => conv(v).map(Some),
            _ => Ok(None),
        }
    }
}

/// The spec whose name or alias is `name` (one or two words, lowercase).
pub(super) fn resolve(name: &str) -> Option<&'static CommandSpec> {
    let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
    SPECS
        .iter()
        .find(|s| s.name == name || s.aliases.contains(&name.as_str()))
        .or_else(|| {
            // `help new` → new project; `help key` → key add.
            SPECS
                .iter()
                .find(|s| s.name.split(' ').next() == Some(name.as_str()))
        })
}

/// The spec with exactly this canonical name.
pub(super) fn by_name(name: &str) -> Option<&'static CommandSpec> {
    SPECS.iter().find(|s| s.name == name)
}

/// The closest command name to a mistyped one, if any is close.
fn suggest(word: &str) -> Option<&'static str> {
    let word = word.to_ascii_lowercase();
    SPECS
        .iter()
        .flat_map(|s| {
            std::iter::once(s.name)
                .chain(s.aliases.iter().copied())
                .map(move |n| (s.name, n))
        })
        .map(|(canon, n)| {
            let first = n.split(' ').next().unwrap_or(n);
            let d = strsim::levenshtein(&word, n).min(strsim::levenshtein(&word, first));
            (d, canon)
        })
        .filter(|(d, _)| *d <= 2.max(word.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

fn suggest_flag(spec: &CommandSpec, name: &str) -> Option<&'static str> {
    spec.flags
        .iter()
        .map(|f| (strsim::levenshtein(name, f.name), f.name))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

/// Parses tokens into an invocation.
/// Whether the tokens carry `--json` (unquoted, before a `--`): the rule
/// [`parse_tokens`] applies.
pub(super) fn asks_json(tokens: &[Token]) -> bool {
    let own = argv_start(tokens).unwrap_or(tokens.len());
    tokens
        .get(..own)
        .unwrap_or(tokens)
        .iter()
        .take_while(|t| t.quoted || t.text != "--")
        .any(|t| !t.quoted && t.text == "--json")
}

/// Whether a word is one of the options every command takes.
fn global_option(t: &Token) -> bool {
    !t.quoted && matches!(t.text.as_str(), "--json" | "--help" | "-h")
}

/// The spec the command words at the start of `tokens` name (skipping
/// the options every command takes), and how many tokens it used.
fn command_of(tokens: &[Token]) -> Option<(&'static CommandSpec, usize)> {
    let skip = tokens.iter().take_while(|t| global_option(t)).count();
    let w1 = tokens.get(skip)?.text.to_ascii_lowercase();
    if let Some(w2) = tokens.get(skip + 1) {
        let two = format!("{w1} {}", w2.text.to_ascii_lowercase());
        if let Some(s) = by_name(&two).filter(|s| s.name.contains(' ')) {
            return Some((s, skip + 2));
        }
    }
    SPECS
        .iter()
        .find(|s| !s.name.contains(' ') && (s.name == w1 || s.aliases.contains(&w1.as_str())))
        .map(|s| (s, skip + 1))
}

/// Where the words of another program's command line begin, for a
/// command that takes one ([`ArgKind::Argv`]): after its own words,
/// arguments and options (and a `--` that ends them). From there on
/// every token is that program's, as given.
fn argv_start(tokens: &[Token]) -> Option<usize> {
    let (spec, used) = command_of(tokens)?;
    if !spec.args.iter().any(|a| a.kind == ArgKind::Argv) {
        return None;
    }
    let before = spec.args.iter().filter(|a| a.kind != ArgKind::Argv).count();
    let mut seen = 0;
    let mut i = used;
    while let Some(t) = tokens.get(i) {
        if seen == before && (t.quoted || !t.text.starts_with('-') || t.text == "-") {
            return Some(i);
        }
        if !t.quoted && t.text == "--" {
            return (seen == before).then_some(i + 1);
        }
        if global_option(t) {
            i += 1;
            continue;
        }
        if !t.quoted && t.text.starts_with("--") {
            let body = t.text.get(2..).unwrap_or_default();
            let takes_value = spec
                .flags
                .iter()
                .any(|f| f.name == body && f.value.is_some());
            i += if takes_value { 2 } else { 1 };
            continue;
        }
        seen += 1;
        i += 1;
    }
    Some(tokens.len())
}

pub(super) fn parse_tokens(mut tokens: Vec<Token>) -> Result<Invocation, ParseError> {
    // Another program's words are taken as given: quoted, they are
    // never Kennel's options.
    if let Some(start) = argv_start(&tokens) {
        for t in tokens.iter_mut().skip(start) {
            t.quoted = true;
        }
    }
    let mut json = false;
    let mut help = false;
    let mut rest: Vec<Token> = Vec::with_capacity(tokens.len());
    let mut literal = false;
    for t in tokens {
        if !t.quoted && !literal {
            match t.text.as_str() {
                "--json" => {
                    json = true;
                    continue;
                }
                "--help" | "-h" => {
                    help = true;
                    continue;
                }
                "--" => literal = true,
                _ => {}
            }
        }
        rest.push(t);
    }
    let Some(first) = rest.first() else {
        return if help {
            Ok(Invocation {
                command: Command::Help { topic: None },
                json,
            })
        } else {
            Err(ParseError::Empty)
        };
    };
    let w1 = first.text.to_ascii_lowercase();
    let w2 = rest.get(1).map(|t| t.text.to_ascii_lowercase());
    let two = w2.as_ref().map(|w2| format!("{w1} {w2}"));
    let (spec, used) = match two.as_deref().and_then(|t| by_name(t).map(|s| (s, t))) {
        Some((s, _)) if s.name.contains(' ') => (s, 2),
        _ => match SPECS
            .iter()
            .find(|s| !s.name.contains(' ') && (s.name == w1 || s.aliases.contains(&w1.as_str())))
        {
            Some(s) => (s, 1),
            None => {
                // `new myapp`, `key ssh-ed25519 ...`: a two-word command missing its second word.
                if let Some(s) = SPECS
                    .iter()
                    .find(|s| s.name.split(' ').next() == Some(w1.as_str()))
                {
                    return Err(ParseError::Usage {
                        command: s.name,
                        problem: format!("say '{}'", s.name),
                    });
                }
                return Err(ParseError::UnknownCommand {
                    word: first.text.clone(),
                    suggestion: suggest(&w1),
                });
            }
        },
    };
    if help {
        return Ok(Invocation {
            command: Command::Help {
                topic: Some(spec.name),
            },
            json,
        });
    }
    let usage = |problem: String| ParseError::Usage {
        command: spec.name,
        problem,
    };
    let matched = match_words(spec, rest.get(used..).unwrap_or_default()).map_err(usage)?;
    let command = (spec.build)(&matched).map_err(usage)?;
    Ok(Invocation { command, json })
}

fn match_words(spec: &'static CommandSpec, words: &[Token]) -> Result<Matched, String> {
    let mut m = Matched::default();
    let mut positional: Vec<String> = Vec::new();
    let mut literal = false;
    let mut it = words.iter();
    while let Some(t) = it.next() {
        if !t.quoted && !literal && t.text == "--" {
            literal = true;
            continue;
        }
        if !t.quoted && !literal && t.text.starts_with("--") {
            let body = t.text.get(2..).unwrap_or_default();
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (body, None),
            };
            let Some(fl) = spec.flags.iter().find(|f| f.name == name) else {
                return Err(match suggest_flag(spec, name) {
                    Some(s) => format!(
                        "unknown option --{}; did you mean --{s}?",
                        crate::redact::excerpt(name)
                    ),
                    None => format!("unknown option --{}", crate::redact::excerpt(name)),
                });
            };
            if m.flags.iter().any(|(n, _)| *n == fl.name) {
                return Err(format!("--{} is given twice", fl.name));
            }
            let value = match (fl.value, inline) {
                (None, None) => None,
                (None, Some(_)) => return Err(format!("--{} takes no value", fl.name)),
                (Some(_), Some(v)) => Some(v),
                (Some(ph), None) => Some(
                    it.next()
                        .map(|t| t.text.clone())
                        .ok_or_else(|| format!("--{} needs a value ({ph})", fl.name))?,
                ),
            };
            m.flags.push((fl.name, value));
            continue;
        }
        positional.push(t.text.clone());
    }
    let mut pos = positional.into_iter().peekable();
    for a in spec.args {
        let value = match a.kind {
            ArgKind::Word => pos.next(),
            ArgKind::Rest => {
                let all: Vec<String> = pos.by_ref().collect();
                (!all.is_empty()).then(|| all.join(" "))
            }
            ArgKind::Argv => {
                m.argv = pos.by_ref().collect();
                // Checked by the builder, which names what is missing.
                continue;
            }
            ArgKind::PublicKey => match pos.next() {
                Some(k) if k.contains(' ') => Some(k),
                Some(kind) => {
                    let mut k = kind;
                    if let Some(body) = pos.next() {
                        k.push(' ');
                        k.push_str(&body);
                    }
                    // A `user@host` comment after the key belongs to it.
                    if let Some(c) = pos.next_if(|c| c.contains('@')) {
                        k.push(' ');
                        k.push_str(&c);
                    }
                    Some(k)
                }
                None => None,
            },
        };
        match value {
            Some(v) => m.args.push((a.name, v)),
            None if a.required => return Err(format!("missing <{}>", a.name)),
            None => {}
        }
    }
    if let Some(extra) = pos.next() {
        return Err(format!("unexpected {}", q(&extra)));
    }
    Ok(m)
}

// ------------------------------------------------------------ printing back

pub(super) fn spec_for(c: &Command) -> &'static CommandSpec {
    let name = match c {
        Command::Help { .. } => "help",
        Command::Whoami => "whoami",
        Command::NewProject(_) => "new project",
        Command::Hosts => "hosts",
        Command::Move { .. } => "move",
        Command::Evacuate { .. } => "evacuate",
        Command::Restore { .. } => "restore",
        Command::Projects { .. } => "projects",
        Command::Tag { .. } => "tag",
        Command::Egress { .. } => "egress",
        Command::Quota { .. } => "quota",
        Command::Untag { .. } => "untag",
        Command::Resize { .. } => "resize",
        Command::Run { .. } => "run",
        Command::RunStop { .. } => "run stop",
        Command::Agent { .. } => "agent",
        Command::AgentStop { .. } => "agent stop",
        Command::Agents { .. } => "agents",
        Command::Status { .. } => "status",
        Command::Start { .. } => "start",
        Command::Stop { .. } => "stop",
        Command::Restart { .. } => "restart",
        Command::Rm { .. } => "rm",
        Command::Ssh { .. } => "ssh",
        Command::Logs { .. } => "logs",
        Command::Share { .. } => "share",
        Command::Unshare { .. } | Command::UnshareLink { .. } => "unshare",
        Command::ShareLink { .. } => "share",
        Command::Shares { .. } => "shares",
        Command::DomainAdd { .. } => "domain add",
        Command::DomainRm { .. } => "domain rm",
        Command::DomainApprove { .. } => "domain approve",
        Command::Domains { .. } => "domains",
        Command::Public { .. } => "public",
        Command::Private { .. } => "private",
        Command::Port { .. } => "port",
        Command::Idle { .. } => "idle",
        Command::Keys { .. } => "keys",
        Command::KeyAdd { .. } => "key add",
        Command::KeyRm { .. } => "key rm",
        Command::RequestAccess { .. } => "request-access",
        Command::Requests { .. } => "requests",
        Command::Approve { .. } => "approve",
        Command::Deny { .. } => "deny",
        Command::Users => "users",
        Command::UserRename { .. } => "user rename",
        Command::Stacks => "stacks",
        Command::Templates => "templates",
        Command::Yes => "yes",
        Command::Cp { .. } => "cp",
        Command::Checkpoint { .. } => "checkpoint",
        Command::Checkpoints { .. } => "checkpoints",
        Command::Rollback { .. } => "rollback",
        Command::CheckpointRm { .. } => "checkpoint rm",
        Command::Rename { .. } => "rename",
        Command::SecretSet { .. } => "secret set",
        Command::SecretRm { .. } => "secret rm",
        Command::Secrets => "secrets",
        Command::LlmUsage { .. } => "llm usage",
        Command::DeployKey => "deploy-key",
        Command::Login => "login",
        Command::Logout => "logout",
        Command::Sessions => "sessions",
        Command::TokenCreate { .. } => "token create",
        Command::Tokens => "tokens",
        Command::TokenRm { .. } => "token rm",
        Command::SshConfig => "ssh-config",
    };
    // Every name above is in SPECS (the unit test `every_command_has_a_spec`
    // checks it), and SPECS is a non-empty constant.
    #[allow(clippy::indexing_slicing)]
    by_name(name).unwrap_or(&SPECS[0])
}

/// Writes a command in canonical form: name, arguments, then options.
pub(super) fn write_canonical(c: &Command, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.write_str(c.name())?;
    let mut arg = |v: &str| write!(f, " {}", quote(v));
    match c {
        Command::Help { topic } => {
            if let Some(t) = topic {
                // Topics are command names: plain words, never quoted.
                return write!(f, " {t}");
            }
        }
        Command::Whoami
        | Command::Users
        | Command::Stacks
        | Command::Templates
        | Command::Yes
        | Command::Secrets
        | Command::DeployKey
        | Command::Login
        | Command::Logout
        | Command::Sessions
        | Command::Tokens
        | Command::Hosts
        | Command::SshConfig => {}
        Command::Move { name, host } => {
            arg(name.as_str())?;
            arg(host.as_str())?;
        }
        Command::Evacuate { host } | Command::Restore { host } => arg(host.as_str())?,
        Command::TokenCreate { label, expires } => {
            if let Some(l) = label {
                arg(l.as_str())?;
            }
            if let Some(e) = expires {
                write!(f, " --expires {e}s")?;
            }
        }
        Command::TokenRm { label } => arg(label.as_str())?,
        Command::Projects { tag } => {
            if let Some(t) = tag {
                write!(f, " --tag {t}")?;
            }
        }
        Command::Quota { user, change } => {
            if let Some(u) = user {
                arg(u.as_str())?;
            }
            let limits = [
                ("projects", change.projects, false),
                ("cpus", change.vcpus, false),
                ("memory", change.memory_mib, true),
                ("disk", change.disk_mib, true),
            ];
            for (flag, l, size) in limits {
                if let Some(l) = l {
                    write!(f, " --{flag} {}", l.word(size))?;
                }
            }
        }
        Command::Egress { name, change } => {
            use super::EgressChange;
            arg(name.as_str())?;
            let (action, dests) = match change {
                None => (None, &[][..]),
                Some(EgressChange::Mode(None)) => (Some("default"), &[][..]),
                Some(EgressChange::Mode(Some(m))) => (Some(m.as_str()), &[][..]),
                Some(EgressChange::Allow { dests, once: false }) => (Some("allow"), &dests[..]),
                Some(EgressChange::Allow { dests, once: true }) => (Some("allow-once"), &dests[..]),
                Some(EgressChange::Deny(d)) => (Some("deny"), &d[..]),
                Some(EgressChange::Forget(d)) => (Some("forget"), &d[..]),
            };
            if let Some(a) = action {
                arg(a)?;
            }
            for d in dests {
                arg(&d.to_string())?;
            }
        }
        Command::Tag { name, tags } | Command::Untag { name, tags } => {
            arg(name.as_str())?;
            for t in tags {
                arg(t.as_str())?;
            }
        }
        Command::Cp { name, at, new_name } => {
            match at {
                Some(l) => arg(&format!("{name}@{l}"))?,
                None => arg(name.as_str())?,
            }
            arg(new_name.as_str())?;
        }
        Command::Rename { name, new_name } => {
            arg(name.as_str())?;
            arg(new_name.as_str())?;
        }
        Command::Checkpoint { name, label, note } => {
            arg(name.as_str())?;
            if let Some(l) = label {
                arg(l.as_str())?;
            }
            if let Some(n) = note {
                write!(f, " --note {}", quote(n))?;
            }
        }
        Command::Checkpoints { name }
        | Command::RunStop { name }
        | Command::AgentStop { name }
        | Command::Agents { name } => arg(name.as_str())?,
        Command::Agent {
            name,
            with,
            task,
            timeout_secs,
        } => {
            write!(f, " {}", quote(name.as_str()))?;
            if let Some(w) = with {
                write!(f, " --with {w}")?;
            }
            if *timeout_secs != DEFAULT_AGENT_TIMEOUT_SECS {
                write!(f, " --timeout {timeout_secs}s")?;
            }
            for w in task.split(' ') {
                write!(f, " {}", quote(w))?;
            }
        }
        Command::Resize {
            name,
            cpus,
            memory,
            disk,
        } => {
            arg(name.as_str())?;
            if let Some(c) = cpus {
                write!(f, " --cpus {c}")?;
            }
            if let Some(m) = memory {
                write!(f, " --memory {m}")?;
            }
            if let Some(d) = disk {
                write!(f, " --disk {d}")?;
            }
        }
        Command::Run {
            name,
            argv,
            timeout_secs,
        } => {
            write!(f, " {}", quote(name.as_str()))?;
            if *timeout_secs != DEFAULT_RUN_TIMEOUT_SECS {
                write!(f, " --timeout {timeout_secs}s")?;
            }
            // A first word that looks like an option is quoted by
            // `quote`, so it cannot be taken for one of Kennel's.
            for w in argv {
                write!(f, " {}", quote(w))?;
            }
        }
        Command::Rollback { name, label, yes } => {
            arg(name.as_str())?;
            arg(label.as_str())?;
            if *yes {
                f.write_str(" --yes")?;
            }
        }
        Command::CheckpointRm { name, label } => {
            arg(name.as_str())?;
            arg(label.as_str())?;
        }
        Command::SecretSet { name, value } => {
            arg(name.as_str())?;
            arg(value)?;
        }
        Command::SecretRm { name } => arg(name.as_str())?,
        Command::LlmUsage { user } => {
            if let Some(u) = user {
                arg(u.as_str())?;
            }
        }
        Command::NewProject(n) => {
            arg(n.name.as_str())?;
            let opts: [(&str, Option<String>); 8] = [
                ("stack", n.stack.as_ref().map(ToString::to_string)),
                ("git", n.git.as_ref().map(ToString::to_string)),
                ("path", n.path.clone()),
                ("template", n.template.as_ref().map(ToString::to_string)),
                ("cpus", n.cpus.map(|c| c.to_string())),
                ("memory", n.memory.map(|s| s.to_string())),
                ("disk", n.disk.map(|s| s.to_string())),
                ("host", n.host.as_ref().map(ToString::to_string)),
            ];
            for (flag, v) in opts {
                if let Some(v) = v {
                    write!(f, " --{flag} {}", quote(&v))?;
                }
            }
            if n.adopt {
                f.write_str(" --adopt")?;
            }
        }
        Command::Status { name }
        | Command::Start { name }
        | Command::Stop { name }
        | Command::Restart { name }
        | Command::Ssh { name }
        | Command::Public { name }
        | Command::Private { name } => arg(name.as_str())?,
        Command::Rm { name, purge, yes } => {
            arg(name.as_str())?;
            if *purge {
                f.write_str(" --purge")?;
            }
            if *yes {
                f.write_str(" --yes")?;
            }
        }
        Command::Logs { name, lines } => {
            arg(name.as_str())?;
            if *lines != DEFAULT_LOG_LINES {
                write!(f, " --lines {lines}")?;
            }
        }
        Command::Share {
            name,
            user,
            ssh,
            web,
        } => {
            arg(name.as_str())?;
            arg(user.as_str())?;
            match (ssh, web) {
                (true, false) => f.write_str(" --ssh")?,
                (false, true) => f.write_str(" --web")?,
                _ => {}
            }
        }
        Command::Unshare { name, user } => {
            arg(name.as_str())?;
            arg(user.as_str())?;
        }
        Command::UnshareLink { name, id } => {
            arg(name.as_str())?;
            arg(&id.to_string())?;
        }
        Command::Shares { name } => arg(name.as_str())?,
        Command::DomainAdd { name, host } | Command::DomainRm { name, host } => {
            arg(name.as_str())?;
            arg(host)?;
        }
        Command::DomainApprove { host } => arg(host)?,
        Command::Domains { name } => {
            if let Some(n) = name {
                arg(n.as_str())?;
            }
        }
        Command::ShareLink {
            name,
            port,
            expires_secs,
            note,
        } => {
            write!(f, " {} --link", quote(name.as_str()))?;
            if let Some(p) = port {
                write!(f, " --port {p}")?;
            }
            if *expires_secs != DEFAULT_LINK_SECS {
                write!(f, " --expires {expires_secs}s")?;
            }
            if let Some(n) = note {
                write!(f, " --note {}", quote(n))?;
            }
        }
        Command::Port { name, port } => {
            arg(name.as_str())?;
            arg(&port.to_string())?;
        }
        Command::UserRename { from, to } => {
            arg(from.as_str())?;
            arg(to.as_str())?;
        }
        Command::Idle { name, limit } => {
            arg(name.as_str())?;
            match limit {
                // Seconds print back exactly; humantime reads them again.
                Some(crate::model::IdleStop::Secs { secs }) => arg(&format!("{secs}s"))?,
                Some(crate::model::IdleStop::Never) => arg("never")?,
                None => arg("default")?,
            }
        }
        Command::Keys { user } => {
            if let Some(u) = user {
                write!(f, " --user {}", quote(u.as_str()))?;
            }
        }
        Command::KeyAdd { key, label, user } => {
            arg(&key.to_string())?;
            if let Some(l) = label {
                arg(l)?;
            }
            if let Some(u) = user {
                write!(f, " --user {}", quote(u.as_str()))?;
            }
        }
        Command::KeyRm { fingerprint } => arg(fingerprint.as_str())?,
        Command::RequestAccess { key, note } => {
            arg(&key.to_string())?;
            if let Some(n) = note {
                arg(n)?;
            }
        }
        Command::Requests { all } => {
            if *all {
                f.write_str(" --all")?;
            }
        }
        Command::Approve { id, name } => {
            arg(&id.to_string())?;
            if let Some(n) = name {
                write!(f, " as {}", quote(n.as_str()))?;
            }
        }
        Command::Deny { id, reason } => {
            arg(&id.to_string())?;
            if let Some(r) = reason {
                arg(r)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    #[test]
    fn every_command_has_a_spec() {
        for s in SPECS {
            assert!(by_name(s.name).is_some());
        }
        // spec_for falls back to SPECS[0] only if a name is missing.
        assert_eq!(spec_for(&Command::Templates).name, "templates");
        assert_eq!(spec_for(&Command::Users).name, "users");
    }

    #[test]
    fn token_commands_parse_round_trip_and_are_private() {
        let c = crate::command::parse("token create ci --expires 12h")
            .unwrap()
            .command;
        assert_eq!(
            c,
            Command::TokenCreate {
                label: Some(SlugName::new("ci").unwrap()),
                expires: Some(12 * 3600)
            }
        );
        assert!(c.private());
        assert_eq!(
            crate::command::parse(&c.to_string()).unwrap().command,
            c,
            "canonical form parses back"
        );
        let bare = crate::command::parse("token create").unwrap().command;
        assert_eq!(
            bare,
            Command::TokenCreate {
                label: None,
                expires: None
            }
        );
        for bad in [
            "token create x --expires 0d",
            "token create x --expires 3w",
            "token create x --expires d",
        ] {
            assert!(crate::command::parse(bad).is_err(), "{bad}");
        }
        assert!(!crate::command::parse("tokens").unwrap().command.private());
        assert!(crate::command::parse("token rm ci").is_ok());
    }

    #[test]
    fn usage_lines_come_from_the_table() {
        assert_eq!(
            by_name("rm").unwrap().usage(),
            "rm <name> [--purge] [--yes]"
        );
        assert_eq!(
            by_name("request-access").unwrap().usage(),
            "request-access <ssh-public-key> [note...]"
        );
    }

    #[test]
    fn parses_the_brief_example() {
        let inv =
            parse("new project myapp --stack rust --git https://git.example.com/me/myapp.git")
                .unwrap();
        let Command::NewProject(n) = inv.command else {
            panic!()
        };
        assert_eq!(n.name.as_str(), "myapp");
        assert_eq!(n.stack.unwrap().as_str(), "rust");
        assert_eq!(
            n.git.unwrap().as_str(),
            "https://git.example.com/me/myapp.git"
        );
    }

    #[test]
    fn pasted_keys_with_comments_and_notes() {
        let k = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        let inv = parse(&format!("request-access {k} ann@laptop please let me in")).unwrap();
        let Command::RequestAccess { key, note } = inv.command else {
            panic!()
        };
        assert_eq!(key.comment(), Some("ann@laptop"));
        assert_eq!(note.as_deref(), Some("please let me in"));
        let inv = parse(&format!("request-access \"{k} my laptop\"")).unwrap();
        let Command::RequestAccess { key, note } = inv.command else {
            panic!()
        };
        assert_eq!(key.comment(), Some("my laptop"));
        assert_eq!(note, None);
    }

    #[test]
    fn mistakes_get_usage_and_suggestions() {
        let e = parse("prjects").unwrap_err().to_string();
        assert!(e.contains("Did you mean 'projects'"), "{e}");
        let e = parse("new myapp").unwrap_err().to_string();
        assert!(e.contains("say 'new project'"), "{e}");
        let e = parse("rm").unwrap_err().to_string();
        assert!(
            e.contains("missing <name>") && e.contains("Usage: rm <name>"),
            "{e}"
        );
        let e = parse("new project a --stak rust").unwrap_err().to_string();
        assert!(e.contains("did you mean --stack"), "{e}");
        let e = parse("status a b").unwrap_err().to_string();
        assert!(e.contains("unexpected"), "{e}");
        let e = parse("new project Bad_Name").unwrap_err().to_string();
        assert!(e.contains("1 to 40 characters"), "{e}");
        let e = parse("request-access ssh-ed25519 nonsense")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an OpenSSH public key"), "{e}");
        assert!(matches!(parse("   "), Err(ParseError::Empty)));
        assert!(matches!(
            parse("xyzzy"),
            Err(ParseError::UnknownCommand {
                suggestion: None,
                ..
            })
        ));
    }

    #[test]
    fn json_is_known_even_when_the_line_does_not_parse() {
        use super::super::wants_json;
        assert!(wants_json("prjects --json"));
        assert!(wants_json("new project 'x --json"));
        assert!(!wants_json("deny 3 -- --json is a reason"));
        assert!(!wants_json("request-access \"--json\""));
        assert!(!wants_json("projects"));
    }

    #[test]
    fn run_takes_the_command_as_given_and_its_own_options_before_it() {
        let argv = |line: &str| match parse(line).unwrap().command {
            Command::Run {
                argv, timeout_secs, ..
            } => (argv, timeout_secs),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            argv("run myapp cargo test --release -h --json"),
            (
                vec!["cargo", "test", "--release", "-h", "--json"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                DEFAULT_RUN_TIMEOUT_SECS
            )
        );
        assert!(!parse("run myapp ls --json").unwrap().json);
        assert!(parse("run --json myapp ls").unwrap().json);
        assert!(!super::super::wants_json("run myapp ls --json"));
        let (a, t) = argv("run myapp --timeout 5m sh -c 'make && make test'");
        assert_eq!(a, ["sh", "-c", "make && make test"]);
        assert_eq!(t, 300);
        assert_eq!(argv("run myapp -- --version").0, ["--version"]);
        assert_eq!(
            parse("run stop myapp").unwrap().command,
            Command::RunStop {
                name: crate::names::ProjectName::new("myapp").unwrap()
            }
        );
        let e = parse("run myapp").unwrap_err().to_string();
        assert!(e.contains("missing <command>"), "{e}");
        let e = parse("run myapp --timeout 2d ls").unwrap_err().to_string();
        assert!(e.contains("at most 24h"), "{e}");
        assert_eq!(
            by_name("run").unwrap().usage(),
            "run <name> [--timeout DURATION] <command...>"
        );
    }

    #[test]
    fn resize_needs_something_to_change() {
        let e = parse("resize myapp").unwrap_err().to_string();
        assert!(e.contains("--cpus, --memory or --disk"), "{e}");
        let c = parse("resize myapp --disk 30 --cpus 4").unwrap().command;
        assert_eq!(c.to_string(), "resize myapp --cpus 4 --disk 30G");
    }

    #[test]
    fn json_and_help_flags_anywhere() {
        let inv = parse("--json projects").unwrap();
        assert!(inv.json);
        assert_eq!(inv.command, Command::Projects { tag: None });
        assert_eq!(
            parse("rm --help").unwrap().command,
            Command::Help { topic: Some("rm") }
        );
        assert_eq!(
            parse("help new").unwrap().command,
            Command::Help {
                topic: Some("new project")
            }
        );
        assert_eq!(
            parse("help ls").unwrap().command,
            Command::Help {
                topic: Some("projects")
            }
        );
        assert!(parse("help frobnicate").is_err());
        assert_eq!(
            parse("ls").unwrap().command,
            Command::Projects { tag: None }
        );
    }

    #[test]
    fn share_defaults_to_both() {
        let Command::Share { ssh, web, .. } = parse("share a bob").unwrap().command else {
            panic!()
        };
        assert!(ssh && web);
        let Command::Share { ssh, web, .. } = parse("share a bob --web").unwrap().command else {
            panic!()
        };
        assert!(!ssh && web);
    }

    #[test]
    fn quoted_words_are_never_flags() {
        let Command::Deny { reason, .. } = parse("deny 3 \"--yes\"").unwrap().command else {
            panic!()
        };
        assert_eq!(reason.as_deref(), Some("--yes"));
        let Command::Deny { reason, .. } =
            parse("deny #3 -- --json is not a reason").unwrap().command
        else {
            panic!()
        };
        assert_eq!(reason.as_deref(), Some("--json is not a reason"));
    }
}
