//! SSH public keys as people paste them into chat, and their fingerprints.
//!
//! Parsing is done by the `ssh-key` crate (the same one russh uses), so the
//! gateway's view of a key and the store's agree on the fingerprint.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use ssh_key::{Algorithm, HashAlg};

/// Smallest RSA modulus Kennel accepts, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Why a pasted public key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("that is not an OpenSSH public key ({detail}); paste one line such as the contents of ~/.ssh/id_ed25519.pub, starting with 'ssh-ed25519 AAAA'")]
    Unparseable { detail: String },
    #[error("{algorithm} keys are not accepted; use an ed25519 key (ssh-keygen -t ed25519)")]
    Algorithm { algorithm: String },
    #[error("this RSA key has {bits} bits; at least {MIN_RSA_BITS} are needed, or better use ed25519 (ssh-keygen -t ed25519)")]
    WeakRsa { bits: usize },
    #[error("{0:?} is not a key fingerprint; fingerprints look like SHA256:AbC... (see `keys`)")]
    BadFingerprint(String),
}

/// A SHA-256 fingerprint in OpenSSH's form, `SHA256:<base64 without padding>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Fingerprint(String);

impl Fingerprint {
    /// Validates the textual form of a fingerprint.
    pub fn new(s: &str) -> Result<Self, KeyError> {
        let body = s
            .strip_prefix("SHA256:")
            .ok_or_else(|| KeyError::BadFingerprint(crate::redact::excerpt(s)))?;
        let ok = body.len() == 43
            && body
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(KeyError::BadFingerprint(crate::redact::excerpt(s)))
        }
    }

    /// Fingerprint of a parsed `ssh-key` public key (as handed over by russh).
    pub fn of(key: &ssh_key::PublicKey) -> Self {
        Self(key.fingerprint(HashAlg::Sha256).to_string())
    }

    /// The fingerprint as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Fingerprint {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for Fingerprint {
    type Error = KeyError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<Fingerprint> for String {
    fn from(f: Fingerprint) -> String {
        f.0
    }
}

/// A validated SSH public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// `type base64`, without the comment.
    openssh: String,
    comment: Option<String>,
    algorithm: String,
    fingerprint: Fingerprint,
}

impl PublicKey {
    /// Parses one `authorized_keys`-style line: `type base64 [comment]`.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let key = ssh_key::PublicKey::from_openssh(text).map_err(|e| KeyError::Unparseable {
            detail: e.to_string(),
        })?;
        let algorithm = key.algorithm();
        match &algorithm {
            Algorithm::Ed25519 | Algorithm::SkEd25519 | Algorithm::Ecdsa { .. } => {}
            Algorithm::SkEcdsaSha2NistP256 => {}
            Algorithm::Rsa { .. } => {
                let bits = key
                    .key_data()
                    .rsa()
                    .map(|k| k.n().as_positive_bytes().map_or(0, |b| b.len() * 8))
                    .unwrap_or(0);
                if bits < MIN_RSA_BITS {
                    return Err(KeyError::WeakRsa { bits });
                }
            }
            other => {
                return Err(KeyError::Algorithm {
                    algorithm: other.as_str().to_owned(),
                })
            }
        }
        let mut words = text.split_whitespace();
        let (Some(kind), Some(body)) = (words.next(), words.next()) else {
            return Err(KeyError::Unparseable {
                detail: "expected 'type base64 [comment]'".into(),
            });
        };
        let comment: Vec<&str> = words.collect();
        Ok(Self {
            openssh: format!("{kind} {body}"),
            comment: (!comment.is_empty()).then(|| comment.join(" ")),
            algorithm: algorithm.as_str().to_owned(),
            fingerprint: Fingerprint::of(&key),
        })
    }

    /// `type base64`, suitable for `authorized_keys` (no comment).
    pub fn openssh(&self) -> &str {
        &self.openssh
    }

    /// The comment that followed the key, if any (often `user@host`).
    pub fn comment(&self) -> Option<&str> {
        self.comment.as_deref()
    }

    /// The key type, e.g. `ssh-ed25519`.
    pub fn algorithm(&self) -> &str {
        &self.algorithm
    }

    /// The SHA-256 fingerprint.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.openssh)?;
        if let Some(c) = &self.comment {
            write!(f, " {c}")?;
        }
        Ok(())
    }
}

