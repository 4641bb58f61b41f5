//! HTTP only: routes are registered in one place ([`routes`]); handlers parse, call a service, render.

pub mod admin;
pub mod auth;
pub mod client_addr;
pub mod cors;
pub mod error;
pub mod fhir;
pub mod health;
pub mod limit;
pub mod oidc;
pub mod openapi;
pub mod smart;

use crate::app::AppState;
use crate::error::AppError;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::{ErrorHandlerResponse, Next};
use actix_web::{HttpResponse, web};
use error::{FHIR_JSON, operation_outcome};
use futures_util::StreamExt;

/// Every route of the service. Each is listed in [`openapi::ROUTES`] too (a test compares the two), so the
/// OpenAPI document at `/openapi.json` covers every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/health/live").route(web::get().to(health::live)))
        .service(web::resource("/health/ready").route(web::get().to(health::ready)))
        .service(web::resource("/openapi.json").route(web::get().to(openapi::serve)))
        .service(web::resource("/.well-known/jwks.json").route(web::get().to(auth::jwks)))
        .service(web::resource("/.well-known/smart-configuration").route(web::get().to(smart::configuration)))
        .service(web::resource("/fhir/.well-known/smart-configuration").route(web::get().to(smart::configuration)))
        .service(web::resource("/auth/authorize").route(web::get().to(smart::authorize)))
        .service(web::resource("/auth/authorize/login").route(web::post().to(smart::login)))
        .service(web::resource("/auth/authorize/oidc").route(web::post().to(smart::provider_sign_in)))
        .service(web::resource("/auth/authorize/consent").route(web::post().to(smart::consent)))
        .service(web::resource("/auth/introspect").route(web::post().to(smart::introspect)))
        .service(web::resource("/auth/login").route(web::post().to(auth::login)))
        .service(web::resource("/auth/token").route(web::post().to(auth::token)))
        .service(web::resource("/auth/revoke").route(web::post().to(auth::revoke)))
        .service(web::resource("/auth/logout").route(web::post().to(auth::logout)))
        .service(web::resource("/auth/break-glass").route(web::post().to(fhir::break_glass)))
        .service(web::resource("/fhir/metadata").route(web::get().to(fhir::metadata)))
        .service(web::resource("/fhir").route(web::post().to(fhir::bundle)))
        .service(web::resource("/fhir/Patient/{id}/$everything").route(web::get().to(fhir::everything)))
        .service(web::resource("/fhir/Patient/{id}/$access-report").route(web::get().to(fhir::access_report)))
        .service(web::resource("/fhir/{type}/_search").route(web::post().to(fhir::search_post)))
        .service(web::resource("/fhir/{type}/$validate").route(web::post().to(fhir::validate)))
        .service(web::resource("/fhir/{type}/{id}/_history/{vid}").route(web::get().to(fhir::vread)))
        .service(web::resource("/fhir/{type}/{id}/_history").route(web::get().to(fhir::history)))
        .service(
            web::resource("/fhir/{type}/{id}")
                .route(web::get().to(fhir::read))
                .route(web::put().to(fhir::update))
                .route(web::patch().to(fhir::patch))
                .route(web::delete().to(fhir::delete)),
        )
        .service(
            web::resource("/fhir/{type}")
                .route(web::get().to(fhir::search_get))
                .route(web::post().to(fhir::create))
                .route(web::put().to(fhir::conditional_update))
                .route(web::delete().to(fhir::conditional_delete)),
        )
        .service(web::resource("/auth/session").route(web::get().to(auth::session)))
        .service(web::resource("/auth/oidc/login").route(web::get().to(oidc::login)))
        .service(web::resource("/auth/oidc/callback").route(web::get().to(oidc::callback)))
        .service(web::resource("/admin/alerts").route(web::get().to(admin::list)))
        .service(web::resource("/admin/alerts/{id}/ack").route(web::post().to(admin::ack)));
}

