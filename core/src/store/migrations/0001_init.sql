-- Kennel's first schema: users and identities, SSH keys, access requests,
-- projects, shares, quotas and the audit log.
-- Timestamps are seconds since the Unix epoch (UTC).

CREATE TABLE users (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'member')),
    created_at  INTEGER NOT NULL
);

-- (front end, external id) -> user, e.g. ('matrix', '@ann:example.org').
CREATE TABLE identities (
    frontend     TEXT NOT NULL CHECK (frontend IN ('cli', 'matrix', 'discord', 'ssh', 'http')),
    external_id  TEXT NOT NULL,
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (frontend, external_id)
);
CREATE INDEX identities_user ON identities (user_id);

CREATE TABLE ssh_keys (
    id           INTEGER PRIMARY KEY,
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    fingerprint  TEXT NOT NULL UNIQUE,
    algorithm    TEXT NOT NULL,
    openssh      TEXT NOT NULL,
    label        TEXT,
    state        TEXT NOT NULL CHECK (state IN ('active', 'revoked')),
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER
);
CREATE INDEX ssh_keys_user ON ssh_keys (user_id);

CREATE TABLE access_requests (
    id                 INTEGER PRIMARY KEY,
    frontend           TEXT NOT NULL,
    external_id        TEXT NOT NULL,
    user_id            INTEGER REFERENCES users (id) ON DELETE SET NULL,
    fingerprint        TEXT NOT NULL,
    algorithm          TEXT NOT NULL,
    openssh            TEXT NOT NULL,
    note               TEXT,
    state              TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'denied')),
    decided_by         INTEGER REFERENCES users (id) ON DELETE SET NULL,
    decided_at         INTEGER,
    reason             TEXT,
    created_at         INTEGER NOT NULL
);
-- One open request per key: a second paste of the same key is the same request.
CREATE UNIQUE INDEX access_requests_pending_key
    ON access_requests (fingerprint) WHERE state = 'pending';

CREATE TABLE projects (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    owner_id     INTEGER NOT NULL REFERENCES users (id) ON DELETE RESTRICT,
    stack        TEXT NOT NULL,
    git_url      TEXT,
    source_path  TEXT NOT NULL,
    template     TEXT,
    vcpus        INTEGER NOT NULL CHECK (vcpus > 0),
    memory_mib   INTEGER NOT NULL CHECK (memory_mib > 0),
    disk_mib     INTEGER NOT NULL CHECK (disk_mib > 0),
    app_port     INTEGER NOT NULL CHECK (app_port BETWEEN 1 AND 65535),
    visibility   TEXT NOT NULL DEFAULT 'private' CHECK (visibility IN ('private', 'public')),
    state        TEXT NOT NULL CHECK (state IN ('creating', 'starting', 'running', 'stopping', 'stopped', 'failed', 'destroying')),
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);
CREATE INDEX projects_owner ON projects (owner_id);

CREATE TABLE shares (
    project_id  INTEGER NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    user_id     INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    ssh         INTEGER NOT NULL CHECK (ssh IN (0, 1)),
    web         INTEGER NOT NULL CHECK (web IN (0, 1)),
    PRIMARY KEY (project_id, user_id)
);

-- NULL means unlimited.
CREATE TABLE quotas (
    role        TEXT PRIMARY KEY CHECK (role IN ('admin', 'member')),
    projects    INTEGER,
    vcpus       INTEGER,
    memory_mib  INTEGER,
    disk_mib    INTEGER
);
INSERT INTO quotas (role, projects, vcpus, memory_mib, disk_mib) VALUES
    ('admin', NULL, NULL, NULL, NULL),
    ('member', 5, 8, 16384, 102400);

CREATE TABLE audit (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    user_id     INTEGER REFERENCES users (id) ON DELETE SET NULL,
    identity    TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT,
    outcome     TEXT NOT NULL CHECK (outcome IN ('ok', 'refused', 'failed')),
    detail      TEXT
);
CREATE INDEX audit_at ON audit (at);
