//! The one renderer: outcomes to plain text (CLI, SSH), Markdown (Discord),
//! HTML (Matrix) and JSON.
//!
//! Replies are first turned into a small document ([`Block`]s of
//! [`Inline`]s), then written out per format, so every front end says the
//! same thing in its own markup.

use serde_json::json;

use crate::command::{CommandSpec, SPECS};
use crate::model::{format_time, AccessRequest, Frontend, KeyState, Project, Visibility};
use crate::outcome::{CommandError, Connection, Outcome, Reply, UserSummary};

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Plain,
    Markdown,
    Html,
    Json,
}

/// A run of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inline {
    Text(String),
    Code(String),
    Strong(String),
    Link { text: String, url: String },
}

/// A block of a rendered document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    Title(String),
    Para(Vec<Inline>),
    Table {
        head: Vec<String>,
        rows: Vec<Vec<String>>,
    },
    Code(String),
    Bullets(Vec<Vec<Inline>>),
    /// Shown in terminals only (plain text): a QR code drawn in text.
    Terminal(String),
}

fn t(s: impl Into<String>) -> Inline {
    Inline::Text(s.into())
}
fn code(s: impl Into<String>) -> Inline {
    Inline::Code(s.into())
}
fn strong(s: impl Into<String>) -> Inline {
    Inline::Strong(s.into())
}
fn para(v: Vec<Inline>) -> Block {
    Block::Para(v)
}
/// A command's last lines, for front ends that did not stream them (the
/// asker saw all of it as it came otherwise).
fn output_tail(tail: &[String], cut: bool, streamed: bool, output_bytes: u64) -> Vec<Block> {
    if streamed || tail.is_empty() {
        return Vec::new();
    }
    let mut doc = Vec::new();
    if cut {
        doc.push(text(format!(
            "The last {} lines of {} of output:",
            tail.len(),
            bytes(output_bytes)
        )));
    }
    doc.push(Block::Code(tail.join("\n")));
    doc
}

fn text(s: impl Into<String>) -> Block {
    Block::Para(vec![t(s)])
}

/// Renders an outcome in a format.
pub fn render(outcome: &Outcome, format: Format) -> String {
    if format == Format::Json {
        return render_json(outcome);
    }
    let doc = match outcome {
        Ok(r) => document(r),
        Err(e) => error_document(e),
    };
    write_doc(&doc, format)
}

/// Renders an outcome in a front end's `format`, or as JSON when `json`
/// (in a code block where the format has one: chat messages).
pub fn render_as(outcome: &Outcome, json: bool, format: Format) -> String {
    if json {
        let body = render_json(outcome);
        return match format {
            Format::Html => format!("<pre><code>{}</code></pre>", escape_html(&body)),
            Format::Markdown => format!("```json\n{body}\n```"),
            _ => body,
        };
    }
    render(outcome, format)
}

/// Renders an outcome as JSON: `{"ok": true, "kind": ..., ...}` or
/// `{"ok": false, "error": {"kind": ..., "message": ...}}`.
pub fn render_json(outcome: &Outcome) -> String {
    let v = match outcome {
        Ok(r) => {
            let mut v = serde_json::to_value(r).unwrap_or_else(|_| json!({}));
            if let Some(o) = v.as_object_mut() {
                o.insert("ok".into(), json!(true));
                if let Reply::Help { topic } = r {
                    o.insert(
                        "text".into(),
                        json!(write_doc(&help_doc(*topic), Format::Plain)),
                    );
                }
            }
            v
        }
        Err(e) => json!({"ok": false, "error": {"kind": e.kind(), "message": e.to_string()}}),
    };
    v.to_string()
}

fn error_document(e: &CommandError) -> Vec<Block> {
    vec![text(e.to_string())]
}

fn help_doc(topic: Option<&'static str>) -> Vec<Block> {
    match topic.and_then(|t| SPECS.iter().find(|s| s.name == t)) {
        Some(spec) => help_one(spec),
        None => {
            let mut doc = vec![Block::Title("Kennel commands".into())];
            doc.push(Block::Bullets(
                SPECS
                    .iter()
                    .map(|s| vec![code(s.usage()), t(format!(" — {}", s.summary))])
                    .collect(),
            ));
            doc.push(para(vec![
                t("Add "),
                code("--json"),
                t(" to any command for JSON. "),
                code("help <command>"),
                t(" explains one."),
            ]));
            doc
        }
    }
}

fn help_one(spec: &CommandSpec) -> Vec<Block> {
    let mut doc = vec![Block::Code(spec.usage()), text(spec.summary)];
    if !spec.flags.is_empty() {
        doc.push(Block::Bullets(
            spec.flags
                .iter()
                .map(|f| {
                    let flag = match f.value {
                        Some(v) => format!("--{} {v}", f.name),
                        None => format!("--{}", f.name),
                    };
                    vec![code(flag), t(format!(" — {}", f.help))]
                })
                .collect(),
        ));
    }
    if !spec.aliases.is_empty() {
        doc.push(text(format!("Also: {}", spec.aliases.join(", "))));
    }
    doc
}

/// A project's state, with why Kennel put it there if it did:
/// `stopped (the VM exited unexpectedly; ...)`.
fn state_text(p: &Project) -> String {
    match &p.state_note {
        Some(n) => format!("{} ({n})", p.state),
        None => p.state.to_string(),
    }
}

/// `closed (the default): 3 rules, 1 asked` and the like.
fn egress_text(v: &crate::executor::egress::EgressView) -> String {
    let mut s = v.mode.to_string();
    if v.default {
        s.push_str(" (the default)");
    }
    let n = v.rules.len();
    if n > 0 {
        s.push_str(&format!(": {n} rule{}", if n == 1 { "" } else { "s" }));
    }
    if !v.asked.is_empty() {
        s.push_str(&format!(", {} asked", v.asked.len()));
    }
    s
}

