//! Who a project's VM may talk to: its egress policy.
//!
//! A project is `open` (the guest reaches what its host reaches, today's
//! behaviour and the default) or `closed`: only destinations on its list.
//! A destination is a name (`api.example.com`, or `*.example.com` for its
//! subdomains) or an address block (`203.0.113.0/24`, `2001:db8::1`),
//! with a port or not. Names are allowed by name: Kennel answers the
//! guest's DNS itself and lets through the addresses it handed out for an
//! allowed name, for their TTL. A deny beats an allow; a rule may expire
//! (`allow-once`: an hour).
//!
//! What this module holds is the policy as data, its parsing and the
//! judgement of a name; the provisioner enforces it (nftables and the
//! resolver) and asks, through [`EgressAsked`], when a closed project's
//! VM wants a name nobody decided on yet.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::Serialize;

/// How long `allow-once` lasts unless configured (`vm.egress_once`).
pub const ONCE_SECS: i64 = 3600;
/// The most rules one project holds.
pub const MAX_RULES: usize = 256;

/// Open or closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    /// Anything the host reaches (today's behaviour).
    #[default]
    Open,
    /// Only what the project's list allows.
    Closed,
}

impl EgressMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Closed => "closed",
        }
    }
}

impl fmt::Display for EgressMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EgressMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "open" => Ok(Self::Open),
            "closed" => Ok(Self::Closed),
            _ => Err(format!("egress is open or closed, not '{s}'")),
        }
    }
}

/// What a destination names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DestHost {
    /// A DNS name, lowercase, without the final dot; `*.` in front for
    /// its subdomains.
    Name(String),
    /// An address block.
    Net { addr: IpAddr, prefix: u8 },
}

/// A destination: a host or block, and a port or any.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    pub host: DestHost,
    pub port: Option<u16>,
}

impl Destination {
    /// Parses `HOST|CIDR[:PORT]`; an IPv6 address or block with a port is
    /// written in brackets (`[2001:db8::/32]:443`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = |why: &str| Err(format!("'{s}' is not a destination: {why}"));
        if s.is_empty() || s.len() > 300 {
            return bad("give a host name, an address or a block (CIDR), with :PORT or not");
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let Some((inner, after)) = rest.split_once(']') else {
                return bad("a '[' without its ']'");
            };
            match after {
                "" => (inner, None),
                p => match p.strip_prefix(':') {
                    Some(p) => (inner, Some(p)),
                    None => return bad("after ']' comes :PORT or nothing"),
                },
            }
        } else if s.matches(':').count() > 1 {
            // A bare IPv6 address or block: no port.
            (s, None)
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => return bad("the port is a number from 1 to 65535"),
            },
        };
        let host = if let Some((a, p)) = host.split_once('/') {
            let Ok(addr) = a.parse::<IpAddr>() else {
                return bad("a block is ADDRESS/PREFIX, such as 203.0.113.0/24");
            };
            let max = if addr.is_ipv4() { 32 } else { 128 };
            match p.parse::<u8>() {
                Ok(n) if n <= max => DestHost::Net {
                    addr: network(addr, n),
                    prefix: n,
                },
                _ => return bad(&format!("the prefix is a number from 0 to {max}")),
            }
        } else if let Ok(addr) = host.parse::<IpAddr>() {
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            DestHost::Net { addr, prefix }
        } else {
            DestHost::Name(name(host).map_err(|why| format!("'{s}' is not a destination: {why}"))?)
        };
        Ok(Self { host, port })
    }

    /// Whether the destination covers the name `n` (lowercase, no final
    /// dot) on some port.
    pub fn covers_name(&self, n: &str) -> bool {
        match &self.host {
            DestHost::Name(pat) => match pat.strip_prefix("*.") {
                Some(suffix) => n.len() > suffix.len() + 1 && n.ends_with(&format!(".{suffix}")),
                None => pat == n,
            },
            DestHost::Net { .. } => false,
        }
    }

    /// Whether the destination's block holds `ip`.
    pub fn covers_ip(&self, ip: IpAddr) -> bool {
        match self.host {
            DestHost::Net { addr, prefix } => {
                ip.is_ipv4() == addr.is_ipv4() && network(ip, prefix) == addr
            }
            DestHost::Name(_) => false,
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match &self.host {
            DestHost::Name(n) => n.clone(),
            DestHost::Net { addr, prefix } => {
                let full = if addr.is_ipv4() { 32 } else { 128 };
                if *prefix == full {
                    addr.to_string()
                } else {
                    format!("{addr}/{prefix}")
                }
            }
        };
        match (self.port, &self.host) {
            (None, _) => f.write_str(&host),
            (Some(p), DestHost::Net { addr, .. }) if addr.is_ipv6() => write!(f, "[{host}]:{p}"),
            (Some(p), _) => write!(f, "{host}:{p}"),
        }
    }
}

