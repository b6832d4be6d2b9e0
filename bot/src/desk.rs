//! What both bots share: admission (message size, per-user rate limits),
//! running a line through the executor, progress shown by editing one
//! message at a bounded rate, and the texts for access requests.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kennel_core::command::{self, Command, Invocation};
use kennel_core::guest::Tail;
use kennel_core::model::{AccessRequest, Identity, RequestState};
use kennel_core::outcome::Outcome;
use kennel_core::provision::{Progress, ProgressSink};
use kennel_core::render::{self, Block, Format, Inline};
use kennel_core::Gate;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Limits a bot applies before anything reaches the executor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Commands one person may send per minute (sustained).
    pub commands_per_minute: u32,
    /// Commands one person may send in a burst.
    pub burst: u32,
    /// Longest message read as a command, in bytes (an SSH key and a note
    /// fit in well under 4 KiB).
    pub max_message_bytes: usize,
    /// Least time between two edits of one progress message, in
    /// milliseconds.
    pub edit_interval_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            commands_per_minute: 20,
            burst: 5,
            max_message_bytes: 8 * 1024,
            edit_interval_ms: 1500,
        }
    }
}

/// A token bucket per person.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// A limiter allowing `per_minute` sustained and `burst` at once.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_sec: f64::from(per_minute.max(1)) / 60.0,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `who`, or says how long until one is free.
    pub fn check(&self, who: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut b = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Forget people who have been quiet long enough to have a full bucket.
        if b.len() > 10_000 {
            let full = Duration::from_secs_f64(self.burst / self.per_sec);
            b.retain(|_, (_, t)| now.duration_since(*t) < full);
        }
        let (tokens, last) = b.entry(who.to_owned()).or_insert((self.burst, now));
        let refill = now.duration_since(*last).as_secs_f64() * self.per_sec;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.per_sec))
        }
    }
}

/// Why a message was not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("That message is {len} bytes; Kennel reads commands of up to {max} bytes. Send the command on its own (an SSH public key is well under 1 KiB).")]
    TooLong { len: usize, max: usize },
    #[error("You are sending commands faster than Kennel takes them; try again in {secs} s.")]
    RateLimited { secs: u64 },
}

/// The shared front desk of both bots.
#[derive(Debug)]
pub struct Desk {
    gate: Gate,
    limits: Limits,
    limiter: RateLimiter,
}

/// A line that passed admission and parsing: what the bot should do.
#[derive(Debug)]
pub enum Parsed {
    /// A command to run; `long` ones get a progress message.
    Run { invocation: Invocation, long: bool },
    /// The line did not parse; the outcome explains why.
    Invalid(Box<Outcome>),
}

impl Desk {
    /// A desk in front of `gate`.
    pub fn new(gate: Gate, limits: Limits) -> Self {
        let limiter = RateLimiter::new(limits.commands_per_minute, limits.burst);
        Self {
            gate,
            limits,
            limiter,
        }
    }

    /// Core, as the bots see it.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Checks size and rate for one message from `who`.
    /// An oversized message counts against the rate too.
    pub fn admit(&self, who: &Identity, text: &str) -> Result<(), Refusal> {
        self.limiter
            .check(&who.to_string())
            .map_err(|d| Refusal::RateLimited {
                secs: d.as_secs().max(1),
            })?;
        if text.len() > self.limits.max_message_bytes {
            return Err(Refusal::TooLong {
                len: text.len(),
                max: self.limits.max_message_bytes,
            });
        }
        Ok(())
    }

    /// Parses a line, stripping the bot's own address (`prefixes`).
    pub fn parse(&self, text: &str, prefixes: &[&str]) -> Parsed {
        match command::parse_addressed(text, prefixes) {
            Ok(invocation) => {
                let long = is_long(&invocation.command);
                Parsed::Run { invocation, long }
            }
            Err(e) => Parsed::Invalid(Box::new(Err(e.into()))),
        }
    }

    /// Runs a parsed command for `who`, through core's front door.
    pub async fn run(&self, who: &Identity, cmd: Command, progress: &dyn ProgressSink) -> Outcome {
        let inv = kennel_core::Invocation {
            command: cmd,
            json: false,
        };
        self.gate
            .answer(who, None, inv, kennel_core::Style::PLAIN, progress)
            .await
            .outcome
    }

