//! A project's source on the host: cloned with git2, or a new repository
//! (from a template) with an initial commit, or an adopted directory.
//!
//! The source is the user's: nothing here deletes anything that existed
//! before this attempt. A clone that fails removes only what it created.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use git2::{build::RepoBuilder, Cred, CredentialType, FetchOptions, RemoteCallbacks, Repository};
use kennel_core::hostpath::{Beneath, HostPathError};

/// What to prepare.
#[derive(Debug, Clone)]
pub struct SourcePlan<'a> {
    /// The projects root that holds `path`: everything is created beneath
    /// it without following links.
    pub root: &'a Path,
    pub path: &'a Path,
    pub git: Option<&'a str>,
    /// Token for https:// clones.
    pub token: Option<&'a str>,
    /// Private key for ssh:// and scp-like clones.
    pub deploy_key: Option<&'a Path>,
    /// Files to start a new repository with.
    pub template_files: Option<&'a Path>,
    pub adopt: bool,
    pub author_name: &'a str,
    pub author_email: &'a str,
    /// Owner for what Kennel creates (when it runs as root).
    pub owner: (u32, u32),
    /// For members: the hosts every URL fetched may name (no private,
    /// loopback or link-local ones), and no redirects.
    pub guard: Option<&'a crate::netguard::NetGuard>,
    /// Where to record what this attempt makes while it makes it (see
    /// [`Pending`]), so that a daemon killed meanwhile leaves no half-made
    /// source behind.
    pub pending: Option<&'a Path>,
}

/// What a source being made (a clone, a new repository, a copy) has made
/// so far, kept in a file while it is made. A daemon killed meanwhile
/// leaves the file, and its next start removes what it names
/// ([`remove_pending`]). Only what the attempt made is named.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pending {
    pub path: PathBuf,
    /// The directory itself was made (else only what is in it).
    pub whole: bool,
}

impl Pending {
    /// Writes the record to `marker` (whole or not at all).
    pub fn record(&self, marker: &Path) -> std::io::Result<()> {
        if let Some(dir) = marker.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = marker.with_extension("tmp");
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, marker)
    }

    /// The source is whole (or was removed): forget the record.
    pub fn clear(marker: &Path) {
        let _ = std::fs::remove_file(marker);
    }
}

/// Removes what the attempt recorded in `marker` made, if it is still
/// reached beneath one of `roots` without following a link, and the
/// record. Returns the path removed.
pub fn remove_pending(marker: &Path, roots: &[PathBuf]) -> Result<PathBuf, String> {
    let bytes = std::fs::read(marker).map_err(|e| e.to_string())?;
    let p: Pending = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    let result = kennel_core::hostpath::check_beneath_any(roots, &p.path)
        .map_err(|e| e.to_string())
        .map(|()| {
            remove_made(&p.path, p.whole);
            p.path.clone()
        });
    Pending::clear(marker);
    result
}

/// Removes `path` (`whole`) or what is in it.
fn remove_made(path: &Path, whole: bool) {
    if whole {
        let _ = std::fs::remove_dir_all(path);
    } else if let Ok(rd) = std::fs::read_dir(path) {
        for entry in rd.filter_map(Result::ok) {
            let p = entry.path();
            let _ = match entry.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
                _ => std::fs::remove_file(&p),
            };
        }
    }
}

/// What was done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// One line for the requester.
    pub summary: String,
}

