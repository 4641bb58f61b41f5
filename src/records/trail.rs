//! The interactions on the audit trail and the security operations: AuditEvent read and search (answered in
//! SQL: filters, keyset paging and counts in the query, so they stay exact on a trail of millions of events),
//! `$access-report`, break-glass grants, and the alert list and acknowledgement. Each fills the operation's
//! [`Disclosure`]; [`Records::execute`](super::Records::execute) audits it.

use super::execute::Disclosure;
use super::{Caller, Records, store};
use crate::access::{Decision, Scope};
use crate::audit::{AuditEvent, purpose, to_fhir};
use crate::crypto::FieldAad;
use crate::crypto::store::micros;
use crate::error::{AppError, AppResult};
use crate::fhir::bundle;
use crate::fhir::search::{self, DatePrefix, Handling, SearchValue};
use crate::monitor::{self, AlertFilter, Severity, Subject, rules};
use crate::role::Role;
use crate::store::AnyConnection;
use crate::store::schema::{accounts, audit_events, audit_patients};
use diesel::prelude::*;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

/// How far back an access report reaches (HIPAA's six-year retention).
const REPORT_YEARS: i64 = 6;
/// Shortest and longest break-glass reason, in characters (after trimming): a justification, not a keystroke.
const MIN_REASON: usize = 16;
const MAX_REASON: usize = 1000;
/// The coded reasons of a break-glass request; the code is recorded in the audit detail
/// (`break-glass-granted:<code>`), the free text only sealed with the grant.
const REASON_CODES: [&str; 3] = ["emergency", "urgent-care", "other"];
/// Longest acknowledgement note, in bytes.
const MAX_NOTE: usize = 2000;

/// `GET /fhir/AuditEvent/{id}` (auditors): names the patients the event is about.
pub(super) async fn read(r: &Records, _caller: &Caller, id: &str, d: &mut Disclosure) -> AppResult<Value> {
    let id = Uuid::parse_str(id).map_err(|_| AppError::NotFound)?.to_string();
    let body: String =
        r.db.run(move |c| {
            audit_events::table
                .filter(audit_events::id.eq(&id))
                .select(audit_events::body)
                .first(c)
                .optional()?
                .ok_or(AppError::NotFound)
        })
        .await?;
    let event: AuditEvent = serde_json::from_str(&body).map_err(AppError::internal)?;
    for p in event.disclosed() {
        d.patient_id(*p);
    }
    d.purpose(purpose::HCOMPL);
    Ok(to_fhir(&event, &r.server_id()))
}

/// The filters of one AuditEvent search, each pushed into SQL.
#[derive(Debug, Default, Clone)]
struct TrailQuery {
    patients: Option<Vec<String>>,
    agents: Option<Vec<String>>,
    actions: Option<Vec<String>>,
    ids: Option<Vec<String>>,
    /// Each clause is a union of `[from, until)` ranges of `recorded` (micros; `None` = unbounded).
    dates: Vec<Vec<(Option<i64>, Option<i64>)>>,
    /// Keyset position: events with a smaller `seq` (newest first).
    before: Option<i64>,
}

type Backend = <AnyConnection as diesel::Connection>::Backend;
type Predicate = Box<dyn BoxableExpression<audit_events::table, Backend, SqlType = diesel::sql_types::Bool>>;

impl TrailQuery {
    /// The matching events as a boxed query (built anew for the page and for the count).
    fn filtered(&self) -> audit_events::BoxedQuery<'static, Backend> {
        let mut q = audit_events::table.into_boxed();
        if let Some(p) = &self.patients {
            let named =
                audit_patients::table.filter(audit_patients::patient_id.eq_any(p.clone())).select(audit_patients::seq);
            q = q.filter(audit_events::seq.eq_any(named));
        }
        if let Some(a) = &self.agents {
            q = q.filter(audit_events::agent.eq_any(a.clone()));
        }
        if let Some(a) = &self.actions {
            q = q.filter(audit_events::action.eq_any(a.clone()));
        }
        if let Some(i) = &self.ids {
            q = q.filter(audit_events::id.eq_any(i.clone()));
        }
        for clause in &self.dates {
            let mut any: Option<Predicate> = None;
            for &(from, until) in clause {
                let range: Predicate = match (from, until) {
                    (Some(f), Some(u)) => Box::new(audit_events::recorded.ge(f).and(audit_events::recorded.lt(u))),
                    (Some(f), None) => Box::new(audit_events::recorded.ge(f)),
                    (None, Some(u)) => Box::new(audit_events::recorded.lt(u)),
                    (None, None) => Box::new(audit_events::seq.eq(audit_events::seq)),
                };
                any = Some(match any {
                    None => range,
                    Some(prev) => Box::new(prev.or(range)),
                });
            }
            if let Some(p) = any {
                q = q.filter(p);
            }
        }
        if let Some(before) = self.before {
            q = q.filter(audit_events::seq.lt(before));
        }
        q
    }
}

