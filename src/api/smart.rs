//! SMART App Launch over HTTP (CONTRACT §5b): discovery (`/.well-known/smart-configuration`), the authorize
//! pages (sign-in, consent with a patient picker), and introspection. The token grants live in
//! [`crate::api::auth::token`].
//!
//! The pages are server-rendered HTML with no script (their CSP allows none); every value shown is escaped,
//! and nothing a client sent is echoed except the app name it was registered with. The flow and consent
//! handles travel only in the forms' hidden fields, so a forged cross-site post has nothing to name.

use crate::api::auth::{agent_of, client_ip, oauth_error, throttled};
use crate::app::AppState;
use crate::audit::{Agent, AuditEvent, AuditKind, Outcome};
use crate::auth::service::{AuthorizeRequest, AuthorizeStart, ClientCheck, FlowConsent, FlowSignIn};
use crate::error::{AppError, AppResult};
use crate::fhir::search::Handling;
use crate::records::{Caller, Done, Interaction, Operation};
use crate::telemetry::metrics;
use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

/// The pages' content security policy: no script, no frames, inline style only.
const PAGE_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'";
const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;\
color:#1b1b1b}label{display:block;margin:.8rem 0 .2rem}input,select{width:100%;padding:.4rem;font-size:1rem}\
button{margin:1rem .5rem 0 0;padding:.5rem 1.2rem;font-size:1rem}#error{color:#a00}li{margin:.3rem 0}";

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(status: StatusCode, title: &str, body: &str) -> HttpResponse {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" \
         content=\"width=device-width\"><title>{t}</title><style>{STYLE}</style></head><body><main><h1>{t}</h1>\
         {body}</main></body></html>",
        t = escape(title)
    );
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CONTENT_SECURITY_POLICY, PAGE_CSP))
        .insert_header((header::PRAGMA, "no-cache"))
        .body(html)
}

fn error_page(status: StatusCode, message: &str) -> HttpResponse {
    page(status, "Sign-in failed", &format!("<p id=\"error\" role=\"alert\">{}</p>", escape(message)))
}

fn sign_in_page(state: &AppState, flow: &str, app_name: &str, error: Option<&str>) -> HttpResponse {
    let err = error.map(|e| format!("<p id=\"error\" role=\"alert\">{}</p>", escape(e))).unwrap_or_default();
    // With an OpenID Connect provider configured: its sign-in, as a form post so the flow handle stays out
    // of URLs (and so out of histories, logs and the provider's Referer).
    let provider = if state.auth.oidc().is_some() {
        format!(
            "<form id=\"oidc\" method=\"post\" action=\"/auth/authorize/oidc\">\
             <input type=\"hidden\" name=\"flow\" value=\"{}\">\
             <button type=\"submit\">Sign in with your organization's account</button></form><p>or</p>",
            escape(flow)
        )
    } else {
        String::new()
    };
    let body = format!(
        "<p><strong>{app}</strong> asks to connect to your health records. Sign in to continue.</p>{err}\
         {provider}<form id=\"login\" method=\"post\" action=\"/auth/authorize/login\">\
         <input type=\"hidden\" name=\"flow\" value=\"{flow}\">\
         <label for=\"username\">Username</label><input id=\"username\" name=\"username\" autocomplete=\"username\" \
         required maxlength=\"64\">\
         <label for=\"password\">Password</label><input id=\"password\" name=\"password\" type=\"password\" \
         autocomplete=\"current-password\" required maxlength=\"1024\">\
         <label for=\"totp\">One-time code (if you enrolled one)</label><input id=\"totp\" name=\"totp\" \
         inputmode=\"numeric\" autocomplete=\"one-time-code\" maxlength=\"16\">\
         <button type=\"submit\">Sign in</button></form>",
        app = escape(app_name),
        flow = escape(flow),
    );
    page(StatusCode::OK, "Sign in", &body)
}

fn consent_page(c: &FlowConsent, patients: &[(String, String)]) -> HttpResponse {
    let scopes: String = c.scopes.describe().iter().map(|s| format!("<li>{}</li>", escape(s))).collect();
    let picker = if c.needs_patient {
        if patients.is_empty() {
            return error_page(StatusCode::FORBIDDEN, "You have no patients this app could be opened for.");
        }
        let options: String = patients
            .iter()
            .map(|(id, label)| format!("<option value=\"{}\">{}</option>", escape(id), escape(label)))
            .collect();
        format!(
            "<label for=\"patient\">Patient</label><select id=\"patient\" name=\"patient\" required>{options}</select>"
        )
    } else {
        String::new()
    };
    let body = format!(
        "<p><strong>{app}</strong> will be able to:</p><ul id=\"scopes\">{scopes}</ul>\
         <form id=\"consent\" method=\"post\" action=\"/auth/authorize/consent\">\
         <input type=\"hidden\" name=\"flow\" value=\"{flow}\"><input type=\"hidden\" name=\"consent\" \
         value=\"{consent}\">{picker}\
         <button type=\"submit\" name=\"decision\" value=\"approve\">Allow</button>\
         <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form>",
        app = escape(&c.app_name),
        flow = escape(&c.flow),
        consent = escape(&c.consent),
    );
    page(StatusCode::OK, "Allow access?", &body)
}

