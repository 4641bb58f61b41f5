//! The per-account concurrency limit on expensive operations (searches, history, `$everything`,
//! `$access-report`): at most `limits.max_concurrent_per_account` in flight per account, in this process.
//!
//! A [`Permit`] is a guard: it is taken before the operation's first stage and given back when it is dropped,
//! on every path (success, error, a cancelled request future). The count map holds account keys only (issuer and
//! subject), never request content, and an entry is removed when its count falls to zero.

use crate::error::AppError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// The setting named in the refusal.
pub(crate) const SETTING: &str = "limits.max_concurrent_per_account";

/// How long a refused caller is told to wait (`Retry-After`).
const RETRY_AFTER_SECS: u64 = 1;

/// In-flight counts per account, shared by every handle of the records service.
#[derive(Debug, Clone, Default)]
pub(crate) struct Limiter {
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

/// One admitted expensive operation; dropping it gives the slot back.
#[derive(Debug)]
pub(crate) struct Permit {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Limiter {
    /// Admits one more operation for `key` unless `max` are already in flight: else 429 naming the limit.
    pub(crate) fn acquire(&self, key: &str, max: usize) -> Result<Permit, AppError> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(key.to_owned()).or_insert(0);
        if *n >= max {
            if *n == 0 {
                counts.remove(key);
            }
            return Err(AppError::ConcurrencyLimit { setting: SETTING, retry_after_secs: RETRY_AFTER_SECS });
        }
        *n += 1;
        Ok(Permit { counts: self.counts.clone(), key: key.to_owned() })
    }

    /// Operations in flight for `key` (tests).
    #[cfg(test)]
    fn in_flight(&self, key: &str) -> usize {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner).get(key).copied().unwrap_or(0)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_per_account_and_other_accounts_unaffected() {
        let l = Limiter::default();
        let a: Vec<Permit> = (0..4).map(|_| l.acquire("a", 4).unwrap()).collect();
        assert!(matches!(l.acquire("a", 4), Err(AppError::ConcurrencyLimit { setting: SETTING, .. })));
        let b = l.acquire("b", 4).unwrap();
        assert_eq!(l.in_flight("a"), 4);
        drop(a);
        assert_eq!(l.in_flight("a"), 0);
        assert!(l.counts.lock().unwrap().get("a").is_none(), "an idle account leaves no entry");
        let _again = l.acquire("a", 4).unwrap();
        drop(b);
        assert_eq!(l.in_flight("b"), 0);
    }

    #[test]
    fn a_zero_limit_refuses_and_leaves_no_entry() {
        let l = Limiter::default();
        assert!(l.acquire("a", 0).is_err());
        assert!(l.counts.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_operation_gives_its_permit_back() {
        let l = Limiter::default();
        let held = l.acquire("a", 1).unwrap();
        let task = tokio::spawn(async move {
            let _p = held;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        task.abort();
        let _ = task.await;
        assert_eq!(l.in_flight("a"), 0);
        assert!(l.acquire("a", 1).is_ok());
    }
}
