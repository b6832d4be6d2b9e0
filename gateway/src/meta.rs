//! The metadata service: plain HTTP that only project VMs reach, with the
//! LLM gateway (`/llm/openai/v1/…`, `/llm/anthropic/v1/…`) and
//! `/kennel/v1/me`, `/kennel/v1/notify`.
//!
//! **Which VM asks** comes from the path the connection took, never from
//! the request. Each running VM has a link of its own: an SSH connection
//! from Kennel to that VM's sshd (pinned to its host key) that asked it
//! for a `streamlocal-forward` at [`GUEST_METADATA_SOCKET`]; in the guest,
//! `169.254.169.254:80` (`metadata.kennel.internal`) leads to that socket,
//! and every connection to it comes back over that VM's link only. This
//! needs nothing of the VMM or the network mode (QEMU user networking,
//! TAP, Cloud Hypervisor alike) and no host port a guest could reach. Each
//! project also has a Unix socket on the host (`DIR/NAME.sock`, 0600),
//! served the same way, for carriers that end in a socket (vsock) and for
//! tests. A guest can send any bytes it likes; it cannot choose its link.
//!
//! **Keys stay on the host.** An LLM request is forwarded with the
//! credential added here: the owner's own key (`secret set
//! openai-api-key …`) or an operator backend the owner may use. The
//! guest's own `Authorization`/`x-api-key` (a placeholder) is dropped.
//! Answers stream through chunk by chunk; a client that goes away drops
//! the upstream request with it.
//!
//! **Limits and records**: requests per minute per user (here, in memory)
//! and tokens per day (core's count, from the answers' `usage`, streamed
//! ones included), a 429 that names the limit; one audit line per request
//! (no prompt, no answer) and metrics.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kennel_core::llm::{LlmRecord, Provider, VmWho, NOTICE_MAX_CHARS};
use kennel_core::model::UserId;
use kennel_core::names::ProjectName;
use kennel_core::Gate;
use tokio::net::UnixListener;
use tracing::Instrument as _;

use crate::https::Body;
use crate::vmlink::{MetaServe, VmLinks, GUEST_METADATA_SOCKET};

/// The metadata service's address inside every VM (on the guest's
/// loopback, where `kennel-metadata.socket` listens on port 80; the images
/// name it `metadata.kennel.internal`).
pub const GUEST_ADDR: &str = "169.254.169.254";

/// An LLM server the operator configured (`[llm.backends.NAME]`).
#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    pub provider: Provider,
    /// The API base, `…/v1` included (`http://127.0.0.1:11434/v1`).
    pub url: String,
    /// Read from the configured key file at start; `None` for a server
    /// that wants none (a local Ollama).
    pub key: Option<String>,
    /// Who may use it; empty is everyone.
    pub users: Vec<String>,
}

/// How the service behaves.
#[derive(Debug, Clone)]
pub struct MetaSettings {
    /// Where the per-project sockets live.
    pub dir: PathBuf,
    /// The API bases the owners' own keys go to.
    pub openai_url: String,
    pub anthropic_url: String,
    pub backends: Vec<Backend>,
    /// The largest request body forwarded.
    pub max_body: usize,
    pub connect_timeout: Duration,
    /// Until the upstream's answer starts (headers).
    pub answer_timeout: Duration,
    /// The longest pause between two chunks of an answer.
    pub idle_timeout: Duration,
    /// `/kennel/v1/notify` lines per project per minute.
    pub notify_per_minute: u32,
}

impl Default for MetaSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("kennel-data/meta"),
            openai_url: "https://api.openai.com/v1".into(),
            anthropic_url: "https://api.anthropic.com/v1".into(),
            backends: Vec::new(),
            max_body: 4 << 20,
            connect_timeout: Duration::from_secs(10),
            answer_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(300),
            notify_per_minute: 6,
        }
    }
}

type Upstream = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// The service: shared by every project's listener. Cheap to clone.
#[derive(Clone)]
pub struct MetaService {
    inner: Arc<Inner>,
}

