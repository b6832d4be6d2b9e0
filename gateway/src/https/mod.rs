//! The HTTPS gateway (hyper + rustls): `https://NAME.DOMAIN` reaches the
//! app port of a project's VM, `https://DOMAIN` is Kennel's own host.
//!
//! Private is the default: an app opens for its owner, users it is shared
//! with `--web`, and admins; `public NAME` opens it to anyone. The
//! decision is core's (`Gate::may_enter`). Browsers sign in with a
//! one-time link from the `login` command (confirmed by a POST, so link
//! previews cannot use it up); each project host then gets its own
//! host-only cookie through a one-time code that Kennel's host hands over
//! by a redirect, so no project can read another's session.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | settings, listener, connections, limits, the request dispatch, the project host |
//! | `site.rs` | Kennel's host: sign-in, hand-over, sign-out |
//! | `api.rs` | the HTTP API: `POST /api/v1/exec` with a bearer token or an SSH signature |
//! | `dash.rs` | the dashboard: projects, live states, actions as command lines |
//! | `proxy.rs` | forwarding to the VM: headers, streaming, upgrades |
//! | `route.rs` | host names to sites; safe redirect targets |
//! | `tls.rs` | certificate files (reloaded) or a development CA |
//! | `acme.rs` | certificates from an ACME CA (TLS-ALPN-01 per host, or a DNS-01 wildcard), renewed |
//! | `page.rs` | Kennel's own small pages |

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use kennel_core::model::{Project, User};
use kennel_core::names::ProjectName;
use kennel_core::policy::Entry;
use kennel_core::provision::NoProgress;
use kennel_core::{Actor, Gate};

pub mod acme;
pub mod api;
mod dash;
mod page;
mod proxy;
pub mod route;
mod site;
pub mod tls;

pub(crate) use proxy::strip_hop_by_hop;
use proxy::Forwarded;

/// A whole body of bytes.
pub(crate) fn full_body(b: impl Into<Bytes>) -> Body {
    page::full(b)
}
use route::Site;

/// What Kennel's pages and the proxy answer with.
pub type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// The session cookie, host-only by its `__Host-` prefix.
pub const COOKIE: &str = "__Host-kennel";
/// The cookie of a share link's session (host-only, like [`COOKIE`]).
pub const LINK_COOKIE: &str = "__Host-kennel-link";

/// Limits of the gateway.
#[derive(Debug, Clone)]
pub struct HttpsSettings {
    /// Peers whose `X-Forwarded-*` headers are believed (a load balancer
    /// in front of Kennel); everyone else's are replaced.
    pub trusted_proxies: Vec<IpAddr>,
    pub max_connections_per_ip: usize,
    pub handshake_timeout: Duration,
    /// Reading a request's headers, and waiting for the next request on
    /// an idle keep-alive connection.
    pub header_timeout: Duration,
    /// How long a script's request for a stopped project waits for it to
    /// start before 503 (browsers get a page that reloads itself).
    pub wake_wait: Duration,
    pub max_header_bytes: usize,
    pub max_h2_streams: u32,
    /// An upgraded connection (WebSocket) with no bytes either way for
    /// this long is closed (HMR sockets ping far more often).
    pub upgrade_idle_timeout: Duration,
    /// HTTP API calls per token per minute.
    pub api_per_minute: u32,
    /// After a wake, how long a project with a `.kennel/start` may take
    /// for its app to listen: browsers see the starting page meanwhile,
    /// scripts wait.
    pub app_start_wait: Duration,
}

impl Default for HttpsSettings {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            max_connections_per_ip: 256,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(15),
            wake_wait: Duration::from_secs(120),
            max_header_bytes: 64 * 1024,
            max_h2_streams: 128,
            upgrade_idle_timeout: Duration::from_secs(3600),
            api_per_minute: 120,
            app_start_wait: Duration::from_secs(120),
        }
    }
}

/// Who asks to enter a project, how (the project is the outer key: looked
/// up by reference, with no copy of its name per request).
type DecisionKey = (Option<kennel_core::model::UserId>, Entry);
/// Decisions per project.
type Decisions = HashMap<ProjectName, HashMap<DecisionKey, Cached<Option<Decided>>>>;
/// A session cookie's value and the host it was sent to.
type SessionKey = (String, String);
/// The project (may be entered) and where its app answers, if running.
type Decided = Arc<(kennel_core::model::Project, Option<kennel_core::VmReach>)>;

