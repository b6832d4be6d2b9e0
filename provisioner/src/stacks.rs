//! Stacks: the data files in `stacks/<name>/stack.toml`, and detecting which
//! stack a source tree is.
//!
//! Stack files are data, not code: detection rules, the Debian packages of
//! the image overlay, environment, app port, editor notes. Loading never
//! stops at a bad file: it is listed as broken with file and line, and the
//! other stacks still load. Detection scores every stack by the files it
//! finds (see `stacks/README.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use globset::{Glob, GlobMatcher};
use kennel_core::catalog::StackInfo;
use serde::{Deserialize, Serialize};

/// The stack used when nothing else matches.
pub const BASE: &str = "base";

/// Deepest directory level looked into when detecting.
const MAX_DEPTH: usize = 6;
/// Most entries looked at when detecting (a 20k-file repo stays well under).
const MAX_ENTRIES: usize = 200_000;

/// A stack file as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StackFile {
    pub name: String,
    pub summary: String,
    #[serde(default = "default_port")]
    pub app_port: u16,
    #[serde(default)]
    pub packages: Vec<String>,
    #[serde(default)]
    pub hints: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The image's toolchain versions (`rust = "1.63.0"`), compared with
    /// the versions a repository pins (`rust-toolchain.toml`, `.nvmrc`, ...).
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
    /// For each `versions` entry, the command (run as `dev` in the guest)
    /// whose output names that version: the image tests run every one.
    #[serde(default)]
    pub version_commands: BTreeMap<String, String>,
    /// Shell lines run as root in the image while it is built, with the
    /// build's network (e.g. a language server from the npm registry).
    #[serde(default)]
    pub image_steps: Option<String>,
    #[serde(default)]
    pub detect: Detect,
    #[serde(default)]
    pub editor: Editor,
    #[serde(default)]
    pub first_boot: Option<FirstBoot>,
}

fn default_port() -> u16 {
    8080
}

/// Detection rules.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Detect {
    #[serde(default)]
    pub ignore: Vec<String>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// One detection rule: files matching `glob` add `weight / (1 + depth)`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub glob: String,
    pub weight: f64,
    #[serde(default)]
    pub max_count: Option<u32>,
}

/// Editor and language-server notes.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Editor {
    #[serde(default)]
    pub lsp: Option<String>,
    #[serde(default)]
    pub notes: Vec<String>,
}

/// An optional first-boot step (e.g. rustup), run only with internet.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FirstBoot {
    pub needs_internet: bool,
    pub script: String,
}

/// A loaded, validated stack.
#[derive(Debug, Clone)]
pub struct Stack {
    pub file: StackFile,
    /// Where it was read from.
    pub path: PathBuf,
    /// The file's bytes, part of the image's content hash.
    pub source: String,
    rules: Vec<(GlobMatcher, bool, Rule)>,
}

impl Stack {
    /// The stack's name.
    pub fn name(&self) -> &str {
        &self.file.name
    }
}

/// Why a stack file could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}:{line}: {message}")]
pub struct StackFileError {
    pub path: String,
    pub line: usize,
    pub message: String,
}

/// Every stack in a directory: the good and the broken.
#[derive(Debug, Clone, Default)]
pub struct Stacks {
    pub stacks: Vec<Stack>,
    pub broken: Vec<(String, StackFileError)>,
    /// Languages Kennel has no stack for, known by their top-level
    /// markers (`stacks/unsupported.toml`).
    pub unsupported: Vec<Unsupported>,
}

