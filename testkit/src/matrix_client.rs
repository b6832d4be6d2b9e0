//! A person on a Matrix homeserver, as tests see them: a matrix-sdk client
//! that syncs in the background and records every message it sees
//! (edits included), with helpers to talk to a bot and wait for answers.

use std::time::Duration;

use matrix_sdk::config::SyncSettings;
use matrix_sdk::room::Room;
use matrix_sdk::ruma::events::room::message::{
    OriginalSyncRoomMessageEvent, Relation, RoomMessageEventContent,
};
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use matrix_sdk::Client;
use tokio::sync::{mpsc, Mutex};

use crate::synapse::Synapse;

pub const WAIT: Duration = Duration::from_secs(60);
const SEND_TIMEOUT: Duration = Duration::from_secs(90);
const SEND_TRIES: usize = 3;

/// A message as a person's client saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub room: OwnedRoomId,
    pub sender: OwnedUserId,
    pub id: OwnedEventId,
    pub body: String,
    /// For an edit: the message it replaces (and `body` is the new text).
    pub replaces: Option<OwnedEventId>,
    pub in_reply_to: Option<OwnedEventId>,
    /// For a message in a thread: the thread's root.
    pub thread: Option<OwnedEventId>,
}

impl std::fmt::Debug for Person {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Person")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

pub struct Person {
    pub client: Client,
    pub id: OwnedUserId,
    seen: Mutex<mpsc::UnboundedReceiver<Seen>>,
}

pub async fn person(hs: &Synapse, name: &str) -> Person {
    hs.register(name, "secret-pw", false);
    signed_in(hs, name).await
}

/// A person registered already (with [`Synapse::register`] and the
/// password `secret-pw`), signed in and syncing.
pub async fn signed_in(hs: &Synapse, name: &str) -> Person {
    let id = format!("@{name}:{}", crate::synapse::SERVER_NAME);
    let client = Client::builder()
        .homeserver_url(&hs.url)
        .build()
        .await
        .unwrap();
    client
        .matrix_auth()
        .login_username(name, "secret-pw")
        .send()
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    client.sync_once(SyncSettings::default()).await.unwrap();
    client.add_event_handler(move |ev: OriginalSyncRoomMessageEvent, room: Room| {
        let tx = tx.clone();
        async move {
            let (body, replaces) = match &ev.content.relates_to {
                Some(Relation::Replacement(r)) => (
                    r.new_content.msgtype.body().to_owned(),
                    Some(r.event_id.clone()),
                ),
                _ => (ev.content.body().to_owned(), None),
            };
            let in_reply_to = match &ev.content.relates_to {
                Some(Relation::Reply(r)) => Some(r.in_reply_to.event_id.clone()),
                Some(Relation::Thread(t)) => t.in_reply_to.as_ref().map(|r| r.event_id.clone()),
                _ => None,
            };
            let thread = match &ev.content.relates_to {
                Some(Relation::Thread(t)) => Some(t.event_id.clone()),
                _ => None,
            };
            let _ = tx.send(Seen {
                room: room.room_id().to_owned(),
                sender: ev.sender.clone(),
                id: ev.event_id.clone(),
                body,
                replaces,
                in_reply_to,
                thread,
            });
        }
    });
    let c = client.clone();
    tokio::spawn(async move {
        loop {
            // Many messages per sync, as the bot asks too: a burst of
            // replies must not be cut to the last ten.
            let mut filter = matrix_sdk::ruma::api::client::filter::FilterDefinition::default();
            filter.room.timeline.limit = Some(200u32.into());
            let settings = SyncSettings::default()
                .timeout(Duration::from_secs(5))
                .filter(
                    matrix_sdk::ruma::api::client::sync::sync_events::v3::Filter::FilterDefinition(
                        filter,
                    ),
                );
            let _ = c.sync(settings).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    Person {
        client,
        id: UserId::parse(id).unwrap(),
        seen: Mutex::new(rx),
    }
}

impl Person {
    pub async fn room(&self, id: &RoomId) -> Room {
        for _ in 0..100 {
            if let Some(r) = self.client.get_room(id) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{} does not know room {id}", self.id);
    }

    /// Sends `text` to `room`. A send the homeserver is slow to answer
    /// (a loaded Synapse on two cores can take longer than the client's
    /// default 30 s) is sent again with the same transaction id, which
    /// the homeserver deduplicates: the message is sent once.
    pub async fn say(&self, room: &RoomId, text: &str) -> OwnedEventId {
        let r = self.room(room).await;
        let txn = matrix_sdk::ruma::TransactionId::new();
        let config = matrix_sdk::config::RequestConfig::new().timeout(SEND_TIMEOUT);
        let mut last = None;
        for _ in 0..SEND_TRIES {
            match r
                .send(RoomMessageEventContent::text_plain(text))
                .with_transaction_id(txn.clone())
                .with_request_config(config)
                .await
            {
                Ok(sent) => return sent.response.event_id,
                Err(e) => last = Some(e),
            }
        }
        panic!(
            "{} could not send {text:?} in {SEND_TRIES} tries of {SEND_TIMEOUT:?}: {:?}",
            self.id,
            last.expect("at least one try")
        );
    }

    /// The next message matching `pred`; others are dropped.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Seen) -> bool) -> Seen {
        self.wait_within(WAIT, what, pred).await
    }

    /// [`Self::wait_for`] with a limit of its own (a step in a guest under
    /// emulation may take minutes).
    pub async fn wait_within(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&Seen) -> bool,
    ) -> Seen {
        let mut rx = self.seen.lock().await;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) if pred(&s) => return s,
                Ok(Some(_)) => {}
                Ok(None) => panic!("sync ended while waiting for {what}"),
                Err(_) => panic!("{} waited {limit:?} for {what}", self.id),
            }
        }
    }

