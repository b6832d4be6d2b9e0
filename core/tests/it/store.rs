//! The store on a real SQLite file.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kennel_core::model::{Frontend, Identity, Role};
use kennel_core::names::UserName;
use kennel_core::store::{self, repo, Store, StoreError};

#[test]
fn migrates_from_empty_and_reopening_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kennel.db");
    let s = Store::open(&db).unwrap();
    let v = s.call_blocking(|c| store::schema_version(c)).unwrap();
    assert_eq!(v, store::latest_version());
    s.call_blocking(|c| repo::create_user(c, &UserName::new("ann").unwrap(), Role::Admin))
        .unwrap();
    drop(s);
    let s = Store::open(&db).unwrap();
    assert_eq!(s.call_blocking(|c| store::schema_version(c)).unwrap(), v);
    assert_eq!(s.call_blocking(|c| repo::count_users(c)).unwrap(), 1);
    let mode: String = s
        .call_blocking(|c| Ok(c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?))
        .unwrap();
    assert_eq!(mode, "wal");
    let fk: i64 = s
        .call_blocking(|c| Ok(c.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?))
        .unwrap();
    assert_eq!(fk, 1);
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kennel.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.pragma_update(None, "user_version", 999).unwrap();
    drop(c);
    assert!(matches!(
        Store::open(&db),
        Err(StoreError::TooNew { found: 999, .. })
    ));
}

#[test]
fn constraint_violations_are_typed() {
    let s = Store::open_in_memory().unwrap();
    let ann = UserName::new("ann").unwrap();
    s.call_blocking({
        let ann = ann.clone();
        move |c| repo::create_user(c, &ann, Role::Member)
    })
    .unwrap();
    let dup = s.call_blocking(move |c| repo::create_user(c, &ann, Role::Member));
    assert!(
        matches!(dup, Err(StoreError::AlreadyExists { ref what }) if what.contains("ann")),
        "{dup:?}"
    );
    let dangling =
        s.call_blocking(|c| repo::link_identity(c, &Identity::new(Frontend::Matrix, "@x:y"), 4242));
    assert!(
        matches!(dangling, Err(StoreError::Dangling { .. })),
        "{dangling:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_writers_lose_no_updates() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kennel.db");
    // Two handles = two connections, as two processes would have.
    let a = Store::open(&db).unwrap();
    let b = Store::open(&db).unwrap();
    a.call(|c| {
        c.execute_batch(
            "CREATE TABLE counter (n INTEGER NOT NULL); INSERT INTO counter VALUES (0);",
        )?;
        Ok(())
    })
    .await
    .unwrap();
    let bump = |s: Store| async move {
        for _ in 0..200 {
            s.write(|tx| {
                let n: i64 = tx.query_row("SELECT n FROM counter", [], |r| r.get(0))?;
                tx.execute("UPDATE counter SET n = ?1", [n + 1])?;
                Ok(())
            })
            .await
            .unwrap();
        }
    };
    let (ra, rb) = tokio::join!(tokio::spawn(bump(a.clone())), tokio::spawn(bump(b)));
    ra.unwrap();
    rb.unwrap();
    let n: i64 = a
        .call(|c| Ok(c.query_row("SELECT n FROM counter", [], |r| r.get(0))?))
        .await
        .unwrap();
    assert_eq!(n, 400);
}

fn users(s: &Store) -> u64 {
    s.call_blocking(|c| repo::count_users(c)).unwrap()
}

