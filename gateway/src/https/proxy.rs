//! Forwarding to a VM's app: the upstream request rebuilt from parsed
//! parts, hop-by-hop headers dropped, identity headers set by Kennel only,
//! Kennel's cookies kept from the app, bodies streamed both ways, and
//! upgrades (WebSocket) spliced.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use kennel_core::Presence;

use super::{page, Body, Inner, COOKIE};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_KENNEL_USER: HeaderName = HeaderName::from_static("x-kennel-user");

/// A new HTTP/1.1 connection to the app at `addr`, driven by a task of
/// its own (upgrades included).
async fn connect_app(addr: &str, buf: usize) -> Result<SendRequest, String> {
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| "connecting timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    http1_over(tcp, buf).await
}

/// An HTTP/1.1 client connection over `io` (TCP, or a channel through the
/// VM's sshd), driven by a task of its own, upgrades included.
async fn http1_over<I>(io: I, buf: usize) -> Result<SendRequest, String>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(buf)
        .handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(send)
}

/// A stream that notes when bytes last went through it (milliseconds
/// since `start`, shared by both sides of a spliced upgrade).
struct Watched<S> {
    inner: S,
    seen: Arc<AtomicU64>,
    start: std::time::Instant,
}

impl<S> Watched<S> {
    fn new(inner: S, seen: &Arc<AtomicU64>, start: std::time::Instant) -> Self {
        Self {
            inner,
            seen: seen.clone(),
            start,
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.seen.store(ms, Ordering::Relaxed);
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Who the request is for, as the app is told.
#[derive(Debug, Clone)]
pub struct Forwarded<'a> {
    pub peer: IpAddr,
    /// The host name the visitor used.
    pub host: &'a str,
    pub user: Option<&'a str>,
}

/// Whether a header describes one hop only, never forwarded (RFC 9110
/// 7.6.1).
fn hop_by_hop(k: &HeaderName) -> bool {
    matches!(
        k.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Removes hop-by-hop headers and those `Connection` names.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most requests and answers carry none: one look at the few names
    // present instead of nine lookups.
    if !h.keys().any(hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    let hops: Vec<HeaderName> = h.keys().filter(|k| hop_by_hop(k)).cloned().collect();
    for n in hops {
        h.remove(n);
    }
}

/// Whether the request asks to switch protocols (WebSocket over HTTP/1.1).
fn upgrade_of<B>(req: &Request<B>) -> Option<HeaderValue> {
    let wants = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    wants
        .then(|| req.headers().get(header::UPGRADE).cloned())
        .flatten()
}

/// The `Cookie` header without Kennel's own cookies.
fn without_kennel_cookies(h: &mut HeaderMap) {
    if !h.contains_key(header::COOKIE) {
        return;
    }
    let kept: Vec<String> = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.starts_with(COOKIE))
        .map(str::to_owned)
        .collect();
    h.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            h.insert(header::COOKIE, v);
        }
    }
}

/// The request for the app, and the client's side of an upgrade it asks for.
type Upstream = (Request<Incoming>, Option<hyper::upgrade::OnUpgrade>);

/// An HTTP/1.1 client connection's own connection to its app: the app's
/// address and port, and the sender, while it stays usable.
pub(super) type OwnUpstream = Arc<tokio::sync::Mutex<Option<(String, u16, SendRequest)>>>;
type SendRequest = hyper::client::conn::http1::SendRequest<Incoming>;

/// An HTTP/2 client connection's own connections to its app: one per
/// stream in flight, kept for the streams after it. No pool shared by
/// every client on the way of each request; all close with the client's
/// connection.
pub(super) type OwnUpstreams = Arc<std::sync::Mutex<Vec<(String, u16, SendRequest)>>>;

/// Where a client connection's requests go to the app.
#[derive(Clone)]
pub(super) enum Own {
    /// HTTP/1.1: one request at a time, one connection.
    One(OwnUpstream),
    /// HTTP/2: concurrent streams, a connection each.
    Many(OwnUpstreams),
}

impl Inner {
    /// Forwards `req` to the app at `addr` on the client connection's own
    /// connection to it (made, or made again when the app moved or the
    /// connection closed).
    pub(super) async fn forward_own(
        &self,
        req: Request<Incoming>,
        own: &OwnUpstream,
        addr: &str,
        port: u16,
        fwd: &Forwarded<'_>,
        here: Presence,
    ) -> Response<Body> {
        let (up, client_upgrade) = match self.upstream_request(req, fwd) {
            Ok(u) => u,
            Err(resp) => return resp,
        };
        let mut slot = own.lock().await;
        let mut reuse = false;
        if let Some((a, p, send)) = slot.as_mut() {
            if a == addr && *p == port {
                // Ready once the last response's end has been read: most
                // often already (no timer armed then).
                reuse = send.is_ready() || {
                    let ready =
                        tokio::time::timeout(std::time::Duration::from_secs(1), send.ready());
                    matches!(ready.await, Ok(Ok(())))
                };
            }
        }
        if !reuse {
            *slot = None;
            match Box::pin(connect_app(addr, super::UPSTREAM_BUF)).await {
                Ok(s) => *slot = Some((addr.to_owned(), port, s)),
                Err(e) => return self.relay(Err(e), None, addr, here),
            }
        }
        let resp = match slot.as_mut() {
            Some((_, _, send)) => send.send_request(up).await.map_err(|e| e.to_string()),
            None => Err("no connection".to_owned()),
        };
        if resp.is_err() {
            *slot = None;
        }
        drop(slot);
        self.relay(resp, client_upgrade, addr, here)
    }

