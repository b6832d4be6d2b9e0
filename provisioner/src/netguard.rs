//! Which hosts a member's clone may reach.
//!
//! A git URL is a request Kennel makes from the host, inside the host's
//! network: pointed at `127.0.0.1`, `169.254.169.254` (cloud metadata) or
//! an address on the host's LAN it would reach services no member can.
//! So for members every URL Kennel fetches (the `--git` URL, then each
//! submodule's) must name a host whose addresses are all public, and
//! HTTP redirects are not followed. Admins clone from anywhere, and the
//! operator may name hosts members may use too (`git.allow_private_hosts`,
//! an internal GitLab, say).
//!
//! The check resolves the name before libgit2 does, so a name whose
//! answer changes between the two lookups (DNS rebinding) is not caught
//! here; the redirect refusal and the check of every submodule close the
//! easier paths.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};

/// The rule for one clone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetGuard {
    /// Hosts (names or addresses, as written in URLs) allowed anyway.
    pub allowed: Vec<String>,
}

impl NetGuard {
    /// Checks the host of `url`. `Err` says why, for the requester.
    pub fn check(&self, url: &str) -> Result<(), String> {
        let Some((host, port)) = host_port(url) else {
            // Relative submodule URLs (`../lib.git`) are on the parent's host.
            if url.starts_with("./") || url.starts_with("../") {
                return Ok(());
            }
            return Err(format!("cannot tell which host {url} names"));
        };
        if self.allowed.iter().any(|a| a.eq_ignore_ascii_case(&host)) {
            return Ok(());
        }
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => (host.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve {host}: {e}"))?
                .collect(),
        };
        for a in &addrs {
            if let Some(why) = private(a.ip()) {
                return Err(format!(
                    "{host} is {} ({why}); members may clone only from public hosts. An admin can clone it, or allow the host in git.allow_private_hosts",
                    a.ip()
                ));
            }
        }
        Ok(())
    }
}

/// Host and port of a git URL: `scheme://[user@]host[:port]/...` or the
/// scp-like `[user@]host:path`. `None` for local paths and relative URLs.
pub fn host_port(url: &str) -> Option<(String, u16)> {
    let (default_port, rest) = if let Some((scheme, rest)) = url.split_once("://") {
        let port = match scheme {
            "https" => 443,
            "http" => 80,
            "ssh" | "git+ssh" | "ssh+git" => 22,
            "git" => 9418,
            _ => return None,
        };
        (port, rest)
    } else if url.starts_with(['/', '.']) {
        return None;
    } else {
        let (authority, _) = url.split_once(':')?;
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        return (!host.is_empty() && !host.contains('/')).then(|| (unbracket(host), 22));
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
        let (h, after) = inner.split_once(']')?;
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        (h.to_owned(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p.parse().ok()?)),
            None => (hostport.to_owned(), None),
        }
    };
    (!host.is_empty()).then(|| (host.to_ascii_lowercase(), port.unwrap_or(default_port)))
}

fn unbracket(h: &str) -> String {
    h.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

/// Why `ip` is not a public address, if it is not.
pub fn private(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    kennel_core::egress::private_kind(ip)
        .or_else(|| is_own(ip).then_some("an address of this host"))
}

/// Whether `ip` is assigned to this host: only then can a socket bind it.
fn is_own(ip: IpAddr) -> bool {
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_every_url_form() {
        for (url, want) in [
            ("https://github.com/me/app.git", Some(("github.com", 443))),
            (
                "https://tok@GitLab.example.org:8443/x",
                Some(("gitlab.example.org", 8443)),
            ),
            ("http://[::1]:8080/r", Some(("::1", 8080))),
            ("ssh://git@10.0.0.5/r.git", Some(("10.0.0.5", 22))),
            ("git://127.0.0.1:9999/r", Some(("127.0.0.1", 9999))),
            (
                "git@169.254.169.254:latest/meta-data",
                Some(("169.254.169.254", 22)),
            ),
            ("/srv/repo", None),
            ("../lib.git", None),
            ("file:///srv/repo", None),
        ] {
            let got = host_port(url);
            assert_eq!(got.as_ref().map(|(h, p)| (h.as_str(), *p)), want, "{url}");
        }
    }

    #[test]
    fn private_loopback_link_local_and_own_addresses_are_refused() {
        let g = NetGuard::default();
        for (url, why) in [
            ("http://127.0.0.1/r.git", "loopback"),
            ("http://localhost:3000/r.git", "loopback"),
            ("http://169.254.169.254/latest/", "link-local"),
            ("git@10.1.2.3:r.git", "a private network"),
            ("https://192.168.1.10/r", "a private network"),
            ("https://[::1]/r", "loopback"),
            ("https://[::ffff:127.0.0.1]/r", "loopback"),
            ("https://[fd00::1]/r", "a private network"),
            ("https://0.0.0.0/r", "this host"),
            ("https://100.64.0.1/r", "carrier-grade NAT"),
        ] {
            let e = g.check(url).unwrap_err();
            assert!(
                e.contains(why) && e.contains("git.allow_private_hosts"),
                "{url}: {e}"
            );
        }
        assert!(g.check("https://8.8.8.8/r.git").is_ok());
        assert!(g.check("../sibling.git").is_ok());
        let allowed = NetGuard {
            allowed: vec!["127.0.0.1".into()],
        };
        assert!(allowed.check("git://127.0.0.1:9418/r").is_ok());
        assert!(
            allowed.check("git://localhost:9418/r").is_err(),
            "names are matched as written"
        );
    }
}
