//! Host paths Kennel acts on for users (project sources under a projects
//! root), resolved without following links anyone else controls.
//!
//! Kennel runs as root, and a project's source directory is shared
//! read-write into a guest that its owner controls: whatever the guest
//! writes there appears on the host, symbolic links included. A lexical
//! check ("starts with the root") is therefore worthless: `root/p/evil`
//! may be a link to `/root`. Every path is instead looked up *beneath* a
//! descriptor of the root opened once, with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`: the kernel refuses any
//! link on the way and any escape, atomically, so a link that appears
//! between a check and a use is refused at the use. Directories are made
//! one component at a time with `mkdirat` under the descriptor of the one
//! before, owned by root until the caller hands the finished tree over.
//!
//! The root itself is the operator's (configuration), so it is resolved
//! once, links and all.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Why a host path was refused.
#[derive(Debug, thiserror::Error)]
pub enum HostPathError {
    #[error("{path} is not inside {root}")]
    Outside { path: PathBuf, root: PathBuf },
    #[error("{0} may not contain '..'")]
    ParentDir(PathBuf),
    #[error("{path} goes through a symbolic link ({link}); Kennel does not follow links in project paths: use the real directory")]
    Link { path: PathBuf, link: PathBuf },
    #[error("{0} is not a directory")]
    NotDir(PathBuf),
    #[error("cannot open the projects root {path}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot look up {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// A directory, opened once, beneath which paths are resolved.
#[derive(Debug)]
pub struct Beneath {
    /// As configured (absolute).
    root: PathBuf,
    /// With the operator's links resolved.
    canonical: PathBuf,
    /// `None` while the root does not exist.
    fd: Option<OwnedFd>,
}

impl Beneath {
    /// Opens `root`. `root` is the operator's: links in it are followed,
    /// once, here. A root that does not exist yet holds nothing: lookups
    /// find nothing, and [`Beneath::create_dir_all`] makes it first.
    pub fn open(root: &Path) -> Result<Self, HostPathError> {
        let err = |source| HostPathError::Root {
            path: root.to_owned(),
            source,
        };
        let root = std::path::absolute(root).map_err(err)?;
        let (canonical, fd) = match root.canonicalize() {
            Ok(c) => {
                let fd = Self::open_root(&c).map_err(err)?;
                (c, Some(fd))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (root.clone(), None),
            Err(e) => return Err(err(e)),
        };
        Ok(Self {
            root,
            canonical,
            fd,
        })
    }

    fn open_root(path: &Path) -> std::io::Result<OwnedFd> {
        rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(Into::into)
    }

    /// The root's descriptor, making the root if it is missing.
    fn fd_or_create(&self) -> Result<std::os::fd::BorrowedFd<'_>, HostPathError> {
        match &self.fd {
            Some(fd) => Ok(fd.as_fd()),
            None => Err(HostPathError::Root {
                path: self.root.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the projects root does not exist",
                ),
            }),
        }
    }

