//! OpenID Connect: login through the configured provider (authorization code + PKCE + state + nonce) and the
//! provider's own JWT access tokens accepted as bearer tokens (resource-server mode).
//!
//! Guarantees:
//! - The provider is found only through `auth.oidc.issuer` (discovery at `{issuer}/.well-known/openid-configuration`,
//!   whose `issuer` must match exactly). Each login start and callback discovers afresh, so an unreachable
//!   provider or one answering garbage makes login fail closed ([`AppError::Unavailable`], 503).
//! - A login in flight lives in the database (`oidc_logins`), keyed by the SHA-256 of `state`, bound to the
//!   browser by a random cookie (only its SHA-256 is stored), valid [`LOGIN_TTL`], consumed at most once (the
//!   delete must hit exactly one row), so any replica can finish it and a replayed callback is refused. Its PKCE
//!   verifier and nonce are sealed with the field cipher (associated data: the state hash and the column), so a
//!   database reader cannot finish a login with a stolen authorization code.
//! - Signatures are checked against the provider's JWKS with the one asymmetric algorithm each key declares (or
//!   that its type implies): RS*/PS*, ES256/ES384, EdDSA. `alg: none`, HMAC, a header `alg` other than the key's,
//!   a missing or unknown `kid` are refused. Symmetric (`oct`) and encryption keys are never loaded.
//! - Keys are cached; an unknown `kid` refetches them at most once per [`REFETCH_EVERY`]; a failed or garbage
//!   refetch keeps the cached keys, so validation goes on while the provider is down.
//! - ID tokens: `iss`, `aud` contains the client id (and `azp`, when present or when there are several audiences,
//!   is the client id), `exp`/`iat`/`nbf` on the injected clock, `nonce` equal to the one stored at login start.
//!   Access tokens: `iss`, `aud` contains `auth.oidc.audience`, the same time checks, and the token must be an
//!   access token (`typ: at+jwt`, or a `scope` claim and no `typ: ID`), never an ID token.
//! - Roles come from `auth.oidc.roles_claim` (exactly one known role among its values, else refused) and the
//!   Practitioner / Patient link from `auth.oidc.link_claim` (`Practitioner/<uuid>` for clinician and nurse,
//!   `Patient/<uuid>` for patient, required for those roles). Every rejection is one generic error outward; the
//!   reason is a fixed code for the audit trail.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use diesel::prelude::*;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use openidconnect::core::{CoreClient, CoreProviderMetadata, CoreResponseType};
use openidconnect::{
    AuthenticationFlow, AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, RequestTokenError, TokenResponse,
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use super::principal::Principal;
use super::service::{Account, hex};
use super::token::LEEWAY;
use crate::clock::SharedClock;
use crate::config::{Config, ConfigError};
use crate::crypto::store::micros;
use crate::crypto::{FieldAad, FieldCipher};
use crate::error::{AppError, AppResult};
use crate::role::Role;
use crate::store::Db;
use crate::store::schema::{accounts, oidc_logins};

/// How long a started login may be finished.
pub const LOGIN_TTL: Duration = Duration::minutes(10);
/// Least time between two key refetches caused by unknown `kid`s.
pub const REFETCH_EVERY: Duration = Duration::seconds(30);
/// Name of the cookie that binds a login in flight to the browser that started it.
pub const BINDING_COOKIE: &str = "__Host-cv_oidc";
/// Tokens longer than this are not even parsed.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// The "resource type" in the associated data of a login's sealed PKCE verifier and nonce.
const LOGIN_AAD: &str = "$oidc-login";
/// Longest accepted `sub` and claim value.
const MAX_CLAIM_LEN: usize = 255;
/// Timeout of every request to the provider.
const HTTP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `auth.oidc.*`, resolved (secret read, defaults applied).
#[derive(Clone)]
pub struct OidcSettings {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: SecretString,
    pub roles_claim: String,
    pub link_claim: String,
    pub audience: String,
    pub redirect_url: String,
    /// Extra trusted CA certificates (PEM bundle) for the provider's TLS, from `SSL_CERT_FILE` (the deployment
    /// mounts the CA of a private IdP there); the public web roots are trusted in any case.
    pub extra_roots: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for OidcSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcSettings").field("issuer", &self.issuer).field("client_id", &self.client_id).finish()
    }
}

