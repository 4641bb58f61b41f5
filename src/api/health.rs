//! Liveness and readiness: no PHI, no authentication.

use crate::app::AppState;
use actix_web::{HttpResponse, web};
use serde_json::json;

/// The process is up.
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "live" }))
}

/// The database answers and every migration has run.
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let db = state.db.clone();
    let ok = web::block(move || db.ready()).await.unwrap_or(false);
    if ok {
        HttpResponse::Ok().json(json!({ "status": "ready" }))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({ "status": "unavailable" }))
    }
}