/// Why the source could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0} exists and is not empty; pass --adopt to use it, or pick another --path")]
    NotEmpty(PathBuf),
    /// `callers`: the URL or the repository is the user's to fix (the
    /// guard refused the host, the repository or its credentials were
    /// refused), as against the host's network or disk.
    #[error("cloning {url} failed: {message}")]
    Clone {
        url: String,
        message: String,
        callers: bool,
    },
    #[error("setting up the repository in {path} failed: {message}")]
    Init { path: PathBuf, message: String },
    #[error(transparent)]
    Path(#[from] HostPathError),
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SourceError {
    /// Whether the user caused this (and can fix it), not the host.
    pub fn is_callers(&self) -> bool {
        match self {
            SourceError::NotEmpty(_) => true,
            SourceError::Clone { callers, .. } => *callers,
            SourceError::Path(e) => {
                !matches!(e, HostPathError::Io { .. } | HostPathError::Root { .. })
            }
            SourceError::Init { .. } | SourceError::Io { .. } => false,
        }
    }
}

/// Whether a git error is about what the user named (a missing
/// repository, refused credentials, an HTTP answer) rather than the
/// network or the disk.
fn git_is_callers(e: &git2::Error) -> bool {
    matches!(e.code(), git2::ErrorCode::Auth | git2::ErrorCode::NotFound)
        || matches!(
            e.class(),
            git2::ErrorClass::Http | git2::ErrorClass::Callback
        )
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Prepares the source. `progress(percent, detail)` hears about a clone
/// about once a second.
pub fn prepare(
    plan: &SourcePlan<'_>,
    progress: &mut dyn FnMut(u8, String),
) -> Result<Prepared, SourceError> {
    let path = plan.path;
    let mut root = Beneath::open(plan.root)?;
    let rel = root.relative(path)?;
    let existed = root.lookup(&rel)?.is_some();
    if existed && root.check_dir(&rel)? {
        if plan.adopt {
            return Ok(Prepared {
                summary: format!("adopted {}", path.display()),
            });
        }
        return Err(SourceError::NotEmpty(path.to_owned()));
    }
    // Made beneath the root one component at a time: a link on the way
    // (one a guest wrote into its own source, say) is refused, and what is
    // made stays root's until the finished tree is handed over.
    let made = root.create_dir_all(&rel)?;
    let pending = Pending {
        path: made.first().cloned().unwrap_or_else(|| path.to_owned()),
        whole: !made.is_empty(),
    };
    if let Some(marker) = plan.pending {
        pending.record(marker).map_err(io(marker))?;
    }
    // An existing empty directory (`--adopt`, or made by its owner) keeps
    // its owner. libgit2 makes no repository in a directory that another
    // user owns, so while Kennel (root) fills it, the directory is
    // Kennel's; it is given back below either way.
    let kept = existed.then(|| dir_owner(path)).flatten();
    if kept.is_some() && rustix::process::geteuid().is_root() {
        std::os::unix::fs::lchown(path, Some(0), Some(0)).map_err(io(path))?;
    }
    let result = match plan.git {
        Some(url) => clone(plan, url, progress),
        None => init(plan),
    };
    // Still the same place, reached without links, before it is given away.
    let result = result.and_then(|p| {
        root.check_dir(&rel)?;
        Ok(p)
    });
    if result.is_err() {
        // Remove only what this attempt made.
        remove_made(&pending.path, pending.whole);
        if let Some((uid, gid)) = kept {
            let _ = std::os::unix::fs::lchown(path, Some(uid), Some(gid));
        }
    } else {
        give_to_owner(path, kept.unwrap_or(plan.owner));
    }
    if let Some(marker) = plan.pending {
        Pending::clear(marker);
    }
    result
}

fn clone(
    plan: &SourcePlan<'_>,
    url: &str,
    progress: &mut dyn FnMut(u8, String),
) -> Result<Prepared, SourceError> {
    let fail = |message: String, callers: bool| SourceError::Clone {
        url: url.to_owned(),
        message,
        callers,
    };
    if let Some(g) = plan.guard {
        g.check(url).map_err(|m| fail(m, true))?;
    }
    // A local repository that is not there is the caller's mistake; libgit2
    // reports it as an OS error, like a disk that failed.
    if let Some(local) = url.strip_prefix("file://").map(Path::new) {
        if !local.exists() {
            return Err(fail(
                format!("there is no repository at {}", local.display()),
                true,
            ));
        }
    }
    let mut last = Instant::now()
        .checked_sub(Duration::from_secs(2))
        .unwrap_or_else(Instant::now);
    let mut tried_credentials = false;
    let token = plan.token.map(str::to_owned);
    let key = plan.deploy_key.map(Path::to_owned);
    let mut callbacks = RemoteCallbacks::new();
    callbacks.credentials(move |_url, username, allowed| {
        // libgit2 asks again after a refusal: answer once, then give up.
        if tried_credentials {
            return Err(git2::Error::from_str("the credentials were refused"));
        }
        tried_credentials = true;
        if allowed.contains(CredentialType::SSH_KEY) {
            if let Some(k) = &key {
                return Cred::ssh_key(username.unwrap_or("git"), None, k, None);
            }
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            if let Some(t) = &token {
                return Cred::userpass_plaintext(username.unwrap_or("x-access-token"), t);
            }
        }
        Err(git2::Error::from_str(
            "the repository needs credentials: for https:// store a token with 'secret set git-token <token>'; for ssh:// add the key from 'deploy-key' to the git host",
        ))
    });
    callbacks.transfer_progress(|stats| {
        kennel_core::fault::point("cloning");
        if last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            let total = stats.total_objects().max(1);
            let pct = (stats.received_objects() * 100 / total).min(100);
            progress(
                u8::try_from(pct).unwrap_or(100),
                format!(
                    "{}/{} objects, {:.1} MiB",
                    stats.received_objects(),
                    stats.total_objects(),
                    stats.received_bytes() as f64 / 1048576.0
                ),
            );
        }
        true
    });
    let mut fetch = FetchOptions::new();
    fetch.remote_callbacks(callbacks);
    if plan.guard.is_some() {
        // A redirect would take the clone to a host never checked.
        fetch.follow_redirects(git2::RemoteRedirect::None);
    }
    let repo = RepoBuilder::new()
        .fetch_options(fetch)
        .clone(url, plan.path)
        .map_err(|e| fail(e.message().to_owned(), git_is_callers(&e)))?;
    update_submodules(&repo, plan.guard).map_err(|e| fail(format!("submodules: {e}"), true))?;
    set_identity(&repo, plan).map_err(|e| fail(e.message().to_owned(), false))?;
    let head = repo
        .head()
        .ok()
        .and_then(|h| h.shorthand().ok().map(str::to_owned))
        .unwrap_or_else(|| "no commits".into());
    Ok(Prepared {
        summary: format!("cloned {url} ({head})"),
    })
}

fn update_submodules(
    repo: &Repository,
    guard: Option<&crate::netguard::NetGuard>,
) -> Result<(), String> {
    for mut sub in repo.submodules().map_err(|e| e.message().to_owned())? {
        let mut opts = git2::SubmoduleUpdateOptions::new();
        if let Some(g) = guard {
            // Each submodule is a fetch of its own, from its own URL.
            let url = sub.url().ok().flatten().unwrap_or_default().to_owned();
            g.check(&url)
                .map_err(|e| format!("{} ({url}): {e}", sub.name().unwrap_or("?")))?;
            let mut fetch = FetchOptions::new();
            fetch.follow_redirects(git2::RemoteRedirect::None);
            opts.fetch(fetch);
        }
        sub.update(true, Some(&mut opts))
            .map_err(|e| e.message().to_owned())?;
        if let Ok(inner) = sub.open() {
            update_submodules(&inner, guard)?;
        }
    }
    Ok(())
}

fn set_identity(repo: &Repository, plan: &SourcePlan<'_>) -> Result<(), git2::Error> {
    let mut cfg = repo.config()?;
    cfg.set_str("user.name", plan.author_name)?;
    cfg.set_str("user.email", plan.author_email)?;
    Ok(())
}

fn init(plan: &SourcePlan<'_>) -> Result<Prepared, SourceError> {
    let path = plan.path;
    let fail = |message: String| SourceError::Init {
        path: path.to_owned(),
        message,
    };
    if let Some(files) = plan.template_files {
        copy_tree(files, path)?;
    }
    let repo = Repository::init(path).map_err(|e| fail(e.message().to_owned()))?;
    set_identity(&repo, plan).map_err(|e| fail(e.message().to_owned()))?;
    let mut index = repo.index().map_err(|e| fail(e.message().to_owned()))?;
    index
        .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
        .and_then(|()| index.write())
        .map_err(|e| fail(e.message().to_owned()))?;
    let tree_id = index
        .write_tree()
        .map_err(|e| fail(e.message().to_owned()))?;
    let tree = repo
        .find_tree(tree_id)
        .map_err(|e| fail(e.message().to_owned()))?;
    let sig = git2::Signature::now(plan.author_name, plan.author_email)
        .map_err(|e| fail(e.message().to_owned()))?;
    repo.commit(
        Some("HEAD"),
        &sig,
        &sig,
        "Initial commit (Kennel)",
        &tree,
        &[],
    )
    .map_err(|e| fail(e.message().to_owned()))?;
    Ok(Prepared {
        summary: match plan.template_files {
            Some(_) => "new repository from the template, with an initial commit".into(),
            None => "new empty repository with an initial commit".into(),
        },
    })
}

/// Copies a directory tree: files, directories, and links as links (a
/// template's link is never followed to copy what it points at).
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), SourceError> {
    for entry in walkdir::WalkDir::new(from)
        .min_depth(1)
        .into_iter()
        .filter_map(Result::ok)
    {
        let rel = entry.path().strip_prefix(from).unwrap_or(entry.path());
        let dest = to.join(rel);
        let t = entry.file_type();
        if t.is_dir() {
            std::fs::create_dir_all(&dest).map_err(io(&dest))?;
        } else if t.is_symlink() {
            let target = std::fs::read_link(entry.path()).map_err(io(entry.path()))?;
            std::os::unix::fs::symlink(target, &dest).map_err(io(&dest))?;
        } else {
            std::fs::copy(entry.path(), &dest).map_err(io(&dest))?;
        }
    }
    Ok(())
}

