ALTER TABLE accounts DROP COLUMN totp_last_step;
