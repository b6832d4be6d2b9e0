//! The HTTP API on Kennel's host: `POST /api/v1/exec` runs one line of the
//! command language as the token's user, through core's front door, and
//! answers what `--json` answers everywhere else, with the HTTP status of
//! the outcome's kind. `Accept: application/x-ndjson` streams progress
//! lines first (`{"progress": …}`), then the outcome. The description is
//! at `/api/v1/openapi.json`.
//!
//! Authentication, either:
//! - a bearer token from `token create` (only its hash is stored; each
//!   call is audited under `http:token:LABEL`), or
//! - an SSH signature, so a user with a registered key needs no token:
//!   the client signs [`signed_message`] with `ssh-keygen -Y sign -n
//!   kennel-api` and sends `X-Kennel-Timestamp`, `X-Kennel-Nonce` and
//!   `X-Kennel-Signature` (the `.sig` file, base64 on one line). Kennel
//!   checks the namespace, the key against the user's active keys, the
//!   timestamp (±5 minutes) and that the nonce was not seen before; calls
//!   are audited under `http:ssh:FINGERPRINT`.
//!
//! Cookies are never accepted here, so no other site can make a browser
//! call it.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use kennel_core::model::{Frontend, Identity};
use kennel_core::outcome::ErrorKind;
use kennel_core::provision::{Progress, ProgressSink};
use kennel_core::render::Format;
use kennel_core::Style;
use tokio::sync::mpsc;

use super::{page, Body, Inner};

/// A request body is one command line: 64 KiB is far more than any.
const MAX_BODY: usize = 64 * 1024;

/// Calls per token per minute, at most (`HttpsSettings::api_per_minute`).
pub(super) type Window = (Instant, u32);

/// The SSHSIG namespace of API requests.
pub const SIGNATURE_NAMESPACE: &str = "kennel-api";
/// How far a signed request's timestamp may be from Kennel's clock.
const SIGNATURE_WINDOW: u64 = 300;

