-- Keys, accounts, sessions, break-glass grants, the audit trail and alerts. Times are Unix microseconds (UTC).

-- Data and blind-index keys, wrapped by the master key (never stored in the clear).
CREATE TABLE crypto_keys (
    purpose    TEXT NOT NULL,
    version    INTEGER NOT NULL,
    wrapped    TEXT NOT NULL,
    state      TEXT NOT NULL,
    master_id  TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (purpose, version)
);

-- Access-token signing keys (Ed25519), private half wrapped by the master key.
CREATE TABLE signing_keys (
    kid        TEXT PRIMARY KEY,
    wrapped    TEXT NOT NULL,
    public_key TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    retired_at BIGINT
);

-- Local accounts, OIDC-linked accounts and service clients (kind = user | oidc | service).
CREATE TABLE accounts (
    id               TEXT PRIMARY KEY,
    username         TEXT NOT NULL UNIQUE,
    kind             TEXT NOT NULL,
    role             TEXT NOT NULL,
    practitioner_id  TEXT,
    patient_id       TEXT,
    password_hash    TEXT,
    totp_secret      TEXT,
    disabled         BOOLEAN NOT NULL DEFAULT FALSE,
    created_at       BIGINT NOT NULL
);

CREATE TABLE sessions (
    id         TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    created_at BIGINT NOT NULL,
    last_seen  BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX sessions_account ON sessions (account_id);

-- Refresh tokens are stored only as SHA-256 hashes; a spent one presented again revokes its session.
CREATE TABLE refresh_tokens (
    hash       TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (id),
    created_at BIGINT NOT NULL,
    spent_at   BIGINT
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

-- Failed logins per key ("account:ID" or "address:IP"), shared by every replica.
CREATE TABLE login_failures (
    id  TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    at  BIGINT NOT NULL
);
CREATE INDEX login_failures_key ON login_failures (key, at);

-- Break-glass grants: the reason is free text, stored encrypted.
CREATE TABLE break_glass (
    id         TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    patient_id TEXT NOT NULL,
    reason     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX break_glass_account ON break_glass (account_id, expires_at);

-- The audit trail: one hash chain in `seq` order. `body` holds the canonical event bytes (no PHI).
CREATE TABLE audit_events (
    seq        BIGINT PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    recorded   BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    agent      TEXT,
    patient_id TEXT,
    body       TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX audit_events_patient ON audit_events (patient_id, recorded);
CREATE INDEX audit_events_agent ON audit_events (agent, recorded);
CREATE INDEX audit_events_recorded ON audit_events (recorded);

-- The chain head: one row, locked by every append so the chain has one order across writers and replicas.
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY,
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '');

-- Signed chain heads, exportable for off-site anchoring; `verify` detects truncation against the latest.
CREATE TABLE audit_checkpoints (
    seq       BIGINT PRIMARY KEY,
    hash      TEXT NOT NULL,
    at        BIGINT NOT NULL,
    signature TEXT NOT NULL
);

CREATE TABLE alerts (
    id            TEXT PRIMARY KEY,
    rule          TEXT NOT NULL,
    severity      TEXT NOT NULL,
    subject       TEXT NOT NULL,
    count         BIGINT NOT NULL,
    window_secs   BIGINT NOT NULL,
    raised_at     BIGINT NOT NULL,
    acknowledged_at BIGINT,
    ack_note      TEXT,
    delivery      TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  BIGINT
);
CREATE INDEX alerts_raised ON alerts (raised_at);
CREATE INDEX alerts_rule_subject ON alerts (rule, subject, raised_at);
