-- A user's own limits (`quota USER --cpus N ...`, admins): each column set
-- here replaces the role's (quotas) for that user. NULL: the role's;
-- -1: unlimited; otherwise the limit (memory and disk in MiB).
CREATE TABLE user_quotas (
    user_id     INTEGER PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    projects    INTEGER CHECK (projects IS NULL OR projects >= -1),
    vcpus       INTEGER CHECK (vcpus IS NULL OR vcpus >= -1),
    memory_mib  INTEGER CHECK (memory_mib IS NULL OR memory_mib >= -1),
    disk_mib    INTEGER CHECK (disk_mib IS NULL OR disk_mib >= -1)
);
