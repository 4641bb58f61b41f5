//! Local-account passwords: argon2id hashing, verification that costs the same whether or not the account
//! exists, and a password policy after NIST SP 800-63B.
//!
//! Guarantees:
//! - Hashes are argon2id v19 PHC strings with at least the OWASP minimum (m = 19456 KiB, t = 2, p = 1); the
//!   parameters live in the PHC string, so old hashes keep verifying and [`Verification::needs_rehash`] says
//!   when to store a fresh hash (after a successful login, with the password the user just typed).
//! - `verify_password(None, ..)` runs one full argon2id verification against a fixed dummy hash with the
//!   current parameters and always answers "no": an unknown username costs what a known one costs.
//! - Passwords are NFKC-normalised before hashing (SP 800-63B §3.1.1.2), so the same password typed on
//!   different keyboards or input methods verifies.
//! - Policy messages are fixed texts; nothing here logs, returns or panics with a password.
//!
//! These functions are CPU-bound (tens of milliseconds): call them off the async executor, with
//! `tokio::task::spawn_blocking`.

use std::collections::HashSet;
use std::sync::LazyLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use unicode_normalization::UnicodeNormalization;
use zeroize::Zeroizing;

use crate::error::{AppError, AppResult};

/// Memory cost in KiB (OWASP Password Storage Cheat Sheet minimum for argon2id).
pub const ARGON2_M_KIB: u32 = 19_456;
/// Iterations.
pub const ARGON2_T: u32 = 2;
/// Parallelism.
pub const ARGON2_P: u32 = 1;

/// Shortest accepted password, in Unicode code points.
///
/// Why 12: SP 800-63B-4 asks for at least 8 characters when the password is one factor of several and at
/// least 15 when it is the only factor; OWASP ASVS 4.0 (V2.1.1) asks for 12. Accounts here may sign in with a
/// password alone (TOTP is per account), so 8 is too weak; 12 is the ASVS level and, combined with the
/// breached-password check, the throttling in `throttle` and argon2id, is the floor chosen for this service.
/// An operator who wants strict 800-63B-4 single-factor conformance raises this to 15.
pub const MIN_LENGTH: usize = 12;
/// Longest accepted password, in code points (SP 800-63B: allow at least 64; bounded to keep hashing cheap).
pub const MAX_LENGTH: usize = 128;

/// Hash of a random, discarded password with the current parameters. Verifying against it costs what a real
/// verification costs; its result is never used.
const DUMMY_PHC: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$VAWhthTr0pZqJEy16ghDgw$WuKBoETjm7qck8VO46Q8Ja9JuQj6BgaIkBzo8Fe0558";

/// The 20 000 most common passwords (lowercase), from Django 5.2.19
/// `django/contrib/auth/common-passwords.txt.gz` (BSD-3-Clause; list by Royce Williams).
static COMMON_PASSWORDS: LazyLock<HashSet<&'static str>> =
    LazyLock::new(|| include_str!("common-passwords.txt").lines().collect());

/// The outcome of a password check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verification {
    pub ok: bool,
    /// The stored hash is weaker than (or differs in algorithm from) the current one: on `ok`, re-hash the
    /// password and store the new PHC string.
    pub needs_rehash: bool,
}

/// Why a new password was refused. Each message is a fixed text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PolicyViolation {
    #[error("The password must be at least 12 characters long.")]
    TooShort,
    #[error("The password must be at most 128 characters long.")]
    TooLong,
    #[error("The password must not contain the username.")]
    ContainsUsername,
    #[error("The password is too common or has appeared in a data breach.")]
    Common,
    #[error("The password must not be a short sequence repeated.")]
    Repetitive,
}

impl PolicyViolation {
    /// The fixed message, as a `'static` text for [`AppError::Invalid`].
    pub fn message(self) -> &'static str {
        match self {
            Self::TooShort => "The password must be at least 12 characters long.",
            Self::TooLong => "The password must be at most 128 characters long.",
            Self::ContainsUsername => "The password must not contain the username.",
            Self::Common => "The password is too common or has appeared in a data breach.",
            Self::Repetitive => "The password must not be a short sequence repeated.",
        }
    }
}

impl From<PolicyViolation> for AppError {
    fn from(v: PolicyViolation) -> Self {
        AppError::invalid("password", v.message())
    }
}

fn current_params() -> AppResult<Params> {
    Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, None).map_err(|e| AppError::internal_from("argon2 parameters", e))
}

fn normalized(password: &SecretString) -> Zeroizing<String> {
    Zeroizing::new(password.expose_secret().nfkc().collect())
}

