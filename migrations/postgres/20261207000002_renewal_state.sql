-- What the worker knows of each integration's renewals, beside the row a
-- rotation changes (whose updates stay HOT): the expiry Vault gave for a
-- secret, tied to that secret by the SHA-256 of its ciphertext (any later
-- change of the secret makes it unknown again); when a renewal last
-- succeeded; a renewal refused for good (422) for the secret of
-- `stopped_sha`, which stops the schedule until the secret changes;
-- transient failures in a row and when the last one was; and the claim of
-- the worker renewing it now.
CREATE TABLE renewal_state (
    integration_id     uuid PRIMARY KEY REFERENCES integrations (id) ON DELETE CASCADE,
    expiry_sha         bytea,
    expiry_known       boolean NOT NULL DEFAULT false,
    secret_expires_at  timestamptz,
    last_renewed_at    timestamptz,
    stopped_sha        bytea,
    failures           integer NOT NULL DEFAULT 0,
    failed_at          timestamptz,
    claimed_until      timestamptz
);
