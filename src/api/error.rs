//! The one mapping from [`AppError`] to HTTP: a status, headers, and a FHIR OperationOutcome.
//!
//! Outward text is generic and fixed per kind: it may name an element *path* (which the server defines) but
//! never a value the client sent, and never an internal detail. For a 5xx the whole cause chain goes to the log,
//! once, here (where the error is rendered); the body says only that an internal error occurred.

use crate::error::{AppError, Chain};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

/// The FHIR media type of every body this service returns.
pub const FHIR_JSON: &str = "application/fhir+json";

/// Renders a FHIR OperationOutcome with one issue.
pub fn operation_outcome(severity: &str, code: &str, diagnostics: &str, path: Option<&str>) -> serde_json::Value {
    let mut issue = json!({ "severity": severity, "code": code, "diagnostics": diagnostics });
    if let Some(p) = path {
        issue["expression"] = json!([p]);
    }
    json!({ "resourceType": "OperationOutcome", "issue": [issue] })
}

/// The HTTP status of each kind.
pub fn status_of(e: &AppError) -> StatusCode {
    match e {
        AppError::InEntry { source, .. } => status_of(source),
        AppError::Invalid { .. } => StatusCode::BAD_REQUEST,
        AppError::NotFound => StatusCode::NOT_FOUND,
        AppError::Gone => StatusCode::GONE,
        AppError::Unauthenticated => StatusCode::UNAUTHORIZED,
        AppError::Forbidden | AppError::ForbiddenElement { .. } => StatusCode::FORBIDDEN,
        AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        AppError::Conflict => StatusCode::CONFLICT,
        AppError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
        AppError::PreconditionRequired => StatusCode::PRECONDITION_REQUIRED,
        AppError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        AppError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        AppError::TooManyRequests { .. } | AppError::ConcurrencyLimit { .. } => StatusCode::TOO_MANY_REQUESTS,
        AppError::Unavailable(_) | AppError::UnavailableFrom { .. } => StatusCode::SERVICE_UNAVAILABLE,
        AppError::Internal(_) | AppError::InternalFrom { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// FHIR issue code and the fixed, generic diagnostics for each kind.
fn issue(e: &AppError) -> (&'static str, &'static str) {
    match e {
        AppError::InEntry { source, .. } => issue(source),
        AppError::Invalid { reason, .. } => ("invalid", reason),
        AppError::NotFound => ("not-found", "The resource was not found."),
        AppError::Gone => ("deleted", "The resource has been deleted."),
        AppError::Unauthenticated => ("login", "Authentication is required."),
        AppError::Forbidden => ("forbidden", "The operation is not permitted."),
        AppError::ForbiddenElement { .. } => ("forbidden", "The operation is not permitted on this element."),
        AppError::MethodNotAllowed => ("not-supported", "The operation is not supported."),
        AppError::Conflict => ("conflict", "The request conflicts with the current state."),
        AppError::PreconditionFailed => ("conflict", "The version does not match the current version."),
        AppError::PreconditionRequired => ("required", "An If-Match header with the current version is required."),
        AppError::PayloadTooLarge => ("too-costly", "The request body is too large."),
        AppError::UnsupportedMediaType => ("not-supported", "The content type is not supported."),
        AppError::TooManyRequests { .. } => ("throttled", "Too many requests; retry later."),
        AppError::ConcurrencyLimit { .. } => (
            "throttled",
            "Too many expensive requests in flight for this account (limits.max_concurrent_per_account); retry later.",
        ),
        AppError::Unavailable(_) | AppError::UnavailableFrom { .. } => {
            ("transient", "The service is temporarily unavailable.")
        }
        AppError::Internal(_) | AppError::InternalFrom { .. } => ("exception", "An internal error occurred."),
    }
}

/// Logs a server-side failure with its whole cause chain (ours, never client input), once: called only where
/// the error is rendered.
fn log(e: &AppError) {
    match e {
        AppError::InEntry { source, .. } => log(source),
        AppError::Internal(_) | AppError::InternalFrom { .. } => {
            tracing::error!(error.detail = %Chain(e), "internal error")
        }
        AppError::Unavailable(_) | AppError::UnavailableFrom { .. } => {
            tracing::warn!(error.detail = %Chain(e), "dependency unavailable")
        }
        _ => {}
    }
}

/// The OperationOutcome for an error (generic text only; the element path when the error names one).
pub fn outcome_of(e: &AppError) -> serde_json::Value {
    if let AppError::InEntry { index, source } = e {
        // The entry first, then the element within it when the entry's error names one.
        let mut outcome = outcome_of(source);
        let entry = json!(format!("Bundle.entry[{index}]"));
        if let Some(issue) = outcome["issue"].get_mut(0) {
            match issue.get_mut("expression").and_then(serde_json::Value::as_array_mut) {
                Some(paths) => paths.insert(0, entry),
                None => issue["expression"] = json!([entry]),
            }
        }
        return outcome;
    }
    let (code, text) = issue(e);
    let path = match e {
        AppError::Invalid { path, .. } => path.as_deref(),
        AppError::ForbiddenElement { path } => Some(path.as_str()),
        _ => None,
    };
    operation_outcome("error", code, text, path)
}

/// The response for an error: status, headers and the OperationOutcome (generic text only).
pub fn render(e: &AppError) -> HttpResponse {
    log(e);
    let mut resp = HttpResponse::build(status_of(e));
    resp.insert_header((header::CONTENT_TYPE, FHIR_JSON));
    let headers_of = match e {
        AppError::InEntry { source, .. } => source.as_ref(),
        other => other,
    };
    match headers_of {
        AppError::Unauthenticated => {
            resp.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"carevault\"")));
        }
        AppError::TooManyRequests { retry_after_secs } | AppError::ConcurrencyLimit { retry_after_secs, .. } => {
            resp.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
        }
        _ => {}
    }
    resp.body(outcome_of(e).to_string())
}

