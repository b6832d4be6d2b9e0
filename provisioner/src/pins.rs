//! Toolchain versions a repository pins (`rust-toolchain.toml`, `.nvmrc`,
//! `.python-version`, `.tool-versions`, `go.mod`'s `go` line, ...),
//! compared with the versions its stack's image has (`[versions]` in the
//! stack file), so the reply can say when they differ. Files are read from
//! the source without following links, at most `MAX_BYTES` (64 KiB) each.

use std::collections::BTreeMap;
use std::path::Path;

use kennel_core::hostpath::Beneath;
use serde::Serialize;

/// Larger pin files are not read.
const MAX_BYTES: u64 = 64 * 1024;

/// A version a repository asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pin {
    /// The tool, as stack files name it: rust, node, python, go, ruby,
    /// elixir, erlang, php, java.
    pub tool: String,
    pub version: String,
    /// The file that says so.
    pub file: String,
}

/// Every pin in the top directory of `source`.
pub fn find(source: &Path) -> Vec<Pin> {
    let Ok(root) = Beneath::open(source) else {
        return Vec::new();
    };
    let read = |rel: &str| -> Option<String> {
        let bytes = root.read_file(Path::new(rel), MAX_BYTES).ok()??;
        String::from_utf8(bytes).ok()
    };
    let mut pins = Vec::new();
    let mut add = |tool: &str, version: &str, file: &str| {
        let version = version.trim().trim_matches('"').trim_start_matches('v');
        if !version.is_empty() && !pins.iter().any(|p: &Pin| p.tool == tool) {
            pins.push(Pin {
                tool: tool.into(),
                version: version.into(),
                file: file.into(),
            });
        }
    };
    if let Some(t) = read("rust-toolchain.toml") {
        if let Some(channel) = toml::from_str::<toml::Value>(&t).ok().and_then(|v| {
            v.get("toolchain")?
                .get("channel")?
                .as_str()
                .map(str::to_owned)
        }) {
            add("rust", &channel, "rust-toolchain.toml");
        }
    }
    if let Some(t) = read("rust-toolchain") {
        add("rust", first_line(&t), "rust-toolchain");
    }
    for (file, tool) in [
        (".nvmrc", "node"),
        (".node-version", "node"),
        (".python-version", "python"),
        (".ruby-version", "ruby"),
        (".go-version", "go"),
        (".java-version", "java"),
    ] {
        if let Some(t) = read(file) {
            add(tool, first_line(&t), file);
        }
    }
    if let Some(t) = read(".tool-versions") {
        for line in t.lines() {
            let mut words = line
                .split('#')
                .next()
                .unwrap_or_default()
                .split_whitespace();
            let (Some(tool), Some(version)) = (words.next(), words.next()) else {
                continue;
            };
            let tool = match tool {
                "nodejs" => "node",
                "golang" => "go",
                t => t,
            };
            add(tool, version, ".tool-versions");
        }
    }
    if let Some(t) = read("go.mod") {
        if let Some(v) = t.lines().find_map(|l| l.trim().strip_prefix("go ")) {
            add("go", v, "go.mod");
        }
    }
    pins
}

fn first_line(t: &str) -> &str {
    t.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or_default()
}

/// The numeric part of a version (`temurin-17.0.2` → `17.0.2`, `1.75` →
/// `1.75`); `None` for channels such as `stable` or `lts/*`.
fn numeric(v: &str) -> Option<Vec<u64>> {
    let start = v.find(|c: char| c.is_ascii_digit())?;
    let digits: String = v
        .get(start..)?
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let parts: Option<Vec<u64>> = digits
        .split('.')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().ok())
        .collect();
    parts.filter(|p| !p.is_empty())
}

/// Whether `have` satisfies the pin `want` as far as `want` goes: `18`
/// matches 18.19.0, `3.11` matches 3.11.2, `1.75.0` does not match 1.63.0.
fn matches(want: &[u64], have: &[u64]) -> bool {
    want.iter().zip(have).all(|(w, h)| w == h)
}

