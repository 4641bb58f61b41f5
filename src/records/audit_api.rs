//! The audit trail as FHIR (AuditEvent read and search, `$access-report`) and break-glass grants.
//! Reading the trail is itself audited.

use super::Caller;
use crate::access::{Action, Scope};
use crate::app::AppState;
use crate::audit::{AuditEvent, AuditKind, Outcome, purpose, to_fhir};
use crate::crypto::FieldAad;
use crate::crypto::store::micros;
use crate::error::{AppError, AppResult};
use crate::fhir::bundle;
use crate::fhir::search::{self, Handling, SearchValue};
use crate::role::Role;
use crate::store::schema::{accounts, audit_events, break_glass};
use diesel::prelude::*;
use serde_json::{Value, json};
use uuid::Uuid;

/// How far back an access report reaches (HIPAA's six-year retention).
const REPORT_YEARS: i64 = 6;
const MAX_REASON: usize = 1000;

fn server_id(state: &AppState) -> String {
    state.config.base_url()
}

fn require(state: &AppState, caller: &Caller, rtype: &str, action: Action) -> AppResult<Option<Scope>> {
    let d = state.access.decide(&caller.principal.roles, rtype, action);
    if d.allowed { Ok(d.scope) } else { Err(AppError::Forbidden) }
}

/// `GET /fhir/AuditEvent/{id}` (auditors).
pub async fn read(state: &AppState, caller: &Caller, id: &str) -> AppResult<Value> {
    require(state, caller, "AuditEvent", Action::Read)?;
    let id = Uuid::parse_str(id).map_err(|_| AppError::NotFound)?.to_string();
    let body: String = state
        .db
        .run(move |c| {
            audit_events::table
                .filter(audit_events::id.eq(&id))
                .select(audit_events::body)
                .first(c)
                .optional()?
                .ok_or(AppError::NotFound)
        })
        .await?;
    let event: AuditEvent = serde_json::from_str(&body).map_err(AppError::internal)?;
    let mut own = AuditEvent::new(AuditKind::Read, state.clock.now(), Outcome::Success, caller_agent(caller))
        .with_resource("AuditEvent", Some(event.id), None)
        .with_purpose(purpose::HCOMPL);
    if let Some(p) = event.patient {
        own = own.with_patient(p);
    }
    state.audit.record(own).await?;
    Ok(to_fhir(&event, &server_id(state)))
}

fn caller_agent(caller: &Caller) -> crate::audit::Agent {
    crate::api::auth::principal_agent(&caller.principal, caller.ip)
}

