//! The Discord bot, on serenity 0.12.
//!
//! Slash commands (`/new`, `/projects`, `/status`, `/ssh`, `/rm`,
//! `/request-access`, `/help`) are registered in the configured guilds and
//! turned into lines of the one command language, so they get the same
//! parsing, policy and answers as every other front end. Messages that
//! mention the bot (or DMs) are parsed as text. Long operations defer and
//! then edit the original response with progress. Access requests go to the
//! admin channel with Approve and Deny buttons; only admins' clicks count,
//! and core refuses a second decision.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kennel_core::command::lex::quote;
use kennel_core::command::Command;
use kennel_core::model::{AccessRequest, Frontend, Identity, RequestState};
use kennel_core::outcome::Reply;
use kennel_core::provision::NoProgress;
use kennel_core::render::{write_doc, Format};
use kennel_core::{Event, Outcome};
use serenity::all::{
    ActionRowComponent, AutocompleteChoice, ButtonStyle, ChannelId, CommandDataOptionValue,
    CommandInteraction, CommandOptionType, ComponentInteraction, Context, CreateActionRow,
    CreateAutocompleteResponse, CreateButton, CreateCommand, CreateCommandOption, CreateInputText,
    CreateInteractionResponse, CreateInteractionResponseMessage, CreateMessage, CreateModal,
    EditInteractionResponse, EditMessage, EventHandler, GatewayIntents, GuildId, HttpBuilder,
    InputTextStyle, Interaction, Message, MessageId, ModalInteraction, Ready, ResumedEvent, UserId,
};
use serenity::async_trait;
use tracing::Instrument;

use crate::config::DiscordConfig;
use crate::desk::{self, Desk, Parsed};

/// Why the Discord bot stopped.
#[derive(Debug, thiserror::Error)]
pub enum DiscordError {
    #[error("discord configuration: {0}")]
    Config(String),
    #[error("the Discord client failed: {0}; check discord.token and the bot's intents")]
    Client(String),
}

/// Discord refuses messages over 2000 characters.
const MAX_CONTENT: usize = 2000;

/// Intents: guild metadata, messages that mention the bot, DMs. Message
/// content of mentions and DMs arrives without the privileged intent.
fn intents() -> GatewayIntents {
    GatewayIntents::GUILDS | GatewayIntents::GUILD_MESSAGES | GatewayIntents::DIRECT_MESSAGES
}

/// Shortens text to what Discord accepts, saying so.
fn fit(text: &str) -> String {
    if text.chars().count() <= MAX_CONTENT {
        return text.to_owned();
    }
    let cut: String = text.chars().take(MAX_CONTENT - 20).collect();
    format!("{cut}\n… (shortened)")
}

fn markdown(outcome: &Outcome, json: bool) -> String {
    fit(&kennel_core::render::render_as(
        outcome,
        json,
        Format::Markdown,
    ))
}

struct Handler {
    desk: Arc<Desk>,
    cfg: DiscordConfig,
    /// Request id → the admin-channel message about it.
    posted: Arc<Mutex<HashMap<i64, (ChannelId, MessageId)>>>,
    started_events: std::sync::atomic::AtomicBool,
    /// The bot's own user, from READY.
    me: std::sync::OnceLock<UserId>,
}

/// Runs the bot until `shutdown` resolves.
pub async fn run(
    cfg: DiscordConfig,
    desk: Arc<Desk>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), DiscordError> {
    if let Some(p) = cfg.problem() {
        return Err(DiscordError::Config(p));
    }
    let token = cfg.token.clone().unwrap_or_default();
    let mut http = HttpBuilder::new(&token);
    if let Some(base) = &cfg.api_base {
        // A local API (tests) or a rate-limiting proxy in front of Discord:
        // serenity's own rate limiter would still call discord.com.
        http = http
            .proxy(base.trim_end_matches('/'))
            .ratelimiter_disabled(true);
    }
    let handler = Handler {
        desk,
        cfg,
        posted: Arc::default(),
        started_events: std::sync::atomic::AtomicBool::new(false),
        me: std::sync::OnceLock::new(),
    };
    let mut client = serenity::client::ClientBuilder::new_with_http(http.build(), intents())
        .event_handler(handler)
        .await
        .map_err(|e| DiscordError::Client(e.to_string()))?;
    let shards = client.shard_manager.clone();
    tokio::select! {
        r = client.start() => r.map_err(|e| DiscordError::Client(e.to_string())),
        () = shutdown => {
            tracing::info!("Discord bot stopping");
            shards.shutdown_all().await;
            Ok(())
        }
    }
}

fn identity(user: UserId) -> Identity {
    Identity::new(Frontend::Discord, user.get().to_string())
}

