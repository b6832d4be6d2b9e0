-- HTTP API tokens (`token create`): only the SHA-256 of a token is kept;
-- a label names it in `tokens` and in the audit log.
CREATE TABLE api_tokens (
    id           INTEGER PRIMARY KEY,
    token_hash   TEXT NOT NULL UNIQUE,
    user_id      INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    label        TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    last_used_at INTEGER,
    revoked_at   INTEGER
);
-- One live token per label and user.
CREATE UNIQUE INDEX api_tokens_label ON api_tokens (user_id, label) WHERE revoked_at IS NULL;
