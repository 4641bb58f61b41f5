//! Own access tokens: EdDSA (Ed25519) JWTs, their key ring, and the JWKS document.
//!
//! Guarantees:
//! - Tokens carry `kid` and `typ: at+jwt` in the header and `iss, aud, sub, sid, iat, nbf, exp, jti, roles`
//!   (+ `practitioner`, `patient`, `client_id` when set) in the payload; lifetime at most 15 minutes.
//! - [`TokenKeys::verify`] accepts only EdDSA tokens with a known, still-published `kid`, a valid signature,
//!   the exact issuer and audience, and `iat`/`nbf`/`exp` valid at the `now` passed in (the library's own
//!   clock checks are off, so expiry is testable). Anything else (`alg: none`, HS256 keyed with the public
//!   key, RS256, wrong key, tampered, expired, not yet valid, too long-lived, garbage) is one
//!   [`InvalidToken`] whose text is always "invalid token".
//! - Rotation adds a key and retires the active one; a retired key stays in the JWKS and keeps verifying until
//!   every token it can have signed has expired ([`MAX_TTL`] + [`LEEWAY`] after retirement), then it drops out.
//!
//! Storage: one row per [`SigningKey`] (`kid`, `pkcs8` encrypted at rest, `created_at`, `retired_at`).

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::auth::Principal;
use crate::error::{AppError, AppResult};
use crate::role::Role;

/// Default access-token lifetime (`auth.access_token_ttl_secs`).
pub const DEFAULT_TTL: Duration = Duration::seconds(300);
/// Longest allowed access-token lifetime, for issuing and verifying.
pub const MAX_TTL: Duration = Duration::seconds(900);
/// Clock skew tolerated between replicas for `nbf`/`iat` (a token issued by a replica whose clock runs ahead).
/// Never applied to `exp`: an own token is refused from its `exp` on.
pub const LEEWAY: Duration = Duration::seconds(5);
/// Media type of access tokens (RFC 9068), in the `typ` header.
pub const TOKEN_TYPE: &str = "at+jwt";
/// Tokens longer than this are not even parsed.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The access-token lifetime from the setting `auth.access_token_ttl_secs`: 1 to 900 seconds.
pub fn access_token_ttl(secs: u64) -> AppResult<Duration> {
    match i64::try_from(secs) {
        Ok(s) if s > 0 && Duration::seconds(s) <= MAX_TTL => Ok(Duration::seconds(s)),
        _ => Err(AppError::invalid(
            "auth.access_token_ttl_secs",
            "The access-token lifetime must be between 1 and 900 seconds.",
        )),
    }
}

/// One Ed25519 signing key.
#[derive(Clone)]
pub struct SigningKey {
    /// RFC 7638 JWK thumbprint of the public key.
    pub kid: String,
    /// PKCS#8 v2 document (private + public key). Secret: store encrypted.
    pub pkcs8: Zeroizing<Vec<u8>>,
    /// Raw 32-byte public key.
    pub public: Vec<u8>,
    pub created_at: OffsetDateTime,
    /// When it stopped signing; `None` for the active key.
    pub retired_at: Option<OffsetDateTime>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("pkcs8", &"[redacted]")
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .finish()
    }
}

impl SigningKey {
    /// A new random key, active from `now`.
    pub fn generate(now: OffsetDateTime) -> AppResult<Self> {
        let rng = ring::rand::SystemRandom::new();
        let doc =
            Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| AppError::internal("ed25519 key generation failed"))?;
        Self::from_pkcs8(Zeroizing::new(doc.as_ref().to_vec()), now, None)
    }

    /// A stored key. The PKCS#8 document is checked and the public key and `kid` derived from it.
    pub fn from_pkcs8(
        pkcs8: Zeroizing<Vec<u8>>,
        created_at: OffsetDateTime,
        retired_at: Option<OffsetDateTime>,
    ) -> AppResult<Self> {
        let pair =
            Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| AppError::internal("stored ed25519 key is invalid"))?;
        let public = pair.public_key().as_ref().to_vec();
        Ok(Self { kid: thumbprint(&public), pkcs8, public, created_at, retired_at })
    }

    /// Whether tokens signed by this key may still be valid at `now`.
    fn publishable(&self, now: OffsetDateTime) -> bool {
        self.retired_at.is_none_or(|r| now < r + MAX_TTL + LEEWAY)
    }

    fn jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(&self.public),
            "kid": self.kid,
            "use": "sig",
            "alg": "EdDSA",
        })
    }
}

