//! The audit record: who did what to which record, when, from where, why, and how it ended.
//!
//! Guarantees:
//! - **No PHI payload.** An event holds ids (account, patient, resource), fixed codes and search parameter
//!   *names*; the builder methods take `&'static str` for codes so free text cannot reach them by accident,
//!   unknown parameter names are replaced by [`UNRECOGNISED_PARAM`], and addresses are parsed IPs. Free text a
//!   user supplies (a break-glass reason) is not part of an event: store it encrypted elsewhere, keyed by the
//!   event id.
//! - **Deterministic bytes.** [`AuditEvent::canonical_bytes`] is what the hash chain covers (see below).

use crate::role::Role;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use time::{OffsetDateTime, UtcOffset};
use uuid::Uuid;

/// Stands in for a query parameter name the server does not recognise: the name itself is client text and
/// could be anything, including PHI, so it is never recorded.
pub const UNRECOGNISED_PARAM: &str = "(unrecognised)";

/// Purpose-of-use codes (system `http://terminology.hl7.org/CodeSystem/v3-ActReason`).
pub mod purpose {
    /// Treatment: care-team access by a clinician or nurse.
    pub const TREAT: &str = "TREAT";
    /// Break the glass: emergency access outside a care relationship.
    pub const BTG: &str = "BTG";
    /// Payment: billing.
    pub const HPAYMT: &str = "HPAYMT";
    /// Healthcare operations: front desk, scheduling.
    pub const HOPERAT: &str = "HOPERAT";
    /// Patient request: a patient reading their own record.
    pub const PATRQT: &str = "PATRQT";
    /// Health compliance: auditors.
    pub const HCOMPL: &str = "HCOMPL";
    /// System administration.
    pub const HSYSADMIN: &str = "HSYSADMIN";
}

/// What happened. REST kinds are the FHIR interactions of CONTRACT §5; the rest are security events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditKind {
    Read,
    Vread,
    Search,
    History,
    Create,
    Update,
    Delete,
    /// `Patient/{id}/$everything`
    Everything,
    /// `Patient/{id}/$access-report`
    AccessReport,
    Login,
    LoginFailure,
    Logout,
    Refresh,
    BreakGlass,
    /// Account, policy or key administration; `detail` says which.
    Admin,
    /// An alert raised by a monitoring rule; `detail` names the rule.
    Alert,
    /// Audit export or incident report.
    Export,
    /// `PATCH {type}/{id}` (JSON Patch).
    Patch,
    /// `POST /fhir` with a transaction Bundle: the Bundle as a whole (each entry has its own event).
    Transaction,
    /// `POST /fhir` with a batch Bundle: the Bundle as a whole (each entry has its own event).
    Batch,
    /// `POST {type}/$validate`.
    Validate,
}

impl AuditKind {
    pub const ALL: [AuditKind; 21] = [
        Self::Read,
        Self::Vread,
        Self::Search,
        Self::History,
        Self::Create,
        Self::Update,
        Self::Delete,
        Self::Everything,
        Self::AccessReport,
        Self::Login,
        Self::LoginFailure,
        Self::Logout,
        Self::Refresh,
        Self::BreakGlass,
        Self::Admin,
        Self::Alert,
        Self::Export,
        Self::Patch,
        Self::Transaction,
        Self::Batch,
        Self::Validate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Vread => "vread",
            Self::Search => "search",
            Self::History => "history",
            Self::Create => "create",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Everything => "everything",
            Self::AccessReport => "access-report",
            Self::Login => "login",
            Self::LoginFailure => "login-failure",
            Self::Logout => "logout",
            Self::Refresh => "refresh",
            Self::BreakGlass => "break-glass",
            Self::Admin => "admin",
            Self::Alert => "alert",
            Self::Export => "export",
            Self::Patch => "patch",
            Self::Transaction => "transaction",
            Self::Batch => "batch",
            Self::Validate => "validate",
        }
    }

    /// A FHIR RESTful interaction (type `rest` in the FHIR form).
    pub fn is_rest(self) -> bool {
        matches!(
            self,
            Self::Read
                | Self::Vread
                | Self::Search
                | Self::History
                | Self::Create
                | Self::Update
                | Self::Delete
                | Self::Everything
                | Self::AccessReport
                | Self::Patch
                | Self::Transaction
                | Self::Batch
                | Self::Validate
        )
    }

    /// The action BALP gives this kind: reads R, writes C/U/D, searches, operations and security events E.
    pub fn default_action(self) -> Action {
        match self {
            Self::Read | Self::Vread | Self::History | Self::Export => Action::R,
            Self::Create => Action::C,
            Self::Update | Self::Patch => Action::U,
            Self::Delete => Action::D,
            _ => Action::E,
        }
    }
}

