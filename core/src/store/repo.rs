//! Queries over a connection: one function per question or change.
//!
//! Functions take `&Connection` (a `Transaction` derefs to one), so callers
//! choose the transaction boundary: read-modify-write sequences run inside
//! [`super::Store::write`].

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{classify, Cached, StoreError};
use crate::keys::{Fingerprint, PublicKey};
use crate::model::{
    now, AccessRequest, AuditEvent, AuditOutcome, Checkpoint, Frontend, Identity, IdleStop,
    Project, ProjectState, Quota, RequestState, Resources, Role, Share, SshKeyRecord, Usage, User,
    UserId, Visibility,
};
use crate::names::{ProjectName, UserName};

fn text<T: std::str::FromStr<Err = E>, E: Into<StoreError>>(s: String) -> Result<T, StoreError> {
    s.parse::<T>().map_err(Into::into)
}

impl From<crate::names::NameError> for StoreError {
    fn from(e: crate::names::NameError) -> Self {
        StoreError::Invalid {
            what: e.to_string(),
        }
    }
}

impl From<crate::keys::KeyError> for StoreError {
    fn from(e: crate::keys::KeyError) -> Self {
        StoreError::Invalid {
            what: e.to_string(),
        }
    }
}

// ---------------------------------------------------------------- users

const USER_COLS: &str = "u.id, u.name, u.role, u.created_at";

fn user_row(r: &Row<'_>) -> rusqlite::Result<(i64, String, String, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

fn user_from((id, name, role, created_at): (i64, String, String, i64)) -> Result<User, StoreError> {
    Ok(User {
        id,
        name: text(name)?,
        role: text(role)?,
        created_at,
    })
}

/// How many users exist (zero on a fresh install).
pub fn count_users(conn: &Connection) -> Result<u64, StoreError> {
    Ok(conn.row("SELECT COUNT(*) FROM users", [], |r| r.get(0))?)
}

/// Creates a user. Fails with `AlreadyExists` if the name is taken.
pub fn create_user(conn: &Connection, name: &UserName, role: Role) -> Result<User, StoreError> {
    let at = now();
    conn.exec(
        "INSERT INTO users (name, role, created_at) VALUES (?1, ?2, ?3)",
        params![name.as_str(), role.as_str(), at],
    )
    .map_err(|e| classify(e, &format!("user {name}")))?;
    Ok(User {
        id: conn.last_insert_rowid(),
        name: name.clone(),
        role,
        created_at: at,
    })
}

/// Looks a user up by name.
pub fn user_by_name(conn: &Connection, name: &UserName) -> Result<Option<User>, StoreError> {
    conn.row(
        &format!("SELECT {USER_COLS} FROM users u WHERE u.name = ?1"),
        [name.as_str()],
        user_row,
    )
    .optional()?
    .map(user_from)
    .transpose()
}

/// Looks a user up by id.
pub fn user_by_id(conn: &Connection, id: UserId) -> Result<Option<User>, StoreError> {
    conn.row(
        &format!("SELECT {USER_COLS} FROM users u WHERE u.id = ?1"),
        [id],
        user_row,
    )
    .optional()?
    .map(user_from)
    .transpose()
}

/// The user an identity is linked to, if any.
pub fn user_by_identity(conn: &Connection, who: &Identity) -> Result<Option<User>, StoreError> {
    conn.row(
        &format!(
            "SELECT {USER_COLS} FROM users u JOIN identities i ON i.user_id = u.id
             WHERE i.frontend = ?1 AND i.external_id = ?2"
        ),
        [who.frontend.as_str(), who.external_id.as_str()],
        user_row,
    )
    .optional()?
    .map(user_from)
    .transpose()
}

/// The user owning an active key with this fingerprint (SSH login).
pub fn user_by_active_key(conn: &Connection, fp: &Fingerprint) -> Result<Option<User>, StoreError> {
    conn.row(
        &format!(
            "SELECT {USER_COLS} FROM users u JOIN ssh_keys k ON k.user_id = u.id
             WHERE k.fingerprint = ?1 AND k.state = 'active'"
        ),
        [fp.as_str()],
        user_row,
    )
    .optional()?
    .map(user_from)
    .transpose()
}

/// Links an identity to a user. Fails with `AlreadyExists` if linked already.
pub fn link_identity(conn: &Connection, who: &Identity, user: UserId) -> Result<(), StoreError> {
    conn.exec(
        "INSERT INTO identities (frontend, external_id, user_id, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![who.frontend.as_str(), who.external_id, user, now()],
    )
    .map_err(|e| classify(e, &format!("identity {who}")))?;
    Ok(())
}

/// Identities linked to a user.
pub fn identities_of(conn: &Connection, user: UserId) -> Result<Vec<Identity>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT frontend, external_id FROM identities WHERE user_id = ?1 ORDER BY frontend, external_id",
    )?;
    let rows = st.query_map([user], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    rows.map(|r| {
        let (f, e) = r?;
        Ok(Identity::new(text::<Frontend, _>(f)?, e))
    })
    .collect()
}

/// Every user, by name.
pub fn list_users(conn: &Connection) -> Result<Vec<User>, StoreError> {
    let mut st =
        conn.prepare_cached(&format!("SELECT {USER_COLS} FROM users u ORDER BY u.name"))?;
    let rows = st.query_map([], user_row)?;
    rows.map(|r| user_from(r?)).collect()
}

/// The longest chat name kept for an identity.
const MAX_SEEN_NAME: usize = 64;

/// Notes the name a chat network shows for an identity (kept to
/// [`MAX_SEEN_NAME`] characters; the last one seen wins).
pub fn remember_identity_name(
    conn: &Connection,
    who: &Identity,
    name: &str,
) -> Result<(), StoreError> {
    let name: String = name.chars().take(MAX_SEEN_NAME).collect();
    conn.exec(
        "INSERT INTO identity_names (frontend, external_id, name, seen_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (frontend, external_id) DO UPDATE SET name = ?3, seen_at = ?4",
        params![who.frontend.as_str(), who.external_id, name, now()],
    )?;
    Ok(())
}

/// The name last seen for an identity, if its front end gave one.
pub fn identity_name(conn: &Connection, who: &Identity) -> Result<Option<String>, StoreError> {
    Ok(conn
        .row(
            "SELECT name FROM identity_names WHERE frontend = ?1 AND external_id = ?2",
            params![who.frontend.as_str(), who.external_id],
            |r| r.get(0),
        )
        .optional()?)
}

/// Renames a user (everything else refers to the id).
pub fn rename_user(conn: &Connection, from: &UserName, to: &UserName) -> Result<(), StoreError> {
    conn.exec(
        "UPDATE users SET name = ?2 WHERE name = ?1",
        params![from.as_str(), to.as_str()],
    )
    .map_err(|e| classify(e, "user name"))?;
    Ok(())
}

/// A free user name derived from `hint` (`ann`, `ann2`, ...).
pub fn free_user_name(conn: &Connection, hint: &str) -> Result<UserName, StoreError> {
    let base = UserName::derive(hint);
    if user_by_name(conn, &base)?.is_none() {
        return Ok(base);
    }
    for n in 2..10_000u32 {
        let mut s = base.as_str().to_owned();
        let suffix = n.to_string();
        s.truncate(crate::names::USER_NAME_MAX - suffix.len());
        s.push_str(&suffix);
        let candidate = UserName::new(&s)?;
        if user_by_name(conn, &candidate)?.is_none() {
            return Ok(candidate);
        }
    }
    Err(StoreError::AlreadyExists {
        what: format!("every user name derived from {hint:?}"),
    })
}

// ---------------------------------------------------------------- keys

const KEY_COLS: &str =
    "k.id, u.name, k.fingerprint, k.algorithm, k.openssh, k.label, k.state, k.created_at";

type KeyRow = (
    i64,
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    i64,
);

fn key_row(r: &Row<'_>) -> rusqlite::Result<KeyRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

fn key_from(
    (id, user, fp, algorithm, openssh, label, state, created_at): KeyRow,
) -> Result<SshKeyRecord, StoreError> {
    Ok(SshKeyRecord {
        id,
        user: text(user)?,
        fingerprint: text(fp)?,
        algorithm,
        openssh,
        label,
        state: text(state)?,
        created_at,
    })
}

/// Adds an active key for a user; re-adding a revoked key of the same user
/// reactivates it. A key held by another user is `AlreadyExists`.
pub fn add_key(
    conn: &Connection,
    user: UserId,
    key: &PublicKey,
    label: Option<&str>,
) -> Result<SshKeyRecord, StoreError> {
    let label = label.or(key.comment());
    let changed = conn.exec(
        "UPDATE ssh_keys SET state = 'active', revoked_at = NULL, label = COALESCE(?3, label)
         WHERE fingerprint = ?1 AND user_id = ?2",
        params![key.fingerprint().as_str(), user, label],
    )?;
    if changed == 0 {
        conn.exec(
            "INSERT INTO ssh_keys (user_id, fingerprint, algorithm, openssh, label, state, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'active', ?6)",
            params![
                user,
                key.fingerprint().as_str(),
                key.algorithm(),
                key.openssh(),
                label,
                now()
            ],
        )
        .map_err(|e| classify(e, &format!("key {}", key.fingerprint())))?;
    }
    key_by_fingerprint(conn, key.fingerprint())?.ok_or_else(|| StoreError::Invalid {
        what: "a key vanished while being added".into(),
    })
}

/// A key by fingerprint, whoever holds it.
pub fn key_by_fingerprint(
    conn: &Connection,
    fp: &Fingerprint,
) -> Result<Option<SshKeyRecord>, StoreError> {
    conn.row(
        &format!(
            "SELECT {KEY_COLS} FROM ssh_keys k JOIN users u ON u.id = k.user_id WHERE k.fingerprint = ?1"
        ),
        [fp.as_str()],
        key_row,
    )
    .optional()?
    .map(key_from)
    .transpose()
}

/// A user's keys, active first.
pub fn keys_of(conn: &Connection, user: UserId) -> Result<Vec<SshKeyRecord>, StoreError> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {KEY_COLS} FROM ssh_keys k JOIN users u ON u.id = k.user_id
         WHERE k.user_id = ?1 ORDER BY k.state, k.created_at, k.id"
    ))?;
    let rows = st.query_map([user], key_row)?;
    rows.map(|r| key_from(r?)).collect()
}