/// `after 30m (the default), idle for 4m` and the like.
fn idle_text(v: &crate::idle::IdleView) -> String {
    let mut s = match v.limit {
        crate::model::IdleStop::Never => "never".to_owned(),
        l => format!("after {l}"),
    };
    if v.default {
        s.push_str(" (the default)");
    }
    match v.idle_secs {
        Some(0) => s.push_str("; in use now"),
        Some(secs) => s.push_str(&format!(
            "; idle for {}",
            humantime::format_duration(std::time::Duration::from_secs(secs))
        )),
        None => {}
    }
    s
}

fn project_rows(ps: &[Project]) -> Vec<Vec<String>> {
    ps.iter()
        .map(|p| {
            vec![
                p.name.to_string(),
                state_text(p),
                p.stack.clone(),
                p.owner.to_string(),
                format!(
                    "{} vCPU, {} MiB, {} GiB",
                    p.resources.vcpus,
                    p.resources.memory_mib,
                    p.resources.disk_mib / 1024
                ),
                p.visibility.to_string(),
                p.tags.join(" "),
            ]
        })
        .collect()
}

/// One `quota` row: each column "used / limit", `*` where the limit is
/// the user's own.
fn quota_row(q: &crate::outcome::QuotaLine) -> Vec<String> {
    let cell = |used: String, limit: Option<String>, own: bool| {
        format!(
            "{used} / {}{}",
            limit.unwrap_or_else(|| "unlimited".into()),
            if own { " *" } else { "" }
        )
    };
    let size = |mib: u64| crate::command::Size { mib }.to_string();
    let (l, u, p) = (&q.quota, &q.usage, &q.personal);
    vec![
        q.user.clone(),
        l.role.to_string(),
        cell(
            u.projects.to_string(),
            l.projects.map(|n| n.to_string()),
            p.projects,
        ),
        cell(u.vcpus.to_string(), l.vcpus.map(|n| n.to_string()), p.vcpus),
        cell(size(u.memory_mib), l.memory_mib.map(size), p.memory_mib),
        cell(size(u.disk_mib), l.disk_mib.map(size), p.disk_mib),
    ]
}

fn connection_doc(c: &Connection) -> Vec<Block> {
    let mut doc = vec![
        para(vec![t("SSH: "), code(&c.ssh_command)]),
        text("Add to ~/.ssh/config to use the same name in editors:"),
        Block::Code(c.ssh_config.clone()),
        Block::Bullets(vec![
            vec![
                t("VS Code: "),
                Inline::Link {
                    text: "open in VS Code".into(),
                    url: c.vscode_url.clone(),
                },
            ],
            vec![t("Zed: "), code(&c.zed_url)],
            vec![t(format!("JetBrains Gateway: {}", c.jetbrains_hint))],
            vec![
                t("Web app: "),
                code(&c.https_url),
                t(" (private unless shared)"),
            ],
            vec![t("Source on the host: "), code(&c.source_path)],
        ]),
    ];
    if !c.host_key_fingerprints.is_empty() {
        doc.push(para(vec![
            t("Gateway host key: "),
            code(c.host_key_fingerprints.join(", ")),
        ]));
    }
    doc
}

fn request_line(r: &AccessRequest) -> Vec<Inline> {
    let mut v = vec![
        strong(format!("#{}", r.id)),
        t(format!(
            " {} from {} — {} ",
            r.state, r.identity, r.algorithm
        )),
        code(r.fingerprint.as_str()),
    ];
    if let Some(n) = &r.note {
        v.push(t(format!(" — “{n}”")));
    }
    if let Some(by) = &r.decided_by {
        v.push(t(format!(" — decided by {by}")));
        if let Some(at) = r.decided_at {
            v.push(t(format!(" at {}", format_time(at))));
        }
    }
    if let Some(reason) = &r.reason {
        v.push(t(format!(" ({reason})")));
    }
    v
}

fn user_line(u: &UserSummary) -> Vec<String> {
    vec![
        u.user.name.to_string(),
        u.user.role.to_string(),
        u.identities
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        u.active_keys.to_string(),
    ]
}

