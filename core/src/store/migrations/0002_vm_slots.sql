-- Each VM holds a slot: a small number that names its addresses
-- (127.77.x.y with user-mode networking, 10.90.0.n on Kennel's bridge).
-- Keyed by project name rather than id: a slot is taken before the
-- project's VM exists and released after it is gone.
CREATE TABLE vm_slots (
    project     TEXT PRIMARY KEY,
    slot        INTEGER NOT NULL UNIQUE CHECK (slot BETWEEN 2 AND 65000),
    created_at  INTEGER NOT NULL
);
