//! What custom domains need from DNS: where a host name points, asked of a
//! resolver behind a small trait ([`Dns`]; hickory's in the gateway, a
//! fake in tests), and the one rule of whether that is here
//! ([`points_here`]).

use std::net::IpAddr;

use async_trait::async_trait;

/// Where a host name points.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsAnswer {
    /// The CNAME at the name itself, if it has one (lowercase, no final dot).
    pub cname: Option<String>,
    /// Its addresses, CNAMEs followed.
    pub addrs: Vec<IpAddr>,
}

/// Why DNS could not be asked (a name that does not exist is an empty
/// answer, not an error).
#[derive(Debug, thiserror::Error)]
#[error("cannot ask DNS about {host}: {message}")]
pub struct DnsError {
    pub host: String,
    pub message: String,
}

/// A DNS resolver.
#[async_trait]
pub trait Dns: Send + Sync {
    /// Where `host` points now.
    async fn lookup(&self, host: &str) -> Result<DnsAnswer, DnsError>;
}

/// Whether `answer` (for a custom domain) points at the project: a CNAME
/// to the project's host, or an address that is Kennel's (`ours`).
pub fn points_here(answer: &DnsAnswer, project_host: &str, ours: &[IpAddr]) -> bool {
    answer.cname.as_deref() == Some(project_host) || answer.addrs.iter().any(|a| ours.contains(a))
}

/// The record to add, said exactly, and what the name points to now.
pub fn missing_record(host: &str, project_host: &str, ours: &[IpAddr], now: &DnsAnswer) -> String {
    let mut s = format!(
        "{host} does not point here yet: add the DNS record `{host}. CNAME {project_host}.`"
    );
    let mut v4 = ours.iter().filter(|a| a.is_ipv4());
    let mut v6 = ours.iter().filter(|a| a.is_ipv6());
    match (v4.next(), v6.next()) {
        (Some(a), Some(b)) => s.push_str(&format!(" (or `{host}. A {a}` and `{host}. AAAA {b}`)")),
        (Some(a), None) => s.push_str(&format!(" (or `{host}. A {a}`)")),
        (None, Some(b)) => s.push_str(&format!(" (or `{host}. AAAA {b}`)")),
        (None, None) => {}
    }
    s.push_str(" at its DNS provider, then run this again");
    match (&now.cname, now.addrs.is_empty()) {
        (Some(c), _) => s.push_str(&format!("; it is a CNAME to {c} now")),
        (None, false) => s.push_str(&format!(
            "; it points to {} now",
            now.addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
        (None, true) => s.push_str("; it has no record now"),
    }
    s
}

/// A custom domain as people type it, checked: a DNS name of two labels
/// or more (letters, digits, `-`), lowercase, without a final dot; not an
/// address.
pub fn custom_host(s: &str) -> Result<String, String> {
    let h = s.trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = h.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    let ok = h.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(label_ok)
        && labels
            .last()
            .is_some_and(|tld| !tld.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(h)
    } else {
        Err(format!(
            "{:?} is not a host name such as app.example.com",
            crate::redact::excerpt(s)
        ))
    }
}

/// A resolver with fixed answers, for tests.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::{Dns, DnsAnswer, DnsError};

    /// Answers from a table; unknown names have no records.
    #[derive(Debug, Default)]
    pub struct FakeDns(pub Mutex<HashMap<String, DnsAnswer>>);

    impl FakeDns {
        /// Sets what `host` points to.
        pub fn set(&self, host: &str, answer: DnsAnswer) {
            if let Ok(mut m) = self.0.lock() {
                m.insert(host.to_owned(), answer);
            }
        }
    }

    #[async_trait::async_trait]
    impl Dns for FakeDns {
        async fn lookup(&self, host: &str) -> Result<DnsAnswer, DnsError> {
            Ok(self
                .0
                .lock()
                .ok()
                .and_then(|m| m.get(host).cloned())
                .unwrap_or_default())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_checked() {
        assert_eq!(custom_host("App.Example.COM.").unwrap(), "app.example.com");
        for bad in [
            "localhost",
            "10.0.0.1",
            "-a.example.com",
            "a..b",
            "*.example.com",
            "a_b.example.com",
            "",
        ] {
            assert!(custom_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_cname_or_one_of_our_addresses_points_here() {
        let ours: Vec<IpAddr> = vec!["203.0.113.7".parse().unwrap()];
        let cname = DnsAnswer {
            cname: Some("web.kennel.example".into()),
            addrs: vec![],
        };
        assert!(points_here(&cname, "web.kennel.example", &ours));
        assert!(!points_here(&cname, "shop.kennel.example", &ours));
        let a = DnsAnswer {
            cname: None,
            addrs: vec!["203.0.113.7".parse().unwrap()],
        };
        assert!(points_here(&a, "x", &ours));
        let msg = missing_record(
            "app.example.com",
            "web.kennel.example",
            &ours,
            &DnsAnswer::default(),
        );
        assert!(
            msg.contains("`app.example.com. CNAME web.kennel.example.`"),
            "{msg}"
        );
        assert!(msg.contains("`app.example.com. A 203.0.113.7`"), "{msg}");
        assert!(msg.contains("no record now"), "{msg}");
    }
}
