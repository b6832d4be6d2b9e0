//! The front door: the one path from what a person sent to what is sent
//! back, for every front end (console, SSH, chat, the dashboard and the
//! HTTP API): parse, choose the format, authorize and run with progress,
//! render. Front ends other than the console reach it through their
//! [`crate::Gate`]; an error's kind, exit code and HTTP status come from
//! [`crate::outcome::ErrorKind`].
//!
//! A front end hands over an identity (and, when it has resolved one
//! already, the user), the line, its own answer format and a progress
//! sink; it gets back the outcome, the rendered text and the exit code. It
//! never parses, guesses the format or renders by itself.

use crate::command::{self, Invocation};
use crate::executor::Executor;
use crate::model::{Identity, User};
use crate::outcome::{exit_code, Outcome};
use crate::provision::ProgressSink;
use crate::render::{self, Format};

/// How a front end shows answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    /// Its own format (plain text for terminals, Markdown for Discord,
    /// HTML for Matrix).
    pub format: Format,
    /// JSON whatever the line says (`kennel exec --json`, the HTTP API).
    pub force_json: bool,
}

impl Style {
    /// Plain text, JSON when the line asks for it.
    pub const PLAIN: Style = Style {
        format: Format::Plain,
        force_json: false,
    };
}

/// What went back.
#[derive(Debug)]
pub struct Answered {
    pub outcome: Outcome,
    /// Whether the answer is JSON (asked for by the line or the front end).
    pub json: bool,
    /// The outcome rendered for the front end.
    pub text: String,
    /// 0 done, 1 refused or failed, 2 usage.
    pub exit: i32,
}

impl Answered {
    /// Renders an outcome for a front end.
    pub fn new(outcome: Outcome, json: bool, format: Format) -> Self {
        let text = render::render_as(&outcome, json, format);
        let exit = exit_code(&outcome);
        Self {
            outcome,
            json,
            text,
            exit,
        }
    }
}

impl Executor {
    /// Runs one line for `who` and renders the answer. `user` is `Some`
    /// when the front end has resolved the user already (the SSH gateway
    /// at authentication, the console's `--as`); otherwise the identity is
    /// resolved here.
    pub async fn front_door(
        &self,
        who: &Identity,
        user: Option<Option<User>>,
        line: &str,
        style: Style,
        progress: &dyn ProgressSink,
    ) -> Answered {
        match command::parse(line) {
            Ok(inv) => self.answer(who, user, inv, style, progress).await,
            // The parser still says whether JSON was asked for.
            Err(e) => Answered::new(
                Err(e.into()),
                command::wants_json(line) || style.force_json,
                style.format,
            ),
        }
    }

    /// The front door for a command a front end has parsed already: chat
    /// bots parse with their own address stripped (and slash commands and
    /// reactions arrive typed), then come here.
    pub async fn answer(
        &self,
        who: &Identity,
        user: Option<Option<User>>,
        inv: Invocation,
        style: Style,
        progress: &dyn ProgressSink,
    ) -> Answered {
        let out = match user {
            Some(user) => self.execute_as(who, user, inv.command, progress).await,
            None => self.execute(who, inv.command, progress).await,
        };
        Answered::new(out, inv.json || style.force_json, style.format)
    }
}