impl ResponseError for AppError {
    fn status_code(&self) -> StatusCode {
        status_of(self)
    }

    fn error_response(&self) -> HttpResponse {
        render(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Cause;
    use actix_web::body::MessageBody;
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    fn body(resp: HttpResponse) -> String {
        let bytes = resp.into_body().try_into_bytes().unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::ErrorKind::Other)?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Renders `e` with the service's own log layer installed; returns the response and the log lines.
    fn render_logged(e: &AppError) -> (HttpResponse, Vec<serde_json::Value>) {
        let out = Capture::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::registry()
            .with(crate::telemetry::log_layer(move || sink.clone(), tracing_subscriber::EnvFilter::new("trace")));
        let resp = tracing::subscriber::with_default(subscriber, || e.error_response());
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        (resp, text.lines().map(|l| serde_json::from_str(l).unwrap()).collect())
    }

    #[test]
    fn internal_error_body_is_generic_while_the_log_has_the_whole_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("loading the data keys")]
        struct KeyLoad(#[source] Cause);
        let e = AppError::internal_from("cannot read the key table", KeyLoad(Cause("disk I/O error")));
        let (resp, lines) = render_logged(&e);
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let text = body(resp);
        assert!(text.contains("An internal error occurred."), "{text}");
        for detail in ["key table", "loading the data keys", "disk I/O error"] {
            assert!(!text.contains(detail), "{detail} leaked into the body: {text}");
        }
        let logged: Vec<&serde_json::Value> = lines.iter().filter(|l| l["message"] == "internal error").collect();
        assert_eq!(logged.len(), 1, "logged once where rendered: {lines:?}");
        assert_eq!(
            logged[0]["error.detail"],
            "internal error: cannot read the key table: caused by loading the data keys: caused by disk I/O error"
        );
        assert_eq!(logged[0]["level"], "ERROR");
    }

    #[test]
    fn unavailable_is_503_generic_and_logged_with_its_cause() {
        let e = AppError::unavailable_from("database", Cause("timed out waiting for connection"));
        let (resp, lines) = render_logged(&e);
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let text = body(resp);
        assert!(!text.contains("timed out"), "{text}");
        assert!(lines.iter().any(|l| {
            l["error.detail"]
                .as_str()
                .is_some_and(|d| d.ends_with("database: caused by timed out waiting for connection"))
        }));
    }

    #[test]
    fn internal_detail_never_reaches_the_body() {
        let resp = AppError::internal("SELECT secret FROM patients").error_response();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let text = body(resp);
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("OperationOutcome"));
    }

    #[test]
    fn client_errors_are_not_logged() {
        let (resp, lines) = render_logged(&AppError::NotFound);
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert!(lines.is_empty(), "{lines:?}");
    }

    #[test]
    fn the_concurrency_limit_is_429_with_retry_after_naming_the_setting() {
        let resp = AppError::ConcurrencyLimit { setting: "limits.max_concurrent_per_account", retry_after_secs: 1 }
            .error_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers().get(header::RETRY_AFTER).unwrap(), "1");
        let v: serde_json::Value = serde_json::from_str(&body(resp)).unwrap();
        assert_eq!(v["issue"][0]["code"], "throttled");
        assert!(v["issue"][0]["diagnostics"].as_str().unwrap().contains("limits.max_concurrent_per_account"));
    }

    #[test]
    fn invalid_names_the_path_only() {
        let resp = AppError::invalid("Patient.birthDate", "The value is not a valid date.").error_response();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let v: serde_json::Value = serde_json::from_str(&body(resp)).unwrap();
        assert_eq!(v["issue"][0]["expression"][0], "Patient.birthDate");
    }
}