/// A language Kennel has no stack for, and the files that name it.
#[derive(Debug, Clone)]
pub struct Unsupported {
    pub name: String,
    /// What its stack would be called (`dotnet`); the name in lower case
    /// if unset.
    pub stack: Option<String>,
    /// Why there is no stack, when there is more to say.
    pub why: Option<String>,
    markers: Vec<GlobMatcher>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsupportedFile {
    #[serde(default)]
    language: Vec<UnsupportedEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsupportedEntry {
    name: String,
    markers: Vec<String>,
    #[serde(default)]
    stack: Option<String>,
    #[serde(default)]
    why: Option<String>,
}

/// A rule this heavy, matched in the top directory, is a project's own
/// manifest (Cargo.toml, package.json, go.mod, …).
const ROOT_MARKER_WEIGHT: f64 = 5.0;

/// Reads `unsupported.toml`; a missing file is none, a broken one is
/// reported and ignored.
fn load_unsupported(dir: &Path) -> Vec<Unsupported> {
    let path = dir.join("unsupported.toml");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Vec::new();
    };
    let file: UnsupportedFile = match toml::from_str(&text) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "broken unsupported-languages file");
            return Vec::new();
        }
    };
    file.language
        .into_iter()
        .filter_map(|l| {
            let markers: Result<Vec<GlobMatcher>, _> = l
                .markers
                .iter()
                .map(|m| Glob::new(m).map(|g| g.compile_matcher()))
                .collect();
            match markers {
                Ok(markers) => Some(Unsupported {
                    name: l.name,
                    stack: l.stack,
                    why: l.why,
                    markers,
                }),
                Err(e) => {
                    tracing::warn!(language = %l.name, error = %e, "bad marker glob");
                    None
                }
            }
        })
        .collect()
}

fn valid_package(p: &str) -> bool {
    // Debian policy: lowercase letters, digits, + - . ; at least two chars, starting alphanumeric.
    p.len() >= 2
        && p.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'))
}

fn valid_env_key(k: &str) -> bool {
    k.starts_with(|c: char| c.is_ascii_uppercase() || c == '_')
        && k.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// The 1-based line of a byte offset in `text`.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset.min(text.len()))
        .map_or(1, |s| s.matches('\n').count() + 1)
}

/// One `<dir>/<name>/<file>` found by [`data_files`]: the folder's name and
/// path, the file's path, and its text or why it could not be read.
pub(crate) struct DataFile {
    pub name: String,
    pub folder: PathBuf,
    pub path: PathBuf,
    pub text: Result<String, StackFileError>,
}

/// The folders of `dir` that hold `file_name` (stacks and templates share
/// this layout), sorted by name, each with the file read.
pub(crate) fn data_files(dir: &Path, file_name: &str) -> std::io::Result<Vec<DataFile>> {
    let mut folders: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join(file_name).is_file())
        .collect();
    folders.sort();
    Ok(folders
        .into_iter()
        .map(|folder| {
            let name = folder
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let path = folder.join(file_name);
            let text = std::fs::read_to_string(&path).map_err(|e| StackFileError {
                path: path.display().to_string(),
                line: 0,
                message: format!("cannot read: {e}"),
            });
            DataFile {
                name,
                folder,
                path,
                text,
            }
        })
        .collect())
}

/// Parses and validates one stack file. `folder` is the directory name it
/// must be called by.
pub fn parse_stack(path: &Path, folder: &str, text: &str) -> Result<Stack, StackFileError> {
    let err = |line: usize, message: String| StackFileError {
        path: path.display().to_string(),
        line,
        message,
    };
    let file: StackFile = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(text, s.start));
        err(line, e.message().to_owned())
    })?;
    let find = |needle: &str| text.find(needle).map_or(1, |o| line_of(text, o));
    if file.name != folder {
        return Err(err(
            find("name"),
            format!(
                "name is {:?} but the folder is {folder:?}; they must match",
                file.name
            ),
        ));
    }
    if kennel_core::command::SlugName::new(&file.name).is_err() {
        return Err(err(
            find("name"),
            format!("{:?} is not a valid stack name (a-z, 0-9, '-')", file.name),
        ));
    }
    if file.app_port == 0 || file.app_port == 22 {
        return Err(err(
            find("app_port"),
            "app_port must be a port other than 0 and 22".into(),
        ));
    }
    for p in &file.packages {
        if !valid_package(p) {
            return Err(err(find(p), format!("{p:?} is not a Debian package name")));
        }
    }
    for k in file.env.keys() {
        if !valid_env_key(k) {
            return Err(err(
                find(k),
                format!("{k:?} is not an environment variable name (A-Z, 0-9, _)"),
            ));
        }
    }
    let mut rules = Vec::new();
    for r in &file.detect.rules {
        if !(r.weight.is_finite() && r.weight > 0.0) {
            return Err(err(
                find(&r.glob),
                format!("rule {:?}: weight must be a positive number", r.glob),
            ));
        }
        let glob = Glob::new(&r.glob)
            .map_err(|e| err(find(&r.glob), format!("rule {:?}: {e}", r.glob)))?;
        rules.push((glob.compile_matcher(), r.glob.contains('/'), r.clone()));
    }
    Ok(Stack {
        file,
        path: path.to_owned(),
        source: text.to_owned(),
        rules,
    })
}

