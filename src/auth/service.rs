//! Authentication as a service over the database: accounts, login with throttling, sessions with refresh
//! rotation and reuse detection, logout and revocation, client credentials, and bearer-token authentication.
//!
//! Session state is shared through the database, so every replica sees a logout or revocation; each replica
//! caches a session's state for at most [`SESSION_CACHE`] (the "within 5 seconds" of the contract).

use super::attempts::{self, Admission, ThrottleKeyer};
use super::oidc::OidcService;
use super::password::{check_policy, hash_password, verify_password};
use super::principal::Principal;
use super::session::{
    RefreshDecision, RefreshTokenRecord, SessionPolicy, SessionRecord, hash_refresh_token, new_refresh_token,
};
use super::token::{SigningKey, TokenKeys};
use crate::clock::SharedClock;
use crate::crypto::KeyProvider;
use crate::crypto::store::micros;
use crate::error::{AppError, AppResult};
use crate::role::Role;
use crate::store::schema::{accounts, refresh_tokens, sessions, signing_keys};
use crate::store::{AnyConnection, Db};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use diesel::prelude::*;
use secrecy::SecretString;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

mod smart;
pub use smart::{
    App, AppKind, AuthorizeRequest, AuthorizeStart, BackendOutcome, ClientCheck, CodeExchange, FlowConsent, FlowSignIn,
    NewApp, SmartGrant, list_apps, new_client_secret, register_app, remove_app,
};

/// How long a replica trusts its cached view of a session.
pub const SESSION_CACHE: Duration = Duration::seconds(5);
/// Entries the session cache holds before it drops the ones older than [`SESSION_CACHE`] (which it would
/// check against the database again anyway): memory bounded by the sessions active within 5 seconds.
const SESSION_CACHE_PRUNE_AT: usize = 4096;

pub fn from_micros(m: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(m) * 1000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = accounts)]
pub struct Account {
    pub id: String,
    pub username: String,
    pub kind: String,
    pub role: String,
    pub practitioner_id: Option<String>,
    pub patient_id: Option<String>,
    pub password_hash: Option<String>,
    pub totp_secret: Option<String>,
    pub disabled: bool,
    pub created_at: i64,
}

impl Account {
    pub fn role(&self) -> Option<Role> {
        self.role.parse().ok()
    }

    pub fn principal(&self, session: Option<Uuid>, issuer: &str) -> AppResult<Principal> {
        let role = self.role().ok_or_else(|| AppError::internal("stored account has an unknown role"))?;
        Ok(Principal {
            subject: self.id.clone(),
            username: Some(self.username.clone()),
            roles: vec![role],
            practitioner: self.practitioner_id.as_deref().and_then(|p| Uuid::parse_str(p).ok()),
            patient: self.patient_id.as_deref().and_then(|p| Uuid::parse_str(p).ok()),
            session_id: session,
            issuer: issuer.to_owned(),
            client_id: (self.kind == "service").then(|| self.username.clone()),
            scopes: None,
            context_patient: None,
        })
    }
}

/// The OAuth token response of `/auth/login`, `/auth/token` and the OIDC callback.
#[derive(Debug, Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// SMART: the scopes granted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// SMART: the patient in the launch context.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<Uuid>,
    /// SMART: an OpenID Connect id token (`openid fhirUser`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
}

impl TokenResponse {
    /// A first-party token response (login, refresh, client credentials).
    pub fn bearer(access_token: String, expires_in: i64, refresh_token: Option<String>) -> Self {
        Self {
            access_token,
            token_type: "Bearer",
            expires_in,
            refresh_token,
            scope: None,
            patient: None,
            id_token: None,
        }
    }
}

/// Whether a token check counts as the session's activity (idle logoff).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Touch {
    Yes,
    No,
}

#[derive(Debug, Clone)]
struct CachedSession {
    live: bool,
    created_at: OffsetDateTime,
    last_seen: OffsetDateTime,
    checked_at: OffsetDateTime,
    /// The account's login name, for the audit trail (tokens do not carry it).
    username: Arc<str>,
}

/// Why a login failed; only for the audit trail and metrics, never sent (the client sees one generic 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginFailure {
    UnknownOrWrong,
    Disabled,
    /// The second factor was missing, wrong or replayed, or (production) an admin has none enrolled.
    SecondFactor,
}

/// What a login attempt came to.
#[derive(Debug)]
pub enum LoginOutcome {
    Ok {
        tokens: TokenResponse,
        account: Account,
        session: Uuid,
    },
    Failed {
        account: Option<Account>,
        reason: LoginFailure,
    },
    /// Refused by throttling before any verification (audited and counted by the failed-login rules all the
    /// same); `account` is the account the name belongs to, if any.
    Throttled {
        account: Option<Account>,
        retry_after: Duration,
    },
}

/// What a client-credentials attempt came to.
#[derive(Debug)]
pub enum ClientOutcome {
    Ok(TokenResponse, Account),
    Failed,
    Throttled { account: Option<Account>, retry_after: Duration },
}