/// Turns a reply into a document.
pub fn document(r: &Reply) -> Vec<Block> {
    match r {
        Reply::Help { topic } => help_doc(*topic),
        Reply::Whoami { identity, user } => match user {
            Some(u) => vec![para(vec![
                t("You are "),
                strong(u.user.name.as_str()),
                t(format!(
                    " ({}), as {identity}; {} active SSH key(s).",
                    u.user.role, u.active_keys
                )),
            ])],
            None => vec![
                para(vec![t(format!(
                    "Kennel does not know {identity} yet. Ask for access with "
                ))]),
                Block::Code("request-access <your SSH public key> [note]".into()),
            ],
        },
        Reply::Projects {
            projects,
            tag: Some(tag),
        } if projects.is_empty() => vec![para(vec![
            t(format!("No projects of yours are tagged {tag}; ")),
            code("projects"),
            t(" lists them all."),
        ])],
        Reply::Projects { projects, .. } if projects.is_empty() => vec![para(vec![
            t("No projects yet. Create one with "),
            code("new project <name>"),
            t("."),
        ])],
        Reply::Projects { projects, .. } => vec![Block::Table {
            head: ["name", "state", "stack", "owner", "resources", "web", "tags"]
                .map(String::from)
                .to_vec(),
            rows: project_rows(projects),
        }],
        Reply::Status {
            project,
            connection,
            shares,
            vm,
            idle,
            egress,
        } => {
            let mut doc = vec![
                Block::Title(format!("{} — {}", project.name, state_text(project))),
                Block::Table {
                    head: vec!["".into(), "".into()],
                    rows: vec![
                        vec!["owner".into(), project.owner.to_string()],
                        vec!["stack".into(), project.stack.clone()],
                        vec!["source".into(), project.source_path.clone()],
                        vec![
                            "resources".into(),
                            project_rows(std::slice::from_ref(project))
                                .first()
                                .and_then(|r| r.get(4).cloned())
                                .unwrap_or_default(),
                        ],
                        vec!["app port".into(), project.app_port.to_string()],
                        vec!["app".into(), connection.https_url.clone()],
                        vec!["ssh".into(), connection.ssh_command.clone()],
                        vec!["web".into(), project.visibility.to_string()],
                        vec!["idle stop".into(), idle_text(idle)],
                        vec!["egress".into(), egress_text(egress)],
                        vec![
                            "tags".into(),
                            if project.tags.is_empty() {
                                "-".into()
                            } else {
                                project.tags.join(" ")
                            },
                        ],
                        vec![
                            "git".into(),
                            project.git_url.clone().unwrap_or_else(|| "-".into()),
                        ],
                        vec!["created".into(), format_time(project.created_at)],
                    ],
                },
            ];
            if let Some(vm) = vm {
                doc.push(text(format!(
                    "VM ({}): {:?}, {}",
                    vm.backend,
                    vm.state,
                    if vm.ready { "ready" } else { "not ready" }
                )));
                doc.extend(vm.problems.iter().map(|p| text(format!("⚠ {p}"))));
            }
            if !shares.is_empty() {
                doc.push(text(format!(
                    "Shared with: {}",
                    shares
                        .iter()
                        .map(|s| {
                            let what = match (s.ssh, s.web) {
                                (true, true) => "ssh+web",
                                (true, false) => "ssh",
                                _ => "web",
                            };
                            format!("{} ({what})", s.user)
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            doc
        }
        Reply::Created {
            project,
            connection,
            notes,
        } => {
            let mut doc = vec![para(vec![
                t("Project "),
                strong(project.name.as_str()),
                t(format!(" is ready ({} stack).", project.stack)),
            ])];
            doc.extend(notes.iter().map(|n| text(n.clone())));
            doc.extend(connection_doc(connection));
            doc
        }
        Reply::Connection { connection } => connection_doc(connection),
        Reply::Logs { project, lines } => vec![
            text(format!(
                "Console log of {project} (last {} lines):",
                lines.len()
            )),
            Block::Code(lines.join("\n")),
        ],
        Reply::Confirm {
            prompt,
            confirm_with,
        } => vec![
            text(prompt.clone()),
            para(vec![t("To confirm, send: "), code(confirm_with)]),
        ],
        Reply::Running { project } => vec![text(format!("{project} is running."))],
        Reply::Stopped { project } => vec![text(format!(
            "{project} is stopped. Start it with 'start {project}'."
        ))],
        Reply::Removed {
            project,
            source_path,
            purged: true,
        } => vec![text(format!(
            "{project} is gone, and its source {source_path} was deleted."
        ))],
        Reply::Removed {
            project,
            source_path,
            purged: false,
        } => vec![text(format!(
            "{project} is gone. Its source is still at {source_path}."
        ))],
        Reply::Renamed {
            from,
            to,
            ssh,
            https_url,
        } => vec![text(format!(
            "{from} is now {to}: {ssh} and {https_url}."
        ))],
        Reply::Shared {
            project,
            user,
            ssh,
            web,
        } => {
            let what = match (ssh, web) {
                (true, true) => "SSH and the web app",
                (true, false) => "SSH",
                _ => "the web app",
            };
            vec![text(format!("{project} is shared with {user} for {what}."))]
        }
        Reply::Unshared { project, user } => vec![text(format!(
            "{project} is no longer shared with {user}."
        ))],
        Reply::VisibilitySet {
            https_url,
            visibility: Visibility::Public,
            ..
        } => vec![text(format!(
            "{https_url} is now public: anyone with the link can open it."
        ))],
        Reply::VisibilitySet {
            https_url,
            visibility: Visibility::Private,
            ..
        } => vec![text(format!(
            "{https_url} is now private: only the owner and shares can open it."
        ))],
        Reply::PortSet {
            https_url, port, ..
        } => vec![text(format!(
            "{https_url} now forwards to port {port} in the VM."
        ))],
        Reply::Resized {
            project,
            before,
            after,
            disk_now,
            restart_needed,
            running,
        } => {
            let size = |mib: u64| crate::command::Size { mib }.to_string();
            let mut changes = Vec::new();
            if before.vcpus != after.vcpus {
                changes.push(format!("{} → {} vCPUs", before.vcpus, after.vcpus));
            }
            if before.memory_mib != after.memory_mib {
                changes.push(format!(
                    "memory {} → {}",
                    size(before.memory_mib),
                    size(after.memory_mib)
                ));
            }
            if before.disk_mib != after.disk_mib {
                changes.push(format!(
                    "disk {} → {}",
                    size(before.disk_mib),
                    size(after.disk_mib)
                ));
            }
            if changes.is_empty() {
                return vec![text(format!(
                    "{project} has those resources already: {} vCPUs, {} memory, {} disk.",
                    after.vcpus,
                    size(after.memory_mib),
                    size(after.disk_mib)
                ))];
            }
            let mut doc = vec![text(format!("{project}: {}.", changes.join(", ")))];
            if before.disk_mib != after.disk_mib {
                doc.push(text(if *disk_now {
                    "The disk grew at once, and the filesystem with it."
                } else {
                    "The disk grows when the VM next starts."
                }));
            }
            if *restart_needed {
                doc.push(if *running {
                    para(vec![
                        t("CPUs and memory take effect at the next start: "),
                        code(format!("restart {project}")),
                    ])
                } else {
                    text("CPUs and memory take effect when the VM next starts.")
                });
            }
            doc
        }
        Reply::Ran {
            project,
            command,
            exit_code,
            signal,
            timed_out,
            stopped,
            tail,
            cut,
            streamed,
            output_bytes,
            elapsed_ms,
        } => {
            #[allow(clippy::cast_precision_loss)]
            let secs = *elapsed_ms as f64 / 1000.0;
            let how = if *timed_out {
                format!(" hit its time limit and was stopped after {secs:.1} s (exit {exit_code}).")
            } else if *stopped {
                format!(" was stopped by 'run stop' after {secs:.1} s (exit {exit_code}).")
            } else if let Some(sig) = signal {
                format!(" was ended by signal {sig} after {secs:.1} s (exit {exit_code}).")
            } else {
                format!(" exited with {exit_code} after {secs:.1} s.")
            };
            let mut doc = vec![para(vec![
                code(command.clone()),
                t(format!(" in {project}{how}")),
            ])];
            if !*streamed && tail.is_empty() {
                doc.push(text("It printed nothing."));
            }
            doc.extend(output_tail(tail, *cut, *streamed, *output_bytes));
            doc
        }
        Reply::LinkCreated {
            project,
            id,
            url,
            port,
            expires_at,
            note,
        } => {
            let what = match port {
                Some(p) => format!("{project}'s port {p}"),
                None => format!("{project}'s web app"),
            };
            let mut doc = vec![
                text(format!(
                    "Share link {id}{}: whoever opens it first gets {what} (nothing else) until {}. It works once; send it to one person. Shown this once:",
                    note.as_ref().map(|n| format!(" ({n})")).unwrap_or_default(),
                    format_time(*expires_at)
                )),
                Block::Code(url.clone()),
            ];
            if let Some(qr) = crate::qr::text(url) {
                doc.push(Block::Terminal(qr));
            }
            doc.push(para(vec![
                t("Revoke it (and end the session it started) with "),
                code(format!("unshare {project} {id}")),
                t("."),
            ]));
            doc
        }
        Reply::DomainAdded {
            project,
            url,
            pending: false,
            ..
        } => vec![text(format!(
            "{project} is served at {url} now; its certificate comes at the first visit."
        ))],
        Reply::DomainAdded {
            project,
            host,
            pending: true,
            ..
        } => vec![text(format!(
            "{host} points here. An admin has been asked to approve serving {project} there; 'domains {project}' shows when it is."
        ))],
        Reply::DomainApproved { project, url, .. } => {
            vec![text(format!("{project} is served at {url} now."))]
        }
        Reply::DomainRemoved { project, host } => vec![text(format!(
            "{project} is no longer served at {host}."
        ))],
        Reply::Domains { domains } if domains.is_empty() => vec![para(vec![
            t("No custom domains. "),
            code("domain add NAME app.example.com"),
            t(" adds one."),
        ])],
        Reply::Domains { domains } => vec![Block::Table {
            head: ["host", "project", "state", "asked by"]
                .map(String::from)
                .to_vec(),
            rows: domains
                .iter()
                .map(|d| {
                    vec![
                        d.host.clone(),
                        d.project.to_string(),
                        d.state.clone(),
                        d.requested_by
                            .as_ref()
                            .map_or_else(|| "-".into(), ToString::to_string),
                    ]
                })
                .collect(),
        }],
        Reply::LinkRevoked { project, id } => vec![text(format!(
            "Share link {id} of {project} is revoked; a browser that used it is signed out."
        ))],
        Reply::Shares {
            project,
            users,
            links,
        } => {
            let mut doc = Vec::new();
            if users.is_empty() {
                doc.push(text(format!("{project} is shared with no user.")));
            } else {
                doc.push(Block::Table {
                    head: ["user", "ssh", "web"].map(String::from).to_vec(),
                    rows: users
                        .iter()
                        .map(|s| {
                            let yes = |b: bool| if b { "yes" } else { "-" }.to_owned();
                            vec![s.user.to_string(), yes(s.ssh), yes(s.web)]
                        })
                        .collect(),
                });
            }
            if links.is_empty() {
                doc.push(para(vec![
                    t("No live share links. "),
                    code(format!("share {project} --link")),
                    t(" makes one."),
                ]));
            } else {
                doc.push(Block::Table {
                    head: ["link", "port", "note", "by", "expires", "used", "visits"]
                        .map(String::from)
                        .to_vec(),
                    rows: links
                        .iter()
                        .map(|l| {
                            vec![
                                l.id.to_string(),
                                l.port.map_or_else(|| "app".into(), |p| p.to_string()),
                                l.note.clone().unwrap_or_else(|| "-".into()),
                                l.created_by
                                    .as_ref()
                                    .map_or_else(|| "-".into(), ToString::to_string),
                                format_time(l.expires_at),
                                l.last_used_at
                                    .or(l.redeemed_at)
                                    .map_or_else(|| "not yet".into(), format_time),
                                l.visits.to_string(),
                            ]
                        })
                        .collect(),
                });
            }
            doc
        }
        Reply::AgentRan {
            project,
            agent,
            checkpoint,
            exit_code,
            signal,
            timed_out,
            stopped,
            elapsed_ms,
            tokens,
            diffstat,
            tail,
            cut,
            streamed,
            output_bytes,
        } => {
            #[allow(clippy::cast_precision_loss)]
            let secs = *elapsed_ms as f64 / 1000.0;
            let how = if *timed_out {
                format!("hit its time limit and was stopped after {secs:.1} s")
            } else if *stopped {
                format!("was stopped by 'agent stop' after {secs:.1} s")
            } else if let Some(sig) = signal {
                format!("was ended by signal {sig} after {secs:.1} s (exit {exit_code})")
            } else if *exit_code == 0 {
                format!("finished in {secs:.1} s")
            } else {
                format!("exited with {exit_code} after {secs:.1} s")
            };
            let mut doc = vec![text(format!(
                "Agent {agent} in {project} {how}; {tokens} LLM tokens."
            ))];
            doc.extend(output_tail(tail, *cut, *streamed, *output_bytes));
            if *exit_code == 127 && !*timed_out && !*stopped && signal.is_none() {
                doc.push(text(format!(
                    "127 is the shell's \"command not found\": {agent} may not be in this VM's image (gptme comes with the python stack's). Install it in the VM, add an executable .kennel/agent to the source, or ask an admin for an [agents.NAME] entry."
                )));
            }
            if diffstat.is_empty() {
                doc.push(text("The source has no changes against git HEAD (or is no git repository)."));
            } else {
                doc.push(text("What changed (git diff --stat):"));
                doc.push(Block::Code(diffstat.join("\n")));
            }
            doc.push(para(vec![
                t("Keep it, or undo it with "),
                code(format!("rollback {project} {checkpoint}")),
                t(format!(" (the checkpoint {checkpoint} was taken before the run).")),
            ]));
            doc
        }
        Reply::AgentStopped {
            project,
            was_running,
        } => vec![text(if *was_running {
            format!("Stopping the agent in {project}.")
        } else {
            format!("No agent runs in {project} now.")
        })],
        Reply::AgentRuns { project, runs } if runs.is_empty() => vec![para(vec![
            t(format!("{project} has had no agent runs. Start one with ")),
            code(format!("agent {project} TASK")),
            t("."),
        ])],
        Reply::AgentRuns { runs, .. } => vec![Block::Table {
            head: ["started", "by", "agent", "task", "result", "tokens", "changes", "undo with"]
                .map(String::from)
                .to_vec(),
            rows: runs
                .iter()
                .map(|r| {
                    vec![
                        format_time(r.started_at),
                        r.user.as_ref().map_or_else(|| "-".into(), ToString::to_string),
                        r.agent.clone(),
                        r.task.chars().take(60).collect(),
                        match (r.ended_at, r.exit_code) {
                            (None, _) => "running".into(),
                            (Some(_), Some(c)) => format!("exit {c}"),
                            (Some(_), None) => "?".into(),
                        },
                        r.tokens.map(|t| t.to_string()).unwrap_or_default(),
                        r.diffstat.clone().unwrap_or_default(),
                        r.checkpoint.clone(),
                    ]
                })
                .collect(),
        }],
        Reply::RunStopped { project, count } => vec![text(match count {
            0 => format!("Nothing that 'run' started runs in {project} now."),
            1 => format!("Stopping the command 'run' started in {project}."),
            n => format!("Stopping the {n} commands 'run' started in {project}."),
        })],
        Reply::Tagged { project, tags } => vec![text(match tags.first() {
            None => format!("{project} has no tags now; 'tag {project} TAG' adds one."),
            Some(first) => format!(
                "{project}'s tags: {}. 'projects --tag {first}' lists the projects with one.",
                tags.join(", ")
            ),
        })],
        Reply::UserRenamed { from, to } => vec![text(format!(
            "{from} is now {to}: same keys, projects and shares."
        ))],
        Reply::Egress {
            project,
            egress,
            changed,
        } => {
            use crate::egress::{EgressMode, Verdict};
            let mode = match (egress.mode, egress.default) {
                (EgressMode::Open, d) => format!(
                    "{project}'s VM may reach anything this host reaches{}; 'egress {project} closed' keeps it to its list.",
                    if d { " (open, the default)" } else { " (open)" }
                ),
                (EgressMode::Closed, d) => format!(
                    "{project}'s VM reaches only what its list allows{}, and Kennel's own services; a new name it tries is asked about here.",
                    if d { " (closed, the default)" } else { " (closed)" }
                ),
            };
            let mut doc = vec![text(if *changed {
                format!("Done. {mode}")
            } else {
                mode
            })];
            if !egress.rules.is_empty() {
                doc.push(Block::Table {
                    head: ["destination", "rule", "until"].map(String::from).to_vec(),
                    rows: egress
                        .rules
                        .iter()
                        .map(|r| {
                            vec![
                                r.dest.clone(),
                                match r.verdict {
                                    Verdict::Allow => "allow".into(),
                                    Verdict::Deny => "deny".into(),
                                },
                                r.expires_at.map_or_else(|| "-".into(), format_time),
                            ]
                        })
                        .collect(),
                });
            }
            if !egress.asked.is_empty() {
                doc.push(text(format!(
                    "Asked, not decided yet: {}. 'egress {project} allow DEST' or 'egress {project} deny DEST' decides.",
                    egress.asked.join(", ")
                )));
            }
            doc
        }
        Reply::IdleSet { project, idle } => vec![text(match idle.limit {
            crate::model::IdleStop::Never => {
                format!("{project}'s VM is never stopped for idleness; 'stop {project}' stops it.")
            }
            l => format!(
                "{project}'s VM stops after {l} with nobody connected and the guest idle{}; ssh or https wakes it.",
                if idle.default { " (the default)" } else { "" }
            ),
        })],
        Reply::SecretStored { name } => vec![text(format!(
            "Stored secret {name}. Kennel never shows it again; replace it with 'secret set {name} ...' or delete it with 'secret rm {name}'."
        ))],
        Reply::SecretDeleted { name } => vec![text(format!("Deleted secret {name}."))],
        Reply::Secrets { names } if names.is_empty() => vec![text(
            "You have no secrets. 'secret set git-token <token>' stores a token for https:// clones.",
        )],
        Reply::Secrets { names } => vec![text(format!("Your secrets: {}", names.join(", ")))],
        Reply::LlmUsage {
            user,
            day,
            requests,
            tokens,
            requests_per_minute,
            tokens_per_day,
        } => {
            let limit = |n: u64| {
                if n == 0 {
                    "no limit".to_owned()
                } else {
                    n.to_string()
                }
            };
            vec![text(format!(
                "{user}'s LLM use on {day} (UTC): {requests} requests, {tokens} tokens of {} a day; at most {} requests a minute.",
                limit(*tokens_per_day),
                limit(u64::from(*requests_per_minute)),
            ))]
        }
        Reply::LoginLink { url, minutes } => vec![
            text(format!(
                "Open this link within {minutes} minutes to sign your browser in (it works once; do not share it):"
            )),
            Block::Code(url.clone()),
        ],
        Reply::LoggedOut { sessions: 0 } => vec![text("You were not signed in anywhere.")],
        Reply::LoggedOut { sessions } => {
            vec![text(format!("Signed out {sessions} browser session(s)."))]
        }
        Reply::Sessions { sessions } if sessions.is_empty() => vec![para(vec![
            t("No browser is signed in. Sign one in with "),
            code("login"),
            t("."),
        ])],
        Reply::TokenCreated { token, info } => vec![
            text(format!(
                "Your API token '{}'{} (shown this once; keep it secret):",
                info.label,
                info.expires_at
                    .map(|e| format!(", valid until {}", format_time(e)))
                    .unwrap_or_default()
            )),
            Block::Code(token.clone()),
            text("Use it as: curl -H 'Authorization: Bearer TOKEN' --data 'projects' https://DOMAIN/api/v1/exec".to_owned()),
        ],
        Reply::Tokens { tokens } if tokens.is_empty() => vec![para(vec![
            t("You have no API tokens. Make one with "),
            code("token create [label]"),
            t("."),
        ])],
        Reply::CheckpointTaken {
            project,
            checkpoint,
            cost,
            notes,
        } => {
            let source = format!(
                "source {} in {} files {} ({} ms)",
                bytes(cost.source_bytes),
                cost.source_files,
                if cost.reflinked {
                    "by reflink"
                } else {
                    "copied"
                },
                cost.source_ms
            );
            let paused = if cost.paused_ms > 0 {
                format!("; the VM was paused for {} ms", cost.paused_ms)
            } else {
                String::new()
            };
            let mut v = vec![para(vec![
                t(format!(
                    "Checkpoint {} of {project} taken: disk {} ms ({} of its own), {source}{paused}. Roll back to it with ",
                    checkpoint.label,
                    cost.disk_ms,
                    bytes(cost.disk_bytes),
                )),
                code(format!("rollback {project} {}", checkpoint.label)),
                t("; copy it with "),
                code(format!("cp {project}@{} NEW", checkpoint.label)),
                t("."),
            ])];
            v.extend(notes.iter().map(|n| text(n.clone())));
            v
        }
        Reply::Checkpoints {
            project,
            checkpoints,
        } if checkpoints.is_empty() => vec![para(vec![
            t(format!("{project} has no checkpoints. Take one with ")),
            code(format!("checkpoint {project} [label] [--note TEXT]")),
            t("."),
        ])],
        Reply::Checkpoints { checkpoints, .. } => vec![Block::Table {
            head: [
                "label",
                "taken",
                "by",
                "note",
                "git HEAD",
                "disk (own)",
                "disk (shared)",
                "source",
            ]
                .map(String::from)
                .to_vec(),
            rows: checkpoints
                .iter()
                .map(|c| {
                    vec![
                        c.label.clone(),
                        format_time(c.taken_at),
                        c.taken_by.clone().unwrap_or_else(|| "kennel".into()),
                        match (&c.note, &c.auto_reason) {
                            (Some(n), _) => n.clone(),
                            (None, Some(why)) => format!("(automatic, {why})"),
                            (None, None) => String::new(),
                        },
                        c.git_head
                            .as_deref()
                            .map(|h| h.get(..12).unwrap_or(h).to_owned())
                            .unwrap_or_default(),
                        bytes(c.disk_bytes),
                        bytes(c.disk_shared_bytes),
                        if c.source_reflinked {
                            format!("{} (reflinked)", bytes(c.source_bytes))
                        } else {
                            bytes(c.source_bytes)
                        },
                    ]
                })
                .collect(),
        }],
        Reply::RolledBack {
            project,
            label,
            undo,
            restarted,
            notes,
        } => {
            let mut v = vec![para(vec![
                t(format!(
                    "{project} is back at checkpoint {label} (disk and source){}. What was there before is checkpoint {undo}; undo with ",
                    if *restarted { "; its VM runs again" } else { "" }
                )),
                code(format!("rollback {project} {undo}")),
                t("."),
            ])];
            v.extend(notes.iter().map(|n| text(n.clone())));
            v
        }
        Reply::CheckpointRemoved { project, label } => {
            vec![text(format!("Checkpoint {label} of {project} is removed."))]
        }
        Reply::Tokens { tokens } => vec![Block::Table {
            head: ["label", "made", "last used", "expires"]
                .map(String::from)
                .to_vec(),
            rows: tokens
                .iter()
                .map(|k| {
                    vec![
                        k.label.clone(),
                        format_time(k.created_at),
                        k.last_used_at.map_or_else(|| "never".to_owned(), format_time),
                        k.expires_at.map_or_else(|| "never".to_owned(), format_time),
                    ]
                })
                .collect(),
        }],
        // Only the config: `ssh HOST ssh-config > file` is the whole setup.
        Reply::SshConfig { config, .. } => vec![Block::Code(config.trim_end().to_owned())],
        Reply::TokenRemoved { label } => vec![text(format!(
            "Token '{label}' is revoked; requests with it are refused from now on."
        ))],
        Reply::Sessions { sessions } => vec![Block::Table {
            head: ["host", "signed in", "last seen", "expires"]
                .map(String::from)
                .to_vec(),
            rows: sessions
                .iter()
                .map(|s| {
                    vec![
                        s.host.clone(),
                        format_time(s.created_at),
                        format_time(s.last_seen_at),
                        format_time(s.expires_at),
                    ]
                })
                .collect(),
        }],
        Reply::DeployKey { public_key } => vec![text(format!(
            "Your deploy key for ssh:// and git@host: clones (add it to your git host as a read-only deploy key):\n{public_key}"
        ))],
        Reply::Keys { user, keys } if keys.is_empty() => vec![para(vec![
            t(format!("{user} has no SSH keys. Add one with ")),
            code("key add <ssh public key> [label]"),
        ])],
        Reply::Keys { user, keys } => vec![
            text(format!("SSH keys of {user}:")),
            Block::Table {
                head: ["fingerprint", "type", "label", "state", "added"]
                    .map(String::from)
                    .to_vec(),
                rows: keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.fingerprint.to_string(),
                            k.algorithm.clone(),
                            k.label.clone().unwrap_or_default(),
                            k.state.to_string(),
                            format_time(k.created_at),
                        ]
                    })
                    .collect(),
            },
        ],
        Reply::KeyAdded { key } => vec![para(vec![
            t(format!("Added {} key ", key.algorithm)),
            code(key.fingerprint.as_str()),
            t(format!(" for {}.", key.user)),
        ])],
        Reply::KeyRevoked { key } => vec![para(vec![
            t("Key "),
            code(key.fingerprint.as_str()),
            t(match key.state {
                KeyState::Revoked => format!(" of {} is revoked.", key.user),
                KeyState::Active => format!(" of {} is still active.", key.user),
            }),
        ])],
        Reply::RequestFiled { request, new } => vec![para(vec![
            t(if *new {
                format!("Access request #{} filed for key ", request.id)
            } else {
                format!("Access request #{} for key ", request.id)
            }),
            code(request.fingerprint.as_str()),
            t(match (*new, request.identity.frontend) {
                // A chat can reach the requester again; an SSH session
                // or an HTTP call has ended by the time an admin decides.
                (true, Frontend::Matrix | Frontend::Discord) => {
                    ". An admin will approve or deny it; you will be told here.".to_owned()
                }
                (true, _) => ". An admin will approve or deny it in chat; then connect again with this key (the command 'whoami' says whether you are in yet).".to_owned(),
                (false, _) => " is already pending; an admin will decide it.".to_owned(),
            }),
        ])],
        Reply::Requests { requests } if requests.is_empty() => {
            vec![text("No access requests are waiting.")]
        }
        Reply::Requests { requests } => {
            vec![Block::Bullets(requests.iter().map(request_line).collect())]
        }
        Reply::Decided { request, user } => {
            let mut v = request_line(request);
            if let Some(u) = user {
                v.push(t(format!(". The key now logs in as user {u}.")));
            }
            vec![para(v)]
        }
        Reply::Quotas { quotas, changed } => {
            let mut doc = Vec::new();
            if *changed {
                if let Some(q) = quotas.first() {
                    doc.push(text(format!("{}'s quota is set.", q.user)));
                }
            }
            doc.push(Block::Table {
                head: ["user", "role", "projects", "vCPUs", "memory", "disk"]
                    .map(String::from)
                    .to_vec(),
                rows: quotas.iter().map(quota_row).collect(),
            });
            if quotas.iter().any(|q| {
                let p = q.personal;
                p.projects || p.vcpus || p.memory_mib || p.disk_mib
            }) {
                doc.push(text(
                    "* the user's own limit; the others are their role's ('quota USER --cpus default' hands one back).",
                ));
            }
            doc
        }
        Reply::Users { users } => vec![Block::Table {
            head: ["user", "role", "identities", "keys"]
                .map(String::from)
                .to_vec(),
            rows: users.iter().map(user_line).collect(),
        }],
        Reply::Hosts { hosts } => vec![Block::Table {
            head: ["host", "state", "load", "memory", "projects"]
                .map(String::from)
                .to_vec(),
            rows: hosts
                .iter()
                .map(|h| {
                    let mut state = h.status.clone();
                    if !h.message.is_empty() && !h.online() {
                        state = format!("{state} ({})", h.message);
                    }
                    vec![
                        h.name.clone(),
                        state,
                        h.load.map_or_else(|| "-".into(), |l| format!("{l:.2}")),
                        match (h.memory_used_mib, h.memory_total_mib) {
                            (Some(u), Some(t)) => format!("{u} / {t} MiB"),
                            _ => "-".into(),
                        },
                        if h.projects.is_empty() {
                            "-".into()
                        } else {
                            h.projects.join(" ")
                        },
                    ]
                })
                .collect(),
        }],
        Reply::Moved { moved } => vec![text(moved_line(moved))],
        Reply::HostEvacuated {
            host,
            moved,
            failed,
            restored,
        } => {
            let mut doc = vec![text(match (restored, moved.len()) {
                (false, 0) => format!("{host} is evacuated; none of Kennel's projects were on it."),
                (false, n) => format!("{host} is evacuated; {n} project(s) moved off it:"),
                (true, 0) => format!("{host} is back in service; no projects were waiting to go home."),
                (true, n) => format!("{host} is back in service; {n} project(s) moved home:"),
            })];
            doc.extend(moved.iter().map(|m| text(format!("- {}", moved_line(m)))));
            doc.extend(failed.iter().map(|(p, why)| {
                text(format!("- {p} did not move: {why}"))
            }));
            doc
        }
        Reply::Stacks { stacks } if stacks.is_empty() => vec![text(
            "No stacks are installed; see 'kennel image build' in the operator docs.",
        )],
        Reply::Stacks { stacks } => vec![Block::Table {
            head: ["stack", "app port", "about"].map(String::from).to_vec(),
            rows: stacks
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.app_port.to_string(),
                        match &s.broken {
                            Some(why) => format!("BROKEN: {why}"),
                            None => s.summary.clone(),
                        },
                    ]
                })
                .collect(),
        }],
        Reply::Templates { templates } if templates.is_empty() => {
            vec![text("No templates are installed.")]
        }
        Reply::Templates { templates } => vec![Block::Table {
            head: ["template", "stack", "about"].map(String::from).to_vec(),
            rows: templates
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.stack.clone(),
                        match &s.broken {
                            Some(why) => format!("BROKEN: {why}"),
                            None => s.description.clone(),
                        },
                    ]
                })
                .collect(),
        }],
    }
}