#[test]
fn a_damaged_file_is_refused_at_open_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    // Not a database at all.
    let db = dir.path().join("garbage.db");
    std::fs::write(&db, vec![0x5a; 8192]).unwrap();
    let e = Store::open(&db).unwrap_err();
    assert!(matches!(e, StoreError::Damaged { .. }), "{e:?}");
    assert!(e.to_string().contains("kennel restore"), "{e}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        vec![0x5a; 8192],
        "nothing was changed"
    );
    // A real store whose later pages were overwritten.
    let db = dir.path().join("kennel.db");
    let s = Store::open(&db).unwrap();
    for i in 0..200 {
        s.call_blocking(move |c| {
            repo::create_user(c, &UserName::new(&format!("u{i}")).unwrap(), Role::Member)
        })
        .unwrap();
    }
    s.call_blocking(|c| Ok(c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?))
        .unwrap();
    drop(s);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 4 * 4096, "{}", bytes.len());
    for b in bytes.iter_mut().skip(2 * 4096).take(2 * 4096) {
        *b = 0xff;
    }
    std::fs::write(&db, &bytes).unwrap();
    let e = Store::open(&db).unwrap_err();
    assert!(matches!(e, StoreError::Damaged { .. }), "{e:?}");
}

#[test]
fn a_full_disk_loses_only_the_change_being_written() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("kennel.db")).unwrap();
    s.call_blocking(|c| repo::create_user(c, &UserName::new("ann").unwrap(), Role::Admin))
        .unwrap();
    // SQLite reports a full disk when the file may not grow: the same
    // error a full filesystem gives (SQLITE_FULL).
    s.call_blocking(|c| {
        let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        c.pragma_update(None, "max_page_count", pages)?;
        Ok(())
    })
    .unwrap();
    let mut full = None;
    for i in 0..500 {
        match s.call_blocking(move |c| {
            repo::create_user(c, &UserName::new(&format!("m{i}")).unwrap(), Role::Member)
        }) {
            Ok(_) => {}
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let e = full.expect("the store never filled up");
    assert!(matches!(e, StoreError::Full), "{e:?}");
    let told = kennel_core::outcome::CommandError::from(e).to_string();
    assert!(
        told.contains("disk is full") && told.contains("not saved"),
        "{told}"
    );
    let before = users(&s);
    assert!(before >= 1);
    // Space again: everything committed is there, and writes work.
    s.call_blocking(|c| Ok(c.pragma_update(None, "max_page_count", 1_000_000)?))
        .unwrap();
    s.call_blocking(|c| repo::create_user(c, &UserName::new("later").unwrap(), Role::Member))
        .unwrap();
    assert_eq!(users(&s), before + 1);
}

#[test]
fn a_database_locked_by_another_process_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kennel.db");
    // A sqlite3 shell holding an exclusive lock on the file (in rollback
    // journal mode, a shell's default).
    let other = rusqlite::Connection::open(&db).unwrap();
    other
        .execute_batch("CREATE TABLE t (x); BEGIN EXCLUSIVE; INSERT INTO t VALUES (1);")
        .unwrap();
    let e = Store::open(&db).unwrap_err();
    assert!(matches!(e, StoreError::Locked { .. }), "{e:?}");
    assert!(e.to_string().contains("locked by another process"), "{e}");
    other.execute_batch("COMMIT").unwrap();
    drop(other);
    Store::open(&db).unwrap();
}

#[test]
fn an_online_backup_is_consistent_while_a_writer_runs() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kennel.db");
    let s = Store::open(&db).unwrap();
    s.call_blocking(|c| repo::create_user(c, &UserName::new("ann").unwrap(), Role::Admin))
        .unwrap();
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || {
            for i in 0..300 {
                s.call_blocking(move |c| {
                    repo::create_user(c, &UserName::new(&format!("w{i}")).unwrap(), Role::Member)
                })
                .unwrap();
            }
        })
    };
    let copy = dir.path().join("copy.db");
    let bytes = store::backup(&db, &copy).unwrap();
    assert!(bytes > 0);
    writer.join().unwrap();
    let restored = Store::open(&copy).unwrap();
    let n = users(&restored);
    assert!((1..=301).contains(&n), "{n}");
    assert!(restored
        .call_blocking(|c| repo::user_by_name(c, &UserName::new("ann").unwrap()))
        .unwrap()
        .is_some());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
        0o600
    );
}
