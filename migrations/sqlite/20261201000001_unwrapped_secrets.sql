-- Unwrapped secret_ids, sealed as soon as Vault hands them out (see the
-- PostgreSQL migration of the same name).
CREATE TABLE unwrapped_secrets (
    owner             TEXT    NOT NULL,
    event_id          TEXT    NOT NULL,
    integration_id    TEXT    NOT NULL,
    secret_ciphertext BLOB    NOT NULL,
    secret_key_id     TEXT    NOT NULL,
    created_at        INTEGER NOT NULL,
    PRIMARY KEY (owner, event_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX unwrapped_secrets_created_at_idx ON unwrapped_secrets (created_at);
