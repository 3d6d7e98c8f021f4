-- The previous secret, kept sealed for rollbacks until it expires, and the
-- last applied change for the status operation (see the PostgreSQL
-- migration of the same name).
ALTER TABLE integrations ADD COLUMN previous_ciphertext BLOB;
ALTER TABLE integrations ADD COLUMN previous_key_id TEXT;
ALTER TABLE integrations ADD COLUMN previous_expires_at INTEGER;
ALTER TABLE integrations ADD COLUMN last_event_id TEXT;
ALTER TABLE integrations ADD COLUMN last_applied_at INTEGER;
-- No index on the columns a rotation changes (see the PostgreSQL
-- migration).
CREATE INDEX integrations_role_idx ON integrations (owner, role_id);
ALTER TABLE integrations ADD COLUMN secret_digest BLOB;
ALTER TABLE integrations ADD COLUMN secret_digest_key_id TEXT;
ALTER TABLE integrations ADD COLUMN secret_ciphertext_sha256 BLOB;
