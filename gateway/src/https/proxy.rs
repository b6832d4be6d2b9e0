//! Forwarding to a VM's app: the upstream request rebuilt from parsed
//! parts, hop-by-hop headers dropped, identity headers set by Kennel only,
//! Kennel's cookies kept from the app, bodies streamed both ways, and
//! upgrades (WebSocket) spliced.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use super::{page, Body, Inner, COOKIE};

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Who the request is for, as the app is told.
#[derive(Debug, Clone)]
pub struct Forwarded {
    pub peer: IpAddr,
    pub host: String,
    pub user: Option<(String, Option<String>)>,
}

/// Removes hop-by-hop headers and those `Connection` names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
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
    for n in HOP_BY_HOP {
        h.remove(*n);
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

impl Inner {
    /// Forwards `req` to the app at `addr` (`host:port`).
    pub(super) async fn forward(
        &self,
        mut req: Request<Incoming>,
        client: &Client<HttpConnector, Incoming>,
        addr: &str,
        fwd: &Forwarded,
    ) -> Response<Body> {
        let upgrade = upgrade_of(&req);
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        let Ok(uri) = format!("http://{addr}{path}").parse::<http::Uri>() else {
            return page::status(StatusCode::BAD_REQUEST, "That address is not valid.");
        };
        let mut h = parts.headers;
        strip_hop_by_hop(&mut h);
        without_kennel_cookies(&mut h);
        // Only Kennel says who the visitor is.
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
            h.get("x-forwarded-for").and_then(|v| v.to_str().ok()),
        ) {
            (true, Some(prev)) => format!("{prev}, {}", fwd.peer),
            _ => fwd.peer.to_string(),
        };
        if !trusted {
            h.remove("x-forwarded-proto");
            h.remove("x-forwarded-host");
            h.remove("forwarded");
        }
        let set = |h: &mut HeaderMap, k: &'static str, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(k, v);
            }
        };
        set(&mut h, "x-forwarded-for", &xff);
        if !trusted || !h.contains_key("x-forwarded-proto") {
            set(&mut h, "x-forwarded-proto", "https");
        }
        if !trusted || !h.contains_key("x-forwarded-host") {
            set(&mut h, "x-forwarded-host", &fwd.host);
        }
        // The app sees the name the visitor used (HTTP/2 has no Host).
        let host_value = format!("{}{}", fwd.host, self.port_suffix());
        set(&mut h, "host", &host_value);
        if let Some((user, email)) = &fwd.user {
            set(&mut h, "x-kennel-user", user);
            if let Some(e) = email {
                set(&mut h, "x-kennel-email", e);
            }
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
            return page::status(StatusCode::BAD_REQUEST, "That request cannot be forwarded.");
        };
        let resp = match client.request(up).await {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(%addr, error = %e, "the app did not answer");
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
                tokio::spawn(async move {
                    let (Ok(client), Ok(app)) = tokio::join!(client_upgrade, app_upgrade) else {
                        return;
                    };
                    let mut client = hyper_util::rt::TokioIo::new(client);
                    let mut app = hyper_util::rt::TokioIo::new(app);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut app).await;
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
        let cookies: Vec<HeaderValue> = rparts
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter(|v| {
                v.to_str()
                    .map_or(true, |s| !s.trim_start().starts_with(COOKIE))
            })
            .cloned()
            .collect();
        rparts.headers.remove(header::SET_COOKIE);
        for c in cookies {
            rparts.headers.append(header::SET_COOKIE, c);
        }
        use http_body_util::BodyExt;
        Response::from_parts(rparts, rbody.boxed())
    }
}