/// FHIR `audit-event-action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    C,
    R,
    U,
    D,
    E,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::C => "C",
            Self::R => "R",
            Self::U => "U",
            Self::D => "D",
            Self::E => "E",
        }
    }
}

/// FHIR `audit-event-outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    #[serde(rename = "0")]
    Success,
    /// The request failed (4xx: denied, not found, invalid).
    #[serde(rename = "4")]
    MinorFailure,
    /// The server failed (5xx).
    #[serde(rename = "8")]
    SeriousFailure,
    /// The server failed and made the function unavailable (fail-closed shutdown of a path).
    #[serde(rename = "12")]
    MajorFailure,
}

impl Outcome {
    pub fn code(self) -> &'static str {
        match self {
            Self::Success => "0",
            Self::MinorFailure => "4",
            Self::SeriousFailure => "8",
            Self::MajorFailure => "12",
        }
    }

    /// The outcome of an HTTP response with this status.
    pub fn from_http_status(status: u16) -> Self {
        match status {
            0..=399 => Self::Success,
            400..=499 => Self::MinorFailure,
            _ => Self::SeriousFailure,
        }
    }
}

/// Who acted, and from where.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    /// Account id, or the subject of an external (OIDC) token.
    pub user: Option<String>,
    /// The account's username (workforce identity; set by an administrator, not free text).
    pub username: Option<String>,
    pub role: Option<Role>,
    /// OAuth client id for service clients.
    pub client_id: Option<String>,
    /// The peer's IP address, in its canonical text form.
    pub address: Option<String>,
}

impl Agent {
    pub fn user(user: impl Into<String>, username: Option<String>, role: Option<Role>) -> Self {
        Self { user: Some(user.into()), username, role, ..Self::default() }
    }

    pub fn client(client_id: impl Into<String>) -> Self {
        Self { client_id: Some(client_id.into()), ..Self::default() }
    }

    /// Only a parsed IP address is accepted, so no header text can reach the trail.
    pub fn with_address(mut self, ip: IpAddr) -> Self {
        self.address = Some(ip.to_string());
        self
    }

    pub fn with_client(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = Some(client_id.into());
        self
    }
}

/// The account (or app) an administrative action changed: who was created, disabled, contained or enrolled,
/// and in which role. Workforce identity only (account ids, usernames, client ids and roles are set by an
/// administrator, not free text), never PHI.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Account id.
    pub account: Option<String>,
    pub username: Option<String>,
    /// The role the action gave, took away or acted on.
    pub role: Option<Role>,
    /// OAuth client id, for an app (and a backend service's account).
    pub client_id: Option<String>,
}

impl Target {
    pub fn account(id: impl Into<String>, username: impl Into<String>, role: Option<Role>) -> Self {
        Self { account: Some(id.into()), username: Some(username.into()), role, client_id: None }
    }

    pub fn with_client(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = Some(client_id.into());
        self
    }
}

/// One audit record. Field order is the serialization order and part of the canonical form: do not reorder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    pub id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub recorded: OffsetDateTime,
    pub kind: AuditKind,
    pub action: Action,
    pub outcome: Outcome,
    pub agent: Agent,
    /// The one patient the event is about, when it is about exactly one.
    pub patient: Option<Uuid>,
    /// Every patient the response disclosed, sorted, when there were two or more (then `patient` is `None`).
    /// Absent from the canonical form when empty, so events that name one patient or none keep their bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patients: Vec<Uuid>,
    pub resource_type: Option<String>,
    pub resource_id: Option<Uuid>,
    pub resource_version: Option<i64>,
    /// Search parameter names only (modifiers included, e.g. `name:exact`), sorted, without duplicates.
    pub query_params: Vec<String>,
    /// A v3-ActReason code, see [`purpose`].
    pub purpose_of_use: Option<String>,
    /// A fixed machine code (e.g. `user-created`, `invalid-credentials`), never free text.
    pub detail: Option<String>,
    /// The account or app an administrative action changed. Absent from the canonical form when `None`, so every
    /// other event keeps its bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
}

