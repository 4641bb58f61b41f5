//! [`Records::execute`]: the entry point that sequences the stages for every [`Operation`]:
//!
//! ```text
//! gate (decide) → interaction (scope → store → codec → shape, filling the Disclosure) → audit (success or failure)
//! ```
//!
//! The audit step is here and only here, so no interaction can answer without its event: a success is recorded
//! with every patient the response disclosed (writes append it inside their data transaction, reads group-commit
//! it before the response), and every failure — refusals included — is recorded with its outcome.

use super::operation::{Done, Interaction, Operation};
use super::{Caller, Records, trail};
use crate::access::{Action, Decision};
use crate::audit::{AuditEvent, AuditKind, Outcome};
use crate::error::{AppError, AppResult};
use crate::fhir::{ResourceDecl, decl};
use crate::role::Role;
use std::collections::BTreeSet;
use time::OffsetDateTime;
use uuid::Uuid;

/// What the audit event of one operation says, filled in as the pipeline learns it. Holds ids, fixed codes and
/// known parameter names only: never a value the client sent or a record holds.
#[derive(Debug, Clone)]
pub(super) struct Disclosure {
    kind: AuditKind,
    rtype: Option<&'static str>,
    id: Option<Uuid>,
    version: Option<i64>,
    /// Every patient whose data the response carries (or a write touched).
    patients: BTreeSet<Uuid>,
    purpose: &'static str,
    /// Search parameter names (server-defined ones; the rest become "(unrecognised)").
    params: Vec<String>,
    detail: Option<&'static str>,
    /// The event is already durable (a write appended it inside its own transaction).
    durable: bool,
}

impl Disclosure {
    pub(super) fn start(op: &Operation) -> Self {
        let i = &op.interaction;
        let rtype = decl::decl(i.rtype()).map(|d| d.name);
        let id = i.target_id().and_then(|t| Uuid::parse_str(t).ok());
        let params = match i {
            Interaction::Search { params, .. }
            | Interaction::ConditionalUpdate { params, .. }
            | Interaction::ConditionalDelete { params, .. }
            | Interaction::Create { if_none_exist: Some(params), .. } => {
                let d = decl::decl(i.rtype());
                params
                    .iter()
                    .map(|(k, _)| match d {
                        Some(d) if super::service::is_known_param(d, k) => k.clone(),
                        _ => crate::audit::event::UNRECOGNISED_PARAM.to_owned(),
                    })
                    .collect()
            }
            _ => vec![],
        };
        Self {
            kind: i.kind(),
            rtype,
            id,
            version: None,
            patients: BTreeSet::new(),
            purpose: op.caller.purpose(),
            params,
            detail: None,
            durable: false,
        }
    }

    pub(super) fn resource(&mut self, d: &ResourceDecl, id: &str, version: i64) {
        self.rtype = Some(d.name);
        self.id = Uuid::parse_str(id).ok();
        self.version = Some(version);
    }

    /// Names a patient the response disclosed (ids that are not UUIDs identify nothing and are skipped).
    pub(super) fn patient(&mut self, patient: Option<&str>) {
        if let Some(p) = patient.and_then(|p| Uuid::parse_str(p).ok()) {
            self.patients.insert(p);
        }
    }

    pub(super) fn patient_id(&mut self, patient: Uuid) {
        self.patients.insert(patient);
    }

    pub(super) fn purpose(&mut self, purpose: &'static str) {
        self.purpose = purpose;
    }

    pub(super) fn detail(&mut self, detail: &'static str) {
        self.detail = Some(detail);
    }

    /// The event was appended in the write's own transaction, which has committed.
    pub(super) fn durable(&mut self) {
        self.durable = true;
    }