/// Hashes a password with argon2id and the current parameters; returns the PHC string to store.
pub fn hash_password(password: &SecretString) -> AppResult<String> {
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| AppError::internal_from("password salt", e))?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, current_params()?);
    let hash = argon
        .hash_password(normalized(password).as_bytes(), &salt)
        .map_err(|e| AppError::internal_from("password hashing", e))?;
    Ok(hash.to_string())
}

/// Checks a password against a stored PHC string, or, for an unknown account (`None`), against the dummy
/// hash so that the time taken is the same. A stored hash that does not parse fails closed (after the same
/// dummy work).
pub fn verify_password(phc: Option<&str>, password: &SecretString) -> Verification {
    let password = normalized(password);
    let stored = phc.and_then(|p| PasswordHash::new(p).ok());
    let Some(hash) = stored else {
        if let Ok(dummy) = PasswordHash::new(DUMMY_PHC) {
            let _ = Argon2::default().verify_password(password.as_bytes(), &dummy);
        }
        return Verification { ok: false, needs_rehash: false };
    };
    // `verify_password` takes algorithm, version and parameters from the PHC string itself.
    let ok = Argon2::default().verify_password(password.as_bytes(), &hash).is_ok();
    Verification { ok, needs_rehash: ok && is_outdated(&hash) }
}

/// True when a hash is not argon2id v19 or any parameter is below the current minimum.
fn is_outdated(hash: &PasswordHash<'_>) -> bool {
    if hash.algorithm != Algorithm::Argon2id.ident() || hash.version != Some(Version::V0x13.into()) {
        return true;
    }
    match Params::try_from(hash) {
        Ok(p) => p.m_cost() < ARGON2_M_KIB || p.t_cost() < ARGON2_T || p.p_cost() < ARGON2_P,
        Err(_) => true,
    }
}

/// Checks a new password against the policy (SP 800-63B §3.1.1.2): length in code points after NFKC,
/// not the username or containing it, not a common or breached password (also with digits or symbols only
/// added around it, as in `Password2024!`), not a short sequence repeated. No composition rules.
pub fn check_policy(password: &SecretString, username: &str) -> Result<(), PolicyViolation> {
    let password = normalized(password);
    let length = password.chars().count();
    if length < MIN_LENGTH {
        return Err(PolicyViolation::TooShort);
    }
    if length > MAX_LENGTH {
        return Err(PolicyViolation::TooLong);
    }
    let lower = Zeroizing::new(password.to_lowercase());
    let user = username.nfkc().collect::<String>().to_lowercase();
    // Short usernames ("al") would forbid too much by substring; they are still refused as the whole password.
    if *lower == user || (user.chars().count() >= 3 && lower.contains(&user)) {
        return Err(PolicyViolation::ContainsUsername);
    }
    let core = lower.trim_matches(|c: char| !c.is_alphabetic());
    if COMMON_PASSWORDS.contains(lower.as_str()) || (!core.is_empty() && COMMON_PASSWORDS.contains(core)) {
        return Err(PolicyViolation::Common);
    }
    if repeated_unit(&lower).is_some_and(|unit| unit.chars().count() <= 4 || COMMON_PASSWORDS.contains(unit)) {
        return Err(PolicyViolation::Repetitive);
    }
    Ok(())
}

