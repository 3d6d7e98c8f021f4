-- Whether the next renewal of an integration must first look for
-- secret_ids an interrupted renewal minted (a LIST of the role's
-- secret_ids and a lookup of each): set before a renewal mints, cleared
-- once a renewal has accounted for everything it minted and replaced. A
-- row that exists already, or none at all, means yes: what renewals
-- before this column left is looked for once.
ALTER TABLE renewal_state ADD COLUMN sweep_due boolean NOT NULL DEFAULT true;