/// What an SSH-signed request signs: the scheme, its timestamp and nonce,
/// the host, method and path, and the SHA-256 of the body (hex), one per
/// line.
pub fn signed_message(
    ts: i64,
    nonce: &str,
    host: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> String {
    let digest = kennel_core::web::sha256_hex(body);
    format!("kennel-api-v1\n{ts}\n{nonce}\n{host}\n{method} {path}\n{digest}\n")
}

impl Inner {
    /// `/api/…` on Kennel's host.
    pub(super) async fn api(&self, req: Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/api/v1/openapi.json") => json(StatusCode::OK, openapi().to_string()),
            (&Method::POST, "/api/v1/exec") => self.exec(req).await,
            (_, "/api/v1/exec") => error_with(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorKind::Usage,
                "POST a command line to /api/v1/exec",
            ),
            _ => error(
                ErrorKind::NotFound,
                "no such API path; see /api/v1/openapi.json",
            ),
        }
    }

    async fn exec(&self, req: Request<Incoming>) -> Response<Body> {
        let token = bearer(&req);
        let signed = Signed::of(&req);
        let path = req.uri().path().to_owned();
        let streaming = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("application/x-ndjson"));
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("application/json"));
        let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return error_with(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorKind::Usage,
                    "a command line is at most 64 KiB",
                )
            }
        };
        // The body is read first, even when the call will be refused: an
        // HTTP/2 client still sending it would see a reset stream.
        let (user, label) = match (token, signed) {
            (Some(token), _) => match self.gate.api_user(&token).await {
                Ok(Some((user, label))) => (user, format!("token:{label}")),
                Ok(None) => return unauthorized("that token is unknown, revoked or expired"),
                Err(e) => return store_failed(e),
            },
            (None, Some(signed)) => match self.verify(&signed, &path, &body).await {
                Ok(found) => found,
                Err(SignedError::Refused(why)) => return unauthorized(&why),
                Err(SignedError::Store(e)) => return store_failed(e),
            },
            (None, None) => {
                return unauthorized(
                    "send 'Authorization: Bearer TOKEN' (make one with 'token create'), or sign the request with your SSH key",
                )
            }
        };
        tracing::Span::current().record("user", user.name.as_str());
        if let Some(wait) = self.over_limit(&label, user.id) {
            let mut r = error(
                ErrorKind::RateLimited,
                &format!(
                    "more than {} calls a minute with this token; wait {} s",
                    self.s.api_per_minute,
                    wait.as_secs()
                ),
            );
            if let Ok(v) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return r;
        }
        let line = match line_of(&body, is_json) {
            Ok(l) => l,
            Err(why) => return error(ErrorKind::Usage, why),
        };
        let who = Identity::new(Frontend::Http, label);
        let style = Style {
            format: Format::Plain,
            force_json: true,
        };
        if !streaming {
            let answered = self
                .gate
                .front_door(
                    &who,
                    user,
                    &line,
                    style,
                    &kennel_core::provision::NoProgress,
                )
                .await;
            return json(status_of(&answered.outcome), answered.text);
        }
        // Progress lines as they come, then the outcome; the status is 200
        // (sent before the outcome is known) and the last line says.
        let (tx, rx) = mpsc::channel::<Bytes>(1024);
        let gate = self.gate.clone();
        // A `run` ends with its caller: when the client goes away, the
        // command in the VM is stopped (other commands finish, as they
        // would in chat).
        let ends_with_caller = matches!(
            kennel_core::parse(&line).map(|i| i.command),
            Ok(kennel_core::Command::Run { .. })
        );
        tokio::spawn(async move {
            let sink = LineSink::new(tx.clone());
            let work = gate.front_door(&who, user, &line, style, &sink);
            let answered = if ends_with_caller {
                tokio::select! {
                    a = work => a,
                    () = tx.closed() => return,
                }
            } else {
                work.await
            };
            let mut last = answered.text.trim_end().to_owned();
            last.push('\n');
            let _ = tx.send(Bytes::from(last)).await;
        });
        streamed(rx, "application/x-ndjson")
    }

    /// The user and audit label of an SSH-signed request: the signature
    /// checked against the user's active keys, within the time window,
    /// its nonce not seen before.
    async fn verify(
        &self,
        s: &Signed,
        path: &str,
        body: &[u8],
    ) -> Result<(kennel_core::User, String), SignedError> {
        let now = kennel_core::model::now();
        if now.abs_diff(s.ts) > SIGNATURE_WINDOW {
            return Err(format!(
                "the signed request's timestamp is more than {SIGNATURE_WINDOW} s from Kennel's clock; sign it again"
            )
            .into());
        }
        let armored = base64_decode(&s.sig)
            .ok_or("X-Kennel-Signature is not base64 of an ssh-keygen -Y sign signature")?;
        let sig = russh::keys::ssh_key::SshSig::from_pem(&armored)
            .map_err(|_| "X-Kennel-Signature is not an SSH signature (ssh-keygen -Y sign)")?;
        if sig.namespace() != SIGNATURE_NAMESPACE {
            return Err(format!("sign with -n {SIGNATURE_NAMESPACE}").into());
        }
        let key = russh::keys::ssh_key::PublicKey::from(sig.public_key().clone());
        let fp = kennel_core::keys::Fingerprint::of(&key);
        let msg = signed_message(s.ts, &s.nonce, &self.domain, "POST", path, body);
        key.verify(SIGNATURE_NAMESPACE, msg.as_bytes(), &sig)
            .map_err(|_| "the signature does not match this request".to_owned())?;
        let user = match self.gate.user_by_key(&fp).await {
            Ok(Some(u)) => u,
            Ok(None) => return Err("that key is not an active key of any user".into()),
            Err(e) => return Err(SignedError::Store(e)),
        };
        // Checked last, so only valid signatures take a place.
        let fresh = self.nonces.lock().is_ok_and(|mut seen| {
            seen.retain(|_, at| now.abs_diff(*at) <= 2 * SIGNATURE_WINDOW);
            if seen.len() >= 100_000 {
                return false;
            }
            seen.insert(format!("{fp} {}", s.nonce), now).is_none()
        });
        if !fresh {
            return Err(
                "this signed request was used already (a replay); sign a new one with a new nonce"
                    .into(),
            );
        }
        Ok((user, format!("ssh:{fp}")))
    }

    /// `Some(wait)` when this token (or key) has used up its minute, or
    /// its user all of theirs (four tokens' worth, however many tokens).
    fn over_limit(&self, label: &str, user: kennel_core::model::UserId) -> Option<Duration> {
        let mut w = self.api_calls.lock().ok()?;
        if w.len() > 10_000 {
            w.clear();
        }
        let minute = Duration::from_secs(60);
        let per_user = self.s.api_per_minute.saturating_mul(4);
        for (key, limit) in [
            ((user, label.to_owned()), self.s.api_per_minute),
            ((user, String::new()), per_user),
        ] {
            let slot = w.entry(key).or_insert((Instant::now(), 0));
            if slot.0.elapsed() >= minute {
                *slot = (Instant::now(), 0);
            }
            if slot.1 >= limit {
                return Some(minute.saturating_sub(slot.0.elapsed()));
            }
        }
        for key in [(user, label.to_owned()), (user, String::new())] {
            if let Some(slot) = w.get_mut(&key) {
                slot.1 += 1;
            }
        }
        None
    }
}