/// The value of a string option of a slash command.
fn opt(cmd: &CommandInteraction, name: &str) -> Option<String> {
    cmd.data
        .options
        .iter()
        .find(|o| o.name == name)
        .and_then(|o| match &o.value {
            CommandDataOptionValue::String(s) => Some(s.clone()),
            _ => None,
        })
}

/// A slash command as a line of the command language.
fn slash_line(cmd: &CommandInteraction) -> String {
    let mut line = match cmd.data.name.as_str() {
        "new" => "new project".to_owned(),
        "request-access" => "request-access".to_owned(),
        "link" => "share".to_owned(),
        "domain" => "domain add".to_owned(),
        other => other.to_owned(),
    };
    let mut push = |s: &str| {
        line.push(' ');
        line.push_str(&quote(s));
    };
    match cmd.data.name.as_str() {
        "new" => {
            if let Some(n) = opt(cmd, "name") {
                push(&n);
            }
            for flag in ["stack", "git", "template"] {
                if let Some(v) = opt(cmd, flag) {
                    // The flag as is; its value quoted.
                    line.push_str(&format!(" --{flag} {}", quote(&v)));
                }
            }
        }
        "status" | "ssh" | "rm" | "checkpoints" => {
            if let Some(n) = opt(cmd, "name") {
                push(&n);
            }
        }
        "projects" => {
            if let Some(t) = opt(cmd, "tag") {
                line.push_str(&format!(" --tag {}", quote(&t)));
            }
        }
        "tag" | "untag" => {
            if let Some(n) = opt(cmd, "name") {
                push(&n);
            }
            // Several tags in one option, separated by spaces.
            for t in opt(cmd, "tags").unwrap_or_default().split_whitespace() {
                push(t);
            }
        }
        "checkpoint" | "rollback" => {
            for o in ["name", "label"] {
                if let Some(v) = opt(cmd, o) {
                    push(&v);
                }
            }
            if let Some(n) = opt(cmd, "note") {
                line.push_str(&format!(" --note {}", quote(&n)));
            }
        }
        "agent" => {
            if let Some(n) = opt(cmd, "name") {
                push(&n);
            }
            for flag in ["with", "timeout"] {
                if let Some(v) = opt(cmd, flag) {
                    line.push_str(&format!(" --{flag} {}", quote(&v)));
                }
            }
            // The task, quoted: the text of the field reaches the agent
            // as it was typed, quotes and all, as one argument.
            if let Some(t) = opt(cmd, "task") {
                line.push(' ');
                line.push_str(&quote(&t));
            }
        }
        "run" => {
            if let Some(n) = opt(cmd, "name") {
                push(&n);
            }
            if let Some(t) = opt(cmd, "timeout") {
                line.push_str(&format!(" --timeout {}", quote(&t)));
            }
            // The command as typed: its words are its own.
            if let Some(c) = opt(cmd, "command") {
                line.push(' ');
                line.push_str(&c);
            }
        }
        "resize" | "link" => {
            if let Some(n) = opt(cmd, "name") {
                push(&n);
            }
            if cmd.data.name == "link" {
                line.push_str(" --link");
            }
            for flag in ["cpus", "memory", "disk", "port", "expires", "note"] {
                if let Some(v) = opt(cmd, flag) {
                    line.push_str(&format!(" --{flag} {}", quote(&v)));
                }
            }
        }
        "domain" => {
            for o in ["name", "host"] {
                if let Some(v) = opt(cmd, o) {
                    push(&v);
                }
            }
        }
        "request-access" => {
            if let Some(k) = opt(cmd, "key") {
                push(&k);
            }
            if let Some(n) = opt(cmd, "note") {
                push(&n);
            }
        }
        "help" => {
            if let Some(t) = opt(cmd, "topic") {
                push(&t);
            }
        }
        _ => {}
    }
    line
}

