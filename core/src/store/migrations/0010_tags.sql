-- Tags on projects (`tag NAME TAG...`, `projects --tag T`): labels the
-- owner chooses, slugs, a few per project. They go with the project
-- (`rm` drops them; `rename` keeps them, the id does not change).
CREATE TABLE project_tags (
    project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (project_id, tag)
) WITHOUT ROWID;
CREATE INDEX project_tags_by_tag ON project_tags(tag);
