//! Incident response behind `carevault incident` (docs/breach-response.md):
//! - [`report`]: every patient one account touched in a window (from the audit trail: what was accessed, how
//!   often, when), the affected count per State, and the notification duties that follow ([`duties`], a pure
//!   function of the counts and the discovery date). The State comes from the Patient's encrypted `address`
//!   element, decrypted for the report only (the State alone leaves this function) and audited per patient.
//! - [`contain`]: disables the account and ends its sessions, refresh tokens and break-glass grants in one
//!   transaction, audited. Every replica refuses the account's tokens within the 5 s session cache.

use crate::app::AppState;
use crate::audit::store::{append_locked, lock_head};
use crate::audit::{Agent, AuditEvent, AuditKind, Outcome};
use crate::auth::service::{Account, find_account, revoke_account_sessions};
use crate::crypto::store::micros;
use crate::error::AppResult;
use crate::store::AnyConnection;
use crate::store::schema::{accounts, audit_events, audit_patients};
use diesel::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use time::{Date, Duration, Month, OffsetDateTime};
use uuid::Uuid;

/// Days after discovery within which individuals (and the media, and HHS for large breaches) are notified.
pub const NOTIFY_WITHIN_DAYS: i64 = 60;
/// From this many affected individuals, HHS is notified at once rather than through the annual log.
pub const HHS_IMMEDIATE_AT: u64 = 500;
/// More than this many residents of one State requires notice to the media there.
pub const MEDIA_ABOVE: u64 = 500;
/// The group of patients whose State could not be determined.
pub const UNKNOWN_STATE: &str = "unknown";

/// How one patient was touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PatientAccess {
    pub patient: String,
    pub accesses: u64,
    pub first: String,
    pub last: String,
    /// Interaction kind → count (e.g. `read`, `search`).
    pub interactions: BTreeMap<String, u64>,
    pub resource_types: BTreeSet<String>,
    /// Search parameter names used (never values).
    pub search_params: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "when", rename_all = "kebab-case")]