/// The first address of the block of `ip` with `prefix` bits.
fn network(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((bits & mask).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((bits & mask).into())
        }
    }
}

/// A DNS name as rules hold it: lowercase, no final dot, labels of
/// letters, digits, `-` and `_`; `*.` allowed in front.
pub fn name(s: &str) -> Result<String, &'static str> {
    let n = s.trim_end_matches('.').to_ascii_lowercase();
    let body = n.strip_prefix("*.").unwrap_or(&n);
    if body.is_empty() || n.len() > 253 {
        return Err("a name is 1 to 253 characters");
    }
    for label in body.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each part of a name between dots is 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("a name holds letters, digits, '-', '_' and dots ('*.' in front for every subdomain)");
        }
    }
    if !body.contains('.') {
        return Err("give a full name, such as api.example.com");
    }
    Ok(n)
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// One rule of a project's list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRule {
    pub dest: Destination,
    pub verdict: Verdict,
    /// When the rule stops counting (`allow-once`), unix seconds.
    pub expires_at: Option<i64>,
}

/// A project's policy as the provisioner enforces it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EgressPolicy {
    pub mode: EgressMode,
    /// Rules in force (expired ones left out when it was made).
    pub rules: Vec<EgressRule>,
    /// Whether private ranges and the host's own addresses may be allowed
    /// (the project's owner is an admin).
    pub private_ok: bool,
}

/// What the policy says of a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameJudgement {
    /// Allowed: on these ports, or on any when `ports` is `None`; until
    /// `until` (unix seconds) when every rule that allows it expires.
    Allowed {
        ports: Option<Vec<u16>>,
        until: Option<i64>,
    },
    Denied,
    /// Nobody decided yet: ask.
    Unknown,
}

impl EgressPolicy {
    /// The open policy (nothing to enforce).
    pub fn open() -> Self {
        Self::default()
    }

    /// Judges the name `n` at `now` (unix seconds).
    pub fn judge_name(&self, n: &str, now: i64) -> NameJudgement {
        let n = n.trim_end_matches('.').to_ascii_lowercase();
        let live = |r: &&EgressRule| r.expires_at.is_none_or(|t| t > now) && r.dest.covers_name(&n);
        let rules: Vec<&EgressRule> = self.rules.iter().filter(live).collect();
        // A deny wins (a name is denied whole: the command refuses a port).
        if rules.iter().any(|r| r.verdict == Verdict::Deny) {
            return NameJudgement::Denied;
        }
        let allows: Vec<&&EgressRule> = rules
            .iter()
            .filter(|r| r.verdict == Verdict::Allow)
            .collect();
        if allows.is_empty() {
            return NameJudgement::Unknown;
        }
        let ports = if allows.iter().any(|r| r.dest.port.is_none()) {
            None
        } else {
            let mut ps: Vec<u16> = allows.iter().filter_map(|r| r.dest.port).collect();
            ps.sort_unstable();
            ps.dedup();
            Some(ps)
        };
        let until = if allows.iter().any(|r| r.expires_at.is_none()) {
            None
        } else {
            allows.iter().filter_map(|r| r.expires_at).max()
        };
        NameJudgement::Allowed { ports, until }
    }

    /// When the next rule expires, if any does.
    pub fn next_expiry(&self, now: i64) -> Option<i64> {
        self.rules
            .iter()
            .filter_map(|r| r.expires_at)
            .filter(|t| *t > now)
            .min()
    }

    /// The rules in force at `now`.
    pub fn live(&self, now: i64) -> Self {
        Self {
            mode: self.mode,
            rules: self
                .rules
                .iter()
                .filter(|r| r.expires_at.is_none_or(|t| t > now))
                .cloned()
                .collect(),
            private_ok: self.private_ok,
        }
    }
}