/// Test helpers: syntactically valid keys without a random number generator.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use ssh_key::public::{Ed25519PublicKey, KeyData};

    use super::PublicKey;

    /// An ed25519 public key whose 32 bytes are `seed` repeated, with a comment.
    pub fn ed25519(seed: u8, comment: Option<&str>) -> PublicKey {
        let data = KeyData::Ed25519(Ed25519PublicKey([seed; 32]));
        let mut line = ssh_key::PublicKey::new(data, "")
            .to_openssh()
            .unwrap_or_default();
        if let Some(c) = comment {
            line.push(' ');
            line.push_str(c);
        }
        PublicKey::parse(&line).unwrap_or_else(|_| unreachable_key())
    }

    #[allow(clippy::panic)]
    fn unreachable_key() -> PublicKey {
        panic!("a generated ed25519 key always parses")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ann@laptop";

    #[test]
    fn parses_ed25519_with_comment() {
        let k = PublicKey::parse(ED).unwrap();
        assert_eq!(k.algorithm(), "ssh-ed25519");
        assert_eq!(k.comment(), Some("ann@laptop"));
        assert!(k.fingerprint().as_str().starts_with("SHA256:"));
        assert_eq!(k.to_string(), ED);
        assert_eq!(
            Fingerprint::new(k.fingerprint().as_str()).unwrap(),
            *k.fingerprint()
        );
    }

    #[test]
    fn refuses_garbage_and_dsa() {
        assert!(matches!(
            PublicKey::parse("ssh-ed25519 notbase64"),
            Err(KeyError::Unparseable { .. })
        ));
        assert!(matches!(
            PublicKey::parse(""),
            Err(KeyError::Unparseable { .. })
        ));
        let dsa = "ssh-dss AAAAB3NzaC1kc3MAAACBAP1/U4EddRIpUt9KnC7s5Of2EbdSPO9EAMMeP4C2USZpRV1AIlH7WT2NWPq/xfW6MPbLm1Vs14E7gB00b/JmYLdrmVClpJ+f6AR7ECLCT7up1/63xhv4O1fnxqimFQ8E+4P208UewwI1VBNaFpEy9nXzrith1yrv8iIDGZ3RSAHHAAAAFQCXYFCPFSMLzLKSuYKi64QL8Fgc9QAAAIEA9+GghdabPd7LvKtcNrhXuXmUr7v6OuqC+VdMCz0HgmdRWVeOutRZT+ZxBxCBgLRJFnEj6EwoFhO3zwkyjMim4TwWeotUfI0o4KOuHiuzpnWRbqN/C/ohNWLx+2J6ASQ7zKTxvqhRkImog9/hWuWfBpKLZl6Ae1UlZAFMO/7PSSoAAACBAPSJ2SNDrCiGtL6jl2BqQSWbeVNkGN3S/ukM/MT97H9QQQNBbCuZcCbgdC9FvWwpLfbi6z4ojbZ8EAA8Ms4zD/OB4PPAyHiRG3r35WqNgFc5B1Y/tVjFmOc2Ppp95cNjrW1zrhTFBvb5RHtYNWODgS8U3o4dsMr6z+RYUCvwTyXS joe";
        assert!(PublicKey::parse(dsa).is_err());
    }

    #[test]
    fn fingerprint_form_is_checked() {
        assert!(Fingerprint::new("MD5:aa").is_err());
        assert!(Fingerprint::new("SHA256:short").is_err());
    }

    #[test]
    fn generated_keys_parse() {
        let k = testing::ed25519(7, Some("x@y"));
        assert_eq!(k.comment(), Some("x@y"));
    }
}
