-- Share links (`share NAME --link`): a one-use URL that gives whoever
-- redeems it a web session for one project (and one port, if given), with
-- no Kennel account. Only the token's SHA-256 is kept; redeeming it makes
-- a session (a cookie for that host), also kept by hash. Revoking a link
-- ends its sessions: they are checked against it on every request.
CREATE TABLE share_links (
    id           INTEGER PRIMARY KEY,
    project_id   INTEGER NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    token_hash   TEXT NOT NULL UNIQUE,
    -- NULL: the project's app port (its main host); else that port's host.
    port         INTEGER CHECK (port IS NULL OR port BETWEEN 1 AND 65535),
    note         TEXT,
    created_by   INTEGER REFERENCES users (id) ON DELETE SET NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    redeemed_at  INTEGER,
    revoked_at   INTEGER,
    last_used_at INTEGER,
    visits       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX share_links_project ON share_links (project_id);

CREATE TABLE link_sessions (
    token_hash  TEXT PRIMARY KEY,
    link_id     INTEGER NOT NULL REFERENCES share_links (id) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL
);
