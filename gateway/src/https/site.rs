//! Kennel's own host (`https://DOMAIN`): the sign-in confirm page, the
//! hand-over of a session to a project's host, sign-out (the dashboard is
//! `dash.rs`, the API `api.rs`). And the `/__kennel/` paths Kennel keeps
//! on every project host. A signed-in browser acts as
//! `Frontend::Web`, an API token as `Frontend::Http`.

use std::net::SocketAddr;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use kennel_core::model::{Frontend, Identity};
use kennel_core::policy::Entry;

use super::route::{self, Site};
use super::{page, Body, Inner, COOKIE};

/// A query parameter, percent-decoded.
fn query<B>(req: &Request<B>, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| decode(v))
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn session_cookie(token: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={}",
        kennel_core::web::SESSION_SECS
    ))
    .ok()
}

fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("__Host-kennel=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0")
}

const SIGN_IN_HOW: &str = "<p>To sign in, ask the Kennel bot <code>login</code> in a direct message (or run <code>ssh HOST login</code>) and open the link it gives you. Then come back here.</p>";

impl Inner {
    pub(super) async fn kennel_site(
        &self,
        req: Request<Incoming>,
        _peer: SocketAddr,
    ) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let host = self.domain.clone();
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/healthz") => page::status(StatusCode::OK, "ok"),
            (Method::GET, "/static/dash.js") => super::dash::script(),
            (Method::GET, "/static/dash.css") => super::dash::stylesheet(),
            (_, p) if p.starts_with("/api/") => self.api(req).await,
            (Method::GET, "/")
            | (Method::POST, "/do")
            | (Method::POST, "/run")
            | (Method::GET, "/events")
            | (Method::GET, "/logs")
            | (Method::GET, "/logtail") => match self.session_user(&req, &host).await {
                Some(u) => match self.dashboard_route(req, u).await {
                    Ok(r) => r,
                    Err(_) => page::status(StatusCode::NOT_FOUND, "Not here."),
                },
                None if path == "/" => page::html(StatusCode::OK, "Kennel", SIGN_IN_HOW),
                None => page::status(
                    StatusCode::UNAUTHORIZED,
                    "Sign in first: ask the Kennel bot 'login' and open the link.",
                ),
            },
            (Method::GET, p) if p.starts_with("/login/") => {
                let token = p.trim_start_matches("/login/");
                match self.gate.peek_login(token).await {
                    Ok(Some(u)) => page::html(
                        StatusCode::OK,
                        "Sign in to Kennel",
                        &format!(
                            "<p>Sign this browser in as <b>{}</b>?</p><form method=\"post\"><button>Sign in</button></form><p>If you did not ask for this link, close this page.</p>",
                            page::esc(u.name.as_str())
                        ),
                    ),
                    _ => used_up(),
                }
            }
            (Method::POST, p) if p.starts_with("/login/") => {
                if !self.same_origin(&req) {
                    return page::status(
                        StatusCode::FORBIDDEN,
                        "That form came from another site.",
                    );
                }
                let token = p.trim_start_matches("/login/");
                match self.gate.consume_login(token).await {
                    Ok(Some(s)) => {
                        self.gate
                            .record_login(&web_identity(&s.user), &s.user, &host, "web login")
                            .await;
                        let mut r = page::redirect(StatusCode::SEE_OTHER, "/");
                        if let Some(c) = session_cookie(&s.token) {
                            r.headers_mut().insert(header::SET_COOKIE, c);
                        }
                        r
                    }
                    Ok(None) => used_up(),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot sign in");
                        page::status(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "Kennel cannot sign you in right now.",
                        )
                    }
                }
            }
            (Method::GET, "/auth") => self.hand_over(&req).await,
            (Method::POST, "/logout") => {
                if !self.same_origin(&req) {
                    return page::status(
                        StatusCode::FORBIDDEN,
                        "That form came from another site.",
                    );
                }
                self.sign_out(&req, "/").await
            }
            _ => page::status(StatusCode::NOT_FOUND, "Not found."),
        }
    }

    /// `GET /auth?host=H&to=P`: a signed-in visitor may enter H's project,
    /// so H gets a one-time code by redirect; otherwise the same page
    /// whether H exists or not.
    async fn hand_over(&self, req: &Request<Incoming>) -> Response<Body> {
        let to = query(req, "to")
            .filter(|t| route::safe_path(t))
            .unwrap_or_else(|| "/".into());
        let target = query(req, "host").unwrap_or_default().to_ascii_lowercase();
        let Some(user) = self.session_user(req, &self.domain.clone()).await else {
            return page::html(
                StatusCode::UNAUTHORIZED,
                "Sign in to open this site",
                SIGN_IN_HOW,
            );
        };
        let (name, entry) = match self.site_of(&target).await {
            Site::Project { name, port: None } => (name, Entry::Web),
            Site::Project {
                name,
                port: Some(_),
            } => (name, Entry::WebOtherPort),
            _ => return self.not_open(req, Some(&user)),
        };
        if self
            .gate
            .may_enter(Some(&user), &name, entry)
            .await
            .is_err()
        {
            return self.not_open(req, Some(&user));
        }
        match self.gate.mint_handoff(&user, &target).await {
            Ok(code) => page::redirect(
                StatusCode::FOUND,
                &format!(
                    "https://{target}{}/__kennel/handoff?code={code}&to={}",
                    self.port_suffix(),
                    super::pct(&to)
                ),
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot hand a session over");
                page::status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Kennel cannot sign you in right now.",
                )
            }
        }
    }

    /// `/__kennel/...` on a project host: never the app's.
    pub(super) async fn project_kennel_path(
        &self,
        req: Request<Incoming>,
        host: &str,
        name: &kennel_core::names::ProjectName,
        port: Option<u16>,
    ) -> Response<Body> {
        let path = req.uri().path().to_owned();
        if let Some(token) = path.strip_prefix("/__kennel/link/") {
            return self.share_link(&req, token, name, port).await;
        }
        match (req.method().clone(), req.uri().path()) {
            (Method::GET, "/__kennel/handoff") => {
                let to = query(&req, "to")
                    .filter(|t| route::safe_path(t))
                    .unwrap_or_else(|| "/".into());
                let code = query(&req, "code").unwrap_or_default();
                match self.gate.consume_handoff(&code, host).await {
                    Ok(Some(s)) => {
                        self.gate
                            .record_login(&web_identity(&s.user), &s.user, host, "web login")
                            .await;
                        let mut r = page::redirect(StatusCode::FOUND, &to);
                        if let Some(c) = session_cookie(&s.token) {
                            r.headers_mut().insert(header::SET_COOKIE, c);
                        }
                        r
                    }
                    _ => page::html(
                        StatusCode::BAD_REQUEST,
                        "This sign-in link is used up",
                        "<p>Go back to the page you wanted and reload it.</p>",
                    ),
                }
            }
            (Method::POST, "/__kennel/logout") => {
                if !self.same_origin(&req) {
                    return page::status(
                        StatusCode::FORBIDDEN,
                        "That form came from another site.",
                    );
                }
                self.sign_out(&req, "/").await
            }
            _ => page::status(StatusCode::NOT_FOUND, "Not found."),
        }
    }

    /// `/__kennel/link/TOKEN` on a project's (port's) host: GET asks (a
    /// chat preview or a scanner must not use the link up), POST redeems
    /// it and starts the link's session. A link that does not work here
    /// (used, revoked, expired, another project's) answers as an unknown
    /// site does.
    async fn share_link(
        &self,
        req: &Request<Incoming>,
        token: &str,
        name: &kennel_core::names::ProjectName,
        port: Option<u16>,
    ) -> Response<Body> {
        match *req.method() {
            Method::GET => match self.gate.peek_link(token, name, port).await {
                Ok(Some(_)) => page::html(
                    StatusCode::OK,
                    "Open a shared site",
                    &format!(
                        "<p>Someone shared <b>{}</b> with you. This link works once, in one browser: open the site in this one?</p><form method=\"post\"><button>Open {}</button></form>",
                        page::esc(name.as_str()),
                        page::esc(name.as_str())
                    ),
                ),
                _ => self.not_open(req, None),
            },
            Method::POST => {
                if !self.same_origin(req) {
                    return page::status(
                        StatusCode::FORBIDDEN,
                        "That form came from another site.",
                    );
                }
                match self.gate.redeem_link(token, name, port).await {
                    Ok(Some(s)) => {
                        let mut r = page::redirect(StatusCode::SEE_OTHER, "/");
                        if let Ok(c) = HeaderValue::from_str(&format!(
                            "{}={}; Path=/; Secure; HttpOnly; SameSite=Lax",
                            super::LINK_COOKIE,
                            s.token
                        )) {
                            r.headers_mut().insert(header::SET_COOKIE, c);
                        }
                        r
                    }
                    Ok(None) => self.not_open(req, None),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot redeem a share link");
                        page::status(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "Kennel cannot open this link right now.",
                        )
                    }
                }
            }
            _ => page::status(StatusCode::METHOD_NOT_ALLOWED, "GET or POST."),
        }
    }

    async fn sign_out(&self, req: &Request<Incoming>, to: &str) -> Response<Body> {
        if let Some(token) = Self::cookie(req) {
            if let Err(e) = self.gate.end_session(&token).await {
                tracing::error!(error = %e, "cannot end a session");
            }
        }
        let mut r = page::redirect(StatusCode::SEE_OTHER, to);
        r.headers_mut().insert(header::SET_COOKIE, clear_cookie());
        r
    }

    /// Whether a form post came from the page's own origin: browsers say
    /// so in `Sec-Fetch-Site`; older ones in `Origin`, which must then
    /// name this host. A request with neither (curl) is let through: it
    /// carries no cookies a page elsewhere could have made it use.
    pub(super) fn same_origin<B>(&self, req: &Request<B>) -> bool {
        let h = req.headers();
        if let Some(site) = h.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
            return site == "same-origin" || site == "none";
        }
        let Some(origin) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
            return true;
        };
        let host = route::host_of(req).unwrap_or_default();
        origin == format!("https://{host}{}", self.port_suffix())
    }

    /// `:PORT` in URLs Kennel hands out, or nothing for 443.
    pub(super) fn port_suffix(&self) -> String {
        kennel_core::urls::https_port_suffix(self.https_port)
    }
}

fn used_up() -> Response<Body> {
    page::html(
        StatusCode::GONE,
        "This link no longer works",
        "<p>Sign-in links work once, for a few minutes. Ask for a new one with <code>login</code>.</p>",
    )
}

/// How the audit log and the VM state service name a web visitor.
pub(super) fn web_identity(user: &kennel_core::User) -> Identity {
    Identity::new(Frontend::Web, user.name.as_str())
}