impl OidcSettings {
    /// `None` when `auth.oidc` is not configured. The client secret is required (confidential client).
    pub fn from_config(config: &Config) -> Result<Option<Self>, ConfigError> {
        let Some(o) = &config.auth.oidc else { return Ok(None) };
        let secret = config.oidc_client_secret()?.filter(|s| !s.expose_secret().is_empty()).ok_or_else(|| {
            ConfigError::Invalid("`auth.oidc.client_secret_file` (or `auth.oidc.client_secret`) must be set".into())
        })?;
        let redirect_url = o
            .redirect_url
            .clone()
            .unwrap_or_else(|| format!("{}/auth/oidc/callback", config.base_url().trim_end_matches('/')));
        Ok(Some(Self {
            issuer: o.issuer.clone(),
            client_id: o.client_id.clone(),
            client_secret: secret,
            roles_claim: o.roles_claim.clone(),
            link_claim: o.link_claim.clone(),
            audience: o.audience().to_owned(),
            redirect_url,
            extra_roots: std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from),
        }))
    }
}

/// Why an OIDC login or token was refused: a fixed code for the audit trail, never sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Bad, unknown, expired or replayed login state, or a missing browser binding: 401.
    State,
    /// The provider answered the authorization with an error, or refused the code: 401.
    Provider,
    /// The ID token failed verification: 401.
    Token,
    /// No usable role or link in the claims: 403.
    Role,
    /// The linked local account is disabled: 401.
    Disabled,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Self::State => "oidc-state",
            Self::Provider => "oidc-provider-refused",
            Self::Token => "oidc-id-token",
            Self::Role => "oidc-role",
            Self::Disabled => "oidc-disabled",
        }
    }

    pub fn error(self) -> AppError {
        match self {
            Self::Role => AppError::Forbidden,
            _ => AppError::Unauthenticated,
        }
    }
}

/// What a login attempt came to.
#[derive(Debug)]
pub enum OidcLogin {
    /// The account, and the SMART authorization flow the login was started from (if it was).
    Ok {
        account: Box<Account>,
        smart_flow: Option<String>,
    },
    Refused(Refusal),
}

/// A started login: where to send the browser, and the cookie value that binds the login to it.
#[derive(Debug)]
pub struct LoginStart {
    pub authorization_url: String,
    pub binding: String,
}

/// The callback's query parameters.
#[derive(Debug, Default, serde::Deserialize)]
pub struct CallbackParams {
    pub code: Option<String>,
    pub state: Option<String>,
    pub iss: Option<String>,
    pub error: Option<String>,
}

/// What a started login left for its callback (opened from its sealed columns).
struct LoginState {
    verifier: String,
    nonce: String,
    smart_flow: Option<String>,
}

/// The identity a verified token describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcIdentity {
    pub subject: String,
    pub role: Role,
    pub practitioner: Option<Uuid>,
    pub patient: Option<Uuid>,
}

/// One verification key of the provider and the only algorithm it verifies.
#[derive(Clone)]
struct ProviderKey {
    alg: Algorithm,
    key: DecodingKey,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    Id,
    Access,
}

pub struct OidcService {
    settings: OidcSettings,
    issuer_url: IssuerUrl,
    redirect: RedirectUrl,
    http: openidconnect::reqwest::Client,
    clock: SharedClock,
    db: Db,
    /// Seals the PKCE verifier and nonce of logins in flight (AAD: login, state hash, column).
    cipher: FieldCipher,
    keys: RwLock<Arc<HashMap<String, ProviderKey>>>,
    /// When keys were last fetched (or a refetch was last tried); guards the refetch rate.
    fetched_at: tokio::sync::Mutex<Option<OffsetDateTime>>,
    account_prefix: String,
}

impl std::fmt::Debug for OidcService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcService").field("settings", &self.settings).finish_non_exhaustive()
    }
}