/// The owner of a directory that is not root's (its link not followed).
fn dir_owner(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.is_dir() && m.uid() != 0)
        .map(|m| (m.uid(), m.gid()))
}

/// Gives everything under `path` to `owner` when Kennel runs as root, so
/// the guest's `dev` (renumbered to that owner) can work on it.
fn give_to_owner(path: &Path, owner: (u32, u32)) {
    if !rustix::process::geteuid().is_root() {
        return;
    }
    let (uid, gid) = {
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.uid() != 0 => (m.uid(), m.gid()),
            _ => owner,
        }
    };
    // Never through a link: lchown, and the walk neither follows links
    // inside nor a link at the top.
    for entry in walkdir::WalkDir::new(path)
        .follow_links(false)
        .follow_root_links(false)
        .into_iter()
        .filter_map(Result::ok)
    {
        let _ = std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan<'a>(path: &'a Path, git: Option<&'a str>) -> SourcePlan<'a> {
        SourcePlan {
            root: path.parent().unwrap(),
            path,
            git,
            token: None,
            deploy_key: None,
            template_files: None,
            adopt: false,
            author_name: "ann",
            author_email: "ann@example.org",
            // The tests reopen the repository, which libgit2 allows only to
            // its owner: keep it ours.
            owner: (
                rustix::process::geteuid().as_raw(),
                rustix::process::getegid().as_raw(),
            ),
            guard: None,
            pending: None,
        }
    }

    fn fixture_repo(dir: &Path) -> String {
        let repo = Repository::init(dir).unwrap();
        std::fs::write(dir.join("Cargo.toml"), "[package]\nname = \"x\"\n").unwrap();
        let mut index = repo.index().unwrap();
        index
            .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
            .unwrap();
        index.write().unwrap();
        let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("t", "t@example.org").unwrap();
        repo.commit(Some("HEAD"), &sig, &sig, "init", &tree, &[])
            .unwrap();
        format!("file://{}", dir.display())
    }

    #[test]
    fn clones_and_sets_the_author() {
        let d = tempfile::tempdir().unwrap();
        let url = fixture_repo(&d.path().join("origin"));
        let dest = d.path().join("dest");
        let p = prepare(&plan(&dest, Some(&url)), &mut |_, _| {}).unwrap();
        assert!(p.summary.starts_with("cloned file://"), "{}", p.summary);
        assert!(dest.join("Cargo.toml").exists());
        let cfg = Repository::open(&dest).unwrap().config().unwrap();
        assert_eq!(cfg.get_string("user.email").unwrap(), "ann@example.org");
    }

    #[test]
    fn a_failed_clone_removes_only_what_it_made() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("dest");
        let missing = format!("file://{}/nope", d.path().display());
        let e = prepare(&plan(&dest, Some(&missing)), &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().starts_with("cloning file://"), "{e}");
        // A repository that is not there is the user's to fix.
        assert!(e.is_callers(), "{e:?}");
        assert!(!dest.exists());
        // A directory that existed (empty) stays.
        std::fs::create_dir(&dest).unwrap();
        prepare(&plan(&dest, Some(&missing)), &mut |_, _| {}).unwrap_err();
        assert!(dest.exists());
    }

    #[test]
    fn an_empty_directory_of_another_user_gets_a_repository_and_keeps_its_owner() {
        use std::os::unix::fs::MetadataExt;
        assert!(
            rustix::process::geteuid().is_root(),
            "this test gives a directory to another user: run it as root (CI does)"
        );
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        std::os::unix::fs::chown(&dest, Some(4242), Some(4343)).unwrap();
        let mut p = plan(&dest, None);
        p.owner = (1000, 1000);
        let done = prepare(&p, &mut |_, _| {}).unwrap();
        assert!(done.summary.contains("initial commit"), "{}", done.summary);
        for f in [dest.clone(), dest.join(".git"), dest.join(".git/HEAD")] {
            let m = std::fs::symlink_metadata(&f).unwrap();
            assert_eq!((m.uid(), m.gid()), (4242, 4343), "{}", f.display());
        }
    }

    #[test]
    fn non_empty_needs_adopt_and_init_commits_templates() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("mine.txt"), "keep").unwrap();
        let e = prepare(&plan(&dest, None), &mut |_, _| {}).unwrap_err();
        assert!(matches!(e, SourceError::NotEmpty(_)), "{e}");
        assert!(e.is_callers(), "a non-empty directory is the user's to fix");
        let mut adopt = plan(&dest, None);
        adopt.adopt = true;
        prepare(&adopt, &mut |_, _| {}).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("mine.txt")).unwrap(),
            "keep"
        );

        let tpl = d.path().join("tpl");
        std::fs::create_dir_all(tpl.join("src")).unwrap();
        std::fs::write(tpl.join("src/main.rs"), "fn main() {}").unwrap();
        let fresh = d.path().join("fresh");
        let mut p = plan(&fresh, None);
        p.template_files = Some(&tpl);
        prepare(&p, &mut |_, _| {}).unwrap();
        let repo = Repository::open(&fresh).unwrap();
        let head = repo.head().unwrap().peel_to_commit().unwrap();
        assert_eq!(head.author().email().ok(), Some("ann@example.org"));
        assert!(head
            .tree()
            .unwrap()
            .get_path(Path::new("src/main.rs"))
            .is_ok());
    }

    #[test]
    fn links_on_the_way_are_refused_and_nothing_is_made_outside() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(root.join("p")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("p/evil")).unwrap();
        let dest = root.join("p/evil/.ssh");
        let mut p = plan(&dest, None);
        p.root = &root;
        let e = prepare(&p, &mut |_, _| {}).unwrap_err();
        assert!(
            matches!(e, SourceError::Path(HostPathError::Link { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(e.is_callers(), "{e}");
        assert!(!outside.join(".ssh").exists());
        // Adopting through a link is refused too.
        std::fs::write(outside.join("f"), "x").unwrap();
        let dest = root.join("p/evil");
        let mut p = plan(&dest, None);
        p.root = &root;
        p.adopt = true;
        assert!(prepare(&p, &mut |_, _| {}).is_err());
    }
}
