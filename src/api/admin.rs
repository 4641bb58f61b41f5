//! `/admin/alerts` (CONTRACT §8): the stored alerts, for the admin and auditor roles only, filtered by rule,
//! severity and time; `POST /admin/alerts/{id}/ack` acknowledges one with a note (stored encrypted: it is free
//! text). Both are audited. Filter values are checked against fixed sets and never echoed.

use crate::api::auth::{client_ip, principal_agent};
use crate::app::AppState;
use crate::audit::{AuditEvent, AuditKind, Outcome};
use crate::auth::principal::Principal;
use crate::error::{AppError, AppResult};
use crate::monitor::{self, Alert, AlertFilter, Severity, Subject, rules};
use crate::role::Role;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Default and largest page of alerts.
const DEFAULT_COUNT: i64 = 100;
const MAX_COUNT: i64 = 1000;
/// Longest acknowledgement note, in bytes.
const MAX_NOTE: usize = 2000;

fn require_admin_or_auditor(p: &Principal) -> AppResult<()> {
    if p.has_any_role(&[Role::Admin, Role::Auditor]) { Ok(()) } else { Err(AppError::Forbidden) }
}

fn parse_filter(query: &str) -> AppResult<AlertFilter> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query).map_err(|_| AppError::invalid("query", "The query is invalid."))?;
    let mut f = AlertFilter { limit: DEFAULT_COUNT, ..AlertFilter::default() };
    let time = |v: &str, path: &'static str| {
        OffsetDateTime::parse(v, &Rfc3339)
            .map(crate::crypto::store::micros)
            .map_err(|_| AppError::invalid(path, "Expected an RFC 3339 date-time."))
    };
    for (k, v) in pairs {
        match k.as_str() {
            "rule" => {
                let r = rules::rule(&v).ok_or_else(|| AppError::invalid("rule", "Unknown rule."))?;
                f.rule = Some(r.name);
            }
            "severity" => {
                f.severity =
                    Some(Severity::parse(&v).ok_or_else(|| AppError::invalid("severity", "Unknown severity."))?);
            }
            "since" => f.since = Some(time(&v, "since")?),
            "until" => f.until = Some(time(&v, "until")?),
            "_count" => {
                let n: i64 = v.parse().map_err(|_| AppError::invalid("_count", "Expected a positive number."))?;
                if n < 1 {
                    return Err(AppError::invalid("_count", "Expected a positive number."));
                }
                f.limit = n.min(MAX_COUNT);
            }
            _ => return Err(AppError::invalid("query", "Unknown query parameter.")),
        }
    }
    Ok(f)
}

/// The list/ack view of an alert: the webhook payload plus acknowledgement and delivery state.
async fn view(state: &AppState, alert: &Alert) -> serde_json::Value {
    let mut v = alert.payload();
    let note = match &alert.ack_note {
        None => None,
        Some(ct) => match state.cipher.decrypt(&monitor::ack_note_aad(&alert.id), ct) {
            Ok(bytes) => String::from_utf8(bytes.to_vec()).ok(),
            Err(_) => {
                let now = state.clock.now();
                let subject = Subject::System("field-cipher");
                if let Err(e) = monitor::raise(&state.db, &state.config, rules::DECRYPT_FAILURE, subject, 1, now).await
                {
                    tracing::error!(error.kind = %e, "cannot raise the decrypt-failure alert");
                }
                None
            }
        },
    };
    v["acknowledged_at"] = json!(alert.acknowledged_at.map(monitor::rfc3339));
    v["ack_note"] = json!(note);
    v["delivery"] = json!(alert.delivery);
    v["attempts"] = json!(alert.attempts);
    v
}

/// `GET /admin/alerts?rule=&severity=&since=&until=&_count=`: newest first.
pub async fn list(state: web::Data<AppState>, req: HttpRequest, principal: Principal) -> AppResult<HttpResponse> {
    require_admin_or_auditor(&principal)?;
    let filter = parse_filter(req.query_string())?;
    let found = state.db.run(move |c| monitor::list(c, &filter)).await?;
    let event = AuditEvent::new(
        AuditKind::Admin,
        state.clock.now(),
        Outcome::Success,
        principal_agent(&principal, client_ip(&req)),
    )
    .with_detail("alerts-listed");
    state.audit.record(event).await?;
    let mut out = Vec::with_capacity(found.len());
    for a in &found {
        out.push(view(&state, a).await);
    }
    Ok(HttpResponse::Ok().json(json!({ "alerts": out })))
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
    require_admin_or_auditor(&principal)?;
    let body: AckBody = serde_json::from_slice(&body)
        .map_err(|_| AppError::invalid("note", "A JSON object with a note is required."))?;
    let note = body.note.trim();
    if note.is_empty() || note.len() > MAX_NOTE {
        return Err(AppError::invalid("note", "The note must be 1 to 2000 bytes."));
    }
    let id = path.into_inner();
    let ciphertext = state.cipher.encrypt(&monitor::ack_note_aad(&id), note.as_bytes()).map_err(AppError::internal)?;
    let agent = principal_agent(&principal, client_ip(&req));
    let now = state.clock.now();
    let alert = state
        .db
        .run(move |c| monitor::acknowledge(c, &id, Some(ciphertext), agent, now))
        .await?
        .ok_or(AppError::NotFound)?;
    Ok(HttpResponse::Ok().json(view(&state, &alert).await))
}
