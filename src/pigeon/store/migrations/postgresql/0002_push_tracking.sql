-- A fan-out batch is committed, then pushed. A worker that dies in between leaves
-- entries nobody was told about: the lease stays marked `unpushed` until the worker
-- confirms the push (`fanout_pushed`), and whoever finds it expired nudges the members'
-- gateways to read their inboxes.
ALTER TABLE fanout_leases ADD COLUMN unpushed boolean NOT NULL DEFAULT false;
CREATE INDEX fanout_leases_unpushed ON fanout_leases (expires_at) WHERE unpushed;