fn sha256_hex(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

impl OidcService {
    pub fn new(settings: OidcSettings, db: Db, clock: SharedClock, cipher: FieldCipher) -> AppResult<Self> {
        let issuer_url = IssuerUrl::new(settings.issuer.clone()).map_err(|_| AppError::internal("auth.oidc.issuer"))?;
        let redirect = RedirectUrl::new(settings.redirect_url.clone())
            .map_err(|_| AppError::internal("auth.oidc.redirect_url"))?;
        // No redirects: the provider's endpoints are used exactly as discovered.
        let mut builder = openidconnect::reqwest::ClientBuilder::new();
        if let Some(path) = &settings.extra_roots {
            let pem = std::fs::read(path).map_err(|_| AppError::internal("SSL_CERT_FILE is not readable"))?;
            let certs = openidconnect::reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|_| AppError::internal("SSL_CERT_FILE holds no PEM certificates"))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .redirect(openidconnect::reqwest::redirect::Policy::none())
            .timeout(HTTP_TIMEOUT)
            .connect_timeout(HTTP_TIMEOUT)
            .build()
            .map_err(|_| AppError::internal("cannot build the OIDC HTTP client"))?;
        let account_prefix = format!("oidc:{}:", &sha256_hex(&settings.issuer)[..16]);
        Ok(Self {
            settings,
            issuer_url,
            redirect,
            http,
            clock,
            db,
            cipher,
            keys: RwLock::new(Arc::new(HashMap::new())),
            fetched_at: tokio::sync::Mutex::new(None),
            account_prefix,
        })
    }

    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    /// The local account name of a provider subject: `oidc:<first 16 hex of SHA-256(issuer)>:<sub>`.
    pub fn username_for(&self, subject: &str) -> String {
        format!("{}{subject}", self.account_prefix)
    }

    /// Discovery (which also fetches the JWKS); replaces the cached keys only on success. Unreachable or
    /// garbage: 503.
    async fn fetch(&self) -> AppResult<CoreProviderMetadata> {
        let metadata = CoreProviderMetadata::discover_async(self.issuer_url.clone(), &self.http)
            .await
            .map_err(|_| AppError::unavailable("OIDC provider discovery failed"))?;
        let jwks = serde_json::to_value(metadata.jwks()).map_err(|_| AppError::unavailable("OIDC JWKS unusable"))?;
        let keys = parse_jwks(&jwks).ok_or_else(|| AppError::unavailable("OIDC JWKS unusable"))?;
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
        Ok(metadata)
    }

    /// [`Self::fetch`], noting the time of the fresh keys.
    async fn discover(&self) -> AppResult<CoreProviderMetadata> {
        let mut fetched = self.fetched_at.lock().await;
        let metadata = self.fetch().await?;
        *fetched = Some(self.clock.now());
        Ok(metadata)
    }

    fn client(
        &self,
        metadata: CoreProviderMetadata,
    ) -> CoreClient<
        openidconnect::EndpointSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointMaybeSet,
        openidconnect::EndpointMaybeSet,
    > {
        CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(self.settings.client_id.clone()),
            Some(ClientSecret::new(self.settings.client_secret.expose_secret().to_owned())),
        )
        .set_redirect_uri(self.redirect.clone())
    }

    /// `GET /auth/oidc/login` (and the SMART authorize page's provider sign-in, which passes its flow handle):
    /// stores the login state and returns the provider's authorization URL.
    pub async fn start_login(&self, smart_flow: Option<&str>) -> AppResult<LoginStart> {
        let metadata = self.discover().await?;
        let client = self.client(metadata);
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state, nonce) = client
            .authorize_url(
                AuthenticationFlow::<CoreResponseType>::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge)
            .url();
        let binding = random_token();
        let now = self.clock.now();
        let state_hash = sha256_hex(state.secret());
        let seal = |column: &str, secret: &str| {
            self.cipher
                .encrypt(&FieldAad::new(LOGIN_AAD, &state_hash, column), secret.as_bytes())
                .map_err(|e| AppError::internal_from("cannot seal the OIDC login state", e))
        };
        let row = (
            oidc_logins::pkce_verifier.eq(seal("pkce_verifier", verifier.secret())?),
            oidc_logins::nonce.eq(seal("nonce", nonce.secret())?),
            oidc_logins::smart_flow.eq(smart_flow.map(|f| seal("smart_flow", f)).transpose()?),
            oidc_logins::state_hash.eq(state_hash),
            oidc_logins::binding_hash.eq(sha256_hex(&binding)),
            oidc_logins::created_at.eq(micros(now)),
            oidc_logins::expires_at.eq(micros(now + LOGIN_TTL)),
        );
        self.db
            .run(move |c| {
                diesel::delete(oidc_logins::table.filter(oidc_logins::expires_at.le(micros(now)))).execute(c)?;
                diesel::insert_into(oidc_logins::table).values(row).execute(c)?;
                Ok(())
            })
            .await?;
        Ok(LoginStart { authorization_url: url.to_string(), binding })
    }

    /// Consumes the login state of `state` if `binding` matches and it has not expired: (PKCE verifier, nonce,
    /// SMART flow). A stored secret that does not open (tampered, or moved from another login) is no login
    /// state at all.
    async fn take_login(&self, state: &str, binding: &str) -> AppResult<Option<LoginState>> {
        let (state_hash, binding_hash) = (sha256_hex(state), sha256_hex(binding));
        let now = micros(self.clock.now());
        let sealed = self.take_sealed(state_hash.clone(), binding_hash, now).await?;
        let open = |column: &str, ct: &str| {
            let bytes = self.cipher.decrypt(&FieldAad::new(LOGIN_AAD, &state_hash, column), ct).ok()?;
            String::from_utf8(bytes.to_vec()).ok()
        };
        Ok(sealed.and_then(|(v, n, f)| {
            let flow = match f {
                Some(f) => Some(open("smart_flow", &f)?),
                None => None,
            };
            Some(LoginState { verifier: open("pkce_verifier", &v)?, nonce: open("nonce", &n)?, smart_flow: flow })
        }))
    }

    /// The sealed (PKCE verifier, nonce, SMART flow) of a login, deleted in the same transaction (single use).
    async fn take_sealed(
        &self,
        state_hash: String,
        binding_hash: String,
        now: i64,
    ) -> AppResult<Option<(String, String, Option<String>)>> {
        self.db
            .run(move |c| {
                c.transaction(|c| {
                    let row: Option<(String, String, String, Option<String>, i64)> = oidc_logins::table
                        .filter(oidc_logins::state_hash.eq(&state_hash))
                        .select((
                            oidc_logins::binding_hash,
                            oidc_logins::pkce_verifier,
                            oidc_logins::nonce,
                            oidc_logins::smart_flow,
                            oidc_logins::expires_at,
                        ))
                        .first(c)
                        .optional()?;
                    // A wrong browser does not spend the login of the right one.
                    let Some((_, verifier, nonce, flow, expires)) = row.filter(|r| r.0 == binding_hash) else {
                        return Ok(None);
                    };
                    let deleted = diesel::delete(oidc_logins::table.filter(oidc_logins::state_hash.eq(&state_hash)))
                        .execute(c)?;
                    Ok((deleted == 1 && now < expires).then_some((verifier, nonce, flow)))
                })
            })
            .await
    }

    /// `GET /auth/oidc/callback`: checks state and binding, redeems the code with the PKCE verifier, verifies
    /// the ID token and maps its claims to a local account of kind `oidc` (created or updated).
    pub async fn finish_login(&self, params: CallbackParams, binding: Option<&str>) -> AppResult<OidcLogin> {
        let refuse = |r| Ok(OidcLogin::Refused(r));
        let bounded = |v: &Option<String>| v.as_deref().filter(|s| !s.is_empty() && s.len() <= 2048).map(str::to_owned);
        let (Some(state), Some(binding)) = (bounded(&params.state), binding.filter(|b| b.len() <= 256)) else {
            return refuse(Refusal::State);
        };
        let Some(LoginState { verifier, nonce, smart_flow }) = self.take_login(&state, binding).await? else {
            return refuse(Refusal::State);
        };
        // RFC 9207: when the provider names itself on the redirect, it must be ours (mix-up defence).
        if params.error.is_some() || params.iss.as_deref().is_some_and(|i| i != self.settings.issuer) {
            return refuse(Refusal::Provider);
        }
        let Some(code) = bounded(&params.code) else { return refuse(Refusal::Provider) };
        let metadata = self.discover().await?;
        let client = self.client(metadata);
        let request = client
            .exchange_code(AuthorizationCode::new(code))
            .map_err(|_| AppError::unavailable("OIDC provider has no token endpoint"))?
            .set_pkce_verifier(PkceCodeVerifier::new(verifier));
        let response = match request.request_async(&self.http).await {
            Ok(r) => r,
            Err(RequestTokenError::ServerResponse(_)) => return refuse(Refusal::Provider),
            Err(_) => return Err(AppError::unavailable("OIDC token endpoint failed")),
        };
        let Some(id_token) = response.id_token() else { return refuse(Refusal::Token) };
        let claims = match self.verify(&id_token.to_string(), TokenKind::Id, Some(&nonce)).await {
            Ok(c) => c,
            Err(_) => return refuse(Refusal::Token),
        };
        let Some(identity) = self.identity(&claims) else { return refuse(Refusal::Role) };
        match self.upsert_account(identity).await? {
            Some(account) => Ok(OidcLogin::Ok { account: Box::new(account), smart_flow }),
            None => refuse(Refusal::Disabled),
        }
    }

    /// Finds or creates the local account of an identity, refreshing its role and link from the claims.
    /// `None` when that account is disabled.
    async fn upsert_account(&self, identity: OidcIdentity) -> AppResult<Option<Account>> {
        let username = self.username_for(&identity.subject);
        let now = micros(self.clock.now());
        self.db
            .run(move |c| {
                let find = |c: &mut crate::store::AnyConnection| -> AppResult<Option<Account>> {
                    Ok(accounts::table
                        .filter(accounts::username.eq(&username))
                        .select(Account::as_select())
                        .first(c)
                        .optional()?)
                };
                let mut found = find(c)?;
                if found.is_none() {
                    let account = Account {
                        id: Uuid::new_v4().to_string(),
                        username: username.clone(),
                        kind: "oidc".to_owned(),
                        role: identity.role.as_str().to_owned(),
                        practitioner_id: identity.practitioner.map(|p| p.to_string()),
                        patient_id: identity.patient.map(|p| p.to_string()),
                        password_hash: None,
                        totp_secret: None,
                        disabled: false,
                        created_at: now,
                    };
                    // A concurrent first login of the same subject may have won the insert: read it back.
                    match diesel::insert_into(accounts::table).values(&account).execute(c) {
                        Ok(_) => return Ok(Some(account)),
                        Err(_) => found = find(c)?,
                    }
                }
                let Some(mut account) = found else { return Err(AppError::internal("oidc account vanished")) };
                if account.kind != "oidc" {
                    return Err(AppError::internal("oidc username taken by another account kind"));
                }
                if account.disabled {
                    return Ok(None);
                }
                let role = identity.role.as_str().to_owned();
                let practitioner = identity.practitioner.map(|p| p.to_string());
                let patient = identity.patient.map(|p| p.to_string());
                // Written only when the claims changed: provider bearer tokens come here on every request.
                if (&account.role, &account.practitioner_id, &account.patient_id) == (&role, &practitioner, &patient) {
                    return Ok(Some(account));
                }
                (account.role, account.practitioner_id, account.patient_id) = (role, practitioner, patient);
                diesel::update(accounts::table.filter(accounts::id.eq(&account.id)))
                    .set((
                        accounts::role.eq(&account.role),
                        accounts::practitioner_id.eq(&account.practitioner_id),
                        accounts::patient_id.eq(&account.patient_id),
                    ))
                    .execute(c)?;
                Ok(Some(account))
            })
            .await
    }

    /// Whether a bearer token names this provider as its issuer (unverified: only to pick the verifier).
    pub fn is_provider_token(&self, token: &str) -> bool {
        unverified_claims(token).and_then(|c| c.get("iss").and_then(Value::as_str).map(str::to_owned))
            == Some(self.settings.issuer.clone())
    }

    /// Resource-server mode: a provider access token as a bearer token. The identity is the same local
    /// account (kind `oidc`) a browser login of that subject uses, created on first sight, so grants, audit
    /// records and the incident tooling (`incident contain|report --user oidc:...`) name one account; a
    /// disabled account (`users disable`, `incident contain`) is shut out.
    pub async fn authenticate(&self, token: &str) -> AppResult<Principal> {
        let claims = self.verify(token, TokenKind::Access, None).await.map_err(|_| AppError::Unauthenticated)?;
        let identity = self.identity(&claims).ok_or(AppError::Unauthenticated)?;
        let account = self.upsert_account(identity.clone()).await?.ok_or(AppError::Unauthenticated)?;
        Ok(Principal {
            subject: account.id,
            username: Some(account.username),
            roles: vec![identity.role],
            practitioner: identity.practitioner,
            patient: identity.patient,
            session_id: None,
            issuer: self.settings.issuer.clone(),
            client_id: None,
            scopes: None,
            context_patient: None,
        })
    }

    /// Role and link from the configured claims; `None` when they do not make one usable identity.
    fn identity(&self, claims: &Map<String, Value>) -> Option<OidcIdentity> {
        identity_from_claims(claims, &self.settings.roles_claim, &self.settings.link_claim)
    }

    fn cached_key(&self, kid: &str) -> Option<ProviderKey> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner).get(kid).cloned()
    }

    /// The key of `kid`, refetching the provider's keys (rate-limited) when it is not known.
    async fn key(&self, kid: &str) -> Option<ProviderKey> {
        if let Some(k) = self.cached_key(kid) {
            return Some(k);
        }
        // Held across the refetch: concurrent requests wait for its result instead of fetching again.
        let mut fetched = self.fetched_at.lock().await;
        if let Some(k) = self.cached_key(kid) {
            return Some(k);
        }
        let now = self.clock.now();
        if fetched.is_some_and(|t| (now - t).abs() < REFETCH_EVERY) {
            return None;
        }
        *fetched = Some(now);
        // A failed refetch keeps the cached keys.
        let _ = self.fetch().await;
        self.cached_key(kid)
    }

    /// Verifies signature, issuer, audience, times and kind; returns the claims.
    async fn verify(
        &self,
        token: &str,
        kind: TokenKind,
        nonce: Option<&str>,
    ) -> Result<Map<String, Value>, &'static str> {
        if token.len() > MAX_TOKEN_LEN {
            return Err("too long");
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed header")?;
        if header.crit.is_some() {
            return Err("critical header");
        }
        if !is_asymmetric(header.alg) {
            return Err("algorithm");
        }
        let kid = header.kid.as_deref().filter(|k| !k.is_empty() && k.len() <= 256).ok_or("no kid")?;
        let key = self.key(kid).await.ok_or("unknown kid")?;
        if key.alg != header.alg {
            return Err("algorithm mismatch");
        }
        let mut validation = Validation::new(key.alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|_| "signature or format")?
            .claims;
        let str_claim = |name: &str| claims.get(name).and_then(Value::as_str);
        if str_claim("iss") != Some(self.settings.issuer.as_str()) {
            return Err("issuer");
        }
        let audiences: Vec<&str> = match claims.get("aud") {
            Some(Value::String(a)) => vec![a.as_str()],
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let now = self.clock.now().unix_timestamp();
        let leeway = LEEWAY.whole_seconds();
        let exp = claims.get("exp").and_then(Value::as_i64).ok_or("no exp")?;
        if now >= exp.saturating_add(leeway) {
            return Err("expired");
        }
        for name in ["iat", "nbf"] {
            if claims.get(name).and_then(Value::as_i64).is_some_and(|t| t > now.saturating_add(leeway)) {
                return Err("not yet valid");
            }
        }
        if str_claim("sub").is_none_or(|s| s.is_empty() || s.len() > MAX_CLAIM_LEN) {
            return Err("subject");
        }
        let header_typ = header.typ.as_deref().map(str::to_ascii_lowercase);
        let is_at_jwt = matches!(header_typ.as_deref(), Some("at+jwt" | "application/at+jwt"));
        match kind {
            TokenKind::Id => {
                let client = self.settings.client_id.as_str();
                if !audiences.contains(&client) {
                    return Err("audience");
                }
                let azp = str_claim("azp");
                if azp.is_some_and(|a| a != client) || (audiences.len() > 1 && azp.is_none()) {
                    return Err("authorized party");
                }
                if is_at_jwt {
                    return Err("not an ID token");
                }
                let expected = nonce.ok_or("nonce")?;
                let presented = str_claim("nonce").ok_or("nonce")?;
                if Sha256::digest(presented.as_bytes()) != Sha256::digest(expected.as_bytes()) {
                    return Err("nonce");
                }
            }
            TokenKind::Access => {
                if !audiences.contains(&self.settings.audience.as_str()) {
                    return Err("audience");
                }
                let plain_jwt = matches!(header_typ.as_deref(), None | Some("jwt"));
                let looks_like_access = claims.contains_key("scope") && str_claim("typ") != Some("ID");
                if !(is_at_jwt || (plain_jwt && looks_like_access)) {
                    return Err("not an access token");
                }
            }
        }
        Ok(claims)
    }
}

