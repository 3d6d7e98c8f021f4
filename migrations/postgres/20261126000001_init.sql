-- Vault integrations. The secret_id is stored only sealed with AES-256-GCM
-- (nonce || ciphertext || tag), with the id of the key that sealed it.
CREATE TABLE integrations (
    id                uuid        PRIMARY KEY,
    owner             text        NOT NULL,
    name              text        NOT NULL,
    address           text        NOT NULL,
    namespace         text,
    role_id           text        NOT NULL,
    secret_ciphertext bytea       NOT NULL,
    secret_key_id     text        NOT NULL,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    -- Vault-side time of the last rotation applied; stale events are refused.
    last_rotated_at   timestamptz,
    -- Rotations that changed the secret: an audit count, and proof that no
    -- event was applied twice.
    rotation_count    bigint      NOT NULL DEFAULT 0
);
CREATE INDEX integrations_owner_idx ON integrations (owner, created_at, id);
CREATE INDEX integrations_key_idx ON integrations (secret_key_id);

-- API keys, kept only as SHA-256 digests of the full-entropy key.
CREATE TABLE api_keys (
    id         uuid        PRIMARY KEY,
    owner      text        NOT NULL,
    key_hash   bytea       NOT NULL UNIQUE,
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX api_keys_owner_idx ON api_keys (owner, created_at);

-- One row per processed event id (per owner), written in the same
-- transaction as the change it caused: a repeat of the event finds it and
-- yields the same outcome without changing anything.
CREATE TABLE processed_events (
    owner          text        NOT NULL,
    event_id       text        NOT NULL,
    integration_id uuid        NOT NULL,
    outcome        text        NOT NULL,
    record         text,
    processed_at   timestamptz NOT NULL,
    PRIMARY KEY (owner, event_id)
);
CREATE INDEX processed_events_processed_at_idx ON processed_events (processed_at);