/// RFC 7638 thumbprint of an Ed25519 public key (members in lexicographic order, no spaces).
fn thumbprint(public: &[u8]) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, URL_SAFE_NO_PAD.encode(public));
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// The payload of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<Uuid>,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: Uuid,
    pub roles: Vec<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub practitioner: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// SMART scopes granted (RFC 9068 `scope`); absent for first-party sign-ins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The patient in the SMART launch context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_patient: Option<Uuid>,
}

impl AccessClaims {
    /// The caller these claims describe. `username` is not in the token; look it up if needed.
    pub fn into_principal(self) -> Principal {
        Principal {
            subject: self.sub,
            username: None,
            roles: self.roles,
            practitioner: self.practitioner,
            patient: self.patient,
            session_id: self.sid,
            issuer: self.iss,
            client_id: self.client_id,
            scopes: self.scope.map(|s| std::sync::Arc::new(crate::auth::scope::ScopeSet::parse(&s))),
            context_patient: self.launch_patient,
        }
    }
}

/// The one error every rejected token gets. `reason` is a fixed text for logs and tests, never sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid token")]
pub struct InvalidToken {
    reason: &'static str,
}

impl InvalidToken {
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl From<InvalidToken> for AppError {
    fn from(_: InvalidToken) -> Self {
        AppError::Unauthenticated
    }
}

fn invalid(reason: &'static str) -> InvalidToken {
    InvalidToken { reason }
}

/// The published keys, the active one among them, and the issuer and audience tokens must name.
#[derive(Clone)]
pub struct TokenKeys {
    issuer: String,
    audience: String,
    keys: Vec<SigningKey>,
    active: EncodingKey,
    active_kid: String,
    decoding: HashMap<String, DecodingKey>,
    validation: Validation,
    /// Tokens whose time-independent checks passed ([`TokenKeys::verify`]); new with every ring.
    verified: std::sync::Arc<std::sync::RwLock<VerifiedTokens>>,
}

/// Claims and key id of tokens that passed the time-independent checks, by the token's SHA-256.
type VerifiedTokens = HashMap<[u8; 32], (AccessClaims, String)>;

/// How many verified tokens a ring remembers (about 1 KiB each).
pub const VERIFIED_CACHE: usize = 16_384;

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("active_kid", &self.active_kid)
            .field("keys", &self.keys)
            .finish()
    }
}