/// One line per pin the image does not meet, naming the file, both
/// versions and what to do.
pub fn differences(pins: &[Pin], stack: &str, versions: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for p in pins {
        let Some(have) = versions.get(&p.tool) else {
            continue;
        };
        let (Some(want), Some(has)) = (numeric(&p.version), numeric(have)) else {
            if p.tool == "rust" && !p.version.starts_with(|c: char| c.is_ascii_digit()) {
                out.push(format!(
                    "{} asks for rust {}; the {stack} image has {have}. 'kennel-first-boot' in the VM (with internet) installs rustup, which follows the file",
                    p.file, p.version
                ));
            }
            continue;
        };
        if !matches(&want, &has) {
            out.push(format!(
                "{} pins {} {}; the {stack} image has {have}.{}",
                p.file,
                p.tool,
                p.version,
                install_hint(&p.tool)
            ));
        }
    }
    out
}

fn install_hint(tool: &str) -> &'static str {
    match tool {
        "rust" => " 'kennel-first-boot' in the VM (with internet) installs rustup, which installs the pinned toolchain",
        "node" => " With internet, install it in the VM with nvm or 'sudo npm install -g n && sudo n auto'",
        "python" => " With internet, install it in the VM with uv ('uv python install') or pyenv",
        "go" => " Go 1.21 and later fetch the pinned toolchain themselves (GOTOOLCHAIN) when the VM has internet",
        _ => " With internet, install it in the VM (mise or asdf read .tool-versions), or ask an operator for a stack image with it",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins_of(files: &[(&str, &str)]) -> Vec<Pin> {
        let d = tempfile::tempdir().unwrap();
        for (f, text) in files {
            std::fs::write(d.path().join(f), text).unwrap();
        }
        find(d.path())
    }

    #[test]
    fn every_kind_of_pin_file() {
        let pins = pins_of(&[
            (
                "rust-toolchain.toml",
                "[toolchain]\nchannel = \"1.75.0\"\ncomponents = [\"clippy\"]\n",
            ),
            (".nvmrc", "v20\n"),
            (".python-version", "3.11.4\n"),
            (
                ".tool-versions",
                "# asdf\nnodejs 18.1.0\nerlang 26.1 # OTP\nelixir 1.15.7-otp-26\n",
            ),
            ("go.mod", "module example.com/x\n\ngo 1.21\n"),
        ]);
        let got: Vec<(&str, &str, &str)> = pins
            .iter()
            .map(|p| (p.tool.as_str(), p.version.as_str(), p.file.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("rust", "1.75.0", "rust-toolchain.toml"),
                ("node", "20", ".nvmrc"),
                ("python", "3.11.4", ".python-version"),
                ("erlang", "26.1", ".tool-versions"),
                ("elixir", "1.15.7-otp-26", ".tool-versions"),
                ("go", "1.21", "go.mod"),
            ]
        );
    }

    #[test]
    fn only_what_differs_is_said() {
        let versions: BTreeMap<String, String> = [("node", "18.19.0"), ("rust", "1.63.0")]
            .into_iter()
            .map(|(a, b)| (a.into(), b.into()))
            .collect();
        let pin = |tool: &str, version: &str| Pin {
            tool: tool.into(),
            version: version.into(),
            file: "f".into(),
        };
        assert!(differences(&[pin("node", "18")], "node", &versions).is_empty());
        assert!(differences(&[pin("node", "lts/*")], "node", &versions).is_empty());
        assert!(differences(&[pin("python", "3.12")], "node", &versions).is_empty());
        let d = differences(&[pin("node", "20.1")], "node", &versions);
        assert_eq!(d.len(), 1);
        assert!(
            d[0].starts_with("f pins node 20.1; the node image has 18.19.0."),
            "{d:?}"
        );
        let d = differences(&[pin("rust", "stable")], "rust", &versions);
        assert!(
            d[0].contains("asks for rust stable; the rust image has 1.63.0"),
            "{d:?}"
        );
        let d = differences(&[pin("rust", "1.63")], "rust", &versions);
        assert!(d.is_empty(), "{d:?}");
    }
}
