-- Agent runs (`agent NAME TASK`): who asked what of which agent, the
-- checkpoint taken before it (the way back), and how it ended.
CREATE TABLE agent_runs (
    id          INTEGER PRIMARY KEY,
    project_id  INTEGER NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    user_id     INTEGER REFERENCES users (id) ON DELETE SET NULL,
    agent       TEXT NOT NULL,
    task        TEXT NOT NULL,
    checkpoint  TEXT NOT NULL,
    started_at  INTEGER NOT NULL,
    ended_at    INTEGER,
    exit_code   INTEGER,
    tokens      INTEGER,
    diffstat    TEXT
);
CREATE INDEX agent_runs_project ON agent_runs (project_id, id);