pub enum HhsDuty {
    /// None affected: nothing to report.
    None,
    /// 500 or more: contemporaneously with the individual notices, by `by` at the latest.
    Immediate {
        #[serde(serialize_with = "ymd")]
        by: Date,
    },
    /// Fewer than 500: enter in the breach log, submitted within 60 days after the end of the calendar year.
    AnnualLog {
        #[serde(serialize_with = "ymd")]
        by: Date,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Duties {
    /// Individuals to notify without unreasonable delay, by `individuals_by` at the latest.
    pub individuals: u64,
    #[serde(serialize_with = "ymd")]
    pub individuals_by: Date,
    pub hhs: HhsDuty,
    /// States with more than 500 affected residents: notify prominent media there by `media_by`.
    pub media_states: Vec<String>,
    #[serde(serialize_with = "ymd")]
    pub media_by: Date,
    /// Patients whose State is unknown: the media duty cannot be ruled out for them.
    pub unknown_state: u64,
}

/// Dates as `YYYY-MM-DD`.
fn ymd<S: serde::Serializer>(d: &Date, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(d)
}

/// The notification duties (45 CFR 164.404–408) for `by_state` affected individuals discovered on `discovered`.
pub fn duties(by_state: &BTreeMap<String, u64>, discovered: Date) -> Duties {
    let total: u64 = by_state.values().sum();
    let deadline = discovered.saturating_add(Duration::days(NOTIFY_WITHIN_DAYS));
    let hhs = if total == 0 {
        HhsDuty::None
    } else if total >= HHS_IMMEDIATE_AT {
        HhsDuty::Immediate { by: deadline }
    } else {
        let year_end = Date::from_calendar_date(discovered.year(), Month::December, 31).unwrap_or(discovered);
        HhsDuty::AnnualLog { by: year_end.saturating_add(Duration::days(NOTIFY_WITHIN_DAYS)) }
    };
    let media_states = by_state
        .iter()
        .filter(|(s, n)| s.as_str() != UNKNOWN_STATE && **n > MEDIA_ABOVE)
        .map(|(s, _)| s.clone())
        .collect();
    Duties {
        individuals: total,
        individuals_by: deadline,
        hhs,
        media_states,
        media_by: deadline,
        unknown_state: by_state.get(UNKNOWN_STATE).copied().unwrap_or(0),
    }
}

/// The account named `user`: a username, else an account id.
pub fn resolve_account(conn: &mut AnyConnection, user: &str) -> AppResult<Option<Account>> {
    if let Some(a) = find_account(conn, user)? {
        return Ok(Some(a));
    }
    Ok(accounts::table.filter(accounts::id.eq(user)).select(Account::as_select()).first(conn).optional()?)
}

/// Patients `account_id` touched (successful FHIR interactions) in `[since, until)`, by patient id.
pub fn touched(
    conn: &mut AnyConnection,
    account_id: &str,
    since: OffsetDateTime,
    until: OffsetDateTime,
) -> AppResult<Vec<PatientAccess>> {
    let named = audit_patients::table
        .filter(audit_patients::recorded.ge(micros(since)))
        .filter(audit_patients::recorded.lt(micros(until)))
        .select(audit_patients::seq);
    let bodies: Vec<String> = audit_events::table
        .filter(audit_events::agent.eq(account_id))
        .filter(audit_events::seq.eq_any(named))
        .filter(audit_events::recorded.ge(micros(since)))
        .filter(audit_events::recorded.lt(micros(until)))
        .order(audit_events::seq.asc())
        .select(audit_events::body)
        .load(conn)?;
    let mut by_patient: BTreeMap<Uuid, PatientAccess> = BTreeMap::new();
    for body in bodies {
        let e: AuditEvent = serde_json::from_str(&body).map_err(crate::error::AppError::internal)?;
        if !e.kind.is_rest() || e.outcome != Outcome::Success {
            continue;
        }
        let at = super::rfc3339(micros(e.recorded));
        for &patient in e.disclosed() {
            let entry = by_patient.entry(patient).or_insert_with(|| PatientAccess {
                patient: patient.to_string(),
                accesses: 0,
                first: at.clone(),
                last: at.clone(),
                interactions: BTreeMap::new(),
                resource_types: BTreeSet::new(),
                search_params: BTreeSet::new(),
            });
            entry.accesses += 1;
            entry.last = at.clone();
            *entry.interactions.entry(e.kind.as_str().to_owned()).or_default() += 1;
            entry.resource_types.extend(e.resource_type.clone());
            entry.search_params.extend(e.query_params.iter().cloned());
        }
    }
    Ok(by_patient.into_values().collect())
}

/// The State of residence from a decrypted FHIR `address` element: the home address's, else the first given.
pub fn state_of(address: &serde_json::Value) -> Option<String> {
    let list = address.as_array()?;
    let with_state =
        |a: &&serde_json::Value| a.get("state").and_then(|s| s.as_str()).is_some_and(|s| !s.trim().is_empty());
    let pick = list
        .iter()
        .filter(with_state)
        .find(|a| a.get("use").and_then(|u| u.as_str()) == Some("home"))
        .or_else(|| list.iter().find(with_state))?;
    Some(pick.get("state")?.as_str()?.trim().to_uppercase())
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub account: String,
    pub username: String,
    pub since: String,
    pub until: String,
    #[serde(serialize_with = "ymd")]
    pub discovered: Date,
    pub total_patients: u64,
    pub total_accesses: u64,
    pub patients: Vec<PatientAccess>,
    /// Affected individuals per State of residence.
    pub by_state: BTreeMap<String, u64>,
    pub duties: Duties,
}

/// Builds the incident report for `user` over `[since, until)`. Each patient's address is decrypted to find
/// the State, and each decryption is audited (kind `export`, detail `incident-report`, agent `operator`) in
/// the transaction that reads them; nothing but the State code is kept.
pub fn report(
    state: &AppState,
    conn: &mut AnyConnection,
    user: &str,
    since: OffsetDateTime,
    until: OffsetDateTime,
    discovered: Date,
    operator: Agent,
) -> AppResult<Option<Report>> {
    let Some(account) = resolve_account(conn, user)? else { return Ok(None) };
    let patients = touched(conn, &account.id, since, until)?;
    let now = state.clock.now();
    let by_state = conn.transaction(|c| {
        let head = lock_head(c)?;
        let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
        let mut events = Vec::with_capacity(patients.len() + 1);
        for p in &patients {
            let found = match crate::records::maintenance::patient_address(&state.records, c, &p.patient)? {
                Some(address) => {
                    let state_code = state_of(&address);
                    if let Ok(pid) = Uuid::parse_str(&p.patient) {
                        events.push(
                            AuditEvent::new(AuditKind::Export, now, Outcome::Success, operator.clone())
                                .with_patient(pid)
                                .with_resource("Patient", Some(pid), None)
                                .with_detail("incident-report"),
                        );
                    }
                    state_code
                }
                None => None,
            };
            *by_state.entry(found.unwrap_or_else(|| UNKNOWN_STATE.to_owned())).or_default() += 1;
        }
        events.push(
            AuditEvent::new(AuditKind::Export, now, Outcome::Success, operator.clone())
                .with_detail("incident-report")
                .with_target(crate::audit::Target::account(&account.id, &account.username, account.role())),
        );
        append_locked(c, state.audit.sealer(), head, &events)?;
        AppResult::Ok(by_state)
    })?;
    let duties = duties(&by_state, discovered);
    Ok(Some(Report {
        account: account.id,
        username: account.username,
        since: super::rfc3339(micros(since)),
        until: super::rfc3339(micros(until)),
        discovered,
        total_patients: u64::try_from(patients.len()).unwrap_or(u64::MAX),
        total_accesses: patients.iter().map(|p| p.accesses).sum(),
        patients,
        by_state,
        duties,
    }))
}

impl Report {
    /// A short human summary.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "Account {} ({}) touched {} patient(s), {} access(es), between {} and {}.\n",
            self.username, self.account, self.total_patients, self.total_accesses, self.since, self.until
        );
        for p in &self.patients {
            let kinds: Vec<String> = p.interactions.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let types: Vec<&str> = p.resource_types.iter().map(String::as_str).collect();
            out += &format!(
                "  {}  {} access(es) {}..{}  [{}]  {}\n",
                p.patient,
                p.accesses,
                p.first,
                p.last,
                kinds.join(", "),
                types.join(",")
            );
        }
        let states: Vec<String> = self.by_state.iter().map(|(s, n)| format!("{s} {n}")).collect();
        out += &format!("By State: {}\n", if states.is_empty() { "none".into() } else { states.join(", ") });
        let d = &self.duties;
        if d.individuals == 0 {
            out += "Duties: none (no patient was touched in the window).\n";
            return out;
        }
        out += &format!(
            "Duties (discovered {}; if this is a breach of unsecured PHI):\n  - notify {} individual(s) without unreasonable delay, by {} at the latest\n",
            self.discovered, d.individuals, d.individuals_by
        );
        out += &match &d.hhs {
            HhsDuty::Immediate { by } => {
                format!("  - notify HHS now (500 or more), with the individual notices, by {by}\n")
            }
            HhsDuty::AnnualLog { by } => format!("  - record in the breach log; submit the log to HHS by {by}\n"),
            HhsDuty::None => String::new(),
        };
        if d.media_states.is_empty() {
            out += "  - media: not required (no State with more than 500 residents affected)\n";
        } else {
            out += &format!("  - notify prominent media in {} by {}\n", d.media_states.join(", "), d.media_by);
        }
        if d.unknown_state > 0 {
            out += &format!(
                "  - {} patient(s) with no known State: determine residence before ruling out media notice\n",
                d.unknown_state
            );
        }
        out
    }
}

