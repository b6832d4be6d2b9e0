//! From chat text to tokens.
//!
//! Chat clients decorate what people type: a mention or prefix in front,
//! smart quotes, backticks and code fences, non-breaking spaces, stray
//! zero-width characters. [`normalize`] undoes that; [`tokenize`] then
//! splits shell-style (quotes group words, backslash escapes).

/// Addresses people put in front of a command; matched case-insensitively.
pub const DEFAULT_PREFIXES: &[&str] = &[
    "!kennel", "@kennel:", "@kennel", "kennel:", "kennel,", "/kennel",
];

/// A word of the command line. `quoted` words are never taken as flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub text: String,
    pub quoted: bool,
}

/// The only way tokenizing can fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {0} quote is not closed; close it or remove it")]
pub struct UnclosedQuote(pub &'static str);

/// Undoes what chat clients do to text and strips a leading address.
pub fn normalize(text: &str, extra_prefixes: &[&str]) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        // Code fences (``` or ```sh) are decoration; drop the fence lines.
        if line.trim_start().starts_with("```") {
            let rest = line.trim_start().trim_start_matches('`');
            // "```new project x```" on one line: keep what is between.
            if rest.contains(' ') {
                out.push_str(rest.trim_end_matches('`'));
                out.push(' ');
            }
            continue;
        }
        out.push_str(line);
        out.push(' ');
    }
    let mut s: String = out
        .chars()
        .filter_map(|c| match c {
            '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}' | '\u{2032}' => Some('\''),
            '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{201F}' | '\u{2033}' | '\u{00AB}'
            | '\u{00BB}' => Some('"'),
            '\u{200B}' | '\u{200C}' | '\u{200D}' | '\u{2060}' | '\u{FEFF}' => None,
            c if c.is_whitespace() || c.is_control() => Some(' '),
            c => Some(c),
        })
        .collect();
    s = s.trim().to_owned();
    strip_address(&s, extra_prefixes).to_owned()
}

/// Removes one leading address (`!kennel`, `@kennel:`, a bot mention...).
fn strip_address<'a>(s: &'a str, extra: &[&str]) -> &'a str {
    // Longest first: "@kennel:example.org" before "@kennel".
    let mut all: Vec<&str> = DEFAULT_PREFIXES.iter().chain(extra).copied().collect();
    all.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in all {
        if p.is_empty() {
            continue;
        }
        let Some(head) = s.get(..p.len()) else {
            continue;
        };
        if !head.eq_ignore_ascii_case(p) {
            continue;
        }
        let rest = s.get(p.len()..).unwrap_or("");
        // "kennelfoo" is not addressed to us; "kennel: x" and "@kennel x" are.
        if rest.is_empty() || rest.starts_with([' ', ':', ',']) || p.ends_with([':', ',']) {
            return rest.trim_start_matches([':', ',']).trim_start();
        }
    }
    s
}

/// Splits shell-style. Unquoted backticks are dropped (inline code marks).
pub fn tokenize(s: &str) -> Result<Vec<Token>, UnclosedQuote> {
    let mut tokens = Vec::new();
    let mut cur = String::new();
    let mut in_token = false;
    let mut quoted = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' => {
                if in_token {
                    tokens.push(Token {
                        text: std::mem::take(&mut cur),
                        quoted,
                    });
                    in_token = false;
                    quoted = false;
                }
            }
            '`' => {}
            // An apostrophe inside a word ("bob's laptop") is text, as chat
            // users mean it, not an opening quote.
            '\'' if cur.chars().last().is_some_and(char::is_alphanumeric)
                && chars.clone().next().is_some_and(char::is_alphanumeric) =>
            {
                cur.push('\'');
            }
            '\'' => {
                in_token = true;
                quoted = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(UnclosedQuote("single")),
                    }
                }
            }
            '"' => {
                in_token = true;
                quoted = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err(UnclosedQuote("double")),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(UnclosedQuote("double")),
                    }
                }
            }
            '\\' => {
                in_token = true;
                match chars.next() {
                    Some(c) => cur.push(c),
                    None => cur.push('\\'),
                }
            }
            c => {
                in_token = true;
                cur.push(c);
            }
        }
    }
    if in_token {
        tokens.push(Token { text: cur, quoted });
    }
    Ok(tokens)
}

/// Quotes a value so that [`tokenize`] gives it back as one plain word.
pub fn quote(value: &str) -> String {
    let plain = !value.is_empty()
        && !value.starts_with('-')
        && value
            .chars()
            .all(|c| !c.is_whitespace() && !matches!(c, '"' | '\'' | '\\' | '`'));
    if plain {
        return value.to_owned();
    }
    let mut s = String::with_capacity(value.len() + 2);
    s.push('"');
    for c in value.chars() {
        if matches!(c, '"' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apostrophes_inside_words_are_text() {
        let t: Vec<String> = tokenize("note bob's laptop 'a b'")
            .unwrap()
            .into_iter()
            .map(|t| t.text)
            .collect();
        assert_eq!(t, ["note", "bob's", "laptop", "a b"]);
        assert!(tokenize("it 'is").is_err());
    }

    fn words(s: &str) -> Vec<String> {
        tokenize(&normalize(s, &[]))
            .unwrap()
            .into_iter()
            .map(|t| t.text)
            .collect()
    }

    #[test]
    fn chat_decoration_is_removed() {
        assert_eq!(words("!kennel new project a"), ["new", "project", "a"]);
        assert_eq!(words("@kennel: status a"), ["status", "a"]);
        assert_eq!(words("Kennel, status a  "), ["status", "a"]);
        assert_eq!(words("`status a`"), ["status", "a"]);
        assert_eq!(words("```\nstatus a\n```"), ["status", "a"]);
        assert_eq!(words("```status a```"), ["status", "a"]);
        assert_eq!(words("status\u{00A0}a\u{200B}"), ["status", "a"]);
        assert_eq!(
            words("deny 3 \u{201C}not now\u{201D}"),
            ["deny", "3", "not now"]
        );
        assert_eq!(words("kennelfoo"), ["kennelfoo"]);
    }

    #[test]
    fn quoting_round_trips() {
        for v in [
            "a b",
            "-x",
            "",
            "say \"hi\"",
            "back\\slash",
            "`tick`",
            "it's",
        ] {
            let t = tokenize(&quote(v)).unwrap();
            assert_eq!(t.len(), 1, "{v}");
            assert_eq!(t[0].text, v);
        }
    }

    #[test]
    fn unclosed_quotes_are_errors() {
        assert!(tokenize("say \"hi").is_err());
        assert!(tokenize("say 'hi").is_err());
    }
}
