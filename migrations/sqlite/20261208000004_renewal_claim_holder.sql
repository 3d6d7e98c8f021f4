-- Who holds an integration's renewal claim (see the PostgreSQL migration
-- of the same name).
ALTER TABLE renewal_state ADD COLUMN claimed_by TEXT;
