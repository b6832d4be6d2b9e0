-- Egress policy. `egress`: the project's own mode, 'open' or 'closed'
-- (NULL: the configured default, vm.egress). `egress_rules`: its list,
-- one rule per destination (canonical text, see core/src/egress.rs); an
-- `expires_at` for allow-once. `egress_asks`: destinations a closed
-- project's VM tried that nobody decided on yet, asked once each.
ALTER TABLE projects ADD COLUMN egress TEXT CHECK (egress IN ('open', 'closed'));
CREATE TABLE egress_rules (
    id          INTEGER PRIMARY KEY,
    project_id  INTEGER NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    dest        TEXT NOT NULL,
    verdict     TEXT NOT NULL CHECK (verdict IN ('allow', 'deny')),
    expires_at  INTEGER,
    created_by  INTEGER REFERENCES users (id) ON DELETE SET NULL,
    created_at  INTEGER NOT NULL,
    UNIQUE (project_id, dest)
);
CREATE TABLE egress_asks (
    id          INTEGER PRIMARY KEY,
    project_id  INTEGER NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    dest        TEXT NOT NULL,
    asked_at    INTEGER NOT NULL,
    UNIQUE (project_id, dest)
);