    /// The root as configured.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `path` relative to the root, lexically: absolute paths must start
    /// with the root (as configured or resolved), relative ones are taken
    /// as relative to it; `..` and the root itself are refused.
    pub fn relative(&self, path: &Path) -> Result<PathBuf, HostPathError> {
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(HostPathError::ParentDir(path.to_owned()));
        }
        let rel = if path.is_absolute() {
            path.strip_prefix(&self.root)
                .or_else(|_| path.strip_prefix(&self.canonical))
                .map_err(|_| self.outside(path))?
                .to_owned()
        } else {
            path.to_owned()
        };
        let rel: PathBuf = rel
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        if rel.as_os_str().is_empty() {
            return Err(self.outside(path));
        }
        Ok(rel)
    }

    /// The absolute path (as configured) of `rel`.
    pub fn join(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn outside(&self, path: &Path) -> HostPathError {
        HostPathError::Outside {
            path: path.to_owned(),
            root: self.root.clone(),
        }
    }

    fn map_errno(&self, rel: &Path, e: Errno) -> HostPathError {
        let path = self.join(rel);
        match e {
            Errno::LOOP => HostPathError::Link {
                link: self.first_link(rel).unwrap_or_else(|| path.clone()),
                path,
            },
            Errno::XDEV => self.outside(&path),
            Errno::NOTDIR => HostPathError::NotDir(path),
            e => HostPathError::Io {
                path,
                source: e.into(),
            },
        }
    }

    /// The first component of `rel` that is a symbolic link (for messages).
    fn first_link(&self, rel: &Path) -> Option<PathBuf> {
        let mut p = self.canonical.clone();
        for c in rel.components() {
            p.push(c);
            if p.symlink_metadata().ok()?.file_type().is_symlink() {
                return Some(self.root.join(p.strip_prefix(&self.canonical).ok()?));
            }
        }
        None
    }

    /// Opens `rel` (an `O_PATH` descriptor) if it exists, refusing links
    /// anywhere on the way (the last component included).
    pub fn lookup(&self, rel: &Path) -> Result<Option<OwnedFd>, HostPathError> {
        let Some(root) = &self.fd else {
            return Ok(None);
        };
        match rustix::fs::openat2(
            root.as_fd(),
            rel,
            // Without O_NOFOLLOW: RESOLVE_NO_SYMLINKS then refuses a link in
            // the last component too (ELOOP) instead of opening the link.
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        ) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::NOENT) => {
                // Missing: but a link earlier on the way is still refused.
                match rel.parent().filter(|p| !p.as_os_str().is_empty()) {
                    Some(parent) => self.lookup(parent).map(|_| None),
                    None => Ok(None),
                }
            }
            Err(e) => Err(self.map_errno(rel, e)),
        }
    }

    /// Checks an existing or future directory: no link on the way, and a
    /// directory if it exists. Returns whether it exists and is non-empty.
    pub fn check_dir(&self, rel: &Path) -> Result<bool, HostPathError> {
        let Some(fd) = self.lookup(rel)? else {
            return Ok(false);
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| self.map_errno(rel, e))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory {
            return Err(HostPathError::NotDir(self.join(rel)));
        }
        let dir = self.open_dir(rel)?;
        let mut d = rustix::fs::Dir::read_from(&dir).map_err(|e| self.map_errno(rel, e))?;
        let non_empty = d
            .by_ref()
            .filter_map(Result::ok)
            .any(|e| !matches!(e.file_name().to_bytes(), b"." | b".."));
        Ok(non_empty)
    }

    /// Reads the regular file `rel`, at most `limit` bytes, refusing links
    /// anywhere on the way (so a guest cannot point Kennel at a host file).
    /// `None` if it does not exist or is not a regular file.
    pub fn read_file(&self, rel: &Path, limit: u64) -> Result<Option<Vec<u8>>, HostPathError> {
        let Some(root) = &self.fd else {
            return Ok(None);
        };
        // NONBLOCK: a FIFO planted under the name must not hang the open.
        let fd = match rustix::fs::openat2(
            root.as_fd(),
            rel,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
            RESOLVE,
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::NOTDIR) => return Ok(None),
            Err(e) => return Err(self.map_errno(rel, e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| self.map_errno(rel, e))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Ok(None);
        }
        let mut out = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(std::fs::File::from(fd), limit),
            &mut out,
        )
        .map_err(|source| HostPathError::Io {
            path: self.join(rel),
            source,
        })?;
        Ok(Some(out))
    }

    /// Opens the directory `rel` for reading, refusing links on the way.
    pub fn open_dir(&self, rel: &Path) -> Result<OwnedFd, HostPathError> {
        rustix::fs::openat2(
            self.fd_or_create()?,
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        )
        .map_err(|e| self.map_errno(rel, e))
    }

    /// Makes `rel` and any missing parents, one component at a time
    /// beneath the one before (mode 0755, owned by whoever Kennel runs as,
    /// until the caller gives the finished tree away). A link anywhere on
    /// the way, even one that appears meanwhile, is refused. Returns the
    /// components it created, outermost first.
    pub fn create_dir_all(&mut self, rel: &Path) -> Result<Vec<PathBuf>, HostPathError> {
        if self.fd.is_none() {
            let err = |source| HostPathError::Root {
                path: self.root.clone(),
                source,
            };
            std::fs::create_dir_all(&self.root).map_err(err)?;
            self.canonical = self.root.canonicalize().map_err(err)?;
            self.fd = Some(Self::open_root(&self.canonical).map_err(err)?);
        }
        let mut made = Vec::new();
        let mut so_far = PathBuf::new();
        for c in rel.components() {
            so_far.push(c);
            match rustix::fs::mkdirat(self.fd_or_create()?, &so_far, Mode::from_raw_mode(0o755)) {
                Ok(()) => made.push(self.join(&so_far)),
                Err(Errno::EXIST) => {}
                Err(e) => return Err(self.map_errno(&so_far, e)),
            }
            // mkdirat itself does not follow a link in its last component,
            // but it resolves the ones before it: check the whole way again.
            self.open_dir(&so_far)?;
        }
        Ok(made)
    }
}

