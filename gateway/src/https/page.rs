//! The few pages Kennel itself serves: plain HTML, no scripts, no
//! outside resources.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};

use super::Body;

/// Text made safe inside HTML (core's escaping, as for Matrix).
pub use kennel_core::render::escape_html as esc;

pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A page: `title`, then `body` (HTML, already escaped where needed); no
/// script.
pub fn html(status: StatusCode, title: &str, body: &str) -> Response<Body> {
    html_with(status, title, body, STYLE, None)
}

/// The style of Kennel's small pages.
const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:40em;margin:3em auto;padding:0 1em;line-height:1.5}code{background:#eee;padding:0 .3em}button{font-size:1em;padding:.4em 1em}";

/// A page with its own style and, optionally, one script from Kennel's
/// own host (the CSP allows nothing else).
pub fn html_with(
    status: StatusCode,
    title: &str,
    body: &str,
    style: &str,
    script: Option<&str>,
) -> Response<Body> {
    let script_tag = script
        .map(|s| format!("<script src=\"{}\" defer></script>", esc(s)))
        .unwrap_or_default();
    let doc = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\"><title>{t}</title><style>{style}</style>{script_tag}</head><body><h1>{t}</h1>{body}</body></html>",
        t = esc(title)
    );
    // Nothing from elsewhere; the page's own script only where it has one.
    html_response(
        status,
        doc,
        if script.is_some() {
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        } else {
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        },
    )
}

/// An HTML document with Kennel's headers and `csp`.
fn html_response(status: StatusCode, doc: String, csp: &'static str) -> Response<Body> {
    let mut r = Response::new(full(doc));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("content-security-policy", HeaderValue::from_static(csp));
    // Same-origin: a sign-in link's token never leaves in a Referer, and
    // forms still carry their Origin (with no-referrer it is "null").
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    r
}

/// The dashboard's page: its own stylesheet and script from Kennel's host
/// (`/static/dash.css`, `/static/dash.js`), nothing inline but `data:`
/// images (share links' QR codes); `body` brings its own header.
pub fn dashboard(status: StatusCode, title: &str, body: &str) -> Response<Body> {
    let doc = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{t}</title><link rel=\"stylesheet\" href=\"/static/dash.css\"><script src=\"/static/dash.js\" defer></script></head><body>{body}</body></html>",
        t = esc(title)
    );
    html_response(
        status,
        doc,
        "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    )
}

/// A short plain-text answer (for scripts, and errors).
pub fn status(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{text}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A redirect to `to` (303 after a POST, 302 otherwise).
pub fn redirect(code: StatusCode, to: &str) -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = code;
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
