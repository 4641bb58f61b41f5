//! Login throttling: exponential backoff per account and per client address, and a hard limit of 100
//! failed attempts per account per hour.
//!
//! The rule, for one key (an account, or a client address), given the failed attempts recorded for it in the
//! last hour (`failures`, counting back no further than its last successful login) and the time of the latest:
//! - the first `free` failures cost nothing;
//! - after that the next attempt waits 1 s, then 2 s, 4 s, … from the latest failure, capped at 15 minutes;
//! - with `hard_limit` failures in the hour the key is locked until an hour after the latest failure.
//!
//! [`super::attempts`] checks both keys *before* verifying the password, under a reservation of the account's
//! key (a throttled attempt never reaches argon2 and is not counted as a failure, but it is audited so the
//! failed-login rules see it), answers 429 with `Retry-After` = the larger wait, and records a failure after a
//! wrong password. Keys are keyed hashes, never names. Unknown usernames count against their name like real ones,
//! so throttling does not reveal which accounts exist.
//!
//! A client address gets more free attempts than an account because many users may share one (a clinic's
//! NAT), and no hard lock, so one careless workstation cannot lock a whole site out for an hour.

use time::{Duration, OffsetDateTime};

use crate::error::AppError;

/// The counting window.
pub const WINDOW: Duration = Duration::HOUR;
/// The longest backoff wait.
pub const MAX_BACKOFF: Duration = Duration::minutes(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    /// Failures in the window that cost nothing.
    pub free: u32,
    /// Failures in the window that lock the key until the window has passed.
    pub hard_limit: Option<u32>,
}

/// Per account: 5 free failures, then backoff; locked at 100 failures in an hour.
pub const ACCOUNT: Throttle = Throttle { free: 5, hard_limit: Some(100) };
/// Per client address: 20 free failures, then backoff; no hard lock.
pub const ADDRESS: Throttle = Throttle { free: 20, hard_limit: None };

impl Throttle {
    /// How long the key must still wait before its next attempt at `now`; `None` when it may try now.
    pub fn retry_after(&self, failures: u32, last_failure: OffsetDateTime, now: OffsetDateTime) -> Option<Duration> {
        let wait = if self.hard_limit.is_some_and(|limit| failures >= limit) {
            WINDOW
        } else if failures < self.free {
            return None;
        } else {
            backoff(failures - self.free)
        };
        let remaining = last_failure + wait - now;
        remaining.is_positive().then_some(remaining)
    }
}

/// 2^n seconds, capped at [`MAX_BACKOFF`].
fn backoff(n: u32) -> Duration {
    let secs = 1i64.checked_shl(n).filter(|s| *s > 0).unwrap_or(i64::MAX);
    Duration::seconds(secs).min(MAX_BACKOFF)
}

/// The 429 error for a wait, with `Retry-After` in whole seconds, rounded up.
pub fn too_many_requests(wait: Duration) -> AppError {
    let secs = wait.whole_seconds() + i64::from(wait.subsec_nanoseconds() > 0);
    AppError::TooManyRequests { retry_after_secs: u64::try_from(secs.max(1)).unwrap_or(1) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-01-01 08:00 UTC);

    #[test]
    fn account_backoff_doubles_then_caps() {
        assert_eq!(ACCOUNT.retry_after(0, T0, T0), None);
        assert_eq!(ACCOUNT.retry_after(4, T0, T0), None);
        assert_eq!(ACCOUNT.retry_after(5, T0, T0), Some(Duration::seconds(1)));
        assert_eq!(ACCOUNT.retry_after(6, T0, T0), Some(Duration::seconds(2)));
        assert_eq!(ACCOUNT.retry_after(9, T0, T0), Some(Duration::seconds(16)));
        assert_eq!(ACCOUNT.retry_after(14, T0, T0), Some(Duration::seconds(512)));
        assert_eq!(ACCOUNT.retry_after(15, T0, T0), Some(MAX_BACKOFF));
        assert_eq!(ACCOUNT.retry_after(99, T0, T0), Some(MAX_BACKOFF));
        // Time already waited counts.
        assert_eq!(ACCOUNT.retry_after(9, T0, T0 + Duration::seconds(10)), Some(Duration::seconds(6)));
        assert_eq!(ACCOUNT.retry_after(9, T0, T0 + Duration::seconds(16)), None);
    }

    #[test]
    fn account_hard_lock_at_100_per_hour() {
        assert_eq!(ACCOUNT.retry_after(100, T0, T0), Some(WINDOW));
        assert_eq!(ACCOUNT.retry_after(u32::MAX, T0, T0 + Duration::minutes(59)), Some(Duration::minutes(1)));
        assert_eq!(ACCOUNT.retry_after(100, T0, T0 + WINDOW), None);
    }

    #[test]
    fn address_is_more_lenient_and_never_hard_locked() {
        assert_eq!(ADDRESS.retry_after(19, T0, T0), None);
        assert_eq!(ADDRESS.retry_after(20, T0, T0), Some(Duration::seconds(1)));
        assert_eq!(ADDRESS.retry_after(500, T0, T0), Some(MAX_BACKOFF));
        assert_eq!(ADDRESS.retry_after(500, T0, T0 + MAX_BACKOFF), None);
    }

    #[test]
    fn retry_after_header_rounds_up() {
        let secs = |d| match too_many_requests(d) {
            AppError::TooManyRequests { retry_after_secs } => Some(retry_after_secs),
            _ => None,
        };
        assert_eq!(secs(Duration::seconds(2)), Some(2));
        assert_eq!(secs(Duration::milliseconds(1500)), Some(2));
        assert_eq!(secs(Duration::milliseconds(10)), Some(1));
        assert_eq!(secs(Duration::minutes(15)), Some(900));
    }
}
