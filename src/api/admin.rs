//! `/admin/alerts` (CONTRACT §8): the stored alerts, for the admin and auditor roles only, filtered by rule,
//! severity and time; `POST /admin/alerts/{id}/ack` acknowledges one with a note (stored encrypted: it is free
//! text). Both are audited. Filter values are checked against fixed sets and never echoed.

use crate::api::auth::client_ip;
use crate::app::AppState;
use crate::auth::principal::Principal;
use crate::error::{AppError, AppResult};
use crate::records::{Caller, Done, Interaction, Operation};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

/// `GET /admin/alerts?rule=&severity=&since=&until=&_count=`: newest first. Audited (refusals too).
pub async fn list(state: web::Data<AppState>, req: HttpRequest, principal: Principal) -> AppResult<HttpResponse> {
    let query = req.query_string().to_owned();
    let op = Operation::new(Caller { principal, ip: client_ip(&req) }, Interaction::ListAlerts { query });
    match state.records.execute(op).await? {
        Done::Document(body) => Ok(HttpResponse::Ok().json(body)),
        _ => Err(AppError::internal("alert list answered without a document")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckBody {
    note: String,
}

/// `POST /admin/alerts/{id}/ack` with `{"note": "..."}`: 200 with the alert, 404 unknown, 409 already done.
pub async fn ack(
    state: web::Data<AppState>,
    req: HttpRequest,
    principal: Principal,
    path: web::Path<String>,
    body: web::Bytes,
) -> AppResult<HttpResponse> {
    let note = serde_json::from_slice::<AckBody>(&body).map(|b| b.note).unwrap_or_default();
    let op = Operation::new(
        Caller { principal, ip: client_ip(&req) },
        Interaction::AckAlert { alert: path.into_inner(), note },
    );
    match state.records.execute(op).await? {
        Done::Document(body) => Ok(HttpResponse::Ok().json(body)),
        _ => Err(AppError::internal("alert acknowledgement answered without a document")),
    }
}