struct Inner {
    gate: Gate,
    s: MetaSettings,
    client: Upstream,
    /// Request times of each user in the last minute.
    minute: Mutex<HashMap<UserId, VecDeque<Instant>>>,
    /// Notify times of each project in the last minute.
    notices: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl std::fmt::Debug for MetaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaService")
            .field("dir", &self.inner.s.dir)
            .finish_non_exhaustive()
    }
}

/// Whether one more event fits in a per-minute window (and records it).
fn admit<K: std::hash::Hash + Eq>(
    map: &Mutex<HashMap<K, VecDeque<Instant>>>,
    key: K,
    per_minute: u32,
) -> bool {
    if per_minute == 0 {
        return true;
    }
    let Ok(mut m) = map.lock() else {
        return false;
    };
    let now = Instant::now();
    let q = m.entry(key).or_default();
    while q
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
    {
        q.pop_front();
    }
    if q.len() >= per_minute as usize {
        return false;
    }
    q.push_back(now);
    true
}

type Tasks = HashMap<ProjectName, tokio::task::JoinHandle<()>>;

/// What [`MetaService::run`] keeps going: a listener per project, a link
/// per running VM.
#[derive(Default)]
struct Live {
    sockets: Tasks,
    links: Tasks,
}

impl MetaService {
    /// Fails only when the TLS library offers no safe protocol version.
    pub fn new(gate: Gate, s: MetaSettings) -> Result<Self, rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(s.connect_timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Ok(Self {
            inner: Arc::new(Inner {
                gate,
                s,
                client,
                minute: Mutex::default(),
                notices: Mutex::default(),
            }),
        })
    }

    /// The socket of `project`'s VM.
    pub fn socket_of(dir: &Path, project: &ProjectName) -> PathBuf {
        dir.join(format!("{project}.sock"))
    }

