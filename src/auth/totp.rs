//! TOTP second factor (RFC 6238: HMAC-SHA1, 30-second steps, 6 digits), as authenticator apps implement it.
//! A code is accepted within one step of the clock and never twice (the last accepted step is stored).

use hmac::{Hmac, Mac};
use sha1::Sha1;
use time::OffsetDateTime;

pub const STEP_SECS: i64 = 30;
pub const DIGITS: u32 = 6;
/// 160-bit secrets, as RFC 4226 recommends.
pub const SECRET_LEN: usize = 20;

/// A new random secret.
pub fn generate_secret() -> [u8; SECRET_LEN] {
    let mut s = [0u8; SECRET_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut s);
    s
}

/// The `otpauth://` URL an authenticator app scans (contains the secret: show it once, never log it).
pub fn otpauth_url(issuer: &str, username: &str, secret: &[u8]) -> String {
    let secret = data_encoding::BASE32_NOPAD.encode(secret);
    let enc = |s: &str| serde_urlencoded::to_string([("", s)]).unwrap_or_default().trim_start_matches('=').to_owned();
    format!(
        "otpauth://totp/{}:{}?secret={secret}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}",
        enc(issuer),
        enc(username),
        enc(issuer)
    )
}

/// The time step of an instant.
pub fn step_of(t: OffsetDateTime) -> i64 {
    t.unix_timestamp().div_euclid(STEP_SECS)
}

/// The HOTP value (RFC 4226) of a counter, truncated to `digits`.
pub fn hotp(secret: &[u8], counter: u64, digits: u32) -> u32 {
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(secret) else { return u32::MAX };
    mac.update(&counter.to_be_bytes());
    let h = mac.finalize().into_bytes();
    let offset = usize::from(h[19] & 0x0f);
    let bin = u32::from_be_bytes([h[offset] & 0x7f, h[offset + 1], h[offset + 2], h[offset + 3]]);
    bin % 10u32.pow(digits)
}

/// Checks a submitted code at `now`; returns the step it matched, which must be later than `last_step`.
pub fn verify(secret: &[u8], code: &str, now: OffsetDateTime, last_step: Option<i64>) -> Option<i64> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let submitted: u32 = code.parse().ok()?;
    let current = step_of(now);
    let mut matched = None;
    // Constant work: every candidate step is computed and compared.
    for step in [current - 1, current, current + 1] {
        let Ok(counter) = u64::try_from(step) else { continue };
        let ok = hotp(secret, counter, DIGITS) == submitted;
        if ok && last_step.is_none_or(|l| step > l) {
            matched = Some(step);
        }
    }
    matched
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_SECRET: &[u8] = b"12345678901234567890";

    #[test]
    fn rfc6238_sha1_vectors() {
        for (t, expected) in [
            (59i64, 94_287_082u32),
            (1_111_111_109, 7_081_804),
            (1_234_567_890, 89_005_924),
            (2_000_000_000, 69_279_037),
        ] {
            let step = u64::try_from(t / STEP_SECS).unwrap();
            assert_eq!(hotp(RFC_SECRET, step, 8), expected, "t={t}");
        }
    }

    #[test]
    fn codes_are_accepted_once_within_one_step() {
        let now = OffsetDateTime::from_unix_timestamp(1_234_567_890).unwrap();
        let code = format!("{:06}", hotp(RFC_SECRET, u64::try_from(step_of(now)).unwrap(), DIGITS));
        let step = verify(RFC_SECRET, &code, now, None).unwrap();
        assert_eq!(verify(RFC_SECRET, &code, now, Some(step)), None, "no replay");
        assert!(verify(RFC_SECRET, &code, now + time::Duration::seconds(30), None).is_some(), "one step of drift");
        assert!(verify(RFC_SECRET, &code, now + time::Duration::seconds(95), None).is_none(), "too late");
        assert!(verify(RFC_SECRET, "12345", now, None).is_none());
        assert!(verify(RFC_SECRET, "abcdef", now, None).is_none());
    }

    #[test]
    fn otpauth_url_names_issuer_and_user() {
        let url = otpauth_url("carevault", "alice", RFC_SECRET);
        assert!(
            url.starts_with("otpauth://totp/carevault:alice?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=carevault")
        );
    }
}
