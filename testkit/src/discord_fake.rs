//! A local fake of Discord's gateway and REST API, enough for serenity 0.12
//! to run against: `GET /gateway`, a plain `ws://` gateway (HELLO, READY,
//! heartbeat ACKs, RESUME/RESUMED, dispatches the test injects), and the
//! REST calls a bot makes (commands, interaction callbacks and webhook
//! edits, channel messages, DM channels). Every REST call is recorded so
//! tests assert on what the bot sent. Discord itself cannot run here.
//!
//! The bot points serenity at it with `HttpBuilder::proxy(api_base)` and
//! `ratelimiter_disabled(true)` (the rate limiter otherwise calls
//! discord.com directly).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Message as Ws;

/// One REST call the bot made.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub body: Value,
}

enum Out {
    Dispatch(String, Value),
    Close,
}

#[derive(Default)]
struct State {
    calls: Mutex<Vec<Call>>,
    changed: Notify,
    conn: Mutex<Option<mpsc::UnboundedSender<Out>>>,
    seq: AtomicU64,
    ids: AtomicU64,
    identifies: AtomicUsize,
    resumes: AtomicUsize,
    ws_url: Mutex<String>,
    bot: AtomicU64,
    app: AtomicU64,
    guild: AtomicU64,
}

/// The fake, listening on loopback until dropped with the runtime.
#[derive(Clone)]
pub struct FakeDiscord {
    /// `http://127.0.0.1:PORT`: give it to serenity as the proxy.
    pub api_base: String,
    state: Arc<State>,
}

impl std::fmt::Debug for FakeDiscord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeDiscord")
            .field("api_base", &self.api_base)
            .finish_non_exhaustive()
    }
}

/// A Discord user object.
pub fn user(id: u64, name: &str, bot: bool) -> Value {
    json!({"id": id.to_string(), "username": name, "discriminator": "0",
           "global_name": null, "avatar": null, "bot": bot})
}

fn now() -> &'static str {
    "2026-11-22T12:00:00.000000+00:00"
}

/// A Discord message object.
pub fn message(id: u64, channel: u64, author: Value, content: &str, components: Value) -> Value {
    json!({
        "id": id.to_string(), "channel_id": channel.to_string(), "author": author,
        "content": content, "timestamp": now(), "edited_timestamp": null, "tts": false,
        "mention_everyone": false, "mentions": [], "mention_roles": [], "attachments": [],
        "embeds": [], "pinned": false, "type": 0, "components": components,
    })
}