    /// Until `shutdown`: keeps one listening socket per project in the
    /// settings' directory (made for new projects, removed with theirs)
    /// and, with `links`, a metadata link into each running VM.
    pub async fn run(
        self,
        links: Option<Arc<VmLinks>>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        let dir = self.inner.s.dir.clone();
        std::fs::create_dir_all(&dir)?;
        set_mode(&dir, 0o700)?;
        let mut live = Live::default();
        let mut seen = u64::MAX;
        let lap = async {
            loop {
                let changes = self.inner.gate.changes();
                if changes != seen {
                    seen = changes;
                    match self.inner.gate.project_names().await {
                        Ok(names) => {
                            self.reconcile(&dir, &names, &mut live.sockets);
                            if let Some(links) = &links {
                                self.relink(links, &names, &mut live.links);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "metadata service: cannot list projects")
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        };
        tokio::select! {
            () = lap => {}
            () = shutdown => {}
        }
        for (_, t) in live.sockets.drain().chain(live.links.drain()) {
            t.abort();
        }
        Ok(())
    }

    /// A link for each running VM that has none (or whose task ended),
    /// none for the others.
    fn relink(&self, links: &Arc<VmLinks>, names: &[(ProjectName, bool)], live: &mut Tasks) {
        live.retain(|n, t| {
            let keep = names.iter().any(|(m, running)| m == n && *running) && !t.is_finished();
            if !keep {
                t.abort();
            }
            keep
        });
        for (n, running) in names {
            if *running && !live.contains_key(n) {
                let task = self.clone().keep_link(links.clone(), n.clone());
                live.insert(n.clone(), tokio::spawn(task));
            }
        }
    }

    /// Keeps `project`'s metadata link up, made again whenever it drops,
    /// until the task is aborted (the VM stopped).
    async fn keep_link(self, links: Arc<VmLinks>, project: ProjectName) {
        let me = self.clone();
        let p = project.clone();
        let serve: MetaServe = Arc::new(move |stream| {
            tokio::spawn(me.clone().serve(p.clone(), stream));
        });
        let mut pause = Duration::from_millis(250);
        loop {
            match links.metadata_link(&project, serve.clone()).await {
                Ok(link) => {
                    tracing::info!(project = %project, guest = GUEST_METADATA_SOCKET, "metadata link up");
                    pause = Duration::from_millis(250);
                    while !link.is_closed() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    tracing::info!(project = %project, "metadata link closed; making it again");
                }
                Err(e) => {
                    tracing::debug!(project = %project, error = %e, "metadata link: not yet");
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    fn reconcile(&self, dir: &Path, names: &[(ProjectName, bool)], live: &mut Tasks) {
        live.retain(|n, t| {
            let keep = names.iter().any(|(m, _)| m == n) && !t.is_finished();
            if !keep {
                t.abort();
                let _ = std::fs::remove_file(Self::socket_of(dir, n));
            }
            keep
        });
        for (n, _) in names {
            if live.contains_key(n) {
                continue;
            }
            let path = Self::socket_of(dir, n);
            let _ = std::fs::remove_file(&path);
            match UnixListener::bind(&path) {
                Ok(l) => {
                    let _ = set_mode(&path, 0o600);
                    live.insert(n.clone(), tokio::spawn(self.clone().listen(n.clone(), l)));
                }
                Err(e) => {
                    tracing::warn!(project = %n, path = %path.display(), error = %e, "metadata service: cannot listen");
                }
            }
        }
    }

    async fn listen(self, project: ProjectName, l: UnixListener) {
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    let me = self.clone();
                    let p = project.clone();
                    tokio::spawn(async move { me.serve(p, s).await });
                }
                Err(e) => {
                    tracing::warn!(project = %project, error = %e, "metadata service: accept failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Serves one connection that came from `project`'s VM.
    pub async fn serve<S>(self, project: ProjectName, io: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let me = self.clone();
            let p = project.clone();
            let span = tracing::info_span!("meta", project = %p);
            async move { Ok::<_, Infallible>(me.handle(&p, req).await) }.instrument(span)
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(TokioIo::new(io), svc)
            .await;
    }

    async fn handle(&self, project: &ProjectName, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let parts: Vec<&str> = path.trim_start_matches('/').splitn(4, '/').collect();
        if let ["llm", provider, "v1", rest] = parts.as_slice() {
            return match Provider::parse(provider) {
                Some(p) => self.llm(project, p, rest, req).await,
                None => not_found(&path),
            };
        }
        let who = match self.inner.gate.vm_who(project).await {
            Ok(Some(w)) => w,
            Ok(None) => return gone(),
            Err(e) => return store_down(&e),
        };
        match parts.as_slice() {
            ["kennel", "v1", "me"] if req.method() == Method::GET => json(
                StatusCode::OK,
                &serde_json::json!({
                    "project": who.project.name.as_str(),
                    "owner": who.owner.name.as_str(),
                    "stack": who.project.stack,
                }),
            ),
            ["kennel", "v1", "notify"] if req.method() == Method::POST => {
                self.notify(&who, req).await
            }
            _ => not_found(&path),
        }
    }

    async fn notify(&self, who: &VmWho, req: Request<Incoming>) -> Response<Body> {
        let body = match Limited::new(req.into_body(), 4096).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "a notice is one line of text",
                )
            }
        };
        let text = String::from_utf8_lossy(&body);
        let line = text.trim();
        if line.is_empty()
            || line.chars().count() > NOTICE_MAX_CHARS
            || line.chars().any(char::is_control)
        {
            return plain(
                StatusCode::BAD_REQUEST,
                &format!("a notice is one line of 1 to {NOTICE_MAX_CHARS} characters"),
            );
        }
        if !admit(
            &self.inner.notices,
            who.project.name.to_string(),
            self.inner.s.notify_per_minute,
        ) {
            return plain(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "at most {} notices a minute per project",
                    self.inner.s.notify_per_minute
                ),
            );
        }
        self.inner.gate.notify_owner(who, line).await;
        plain(StatusCode::ACCEPTED, "sent")
    }

    /// Where `who`'s request for `provider` goes, with the credential:
    /// the owner's own key (`own_key`), else an operator backend they may
    /// use.
    fn upstream_for(
        &self,
        who: &VmWho,
        provider: Provider,
        own_key: Option<String>,
    ) -> Result<(String, String, Option<String>), Box<Response<Body>>> {
        if let Some(key) = own_key {
            let url = match provider {
                Provider::OpenAi => &self.inner.s.openai_url,
                Provider::Anthropic => &self.inner.s.anthropic_url,
            };
            return Ok((provider.as_str().to_owned(), url.clone(), Some(key)));
        }
        let owner = who.owner.name.as_str();
        self.inner
            .s
            .backends
            .iter()
            .find(|b| {
                b.provider == provider
                    && (b.users.is_empty() || b.users.iter().any(|u| u == owner))
            })
            .map(|b| (b.name.clone(), b.url.clone(), b.key.clone()))
            .ok_or_else(|| {
                Box::new(plain(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "no LLM is configured for you: `secret set {} KEY` in chat, or ask an admin for a backend",
                        provider.secret_name()
                    ),
                ))
            })
    }

    async fn llm(
        &self,
        project: &ProjectName,
        provider: Provider,
        rest: &str,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let started = Instant::now();
        let s = self.inner.gate.settings();
        let (rpm, tpd) = (s.llm_requests_per_minute, s.llm_tokens_per_day);
        let mut record = LlmRecord {
            backend: "-".into(),
            ..LlmRecord::default()
        };
        // One read: the project's owner, their key and the day's use.
        let ctx = match self
            .inner
            .gate
            .llm_context(project, provider, tpd > 0)
            .await
        {
            Ok(Some(c)) => c,
            Ok(None) => return gone(),
            Err(e) => return store_down(&e),
        };
        let (who, own_key) = (&ctx.who, ctx.key);
        let refused = if !admit(&self.inner.minute, who.owner.id, rpm) {
            Some(format!(
                "limit reached: {rpm} LLM requests a minute for {}; wait a minute",
                who.owner.name
            ))
        } else {
            ctx.used.filter(|d| d.tokens >= tpd).map(|d| {
                format!(
                    "limit reached: {tpd} LLM tokens a day for {} ({} used today, UTC); 'llm usage' in chat shows it",
                    who.owner.name, d.tokens
                )
            })
        };
        if let Some(msg) = refused {
            record.status = StatusCode::TOO_MANY_REQUESTS.as_u16();
            record.ms = elapsed_ms(started);
            self.inner.gate.llm_record(who, &record).await;
            return llm_error(StatusCode::TOO_MANY_REQUESTS, &msg);
        }
        let (backend, base, key) = match self.upstream_for(who, provider, own_key) {
            Ok(u) => u,
            Err(resp) => return *resp,
        };
        record.backend = backend.clone();
        let (mut parts, body) = req.into_parts();
        let body = match Limited::new(body, self.inner.s.max_body).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return llm_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("the request is larger than {} bytes", self.inner.s.max_body),
                )
            }
        };
        let body = prepare_body(provider, rest, body, &mut record);
        let query = parts
            .uri
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let url = format!("{}/{rest}{query}", base.trim_end_matches('/'));
        let Ok(uri) = url.parse::<Uri>() else {
            return llm_error(StatusCode::BAD_REQUEST, "that path cannot be forwarded");
        };
        let mut headers = std::mem::take(&mut parts.headers);
        crate::https::strip_hop_by_hop(&mut headers);
        for h in [
            header::HOST,
            header::AUTHORIZATION,
            header::COOKIE,
            header::CONTENT_LENGTH,
            // Answers come back as they are, so their usage can be read.
            header::ACCEPT_ENCODING,
        ] {
            headers.remove(h);
        }
        headers.remove("x-api-key");
        headers.remove(header::PROXY_AUTHORIZATION);
        if let Some(k) = &key {
            let (name, value) = match provider {
                Provider::OpenAi => (header::AUTHORIZATION, format!("Bearer {k}")),
                Provider::Anthropic => (header::HeaderName::from_static("x-api-key"), k.clone()),
            };
            match HeaderValue::from_str(&value) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    headers.insert(name, v);
                }
                Err(_) => {
                    return llm_error(
                        StatusCode::BAD_GATEWAY,
                        "the stored key has characters no HTTP header may carry; set it again",
                    )
                }
            }
        }
        let mut up = Request::new(Full::new(body));
        *up.method_mut() = parts.method;
        *up.uri_mut() = uri;
        *up.headers_mut() = headers;
        let host = up.uri().host().unwrap_or("?").to_owned();
        let answer =
            tokio::time::timeout(self.inner.s.answer_timeout, self.inner.client.request(up)).await;
        let resp = match answer {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(backend = %backend, host = %host, error = %e, "LLM backend unreachable");
                record.status = 502;
                record.ms = elapsed_ms(started);
                self.inner.gate.llm_record(who, &record).await;
                metric(&record);
                return llm_error(
                    StatusCode::BAD_GATEWAY,
                    &format!("the LLM backend '{backend}' ({host}) is not answering"),
                );
            }
            Err(_) => {
                record.status = 504;
                record.ms = elapsed_ms(started);
                self.inner.gate.llm_record(who, &record).await;
                metric(&record);
                return llm_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!(
                        "the LLM backend '{backend}' ({host}) did not answer within {} s",
                        self.inner.s.answer_timeout.as_secs()
                    ),
                );
            }
        };
        record.status = resp.status().as_u16();
        let (mut rparts, incoming) = resp.into_parts();
        crate::https::strip_hop_by_hop(&mut rparts.headers);
        let sse = rparts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let counted = Counted {
            inner: incoming,
            tally: Tally::new(sse),
            idle: Box::pin(tokio::time::sleep(self.inner.s.idle_timeout)),
            idle_for: self.inner.s.idle_timeout,
            end: Some(End {
                gate: self.inner.gate.clone(),
                who: who.clone(),
                record,
                started,
            }),
        };
        Response::from_parts(rparts, counted.boxed())
    }
}