/// `GET /fhir/AuditEvent?patient=&agent=&date=&action=` (auditors), newest first, keyset-paged by sequence.
pub async fn search(
    state: &AppState,
    caller: &Caller,
    pairs: Vec<(String, String)>,
    handling: Handling,
) -> AppResult<Value> {
    require(state, caller, "AuditEvent", Action::Search)?;
    let d = crate::fhir::decl::decl("AuditEvent").ok_or(AppError::NotFound)?;
    let req = search::parse(d, &pairs, handling)?;
    let mut patients: Option<Vec<String>> = None;
    let mut agents: Option<Vec<String>> = None;
    let mut dates = Vec::new();
    let mut actions: Option<Vec<String>> = None;
    let mut ids: Option<Vec<String>> = None;
    for c in &req.clauses {
        let vals = &c.values;
        match c.param.name {
            "patient" => patients = Some(vals.iter().filter_map(ref_id).collect()),
            "agent" => agents = Some(vals.iter().filter_map(ref_id).collect()),
            "date" => dates.push(vals.clone()),
            "action" => {
                actions = Some(
                    vals.iter()
                        .filter_map(|v| match v {
                            SearchValue::Token { code: Some(code), .. } => Some(code.clone()),
                            _ => None,
                        })
                        .collect(),
                )
            }
            "_id" => ids = Some(vals.iter().flat_map(|v| v.keys(c.param)).collect()),
            _ => return Err(AppError::invalid("search", "The parameter is not supported for AuditEvent.")),
        }
    }
    let after: Option<i64> = req
        .cursor
        .as_deref()
        .map(|c| c.parse().map_err(|_| AppError::invalid("_cursor", "The paging cursor is invalid.")))
        .transpose()?;
    let page = usize::try_from(req.count).unwrap_or(20);
    let summary = req.summary_count;
    let rows: Vec<(i64, String)> = state
        .db
        .run(move |c| {
            let mut q = audit_events::table.select((audit_events::seq, audit_events::body)).into_boxed();
            if let Some(p) = patients {
                q = q.filter(audit_events::patient_id.eq_any(p));
            }
            if let Some(a) = agents {
                q = q.filter(audit_events::agent.eq_any(a));
            }
            if let Some(i) = ids {
                q = q.filter(audit_events::id.eq_any(i));
            }
            if let Some(after) = after {
                q = q.filter(audit_events::seq.lt(after));
            }
            Ok(q.order(audit_events::seq.desc()).limit(5000).load(c)?)
        })
        .await?;
    let mut matched = Vec::new();
    let mut more = false;
    let mut last_seq = None;
    for (seq, body) in rows {
        let event: AuditEvent = serde_json::from_str(&body).map_err(AppError::internal)?;
        let t = event.recorded.unix_timestamp();
        let date_ok = dates.iter().all(|vals| {
            vals.iter().any(|v| matches!(v, SearchValue::Date { prefix, lo, hi } if prefix.matches(*lo, *hi, t, t + 1)))
        });
        let action_ok = actions.as_ref().is_none_or(|a| a.iter().any(|x| x == event.action.as_str()));
        if !(date_ok && action_ok) {
            continue;
        }
        if !summary && matched.len() == page {
            more = true;
            break;
        }
        last_seq = Some(seq);
        matched.push(event);
    }
    let mut own = AuditEvent::new(AuditKind::Search, state.clock.now(), Outcome::Success, caller_agent(caller))
        .with_resource("AuditEvent", None, None)
        .with_query_params(pairs.iter().map(|(k, _)| k.as_str()), |n| super::service::is_known_param(d, n))
        .with_purpose(purpose::HCOMPL);
    if let [only] = matched
        .iter()
        .filter_map(|e| e.patient)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()[..]
    {
        own = own.with_patient(only);
    }
    state.audit.record(own).await?;
    let base = state.records.base();
    let self_link = format!("{base}/AuditEvent?{}", serde_urlencoded::to_string(&pairs).unwrap_or_default());
    if summary {
        return Ok(bundle::searchset(vec![], base, &self_link, None, Some(u64::try_from(matched.len()).unwrap_or(0))));
    }
    let next = (more && last_seq.is_some()).then(|| {
        let mut p: Vec<(String, String)> = pairs.iter().filter(|(k, _)| k != search::CURSOR_PARAM).cloned().collect();
        p.push((search::CURSOR_PARAM.to_owned(), last_seq.unwrap_or_default().to_string()));
        format!("{base}/AuditEvent?{}", serde_urlencoded::to_string(&p).unwrap_or_default())
    });
    let sid = server_id(state);
    let entries = matched.iter().map(|e| to_fhir(e, &sid)).collect();
    Ok(bundle::searchset(entries, base, &self_link, next, None))
}

fn ref_id(v: &SearchValue) -> Option<String> {
    match v {
        SearchValue::Reference { id, .. } => Some(id.clone()),
        SearchValue::Token { code: Some(c), .. } => Some(c.clone()),
        SearchValue::Text(t) => Some(t.clone()),
        _ => None,
    }
}