/// A closed project's VM asked for a name nobody decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressAsked {
    pub project: crate::names::ProjectName,
    /// The name (or `address:port`) it tried.
    pub dest: String,
}

/// Whether a member may allow `ip`: not in a private, loopback,
/// link-local or other non-public range ([`private_kind`]).
pub fn public(ip: IpAddr) -> bool {
    private_kind(ip).is_none()
}

/// What kind of non-public address `ip` is (for messages), or `None` for
/// a public one. This host's own public addresses are not known here.
pub fn private_kind(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_unspecified() || a == 0 {
                Some("this host")
            } else if v4.is_link_local() {
                Some("link-local, where cloud metadata services live")
            } else if v4.is_private() {
                Some("a private network")
            } else if a == 100 && (64..128).contains(&b) {
                Some("carrier-grade NAT")
            } else if v4.is_multicast() || v4.is_broadcast() || a >= 240 {
                Some("not a unicast address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments().first().copied().unwrap_or_default();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("this host")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if first & 0xfe00 == 0xfc00 {
                Some("a private network")
            } else if v6.is_multicast() {
                Some("not a unicast address")
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Destination {
        Destination::parse(s).unwrap()
    }

    #[test]
    fn destinations_parse_and_print_back() {
        for s in [
            "api.example.com",
            "api.example.com:443",
            "*.example.com",
            "203.0.113.0/24",
            "203.0.113.7",
            "203.0.113.7:22",
            "2001:db8::/32",
            "[2001:db8::/32]:443",
            "[2001:db8::1]:443",
        ] {
            assert_eq!(d(s).to_string(), s);
        }
        assert_eq!(d("API.Example.COM.").to_string(), "api.example.com");
        assert_eq!(d("203.0.113.9/24").to_string(), "203.0.113.0/24");
        for bad in [
            "",
            "localhost",
            "a b.com",
            "x.com:0",
            "x.com:99999",
            "1.2.3.4/33",
            "[::1",
            "ex*.com",
            "a..b",
            "x.com:443:1",
        ] {
            assert!(Destination::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_judged_deny_first() {
        let rule = |s: &str, v, e| EgressRule {
            dest: d(s),
            verdict: v,
            expires_at: e,
        };
        let p = EgressPolicy {
            mode: EgressMode::Closed,
            rules: vec![
                rule("api.example.com:443", Verdict::Allow, None),
                rule("*.cdn.example", Verdict::Allow, Some(100)),
                rule("bad.cdn.example", Verdict::Deny, None),
                rule("203.0.113.0/24", Verdict::Allow, None),
            ],
            private_ok: false,
        };
        assert_eq!(
            p.judge_name("API.example.com.", 0),
            NameJudgement::Allowed {
                ports: Some(vec![443]),
                until: None
            }
        );
        assert_eq!(
            p.judge_name("x.cdn.example", 50),
            NameJudgement::Allowed {
                ports: None,
                until: Some(100)
            }
        );
        assert_eq!(p.judge_name("x.cdn.example", 100), NameJudgement::Unknown);
        assert_eq!(p.judge_name("cdn.example", 0), NameJudgement::Unknown);
        assert_eq!(p.judge_name("bad.cdn.example", 0), NameJudgement::Denied);
        assert_eq!(p.judge_name("other.com", 0), NameJudgement::Unknown);
        assert!(d("203.0.113.0/24").covers_ip("203.0.113.200".parse().unwrap()));
        assert!(!d("203.0.113.0/24").covers_ip("203.0.114.1".parse().unwrap()));
        assert_eq!(p.next_expiry(0), Some(100));
        assert_eq!(p.live(100).rules.len(), 3);
    }

    #[test]
    fn private_ranges_are_not_public() {
        for ip in [
            "10.1.2.3",
            "127.0.0.1",
            "169.254.169.254",
            "::1",
            "fd00::1",
            "100.64.0.1",
        ] {
            assert!(!public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["198.18.0.2", "203.0.113.1", "2001:db8::1"] {
            assert!(public(ip.parse().unwrap()), "{ip}");
        }
    }
}
