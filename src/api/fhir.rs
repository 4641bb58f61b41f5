//! `/fhir/*`: thin handlers. Each authenticates (the `Principal` extractor), parses, calls the records
//! service (which decides, scopes, decrypts, shapes and audits), and renders FHIR JSON with version headers.

use crate::api::auth::client_ip;
use crate::app::AppState;
use crate::audit::AuditKind;
use crate::auth::principal::Principal;
use crate::error::{AppError, AppResult, FHIR_JSON};
use crate::fhir::search::Handling;
use crate::records::{Caller, Shown};
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::Value;
use time::format_description::well_known::Rfc2822;

fn caller(req: &HttpRequest, principal: Principal) -> Caller {
    Caller { principal, ip: client_ip(req) }
}

/// Refused and failed interactions are audited too (who, which type, the outcome; nothing the client sent).
async fn audited<T>(state: &AppState, c: &Caller, kind: AuditKind, rtype: &str, r: AppResult<T>) -> AppResult<T> {
    match r {
        Ok(v) => Ok(v),
        Err(e) => {
            let status = actix_web::ResponseError::status_code(&e).as_u16();
            let event = state.records.failure_event(c, kind, rtype, status);
            state.records.auditor().record(event).await?;
            Err(e)
        }
    }
}

fn fhir_json(status: actix_web::http::StatusCode, body: &Value) -> HttpResponse {
    HttpResponse::build(status).insert_header((header::CONTENT_TYPE, FHIR_JSON)).body(body.to_string())
}

fn with_version(mut resp: HttpResponse, shown: &Shown) -> HttpResponse {
    if let Ok(v) = HeaderValue::from_str(&format!("W/\"{}\"", shown.version_id)) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    if let Ok(when) = shown.last_updated.format(&Rfc2822)
        && let Ok(v) = HeaderValue::from_str(&when)
    {
        resp.headers_mut().insert(header::LAST_MODIFIED, v);
    }
    resp
}

/// `Prefer: return=minimal` → no body.
fn wants_minimal(req: &HttpRequest) -> bool {
    req.headers()
        .get_all("prefer")
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split([',', ';']).any(|p| p.trim() == "return=minimal"))
}

fn handling(req: &HttpRequest) -> Handling {
    let lenient = req
        .headers()
        .get_all("prefer")
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split([',', ';']).any(|p| p.trim() == "handling=lenient"));
    if lenient { Handling::Lenient } else { Handling::Strict }
}

/// Writes accept FHIR JSON (or plain JSON); anything else is 415.
fn check_json(req: &HttpRequest) -> AppResult<()> {
    let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime == FHIR_JSON || mime == "application/json" { Ok(()) } else { Err(AppError::UnsupportedMediaType) }
}

fn query_pairs(req: &HttpRequest) -> AppResult<Vec<(String, String)>> {
    serde_urlencoded::from_str(req.query_string())
        .map_err(|_| AppError::invalid("search", "The query string is malformed."))
}

/// `If-Match: W/"3"` → 3.
fn if_match(req: &HttpRequest) -> AppResult<Option<i64>> {
    let Some(v) = req.headers().get(header::IF_MATCH) else { return Ok(None) };
    let text = v.to_str().map_err(|_| AppError::PreconditionFailed)?.trim();
    let inner = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    inner.parse().map(Some).map_err(|_| AppError::PreconditionFailed)
}

pub async fn metadata(state: web::Data<AppState>) -> HttpResponse {
    let body = crate::fhir::capability::capability_statement(state.records.base(), state.clock.now());
    fhir_json(actix_web::http::StatusCode::OK, &body)
}

pub async fn read(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<(String, String)>,
) -> AppResult<HttpResponse> {
    let (rtype, id) = path.into_inner();
    let elements = elements_param(&req)?;
    if rtype == "AuditEvent" {
        let body = crate::records::audit_api::read(&state, &caller(&req, p), &id).await?;
        return Ok(fhir_json(actix_web::http::StatusCode::OK, &body));
    }
    let c = caller(&req, p);
    let shown =
        audited(&state, &c, AuditKind::Read, &rtype, state.records.read(&c, &rtype, &id, elements).await).await?;
    Ok(with_version(fhir_json(actix_web::http::StatusCode::OK, &shown.resource), &shown))
}

fn elements_param(req: &HttpRequest) -> AppResult<Option<Vec<String>>> {
    let pairs = query_pairs(req)?;
    let mut out: Option<Vec<String>> = None;
    for (k, v) in pairs {
        if k == "_elements" {
            out.get_or_insert_with(Vec::new)
                .extend(v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()));
        } else {
            return Err(AppError::invalid("read", "Only _elements is accepted on a read."));
        }
    }
    Ok(out)
}

