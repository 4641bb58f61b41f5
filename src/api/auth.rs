//! `/auth/*` and `/.well-known/jwks.json` (CONTRACT §3). Login failures answer one generic 401; `/auth/token`
//! answers RFC 6749 errors; nothing a client sent is echoed.

use crate::app::AppState;
use crate::audit::{Agent, AuditEvent, AuditKind, Outcome};
use crate::auth::principal::Principal;
use crate::auth::service::{Account, ClientOutcome, LoginFailure, LoginOutcome};
use crate::auth::session::RefreshDecision;
use crate::error::{AppError, AppResult};
use crate::telemetry::metrics;
use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, HttpResponse, web};
use futures_util::future::LocalBoxFuture;
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::json;
use std::net::IpAddr;
use tracing::Instrument;

/// Longest credential field accepted (anything longer is refused before hashing).
const MAX_FIELD: usize = 1024;

/// The client address: the peer's, or the one a trusted proxy forwarded ([`crate::api::client_addr`]).
pub fn client_ip(req: &HttpRequest) -> Option<IpAddr> {
    let peer = req.peer_addr()?.ip();
    let trusted = req.app_data::<web::Data<AppState>>().map(|s| s.config.network.trusted_proxies.as_slice());
    let forwarded = req.headers().get_all("x-forwarded-for").filter_map(|v| v.to_str().ok());
    Some(crate::api::client_addr::resolve(peer, forwarded, trusted.unwrap_or(&[])))
}

/// A throttled attempt: audited as a failed sign-in (so the failed-login rules count it, CONTRACT §8) and
/// answered 429 with `Retry-After`.
pub(crate) async fn throttled(
    state: &AppState,
    account: Option<&Account>,
    ip: Option<IpAddr>,
    retry_after: time::Duration,
    now: time::OffsetDateTime,
) -> AppResult<HttpResponse> {
    metrics::auth_failure("throttled");
    let agent = match account {
        Some(a) => agent_of(a, ip),
        None => ip.map_or_else(Agent::default, |ip| Agent::default().with_address(ip)),
    };
    let event = AuditEvent::new(AuditKind::LoginFailure, now, Outcome::MinorFailure, agent).with_detail("throttled");
    state.audit.record(event).await?;
    Err(crate::auth::throttle::too_many_requests(retry_after))
}

pub(crate) fn agent_of(account: &Account, ip: Option<IpAddr>) -> Agent {
    let agent = Agent::user(account.id.clone(), Some(account.username.clone()), account.role());
    match ip {
        Some(ip) => agent.with_address(ip),
        None => agent,
    }
}

pub fn principal_agent(p: &Principal, ip: Option<IpAddr>) -> Agent {
    let mut agent = Agent::user(p.subject.clone(), p.username.clone(), p.roles.first().copied());
    if let Some(c) = &p.client_id {
        agent = agent.with_client(c.clone());
    }
    match ip {
        Some(ip) => agent.with_address(ip),
        None => agent,
    }
}