    /// Forwards `req` (an HTTP/2 stream) to the app at `addr` on one of
    /// the client connection's idle connections to it, or a new one; kept
    /// afterwards (up to one per stream the client may open at once).
    pub(super) async fn forward_many(
        &self,
        req: Request<Incoming>,
        own: &OwnUpstreams,
        addr: &str,
        port: u16,
        fwd: &Forwarded<'_>,
        here: Presence,
    ) -> Response<Body> {
        let (up, client_upgrade) = match self.upstream_request(req, fwd) {
            Ok(u) => u,
            Err(resp) => return resp,
        };
        let idle = own.lock().ok().and_then(|mut conns| {
            // Those to where the app was (it moved), and closed ones, go.
            conns.retain(|(a, p, send)| a == addr && *p == port && !send.is_closed());
            let i = conns.iter().position(|(_, _, send)| send.is_ready())?;
            Some(conns.swap_remove(i).2)
        });
        let mut send = match idle {
            Some(send) => send,
            None => match Box::pin(connect_app(addr, super::UPSTREAM_STREAM_BUF)).await {
                Ok(send) => send,
                Err(e) => return self.relay(Err(e), None, addr, here),
            },
        };
        let resp = send.send_request(up).await.map_err(|e| e.to_string());
        if resp.is_ok() {
            // Busy until this answer's body has been read; then ready for
            // another stream.
            if let Ok(mut conns) = own.lock() {
                if conns.len() < self.s.max_h2_streams as usize {
                    conns.push((addr.to_owned(), port, send));
                }
            }
        }
        self.relay(resp, client_upgrade, addr, here)
    }

    /// Forwards `req` to `port` on the VM's own loopback, through its
    /// sshd (another port of a project: `NAME--PORT.DOMAIN`). One
    /// connection per request: these are for a developer's other servers,
    /// not for load.
    pub(super) async fn forward_tunnel(
        &self,
        req: Request<Incoming>,
        name: &kennel_core::names::ProjectName,
        port: u16,
        fwd: &Forwarded<'_>,
        here: Presence,
    ) -> Response<Body> {
        let (up, client_upgrade) = match self.upstream_request(req, fwd) {
            Ok(u) => u,
            Err(resp) => return resp,
        };
        let what = format!("port {port} in {name}");
        let resp = async {
            let stream = self
                .links
                .open_tcp(name, port)
                .await
                .map_err(|e| e.to_string())?;
            let mut send = http1_over(stream, super::UPSTREAM_BUF).await?;
            send.send_request(up).await.map_err(|e| e.to_string())
        }
        .await;
        self.relay(resp, client_upgrade, &what, here)
    }