/// `u` as an API base (`http(s)://host[:port][/path]`, no query), without
/// a trailing slash; `None` if it is not one.
pub fn base_url(u: &str) -> Option<String> {
    let p = u.parse::<Uri>().ok()?;
    let ok = matches!(p.scheme_str(), Some("http" | "https"))
        && p.host().is_some_and(|h| !h.is_empty())
        && p.query().is_none();
    ok.then(|| u.trim_end_matches('/').to_owned())
}

fn set_mode(p: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}

fn elapsed_ms(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn metric(r: &LlmRecord) {
    ::metrics::counter!("kennel_llm_requests_total", "backend" => r.backend.clone(), "status" => r.status.to_string())
        .increment(1);
    ::metrics::counter!("kennel_llm_tokens_total", "backend" => r.backend.clone())
        .increment(r.tokens);
    #[allow(clippy::cast_precision_loss)]
    ::metrics::histogram!("kennel_llm_request_seconds", "backend" => r.backend.clone())
        .record(r.ms as f64 / 1000.0);
}

/// A JSON value that should be a string, a bool or a count; anything
/// else is ignored rather than failing the whole read.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Loose<'a> {
    Str(#[serde(borrow)] std::borrow::Cow<'a, str>),
    Bool(bool),
    Count(u64),
    Other(serde::de::IgnoredAny),
}

/// The fields of a request the gateway reads; the rest is skipped, not
/// built into a tree (a coding agent's request is mostly its prompt).
#[derive(serde::Deserialize)]
struct Asked<'a> {
    #[serde(borrow, default)]
    model: Option<Loose<'a>>,
    #[serde(default)]
    stream: Option<Loose<'a>>,
    /// Present at all (even `null`).
    #[serde(default, deserialize_with = "present")]
    stream_options: bool,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    <serde::de::IgnoredAny as serde::Deserialize>::deserialize(d).map(|_| true)
}