    /// The audit event for this operation, ending with `outcome`.
    pub(super) fn event(&self, caller: &Caller, outcome: Outcome, now: OffsetDateTime) -> AuditEvent {
        let mut e = AuditEvent::new(self.kind, now, outcome, caller.agent())
            .with_patients(self.patients.iter().copied())
            .with_purpose(self.purpose);
        if let Some(t) = self.rtype {
            e = e.with_resource(t, self.id, self.version);
        }
        if !self.params.is_empty() {
            e = e.with_query_params(self.params.iter().map(String::as_str), |_| true);
        }
        if let Some(detail) = self.detail {
            e = e.with_detail(detail);
        }
        e
    }
}

/// The audit outcome of a failed operation: the caller's fault (4xx) or the server's (5xx).
fn outcome_of(e: &AppError) -> Outcome {
    match e {
        AppError::Internal(_) | AppError::Unavailable(_) => Outcome::SeriousFailure,
        _ => Outcome::MinorFailure,
    }
}

/// What the gate let through: a policy decision for FHIR interactions; the security operations (break-glass,
/// alerts) are decided by role.
pub(super) enum Gate {
    Policy(Decision),
    Role,
    /// A Bundle: each entry is gated on its own.
    Bundle,
}

impl Records {
    /// Executes one operation through every stage and audits it, on success and on every failure. The only
    /// way to reach resources, history, index rows and break-glass grants from outside the records service.
    pub async fn execute(&self, op: Operation) -> AppResult<Done> {
        let mut disclosure = Disclosure::start(&op);
        // The permit (for expensive operations) is held until the operation and its audit are done, and given
        // back when dropped, on every path. A refusal is audited like any failure.
        let (_permit, result) = match self.admit(&op) {
            Ok(permit) => {
                let result = self.run(&op, &mut disclosure).await;
                (permit, result)
            }
            Err(e) => {
                disclosure.detail("concurrency-limit");
                (None, Err(e))
            }
        };
        if result.is_ok() && disclosure.durable {
            return result;
        }
        let outcome = match &result {
            Ok(_) => Outcome::Success,
            Err(e) => outcome_of(e),
        };
        self.audit.record(disclosure.event(&op.caller, outcome, self.clock.now())).await?;
        result
    }

    /// The per-account concurrency limit: searches, history, `$everything`, `$access-report` and Bundles take a permit
    /// (at most `limits.max_concurrent_per_account` per account in flight); other interactions take none.
    fn admit(&self, op: &Operation) -> AppResult<Option<super::concurrency::Permit>> {
        let expensive = matches!(
            op.interaction,
            Interaction::Search { .. }
                | Interaction::History { .. }
                | Interaction::Everything { .. }
                | Interaction::AccessReport { .. }
                | Interaction::Bundle { .. }
        );
        if !expensive {
            return Ok(None);
        }
        let max = self.config.as_ref().map_or(crate::config::LimitsConfig::default().max_concurrent_per_account, |c| {
            c.limits.max_concurrent_per_account
        });
        let p = &op.caller.principal;
        // The account at its issuer (local accounts and provider identities never share a key).
        let key = format!("{}\u{1f}{}", p.issuer, p.subject);
        self.concurrency.acquire(&key, max).map(Some)
    }

    /// The decide stage: the policy decision for this type and action, or the role rule of a security
    /// operation. Anything not allowed is refused here, before any storage is touched.
    pub(super) fn gate(&self, op: &Operation) -> AppResult<Gate> {
        let p = &op.caller.principal;
        let i = &op.interaction;
        match i {
            Interaction::BreakGlass { .. } => {
                if p.roles.iter().any(|r| r.is_care_provider()) && p.practitioner.is_some() {
                    Ok(Gate::Role)
                } else {
                    Err(AppError::Forbidden)
                }
            }
            Interaction::Bundle { .. } => Ok(Gate::Bundle),
            Interaction::ListAlerts { .. } | Interaction::AckAlert { .. } => {
                if p.has_any_role(&[Role::Admin, Role::Auditor]) { Ok(Gate::Role) } else { Err(AppError::Forbidden) }
            }
            _ => {
                let d = decl::decl(i.rtype()).ok_or(AppError::NotFound)?;
                let action = i.action().ok_or(AppError::Forbidden)?;
                let writes = matches!(action, Action::Create | Action::Update | Action::Delete);
                if writes && d.read_only {
                    return Err(AppError::MethodNotAllowed);
                }
                let decision = self.decision(p, d.name, action);
                if decision.allowed { Ok(Gate::Policy(decision)) } else { Err(AppError::Forbidden) }
            }
        }
    }