/// The most an upstream connection's read buffer grows to: for an
/// HTTP/1.1 client's one connection, 256 KiB (fewer reads of a large body:
/// bench/https.sh measured 4.2 s of CPU per 10k 1 MiB answers against 5.9
/// s at 64 KiB)...
pub(crate) const UPSTREAM_BUF: usize = 256 * 1024;
/// ...and for each of an HTTP/2 client's streams, 64 KiB: 128 streams of
/// large answers at once held 132 MB at 256 KiB, 42 MB at 64 KiB (the
/// same requests per second).
pub(crate) const UPSTREAM_STREAM_BUF: usize = 64 * 1024;

/// A cached answer and the store's change count it was read at.
#[derive(Debug, Clone)]
struct Cached<T> {
    changes: u64,
    at: Instant,
    value: T,
}

/// How long a cached decision is trusted at most (a session's expiry is
/// not a change to the store).
const CACHE_FOR: Duration = Duration::from_secs(10);
/// Entries a cache holds at most before it starts over.
const CACHE_MAX: usize = 10_000;

fn cached<K: std::hash::Hash + Eq, T: Clone>(
    m: &Mutex<HashMap<K, Cached<T>>>,
    k: &K,
    changes: u64,
) -> Option<T> {
    m.lock().ok()?.get(k)?.fresh(changes)
}

impl<T: Clone> Cached<T> {
    /// The value, if the store has not changed since and it is recent.
    fn fresh(&self, changes: u64) -> Option<T> {
        (self.changes == changes && self.at.elapsed() < CACHE_FOR).then(|| self.value.clone())
    }
}

fn remember<K: std::hash::Hash + Eq, T>(
    m: &Mutex<HashMap<K, Cached<T>>>,
    k: K,
    changes: u64,
    value: T,
) {
    if let Ok(mut m) = m.lock() {
        if m.len() >= CACHE_MAX {
            m.clear();
        }
        m.insert(
            k,
            Cached {
                changes,
                at: Instant::now(),
                value,
            },
        );
    }
}

/// Shared by every connection.
struct Inner {
    gate: Gate,
    s: HttpsSettings,
    domain: String,
    https_port: u16,
    conns: Mutex<HashMap<IpAddr, usize>>,
    /// Entry decisions (with the route), and sessions: kept while the
    /// store has not changed, and for at most [`CACHE_FOR`], so most
    /// requests cost no round trip to the store.
    decisions: Mutex<Decisions>,
    sessions: Mutex<HashMap<SessionKey, Cached<Option<User>>>>,
    /// Custom domains: the project each host serves (or none).
    domains: Mutex<HashMap<String, Cached<Option<ProjectName>>>>,
    /// Projects being woken by a browser's visit.
    waking: Arc<Mutex<HashSet<ProjectName>>>,
    /// Projects woken lately, and when: their apps may still be starting.
    woken: Arc<Mutex<HashMap<ProjectName, Instant>>>,
    /// Connections into VMs through their sshd, for other ports.
    links: Arc<crate::vmlink::VmLinks>,
    /// Nonces of SSH-signed API requests seen lately, and when.
    nonces: Mutex<HashMap<String, i64>>,
    /// API calls per (user, token label) in the current minute.
    api_calls: Mutex<HashMap<(kennel_core::model::UserId, String), api::Window>>,
}

/// The HTTPS gateway.
#[derive(Clone)]
pub struct HttpsGateway {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HttpsGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsGateway")
            .field("domain", &self.inner.domain)
            .finish_non_exhaustive()
    }
}

/// A task that ends when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts a connection against its address while it lives.
struct ConnSlot {
    inner: Arc<Inner>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Ok(mut c) = self.inner.conns.lock() {
            if let Some(n) = c.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.remove(&self.ip);
                }
            }
        }
    }
}

impl HttpsGateway {
    /// A gateway for `gate`'s projects, on the domain and port of its settings.
    pub fn new(gate: &Gate, s: HttpsSettings) -> Self {
        Self::with_links(gate, s, crate::vmlink::VmLinks::new(gate.clone()))
    }