impl AuditEvent {
    /// A new event with a fresh time-ordered id (UUIDv7 from `recorded`) and the kind's default action.
    pub fn new(kind: AuditKind, recorded: OffsetDateTime, outcome: Outcome, agent: Agent) -> Self {
        let recorded = normalize_time(recorded);
        let ts = uuid::Timestamp::from_unix(
            uuid::NoContext,
            u64::try_from(recorded.unix_timestamp()).unwrap_or(0),
            recorded.nanosecond(),
        );
        Self {
            id: Uuid::new_v7(ts),
            recorded,
            kind,
            action: kind.default_action(),
            outcome,
            agent,
            patient: None,
            patients: Vec::new(),
            resource_type: None,
            resource_id: None,
            resource_version: None,
            query_params: Vec::new(),
            purpose_of_use: None,
            detail: None,
            target: None,
        }
    }

    pub fn with_action(mut self, action: Action) -> Self {
        self.action = action;
        self
    }

    pub fn with_patient(mut self, patient: Uuid) -> Self {
        self.patient = Some(patient);
        self.patients.clear();
        self
    }

    /// Names every patient the response disclosed: one goes to `patient`, two or more to `patients` (sorted,
    /// without duplicates); none leaves both empty.
    pub fn with_patients(mut self, patients: impl IntoIterator<Item = Uuid>) -> Self {
        let mut all: Vec<Uuid> = patients.into_iter().collect();
        all.sort_unstable();
        all.dedup();
        match all.as_slice() {
            [] => {
                self.patient = None;
                self.patients.clear();
            }
            [one] => {
                self.patient = Some(*one);
                self.patients.clear();
            }
            _ => {
                self.patient = None;
                self.patients = all;
            }
        }
        self
    }

    /// Every patient this event names (the one `patient`, or the `patients` a response disclosed).
    pub fn disclosed(&self) -> &[Uuid] {
        match &self.patient {
            Some(p) => std::slice::from_ref(p),
            None => &self.patients,
        }
    }

    /// The resource acted on; `id` is absent for searches and creates that failed.
    pub fn with_resource(mut self, resource_type: &'static str, id: Option<Uuid>, version: Option<i64>) -> Self {
        self.resource_type = Some(resource_type.to_owned());
        self.resource_id = id;
        self.resource_version = version;
        self
    }

    /// Records the parameter names of a search. `is_known` decides whether a name is one the server defines;
    /// any other name is recorded as [`UNRECOGNISED_PARAM`]. Values must never be passed here.
    pub fn with_query_params<'a>(
        mut self,
        names: impl IntoIterator<Item = &'a str>,
        is_known: impl Fn(&str) -> bool,
    ) -> Self {
        self.query_params =
            names.into_iter().map(|n| if is_known(n) { n.to_owned() } else { UNRECOGNISED_PARAM.to_owned() }).collect();
        self.query_params.sort();
        self.query_params.dedup();
        self
    }

    pub fn with_purpose(mut self, code: &'static str) -> Self {
        self.purpose_of_use = Some(code.to_owned());
        self
    }

    pub fn with_detail(mut self, code: &'static str) -> Self {
        self.detail = Some(code.to_owned());
        self
    }

    /// Names the account or app an administrative action changed.
    pub fn with_target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }

    /// The bytes the hash chain covers.
    ///
    /// Format (version 1, pinned by the golden test): the compact `serde_json` serialization of this struct,
    /// fields in declaration order, every field present (`null` when absent) except `patients`, which appears only when non-empty (so
    /// events naming at most one patient have the bytes they had before it existed), after normalizing:
    /// `recorded` in UTC, truncated to whole microseconds (what both databases store), as RFC 3339
    /// (`2026-01-02T03:04:05.123456Z`, fraction omitted when zero); `query_params` sorted and deduplicated.
    /// Enums are their fixed string codes, UUIDs lower-case hyphenated, integers decimal; no floats, no maps.
    /// Changing this format requires a new link domain tag in `chain`.
    ///
    /// Fails only for a time RFC 3339 cannot express (a year outside 0000–9999): refuse to append such an
    /// event (fail closed); during verification treat it as an edited record.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, CanonicalError> {
        let mut e = self.clone();
        e.recorded = normalize_time(e.recorded);
        e.query_params.sort();
        e.query_params.dedup();
        serde_json::to_vec(&e).map_err(|_| CanonicalError)
    }
}

/// An event that has no canonical form (its time is out of range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("audit event has no canonical form")]
pub struct CanonicalError;

