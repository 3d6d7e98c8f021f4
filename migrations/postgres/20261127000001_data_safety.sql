-- What a processed event applied, so that a reused event id with another
-- integration or another secret is told apart from a repeat: the keyed
-- digest (HMAC-SHA256 under a MAC key derived from encryption key
-- `digest_key_id`) of the secret. Never the secret, never an unkeyed hash.
-- Rows written before this migration have neither.
ALTER TABLE processed_events ADD COLUMN secret_digest bytea;
ALTER TABLE processed_events ADD COLUMN digest_key_id text;

-- One check value per encryption key id that has sealed anything here: the
-- MAC of a fixed label under the key. A process whose key of that id gives
-- another value holds the wrong key and refuses to start.
CREATE TABLE key_checks (
    key_id      text        PRIMARY KEY,
    check_value bytea       NOT NULL,
    created_at  timestamptz NOT NULL
);