    /// Runs a long command, calling `edit` with its progress at most once
    /// per `limits.edit_interval_ms`; returns once the last progress edit is
    /// done, so the caller's final answer lands after it.
    pub async fn run_tracked<F, Fut>(&self, who: &Identity, cmd: Command, edit: F) -> Outcome
    where
        F: FnMut(Steps) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let interval = Duration::from_millis(self.limits.edit_interval_ms);
        let (tracker, task) = track(cmd.to_string(), interval, edit);
        let outcome = self.run(who, cmd, &tracker).await;
        drop(tracker);
        let _ = task.await;
        outcome
    }
}

/// The next executor event for a bot, riding over a lag (with a warning).
pub async fn next_event(
    rx: &mut tokio::sync::broadcast::Receiver<kennel_core::Event>,
) -> Option<kennel_core::Event> {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match rx.recv().await {
            Ok(e) => return Some(e),
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "a chat bot fell behind on events")
            }
            Err(RecvError::Closed) => return None,
        }
    }
}

/// Commands that take long enough to deserve a progress message.
pub fn is_long(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::NewProject(_)
            | Command::Start { .. }
            | Command::Stop { .. }
            | Command::Restart { .. }
            | Command::Rm { yes: true, .. }
            | Command::Agent { .. }
    )
}

/// The stages a long operation went through so far, for its progress
/// message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Steps {
    /// What is being done, e.g. `new project myapp`.
    pub title: String,
    steps: Vec<Progress>,
    /// The last lines of a command's output in the VM (`agent`), as
    /// answers show them (core's [`Tail`]).
    tail: Tail,
}

/// Output lines a progress message shows.
const TAIL_LINES: usize = 6;

impl Steps {
    /// No steps yet.
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            steps: Vec::new(),
            tail: Tail::new(TAIL_LINES),
        }
    }

    /// Adds output as it came.
    pub fn output(&mut self, bytes: &[u8]) {
        self.tail.push(bytes);
    }

    /// Records a step; a step of the stage already showing replaces it.
    pub fn push(&mut self, p: Progress) {
        match self.steps.last_mut() {
            Some(last) if last.stage == p.stage => *last = p,
            _ => self.steps.push(p),
        }
    }

    /// The steps as a document: a title and `a → b → c …`.
    pub fn document(&self) -> Vec<Block> {
        let mut line = self
            .steps
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" → ");
        if line.is_empty() {
            line.push_str("starting");
        }
        line.push_str(" …");
        let mut doc = vec![Block::Para(vec![
            Inline::Strong(format!("⏳ {}", self.title)),
            Inline::Text(format!(": {line}")),
        ])];
        let now = self.tail.lines_now();
        let shown: Vec<&str> = now
            .iter()
            .map(|l| l.trim_end())
            .skip_while(|l| l.is_empty())
            .collect();
        let shown = shown
            .iter()
            .rposition(|l| !l.is_empty())
            .and_then(|end| shown.get(..=end))
            .unwrap_or_default();
        if !shown.is_empty() {
            doc.push(Block::Code(shown.join("\n")));
        }
        doc
    }

    /// The steps in a format.
    pub fn render(&self, format: Format) -> String {
        render::write_doc(&self.document(), format)
    }
}

/// What a [`Tracker`] passes on: a step, or output from the VM.
#[derive(Debug)]
enum Tracked {
    Step(Progress),
    Output(Vec<u8>),
}

/// The [`ProgressSink`] half of [`track`].
#[derive(Debug, Clone)]
pub struct Tracker {
    tx: mpsc::UnboundedSender<Tracked>,
}

impl ProgressSink for Tracker {
    fn report(&self, p: Progress) {
        let _ = self.tx.send(Tracked::Step(p));
    }

    fn output(&self, bytes: &[u8]) {
        let _ = self.tx.send(Tracked::Output(bytes.to_vec()));
    }
}

