//! The one way in: every FHIR-facing interaction is an [`Operation`] (who asks, and what), executed by
//! [`Records::execute`](super::Records::execute), which answers with a [`Done`]. Handlers build the first and
//! render the second; nothing else of the records service is reachable from outside it.

use super::Caller;
use crate::access::Action;
use crate::audit::AuditKind;
use crate::fhir::search::Handling;
use serde_json::Value;
use time::OffsetDateTime;

/// One request to the records service.
#[derive(Debug, Clone)]
pub struct Operation {
    pub caller: Caller,
    pub interaction: Interaction,
}

impl Operation {
    pub fn new(caller: Caller, interaction: Interaction) -> Self {
        Self { caller, interaction }
    }
}

/// What is asked. Type names and ids are the client's text until the pipeline has checked them.
#[derive(Debug, Clone)]
pub enum Interaction {
    /// Create; with `if_none_exist` (the `If-None-Exist` search), a conditional create.
    Create {
        rtype: String,
        body: bytes::Bytes,
        if_none_exist: Option<Vec<(String, String)>>,
    },
    Read {
        rtype: String,
        id: String,
        elements: Option<Vec<String>>,
    },
    Vread {
        rtype: String,
        id: String,
        version: String,
    },
    Update {
        rtype: String,
        id: String,
        if_match: Option<i64>,
        body: bytes::Bytes,
    },
    /// Conditional update: `PUT {type}?search`.
    ConditionalUpdate {
        rtype: String,
        params: Vec<(String, String)>,
        if_match: Option<i64>,
        body: bytes::Bytes,
    },
    /// JSON Patch (`application/json-patch+json`).
    Patch {
        rtype: String,
        id: String,
        if_match: Option<i64>,
        body: bytes::Bytes,
    },
    Delete {
        rtype: String,
        id: String,
    },
    /// Conditional delete: `DELETE {type}?search` (one match at most).
    ConditionalDelete {
        rtype: String,
        params: Vec<(String, String)>,
    },
    /// `POST {type}/$validate`: the body checked as a create by this caller would be, nothing stored.
    Validate {
        rtype: String,
        body: bytes::Bytes,
    },
    /// `POST /fhir`: a `batch` or `transaction` Bundle.
    Bundle {
        body: bytes::Bytes,
    },
    Search {
        rtype: String,
        params: Vec<(String, String)>,
        handling: Handling,
    },
    /// Instance history: `{type}/{id}/_history`.
    History {
        rtype: String,
        id: String,
    },
    /// `Patient/{id}/$everything`.
    Everything {
        patient: String,
    },
    /// `Patient/{id}/$access-report`.
    AccessReport {
        patient: String,
    },
    /// `POST /auth/break-glass`: `patient` as `Patient/ID`.
    BreakGlass {
        patient: String,
        /// `emergency`, `urgent-care` or `other` (CONTRACT §3); `None` is `emergency`.
        code: Option<String>,
        reason: String,
    },
    /// `GET /admin/alerts?…`: the query string as received.
    ListAlerts {
        query: String,
    },
    /// `POST /admin/alerts/{id}/ack`.
    AckAlert {
        alert: String,
        note: String,
    },
}

impl Interaction {
    /// The audit kind of this interaction, on success and on failure alike.
    pub fn kind(&self) -> AuditKind {
        match self {
            Self::Create { .. } => AuditKind::Create,
            Self::Read { .. } => AuditKind::Read,
            Self::Vread { .. } => AuditKind::Vread,
            Self::Update { .. } | Self::ConditionalUpdate { .. } => AuditKind::Update,
            Self::Patch { .. } => AuditKind::Patch,
            Self::Delete { .. } | Self::ConditionalDelete { .. } => AuditKind::Delete,
            Self::Validate { .. } => AuditKind::Validate,
            Self::Bundle { body } => {
                if super::bundle::is_transaction(body) {
                    AuditKind::Transaction
                } else {
                    AuditKind::Batch
                }
            }
            Self::Search { .. } => AuditKind::Search,
            Self::History { .. } => AuditKind::History,
            Self::Everything { .. } => AuditKind::Everything,
            Self::AccessReport { .. } => AuditKind::AccessReport,
            Self::BreakGlass { .. } => AuditKind::BreakGlass,
            Self::ListAlerts { .. } | Self::AckAlert { .. } => AuditKind::Admin,
        }
    }

    /// The resource type named by the request (client text; checked against the declarations later).
    pub fn rtype(&self) -> &str {
        match self {
            Self::Create { rtype, .. }
            | Self::Read { rtype, .. }
            | Self::Vread { rtype, .. }
            | Self::Update { rtype, .. }
            | Self::ConditionalUpdate { rtype, .. }
            | Self::Patch { rtype, .. }
            | Self::Delete { rtype, .. }
            | Self::ConditionalDelete { rtype, .. }
            | Self::Validate { rtype, .. }
            | Self::Search { rtype, .. }
            | Self::History { rtype, .. } => rtype,
            Self::Everything { .. } | Self::AccessReport { .. } | Self::BreakGlass { .. } => "Patient",
            Self::ListAlerts { .. } | Self::AckAlert { .. } | Self::Bundle { .. } => "",
        }
    }

    /// The id the request targets, when it names one.
    pub fn target_id(&self) -> Option<&str> {
        match self {
            Self::Read { id, .. }
            | Self::Vread { id, .. }
            | Self::Update { id, .. }
            | Self::Patch { id, .. }
            | Self::Delete { id, .. }
            | Self::History { id, .. } => Some(id),
            Self::Everything { patient } | Self::AccessReport { patient } => Some(patient),
            Self::BreakGlass { patient, .. } => patient.strip_prefix("Patient/"),
            Self::Create { .. }
            | Self::ConditionalUpdate { .. }
            | Self::ConditionalDelete { .. }
            | Self::Validate { .. }
            | Self::Bundle { .. }
            | Self::Search { .. }
            | Self::ListAlerts { .. }
            | Self::AckAlert { .. } => None,
        }
    }

    /// The policy action of a FHIR interaction (`None` for the security operations, decided by role).
    pub(super) fn action(&self) -> Option<Action> {
        Some(match self {
            Self::Create { .. } | Self::Validate { .. } => Action::Create,
            Self::Read { .. } => Action::Read,
            Self::Vread { .. } => Action::Vread,
            Self::Update { .. } | Self::ConditionalUpdate { .. } | Self::Patch { .. } => Action::Update,
            Self::Delete { .. } | Self::ConditionalDelete { .. } => Action::Delete,
            Self::Search { .. } => Action::Search,
            Self::History { .. } => Action::History,
            Self::Everything { .. } => Action::Everything,
            Self::AccessReport { .. } => Action::AccessReport,
            Self::BreakGlass { .. } | Self::ListAlerts { .. } | Self::AckAlert { .. } | Self::Bundle { .. } => {
                return None;
            }
        })
    }
}

/// A resource as returned to a caller, with its version facts for headers.
#[derive(Debug, Clone)]
pub struct Shown {
    pub resource: Value,
    pub version_id: i64,
    pub last_updated: OffsetDateTime,
}

/// The audited result of an operation: its audit event is durable before this is returned.
#[derive(Debug, Clone)]
pub enum Done {
    /// read, vread, update (and create: see [`Done::Created`]).
    Resource(Shown),
    Created(Shown),
    /// search, history, `$everything`.
    Bundle(Value),
    /// A non-FHIR JSON document: an access report, a break-glass grant, alerts.
    Document(Value),
    /// delete.
    Deleted,
}