fn commands() -> Vec<CreateCommand> {
    let name =
        |d: &str| CreateCommandOption::new(CommandOptionType::String, "name", d).required(true);
    vec![
        CreateCommand::new("new")
            .description("Create a project with its own VM")
            .add_option(name("Project name: lowercase letters, digits and dashes"))
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::String,
                    "stack",
                    "rust, node, go, python… (detected when omitted)",
                )
                .set_autocomplete(true),
            )
            .add_option(CreateCommandOption::new(
                CommandOptionType::String,
                "git",
                "Repository to clone (https or ssh URL)",
            ))
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::String,
                    "template",
                    "Start from a template",
                )
                .set_autocomplete(true),
            ),
        CreateCommand::new("projects")
            .description("Your projects")
            .add_option(CreateCommandOption::new(
                CommandOptionType::String,
                "tag",
                "Only those with this tag",
            )),
        CreateCommand::new("tag")
            .description("Tag a project")
            .add_option(name("Project name"))
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::String,
                    "tags",
                    "One or more tags, separated by spaces",
                )
                .required(true),
            ),
        CreateCommand::new("untag")
            .description("Remove tags from a project")
            .add_option(name("Project name"))
            .add_option(
                CreateCommandOption::new(CommandOptionType::String, "tags", "The tags to remove")
                    .required(true),
            ),
        CreateCommand::new("status")
            .description("A project's state and VM")
            .add_option(name("Project name")),
        CreateCommand::new("ssh")
            .description("How to connect to a project (SSH, editors)")
            .add_option(name("Project name")),
        CreateCommand::new("rm")
            .description("Destroy a project's VM (its source is kept)")
            .add_option(name("Project name")),
        CreateCommand::new("checkpoint")
            .description("Take a checkpoint of a project (disk and source) to roll back to")
            .add_option(name("Project name"))
            .add_option(CreateCommandOption::new(
                CommandOptionType::String,
                "label",
                "A label (c1, c2… when omitted)",
            ))
            .add_option(CreateCommandOption::new(
                CommandOptionType::String,
                "note",
                "Why, for the list",
            )),
        CreateCommand::new("checkpoints")
            .description("A project's checkpoints")
            .add_option(name("Project name")),
        CreateCommand::new("rollback")
            .description("Put a project back as it was at a checkpoint (asks first)")
            .add_option(name("Project name"))
            .add_option(
                CreateCommandOption::new(CommandOptionType::String, "label", "The checkpoint")
                    .required(true),
            ),
        CreateCommand::new("run")
            .description("Run a command in a project's VM (as dev, in /workspace)")
            .add_option(name("Project name"))
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::String,
                    "command",
                    "The command, e.g. cargo test --release",
                )
                .required(true),
            )
            .add_option(CreateCommandOption::new(
                CommandOptionType::String,
                "timeout",
                "Stop it after this long (default 10m)",
            )),
        CreateCommand::new("agent")
            .description("Run a coding agent on a task in a project's VM (a checkpoint first)")
            .add_option(name("Project name"))
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::String,
                    "task",
                    "What the agent should do, e.g. fix the failing test",
                )
                .required(true),
            )
            .add_option(CreateCommandOption::new(
                CommandOptionType::String,
                "with",
                "An agent the operator configured (default: .kennel/agent, else theirs)",
            ))
            .add_option(CreateCommandOption::new(
                CommandOptionType::String,
                "timeout",
                "Stop it after this long (default 1h)",
            )),
        CreateCommand::new("resize")
            .description("Change a project's CPUs, memory or disk (disks only grow)")
            .add_option(name("Project name"))
            .add_option(CreateCommandOption::new(
                CommandOptionType::String,
                "cpus",
                "Virtual CPUs",
            ))
            .add_option(CreateCommandOption::new(
                CommandOptionType::String,
                "memory",
                "Memory, e.g. 4G",
            ))
            .add_option(CreateCommandOption::new(
                CommandOptionType::String,
                "disk",
                "Disk, e.g. 30G",
            )),
        CreateCommand::new("link")
            .description("A one-use link to a project's web app for someone without an account")
            .add_option(name("Project name"))
            .add_option(CreateCommandOption::new(
                CommandOptionType::String,
                "port",
                "Only this port's site",
            ))
            .add_option(CreateCommandOption::new(
                CommandOptionType::String,
                "expires",
                "How long it works (default 7d)",
            ))
            .add_option(CreateCommandOption::new(
                CommandOptionType::String,
                "note",
                "Who it is for",
            )),
        CreateCommand::new("domain")
            .description("Serve a project's app at a host name of yours (its DNS must point here)")
            .add_option(name("Project name"))
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::String,
                    "host",
                    "The host name, e.g. app.example.com",
                )
                .required(true),
            ),
        CreateCommand::new("request-access")
            .description("Ask an admin for access with your SSH public key")
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::String,
                    "key",
                    "Your SSH public key (ssh-ed25519 AAAA…)",
                )
                .required(true),
            )
            .add_option(CreateCommandOption::new(
                CommandOptionType::String,
                "note",
                "Who you are, for the admins",
            )),
        CreateCommand::new("help")
            .description("What Kennel can do")
            .add_option(CreateCommandOption::new(
                CommandOptionType::String,
                "topic",
                "A command to explain",
            )),
    ]
}

/// The two ways on after an agent's run: keep what it did, or roll the
/// project back to the checkpoint taken before it.
fn agent_buttons(project: &str, checkpoint: &str) -> Vec<CreateActionRow> {
    vec![CreateActionRow::Buttons(vec![
        CreateButton::new(format!("kennel:keep:{project}@{checkpoint}"))
            .label("Keep it")
            .style(ButtonStyle::Success),
        CreateButton::new(format!("kennel:undo:{project}@{checkpoint}"))
            .label(format!("Roll back to {checkpoint}"))
            .style(ButtonStyle::Danger),
    ])]
}

