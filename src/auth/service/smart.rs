//! SMART App Launch 2.0 on the auth service (CONTRACT §5b): registered apps, the authorization-code flow
//! (authorize → sign-in → consent → code → token, PKCE S256 for every client), backend services (RFC 7523
//! client assertions), client authentication for confidential apps, and token introspection (RFC 7662).
//!
//! Every handle a browser carries (flow, consent, code) is 256 random bits stored only as its SHA-256; each is
//! checked against the stage it belongs to and spent by compare-and-set, so a replayed code fails, and a code
//! used twice revokes the session the first use opened (RFC 6749 §4.1.2). The scopes a token carries are the
//! request ∩ the app's registration; the access decision then intersects them with the role's policy.

use super::*;
use crate::auth::scope::{Context, ScopeSet};
use crate::store::schema::{apps, client_assertions, smart_authorizations};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// How long an authorization may take from `/auth/authorize` to consent.
const FLOW_TTL: Duration = Duration::minutes(10);
/// How long an authorization code lives.
const CODE_TTL: Duration = Duration::seconds(60);
/// Longest lifetime of a backend client assertion (SMART Backend Services: at most 5 minutes).
const ASSERTION_MAX: Duration = Duration::minutes(5);

/// What kind of client an app is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppKind {
    /// A browser or native app: PKCE, no secret.
    Public,
    /// A server-side app with a secret (`client_secret_basic`).
    Confidential,
    /// A backend service: `client_credentials` with a signed JWT assertion (`private_key_jwt`), `system/` scopes.
    Backend,
}

impl AppKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AppKind::Public => "public",
            AppKind::Confidential => "confidential",
            AppKind::Backend => "backend",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [AppKind::Public, AppKind::Confidential, AppKind::Backend].into_iter().find(|k| k.as_str() == s)
    }
}

/// A registered app.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = apps)]
pub struct AppRow {
    client_id: String,
    name: String,
    kind: String,
    secret_hash: Option<String>,
    redirect_uris: String,
    scopes: String,
    jwks: Option<String>,
    jwks_url: Option<String>,
    account_id: Option<String>,
    created_at: i64,
    disabled: bool,
}

/// A registered app, as the CLI lists it (no secret).
#[derive(Debug, Clone, Serialize)]
pub struct App {
    pub client_id: String,
    pub name: String,
    pub kind: &'static str,
    pub redirect_uris: Vec<String>,
    pub scopes: String,
    pub jwks_url: Option<String>,
    pub has_jwks: bool,
    pub created_at: i64,
    pub disabled: bool,
}

impl AppRow {
    fn kind(&self) -> Option<AppKind> {
        AppKind::parse(&self.kind)
    }

    fn redirects(&self) -> Vec<String> {
        serde_json::from_str(&self.redirect_uris).unwrap_or_default()
    }

    fn public(&self) -> App {
        App {
            client_id: self.client_id.clone(),
            name: self.name.clone(),
            kind: self.kind().map_or("unknown", AppKind::as_str),
            redirect_uris: self.redirects(),
            scopes: self.scopes.clone(),
            jwks_url: self.jwks_url.clone(),
            has_jwks: self.jwks.is_some(),
            created_at: self.created_at,
            disabled: self.disabled,
        }
    }
}

/// What `carevault apps add` registers.
#[derive(Debug, Clone)]
pub struct NewApp {
    pub name: String,
    pub kind: AppKind,
    pub redirect_uris: Vec<String>,
    /// The scopes the app may ever be granted (space separated, SMART v1 or v2).
    pub scopes: String,
    /// Backend services: the JWKS document itself, or where to fetch it (https).
    pub jwks: Option<String>,
    pub jwks_url: Option<String>,
    /// Backend services: the role its service account acts in.
    pub role: Option<Role>,
}

/// A redirect URI an app may register: absolute https (or http on the loopback interface, for native apps and
/// development), no fragment, no user info.
fn valid_redirect(uri: &str) -> bool {
    let Ok(u) = url::Url::parse(uri) else { return false };
    let loopback = matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    uri.len() <= 512
        && u.fragment().is_none()
        && u.username().is_empty()
        && u.password().is_none()
        && (u.scheme() == "https" || (u.scheme() == "http" && loopback))
        && u.host_str().is_some()
}

