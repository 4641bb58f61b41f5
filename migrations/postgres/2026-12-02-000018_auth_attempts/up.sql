-- Issue 18: throttle keys are keyed hashes, an attempt reserves its throttle key while the password is checked,
-- and addresses an account signed in from recently get their own throttle budget.
-- The plaintext keys written before ("account:NAME", "address:IP") are dropped: they named attempted usernames.
DELETE FROM login_failures;

-- One in-flight verification per throttle key: a row is a reservation held until `until` (a crashed holder's
-- reservation lapses then) or until its holder deletes it.
CREATE TABLE login_reservations (
    key    TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until  BIGINT NOT NULL
);

-- Account and address pairs with a successful sign-in (keyed hash of both), with the time of the latest.
CREATE TABLE login_known_addresses (
    key          TEXT PRIMARY KEY,
    last_success BIGINT NOT NULL
);