/// Revokes a key. Returns it, or `None` if no such key exists.
pub fn revoke_key(conn: &Connection, fp: &Fingerprint) -> Result<Option<SshKeyRecord>, StoreError> {
    conn.exec(
        "UPDATE ssh_keys SET state = 'revoked', revoked_at = ?2 WHERE fingerprint = ?1 AND state = 'active'",
        params![fp.as_str(), now()],
    )?;
    key_by_fingerprint(conn, fp)
}

// ---------------------------------------------------------------- access requests

const REQ_COLS: &str = "r.id, r.frontend, r.external_id, u.name, r.fingerprint, r.algorithm,
    r.openssh, r.note, r.state, d.name, r.decided_at, r.reason, r.created_at";
const REQ_FROM: &str = "access_requests r LEFT JOIN users u ON u.id = r.user_id
    LEFT JOIN users d ON d.id = r.decided_by";

fn req_from(r: &Row<'_>) -> rusqlite::Result<Result<AccessRequest, StoreError>> {
    let frontend: String = r.get(1)?;
    let user: Option<String> = r.get(3)?;
    let fp: String = r.get(4)?;
    let state: String = r.get(8)?;
    let decided_by: Option<String> = r.get(9)?;
    let id: i64 = r.get(0)?;
    let external_id: String = r.get(2)?;
    let algorithm: String = r.get(5)?;
    let openssh: String = r.get(6)?;
    let note: Option<String> = r.get(7)?;
    let decided_at: Option<i64> = r.get(10)?;
    let reason: Option<String> = r.get(11)?;
    let created_at: i64 = r.get(12)?;
    Ok((|| {
        Ok(AccessRequest {
            id,
            identity: Identity::new(text(frontend)?, external_id),
            user: user.map(text).transpose()?,
            fingerprint: text(fp)?,
            algorithm,
            openssh,
            note,
            state: text(state)?,
            decided_by: decided_by.map(text).transpose()?,
            decided_at,
            reason,
            created_at,
        })
    })())
}

/// (pending requests, requests filed in the last `window_secs`, whether
/// `fingerprint` has a pending request already), for the filing limits.
pub fn request_counts(
    conn: &Connection,
    fingerprint: &Fingerprint,
    window_secs: i64,
) -> Result<(u32, u32, bool), StoreError> {
    let pending: u32 = conn.row(
        "SELECT count(*) FROM access_requests WHERE state = 'pending'",
        [],
        |r| r.get(0),
    )?;
    let recent: u32 = conn.row(
        "SELECT count(*) FROM access_requests WHERE created_at > ?1",
        [now() - window_secs],
        |r| r.get(0),
    )?;
    let mine: bool = conn.row(
        "SELECT EXISTS (SELECT 1 FROM access_requests WHERE fingerprint = ?1 AND state = 'pending')",
        [fingerprint.as_str()],
        |r| r.get(0),
    )?;
    Ok((pending, recent, mine))
}

/// Files a pending request. If one is already pending for this key, that
/// one is returned unchanged (`false`); otherwise the new one (`true`).
pub fn file_request(
    conn: &Connection,
    who: &Identity,
    user: Option<UserId>,
    key: &PublicKey,
    note: Option<&str>,
) -> Result<(AccessRequest, bool), StoreError> {
    let existing: Option<i64> = conn
        .row(
            "SELECT id FROM access_requests WHERE fingerprint = ?1 AND state = 'pending'",
            [key.fingerprint().as_str()],
            |r| r.get(0),
        )
        .optional()?;
    let (id, new) = match existing {
        Some(id) => (id, false),
        None => {
            conn.exec(
                "INSERT INTO access_requests (frontend, external_id, user_id, fingerprint, algorithm,
                     openssh, note, state, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?8)",
                params![
                    who.frontend.as_str(),
                    who.external_id,
                    user,
                    key.fingerprint().as_str(),
                    key.algorithm(),
                    key.to_string(),
                    note,
                    now()
                ],
            )?;
            (conn.last_insert_rowid(), true)
        }
    };
    let req = request_by_id(conn, id)?.ok_or_else(|| StoreError::Invalid {
        what: "an access request vanished while being filed".into(),
    })?;
    Ok((req, new))
}

/// One request by id.
pub fn request_by_id(conn: &Connection, id: i64) -> Result<Option<AccessRequest>, StoreError> {
    conn.row(
        &format!("SELECT {REQ_COLS} FROM {REQ_FROM} WHERE r.id = ?1"),
        [id],
        req_from,
    )
    .optional()?
    .transpose()
}

/// Requests, newest first; pending only unless `all`.
pub fn list_requests(conn: &Connection, all: bool) -> Result<Vec<AccessRequest>, StoreError> {
    let filter = if all { "" } else { "WHERE r.state = 'pending'" };
    let mut st = conn.prepare_cached(&format!(
        "SELECT {REQ_COLS} FROM {REQ_FROM} {filter} ORDER BY r.id DESC LIMIT 200"
    ))?;
    let rows = st.query_map([], req_from)?;
    rows.map(|r| r?).collect()
}

/// Records a decision on a pending request. Returns `false` if it was not
/// pending any more (decided elsewhere meanwhile), changing nothing.
pub fn decide_request(
    conn: &Connection,
    id: i64,
    state: RequestState,
    by: UserId,
    reason: Option<&str>,
    user: Option<UserId>,
) -> Result<bool, StoreError> {
    let n = conn.exec(
        "UPDATE access_requests SET state = ?2, decided_by = ?3, decided_at = ?4, reason = ?5,
             user_id = COALESCE(?6, user_id)
         WHERE id = ?1 AND state = 'pending'",
        params![id, state.as_str(), by, now(), reason, user],
    )?;
    Ok(n == 1)
}

// ---------------------------------------------------------------- projects

const PROJECT_COLS: &str = "p.id, p.name, u.name, p.stack, p.git_url, p.source_path, p.template,
    p.vcpus, p.memory_mib, p.disk_mib, p.app_port, p.visibility, p.state, p.created_at, p.updated_at,
    p.state_note, p.idle_stop_secs,
    (SELECT group_concat(t.tag, ' ') FROM project_tags t WHERE t.project_id = p.id)";

fn project_from(r: &Row<'_>) -> rusqlite::Result<Result<Project, StoreError>> {
    let name: String = r.get(1)?;
    let owner: String = r.get(2)?;
    let visibility: String = r.get(11)?;
    let state: String = r.get(12)?;
    let (id, stack, git_url, source_path, template) =
        (r.get(0)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?);
    let resources = Resources {
        vcpus: r.get(7)?,
        memory_mib: r.get(8)?,
        disk_mib: r.get(9)?,
    };
    let (app_port, created_at, updated_at) = (r.get(10)?, r.get(13)?, r.get(14)?);
    let state_note: Option<String> = r.get(15)?;
    let idle_stop: Option<u64> = r.get(16)?;
    let tags: Option<String> = r.get(17)?;
    let mut tags: Vec<String> = tags
        .as_deref()
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    tags.sort();
    Ok((|| {
        Ok(Project {
            id,
            name: text(name)?,
            owner: text(owner)?,
            stack,
            git_url,
            source_path,
            template,
            resources,
            app_port,
            visibility: text(visibility)?,
            state: text(state)?,
            state_note,
            idle_stop: idle_stop.map(IdleStop::from_secs),
            tags,
            created_at,
            updated_at,
        })
    })())
}

/// What a new project row holds.
#[derive(Debug, Clone)]
pub struct NewProjectRow<'a> {
    pub name: &'a ProjectName,
    pub owner: UserId,
    pub stack: &'a str,
    pub git_url: Option<&'a str>,
    pub source_path: &'a str,
    pub template: Option<&'a str>,
    pub resources: Resources,
    pub app_port: u16,
    pub state: ProjectState,
}

/// Inserts a project. A taken name is `AlreadyExists`.
pub fn insert_project(conn: &Connection, p: &NewProjectRow<'_>) -> Result<Project, StoreError> {
    let at = now();
    conn.exec(
        "INSERT INTO projects (name, owner_id, stack, git_url, source_path, template, vcpus,
             memory_mib, disk_mib, app_port, visibility, state, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'private', ?11, ?12, ?12)",
        params![
            p.name.as_str(),
            p.owner,
            p.stack,
            p.git_url,
            p.source_path,
            p.template,
            p.resources.vcpus,
            p.resources.memory_mib,
            p.resources.disk_mib,
            p.app_port,
            p.state.as_str(),
            at
        ],
    )
    .map_err(|e| classify(e, &format!("project {}", p.name)))?;
    project_by_name(conn, p.name)?.ok_or_else(|| StoreError::Invalid {
        what: "a project vanished while being created".into(),
    })
}