/// `GET /.well-known/smart-configuration` (also under `/fhir/`): SMART App Launch 2.0 discovery.
pub async fn configuration(state: web::Data<AppState>) -> HttpResponse {
    let server = state.config.base_url();
    HttpResponse::Ok().json(json!({
        "issuer": state.auth.issuer(),
        "jwks_uri": format!("{server}/.well-known/jwks.json"),
        "authorization_endpoint": format!("{server}/auth/authorize"),
        "token_endpoint": format!("{server}/auth/token"),
        "introspection_endpoint": format!("{server}/auth/introspect"),
        "revocation_endpoint": format!("{server}/auth/revoke"),
        "grant_types_supported": ["authorization_code", "client_credentials", "refresh_token"],
        "response_types_supported": ["code"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": [
            "openid", "fhirUser", "profile", "launch/patient", "offline_access", "online_access",
            "patient/*.cruds", "user/*.cruds", "system/*.cruds", "patient/*.rs", "user/*.rs", "system/*.rs"
        ],
        "capabilities": [
            "launch-standalone", "client-public", "client-confidential-symmetric",
            "client-confidential-asymmetric", "context-standalone-patient", "permission-offline",
            "permission-online", "permission-patient", "permission-user", "permission-v1", "permission-v2",
            "sso-openid-connect"
        ]
    }))
}

/// `GET /auth/authorize`.
pub async fn authorize(state: web::Data<AppState>, req: HttpRequest) -> AppResult<HttpResponse> {
    let q = req.query_string();
    let Some(r) =
        serde_urlencoded::from_str::<AuthorizeRequest>(q).ok().filter(|_| !q.to_ascii_lowercase().contains("%00"))
    else {
        return Ok(error_page(StatusCode::BAD_REQUEST, "The authorization request is malformed."));
    };
    match state.auth.begin_authorization(r, state.records.base()).await? {
        AuthorizeStart::SignIn { flow, app_name } => Ok(sign_in_page(&state, &flow, &app_name, None)),
        AuthorizeStart::Redirect(to) => Ok(HttpResponse::Found().insert_header((header::LOCATION, to)).finish()),
        AuthorizeStart::Refuse => Ok(error_page(
            StatusCode::BAD_REQUEST,
            "This app is not registered here, or its redirect address does not match its registration.",
        )),
    }
}

#[derive(Deserialize)]
pub struct LoginForm {
    flow: String,
    username: String,
    password: String,
    #[serde(default)]
    totp: Option<String>,
}

const EXPIRED: &str = "This sign-in has expired or was already used. Go back to the app and start again.";

