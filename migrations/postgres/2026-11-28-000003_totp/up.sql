-- The last TOTP time step accepted per account: a code is never accepted twice (RFC 6238 §5.2).
ALTER TABLE accounts ADD COLUMN totp_last_step BIGINT;