/// A project by name.
pub fn project_by_name(
    conn: &Connection,
    name: &ProjectName,
) -> Result<Option<Project>, StoreError> {
    conn.row(
        &format!("SELECT {PROJECT_COLS} FROM projects p JOIN users u ON u.id = p.owner_id WHERE p.name = ?1"),
        [name.as_str()],
        project_from,
    )
    .optional()?
    .transpose()
}

/// Projects a user owns or has a share of; every project if `user` is `None`.
pub fn list_projects(conn: &Connection, user: Option<UserId>) -> Result<Vec<Project>, StoreError> {
    list_projects_tagged(conn, user, None)
}

/// [`list_projects`], only those carrying `tag` when one is given.
pub fn list_projects_tagged(
    conn: &Connection,
    user: Option<UserId>,
    tag: Option<&str>,
) -> Result<Vec<Project>, StoreError> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {PROJECT_COLS} FROM projects p JOIN users u ON u.id = p.owner_id
         WHERE (?1 IS NULL OR p.owner_id = ?1
            OR EXISTS (SELECT 1 FROM shares s WHERE s.project_id = p.id AND s.user_id = ?1))
           AND (?2 IS NULL
            OR EXISTS (SELECT 1 FROM project_tags t WHERE t.project_id = p.id AND t.tag = ?2))
         ORDER BY p.name"
    ))?;
    let rows = st.query_map(params![user, tag], project_from)?;
    rows.map(|r| r?).collect()
}

// ---------------------------------------------------------------- tags

/// Adds tags to a project (adding one it has is a no-op). Returns its
/// tags after, sorted.
pub fn add_tags(conn: &Connection, project: i64, tags: &[&str]) -> Result<Vec<String>, StoreError> {
    let tx = conn.unchecked_transaction()?;
    for t in tags {
        tx.exec(
            "INSERT OR IGNORE INTO project_tags (project_id, tag) VALUES (?1, ?2)",
            params![project, t],
        )?;
    }
    let now = tags_of(&tx, project)?;
    tx.commit()?;
    Ok(now)
}

/// Removes a tag; whether the project had it.
pub fn remove_tag(conn: &Connection, project: i64, tag: &str) -> Result<bool, StoreError> {
    let n = conn.exec(
        "DELETE FROM project_tags WHERE project_id = ?1 AND tag = ?2",
        params![project, tag],
    )?;
    Ok(n > 0)
}

/// A project's tags, sorted.
pub fn tags_of(conn: &Connection, project: i64) -> Result<Vec<String>, StoreError> {
    let mut st =
        conn.prepare_cached("SELECT tag FROM project_tags WHERE project_id = ?1 ORDER BY tag")?;
    let rows = st.query_map([project], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Sets a project's lifecycle state.
pub fn set_project_state(
    conn: &Connection,
    name: &ProjectName,
    state: ProjectState,
) -> Result<(), StoreError> {
    set_project_state_noted(conn, name, state, None)
}

/// Sets a project's lifecycle state with why Kennel set it (shown beside
/// the state until the next change).
pub fn set_project_state_noted(
    conn: &Connection,
    name: &ProjectName,
    state: ProjectState,
    note: Option<&str>,
) -> Result<(), StoreError> {
    conn.exec(
        "UPDATE projects SET state = ?2, state_note = ?3, updated_at = ?4 WHERE name = ?1",
        params![name.as_str(), state.as_str(), note, now()],
    )?;
    Ok(())
}

/// Forgets where a project's VM answered (it stopped): the gateways then
/// know to start it rather than dial a dead address.
pub fn clear_route(conn: &Connection, project: &ProjectName) -> Result<(), StoreError> {
    conn.exec(
        "DELETE FROM routes WHERE project_id = (SELECT id FROM projects WHERE name = ?1)",
        [project.as_str()],
    )?;
    Ok(())
}

/// Sets a project's visibility.
pub fn set_visibility(
    conn: &Connection,
    name: &ProjectName,
    v: Visibility,
) -> Result<(), StoreError> {
    conn.exec(
        "UPDATE projects SET visibility = ?2, updated_at = ?3 WHERE name = ?1",
        params![name.as_str(), v.as_str(), now()],
    )?;
    Ok(())
}

/// Sets a project's app port.
pub fn set_app_port(conn: &Connection, name: &ProjectName, port: u16) -> Result<(), StoreError> {
    conn.exec(
        "UPDATE projects SET app_port = ?2, updated_at = ?3 WHERE name = ?1",
        params![name.as_str(), port, now()],
    )
    .map_err(|e| classify(e, "app port"))?;
    Ok(())
}

/// Sets a project's resources and app port (a rollback restores them).
pub fn set_shape(
    conn: &Connection,
    name: &ProjectName,
    resources: Resources,
    app_port: u16,
) -> Result<(), StoreError> {
    conn.exec(
        "UPDATE projects SET vcpus = ?2, memory_mib = ?3, disk_mib = ?4, app_port = ?5,
             updated_at = ?6 WHERE name = ?1",
        params![
            name.as_str(),
            resources.vcpus,
            resources.memory_mib,
            resources.disk_mib,
            app_port,
            now()
        ],
    )
    .map_err(|e| classify(e, "resources"))?;
    Ok(())
}

/// Sets a project's own idle limit (`None`: the configured default).
pub fn set_idle_stop(
    conn: &Connection,
    name: &ProjectName,
    limit: Option<IdleStop>,
) -> Result<(), StoreError> {
    conn.exec(
        "UPDATE projects SET idle_stop_secs = ?2, updated_at = ?3 WHERE name = ?1",
        params![name.as_str(), limit.map(IdleStop::to_secs), now()],
    )?;
    Ok(())
}

/// How long each running project had been idle when last written down.
pub fn recorded_idle(conn: &Connection) -> Result<Vec<(ProjectName, u64)>, StoreError> {
    let mut st =
        conn.prepare_cached("SELECT name, idle_secs FROM projects WHERE state = 'running'")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?;
    let mut out = Vec::new();
    for r in rows {
        let (n, secs) = r?;
        out.push((text(n)?, secs));
    }
    Ok(out)
}

/// Writes down how long projects have been idle (0 for one just started).
/// Leaves `updated_at` alone: this is bookkeeping, not a change.
pub fn record_idle(conn: &Connection, idle: &[(ProjectName, u64)]) -> Result<(), StoreError> {
    let mut st = conn.prepare_cached("UPDATE projects SET idle_secs = ?2 WHERE name = ?1")?;
    for (n, secs) in idle {
        st.execute(params![n.as_str(), secs])?;
    }
    Ok(())
}

/// Deletes a project row (and its shares).
pub fn delete_project(conn: &Connection, name: &ProjectName) -> Result<bool, StoreError> {
    Ok(conn.exec("DELETE FROM projects WHERE name = ?1", [name.as_str()])? == 1)
}

/// What a user's projects add up to; their checkpoints count as disk.
pub fn usage_of(conn: &Connection, user: UserId) -> Result<Usage, StoreError> {
    let checkpoints = checkpoint_mib_of(conn, user)?;
    let mut usage = conn.row(
        "SELECT COUNT(*), COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mib), 0), COALESCE(SUM(disk_mib), 0)
         FROM projects WHERE owner_id = ?1",
        [user],
        |r| {
            Ok(Usage {
                projects: r.get(0)?,
                vcpus: r.get(1)?,
                memory_mib: r.get(2)?,
                disk_mib: r.get(3)?,
            })
        },
    )?;
    usage.disk_mib = usage.disk_mib.saturating_add(checkpoints);
    Ok(usage)
}

/// Active keys (`type base64`) of everyone with SSH access to a project:
/// its owner and users it is shared with for SSH.
pub fn ssh_keys_for_project(
    conn: &Connection,
    project: &ProjectName,
) -> Result<Vec<String>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT k.openssh FROM ssh_keys k JOIN projects p ON p.name = ?1
         WHERE k.state = 'active' AND (k.user_id = p.owner_id OR EXISTS (
             SELECT 1 FROM shares s WHERE s.project_id = p.id AND s.user_id = k.user_id AND s.ssh = 1))
         ORDER BY k.id",
    )?;
    let rows = st.query_map([project.as_str()], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---------------------------------------------------------------- shares

/// Shares a project with a user (replacing any previous share).
pub fn upsert_share(
    conn: &Connection,
    project: i64,
    user: UserId,
    ssh: bool,
    web: bool,
) -> Result<(), StoreError> {
    conn.exec(
        "INSERT INTO shares (project_id, user_id, ssh, web) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (project_id, user_id) DO UPDATE SET ssh = excluded.ssh, web = excluded.web",
        params![project, user, ssh, web],
    )
    .map_err(|e| classify(e, "share"))?;
    Ok(())
}

/// Removes a share; `false` if there was none.
pub fn remove_share(conn: &Connection, project: i64, user: UserId) -> Result<bool, StoreError> {
    Ok(conn.exec(
        "DELETE FROM shares WHERE project_id = ?1 AND user_id = ?2",
        params![project, user],
    )? == 1)
}

/// A user's share of a project, if any.
pub fn share_of(
    conn: &Connection,
    project: i64,
    user: UserId,
) -> Result<Option<(bool, bool)>, StoreError> {
    Ok(conn
        .row(
            "SELECT ssh, web FROM shares WHERE project_id = ?1 AND user_id = ?2",
            params![project, user],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

/// Everyone a project is shared with.
pub fn shares_of(conn: &Connection, project: &ProjectName) -> Result<Vec<Share>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT p.name, u.name, s.ssh, s.web FROM shares s JOIN projects p ON p.id = s.project_id
         JOIN users u ON u.id = s.user_id WHERE p.name = ?1 ORDER BY u.name",
    )?;
    let rows = st.query_map([project.as_str()], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get(2)?,
            r.get(3)?,
        ))
    })?;
    rows.map(|r| {
        let (p, u, ssh, web) = r?;
        Ok(Share {
            project: text(p)?,
            user: text(u)?,
            ssh,
            web,
        })
    })
    .collect()
}

