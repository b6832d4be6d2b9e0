//! Validated names: project names (DNS labels, because they become
//! `myapp.DOMAIN` and `myapp@host`) and user names.
//!
//! A value of these types is valid by construction, so the rest of Kennel
//! never re-checks them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Names a project can never take: they collide with the gateways' own
/// host names and SSH users, or are likely to confuse people.
pub const RESERVED_PROJECT_NAMES: &[&str] = &[
    "kennel",
    "admin",
    "www",
    "api",
    "root",
    "ssh",
    "git",
    "mail",
    "localhost",
    "help",
];

/// Longest project name; short enough to sit in a DNS label with room to spare.
pub const PROJECT_NAME_MAX: usize = 40;
/// Longest user name.
pub const USER_NAME_MAX: usize = 32;

/// Why a name was refused. Each message states the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("project name {0:?} is not valid: use 1 to 40 characters a-z, 0-9 and '-', starting with a letter, not ending with '-' and without '--' (the web gateway uses NAME--PORT for a project's other ports)")]
    BadProjectName(String),
    #[error("project name {0:?} is reserved; pick another (reserved: kennel, admin, www, api, root, ssh, git, mail, localhost, help)")]
    ReservedProjectName(String),
    #[error("user name {0:?} is not valid: use 1 to 32 characters a-z, 0-9, '-', '_' and '.', starting with a letter")]
    BadUserName(String),
}

fn is_dns_label(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b.first().is_some_and(u8::is_ascii_lowercase)
        && b.last().is_some_and(|c| *c != b'-')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A project name: a DNS label that is not reserved.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProjectName(String);

impl ProjectName {
    /// Validates `s` as a project name.
    pub fn new(s: &str) -> Result<Self, NameError> {
        if !is_dns_label(s, PROJECT_NAME_MAX) || s.contains("--") {
            return Err(NameError::BadProjectName(crate::redact::excerpt(s)));
        }
        if RESERVED_PROJECT_NAMES.contains(&s) {
            return Err(NameError::ReservedProjectName(crate::redact::excerpt(s)));
        }
        Ok(Self(s.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A user name: what `share`, `--as` and replies use to name a person.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserName(String);

impl UserName {
    /// Validates `s` as a user name.
    pub fn new(s: &str) -> Result<Self, NameError> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= USER_NAME_MAX
            && b.first().is_some_and(u8::is_ascii_lowercase)
            && b.iter().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.')
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::BadUserName(crate::redact::excerpt(s)))
        }
    }

    /// Derives a valid user name from free text such as a Matrix localpart
    /// or a Discord display name: lowercased, other characters dropped,
    /// prefixed with `u` if it would not start with a letter.
    pub fn derive(hint: &str) -> Self {
        let mut s: String = hint
            .chars()
            .filter_map(|c| {
                let c = c.to_ascii_lowercase();
                (c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
                    .then_some(c)
            })
            .collect();
        if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
            s.insert(0, 'u');
        }
        s.truncate(USER_NAME_MAX);
        Self(s)
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype_impls {
    ($t:ident) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl FromStr for $t {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }
        impl TryFrom<String> for $t {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::new(&s)
            }
        }
        impl From<$t> for String {
            fn from(n: $t) -> String {
                n.0
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}
string_newtype_impls!(ProjectName);
string_newtype_impls!(UserName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names_follow_dns_label_rules() {
        for ok in ["a", "myapp", "my-app-2", &"a".repeat(40)] {
            assert!(ProjectName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1app",
            "-app",
            "app-",
            "My",
            "my_app",
            "my--app",
            "my.app",
            "ünï",
            &"a".repeat(41),
        ] {
            assert!(
                matches!(ProjectName::new(bad), Err(NameError::BadProjectName(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            ProjectName::new("kennel"),
            Err(NameError::ReservedProjectName(_))
        ));
    }

    #[test]
    fn derived_user_names_are_valid() {
        for hint in ["@Ann:example.org", "42", "", "Zoë Smith", &"x".repeat(99)] {
            let n = UserName::derive(hint);
            assert!(UserName::new(n.as_str()).is_ok(), "{hint} -> {n}");
        }
        assert_eq!(UserName::derive("Ann.Smith").as_str(), "ann.smith");
    }
}
