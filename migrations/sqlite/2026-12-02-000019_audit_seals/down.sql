DROP TABLE audit_seal_keys;
ALTER TABLE audit_events DROP COLUMN seal;
