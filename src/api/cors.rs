//! CORS for browser apps on other origins (CONTRACT §5b), with `actix-cors`: only the origins in
//! `cors.allowed_origins` (exact match; default none, so no response carries CORS headers), no credentials
//! (bearer tokens travel in `Authorization`, never in cookies), the headers FHIR clients send, and the response
//! headers they read (ETag, Location, …). A request from any other origin is answered as if CORS did not exist:
//! the browser then refuses the page access to it.

use actix_cors::Cors;
use actix_web::http::{Method, header};

/// How long a browser may cache a preflight answer.
const MAX_AGE_SECS: usize = 600;

pub fn layer(allowed: &[String]) -> Cors {
    let mut cors = Cors::default()
        .allowed_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
        .allowed_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            header::HeaderName::from_static("if-none-exist"),
            header::HeaderName::from_static("prefer"),
        ])
        .expose_headers([
            header::ETAG,
            header::LOCATION,
            header::CONTENT_LOCATION,
            header::LAST_MODIFIED,
            header::RETRY_AFTER,
            header::WWW_AUTHENTICATE,
        ])
        .max_age(MAX_AGE_SECS);
    for origin in allowed {
        cors = cors.allowed_origin(origin);
    }
    cors
}
