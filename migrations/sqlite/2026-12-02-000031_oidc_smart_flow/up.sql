-- An OpenID Connect login started from the SMART authorize page carries that authorization's flow handle,
-- sealed like the PKCE verifier and nonce (AAD: login, state hash, column), so the callback can continue the
-- app's authorization instead of answering with tokens. NULL for a direct `/auth/oidc/login`.
ALTER TABLE oidc_logins ADD COLUMN smart_flow TEXT;