/// A date value as a `[from, until)` range of `recorded` micros, with FHIR's prefix semantics for an instant.
fn date_range(prefix: DatePrefix, lo: i64, hi: i64) -> (Option<i64>, Option<i64>) {
    let (lo, hi) = (lo.saturating_mul(1_000_000), hi.saturating_mul(1_000_000));
    match prefix {
        DatePrefix::Eq => (Some(lo), Some(hi)),
        DatePrefix::Ge => (Some(lo), None),
        DatePrefix::Le => (None, Some(hi)),
        DatePrefix::Gt => (Some(hi), None),
        DatePrefix::Lt => (None, Some(lo)),
    }
}

fn ref_id(v: &SearchValue) -> Option<String> {
    match v {
        SearchValue::Reference { id, .. } => Some(id.clone()),
        SearchValue::Token { code: Some(c), .. } => Some(c.clone()),
        SearchValue::Text(t) => Some(t.clone()),
        _ => None,
    }
}

/// `GET /fhir/AuditEvent?patient=&agent=&date=&action=&_id=` (auditors), newest first, keyset-paged by `seq`.
/// Names every patient the returned events are about.
pub(super) async fn search(
    r: &Records,
    _caller: &Caller,
    pairs: &[(String, String)],
    handling: Handling,
    d: &mut Disclosure,
) -> AppResult<Value> {
    d.purpose(purpose::HCOMPL);
    let decl = crate::fhir::decl::decl("AuditEvent").ok_or(AppError::NotFound)?;
    let req = search::parse(decl, pairs, handling)?;
    let mut q = TrailQuery::default();
    for c in &req.clauses {
        let vals = &c.values;
        match c.param.name {
            "patient" => q.patients = Some(vals.iter().filter_map(ref_id).collect()),
            "agent" => q.agents = Some(vals.iter().filter_map(ref_id).collect()),
            "date" => q.dates.push(
                vals.iter()
                    .filter_map(|v| match v {
                        SearchValue::Date { prefix, lo, hi } => Some(date_range(*prefix, *lo, *hi)),
                        _ => None,
                    })
                    .collect(),
            ),
            "action" => {
                q.actions = Some(
                    vals.iter()
                        .filter_map(|v| match v {
                            SearchValue::Token { code: Some(code), .. } => Some(code.clone()),
                            _ => None,
                        })
                        .collect(),
                )
            }
            "_id" => q.ids = Some(vals.iter().flat_map(|v| v.keys(c.param)).collect()),
            _ => return Err(AppError::invalid("search", "The parameter is not supported for AuditEvent.")),
        }
    }
    q.before = req
        .cursor
        .as_deref()
        .map(|c| c.parse().map_err(|_| AppError::invalid(search::CURSOR_PARAM, "The paging cursor is invalid.")))
        .transpose()?;
    let base = r.base.clone();
    let self_link = format!("{base}/AuditEvent?{}", serde_urlencoded::to_string(pairs).unwrap_or_default());
    if req.summary_count {
        for p in q.patients.iter().flatten() {
            d.patient(Some(p));
        }
        let total: i64 = r.db.run(move |c| Ok(q.filtered().count().get_result(c)?)).await?;
        return Ok(bundle::searchset(vec![], &base, &self_link, None, Some(u64::try_from(total).unwrap_or(0))));
    }
    let page = i64::from(req.count);
    let rows: Vec<(i64, String)> =
        r.db.run(move |c| {
            Ok(q.filtered()
                .select((audit_events::seq, audit_events::body))
                .order(audit_events::seq.desc())
                .limit(page + 1)
                .load(c)?)
        })
        .await?;
    let more = i64::try_from(rows.len()).unwrap_or(i64::MAX) > page;
    let rows = &rows[..rows.len().min(usize::try_from(page).unwrap_or(0))];
    let mut events = Vec::with_capacity(rows.len());
    for (_, body) in rows {
        let event: AuditEvent = serde_json::from_str(body).map_err(AppError::internal)?;
        for p in event.disclosed() {
            d.patient_id(*p);
        }
        events.push(event);
    }
    let next = match rows.last() {
        Some((seq, _)) if more => {
            let mut p: Vec<(String, String)> =
                pairs.iter().filter(|(k, _)| k != search::CURSOR_PARAM).cloned().collect();
            p.push((search::CURSOR_PARAM.to_owned(), seq.to_string()));
            Some(format!("{base}/AuditEvent?{}", serde_urlencoded::to_string(&p).unwrap_or_default()))
        }
        _ => None,
    };
    let sid = r.server_id();
    let entries = events.iter().map(|e| to_fhir(e, &sid)).collect();
    Ok(bundle::searchset(entries, &base, &self_link, next, None))
}