/// A client secret: 256 random bits, base64url (shown once; stored as an argon2id hash).
pub fn new_client_secret() -> String {
    random_token()
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn sha256_hex(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

/// Registers an app; answers the app and, for a confidential app, its secret (256 random bits, shown once,
/// stored as an argon2id hash). A backend service gets a service account of its own (its role), named by its
/// client id, which can sign in only with a client assertion.
pub fn register_app(c: &mut AnyConnection, new: NewApp, now: OffsetDateTime) -> Result<(App, Option<String>), String> {
    let name = new.name.trim().to_owned();
    if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        return Err("the app name must be 1 to 100 printable characters".into());
    }
    let scopes = ScopeSet::parse(&new.scopes);
    if !scopes.has_resource_scopes() {
        return Err("--scopes must name at least one resource scope (e.g. patient/Patient.rs)".into());
    }
    let contexts: &[Context] = match new.kind {
        AppKind::Backend => &[Context::System],
        AppKind::Public | AppKind::Confidential => &[Context::Patient, Context::User],
    };
    if scopes.resources.iter().any(|r| !contexts.contains(&r.context)) {
        return Err(match new.kind {
            AppKind::Backend => "a backend service may hold system/ scopes only".into(),
            _ => "system/ scopes are for backend services (--kind backend)".into(),
        });
    }
    let client_id = format!("app-{}", Uuid::new_v4().simple());
    let mut secret = None;
    let mut account_id = None;
    match new.kind {
        AppKind::Public | AppKind::Confidential => {
            if new.redirect_uris.is_empty() || new.redirect_uris.len() > 10 {
                return Err("an app needs 1 to 10 --redirect-uri".into());
            }
            if let Some(bad) = new.redirect_uris.iter().position(|u| !valid_redirect(u)) {
                return Err(format!(
                    "redirect URI {} is not an absolute https URL (http only on 127.0.0.1/localhost), or has a \
                     fragment",
                    bad + 1
                ));
            }
            if new.jwks.is_some() || new.jwks_url.is_some() || new.role.is_some() {
                return Err("--jwks, --jwks-url and --role are for backend services".into());
            }
        }
        AppKind::Backend => {
            if !new.redirect_uris.is_empty() {
                return Err("a backend service has no redirect URIs".into());
            }
            match (&new.jwks, &new.jwks_url) {
                (Some(doc), None) => {
                    let set: jsonwebtoken::jwk::JwkSet =
                        serde_json::from_str(doc).map_err(|_| "the JWKS is not a valid JWK Set".to_owned())?;
                    if set.keys.is_empty() || set.keys.iter().any(|k| k.common.key_id.is_none()) {
                        return Err("every key of the JWKS needs a kid".into());
                    }
                }
                (None, Some(u)) => {
                    if !url::Url::parse(u).is_ok_and(|u| u.scheme() == "https") {
                        return Err("--jwks-url must be an https URL".into());
                    }
                }
                _ => return Err("a backend service needs exactly one of --jwks or --jwks-url".into()),
            }
            let role = new.role.ok_or("a backend service needs --role")?;
            if role.is_care_provider() || role == Role::Patient {
                return Err("a backend service cannot act as a person's role (clinician, nurse, patient)".into());
            }
            let throwaway = SecretString::from(random_token());
            let account =
                NewAccount { username: client_id.clone(), kind: "service", role, practitioner: None, patient: None };
            account_id = Some(create_account(c, &account, &throwaway, now).map_err(|e| e.to_string())?);
        }
    }
    let hash = if new.kind == AppKind::Confidential {
        let s = random_token();
        let h = hash_password(&SecretString::from(s.clone())).map_err(|_| "cannot hash the secret".to_owned())?;
        secret = Some(s);
        Some(h)
    } else {
        None
    };
    let row = (
        apps::client_id.eq(&client_id),
        apps::name.eq(&name),
        apps::kind.eq(new.kind.as_str()),
        apps::secret_hash.eq(hash),
        apps::redirect_uris.eq(serde_json::to_string(&new.redirect_uris).unwrap_or_else(|_| "[]".into())),
        apps::scopes.eq(scopes.render()),
        apps::jwks.eq(new.jwks.clone()),
        apps::jwks_url.eq(new.jwks_url.clone()),
        apps::account_id.eq(account_id),
        apps::created_at.eq(micros(now)),
        apps::disabled.eq(false),
    );
    diesel::insert_into(apps::table).values(row).execute(c).map_err(|_| "cannot store the app".to_owned())?;
    let stored = find_app(c, &client_id).map_err(|_| "cannot read the app back".to_owned())?;
    let app = stored.map(|a| a.public()).ok_or("cannot read the app back")?;
    Ok((app, secret))
}

fn find_app(c: &mut AnyConnection, client_id: &str) -> AppResult<Option<AppRow>> {
    Ok(apps::table
        .filter(apps::client_id.eq(client_id))
        .filter(apps::disabled.eq(false))
        .select(AppRow::as_select())
        .first(c)
        .optional()?)
}

pub fn list_apps(c: &mut AnyConnection) -> AppResult<Vec<App>> {
    let rows: Vec<AppRow> = apps::table.order(apps::created_at.asc()).select(AppRow::as_select()).load(c)?;
    Ok(rows.iter().map(AppRow::public).collect())
}

/// Removes an app: its row, every session it opened (ended at once), and a backend service's account
/// (disabled). Answers the number of sessions ended and the disabled account, or `None` for an unknown app.
pub fn remove_app(
    c: &mut AnyConnection,
    client_id: &str,
    now: OffsetDateTime,
) -> AppResult<Option<(usize, Option<super::Account>)>> {
    c.transaction(|c| {
        let Some(app) =
            apps::table.filter(apps::client_id.eq(client_id)).select(AppRow::as_select()).first(c).optional()?
        else {
            return Ok(None);
        };
        let sids: Vec<String> = sessions::table
            .filter(sessions::client_id.eq(client_id))
            .filter(sessions::revoked_at.is_null())
            .select(sessions::id)
            .load(c)?;
        for sid in &sids {
            revoke_session_rows(c, sid, now)?;
        }
        let mut account = None;
        if let Some(aid) = &app.account_id {
            diesel::update(accounts::table.filter(accounts::id.eq(aid))).set(accounts::disabled.eq(true)).execute(c)?;
            account =
                accounts::table.filter(accounts::id.eq(aid)).select(super::Account::as_select()).first(c).optional()?;
        }
        diesel::delete(smart_authorizations::table.filter(smart_authorizations::client_id.eq(client_id))).execute(c)?;
        diesel::delete(apps::table.filter(apps::client_id.eq(client_id))).execute(c)?;
        Ok(Some((sids.len(), account)))
    })
}

/// What a SMART app was granted: stored with the session, applied to every token it issues.
#[derive(Debug, Clone)]
pub struct SmartGrant {
    pub client_id: String,
    pub scopes: ScopeSet,
    pub patient: Option<Uuid>,
}

impl SmartGrant {
    pub(crate) fn apply(&self, p: &mut Principal) {
        p.client_id = Some(self.client_id.clone());
        p.scopes = Some(Arc::new(self.scopes.clone()));
        p.context_patient = self.patient;
    }

    pub(super) fn from_columns(cols: (Option<String>, Option<String>, Option<String>)) -> Option<Self> {
        let (client, scope, patient) = cols;
        Some(SmartGrant {
            client_id: client?,
            scopes: ScopeSet::parse(&scope?),
            patient: patient.and_then(|p| Uuid::parse_str(&p).ok()),
        })
    }
}

/// The query of `GET /auth/authorize` (RFC 6749 §4.1.1, PKCE RFC 7636, SMART `aud`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct AuthorizeRequest {
    pub response_type: Option<String>,
    pub client_id: Option<String>,
    pub redirect_uri: Option<String>,
    pub scope: Option<String>,
    pub state: Option<String>,
    pub nonce: Option<String>,
    pub aud: Option<String>,
    pub code_challenge: Option<String>,
    pub code_challenge_method: Option<String>,
    pub launch: Option<String>,
}