/// UTC, whole microseconds.
pub fn normalize_time(t: OffsetDateTime) -> OffsetDateTime {
    let t = t.to_offset(UtcOffset::UTC);
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000).unwrap_or(t)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use time::macros::datetime;

    pub(crate) fn sample() -> AuditEvent {
        let agent = Agent::user("acct-7", Some("dr.house".into()), Some(Role::Clinician))
            .with_address("192.0.2.10".parse().unwrap());
        let mut e = AuditEvent::new(
            AuditKind::Search,
            datetime!(2026-03-04 05:06:07.123456789 +02:00),
            Outcome::Success,
            agent,
        )
        .with_patient(Uuid::from_u128(0x1111))
        .with_resource("Observation", None, None)
        .with_query_params(["patient", "code", "date", "code"], |_| true)
        .with_purpose(purpose::TREAT);
        e.id = Uuid::from_u128(0xabcd);
        e
    }

    #[test]
    fn canonical_bytes_are_pinned() {
        let golden = r#"{"id":"00000000-0000-0000-0000-00000000abcd","recorded":"2026-03-04T03:06:07.123456Z","kind":"search","action":"E","outcome":"0","agent":{"user":"acct-7","username":"dr.house","role":"clinician","client_id":null,"address":"192.0.2.10"},"patient":"00000000-0000-0000-0000-000000001111","resource_type":"Observation","resource_id":null,"resource_version":null,"query_params":["code","date","patient"],"purpose_of_use":"TREAT","detail":null}"#;
        assert_eq!(String::from_utf8(sample().canonical_bytes().unwrap()).unwrap(), golden);
    }

    #[test]
    fn canonical_bytes_survive_a_storage_round_trip() {
        let e = sample();
        let stored = serde_json::to_string(&e).unwrap();
        let back: AuditEvent = serde_json::from_str(&stored).unwrap();
        assert_eq!(back.canonical_bytes(), e.canonical_bytes());
        // Same instant in another offset, unsorted params: same bytes.
        let mut other = e.clone();
        other.recorded = other.recorded.to_offset(UtcOffset::from_hms(-5, 0, 0).unwrap());
        other.query_params.reverse();
        assert_eq!(other.canonical_bytes(), e.canonical_bytes());
        // Any field change changes the bytes.
        let mut changed = e.clone();
        changed.agent.role = Some(Role::Nurse);
        assert_ne!(changed.canonical_bytes(), e.canonical_bytes());
    }

    #[test]
    fn a_target_is_covered_when_present_and_absent_otherwise() {
        let plain = sample().canonical_bytes().unwrap();
        assert!(!String::from_utf8(plain.clone()).unwrap().contains("target"), "old events keep their bytes");
        let e = sample().with_target(Target::account("acct-9", "n.nurse", Some(Role::Nurse)));
        let text = String::from_utf8(e.canonical_bytes().unwrap()).unwrap();
        assert!(
            text.ends_with(
                r#","detail":null,"target":{"account":"acct-9","username":"n.nurse","role":"nurse","client_id":null}}"#
            ),
            "{text}"
        );
        let back: AuditEvent = serde_json::from_str(&text).unwrap();
        assert_eq!(back.canonical_bytes().unwrap(), text.as_bytes());
        let mut other = e.clone();
        other.target.as_mut().unwrap().role = Some(Role::Admin);
        assert_ne!(other.canonical_bytes(), e.canonical_bytes());
    }

    #[test]
    fn a_time_without_an_rfc3339_form_has_no_canonical_bytes() {
        let mut e = sample();
        e.recorded = time::macros::datetime!(2026-01-01 0:00 UTC).replace_year(-1).unwrap();
        assert_eq!(e.canonical_bytes(), Err(CanonicalError));
    }

    #[test]
    fn unknown_parameter_names_are_not_recorded() {
        let e = sample().with_query_params(["family", "JohnSmith1970"], |n| n == "family");
        assert_eq!(e.query_params, vec!["(unrecognised)".to_owned(), "family".to_owned()]);
        assert!(!String::from_utf8(e.canonical_bytes().unwrap()).unwrap().contains("JohnSmith"));
    }

    #[test]
    fn default_actions_follow_balp() {
        assert_eq!(AuditKind::Read.default_action(), Action::R);
        assert_eq!(AuditKind::Search.default_action(), Action::E);
        assert_eq!(AuditKind::Create.default_action(), Action::C);
        assert_eq!(AuditKind::Update.default_action(), Action::U);
        assert_eq!(AuditKind::Delete.default_action(), Action::D);
        assert_eq!(AuditKind::Login.default_action(), Action::E);
        assert_eq!(Outcome::from_http_status(404), Outcome::MinorFailure);
        assert_eq!(Outcome::from_http_status(503), Outcome::SeriousFailure);
    }
}
