//! Keeping secrets and floods out of what Kennel says, logs and stores.
//!
//! Credentials in URLs (`https://user:token@host/...`) are stripped before
//! a URL is logged, audited, stored or rendered; bad input is quoted back
//! only as a short prefix, so a 20 MB line is not echoed 20 MB long.

use std::borrow::Cow;

/// How much of a bad input an error message quotes.
pub const EXCERPT_CHARS: usize = 80;

/// `s` as a short quotable excerpt: at most [`EXCERPT_CHARS`] characters,
/// with the total size said when cut, and credentials in URLs removed.
pub fn excerpt(s: &str) -> String {
    let clean = redact(s);
    if clean.chars().count() <= EXCERPT_CHARS {
        return clean.into_owned();
    }
    let head: String = clean.chars().take(EXCERPT_CHARS).collect();
    format!("{head}… ({} bytes)", s.len())
}

/// Whether the URL's user part is a credential for this scheme: any user
/// part over http(s)/git (a token is often sent as the user name), a
/// password anywhere.
fn userinfo_is_secret(scheme: &str, userinfo: &str) -> bool {
    userinfo.contains(':') || matches!(scheme, "http" | "https" | "git")
}

/// The URL with any credential removed from its user part: `https://tok@h/x`
/// → `https://h/x`, `ssh://git:pw@h/x` → `ssh://git@h/x`; `ssh://git@h/x`
/// and URLs without a user part are returned as they are.
pub fn strip_userinfo(url: &str) -> Cow<'_, str> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Cow::Borrowed(url);
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = rest.get(..end).unwrap_or(rest);
    let Some(at) = authority.rfind('@') else {
        return Cow::Borrowed(url);
    };
    let (userinfo, host) = (
        authority.get(..at).unwrap_or_default(),
        authority.get(at + 1..).unwrap_or_default(),
    );
    if !userinfo_is_secret(&scheme.to_ascii_lowercase(), userinfo) {
        return Cow::Borrowed(url);
    }
    let tail = rest.get(end..).unwrap_or_default();
    let lower = scheme.to_ascii_lowercase();
    let user = match userinfo.split_once(':') {
        Some((user, _))
            if !matches!(lower.as_str(), "http" | "https" | "git") && !user.is_empty() =>
        {
            format!("{user}@")
        }
        _ => String::new(),
    };
    Cow::Owned(format!("{scheme}://{user}{host}{tail}"))
}

/// Whether `url` carries a credential that [`strip_userinfo`] removes.
pub fn has_credentials(url: &str) -> bool {
    matches!(strip_userinfo(url), Cow::Owned(_))
}

/// `text` with credentials removed from every URL in it (for log lines,
/// audit details and error messages that may quote a URL).
pub fn redact(text: &str) -> Cow<'_, str> {
    if !text.contains("://") || !text.contains('@') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        // The scheme: the letters (and + - .) just before "://".
        let before = rest.get(..i).unwrap_or_default();
        let start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || "+-.".contains(c)))
            .map_or(0, |j| j + 1);
        let after = rest.get(i..).unwrap_or_default();
        let len = after
            .find(|c: char| c.is_whitespace() || "\"'`<>()[]{}".contains(c))
            .unwrap_or(after.len());
        let url = rest.get(start..i + len).unwrap_or_default();
        out.push_str(rest.get(..start).unwrap_or_default());
        let clean = strip_userinfo(url);
        changed |= matches!(clean, Cow::Owned(_));
        out.push_str(&clean);
        rest = rest.get(i + len..).unwrap_or_default();
    }
    out.push_str(rest);
    if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_stripped_from_urls() {
        let cases = [
            (
                "https://user:s3cr3tpw@host/repo.git",
                "https://host/repo.git",
            ),
            (
                "https://ghp_token@github.com/me/x",
                "https://github.com/me/x",
            ),
            ("HTTP://u:p@h", "HTTP://h"),
            ("ssh://git:pw@host/x", "ssh://git@host/x"),
            ("ssh://git@host/x", "ssh://git@host/x"),
            ("https://host/a@b", "https://host/a@b"),
            ("git@github.com:me/x.git", "git@github.com:me/x.git"),
        ];
        for (url, want) in cases {
            assert_eq!(strip_userinfo(url), want, "{url}");
        }
        assert!(has_credentials("https://a:b@h/x"));
        assert!(!has_credentials("ssh://git@h/x"));
    }

    #[test]
    fn redact_finds_urls_inside_text() {
        let t =
            "cloning https://user:s3cr3tpw@host/repo.git failed: 'x://a:b@c' and (https://t@h/)";
        let r = redact(t);
        assert!(!r.contains("s3cr3tpw"), "{r}");
        assert!(!r.contains("a:b@"), "{r}");
        assert!(!r.contains("t@h"), "{r}");
        assert!(r.contains("https://host/repo.git failed"), "{r}");
        assert_eq!(redact("no urls here"), "no urls here");
    }

    #[test]
    fn excerpts_are_short() {
        let long = "x".repeat(100_000);
        let e = excerpt(&long);
        assert!(e.len() < 200, "{e}");
        assert!(e.contains("100000 bytes"), "{e}");
        assert_eq!(excerpt("short"), "short");
        assert!(!excerpt("https://u:pw@h/x").contains("pw"));
    }
}
