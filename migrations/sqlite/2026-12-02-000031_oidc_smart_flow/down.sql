ALTER TABLE oidc_logins DROP COLUMN smart_flow;
