-- Audit checkpoint signing keys (Ed25519), private half wrapped by the master key under the key id
-- `carevault/audit-checkpoint/<key_id>`; `key_id` is the checkpoint key id (hex of the first 8 bytes of SHA-256
-- of the public key). Kept apart from `signing_keys`, whose rows are all token-signing keys published in the JWKS.
CREATE TABLE audit_signing_keys (
    key_id     TEXT PRIMARY KEY,
    wrapped    TEXT NOT NULL,
    public_key TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    retired_at BIGINT
);

-- Which key signed each checkpoint.
ALTER TABLE audit_checkpoints ADD COLUMN key_id TEXT NOT NULL DEFAULT '';
