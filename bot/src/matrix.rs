//! The Matrix bot, on matrix-sdk.
//!
//! It logs in (password, keeping the session under the data dir, or an
//! access token), drains one sync before it listens so that nothing sent
//! before it started is answered, then syncs forever with backoff. Rooms
//! are joined on invites from configured users or homeservers. In a DM
//! every message is a command; in a group room only messages that address
//! the bot (a mention, its name, or the configured prefix). Encrypted rooms
//! work: the SDK's crypto store lives beside the state store.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kennel_core::command::Command;
use kennel_core::model::{AccessRequest, Frontend, Identity};
use kennel_core::outcome::Reply;
use kennel_core::render::{write_doc, Block, Format};
use kennel_core::Event;
use matrix_sdk::authentication::matrix::MatrixSession;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::room::Room;
use matrix_sdk::ruma::events::reaction::OriginalSyncReactionEvent;
use matrix_sdk::ruma::events::room::encrypted::OriginalSyncRoomEncryptedEvent;
use matrix_sdk::ruma::events::room::member::{MembershipState, StrippedRoomMemberEvent};
use matrix_sdk::ruma::events::room::message::{
    AddMentions, ForwardThread, MessageType, OriginalSyncRoomMessageEvent, Relation,
    ReplacementMetadata, ReplyWithinThread, RoomMessageEventContent,
};
use matrix_sdk::ruma::{
    MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomOrAliasId, UserId,
};
use matrix_sdk::{Client, RoomState, SessionMeta, SessionTokens};
use tracing::Instrument;

use crate::config::MatrixConfig;
use crate::desk::{self, Desk, Parsed};

/// The file name of a share link's QR code image.
pub const QR_FILE: &str = "kennel-link-qr.png";

/// Messages one sync hands over per room. Synapse's default is 10: of a
/// burst of more between two syncs (a paste, a script, 20 people at once
/// in a room) all but the last ten would never be seen, nor answered.
const TIMELINE_PER_SYNC: u32 = 200;

/// The bot's sync: long-polls of 30 s, up to [`TIMELINE_PER_SYNC`]
/// messages per room at a time.
fn sync_settings() -> SyncSettings {
    use matrix_sdk::ruma::api::client::filter::FilterDefinition;
    use matrix_sdk::ruma::api::client::sync::sync_events::v3::Filter;
    let mut filter = FilterDefinition::default();
    filter.room.timeline.limit = Some(TIMELINE_PER_SYNC.into());
    SyncSettings::default()
        .timeout(Duration::from_secs(30))
        .filter(Filter::FilterDefinition(filter))
}

/// Why the bot could not start.
#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    #[error("matrix configuration: {0}")]
    Config(String),
    #[error("cannot log in to {homeserver} as {user}: {message}")]
    Login {
        homeserver: String,
        user: String,
        message: String,
    },
    #[error("the Matrix client's store in {path}: {message}")]
    Store { path: PathBuf, message: String },
}

/// What the bot remembers about requests it posted to the admin room.
#[derive(Debug, Default)]
struct Posted {
    /// Request id → the admin-room message about it.
    admin_messages: HashMap<i64, OwnedEventId>,
    /// Request id → the room the requester asked in.
    asked_in: HashMap<i64, OwnedRoomId>,
    /// Rooms told once that a message could not be decrypted.
    warned_undecryptable: HashSet<OwnedRoomId>,
    /// Egress asks posted to owners: message → (project, destination).
    egress_asks: HashMap<OwnedEventId, (String, String)>,
}

/// A running Matrix bot.
#[derive(Debug)]
pub struct MatrixBot {
    client: Client,
    desk: Arc<Desk>,
    cfg: MatrixConfig,
    own: OwnedUserId,
    prefixes: Vec<String>,
    admin_room: std::sync::OnceLock<OwnedRoomId>,
    posted: Mutex<Posted>,
}

const REACT_APPROVE: &[&str] = &["👍", "👍️", "✅", "+1"];
const REACT_DENY: &[&str] = &["👎", "👎️", "❌", "-1"];
const REACT_ONCE: &[&str] = &["⏳", "⌛", "🕐", "1️⃣"];