/// The answers to an egress ask: allow, allow once, deny (none when the
/// destination is too long for Discord's 100-character button ids; the
/// message names the commands anyway).
fn egress_buttons(project: &str, dest: &str) -> Vec<CreateActionRow> {
    let id = |verb: &str| format!("kennel:egress:{verb} {project} {dest}");
    if id("allow-once").len() > 100 {
        return Vec::new();
    }
    vec![CreateActionRow::Buttons(vec![
        CreateButton::new(id("allow"))
            .label("Allow")
            .style(ButtonStyle::Success),
        CreateButton::new(id("allow-once"))
            .label("Allow once")
            .style(ButtonStyle::Primary),
        CreateButton::new(id("deny"))
            .label("Deny")
            .style(ButtonStyle::Danger),
    ])]
}

fn decision_buttons(id: i64, disabled: bool) -> Vec<CreateActionRow> {
    vec![CreateActionRow::Buttons(vec![
        CreateButton::new(format!("kennel:approve:{id}"))
            .label("Approve")
            .style(ButtonStyle::Success)
            .disabled(disabled),
        CreateButton::new(format!("kennel:deny:{id}"))
            .label("Deny")
            .style(ButtonStyle::Danger)
            .disabled(disabled),
    ])]
}

/// The admin-channel message after a decision: who and when, buttons off.
fn decided_update(r: &AccessRequest) -> CreateInteractionResponse {
    CreateInteractionResponse::UpdateMessage(
        CreateInteractionResponseMessage::new()
            .content(request_text(r))
            .components(decision_buttons(r.id, true)),
    )
}

fn request_text(r: &AccessRequest) -> String {
    let how = "Approve or Deny with the buttons (admins only), or type `approve ID` / `deny ID [reason]` anywhere Kennel listens.";
    fit(&write_doc(
        &desk::request_document(r, how),
        Format::Markdown,
    ))
}

impl Handler {
    fn ephemeral(content: String) -> CreateInteractionResponse {
        CreateInteractionResponse::Message(
            CreateInteractionResponseMessage::new()
                .content(fit(&content))
                .ephemeral(true),
        )
    }

    /// Notes a requester's Discord username: an approved request's user
    /// is named after it (`ann`, not `u1000…`). Best effort.
    async fn remember_name(&self, who: &Identity, name: &str) {
        if let Err(e) = self.desk.gate().remember_name(who, name).await {
            tracing::warn!(identity = %who, error = %e, "could not note the requester's Discord name");
        }
    }

    async fn on_command(&self, ctx: &Context, cmd: CommandInteraction) {
        let who = identity(cmd.user.id);
        let http = ctx.http.clone();
        if let Err(refusal) = self.desk.admit(&who, &slash_line(&cmd)) {
            let _ = cmd
                .create_response(&http, Self::ephemeral(refusal.to_string()))
                .await;
            return;
        }
        if cmd.data.name == "request-access" {
            self.remember_name(&who, &cmd.user.name).await;
        }
        let line = slash_line(&cmd);
        let (invocation, long) = match self.desk.parse(&line, &[]) {
            Parsed::Run { invocation, long } => (invocation, long),
            Parsed::Invalid(outcome) => {
                let _ = cmd
                    .create_response(&http, Self::ephemeral(markdown(&outcome, false)))
                    .await;
                return;
            }
        };
        // Help is for everyone; the rest can show keys or private URLs.
        let ephemeral = !matches!(invocation.command, Command::Help { .. });
        // rm and rollback ask first, with a button.
        let button = match &invocation.command {
            Command::Rm {
                name,
                purge: false,
                yes: false,
            } => Some((format!("kennel:rm:{name}"), format!("Destroy {name}"))),
            Command::Rollback {
                name,
                label,
                yes: false,
            } => Some((
                format!("kennel:rollback:{name}@{label}"),
                format!("Roll {name} back to {label}"),
            )),
            _ => None,
        };
        if let Some((id, label)) = button {
            let outcome = self
                .desk
                .run(&who, invocation.command.clone(), &NoProgress)
                .await;
            let response = match &outcome {
                Ok(Reply::Confirm { prompt, .. }) => CreateInteractionResponseMessage::new()
                    .content(fit(prompt))
                    .ephemeral(true)
                    .components(vec![CreateActionRow::Buttons(vec![CreateButton::new(id)
                        .label(label)
                        .style(ButtonStyle::Danger)])]),
                _ => CreateInteractionResponseMessage::new()
                    .content(markdown(&outcome, false))
                    .ephemeral(true),
            };
            let _ = cmd
                .create_response(&http, CreateInteractionResponse::Message(response))
                .await;
            return;
        }
        // Defer at once (Discord allows 3 s), then edit the original response.
        let defer = CreateInteractionResponse::Defer(
            CreateInteractionResponseMessage::new().ephemeral(ephemeral),
        );
        if let Err(e) = cmd.create_response(&http, defer).await {
            tracing::warn!(error = %e, "could not defer an interaction");
            return;
        }
        let outcome = if long {
            let (h, c) = (http.clone(), cmd.clone());
            self.desk
                .run_tracked(&who, invocation.command, move |steps| {
                    let (h, c) = (h.clone(), c.clone());
                    async move {
                        let edit = EditInteractionResponse::new()
                            .content(fit(&steps.render(Format::Markdown)));
                        if let Err(e) = c.edit_response(&h, edit).await {
                            tracing::warn!(error = %e, "could not edit the progress message");
                        }
                    }
                })
                .await
        } else {
            self.desk.run(&who, invocation.command, &NoProgress).await
        };
        let mut edit = EditInteractionResponse::new().content(markdown(&outcome, invocation.json));
        if let Ok(Reply::AgentRan {
            project,
            checkpoint,
            ..
        }) = &outcome
        {
            edit = edit.components(agent_buttons(project, checkpoint));
        }
        if let Err(e) = cmd.edit_response(&http, edit).await {
            tracing::warn!(error = %e, "could not send the answer");
        }
    }

