-- What the worker knows of each integration's renewals (see the
-- PostgreSQL migration of the same name).
CREATE TABLE renewal_state (
    integration_id     TEXT    PRIMARY KEY NOT NULL REFERENCES integrations (id) ON DELETE CASCADE,
    expiry_sha         BLOB,
    expiry_known       INTEGER NOT NULL DEFAULT 0,
    secret_expires_at  INTEGER,
    last_renewed_at    INTEGER,
    stopped_sha        BLOB,
    failures           INTEGER NOT NULL DEFAULT 0,
    failed_at          INTEGER,
    claimed_until      INTEGER
) STRICT, WITHOUT ROWID;
