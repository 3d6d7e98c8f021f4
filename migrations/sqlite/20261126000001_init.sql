-- The SQLite schema: the same tables as PostgreSQL's. Ids are UUIDs in
-- their hyphenated text form; times are microseconds since the Unix epoch
-- (UTC), so that they compare and sort as numbers. STRICT tables refuse a
-- value of the wrong type.

-- Vault integrations. The secret_id is stored only sealed with AES-256-GCM
-- (nonce || ciphertext || tag), with the id of the key that sealed it.
CREATE TABLE integrations (
    id                TEXT    PRIMARY KEY NOT NULL,
    owner             TEXT    NOT NULL,
    name              TEXT    NOT NULL,
    address           TEXT    NOT NULL,
    namespace         TEXT,
    role_id           TEXT    NOT NULL,
    secret_ciphertext BLOB    NOT NULL,
    secret_key_id     TEXT    NOT NULL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    -- Vault-side time of the last rotation applied; stale events are refused.
    last_rotated_at   INTEGER,
    -- Rotations that changed the secret.
    rotation_count    INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX integrations_owner_idx ON integrations (owner, created_at, id);
CREATE INDEX integrations_key_idx ON integrations (secret_key_id);

-- API keys, kept only as SHA-256 digests of the full-entropy key.
CREATE TABLE api_keys (
    id         TEXT    PRIMARY KEY NOT NULL,
    owner      TEXT    NOT NULL,
    key_hash   BLOB    NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
) STRICT;
CREATE INDEX api_keys_owner_idx ON api_keys (owner, created_at);

-- One row per processed event id (per owner), written in the same
-- transaction as the change it caused.
CREATE TABLE processed_events (
    owner          TEXT    NOT NULL,
    event_id       TEXT    NOT NULL,
    integration_id TEXT    NOT NULL,
    outcome        TEXT    NOT NULL,
    record         TEXT,
    processed_at   INTEGER NOT NULL,
    PRIMARY KEY (owner, event_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX processed_events_processed_at_idx ON processed_events (processed_at);