/// Checks `path` beneath whichever of `roots` holds it: no links, no
/// escape. Used before a path is acted on again later (a VM start shares
/// the source anew; a purge deletes it).
pub fn check_beneath_any(roots: &[PathBuf], path: &Path) -> Result<(), HostPathError> {
    let mut last = None;
    for root in roots {
        let b = Beneath::open(root)?;
        match b.relative(path) {
            Ok(rel) => return b.check_dir(&rel).map(|_| ()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| HostPathError::Outside {
        path: path.to_owned(),
        root: PathBuf::from("(no project root)"),
    }))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn relative_is_lexical_and_refuses_escapes() {
        let d = tempfile::tempdir().unwrap();
        let b = Beneath::open(&d.path().join("root")).unwrap();
        assert!(
            b.lookup(Path::new("a")).unwrap().is_none(),
            "a missing root holds nothing"
        );
        assert_eq!(b.relative(Path::new("a/b")).unwrap(), Path::new("a/b"));
        assert_eq!(
            b.relative(&d.path().join("root/a")).unwrap(),
            Path::new("a")
        );
        assert!(matches!(
            b.relative(Path::new("a/../../x")),
            Err(HostPathError::ParentDir(_))
        ));
        assert!(matches!(
            b.relative(Path::new("/etc")),
            Err(HostPathError::Outside { .. })
        ));
        assert!(matches!(
            b.relative(&d.path().join("root")),
            Err(HostPathError::Outside { .. })
        ));
    }

    #[test]
    fn read_file_reads_only_regular_files_reached_without_links() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("src");
        std::fs::create_dir_all(root.join(".devcontainer")).unwrap();
        std::fs::write(root.join(".devcontainer/devcontainer.json"), "{}").unwrap();
        std::fs::write(d.path().join("secret"), "host only").unwrap();
        symlink(d.path().join("secret"), root.join("link.json")).unwrap();
        symlink(d.path(), root.join("up")).unwrap();
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            root.join("fifo"),
            Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let b = Beneath::open(&root).unwrap();
        let read = |rel: &str| b.read_file(Path::new(rel), 1 << 20);
        assert_eq!(
            read(".devcontainer/devcontainer.json").unwrap().unwrap(),
            b"{}"
        );
        assert!(read("missing.json").unwrap().is_none());
        assert!(read(".devcontainer/devcontainer.json/x").unwrap().is_none());
        assert!(
            read("fifo").unwrap().is_none(),
            "a FIFO is not read (nor waited on)"
        );
        assert!(matches!(read("link.json"), Err(HostPathError::Link { .. })));
        assert!(matches!(read("up/secret"), Err(HostPathError::Link { .. })));
        assert_eq!(
            b.read_file(Path::new(".devcontainer/devcontainer.json"), 1)
                .unwrap()
                .unwrap(),
            b"{"
        );
    }

    #[test]
    fn links_anywhere_on_the_way_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir_all(outside.join("sub")).unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let mut b = Beneath::open(&root).unwrap();
        std::fs::create_dir_all(root.join("p")).unwrap();
        symlink(&outside, root.join("p/evil")).unwrap();
        symlink("../p", root.join("p/inside")).unwrap();
        for rel in ["p/evil", "p/evil/sub", "p/evil/new/deeper", "p/inside"] {
            let e = b.check_dir(Path::new(rel)).unwrap_err();
            assert!(matches!(e, HostPathError::Link { .. }), "{rel}: {e}");
            assert!(e.to_string().contains("p/"), "{e}");
            let e = b.create_dir_all(Path::new(rel)).unwrap_err();
            assert!(matches!(e, HostPathError::Link { .. }), "{rel}: {e}");
        }
        assert!(!outside.join("new").exists(), "nothing made outside");
        // Absolute links too.
        symlink("/", root.join("abs")).unwrap();
        assert!(b.create_dir_all(Path::new("abs/tmp/x")).is_err());
    }

    #[test]
    fn creates_beneath_and_reports_what_it_made() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let mut b = Beneath::open(&root).unwrap();
        std::fs::create_dir_all(root.join("a")).unwrap();
        let made = b.create_dir_all(Path::new("a/b/c")).unwrap();
        assert_eq!(made, vec![root.join("a/b"), root.join("a/b/c")]);
        assert!(!b.check_dir(Path::new("a/b/c")).unwrap());
        std::fs::write(root.join("a/b/c/f"), "x").unwrap();
        assert!(b.check_dir(Path::new("a/b/c")).unwrap());
        std::fs::write(root.join("file"), "x").unwrap();
        assert!(matches!(
            b.check_dir(Path::new("file")),
            Err(HostPathError::NotDir(_))
        ));
    }

    #[test]
    fn a_link_swapped_in_after_the_check_is_refused_at_the_use() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let mut b = Beneath::open(&root).unwrap();
        std::fs::create_dir_all(root.join("sub")).unwrap();
        // Checked while it is a directory ...
        assert!(!b.check_dir(Path::new("sub/x")).unwrap());
        // ... then replaced by a link before the use.
        std::fs::remove_dir(root.join("sub")).unwrap();
        symlink(&outside, root.join("sub")).unwrap();
        assert!(b.create_dir_all(Path::new("sub/x")).is_err());
        assert!(!outside.join("x").exists());
        assert!(check_beneath_any(std::slice::from_ref(&root), &root.join("sub/x")).is_err());
    }
}