/// The payload of a JWT without checking anything: only to route a token to its verifier.
fn unverified_claims(token: &str) -> Option<Map<String, Value>> {
    let payload = token.split('.').nth(1)?;
    if payload.len() > MAX_TOKEN_LEN {
        return None;
    }
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

fn is_asymmetric(alg: Algorithm) -> bool {
    use Algorithm::*;
    matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512 | ES256 | ES384 | EdDSA)
}

/// The verification keys of a JWKS document; `None` when it is not one. Keys that are symmetric, for
/// encryption, without `kid`, or whose declared `alg` does not fit their type are left out.
fn parse_jwks(doc: &Value) -> Option<HashMap<String, ProviderKey>> {
    let list = doc.get("keys")?.as_array()?;
    let mut keys = HashMap::new();
    for entry in list {
        // Serializers may write absent members as null; a JWK has no null members.
        let Some(obj) = entry.as_object() else { continue };
        let cleaned: Map<String, Value> =
            obj.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
        let Ok(jwk) = serde_json::from_value::<Jwk>(Value::Object(cleaned)) else { continue };
        if let Some((kid, key)) = provider_key(&jwk) {
            keys.insert(kid, key);
        }
    }
    Some(keys)
}

fn provider_key(jwk: &Jwk) -> Option<(String, ProviderKey)> {
    let kid = jwk.common.key_id.clone().filter(|k| !k.is_empty())?;
    if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => Algorithm::EdDSA,
        _ => return None,
    };
    let alg = match jwk.common.key_algorithm {
        None => implied,
        Some(declared) => {
            let declared = match declared {
                KeyAlgorithm::RS256 => Algorithm::RS256,
                KeyAlgorithm::RS384 => Algorithm::RS384,
                KeyAlgorithm::RS512 => Algorithm::RS512,
                KeyAlgorithm::PS256 => Algorithm::PS256,
                KeyAlgorithm::PS384 => Algorithm::PS384,
                KeyAlgorithm::PS512 => Algorithm::PS512,
                KeyAlgorithm::ES256 => Algorithm::ES256,
                KeyAlgorithm::ES384 => Algorithm::ES384,
                KeyAlgorithm::EdDSA => Algorithm::EdDSA,
                _ => return None,
            };
            let fits = match implied {
                Algorithm::RS256 => matches!(
                    declared,
                    Algorithm::RS256
                        | Algorithm::RS384
                        | Algorithm::RS512
                        | Algorithm::PS256
                        | Algorithm::PS384
                        | Algorithm::PS512
                ),
                other => declared == other,
            };
            if !fits {
                return None;
            }
            declared
        }
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((kid, ProviderKey { alg, key }))
}