    /// The upstream request, rebuilt from the parsed parts of `req`, in
    /// origin form.
    // The error is the answer to send, made once per refused request.
    #[allow(clippy::result_large_err)]
    fn upstream_request(
        &self,
        mut req: Request<Incoming>,
        fwd: &Forwarded<'_>,
    ) -> Result<Upstream, Response<Body>> {
        let upgrade = upgrade_of(&req);
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        // HTTP/1.1's requests are in origin form already: kept as they
        // are; HTTP/2's lose their scheme and authority.
        let uri = if parts.uri.scheme().is_none() && parts.uri.authority().is_none() {
            Some(parts.uri)
        } else {
            let mut p = http::uri::Parts::default();
            p.path_and_query = Some(
                parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            );
            http::Uri::from_parts(p).ok()
        };
        let Some(uri) = uri else {
            return Err(page::status(
                StatusCode::BAD_REQUEST,
                "That address is not valid.",
            ));
        };
        let mut h = parts.headers;
        strip_hop_by_hop(&mut h);
        without_kennel_cookies(&mut h);
        // Only Kennel says who the visitor is.
        // (An empty list allocates nothing.)
        let kennel: Vec<HeaderName> = h
            .keys()
            .filter(|k| k.as_str().starts_with("x-kennel-"))
            .cloned()
            .collect();
        for k in kennel {
            h.remove(k);
        }
        let trusted = self.s.trusted_proxies.contains(&fwd.peer);
        let xff = match (
            trusted,
            h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()),
        ) {
            (true, Some(prev)) => format!("{prev}, {}", fwd.peer),
            _ => fwd.peer.to_string(),
        };
        if !trusted {
            h.remove(&X_FORWARDED_PROTO);
            h.remove(&X_FORWARDED_HOST);
            h.remove(header::FORWARDED);
        }
        let set = |h: &mut HeaderMap, k: HeaderName, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(k, v);
            }
        };
        set(&mut h, X_FORWARDED_FOR, &xff);
        if !trusted || !h.contains_key(&X_FORWARDED_PROTO) {
            h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        }
        if !trusted || !h.contains_key(&X_FORWARDED_HOST) {
            set(&mut h, X_FORWARDED_HOST, fwd.host);
        }
        // The app sees the name the visitor used (HTTP/2 has no Host).
        if self.https_port == 443 {
            set(&mut h, header::HOST, fwd.host);
        } else {
            set(
                &mut h,
                header::HOST,
                &format!("{}:{}", fwd.host, self.https_port),
            );
        }
        if let Some(user) = fwd.user {
            set(&mut h, X_KENNEL_USER, user);
        }
        if let Some(u) = &upgrade {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, u.clone());
        }
        let mut up = Request::builder()
            .method(parts.method)
            .uri(uri)
            .version(http::Version::HTTP_11);
        if let Some(hm) = up.headers_mut() {
            *hm = h;
        }
        let Ok(up) = up.body(body) else {
            return Err(page::status(
                StatusCode::BAD_REQUEST,
                "That request cannot be forwarded.",
            ));
        };
        Ok((up, client_upgrade))
    }

    /// The app's answer for the client: its headers cleaned, its body
    /// streamed, an upgrade spliced. `here` is held until the body has
    /// been sent or the upgraded connection closes: the project is in use
    /// that long (idle stop).
    fn relay(
        &self,
        resp: Result<Response<Incoming>, String>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        what: &str,
        here: Presence,
    ) -> Response<Body> {
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(app = %what, error = %e, "the app did not answer");
                return page::status(
                    StatusCode::BAD_GATEWAY,
                    "The app in this project is not answering on its port. Is its server running (and listening on 0.0.0.0)? 'port NAME PORT' changes the port Kennel forwards to.",
                );
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let headers = resp.headers().clone();
                let app_upgrade = hyper::upgrade::on(resp);
                let idle = self.s.upgrade_idle_timeout;
                tokio::spawn(async move {
                    let _here = here;
                    let (Ok(client), Ok(app)) = tokio::join!(client_upgrade, app_upgrade) else {
                        return;
                    };
                    let seen = Arc::new(AtomicU64::new(0));
                    let start = std::time::Instant::now();
                    let mut client =
                        Watched::new(hyper_util::rt::TokioIo::new(client), &seen, start);
                    let mut app = Watched::new(hyper_util::rt::TokioIo::new(app), &seen, start);
                    let copy = tokio::io::copy_bidirectional(&mut client, &mut app);
                    tokio::pin!(copy);
                    // Closed when neither side has sent a byte for `idle`.
                    let tick = (idle / 4).max(std::time::Duration::from_millis(100));
                    loop {
                        tokio::select! {
                            _ = &mut copy => return,
                            () = tokio::time::sleep(tick) => {
                                let last = std::time::Duration::from_millis(seen.load(Ordering::Relaxed));
                                if start.elapsed().saturating_sub(last) >= idle {
                                    tracing::debug!("closing an idle upgraded connection");
                                    return;
                                }
                            }
                        }
                    }
                });
                let mut out = Response::new(page::empty());
                *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                *out.headers_mut() = headers;
                return out;
            }
        }
        let (mut rparts, rbody) = resp.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        // The app may not set (or clear) Kennel's session cookie.
        let kennels =
            |v: &HeaderValue| v.to_str().is_ok_and(|s| s.trim_start().starts_with(COOKIE));
        if rparts
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .any(kennels)
        {
            let cookies: Vec<HeaderValue> = rparts
                .headers
                .get_all(header::SET_COOKIE)
                .iter()
                .filter(|v| !kennels(v))
                .cloned()
                .collect();
            rparts.headers.remove(header::SET_COOKIE);
            for c in cookies {
                rparts.headers.append(header::SET_COOKIE, c);
            }
        }
        use http_body_util::BodyExt;
        let body = rbody.map_frame(move |frame| {
            let _held = &here;
            frame
        });
        Response::from_parts(rparts, body.boxed())
    }
}
