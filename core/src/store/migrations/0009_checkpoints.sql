-- Checkpoints: a named point in a project's life (its VM's disk and its
-- source) that it can be rolled back to or copied from. The files live in
-- the VM's directory (vms/<name>/checkpoints/); this is what Kennel knows
-- of them: who took one, why, and what it cost. `auto_reason` is set for
-- the ones Kennel took itself (before a rollback), which pruning removes
-- first. The project's resources and app port at the time come back with
-- a rollback.
CREATE TABLE checkpoints (
    id            INTEGER PRIMARY KEY,
    project_id    INTEGER NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    label         TEXT NOT NULL,
    note          TEXT,
    auto_reason   TEXT,
    taken_by      INTEGER REFERENCES users (id) ON DELETE SET NULL,
    taken_at      INTEGER NOT NULL,
    git_head      TEXT,
    disk_bytes    INTEGER NOT NULL CHECK (disk_bytes >= 0),
    -- Bytes of older checkpoints' layers it reads through, when taken.
    disk_shared_bytes INTEGER NOT NULL DEFAULT 0 CHECK (disk_shared_bytes >= 0),
    source_bytes  INTEGER NOT NULL CHECK (source_bytes >= 0),
    -- Copied by reflinks: its extents are shared with the source's until
    -- either changes.
    source_reflinked INTEGER NOT NULL DEFAULT 0 CHECK (source_reflinked IN (0, 1)),
    vcpus         INTEGER NOT NULL CHECK (vcpus > 0),
    memory_mib    INTEGER NOT NULL CHECK (memory_mib > 0),
    disk_mib      INTEGER NOT NULL CHECK (disk_mib > 0),
    app_port      INTEGER NOT NULL CHECK (app_port BETWEEN 1 AND 65535),
    UNIQUE (project_id, label)
);