impl Stacks {
    /// Loads every `<dir>/<name>/stack.toml`.
    pub fn load(dir: &Path) -> Self {
        let mut out = Stacks::default();
        let Ok(files) = data_files(dir, "stack.toml") else {
            out.broken.push((
                "*".into(),
                StackFileError {
                    path: dir.display().to_string(),
                    line: 0,
                    message: "cannot read the stacks directory".into(),
                },
            ));
            return out;
        };
        out.unsupported = load_unsupported(dir);
        for f in files {
            match f.text.and_then(|text| parse_stack(&f.path, &f.name, &text)) {
                Ok(s) => out.stacks.push(s),
                Err(e) => {
                    tracing::warn!(stack = %f.name, error = %e, "broken stack file");
                    out.broken.push((f.name, e));
                }
            }
        }
        out
    }

    /// A stack by name.
    pub fn get(&self, name: &str) -> Option<&Stack> {
        self.stacks.iter().find(|s| s.name() == name)
    }

    /// Names of the loadable stacks.
    pub fn names(&self) -> Vec<&str> {
        self.stacks.iter().map(Stack::name).collect()
    }

    /// The catalog view of every stack, broken ones included.
    pub fn infos(&self) -> Vec<StackInfo> {
        let mut v: Vec<StackInfo> = self
            .stacks
            .iter()
            .map(|s| StackInfo {
                name: s.file.name.clone(),
                summary: s.file.summary.clone(),
                app_port: s.file.app_port,
                broken: None,
            })
            .collect();
        v.extend(self.broken.iter().map(|(name, e)| StackInfo {
            name: name.clone(),
            summary: String::new(),
            app_port: 0,
            broken: Some(e.to_string()),
        }));
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Detects the stack of the tree at `root`.
    pub fn detect(&self, root: &Path) -> Detection {
        let d = detect(root, &self.stacks);
        prefer_top_level(root, d, &self.unsupported)
    }
}

/// What detection decided and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    pub stack: String,
    /// The files that decided it, most telling first.
    pub evidence: Vec<String>,
    /// Other stacks present, and why they lost.
    pub warnings: Vec<String>,
    /// Every stack's score, highest first.
    pub scores: Vec<(String, f64)>,
    /// Whether the decision rests on a manifest in the top directory.
    #[serde(skip)]
    pub top_level: bool,
}

impl Detection {
    /// One line for the requester: `rust (Cargo.toml, Cargo.lock)`.
    pub fn summary(&self) -> String {
        if self.evidence.is_empty() {
            format!("{} (no stack markers found)", self.stack)
        } else {
            format!("{} ({})", self.stack, self.evidence.join(", "))
        }
    }
}

