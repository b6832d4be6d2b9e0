//! `kennel backup DIR` and `kennel restore DIR`: the store and the keys.
//!
//! A backup is a directory: `kennel.db` (a consistent copy made with
//! SQLite's online backup while the daemon runs), `keys/` (the gateway's
//! host key, the TLS authority, ACME account, each project's key, users'
//! deploy keys) and `manifest.json` (what, when, the SHA-256 of every
//! file). Not in it: project sources (they live in the projects root,
//! which is the operator's to back up like any other files), VM disks
//! and images (rebuilt from the stacks: after a restore, `start NAME`
//! builds the project a new VM over its source).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kennel_core::store::{self, repo, Store};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::datadir::DataDir;

const MANIFEST: &str = "manifest.json";

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    /// Kennel's version that wrote it.
    kennel: String,
    created: String,
    schema_version: u32,
    projects: u64,
    users: u64,
    files: Vec<FileEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEntry {
    path: String,
    bytes: u64,
    sha256: String,
}

/// Writes a backup of `data` into `dest`, which must not exist or be
/// empty. Safe while a daemon runs; takes no lock.
pub fn backup(data: &DataDir, dest: &Path) -> Result<String> {
    if !data.db().exists() {
        bail!(
            "there is no store in {}; point --data-dir at the data directory to back up",
            data.root().display()
        );
    }
    if dest.exists()
        && std::fs::read_dir(dest)
            .with_context(|| format!("cannot read {}", dest.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} exists and is not empty; give a new directory for the backup",
            dest.display()
        );
    }
    make_private_dir(dest)?;
    let db = dest.join("kennel.db");
    store::backup(&data.db(), &db)
        .with_context(|| format!("cannot copy the store {}", data.db().display()))?;
    let keys = data.root().join("keys");
    if keys.is_dir() {
        copy_tree(&keys, &dest.join("keys"))?;
    }
    // Read on this thread and closed before the files are listed (closing
    // removes SQLite's -wal and -shm beside the copy).
    let (schema_version, projects, users) = {
        let c = rusqlite::Connection::open(&db).context("the copy of the store does not open")?;
        (
            store::schema_version(&c)?,
            repo::list_projects(&c, None)?.len() as u64,
            repo::count_users(&c)?,
        )
    };
    let files = entries(dest)?;
    let manifest = Manifest {
        kennel: env!("CARGO_PKG_VERSION").into(),
        created: kennel_core::model::format_time(kennel_core::model::now()),
        schema_version,
        projects,
        users,
        files,
    };
    std::fs::write(dest.join(MANIFEST), serde_json::to_vec_pretty(&manifest)?)
        .with_context(|| format!("cannot write {}", dest.join(MANIFEST).display()))?;
    let bytes: u64 = manifest.files.iter().map(|f| f.bytes).sum();
    Ok(format!(
        "Backed up {} ({projects} projects, {users} users, {} files, {} KiB) into {}.\nProject sources and VM disks are not in it: back up the projects root yourself; `start NAME` after a restore builds a new VM over the source.",
        data.root().display(),
        manifest.files.len(),
        bytes.div_ceil(1024),
        dest.display()
    ))
}

/// Restores the backup in `from` into `data`, which must hold no store
/// yet. Checks every file against the manifest first.
pub fn restore(from: &Path, data: &DataDir) -> Result<String> {
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(from.join(MANIFEST)).with_context(|| {
            format!("{} is not a Kennel backup (no {MANIFEST})", from.display())
        })?)
        .with_context(|| format!("{} is damaged", from.join(MANIFEST).display()))?;
    for f in &manifest.files {
        let p = safe_join(from, &f.path)?;
        let sum = sha256_of(&p)?;
        if sum != f.sha256 {
            bail!("{} does not match the backup's manifest (changed or damaged); nothing was restored", p.display());
        }
    }
    if data.db().exists() {
        bail!(
            "{} already holds a store; restore only into a fresh data directory (--data-dir NEW), so nothing there is overwritten",
            data.root().display()
        );
    }
    let _lock = data.lock()?;
    for f in &manifest.files {
        let to = safe_join(data.root(), &f.path)?;
        if let Some(parent) = to.parent() {
            make_private_dir(parent)?;
        }
        std::fs::copy(safe_join(from, &f.path)?, &to)
            .with_context(|| format!("cannot write {}", to.display()))?;
    }
    // Opening runs the checks and any migration a newer Kennel needs.
    let s = Store::open(&data.db()).context("the restored store does not open")?;
    s.close();
    Ok(format!(
        "Restored the backup of {} ({} projects, {} users) into {}.\nStart `kennel serve` there; `start NAME` builds each project a new VM over its source (which must be where the store says).",
        manifest.created,
        manifest.projects,
        manifest.users,
        data.root().display()
    ))
}

/// Every file under `root`, relative, with size and hash.
fn entries(root: &Path) -> Result<Vec<FileEntry>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let e = e?;
            let t = e.file_type()?;
            let p = e.path();
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() && e.file_name() != MANIFEST {
                let rel = p.strip_prefix(root)?.display().to_string();
                out.push(FileEntry {
                    bytes: e.metadata()?.len(),
                    sha256: sha256_of(&p)?,
                    path: rel,
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn sha256_of(p: &Path) -> Result<String> {
    let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// `root/rel` for a path from a manifest: relative, without `..`.
fn safe_join(root: &Path, rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    if p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        bail!("the manifest names {rel:?}, which is not a path inside the backup");
    }
    Ok(root.join(p))
}

/// Copies `from` into `to` (files and folders only; links are skipped: the
/// keys folder holds none, and one planted there is not followed).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    make_private_dir(to)?;
    for e in std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let e = e?;
        let t = e.file_type()?;
        let dest = to.join(e.file_name());
        if t.is_dir() {
            copy_tree(&e.path(), &dest)?;
        } else if t.is_file() {
            std::fs::copy(e.path(), &dest)
                .with_context(|| format!("cannot copy {}", e.path().display()))?;
        }
    }
    Ok(())
}

fn make_private_dir(p: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .with_context(|| format!("cannot create {}", p.display()))
}