/// `POST /auth/authorize/login`: the authorize page's sign-in (local accounts, TOTP where enrolled).
pub async fn login(state: web::Data<AppState>, req: HttpRequest, body: web::Bytes) -> AppResult<HttpResponse> {
    let Ok(form) = serde_urlencoded::from_bytes::<LoginForm>(&body) else {
        return Ok(error_page(StatusCode::BAD_REQUEST, EXPIRED));
    };
    if form.username.contains('\0') || form.flow.contains('\0') {
        return Ok(error_page(StatusCode::BAD_REQUEST, EXPIRED));
    }
    if form.flow.len() > 64 {
        return Ok(error_page(StatusCode::BAD_REQUEST, EXPIRED));
    }
    let Some(app_name) = state.auth.flow_app_name(&form.flow).await? else {
        return Ok(error_page(StatusCode::BAD_REQUEST, EXPIRED));
    };
    let wrong = "The username, password or one-time code is not right.";
    let totp = form.totp.filter(|t| !t.is_empty());
    if form.username.is_empty()
        || form.username.len() > 64
        || form.password.len() > 1024
        || totp.as_ref().is_some_and(|t| t.len() > 16)
    {
        return Ok(sign_in_page(&state, &form.flow, &app_name, Some(wrong)));
    }
    let ip = client_ip(&req);
    let address = ip.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
    let now = state.clock.now();
    let outcome =
        state.auth.flow_sign_in(&form.flow, form.username, SecretString::from(form.password), totp, address).await?;
    match outcome {
        FlowSignIn::Consent(c) => signed_in(&state, &req, &c, "smart-authorize").await,
        FlowSignIn::Failed { account } => {
            metrics::auth_failure("invalid-credentials");
            let agent = match &account {
                Some(a) => agent_of(a, ip),
                None => ip.map_or_else(Agent::default, |ip| Agent::default().with_address(ip)),
            };
            let event = AuditEvent::new(AuditKind::LoginFailure, now, Outcome::MinorFailure, agent)
                .with_detail("invalid-credentials");
            state.audit.record(event).await?;
            Ok(sign_in_page(&state, &form.flow, &app_name, Some(wrong)))
        }
        FlowSignIn::Throttled { account, retry_after } => {
            // Audited and counted like every throttled sign-in; the page says to wait.
            let _ = throttled(&state, account.as_ref(), ip, retry_after, now).await;
            let mut resp = error_page(StatusCode::TOO_MANY_REQUESTS, "Too many attempts. Wait a moment and retry.");
            if let Ok(v) = header::HeaderValue::from_str(&retry_after.whole_seconds().max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            Ok(resp)
        }
        FlowSignIn::Expired => Ok(error_page(StatusCode::BAD_REQUEST, EXPIRED)),
    }
}

/// A flow's user has signed in (`detail` says how): audited as a login, then the consent page.
pub(crate) async fn signed_in(
    state: &AppState,
    req: &HttpRequest,
    c: &FlowConsent,
    detail: &'static str,
) -> AppResult<HttpResponse> {
    let ip = client_ip(req);
    let event = AuditEvent::new(AuditKind::Login, state.clock.now(), Outcome::Success, agent_of(&c.account, ip))
        .with_detail(detail);
    state.audit.record(event).await?;
    let patients = if c.needs_patient { patient_choices(state, req, c).await? } else { vec![] };
    Ok(consent_page(c, &patients))
}

/// The sign-in failed or expired page of a flow.
pub(crate) fn expired_page() -> HttpResponse {
    error_page(StatusCode::BAD_REQUEST, EXPIRED)
}

#[derive(Deserialize)]
pub struct ProviderForm {
    flow: String,
}

/// `POST /auth/authorize/oidc`: the authorize page's sign-in at the configured OpenID Connect provider. The
/// login carries the flow (sealed), and its callback continues to the consent page. No provider: 404.
pub async fn provider_sign_in(state: web::Data<AppState>, body: web::Bytes) -> AppResult<HttpResponse> {
    let oidc = state.auth.oidc().ok_or(AppError::NotFound)?;
    let Ok(form) = serde_urlencoded::from_bytes::<ProviderForm>(&body) else { return Ok(expired_page()) };
    if form.flow.is_empty() || form.flow.len() > 64 || form.flow.contains('\0') {
        return Ok(expired_page());
    }
    if state.auth.flow_app_name(&form.flow).await?.is_none() {
        return Ok(expired_page());
    }
    let start = oidc.start_login(Some(&form.flow)).await?;
    crate::api::oidc::to_provider(start, StatusCode::SEE_OTHER)
}

/// The patients the signed-in user may open the app for: a search as that user through the records service
/// (decided, scoped, masked and audited like any search), labelled by what the user may see.
async fn patient_choices(state: &AppState, req: &HttpRequest, c: &FlowConsent) -> AppResult<Vec<(String, String)>> {
    let Some((_, principal, _)) = state.auth.flow_account(&c.flow, &c.consent).await? else { return Ok(vec![]) };
    let op = Operation::new(
        Caller { principal, ip: client_ip(req) },
        Interaction::Search {
            rtype: "Patient".into(),
            params: vec![("_count".into(), "100".into())],
            handling: Handling::Lenient,
        },
    );
    let bundle = match state.records.execute(op).await {
        Ok(Done::Bundle(b)) => b,
        Ok(_) | Err(AppError::Forbidden | AppError::NotFound) => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let entries = bundle.get("entry").and_then(Value::as_array).cloned().unwrap_or_default();
    Ok(entries
        .iter()
        .filter_map(|e| {
            let r = e.get("resource")?;
            let id = r.get("id")?.as_str()?.to_owned();
            Some((id.clone(), patient_label(r).unwrap_or_else(|| format!("Patient {id}"))))
        })
        .collect())
}

fn patient_label(r: &Value) -> Option<String> {
    let name = r.get("name")?.as_array()?.first()?;
    let given: Vec<&str> = name
        .get("given")
        .and_then(Value::as_array)
        .map(|g| g.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let family = name.get("family").and_then(Value::as_str).unwrap_or("");
    let mut label = format!("{} {family}", given.join(" ")).trim().to_owned();
    if label.is_empty() {
        return None;
    }
    if let Some(b) = r.get("birthDate").and_then(Value::as_str) {
        label.push_str(&format!(" (born {b})"));
    }
    Some(label)
}

#[derive(Deserialize)]
pub struct ConsentForm {
    flow: String,
    consent: String,
    decision: String,
    #[serde(default)]
    patient: Option<String>,
}

/// `POST /auth/authorize/consent`: allow (a code back to the app) or deny (`access_denied`).
pub async fn consent(state: web::Data<AppState>, req: HttpRequest, body: web::Bytes) -> AppResult<HttpResponse> {
    let Ok(form) = serde_urlencoded::from_bytes::<ConsentForm>(&body) else {
        return Ok(error_page(StatusCode::BAD_REQUEST, EXPIRED));
    };
    if form.flow.len() > 64 || form.consent.len() > 64 {
        return Ok(error_page(StatusCode::BAD_REQUEST, EXPIRED));
    }
    let approve = match form.decision.as_str() {
        "approve" => true,
        "deny" => false,
        _ => return Ok(error_page(StatusCode::BAD_REQUEST, EXPIRED)),
    };
    let Some((account, principal, scopes)) = state.auth.flow_account(&form.flow, &form.consent).await? else {
        return Ok(error_page(StatusCode::BAD_REQUEST, EXPIRED));
    };
    let mut patient = None;
    if approve && scopes.launch_patient && account.role() != Some(crate::role::Role::Patient) {
        // The chosen patient must be one this user may read: checked by a read as the user (audited).
        let Some(id) = form.patient.as_deref().and_then(|p| Uuid::parse_str(p).ok()) else {
            return Ok(error_page(StatusCode::BAD_REQUEST, "Choose a patient."));
        };
        let op = Operation::new(
            Caller { principal, ip: client_ip(&req) },
            Interaction::Read { rtype: "Patient".into(), id: id.to_string(), elements: Some(vec!["id".into()]) },
        );
        match state.records.execute(op).await {
            Ok(_) => patient = Some(id),
            Err(AppError::Forbidden | AppError::NotFound | AppError::Gone) => {
                return Ok(error_page(StatusCode::FORBIDDEN, "You may not open this app for that patient."));
            }
            Err(e) => return Err(e),
        }
    }
    match state.auth.flow_consent(&form.flow, &form.consent, approve, patient).await? {
        Some(to) => Ok(HttpResponse::SeeOther().insert_header((header::LOCATION, to)).finish()),
        None => Ok(error_page(StatusCode::BAD_REQUEST, EXPIRED)),
    }
}

#[derive(Deserialize)]
pub struct IntrospectForm {
    token: Option<String>,
}

/// `POST /auth/introspect` (RFC 7662), for resource servers: the caller authenticates as a confidential app
/// or a service client (`client_secret_basic`), throttled like every client authentication.
pub async fn introspect(state: web::Data<AppState>, req: HttpRequest, body: web::Bytes) -> AppResult<HttpResponse> {
    let ip = client_ip(&req);
    let now = state.clock.now();
    let Some((id, secret)) =
        crate::api::auth::basic_credentials(&req).filter(|(i, s)| i.len() <= 64 && s.len() <= 1024)
    else {
        return Ok(oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"));
    };
    let address = ip.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
    match state.auth.verify_client(id, SecretString::from(secret), address).await? {
        ClientCheck::Ok => {}
        ClientCheck::Failed => {
            metrics::auth_failure("invalid-client");
            let agent = ip.map_or_else(Agent::default, |ip| Agent::default().with_address(ip));
            let event = AuditEvent::new(AuditKind::LoginFailure, now, Outcome::MinorFailure, agent)
                .with_detail("invalid-client");
            state.audit.record(event).await?;
            return Ok(oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"));
        }
        ClientCheck::Throttled(retry_after) => return throttled(&state, None, ip, retry_after, now).await,
    }
    let form: IntrospectForm = serde_urlencoded::from_bytes(&body).unwrap_or(IntrospectForm { token: None });
    let Some(token) = form.token.filter(|t| !t.is_empty() && t.len() <= 8192) else {
        return Ok(oauth_error(StatusCode::BAD_REQUEST, "invalid_request"));
    };
    let answer = state.auth.introspect(&token, state.records.base()).await;
    Ok(HttpResponse::Ok().insert_header((header::PRAGMA, "no-cache")).json(answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_labels() {
        assert_eq!(escape("<a href=\"x\">'&"), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;");
        let p = json!({ "name": [{ "given": ["Ada", "M"], "family": "Lovelace" }], "birthDate": "1815-12-10" });
        assert_eq!(patient_label(&p).as_deref(), Some("Ada M Lovelace (born 1815-12-10)"));
        assert_eq!(patient_label(&json!({ "id": "x" })), None);
    }
}
