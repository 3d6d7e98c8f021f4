-- An unwrapped secret_id belongs to one owner's message AND the integration
-- it rotates: an event id reused for another integration neither finds nor
-- hides the first one's secret. Deleting an integration deletes what was
-- unwrapped for it.
DELETE FROM unwrapped_secrets u
 WHERE NOT EXISTS (SELECT 1 FROM integrations i WHERE i.id = u.integration_id);
ALTER TABLE unwrapped_secrets DROP CONSTRAINT unwrapped_secrets_pkey;
ALTER TABLE unwrapped_secrets ADD PRIMARY KEY (owner, event_id, integration_id);
ALTER TABLE unwrapped_secrets
    ADD CONSTRAINT unwrapped_secrets_integration_fkey
    FOREIGN KEY (integration_id) REFERENCES integrations (id) ON DELETE CASCADE;