pub struct AuthService {
    db: Db,
    clock: SharedClock,
    provider: Arc<dyn KeyProvider>,
    keys: RwLock<Arc<TokenKeys>>,
    sessions: SessionPolicy,
    ttl: Duration,
    issuer: String,
    audience: String,
    cache: RwLock<HashMap<Uuid, CachedSession>>,
    oidc: Option<Arc<OidcService>>,
    /// Production: admin accounts must have TOTP enrolled to sign in.
    require_admin_totp: bool,
    /// Throttle keys (keyed hashes of names and addresses).
    keyer: ThrottleKeyer,
    /// Password and client-secret verifications run (argon2), for tests and figures.
    password_checks: AtomicU64,
}

impl std::fmt::Debug for AuthService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthService").field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

/// The key id a token-signing key is wrapped under (associated data of the master-key wrap).
pub fn signing_key_id(kid: &str) -> String {
    format!("carevault/signing/{kid}")
}

/// Loads the signing keys, creating the first one on a fresh database.
pub fn load_signing_keys(
    conn: &mut AnyConnection,
    provider: &dyn KeyProvider,
    now: OffsetDateTime,
    issuer: &str,
    audience: &str,
) -> AppResult<TokenKeys> {
    conn.transaction(|conn| {
        type KeyRow = (String, String, i64, Option<i64>);
        let rows: Vec<KeyRow> = signing_keys::table
            .select((signing_keys::kid, signing_keys::wrapped, signing_keys::created_at, signing_keys::retired_at))
            .load(conn)?;
        let mut keys = Vec::with_capacity(rows.len());
        for (kid, wrapped, created, retired) in rows {
            let bytes = STANDARD.decode(wrapped).map_err(|e| AppError::internal_from("stored signing key", e))?;
            let pkcs8 = provider
                .unwrap(&signing_key_id(&kid), &bytes)
                .map_err(|e| AppError::internal_from("cannot unwrap a signing key", e))?;
            keys.push(SigningKey::from_pkcs8(pkcs8, from_micros(created), retired.map(from_micros))?);
        }
        if keys.is_empty() {
            let key = SigningKey::generate(now)?;
            insert_signing_key(conn, provider, &key)?;
            keys.push(key);
        }
        let mut ring = TokenKeys::new(issuer, audience, keys)?;
        ring.prune(now);
        Ok(ring)
    })
}

fn insert_signing_key(conn: &mut AnyConnection, provider: &dyn KeyProvider, key: &SigningKey) -> AppResult<()> {
    let wrapped = provider
        .wrap(&signing_key_id(&key.kid), &key.pkcs8)
        .map_err(|e| AppError::internal_from("cannot wrap a signing key", e))?;
    diesel::insert_into(signing_keys::table)
        .values((
            signing_keys::kid.eq(&key.kid),
            signing_keys::wrapped.eq(STANDARD.encode(wrapped)),
            signing_keys::public_key.eq(STANDARD.encode(&key.public)),
            signing_keys::created_at.eq(micros(key.created_at)),
        ))
        .execute(conn)?;
    Ok(())
}

/// `keys rotate-signing`: a new active signing key; the old one stays published until its tokens expired.
pub fn rotate_signing_key(
    conn: &mut AnyConnection,
    provider: &dyn KeyProvider,
    now: OffsetDateTime,
) -> AppResult<String> {
    conn.transaction(|conn| {
        let key = SigningKey::generate(now)?;
        diesel::update(signing_keys::table.filter(signing_keys::retired_at.is_null()))
            .set(signing_keys::retired_at.eq(Some(micros(now))))
            .execute(conn)?;
        insert_signing_key(conn, provider, &key)?;
        Ok(key.kid)
    })
}

impl AuthService {
    pub fn new(
        db: Db,
        clock: SharedClock,
        provider: Arc<dyn KeyProvider>,
        keys: TokenKeys,
        sessions: SessionPolicy,
        ttl: Duration,
        issuer: String,
    ) -> Self {
        Self {
            db,
            clock,
            provider,
            keys: RwLock::new(Arc::new(keys)),
            sessions,
            ttl,
            audience: issuer.clone(),
            issuer,
            cache: RwLock::new(HashMap::new()),
            oidc: None,
            require_admin_totp: false,
            keyer: ThrottleKeyer::random(),
            password_checks: AtomicU64::new(0),
        }
    }

    /// Throttle keys under a key derived from the key ring, so every replica and restart computes the same ones.
    pub fn with_throttle_keyer(mut self, keyer: ThrottleKeyer) -> Self {
        self.keyer = keyer;
        self
    }

    /// How many argon2 verifications (passwords and client secrets) this service has run.
    pub fn password_checks(&self) -> u64 {
        self.password_checks.load(Ordering::Relaxed)
    }

    /// One argon2 verification off the async runtime, counted.
    async fn verify(
        &self,
        phc: Option<String>,
        secret: SecretString,
    ) -> AppResult<(super::password::Verification, SecretString)> {
        self.password_checks.fetch_add(1, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || (verify_password(phc.as_deref(), &secret), secret))
            .await
            .map_err(|e| AppError::internal_from("password task", e))
    }