// ------------------------------------------------------------ writers

/// Writes a document in a text format (JSON is rendered from the reply).
pub fn write_doc(doc: &[Block], f: Format) -> String {
    let parts: Vec<String> = doc
        .iter()
        .filter(|b| f == Format::Plain || !matches!(b, Block::Terminal(_)))
        .map(|b| write_block(b, f))
        .collect();
    match f {
        Format::Html => parts.concat(),
        _ => parts.join("\n"),
    }
}

fn write_inline(i: &Inline, f: Format) -> String {
    match (f, i) {
        (Format::Html, Inline::Text(s)) => escape_html(s),
        (Format::Html, Inline::Code(s)) => format!("<code>{}</code>", escape_html(s)),
        (Format::Html, Inline::Strong(s)) => format!("<b>{}</b>", escape_html(s)),
        (Format::Html, Inline::Link { text, url }) => {
            format!("<a href=\"{}\">{}</a>", escape_html(url), escape_html(text))
        }
        (Format::Markdown, Inline::Code(s)) => format!("`{}`", s.replace('`', "'")),
        (Format::Markdown, Inline::Strong(s)) => format!("**{s}**"),
        (Format::Markdown, Inline::Link { text, url }) => format!("[{text}](<{url}>)"),
        (_, Inline::Text(s) | Inline::Code(s) | Inline::Strong(s)) => s.clone(),
        (_, Inline::Link { url, .. }) => url.clone(),
    }
}