/// Reads the model and streaming flag from a JSON request, and asks an
/// OpenAI-style stream for its usage (so streamed tokens count too).
fn prepare_body(provider: Provider, rest: &str, body: Bytes, record: &mut LlmRecord) -> Bytes {
    // Objects only (serde would read a struct from an array too).
    if body.trim_ascii_start().first() != Some(&b'{') {
        return body;
    }
    let Ok(asked) = serde_json::from_slice::<Asked<'_>>(&body) else {
        return body;
    };
    if let Some(Loose::Str(m)) = &asked.model {
        record.model = Some(m.chars().take(100).collect());
    }
    let streams = matches!(asked.stream, Some(Loose::Bool(true)));
    if provider != Provider::OpenAi || !streams || !rest.ends_with("chat/completions") {
        return body;
    }
    if !asked.stream_options {
        // The key is absent: put it first, without rebuilding the body.
        let at = body.len() - body.trim_ascii_start().len() + 1;
        let mut out = Vec::with_capacity(body.len() + 48);
        out.extend_from_slice(body.get(..at).unwrap_or_default());
        out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
        out.extend_from_slice(body.get(at..).unwrap_or_default());
        return Bytes::from(out);
    }
    // Options given: add `include_usage` unless they say it already.
    let Ok(serde_json::Value::Object(mut v)) = serde_json::from_slice::<serde_json::Value>(&body)
    else {
        return body;
    };
    if let Some(o) = v
        .get_mut("stream_options")
        .and_then(serde_json::Value::as_object_mut)
    {
        if !o.contains_key("include_usage") {
            o.insert("include_usage".into(), serde_json::Value::Bool(true));
            return serde_json::to_vec(&v).map(Bytes::from).unwrap_or(body);
        }
    }
    body
}

