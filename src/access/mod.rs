//! Access decisions: may this principal perform this interaction on this resource type, over which patients
//! (scope), seeing and writing which elements (field masks)?
//!
//! Pure: no HTTP, no database. The rules live in `policies/` (casbin model and policy, field rules), are validated
//! when loaded, and evaluated once per (role, type, interaction) into a table, so a decision is a table lookup
//! with no casbin call and no lock. Guarantees:
//! - fail closed: with no policy loaded, or for an unknown type, everything is denied;
//! - a reload that fails leaves the previous policy in force;
//! - several roles: the role granting the broadest scope decides (all > careteam > own); when several roles
//!   grant that same scope, their field masks are united. Masks of roles with a narrower scope are never
//!   applied to the broader scope, so combining roles never reveals more of a record than one role alone does.
//! - writes ([`Decision::merge_hidden`]): elements the role may not write are kept as stored; sending a value
//!   for an element the role may not see, or a changed value for one it may see but not write, is refused
//!   ([`WriteDenied`], 403) rather than silently ignored, so a client never believes it changed what it did not.
//!   The refusal never depends on a hidden stored value (no oracle).
//!
//! The care-team and break-glass lookups (which patients `careteam` covers) and the scoping of queries belong to
//! the records service: `Scope::CareTeam` means "patients whose active CareTeam lists the user's Practitioner,
//! plus the patients of the user's live break-glass grants".

mod catalog;
mod mask;
mod policy;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde_json::Value;

use crate::auth::Principal;
use crate::error::AppError;
use crate::role::Role;

pub use catalog::{ElementCatalog, R4Catalog, RESOURCE_TYPES, r4_mandatory};
pub use mask::{
    FieldMask, SSN_SYSTEM, SUBSETTED_CODE, SUBSETTED_SYSTEM, add_subsetted_tag, canonical_system, identifier_class,
    is_ssn,
};
pub use policy::{FIELDS_FILE, MODEL_FILE, POLICY_FILE, PolicyError, PolicySet};

/// The FHIR interactions the policy grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Read,
    Vread,
    Search,
    History,
    Create,
    Update,
    Delete,
    /// `Patient/$everything`.
    Everything,
    /// `Patient/$access-report`.
    AccessReport,
}

impl Action {
    pub const ALL: [Action; 9] = [
        Action::Read,
        Action::Vread,
        Action::Search,
        Action::History,
        Action::Create,
        Action::Update,
        Action::Delete,
        Action::Everything,
        Action::AccessReport,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Vread => "vread",
            Action::Search => "search",
            Action::History => "history",
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Everything => "everything",
            Action::AccessReport => "access-report",
        }
    }

    /// Interactions that return resource content (they need a read mask).
    pub fn reads(self) -> bool {
        matches!(self, Action::Read | Action::Vread | Action::Search | Action::History | Action::Everything)
    }

    /// Interactions that take resource content (they need a write mask).
    pub fn writes(self) -> bool {
        matches!(self, Action::Create | Action::Update)
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown action")]
pub struct UnknownAction;

impl std::str::FromStr for Action {
    type Err = UnknownAction;
    /// Accepts the policy names, and the operation names with `$` (`$everything`, `$access-report`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.strip_prefix('$').unwrap_or(s);
        Action::ALL.into_iter().find(|a| a.as_str() == s).ok_or(UnknownAction)
    }
}

/// Which patients' records a granted interaction covers. The order is breadth: `All` > `CareTeam` > `Own`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// The signed-in patient's own compartment.
    Own,
    /// Patients whose active CareTeam lists the user's Practitioner, plus live break-glass grants.
    CareTeam,
    /// Every record of the type.
    All,
}