// ---------------------------------------------------------------- quotas

/// The quota of a role.
pub fn quota_for(conn: &Connection, role: Role) -> Result<Quota, StoreError> {
    Ok(conn
        .row(
            "SELECT projects, vcpus, memory_mib, disk_mib FROM quotas WHERE role = ?1",
            [role.as_str()],
            |r| {
                Ok(Quota {
                    role,
                    projects: r.get(0)?,
                    vcpus: r.get(1)?,
                    memory_mib: r.get(2)?,
                    disk_mib: r.get(3)?,
                })
            },
        )
        .optional()?
        .unwrap_or(Quota {
            role,
            projects: Some(0),
            vcpus: Some(0),
            memory_mib: Some(0),
            disk_mib: Some(0),
        }))
}

/// Which limits of a user's quota are their own (not the role's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Personal {
    pub projects: bool,
    pub vcpus: bool,
    pub memory_mib: bool,
    pub disk_mib: bool,
}

/// A user's quota: their role's, with the limits set for them in its
/// place; and which those are.
pub fn quota_of(
    conn: &Connection,
    user: UserId,
    role: Role,
) -> Result<(Quota, Personal), StoreError> {
    let mut q = quota_for(conn, role)?;
    let own: Option<[Option<i64>; 4]> = conn
        .row(
            "SELECT projects, vcpus, memory_mib, disk_mib FROM user_quotas WHERE user_id = ?1",
            [user],
            |r| Ok([r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?]),
        )
        .optional()?;
    let mut personal = Personal::default();
    let Some([projects, vcpus, memory, disk]) = own else {
        return Ok((q, personal));
    };
    // -1 is unlimited; other values were checked when set.
    let limit = |v: i64| u64::try_from(v).ok();
    let count = |v: i64| limit(v).map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    if let Some(v) = projects {
        (q.projects, personal.projects) = (count(v), true);
    }
    if let Some(v) = vcpus {
        (q.vcpus, personal.vcpus) = (count(v), true);
    }
    if let Some(v) = memory {
        (q.memory_mib, personal.memory_mib) = (limit(v), true);
    }
    if let Some(v) = disk {
        (q.disk_mib, personal.disk_mib) = (limit(v), true);
    }
    Ok((q, personal))
}

/// Sets the limits `change` names for a user (others stay as they are).
/// Several statements: run it inside a write transaction (`Store::write`).
pub fn set_user_quota(
    conn: &Connection,
    user: UserId,
    change: &crate::command::QuotaChange,
) -> Result<(), StoreError> {
    use crate::command::Limit;
    // Each named column: NULL (the role's), -1 (unlimited) or the limit.
    let col = |l: Option<Limit>| -> (bool, Option<i64>) {
        match l {
            None => (false, None),
            Some(Limit::Default) => (true, None),
            Some(Limit::Unlimited) => (true, Some(-1)),
            Some(Limit::At(n)) => (true, Some(i64::try_from(n).unwrap_or(i64::MAX))),
        }
    };
    conn.exec(
        "INSERT OR IGNORE INTO user_quotas (user_id) VALUES (?1)",
        [user],
    )?;
    for (name, l) in [
        ("projects", change.projects),
        ("vcpus", change.vcpus),
        ("memory_mib", change.memory_mib),
        ("disk_mib", change.disk_mib),
    ] {
        let (named, value) = col(l);
        if named {
            // The column name is one of the four above, never input.
            conn.exec(
                &format!("UPDATE user_quotas SET {name} = ?2 WHERE user_id = ?1"),
                params![user, value],
            )?;
        }
    }
    // A row with nothing of its own left goes.
    conn.exec(
        "DELETE FROM user_quotas WHERE user_id = ?1 AND projects IS NULL AND vcpus IS NULL
             AND memory_mib IS NULL AND disk_mib IS NULL",
        [user],
    )?;
    Ok(())
}

// ---------------------------------------------------------------- VM slots