/// Scores every stack over the tree at `root`.
pub fn detect(root: &Path, stacks: &[Stack]) -> Detection {
    let ignore: BTreeSet<&str> = stacks
        .iter()
        .flat_map(|s| s.file.detect.ignore.iter().map(String::as_str))
        .chain([".git"])
        .collect();
    // Per stack: per rule, the (score, path) of files it matched.
    let mut hits: Vec<Vec<Vec<(f64, String)>>> = stacks
        .iter()
        .map(|s| vec![Vec::new(); s.rules.len()])
        .collect();
    let walker = walkdir::WalkDir::new(root)
        .min_depth(1)
        .max_depth(MAX_DEPTH)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            !(e.file_type().is_dir() && e.file_name().to_str().is_some_and(|n| ignore.contains(n)))
        });
    for entry in walker.take(MAX_ENTRIES).filter_map(Result::ok) {
        if !entry.file_type().is_file() {
            continue;
        }
        let Ok(rel) = entry.path().strip_prefix(root) else {
            continue;
        };
        let depth = entry.depth().saturating_sub(1);
        let name = entry.file_name();
        for (si, stack) in stacks.iter().enumerate() {
            for (ri, (m, by_path, rule)) in stack.rules.iter().enumerate() {
                let matched = if *by_path {
                    m.is_match(rel)
                } else {
                    m.is_match(name)
                };
                if matched {
                    #[allow(clippy::cast_precision_loss)] // depth <= MAX_DEPTH
                    let score = rule.weight / (1.0 + depth as f64);
                    if let Some(v) = hits.get_mut(si).and_then(|h| h.get_mut(ri)) {
                        v.push((score, rel.display().to_string()));
                    }
                }
            }
        }
    }
    // (stack index, total score, evidence as (score, path), whether a
    // manifest is in the top directory), best first.
    let mut scored: Vec<(usize, f64, Evidence, bool)> = Vec::new();
    for (si, (stack, rule_hits)) in stacks.iter().zip(hits).enumerate() {
        let mut total = 0.0;
        let mut top_level = false;
        let mut evidence: Vec<(f64, String)> = Vec::new();
        for ((_, _, rule), mut files) in stack.rules.iter().zip(rule_hits) {
            files.sort_by(|a, b| b.0.total_cmp(&a.0));
            let cap = rule.max_count.map_or(usize::MAX, |c| c as usize);
            let counted: Vec<(f64, String)> = files.into_iter().take(cap).collect();
            total += counted.iter().map(|(s, _)| s).sum::<f64>();
            top_level |= rule.weight >= ROOT_MARKER_WEIGHT
                && counted
                    .iter()
                    .any(|(_, p)| !p.contains(std::path::MAIN_SEPARATOR));
            evidence.extend(counted);
        }
        evidence.sort_by(|a, b| b.0.total_cmp(&a.0));
        scored.push((si, total, evidence, top_level));
    }
    // A stack whose manifest is in the top directory comes before one
    // found only deeper down, however many files those are.
    scored.sort_by(|a, b| {
        (b.3 && b.1 > 0.0)
            .cmp(&(a.3 && a.1 > 0.0))
            .then(b.1.total_cmp(&a.1))
    });
    let scores: Vec<(String, f64)> = scored
        .iter()
        .filter_map(|(si, s, _, _)| {
            stacks
                .get(*si)
                .map(|st| (st.name().to_owned(), (s * 100.0).round() / 100.0))
        })
        .collect();
    let Some((top_i, top, top_ev, top_level)) = scored.first().filter(|(_, s, _, _)| *s > 0.0)
    else {
        return Detection {
            stack: BASE.into(),
            evidence: Vec::new(),
            warnings: Vec::new(),
            scores,
            top_level: false,
        };
    };
    let name_of = |i: usize| stacks.get(i).map_or("?", Stack::name).to_owned();
    let stack = name_of(*top_i);
    let evidence = summarize(top_ev);
    let warnings = scored
        .iter()
        .skip(1)
        .filter(|(_, s, _, _)| *s > 0.0 && (*s >= top / 4.0 || !top_level))
        .map(|(i, s, ev, _)| {
            let why = if *s > *top {
                "is in the top directory"
            } else {
                "weighs more"
            };
            format!(
                "also found {} ({}); using {stack} because {} {why}. Pass --stack to choose.",
                name_of(*i),
                summarize(ev).join(", "),
                evidence.first().map_or("its markers", String::as_str),
            )
        })
        .collect();
    Detection {
        stack,
        evidence,
        warnings,
        scores,
        top_level: *top_level,
    }
}

/// Matched files with their scores.
type Evidence = Vec<(f64, String)>;

/// A language's marker in the top directory of `root`, if any.
fn top_level_language<'a>(
    root: &Path,
    langs: &'a [Unsupported],
) -> Option<(&'a Unsupported, String)> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    names.sort();
    langs.iter().find_map(|l| {
        names
            .iter()
            .find(|n| l.markers.iter().any(|m| m.is_match(n.as_str())))
            .map(|n| (l, n.clone()))
    })
}