/// The parts of an SSH-signed request.
struct Signed {
    ts: i64,
    nonce: String,
    sig: String,
}

impl Signed {
    fn of<B>(req: &Request<B>) -> Option<Self> {
        let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
        let nonce = h("x-kennel-nonce")?;
        let ok_nonce = (16..=128).contains(&nonce.len())
            && nonce
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        Some(Self {
            ts: h("x-kennel-timestamp")?.parse().ok()?,
            nonce: ok_nonce.then(|| nonce.to_owned())?,
            sig: h("x-kennel-signature")?.to_owned(),
        })
    }
}

/// Standard base64 (with or without padding), or `None`.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use russh::keys::ssh_encoding::base64::{Base64, Base64Unpadded, Encoding};
    let s = s.trim();
    Base64::decode_vec(s)
        .ok()
        .or_else(|| Base64Unpadded::decode_vec(s).ok())
}

/// The bearer token of a request, if it carries one.
fn bearer<B>(req: &Request<B>) -> Option<String> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// The command line a body carries: `{"line": "…"}` as JSON, or the text.
fn line_of(body: &[u8], is_json: bool) -> Result<String, &'static str> {
    if is_json {
        let v: serde_json::Value = serde_json::from_slice(body)
            .map_err(|_| "the body is not JSON; send {\"line\": \"COMMAND\"}")?;
        return v
            .get("line")
            .and_then(|l| l.as_str())
            .map(str::to_owned)
            .ok_or("send {\"line\": \"COMMAND\"}");
    }
    let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8 text")?;
    let line = text.trim();
    if line.is_empty() {
        return Err("send a command line, e.g. 'projects'");
    }
    Ok(line.to_owned())
}

/// The HTTP status of an outcome, from core's one mapping.
fn status_of(outcome: &kennel_core::Outcome) -> StatusCode {
    match outcome {
        Ok(_) => StatusCode::OK,
        Err(e) => http_status(e.kind()),
    }
}

