//! Monitoring and incidents (CONTRACT §8): detection rules over the audit stream, stored alerts, signed
//! webhook delivery, and the incident report / containment behind `carevault incident`.
//!
//! Guarantees:
//! - An alert holds a rule name, a severity, a subject (account id, client address or a fixed system code, see
//!   [`Subject`]), a count and a window: never a name or PHI.
//! - At most one open (unacknowledged) alert per (rule, subject) per window, across replicas: the check and
//!   the insert run under the audit chain lock, in the transaction that also audits the alert.
//! - Every alert is audited (kind `alert`, detail = the rule name) in the same transaction that stores it.
//! - Delivery state lives in the alert row, so a restart or a receiver outage loses no alert ([`sink`]).

pub mod engine;
pub mod incident;
pub mod rules;
pub mod sink;

pub use engine::Monitor;
pub use rules::{RULES, Rule, Severity, Subject};

use crate::audit::store::{append_locked, lock_head};
use crate::audit::{Agent, AuditEvent, AuditKind, Outcome};
use crate::auth::service::from_micros;
use crate::config::Config;
use crate::crypto::store::micros;
use crate::error::{AppError, AppResult};
use crate::store::schema::alerts;
use crate::store::{AnyConnection, Db};
use diesel::prelude::*;
use serde_json::json;
use std::sync::Arc;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

/// Delivery states of an alert.
pub mod delivery {
    /// Waiting for (another) webhook attempt.
    pub const PENDING: &str = "pending";
    /// The receiver answered 2xx.
    pub const DELIVERED: &str = "delivered";
    /// No webhook is configured; the alert is only stored.
    pub const NOT_CONFIGURED: &str = "not-configured";
}

/// A stored alert row.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = alerts)]
pub struct Alert {
    pub id: String,
    pub rule: String,
    pub severity: String,
    pub subject: String,
    pub count: i64,
    pub window_secs: i64,
    pub raised_at: i64,
    pub acknowledged_at: Option<i64>,
    /// Ciphertext (the note is free text and may name a patient); see [`ack_note_aad`].
    pub ack_note: Option<String>,
    pub delivery: String,
    pub attempts: i32,
    pub next_attempt: Option<i64>,
}

/// Where an acknowledgement note's ciphertext is bound.
pub fn ack_note_aad(alert_id: &str) -> crate::crypto::FieldAad<'_> {
    crate::crypto::FieldAad::new("Alert", alert_id, "ack_note")
}

pub fn rfc3339(micros: i64) -> String {
    from_micros(micros).format(&Rfc3339).unwrap_or_default()
}

impl Alert {
    /// The JSON sent to the webhook: identifiers, counts and times only.
    pub fn payload(&self) -> serde_json::Value {
        json!({
            "id": self.id,
            "rule": self.rule,
            "severity": self.severity,
            "subject": self.subject,
            "count": self.count,
            "window_secs": self.window_secs,
            "raised_at": rfc3339(self.raised_at),
        })
    }
}

/// Raises an alert for `rule` about `subject` unless one is already open for them within the rule's window;
/// returns the new alert, or `None` when an open one was found (its count is raised to `count` if higher).
/// For integrity failures, call this directly, e.g.
/// `raise(&state.db, &state.config, rules::DECRYPT_FAILURE, Subject::System("field-cipher"), 1, now)`.
pub async fn raise(
    db: &Db,
    sealer: &Arc<crate::audit::seal::Sealer>,
    config: &Config,
    rule: &'static str,
    subject: Subject,
    count: i64,
    now: OffsetDateTime,
) -> AppResult<Option<Alert>> {
    let rule = rules::rule(rule).ok_or_else(|| AppError::internal("unknown alert rule"))?;
    let window = rule.window_for(config);
    let webhook = config.alerts.webhook_url.is_some();
    let sealer = sealer.clone();
    db.run(move |c| raise_with(c, &sealer, rule, &subject, count, window, webhook, now)).await
}