impl FakeDiscord {
    /// Starts the REST API and the gateway on free loopback ports.
    pub async fn start(bot: u64, app: u64, guild: u64) -> FakeDiscord {
        let state = Arc::new(State::default());
        state.ids.store(1_000_000, Ordering::SeqCst);
        state.bot.store(bot, Ordering::SeqCst);
        state.app.store(app, Ordering::SeqCst);
        state.guild.store(guild, Ordering::SeqCst);
        let ws = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        *state.ws_url.lock().unwrap() = format!("ws://{}", ws.local_addr().unwrap());
        let rest = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_base = format!("http://{}", rest.local_addr().unwrap());
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = ws.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = tokio_tungstenite::accept_async(tcp).await {
                        gateway(s, conn).await;
                    }
                });
            }
        });
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = rest.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(api(s, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        FakeDiscord { api_base, state }
    }

    /// A fresh snowflake.
    pub fn id(&self) -> u64 {
        self.state.ids.fetch_add(1, Ordering::SeqCst)
    }

    /// How many times the bot identified, and resumed.
    pub fn sessions(&self) -> (usize, usize) {
        (
            self.state.identifies.load(Ordering::SeqCst),
            self.state.resumes.load(Ordering::SeqCst),
        )
    }

    /// Waits until the bot has a live gateway session.
    pub async fn wait_connected(&self) {
        for _ in 0..600 {
            if self.state.conn.lock().unwrap().is_some()
                && self.state.identifies.load(Ordering::SeqCst)
                    + self.state.resumes.load(Ordering::SeqCst)
                    > 0
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the bot never connected to the fake gateway");
    }

    /// Sends a dispatch (`t`, `d`) to the bot's session.
    pub async fn dispatch(&self, t: &str, d: Value) {
        self.wait_connected().await;
        let tx = self.state.conn.lock().unwrap().clone().unwrap();
        tx.send(Out::Dispatch(t.into(), d)).unwrap();
    }

    /// Drops the websocket, as Discord does now and then.
    pub fn drop_connection(&self) {
        if let Some(tx) = self.state.conn.lock().unwrap().take() {
            let _ = tx.send(Out::Close);
        }
    }

    /// Every REST call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }

    /// Waits for the first call after index `from` that matches; returns
    /// it and its index.
    pub async fn wait_call(
        &self,
        from: usize,
        what: &str,
        pred: impl Fn(&Call) -> bool,
    ) -> (usize, Call) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let notified = self.state.changed.notified();
            if let Some((i, c)) = self
                .calls()
                .into_iter()
                .enumerate()
                .skip(from)
                .find(|(_, c)| pred(c))
            {
                return (i, c);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("waited 30 s for {what}; calls: {:#?}", self.calls());
            }
        }
    }

    fn base_interaction(
        &self,
        kind: u8,
        who: &Value,
        channel: u64,
        data: Value,
    ) -> (u64, String, Value) {
        let id = self.id();
        let token = format!("token-{id}");
        let v = json!({
            "id": id.to_string(), "application_id": self.state.app.load(Ordering::SeqCst).to_string(),
            "type": kind, "token": token, "version": 1,
            "guild_id": self.state.guild.load(Ordering::SeqCst).to_string(),
            "channel_id": channel.to_string(),
            "member": {"user": who, "roles": [], "joined_at": now(), "deaf": false, "mute": false,
                       "flags": 0, "permissions": "0"},
            "data": data, "app_permissions": "0", "locale": "en-US", "guild_locale": "en-US",
            "entitlements": [], "authorizing_integration_owners": {}, "context": 0,
            "attachment_size_limit": 8_388_608,
        });
        (id, token, v)
    }

    /// A slash command from `who`; returns (interaction id, token).
    pub async fn slash(
        &self,
        who: &Value,
        channel: u64,
        name: &str,
        options: &[(&str, &str)],
    ) -> (u64, String) {
        let opts: Vec<Value> = options
            .iter()
            .map(|(n, v)| json!({"name": n, "type": 3, "value": v}))
            .collect();
        let data = json!({"id": self.id().to_string(), "name": name, "type": 1, "options": opts});
        let (id, token, v) = self.base_interaction(2, who, channel, data);
        self.dispatch("INTERACTION_CREATE", v).await;
        (id, token)
    }

    /// An autocomplete request for option `focused` of `/name`.
    pub async fn autocomplete(
        &self,
        who: &Value,
        channel: u64,
        name: &str,
        focused: &str,
        typed: &str,
    ) -> (u64, String) {
        let data = json!({"id": self.id().to_string(), "name": name, "type": 1,
            "options": [{"name": focused, "type": 3, "value": typed, "focused": true}]});
        let (id, token, v) = self.base_interaction(4, who, channel, data);
        self.dispatch("INTERACTION_CREATE", v).await;
        (id, token)
    }

    /// A button click on `msg` (a message object the bot sent).
    pub async fn click(&self, who: &Value, msg: &Value, custom_id: &str) -> (u64, String) {
        let channel: u64 = msg["channel_id"].as_str().unwrap().parse().unwrap();
        let data = json!({"custom_id": custom_id, "component_type": 2});
        let (id, token, mut v) = self.base_interaction(3, who, channel, data);
        v["message"] = msg.clone();
        self.dispatch("INTERACTION_CREATE", v).await;
        (id, token)
    }

    /// A modal submitted from `msg` with one text input.
    pub async fn submit_modal(
        &self,
        who: &Value,
        msg: &Value,
        custom_id: &str,
        input: &str,
        value: &str,
    ) -> (u64, String) {
        let channel: u64 = msg["channel_id"].as_str().unwrap().parse().unwrap();
        let data = json!({"custom_id": custom_id, "components": [{"type": 1, "components": [
            {"type": 4, "custom_id": input, "value": value}]}]});
        let (id, token, mut v) = self.base_interaction(5, who, channel, data);
        v["message"] = msg.clone();
        self.dispatch("INTERACTION_CREATE", v).await;
        (id, token)
    }

    /// A message from `who` in a guild channel.
    pub async fn say(&self, who: &Value, channel: u64, content: &str, mentions: Vec<Value>) -> u64 {
        let id = self.id();
        let mut m = message(id, channel, who.clone(), content, json!([]));
        m["guild_id"] = json!(self.state.guild.load(Ordering::SeqCst).to_string());
        m["mentions"] = Value::Array(mentions);
        self.dispatch("MESSAGE_CREATE", m).await;
        id
    }
}