fn http_status(kind: ErrorKind) -> StatusCode {
    StatusCode::from_u16(kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Why a signed request was not let in.
#[derive(Debug)]
enum SignedError {
    /// The signature, key, time or nonce is not acceptable (401).
    Refused(String),
    /// The store could not be read (503, as everywhere).
    Store(kennel_core::StoreError),
}

impl From<String> for SignedError {
    fn from(why: String) -> Self {
        SignedError::Refused(why)
    }
}

impl From<&str> for SignedError {
    fn from(why: &str) -> Self {
        SignedError::Refused(why.to_owned())
    }
}

/// The store failed while deciding who is calling: 503, as a store
/// failure answers everywhere, whichever way the caller signed in.
fn store_failed(e: kennel_core::StoreError) -> Response<Body> {
    let e = kennel_core::CommandError::Store(e);
    tracing::error!(error = %e.detailed(), "cannot read who is calling");
    error(e.kind(), &e.to_string())
}

fn json(status: StatusCode, text: String) -> Response<Body> {
    let mut text = text;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let mut r = Response::new(page::full(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// An error in the shape every JSON answer has, with its kind's status.
fn error(kind: ErrorKind, message: &str) -> Response<Body> {
    error_with(http_status(kind), kind, message)
}

/// An error whose status is more precise than its kind's (405, 413).
fn error_with(status: StatusCode, kind: ErrorKind, message: &str) -> Response<Body> {
    json(
        status,
        serde_json::json!({"ok": false, "error": {"kind": kind, "message": message}}).to_string(),
    )
}

fn unauthorized(message: &str) -> Response<Body> {
    let mut r = error(ErrorKind::Unauthorized, message);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"kennel\""),
    );
    r
}

/// Sends each progress step as one NDJSON line (dropped if the client is
/// slower than 64 lines behind: progress is advisory).
/// A `run`'s output goes as `{"output": TEXT}` lines, in order; should
/// the client fall 1024 lines behind, what does not fit is left out and
/// a `{"notice": ...}` line says so.
struct LineSink {
    tx: mpsc::Sender<Bytes>,
    /// The start of a character split across two chunks of output.
    carry: std::sync::Mutex<Vec<u8>>,
    dropped: std::sync::atomic::AtomicBool,
}

impl LineSink {
    fn new(tx: mpsc::Sender<Bytes>) -> Self {
        Self {
            tx,
            carry: std::sync::Mutex::default(),
            dropped: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl ProgressSink for LineSink {
    fn report(&self, p: Progress) {
        let mut line = serde_json::json!({ "progress": p }).to_string();
        line.push('\n');
        let _ = self.tx.try_send(Bytes::from(line));
    }

    fn output(&self, bytes: &[u8]) {
        use std::sync::atomic::Ordering::Relaxed;
        let text = {
            let mut carry = self
                .carry
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            carry.extend_from_slice(bytes);
            let whole = match std::str::from_utf8(&carry) {
                Ok(_) => carry.len(),
                // An incomplete last character waits for the next chunk.
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                Err(_) => carry.len(),
            };
            let rest = carry.split_off(whole);
            let text = String::from_utf8_lossy(&carry).into_owned();
            *carry = rest;
            text
        };
        if text.is_empty() {
            return;
        }
        if self.dropped.load(Relaxed) {
            let notice = "{\"notice\":\"output was left out here: the client reads slower than the command writes\"}\n";
            if self
                .tx
                .try_send(Bytes::from_static(notice.as_bytes()))
                .is_err()
            {
                return;
            }
            self.dropped.store(false, Relaxed);
        }
        let mut line = serde_json::json!({ "output": text }).to_string();
        line.push('\n');
        if self.tx.try_send(Bytes::from(line)).is_err() {
            self.dropped.store(true, Relaxed);
        }
    }

    fn streams_output(&self) -> bool {
        true
    }
}

/// A streamed answer of `content_type`: what is sent on `rx`, until it
/// closes; never cached.
pub(super) fn streamed(rx: mpsc::Receiver<Bytes>, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(Lines(rx).boxed());
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A body of the lines sent on a channel, ending when it closes.
struct Lines(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Lines {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

impl Lines {
    fn boxed(self) -> Body {
        BodyExt::boxed(BodyExt::map_err(self, |never: Infallible| match never {}))
    }
}

/// The API's OpenAPI 3.1 description.
fn openapi() -> serde_json::Value {
    let outcome = serde_json::json!({
        "type": "object",
        "required": ["ok"],
        "additionalProperties": true,
        "properties": {
            "ok": {"type": "boolean"},
            "kind": {"type": "string", "description": "when ok: which answer this is (e.g. `projects`, `status`); its fields are beside it, as `--json` prints them"},
            "error": {
                "type": "object",
                "properties": {
                    "kind": {"type": "string", "enum": kennel_core::outcome::ErrorKind::ALL.map(ErrorKind::as_str)},
                    "message": {"type": "string"}
                }
            }
        }
    });
    let answer = |what: &str| {
        serde_json::json!({
            "description": what,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Outcome"}}}
        })
    };
    serde_json::json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Kennel",
            "version": "1",
            "description": "One endpoint runs one line of Kennel's command language (the same as in chat, over SSH and at the console) as the token's user. `help` lists the commands."
        },
        "components": {
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer", "description": "a token from `token create`"}},
            "schemas": {"Outcome": outcome}
        },
        "security": [{"token": []}],
        "paths": {
            "/api/v1/exec": {
                "post": {
                    "summary": "Run a command line",
                    "requestBody": {
                        "required": true,
                        "content": {
                            "text/plain": {"schema": {"type": "string"}, "example": "projects"},
                            "application/json": {"schema": {"type": "object", "required": ["line"], "properties": {"line": {"type": "string"}}}, "example": {"line": "status myapp"}}
                        }
                    },
                    "responses": {
                        "200": {
                            "description": "done; with `Accept: application/x-ndjson`, progress lines (`{\"progress\": {\"stage\", \"percent\", \"detail\"}}`), a `run`'s output as it comes (`{\"output\": TEXT}`), and then the outcome, always 200",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/Outcome"}},
                                "application/x-ndjson": {"schema": {"type": "string"}}
                            }
                        },
                        "400": answer("usage: the line does not parse"),
                        "401": answer("no token, or an unknown, revoked or expired one"),
                        "403": answer("refused by policy"),
                        "404": answer("not found"),
                        "409": answer("conflict"),
                        "429": answer("too many calls this minute (Retry-After)"),
                        "500": answer("failed")
                    }
                }
            }
        }
    })
}
