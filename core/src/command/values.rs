//! Typed argument values of the command language, each with the rule it
//! enforces stated in its error.

use std::fmt;

use serde::Serialize;

use super::spec::q;

/// A size in MiB, written `512M`, `2G`, `1.5G`, `1T` (binary units).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Size {
    pub mib: u64,
}

impl Size {
    /// Parses a size; a bare number is in `default_unit` (`M` or `G`).
    pub fn parse(s: &str, default_unit: char) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        let split = lower
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(lower.len());
        let (num, unit) = lower.split_at(split);
        let factor: f64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
            "" => match default_unit {
                'G' => 1024.0,
                _ => 1.0,
            },
            "m" => 1.0,
            "g" => 1024.0,
            "t" => 1024.0 * 1024.0,
            _ => {
                return Err(format!(
                    "{} is not a size; write e.g. 512M, 2G or 1.5G",
                    q(s)
                ))
            }
        };
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{} is not a size; write e.g. 512M, 2G or 1.5G", q(s)))?;
        let mib = (n * factor).round();
        if !(1.0..=(1u64 << 40) as f64).contains(&mib) {
            return Err(format!("{} is out of range", q(s)));
        }
        // In range 1..=2^40 checked above, so the cast is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Ok(Self { mib: mib as u64 })
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mib.is_multiple_of(1024) {
            write!(f, "{}G", self.mib / 1024)
        } else {
            write!(f, "{}M", self.mib)
        }
    }
}

/// The name of a stack or template: 1 to 32 characters a-z, 0-9, '-'.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SlugName(String);

impl SlugName {
    /// Validates a stack or template name.
    pub fn new(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "{} is not a valid name: use a-z, 0-9 and '-', starting with a letter",
                q(s)
            ))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SlugName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A host of a backend with several (an Incus cluster member's name):
/// letters, digits, `.`, `-` and `_`, up to 63, starting with a letter
/// or digit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct HostName(String);

impl HostName {
    /// Validates a host name.
    pub fn new(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "{} is not a host name: use letters, digits, '.', '-' and '_' (see 'hosts')",
                q(s)
            ))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One limit of a user's own quota, as `quota USER --cpus ...` sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// Back to the role's limit.
    Default,
    Unlimited,
    /// A count (projects, vCPUs) or MiB (memory, disk).
    At(u64),
}

impl Limit {
    /// `default`, `unlimited`, or what `at` reads.
    fn parse_with(s: &str, at: impl Fn(&str) -> Result<u64, String>) -> Result<Self, String> {
        match s {
            "default" => Ok(Self::Default),
            "unlimited" => Ok(Self::Unlimited),
            _ => at(s).map(Self::At),
        }
    }

    /// A count from 0 to 10,000, `unlimited` or `default`.
    pub fn parse_count(s: &str) -> Result<Self, String> {
        Self::parse_with(s, |s| match s.parse::<u64>() {
            Ok(n @ 0..=10_000) => Ok(n),
            _ => Err(format!(
                "{} is not a limit: a whole number from 0 to 10000, unlimited or default",
                q(s)
            )),
        })
    }

    /// A size (`16G`; a bare number is `unit`), `unlimited` or `default`.
    pub fn parse_size(s: &str, unit: char) -> Result<Self, String> {
        Self::parse_with(s, |s| {
            Size::parse(s, unit)
                .map(|z| z.mib)
                .map_err(|e| format!("{e} (or unlimited, or default)"))
        })
    }

    /// How the command language writes it; sizes as sizes.
    pub fn word(&self, size: bool) -> String {
        match self {
            Self::Default => "default".into(),
            Self::Unlimited => "unlimited".into(),
            Self::At(n) if size => Size { mib: *n }.to_string(),
            Self::At(n) => n.to_string(),
        }
    }
}

/// What `quota USER --projects N --cpus N --memory SIZE --disk SIZE`
/// changes: only the limits named.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QuotaChange {
    pub projects: Option<Limit>,
    pub vcpus: Option<Limit>,
    pub memory_mib: Option<Limit>,
    pub disk_mib: Option<Limit>,
}

impl QuotaChange {
    /// Whether it names no limit (the command only shows).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Where a project's source comes from, as given to `--git`.
///
/// Only the shape is checked here; whether the requester may use a
/// transport (e.g. `file://` for admins only) is decided when cloning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GitSource(String);

/// Transports Kennel clones from.
pub const GIT_SCHEMES: &[&str] = &["https://", "http://", "ssh://", "git://", "file://"];

impl GitSource {
    /// Validates the shape of a git URL.
    pub fn new(s: &str) -> Result<Self, String> {
        // Never quote the value back whole: it may be huge, or carry a
        // password (only the stripped form is ever shown).
        let shown = format!("{:?}", crate::redact::excerpt(s));
        if crate::redact::has_credentials(s) {
            return Err(format!(
                "the --git URL carries credentials; Kennel never stores or shows them. Store the token with 'secret set git-token <token>' and pass the URL without them: {}",
                crate::redact::excerpt(&crate::redact::strip_userinfo(s))
            ));
        }
        if s.is_empty() || s.len() > 2048 || s.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!("{shown} is not a git URL"));
        }
        if s.starts_with('-') {
            return Err(format!("{shown} is not a git URL (it starts with '-')"));
        }
        if s.contains("::") {
            return Err(format!(
                "{shown} uses a git remote helper (like ext::), which Kennel refuses; use https://, ssh:// or git@host:path"
            ));
        }
        let scp_like = !s.contains("://")
            && s.split_once(':')
                .is_some_and(|(host, _)| !host.is_empty() && !host.contains('/') && host.len() > 1);
        let local_path = s.starts_with('/');
        if GIT_SCHEMES.iter().any(|p| s.starts_with(p)) || scp_like || local_path {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "{shown} is not a git URL Kennel can clone; use https://host/repo.git, ssh://host/repo.git or git@host:repo.git"
            ))
        }
    }

    /// The URL as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Local clones (`file://` or a path) read the host's disk: admins only.
    pub fn is_local(&self) -> bool {
        self.0.starts_with("file://") || self.0.starts_with('/')
    }
}

impl fmt::Display for GitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(Size::parse("512M", 'M').unwrap().mib, 512);
        assert_eq!(Size::parse("2G", 'M').unwrap().mib, 2048);
        assert_eq!(Size::parse("2GiB", 'M').unwrap().mib, 2048);
        assert_eq!(Size::parse("1.5g", 'M').unwrap().mib, 1536);
        assert_eq!(Size::parse("20", 'G').unwrap().mib, 20 * 1024);
        assert_eq!(Size::parse("2048", 'M').unwrap().mib, 2048);
        assert!(Size::parse("lots", 'M').is_err());
        assert!(Size::parse("0", 'M').is_err());
        assert!(Size::parse("9T9", 'M').is_err());
        assert_eq!(Size::parse("2G", 'M').unwrap().to_string(), "2G");
        assert_eq!(Size::parse("1536M", 'M').unwrap().to_string(), "1536M");
    }

    #[test]
    fn git_sources() {
        for ok in [
            "https://git.example.com/me/app.git",
            "git@github.com:me/app.git",
            "ssh://git@host/x",
            "file:///srv/repo",
            "/srv/repo",
        ] {
            assert!(GitSource::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ext::sh -c touch% /tmp/pwned",
            "ext::x",
            "-upload-pack=x",
            "ftp://x",
            "a b",
            "",
        ] {
            assert!(GitSource::new(bad).is_err(), "{bad}");
        }
        assert!(GitSource::new("file:///x").unwrap().is_local());
    }
}
