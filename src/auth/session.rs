//! Sessions and refresh tokens, as pure rules.
//!
//! Guarantees:
//! - A refresh token is 256 random bits from the OS, sent to the client base64url-encoded and stored only as
//!   its SHA-256 hash: a database leak yields no usable token.
//! - Every use rotates: the presented token is marked spent and a new one issued. A spent token presented
//!   again means it was copied: the whole session is revoked ([`RefreshDecision::Reuse`]) and an alert raised.
//! - A session is over after 15 minutes without activity or 12 hours after sign-in, whichever comes first.
//!
//! Storage: a `sessions` row holds [`SessionRecord`]; a `refresh_tokens` row holds [`RefreshTokenRecord`]
//! keyed by its hash (look it up by `hash_refresh_token(presented)`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use crate::error::{AppError, AppResult};

/// Default idle timeout (`auth.session_idle_secs`).
pub const DEFAULT_IDLE: Duration = Duration::seconds(900);
/// Default absolute lifetime (`auth.session_max_secs`).
pub const DEFAULT_ABSOLUTE: Duration = Duration::seconds(43_200);

/// A fresh refresh token: the text for the client and the hash to store.
pub fn new_refresh_token() -> (String, [u8; 32]) {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash_refresh_token(&token);
    (token, hash)
}

/// The stored form of a refresh token. A plain hash suffices: the token has 256 bits of entropy.
pub fn hash_refresh_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Automatic logoff rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPolicy {
    pub idle: Duration,
    pub absolute: Duration,
}

impl Default for SessionPolicy {
    fn default() -> Self {
        Self { idle: DEFAULT_IDLE, absolute: DEFAULT_ABSOLUTE }
    }
}

impl SessionPolicy {
    /// From the settings `auth.session_idle_secs` and `auth.session_max_secs`; both must be positive and
    /// the idle timeout no longer than the absolute lifetime.
    pub fn from_secs(idle_secs: u32, max_secs: u32) -> AppResult<Self> {
        if idle_secs == 0 || max_secs == 0 {
            return Err(AppError::invalid("auth.session_idle_secs", "Session timeouts must be positive."));
        }
        if idle_secs > max_secs {
            return Err(AppError::invalid(
                "auth.session_idle_secs",
                "The idle timeout must not exceed the session lifetime.",
            ));
        }
        Ok(Self { idle: Duration::seconds(idle_secs.into()), absolute: Duration::seconds(max_secs.into()) })
    }

    /// How stale `last_seen` may get in the database before a request refreshes it: a quarter of the idle
    /// limit, at most 30 s, at least 1 s. An active session is touched several times per idle period, so
    /// activity keeps it open however short `auth.session_idle_secs` is.
    pub fn touch_every(&self) -> Duration {
        (self.idle / 4_i32).clamp(Duration::SECOND, Duration::seconds(30))
    }

    /// Whether a session created at `created_at` and last used at `last_seen` is still open at `now`.
    pub fn is_live(&self, created_at: OffsetDateTime, last_seen: OffsetDateTime, now: OffsetDateTime) -> bool {
        now < created_at + self.absolute && now < last_seen + self.idle
    }
}

/// A stored session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: Uuid,
    pub subject: String,
    pub created_at: OffsetDateTime,
    /// Updated on every authenticated request and refresh.
    pub last_seen: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
}

/// A stored refresh token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshTokenRecord {
    pub hash: [u8; 32],
    pub session_id: Uuid,
    pub spent_at: Option<OffsetDateTime>,
}

/// What to do with a presented refresh token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshDecision {
    /// Mark the token spent, store a new one for the same session, set `last_seen = now`, issue tokens.
    Rotate,
    /// A spent token came back: revoke the session, raise an alert, answer `invalid_grant`.
    Reuse,
    /// Unknown token, or the session is revoked or over: answer `invalid_grant`.
    Reject,
}