/// What `/auth/authorize` answers.
#[derive(Debug)]
pub enum AuthorizeStart {
    /// Show the sign-in page of this flow.
    SignIn { flow: String, app_name: String },
    /// Back to the app with an error (its redirect URI was verified first).
    Redirect(String),
    /// An unknown client or an unregistered redirect URI: a page, never a redirect (RFC 6749 §4.1.2.1).
    Refuse,
}

/// What the sign-in stage of a flow came to.
#[derive(Debug)]
pub enum FlowSignIn {
    Consent(FlowConsent),
    /// Wrong credentials (or a disabled account, or a missing second factor): one generic message.
    Failed {
        account: Option<Account>,
    },
    Throttled {
        account: Option<Account>,
        retry_after: Duration,
    },
    /// Unknown, expired or already used flow.
    Expired,
}

/// The consent page's facts.
#[derive(Debug)]
pub struct FlowConsent {
    pub flow: String,
    pub consent: String,
    pub app_name: String,
    pub scopes: ScopeSet,
    pub account: Account,
    /// The user must pick the patient (a `launch/patient` request by someone who is not a patient).
    pub needs_patient: bool,
}

/// What the token endpoint's code exchange came to.
#[derive(Debug)]
pub enum CodeExchange {
    Ok {
        tokens: Box<TokenResponse>,
        account: Box<Account>,
        client_id: String,
    },
    /// An RFC 6749 error code (`invalid_grant`, `invalid_client`, `invalid_request`).
    Refused(&'static str),
}

/// `smart_authorizations.session_id` of a code presented again before its first exchange recorded a session.
const REPLAYED: &str = "replayed";

fn with_query(uri: &str, pairs: &[(&str, &str)]) -> String {
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}{}", serde_urlencoded::to_string(pairs).unwrap_or_default())
}

type FlowRow =
    (String, String, String, String, Option<String>, Option<String>, Option<String>, Option<String>, i64, Option<i64>);

impl AuthService {
    async fn app(&self, client_id: &str) -> AppResult<Option<AppRow>> {
        let id = client_id.to_owned();
        self.db.run(move |c| find_app(c, &id)).await
    }