    async fn find_by_name(&self, name: &str, kind: &'static str) -> AppResult<Option<Account>> {
        let name = name.to_owned();
        self.db
            .run(move |c| {
                Ok(accounts::table
                    .filter(accounts::username.eq(&name))
                    .filter(accounts::kind.eq(kind))
                    .select(Account::as_select())
                    .first(c)
                    .optional()?)
            })
            .await
    }

    /// Adds the configured OpenID Connect provider: its login flow and its access tokens as bearer tokens.
    pub fn requiring_admin_totp(mut self, yes: bool) -> Self {
        self.require_admin_totp = yes;
        self
    }

    pub fn with_oidc(mut self, oidc: Option<Arc<OidcService>>) -> Self {
        self.oidc = oidc;
        self
    }

    pub fn oidc(&self) -> Option<&Arc<OidcService>> {
        self.oidc.as_ref()
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    fn keys(&self) -> Arc<TokenKeys> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Re-reads signing keys (after `keys rotate-signing` in another process).
    pub async fn reload_keys(&self) -> AppResult<()> {
        let provider = self.provider.clone();
        let (now, issuer, audience) = (self.clock.now(), self.issuer.clone(), self.audience.clone());
        let keys = self.db.run(move |c| load_signing_keys(c, provider.as_ref(), now, &issuer, &audience)).await?;
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
        Ok(())
    }

    pub fn jwks(&self) -> serde_json::Value {
        self.keys().jwks(self.clock.now())
    }

    fn issue(&self, principal: &Principal, now: OffsetDateTime) -> AppResult<(String, i64)> {
        let (token, exp) = self.keys().issue(principal, now, self.ttl)?;
        Ok((token, (exp - now).whole_seconds()))
    }

    /// Password login with throttling per account name and per address (see [`attempts`]): at most one
    /// verification per name is in flight, and an attempt refused by throttling reaches no argon2 check.
    /// Unknown names cost the same as known ones.
    pub async fn login(
        &self,
        username: String,
        password: SecretString,
        totp: Option<String>,
        address: String,
    ) -> AppResult<LoginOutcome> {
        match self.sign_in(username, password, totp, address).await? {
            LoginOutcome::Ok { account, .. } => {
                let (tokens, session) = self.open_session(&account, self.clock.now()).await?;
                Ok(LoginOutcome::Ok { tokens, account, session })
            }
            other => Ok(other),
        }
    }

    /// The credential checks of [`AuthService::login`] without opening a session (the SMART authorize page
    /// signs in, then asks for consent): `Ok` carries no tokens.
    pub async fn sign_in(
        &self,
        username: String,
        password: SecretString,
        totp: Option<String>,
        address: String,
    ) -> AppResult<LoginOutcome> {
        let now = self.clock.now();
        let keys = self.keyer.keys("account", &username, &address);
        let k = keys.clone();
        let reservation = match self.db.run(move |c| attempts::admit(c, &k, now)).await? {
            Admission::Proceed(r) => r,
            Admission::Throttled(retry_after) => {
                let account = self.find_by_name(&username, "user").await?;
                return Ok(LoginOutcome::Throttled { account, retry_after });
            }
        };
        let result = self.check_login(&username, password, totp.as_deref(), now).await;
        // An attempt that ended in an error records nothing; it only gives the reservation back.
        let outcome = result.as_ref().ok().map(|(account, failed, _)| account.is_some() && failed.is_none());
        let k = keys.clone();
        let finished = self.db.run(move |c| attempts::conclude(c, &k, &reservation, outcome, now)).await;
        let (account, failed, password) = result?;
        finished?;
        if let Some(reason) = failed {
            return Ok(LoginOutcome::Failed { account, reason });
        }
        let Some(account) = account else { return Err(AppError::Unauthenticated) };
        if let Some(password) = password {
            // Parameters are upgraded on the next successful login, the only time the password is at hand.
            let id = account.id.clone();
            let phc = tokio::task::spawn_blocking(move || super::password::hash_password(&password))
                .await
                .map_err(|e| AppError::internal_from("password task", e))??;
            self.db
                .run(move |c| {
                    diesel::update(accounts::table.filter(accounts::id.eq(&id)))
                        .set(accounts::password_hash.eq(Some(phc)))
                        .execute(c)?;
                    Ok(())
                })
                .await?;
        }
        Ok(LoginOutcome::Ok { tokens: empty_tokens(), account, session: Uuid::nil() })
    }

    /// The checks of one admitted login: the account, why it failed (if it did), and the password when its
    /// hash needs new parameters.
    async fn check_login(
        &self,
        username: &str,
        password: SecretString,
        totp: Option<&str>,
        now: OffsetDateTime,
    ) -> AppResult<(Option<Account>, Option<LoginFailure>, Option<SecretString>)> {
        let account = self.find_by_name(username, "user").await?;
        let phc = account.as_ref().and_then(|a| a.password_hash.clone());
        let (verification, password) = self.verify(phc, password).await?;
        let mut failed = match &account {
            None => Some(LoginFailure::UnknownOrWrong),
            Some(_) if !verification.ok => Some(LoginFailure::UnknownOrWrong),
            Some(a) if a.disabled => Some(LoginFailure::Disabled),
            Some(_) => None,
        };
        if failed.is_none()
            && let Some(a) = &account
            && !self.second_factor_ok(a, totp, now).await?
        {
            failed = Some(LoginFailure::SecondFactor);
        }
        let rehash = (failed.is_none() && verification.needs_rehash).then_some(password);
        Ok((account, failed, rehash))
    }

    /// TOTP for accounts that enrolled it (required for admins in production). A code is accepted once.
    async fn second_factor_ok(&self, account: &Account, code: Option<&str>, now: OffsetDateTime) -> AppResult<bool> {
        let Some(wrapped) = &account.totp_secret else {
            return Ok(!(self.require_admin_totp && account.role() == Some(Role::Admin)));
        };
        let Some(code) = code else { return Ok(false) };
        let bytes = STANDARD.decode(wrapped).map_err(|e| AppError::internal_from("stored TOTP secret", e))?;
        let secret = self
            .provider
            .unwrap(&totp_key_id(&account.id), &bytes)
            .map_err(|e| AppError::internal_from("cannot unwrap a TOTP secret", e))?;
        let id = account.id.clone();
        let last: Option<i64> = self
            .db
            .run(move |c| Ok(accounts::table.filter(accounts::id.eq(&id)).select(accounts::totp_last_step).first(c)?))
            .await?;
        let Some(step) = super::totp::verify(&secret, code, now, last) else { return Ok(false) };
        let id = account.id.clone();
        // Compare-and-set, so two concurrent logins cannot both spend the same code.
        let n = self
            .db
            .run(move |c| {
                Ok(diesel::update(
                    accounts::table
                        .filter(accounts::id.eq(&id))
                        .filter(accounts::totp_last_step.is_null().or(accounts::totp_last_step.lt(step))),
                )
                .set(accounts::totp_last_step.eq(Some(step)))
                .execute(c)?)
            })
            .await?;
        Ok(n == 1)
    }

    /// Opens a session for an account (password or OIDC login) and issues its first tokens.
    pub async fn open_session(&self, account: &Account, now: OffsetDateTime) -> AppResult<(TokenResponse, Uuid)> {
        self.open_session_for(account, None, now).await
    }

    /// Opens a session, first-party (`smart` = `None`) or for a SMART app (its client, granted scopes and launch
    /// patient are stored with the session, so refreshes stay as narrow; a refresh token only with
    /// `offline_access` or `online_access`).
    pub(crate) async fn open_session_for(
        &self,
        account: &Account,
        smart: Option<SmartGrant>,
        now: OffsetDateTime,
    ) -> AppResult<(TokenResponse, Uuid)> {
        let session = Uuid::new_v4();
        let wants_refresh = smart.as_ref().is_none_or(|g| g.scopes.offline_access || g.scopes.online_access);
        let (refresh, hash) = new_refresh_token();
        let account_id = account.id.clone();
        let (client, scope, launch) = match &smart {
            Some(g) => (Some(g.client_id.clone()), Some(g.scopes.render()), g.patient.map(|p| p.to_string())),
            None => (None, None, None),
        };
        self.db
            .run(move |c| {
                c.transaction(|c| {
                    diesel::insert_into(sessions::table)
                        .values((
                            sessions::id.eq(session.to_string()),
                            sessions::account_id.eq(&account_id),
                            sessions::created_at.eq(micros(now)),
                            sessions::last_seen.eq(micros(now)),
                            sessions::client_id.eq(client),
                            sessions::scope.eq(scope),
                            sessions::launch_patient.eq(launch),
                        ))
                        .execute(c)?;
                    if wants_refresh { insert_refresh(c, &hash, session, now) } else { Ok(()) }
                })
            })
            .await?;
        let mut principal = account.principal(Some(session), &self.issuer)?;
        if let Some(g) = &smart {
            g.apply(&mut principal);
        }
        let (access, expires_in) = self.issue(&principal, now)?;
        let mut tokens = TokenResponse::bearer(access, expires_in, wants_refresh.then_some(refresh));
        if let Some(g) = &smart {
            tokens.scope = Some(g.scopes.render());
            tokens.patient = g.patient;
        }
        Ok((tokens, session))
    }

    /// `grant_type=refresh_token`: rotates the refresh token; a spent one revokes the whole session.
    pub async fn refresh(&self, presented: &str) -> AppResult<(RefreshDecision, Option<(TokenResponse, Account)>)> {
        let now = self.clock.now();
        let hash = hex(&hash_refresh_token(presented));
        let policy = self.sessions;
        let (new_refresh, new_hash) = new_refresh_token();
        let outcome = self
            .db
            .run(move |c| {
                c.transaction(|c| {
                    // Spend first, compare-and-set: of concurrent refreshes with one token exactly one sees
                    // `affected == 1`; the others find it spent and are reuse. Writing first also takes SQLite's
                    // write lock at once (a read-then-write transaction fails with SQLITE_BUSY under contention
                    // instead of waiting), and on PostgreSQL the row lock makes the others wait for the winner.
                    let spent_now = diesel::update(
                        refresh_tokens::table
                            .filter(refresh_tokens::hash.eq(&hash))
                            .filter(refresh_tokens::spent_at.is_null()),
                    )
                    .set(refresh_tokens::spent_at.eq(Some(micros(now))))
                    .execute(c)?
                        == 1;
                    let token: Option<(String, String, Option<i64>)> = refresh_tokens::table
                        .filter(refresh_tokens::hash.eq(&hash))
                        .select((refresh_tokens::hash, refresh_tokens::session_id, refresh_tokens::spent_at))
                        .first(c)
                        .optional()?;
                    let Some((_, sid, spent)) = token else { return Ok((RefreshDecision::Reject, None)) };
                    // Spent by this call: decided as the unspent token it was.
                    let spent = if spent_now { None } else { spent.or(Some(micros(now))) };
                    let sid_uuid =
                        Uuid::parse_str(&sid).map_err(|e| AppError::internal_from("stored session id", e))?;
                    let session: Option<(String, String, i64, i64, Option<i64>)> = sessions::table
                        .filter(sessions::id.eq(&sid))
                        .select((
                            sessions::id,
                            sessions::account_id,
                            sessions::created_at,
                            sessions::last_seen,
                            sessions::revoked_at,
                        ))
                        .first(c)
                        .optional()?;
                    let smart: Option<SmartGrant> = sessions::table
                        .filter(sessions::id.eq(&sid))
                        .select((sessions::client_id, sessions::scope, sessions::launch_patient))
                        .first::<(Option<String>, Option<String>, Option<String>)>(c)
                        .optional()?
                        .and_then(SmartGrant::from_columns);
                    let account: Option<Account> = match &session {
                        Some((_, aid, ..)) => accounts::table
                            .filter(accounts::id.eq(aid))
                            .select(Account::as_select())
                            .first(c)
                            .optional()?,
                        None => None,
                    };
                    let record =
                        RefreshTokenRecord { hash: [0; 32], session_id: sid_uuid, spent_at: spent.map(from_micros) };
                    let srec = session.as_ref().map(|(_, aid, created, seen, revoked)| SessionRecord {
                        id: sid_uuid,
                        subject: aid.clone(),
                        created_at: from_micros(*created),
                        last_seen: from_micros(*seen),
                        revoked_at: revoked.map(from_micros),
                    });
                    let mut decision = policy.decide_refresh(Some(&record), srec.as_ref(), now);
                    if account.as_ref().is_none_or(|a| a.disabled) && decision == RefreshDecision::Rotate {
                        decision = RefreshDecision::Reject;
                    }
                    match decision {
                        RefreshDecision::Rotate => {
                            insert_refresh(c, &new_hash, sid_uuid, now)?;
                            diesel::update(sessions::table.filter(sessions::id.eq(&sid)))
                                .set(sessions::last_seen.eq(micros(now)))
                                .execute(c)?;
                            Ok((decision, account.map(|a| (a, sid_uuid, smart))))
                        }
                        RefreshDecision::Reuse => {
                            revoke_session_rows(c, &sid, now)?;
                            Ok((decision, account.map(|a| (a, sid_uuid, smart))))
                        }
                        RefreshDecision::Reject => {
                            if spent_now {
                                // Refused for another reason (session over): the token stays as it was.
                                diesel::update(refresh_tokens::table.filter(refresh_tokens::hash.eq(&hash)))
                                    .set(refresh_tokens::spent_at.eq(None::<i64>))
                                    .execute(c)?;
                            }
                            Ok((decision, None))
                        }
                    }
                })
            })
            .await?;
        match outcome {
            (RefreshDecision::Rotate, Some((account, sid, smart))) => {
                let mut principal = account.principal(Some(sid), &self.issuer)?;
                if let Some(g) = &smart {
                    g.apply(&mut principal);
                }
                let (access, expires_in) = self.issue(&principal, now)?;
                self.forget(sid);
                let tokens = TokenResponse {
                    scope: principal.scopes.as_ref().map(|s| s.render()),
                    patient: principal.context_patient,
                    ..TokenResponse::bearer(access, expires_in, Some(new_refresh))
                };
                Ok((RefreshDecision::Rotate, Some((tokens, account))))
            }
            (RefreshDecision::Reuse, found) => {
                if let Some((_, sid, _)) = &found {
                    self.forget(*sid);
                }
                Ok((RefreshDecision::Reuse, found.map(|(a, _, _)| (empty_tokens(), a))))
            }
            _ => Ok((RefreshDecision::Reject, None)),
        }
    }

    /// `grant_type=client_credentials`: service clients (accounts of kind `service`) get an access token only.
    /// Throttled like password logins (per client id and address, one verification in flight per client id).
    pub async fn client_credentials(
        &self,
        client_id: String,
        secret: SecretString,
        address: String,
    ) -> AppResult<ClientOutcome> {
        let now = self.clock.now();
        let keys = self.keyer.keys("client", &client_id, &address);
        let k = keys.clone();
        let reservation = match self.db.run(move |c| attempts::admit(c, &k, now)).await? {
            Admission::Proceed(r) => r,
            Admission::Throttled(retry_after) => {
                let account = self.find_by_name(&client_id, "service").await?;
                return Ok(ClientOutcome::Throttled { account, retry_after });
            }
        };
        let result = async {
            let account = self.find_by_name(&client_id, "service").await?;
            let phc = account.as_ref().and_then(|a| a.password_hash.clone());
            let (v, _) = self.verify(phc, secret).await?;
            Ok::<_, AppError>(account.filter(|a| v.ok && !a.disabled))
        }
        .await;
        let outcome = result.as_ref().ok().map(Option::is_some);
        let k = keys.clone();
        let finished = self.db.run(move |c| attempts::conclude(c, &k, &reservation, outcome, now)).await;
        let account = result?;
        finished?;
        match account {
            Some(a) => {
                let principal = a.principal(None, &self.issuer)?;
                let (access, expires_in) = self.issue(&principal, now)?;
                Ok(ClientOutcome::Ok(TokenResponse::bearer(access, expires_in, None), a))
            }
            None => Ok(ClientOutcome::Failed),
        }
    }

    /// Ends a session at once (logout, revocation, incident containment).
    pub async fn end_session(&self, session: Uuid) -> AppResult<()> {
        let now = self.clock.now();
        self.db.run(move |c| revoke_session_rows(c, &session.to_string(), now)).await?;
        self.forget(session);
        Ok(())
    }

    /// RFC 7009: a refresh token ends its session; an access token of ours ends its session too.
    /// Ends the session a refresh or access token belongs to; returns the session it ended (`None` for a token
    /// that is unknown, malformed or not ours, which changes nothing).
    pub async fn revoke_token(&self, token: &str) -> AppResult<Option<Uuid>> {
        let hash = hex(&hash_refresh_token(token));
        let sid: Option<String> = self
            .db
            .run(move |c| {
                Ok(refresh_tokens::table
                    .filter(refresh_tokens::hash.eq(&hash))
                    .select(refresh_tokens::session_id)
                    .first(c)
                    .optional()?)
            })
            .await?;
        let sid = match sid {
            Some(s) => Uuid::parse_str(&s).ok(),
            None => self.keys().verify(token, self.clock.now()).ok().and_then(|c| c.sid),
        };
        if let Some(sid) = sid {
            self.end_session(sid).await?;
        }
        Ok(sid)
    }

    fn forget(&self, session: Uuid) {
        self.cache.write().unwrap_or_else(PoisonError::into_inner).remove(&session);
    }

    /// Verifies a bearer token of ours and its session (live, not revoked, account enabled); touches idle time.
    /// A token whose `iss` is the configured OIDC provider is verified by [`OidcService::authenticate`] instead.
    pub async fn authenticate(&self, token: &str) -> AppResult<Principal> {
        self.verify_bearer(token, Touch::Yes).await
    }

    /// [`Self::authenticate`] without counting as activity: introspection by a resource server says whether a
    /// token is live, and must not keep an idle session alive.
    pub async fn inspect(&self, token: &str) -> AppResult<Principal> {
        self.verify_bearer(token, Touch::No).await
    }

    async fn verify_bearer(&self, token: &str, touch: Touch) -> AppResult<Principal> {
        if let Some(oidc) = &self.oidc
            && oidc.is_provider_token(token)
        {
            return oidc.authenticate(token).await;
        }
        let now = self.clock.now();
        let claims = match self.keys().verify(token, now) {
            Ok(c) => c,
            Err(_) => {
                // An unknown kid may be a key rotated in by another process: reload once, then decide.
                self.reload_keys().await?;
                self.keys().verify(token, now).map_err(|_| AppError::Unauthenticated)?
            }
        };
        let username = if let Some(sid) = claims.sid {
            Some(self.check_session(sid, now, touch).await?)
        } else if claims.client_id.is_some() {
            self.check_client(&claims.sub).await?;
            None
        } else {
            return Err(AppError::Unauthenticated);
        };
        let mut principal = claims.into_principal();
        principal.issuer = self.issuer.clone();
        principal.username = username.map(|u| u.to_string());
        Ok(principal)
    }

    async fn check_client(&self, account_id: &str) -> AppResult<()> {
        let id = account_id.to_owned();
        let disabled: Option<bool> = self
            .db
            .run(move |c| {
                Ok(accounts::table.filter(accounts::id.eq(&id)).select(accounts::disabled).first(c).optional()?)
            })
            .await?;
        if disabled == Some(false) { Ok(()) } else { Err(AppError::Unauthenticated) }
    }

    /// How many sessions the cache holds (for the bound's test).
    #[doc(hidden)]
    pub fn cached_sessions(&self) -> usize {
        self.cache.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether session `sid` is live at `now` (cached for [`SESSION_CACHE`]); its account's username when it is.
    async fn check_session(&self, sid: Uuid, now: OffsetDateTime, touch: Touch) -> AppResult<Arc<str>> {
        let cached = self.cache.read().unwrap_or_else(PoisonError::into_inner).get(&sid).cloned();
        if let Some(c) = cached
            && now - c.checked_at < SESSION_CACHE
            && now >= c.checked_at
            && (!c.live || now - c.last_seen < self.sessions.touch_every())
        {
            if !c.live || !self.sessions.is_live(c.created_at, c.last_seen, now) {
                return Err(AppError::Unauthenticated);
            }
            return Ok(c.username);
        }
        let policy = self.sessions;
        let id = sid.to_string();
        let state = self
            .db
            .run(move |c| {
                let row: Option<(i64, i64, Option<i64>, bool, String)> = sessions::table
                    .inner_join(accounts::table)
                    .filter(sessions::id.eq(&id))
                    .select((
                        sessions::created_at,
                        sessions::last_seen,
                        sessions::revoked_at,
                        accounts::disabled,
                        accounts::username,
                    ))
                    .first(c)
                    .optional()?;
                let Some((created, seen, revoked, disabled, username)) = row else { return Ok(None) };
                let (created, seen) = (from_micros(created), from_micros(seen));
                let live = revoked.is_none() && !disabled && policy.is_live(created, seen, now);
                let mut last_seen = seen;
                if live && touch == Touch::Yes && now - seen >= policy.touch_every() {
                    diesel::update(sessions::table.filter(sessions::id.eq(&id)))
                        .set(sessions::last_seen.eq(micros(now)))
                        .execute(c)?;
                    last_seen = now;
                }
                Ok(Some((live, created, last_seen, Arc::<str>::from(username))))
            })
            .await?;
        let (live, created_at, last_seen, username) = state.unwrap_or((false, now, now, Arc::from("")));
        let mut cache = self.cache.write().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= SESSION_CACHE_PRUNE_AT {
            cache.retain(|_, c| now >= c.checked_at && now - c.checked_at < SESSION_CACHE);
        }
        cache.insert(sid, CachedSession { live, created_at, last_seen, checked_at: now, username: username.clone() });
        drop(cache);
        if live { Ok(username) } else { Err(AppError::Unauthenticated) }
    }

    /// The account id behind a token that verifies but whose account is disabled (the monitor's
    /// `disabled-account-token` rule); `None` for any other token.
    pub async fn disabled_account_of(&self, token: &str) -> Option<String> {
        let claims = self.keys().verify(token, self.clock.now()).ok()?;
        let id = claims.sub;
        let q = id.clone();
        let disabled: Option<bool> = self
            .db
            .run(move |c| {
                Ok(accounts::table.filter(accounts::id.eq(&q)).select(accounts::disabled).first(c).optional()?)
            })
            .await
            .ok()?;
        (disabled == Some(true)).then_some(id)
    }
}

fn empty_tokens() -> TokenResponse {
    TokenResponse::bearer(String::new(), 0, None)
}

fn insert_refresh(c: &mut AnyConnection, hash: &[u8; 32], session: Uuid, now: OffsetDateTime) -> AppResult<()> {
    diesel::insert_into(refresh_tokens::table)
        .values((
            refresh_tokens::hash.eq(hex(hash)),
            refresh_tokens::session_id.eq(session.to_string()),
            refresh_tokens::created_at.eq(micros(now)),
        ))
        .execute(c)?;
    Ok(())
}

fn revoke_session_rows(c: &mut AnyConnection, sid: &str, now: OffsetDateTime) -> AppResult<()> {
    diesel::update(sessions::table.filter(sessions::id.eq(sid)).filter(sessions::revoked_at.is_null()))
        .set(sessions::revoked_at.eq(Some(micros(now))))
        .execute(c)?;
    diesel::update(
        refresh_tokens::table.filter(refresh_tokens::session_id.eq(sid)).filter(refresh_tokens::spent_at.is_null()),
    )
    .set(refresh_tokens::spent_at.eq(Some(micros(now))))
    .execute(c)?;
    Ok(())
}

/// Ends every session of an account (`incident contain`, `users disable`).
pub fn revoke_account_sessions(c: &mut AnyConnection, account_id: &str, now: OffsetDateTime) -> AppResult<usize> {
    let sids: Vec<String> = sessions::table
        .filter(sessions::account_id.eq(account_id))
        .filter(sessions::revoked_at.is_null())
        .select(sessions::id)
        .load(c)?;
    for sid in &sids {
        revoke_session_rows(c, sid, now)?;
    }
    Ok(sids.len())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn totp_key_id(account_id: &str) -> String {
    format!("carevault/totp/{account_id}")
}

/// Enrolls (or re-enrolls) TOTP for an account; returns the `otpauth://` URL to show the user once.
pub fn enroll_totp(
    c: &mut AnyConnection,
    provider: &dyn KeyProvider,
    username: &str,
    issuer: &str,
) -> AppResult<Option<String>> {
    let Some(account) = find_account(c, username)? else { return Ok(None) };
    let secret = zeroize::Zeroizing::new(super::totp::generate_secret());
    let wrapped = provider
        .wrap(&totp_key_id(&account.id), secret.as_slice())
        .map_err(|e| AppError::internal_from("cannot wrap a TOTP secret", e))?;
    diesel::update(accounts::table.filter(accounts::id.eq(&account.id)))
        .set((accounts::totp_secret.eq(Some(STANDARD.encode(wrapped))), accounts::totp_last_step.eq(None::<i64>)))
        .execute(c)?;
    Ok(Some(super::totp::otpauth_url(issuer, &account.username, secret.as_slice())))
}

/// A new account to create.
#[derive(Debug, Clone)]
pub struct NewAccount {
    pub username: String,
    pub kind: &'static str,
    pub role: Role,
    pub practitioner: Option<Uuid>,
    pub patient: Option<Uuid>,
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("the username must be 1 to 64 characters of letters, digits, '.', '_', '-' or '@'")]
    Username,
    #[error("role {0} needs --{1}")]
    MissingLink(Role, &'static str),
    #[error("--practitioner is only for clinician and nurse accounts, --patient only for patient accounts")]
    UnexpectedLink,
    #[error("an account with that username exists")]
    Exists,
    #[error("{0}")]
    Policy(&'static str),
    #[error("cannot hash the password")]
    Hash(#[source] AppError),
    #[error("cannot store the account")]
    Db(#[source] crate::store::StoreError),
}

/// Creates an account after checking the link rules and the password policy; returns its id.
pub fn create_account(
    c: &mut AnyConnection,
    new: &NewAccount,
    password: &SecretString,
    now: OffsetDateTime,
) -> Result<String, AccountError> {
    let valid_name = !new.username.is_empty()
        && new.username.len() <= 64
        && new.username.chars().all(|ch| ch.is_ascii_alphanumeric() || "._-@".contains(ch));
    if !valid_name {
        return Err(AccountError::Username);
    }
    match (new.role, new.practitioner, new.patient) {
        (Role::Clinician | Role::Nurse, None, _) => return Err(AccountError::MissingLink(new.role, "practitioner")),
        (Role::Patient, _, None) => return Err(AccountError::MissingLink(new.role, "patient")),
        (Role::Clinician | Role::Nurse, Some(_), Some(_)) => return Err(AccountError::UnexpectedLink),
        (Role::Patient, Some(_), _) => return Err(AccountError::UnexpectedLink),
        (r, p, q) if !r.is_care_provider() && r != Role::Patient && (p.is_some() || q.is_some()) => {
            return Err(AccountError::UnexpectedLink);
        }
        _ => {}
    }
    if new.kind == "user" {
        check_policy(password, &new.username).map_err(|v| AccountError::Policy(v.message()))?;
    }
    let hash = hash_password(password).map_err(AccountError::Hash)?;
    let id = Uuid::new_v4().to_string();
    let exists: i64 = accounts::table
        .filter(accounts::username.eq(&new.username))
        .count()
        .get_result(c)
        .map_err(|e| AccountError::Db(e.into()))?;
    if exists > 0 {
        return Err(AccountError::Exists);
    }
    diesel::insert_into(accounts::table)
        .values(Account {
            id: id.clone(),
            username: new.username.clone(),
            kind: new.kind.to_owned(),
            role: new.role.as_str().to_owned(),
            practitioner_id: new.practitioner.map(|p| p.to_string()),
            patient_id: new.patient.map(|p| p.to_string()),
            password_hash: Some(hash),
            totp_secret: None,
            disabled: false,
            created_at: micros(now),
        })
        .execute(c)
        .map_err(|e| AccountError::Db(e.into()))?;
    Ok(id)
}

pub fn find_account(c: &mut AnyConnection, username: &str) -> AppResult<Option<Account>> {
    Ok(accounts::table.filter(accounts::username.eq(username)).select(Account::as_select()).first(c).optional()?)
}

pub fn list_accounts(c: &mut AnyConnection) -> AppResult<Vec<Account>> {
    Ok(accounts::table.order(accounts::username).select(Account::as_select()).load(c)?)
}

/// Disables an account and ends its sessions at once.
pub fn disable_account(
    c: &mut AnyConnection,
    username: &str,
    now: OffsetDateTime,
) -> AppResult<Option<(Account, usize)>> {
    c.transaction(|c| {
        let Some(account) = find_account(c, username)? else { return Ok(None) };
        diesel::update(accounts::table.filter(accounts::id.eq(&account.id)))
            .set(accounts::disabled.eq(true))
            .execute(c)?;
        let n = revoke_account_sessions(c, &account.id, now)?;
        Ok(Some((account, n)))
    })
}
