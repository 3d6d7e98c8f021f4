-- Whether the next renewal must first look for what an interrupted
-- renewal minted (see the PostgreSQL migration of the same name).
ALTER TABLE renewal_state ADD COLUMN sweep_due INTEGER NOT NULL DEFAULT 1;
