//! Which site a request is for, from HTTP/2's `:authority` or HTTP/1's
//! `Host`: Kennel's own host (`DOMAIN`), a project's app
//! (`NAME.DOMAIN`), another port of a project (`NAME--PORT.DOMAIN`), or
//! nothing Kennel serves.

use kennel_core::names::ProjectName;

/// The site a host name names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Site {
    /// Kennel's own host: sign-in now, the dashboard later.
    Kennel,
    /// A project's app port, or (`port`) another port of its VM.
    Project {
        name: ProjectName,
        port: Option<u16>,
    },
    /// Not a name Kennel serves.
    Unknown,
}

/// The host a request names, lower-cased, without a port; `None` when it
/// names none or an invalid one.
pub fn host_of<B>(req: &http::Request<B>) -> Option<String> {
    let raw = match req.uri().authority() {
        Some(a) => a.host().to_owned(),
        None => {
            let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
            // `Host` may carry a port; IPv6 literals are not Kennel's names.
            h.rsplit_once(':')
                .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
                .map_or(h, |(h, _)| h)
                .to_owned()
        }
    };
    let host = raw.trim_end_matches('.').to_ascii_lowercase();
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    ok.then_some(host)
}

/// What `host` is under `domain`.
pub fn classify(host: &str, domain: &str) -> Site {
    if host == domain {
        return Site::Kennel;
    }
    let Some(label) = host
        .strip_suffix(domain)
        .and_then(|h| h.strip_suffix('.'))
        .filter(|l| !l.contains('.'))
    else {
        return Site::Unknown;
    };
    let (name, port) = match label.split_once("--") {
        // One spelling per port: no leading zeros.
        Some((n, digits)) => match digits.parse::<u16>() {
            Ok(p) if p > 0 && p.to_string() == digits => (n, Some(p)),
            _ => return Site::Unknown,
        },
        None => (label, None),
    };
    match ProjectName::new(name) {
        Ok(name) => Site::Project { name, port },
        Err(_) => Site::Unknown,
    }
}

/// The host name of a project's site (`port`: another port's).
pub fn project_host(name: &str, port: Option<u16>, domain: &str) -> String {
    match port {
        Some(p) => format!("{name}--{p}.{domain}"),
        None => format!("{name}.{domain}"),
    }
}

/// Whether `to` may be a redirect target after sign-in: a path on the
/// same host, nothing a browser could read as another host.
pub fn safe_path(to: &str) -> bool {
    to.starts_with('/')
        && !to.starts_with("//")
        && !to.contains('\\')
        && to.len() <= 2048
        && !to.bytes().any(|b| b < 0x20 || b == 0x7f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_sites() {
        let d = "example.org";
        assert_eq!(classify("example.org", d), Site::Kennel);
        assert!(matches!(
            classify("myapp.example.org", d),
            Site::Project { port: None, .. }
        ));
        assert!(matches!(
            classify("myapp--3000.example.org", d),
            Site::Project {
                port: Some(3000),
                ..
            }
        ));
        for unknown in [
            "a.b.example.org",
            "evil.com",
            "xexample.org",
            "myapp--0.example.org",
            "myapp--99999.example.org",
            "myapp--03000.example.org",
            "kennel.example.org",
            "-x.example.org",
            ".example.org",
        ] {
            assert_eq!(classify(unknown, d), Site::Unknown, "{unknown}");
        }
    }

    #[test]
    fn redirect_targets_stay_on_the_host() {
        for ok in ["/", "/app?x=1", "/a/b#c", "/%2F%2Fevil.example"] {
            assert!(safe_path(ok), "{ok}");
        }
        for bad in [
            "//evil.example",
            "/\\evil.example",
            "\\\\evil.example",
            "https://evil.example/",
            "evil.example",
            "/a\r\nSet-Cookie: x=1",
            "/a\nb",
            "",
        ] {
            assert!(!safe_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_host_comes_from_the_authority_or_the_host_header() {
        let r = http::Request::get("https://MyApp.Example.org:8443/x")
            .body(())
            .unwrap();
        assert_eq!(host_of(&r).as_deref(), Some("myapp.example.org"));
        let r = http::Request::get("/x")
            .header("host", "myapp.example.org:8443")
            .body(())
            .unwrap();
        assert_eq!(host_of(&r).as_deref(), Some("myapp.example.org"));
        let r = http::Request::get("/x")
            .header("host", "bad host")
            .body(())
            .unwrap();
        assert_eq!(host_of(&r), None);
    }
}
