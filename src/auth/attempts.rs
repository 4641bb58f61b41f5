//! Sign-in attempts over the database: throttle keys as keyed hashes, one in-flight password verification per
//! throttle key, and the known-address allowance, for password logins and client secrets alike.
//!
//! Guarantees:
//! - No attempted name or address is stored: a throttle key is `hex(HMAC-SHA256(K, parts))`, with `K` derived
//!   from the key ring ([`THROTTLE_KEY_LABEL`]) and never stored, so a database leak does not show which
//!   usernames (or passwords typed into the username field) were tried.
//! - At most one password verification per throttle key is in flight, on every replica: an attempt first
//!   reserves its key (`INSERT … ON CONFLICT DO NOTHING`, else `UPDATE … WHERE until < now`, both checked by
//!   the affected-row count), then reads the failure count under the reservation, then verifies. A failure is
//!   recorded before the reservation is released, in one transaction, so the next holder sees it. Parallel
//!   attempts that find the key reserved are refused as throttled without touching argon2.
//! - Lockout cannot deny a user indefinitely from where they usually sign in: an (account, address) pair with a
//!   successful sign-in in the last [`KNOWN_ADDRESS_DAYS`] days is throttled by its own key, not by the account's,
//!   so failures from elsewhere do not lock it; every key's backoff is capped ([`super::throttle::MAX_BACKOFF`]).
//! - A reservation a crashed holder left lapses after [`RESERVATION`].

use super::throttle::{self, Throttle};
use crate::crypto::master::{KEY_LEN, hex, hmac_sha256};
use crate::crypto::push_part;
use crate::crypto::store::micros;
use crate::error::AppResult;
use crate::store::AnyConnection;
use crate::store::schema::{login_failures, login_known_addresses, login_reservations};
use diesel::prelude::*;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;
use zeroize::Zeroizing;

/// The HKDF label of the throttle-key secret ([`crate::crypto::KeyRing::derived_key`]).
pub const THROTTLE_KEY_LABEL: &str = "carevault/throttle/v1";
/// How long a reservation holds at most (a verification takes well under a second).
pub const RESERVATION: Duration = Duration::seconds(30);
/// How long a successful sign-in makes its address known to the account.
pub const KNOWN_ADDRESS_DAYS: i64 = 90;
/// `Retry-After` for an attempt refused because another one for the same key is being verified.
pub const BUSY: Duration = Duration::seconds(1);

/// Computes throttle keys. `Debug` prints nothing secret.
pub struct ThrottleKeyer {
    key: Zeroizing<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for ThrottleKeyer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThrottleKeyer")
    }
}

impl ThrottleKeyer {
    pub fn new(key: Zeroizing<[u8; KEY_LEN]>) -> Self {
        Self { key }
    }

    /// A process-local random key (tools and tests that build an [`super::service::AuthService`] by hand).
    pub fn random() -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, key.as_mut());
        Self { key }
    }

    fn mac(&self, parts: &[&str]) -> String {
        let mut msg = Vec::new();
        for p in parts {
            push_part(&mut msg, p.as_bytes());
        }
        hex(&hmac_sha256(&self.key, &msg))
    }

    /// The keys of one attempt: `kind` is `account` (password login) or `client` (client secret).
    pub fn keys(&self, kind: &str, name: &str, address: &str) -> AttemptKeys {
        AttemptKeys {
            account: self.mac(&[kind, name]),
            address: self.mac(&["address", address]),
            pair: self.mac(&[kind, name, address]),
            known: self.mac(&["known", kind, name, address]),
        }
    }
}

/// The stored keys of one attempt (keyed hashes only).
#[derive(Debug, Clone)]
pub struct AttemptKeys {
    /// Failures of the name from anywhere.
    account: String,
    /// Failures from the address, whatever the name.
    address: String,
    /// Failures of the name from this address (the governing key when the address is known).
    pair: String,
    /// The known-address row of the name and address.
    known: String,
}

/// A held reservation: pass it to [`finish`].
#[derive(Debug)]
pub struct Reservation {
    key: String,
    holder: String,
}

/// Whether an attempt may verify its credential.
#[derive(Debug)]
pub enum Admission {
    Proceed(Reservation),
    /// Refused without verification; wait this long.
    Throttled(Duration),
}

/// Reserves the attempt's governing key and checks the backoff of it and of the address under the reservation.
pub fn admit(c: &mut AnyConnection, keys: &AttemptKeys, now: OffsetDateTime) -> AppResult<Admission> {
    let known_since = micros(now - Duration::days(KNOWN_ADDRESS_DAYS));
    let known = login_known_addresses::table
        .filter(login_known_addresses::key.eq(&keys.known))
        .filter(login_known_addresses::last_success.gt(known_since))
        .count()
        .get_result::<i64>(c)?
        > 0;
    let governing = if known { &keys.pair } else { &keys.account };
    // A cheap look first, so a flood of throttled attempts does not write reservations.
    if let Some(wait) = wait(c, governing, &keys.address, now)? {
        return Ok(Admission::Throttled(wait));
    }
    let holder = Uuid::new_v4().to_string();
    let until = micros(now + RESERVATION);
    let row = (
        login_reservations::key.eq(governing),
        login_reservations::holder.eq(&holder),
        login_reservations::until.eq(until),
    );
    // `ON CONFLICT DO NOTHING` through the concrete connection (diesel's MultiConnection has no upsert).
    let inserted = match c {
        AnyConnection::Postgresql(c) => {
            diesel::insert_into(login_reservations::table).values(row).on_conflict_do_nothing().execute(c)?
        }
        AnyConnection::Sqlite(c) => {
            diesel::insert_into(login_reservations::table).values(row).on_conflict_do_nothing().execute(c)?
        }
    };
    let reserved = inserted == 1
        || diesel::update(
            login_reservations::table
                .filter(login_reservations::key.eq(governing))
                .filter(login_reservations::until.le(micros(now))),
        )
        .set((login_reservations::holder.eq(&holder), login_reservations::until.eq(until)))
        .execute(c)?
            == 1;
    if !reserved {
        return Ok(Admission::Throttled(BUSY));
    }
    let reservation = Reservation { key: governing.clone(), holder };
    // Failures recorded by the previous holder are visible now.
    if let Some(wait) = wait(c, governing, &keys.address, now)? {
        release(c, &reservation)?;
        return Ok(Admission::Throttled(wait));
    }
    Ok(Admission::Proceed(reservation))
}

