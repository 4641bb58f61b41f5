-- Issue 18: the audit chain keyed outside the database. The last record of every appended batch carries a seal,
-- HMAC-SHA256 over its seq and chain hash under a key kept wrapped by the master key (never in the clear);
-- records from `first_seq` of the key on must be covered by a seal. Records before it (written before the key
-- existed) are verified the old way: that seq is the marked transition point.
ALTER TABLE audit_events ADD COLUMN seal TEXT;
CREATE TABLE audit_seal_keys (
    key_id     TEXT PRIMARY KEY,
    wrapped    TEXT NOT NULL,
    first_seq  BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
