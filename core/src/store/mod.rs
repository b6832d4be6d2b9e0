//! The SQLite store: the one place that owns the database connection.
//!
//! A [`Store`] is a cheap, cloneable handle to a dedicated thread that owns
//! the `rusqlite::Connection`. Async code sends it closures with
//! [`Store::call`] and awaits the answer, so the runtime never blocks on
//! SQLite; synchronous code (the CLI) uses [`Store::call_blocking`]. The
//! queries themselves are plain functions over a connection in [`repo`],
//! testable without a runtime.
//!
//! The schema is defined by numbered SQL files in `migrations/`, applied in
//! order, each in its own transaction together with the bump of
//! `PRAGMA user_version`, so a crash never leaves a half-applied migration.

pub mod repo;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};
use tokio::sync::oneshot;

use crate::model::UnknownValue;

/// Migrations in order; the number is the `user_version` after applying it.
const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("migrations/0001_init.sql")),
    (2, include_str!("migrations/0002_vm_slots.sql")),
    (3, include_str!("migrations/0003_confirmations_secrets.sql")),
    (4, include_str!("migrations/0004_routes.sql")),
    (5, include_str!("migrations/0005_state_note.sql")),
    (6, include_str!("migrations/0006_web_sessions.sql")),
    (7, include_str!("migrations/0007_api_tokens.sql")),
    (8, include_str!("migrations/0008_idle_stop.sql")),
    (9, include_str!("migrations/0009_checkpoints.sql")),
    (10, include_str!("migrations/0010_tags.sql")),
    (11, include_str!("migrations/0011_user_quotas.sql")),
    (12, include_str!("migrations/0012_identity_names.sql")),
    (13, include_str!("migrations/0013_share_links.sql")),
    (14, include_str!("migrations/0014_custom_domains.sql")),
    (15, include_str!("migrations/0015_llm_usage.sql")),
    (16, include_str!("migrations/0016_agent_runs.sql")),
    (17, include_str!("migrations/0017_egress.sql")),
];