/// The project's slot, taking the lowest free one in `2..=max` that is not
/// in `skip` if it has none.
pub fn allocate_slot(
    conn: &Connection,
    project: &str,
    max: u32,
    skip: &[u32],
) -> Result<u32, StoreError> {
    if let Some(s) = slot_of(conn, project)? {
        if !skip.contains(&s) {
            return Ok(s);
        }
        release_slot(conn, project)?;
    }
    let taken: Vec<u32> = {
        let mut st = conn.prepare_cached("SELECT slot FROM vm_slots ORDER BY slot")?;
        let rows = st.query_map([], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let slot = (2..=max)
        .find(|s| taken.binary_search(s).is_err() && !skip.contains(s))
        .ok_or_else(|| StoreError::Invalid {
            what: format!("every VM slot up to {max} is taken"),
        })?;
    conn.exec(
        "INSERT INTO vm_slots (project, slot, created_at) VALUES (?1, ?2, ?3)",
        params![project, slot, now()],
    )
    .map_err(|e| classify(e, &format!("VM slot {slot}")))?;
    Ok(slot)
}

/// The project's slot, if it holds one.
pub fn slot_of(conn: &Connection, project: &str) -> Result<Option<u32>, StoreError> {
    Ok(conn
        .row(
            "SELECT slot FROM vm_slots WHERE project = ?1",
            [project],
            |r| r.get(0),
        )
        .optional()?)
}

/// Releases the project's slot.
pub fn release_slot(conn: &Connection, project: &str) -> Result<(), StoreError> {
    conn.exec("DELETE FROM vm_slots WHERE project = ?1", [project])?;
    Ok(())
}

/// Every (project, slot).
pub fn all_slots(conn: &Connection) -> Result<Vec<(String, u32)>, StoreError> {
    let mut st = conn.prepare_cached("SELECT project, slot FROM vm_slots ORDER BY slot")?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---------------------------------------------------------------- confirmations

/// Remembers that `who` must confirm `command` (at `step`) before `expires_at`.
pub fn set_confirmation(
    conn: &Connection,
    who: &Identity,
    command: &str,
    step: u32,
    expires_at: i64,
) -> Result<(), StoreError> {
    conn.exec(
        "INSERT INTO confirmations (frontend, external_id, command, step, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (frontend, external_id) DO UPDATE SET command = excluded.command, step = excluded.step,
             expires_at = excluded.expires_at",
        params![who.frontend.as_str(), who.external_id, command, step, expires_at],
    )?;
    Ok(())
}

/// Takes (and forgets) what `who` was asked to confirm, if it has not expired.
pub fn take_confirmation(
    conn: &Connection,
    who: &Identity,
) -> Result<Option<(String, u32)>, StoreError> {
    let row: Option<(String, u32, i64)> = conn
        .row(
            "SELECT command, step, expires_at FROM confirmations WHERE frontend = ?1 AND external_id = ?2",
            params![who.frontend.as_str(), who.external_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    conn.exec(
        "DELETE FROM confirmations WHERE frontend = ?1 AND external_id = ?2",
        params![who.frontend.as_str(), who.external_id],
    )?;
    Ok(row
        .filter(|(_, _, exp)| *exp >= now())
        .map(|(c, s, _)| (c, s)))
}

// ---------------------------------------------------------------- secrets

/// Stores a user's secret.
pub fn set_secret(
    conn: &Connection,
    user: UserId,
    name: &str,
    value: &str,
) -> Result<(), StoreError> {
    conn.exec(
        "INSERT INTO secrets (user_id, name, value, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (user_id, name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        params![user, name, value, now()],
    )?;
    Ok(())
}

/// A user's secret.
pub fn secret(conn: &Connection, user: UserId, name: &str) -> Result<Option<String>, StoreError> {
    Ok(conn
        .row(
            "SELECT value FROM secrets WHERE user_id = ?1 AND name = ?2",
            params![user, name],
            |r| r.get(0),
        )
        .optional()?)
}

/// Deletes a user's secret; `false` if there was none.
pub fn remove_secret(conn: &Connection, user: UserId, name: &str) -> Result<bool, StoreError> {
    Ok(conn.exec(
        "DELETE FROM secrets WHERE user_id = ?1 AND name = ?2",
        params![user, name],
    )? == 1)
}

/// The names of a user's secrets.
pub fn secret_names(conn: &Connection, user: UserId) -> Result<Vec<String>, StoreError> {
    let mut st =
        conn.prepare_cached("SELECT name FROM secrets WHERE user_id = ?1 ORDER BY name")?;
    let rows = st.query_map([user], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---------------------------------------------------------------- agent runs

/// Records an agent run as it starts; its id.
pub fn insert_agent_run(
    conn: &Connection,
    project: &ProjectName,
    user: Option<UserId>,
    agent: &str,
    task: &str,
    checkpoint: &str,
) -> Result<i64, StoreError> {
    conn.exec(
        "INSERT INTO agent_runs (project_id, user_id, agent, task, checkpoint, started_at, tokens)
         SELECT id, ?2, ?3, ?4, ?5, ?6, 0 FROM projects WHERE name = ?1",
        params![project.as_str(), user, agent, task, checkpoint, now()],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Records how an agent run ended; the LLM tokens its project used
/// while it ran ([`add_agent_tokens`]).
pub fn finish_agent_run(
    conn: &Connection,
    id: i64,
    exit_code: i32,
    diffstat: Option<&str>,
) -> Result<u64, StoreError> {
    conn.exec(
        "UPDATE agent_runs SET ended_at = ?2, exit_code = ?3, diffstat = ?4 WHERE id = ?1",
        params![id, now(), exit_code, diffstat],
    )?;
    let tokens: Option<i64> = conn
        .row("SELECT tokens FROM agent_runs WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?
        .flatten();
    Ok(tokens.unwrap_or(0).max(0).unsigned_abs())
}

/// Adds `tokens` (an LLM answer from `project`'s VM) to the project's
/// agent run, if one runs: what the run's summary reports, whoever else
/// the owner's LLM use came from meanwhile.
pub fn add_agent_tokens(
    conn: &Connection,
    project: &ProjectName,
    tokens: u64,
) -> Result<(), StoreError> {
    conn.exec(
        "UPDATE agent_runs SET tokens = COALESCE(tokens, 0) + ?2
         WHERE ended_at IS NULL AND project_id = (SELECT id FROM projects WHERE name = ?1)",
        params![project.as_str(), i64::try_from(tokens).unwrap_or(i64::MAX)],
    )?;
    Ok(())
}

/// A project's agent runs, newest first (at most `limit`).
pub fn agent_runs_of(
    conn: &Connection,
    project: &ProjectName,
    limit: u32,
) -> Result<Vec<crate::model::AgentRun>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT a.id, u.name, a.agent, a.task, a.checkpoint, a.started_at, a.ended_at,
                a.exit_code, a.tokens, a.diffstat
         FROM agent_runs a JOIN projects p ON p.id = a.project_id
         LEFT JOIN users u ON u.id = a.user_id
         WHERE p.name = ?1 ORDER BY a.id DESC LIMIT ?2",
    )?;
    let rows = st.query_map(params![project.as_str(), limit], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, Option<i64>>(6)?,
            r.get::<_, Option<i32>>(7)?,
            r.get::<_, Option<i64>>(8)?,
            r.get::<_, Option<String>>(9)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, user, agent, task, checkpoint, started_at, ended_at, exit_code, tokens, diffstat) =
            row?;
        out.push(crate::model::AgentRun {
            id,
            user: user.map(text::<UserName, _>).transpose()?,
            agent,
            task,
            checkpoint,
            started_at,
            ended_at,
            exit_code,
            tokens: tokens.map(|t| t.max(0).unsigned_abs()),
            diffstat,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------- LLM use

/// Adds one request and `tokens` to `user`'s count for `day`; returns the
/// day's totals after it.
pub fn add_llm_use(
    conn: &Connection,
    user: UserId,
    day: &str,
    tokens: u64,
) -> Result<(u64, u64), StoreError> {
    let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
    conn.exec(
        "INSERT INTO llm_usage (user_id, day, requests, tokens) VALUES (?1, ?2, 1, ?3)
         ON CONFLICT (user_id, day) DO UPDATE SET requests = requests + 1, tokens = tokens + excluded.tokens",
        params![user, day, tokens],
    )?;
    llm_use(conn, user, day)
}

/// `user`'s (requests, tokens) on `day`.
pub fn llm_use(conn: &Connection, user: UserId, day: &str) -> Result<(u64, u64), StoreError> {
    let row: Option<(i64, i64)> = conn
        .row(
            "SELECT requests, tokens FROM llm_usage WHERE user_id = ?1 AND day = ?2",
            params![user, day],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (r, t) = row.unwrap_or((0, 0));
    Ok((r.max(0).unsigned_abs(), t.max(0).unsigned_abs()))
}

/// Renames a project (its row; shares and slots follow by id or name).
pub fn rename_project(
    conn: &Connection,
    from: &ProjectName,
    to: &ProjectName,
) -> Result<(), StoreError> {
    conn.exec(
        "UPDATE projects SET name = ?2, updated_at = ?3 WHERE name = ?1",
        params![from.as_str(), to.as_str(), now()],
    )
    .map_err(|e| classify(e, &format!("project {to}")))?;
    conn.exec(
        "UPDATE vm_slots SET project = ?2 WHERE project = ?1",
        params![from.as_str(), to.as_str()],
    )?;
    Ok(())
}

/// Sets a project's source path.
pub fn set_source_path(
    conn: &Connection,
    name: &ProjectName,
    path: &str,
) -> Result<(), StoreError> {
    conn.exec(
        "UPDATE projects SET source_path = ?2, updated_at = ?3 WHERE name = ?1",
        params![name.as_str(), path, now()],
    )?;
    Ok(())
}

// ---------------------------------------------------------------- routes

/// A project's route: where the gateways reach its VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Route {
    pub project: ProjectName,
    pub ssh_addr: String,
    pub app_addr: String,
    pub visibility: Visibility,
}

/// Records where a project's VM answers.
pub fn set_route(
    conn: &Connection,
    project: &ProjectName,
    ssh_addr: &str,
    app_addr: &str,
) -> Result<(), StoreError> {
    conn.exec(
        "INSERT INTO routes (project_id, ssh_addr, app_addr, updated_at)
         SELECT id, ?2, ?3, ?4 FROM projects WHERE name = ?1
         ON CONFLICT (project_id) DO UPDATE SET ssh_addr = excluded.ssh_addr, app_addr = excluded.app_addr,
             updated_at = excluded.updated_at",
        params![project.as_str(), ssh_addr, app_addr, now()],
    )?;
    Ok(())
}

/// The route of a project, if its VM was ever ready.
pub fn route(conn: &Connection, project: &ProjectName) -> Result<Option<Route>, StoreError> {
    conn.row(
        "SELECT p.name, r.ssh_addr, r.app_addr, p.visibility FROM routes r JOIN projects p ON p.id = r.project_id
         WHERE p.name = ?1",
        [project.as_str()],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?)),
    )
    .optional()?
    .map(|(n, s, a, v)| {
        Ok(Route {
            project: text(n)?,
            ssh_addr: s,
            app_addr: a,
            visibility: text(v)?,
        })
    })
    .transpose()
}

/// Projects a user reaches over SSH (owned, or shared for SSH).
pub fn ssh_projects_of(conn: &Connection, user: UserId) -> Result<Vec<ProjectName>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT p.name FROM projects p WHERE p.owner_id = ?1
         OR EXISTS (SELECT 1 FROM shares s WHERE s.project_id = p.id AND s.user_id = ?1 AND s.ssh = 1)
         ORDER BY p.name",
    )?;
    let rows = st.query_map([user], |r| r.get::<_, String>(0))?;
    rows.map(|r| text(r?)).collect()
}

// ---------------------------------------------------------------- audit

/// One audit entry to record.
#[derive(Debug, Clone)]
pub struct AuditEntry<'a> {
    pub user: Option<UserId>,
    pub identity: &'a Identity,
    pub action: &'a str,
    pub target: Option<&'a str>,
    pub outcome: AuditOutcome,
    pub detail: Option<&'a str>,
}

/// Appends to the audit log.
pub fn audit(conn: &Connection, e: &AuditEntry<'_>) -> Result<(), StoreError> {
    conn.exec(
        "INSERT INTO audit (at, user_id, identity, action, target, outcome, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            now(),
            e.user,
            e.identity.to_string(),
            e.action,
            e.target,
            e.outcome.as_str(),
            e.detail
        ],
    )?;
    Ok(())
}

/// The newest audit entries, newest first.
pub fn recent_audit(conn: &Connection, limit: u32) -> Result<Vec<AuditEvent>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT a.id, a.at, u.name, a.identity, a.action, a.target, a.outcome, a.detail
         FROM audit a LEFT JOIN users u ON u.id = a.user_id ORDER BY a.id DESC LIMIT ?1",
    )?;
    let rows = st.query_map([limit], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, Option<String>>(5)?,
            r.get::<_, String>(6)?,
            r.get::<_, Option<String>>(7)?,
        ))
    })?;
    rows.map(|r| {
        let (id, at, user, identity, action, target, outcome, detail) = r?;
        Ok(AuditEvent {
            id,
            at,
            user: user.map(text).transpose()?,
            identity,
            action,
            target,
            outcome: text(outcome)?,
            detail,
        })
    })
    .collect()
}

/// Stores a one-time web secret (`kind`: login or handoff) by its hash.
pub fn add_web_link(
    conn: &Connection,
    token_hash: &str,
    kind: &str,
    user: UserId,
    host: &str,
    expires_at: i64,
) -> Result<(), StoreError> {
    conn.exec(
        "INSERT INTO web_links (token_hash, kind, user_id, host, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![token_hash, kind, user, host, now(), expires_at],
    )?;
    Ok(())
}

