//! Webhook delivery: each pending alert is POSTed as JSON ([`super::Alert::payload`]) to `alerts.webhook_url`
//! with `X-Carevault-Signature: sha256=<hex HMAC-SHA256 of the body under alerts.webhook_secret>`.
//!
//! Delivery state lives in the alert row (`delivery`, `attempts`, `next_attempt`): an alert stays `pending`
//! until the receiver answers 2xx, retried with exponential backoff (5 s doubling, at most 1 h) on the
//! server's clock, for as long as it takes; a restart resumes from the rows. Before sending, a sender claims
//! the row by moving `next_attempt` (a conditional update), so two replicas do not send the same attempt.
//! Without a secret nothing is sent (fail closed): alerts stay pending until the configuration is fixed.

use super::{Alert, delivery};
use crate::clock::SharedClock;
use crate::config::{Config, Profile};
use crate::crypto::store::micros;
use crate::error::{AppResult, Chain};
use crate::store::Db;
use crate::store::schema::alerts;
use diesel::prelude::*;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use time::{Duration, OffsetDateTime};

/// The signature header.
pub const SIGNATURE_HEADER: &str = "X-Carevault-Signature";
/// First retry delay; doubles per attempt.
pub const FIRST_BACKOFF: Duration = Duration::seconds(5);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::hours(1);
/// How long a claimed attempt may take before another sender may retry it.
const CLAIM: Duration = Duration::seconds(60);
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Alerts sent per round.
const ROUND: i64 = 50;

/// `sha256=<hex>` of HMAC-SHA256 over `body`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return String::new() };
    mac.update(body);
    format!("sha256={}", crate::auth::service::hex(&mac.finalize().into_bytes()))
}

/// Checks a signature header value in constant time (for receivers and tests).
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex) = header.strip_prefix("sha256=") else { return false };
    let Some(bytes) = decode_hex(hex) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return false };
    mac.update(body);
    mac.verify_slice(&bytes).is_ok()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The wait before the next attempt after `attempts` failed ones.
pub fn backoff(attempts: i32) -> Duration {
    let shift = u32::try_from(attempts.saturating_sub(1).max(0)).unwrap_or(0).min(20);
    (FIRST_BACKOFF * (1i32 << shift)).min(MAX_BACKOFF)
}

/// Sends pending alerts to the configured webhook.
pub struct Sender {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: SecretString,
}

impl Sender {
    /// The sender for this configuration; `None` (with the reason logged, never the URL or secret) when no
    /// webhook is configured or it cannot be used.
    pub fn from_config(cfg: &Config) -> Option<Sender> {
        let url = cfg.alerts.webhook_url.as_deref()?;
        let Ok(url) = reqwest::Url::parse(url) else {
            tracing::error!("`alerts.webhook_url` is not a URL; alerts are stored but not delivered");
            return None;
        };
        let https = url.scheme() == "https";
        let plain_allowed = url.scheme() == "http" && cfg.profile != Profile::Production;
        if !(https || plain_allowed) {
            tracing::error!("`alerts.webhook_url` must be https (http only in development); alerts are stored only");
            return None;
        }
        let secret = match cfg.webhook_secret() {
            Ok(Some(s)) if !s.expose_secret().is_empty() => s,
            _ => {
                tracing::error!("`alerts.webhook_secret_file` is missing or unreadable; alerts are not delivered");
                return None;
            }
        };
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .https_only(https)
            .build()
            .ok()?;
        Some(Sender { client, url, secret })
    }

    pub(super) async fn run(self, db: Db, clock: SharedClock, monitor: super::Monitor) {
        let wake = monitor.sink_notified();
        loop {
            tokio::select! {
                () = tokio::time::sleep(super::engine::POLL) => {}
                () = wake.notified() => {}
            }
            if let Err(e) = self.round(&db, &clock).await {
                tracing::error!(error.detail = %Chain(&e), "alert delivery round failed; will retry");
            }
        }
    }

    /// One round: every due alert gets one attempt. Returns how many were delivered.
    pub async fn round(&self, db: &Db, clock: &SharedClock) -> AppResult<usize> {
        let now = clock.now();
        let due: Vec<Alert> = db
            .run(move |c| {
                Ok(alerts::table
                    .filter(alerts::delivery.eq(delivery::PENDING))
                    .filter(alerts::next_attempt.le(micros(now)))
                    .order(alerts::raised_at.asc())
                    .limit(ROUND)
                    .select(Alert::as_select())
                    .load(c)?)
            })
            .await?;
        let mut delivered = 0;
        for alert in due {
            if !claim(db, &alert, now).await? {
                continue;
            }
            let ok = self.send(&alert).await;
            let attempts = alert.attempts.saturating_add(1);
            let id = alert.id.clone();
            let done_at = clock.now();
            db.run(move |c| {
                let row = alerts::table.filter(alerts::id.eq(&id));
                if ok {
                    diesel::update(row)
                        .set((
                            alerts::delivery.eq(delivery::DELIVERED),
                            alerts::attempts.eq(attempts),
                            alerts::next_attempt.eq(None::<i64>),
                        ))
                        .execute(c)?;
                } else {
                    diesel::update(row)
                        .set((
                            alerts::attempts.eq(attempts),
                            alerts::next_attempt.eq(Some(micros(done_at + backoff(attempts)))),
                        ))
                        .execute(c)?;
                }
                Ok(())
            })
            .await?;
            if ok {
                delivered += 1;
                tracing::info!(alert.id = %alert.id, alert.attempts = attempts, "alert delivered");
            } else {
                tracing::warn!(alert.id = %alert.id, alert.attempts = attempts, "alert delivery failed; will retry");
            }
        }
        Ok(delivered)
    }

    async fn send(&self, alert: &Alert) -> bool {
        let Ok(body) = serde_json::to_vec(&alert.payload()) else { return false };
        let signature = sign(self.secret.expose_secret().as_bytes(), &body);
        let resp = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await;
        resp.is_ok_and(|r| r.status().is_success())
    }
}

/// Moves `next_attempt` forward by the claim time if the row is still as read: true when this sender won.
async fn claim(db: &Db, alert: &Alert, now: OffsetDateTime) -> AppResult<bool> {
    let (id, attempts, seen) = (alert.id.clone(), alert.attempts, alert.next_attempt);
    let n = db
        .run(move |c| {
            let row = alerts::table
                .filter(alerts::id.eq(&id))
                .filter(alerts::delivery.eq(delivery::PENDING))
                .filter(alerts::attempts.eq(attempts))
                .filter(alerts::next_attempt.eq(seen));
            Ok(diesel::update(row).set(alerts::next_attempt.eq(Some(micros(now + CLAIM)))).execute(c)?)
        })
        .await?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        let sig = sign(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(sig, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert!(verify(b"Jefe", b"what do ya want for nothing?", &sig));
        assert!(!verify(b"Jefe", b"what do ya want for nothing!", &sig));
        assert!(!verify(b"other", b"what do ya want for nothing?", &sig));
        assert!(!verify(b"Jefe", b"what do ya want for nothing?", "sha256=zz"));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::seconds(5));
        assert_eq!(backoff(2), Duration::seconds(10));
        assert_eq!(backoff(4), Duration::seconds(40));
        assert_eq!(backoff(30), MAX_BACKOFF);
        assert_eq!(backoff(i32::MAX), MAX_BACKOFF);
    }
}
