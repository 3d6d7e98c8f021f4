-- The key ids in use, found by index: the start-up key check samples one
-- secret per key id, and with these it reads a few index entries per key
-- rather than every row. A rotation keeps an integration's key ids, so its
-- update changes no entry of either.
CREATE INDEX integrations_by_secret_key ON integrations (secret_key_id, id);
CREATE INDEX integrations_by_previous_key ON integrations (previous_key_id, id);