impl SessionPolicy {
    /// Decides a refresh. `token` is the row found by hash (if any), `session` its session row (if any).
    pub fn decide_refresh(
        &self,
        token: Option<&RefreshTokenRecord>,
        session: Option<&SessionRecord>,
        now: OffsetDateTime,
    ) -> RefreshDecision {
        let Some(token) = token else {
            return RefreshDecision::Reject;
        };
        if token.spent_at.is_some() {
            return RefreshDecision::Reuse;
        }
        match session {
            Some(s)
                if s.id == token.session_id
                    && s.revoked_at.is_none()
                    && self.is_live(s.created_at, s.last_seen, now) =>
            {
                RefreshDecision::Rotate
            }
            _ => RefreshDecision::Reject,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-01-01 08:00 UTC);

    #[test]
    fn refresh_tokens_are_random_and_hashed() {
        let (a, ha) = new_refresh_token();
        let (b, hb) = new_refresh_token();
        assert_ne!(a, b);
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 32);
        assert_eq!(a.len(), 43);
        assert_eq!(hash_refresh_token(&a), ha);
        assert_eq!(hash_refresh_token(&b), hb);
        assert_ne!(ha, hb);
        assert_ne!(&ha[..], URL_SAFE_NO_PAD.decode(&a).unwrap().as_slice());
    }

    #[test]
    fn idle_and_absolute_timeouts() {
        let p = SessionPolicy::default();
        assert!(p.is_live(T0, T0, T0));
        assert!(p.is_live(T0, T0, T0 + Duration::seconds(899)));
        assert!(!p.is_live(T0, T0, T0 + Duration::seconds(900)));
        // Kept active: alive after 11h59m, over at 12h even with activity a second ago.
        let late = T0 + Duration::hours(12);
        assert!(p.is_live(T0, late - Duration::minutes(2), late - Duration::minutes(1)));
        assert!(!p.is_live(T0, late - Duration::seconds(1), late));
    }

    #[test]
    fn touch_interval_is_a_fraction_of_the_idle_limit() {
        assert_eq!(SessionPolicy::default().touch_every(), Duration::seconds(30));
        for idle in [1, 4, 20, 29, 60, 121] {
            let p = SessionPolicy::from_secs(idle, 3600).unwrap();
            assert!(p.touch_every() * 2 <= p.idle || p.touch_every() == Duration::SECOND, "idle {idle}");
            assert!(p.touch_every() >= Duration::SECOND);
        }
    }

    #[test]
    fn settings_are_checked() {
        assert_eq!(SessionPolicy::from_secs(900, 43_200).unwrap(), SessionPolicy::default());
        assert!(SessionPolicy::from_secs(0, 43_200).is_err());
        assert!(SessionPolicy::from_secs(900, 0).is_err());
        assert!(SessionPolicy::from_secs(3600, 600).is_err());
    }

    #[test]
    fn refresh_decisions() {
        let p = SessionPolicy::default();
        let session =
            SessionRecord { id: Uuid::now_v7(), subject: "u1".into(), created_at: T0, last_seen: T0, revoked_at: None };
        let (_, hash) = new_refresh_token();
        let fresh = RefreshTokenRecord { hash, session_id: session.id, spent_at: None };
        let spent = RefreshTokenRecord { spent_at: Some(T0), ..fresh.clone() };
        let now = T0 + Duration::minutes(5);

        assert_eq!(p.decide_refresh(Some(&fresh), Some(&session), now), RefreshDecision::Rotate);
        assert_eq!(p.decide_refresh(None, Some(&session), now), RefreshDecision::Reject);
        assert_eq!(p.decide_refresh(Some(&spent), Some(&session), now), RefreshDecision::Reuse);
        // Reuse is reported even when the session is already over.
        assert_eq!(p.decide_refresh(Some(&spent), None, now), RefreshDecision::Reuse);
        let revoked = SessionRecord { revoked_at: Some(T0), ..session.clone() };
        assert_eq!(p.decide_refresh(Some(&fresh), Some(&revoked), now), RefreshDecision::Reject);
        assert_eq!(p.decide_refresh(Some(&fresh), Some(&session), T0 + Duration::minutes(15)), RefreshDecision::Reject);
        let other = SessionRecord { id: Uuid::now_v7(), ..session.clone() };
        assert_eq!(p.decide_refresh(Some(&fresh), Some(&other), now), RefreshDecision::Reject);
        assert_eq!(p.decide_refresh(Some(&fresh), None, now), RefreshDecision::Reject);
    }
}