/// The user of a live (unused, unexpired) web secret for `host`, marking
/// it used when `consume`.
pub fn web_link_user(
    conn: &Connection,
    token_hash: &str,
    kind: &str,
    host: &str,
    consume: bool,
) -> Result<Option<User>, StoreError> {
    let uid: Option<UserId> = conn
        .row(
            "SELECT user_id FROM web_links WHERE token_hash = ?1 AND kind = ?2 AND host = ?3
             AND used_at IS NULL AND expires_at > ?4",
            params![token_hash, kind, host, now()],
            |r| r.get(0),
        )
        .optional()?;
    let Some(uid) = uid else {
        return Ok(None);
    };
    if consume {
        let n = conn.exec(
            "UPDATE web_links SET used_at = ?2 WHERE token_hash = ?1 AND used_at IS NULL",
            params![token_hash, now()],
        )?;
        if n == 0 {
            return Ok(None);
        }
    }
    user_by_id(conn, uid)
}

/// Starts a web session for `user` on `host`.
pub fn add_web_session(
    conn: &Connection,
    token_hash: &str,
    user: UserId,
    host: &str,
    expires_at: i64,
) -> Result<(), StoreError> {
    let t = now();
    conn.exec(
        "INSERT INTO web_sessions (token_hash, user_id, host, created_at, expires_at, last_seen_at) VALUES (?1, ?2, ?3, ?4, ?5, ?4)",
        params![token_hash, user, host, t, expires_at],
    )?;
    Ok(())
}

/// The user of a live session cookie on `host`.
pub fn web_session_user(
    conn: &Connection,
    token_hash: &str,
    host: &str,
) -> Result<Option<User>, StoreError> {
    let uid: Option<UserId> = conn
        .row(
            "SELECT user_id FROM web_sessions WHERE token_hash = ?1 AND host = ?2
             AND revoked_at IS NULL AND expires_at > ?3",
            params![token_hash, host, now()],
            |r| r.get(0),
        )
        .optional()?;
    match uid {
        Some(uid) => {
            // At most once a minute, so reading sessions rarely writes.
            let t = now();
            conn.exec(
                "UPDATE web_sessions SET last_seen_at = ?2 WHERE token_hash = ?1 AND last_seen_at < ?2 - 60",
                params![token_hash, t],
            )?;
            user_by_id(conn, uid)
        }
        None => Ok(None),
    }
}

/// Ends one session (web sign-out).
pub fn revoke_web_session(conn: &Connection, token_hash: &str) -> Result<bool, StoreError> {
    Ok(conn.exec(
        "UPDATE web_sessions SET revoked_at = ?2 WHERE token_hash = ?1 AND revoked_at IS NULL",
        params![token_hash, now()],
    )? > 0)
}

/// Ends every session of a user (`logout`); returns how many.
pub fn revoke_web_sessions_of(conn: &Connection, user: UserId) -> Result<usize, StoreError> {
    Ok(conn.exec(
        "UPDATE web_sessions SET revoked_at = ?2 WHERE user_id = ?1 AND revoked_at IS NULL AND expires_at > ?2",
        params![user, now()],
    )?)
}