/// How long a writer waits for another to finish before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("applying migration {version} failed")]
    Migrate {
        version: u32,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the database is at schema version {found}, newer than this Kennel knows ({known}); upgrade Kennel")]
    TooNew { found: u32, known: u32 },
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    #[error("{what} refers to something that does not exist")]
    Dangling { what: String },
    #[error("a stored value violates a rule: {what}")]
    Invalid { what: String },
    #[error("corrupt row in the database")]
    Corrupt(#[from] UnknownValue),
    #[error("database query failed")]
    Sqlite(#[source] rusqlite::Error),
    #[error("the store has shut down")]
    Closed,
    #[error("the disk holding the store is full: this change was not saved (everything saved before is intact); free some space and try again")]
    Full,
    #[error("the database at {path} is damaged ({detail}); nothing was changed. Restore it from a backup (kennel restore), or move it aside to start empty")]
    Damaged { path: PathBuf, detail: String },
    #[error("the database at {path} is locked by another process (is another kennel, or a sqlite3 shell, holding it?); stop that and try again")]
    Locked { path: PathBuf },
    #[error("cannot start the store's thread")]
    Thread(#[source] std::io::Error),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        classify(e, "a record")
    }
}

/// Turns constraint violations into typed errors naming `what`.
pub fn classify(e: rusqlite::Error, what: &str) -> StoreError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e {
        if f.code == ErrorCode::ConstraintViolation {
            let what = what.to_owned();
            return match f.extended_code {
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY => StoreError::AlreadyExists { what },
                rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY => StoreError::Dangling { what },
                _ => StoreError::Invalid { what },
            };
        }
        if f.code == ErrorCode::DiskFull {
            return StoreError::Full;
        }
    }
    StoreError::Sqlite(e)
}

/// A closure for the connection thread; `None` stops it.
type Job = Option<Box<dyn FnOnce(&mut Connection) + Send>>;

/// A handle to the store's connection thread. Clone it freely.
#[derive(Debug, Clone)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
    path: Option<PathBuf>,
    /// Rows changed through this store so far (SQLite's total_changes),
    /// updated before each call's result is handed back.
    changes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        // It holds secrets: its owner only (SQLite gives -wal/-shm the same mode).
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        Self::start(conn, Some(path.to_owned()))
    }

    /// An in-memory store, for tests.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory().map_err(|source| StoreError::Open {
            path: PathBuf::from(":memory:"),
            source,
        })?;
        Self::start(conn, None)
    }

    fn start(mut conn: Connection, path: Option<PathBuf>) -> Result<Self, StoreError> {
        let at = || path.clone().unwrap_or_else(|| PathBuf::from(":memory:"));
        configure(&conn).map_err(|e| opening(e, &at()))?;
        check(&conn).map_err(|e| opening(e, &at()))?;
        migrate(&mut conn).map_err(|e| opening(e, &at()))?;
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("kennel-store".into())
            .spawn(move || {
                while let Ok(Some(job)) = rx.recv() {
                    job(&mut conn);
                }
            })
            .map_err(StoreError::Thread)?;
        Ok(Self {
            jobs,
            path,
            changes: std::sync::Arc::default(),
        })
    }

    /// Stops the connection thread: every later call fails with
    /// [`StoreError::Closed`] (shutdown, and tests of a store gone away).
    pub fn close(&self) {
        let _ = self.jobs.send(None);
    }

    /// The database file, if not in memory.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// A number that grows with every row changed through this store:
    /// what was read while it stayed the same is still true (caches of
    /// access decisions use it).
    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Runs `f` on the connection thread and awaits its result.
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let changes = self.changes.clone();
        self.jobs
            .send(Some(Box::new(move |conn| {
                let r = f(conn);
                changes.store(conn.total_changes(), std::sync::atomic::Ordering::Release);
                let _ = tx.send(r);
            })))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on the connection thread from synchronous code. Must not be
    /// called from inside an async task.
    pub fn call_blocking<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let changes = self.changes.clone();
        self.jobs
            .send(Some(Box::new(move |conn| {
                let r = f(conn);
                changes.store(conn.total_changes(), std::sync::atomic::Ordering::Release);
                let _ = tx.send(r);
            })))
            .map_err(|_| StoreError::Closed)?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` inside an immediate (write-locking) transaction, committing
    /// if it returns `Ok`. Use for every read-modify-write.
    pub async fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<R, StoreError> + Send + 'static,
    {
        self.call(move |conn| write_tx(conn, f)).await
    }
}

/// Runs `f` in an immediate transaction on `conn`, committing on success.
pub fn write_tx<R>(
    conn: &mut Connection,
    f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<R, StoreError>,
) -> Result<R, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let r = f(&tx)?;
    tx.commit()?;
    Ok(r)
}

/// What went wrong opening a store, in the words an operator needs: a
/// damaged file or a lock held elsewhere rather than "query failed".
fn opening(e: StoreError, path: &Path) -> StoreError {
    let sqlite = match &e {
        StoreError::Sqlite(s) | StoreError::Migrate { source: s, .. } => s,
        _ => return e,
    };
    match sqlite.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            StoreError::Locked {
                path: path.to_owned(),
            }
        }
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            StoreError::Damaged {
                path: path.to_owned(),
                detail: sqlite.to_string(),
            }
        }
        _ => e,
    }
}

/// `PRAGMA quick_check`: the file is a database and its pages hang
/// together. Run at every open, before any migration writes.
pub fn check(conn: &Connection) -> Result<(), StoreError> {
    let mut st = conn.prepare("PRAGMA quick_check")?;
    let problems: Vec<String> = st
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<_, _>>()?;
    match problems.as_slice() {
        [ok] if ok == "ok" => Ok(()),
        _ => Err(StoreError::Damaged {
            path: conn.path().map(PathBuf::from).unwrap_or_default(),
            detail: problems.into_iter().take(3).collect::<Vec<_>>().join("; "),
        }),
    }
}

/// Copies the store at `src` into the new file `dest`, consistently, while
/// a daemon may be writing it (SQLite's online backup: a read-only
/// connection, page by page, restarting if a write lands meanwhile), then
/// checks the copy. Returns the copy's size in bytes.
pub fn backup(src: &Path, dest: &Path) -> Result<u64, StoreError> {
    let from = Connection::open_with_flags(
        src,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Open {
        path: src.to_owned(),
        source,
    })?;
    from.busy_timeout(BUSY_TIMEOUT)?;
    let mut to = Connection::open(dest).map_err(|source| StoreError::Open {
        path: dest.to_owned(),
        source,
    })?;
    {
        let b = rusqlite::backup::Backup::new(&from, &mut to)?;
        b.run_to_completion(256, std::time::Duration::from_millis(5), None)
            .map_err(|e| opening(StoreError::Sqlite(e), src))?;
    }
    check(&to)?;
    drop(to);
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o600));
    }
    Ok(std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0))
}

/// Statements the connection keeps prepared: every query the repository
/// runs, with room to spare (parsing SQL was half of the LLM gateway's
/// CPU per request before statements were cached).
const STATEMENT_CACHE: usize = 256;

/// `query_row` and `execute` through the connection's statement cache.
pub(crate) trait Cached {
    /// [`Connection::query_row`], with the statement cached.
    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>;
    /// [`Connection::execute`], with the statement cached.
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
}

impl Cached for Connection {
    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }

    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }
}

fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // WAL lets readers run beside the writer; in-memory databases ignore it.
    let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;")?;
    Ok(())
}

/// The schema version this build knows.
pub fn latest_version() -> u32 {
    MIGRATIONS.last().map_or(0, |(v, _)| *v)
}

/// Applies every migration newer than the database's `user_version`.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = latest_version();
    if current > known {
        return Err(StoreError::TooNew {
            found: current,
            known,
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let wrap = |source| StoreError::Migrate {
            version: *version,
            source,
        };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(wrap)?;
        // Another process may have migrated while we waited for the lock.
        let now: u32 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(wrap)?;
        if now >= *version {
            continue;
        }
        tx.execute_batch(sql).map_err(wrap)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        tracing::info!(version, "applied store migration");
    }
    Ok(())
}

/// Reads the schema version (for `kennel doctor` and tests).
pub fn schema_version(conn: &Connection) -> Result<u32, StoreError> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
}