fn write_inlines(v: &[Inline], f: Format) -> String {
    v.iter().map(|i| write_inline(i, f)).collect()
}

fn aligned(head: &[String], rows: &[Vec<String>]) -> String {
    let show_head = head.iter().any(|h| !h.is_empty());
    let cols = head.len();
    let mut widths = vec![0usize; cols];
    for r in rows
        .iter()
        .map(Vec::as_slice)
        .chain(show_head.then_some(head))
    {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |r: &[String]| {
        r.iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out: Vec<String> = Vec::new();
    if show_head {
        out.push(line(head));
    }
    out.extend(rows.iter().map(|r| line(r)));
    out.join("\n")
}

fn write_block(b: &Block, f: Format) -> String {
    match (f, b) {
        (Format::Html, Block::Title(s)) => format!("<p><b>{}</b></p>", escape_html(s)),
        (Format::Html, Block::Para(v)) => format!("<p>{}</p>", write_inlines(v, f)),
        (Format::Html, Block::Code(s)) => format!("<pre><code>{}</code></pre>", escape_html(s)),
        (Format::Html, Block::Bullets(items)) => format!(
            "<ul>{}</ul>",
            items
                .iter()
                .map(|i| format!("<li>{}</li>", write_inlines(i, f)))
                .collect::<String>()
        ),
        (Format::Html, Block::Table { head, rows }) => {
            let mut s = String::from("<table>");
            if head.iter().any(|h| !h.is_empty()) {
                s.push_str("<tr>");
                for h in head {
                    s.push_str(&format!("<th>{}</th>", escape_html(h)));
                }
                s.push_str("</tr>");
            }
            for r in rows {
                s.push_str("<tr>");
                for c in r {
                    s.push_str(&format!("<td>{}</td>", escape_html(c)));
                }
                s.push_str("</tr>");
            }
            s.push_str("</table>");
            s
        }
        (Format::Markdown, Block::Title(s)) => format!("**{s}**"),
        (Format::Markdown, Block::Code(s)) => format!("```\n{}\n```", s.replace("```", "'''")),
        (Format::Markdown, Block::Table { head, rows }) => {
            format!("```\n{}\n```", aligned(head, rows).replace("```", "'''"))
        }
        (_, Block::Title(s)) => s.clone(),
        (_, Block::Para(v)) => write_inlines(v, f),
        (_, Block::Code(s)) => s.clone(),
        (_, Block::Bullets(items)) => items
            .iter()
            .map(|i| format!("- {}", write_inlines(i, f)))
            .collect::<Vec<_>>()
            .join("\n"),
        (_, Block::Table { head, rows }) => aligned(head, rows),
        (_, Block::Terminal(s)) => s.clone(),
    }
}

/// Escapes text for HTML (Matrix messages, the web gateway's pages).
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A byte count for people: `512 B`, `3.2 MiB`, `1.5 GiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    #[allow(clippy::cast_precision_loss)]
    let mut v = n as f64 / 1024.0;
    let mut unit = "KiB";
    for u in UNITS.iter().skip(1) {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// `myapp moved from m1 to m2 and runs again.`
fn moved_line(m: &crate::outcome::Moved) -> String {
    format!(
        "{} moved from {} to {}{}",
        m.project,
        if m.from.is_empty() { "?" } else { &m.from },
        m.to,
        if m.running {
            " and runs again."
        } else {
            " (stopped, as it was)."
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_and_markdown_fences() {
        let o: Outcome = Ok(Reply::Running {
            project: "<script>&".into(),
        });
        assert_eq!(
            render(&o, Format::Html),
            "<p>&lt;script&gt;&amp; is running.</p>"
        );
        let o: Outcome = Ok(Reply::Help { topic: Some("rm") });
        let md = render(&o, Format::Markdown);
        assert!(md.starts_with("```\nrm <name>"), "{md}");
    }

    #[test]
    fn json_has_ok_and_kind() {
        let o: Outcome = Ok(Reply::Projects {
            projects: vec![],
            tag: None,
        });
        let v: serde_json::Value = serde_json::from_str(&render(&o, Format::Json)).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["kind"], "projects");
        let o: Outcome = Err(CommandError::Refused("no".into()));
        let v: serde_json::Value = serde_json::from_str(&render(&o, Format::Json)).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"]["kind"], "refused");
    }

    #[test]
    fn help_lists_every_command() {
        let s = render(&Ok(Reply::Help { topic: None }), Format::Plain);
        for spec in SPECS {
            assert!(s.contains(&spec.usage()), "{}", spec.name);
        }
    }
}
