//! `/fhir/*`: thin handlers. Each authenticates (the `Principal` extractor), parses, calls the records
//! service (which decides, scopes, decrypts, shapes and audits), and renders FHIR JSON with version headers.

use crate::api::auth::client_ip;
use crate::app::AppState;
use crate::auth::principal::Principal;
use crate::error::{AppError, AppResult, FHIR_JSON};
use crate::fhir::search::Handling;
use crate::records::{Caller, Done, Interaction, Operation, Shown};
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::Value;
use time::format_description::well_known::Rfc2822;

fn caller(req: &HttpRequest, principal: Principal) -> Caller {
    Caller { principal, ip: client_ip(req) }
}

/// Runs one operation through the records service (which decides, scopes, decrypts, shapes and audits it, on
/// success and on failure alike).
async fn execute(state: &AppState, req: &HttpRequest, p: Principal, interaction: Interaction) -> AppResult<Done> {
    state.records.execute(Operation::new(caller(req, p), interaction)).await
}

/// The FHIR body of an operation's result.
fn rendered(status: actix_web::http::StatusCode, done: Done) -> AppResult<HttpResponse> {
    match done {
        Done::Resource(shown) | Done::Created(shown) => Ok(with_version(fhir_json(status, &shown.resource), &shown)),
        Done::Bundle(body) | Done::Document(body) => Ok(fhir_json(status, &body)),
        Done::Deleted => Ok(HttpResponse::NoContent().finish()),
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
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(req.query_string())
        .map_err(|_| AppError::invalid("search", "The query string is malformed."))?;
    no_nul(pairs, "The query string is malformed.")
}

/// Parameters holding a NUL character are refused: no FHIR value has one, and PostgreSQL text cannot store one.
fn no_nul(pairs: Vec<(String, String)>, message: &'static str) -> AppResult<Vec<(String, String)>> {
    if pairs.iter().any(|(k, v)| k.contains('\0') || v.contains('\0')) {
        return Err(AppError::invalid("search", message));
    }
    Ok(pairs)
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
    let done = execute(&state, &req, p, Interaction::Read { rtype, id, elements }).await?;
    rendered(actix_web::http::StatusCode::OK, done)
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
    let (rtype, id, version) = path.into_inner();
    let done = execute(&state, &req, p, Interaction::Vread { rtype, id, version }).await?;
    rendered(actix_web::http::StatusCode::OK, done)
}

pub async fn history(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<(String, String)>,
) -> AppResult<HttpResponse> {
    let (rtype, id) = path.into_inner();
    let done = execute(&state, &req, p, Interaction::History { rtype, id }).await?;
    rendered(actix_web::http::StatusCode::OK, done)
}

/// `POST /fhir/{type}`; with `If-None-Exist`, a conditional create (200 with the one match, nothing created).
pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<String>,
    body: web::Bytes,
) -> AppResult<HttpResponse> {
    let rtype = path.into_inner();
    check_json(&req)?;
    let if_none_exist = match req.headers().get("if-none-exist") {
        None => None,
        Some(v) => {
            let q = v.to_str().map_err(|_| AppError::invalid("If-None-Exist", "The header is malformed."))?;
            let pairs = serde_urlencoded::from_str(q.trim_start_matches('?'))
                .map_err(|_| AppError::invalid("If-None-Exist", "The header is malformed."))?;
            Some(no_nul(pairs, "The If-None-Exist header is malformed.")?)
        }
    };
    let done = execute(&state, &req, p, Interaction::Create { rtype: rtype.clone(), body, if_none_exist }).await?;
    written(&req, &rtype, done)
}

/// The answer to a write: 201 with `Location` for a new resource, 200 for a new version (or a conditional
/// create's match); `Prefer: return=minimal` drops the body.
fn written(req: &HttpRequest, rtype: &str, done: Done) -> AppResult<HttpResponse> {
    let (status, shown) = match done {
        Done::Created(shown) => (actix_web::http::StatusCode::CREATED, shown),
        Done::Resource(shown) => (actix_web::http::StatusCode::OK, shown),
        _ => return Err(AppError::internal("a write answered without a resource")),
    };
    let resp =
        if wants_minimal(req) { HttpResponse::build(status).finish() } else { fhir_json(status, &shown.resource) };
    let mut resp = with_version(resp, &shown);
    if status == actix_web::http::StatusCode::CREATED {
        let id = shown.resource.get("id").and_then(Value::as_str).unwrap_or_default();
        let location = format!("/fhir/{rtype}/{id}/_history/{}", shown.version_id);
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
    }
    Ok(resp)
}

/// `PUT /fhir/{type}?search`: conditional update (no match creates, one match is updated, several are 412).
pub async fn conditional_update(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<String>,
    body: web::Bytes,
) -> AppResult<HttpResponse> {
    let rtype = path.into_inner();
    check_json(&req)?;
    let params = query_pairs(&req)?;
    let if_match = if_match(&req)?;
    let done =
        execute(&state, &req, p, Interaction::ConditionalUpdate { rtype: rtype.clone(), params, if_match, body })
            .await?;
    written(&req, &rtype, done)
}