    /// `GET /auth/authorize`: checks the client and redirect URI (else [`AuthorizeStart::Refuse`]), then the
    /// request (errors go back to the app), and opens a flow for the sign-in page.
    pub async fn begin_authorization(&self, r: AuthorizeRequest, fhir_base: &str) -> AppResult<AuthorizeStart> {
        let now = self.clock.now();
        let Some(client_id) = r.client_id.as_deref().filter(|c| c.len() <= 64) else {
            return Ok(AuthorizeStart::Refuse);
        };
        let Some(app) = self.app(client_id).await? else { return Ok(AuthorizeStart::Refuse) };
        let Some(redirect) = r.redirect_uri.as_deref().filter(|u| app.redirects().iter().any(|x| x == u)) else {
            return Ok(AuthorizeStart::Refuse);
        };
        if !matches!(app.kind(), Some(AppKind::Public | AppKind::Confidential)) {
            return Ok(AuthorizeStart::Refuse);
        }
        let state = r.state.clone().unwrap_or_default();
        let fail =
            |code: &str| Ok(AuthorizeStart::Redirect(with_query(redirect, &[("error", code), ("state", &state)])));
        if r.response_type.as_deref() != Some("code") {
            return fail("unsupported_response_type");
        }
        if state.is_empty() || state.len() > 512 || r.nonce.as_ref().is_some_and(|n| n.len() > 256) {
            return fail("invalid_request");
        }
        let challenge_ok = r.code_challenge.as_deref().is_some_and(|c| {
            (43..=128).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
        if r.code_challenge_method.as_deref() != Some("S256") || !challenge_ok {
            return fail("invalid_request");
        }
        if r.aud.as_deref().map(|a| a.trim_end_matches('/')) != Some(fhir_base.trim_end_matches('/')) {
            return fail("invalid_request");
        }
        if r.launch.is_some() {
            // EHR launch needs an EHR to launch from; this server offers standalone launch.
            return fail("invalid_request");
        }
        let requested = ScopeSet::parse(r.scope.as_deref().unwrap_or(""));
        let granted = requested.within(&ScopeSet::parse(&app.scopes)).only(&[Context::Patient, Context::User]);
        if !granted.has_resource_scopes() {
            return fail("invalid_scope");
        }
        let flow = random_token();
        let row = (
            smart_authorizations::flow_hash.eq(sha256_hex(&flow)),
            smart_authorizations::client_id.eq(app.client_id.clone()),
            smart_authorizations::redirect_uri.eq(redirect.to_owned()),
            smart_authorizations::scope.eq(granted.render()),
            smart_authorizations::state.eq(state.clone()),
            smart_authorizations::nonce.eq(r.nonce.clone()),
            smart_authorizations::code_challenge.eq(r.code_challenge.clone().unwrap_or_default()),
            smart_authorizations::created_at.eq(micros(now)),
            smart_authorizations::expires_at.eq(micros(now + FLOW_TTL)),
        );
        self.db
            .run(move |c| {
                diesel::delete(smart_authorizations::table.filter(smart_authorizations::expires_at.lt(micros(now))))
                    .execute(c)?;
                diesel::insert_into(smart_authorizations::table).values(row).execute(c)?;
                Ok(())
            })
            .await?;
        Ok(AuthorizeStart::SignIn { flow, app_name: app.name })
    }

    async fn flow_row(&self, flow: &str) -> AppResult<Option<FlowRow>> {
        let hash = sha256_hex(flow);
        self.db
            .run(move |c| {
                Ok(smart_authorizations::table
                    .filter(smart_authorizations::flow_hash.eq(&hash))
                    .select((
                        smart_authorizations::client_id,
                        smart_authorizations::redirect_uri,
                        smart_authorizations::scope,
                        smart_authorizations::state,
                        smart_authorizations::account_id,
                        smart_authorizations::consent_hash,
                        smart_authorizations::code_hash,
                        smart_authorizations::patient_id,
                        smart_authorizations::expires_at,
                        smart_authorizations::used_at,
                    ))
                    .first(c)
                    .optional()?)
            })
            .await
    }

    /// The app name of a live flow (to show the sign-in page again after a failure).
    pub async fn flow_app_name(&self, flow: &str) -> AppResult<Option<String>> {
        let now = micros(self.clock.now());
        let Some(row) = self.flow_row(flow).await? else { return Ok(None) };
        if row.8 <= now || row.4.is_some() {
            return Ok(None);
        }
        Ok(self.app(&row.0).await?.map(|a| a.name))
    }

    /// The sign-in stage: the local login rules (throttling, TOTP) without a session; on success the flow is
    /// bound to the account and a consent token issued to this browser only.
    pub async fn flow_sign_in(
        &self,
        flow: &str,
        username: String,
        password: SecretString,
        totp: Option<String>,
        address: String,
    ) -> AppResult<FlowSignIn> {
        let now = self.clock.now();
        let Some(row) = self.flow_row(flow).await? else { return Ok(FlowSignIn::Expired) };
        if row.8 <= micros(now) || row.4.is_some() {
            return Ok(FlowSignIn::Expired);
        }
        let account = match self.sign_in(username, password, totp, address).await? {
            LoginOutcome::Ok { account, .. } => account,
            LoginOutcome::Failed { account, .. } => return Ok(FlowSignIn::Failed { account }),
            LoginOutcome::Throttled { account, retry_after } => {
                return Ok(FlowSignIn::Throttled { account, retry_after });
            }
        };
        self.bind_flow(flow, account).await
    }

    /// Binds a live, unbound flow to the account that signed in (locally or at the OIDC provider) and issues
    /// the consent token; [`FlowSignIn::Expired`] when the flow is unknown, expired or already bound.
    pub async fn bind_flow(&self, flow: &str, account: Account) -> AppResult<FlowSignIn> {
        let now = self.clock.now();
        let Some(row) = self.flow_row(flow).await? else { return Ok(FlowSignIn::Expired) };
        if row.8 <= micros(now) || row.4.is_some() || account.disabled {
            return Ok(FlowSignIn::Expired);
        }
        let Some(app) = self.app(&row.0).await? else { return Ok(FlowSignIn::Expired) };
        let consent = random_token();
        let (hash, chash, aid) = (sha256_hex(flow), sha256_hex(&consent), account.id.clone());
        let bound = self
            .db
            .run(move |c| {
                Ok(diesel::update(
                    smart_authorizations::table
                        .filter(smart_authorizations::flow_hash.eq(&hash))
                        .filter(smart_authorizations::account_id.is_null()),
                )
                .set((
                    smart_authorizations::account_id.eq(Some(aid)),
                    smart_authorizations::consent_hash.eq(Some(chash)),
                ))
                .execute(c)?)
            })
            .await?;
        if bound != 1 {
            return Ok(FlowSignIn::Expired);
        }
        let scopes = ScopeSet::parse(&row.2);
        let needs_patient = scopes.launch_patient && account.role() != Some(Role::Patient);
        Ok(FlowSignIn::Consent(FlowConsent {
            flow: flow.to_owned(),
            consent,
            app_name: app.name,
            scopes,
            account,
            needs_patient,
        }))
    }

    /// The account a signed-in flow belongs to, when `consent` is its consent token (the consent page's
    /// handler checks the chosen patient as this user before [`AuthService::flow_consent`]).
    pub async fn flow_account(&self, flow: &str, consent: &str) -> AppResult<Option<(Account, Principal, ScopeSet)>> {
        let now = micros(self.clock.now());
        let Some(row) = self.flow_row(flow).await? else { return Ok(None) };
        if row.8 <= now || row.6.is_some() || row.9.is_some() || row.5.as_deref() != Some(sha256_hex(consent).as_str())
        {
            return Ok(None);
        }
        let Some(aid) = row.4 else { return Ok(None) };
        let account: Option<Account> = self
            .db
            .run(move |c| {
                Ok(accounts::table.filter(accounts::id.eq(&aid)).select(Account::as_select()).first(c).optional()?)
            })
            .await?;
        let Some(account) = account.filter(|a| !a.disabled) else { return Ok(None) };
        let principal = account.principal(None, &self.issuer)?;
        Ok(Some((account, principal, ScopeSet::parse(&row.2))))
    }

    /// The consent stage: approve (a code, 60 seconds, single use) or deny; answers where to send the browser,
    /// or `None` when the flow is not this consent's (expired, used, wrong token).
    pub async fn flow_consent(
        &self,
        flow: &str,
        consent: &str,
        approve: bool,
        patient: Option<Uuid>,
    ) -> AppResult<Option<String>> {
        let now = self.clock.now();
        let Some((account, _, scopes)) = self.flow_account(flow, consent).await? else { return Ok(None) };
        let Some(row) = self.flow_row(flow).await? else { return Ok(None) };
        let (redirect, state) = (row.1.clone(), row.3.clone());
        let hash = sha256_hex(flow);
        if !approve {
            self.db
                .run(move |c| {
                    diesel::update(smart_authorizations::table.filter(smart_authorizations::flow_hash.eq(&hash)))
                        .set(smart_authorizations::used_at.eq(Some(micros(now))))
                        .execute(c)?;
                    Ok(())
                })
                .await?;
            return Ok(Some(with_query(&redirect, &[("error", "access_denied"), ("state", &state)])));
        }
        let context = if account.role() == Some(Role::Patient) {
            account.patient_id.as_deref().and_then(|p| Uuid::parse_str(p).ok())
        } else {
            patient
        };
        if scopes.launch_patient && context.is_none() {
            return Ok(None);
        }
        let code = random_token();
        let code_hash = sha256_hex(&code);
        let ctx = context.map(|p| p.to_string());
        let set = self
            .db
            .run(move |c| {
                Ok(diesel::update(
                    smart_authorizations::table
                        .filter(smart_authorizations::flow_hash.eq(&hash))
                        .filter(smart_authorizations::code_hash.is_null())
                        .filter(smart_authorizations::used_at.is_null()),
                )
                .set((
                    smart_authorizations::code_hash.eq(Some(code_hash)),
                    smart_authorizations::patient_id.eq(ctx),
                    smart_authorizations::expires_at.eq(micros(now + CODE_TTL)),
                ))
                .execute(c)?)
            })
            .await?;
        if set != 1 {
            return Ok(None);
        }
        Ok(Some(with_query(&redirect, &[("code", &code), ("state", &state)])))
    }

    /// `grant_type=authorization_code`: the code (once, unexpired), the same redirect URI, the PKCE verifier,
    /// and the client (a confidential app authenticates; a public app names itself).
    #[allow(clippy::too_many_arguments)]
    pub async fn exchange_code(
        &self,
        code: &str,
        redirect_uri: Option<&str>,
        verifier: Option<&str>,
        client_id: Option<&str>,
        client_secret: Option<SecretString>,
        address: String,
        fhir_base: &str,
    ) -> AppResult<CodeExchange> {
        let now = self.clock.now();
        let code_hash = sha256_hex(code);
        let ch = code_hash.clone();
        type CodeRow =
            (String, String, String, Option<String>, String, Option<String>, Option<String>, i64, Option<i64>);
        let row: Option<CodeRow> = self
            .db
            .run(move |c| {
                Ok(smart_authorizations::table
                    .filter(smart_authorizations::code_hash.eq(Some(ch)))
                    .select((
                        smart_authorizations::client_id,
                        smart_authorizations::redirect_uri,
                        smart_authorizations::scope,
                        smart_authorizations::account_id,
                        smart_authorizations::code_challenge,
                        smart_authorizations::patient_id,
                        smart_authorizations::nonce,
                        smart_authorizations::expires_at,
                        smart_authorizations::used_at,
                    ))
                    .first(c)
                    .optional()?)
            })
            .await?;
        let Some((app_id, redirect, scope, account_id, challenge, patient, nonce, expires, used)) = row else {
            return Ok(CodeExchange::Refused("invalid_grant"));
        };
        if used.is_some() {
            return self.code_replayed(code_hash).await;
        }
        let Some(app) = self.app(&app_id).await? else { return Ok(CodeExchange::Refused("invalid_client")) };
        if client_id.is_some_and(|c| c != app.client_id) {
            return Ok(CodeExchange::Refused("invalid_client"));
        }
        match app.kind() {
            Some(AppKind::Public) if client_id.is_some() => {}
            Some(AppKind::Confidential) => {
                let Some(secret) = client_secret else { return Ok(CodeExchange::Refused("invalid_client")) };
                if !matches!(self.verify_client(app.client_id.clone(), secret, address).await?, ClientCheck::Ok) {
                    return Ok(CodeExchange::Refused("invalid_client"));
                }
            }
            _ => return Ok(CodeExchange::Refused("invalid_client")),
        }
        // Spend the code before anything else can use it.
        let ch = code_hash.clone();
        let spent = self
            .db
            .run(move |c| {
                Ok(diesel::update(
                    smart_authorizations::table
                        .filter(smart_authorizations::code_hash.eq(Some(ch)))
                        .filter(smart_authorizations::used_at.is_null()),
                )
                .set(smart_authorizations::used_at.eq(Some(micros(now))))
                .execute(c)?)
            })
            .await?;
        if spent != 1 {
            // A concurrent exchange of the same code spent it first.
            return self.code_replayed(code_hash).await;
        }
        if expires <= micros(now) || redirect_uri != Some(redirect.as_str()) {
            return Ok(CodeExchange::Refused("invalid_grant"));
        }
        let pkce_ok = verifier.is_some_and(|v| {
            (43..=128).contains(&v.len()) && URL_SAFE_NO_PAD.encode(Sha256::digest(v.as_bytes())) == challenge
        });
        if !pkce_ok {
            return Ok(CodeExchange::Refused("invalid_grant"));
        }
        let Some(aid) = account_id else { return Ok(CodeExchange::Refused("invalid_grant")) };
        let account: Option<Account> = self
            .db
            .run(move |c| {
                Ok(accounts::table.filter(accounts::id.eq(&aid)).select(Account::as_select()).first(c).optional()?)
            })
            .await?;
        let Some(account) = account.filter(|a| !a.disabled) else { return Ok(CodeExchange::Refused("invalid_grant")) };
        let scopes = ScopeSet::parse(&scope);
        let grant = SmartGrant {
            client_id: app.client_id.clone(),
            scopes: scopes.clone(),
            patient: patient.and_then(|p| Uuid::parse_str(&p).ok()),
        };
        let (mut tokens, sid) = self.open_session_for(&account, Some(grant), now).await?;
        let ch = code_hash;
        let recorded = self
            .db
            .run(move |c| {
                Ok(diesel::update(
                    smart_authorizations::table
                        .filter(smart_authorizations::code_hash.eq(Some(ch)))
                        .filter(smart_authorizations::session_id.is_null()),
                )
                .set(smart_authorizations::session_id.eq(Some(sid.to_string())))
                .execute(c)?)
            })
            .await?;
        if recorded != 1 {
            // The code was presented again while this exchange ran: its tokens never leave.
            self.end_session(sid).await?;
            return Ok(CodeExchange::Refused("invalid_grant"));
        }
        if scopes.openid {
            let fhir_user = match (&account.practitioner_id, &account.patient_id) {
                (Some(p), _) => Some(format!("{fhir_base}/Practitioner/{p}")),
                (None, Some(p)) => Some(format!("{fhir_base}/Patient/{p}")),
                _ => None,
            };
            let mut claims = serde_json::json!({
                "iss": self.issuer,
                "sub": account.id,
                "aud": app.client_id,
                "iat": now.unix_timestamp(),
                "exp": (now + self.ttl).unix_timestamp(),
                "auth_time": now.unix_timestamp(),
            });
            if let Some(n) = nonce {
                claims["nonce"] = serde_json::Value::String(n);
            }
            if scopes.fhir_user
                && let Some(u) = fhir_user
            {
                claims["fhirUser"] = serde_json::Value::String(u);
            }
            if scopes.profile {
                claims["preferred_username"] = serde_json::Value::String(account.username.clone());
            }
            tokens.id_token = Some(self.keys().sign_id_token(&claims)?);
        }
        Ok(CodeExchange::Ok { tokens: Box::new(tokens), account: Box::new(account), client_id: app.client_id })
    }

    /// A spent code presented again: the tokens its first use issued are revoked (RFC 6749 §4.1.2). Atomic
    /// against the first exchange still running: either this marks the code replayed before that exchange
    /// records its session (which then ends its own session), or it finds the session and ends it.
    async fn code_replayed(&self, code_hash: String) -> AppResult<CodeExchange> {
        let session: Option<String> = self
            .db
            .run(move |c| {
                let marked = diesel::update(
                    smart_authorizations::table
                        .filter(smart_authorizations::code_hash.eq(Some(&code_hash)))
                        .filter(smart_authorizations::session_id.is_null()),
                )
                .set(smart_authorizations::session_id.eq(Some(REPLAYED)))
                .execute(c)?;
                if marked == 1 {
                    return Ok(None);
                }
                Ok(smart_authorizations::table
                    .filter(smart_authorizations::code_hash.eq(Some(&code_hash)))
                    .select(smart_authorizations::session_id)
                    .first::<Option<String>>(c)
                    .optional()?
                    .flatten())
            })
            .await?;
        if let Some(sid) = session.and_then(|s| Uuid::parse_str(&s).ok()) {
            self.end_session(sid).await?;
        }
        Ok(CodeExchange::Refused("invalid_grant"))
    }

    /// Client authentication by secret (confidential apps, then service accounts), throttled per client id and
    /// address like password logins (one verification in flight per client id).
    pub async fn verify_client(
        &self,
        client_id: String,
        secret: SecretString,
        address: String,
    ) -> AppResult<ClientCheck> {
        let now = self.clock.now();
        let keys = self.keyer.keys("client", &client_id, &address);
        let k = keys.clone();
        let reservation = match self.db.run(move |c| attempts::admit(c, &k, now)).await? {
            Admission::Proceed(r) => r,
            Admission::Throttled(retry_after) => return Ok(ClientCheck::Throttled(retry_after)),
        };
        let result = async {
            let phc = match self.app(&client_id).await? {
                Some(app) if app.kind() == Some(AppKind::Confidential) => app.secret_hash,
                Some(_) => None,
                None => self
                    .find_by_name(&client_id, "service")
                    .await?
                    .filter(|a| !a.disabled)
                    .and_then(|a| a.password_hash),
            };
            let (v, _) = self.verify(phc, secret).await?;
            Ok::<_, AppError>(v.ok)
        }
        .await;
        let outcome = result.as_ref().ok().copied();
        let finished = self.db.run(move |c| attempts::conclude(c, &keys, &reservation, outcome, now)).await;
        let ok = result?;
        finished?;
        Ok(if ok { ClientCheck::Ok } else { ClientCheck::Failed })
    }

    /// SMART Backend Services: `client_credentials` with a client assertion (RFC 7523) signed by a key of the
    /// app's JWKS (RS384 or ES384), `iss` = `sub` = the client id, `aud` = the token endpoint, at most five
    /// minutes, its `jti` never seen before. The token carries the requested `system/` scopes ∩ the app's.
    pub async fn backend_token(
        &self,
        assertion: &str,
        scope: Option<&str>,
        token_url: &str,
        address: String,
    ) -> AppResult<BackendOutcome> {
        let now = self.clock.now();
        #[derive(serde::Deserialize)]
        struct Peek {
            iss: String,
        }
        let Ok(peek) = jsonwebtoken::dangerous::insecure_decode::<Peek>(assertion) else {
            return Ok(BackendOutcome::Failed(None));
        };
        let client_id = peek.claims.iss;
        if client_id.len() > 64 {
            return Ok(BackendOutcome::Failed(None));
        }
        let keys = self.keyer.keys("client", &client_id, &address);
        let k = keys.clone();
        let reservation = match self.db.run(move |c| attempts::admit(c, &k, now)).await? {
            Admission::Proceed(r) => r,
            Admission::Throttled(retry_after) => return Ok(BackendOutcome::Throttled(retry_after)),
        };
        let result = self.check_assertion(assertion, &client_id, token_url, now).await;
        let outcome = result.as_ref().ok().map(Option::is_some);
        let finished = self.db.run(move |c| attempts::conclude(c, &keys, &reservation, outcome, now)).await;
        let checked = result?;
        finished?;
        let Some((app, account)) = checked else { return Ok(BackendOutcome::Failed(Some(client_id))) };
        let granted =
            ScopeSet::parse(scope.unwrap_or("")).within(&ScopeSet::parse(&app.scopes)).only(&[Context::System]);
        if !granted.has_resource_scopes() {
            return Ok(BackendOutcome::InvalidScope);
        }
        let mut principal = account.principal(None, &self.issuer)?;
        SmartGrant { client_id: app.client_id.clone(), scopes: granted.clone(), patient: None }.apply(&mut principal);
        let (access, expires_in) = self.issue(&principal, now)?;
        let tokens = TokenResponse { scope: Some(granted.render()), ..TokenResponse::bearer(access, expires_in, None) };
        Ok(BackendOutcome::Ok(Box::new((tokens, account))))
    }

    async fn check_assertion(
        &self,
        assertion: &str,
        client_id: &str,
        token_url: &str,
        now: OffsetDateTime,
    ) -> AppResult<Option<(AppRow, Account)>> {
        let Some(app) = self.app(client_id).await?.filter(|a| a.kind() == Some(AppKind::Backend)) else {
            return Ok(None);
        };
        let Ok(header) = jsonwebtoken::decode_header(assertion) else { return Ok(None) };
        if !matches!(header.alg, jsonwebtoken::Algorithm::RS384 | jsonwebtoken::Algorithm::ES384) {
            return Ok(None);
        }
        let Some(kid) = header.kid else { return Ok(None) };
        let set = match (&app.jwks, &app.jwks_url) {
            (Some(doc), _) => serde_json::from_str::<jsonwebtoken::jwk::JwkSet>(doc).ok(),
            (None, Some(url)) => self.fetch_jwks(url).await,
            _ => None,
        };
        let Some(jwk) = set.as_ref().and_then(|s| s.find(&kid)) else { return Ok(None) };
        let Ok(key) = jsonwebtoken::DecodingKey::from_jwk(jwk) else { return Ok(None) };
        let mut v = jsonwebtoken::Validation::new(header.alg);
        v.validate_exp = false;
        v.validate_nbf = false;
        v.validate_aud = false;
        v.required_spec_claims = ["iss", "sub", "aud", "exp", "jti"].into_iter().map(String::from).collect();
        #[derive(serde::Deserialize)]
        struct Assertion {
            iss: String,
            sub: String,
            aud: serde_json::Value,
            exp: i64,
            jti: String,
        }
        let Ok(data) = jsonwebtoken::decode::<Assertion>(assertion, &key, &v) else { return Ok(None) };
        let a = data.claims;
        let aud_ok = match &a.aud {
            serde_json::Value::String(s) => s == token_url,
            serde_json::Value::Array(xs) => xs.iter().any(|x| x.as_str() == Some(token_url)),
            _ => false,
        };
        let t = now.unix_timestamp();
        let leeway = super::super::token::LEEWAY.whole_seconds();
        if a.iss != client_id
            || a.sub != client_id
            || !aud_ok
            || a.exp <= t - leeway
            || a.exp > t + ASSERTION_MAX.whole_seconds() + leeway
            || a.jti.is_empty()
            || a.jti.len() > 256
        {
            return Ok(None);
        }
        // The jti is spent: a replay within its lifetime fails on the primary key.
        let jti_hash = sha256_hex(&format!("{client_id}\n{}", a.jti));
        let exp = micros(OffsetDateTime::from_unix_timestamp(a.exp).unwrap_or(now));
        let fresh = self
            .db
            .run(move |c| {
                diesel::delete(client_assertions::table.filter(client_assertions::expires_at.lt(micros(now))))
                    .execute(c)?;
                let inserted = diesel::insert_into(client_assertions::table)
                    .values((client_assertions::jti_hash.eq(&jti_hash), client_assertions::expires_at.eq(exp)))
                    .execute(c);
                match inserted {
                    Ok(_) => Ok(true),
                    Err(diesel::result::Error::DatabaseError(
                        diesel::result::DatabaseErrorKind::UniqueViolation,
                        _,
                    )) => Ok(false),
                    Err(e) => Err(e.into()),
                }
            })
            .await?;
        if !fresh {
            return Ok(None);
        }
        let Some(aid) = app.account_id.clone() else { return Ok(None) };
        let account: Option<Account> = self
            .db
            .run(move |c| {
                Ok(accounts::table.filter(accounts::id.eq(&aid)).select(Account::as_select()).first(c).optional()?)
            })
            .await?;
        Ok(account.filter(|a| !a.disabled).map(|a| (app, a)))
    }

    /// A backend service's JWKS from its registered https URL (5 s, 64 KiB at most); `None` on any failure.
    async fn fetch_jwks(&self, url: &str) -> Option<jsonwebtoken::jwk::JwkSet> {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .https_only(true)
            .build()
            .ok()?;
        let resp = client.get(url).send().await.ok()?.error_for_status().ok()?;
        if resp.content_length().is_some_and(|n| n > 65_536) {
            return None;
        }
        let body = resp.bytes().await.ok()?;
        if body.len() > 65_536 {
            return None;
        }
        serde_json::from_slice(&body).ok()
    }

    /// RFC 7662: whether `token` is an access token of ours that is live now (signature, expiry, session not
    /// ended, account enabled), and its facts. Anything else is `{"active": false}`.
    pub async fn introspect(&self, token: &str, fhir_base: &str) -> serde_json::Value {
        let inactive = serde_json::json!({ "active": false });
        let now = self.clock.now();
        let Ok(claims) = self.keys().verify(token, now) else { return inactive };
        let Ok(principal) = self.inspect(token).await else { return inactive };
        let mut out = serde_json::json!({
            "active": true,
            "token_type": "Bearer",
            "iss": claims.iss,
            "aud": claims.aud,
            "sub": claims.sub,
            "exp": claims.exp,
            "iat": claims.iat,
            "roles": principal.roles,
        });
        if let Some(s) = &claims.scope {
            out["scope"] = serde_json::Value::String(s.clone());
        }
        if let Some(c) = &claims.client_id {
            out["client_id"] = serde_json::Value::String(c.clone());
        }
        if let Some(p) = claims.launch_patient {
            out["patient"] = serde_json::Value::String(p.to_string());
        }
        match (principal.practitioner, principal.patient) {
            (Some(p), _) => out["fhirUser"] = serde_json::Value::String(format!("{fhir_base}/Practitioner/{p}")),
            (None, Some(p)) => out["fhirUser"] = serde_json::Value::String(format!("{fhir_base}/Patient/{p}")),
            _ => {}
        }
        out
    }
}

/// What a client authentication by secret came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCheck {
    Ok,
    Failed,
    Throttled(Duration),
}

/// What a backend-services token request came to.
#[derive(Debug)]
pub enum BackendOutcome {
    Ok(Box<(TokenResponse, Account)>),
    /// The assertion failed; the client id it named, when it named one.
    Failed(Option<String>),
    Throttled(Duration),
    InvalidScope,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_uris() {
        assert!(valid_redirect("https://app.example/callback"));
        assert!(valid_redirect("http://127.0.0.1:8123/index.html"));
        assert!(valid_redirect("http://localhost/cb?x=1"));
        assert!(!valid_redirect("http://app.example/callback"), "plain http off loopback");
        assert!(!valid_redirect("https://app.example/cb#frag"));
        assert!(!valid_redirect("https://user:pw@app.example/cb"));
        assert!(!valid_redirect("/relative"));
        assert!(!valid_redirect("javascript:alert(1)"));
    }

    #[test]
    fn redirect_queries_keep_the_registered_query() {
        assert_eq!(with_query("https://a/cb", &[("code", "x y"), ("state", "s")]), "https://a/cb?code=x+y&state=s");
        assert_eq!(
            with_query("https://a/cb?k=v", &[("error", "access_denied")]),
            "https://a/cb?k=v&error=access_denied"
        );
    }
}