/// Exactly one known role among the values of `roles_claim` (a string or a list), and the link its role needs
/// from `link_claim` (`Practitioner/<uuid>` or `Patient/<uuid>`, also as the tail of an absolute URL).
pub fn identity_from_claims(claims: &Map<String, Value>, roles_claim: &str, link_claim: &str) -> Option<OidcIdentity> {
    let subject = claims.get("sub")?.as_str().filter(|s| !s.is_empty() && s.len() <= MAX_CLAIM_LEN)?.to_owned();
    let values: Vec<&str> = match claims.get(roles_claim)? {
        Value::String(s) => vec![s.as_str()],
        Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
        _ => return None,
    };
    let mut roles: Vec<Role> = values.iter().filter_map(|v| v.parse().ok()).collect();
    roles.sort();
    roles.dedup();
    let [role] = roles[..] else { return None };
    let link = claims.get(link_claim).and_then(Value::as_str).filter(|l| l.len() <= 2048).and_then(|l| {
        let mut parts = l.trim_end_matches('/').rsplit('/');
        let id = Uuid::parse_str(parts.next()?).ok()?;
        Some((parts.next()?.to_owned(), id))
    });
    let (practitioner, patient) = match (role, link) {
        (Role::Clinician | Role::Nurse, Some((t, id))) if t == "Practitioner" => (Some(id), None),
        (Role::Patient, Some((t, id))) if t == "Patient" => (None, Some(id)),
        (Role::Clinician | Role::Nurse | Role::Patient, _) => return None,
        _ => (None, None),
    };
    Some(OidcIdentity { subject, role, practitioner, patient })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    const P: &str = "6f1c0a52-4a3e-4b8e-9a55-2f1d8d1c7e01";

    #[test]
    fn one_known_role_and_the_link_it_needs() {
        let id = |v| identity_from_claims(&claims(v), "carevault_roles", "fhirUser");
        let c = id(json!({"sub":"u1","carevault_roles":["clinician"],"fhirUser":format!("Practitioner/{P}")})).unwrap();
        assert_eq!((c.role, c.practitioner, c.patient), (Role::Clinician, Some(P.parse().unwrap()), None));
        let p =
            id(json!({"sub":"u2","carevault_roles":"patient","fhirUser":format!("https://x.org/fhir/Patient/{P}")}));
        assert_eq!(p.unwrap().patient, Some(P.parse().unwrap()));
        // Unknown values are ignored, a single known one is taken.
        let a = id(json!({"sub":"u3","carevault_roles":["offline_access","admin"]})).unwrap();
        assert_eq!((a.role, a.practitioner), (Role::Admin, None));
        // Admin with a link: the link is not used.
        assert_eq!(
            id(json!({"sub":"u3","carevault_roles":["admin"],"fhirUser":format!("Practitioner/{P}")}))
                .unwrap()
                .practitioner,
            None
        );
        for bad in [
            json!({"sub":"u","carevault_roles":["root"]}),
            json!({"sub":"u","carevault_roles":[]}),
            json!({"sub":"u","carevault_roles":["admin","auditor"]}),
            json!({"sub":"u"}),
            json!({"sub":"u","carevault_roles":{"admin":true}}),
            json!({"sub":"u","carevault_roles":["clinician"]}),
            json!({"sub":"u","carevault_roles":["clinician"],"fhirUser":format!("Patient/{P}")}),
            json!({"sub":"u","carevault_roles":["patient"],"fhirUser":format!("Practitioner/{P}")}),
            json!({"sub":"u","carevault_roles":["nurse"],"fhirUser":"Practitioner/not-a-uuid"}),
            json!({"carevault_roles":["admin"]}),
            json!({"sub":"","carevault_roles":["admin"]}),
        ] {
            assert_eq!(id(bad.clone()), None, "{bad}");
        }
    }

    #[test]
    fn jwks_keeps_only_asymmetric_signing_keys_with_their_algorithm() {
        let n = URL_SAFE_NO_PAD.encode([0xc5u8; 256]);
        let doc = json!({"keys": [
            {"kty":"RSA","kid":"rsa","n":n,"e":"AQAB","alg":"RS256","use":"sig","x":null},
            {"kty":"RSA","kid":"rsa-implied","n":n,"e":"AQAB"},
            {"kty":"RSA","kid":"rsa-enc","n":n,"e":"AQAB","use":"enc"},
            {"kty":"RSA","kid":"rsa-as-hmac","n":n,"e":"AQAB","alg":"HS256"},
            {"kty":"RSA","kid":"rsa-as-ec","n":n,"e":"AQAB","alg":"ES256"},
            {"kty":"oct","kid":"hmac","k":"c2VjcmV0","alg":"HS256"},
            {"kty":"OKP","kid":"ed","crv":"Ed25519","x":URL_SAFE_NO_PAD.encode([7u8; 32])},
            {"kty":"RSA","n":n,"e":"AQAB"},
            {"kty":"weird","kid":"w"},
            "garbage"
        ]});
        let keys = parse_jwks(&doc).unwrap();
        let mut kids: Vec<_> = keys.keys().cloned().collect();
        kids.sort();
        assert_eq!(kids, ["ed", "rsa", "rsa-implied"]);
        assert_eq!(keys["ed"].alg, Algorithm::EdDSA);
        assert_eq!(keys["rsa-implied"].alg, Algorithm::RS256);
        assert!(parse_jwks(&json!({"nokeys": []})).is_none());
        assert!(parse_jwks(&json!("<html>")).is_none());
    }

    #[test]
    fn routing_reads_only_the_issuer() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"iss":"https://idp.example.org"}"#);
        let claims = unverified_claims(&format!("e30.{payload}.sig")).unwrap();
        assert_eq!(claims["iss"], "https://idp.example.org");
        assert!(unverified_claims("not a jwt").is_none());
        assert!(unverified_claims("a.!!!.c").is_none());
    }
}