impl Scope {
    /// Broadest first: the order in which the policy is asked.
    pub const ALL: [Scope; 3] = [Scope::All, Scope::CareTeam, Scope::Own];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::All => "all",
            Scope::CareTeam => "careteam",
            Scope::Own => "own",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer for one request.
#[derive(Debug, Clone)]
pub struct Decision {
    pub allowed: bool,
    /// `Some` exactly when allowed.
    pub scope: Option<Scope>,
    /// What the caller may see of this type (nothing when denied).
    pub read_mask: Arc<FieldMask>,
    /// What the caller may set or change of this type (nothing when denied or read-only).
    pub write_mask: Arc<FieldMask>,
    /// The policy line(s) that decided, or why it was denied: for `policy explain` and the audit trail.
    pub rule: Arc<str>,
    /// What the caller's token scopes take away from what the role allows (SMART); `None`: nothing.
    pub narrowing: Option<Arc<Narrowing>>,
}

/// What a SMART token's scopes subtract from a role's decision ([`narrow`]): never anything added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Narrowing {
    /// Only this patient's compartment (a `patient/` scope, the launch patient in context).
    pub patient: Option<uuid::Uuid>,
    /// Search clauses every query must also satisfy and every resource disclosed must match (granular scopes,
    /// e.g. `category=laboratory`).
    pub params: Vec<(String, String)>,
}

/// The effective permission: the role's decision intersected with the token's scopes (SMART App Launch).
/// A principal without scopes (a first-party login) keeps the role's decision; with scopes, an interaction no
/// scope grants is denied, a `patient/` grant confines the decision to the launch patient, and a granular scope
/// restricts it further. Scopes never widen: a denied decision stays denied.
pub fn narrow(decision: Decision, principal: &Principal, resource_type: &str, action: Action) -> Decision {
    let Some(scopes) = principal.scopes.as_deref() else { return decision };
    if !decision.allowed {
        return decision;
    }
    match scopes.permit(resource_type, action, principal.context_patient.is_some()) {
        None => Decision {
            allowed: false,
            scope: None,
            read_mask: Arc::new(FieldMask::nothing()),
            write_mask: Arc::new(FieldMask::nothing()),
            rule: Arc::from(format!("denied: the token's scopes do not grant {action} on {resource_type}")),
            narrowing: None,
        },
        Some(permit) if !permit.confined && permit.params.is_empty() => decision,
        Some(permit) => Decision {
            narrowing: Some(Arc::new(Narrowing {
                patient: if permit.confined { principal.context_patient } else { None },
                params: permit.params,
            })),
            ..decision
        },
    }
}

/// A write touched an element the caller may not write. Carries no client data: only the R4 name of the
/// top-level element refused (a name the schema defines; see [`FieldMask::element_name`]), when there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the request writes an element the caller may not write")]
pub struct WriteDenied {
    /// The refused top-level element (`communication`, `identifier`); `None` when the whole write is refused.
    pub element: Option<String>,
}

impl WriteDenied {
    /// The whole write is refused (a denied decision, a body that is not an object).
    pub const ALL: WriteDenied = WriteDenied { element: None };

    fn element(mask: &FieldMask, key: &str) -> Self {
        WriteDenied { element: mask.element_name(key) }
    }

    /// The error for a write of `rtype`: a 403 whose OperationOutcome names `{rtype}.{element}`.
    pub fn at(self, rtype: &str) -> AppError {
        match self.element {
            Some(e) => AppError::ForbiddenElement { path: format!("{rtype}.{e}") },
            None => AppError::Forbidden,
        }
    }
}

impl From<WriteDenied> for AppError {
    fn from(e: WriteDenied) -> Self {
        match e.element {
            Some(path) => AppError::ForbiddenElement { path },
            None => AppError::Forbidden,
        }
    }
}