/// Where answers carry their usage: at the top (OpenAI), in `message`
/// (Anthropic's `message_start`) or in `response` (OpenAI's Responses
/// stream). Read without building a tree; other fields are skipped.
#[derive(serde::Deserialize)]
struct Answered<'a> {
    #[serde(borrow, default)]
    usage: Option<Usage<'a>>,
    #[serde(borrow, default)]
    message: Option<Nested<'a>>,
    #[serde(borrow, default)]
    response: Option<Nested<'a>>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Nested<'a> {
    WithUsage {
        #[serde(borrow)]
        usage: Usage<'a>,
    },
    Other(serde::de::IgnoredAny),
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Usage<'a> {
    Counts {
        #[serde(borrow, default)]
        total_tokens: Option<Loose<'a>>,
        #[serde(borrow, default)]
        input_tokens: Option<Loose<'a>>,
        #[serde(borrow, default)]
        prompt_tokens: Option<Loose<'a>>,
        #[serde(borrow, default)]
        output_tokens: Option<Loose<'a>>,
        #[serde(borrow, default)]
        completion_tokens: Option<Loose<'a>>,
    },
    Other(serde::de::IgnoredAny),
}

fn nested_usage(n: Option<Nested<'_>>) -> Option<Usage<'_>> {
    match n {
        Some(Nested::WithUsage { usage }) => Some(usage),
        _ => None,
    }
}

fn count(v: Option<&Loose<'_>>) -> u64 {
    match v {
        Some(Loose::Count(n)) => *n,
        _ => 0,
    }
}

/// Token counts seen in an answer: OpenAI's `usage.total_tokens` (or
/// prompt + completion), Anthropic's `input_tokens` + `output_tokens`
/// (in `message_start` and the cumulative `message_delta`).
#[derive(Debug, Default)]
struct Tally {
    sse: bool,
    /// A line not yet ended (SSE), or the whole body (JSON), capped.
    buf: Vec<u8>,
    total: u64,
    input: u64,
    output: u64,
}

/// What an event must contain for its usage to be read.
const USAGE: &[u8] = b"\"usage\"";

/// The most of an answer kept to read its usage from.
const TALLY_CAP: usize = 1 << 20;

impl Tally {
    fn new(sse: bool) -> Self {
        Self {
            sse,
            ..Self::default()
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        if !self.sse {
            if self.buf.len() + chunk.len() <= TALLY_CAP {
                self.buf.extend_from_slice(chunk);
            }
            return;
        }
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|b| *b == b'\n') {
            let (line, after) = rest.split_at(i);
            if self.buf.is_empty() {
                self.line(line);
            } else {
                let mut l = std::mem::take(&mut self.buf);
                l.extend_from_slice(line);
                self.line(&l);
            }
            rest = after.get(1..).unwrap_or_default();
        }
        if self.buf.len() + rest.len() <= TALLY_CAP {
            self.buf.extend_from_slice(rest);
        }
    }

    fn line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        // Most events are tokens of text: only those naming a usage are read.
        if data.windows(USAGE.len()).any(|w| w == USAGE) {
            self.json(data.trim_ascii());
        }
    }

    fn json(&mut self, text: &[u8]) {
        let Ok(a) = serde_json::from_slice::<Answered<'_>>(text) else {
            return;
        };
        for u in [a.usage, nested_usage(a.message), nested_usage(a.response)]
            .into_iter()
            .flatten()
        {
            let Usage::Counts {
                total_tokens,
                input_tokens,
                prompt_tokens,
                output_tokens,
                completion_tokens,
            } = u
            else {
                continue;
            };
            self.total = self.total.max(count(total_tokens.as_ref()));
            self.input = self
                .input
                .max(count(input_tokens.as_ref()))
                .max(count(prompt_tokens.as_ref()));
            self.output = self
                .output
                .max(count(output_tokens.as_ref()))
                .max(count(completion_tokens.as_ref()));
        }
    }

    fn tokens(&mut self) -> u64 {
        if !self.sse && !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            self.json(&buf);
        }
        self.total.max(self.input.saturating_add(self.output))
    }
}