/// `DELETE /fhir/{type}?search`: conditional delete (one match at most; none is a 204 that changes nothing).
pub async fn conditional_delete(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<String>,
) -> AppResult<HttpResponse> {
    let rtype = path.into_inner();
    let params = query_pairs(&req)?;
    let done = execute(&state, &req, p, Interaction::ConditionalDelete { rtype, params }).await?;
    rendered(actix_web::http::StatusCode::NO_CONTENT, done)
}

/// `PATCH /fhir/{type}/{id}`: JSON Patch (`application/json-patch+json`) or JSON Merge Patch
/// (`application/merge-patch+json`, or a JSON object sent as FHIR JSON), under the `If-Match` rules of PUT.
pub async fn patch(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> AppResult<HttpResponse> {
    let (rtype, id) = path.into_inner();
    let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if ![JSON_PATCH, MERGE_PATCH, FHIR_JSON, "application/json"].contains(&mime) {
        return Err(AppError::UnsupportedMediaType);
    }
    let if_match = if_match(&req)?;
    let done = execute(&state, &req, p, Interaction::Patch { rtype: rtype.clone(), id, if_match, body }).await?;
    written(&req, &rtype, done)
}

const JSON_PATCH: &str = "application/json-patch+json";
const MERGE_PATCH: &str = "application/merge-patch+json";

/// `POST /fhir/{type}/$validate`: the body checked as the caller's create would be; nothing stored. 200 with an
/// OperationOutcome either way (its issue says whether the resource would be accepted).
pub async fn validate(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<String>,
    body: web::Bytes,
) -> AppResult<HttpResponse> {
    let rtype = path.into_inner();
    check_json(&req)?;
    let done = execute(&state, &req, p, Interaction::Validate { rtype, body }).await?;
    rendered(actix_web::http::StatusCode::OK, done)
}

/// `POST /fhir`: a batch or transaction Bundle, up to `limits.max_bundle_bytes`.
pub async fn bundle(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    payload: web::Payload,
) -> AppResult<HttpResponse> {
    check_json(&req)?;
    let body = super::read_body(payload, state.config.limits.max_bundle_bytes).await?;
    let done = execute(&state, &req, p, Interaction::Bundle { body }).await?;
    rendered(actix_web::http::StatusCode::OK, done)
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
    let if_match = if_match(&req)?;
    let done = execute(&state, &req, p, Interaction::Update { rtype: rtype.clone(), id, if_match, body }).await?;
    written(&req, &rtype, done)
}

pub async fn delete(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<(String, String)>,
) -> AppResult<HttpResponse> {
    let (rtype, id) = path.into_inner();
    let done = execute(&state, &req, p, Interaction::Delete { rtype, id }).await?;
    rendered(actix_web::http::StatusCode::NO_CONTENT, done)
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
    pairs.extend(no_nul(form, "The form body is malformed.")?);
    search(&state, &req, p, &rtype, pairs).await
}

async fn search(
    state: &AppState,
    req: &HttpRequest,
    p: Principal,
    rtype: &str,
    params: Vec<(String, String)>,
) -> AppResult<HttpResponse> {
    let interaction = Interaction::Search { rtype: rtype.to_owned(), params, handling: handling(req) };
    let done = execute(state, req, p, interaction).await?;
    rendered(actix_web::http::StatusCode::OK, done)
}

pub async fn everything(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<String>,
) -> AppResult<HttpResponse> {
    let done = execute(&state, &req, p, Interaction::Everything { patient: path.into_inner() }).await?;
    rendered(actix_web::http::StatusCode::OK, done)
}

pub async fn access_report(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    path: web::Path<String>,
) -> AppResult<HttpResponse> {
    let done = execute(&state, &req, p, Interaction::AccessReport { patient: path.into_inner() }).await?;
    rendered(actix_web::http::StatusCode::OK, done)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakGlassBody {
    patient: String,
    #[serde(default)]
    code: Option<String>,
    reason: String,
}

/// `POST /auth/break-glass`: a clinician or nurse opens one patient's record for a limited time.
pub async fn break_glass(
    state: web::Data<AppState>,
    req: HttpRequest,
    p: Principal,
    body: web::Bytes,
) -> AppResult<HttpResponse> {
    // A body that does not parse is still a (refused) break-glass attempt: it is audited like any other.
    let (patient, code, reason) = match serde_json::from_slice::<BreakGlassBody>(&body) {
        Ok(b) => (b.patient, b.code, b.reason),
        Err(_) => (String::new(), None, String::new()),
    };
    let bad_body = patient.is_empty();
    let done = execute(&state, &req, p, Interaction::BreakGlass { patient, code, reason }).await;
    match done {
        Err(AppError::Invalid { .. }) if bad_body => {
            Err(AppError::invalid("patient", "The body must name the patient and a reason."))
        }
        Err(e) => Err(e),
        Ok(Done::Document(grant)) => Ok(HttpResponse::Created().json(grant)),
        Ok(_) => Err(AppError::internal("break-glass answered without a grant")),
    }
}
