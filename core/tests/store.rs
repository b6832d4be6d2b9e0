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
