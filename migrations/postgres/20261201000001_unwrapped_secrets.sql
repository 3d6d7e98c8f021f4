-- Secret_ids unwrapped from a wrapping token, sealed as soon as Vault hands
-- them out: a token unwraps once only, so a worker that stops between the
-- unwrap and the outcome must find the secret here on redelivery instead of
-- asking Vault again. Keyed like processed_events (owner, event id; a
-- message without one by a keyed digest of its token); the secret is sealed
-- under encryption key `secret_key_id`, bound to owner, event id and
-- integration. Pruned with processed_events after
-- worker.dedupe_retention_hours.
CREATE TABLE unwrapped_secrets (
    owner             text        NOT NULL,
    event_id          text        NOT NULL,
    integration_id    uuid        NOT NULL,
    secret_ciphertext bytea       NOT NULL,
    secret_key_id     text        NOT NULL,
    created_at        timestamptz NOT NULL,
    PRIMARY KEY (owner, event_id)
);
CREATE INDEX unwrapped_secrets_created_at_idx ON unwrapped_secrets (created_at);
