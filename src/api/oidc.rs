//! `GET /auth/oidc/login` and `GET /auth/oidc/callback` (CONTRACT §3): the OpenID Connect login, ending in the
//! same token response as `/auth/login`. Every login and every failed callback is audited; refusals answer one
//! generic 401 (403 when the provider vouched for someone without a usable role); an unreachable provider 503.
//! Nothing the provider or the client sent is echoed. Not configured: 404.
//!
//! A login started from the SMART authorize page (`POST /auth/authorize/oidc`) ends on that flow's consent
//! page instead: the app gets an authorization code, the browser never sees a token.

use crate::api::auth::client_ip;
use crate::app::AppState;
use crate::audit::{Agent, AuditEvent, AuditKind, Outcome};
use crate::auth::oidc::{BINDING_COOKIE, CallbackParams, LOGIN_TTL, LoginStart, OidcLogin};
use crate::auth::service::FlowSignIn;
use crate::error::{AppError, AppResult};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};

/// The browser-binding cookie: host-only, HTTPS-only, sent back on the provider's top-level redirect (Lax).
fn binding_cookie(value: &str, max_age: i64) -> String {
    format!("{BINDING_COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; Secure; SameSite=Lax")
}

fn cookie_value(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn address_agent(req: &HttpRequest) -> Agent {
    client_ip(req).map_or_else(Agent::default, |ip| Agent::default().with_address(ip))
}

/// `GET /auth/oidc/login`: 302 to the provider's authorization endpoint.
pub async fn login(state: web::Data<AppState>) -> AppResult<HttpResponse> {
    let oidc = state.auth.oidc().ok_or(AppError::NotFound)?;
    let start = oidc.start_login(None).await?;
    to_provider(start, StatusCode::FOUND)
}

/// The redirect to the provider with the browser-binding cookie of a started login.
pub(crate) fn to_provider(start: LoginStart, status: StatusCode) -> AppResult<HttpResponse> {
    let location =
        HeaderValue::from_str(&start.authorization_url).map_err(|_| AppError::unavailable("OIDC authorization URL"))?;
    Ok(HttpResponse::build(status)
        .insert_header((header::LOCATION, location))
        .insert_header((header::SET_COOKIE, binding_cookie(&start.binding, LOGIN_TTL.whole_seconds())))
        .finish())
}

/// `GET /auth/oidc/callback`: our access and refresh tokens, a session in the database.
pub async fn callback(state: web::Data<AppState>, req: HttpRequest) -> AppResult<HttpResponse> {
    let oidc = state.auth.oidc().ok_or(AppError::NotFound)?;
    let params: CallbackParams = serde_urlencoded::from_str(req.query_string()).unwrap_or_default();
    let binding = cookie_value(&req, BINDING_COOKIE);
    let now = state.clock.now();
    let ip = client_ip(&req);
    let (outcome, detail, error) = match oidc.finish_login(params, binding.as_deref()).await {
        Ok(OidcLogin::Ok { account, smart_flow: Some(flow) }) => {
            let mut resp = match state.auth.bind_flow(&flow, *account).await? {
                FlowSignIn::Consent(c) => {
                    crate::api::smart::signed_in(&state, &req, &c, "smart-authorize-oidc").await?
                }
                _ => crate::api::smart::expired_page(),
            };
            resp.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_str(&binding_cookie("", 0)).map_err(|_| AppError::internal("cookie header"))?,
            );
            return Ok(resp);
        }
        Ok(OidcLogin::Ok { account, smart_flow: None }) => {
            let (tokens, _) = state.auth.open_session(&account, now).await?;
            let mut agent = Agent::user(account.id.clone(), Some(account.username.clone()), account.role());
            if let Some(ip) = ip {
                agent = agent.with_address(ip);
            }
            let event = AuditEvent::new(AuditKind::Login, now, Outcome::Success, agent).with_detail("oidc");
            state.audit.record(event).await?;
            return Ok(HttpResponse::Ok()
                .insert_header((header::PRAGMA, "no-cache"))
                .insert_header((header::SET_COOKIE, binding_cookie("", 0)))
                .json(tokens));
        }
        Ok(OidcLogin::Refused(refusal)) => (Outcome::MinorFailure, refusal.code(), refusal.error()),
        Err(e @ AppError::Unavailable(_)) => (Outcome::SeriousFailure, "oidc-provider-unavailable", e),
        Err(e) => return Err(e),
    };
    let event = AuditEvent::new(AuditKind::LoginFailure, now, outcome, address_agent(&req)).with_detail(detail);
    state.audit.record(event).await?;
    let mut resp = error.error_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&binding_cookie("", 0)).map_err(|_| AppError::internal("cookie header"))?,
    );
    Ok(resp)
}