    /// A gateway that reaches VMs' other ports through `links` (shared
    /// with the SSH gateway: one connection per VM for both).
    pub fn with_links(gate: &Gate, s: HttpsSettings, links: Arc<crate::vmlink::VmLinks>) -> Self {
        let settings = gate.settings();
        Self {
            inner: Arc::new(Inner {
                gate: gate.clone(),
                domain: settings.domain.to_ascii_lowercase(),
                https_port: settings.https_port,
                s,
                conns: Mutex::new(HashMap::new()),
                waking: Arc::default(),
                woken: Arc::default(),
                decisions: Mutex::new(HashMap::new()),
                sessions: Mutex::new(HashMap::new()),
                domains: Mutex::new(HashMap::new()),
                links,
                api_calls: Mutex::new(HashMap::new()),
                nonces: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Serves on `listener` with `tls` until `shutdown` completes.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        tls: impl Into<tls::GatewayTls>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        let tls: tls::GatewayTls = tls.into();
        // Renewals run while the gateway does, and end with it.
        let _renewals = tls.acme.clone().map(|acme| {
            let gate = self.inner.clone();
            AbortOnDrop(tokio::spawn(acme.maintain(move |name| {
                let gate = gate.clone();
                async move { gate.may_certify(&name).await }
            })))
        });
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown => return Ok(()),
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, go on.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(slot) = self.admit(peer.ip()) else {
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (inner, tls) = (self.inner.clone(), tls.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let tls = match tokio::time::timeout(
                    inner.s.handshake_timeout,
                    inner.handshake(&tls, tcp),
                )
                .await
                {
                    Ok(Ok(Some(t))) => t,
                    Ok(Ok(None)) => return,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                inner.serve(TokioIo::new(tls), peer, h2).await;
            });
        }
    }

    fn admit(&self, ip: IpAddr) -> Option<ConnSlot> {
        let mut c = self.inner.conns.lock().ok()?;
        let n = c.entry(ip).or_default();
        if *n >= self.inner.s.max_connections_per_ip {
            tracing::warn!(%ip, "too many HTTPS connections from one address; refusing");
            return None;
        }
        *n += 1;
        Some(ConnSlot {
            inner: self.inner.clone(),
            ip,
        })
    }
}

impl Inner {
    /// The TLS handshake. With ACME, the client's hello is read first: a
    /// CA's TLS-ALPN-01 validation gets its challenge certificate (and no
    /// HTTP), and a name Kennel serves but holds no certificate for yet is
    /// certified before the handshake goes on. `None`: a validation,
    /// answered.
    async fn handshake(
        &self,
        tls: &tls::GatewayTls,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
        let Some(acme) = &tls.acme else {
            return tokio_rustls::TlsAcceptor::from(tls.config.clone())
                .accept(tcp)
                .await
                .map(Some);
        };
        let start =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        let hello = start.client_hello();
        let validation = hello
            .alpn()
            .is_some_and(|mut a| a.any(|p| p == acme::ACME_TLS_ALPN));
        if validation {
            // The CA closes the connection once it has seen the certificate.
            let _ = start.into_stream(acme.challenge_config()).await;
            return Ok(None);
        }
        let name = hello.server_name().map(str::to_ascii_lowercase);
        if let Some(name) = name.filter(|n| acme.needs(n)) {
            if self.may_certify(&name).await {
                // Its own task: the order finishes even if this client
                // goes away; the handshake waits for it within its timeout.
                let (acme, n) = (acme.clone(), name.clone());
                let order = tokio::spawn(async move { acme.obtain(&n).await });
                let _ = order.await;
            }
        }
        start.into_stream(tls.config.clone()).await.map(Some)
    }

    /// What a host name is: Kennel's, a project's under the domain, or a
    /// project's approved custom domain (its app); else nothing served.
    async fn site_of(&self, host: &str) -> Site {
        match route::classify(host, &self.domain) {
            Site::Unknown => match self.custom_project(host).await {
                Some(name) => Site::Project { name, port: None },
                None => Site::Unknown,
            },
            site => site,
        }
    }

    /// The project an approved custom domain serves.
    async fn custom_project(&self, host: &str) -> Option<ProjectName> {
        let changes = self.gate.changes();
        let key = host.to_owned();
        if let Some(p) = cached(&self.domains, &key, changes) {
            return p;
        }
        match Box::pin(self.gate.custom_domain(host)).await {
            Ok(p) => {
                remember(&self.domains, key, changes, p.clone());
                p
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read custom domains");
                None
            }
        }
    }

    /// Whether Kennel would serve `name`: its own host, a project's
    /// (another port too) that is in the store, or an approved custom
    /// domain. Only such names are sent to the ACME CA.
    async fn may_certify(&self, name: &str) -> bool {
        match self.site_of(name).await {
            Site::Kennel => true,
            Site::Project { name, .. } => self.gate.project_exists(&name).await.unwrap_or(false),
            Site::Unknown => false,
        }
    }

    async fn serve<I>(self: Arc<Self>, io: I, peer: SocketAddr, h2: bool)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.s.header_timeout)
            .max_buf_size(self.s.max_header_bytes.max(8192))
            .keep_alive(true);
        b.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.s.max_h2_streams)
            // Per stream: with 128 streams of large responses, hyper's
            // default (400 KiB each) costs tens of MiB per connection.
            .max_send_buf_size(64 * 1024)
            .max_header_list_size(u32::try_from(self.s.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        let me = self.clone();
        // The connection keeps its own connections to the app (no pool
        // shared by every client on the way of each request): HTTP/1.1's
        // requests come one at a time, over one; HTTP/2's streams get one
        // each.
        let own = if h2 {
            proxy::Own::Many(Default::default())
        } else {
            proxy::Own::One(Default::default())
        };
        let svc = hyper::service::service_fn(move |req| {
            let (me, own) = (me.clone(), own.clone());
            async move { Ok::<_, Infallible>(me.handle(req, peer, &own).await) }
        });
        metrics::counter!("kennel_https_connections_total").increment(1);
        metrics::gauge!("kennel_https_connections_open").increment(1.0);
        let served = b.serve_connection_with_upgrades(io, svc).await;
        metrics::gauge!("kennel_https_connections_open").decrement(1.0);
        if let Err(e) = served {
            tracing::debug!(%peer, error = %e, "HTTPS connection ended with an error");
        }
    }

    /// One request: which site, then that site's answer; one access-log
    /// line each.
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        own: &proxy::Own,
    ) -> Response<Body> {
        let started = Instant::now();
        // The URI is shared bytes: kept for the log line at no copy.
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let host = route::host_of(&req);
        let site = match host.as_deref() {
            None => Site::Unknown,
            Some(h) => self.site_of(h).await,
        };
        let (site_kind, project): (_, &(dyn std::fmt::Display + Sync)) = match &site {
            Site::Kennel => ("kennel", &"-"),
            Site::Project { name, .. } => ("project", name),
            _ => ("unknown", &"-"),
        };
        let span = tracing::info_span!("https", project = %project, peer = %peer.ip(), user = tracing::field::Empty);
        let resp = tracing::Instrument::instrument(
            async {
                match (site, host) {
                    // Boxed: Kennel's own pages, the API and the rarer
                    // paths below make large futures, which would
                    // otherwise be copied with every app request's.
                    (Site::Kennel, _) => Box::pin(self.kennel_site(req, peer)).await,
                    (Site::Project { name, port }, Some(host)) => {
                        self.project_site(req, peer, &host, name, port, own).await
                    }
                    _ => self.not_open(&req, None),
                }
            },
            span.clone(),
        )
        .await;
        let took = started.elapsed();
        metrics::counter!(
            "kennel_https_requests_total",
            "site" => site_kind,
            "code" => code_label(resp.status()),
        )
        .increment(1);
        metrics::histogram!("kennel_https_request_seconds", "site" => site_kind)
            .record(took.as_secs_f64());
        span.in_scope(|| {
            let bytes = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info!(
                %method,
                path = %kennel_core::redact::excerpt(uri.path()),
                status = resp.status().as_u16(),
                bytes = %bytes,
                ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                "request"
            );
        });
        resp
    }

    /// The session cookie's value, if the request carries one.
    fn cookie<B>(req: &Request<B>) -> Option<String> {
        cookie_named(req, COOKIE)
    }

    /// Whether a person with a browser asked (else: a script, an API
    /// client), which decides between pages and redirects or plain codes.
    fn browser<B>(req: &Request<B>) -> bool {
        let accept = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        !req.headers().contains_key(header::AUTHORIZATION) && accept.contains("text/html")
    }

    /// The user a session cookie signs in on `host`.
    async fn session_user<B>(&self, req: &Request<B>, host: &str) -> Option<User> {
        let token = Self::cookie(req)?;
        // Read before the lookup: a change meanwhile makes the entry stale.
        let changes = self.gate.changes();
        let key = (token, host.to_owned());
        if let Some(u) = cached(&self.sessions, &key, changes) {
            return u;
        }
        match Box::pin(self.gate.session_user(&key.0, host)).await {
            Ok(u) => {
                remember(&self.sessions, key, changes, u.clone());
                u
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read sessions; treating the visitor as signed out");
                None
            }
        }
    }

    /// The link session cookie's value, if the request carries one.
    fn link_cookie<B>(req: &Request<B>) -> Option<String> {
        cookie_named(req, LINK_COOKIE)
    }

    /// Whom a share link's session lets in here, with where its app
    /// answers.
    async fn link_entry<B>(
        &self,
        req: &Request<B>,
        name: &ProjectName,
        port: Option<u16>,
    ) -> Option<(kennel_core::model::LinkVisitor, Decided)> {
        let session = Self::link_cookie(req)?;
        match self.gate.link_entry(&session, name, port).await {
            Ok(Some((v, p))) => {
                let reach = self.gate.reach(&p.name).await.ok()?;
                Some((v, Arc::new((p, reach))))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot read link sessions; treating the visitor as signed out");
                None
            }
        }
    }

    /// Whether `user` may enter `name` by `entry` (core's decision), and
    /// where its app answers; `None` when not.
    async fn decide(
        &self,
        user: Option<&User>,
        name: &ProjectName,
        entry: Entry,
    ) -> Option<Decided> {
        let changes = self.gate.changes();
        let key = (user.map(|u| u.id), entry);
        let known = self
            .decisions
            .lock()
            .ok()
            .and_then(|m| m.get(name)?.get(&key)?.fresh(changes));
        if let Some(d) = known {
            return d;
        }
        let decided = match Box::pin(self.gate.may_enter(user, name, entry)).await {
            Ok(p) => match Box::pin(self.gate.reach(&p.name)).await {
                Ok(r) => Some(Arc::new((p, r))),
                Err(_) => return None,
            },
            Err(kennel_core::CommandError::Store(_)) => return None,
            Err(_) => None,
        };
        if let Ok(mut m) = self.decisions.lock() {
            if m.values().map(HashMap::len).sum::<usize>() >= CACHE_MAX {
                m.clear();
            }
            m.entry(name.clone()).or_default().insert(
                key,
                Cached {
                    changes,
                    at: Instant::now(),
                    value: decided.clone(),
                },
            );
        }
        decided
    }

    /// The answer for a site the visitor may not open, or that does not
    /// exist: the same either way, so names cannot be probed.
    fn not_open<B>(&self, req: &Request<B>, user: Option<&User>) -> Response<Body> {
        if let Some(u) = user {
            return page::html(
                StatusCode::FORBIDDEN,
                "Not open to you",
                &format!(
                    "<p>You are signed in as <b>{}</b>, and this site is not open to you, or does not exist. Its owner can share it with you: <code>share NAME {} --web</code>.</p>",
                    page::esc(u.name.as_str()),
                    page::esc(u.name.as_str())
                ),
            );
        }
        if Self::browser(req) {
            let host = route::host_of(req).unwrap_or_default();
            let to = req
                .uri()
                .path_and_query()
                .map_or("/", http::uri::PathAndQuery::as_str);
            let to = if route::safe_path(to) { to } else { "/" };
            return page::redirect(
                StatusCode::FOUND,
                &format!(
                    "{}/auth?host={}&to={}",
                    self.gate.kennel_url(),
                    pct(&host),
                    pct(to)
                ),
            );
        }
        let mut r = page::status(
            StatusCode::UNAUTHORIZED,
            "This site is private, or does not exist. Sign in: ask the Kennel bot 'login' (or run 'ssh HOST login') and open the link.",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Cookie realm=\"kennel\""),
        );
        r
    }

