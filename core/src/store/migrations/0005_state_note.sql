-- Why a project is in its state when Kennel, not a person, put it there
-- ("the VM exited unexpectedly", later "idle 1h"). Cleared by the next
-- state change a person makes.
ALTER TABLE projects ADD COLUMN state_note TEXT;