impl Decision {
    /// Prepares an incoming create (`stored` = `None`) or update body for storage, under this decision's masks.
    ///
    /// Elements the caller may not write are taken from `stored` (hidden elements survive the update; on create
    /// they stay absent). Refused with [`WriteDenied`] (naming the element) when: the decision is a denial; the
    /// body is not a JSON object; it carries an element the caller may not see, or an identifier of a hidden
    /// system (whatever its value: the check must not reveal hidden data); or it changes an element the caller
    /// may see but not write. Identifiers of a write-only system (the front desk's SSN) are accepted: when the
    /// body sends any, they replace the stored ones of that system; when it sends none, the stored ones are kept.
    /// The `SUBSETTED` tag of a shaped resource sent back is removed. `resourceType`, `id` and `meta` are left to
    /// the caller.
    pub fn merge_hidden(&self, stored: Option<&Value>, incoming: &mut Value) -> Result<(), WriteDenied> {
        if !self.allowed || self.write_mask.is_nothing() {
            return Err(WriteDenied::ALL);
        }
        let (read, write) = (&*self.read_mask, &*self.write_mask);
        let stored = stored.and_then(Value::as_object);
        let incoming = incoming.as_object_mut().ok_or(WriteDenied::ALL)?;

        for (key, value) in incoming.iter() {
            if write.allows(key) {
                continue;
            }
            let unchanged = read.allows(key)
                && stored.and_then(|s| s.get(key)).is_some_and(|old| visible(read, key, old) == *value);
            if !unchanged {
                return Err(WriteDenied::element(write, key));
            }
        }
        if let Some(Value::Array(ids)) = incoming.get("identifier")
            && ids.iter().any(|id| write.hides_identifier(id))
        {
            return Err(WriteDenied::element(write, "identifier"));
        }

        if let Some(stored) = stored {
            for (key, value) in stored {
                if !write.allows(key) {
                    incoming.insert(key.clone(), value.clone());
                }
            }
            restore_hidden_identifiers(write, stored, incoming)?;
        }
        FieldMask::strip_subsetted_tag(incoming);
        Ok(())
    }
}

/// The stored value of `key` as a reader with `read` saw it (hidden identifiers removed).
fn visible(read: &FieldMask, key: &str, stored: &Value) -> Value {
    match stored {
        Value::Array(ids) if key == "identifier" => {
            Value::Array(ids.iter().filter(|id| !read.hides_identifier(id)).cloned().collect())
        }
        other => other.clone(),
    }
}

/// Puts back stored identifiers of systems the writer may not touch (the SSN a front desk was never shown).
fn restore_hidden_identifiers(
    write: &FieldMask,
    stored: &serde_json::Map<String, Value>,
    incoming: &mut serde_json::Map<String, Value>,
) -> Result<(), WriteDenied> {
    if !write.allows("identifier") {
        return Ok(());
    }
    let Some(Value::Array(old)) = stored.get("identifier") else {
        return Ok(());
    };
    // Write-only identifiers the body sends replace the stored ones; when it sends none, the stored ones stay.
    let sends_blind = incoming
        .get("identifier")
        .and_then(Value::as_array)
        .is_some_and(|ids| ids.iter().any(|id| write.writes_blind(id)));
    let kept: Vec<Value> = old
        .iter()
        .filter(|id| write.hides_identifier(id) || (!sends_blind && write.writes_blind(id)))
        .cloned()
        .collect();
    if kept.is_empty() {
        return Ok(());
    }
    let ids = incoming.entry("identifier").or_insert_with(|| Value::Array(Vec::new()));
    ids.as_array_mut().ok_or_else(|| WriteDenied::element(write, "identifier"))?.extend(kept);
    Ok(())
}

impl std::fmt::Debug for AccessControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessControl").finish_non_exhaustive()
    }
}

/// The live policy: swapped atomically on reload; read without a lock.
pub struct AccessControl {
    current: ArcSwap<PolicySet>,
    catalog: Arc<dyn ElementCatalog>,
}

impl AccessControl {
    /// Denies everything until a policy is loaded.
    pub fn deny_all(catalog: Arc<dyn ElementCatalog>) -> Self {
        Self { current: ArcSwap::from_pointee(PolicySet::deny_all()), catalog }
    }