    /// A project's site: Kennel's reserved paths, the entry decision,
    /// waking a stopped VM, then the app.
    async fn project_site(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        host: &str,
        name: ProjectName,
        port: Option<u16>,
        own: &proxy::Own,
    ) -> Response<Body> {
        if req.uri().path().starts_with("/__kennel/") {
            return Box::pin(self.project_kennel_path(req, host, &name, port)).await;
        }
        let user = self.session_user(&req, host).await;
        if let Some(u) = &user {
            tracing::Span::current().record("user", u.name.as_str());
        }
        let entry = if port.is_some() {
            Entry::WebOtherPort
        } else {
            Entry::Web
        };
        let decided = match self.decide(user.as_ref(), &name, entry).await {
            Some(d) => d,
            // A share link's visitor: this project and port only, while
            // the link lives (checked on every request, never cached).
            None => match Box::pin(self.link_entry(&req, &name, port)).await {
                Some((visitor, d)) => {
                    tracing::Span::current()
                        .record("user", format!("link:{}", visitor.link_id).as_str());
                    if Self::browser(&req) {
                        Box::pin(self.gate.link_visited(&visitor, req.uri().path())).await;
                    }
                    d
                }
                None => return self.not_open(&req, user.as_ref()),
            },
        };
        let (project, reach) = (&decided.0, &decided.1);
        // In use until the answer has been sent (idle stop); taken before
        // a wake, so an idle stop under way cannot race it.
        let here = self.gate.presence(&project.name);
        let fwd = Forwarded {
            peer: peer.ip(),
            host,
            user: user.as_ref().map(|u| u.name.as_str()),
        };
        if let Some(port) = port {
            if reach.is_none() {
                if let Err(resp) =
                    Box::pin(self.reach_or_wake(&req, &project.name, user.as_ref())).await
                {
                    return resp;
                }
            }
            return Box::pin(self.forward_tunnel(req, &project.name, port, &fwd, here)).await;
        }
        let woken;
        let addr = match reach {
            Some(r) => r.app_addr.as_str(),
            None => match Box::pin(self.reach_or_wake(&req, &project.name, user.as_ref())).await {
                Ok(r) => {
                    woken = r.app_addr;
                    woken.as_str()
                }
                Err(resp) => return resp,
            },
        };
        if self.just_woken(&project.name) {
            if let Some(wait) = Box::pin(self.app_starting(&req, project)).await {
                return wait;
            }
        }
        match own {
            proxy::Own::One(own) => {
                self.forward_own(req, own, addr, project.app_port, &fwd, here)
                    .await
            }
            proxy::Own::Many(own) => {
                self.forward_many(req, own, addr, project.app_port, &fwd, here)
                    .await
            }
        }
    }