/// `GET /fhir/Patient/{id}/$access-report`: for the patient themself (scope own) or an auditor (scope all).
pub(super) async fn access_report(
    r: &Records,
    caller: &Caller,
    decision: &Decision,
    id: &str,
    d: &mut Disclosure,
) -> AppResult<Value> {
    let patient = Uuid::parse_str(id).map_err(|_| AppError::NotFound)?;
    // A `patient/` scope confines the report to the launch patient.
    if decision.narrowing.as_ref().and_then(|n| n.patient).is_some_and(|p| p != patient) {
        return Err(AppError::NotFound);
    }
    match decision.scope {
        Some(Scope::All) => {}
        Some(Scope::Own) if caller.principal.patient == Some(patient) => {}
        _ => return Err(AppError::NotFound),
    }
    d.purpose(if caller.principal.roles.contains(&Role::Patient) { purpose::PATRQT } else { purpose::HCOMPL });
    let since = micros(r.clock.now() - time::Duration::days(365 * REPORT_YEARS + 2));
    let pid = patient.to_string();
    let found =
        r.db.run(move |c| {
            if store::current_unscoped(c, "Patient", &pid)?.is_none_or(|row| row.deleted) {
                return Ok(None);
            }
            let events = crate::audit::store::for_patient(c, &pid, since)?;
            let names: Vec<(String, String)> = accounts::table.select((accounts::id, accounts::username)).load(c)?;
            Ok(Some((events, names)))
        })
        .await?;
    let (events, names) = found.ok_or(AppError::NotFound)?;
    d.patient_id(patient);
    let names: std::collections::HashMap<String, String> = names.into_iter().collect();
    Ok(crate::audit::access_report(patient, &events, &|user| names.get(user).cloned()))
}

/// `POST /auth/break-glass`: opens one patient's record to a clinician or nurse for a limited time, audited
/// with purpose of use BTG in the transaction that stores the grant. The reason is free text: stored encrypted.
pub(super) async fn break_glass(
    r: &Records,
    caller: &Caller,
    patient_ref: &str,
    code: Option<&str>,
    reason: &str,
    d: &mut Disclosure,
) -> AppResult<Value> {
    d.purpose(purpose::BTG);
    let code = match code {
        None => REASON_CODES[0],
        Some(c) => REASON_CODES
            .into_iter()
            .find(|k| *k == c)
            .ok_or_else(|| AppError::invalid("code", "The code must be emergency, urgent-care or other."))?,
    };
    let reason = reason.trim();
    if !(MIN_REASON..=MAX_REASON).contains(&reason.chars().count()) {
        return Err(AppError::invalid("reason", "A reason of 16 to 1000 characters is required."));
    }
    let bad = || AppError::invalid("patient", "The patient must be given as Patient/ID.");
    let patient = Uuid::parse_str(patient_ref.strip_prefix("Patient/").ok_or_else(bad)?).map_err(|_| bad())?;
    let grant = Uuid::new_v4();
    let now = r.clock.now();
    let minutes = r.config.as_ref().map_or(60, |c| c.access.break_glass_minutes);
    let per_day = r.config.as_ref().map_or(10, |c| c.access.break_glass_per_day);
    let expires = now + time::Duration::minutes(i64::try_from(minutes).unwrap_or(60));
    let sealed = r
        .cipher
        .encrypt(&FieldAad::new("BreakGlass", &grant.to_string(), "reason"), reason.as_bytes())
        .map_err(AppError::internal)?;
    d.patient_id(patient);
    // The grant's own event carries the code; a refusal is audited without it (by `execute`).
    let granted = match code {
        "urgent-care" => "break-glass-granted:urgent-care",
        "other" => "break-glass-granted:other",
        _ => "break-glass-granted:emergency",
    };
    let event = d.event(caller, crate::audit::Outcome::Success, now).with_detail(granted);
    let account = caller.principal.subject.clone();
    let audit = r.audit.clone();
    r.db.run(move |c| {
        c.transaction(|c| {
            // The chain lock first, on both backends (break-glass is rare): it serialises the cap's
            // count-then-insert below, so concurrent requests cannot all pass it.
            let head = audit.lock_late(c, None)?;
            if store::current_unscoped(c, "Patient", &patient.to_string())?.is_none_or(|row| row.deleted) {
                return Err(AppError::NotFound);
            }
            // The daily cap, counted under the chain lock.
            let day_ago = micros(now - time::Duration::days(1));
            if store::grants_since(c, &account, day_ago)? >= per_day {
                return Err(AppError::TooManyRequests { retry_after_secs: 3600 });
            }
            store::grant_break_glass(
                c,
                &store::Grant {
                    id: grant.to_string(),
                    account_id: account,
                    patient_id: patient.to_string(),
                    reason: sealed,
                    created_at: micros(now),
                    expires_at: micros(expires),
                },
            )?;
            audit.append_locked(c, head, &[event])?;
            Ok(())
        })
    })
    .await?;
    d.durable();
    let expires = expires.format(&time::format_description::well_known::Rfc3339).map_err(AppError::internal)?;
    Ok(json!({ "grant": grant, "patient": format!("Patient/{patient}"), "expires": expires }))
}