/// A user's live sessions: (host, created, last seen, expires).
pub fn web_sessions_of(
    conn: &Connection,
    user: UserId,
) -> Result<Vec<crate::model::WebSession>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT host, created_at, last_seen_at, expires_at FROM web_sessions
         WHERE user_id = ?1 AND revoked_at IS NULL AND expires_at > ?2 ORDER BY last_seen_at DESC",
    )?;
    let rows = st.query_map(params![user, now()], |r| {
        Ok(crate::model::WebSession {
            host: r.get(0)?,
            created_at: r.get(1)?,
            last_seen_at: r.get(2)?,
            expires_at: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Stores a new API token by its hash; a live token with the same label
/// is a conflict.
pub fn add_api_token(
    conn: &Connection,
    user: UserId,
    label: &str,
    token_hash: &str,
    expires_at: Option<i64>,
) -> Result<crate::model::ApiToken, StoreError> {
    let t = now();
    let r = conn.exec(
        "INSERT INTO api_tokens (token_hash, user_id, label, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![token_hash, user, label, t, expires_at],
    );
    match r {
        Ok(_) => Ok(crate::model::ApiToken {
            label: label.to_owned(),
            created_at: t,
            expires_at,
            last_used_at: None,
        }),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Err(StoreError::AlreadyExists {
                what: format!("a token named '{label}'"),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// A user's live API tokens.
pub fn api_tokens_of(
    conn: &Connection,
    user: UserId,
) -> Result<Vec<crate::model::ApiToken>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT label, created_at, expires_at, last_used_at FROM api_tokens
         WHERE user_id = ?1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?2)
         ORDER BY created_at",
    )?;
    let rows = st.query_map(params![user, now()], |r| {
        Ok(crate::model::ApiToken {
            label: r.get(0)?,
            created_at: r.get(1)?,
            expires_at: r.get(2)?,
            last_used_at: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Revokes a user's live token by label; whether one was.
pub fn revoke_api_token(conn: &Connection, user: UserId, label: &str) -> Result<bool, StoreError> {
    Ok(conn.exec(
        "UPDATE api_tokens SET revoked_at = ?3 WHERE user_id = ?1 AND label = ?2 AND revoked_at IS NULL",
        params![user, label, now()],
    )? > 0)
}

/// The user and label of a live API token.
pub fn api_token_user(
    conn: &Connection,
    token_hash: &str,
) -> Result<Option<(User, String)>, StoreError> {
    let found: Option<(UserId, String)> = conn
        .row(
            "SELECT user_id, label FROM api_tokens WHERE token_hash = ?1
             AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?2)",
            params![token_hash, now()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((uid, label)) = found else {
        return Ok(None);
    };
    // At most once a minute, so reading tokens rarely writes.
    conn.exec(
        "UPDATE api_tokens SET last_used_at = ?2 WHERE token_hash = ?1 AND (last_used_at IS NULL OR last_used_at < ?2 - 60)",
        params![token_hash, now()],
    )?;
    Ok(user_by_id(conn, uid)?.map(|u| (u, label)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::testing::ed25519;

    fn conn() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        super::super::configure(&c).unwrap();
        super::super::migrate(&mut c).unwrap();
        c
    }

    #[test]
    fn identities_keys_and_requests() {
        let c = conn();
        let ann = create_user(&c, &UserName::new("ann").unwrap(), Role::Member).unwrap();
        let who = Identity::new(Frontend::Matrix, "@ann:example.org");
        link_identity(&c, &who, ann.id).unwrap();
        assert_eq!(user_by_identity(&c, &who).unwrap().unwrap().name, ann.name);

        let k = ed25519(1, Some("ann@laptop"));
        let rec = add_key(&c, ann.id, &k, None).unwrap();
        assert_eq!(rec.label.as_deref(), Some("ann@laptop"));
        assert_eq!(
            user_by_active_key(&c, k.fingerprint()).unwrap().unwrap().id,
            ann.id
        );
        revoke_key(&c, k.fingerprint()).unwrap();
        assert!(user_by_active_key(&c, k.fingerprint()).unwrap().is_none());
        add_key(&c, ann.id, &k, Some("again")).unwrap();
        assert!(user_by_active_key(&c, k.fingerprint()).unwrap().is_some());

        let bob = create_user(&c, &UserName::new("bob").unwrap(), Role::Member).unwrap();
        assert!(matches!(
            add_key(&c, bob.id, &k, None),
            Err(StoreError::AlreadyExists { .. })
        ));

        let k2 = ed25519(2, None);
        let stranger = Identity::new(Frontend::Discord, "42");
        let (r1, new1) = file_request(&c, &stranger, None, &k2, Some("hi")).unwrap();
        let (r2, new2) = file_request(&c, &stranger, None, &k2, None).unwrap();
        assert!(new1 && !new2);
        assert_eq!(r1.id, r2.id);
        assert!(decide_request(&c, r1.id, RequestState::Denied, ann.id, Some("no"), None).unwrap());
        assert!(!decide_request(&c, r1.id, RequestState::Approved, ann.id, None, None).unwrap());
        let r = request_by_id(&c, r1.id).unwrap().unwrap();
        assert_eq!(r.state, RequestState::Denied);
        assert_eq!(r.decided_by.unwrap().as_str(), "ann");
    }

    #[test]
    fn an_agent_run_counts_its_own_projects_llm_tokens_only() {
        let c = conn();
        let ann = create_user(&c, &UserName::new("ann").unwrap(), Role::Member).unwrap();
        let project = |n: &str| {
            let name = ProjectName::new(n).unwrap();
            insert_project(
                &c,
                &NewProjectRow {
                    name: &name,
                    owner: ann.id,
                    stack: "base",
                    git_url: None,
                    source_path: "/src",
                    template: None,
                    resources: Resources {
                        vcpus: 1,
                        memory_mib: 512,
                        disk_mib: 2048,
                    },
                    app_port: 3000,
                    state: ProjectState::Running,
                },
            )
            .unwrap()
            .name
        };
        let (app, other) = (project("app"), project("other"));
        // Before the run: not counted.
        add_agent_tokens(&c, &app, 5).unwrap();
        let run = insert_agent_run(&c, &app, Some(ann.id), "a", "task", "agent-1").unwrap();
        add_agent_tokens(&c, &app, 30).unwrap();
        // The same owner's other project meanwhile: not this run's.
        add_agent_tokens(&c, &other, 1000).unwrap();
        add_agent_tokens(&c, &app, 12).unwrap();
        assert_eq!(finish_agent_run(&c, run, 0, None).unwrap(), 42);
        // After it ended: not counted either.
        add_agent_tokens(&c, &app, 7).unwrap();
        assert_eq!(agent_runs_of(&c, &app, 5).unwrap()[0].tokens, Some(42));
    }

    #[test]
    fn slots_are_reused_lowest_first() {
        let c = conn();
        assert_eq!(allocate_slot(&c, "a", 10, &[]).unwrap(), 2);
        assert_eq!(allocate_slot(&c, "b", 10, &[]).unwrap(), 3);
        assert_eq!(allocate_slot(&c, "a", 10, &[]).unwrap(), 2, "idempotent");
        release_slot(&c, "a").unwrap();
        assert_eq!(allocate_slot(&c, "c", 10, &[]).unwrap(), 2);
        assert!(allocate_slot(&c, "d", 3, &[]).is_err());
        assert_eq!(
            allocate_slot(&c, "c", 10, &[2]).unwrap(),
            4,
            "skipped slots move"
        );
    }

    #[test]
    fn free_user_names_count_up() {
        let c = conn();
        create_user(&c, &UserName::new("ann").unwrap(), Role::Member).unwrap();
        assert_eq!(free_user_name(&c, "Ann").unwrap().as_str(), "ann2");
    }
}

// ---------------------------------------------------------------- checkpoints

/// A checkpoint to record (its files are made already).
#[derive(Debug, Clone)]
pub struct NewCheckpoint<'a> {
    pub project: &'a ProjectName,
    pub label: &'a str,
    pub note: Option<&'a str>,
    pub auto_reason: Option<&'a str>,
    pub taken_by: Option<UserId>,
    pub git_head: Option<&'a str>,
    pub disk_bytes: u64,
    pub source_bytes: u64,
    pub disk_shared_bytes: u64,
    pub source_reflinked: bool,
    pub resources: Resources,
    pub app_port: u16,
}

/// Records a checkpoint. A label taken in the project is `AlreadyExists`.
pub fn insert_checkpoint(conn: &Connection, c: &NewCheckpoint<'_>) -> Result<(), StoreError> {
    let n = conn
        .exec(
            "INSERT INTO checkpoints (project_id, label, note, auto_reason, taken_by, taken_at,
                 git_head, disk_bytes, source_bytes, vcpus, memory_mib, disk_mib, app_port,
                 disk_shared_bytes, source_reflinked)
             SELECT id, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15
             FROM projects WHERE name = ?1",
            params![
                c.project.as_str(),
                c.label,
                c.note,
                c.auto_reason,
                c.taken_by,
                now(),
                c.git_head,
                i64::try_from(c.disk_bytes).unwrap_or(i64::MAX),
                i64::try_from(c.source_bytes).unwrap_or(i64::MAX),
                c.resources.vcpus,
                c.resources.memory_mib,
                c.resources.disk_mib,
                c.app_port,
                i64::try_from(c.disk_shared_bytes).unwrap_or(i64::MAX),
                c.source_reflinked,
            ],
        )
        .map_err(|e| classify(e, &format!("checkpoint {}", c.label)))?;
    if n == 0 {
        return Err(StoreError::Invalid {
            what: format!("project {} is gone", c.project),
        });
    }
    Ok(())
}

const CHECKPOINT_COLS: &str = "c.label, c.note, c.auto_reason, u.name, c.taken_at, c.git_head,
    c.disk_bytes, c.source_bytes, c.vcpus, c.memory_mib, c.disk_mib, c.app_port,
    c.disk_shared_bytes, c.source_reflinked";

fn checkpoint_from(r: &Row<'_>) -> rusqlite::Result<Checkpoint> {
    Ok(Checkpoint {
        label: r.get(0)?,
        note: r.get(1)?,
        auto_reason: r.get(2)?,
        taken_by: r.get(3)?,
        taken_at: r.get(4)?,
        git_head: r.get(5)?,
        disk_bytes: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
        source_bytes: u64::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
        resources: Resources {
            vcpus: r.get(8)?,
            memory_mib: r.get(9)?,
            disk_mib: r.get(10)?,
        },
        app_port: r.get(11)?,
        disk_shared_bytes: u64::try_from(r.get::<_, i64>(12)?).unwrap_or(0),
        source_reflinked: r.get(13)?,
    })
}

/// A project's checkpoints, oldest first.
pub fn checkpoints_of(
    conn: &Connection,
    project: &ProjectName,
) -> Result<Vec<Checkpoint>, StoreError> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {CHECKPOINT_COLS} FROM checkpoints c JOIN projects p ON p.id = c.project_id
         LEFT JOIN users u ON u.id = c.taken_by WHERE p.name = ?1 ORDER BY c.taken_at, c.id"
    ))?;
    let rows = st.query_map([project.as_str()], checkpoint_from)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// One checkpoint of a project.
pub fn checkpoint(
    conn: &Connection,
    project: &ProjectName,
    label: &str,
) -> Result<Option<Checkpoint>, StoreError> {
    Ok(conn
        .row(
            &format!(
                "SELECT {CHECKPOINT_COLS} FROM checkpoints c JOIN projects p ON p.id = c.project_id
                 LEFT JOIN users u ON u.id = c.taken_by WHERE p.name = ?1 AND c.label = ?2"
            ),
            params![project.as_str(), label],
            checkpoint_from,
        )
        .optional()?)
}

/// Forgets a checkpoint; whether there was one.
pub fn delete_checkpoint(
    conn: &Connection,
    project: &ProjectName,
    label: &str,
) -> Result<bool, StoreError> {
    Ok(conn.exec(
        "DELETE FROM checkpoints WHERE label = ?2
           AND project_id = (SELECT id FROM projects WHERE name = ?1)",
        params![project.as_str(), label],
    )? > 0)
}

/// Bytes a user's checkpoints hold (disk layers and source copies), in MiB
/// rounded up, for the disk quota.
pub fn checkpoint_mib_of(conn: &Connection, user: UserId) -> Result<u64, StoreError> {
    let bytes: i64 = conn.row(
        "SELECT COALESCE(SUM(c.disk_bytes + c.source_bytes), 0) FROM checkpoints c
         JOIN projects p ON p.id = c.project_id WHERE p.owner_id = ?1",
        [user],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(bytes).unwrap_or(0).div_ceil(1 << 20))
}

/// How many live (unrevoked, unexpired, unredeemed) links a project has.
pub fn live_link_count(conn: &Connection, project: &ProjectName) -> Result<u32, StoreError> {
    Ok(conn.row(
        "SELECT COUNT(*) FROM share_links l JOIN projects p ON p.id = l.project_id
         WHERE p.name = ?1 AND l.revoked_at IS NULL AND l.expires_at > ?2",
        params![project.as_str(), now()],
        |r| r.get(0),
    )?)
}

/// Stores a new share link of a project by its token's hash; its id.
pub fn add_share_link(
    conn: &Connection,
    project: &ProjectName,
    token_hash: &str,
    port: Option<u16>,
    note: Option<&str>,
    by: Option<UserId>,
    expires_at: i64,
) -> Result<i64, StoreError> {
    conn.exec(
        "INSERT INTO share_links (project_id, token_hash, port, note, created_by, created_at, expires_at)
         SELECT id, ?2, ?3, ?4, ?5, ?6, ?7 FROM projects WHERE name = ?1",
        params![project.as_str(), token_hash, port, note, by, now(), expires_at],
    )?;
    Ok(conn.last_insert_rowid())
}

/// A project's links that still work or were redeemed and live on
/// (unrevoked, unexpired), newest first.
pub fn share_links_of(
    conn: &Connection,
    project: &ProjectName,
) -> Result<Vec<crate::model::ShareLink>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT l.id, l.port, l.note, u.name, l.created_at, l.expires_at, l.redeemed_at,
                l.last_used_at, l.visits
         FROM share_links l JOIN projects p ON p.id = l.project_id
         LEFT JOIN users u ON u.id = l.created_by
         WHERE p.name = ?1 AND l.revoked_at IS NULL AND l.expires_at > ?2 ORDER BY l.id DESC",
    )?;
    let rows = st.query_map(params![project.as_str(), now()], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, Option<u16>>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, Option<String>>(3)?,
            (r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?),
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, port, note, by, (created_at, expires_at, redeemed_at, last_used_at, visits)) =
            row?;
        out.push(crate::model::ShareLink {
            id,
            port,
            note,
            created_by: by.map(text).transpose()?,
            created_at,
            expires_at,
            redeemed_at,
            last_used_at,
            visits,
        });
    }
    Ok(out)
}

/// Revokes a project's link; whether there was a live one.
pub fn revoke_share_link(
    conn: &Connection,
    project: &ProjectName,
    id: i64,
) -> Result<bool, StoreError> {
    Ok(conn.exec(
        "UPDATE share_links SET revoked_at = ?3 WHERE id = ?2 AND revoked_at IS NULL
         AND project_id = (SELECT id FROM projects WHERE name = ?1)",
        params![project.as_str(), id, now()],
    )? > 0)
}

/// The project and port of a live, unredeemed link (`redeem`: marking it
/// redeemed, so it works once).
pub fn share_link_target(
    conn: &Connection,
    token_hash: &str,
    redeem: bool,
) -> Result<Option<crate::model::LinkVisitor>, StoreError> {
    let found: Option<(i64, String, Option<u16>)> = conn
        .row(
            "SELECT l.id, p.name, l.port FROM share_links l JOIN projects p ON p.id = l.project_id
             WHERE l.token_hash = ?1 AND l.revoked_at IS NULL AND l.redeemed_at IS NULL
             AND l.expires_at > ?2",
            params![token_hash, now()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((link_id, name, port)) = found else {
        return Ok(None);
    };
    if redeem
        && conn.exec(
            "UPDATE share_links SET redeemed_at = ?2 WHERE id = ?1 AND redeemed_at IS NULL",
            params![link_id, now()],
        )? == 0
    {
        return Ok(None);
    }
    Ok(Some(crate::model::LinkVisitor {
        link_id,
        project: text(name)?,
        port,
    }))
}

/// Starts a session of a redeemed link.
pub fn add_link_session(
    conn: &Connection,
    token_hash: &str,
    link_id: i64,
) -> Result<(), StoreError> {
    conn.exec(
        "INSERT INTO link_sessions (token_hash, link_id, created_at) VALUES (?1, ?2, ?3)",
        params![token_hash, link_id, now()],
    )?;
    Ok(())
}

/// Who a link session lets in, while its link is neither revoked nor
/// expired.
pub fn link_session_visitor(
    conn: &Connection,
    token_hash: &str,
) -> Result<Option<crate::model::LinkVisitor>, StoreError> {
    let found: Option<(i64, String, Option<u16>)> = conn
        .row(
            "SELECT l.id, p.name, l.port FROM link_sessions s
             JOIN share_links l ON l.id = s.link_id JOIN projects p ON p.id = l.project_id
             WHERE s.token_hash = ?1 AND l.revoked_at IS NULL AND l.expires_at > ?2",
            params![token_hash, now()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    found
        .map(|(link_id, name, port)| {
            Ok(crate::model::LinkVisitor {
                link_id,
                project: text(name)?,
                port,
            })
        })
        .transpose()
}

/// Counts a page opened through a link.
pub fn link_visited(conn: &Connection, link_id: i64) -> Result<(), StoreError> {
    conn.exec(
        "UPDATE share_links SET visits = visits + 1, last_used_at = ?2 WHERE id = ?1",
        params![link_id, now()],
    )?;
    Ok(())
}

/// Records a custom domain of a project; a host another project has is
/// [`StoreError::AlreadyExists`].
pub fn add_domain(
    conn: &Connection,
    project: &ProjectName,
    host: &str,
    active: bool,
    by: Option<UserId>,
) -> Result<(), StoreError> {
    let t = now();
    conn.exec(
        "INSERT INTO custom_domains (host, project_id, state, requested_by, created_at, approved_by, approved_at)
         SELECT ?2, id, ?3, ?4, ?5, CASE WHEN ?3 = 'active' THEN ?4 END, CASE WHEN ?3 = 'active' THEN ?5 END
         FROM projects WHERE name = ?1",
        params![
            project.as_str(),
            host,
            if active { "active" } else { "pending" },
            by,
            t
        ],
    )
    .map_err(|e| classify(e, "custom domain"))?;
    Ok(())
}

/// How many custom domains a project has.
pub fn domain_count(conn: &Connection, project: &ProjectName) -> Result<u32, StoreError> {
    Ok(conn.row(
        "SELECT COUNT(*) FROM custom_domains d JOIN projects p ON p.id = d.project_id WHERE p.name = ?1",
        [project.as_str()],
        |r| r.get(0),
    )?)
}

/// Custom domains: of one project, or (`None`) of every project.
pub fn domains(
    conn: &Connection,
    project: Option<&ProjectName>,
) -> Result<Vec<crate::model::CustomDomain>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT d.host, p.name, d.state, u.name, d.created_at
         FROM custom_domains d JOIN projects p ON p.id = d.project_id
         LEFT JOIN users u ON u.id = d.requested_by
         WHERE ?1 IS NULL OR p.name = ?1 ORDER BY p.name, d.host",
    )?;
    let rows = st.query_map([project.map(ProjectName::as_str)], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, i64>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (host, name, state, by, created_at) = row?;
        out.push(crate::model::CustomDomain {
            host,
            project: text(name)?,
            state,
            requested_by: by.map(text).transpose()?,
            created_at,
        });
    }
    Ok(out)
}

/// The project and state of a custom domain.
pub fn domain(conn: &Connection, host: &str) -> Result<Option<(ProjectName, String)>, StoreError> {
    let found: Option<(String, String)> = conn
        .row(
            "SELECT p.name, d.state FROM custom_domains d JOIN projects p ON p.id = d.project_id
             WHERE d.host = ?1",
            [host],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    found.map(|(n, s)| Ok((text(n)?, s))).transpose()
}

/// Approves a pending custom domain; whether there was one.
pub fn approve_domain(
    conn: &Connection,
    host: &str,
    by: Option<UserId>,
) -> Result<bool, StoreError> {
    Ok(conn.exec(
        "UPDATE custom_domains SET state = 'active', approved_by = ?2, approved_at = ?3
         WHERE host = ?1 AND state = 'pending'",
        params![host, by, now()],
    )? > 0)
}

/// Removes a project's custom domain; whether it had it.
pub fn remove_domain(
    conn: &Connection,
    project: &ProjectName,
    host: &str,
) -> Result<bool, StoreError> {
    Ok(conn.exec(
        "DELETE FROM custom_domains WHERE host = ?2
         AND project_id = (SELECT id FROM projects WHERE name = ?1)",
        params![project.as_str(), host],
    )? > 0)
}

/// A project's egress: its own mode (`None`: the default), its rules and
/// the destinations asked about (with when), oldest first.
pub type EgressRows = (
    Option<crate::egress::EgressMode>,
    Vec<crate::egress::EgressRule>,
    Vec<(String, i64)>,
);

/// The egress of project `id`.
pub fn egress_of(conn: &Connection, id: i64) -> Result<EgressRows, StoreError> {
    use crate::egress::{Destination, EgressRule, Verdict};
    let mode: Option<String> =
        conn.row("SELECT egress FROM projects WHERE id = ?1", [id], |r| {
            r.get(0)
        })?;
    let mode = mode
        .map(|m| m.parse::<crate::egress::EgressMode>())
        .transpose()
        .map_err(|what| StoreError::Invalid { what })?;
    let mut st = conn.prepare_cached(
        "SELECT dest, verdict, expires_at FROM egress_rules WHERE project_id = ?1 ORDER BY id",
    )?;
    let rows = st.query_map([id], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<i64>>(2)?,
        ))
    })?;
    let mut rules = Vec::new();
    for row in rows {
        let (dest, verdict, expires_at) = row?;
        let dest = Destination::parse(&dest).map_err(|what| StoreError::Invalid { what })?;
        let verdict = if verdict == "deny" {
            Verdict::Deny
        } else {
            Verdict::Allow
        };
        rules.push(EgressRule {
            dest,
            verdict,
            expires_at,
        });
    }
    let mut st = conn.prepare_cached(
        "SELECT dest, asked_at FROM egress_asks WHERE project_id = ?1 ORDER BY asked_at, id",
    )?;
    let asks = st
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((mode, rules, asks))
}

/// Sets project `id`'s own egress mode (`None`: follow the default).
pub fn set_egress_mode(
    conn: &Connection,
    id: i64,
    mode: Option<crate::egress::EgressMode>,
) -> Result<(), StoreError> {
    conn.exec(
        "UPDATE projects SET egress = ?2, updated_at = ?3 WHERE id = ?1",
        params![id, mode.map(crate::egress::EgressMode::as_str), now()],
    )?;
    Ok(())
}

/// Puts a rule on project `id`'s list (replacing one for the same
/// destination) and drops the ask about it, if any.
pub fn put_egress_rule(
    conn: &Connection,
    id: i64,
    rule: &crate::egress::EgressRule,
    by: Option<UserId>,
) -> Result<(), StoreError> {
    let dest = rule.dest.to_string();
    conn.exec(
        "INSERT INTO egress_rules (project_id, dest, verdict, expires_at, created_by, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (project_id, dest) DO UPDATE SET verdict = excluded.verdict,
           expires_at = excluded.expires_at, created_by = excluded.created_by,
           created_at = excluded.created_at",
        params![id, dest, rule.verdict.as_str(), rule.expires_at, by, now()],
    )?;
    conn.exec(
        "DELETE FROM egress_asks WHERE project_id = ?1 AND dest = ?2",
        params![id, dest],
    )?;
    Ok(())
}

/// Takes the rule for `dest` off project `id`'s list; whether there was one.
pub fn remove_egress_rule(conn: &Connection, id: i64, dest: &str) -> Result<bool, StoreError> {
    let n = conn.exec(
        "DELETE FROM egress_rules WHERE project_id = ?1 AND dest = ?2",
        params![id, dest],
    )?;
    conn.exec(
        "DELETE FROM egress_asks WHERE project_id = ?1 AND dest = ?2",
        params![id, dest],
    )?;
    Ok(n > 0)
}

/// Files an ask about `dest` for project `id`, unless it was asked
/// already or `per_hour` asks were filed for it in the last hour; whether
/// this one is new (and should be said).
pub fn file_egress_ask(
    conn: &Connection,
    id: i64,
    dest: &str,
    per_hour: u32,
) -> Result<bool, StoreError> {
    let t = now();
    let recent: u32 = conn.row(
        "SELECT count(*) FROM egress_asks WHERE project_id = ?1 AND asked_at > ?2",
        params![id, t - 3600],
        |r| r.get(0),
    )?;
    if recent >= per_hour {
        return Ok(false);
    }
    let n = conn.exec(
        "INSERT OR IGNORE INTO egress_asks (project_id, dest, asked_at) VALUES (?1, ?2, ?3)",
        params![id, dest, t],
    )?;
    Ok(n > 0)
}
