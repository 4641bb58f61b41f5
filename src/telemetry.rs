//! Structured JSON logs on stdout, and the request log: request id, method, route *template*, status, duration.
//! Never the raw path (it holds ids), query values, credential headers or bodies.

use actix_web::Error;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use std::time::Instant;
use tracing_subscriber::EnvFilter;

/// Installs the JSON log subscriber once per process; `CAREVAULT_LOG` sets the filter (default `info`).
pub fn init_logging() {
    let filter = EnvFilter::try_from_env("CAREVAULT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .try_init();
}

/// Replaces panic output with a line that carries no payload (a panic message may quote data).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        tracing::error!(panic.location = %location, "panic (payload withheld)");
    }));
}

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request id of the request being served (set by [`request_log`]).
#[derive(Debug, Clone, Copy)]
pub struct RequestId(pub uuid::Uuid);

/// Logs one line per request with the route template only, and sets `X-Request-Id`.
pub async fn request_log(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let started = Instant::now();
    let id = uuid::Uuid::new_v4();
    actix_web::HttpMessage::extensions_mut(&req).insert(RequestId(id));
    let method = req.method().clone();
    let mut res = next.call(req).await?;
    let route = res.request().match_pattern().unwrap_or_else(|| "(unmatched)".to_owned());
    let status = res.status().as_u16();
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        res.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    tracing::info!(
        target: "carevault::http",
        request_id = %id,
        http.method = %method,
        http.route = %route,
        http.status = status,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    Ok(res)
}
