//! One error type for the whole service, mapped in one place to an HTTP status and a FHIR OperationOutcome.
//!
//! Outward text is generic and fixed per kind: it may name an element *path* (which the server defines) but
//! never a value the client sent, and never an internal detail. Internal details go to the log, once, here.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

/// The FHIR media type of every body this service returns.
pub const FHIR_JSON: &str = "application/fhir+json";

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Input failed validation. `path` names the element (server-defined names only), `reason` is a fixed text.
    #[error("invalid input")]
    Invalid {
        path: Option<String>,
        reason: &'static str,
    },
    /// Missing, or outside the caller's scope: the two look the same on purpose.
    #[error("not found")]
    NotFound,
    #[error("gone")]
    Gone,
    #[error("unauthenticated")]
    Unauthenticated,
    #[error("forbidden")]
    Forbidden,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("conflict")]
    Conflict,
    #[error("precondition failed")]
    PreconditionFailed,
    #[error("precondition required")]
    PreconditionRequired,
    #[error("payload too large")]
    PayloadTooLarge,
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("too many requests")]
    TooManyRequests { retry_after_secs: u64 },
    /// A dependency (database, audit store, identity provider) is unavailable: fail closed.
    #[error("service unavailable")]
    Unavailable(String),
    /// Anything else. The string goes to the log, never to the client.
    #[error("internal error")]
    Internal(String),
}

impl AppError {
    pub fn invalid(path: impl Into<String>, reason: &'static str) -> Self {
        Self::Invalid {
            path: Some(path.into()),
            reason,
        }
    }

    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self::Internal(detail.to_string())
    }

    pub fn unavailable(detail: impl std::fmt::Display) -> Self {
        Self::Unavailable(detail.to_string())
    }

    /// FHIR issue code and the fixed, generic diagnostics for this kind.
    fn issue(&self) -> (&'static str, &'static str) {
        match self {
            Self::Invalid { reason, .. } => ("invalid", reason),
            Self::NotFound => ("not-found", "The resource was not found."),
            Self::Gone => ("deleted", "The resource has been deleted."),
            Self::Unauthenticated => ("login", "Authentication is required."),
            Self::Forbidden => ("forbidden", "The operation is not permitted."),
            Self::MethodNotAllowed => ("not-supported", "The operation is not supported."),
            Self::Conflict => ("conflict", "The request conflicts with the current state."),
            Self::PreconditionFailed => (
                "conflict",
                "The version does not match the current version.",
            ),
            Self::PreconditionRequired => (
                "required",
                "An If-Match header with the current version is required.",
            ),
            Self::PayloadTooLarge => ("too-costly", "The request body is too large."),
            Self::UnsupportedMediaType => ("not-supported", "The content type is not supported."),
            Self::TooManyRequests { .. } => ("throttled", "Too many requests; retry later."),
            Self::Unavailable(_) => ("transient", "The service is temporarily unavailable."),
            Self::Internal(_) => ("exception", "An internal error occurred."),
        }
    }
}

/// Renders a FHIR OperationOutcome with one issue.
pub fn operation_outcome(
    severity: &str,
    code: &str,
    diagnostics: &str,
    path: Option<&str>,
) -> serde_json::Value {
    let mut issue = json!({ "severity": severity, "code": code, "diagnostics": diagnostics });
    if let Some(p) = path {
        issue["expression"] = json!([p]);
    }
    json!({ "resourceType": "OperationOutcome", "issue": [issue] })
}

impl ResponseError for AppError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Gone => StatusCode::GONE,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict => StatusCode::CONFLICT,
            Self::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            Self::PreconditionRequired => StatusCode::PRECONDITION_REQUIRED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            // The detail is ours (never client input); it is logged once, here, and never sent.
            Self::Internal(detail) => tracing::error!(error.detail = %detail, "internal error"),
            Self::Unavailable(detail) => {
                tracing::warn!(error.detail = %detail, "dependency unavailable")
            }
            _ => {}
        }
        let (code, text) = self.issue();
        let path = match self {
            Self::Invalid { path, .. } => path.as_deref(),
            _ => None,
        };
        let mut resp = HttpResponse::build(self.status_code());
        resp.insert_header((header::CONTENT_TYPE, FHIR_JSON));
        match self {
            Self::Unauthenticated => {
                resp.insert_header((
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"carevault\""),
                ));
            }
            Self::TooManyRequests { retry_after_secs } => {
                resp.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
            }
            _ => {}
        }
        resp.body(operation_outcome("error", code, text, path).to_string())
    }
}

pub type AppResult<T> = Result<T, AppError>;

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;

    #[test]
    fn internal_detail_never_reaches_the_body() {
        let resp = AppError::internal("SELECT secret FROM patients").error_response();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = resp.into_body().try_into_bytes().unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("OperationOutcome"));
    }

    #[test]
    fn invalid_names_the_path_only() {
        let resp = AppError::invalid("Patient.birthDate", "The value is not a valid date.")
            .error_response();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let body = resp.into_body().try_into_bytes().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["issue"][0]["expression"][0], "Patient.birthDate");
    }
}
