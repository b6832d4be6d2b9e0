-- Custom domains (`domain add NAME HOST`): a host name of someone's own
-- that the HTTPS gateway serves as a project's app, once its DNS points
-- here and (for members) an admin approved it. A host belongs to one
-- project at most.
CREATE TABLE custom_domains (
    host          TEXT PRIMARY KEY,
    project_id    INTEGER NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'active')),
    requested_by  INTEGER REFERENCES users (id) ON DELETE SET NULL,
    created_at    INTEGER NOT NULL,
    approved_by   INTEGER REFERENCES users (id) ON DELETE SET NULL,
    approved_at   INTEGER
);
CREATE INDEX custom_domains_project ON custom_domains (project_id);