/// Shows progress by calling `edit` with the steps so far, at most once per
/// `interval` (the latest steps win; nothing is queued up). Drop the
/// [`Tracker`] and await the handle before sending the final answer, so no
/// late progress edit lands on top of it.
pub fn track<F, Fut>(
    title: impl Into<String>,
    interval: Duration,
    mut edit: F,
) -> (Tracker, tokio::task::JoinHandle<()>)
where
    F: FnMut(Steps) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<Tracked>();
    let mut steps = Steps::new(title);
    let task = tokio::spawn(async move {
        let mut last_edit: Option<Instant> = None;
        let mut dirty = false;
        loop {
            let wait = match (dirty, last_edit) {
                (true, Some(t)) => interval.saturating_sub(t.elapsed()),
                (true, None) => Duration::ZERO,
                (false, _) => Duration::from_secs(3600),
            };
            tokio::select! {
                p = rx.recv() => match p {
                    Some(Tracked::Step(p)) => { steps.push(p); dirty = true; }
                    Some(Tracked::Output(b)) => { steps.output(&b); dirty = true; }
                    None => break,
                },
                () = tokio::time::sleep(wait), if dirty => {
                    edit(steps.clone()).await;
                    last_edit = Some(Instant::now());
                    dirty = false;
                }
            }
        }
    });
    (Tracker { tx }, task)
}

/// What admins see when someone asks for access.
pub fn request_document(r: &AccessRequest, how_to_decide: &str) -> Vec<Block> {
    let who = match &r.user {
        Some(u) => format!("{} (user {u})", r.identity),
        None => r.identity.to_string(),
    };
    let mut doc = vec![
        Block::Title(format!("Access request #{}", r.id)),
        Block::Para(vec![Inline::Strong("From: ".into()), Inline::Text(who)]),
        Block::Para(vec![
            Inline::Strong("Key: ".into()),
            Inline::Text(format!("{} ", r.algorithm)),
            Inline::Code(r.fingerprint.to_string()),
        ]),
    ];
    if let Some(n) = &r.note {
        doc.push(Block::Para(vec![
            Inline::Strong("Note: ".into()),
            Inline::Text(n.clone()),
        ]));
    }
    match r.state {
        RequestState::Pending => doc.push(Block::Para(vec![Inline::Text(how_to_decide.into())])),
        _ => doc.push(decision_line(r)),
    }
    doc
}

/// "Approved by ann at 2026-…" (or denied, with the reason).
pub fn decision_line(r: &AccessRequest) -> Block {
    let by = r
        .decided_by
        .as_ref()
        .map_or_else(|| "an admin".to_owned(), ToString::to_string);
    let when = r
        .decided_at
        .as_ref()
        .map(|t| format!(" at {}", kennel_core::model::format_time(*t)))
        .unwrap_or_default();
    let mut s = match r.state {
        RequestState::Approved => format!("✅ Approved by {by}{when}."),
        RequestState::Denied => format!("❌ Denied by {by}{when}."),
        RequestState::Pending => "Pending.".into(),
    };
    if let Some(reason) = &r.reason {
        s.push_str(&format!(" Reason: {reason}"));
    }
    Block::Para(vec![Inline::Strong(s)])
}

