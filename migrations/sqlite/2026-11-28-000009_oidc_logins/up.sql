-- OpenID Connect logins in flight (authorization code + PKCE): one row per `/auth/oidc/login`, consumed once by
-- `/auth/oidc/callback`, valid 10 minutes. In the database so any replica can finish a login another one started.
-- `state_hash` and `binding_hash` are SHA-256 (hex) of the state parameter and of the browser-binding cookie.
CREATE TABLE oidc_logins (
    state_hash    TEXT PRIMARY KEY,
    binding_hash  TEXT NOT NULL,
    pkce_verifier TEXT NOT NULL,
    nonce         TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL
);
CREATE INDEX oidc_logins_expires ON oidc_logins (expires_at);