/// What containment ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Contained {
    pub account: String,
    pub username: String,
    pub sessions: usize,
    pub break_glass_grants: usize,
}

/// Disables `user`'s account and ends its sessions (with their refresh tokens) and its active break-glass
/// grants, in one transaction with its audit record (kind `admin`, detail `incident-contain`).
pub fn contain(
    conn: &mut AnyConnection,
    sealer: &crate::audit::seal::Sealer,
    user: &str,
    operator: Agent,
    now: OffsetDateTime,
) -> AppResult<Option<Contained>> {
    conn.transaction(|c| {
        let head = lock_head(c)?;
        let Some(account) = resolve_account(c, user)? else { return Ok(None) };
        diesel::update(accounts::table.filter(accounts::id.eq(&account.id)))
            .set(accounts::disabled.eq(true))
            .execute(c)?;
        let sessions = revoke_account_sessions(c, &account.id, now)?;
        let grants = crate::records::maintenance::revoke_grants(c, &account.id, micros(now))?;
        let target = crate::audit::Target::account(&account.id, &account.username, account.role());
        let event = AuditEvent::new(AuditKind::Admin, now, Outcome::Success, operator)
            .with_detail("incident-contain")
            .with_target(target);
        append_locked(c, sealer, head, &[event])?;
        Ok(Some(Contained { account: account.id, username: account.username, sessions, break_glass_grants: grants }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::macros::date;

    fn states(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect()
    }

    #[test]
    fn hhs_at_once_from_500_else_the_annual_log() {
        let d = date!(2026 - 03 - 10);
        let at = |n| duties(&states(&[("TX", n)]), d);
        assert_eq!(at(499).hhs, HhsDuty::AnnualLog { by: date!(2027 - 03 - 01) });
        assert_eq!(at(500).hhs, HhsDuty::Immediate { by: date!(2026 - 05 - 09) });
        assert_eq!(at(501).hhs, HhsDuty::Immediate { by: date!(2026 - 05 - 09) });
        assert_eq!(at(499).individuals_by, date!(2026 - 05 - 09));
        assert_eq!(at(0).hhs, HhsDuty::None);
        // The annual log is due 60 days after the end of the year of discovery (leap year: 29 February).
        assert_eq!(
            duties(&states(&[("TX", 1)]), date!(2027 - 12 - 31)).hhs,
            HhsDuty::AnnualLog { by: date!(2028 - 02 - 29) }
        );
    }

    #[test]
    fn media_needs_more_than_500_in_one_state() {
        let d = date!(2026 - 03 - 10);
        assert!(duties(&states(&[("TX", 500)]), d).media_states.is_empty());
        assert_eq!(duties(&states(&[("TX", 501)]), d).media_states, vec!["TX".to_owned()]);
        // 900 in total but no State above 500: HHS at once, no media.
        let split = duties(&states(&[("TX", 450), ("OK", 450)]), d);
        assert!(split.media_states.is_empty());
        assert!(matches!(split.hhs, HhsDuty::Immediate { .. }));
        assert_eq!(split.individuals, 900);
        let two = duties(&states(&[("TX", 501), ("OK", 501), ("NM", 3)]), d);
        assert_eq!(two.media_states, vec!["OK".to_owned(), "TX".to_owned()]);
        let unknown = duties(&states(&[(UNKNOWN_STATE, 600)]), d);
        assert!(unknown.media_states.is_empty());
        assert_eq!(unknown.unknown_state, 600);
    }

    #[test]
    fn state_prefers_the_home_address() {
        let a = json!([{ "use": "work", "state": "NY" }, { "use": "home", "state": " tx " }]);
        assert_eq!(state_of(&a).as_deref(), Some("TX"));
        assert_eq!(state_of(&json!([{ "city": "X" }, { "state": "CA" }])).as_deref(), Some("CA"));
        assert_eq!(state_of(&json!([{ "city": "X" }])), None);
        assert_eq!(state_of(&json!("TX")), None);
    }
}