/// What the requester is told once an admin decided.
pub fn outcome_document(r: &AccessRequest, gate: &Gate) -> Vec<Block> {
    let s = gate.settings();
    match r.state {
        RequestState::Approved => {
            let mut doc = vec![
                Block::Title(format!("Your access request #{} was approved", r.id)),
                Block::Para(vec![
                    Inline::Text("Your key ".into()),
                    Inline::Code(r.fingerprint.to_string()),
                    Inline::Text(" can now log in. Create a project with ".into()),
                    Inline::Code("new project NAME --stack rust".into()),
                    Inline::Text(", then connect with ".into()),
                    Inline::Code(s.urls().ssh_command("NAME")),
                    Inline::Text(" (editors use the same string). See your projects with ".into()),
                    Inline::Code("projects".into()),
                    Inline::Text(".".into()),
                ]),
            ];
            if !s.host_key_fingerprints.is_empty() {
                doc.push(Block::Para(vec![
                    Inline::Text("The gateway's host key: ".into()),
                    Inline::Code(s.host_key_fingerprints.join(", ")),
                ]));
            }
            doc
        }
        _ => {
            let mut text = format!("Your access request #{} was denied", r.id);
            match &r.reason {
                Some(reason) => text.push_str(&format!(": {reason}")),
                None => text.push('.'),
            }
            vec![Block::Para(vec![
                Inline::Text(text),
                Inline::Text(
                    " You can ask again with a new request-access, or talk to an admin.".into(),
                ),
            ])]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_shows_the_last_output_lines_without_terminal_control() {
        let mut s = Steps::new("agent app fix it");
        s.output(b"\x1b[1mone\x1b[0m\ntwo\nthr");
        s.output(b"ee\nfour\rFOUR\n5\n6\n7\n8");
        let text = s.render(Format::Plain);
        assert!(!text.contains("one") && !text.contains("two"), "{text}");
        assert!(text.contains("three\nFOUR\n5\n6\n7\n8"), "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        let mut quiet = Steps::new("new project app");
        quiet.output(b"\n\n");
        assert!(!quiet.render(Format::Plain).contains('\n'), "{quiet:?}");
    }
    use kennel_core::provision::Stage;

    fn p(stage: Stage, percent: Option<u8>) -> Progress {
        Progress {
            stage,
            percent,
            detail: None,
        }
    }

    #[test]
    fn limiter_allows_a_burst_then_refuses() {
        let l = RateLimiter::new(60, 3);
        for _ in 0..3 {
            assert!(l.check("a").is_ok());
        }
        let wait = l.check("a").unwrap_err();
        assert!(wait <= Duration::from_secs(1));
        // Another person is not affected.
        assert!(l.check("b").is_ok());
    }

    #[test]
    fn steps_merge_one_stage_and_render() {
        let mut s = Steps::new("new project myapp");
        s.push(p(Stage::Validated, None));
        s.push(p(Stage::Cloning, Some(10)));
        s.push(p(Stage::Cloning, Some(43)));
        let text = s.render(Format::Plain);
        assert!(text.contains("validated → cloning 43% …"), "{text}");
        assert!(!text.contains("10%"));
        let html = s.render(Format::Html);
        assert!(html.contains("<b>"), "{html}");
    }

    #[tokio::test(start_paused = true)]
    async fn tracker_edits_at_a_bounded_rate_and_ends_with_the_latest() {
        let seen = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
        let s2 = seen.clone();
        let (tracker, task) = track("t", Duration::from_secs(2), move |steps| {
            let s2 = s2.clone();
            async move {
                s2.lock().unwrap().push(steps.render(Format::Plain));
            }
        });
        for i in 0..50u8 {
            tracker.report(p(Stage::Cloning, Some(i * 2)));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(tracker);
        task.await.unwrap();
        let seen = seen.lock().unwrap();
        // 5 s of reports at one edit per 2 s: the first at once, then a few.
        assert!(seen.len() <= 4, "{seen:?}");
        assert!(seen.last().unwrap().contains("98%"), "{seen:?}");
    }

    #[tokio::test]
    async fn admission_refuses_long_messages_and_floods() {
        let exec = kennel_core::Executor::new(
            kennel_core::Store::open_in_memory().unwrap(),
            std::sync::Arc::new(kennel_core::provision::testing::RecordingProvisioner::default()),
            std::sync::Arc::new(kennel_core::catalog::StaticCatalog::default()),
            kennel_core::Settings::default(),
        );
        let desk = Desk::new(
            exec.gate(),
            Limits {
                burst: 2,
                max_message_bytes: 100,
                ..Limits::default()
            },
        );
        let ann = Identity::new(kennel_core::model::Frontend::Matrix, "@ann:x");
        let e = desk.admit(&ann, &"x".repeat(101)).unwrap_err();
        assert!(e.to_string().contains("up to 100 bytes"), "{e}");
        assert!(desk.admit(&ann, "help").is_ok());
        let e = desk.admit(&ann, "help").unwrap_err();
        assert!(matches!(e, Refusal::RateLimited { .. }), "{e}");
        assert!(e.to_string().contains("try again in"), "{e}");
    }

    #[test]
    fn parse_strips_the_bots_address_and_flags_long_commands() {
        let desk_parse = |t: &str, pre: &[&str]| match command::parse_addressed(t, pre) {
            Ok(i) => Some((i.command.name(), is_long(&i.command))),
            Err(_) => None,
        };
        assert_eq!(
            desk_parse(
                "@kennelbot:example.org: new project a --stack rust",
                &["@kennelbot:example.org"]
            ),
            Some(("new project", true))
        );
        assert_eq!(desk_parse("projects", &[]), Some(("projects", false)));
    }
}
