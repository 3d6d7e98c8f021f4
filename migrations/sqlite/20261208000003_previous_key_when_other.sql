-- `previous_key_id` names the previous secret's key only when it is not
-- the current secret's key (after a key change); NULL means "the current
-- one's", the usual case. A rotation under an unchanged key then changes
-- no indexed column: PostgreSQL updates the row in place (HOT) instead of
-- adding an entry to each index of the table, and the key check's index
-- over the column holds only the rows that differ.
UPDATE integrations SET previous_key_id = NULL WHERE previous_key_id = secret_key_id;
DROP INDEX integrations_by_previous_key;
CREATE INDEX integrations_by_previous_key ON integrations (previous_key_id, id)
    WHERE previous_key_id IS NOT NULL;
-- `integrations_by_secret_key (secret_key_id, id)` serves every use of this one.
DROP INDEX integrations_key_idx;
