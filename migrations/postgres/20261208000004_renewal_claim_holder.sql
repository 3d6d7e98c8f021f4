-- Who holds an integration's renewal claim: the renewal's event id (the
-- schedule's own for a scheduled renewal). The same renewal asked again
-- (a caller retrying after a worker died mid-renewal) takes its claim
-- back at once; any other waits for the claim to end or run out.
ALTER TABLE renewal_state ADD COLUMN claimed_by text;