    async fn run(&self, op: &Operation, d: &mut Disclosure) -> AppResult<Done> {
        let decision = match self.gate(op)? {
            Gate::Policy(decision) => decision,
            Gate::Role => return self.run_security(op, d).await,
            Gate::Bundle => return self.bundle(op, d).await,
        };
        let c = &op.caller;
        match &op.interaction {
            Interaction::Read { rtype, id, .. } if rtype == "AuditEvent" => {
                trail::read(self, c, id, d).await.map(Done::Document)
            }
            Interaction::Search { rtype, params, handling } if rtype == "AuditEvent" => {
                trail::search(self, c, params, *handling, d).await.map(Done::Bundle)
            }
            Interaction::AccessReport { patient } => {
                trail::access_report(self, c, &decision, patient, d).await.map(Done::Document)
            }
            Interaction::Create { rtype, body, if_none_exist } => {
                self.create(c, decision, rtype, body, if_none_exist.as_deref(), d).await
            }
            Interaction::Read { rtype, id, elements } => {
                self.read(c, decision, rtype, id, elements.as_deref(), d).await.map(Done::Resource)
            }
            Interaction::Vread { rtype, id, version } => {
                self.vread(c, decision, rtype, id, version, d).await.map(Done::Resource)
            }
            Interaction::Update { rtype, id, if_match, body } => {
                self.update(c, decision, rtype, id, *if_match, body, d).await.map(Done::Resource)
            }
            Interaction::Delete { rtype, id } => self.delete(c, decision, rtype, id, d).await.map(|()| Done::Deleted),
            Interaction::Search { rtype, params, handling } => {
                self.search(c, decision, rtype, params.clone(), *handling, d).await.map(Done::Bundle)
            }
            Interaction::History { rtype, id } => self.history(c, decision, rtype, id, d).await.map(Done::Bundle),
            Interaction::Everything { patient } => self.everything(c, decision, patient, d).await.map(Done::Bundle),
            Interaction::ConditionalUpdate { rtype, params, if_match, body } => {
                self.conditional_update(c, decision, rtype, params, *if_match, body, d).await
            }
            Interaction::Patch { rtype, id, if_match, body } => {
                self.patch(c, decision, rtype, id, *if_match, body, d).await.map(Done::Resource)
            }
            Interaction::ConditionalDelete { rtype, params } => {
                self.conditional_delete(c, decision, rtype, params, d).await.map(|()| Done::Deleted)
            }
            Interaction::Validate { rtype, body } => self.validate(c, decision, rtype, body).await.map(Done::Document),
            Interaction::BreakGlass { .. }
            | Interaction::ListAlerts { .. }
            | Interaction::AckAlert { .. }
            | Interaction::Bundle { .. } => Err(AppError::Forbidden),
        }
    }

    async fn run_security(&self, op: &Operation, d: &mut Disclosure) -> AppResult<Done> {
        let c = &op.caller;
        match &op.interaction {
            Interaction::BreakGlass { patient, code, reason } => {
                trail::break_glass(self, c, patient, code.as_deref(), reason, d).await.map(Done::Document)
            }
            Interaction::ListAlerts { query } => trail::list_alerts(self, query, d).await.map(Done::Document),
            Interaction::AckAlert { alert, note } => {
                trail::ack_alert(self, c, alert, note, d).await.map(Done::Document)
            }
            _ => Err(AppError::Forbidden),
        }
    }
}
