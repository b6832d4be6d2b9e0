//! Fuzzes the HTTPS gateway's reading of hosts and redirects: the host a
//! request names (`:authority` or `Host`), which site it is, and whether
//! a sign-in redirect target stays on Kennel's host. Never a panic; a
//! project's host name prints back to the same site; a safe redirect
//! target, put after Kennel's host, names no other host.
#![no_main]

// The gateway's own module, compiled in (the gateway crate's TLS and SSH
// dependencies are not needed for it).
#[path = "../../gateway/src/https/route.rs"]
mod route;

use libfuzzer_sys::fuzz_target;
use route::{classify, host_of, project_host, safe_path, Site};

const DOMAIN: &str = "kennel.example.org";

fuzz_target!(|data: &[u8]| {
    let (a, b) = data.split_at(data.len() / 2);
    // The Host header, as raw bytes.
    if let Ok(value) = http::HeaderValue::from_bytes(a) {
        let req = http::Request::builder()
            .header(http::header::HOST, value)
            .body(())
            .expect("a request with a valid header value");
        check_host(host_of(&req));
    }
    // The authority of an absolute URI (HTTP/2's :authority).
    if let Ok(text) = std::str::from_utf8(a) {
        if let Ok(uri) = format!("https://{text}/").parse::<http::Uri>() {
            if let Ok(req) = http::Request::builder().uri(uri).body(()) {
                check_host(host_of(&req));
            }
        }
    }
    // A redirect target after sign-in.
    if let Ok(to) = std::str::from_utf8(b) {
        if safe_path(to) {
            if let Ok(uri) = format!("https://{DOMAIN}{to}").parse::<http::Uri>() {
                assert_eq!(uri.host(), Some(DOMAIN), "{to:?} leaves Kennel's host");
            }
        }
    }
});

fn check_host(host: Option<String>) {
    let Some(host) = host else { return };
    assert!(!host.is_empty() && host.len() <= 253);
    if let Site::Project { name, port } = classify(&host, DOMAIN) {
        let again = project_host(name.as_str(), port, DOMAIN);
        assert_eq!(again, host, "one spelling per site");
        assert_eq!(classify(&again, DOMAIN), Site::Project { name, port });
    }
}