    /// The bot's next message (not an edit) in `room`.
    pub async fn next_from(&self, bot: &UserId, room: &RoomId, what: &str) -> Seen {
        self.wait_for(what, |s| {
            s.sender == bot && s.room == room && s.replaces.is_none()
        })
        .await
    }

    pub async fn dm(&self, bot: &UserId) -> OwnedRoomId {
        let room = self.client.create_dm(bot).await.unwrap();
        let id = room.room_id().to_owned();
        let hello = self
            .next_from(bot, &id, "the bot's hello in a new DM")
            .await;
        assert!(hello.body.contains("Hello"), "{hello:?}");
        id
    }

    /// Sends `text` to `room` and returns the bot's reply to it.
    pub async fn ask(&self, bot: &UserId, room: &RoomId, text: &str) -> Seen {
        let id = self.say(room, text).await;
        // The bot's next reply here (greetings and notices are not replies).
        let reply = self
            .wait_for(text, |s| {
                s.sender == bot && s.room == room && s.replaces.is_none() && s.in_reply_to.is_some()
            })
            .await;
        assert_eq!(
            reply.in_reply_to.as_ref(),
            Some(&id),
            "reply to {text:?}: {reply:?}"
        );
        reply
    }

    /// The bot's replies in `room` to each of `to`, collected until every
    /// one has a reply and then `grace` more (to catch a second answer),
    /// or until `limit`.
    pub async fn replies(
        &self,
        bot: &UserId,
        room: &RoomId,
        to: &[OwnedEventId],
        grace: Duration,
        limit: Duration,
    ) -> std::collections::HashMap<OwnedEventId, Vec<String>> {
        let mut got: std::collections::HashMap<OwnedEventId, Vec<String>> =
            std::collections::HashMap::new();
        let mut rx = self.seen.lock().await;
        let end = tokio::time::Instant::now() + limit;
        let mut deadline = end;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => {
                    if s.sender != bot || s.room != room || s.replaces.is_some() {
                        continue;
                    }
                    if let Some(id) = s.in_reply_to.filter(|id| to.contains(id)) {
                        got.entry(id).or_default().push(s.body);
                        if got.len() == to.len() {
                            deadline = (tokio::time::Instant::now() + grace).min(end);
                        }
                    }
                }
                Ok(None) | Err(_) => return got,
            }
        }
    }
}
