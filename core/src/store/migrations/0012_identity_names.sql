-- The name a chat network shows for an identity (a Discord username),
-- as its front end last saw it: what a new user is named after when an
-- admin approves the identity's request (falling back to the id).
CREATE TABLE identity_names (
    frontend    TEXT NOT NULL,
    external_id TEXT NOT NULL,
    name        TEXT NOT NULL,
    seen_at     INTEGER NOT NULL,
    PRIMARY KEY (frontend, external_id)
) WITHOUT ROWID;