pub async fn vread(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<(String, String, String)>,
) -> AppResult<HttpResponse> {
    let (rtype, id, vid) = path.into_inner();
    let c = caller(&req, p);
    let shown = audited(&state, &c, AuditKind::Vread, &rtype, state.records.vread(&c, &rtype, &id, &vid).await).await?;
    Ok(with_version(fhir_json(actix_web::http::StatusCode::OK, &shown.resource), &shown))
}

pub async fn history(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<(String, String)>,
) -> AppResult<HttpResponse> {
    let (rtype, id) = path.into_inner();
    let c = caller(&req, p);
    let body = audited(&state, &c, AuditKind::History, &rtype, state.records.history(&c, &rtype, &id).await).await?;
    Ok(fhir_json(actix_web::http::StatusCode::OK, &body))
}

pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<String>,
    body: web::Bytes,
) -> AppResult<HttpResponse> {
    let rtype = path.into_inner();
    check_json(&req)?;
    let c = caller(&req, p);
    let shown = audited(&state, &c, AuditKind::Create, &rtype, state.records.create(&c, &rtype, &body).await).await?;
    let id = shown.resource.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
    let location = format!("/fhir/{rtype}/{id}/_history/{}", shown.version_id);
    let resp = if wants_minimal(&req) {
        HttpResponse::Created().finish()
    } else {
        fhir_json(actix_web::http::StatusCode::CREATED, &shown.resource)
    };
    let mut resp = with_version(resp, &shown);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

pub async fn update(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> AppResult<HttpResponse> {
    let (rtype, id) = path.into_inner();
    check_json(&req)?;
    let expected = if_match(&req)?;
    if expected.is_none() {
        return Err(AppError::PreconditionRequired);
    }
    let c = caller(&req, p);
    let shown =
        audited(&state, &c, AuditKind::Update, &rtype, state.records.update(&c, &rtype, &id, expected, &body).await)
            .await?;
    let resp = if wants_minimal(&req) {
        HttpResponse::Ok().finish()
    } else {
        fhir_json(actix_web::http::StatusCode::OK, &shown.resource)
    };
    Ok(with_version(resp, &shown))
}

pub async fn delete(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<(String, String)>,
) -> AppResult<HttpResponse> {
    let (rtype, id) = path.into_inner();
    let c = caller(&req, p);
    audited(&state, &c, AuditKind::Delete, &rtype, state.records.delete(&c, &rtype, &id).await).await?;
    Ok(HttpResponse::NoContent().finish())
}

pub async fn search_get(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<String>,
) -> AppResult<HttpResponse> {
    let rtype = path.into_inner();
    let pairs = query_pairs(&req)?;
    search(&state, &req, p, &rtype, pairs).await
}

pub async fn search_post(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<String>,
    body: web::Bytes,
) -> AppResult<HttpResponse> {
    let rtype = path.into_inner();
    let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.starts_with("application/x-www-form-urlencoded") {
        return Err(AppError::UnsupportedMediaType);
    }
    let mut pairs = query_pairs(&req)?;
    let form: Vec<(String, String)> =
        serde_urlencoded::from_bytes(&body).map_err(|_| AppError::invalid("search", "The form body is malformed."))?;
    pairs.extend(form);
    search(&state, &req, p, &rtype, pairs).await
}

async fn search(
    state: &AppState,
    req: &HttpRequest,
    p: Principal,
    rtype: &str,
    pairs: Vec<(String, String)>,
) -> AppResult<HttpResponse> {
    let c = caller(req, p);
    let body = if rtype == "AuditEvent" {
        crate::records::audit_api::search(state, &c, pairs, handling(req)).await
    } else {
        state.records.search(&c, rtype, pairs, handling(req)).await
    };
    let body = audited(state, &c, AuditKind::Search, rtype, body).await?;
    Ok(fhir_json(actix_web::http::StatusCode::OK, &body))
}

pub async fn everything(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<String>,
) -> AppResult<HttpResponse> {
    let c = caller(&req, p);
    let body =
        audited(&state, &c, AuditKind::Everything, "Patient", state.records.everything(&c, &path.into_inner()).await)
            .await?;
    Ok(fhir_json(actix_web::http::StatusCode::OK, &body))
}

pub async fn access_report(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<String>,
) -> AppResult<HttpResponse> {
    let body = crate::records::audit_api::access_report(&state, &caller(&req, p), &path.into_inner()).await?;
    Ok(fhir_json(actix_web::http::StatusCode::OK, &body))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakGlassBody {
    patient: String,
    reason: String,
}

/// `POST /auth/break-glass`: a clinician or nurse opens one patient's record for a limited time.
pub async fn break_glass(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    body: web::Bytes,
) -> AppResult<HttpResponse> {
    let body: BreakGlassBody = serde_json::from_slice(&body)
        .map_err(|_| AppError::invalid("patient", "The body must name the patient and a reason."))?;
    let grant = crate::records::audit_api::break_glass(&state, &caller(&req, p), &body.patient, &body.reason).await?;
    Ok(HttpResponse::Created().json(grant))
}
