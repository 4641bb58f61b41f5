ALTER TABLE audit_checkpoints DROP COLUMN key_id;
DROP TABLE audit_signing_keys;
