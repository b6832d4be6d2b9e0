//! The data directory: its layout, and the lock that makes one process its
//! owner (`kennel serve`, or `kennel exec` when no daemon runs).

use std::fs::{self, File, TryLockError};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Paths inside a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root` (not created yet).
    pub fn new(root: &Path) -> Self {
        // Absolute, so paths handed to child processes mean the same in any cwd.
        Self {
            root: std::path::absolute(root).unwrap_or_else(|_| root.to_owned()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("kennel.db")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("kennel.lock")
    }

    /// Creates the directory tree; `keys/` is 0700.
    pub fn create(&self) -> Result<()> {
        for (sub, mode) in [
            ("", 0o755),
            ("keys", 0o700),
            ("images", 0o755),
            ("projects", 0o755),
            ("vms", 0o700),
            ("bot", 0o700),
        ] {
            let p = self.root.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(&p)
                .with_context(|| format!("cannot create {}", p.display()))?;
        }
        fs::set_permissions(self.root.join("keys"), fs::Permissions::from_mode(0o700))
            .context("cannot restrict keys/ to its owner")?;
        Ok(())
    }

    /// Takes the data-dir lock, failing at once if another process holds it.
    pub fn lock(&self) -> Result<DirLock> {
        self.create()?;
        let path = self.lock_file();
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(TryLockError::WouldBlock) => bail!(
                "another Kennel process owns {} (is `kennel serve` running?); stop it or use its control socket",
                self.root.display()
            ),
            Err(TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }
}

/// Held while this process owns the data directory; released on drop.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}