/// [`raise`] on a connection the caller holds.
#[allow(clippy::too_many_arguments)]
pub fn raise_with(
    conn: &mut AnyConnection,
    sealer: &crate::audit::seal::Sealer,
    rule: &'static Rule,
    subject: &Subject,
    count: i64,
    window_secs: i64,
    webhook: bool,
    now: OffsetDateTime,
) -> AppResult<Option<Alert>> {
    let subject = subject.to_string();
    conn.transaction(|c| {
        let head = lock_head(c)?;
        let since = micros(now).saturating_sub(window_secs.saturating_mul(1_000_000));
        let open: Option<(String, i64)> = alerts::table
            .filter(alerts::rule.eq(rule.name))
            .filter(alerts::subject.eq(&subject))
            .filter(alerts::acknowledged_at.is_null())
            .filter(alerts::raised_at.gt(since))
            .order(alerts::raised_at.desc())
            .select((alerts::id, alerts::count))
            .first(c)
            .optional()?;
        if let Some((id, known)) = open {
            if count > known {
                diesel::update(alerts::table.filter(alerts::id.eq(id))).set(alerts::count.eq(count)).execute(c)?;
            }
            return Ok(None);
        }
        let id = Uuid::new_v4();
        let alert = Alert {
            id: id.to_string(),
            rule: rule.name.to_owned(),
            severity: rule.severity.as_str().to_owned(),
            subject,
            count,
            window_secs,
            raised_at: micros(now),
            acknowledged_at: None,
            ack_note: None,
            delivery: if webhook { delivery::PENDING } else { delivery::NOT_CONFIGURED }.to_owned(),
            attempts: 0,
            next_attempt: webhook.then(|| micros(now)),
        };
        diesel::insert_into(alerts::table).values(&alert).execute(c)?;
        let event = AuditEvent::new(AuditKind::Alert, now, Outcome::Success, Agent::default())
            .with_resource("Alert", Some(id), None)
            .with_detail(rule.name);
        append_locked(c, sealer, head, &[event])?;
        tracing::warn!(alert.id = %alert.id, alert.rule = rule.name, alert.severity = %alert.severity, "alert raised");
        Ok(Some(alert))
    })
}

/// Filters of `GET /admin/alerts`.
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    pub rule: Option<&'static str>,
    pub severity: Option<Severity>,
    /// Unix micros, inclusive.
    pub since: Option<i64>,
    /// Unix micros, exclusive.
    pub until: Option<i64>,
    pub limit: i64,
}

/// Alerts, newest first.
pub fn list(conn: &mut AnyConnection, f: &AlertFilter) -> AppResult<Vec<Alert>> {
    let mut q = alerts::table.select(Alert::as_select()).into_boxed();
    if let Some(r) = f.rule {
        q = q.filter(alerts::rule.eq(r));
    }
    if let Some(s) = f.severity {
        q = q.filter(alerts::severity.eq(s.as_str()));
    }
    if let Some(t) = f.since {
        q = q.filter(alerts::raised_at.ge(t));
    }
    if let Some(t) = f.until {
        q = q.filter(alerts::raised_at.lt(t));
    }
    Ok(q.order((alerts::raised_at.desc(), alerts::id.asc())).limit(f.limit.max(1)).load(conn)?)
}

pub fn find(conn: &mut AnyConnection, id: &str) -> AppResult<Option<Alert>> {
    Ok(alerts::table.filter(alerts::id.eq(id)).select(Alert::as_select()).first(conn).optional()?)
}

/// Acknowledges an open alert with an (already encrypted) note, auditing it in the same transaction.
/// `Ok(None)`: no such alert; `Err(Conflict)`: already acknowledged.
pub fn acknowledge(
    conn: &mut AnyConnection,
    sealer: &crate::audit::seal::Sealer,
    id: &str,
    note_ciphertext: Option<String>,
    agent: Agent,
    now: OffsetDateTime,
) -> AppResult<Option<Alert>> {
    let Ok(uuid) = Uuid::parse_str(id) else { return Ok(None) };
    conn.transaction(|c| {
        let head = lock_head(c)?;
        let Some(_) = find(c, id)? else { return Ok(None) };
        let n = diesel::update(alerts::table.filter(alerts::id.eq(id)).filter(alerts::acknowledged_at.is_null()))
            .set((alerts::acknowledged_at.eq(Some(micros(now))), alerts::ack_note.eq(note_ciphertext)))
            .execute(c)?;
        if n == 0 {
            return Err(AppError::Conflict);
        }
        let event = AuditEvent::new(AuditKind::Admin, now, Outcome::Success, agent)
            .with_resource("Alert", Some(uuid), None)
            .with_detail("alert-acknowledged");
        append_locked(c, sealer, head, &[event])?;
        find(c, id)
    })
}