    async fn on_autocomplete(&self, ctx: &Context, cmd: CommandInteraction) {
        let Some(focused) = cmd.data.autocomplete() else {
            return;
        };
        let typed = focused.value.to_ascii_lowercase();
        let catalog = self.desk.gate().catalog();
        let names: Vec<(String, String)> = match focused.name {
            "stack" => catalog
                .stacks()
                .into_iter()
                .filter(|s| s.broken.is_none())
                .map(|s| (s.name, s.summary))
                .collect(),
            "template" => catalog
                .templates()
                .into_iter()
                .filter(|t| t.broken.is_none())
                .map(|t| (t.name, t.description))
                .collect(),
            _ => Vec::new(),
        };
        let choices: Vec<AutocompleteChoice> = names
            .into_iter()
            .filter(|(n, _)| n.starts_with(&typed))
            .take(25)
            .map(|(n, about)| {
                let label: String = format!("{n} — {about}").chars().take(100).collect();
                AutocompleteChoice::new(label, n)
            })
            .collect();
        let r = CreateInteractionResponse::Autocomplete(
            CreateAutocompleteResponse::new().set_choices(choices),
        );
        let _ = cmd.create_response(&ctx.http, r).await;
    }

    async fn on_component(&self, ctx: &Context, c: ComponentInteraction) {
        let who = identity(c.user.id);
        let mut parts = c.data.custom_id.splitn(3, ':');
        let (Some("kennel"), Some(action), Some(arg)) = (parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        if let Err(refusal) = self.desk.admit(&who, "") {
            let _ = c
                .create_response(&ctx.http, Self::ephemeral(refusal.to_string()))
                .await;
            return;
        }
        match action {
            "approve" => {
                let Ok(id) = arg.parse::<i64>() else { return };
                let outcome = self
                    .desk
                    .run(&who, Command::Approve { id, name: None }, &NoProgress)
                    .await;
                self.after_decision(ctx, &c, outcome).await;
            }
            "deny" => {
                let Ok(id) = arg.parse::<i64>() else { return };
                // Ask policy before showing the form; the deny itself asks again.
                let deny = Command::Deny { id, reason: None };
                if self.desk.gate().authorize(&who, &deny).await.is_err() {
                    let _ = c
                        .create_response(
                            &ctx.http,
                            Self::ephemeral("refused: only admins decide access requests.".into()),
                        )
                        .await;
                    return;
                }
                let modal = CreateModal::new(
                    format!("kennel:deny-reason:{id}"),
                    format!("Deny access request #{id}"),
                )
                .components(vec![CreateActionRow::InputText(
                    CreateInputText::new(
                        InputTextStyle::Paragraph,
                        "Reason (shown to the requester)",
                        "reason",
                    )
                    .required(false)
                    .max_length(500),
                )]);
                let _ = c
                    .create_response(&ctx.http, CreateInteractionResponse::Modal(modal))
                    .await;
            }
            "egress" => {
                let words: Vec<&str> = arg.split(' ').collect();
                let [verb @ ("allow" | "allow-once" | "deny"), name, dest] = words[..] else {
                    return;
                };
                let line = format!("egress {} {verb} {}", quote(name), quote(dest));
                let Parsed::Run { invocation, .. } = self.desk.parse(&line, &[]) else {
                    return;
                };
                let outcome = self.desk.run(&who, invocation.command, &NoProgress).await;
                // Done: the ask shows who answered what, its buttons go;
                // refused: the clicker alone learns why.
                let response = match &outcome {
                    Ok(_) => {
                        let said = match verb {
                            "allow" => "allowed",
                            "allow-once" => "allowed for a while",
                            _ => "denied",
                        };
                        CreateInteractionResponse::UpdateMessage(
                            CreateInteractionResponseMessage::new()
                                .content(fit(&format!(
                                    "{}\n→ {dest} {said} by <@{}>.",
                                    c.message.content, c.user.id
                                )))
                                .components(vec![]),
                        )
                    }
                    Err(_) => Self::ephemeral(markdown(&outcome, false)),
                };
                if let Err(e) = c.create_response(&ctx.http, response).await {
                    tracing::warn!(error = %e, "could not answer a button click");
                }
            }
            "keep" | "undo" => {
                let Some((name, label)) = arg.split_once('@') else {
                    return;
                };
                // Policy first: only whoever may roll back decides.
                let line = format!("rollback {} {} --yes", quote(name), quote(label));
                let Parsed::Run { invocation, .. } = self.desk.parse(&line, &[]) else {
                    return;
                };
                if let Err(e) = self.desk.gate().authorize(&who, &invocation.command).await {
                    let _ = c
                        .create_response(&ctx.http, Self::ephemeral(format!("refused: {e}")))
                        .await;
                    return;
                }
                // The summary stays; its buttons go.
                let update = CreateInteractionResponse::UpdateMessage(
                    CreateInteractionResponseMessage::new().components(vec![]),
                );
                let _ = c.create_response(&ctx.http, update).await;
                let said = if action == "keep" {
                    format!("Kept: {name} goes on from what the agent did ({label} stays, to roll back to later).")
                } else {
                    let outcome = self.desk.run(&who, invocation.command, &NoProgress).await;
                    markdown(&outcome, false)
                };
                let _ = c
                    .create_followup(
                        &ctx.http,
                        serenity::all::CreateInteractionResponseFollowup::new().content(fit(&said)),
                    )
                    .await;
            }
            "rm" | "rollback" => {
                let (line, doing) = match (action, arg.split_once('@')) {
                    ("rollback", Some((name, label))) => (
                        format!("rollback {} {} --yes", quote(name), quote(label)),
                        format!("Rolling {name} back to {label} …"),
                    ),
                    ("rm", None) => (
                        format!("rm {} --yes", quote(arg)),
                        format!("Destroying {arg} …"),
                    ),
                    _ => return,
                };
                let Parsed::Run { invocation, .. } = self.desk.parse(&line, &[]) else {
                    return;
                };
                let update = CreateInteractionResponse::UpdateMessage(
                    CreateInteractionResponseMessage::new()
                        .content(doing)
                        .components(vec![]),
                );
                let _ = c.create_response(&ctx.http, update).await;
                let outcome = self.desk.run(&who, invocation.command, &NoProgress).await;
                let _ = c
                    .edit_response(
                        &ctx.http,
                        EditInteractionResponse::new().content(markdown(&outcome, false)),
                    )
                    .await;
            }
            _ => {}
        }
    }

    /// Answers a decision click: the message shows the decision (buttons
    /// off), or the clicker alone learns why nothing changed.
    async fn after_decision(&self, ctx: &Context, c: &ComponentInteraction, outcome: Outcome) {
        let response = match &outcome {
            Ok(Reply::Decided { request, .. }) => decided_update(request),
            _ => Self::ephemeral(markdown(&outcome, false)),
        };
        if let Err(e) = c.create_response(&ctx.http, response).await {
            tracing::warn!(error = %e, "could not answer a button click");
        }
    }

    async fn on_modal(&self, ctx: &Context, m: ModalInteraction) {
        let who = identity(m.user.id);
        let Some(id) = m
            .data
            .custom_id
            .strip_prefix("kennel:deny-reason:")
            .and_then(|s| s.parse::<i64>().ok())
        else {
            return;
        };
        let reason = m
            .data
            .components
            .iter()
            .flat_map(|row| row.components.iter())
            .find_map(|c| match c {
                ActionRowComponent::InputText(t) if t.custom_id == "reason" => t.value.clone(),
                _ => None,
            })
            .filter(|r| !r.trim().is_empty());
        let outcome = self
            .desk
            .run(&who, Command::Deny { id, reason }, &NoProgress)
            .await;
        let response = match &outcome {
            Ok(Reply::Decided { request, .. }) if m.message.is_some() => decided_update(request),
            _ => Self::ephemeral(markdown(&outcome, false)),
        };
        if let Err(e) = m.create_response(&ctx.http, response).await {
            tracing::warn!(error = %e, "could not answer a modal");
        }
    }

    async fn on_text(&self, ctx: &Context, msg: Message) {
        let Some(me) = self.me.get().copied() else {
            return;
        };
        if msg.author.bot || msg.author.id == me {
            return;
        }
        let dm = msg.guild_id.is_none();
        if !dm && !msg.mentions.iter().any(|u| u.id == me) {
            return;
        }
        let who = identity(msg.author.id);
        let http = ctx.http.clone();
        if let Err(refusal) = self.desk.admit(&who, &msg.content) {
            let _ = msg.reply(&http, refusal.to_string()).await;
            return;
        }
        let mention = format!("<@{me}>");
        let nick = format!("<@!{me}>");
        let (invocation, long) = match self.desk.parse(&msg.content, &[&mention, &nick]) {
            Parsed::Run { invocation, long } => (invocation, long),
            Parsed::Invalid(outcome) => {
                let _ = msg.reply(&http, markdown(&outcome, false)).await;
                return;
            }
        };
        if !dm
            && (invocation.command.private() || matches!(invocation.command, Command::Ssh { .. }))
        {
            let _ = msg
                .reply(&http, "Please use the slash command for that (its answer is only shown to you), or DM me.")
                .await;
            return;
        }
        if matches!(invocation.command, Command::RequestAccess { .. }) {
            self.remember_name(&who, &msg.author.name).await;
        }
        let json = invocation.json;
        if long {
            let Ok(progress) = msg
                .reply(
                    &http,
                    fit(&desk::Steps::new(invocation.command.to_string()).render(Format::Markdown)),
                )
                .await
            else {
                return;
            };
            let (h, ch, id) = (http.clone(), progress.channel_id, progress.id);
            let outcome = self
                .desk
                .run_tracked(&who, invocation.command, move |steps| {
                    let h = h.clone();
                    async move {
                        let edit = EditMessage::new().content(fit(&steps.render(Format::Markdown)));
                        if let Err(e) = ch.edit_message(&h, id, edit).await {
                            tracing::warn!(error = %e, "could not edit the progress message");
                        }
                    }
                })
                .await;
            let _ = ch
                .edit_message(
                    &http,
                    id,
                    EditMessage::new().content(markdown(&outcome, json)),
                )
                .await;
        } else {
            let outcome = self.desk.run(&who, invocation.command, &NoProgress).await;
            let _ = msg.reply(&http, markdown(&outcome, json)).await;
        }
    }

    /// Posts access requests to the admin channel and tells requesters.
    async fn forward_events(
        desk: Arc<Desk>,
        http: Arc<serenity::http::Http>,
        admin_channel: Option<ChannelId>,
        posted: Arc<Mutex<HashMap<i64, (ChannelId, MessageId)>>>,
    ) {
        let mut rx = desk.gate().subscribe();
        while let Some(event) = desk::next_event(&mut rx).await {
            match event {
                Event::AccessRequested(r) => {
                    let Some(ch) = admin_channel else { continue };
                    let m = CreateMessage::new()
                        .content(request_text(&r))
                        .components(decision_buttons(r.id, false));
                    match ch.send_message(&http, m).await {
                        Ok(msg) => {
                            if let Ok(mut p) = posted.lock() {
                                p.insert(r.id, (ch, msg.id));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, request = r.id, "could not post an access request")
                        }
                    }
                }
                Event::AdminNotice(text) => {
                    let Some(ch) = admin_channel else { continue };
                    if let Err(e) = ch
                        .send_message(&http, CreateMessage::new().content(fit(&text)))
                        .await
                    {
                        tracing::warn!(error = %e, "could not tell the admins");
                    }
                }
                Event::RequestDecided(r) => {
                    // Show the decision wherever it was made (a click, Matrix, SSH).
                    let at = posted.lock().ok().and_then(|p| p.get(&r.id).copied());
                    if let Some((ch, id)) = at {
                        let edit = EditMessage::new()
                            .content(request_text(&r))
                            .components(decision_buttons(r.id, true));
                        if let Err(e) = ch.edit_message(&http, id, edit).await {
                            tracing::warn!(error = %e, "could not update the request message");
                        }
                    }
                    if r.identity.frontend != Frontend::Discord || r.state == RequestState::Pending
                    {
                        continue;
                    }
                    let Ok(uid) = r.identity.external_id.parse::<std::num::NonZeroU64>() else {
                        continue;
                    };
                    let doc = desk::outcome_document(&r, desk.gate());
                    let text = fit(&write_doc(&doc, Format::Markdown));
                    if let Err(e) = dm(&http, uid, text, Vec::new()).await {
                        tracing::warn!(error = %e, user = uid, "could not DM the requester");
                    }
                }
                Event::IdleStopped {
                    project,
                    identities,
                    after,
                    ..
                } => {
                    let line = kennel_core::idle::idle_notice(&project, after);
                    tell_owner(&http, &identities, line).await;
                }
                Event::ProjectNotice {
                    project,
                    identities,
                    text,
                    ..
                } => {
                    let line = kennel_core::llm::notice_line(&project, &text);
                    tell_owner(&http, &identities, line).await;
                }
                Event::EgressAsked {
                    project,
                    identities,
                    dest,
                    ..
                } => {
                    let line = kennel_core::executor::egress::ask_line(&project, &dest);
                    let buttons = egress_buttons(project.as_str(), &dest);
                    tell_owner_with(&http, &identities, line, buttons).await;
                }
            }
        }
    }
}

/// Says `line` by DM to each Discord identity of a project's owner (an
/// idle stop, a line from the VM).
async fn tell_owner(http: &serenity::http::Http, identities: &[Identity], line: String) {
    tell_owner_with(http, identities, line, Vec::new()).await;
}

/// [`tell_owner`], with buttons under the message.
async fn tell_owner_with(
    http: &serenity::http::Http,
    identities: &[Identity],
    line: String,
    buttons: Vec<CreateActionRow>,
) {
    for id in identities
        .iter()
        .filter(|i| i.frontend == Frontend::Discord)
    {
        let Ok(uid) = id.external_id.parse::<std::num::NonZeroU64>() else {
            continue;
        };
        if let Err(e) = dm(http, uid, line.clone(), buttons.clone()).await {
            tracing::warn!(error = %e, user = uid, "could not tell a project's owner");
        }
    }
}

/// Sends `text` to a user's DM channel.
async fn dm(
    http: &serenity::http::Http,
    uid: std::num::NonZeroU64,
    text: String,
    buttons: Vec<CreateActionRow>,
) -> serenity::Result<()> {
    let dm = UserId::from(uid).create_dm_channel(http).await?;
    dm.send_message(http, CreateMessage::new().content(text).components(buttons))
        .await
        .map(|_| ())
}

#[async_trait]
impl EventHandler for Handler {
    async fn ready(&self, ctx: Context, ready: Ready) {
        tracing::info!(user = %ready.user.name, guilds = ready.guilds.len(), "Discord bot connected");
        let _ = self.me.set(ready.user.id);
        for g in &self.cfg.guilds {
            if let Err(e) = GuildId::new(*g).set_commands(&ctx.http, commands()).await {
                tracing::error!(guild = g, error = %e, "could not register slash commands; is the bot in that guild with the applications.commands scope?");
            }
        }
        // One event forwarder, however often the gateway reconnects.
        if !self
            .started_events
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tokio::spawn(Self::forward_events(
                self.desk.clone(),
                ctx.http.clone(),
                self.cfg.admin_channel.map(ChannelId::new),
                self.posted.clone(),
            ));
        }
    }