async fn gateway(s: Arc<State>, conn: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) {
    let (mut tx, mut rx) = conn.split();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Out>();
    let hello = json!({"op": 10, "d": {"heartbeat_interval": 41250}, "s": null, "t": null});
    if tx.send(Ws::text(hello.to_string())).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            m = rx.next() => {
                let Some(Ok(m)) = m else { break };
                let Ok(text) = m.to_text() else { continue };
                let Ok(v) = serde_json::from_str::<Value>(text) else { continue };
                match v["op"].as_u64() {
                    Some(1) => {
                        let _ = tx.send(Ws::text(json!({"op": 11}).to_string())).await;
                    }
                    Some(2) => {
                        s.identifies.fetch_add(1, Ordering::SeqCst);
                        *s.conn.lock().unwrap() = Some(out_tx.clone());
                        let bot = s.bot.load(Ordering::SeqCst);
                        let ready = json!({
                            "v": 10, "user": user(bot, "kennel", true),
                            "guilds": [{"id": s.guild.load(Ordering::SeqCst).to_string(), "unavailable": true}],
                            "session_id": "session-1",
                            "resume_gateway_url": s.ws_url.lock().unwrap().clone(),
                            "shard": [0, 1],
                            "application": {"id": s.app.load(Ordering::SeqCst).to_string(), "flags": 0},
                        });
                        let n = s.seq.fetch_add(1, Ordering::SeqCst) + 1;
                        let _ = tx.send(Ws::text(json!({"op": 0, "t": "READY", "s": n, "d": ready}).to_string())).await;
                    }
                    Some(6) => {
                        s.resumes.fetch_add(1, Ordering::SeqCst);
                        *s.conn.lock().unwrap() = Some(out_tx.clone());
                        let n = s.seq.fetch_add(1, Ordering::SeqCst) + 1;
                        let _ = tx.send(Ws::text(json!({"op": 0, "t": "RESUMED", "s": n, "d": {}}).to_string())).await;
                    }
                    _ => {}
                }
                s.changed.notify_waiters();
            }
            o = out_rx.recv() => match o {
                Some(Out::Dispatch(t, d)) => {
                    let n = s.seq.fetch_add(1, Ordering::SeqCst) + 1;
                    let _ = tx.send(Ws::text(json!({"op": 0, "t": t, "s": n, "d": d}).to_string())).await;
                }
                Some(Out::Close) | None => {
                    // An abnormal close: the client should resume.
                    let _ = tx.send(Ws::Close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::from(4000),
                        reason: "fake reconnect".into(),
                    }))).await;
                    break;
                }
            }
        }
    }
}

fn reply(status: u16, v: Option<Value>) -> Response<Full<Bytes>> {
    let body = v.map(|v| v.to_string()).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn api(s: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let p = path.trim_start_matches("/api/v10");
    let parts: Vec<&str> = p.trim_start_matches('/').split('/').collect();
    let bot = user(s.bot.load(Ordering::SeqCst), "kennel", true);
    let new_id = || s.ids.fetch_add(1, Ordering::SeqCst);
    let response = match (method.as_str(), parts.as_slice()) {
        ("GET", ["gateway"]) => reply(200, Some(json!({"url": s.ws_url.lock().unwrap().clone()}))),
        ("GET", ["gateway", "bot"]) => reply(
            200,
            Some(json!({
            "url": s.ws_url.lock().unwrap().clone(), "shards": 1,
            "session_start_limit": {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}})),
        ),
        ("GET", ["users", "@me"]) => reply(200, Some(bot.clone())),
        ("PUT", ["applications", app, "guilds", guild, "commands"]) => {
            let cmds: Vec<Value> = body
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|mut c| {
                    c["id"] = json!(new_id().to_string());
                    c["application_id"] = json!(app);
                    c["guild_id"] = json!(guild);
                    c["version"] = json!("1");
                    c["type"] = json!(1);
                    c["default_member_permissions"] = Value::Null;
                    c["dm_permission"] = json!(true);
                    c
                })
                .collect();
            reply(200, Some(Value::Array(cmds)))
        }
        ("POST", ["interactions", _, _, "callback"]) => reply(204, None),
        ("PATCH", ["webhooks", _, _, "messages", _]) | ("POST", ["webhooks", _, _]) => {
            let content = body["content"].as_str().unwrap_or_default();
            let comps = if body["components"].is_null() {
                json!([])
            } else {
                body["components"].clone()
            };
            reply(200, Some(message(new_id(), 1, bot.clone(), content, comps)))
        }
        ("POST", ["channels", ch, "messages"]) => {
            let ch: u64 = ch.parse().unwrap_or(1);
            let content = body["content"].as_str().unwrap_or_default();
            let comps = if body["components"].is_null() {
                json!([])
            } else {
                body["components"].clone()
            };
            reply(
                200,
                Some(message(new_id(), ch, bot.clone(), content, comps)),
            )
        }
        ("PATCH", ["channels", ch, "messages", m]) => {
            let ch: u64 = ch.parse().unwrap_or(1);
            let m: u64 = m.parse().unwrap_or(1);
            let content = body["content"].as_str().unwrap_or_default();
            let comps = if body["components"].is_null() {
                json!([])
            } else {
                body["components"].clone()
            };
            reply(200, Some(message(m, ch, bot.clone(), content, comps)))
        }
        ("POST", ["users", "@me", "channels"]) => {
            let recipient = body["recipient_id"]
                .as_str()
                .unwrap_or("1")
                .parse::<u64>()
                .unwrap_or(1);
            reply(
                200,
                Some(json!({"id": (recipient + 7).to_string(), "type": 1,
                "recipients": [user(recipient, "someone", false)], "last_message_id": null})),
            )
        }
        _ => reply(
            404,
            Some(json!({"message": format!("the fake does not know {method} {path}"), "code": 0})),
        ),
    };
    s.calls.lock().unwrap().push(Call {
        method,
        path: p.to_owned(),
        body,
    });
    s.changed.notify_waiters();
    response
}
