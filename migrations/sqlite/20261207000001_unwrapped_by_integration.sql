-- Unwrapped secret_ids keyed by owner, event id and integration, deleted
-- with their integration (see the PostgreSQL migration of the same name).
CREATE TABLE unwrapped_secrets_new (
    owner             TEXT    NOT NULL,
    event_id          TEXT    NOT NULL,
    integration_id    TEXT    NOT NULL REFERENCES integrations (id) ON DELETE CASCADE,
    secret_ciphertext BLOB    NOT NULL,
    secret_key_id     TEXT    NOT NULL,
    created_at        INTEGER NOT NULL,
    PRIMARY KEY (owner, event_id, integration_id)
) STRICT, WITHOUT ROWID;
INSERT INTO unwrapped_secrets_new
    SELECT u.* FROM unwrapped_secrets u
     WHERE EXISTS (SELECT 1 FROM integrations i WHERE i.id = u.integration_id);
DROP TABLE unwrapped_secrets;
ALTER TABLE unwrapped_secrets_new RENAME TO unwrapped_secrets;
CREATE INDEX unwrapped_secrets_created_at_idx ON unwrapped_secrets (created_at);
