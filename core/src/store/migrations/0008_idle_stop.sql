-- Idle stop. `idle_stop_secs`: the project's own limit (NULL: the
-- configured default, vm.idle_stop; 0: never). `idle_secs`: how long the
-- running VM had been idle when Kennel last wrote it down, so a restarted
-- daemon resumes the timer instead of starting it over (or stopping a VM
-- early because it was not watching while it was down).
ALTER TABLE projects ADD COLUMN idle_stop_secs INTEGER;
ALTER TABLE projects ADD COLUMN idle_secs INTEGER NOT NULL DEFAULT 0;
