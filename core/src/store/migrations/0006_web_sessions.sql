-- Web sign-in. A login link (from the `login` command) or a hand-over
-- code (from Kennel's host to a project's host) is a one-time secret;
-- only its SHA-256 is kept. A session is a cookie for one host.
CREATE TABLE web_links (
    token_hash  TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('login', 'handoff')),
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    -- The host the secret may be used on.
    host        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER
);

CREATE TABLE web_sessions (
    id           INTEGER PRIMARY KEY,
    token_hash   TEXT NOT NULL UNIQUE,
    user_id      INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    host         TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL,
    revoked_at   INTEGER
);
CREATE INDEX web_sessions_user ON web_sessions (user_id);
