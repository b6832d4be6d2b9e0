-- What an identity was asked to confirm ("yes" within a deadline), and the
-- step it is at (a purge asks twice).
CREATE TABLE confirmations (
    frontend     TEXT NOT NULL,
    external_id  TEXT NOT NULL,
    command      TEXT NOT NULL,
    step         INTEGER NOT NULL DEFAULT 1,
    expires_at   INTEGER NOT NULL,
    PRIMARY KEY (frontend, external_id)
);

-- Users' secrets (e.g. git-token). The database file is 0600; values are
-- never rendered back.
CREATE TABLE secrets (
    user_id     INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    value       TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (user_id, name)
);