/// `GET /fhir/Patient/{id}/$access-report`: for the patient themself (own) or an auditor (all).
pub async fn access_report(state: &AppState, caller: &Caller, id: &str) -> AppResult<Value> {
    let scope = require(state, caller, "Patient", Action::AccessReport)?;
    let patient = Uuid::parse_str(id).map_err(|_| AppError::NotFound)?;
    match scope {
        Some(Scope::All) => {}
        Some(Scope::Own) if caller.principal.patient == Some(patient) => {}
        _ => return Err(AppError::NotFound),
    }
    if !state.records.patient_exists(id).await? {
        return Err(AppError::NotFound);
    }
    let since = micros(state.clock.now() - time::Duration::days(365 * REPORT_YEARS + 2));
    let pid = patient.to_string();
    let (events, names) = state
        .db
        .run(move |c| {
            let events = crate::audit::store::for_patient(c, &pid, since)?;
            let names: Vec<(String, String)> = accounts::table.select((accounts::id, accounts::username)).load(c)?;
            Ok((events, names))
        })
        .await?;
    let names: std::collections::HashMap<String, String> = names.into_iter().collect();
    let report = crate::audit::access_report(patient, &events, &|user| names.get(user).cloned());
    let own = AuditEvent::new(AuditKind::AccessReport, state.clock.now(), Outcome::Success, caller_agent(caller))
        .with_resource("Patient", Some(patient), None)
        .with_patient(patient)
        .with_purpose(if caller.principal.roles.contains(&Role::Patient) { purpose::PATRQT } else { purpose::HCOMPL });
    state.audit.record(own).await?;
    Ok(report)
}

/// `POST /auth/break-glass`: opens one patient's record to a clinician or nurse for a limited time, audited
/// with purpose of use BTG. The reason is free text, so it is stored encrypted.
pub async fn break_glass(state: &AppState, caller: &Caller, patient_ref: &str, reason: &str) -> AppResult<Value> {
    let p = &caller.principal;
    if !p.roles.iter().any(|r| r.is_care_provider()) || p.practitioner.is_none() {
        return Err(AppError::Forbidden);
    }
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > MAX_REASON {
        return Err(AppError::invalid("reason", "A reason of 1 to 1000 characters is required."));
    }
    let id = patient_ref
        .strip_prefix("Patient/")
        .ok_or_else(|| AppError::invalid("patient", "The patient must be given as Patient/ID."))?;
    let patient =
        Uuid::parse_str(id).map_err(|_| AppError::invalid("patient", "The patient must be given as Patient/ID."))?;
    if !state.records.patient_exists(id).await? {
        return Err(AppError::NotFound);
    }
    let grant = Uuid::new_v4();
    let now = state.clock.now();
    let expires = now + time::Duration::minutes(i64::try_from(state.config.access.break_glass_minutes).unwrap_or(60));
    let sealed = state
        .cipher
        .encrypt(&FieldAad::new("BreakGlass", &grant.to_string(), "reason"), reason.as_bytes())
        .map_err(AppError::internal)?;
    let event = AuditEvent::new(AuditKind::BreakGlass, now, Outcome::Success, caller_agent(caller))
        .with_patient(patient)
        .with_resource("Patient", Some(patient), None)
        .with_purpose(purpose::BTG)
        .with_detail("break-glass-granted");
    let account = p.subject.clone();
    state
        .db
        .run(move |c| {
            c.transaction(|c| {
                let head = crate::audit::store::lock_head(c)?;
                diesel::insert_into(break_glass::table)
                    .values((
                        break_glass::id.eq(grant.to_string()),
                        break_glass::account_id.eq(&account),
                        break_glass::patient_id.eq(patient.to_string()),
                        break_glass::reason.eq(sealed),
                        break_glass::created_at.eq(micros(now)),
                        break_glass::expires_at.eq(micros(expires)),
                    ))
                    .execute(c)?;
                crate::audit::store::append_locked(c, head, &[event])?;
                Ok(())
            })
        })
        .await?;
    let expires = expires.format(&time::format_description::well_known::Rfc3339).map_err(AppError::internal)?;
    Ok(json!({ "grant": grant, "patient": format!("Patient/{patient}"), "expires": expires }))
}