/// A top-level marker of a language Kennel has no stack for beats a stack
/// found only deeper down (a Phoenix app's `assets/package.json` is not a
/// node project): the project gets `base`, and the warning says why.
fn prefer_top_level(root: &Path, mut d: Detection, langs: &[Unsupported]) -> Detection {
    let Some((language, marker)) = top_level_language(root, langs) else {
        return d;
    };
    let lang = language.name.as_str();
    // A stack that claims the marker itself (one added for that language
    // before unsupported.toml was updated) is that language's stack.
    if d.evidence.contains(&marker) {
        return d;
    }
    if d.stack != BASE && d.top_level {
        d.warnings.push(format!(
            "also a {lang} project ({marker}), which Kennel has no stack for."
        ));
        return d;
    }
    let mut warnings = vec![format!(
        "{lang} project ({marker}) — Kennel has no {} stack; using base.{} Pass --stack to choose another.",
        language.stack.clone().unwrap_or_else(|| lang.to_lowercase()),
        language.why.as_ref().map(|w| format!(" {w}.")).unwrap_or_default()
    )];
    if d.stack != BASE {
        warnings.push(format!(
            "{} was found only deeper in the tree ({}).",
            d.stack,
            d.evidence.join(", ")
        ));
    }
    Detection {
        stack: BASE.into(),
        evidence: vec![marker],
        warnings,
        scores: d.scores,
        top_level: true,
    }
}

/// The three most telling paths, plus how many source files matched.
fn summarize(ev: &[(f64, String)]) -> Vec<String> {
    // A file two rules match (mix.exs: `mix.exs` and `*.exs`) is named once.
    let mut paths: Vec<&str> = Vec::new();
    for (_, p) in ev {
        if !paths.contains(&p.as_str()) {
            paths.push(p);
        }
    }
    let mut v: Vec<String> = paths.iter().take(3).map(|p| (*p).to_owned()).collect();
    match paths.len().saturating_sub(3) {
        0 => {}
        1 => v.push("1 more file".into()),
        n => v.push(format!("{n} more files")),
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_file_and_line() {
        let text = "name = \"rust\"\nsummary = \"x\"\npakages = []\n";
        let e = parse_stack(Path::new("stacks/rust/stack.toml"), "rust", text).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(
            e.to_string()
                .starts_with("stacks/rust/stack.toml:3: unknown field"),
            "{e}"
        );
        let text = "name = \"rust\"\nsummary = \"x\"\npackages = [\"ok\", \"bad pkg; rm -rf /\"]\n";
        let e = parse_stack(Path::new("s.toml"), "rust", text).unwrap_err();
        assert!(e.message.contains("not a Debian package name"), "{e}");
        let e = parse_stack(
            Path::new("s.toml"),
            "go",
            "name = \"rust\"\nsummary = \"x\"\n",
        )
        .unwrap_err();
        assert!(e.message.contains("folder"), "{e}");
    }

    #[test]
    fn the_shipped_stacks_all_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../stacks");
        let s = Stacks::load(&dir);
        assert!(s.broken.is_empty(), "{:?}", s.broken);
        for name in [
            "base", "rust", "node", "go", "python", "ruby", "jvm", "elixir", "php",
        ] {
            assert!(s.get(name).is_some(), "{name}");
        }
    }

    #[test]
    fn a_broken_file_does_not_stop_the_others() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("good")).unwrap();
        std::fs::create_dir_all(d.path().join("bad")).unwrap();
        std::fs::write(
            d.path().join("good/stack.toml"),
            "name = \"good\"\nsummary = \"ok\"\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("bad/stack.toml"),
            "name = \"bad\"\nsummary = 3\n",
        )
        .unwrap();
        let s = Stacks::load(d.path());
        assert_eq!(s.names(), ["good"]);
        assert_eq!(s.broken.len(), 1);
        let infos = s.infos();
        assert!(infos
            .iter()
            .any(|i| i.name == "bad" && i.broken.as_deref().is_some_and(|b| b.contains(":2:"))));
    }
}