    /// Where the app answers; a stopped VM is woken first: browsers get a
    /// page that reloads itself, scripts wait (bounded), then 503.
    async fn reach_or_wake<B>(
        &self,
        req: &Request<B>,
        name: &ProjectName,
        user: Option<&User>,
    ) -> Result<kennel_core::VmReach, Response<Body>> {
        match self.gate.reach(name).await {
            Ok(Some(r)) => return Ok(r),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot read routes");
                return Err(page::status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Kennel cannot read its database; an operator should check the server log.",
                ));
            }
        }
        let actor = match user {
            Some(u) => Actor::User {
                identity: site::web_identity(u),
                user: u.clone(),
            },
            None => Actor::System {
                why: "a visitor opened its public web app",
            },
        };
        let starting =
            |secs: u64| Self::starting(req, name, secs, "was stopped and is starting now");
        if Self::browser(req) {
            self.wake_in_background(name, actor);
            return Err(starting(2));
        }
        let woke =
            tokio::time::timeout(self.s.wake_wait, self.gate.wake(&actor, name, &NoProgress)).await;
        match woke {
            Ok(Ok(w)) => match self.gate.reach(name).await {
                Ok(Some(r)) => {
                    if matches!(w, kennel_core::Woke::Started(_)) {
                        note_woken(&self.woken, name);
                    }
                    Ok(r)
                }
                _ => Err(starting(5)),
            },
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not wake the VM");
                Err(page::status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("{name} could not be started: {e}"),
                ))
            }
            Err(_) => Err(starting(5)),
        }
    }

    /// Right after a wake, a project's `.kennel/start` may still be
    /// starting its app: until the app port answers in the VM (asked
    /// through the VM's sshd, which says "refused" truly, where a user-mode
    /// port forward would accept anyway), browsers get the starting page
    /// again and scripts wait, for up to `app_start_wait` from the wake.
    /// Projects without a start script, and apps that are up, go on at once.
    /// Whether `name` was woken lately (its app may be starting).
    fn just_woken(&self, name: &ProjectName) -> bool {
        self.woken.lock().is_ok_and(|w| w.contains_key(name))
    }

    async fn app_starting<B>(&self, req: &Request<B>, p: &Project) -> Option<Response<Body>> {
        let since = self.woken.lock().ok()?.get(&p.name).copied()?;
        let forget = || {
            if let Ok(mut w) = self.woken.lock() {
                w.remove(&p.name);
            }
        };
        if !self.gate.starts_app_on_boot(p) {
            forget();
            return None;
        }
        let deadline = since + self.s.app_start_wait;
        loop {
            if self.links.open_tcp(&p.name, p.app_port).await.is_ok() {
                forget();
                return None;
            }
            if Instant::now() >= deadline {
                forget();
                return None;
            }
            if Self::browser(req) {
                return Some(Self::starting(
                    req,
                    &p.name,
                    2,
                    "is up; its app is starting",
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// 503 with `Retry-After: secs` while `name` starts: for browsers a
    /// page that reloads itself ("The VM of NAME {what}"), for scripts
    /// one line.
    fn starting<B>(req: &Request<B>, name: &ProjectName, secs: u64, what: &str) -> Response<Body> {
        let mut r = if Self::browser(req) {
            page::html(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("Starting {name}…"),
                &format!(
                    "<meta http-equiv=\"refresh\" content=\"{secs}\"><p>The VM of <b>{}</b> {what}. This page reloads by itself.</p>",
                    page::esc(name.as_str())
                ),
            )
        } else {
            page::status(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("{name} is starting; try again shortly"),
            )
        };
        if let Ok(v) = http::HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }

    fn wake_in_background(&self, name: &ProjectName, actor: Actor) {
        let fresh = self.waking.lock().is_ok_and(|mut w| w.insert(name.clone()));
        if !fresh {
            return;
        }
        let (gate, name, waking) = (self.gate.clone(), name.clone(), self.waking.clone());
        let woken = self.woken.clone();
        tokio::spawn(async move {
            match gate.wake(&actor, &name, &NoProgress).await {
                Ok(kennel_core::Woke::Started(_)) => note_woken(&woken, &name),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(project = %name, error = %e, "could not wake the VM for a visit")
                }
            }
            if let Ok(mut w) = waking.lock() {
                w.remove(&name);
            }
        });
    }
}

/// Remembers that `name` was just woken (its app may still be starting).
/// The value of cookie `name`, if the request carries it.
fn cookie_named<B>(req: &Request<B>, name: &str) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_owned())
}

fn note_woken(woken: &Mutex<HashMap<ProjectName, Instant>>, name: &ProjectName) {
    if let Ok(mut w) = woken.lock() {
        let now = Instant::now();
        w.retain(|_, at| now.saturating_duration_since(*at) < Duration::from_secs(300));
        w.insert(name.clone(), now);
    }
}

/// A status code as a metrics label: the common ones without a copy.
fn code_label(status: StatusCode) -> metrics::SharedString {
    let common = match status.as_u16() {
        200 => "200",
        204 => "204",
        206 => "206",
        301 => "301",
        302 => "302",
        303 => "303",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        500 => "500",
        502 => "502",
        503 => "503",
        _ => return metrics::SharedString::from(status.as_str().to_owned()),
    };
    metrics::SharedString::const_str(common)
}

/// Percent-encodes a query value.
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