/// Bearer-token authentication as an extractor: a handler that takes a `Principal` is authenticated.
impl FromRequest for Principal {
    type Error = AppError;
    type Future = LocalBoxFuture<'static, Result<Principal, AppError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(|t| t.trim().to_owned());
        let ip = client_ip(req);
        Box::pin(async move {
            let state = state.ok_or_else(|| AppError::internal("application state missing"))?;
            let Some(token) = token.filter(|t| !t.is_empty() && t.len() <= 8192) else {
                metrics::auth_failure("missing-token");
                return Err(AppError::Unauthenticated);
            };
            let span = tracing::info_span!(target: "carevault::auth", "authenticate");
            let result = state.auth.authenticate(&token).instrument(span).await;
            if result.is_err() {
                metrics::auth_failure("invalid-token");
            }
            if matches!(result, Err(AppError::Unauthenticated))
                && let Some(account) = state.auth.disabled_account_of(&token).await
            {
                // A disabled account's token still in use: audited for the monitor's rule.
                let agent = Agent::user(account, None, None);
                let agent = match ip {
                    Some(ip) => agent.with_address(ip),
                    None => agent,
                };
                let event = AuditEvent::new(AuditKind::LoginFailure, state.clock.now(), Outcome::MinorFailure, agent)
                    .with_detail(crate::monitor::rules::DETAIL_DISABLED_ACCOUNT_TOKEN);
                state.audit.record(event).await?;
            }
            result
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    username: String,
    password: String,
    #[serde(default)]
    totp: Option<String>,
}

/// `POST /auth/login`.
pub async fn login(state: web::Data<AppState>, req: HttpRequest, body: web::Bytes) -> AppResult<HttpResponse> {
    let body: LoginBody = serde_json::from_slice(&body).map_err(|_| AppError::Unauthenticated)?;
    if body.username.is_empty()
        || body.username.len() > 64
        || body.password.len() > MAX_FIELD
        || body.username.contains('\0')
    {
        return Err(AppError::Unauthenticated);
    }
    if body.totp.as_ref().is_some_and(|t| t.len() > 16) {
        return Err(AppError::Unauthenticated);
    }
    let ip = client_ip(&req);
    let address = ip.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
    let now = state.clock.now();
    match state.auth.login(body.username, SecretString::from(body.password), body.totp, address).await? {
        LoginOutcome::Ok { tokens, account, .. } => {
            let event = AuditEvent::new(AuditKind::Login, now, Outcome::Success, agent_of(&account, ip));
            state.audit.record(event).await?;
            Ok(HttpResponse::Ok().insert_header((header::PRAGMA, "no-cache")).json(tokens))
        }
        LoginOutcome::Failed { account, reason } => {
            let code = match reason {
                LoginFailure::UnknownOrWrong => "invalid-credentials",
                LoginFailure::Disabled => "account-disabled",
                LoginFailure::SecondFactor => "second-factor",
            };
            metrics::auth_failure(code);
            let agent = match &account {
                Some(a) => agent_of(a, ip),
                None => ip.map_or_else(Agent::default, |ip| Agent::default().with_address(ip)),
            };
            let event = AuditEvent::new(AuditKind::LoginFailure, now, Outcome::MinorFailure, agent).with_detail(code);
            state.audit.record(event).await?;
            Err(AppError::Unauthenticated)
        }
        LoginOutcome::Throttled { account, retry_after } => {
            throttled(&state, account.as_ref(), ip, retry_after, now).await
        }
    }
}

/// An RFC 6749 §5.2 error.
pub(crate) fn oauth_error(status: actix_web::http::StatusCode, code: &'static str) -> HttpResponse {
    HttpResponse::build(status).insert_header((header::PRAGMA, "no-cache")).json(json!({ "error": code }))
}

#[derive(Deserialize)]
pub struct TokenForm {
    grant_type: Option<String>,
    refresh_token: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
    code_verifier: Option<String>,
    client_assertion_type: Option<String>,
    client_assertion: Option<String>,
    scope: Option<String>,
}

/// RFC 7523 client assertions (SMART Backend Services).
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// `POST /auth/token` (form): `refresh_token` and `client_credentials`.
pub async fn token(state: web::Data<AppState>, req: HttpRequest, body: web::Bytes) -> AppResult<HttpResponse> {
    use actix_web::http::StatusCode;
    let Ok(form) = serde_urlencoded::from_bytes::<TokenForm>(&body) else {
        return Ok(oauth_error(StatusCode::BAD_REQUEST, "invalid_request"));
    };
    // No credential, code or client id holds a NUL (and PostgreSQL text cannot store one).
    if body.contains(&0) || body.windows(3).any(|w| w.eq_ignore_ascii_case(b"%00")) {
        return Ok(oauth_error(StatusCode::BAD_REQUEST, "invalid_request"));
    }
    let ip = client_ip(&req);
    let now = state.clock.now();
    match form.grant_type.as_deref() {
        Some("refresh_token") => {
            let Some(presented) = form.refresh_token.filter(|t| !t.is_empty() && t.len() <= MAX_FIELD) else {
                return Ok(oauth_error(StatusCode::BAD_REQUEST, "invalid_request"));
            };
            let (decision, found) = state.auth.refresh(&presented).await?;
            match (decision, found) {
                (RefreshDecision::Rotate, Some((tokens, account))) => {
                    let event = AuditEvent::new(AuditKind::Refresh, now, Outcome::Success, agent_of(&account, ip));
                    state.audit.record(event).await?;
                    Ok(HttpResponse::Ok().insert_header((header::PRAGMA, "no-cache")).json(tokens))
                }
                (RefreshDecision::Reuse, found) => {
                    metrics::auth_failure("refresh-token-reuse");
                    let agent = found.map_or_else(Agent::default, |(_, a)| agent_of(&a, ip));
                    let event = AuditEvent::new(AuditKind::Refresh, now, Outcome::SeriousFailure, agent)
                        .with_detail("refresh-token-reuse");
                    state.audit.record(event).await?;
                    Ok(oauth_error(StatusCode::BAD_REQUEST, "invalid_grant"))
                }
                _ => {
                    metrics::auth_failure("invalid-grant");
                    Ok(oauth_error(StatusCode::BAD_REQUEST, "invalid_grant"))
                }
            }
        }
        Some("authorization_code") => authorization_code(&state, &req, form, ip, now).await,
        Some("client_credentials") if form.client_assertion.is_some() => backend_service(&state, form, ip, now).await,
        Some("client_credentials") => {
            let (id, secret) = basic_credentials(&req).or_else(|| form.client_id.zip(form.client_secret)).unzip();
            let (Some(id), Some(secret)) = (id, secret) else {
                return Ok(oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"));
            };
            if id.len() > 64 || secret.len() > MAX_FIELD || id.contains('\0') {
                return Ok(oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"));
            }
            let address = ip.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
            match state.auth.client_credentials(id, SecretString::from(secret), address).await? {
                ClientOutcome::Ok(tokens, account) => {
                    let event = AuditEvent::new(AuditKind::Login, now, Outcome::Success, agent_of(&account, ip))
                        .with_detail("client-credentials");
                    state.audit.record(event).await?;
                    Ok(HttpResponse::Ok().insert_header((header::PRAGMA, "no-cache")).json(tokens))
                }
                ClientOutcome::Failed => {
                    metrics::auth_failure("invalid-client");
                    let agent = ip.map_or_else(Agent::default, |ip| Agent::default().with_address(ip));
                    let event = AuditEvent::new(AuditKind::LoginFailure, now, Outcome::MinorFailure, agent)
                        .with_detail("invalid-client");
                    state.audit.record(event).await?;
                    Ok(oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"))
                }
                ClientOutcome::Throttled { account, retry_after } => {
                    throttled(&state, account.as_ref(), ip, retry_after, now).await
                }
            }
        }
        Some(_) => Ok(oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type")),
        None => Ok(oauth_error(StatusCode::BAD_REQUEST, "invalid_request")),
    }
}

/// `grant_type=authorization_code` (SMART App Launch): the code, PKCE verifier and redirect URI; a confidential
/// app authenticates with `client_secret_basic`, a public one names itself.
async fn authorization_code(
    state: &AppState,
    req: &HttpRequest,
    form: TokenForm,
    ip: Option<IpAddr>,
    now: time::OffsetDateTime,
) -> AppResult<HttpResponse> {
    use actix_web::http::StatusCode;
    let Some(code) = form.code.filter(|c| !c.is_empty() && c.len() <= 128) else {
        return Ok(oauth_error(StatusCode::BAD_REQUEST, "invalid_request"));
    };
    let basic = basic_credentials(req);
    let client_id = basic.as_ref().map(|(i, _)| i.clone()).or(form.client_id);
    let secret = basic.map(|(_, s)| SecretString::from(s));
    let address = ip.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
    let outcome = state
        .auth
        .exchange_code(
            &code,
            form.redirect_uri.as_deref(),
            form.code_verifier.as_deref(),
            client_id.as_deref().filter(|c| c.len() <= 64),
            secret,
            address,
            state.records.base(),
        )
        .await?;
    match outcome {
        crate::auth::service::CodeExchange::Ok { tokens, account, client_id } => {
            let agent = agent_of(&account, ip).with_client(client_id);
            let tokens = *tokens;
            let event = AuditEvent::new(AuditKind::Login, now, Outcome::Success, agent).with_detail("smart-code");
            state.audit.record(event).await?;
            Ok(HttpResponse::Ok().insert_header((header::PRAGMA, "no-cache")).json(tokens))
        }
        crate::auth::service::CodeExchange::Refused(code) => {
            metrics::auth_failure("invalid-grant");
            let status = if code == "invalid_client" { StatusCode::UNAUTHORIZED } else { StatusCode::BAD_REQUEST };
            if code == "invalid_client" {
                let agent = ip.map_or_else(Agent::default, |ip| Agent::default().with_address(ip));
                let event = AuditEvent::new(AuditKind::LoginFailure, now, Outcome::MinorFailure, agent)
                    .with_detail("invalid-client");
                state.audit.record(event).await?;
            }
            Ok(oauth_error(status, code))
        }
    }
}

/// `grant_type=client_credentials` with a client assertion (SMART Backend Services, `private_key_jwt`).
async fn backend_service(
    state: &AppState,
    form: TokenForm,
    ip: Option<IpAddr>,
    now: time::OffsetDateTime,
) -> AppResult<HttpResponse> {
    use crate::auth::service::BackendOutcome;
    use actix_web::http::StatusCode;
    let (Some(JWT_BEARER), Some(assertion)) = (form.client_assertion_type.as_deref(), form.client_assertion) else {
        return Ok(oauth_error(StatusCode::BAD_REQUEST, "invalid_request"));
    };
    if assertion.len() > 8192 || form.scope.as_ref().is_some_and(|s| s.len() > crate::auth::scope::MAX_SCOPE_LEN) {
        return Ok(oauth_error(StatusCode::BAD_REQUEST, "invalid_request"));
    }
    let token_url = format!("{}/auth/token", state.config.base_url());
    let address = ip.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
    match state.auth.backend_token(&assertion, form.scope.as_deref(), &token_url, address).await? {
        BackendOutcome::Ok(ok) => {
            let (tokens, account) = *ok;
            let event = AuditEvent::new(AuditKind::Login, now, Outcome::Success, agent_of(&account, ip))
                .with_detail("client-assertion");
            state.audit.record(event).await?;
            Ok(HttpResponse::Ok().insert_header((header::PRAGMA, "no-cache")).json(tokens))
        }
        BackendOutcome::InvalidScope => Ok(oauth_error(StatusCode::BAD_REQUEST, "invalid_scope")),
        BackendOutcome::Throttled(retry_after) => throttled(state, None, ip, retry_after, now).await,
        BackendOutcome::Failed(_) => {
            metrics::auth_failure("invalid-client");
            let agent = ip.map_or_else(Agent::default, |ip| Agent::default().with_address(ip));
            let event = AuditEvent::new(AuditKind::LoginFailure, now, Outcome::MinorFailure, agent)
                .with_detail("invalid-client");
            state.audit.record(event).await?;
            Ok(oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"))
        }
    }
}

pub(crate) fn basic_credentials(req: &HttpRequest) -> Option<(String, String)> {
    use base64::Engine;
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(v.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

#[derive(Deserialize)]
pub struct RevokeForm {
    token: Option<String>,
}

/// `POST /auth/revoke` (RFC 7009): always 200, whether or not the token was known.
pub async fn revoke(state: web::Data<AppState>, req: HttpRequest, body: web::Bytes) -> AppResult<HttpResponse> {
    let form: RevokeForm = serde_urlencoded::from_bytes(&body).unwrap_or(RevokeForm { token: None });
    let Some(token) = form.token.filter(|t| !t.is_empty() && t.len() <= 8192) else {
        return Ok(oauth_error(actix_web::http::StatusCode::BAD_REQUEST, "invalid_request"));
    };
    // RFC 7009: 200 whether or not the token was known; only a revocation that ended a session is an event.
    if state.auth.revoke_token(&token).await?.is_none() {
        return Ok(HttpResponse::Ok().finish());
    }
    let ip = client_ip(&req);
    let agent = ip.map_or_else(Agent::default, |ip| Agent::default().with_address(ip));
    let event =
        AuditEvent::new(AuditKind::Logout, state.clock.now(), Outcome::Success, agent).with_detail("token-revoked");
    state.audit.record(event).await?;
    Ok(HttpResponse::Ok().finish())
}

/// `POST /auth/logout`: ends the caller's session at once.
pub async fn logout(state: web::Data<AppState>, req: HttpRequest, principal: Principal) -> AppResult<HttpResponse> {
    if let Some(sid) = principal.session_id {
        state.auth.end_session(sid).await?;
    }
    let event = AuditEvent::new(
        AuditKind::Logout,
        state.clock.now(),
        Outcome::Success,
        principal_agent(&principal, client_ip(&req)),
    );
    state.audit.record(event).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `GET /.well-known/jwks.json`.
pub async fn jwks(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().content_type("application/jwk-set+json").json(state.auth.jwks())
}

/// `GET /auth/session`: who the caller is (subject, issuer, roles, links) and when the presented token expires.
/// For clients and tests; nothing here the caller's own token does not already say.
pub async fn session(req: HttpRequest, principal: Principal) -> HttpResponse {
    use base64::Engine;
    // The extractor verified this token; its `exp` is read back only for display.
    let expires_at = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split('.').nth(1))
        .and_then(|p| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p).ok())
        .and_then(|c| c.get("exp").and_then(serde_json::Value::as_i64));
    HttpResponse::Ok().json(json!({
        "subject": principal.subject,
        "issuer": principal.issuer,
        "roles": principal.roles,
        "practitioner": principal.practitioner,
        "patient": principal.patient,
        "session": principal.session_id.is_some(),
        "expires_at": expires_at,
        "client_id": principal.client_id,
        "scope": principal.scopes.as_ref().map(|s| s.render()),
        "launch_patient": principal.context_patient,
    }))
}