    async fn resume(&self, _: Context, _: ResumedEvent) {
        tracing::info!("Discord gateway session resumed");
    }

    async fn message(&self, ctx: Context, msg: Message) {
        self.on_text(&ctx, msg).await;
    }

    async fn interaction_create(&self, ctx: Context, interaction: Interaction) {
        let span = tracing::info_span!("discord", user = interaction_user(&interaction));
        async move {
            match interaction {
                Interaction::Command(c) => self.on_command(&ctx, c).await,
                Interaction::Autocomplete(c) => self.on_autocomplete(&ctx, c).await,
                Interaction::Component(c) => self.on_component(&ctx, c).await,
                Interaction::Modal(m) => self.on_modal(&ctx, m).await,
                _ => {}
            }
        }
        .instrument(span)
        .await;
    }
}

fn interaction_user(i: &Interaction) -> u64 {
    match i {
        Interaction::Command(c) | Interaction::Autocomplete(c) => c.user.id.get(),
        Interaction::Component(c) => c.user.id.get(),
        Interaction::Modal(m) => m.user.id.get(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_shortened_for_discord() {
        let t = "x".repeat(5000);
        let f = fit(&t);
        assert!(f.chars().count() <= MAX_CONTENT);
        assert!(f.ends_with("(shortened)"));
        assert_eq!(fit("short"), "short");
    }

    #[test]
    fn every_slash_command_is_a_command_of_the_language() {
        for c in commands() {
            let v = serde_json::to_value(&c).unwrap();
            let name = v["name"].as_str().unwrap();
            let line = match name {
                "new" => "new project a".to_owned(),
                "status" | "ssh" | "rm" | "checkpoint" | "checkpoints" => format!("{name} a"),
                "rollback" => "rollback a c1".to_owned(),
                "tag" | "untag" => format!("{name} a web team-x"),
                "run" => "run a ls".to_owned(),
                "agent" => "agent a fix the test".to_owned(),
                "resize" => "resize a --cpus 2".to_owned(),
                "link" => "share a --link".to_owned(),
                "domain" => "domain add a app.example.com".to_owned(),
                "request-access" => {
                    format!(
                        "request-access {}",
                        kennel_core::keys::testing::ed25519(1, None).openssh()
                    )
                }
                other => other.to_owned(),
            };
            assert!(kennel_core::parse(&line).is_ok(), "/{name} → {line}");
        }
    }
}
