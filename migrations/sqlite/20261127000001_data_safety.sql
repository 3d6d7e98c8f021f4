-- What a processed event applied: the keyed digest of its secret (see the
-- PostgreSQL migration of the same name).
ALTER TABLE processed_events ADD COLUMN secret_digest BLOB;
ALTER TABLE processed_events ADD COLUMN digest_key_id TEXT;

-- One check value per encryption key id that has sealed anything here.
CREATE TABLE key_checks (
    key_id      TEXT    PRIMARY KEY NOT NULL,
    check_value BLOB    NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;