/// Default and largest page of alerts.
const DEFAULT_COUNT: i64 = 100;
const MAX_COUNT: i64 = 1000;

/// `GET /admin/alerts`: the stored alerts, newest first, with acknowledgement and delivery state.
pub(super) async fn list_alerts(r: &Records, query: &str, d: &mut Disclosure) -> AppResult<Value> {
    d.detail("alerts-listed");
    let filter = parse_filter(query)?;
    let found = r.db.run(move |c| monitor::list(c, &filter)).await?;
    let mut out = Vec::with_capacity(found.len());
    for a in &found {
        out.push(r.alert_view(a).await);
    }
    Ok(json!({ "alerts": out }))
}

/// `POST /admin/alerts/{id}/ack`: acknowledges one alert with a note (free text: stored encrypted).
pub(super) async fn ack_alert(
    r: &Records,
    caller: &Caller,
    id: &str,
    note: &str,
    d: &mut Disclosure,
) -> AppResult<Value> {
    d.detail("alert-acknowledged");
    let note = note.trim();
    if note.is_empty() || note.len() > MAX_NOTE {
        return Err(AppError::invalid("note", "The note must be 1 to 2000 bytes."));
    }
    let id = id.to_owned();
    let ciphertext = r.cipher.encrypt(&monitor::ack_note_aad(&id), note.as_bytes()).map_err(AppError::internal)?;
    let agent = caller.agent();
    let now = r.clock.now();
    let sealer = r.audit.clone();
    let alert =
        r.db.run(move |c| monitor::acknowledge(c, sealer.sealer(), &id, Some(ciphertext), agent, now))
            .await?
            .ok_or(AppError::NotFound)?;
    d.durable();
    Ok(r.alert_view(&alert).await)
}

/// The filters of `GET /admin/alerts` (values checked against fixed sets, never echoed).
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

impl Records {
    /// The audit source id in AuditEvent resources: this server's base URL.
    fn server_id(&self) -> String {
        self.base.strip_suffix("/fhir").unwrap_or(&self.base).to_owned()
    }

    /// The list/ack view of an alert: the webhook payload plus acknowledgement and delivery state. A note that
    /// does not decrypt raises the decrypt-failure alert and is shown as absent.
    async fn alert_view(&self, alert: &monitor::Alert) -> Value {
        let mut v = alert.payload();
        let note = match &alert.ack_note {
            None => None,
            Some(ct) => match self.cipher.decrypt(&monitor::ack_note_aad(&alert.id), ct) {
                Ok(bytes) => String::from_utf8(bytes.to_vec()).ok(),
                Err(_) => {
                    if let Some(config) = &self.config {
                        let now = self.clock.now();
                        let subject = Subject::System("field-cipher");
                        if let Err(e) = monitor::raise(
                            &self.db,
                            self.audit.sealer_arc(),
                            config,
                            rules::DECRYPT_FAILURE,
                            subject,
                            1,
                            now,
                        )
                        .await
                        {
                            tracing::error!(error.kind = %e, "cannot raise the decrypt-failure alert");
                        }
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
}
