-- The secret an applied rotation replaced, kept sealed (same key ring,
-- same binding to the integration as the current one) so that a rollback
-- can put it back, until `previous_expires_at`
-- (worker.previous_secret_retention_hours after it was replaced); the
-- worker erases it then.
ALTER TABLE integrations ADD COLUMN previous_ciphertext bytea;
ALTER TABLE integrations ADD COLUMN previous_key_id text;
ALTER TABLE integrations ADD COLUMN previous_expires_at timestamptz;
-- What the status operation reports of the last applied rotation or
-- rollback: its event id (if it had one) and when the worker applied it.
ALTER TABLE integrations ADD COLUMN last_event_id text;
ALTER TABLE integrations ADD COLUMN last_applied_at timestamptz;
-- No index covers a column a rotation changes, and pages keep room for
-- the new row version: an update stays on its page without touching any
-- index (a HOT update), the cost that bounds a backlog drain. The erasure
-- of expired previous secrets scans the table every few minutes instead.
ALTER TABLE integrations SET (fillfactor = 80);
-- Rotations may name the role instead of the integration.
CREATE INDEX integrations_role_idx ON integrations (owner, role_id);
-- The keyed digest (HMAC-SHA256 under the MAC key derived from encryption
-- key `secret_digest_key_id`, the purpose of processed_events' digests) of
-- the current secret: lets one statement tell a new secret from the stored
-- one without opening it (see the rotation fast path). NULL where unknown.
ALTER TABLE integrations ADD COLUMN secret_digest bytea;
ALTER TABLE integrations ADD COLUMN secret_digest_key_id text;
-- SHA-256 of secret_ciphertext as this code wrote it: the fast path
-- overwrites only a stored secret whose bytes are intact (one that would
-- not open is left for an operator, as the batch path does).
ALTER TABLE integrations ADD COLUMN secret_ciphertext_sha256 bytea;