/// Unknown routes answer 404 with an OperationOutcome.
pub async fn not_found() -> HttpResponse {
    actix_web::ResponseError::error_response(&AppError::NotFound)
}

/// Security headers on every response (CONTRACT §2).
pub fn security_headers() -> actix_web::middleware::DefaultHeaders {
    actix_web::middleware::DefaultHeaders::new()
        .add((header::STRICT_TRANSPORT_SECURITY, "max-age=63072000"))
        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .add((header::CACHE_CONTROL, "no-store"))
        .add((header::X_FRAME_OPTIONS, "DENY"))
        .add((header::CONTENT_SECURITY_POLICY, "default-src 'none'; frame-ancestors 'none'"))
        .add((header::REFERRER_POLICY, "no-referrer"))
}

/// Any error response not already an OperationOutcome (extractor failures, the rate limiter, actix defaults)
/// gets a generic one for its status, so no framework text (which can quote input) reaches a client.
pub fn outcome_for_plain_errors<B>(res: ServiceResponse<B>) -> actix_web::Result<ErrorHandlerResponse<B>> {
    // Our own bodies: OperationOutcomes and RFC 6749 JSON errors (framework errors are text/plain).
    let ours = res.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes().starts_with(FHIR_JSON.as_bytes()) || v.as_bytes().starts_with(b"application/json")
    });
    if ours {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let (code, text) = generic_issue(status);
    let (req, mut resp) = res.into_parts();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    if status == StatusCode::UNAUTHORIZED && !resp.headers().contains_key(header::WWW_AUTHENTICATE) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"carevault\""));
    }
    let resp = resp.set_body(operation_outcome("error", code, text, None).to_string()).map_into_boxed_body();
    Ok(ErrorHandlerResponse::Response(ServiceResponse::new(req, resp).map_into_right_body()))
}

fn generic_issue(status: StatusCode) -> (&'static str, &'static str) {
    match status {
        StatusCode::NOT_FOUND => ("not-found", "The resource was not found."),
        StatusCode::METHOD_NOT_ALLOWED => ("not-supported", "The operation is not supported."),
        StatusCode::PAYLOAD_TOO_LARGE => ("too-costly", "The request body is too large."),
        StatusCode::TOO_MANY_REQUESTS => ("throttled", "Too many requests; retry later."),
        StatusCode::UNAUTHORIZED => ("login", "Authentication is required."),
        StatusCode::FORBIDDEN => ("forbidden", "The operation is not permitted."),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("not-supported", "The content type is not supported."),
        s if s.is_server_error() => ("exception", "An internal error occurred."),
        _ => ("invalid", "The request is invalid."),
    }
}

/// Rejects a declared body above the limit before anything reads it (413).
pub async fn body_limit(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody + 'static>, actix_web::Error> {
    // Bundles (`POST /fhir`) have their own, larger limit; every other body has `limits.max_body_bytes`.
    let bundle = req.method() == actix_web::http::Method::POST && req.path().trim_end_matches('/') == "/fhir";
    let max = req.app_data::<web::Data<AppState>>().map_or_else(
        || crate::config::LimitsConfig::default().max_body_bytes,
        |s| if bundle { s.config.limits.max_bundle_bytes } else { s.config.limits.max_body_bytes },
    );
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        let resp = actix_web::ResponseError::error_response(&AppError::PayloadTooLarge);
        return Ok(req.into_response(resp).map_into_right_body());
    }
    next.call(req).await.map(ServiceResponse::map_into_left_body)
}

/// Reads a request body, enforcing the limit also for chunked bodies that declared no length.
pub async fn read_body(mut payload: web::Payload, max: usize) -> Result<web::Bytes, AppError> {
    let mut buf = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| AppError::invalid("body", "The request body could not be read."))?;
        if buf.len() + chunk.len() > max {
            return Err(AppError::PayloadTooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}