    /// Loads and validates `dir/model.conf`, `dir/policy.csv`, `dir/fields.toml`. Any error is returned: the
    /// caller decides whether to stop or to run with [`AccessControl::deny_all`].
    pub fn load(dir: &Path, catalog: Arc<dyn ElementCatalog>) -> Result<Self, PolicyError> {
        let set = PolicySet::load_dir(dir, &*catalog)?;
        Ok(Self { current: ArcSwap::from_pointee(set), catalog })
    }

    /// The policy built into the binary ([`PolicySet::builtin`]).
    pub fn builtin(catalog: Arc<dyn ElementCatalog>) -> Result<Self, PolicyError> {
        let set = PolicySet::builtin(&*catalog)?;
        Ok(Self { current: ArcSwap::from_pointee(set), catalog })
    }

    /// The policy `source` names: the built-in one, or a directory's files.
    pub fn from_source(
        source: &crate::config::PolicySource,
        catalog: Arc<dyn ElementCatalog>,
    ) -> Result<Self, PolicyError> {
        match source {
            crate::config::PolicySource::Builtin => Self::builtin(catalog),
            crate::config::PolicySource::Dir(dir) => Self::load(dir, catalog),
        }
    }

    /// Reloads from `dir`; on any error the policy in force stays in force.
    pub fn reload_from_dir(&self, dir: &Path) -> Result<(), PolicyError> {
        let set = PolicySet::load_dir(dir, &*self.catalog)?;
        self.current.store(Arc::new(set));
        Ok(())
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    /// The decision for a principal holding `roles` (see the module doc for several roles).
    pub fn decide(&self, roles: &[Role], resource_type: &str, action: Action) -> Decision {
        let _span = tracing::info_span!(target: "carevault::access", "decide").entered();
        let decision = self.current.load().decide(roles, resource_type, action);
        crate::telemetry::metrics::policy_decision(decision.allowed);
        decision
    }

    /// The decision for `principal`: its roles' decision narrowed by its token's scopes ([`narrow`]).
    pub fn decide_for(&self, principal: &Principal, resource_type: &str, action: Action) -> Decision {
        narrow(self.decide(&principal.roles, resource_type, action), principal, resource_type, action)
    }

    /// The decision and the rule that made it, for `carevault policy explain`.
    pub fn explain(&self, role: Role, resource_type: &str, action: Action) -> String {
        self.current.load().explain(role, resource_type, action)
    }
}

/// How often the policy files are checked for changes.
pub const POLICY_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Polls the policy files' modification times every `every` ([`POLICY_POLL_INTERVAL`] in production) and reloads on change, off the
/// async workers. A failed reload is logged (file and line, never data) and the previous policy stays; it is
/// retried when the files change again. The first poll loads once, so nothing changed before it is missed.
pub fn spawn_policy_watcher(access: Arc<AccessControl>, dir: PathBuf, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = None;
        loop {
            tick.tick().await;
            let seen = files_signature(&dir);
            if last.as_ref() == Some(&seen) {
                continue;
            }
            last = Some(seen);
            let (access, dir) = (Arc::clone(&access), dir.clone());
            match tokio::task::spawn_blocking(move || access.reload_from_dir(&dir)).await {
                Ok(Ok(())) => tracing::info!("access policy loaded"),
                Ok(Err(e)) => {
                    tracing::warn!(error.detail = %e, "access policy not loaded; previous policy in force")
                }
                Err(e) => tracing::warn!(error.detail = %e, "access policy reload task failed"),
            }
        }
    })
}

type FileStamp = Option<(SystemTime, u64)>;

/// Modification time and length of each policy file (`None` when missing).
fn files_signature(dir: &Path) -> [FileStamp; 3] {
    [MODEL_FILE, POLICY_FILE, FIELDS_FILE].map(|name| {
        let meta = std::fs::metadata(dir.join(name)).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    })
}