fn store_err(path: &Path, e: impl std::fmt::Display) -> MatrixError {
    MatrixError::Store {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Builds the client, logs in and resolves the admin room, retrying while
/// the homeserver cannot be reached. Returns the bot, ready to [`run`](MatrixBot::run).
pub async fn connect(
    cfg: MatrixConfig,
    state_dir: &Path,
    desk: Arc<Desk>,
) -> Result<Arc<MatrixBot>, MatrixError> {
    if let Some(problem) = cfg.problem() {
        return Err(MatrixError::Config(problem));
    }
    let homeserver = cfg
        .homeserver
        .clone()
        .ok_or_else(|| MatrixError::Config("set matrix.homeserver".into()))?;
    let own = UserId::parse(cfg.user.as_str()).map_err(|e| {
        MatrixError::Config(format!(
            "matrix.user {:?} is not a Matrix user id like @kennel:example.org: {e}",
            cfg.user
        ))
    })?;
    std::fs::create_dir_all(state_dir).map_err(|e| store_err(state_dir, e))?;
    let session_file = state_dir.join("session.json");
    let client = Client::builder()
        .homeserver_url(&homeserver)
        .sqlite_store(state_dir.join("store"), None)
        .build()
        .await
        .map_err(|e| store_err(state_dir, e))?;
    login(&client, &cfg, &own, &session_file, &homeserver).await?;
    let mut prefixes = vec![own.to_string(), own.localpart().to_owned()];
    if !cfg.prefix.is_empty() {
        prefixes.insert(0, cfg.prefix.clone());
    }
    if let Ok(Some(name)) = client.account().get_display_name().await {
        prefixes.push(name);
    }
    let bot = Arc::new(MatrixBot {
        client,
        desk,
        admin_room: std::sync::OnceLock::new(),
        cfg,
        own,
        prefixes,
        posted: Mutex::new(Posted::default()),
    });
    Ok(bot)
}

async fn login(
    client: &Client,
    cfg: &MatrixConfig,
    own: &UserId,
    session_file: &Path,
    homeserver: &str,
) -> Result<(), MatrixError> {
    let fail = |message: String| MatrixError::Login {
        homeserver: homeserver.to_owned(),
        user: own.to_string(),
        message,
    };
    if let (Some(token), Some(device)) = (&cfg.access_token, &cfg.device_id) {
        let session = MatrixSession {
            meta: SessionMeta {
                user_id: own.to_owned(),
                device_id: device.as_str().into(),
            },
            tokens: SessionTokens {
                access_token: token.clone(),
                refresh_token: None,
            },
        };
        return client
            .restore_session(session)
            .await
            .map_err(|e| fail(e.to_string()));
    }
    // A session kept from an earlier password login: same device, same keys.
    if let Ok(text) = std::fs::read_to_string(session_file) {
        if let Ok(session) = serde_json::from_str::<MatrixSession>(&text) {
            if session.meta.user_id == own {
                client
                    .restore_session(session)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                match client.whoami().await {
                    Ok(_) => return Ok(()),
                    Err(e) if e.client_api_error_kind().is_some() => {
                        tracing::warn!(error = %e, "the saved Matrix session is no longer valid; logging in again");
                        let _ = std::fs::remove_file(session_file);
                        return Err(fail(
                            "the saved session was revoked; restart Kennel to log in with the password"
                                .into(),
                        ));
                    }
                    // The homeserver is away: keep the session; sync retries.
                    Err(e) => {
                        tracing::warn!(error = %e, "homeserver not reachable yet; will retry");
                        return Ok(());
                    }
                }
            }
        }
    }
    let password = cfg.password.as_deref().unwrap_or_default();
    let mut backoff = Duration::from_secs(1);
    loop {
        match client
            .matrix_auth()
            .login_username(own, password)
            .initial_device_display_name("Kennel")
            .send()
            .await
        {
            Ok(_) => break,
            Err(e) if e.client_api_error_kind().is_some() => {
                return Err(fail(format!("{e}; check matrix.user and matrix.password")))
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot reach the homeserver to log in");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
    if let Some(session) = client.matrix_auth().session() {
        let text = serde_json::to_string(&session).map_err(|e| store_err(session_file, e))?;
        write_private(session_file, &text).map_err(|e| store_err(session_file, e))?;
    }
    tracing::info!(user = %own, "logged in to Matrix");
    Ok(())
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

/// The text of a message without a rich-reply fallback (`> <@a:b> ...`).
fn strip_reply_fallback(body: &str) -> &str {
    if !body.starts_with("> ") {
        return body;
    }
    match body.find("\n\n") {
        Some(i) => body.get(i + 2..).unwrap_or(body),
        None => body,
    }
}

/// Whether a group-room message is meant for the bot.
fn addressed(body: &str, prefixes: &[String]) -> bool {
    let b = body.trim_start().trim_start_matches('@');
    prefixes.iter().any(|p| {
        let p = p.trim_start_matches('@');
        !p.is_empty()
            && b.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p))
            && b.get(p.len()..)
                .is_some_and(|r| r.is_empty() || r.starts_with([' ', ':', ',']))
    })
}

/// Finds "Access request #N" in a message the bot posted.
fn request_id_in(body: &str) -> Option<i64> {
    let rest = body.split("Access request #").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

impl MatrixBot {
    fn html(doc: &[Block]) -> RoomMessageEventContent {
        RoomMessageEventContent::notice_html(
            write_doc(doc, Format::Plain),
            write_doc(doc, Format::Html),
        )
    }

    /// An outcome as a notice: HTML with its plain-text fallback.
    fn outcome_content(outcome: &kennel_core::Outcome, json: bool) -> RoomMessageEventContent {
        RoomMessageEventContent::notice_html(
            kennel_core::render::render_as(outcome, json, Format::Plain),
            kennel_core::render::render_as(outcome, json, Format::Html),
        )
    }

    fn how_to_decide(id: i64) -> String {
        format!(
            "Answer 'approve {id}' or 'deny {id} [reason]' here, or react 👍 to approve or 👎 to deny."
        )
    }

    /// Runs until `shutdown` resolves: the first sync (not answered), then
    /// handlers and the sync loop with backoff.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), MatrixError> {
        let settings = sync_settings();
        // Everything up to now is history: sync once before listening.
        let mut backoff = Duration::from_secs(1);
        let mut token = loop {
            match self.client.sync_once(settings.clone()).await {
                Ok(r) => break r.next_batch,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "first Matrix sync failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        };
        if let Some(room) = self.resolve_admin_room().await {
            let _ = self.admin_room.set(room);
        }
        let bot = self;
        bot.register_handlers();
        bot.pending_invites().await;
        let events = tokio::spawn(bot.clone().forward_events());
        tracing::info!(user = %bot.own, "Matrix bot listening");
        let sync = async {
            let mut backoff = Duration::from_secs(1);
            loop {
                match bot
                    .client
                    .sync_once(settings.clone().token(token.clone()))
                    .await
                {
                    Ok(r) => {
                        token = r.next_batch;
                        backoff = Duration::from_secs(1);
                        for (room, update) in &r.rooms.joined {
                            // A room joined in this sync is "limited" too
                            // (history before the join); a full one is a gap.
                            if update.timeline.limited
                                && update.timeline.events.len() >= TIMELINE_PER_SYNC as usize
                            {
                                tracing::warn!(%room, limit = TIMELINE_PER_SYNC,
                                    "more messages arrived in a room than one sync hands over; the older ones were not seen");
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "Matrix sync failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                    }
                }
            }
        };
        tokio::select! {
            () = sync => {}
            () = shutdown => tracing::info!("Matrix bot stopping"),
        }
        events.abort();
        Ok(())
    }

    async fn resolve_admin_room(&self) -> Option<OwnedRoomId> {
        let name = self.cfg.admin_room.as_deref()?;
        let id = match RoomOrAliasId::parse(name) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(admin_room = name, error = %e, "matrix.admin_room is not a room id or alias; access requests will not be posted");
                return None;
            }
        };
        match self.client.join_room_by_id_or_alias(&id, &[]).await {
            Ok(room) => Some(room.room_id().to_owned()),
            Err(e) => {
                tracing::error!(admin_room = name, error = %e, "cannot join the admin room; invite the bot there");
                None
            }
        }
    }

    fn register_handlers(self: &Arc<Self>) {
        let bot = self.clone();
        self.client
            .add_event_handler(move |ev: StrippedRoomMemberEvent, room: Room| {
                let bot = bot.clone();
                async move { bot.on_invite(ev, room).await }
            });
        let bot = self.clone();
        self.client
            .add_event_handler(move |ev: OriginalSyncRoomMessageEvent, room: Room| {
                let bot = bot.clone();
                async move { bot.on_message(ev, room).await }
            });
        let bot = self.clone();
        self.client
            .add_event_handler(move |ev: OriginalSyncReactionEvent, room: Room| {
                let bot = bot.clone();
                async move { bot.on_reaction(ev, room).await }
            });
        let bot = self.clone();
        self.client
            .add_event_handler(move |ev: OriginalSyncRoomEncryptedEvent, room: Room| {
                let bot = bot.clone();
                async move { bot.on_undecryptable(ev, room).await }
            });
    }

    fn invite_allowed(&self, inviter: &UserId) -> bool {
        let admin = Identity::new(Frontend::Matrix, inviter.as_str());
        self.desk.gate().settings().admins.contains(&admin)
            || self
                .cfg
                .invite_from
                .iter()
                .any(|a| a == inviter.as_str() || a == inviter.server_name().as_str())
    }

    async fn on_invite(self: Arc<Self>, ev: StrippedRoomMemberEvent, room: Room) {
        if ev.state_key != self.own || ev.content.membership != MembershipState::Invite {
            return;
        }
        self.consider_invite(room, ev.sender).await;
    }

    /// Invites that arrived while the bot was away (or during its first
    /// sync) are answered too: only messages from before the start are
    /// history, not invitations.
    async fn pending_invites(self: &Arc<Self>) {
        for room in self.client.invited_rooms() {
            match room.invite_details().await {
                Ok(invite) => self.clone().consider_invite(room, invite.inviter_id).await,
                Err(e) => {
                    tracing::warn!(room = %room.room_id(), error = %e, "cannot read a pending invite")
                }
            }
        }
    }

    async fn consider_invite(self: Arc<Self>, room: Room, inviter: OwnedUserId) {
        if !self.invite_allowed(&inviter) {
            tracing::info!(room = %room.room_id(), %inviter, "declining an invite from someone not in matrix.invite_from");
            let _ = room.leave().await;
            return;
        }
        // Joining right after the invite can race the homeserver: retry.
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(500);
            for _ in 0..8 {
                match room.join().await {
                    Ok(()) => {
                        tracing::info!(room = %room.room_id(), %inviter, "joined");
                        let hint = if room.is_direct().await.unwrap_or(false) {
                            "Hello! I am Kennel. Send 'help' to see what I can do."
                        } else {
                            "Hello! I am Kennel. Address me with a mention or '!kennel', e.g. '!kennel help'."
                        };
                        let _ = room.send(RoomMessageEventContent::notice_plain(hint)).await;
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "join failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
            tracing::warn!(room = %room.room_id(), "could not join after an invite");
        });
    }

    /// When the bot joined `room` (the homeserver's clock), if known.
    async fn joined_at(&self, room: &Room) -> Option<MilliSecondsSinceUnixEpoch> {
        let me = room.get_member_no_sync(&self.own).await.ok()??;
        let ts = me.event().timestamp()?;
        Some(MilliSecondsSinceUnixEpoch(ts))
    }

    async fn is_dm(&self, room: &Room) -> bool {
        // Clients mark DMs with is_direct; a nameless two-person room is
        // treated as one too (some clients do not mark them). Member counts
        // alone lag behind joins, so a named room is never taken for a DM.
        room.is_direct().await.unwrap_or(false)
            || (room.name().is_none() && room.active_members_count() <= 2)
    }

    async fn on_message(self: Arc<Self>, ev: OriginalSyncRoomMessageEvent, room: Room) {
        if ev.sender == self.own || room.state() != RoomState::Joined {
            return;
        }
        // Edits of earlier messages are not new commands.
        if matches!(ev.content.relates_to, Some(Relation::Replacement(_))) {
            return;
        }
        // The first sync after a join hands over messages from before it.
        if let Some(joined) = self.joined_at(&room).await {
            if ev.origin_server_ts < joined {
                tracing::debug!(room = %room.room_id(), "ignoring a message from before the bot joined");
                return;
            }
        }
        let MessageType::Text(text) = &ev.content.msgtype else {
            return;
        };
        let body = strip_reply_fallback(&text.body).to_owned();
        let dm = self.is_dm(&room).await;
        let in_admin_room = self.admin_room.get().map(|r| r.as_ref()) == Some(room.room_id());
        let mentioned = ev
            .content
            .mentions
            .as_ref()
            .is_some_and(|m| m.user_ids.contains(&self.own));
        let decision = in_admin_room && {
            let first = body.split_whitespace().next().unwrap_or_default();
            ["approve", "deny", "requests"].contains(&first.to_ascii_lowercase().as_str())
        };
        if !dm && !mentioned && !decision && !addressed(&body, &self.prefixes) {
            return;
        }
        let who = Identity::new(Frontend::Matrix, ev.sender.as_str());
        let span = tracing::info_span!("matrix", user = %ev.sender, room = %room.room_id());
        tokio::spawn(
            async move {
                self.handle(who, body, dm, ev, room).await;
            }
            .instrument(span),
        );
    }

    async fn handle(
        self: &Arc<Self>,
        who: Identity,
        body: String,
        dm: bool,
        ev: OriginalSyncRoomMessageEvent,
        room: Room,
    ) {
        if let Err(refusal) = self.desk.admit(&who, &body) {
            self.reply(
                &room,
                &ev,
                &[Block::Para(vec![kennel_core::render::Inline::Text(
                    refusal.to_string(),
                )])],
            )
            .await;
            return;
        }
        let prefixes: Vec<&str> = self.prefixes.iter().map(String::as_str).collect();
        // Leaving a room is the bot's own business, not a Kennel command.
        let bare = kennel_core::command::lex::normalize(&body, &prefixes);
        if !dm && bare.eq_ignore_ascii_case("leave") {
            self.leave_when_asked(&who, &ev, &room).await;
            return;
        }
        let (invocation, long) = match self.desk.parse(&body, &prefixes) {
            Parsed::Run { invocation, long } => (invocation, long),
            Parsed::Invalid(outcome) => {
                self.reply_rendered(&room, &ev, &outcome, false).await;
                return;
            }
        };
        // A login link or a token works for whoever reads it: never in a
        // room.
        if invocation.command.private() && !dm {
            self.reply_text(
                &room,
                &ev,
                &format!(
                    "Please send {} to me in a direct message: start a chat with me and send it there.",
                    invocation.command.name()
                ),
            )
            .await;
            return;
        }
        let json = invocation.json;
        // An agent's run (minutes of progress, then its summary) goes in a
        // thread under the message that asked, not over the room.
        let threaded = matches!(invocation.command, Command::Agent { .. });
        let outcome = if long {
            // The progress message appears with the first step (after
            // policy passed), and is edited from then on.
            let message: Arc<tokio::sync::Mutex<Option<OwnedEventId>>> = Arc::default();
            let bot = self.clone();
            let (m, r, e) = (message.clone(), room.clone(), ev.clone());
            let outcome = self
                .desk
                .run_tracked(&who, invocation.command, move |steps| {
                    let (bot, m, r, e) = (bot.clone(), m.clone(), r.clone(), e.clone());
                    async move {
                        let mut id = m.lock().await;
                        let content = Self::html(&steps.document());
                        match id.as_ref() {
                            None => *id = bot.answer(&r, &e, content, threaded).await,
                            Some(first) => bot.edit(&r, first, content).await,
                        }
                    }
                })
                .await;
            let content = Self::outcome_content(&outcome, json);
            match message.lock().await.as_ref() {
                Some(id) => self.edit(&room, id, content).await,
                None => {
                    self.answer(&room, &ev, content, threaded).await;
                }
            }
            outcome
        } else {
            let outcome = self
                .desk
                .run(
                    &who,
                    invocation.command,
                    &kennel_core::provision::NoProgress,
                )
                .await;
            self.reply_rendered(&room, &ev, &outcome, json).await;
            outcome
        };
        if let Ok(Reply::RequestFiled { request, .. }) = &outcome {
            self.lock()
                .asked_in
                .insert(request.id, room.room_id().to_owned());
        }
        // A share link: its QR code too, for a phone to scan.
        if let Ok(Reply::LinkCreated { url, .. }) = &outcome {
            self.send_qr(&room, url).await;
        }
    }

    /// Posts a QR code of `url` as an image.
    async fn send_qr(&self, room: &Room, url: &str) {
        let Some(png) = kennel_core::qr::png(url, 6) else {
            return;
        };
        let sent = room
            .send_attachment(
                QR_FILE,
                &mime::IMAGE_PNG,
                png,
                matrix_sdk::attachment::AttachmentConfig::new(),
            )
            .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, "could not post the link's QR code");
        }
    }

    /// `leave` in a group room: room moderators (whoever may kick) and
    /// Kennel admins may send the bot away; it says goodbye first.
    async fn leave_when_asked(
        &self,
        who: &Identity,
        ev: &OriginalSyncRoomMessageEvent,
        room: &Room,
    ) {
        if self.admin_room.get().map(|r| r.as_ref()) == Some(room.room_id()) {
            self.reply_text(room, ev, "This is Kennel's admin room (matrix.admin_room); change the configuration before asking me to leave it.")
                .await;
            return;
        }
        let admin = matches!(self.desk.gate().resolve(who).await, Ok(Some(u)) if u.role == kennel_core::Role::Admin);
        let moderator = matches!(room.get_member(&ev.sender).await, Ok(Some(m)) if m.can_kick());
        if !admin && !moderator {
            self.reply_text(
                room,
                ev,
                "Only a room moderator or a Kennel admin can ask me to leave.",
            )
            .await;
            return;
        }
        self.reply_text(room, ev, "Goodbye! Invite me again whenever you need me.")
            .await;
        tracing::info!(room = %room.room_id(), by = %ev.sender, "leaving the room as asked");
        if let Err(e) = room.leave().await {
            tracing::warn!(room = %room.room_id(), error = %e, "could not leave the room");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Posted> {
        self.posted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn reply_rendered(
        &self,
        room: &Room,
        ev: &OriginalSyncRoomMessageEvent,
        outcome: &kennel_core::Outcome,
        json: bool,
    ) {
        self.reply_content(room, ev, Self::outcome_content(outcome, json))
            .await;
    }

    async fn reply_text(&self, room: &Room, ev: &OriginalSyncRoomMessageEvent, text: &str) {
        self.reply_content(room, ev, RoomMessageEventContent::notice_plain(text))
            .await;
    }

    async fn reply(&self, room: &Room, ev: &OriginalSyncRoomMessageEvent, doc: &[Block]) {
        self.reply_content(room, ev, Self::html(doc)).await;
    }

    /// Replaces the text of the bot's message `id` (an m.replace edit).
    async fn edit(&self, room: &Room, id: &OwnedEventId, content: RoomMessageEventContent) {
        let content = content.make_replacement(ReplacementMetadata::new(id.clone(), None));
        if let Err(e) = room.send(content).await {
            tracing::warn!(room = %room.room_id(), error = %e, "could not edit a message");
        }
    }

    /// Sends `content` as a reply to `ev`: in a thread rooted at `ev` when
    /// `threaded`, else as [`Self::reply_content`] does.
    async fn answer(
        &self,
        room: &Room,
        ev: &OriginalSyncRoomMessageEvent,
        content: RoomMessageEventContent,
        threaded: bool,
    ) -> Option<OwnedEventId> {
        let content = if threaded {
            content.make_for_thread(ev, ReplyWithinThread::Yes, AddMentions::No)
        } else {
            content.make_reply_to(ev, ForwardThread::Yes, AddMentions::No)
        };
        match room.send(content).await {
            Ok(r) => Some(r.response.event_id),
            Err(e) => {
                tracing::warn!(room = %room.room_id(), error = %e, "could not send a reply");
                None
            }
        }
    }

    /// Sends `content` as a reply to `ev` (in its thread, if it had one).
    async fn reply_content(
        &self,
        room: &Room,
        ev: &OriginalSyncRoomMessageEvent,
        content: RoomMessageEventContent,
    ) -> Option<OwnedEventId> {
        self.answer(room, ev, content, false).await
    }

    async fn on_reaction(self: Arc<Self>, ev: OriginalSyncReactionEvent, room: Room) {
        if ev.sender == self.own {
            return;
        }
        if self.on_egress_reaction(&ev, &room).await {
            return;
        }
        if self.admin_room.get().map(|r| r.as_ref()) != Some(room.room_id()) {
            return;
        }
        if let Some(joined) = self.joined_at(&room).await {
            if ev.origin_server_ts < joined {
                return;
            }
        }
        let key = ev.content.relates_to.key.as_str();
        let approve = REACT_APPROVE.contains(&key);
        if !approve && !REACT_DENY.contains(&key) {
            return;
        }
        let target = ev.content.relates_to.event_id.clone();
        let known = self
            .lock()
            .admin_messages
            .iter()
            .find(|(_, e)| **e == target)
            .map(|(id, _)| *id);
        let id = match known {
            Some(id) => Some(id),
            // Posted before a restart: read the request id from the message.
            None => self
                .own_message_body(&room, &target)
                .await
                .as_deref()
                .and_then(request_id_in),
        };
        let Some(id) = id else {
            return;
        };
        let cmd = if approve {
            Command::Approve { id, name: None }
        } else {
            Command::Deny {
                id,
                reason: Some("denied with a reaction".into()),
            }
        };
        let who = Identity::new(Frontend::Matrix, ev.sender.as_str());
        let outcome = self
            .desk
            .run(&who, cmd, &kennel_core::provision::NoProgress)
            .await;
        // Success shows as the edited request message; say only what failed.
        if outcome.is_err() {
            let plain = kennel_core::render::render_as(&outcome, false, Format::Plain);
            let html = kennel_core::render::render_as(&outcome, false, Format::Html);
            let _ = room
                .send(RoomMessageEventContent::notice_html(
                    format!("{}: {plain}", ev.sender),
                    format!(
                        "{}: {html}",
                        kennel_core::render::escape_html(ev.sender.as_str())
                    ),
                ))
                .await;
        }
    }

    /// The text of a message this bot sent, read from the room (for a
    /// reaction to something posted before a restart).
    async fn own_message_body(
        &self,
        room: &Room,
        event: &matrix_sdk::ruma::EventId,
    ) -> Option<String> {
        let v = room
            .event(event, None)
            .await
            .ok()?
            .raw()
            .deserialize_as::<serde_json::Value>()
            .ok()?;
        if v.get("sender").and_then(|s| s.as_str()) != Some(self.own.as_str()) {
            return None;
        }
        Some(v.get("content")?.get("body")?.as_str()?.to_owned())
    }

    /// A reaction to an egress ask (✅ allow, ⏳ allow once, ❌ deny),
    /// acted on as whoever reacted; `false` when it was not one.
    async fn on_egress_reaction(&self, ev: &OriginalSyncReactionEvent, room: &Room) -> bool {
        let target = ev.content.relates_to.event_id.clone();
        let known = self.lock().egress_asks.get(&target).cloned();
        let ask = match known {
            Some(a) => Some(a),
            // Posted before a restart: read the ask from the message.
            None => self
                .own_message_body(room, &target)
                .await
                .and_then(|body| kennel_core::executor::egress::ask_in(&body))
                .map(|(p, d)| (p.to_string(), d)),
        };
        let Some((project, dest)) = ask else {
            return false;
        };
        let key = ev.content.relates_to.key.as_str();
        let verb = if REACT_APPROVE.contains(&key) {
            "allow"
        } else if REACT_ONCE.contains(&key) {
            "allow-once"
        } else if REACT_DENY.contains(&key) {
            "deny"
        } else {
            return true;
        };
        let line = format!("egress {project} {verb} {dest}");
        let who = Identity::new(Frontend::Matrix, ev.sender.as_str());
        let outcome = match kennel_core::command::parse(&line) {
            Ok(inv) => {
                self.desk
                    .run(&who, inv.command, &kennel_core::provision::NoProgress)
                    .await
            }
            Err(e) => Err(e.into()),
        };
        let said = match &outcome {
            Ok(_) => format!(
                "{dest} {} for {project} by {}.",
                match verb {
                    "allow" => "allowed",
                    "allow-once" => "allowed for a while",
                    _ => "denied",
                },
                ev.sender
            ),
            Err(_) => format!(
                "{}: {}",
                ev.sender,
                kennel_core::render::render_as(&outcome, false, Format::Plain)
            ),
        };
        if let Err(e) = room.send(RoomMessageEventContent::notice_plain(said)).await {
            tracing::warn!(error = %e, "could not answer a reaction to an egress ask");
        }
        true
    }

    async fn on_undecryptable(self: Arc<Self>, ev: OriginalSyncRoomEncryptedEvent, room: Room) {
        if ev.sender == self.own {
            return;
        }
        if let Some(joined) = self.joined_at(&room).await {
            if ev.origin_server_ts < joined {
                return;
            }
        }
        if !self
            .lock()
            .warned_undecryptable
            .insert(room.room_id().to_owned())
        {
            return;
        }
        tracing::warn!(room = %room.room_id(), sender = %ev.sender, "could not decrypt a message");
        let _ = room
            .send(RoomMessageEventContent::notice_plain(
                "I could not decrypt a message here. If your client does not share room keys with new devices, \
                 verify my device or send the command again; in the meantime an unencrypted room works too.",
            ))
            .await;
    }

    /// Posts access requests to the admin room and tells requesters the outcome.
    async fn forward_events(self: Arc<Self>) {
        let mut rx = self.desk.gate().subscribe();
        while let Some(event) = desk::next_event(&mut rx).await {
            match event {
                Event::AccessRequested(r) => self.post_request(&r).await,
                Event::RequestDecided(r) => self.decided(&r).await,
                Event::AdminNotice(text) => {
                    if let Some(room) = self.admin_room() {
                        if let Err(e) = room.send(RoomMessageEventContent::notice_plain(text)).await
                        {
                            tracing::warn!(error = %e, "could not tell the admins");
                        }
                    }
                }
                Event::IdleStopped {
                    project,
                    identities,
                    after,
                    ..
                } => {
                    let line = kennel_core::idle::idle_notice(&project, after);
                    let _ = self.tell_owner(&identities, line).await;
                }
                Event::ProjectNotice {
                    project,
                    identities,
                    text,
                    ..
                } => {
                    let line = kennel_core::llm::notice_line(&project, &text);
                    let _ = self.tell_owner(&identities, line).await;
                }
                Event::EgressAsked {
                    project,
                    identities,
                    dest,
                    ..
                } => {
                    let line = format!(
                        "{} React ✅ to allow, ⏳ to allow once, ❌ to deny.",
                        kennel_core::executor::egress::ask_line(&project, &dest)
                    );
                    let posted = self.tell_owner(&identities, line).await;
                    let mut p = self.lock();
                    for event in posted {
                        p.egress_asks
                            .insert(event, (project.to_string(), dest.clone()));
                    }
                }
            }
        }
    }

    fn admin_room(&self) -> Option<Room> {
        self.client.get_room(self.admin_room.get()?)
    }

    async fn post_request(&self, r: &AccessRequest) {
        let Some(room) = self.admin_room() else {
            return;
        };
        let doc = desk::request_document(r, &Self::how_to_decide(r.id));
        match room.send(Self::html(&doc)).await {
            Ok(resp) => {
                self.lock()
                    .admin_messages
                    .insert(r.id, resp.response.event_id);
            }
            Err(e) => {
                tracing::warn!(error = %e, request = r.id, "could not post an access request")
            }
        }
    }

    async fn decided(&self, r: &AccessRequest) {
        // Show the decision on the admin-room message.
        let posted = self.lock().admin_messages.get(&r.id).cloned();
        if let (Some(room), Some(event)) = (self.admin_room(), posted) {
            let doc = desk::request_document(r, "");
            let content = Self::html(&doc).make_replacement(ReplacementMetadata::new(event, None));
            if let Err(e) = room.send(content).await {
                tracing::warn!(error = %e, "could not update the request message");
            }
        }
        if r.identity.frontend != Frontend::Matrix {
            return;
        }
        let Ok(user) = UserId::parse(r.identity.external_id.as_str()) else {
            return;
        };
        let asked_in = self.lock().asked_in.remove(&r.id);
        let room = match asked_in.and_then(|id| self.client.get_room(&id)) {
            Some(room) => Some(room),
            None => self.dm(&user).await,
        };
        let Some(room) = room else {
            tracing::warn!(user = %user, "no room to tell the requester the outcome");
            return;
        };
        let doc = desk::outcome_document(r, self.desk.gate());
        if let Err(e) = room.send(Self::html(&doc)).await {
            tracing::warn!(error = %e, user = %user, "could not tell the requester the outcome");
        }
    }

    /// The direct-message room with `user`, made if there is none.
    async fn dm(&self, user: &UserId) -> Option<Room> {
        match self.client.get_dm_room(user) {
            Some(room) => Some(room),
            None => self.client.create_dm(user).await.ok(),
        }
    }

    /// Tells an idle-stopped project's owner, by DM, on each Matrix
    /// identity of theirs.
    /// Says `line` in the DM of each Matrix identity of a project's owner
    /// (an idle stop, a line from the VM).
    /// Says `line` to the owner in a direct message; the messages sent.
    async fn tell_owner(&self, identities: &[Identity], line: String) -> Vec<OwnedEventId> {
        let mut sent = Vec::new();
        for id in identities.iter().filter(|i| i.frontend == Frontend::Matrix) {
            let Ok(user) = UserId::parse(id.external_id.as_str()) else {
                continue;
            };
            let Some(room) = self.dm(&user).await else {
                tracing::warn!(user = %user, "no room to tell a project's owner");
                continue;
            };
            match room
                .send(RoomMessageEventContent::notice_plain(line.clone()))
                .await
            {
                Ok(r) => sent.push(r.response.event_id),
                Err(e) => {
                    tracing::warn!(error = %e, user = %user, "could not tell a project's owner")
                }
            }
        }
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_fallbacks_are_stripped() {
        assert_eq!(
            strip_reply_fallback("> <@a:b> earlier\n> more\n\nprojects"),
            "projects"
        );
        assert_eq!(strip_reply_fallback("projects"), "projects");
    }

    #[test]
    fn group_messages_need_an_address() {
        let p = vec![
            "!kennel".to_owned(),
            "@kennel:example.org".to_owned(),
            "kennel".to_owned(),
            "Kennel Bot".to_owned(),
        ];
        assert!(addressed("!kennel help", &p));
        assert!(addressed("@kennel:example.org: projects", &p));
        assert!(addressed("kennel: projects", &p));
        assert!(addressed("Kennel Bot: projects", &p));
        assert!(!addressed("kennels are nice", &p));
        assert!(!addressed("new project x", &p));
    }

    #[test]
    fn request_ids_are_found_in_posted_messages() {
        assert_eq!(request_id_in("Access request #12\nFrom: x"), Some(12));
        assert_eq!(request_id_in("hello"), None);
    }
}