/// What is recorded when an answer ends (or its client goes away).
struct End {
    gate: Gate,
    who: VmWho,
    record: LlmRecord,
    started: Instant,
}

/// An answer passed through chunk by chunk, its usage read on the way.
/// Dropping it (the VM's client went away) drops the upstream request.
struct Counted {
    inner: Incoming,
    tally: Tally,
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_for: Duration,
    end: Option<End>,
}

impl Counted {
    fn finish(&mut self) {
        if let Some(mut end) = self.end.take() {
            end.record.tokens = self.tally.tokens();
            end.record.ms = elapsed_ms(end.started);
            metric(&end.record);
            tokio::spawn(async move { end.gate.llm_record(&end.who, &end.record).await });
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish();
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let me = &mut *self;
        match Pin::new(&mut me.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    me.tally.feed(d);
                }
                let deadline = tokio::time::Instant::now() + me.idle_for;
                me.idle.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                me.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                me.finish();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => {
                if me.idle.as_mut().poll(cx).is_ready() {
                    // The upstream stalled: end the answer here.
                    tracing::warn!("LLM backend stalled mid-answer; ending it");
                    me.finish();
                    return Poll::Ready(None);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn plain(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(crate::https::full_body(format!("{msg}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(crate::https::full_body(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// An error an SDK shows: OpenAI's and Anthropic's shape alike
/// (`{"error": {"message": …}}`).
/// The answer when the asking VM's project was removed.
fn gone() -> Response<Body> {
    plain(StatusCode::NOT_FOUND, "this VM's project is gone")
}

/// The answer when the store cannot be read.
fn store_down(e: &kennel_core::StoreError) -> Response<Body> {
    tracing::warn!(error = %e, "metadata service: store");
    plain(
        StatusCode::SERVICE_UNAVAILABLE,
        "Kennel cannot read its store; try again",
    )
}

fn llm_error(status: StatusCode, msg: &str) -> Response<Body> {
    json(
        status,
        &serde_json::json!({"error": {"type": "kennel", "message": msg}}),
    )
}

fn not_found(path: &str) -> Response<Body> {
    plain(
        StatusCode::NOT_FOUND,
        &format!(
            "no route {path}: the metadata service has /llm/openai/v1/…, /llm/anthropic/v1/…, /kennel/v1/me and /kennel/v1/notify"
        ),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn prepared(provider: Provider, rest: &str, body: &str) -> (String, Option<String>) {
        let mut r = LlmRecord::default();
        let out = prepare_body(provider, rest, Bytes::from(body.to_owned()), &mut r);
        (String::from_utf8(out.to_vec()).unwrap(), r.model)
    }

    #[test]
    fn a_stream_asks_for_its_usage_and_keeps_everything_else() {
        let body =
            r#" {"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"h\u00e9"}]}"#;
        let (out, model) = prepared(Provider::OpenAi, "chat/completions", body);
        assert_eq!(model.as_deref(), Some("gpt-4o"));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["messages"][0]["content"], "hé");
        assert_eq!(v["stream"], true);
        // Options given without it: added; given with it: left as sent.
        let (out, _) = prepared(
            Provider::OpenAi,
            "chat/completions",
            r#"{"stream":true,"stream_options":{"x":1}}"#,
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"x":1,"include_usage":true})
        );
        for untouched in [
            r#"{"stream":true,"stream_options":{"include_usage":false}}"#,
            r#"{"stream":true,"stream_options":null}"#,
            r#"{"stream":false,"model":"m"}"#,
            r#"{"stream":"yes"}"#,
            r#"[true, "m"]"#,
            "not json",
            "",
        ] {
            assert_eq!(
                prepared(Provider::OpenAi, "chat/completions", untouched).0,
                untouched
            );
        }
        let anthropic = r#"{"model":"claude","stream":true}"#;
        assert_eq!(
            prepared(Provider::Anthropic, "messages", anthropic),
            (anthropic.to_owned(), Some("claude".to_owned()))
        );
        // A model that is not a string is not recorded; the body passes.
        assert_eq!(
            prepared(Provider::OpenAi, "embeddings", r#"{"model":{"a":1}}"#).1,
            None
        );
    }

    fn tally(sse: bool, chunks: &[&str]) -> u64 {
        let mut t = Tally::new(sse);
        for c in chunks {
            t.feed(c.as_bytes());
        }
        t.tokens()
    }

    #[test]
    fn usage_is_read_from_every_shape_of_answer() {
        // OpenAI, streamed: the last event before [DONE], split mid-line.
        let openai = [
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,",
            "\"completion_tokens\":5,\"total_tokens\":12}}\n\ndata: [DONE]\n\n",
        ];
        assert_eq!(tally(true, &openai), 12);
        // Anthropic: input in message_start, output growing in message_delta.
        let anthropic = [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n",
            "event: ping\ndata: {\"type\":\"ping\"}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
        ];
        assert_eq!(tally(true, &anthropic), 25);
        // A whole JSON answer, in pieces.
        assert_eq!(
            tally(
                false,
                &[
                    "{\"id\":\"x\",\"usage\":{\"prompt_tokens\":3,",
                    "\"completion_tokens\":4}}"
                ]
            ),
            7
        );
        // Odd shapes count what they can and never fail the answer.
        assert_eq!(
            tally(true, &["data: {\"message\":\"text\",\"usage\":{\"total_tokens\":2.5,\"prompt_tokens\":4}}\n"]),
            4
        );
        assert_eq!(
            tally(true, &["data: {\"usage\":null}\n", "data: {\"usage\":\n"]),
            0
        );
        assert_eq!(tally(false, &["not json"]), 0);
    }
}