fn wait(c: &mut AnyConnection, governing: &str, address: &str, now: OffsetDateTime) -> AppResult<Option<Duration>> {
    let of = |c: &mut AnyConnection, key: &str, rule: Throttle| -> AppResult<Option<Duration>> {
        Ok(failures(c, key, now)?.and_then(|(n, last)| rule.retry_after(n, last, now)))
    };
    Ok([of(c, governing, throttle::ACCOUNT)?, of(c, address, throttle::ADDRESS)?].into_iter().flatten().max())
}

/// Records the outcome and releases the reservation, in one transaction: a failure counts against the name, the
/// pair and the address; a success makes the address known to the name.
pub fn finish(
    c: &mut AnyConnection,
    keys: &AttemptKeys,
    reservation: &Reservation,
    success: bool,
    now: OffsetDateTime,
) -> AppResult<()> {
    c.transaction(|c| {
        if success {
            let updated =
                diesel::update(login_known_addresses::table.filter(login_known_addresses::key.eq(&keys.known)))
                    .set(login_known_addresses::last_success.eq(micros(now)))
                    .execute(c)?;
            if updated == 0 {
                let row =
                    (login_known_addresses::key.eq(&keys.known), login_known_addresses::last_success.eq(micros(now)));
                match c {
                    AnyConnection::Postgresql(c) => diesel::insert_into(login_known_addresses::table)
                        .values(row)
                        .on_conflict_do_nothing()
                        .execute(c)?,
                    AnyConnection::Sqlite(c) => diesel::insert_into(login_known_addresses::table)
                        .values(row)
                        .on_conflict_do_nothing()
                        .execute(c)?,
                };
            }
        } else {
            for key in [&keys.account, &keys.pair, &keys.address] {
                record_failure(c, key, now)?;
            }
        }
        release(c, reservation)
    })
}

/// [`finish`] for an attempt that came to an outcome (`Some(success)`), [`release`] for one that ended in an
/// error (`None`: nothing is counted).
pub fn conclude(
    c: &mut AnyConnection,
    keys: &AttemptKeys,
    reservation: &Reservation,
    outcome: Option<bool>,
    now: OffsetDateTime,
) -> AppResult<()> {
    match outcome {
        Some(success) => finish(c, keys, reservation, success, now),
        None => release(c, reservation),
    }
}

/// Gives a reservation back without recording anything (an attempt that ended in an error).
pub fn release(c: &mut AnyConnection, reservation: &Reservation) -> AppResult<()> {
    diesel::delete(
        login_reservations::table
            .filter(login_reservations::key.eq(&reservation.key))
            .filter(login_reservations::holder.eq(&reservation.holder)),
    )
    .execute(c)?;
    Ok(())
}

/// Failures in the throttle window for a key: (count, last failure time).
fn failures(c: &mut AnyConnection, key: &str, now: OffsetDateTime) -> AppResult<Option<(u32, OffsetDateTime)>> {
    let since = micros(now - throttle::WINDOW);
    let times: Vec<i64> = login_failures::table
        .filter(login_failures::key.eq(key))
        .filter(login_failures::at.gt(since))
        .select(login_failures::at)
        .load(c)?;
    let Some(last) = times.iter().max() else { return Ok(None) };
    Ok(Some((u32::try_from(times.len()).unwrap_or(u32::MAX), super::service::from_micros(*last))))
}

fn record_failure(c: &mut AnyConnection, key: &str, now: OffsetDateTime) -> AppResult<()> {
    diesel::insert_into(login_failures::table)
        .values((
            login_failures::id.eq(Uuid::new_v4().to_string()),
            login_failures::key.eq(key),
            login_failures::at.eq(micros(now)),
        ))
        .execute(c)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_keyed_hashes_that_separate_kinds_and_addresses() {
        let k = ThrottleKeyer::new(Zeroizing::new([7u8; KEY_LEN]));
        let a = k.keys("account", "CANARY-name", "10.0.0.1");
        let b = k.keys("client", "CANARY-name", "10.0.0.1");
        let c = k.keys("account", "CANARY-name", "10.0.0.2");
        for key in [&a.account, &a.address, &a.pair, &a.known] {
            assert_eq!(key.len(), 64);
            assert!(!key.contains("CANARY") && !key.contains("10.0.0.1"));
        }
        assert_ne!(a.account, b.account);
        assert_eq!(a.account, c.account);
        assert_ne!(a.pair, c.pair);
        assert_ne!(a.address, c.address);
        let other = ThrottleKeyer::new(Zeroizing::new([8u8; KEY_LEN]));
        assert_ne!(other.keys("account", "CANARY-name", "10.0.0.1").account, a.account);
    }
}