impl TokenKeys {
    /// Builds the ring from stored keys; exactly one must be unretired (the active one).
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>, keys: Vec<SigningKey>) -> AppResult<Self> {
        let mut active = keys.iter().filter(|k| k.retired_at.is_none());
        let (Some(current), None) = (active.next(), active.next()) else {
            return Err(AppError::internal("token key ring needs exactly one active signing key"));
        };
        let active_kid = current.kid.clone();
        let encoding = EncodingKey::from_ed_der(&current.pkcs8);
        let decoding = keys.iter().map(|k| (k.kid.clone(), DecodingKey::from_ed_der(&k.public))).collect();
        let mut validation = Validation::new(Algorithm::EdDSA);
        // Time, issuer and audience are checked in `verify` against the injected clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        Ok(Self {
            issuer: issuer.into(),
            audience: audience.into(),
            keys,
            active: encoding,
            active_kid,
            decoding,
            validation,
            verified: std::sync::Arc::default(),
        })
    }

    /// All keys, for storage.
    pub fn keys(&self) -> &[SigningKey] {
        &self.keys
    }

    pub fn active_kid(&self) -> &str {
        &self.active_kid
    }

    /// Makes `new` the active key and retires the current one at `now`.
    pub fn rotate(&mut self, new: SigningKey, now: OffsetDateTime) -> AppResult<()> {
        if new.retired_at.is_some() || self.decoding.contains_key(&new.kid) {
            return Err(AppError::internal("rotation needs a new, unretired key"));
        }
        let mut keys = self.keys.clone();
        for k in keys.iter_mut().filter(|k| k.retired_at.is_none()) {
            k.retired_at = Some(now);
        }
        keys.push(new);
        // Built aside and swapped in, so a failure leaves the ring as it was.
        *self = Self::new(self.issuer.clone(), self.audience.clone(), keys)?;
        Ok(())
    }

    /// Drops retired keys that can no longer have valid tokens; returns their kids (to delete from storage).
    pub fn prune(&mut self, now: OffsetDateTime) -> Vec<String> {
        let (keep, gone): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.keys).into_iter().partition(|k| k.publishable(now));
        for k in &gone {
            self.decoding.remove(&k.kid);
        }
        if !gone.is_empty() {
            self.verified = std::sync::Arc::default();
        }
        self.keys = keep;
        gone.into_iter().map(|k| k.kid).collect()
    }

    /// Signs an access token for `principal` (its `session_id` becomes `sid`), valid from `now` for `ttl`
    /// (at most [`MAX_TTL`]). Returns the token and its expiry.
    pub fn issue(
        &self,
        principal: &Principal,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> AppResult<(String, OffsetDateTime)> {
        if !ttl.is_positive() || ttl > MAX_TTL {
            return Err(AppError::internal("access-token lifetime out of range"));
        }
        let exp = now + ttl;
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: principal.subject.clone(),
            sid: principal.session_id,
            iat: now.unix_timestamp(),
            nbf: now.unix_timestamp(),
            exp: exp.unix_timestamp(),
            jti: Uuid::new_v4(),
            roles: principal.roles.clone(),
            practitioner: principal.practitioner,
            patient: principal.patient,
            client_id: principal.client_id.clone(),
            scope: principal.scopes.as_ref().map(|s| s.render()),
            launch_patient: principal.context_patient,
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.active_kid.clone());
        header.typ = Some(TOKEN_TYPE.to_owned());
        let token = jsonwebtoken::encode(&header, &claims, &self.active)
            .map_err(|e| AppError::internal_from("cannot sign a token", e))?;
        Ok((token, exp))
    }

    /// Signs an OpenID Connect id token (`typ: JWT`) with the active key; the caller builds the claims.
    pub fn sign_id_token(&self, claims: &serde_json::Value) -> AppResult<String> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.active_kid.clone());
        header.typ = Some("JWT".to_owned());
        jsonwebtoken::encode(&header, claims, &self.active)
            .map_err(|e| AppError::internal_from("cannot sign a token", e))
    }

    /// Verifies an access token at `now`. Every failure is the same [`InvalidToken`].
    ///
    /// The signature, issuer, audience and lifetime of a token never change, so a token that passed them is
    /// remembered (by its SHA-256, at most [`VERIFIED_CACHE`] tokens) and only the checks that depend on `now`
    /// (expiry, not-before, the key still published) run again: one hash instead of an Ed25519 verification per
    /// request. Revocation is not affected: sessions are checked on every request by the auth service.
    pub fn verify(&self, token: &str, now: OffsetDateTime) -> Result<AccessClaims, InvalidToken> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(invalid("too long"));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self.verified.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&digest).cloned();
        let (claims, kid) = match cached {
            Some(hit) => hit,
            None => {
                let fresh = self.verify_signed(token)?;
                let mut cache = self.verified.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                if cache.len() >= VERIFIED_CACHE {
                    let t = now.unix_timestamp();
                    cache.retain(|_, (c, _)| c.exp > t);
                    if cache.len() >= VERIFIED_CACHE {
                        cache.clear();
                    }
                }
                cache.insert(digest, fresh.clone());
                fresh
            }
        };
        if !self.keys.iter().any(|k| k.kid == kid && k.publishable(now)) {
            return Err(invalid("retired kid"));
        }
        let now = now.unix_timestamp();
        let leeway = LEEWAY.whole_seconds();
        // Our own tokens: refused from `exp` on (the leeway is for `nbf`/`iat` between servers only).
        if now >= claims.exp {
            return Err(invalid("expired"));
        }
        if claims.nbf > now.saturating_add(leeway) || claims.iat > now.saturating_add(leeway) {
            return Err(invalid("not yet valid"));
        }
        Ok(claims)
    }

    /// The checks of [`TokenKeys::verify`] that do not depend on the time: header, known key, signature, issuer,
    /// audience, lifetime. Answers the claims and the key id.
    fn verify_signed(&self, token: &str) -> Result<(AccessClaims, String), InvalidToken> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed header"))?;
        if header.alg != Algorithm::EdDSA {
            return Err(invalid("algorithm"));
        }
        if header.typ.as_deref() != Some(TOKEN_TYPE) {
            return Err(invalid("type"));
        }
        if header.crit.is_some() {
            return Err(invalid("critical header"));
        }
        let kid = header.kid.ok_or(invalid("no kid"))?;
        let key = self.decoding.get(&kid).ok_or(invalid("unknown kid"))?;
        let claims = jsonwebtoken::decode::<AccessClaims>(token, key, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => invalid("signature"),
                _ => invalid("malformed"),
            })?
            .claims;
        if claims.iss != self.issuer {
            return Err(invalid("issuer"));
        }
        if claims.aud != self.audience {
            return Err(invalid("audience"));
        }
        if claims.exp.saturating_sub(claims.iat) > MAX_TTL.whole_seconds() || claims.exp <= claims.iat {
            return Err(invalid("lifetime"));
        }
        Ok((claims, kid))
    }

    /// The JWKS document for `/.well-known/jwks.json`: every key whose tokens may still be valid at `now`.
    pub fn jwks(&self, now: OffsetDateTime) -> serde_json::Value {
        let keys: Vec<_> = self.keys.iter().filter(|k| k.publishable(now)).map(SigningKey::jwk).collect();
        serde_json::json!({ "keys": keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use serde_json::{Value, json};
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-01-01 08:00 UTC);
    const ISS: &str = "https://carevault.test";
    const AUD: &str = "carevault";

    fn ring() -> TokenKeys {
        TokenKeys::new(ISS, AUD, vec![SigningKey::generate(T0).unwrap()]).unwrap()
    }

    fn nurse() -> Principal {
        Principal {
            subject: "user-1".into(),
            username: Some("jdoe".into()),
            roles: vec![Role::Nurse],
            practitioner: Some(Uuid::new_v4()),
            patient: None,
            session_id: Some(Uuid::new_v4()),
            issuer: ISS.into(),
            client_id: None,
            scopes: None,
            context_patient: None,
        }
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    /// Valid claims at T0, as JSON, to be altered per case.
    fn claims_json() -> Value {
        let t = T0.unix_timestamp();
        json!({
            "iss": ISS, "aud": AUD, "sub": "user-1", "sid": Uuid::new_v4(), "iat": t, "nbf": t,
            "exp": t + 300, "jti": Uuid::new_v4(), "roles": ["nurse"],
        })
    }

    /// Signs arbitrary claims with the ring's active key (the way a buggy or malicious issuer with our key
    /// would), so that each check is tested on an otherwise valid token.
    fn sign(keys: &TokenKeys, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(keys.active_kid().to_owned());
        header.typ = Some(TOKEN_TYPE.to_owned());
        jsonwebtoken::encode(&header, claims, &keys.active).unwrap()
    }

    fn reason(keys: &TokenKeys, token: &str, now: OffsetDateTime) -> &'static str {
        let err = keys.verify(token, now).unwrap_err();
        assert_eq!(err.to_string(), "invalid token");
        err.reason()
    }

    #[test]
    fn issue_and_verify_round_trip() {
        let keys = ring();
        let p = nurse();
        let (token, exp) = keys.issue(&p, T0, DEFAULT_TTL).unwrap();
        assert_eq!(exp, T0 + DEFAULT_TTL);
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.kid.as_deref(), Some(keys.active_kid()));
        assert_eq!(header.alg, Algorithm::EdDSA);
        let claims = keys.verify(&token, T0 + Duration::minutes(4)).unwrap();
        assert_eq!((claims.iss.as_str(), claims.aud.as_str()), (ISS, AUD));
        assert_eq!(claims.exp, exp.unix_timestamp());
        let back = claims.into_principal();
        assert_eq!(back, Principal { username: None, ..p });
    }

    #[test]
    fn ttl_rules() {
        assert_eq!(access_token_ttl(300).unwrap(), DEFAULT_TTL);
        assert_eq!(access_token_ttl(900).unwrap(), MAX_TTL);
        assert!(access_token_ttl(901).is_err());
        assert!(access_token_ttl(0).is_err());
        assert!(access_token_ttl(u64::MAX).is_err());
        let keys = ring();
        assert!(keys.issue(&nurse(), T0, MAX_TTL + Duration::SECOND).is_err());
        assert!(keys.issue(&nurse(), T0, Duration::ZERO).is_err());
    }

    #[test]
    fn expiry_uses_the_injected_clock() {
        let keys = ring();
        let (token, exp) = keys.issue(&nurse(), T0, DEFAULT_TTL).unwrap();
        assert!(keys.verify(&token, exp - Duration::SECOND).is_ok());
        assert_eq!(reason(&keys, &token, exp), "expired", "no leeway past exp");
        assert!(LEEWAY <= Duration::seconds(5));
        assert!(keys.verify(&token, T0 - LEEWAY).is_ok(), "a replica's clock may be a little behind");
        // Issued in the future relative to the verifier's clock.
        assert_eq!(reason(&keys, &token, T0 - LEEWAY - Duration::SECOND), "not yet valid");
    }

    #[test]
    fn every_bad_token_is_rejected_with_one_error() {
        let keys = ring();
        let now = T0 + Duration::minutes(1);
        let good = sign(&keys, &claims_json());
        assert!(keys.verify(&good, now).is_ok());
        let [h, p, s] = <[&str; 3]>::try_from(good.split('.').collect::<Vec<_>>()).unwrap();
        let header = json!({ "alg": "EdDSA", "typ": TOKEN_TYPE, "kid": keys.active_kid() });

        // alg: none, with and without an empty signature.
        let none_header = json!({ "alg": "none", "typ": TOKEN_TYPE, "kid": keys.active_kid() });
        let none = format!("{}.{p}.", b64(&none_header));
        assert_eq!(reason(&keys, &none, now), "malformed header");
        assert_eq!(reason(&keys, &format!("{}.{p}", b64(&none_header)), now), "malformed header");

        // HS256 keyed with the public key (the classic algorithm-confusion attack).
        let hs_header = json!({ "alg": "HS256", "typ": TOKEN_TYPE, "kid": keys.active_kid() });
        let signing_input = format!("{}.{p}", b64(&hs_header));
        let mut mac = Hmac::<Sha256>::new_from_slice(&keys.keys()[0].public).unwrap();
        mac.update(signing_input.as_bytes());
        let hs = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()));
        assert_eq!(reason(&keys, &hs, now), "algorithm");

        // RS256 header over our payload and signature.
        let rs_header = json!({ "alg": "RS256", "typ": TOKEN_TYPE, "kid": keys.active_kid() });
        assert_eq!(reason(&keys, &format!("{}.{p}.{s}", b64(&rs_header)), now), "algorithm");

        // Unknown kid, missing kid.
        let unknown = json!({ "alg": "EdDSA", "typ": TOKEN_TYPE, "kid": "not-a-key" });
        assert_eq!(reason(&keys, &format!("{}.{p}.{s}", b64(&unknown)), now), "unknown kid");
        let no_kid = json!({ "alg": "EdDSA", "typ": TOKEN_TYPE });
        assert_eq!(reason(&keys, &format!("{}.{p}.{s}", b64(&no_kid)), now), "no kid");

        // Wrong typ (e.g. an ID token signed with the same key) and a critical header.
        let id_token = json!({ "alg": "EdDSA", "typ": "JWT", "kid": keys.active_kid() });
        assert_eq!(reason(&keys, &format!("{}.{p}.{s}", b64(&id_token)), now), "type");
        let crit = json!({ "alg": "EdDSA", "typ": TOKEN_TYPE, "kid": keys.active_kid(), "crit": ["exp"] });
        assert_eq!(reason(&keys, &format!("{}.{p}.{s}", b64(&crit)), now), "critical header");

        // Signed by another key under our kid.
        let other = ring();
        let forged = jsonwebtoken::encode(
            &Header {
                kid: Some(keys.active_kid().to_owned()),
                typ: Some(TOKEN_TYPE.into()),
                ..Header::new(Algorithm::EdDSA)
            },
            &claims_json(),
            &other.active,
        )
        .unwrap();
        assert_eq!(reason(&keys, &forged, now), "signature");

        // Tampered payload: roles raised to admin, signature kept.
        let mut elevated = claims_json();
        elevated["roles"] = json!(["admin"]);
        assert_eq!(reason(&keys, &format!("{h}.{}.{s}", b64(&elevated)), now), "signature");
        // Header re-encoded (same meaning, different bytes): the signature covers the exact bytes.
        assert_eq!(reason(&keys, &format!("{}.{p}.{s}", b64(&header)), now), "signature");

        // Properly signed but wrong issuer, audience, times, lifetime.
        let with = |field: &str, value: Value| {
            let mut c = claims_json();
            c[field] = value;
            sign(&keys, &c)
        };
        assert_eq!(reason(&keys, &with("iss", json!("https://evil.test")), now), "issuer");
        assert_eq!(reason(&keys, &with("aud", json!("other-api")), now), "audience");
        assert_eq!(reason(&keys, &with("aud", json!([AUD])), now), "malformed");
        let t = T0.unix_timestamp();
        assert_eq!(reason(&keys, &with("exp", json!(t + 30)), now), "expired");
        assert_eq!(reason(&keys, &with("nbf", json!(t + 3600)), now), "not yet valid");
        assert_eq!(reason(&keys, &with("exp", json!(t + 3600)), now), "lifetime");
        assert_eq!(reason(&keys, &with("roles", json!(["root"])), now), "malformed");
        let mut no_exp = claims_json();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(reason(&keys, &sign(&keys, &no_exp), now), "malformed");

        // Garbage.
        for junk in ["", "abc", "a.b.c", "....", "eyJhbGciOiJFZERTQSJ9", &"A".repeat(10_000)] {
            assert!(keys.verify(junk, now).is_err(), "{junk}");
            assert_eq!(keys.verify(junk, now).unwrap_err().to_string(), "invalid token");
        }
    }

    #[test]
    fn rotation_keeps_old_keys_until_their_tokens_expire() {
        let mut keys = ring();
        let old_kid = keys.active_kid().to_owned();
        let (old_token, _) = keys.issue(&nurse(), T0, MAX_TTL).unwrap();

        let rotated_at = T0 + Duration::minutes(1);
        keys.rotate(SigningKey::generate(rotated_at).unwrap(), rotated_at).unwrap();
        assert_ne!(keys.active_kid(), old_kid);
        let (new_token, _) = keys.issue(&nurse(), rotated_at, DEFAULT_TTL).unwrap();
        assert_eq!(jsonwebtoken::decode_header(&new_token).unwrap().kid.as_deref(), Some(keys.active_kid()));

        let kids = |now| -> Vec<String> {
            keys.jwks(now)["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect()
        };
        assert_eq!(kids(rotated_at).len(), 2);
        assert!(kids(rotated_at).contains(&old_kid));
        assert!(keys.verify(&old_token, rotated_at + Duration::minutes(2)).is_ok());

        let gone_at = rotated_at + MAX_TTL + LEEWAY;
        assert_eq!(kids(gone_at), vec![keys.active_kid().to_owned()]);
        assert_eq!(reason(&keys, &old_token, gone_at), "retired kid");

        let mut pruned = keys.clone();
        assert!(pruned.prune(gone_at - Duration::SECOND).is_empty());
        assert_eq!(pruned.prune(gone_at), vec![old_kid]);
        assert_eq!(pruned.keys().len(), 1);
        assert!(pruned.verify(&new_token, rotated_at).is_ok());
    }

    #[test]
    fn jwks_shape_and_key_storage() {
        let keys = ring();
        let jwks = keys.jwks(T0);
        let k = &jwks["keys"][0];
        assert_eq!(
            (k["kty"].as_str(), k["crv"].as_str(), k["alg"].as_str()),
            (Some("OKP"), Some("Ed25519"), Some("EdDSA"))
        );
        assert_eq!(URL_SAFE_NO_PAD.decode(k["x"].as_str().unwrap()).unwrap().len(), 32);
        assert!(k.get("d").is_none(), "private part must never be published");

        // A key reloaded from its stored PKCS#8 is the same key and verifies its old tokens.
        let stored = &keys.keys()[0];
        let reloaded = SigningKey::from_pkcs8(stored.pkcs8.clone(), stored.created_at, None).unwrap();
        assert_eq!(reloaded.kid, stored.kid);
        let (token, _) = keys.issue(&nurse(), T0, DEFAULT_TTL).unwrap();
        assert!(TokenKeys::new(ISS, AUD, vec![reloaded]).unwrap().verify(&token, T0).is_ok());
        assert!(SigningKey::from_pkcs8(Zeroizing::new(vec![1, 2, 3]), T0, None).is_err());

        let debug = format!("{stored:?}");
        assert!(debug.contains("redacted") && !debug.contains(&format!("{:?}", &stored.pkcs8[..])));
    }

    #[test]
    fn ring_needs_exactly_one_active_key() {
        assert!(TokenKeys::new(ISS, AUD, vec![]).is_err());
        let a = SigningKey::generate(T0).unwrap();
        let b = SigningKey::generate(T0).unwrap();
        assert!(TokenKeys::new(ISS, AUD, vec![a.clone(), b]).is_err());
        let retired = SigningKey { retired_at: Some(T0), ..a };
        assert!(TokenKeys::new(ISS, AUD, vec![retired]).is_err());
    }
}
