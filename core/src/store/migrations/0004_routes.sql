-- Where the gateways find a project's VM: its sshd and its app, as the host
-- reaches them. Written when a VM becomes ready; follows renames (by id);
-- goes with the project.
CREATE TABLE routes (
    project_id  INTEGER PRIMARY KEY REFERENCES projects (id) ON DELETE CASCADE,
    ssh_addr    TEXT NOT NULL,
    app_addr    TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
);