/// The shortest string that, repeated two or more times, makes up `s`.
fn repeated_unit(s: &str) -> Option<&str> {
    let n = s.len();
    (1..=n / 2)
        .filter(|&k| n.is_multiple_of(k) && s.is_char_boundary(k))
        .map(|k| &s[..k])
        .find(|unit| unit.repeat(n / unit.len()) == s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_owned())
    }

    #[test]
    fn hash_then_verify() {
        let pw = secret("correct horse battery staple");
        let phc = hash_password(&pw).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert_eq!(verify_password(Some(&phc), &pw), Verification { ok: true, needs_rehash: false });
        let wrong = verify_password(Some(&phc), &secret("correct horse battery stapler"));
        assert!(!wrong.ok);
        // Salted: the same password hashes differently.
        assert_ne!(phc, hash_password(&pw).unwrap());
    }

    #[test]
    fn nfkc_equivalent_passwords_verify() {
        // "ﬁ" (U+FB01 ligature) is NFKC-equivalent to "fi".
        let phc = hash_password(&secret("ﬁrst-light-over-harbour")).unwrap();
        assert!(verify_password(Some(&phc), &secret("first-light-over-harbour")).ok);
    }

    #[test]
    fn weaker_parameters_ask_for_rehash() {
        let pw = secret("correct horse battery staple");
        let weak = Params::new(8192, 1, 1, None).unwrap();
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let old = Argon2::new(Algorithm::Argon2id, Version::V0x13, weak)
            .hash_password(pw.expose_secret().as_bytes(), &salt)
            .unwrap()
            .to_string();
        assert_eq!(verify_password(Some(&old), &pw), Verification { ok: true, needs_rehash: true });
        // Wrong password: no rehash advice.
        assert_eq!(
            verify_password(Some(&old), &secret("nope nope nope")),
            Verification { ok: false, needs_rehash: false }
        );
        // Another variant (argon2i) with current parameters also asks for rehash.
        let argon2i = Argon2::new(Algorithm::Argon2i, Version::V0x13, current_params().unwrap())
            .hash_password(pw.expose_secret().as_bytes(), &salt)
            .unwrap()
            .to_string();
        assert_eq!(verify_password(Some(&argon2i), &pw), Verification { ok: true, needs_rehash: true });
    }

    #[test]
    fn unknown_user_and_garbage_hash_fail_closed() {
        let pw = secret("correct horse battery staple");
        assert_eq!(verify_password(None, &pw), Verification { ok: false, needs_rehash: false });
        assert!(!verify_password(Some("not a phc string"), &pw).ok);
        assert!(!verify_password(Some(""), &pw).ok);
    }

    #[test]
    fn dummy_hash_uses_current_parameters() {
        let dummy = PasswordHash::new(DUMMY_PHC).unwrap();
        assert!(!is_outdated(&dummy));
        let p = Params::try_from(&dummy).unwrap();
        assert_eq!((p.m_cost(), p.t_cost(), p.p_cost()), (ARGON2_M_KIB, ARGON2_T, ARGON2_P));
    }

    #[test]
    fn unknown_user_costs_about_the_same() {
        let pw = secret("correct horse battery staple");
        let phc = hash_password(&pw).unwrap();
        let wrong = secret("some other long password");
        let time = |phc: Option<&str>| {
            let start = Instant::now();
            let _ = verify_password(phc, &wrong);
            start.elapsed()
        };
        let _ = time(Some(&phc)); // warm up
        // Interleaved, so that load from other processes hits both sides alike.
        let (mut known, mut unknown) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        for _ in 0..4 {
            known += time(Some(&phc));
            unknown += time(None);
        }
        let ratio = known.as_secs_f64() / unknown.as_secs_f64();
        assert!((1.0 / 3.0..3.0).contains(&ratio), "known {known:?} vs unknown {unknown:?}");
    }

    #[test]
    fn policy() {
        let check = |pw: &str| check_policy(&secret(pw), "jdoe.nurse");
        assert_eq!(check("short pass"), Err(PolicyViolation::TooShort));
        assert_eq!(check(&"x7".repeat(65)), Err(PolicyViolation::TooLong));
        assert_eq!(check("my name is JDoe.Nurse ok"), Err(PolicyViolation::ContainsUsername));
        assert_eq!(check_policy(&secret("abcdefghijkl"), "abcdefghijkl"), Err(PolicyViolation::ContainsUsername));
        assert_eq!(check("1q2w3e4r5t6y"), Err(PolicyViolation::Common));
        assert_eq!(check("QWERTY123456"), Err(PolicyViolation::Common));
        assert_eq!(check("Password2024!"), Err(PolicyViolation::Common));
        assert_eq!(check("!!sunshine!!2024"), Err(PolicyViolation::Common));
        assert_eq!(check("aaaaaaaaaaaaaaa"), Err(PolicyViolation::Repetitive));
        assert_eq!(check("abcdabcdabcd"), Err(PolicyViolation::Repetitive));
        assert_eq!(check("dragondragondragon"), Err(PolicyViolation::Repetitive));
        // Length counts code points, not bytes: 12 accented letters pass, 11 do not.
        assert_eq!(check("ééééééééééé"), Err(PolicyViolation::TooShort));
        assert!(check("glacier ferry lantern").is_ok());
        assert!(check("x7!q pond-gravel").is_ok());
        assert!(check("ùñíçødé lake key").is_ok());
        // No composition rules: all lowercase letters are fine.
        assert!(check("tangerinequokkaviolin").is_ok());
    }

    #[test]
    fn policy_messages_never_echo_the_password() {
        let pw = "Password2024!";
        let v = check_policy(&secret(pw), "someone").unwrap_err();
        assert!(!v.to_string().contains(pw) && !v.message().contains("Password2024"));
        for v in [
            PolicyViolation::TooShort,
            PolicyViolation::TooLong,
            PolicyViolation::ContainsUsername,
            PolicyViolation::Common,
            PolicyViolation::Repetitive,
        ] {
            assert_eq!(v.to_string(), v.message());
        }
    }

    #[test]
    fn common_list_is_loaded() {
        assert!(COMMON_PASSWORDS.len() > 19_000);
        assert!(COMMON_PASSWORDS.contains("password"));
    }
}
