//! The records service: every FHIR interaction passes here, so no route can skip a step.
//!
//! For each request: one access decision (allowed, scope, field masks) → a query narrowed by scope in SQL →
//! decryption of only the elements the caller's mask allows → shaping (mask ∩ `_elements`, SUBSETTED tag) →
//! an audit event made durable before the response leaves (reads: group commit; writes: in the data
//! transaction). Out of scope answers 404 exactly like a missing id.

use super::execute::Disclosure;
use super::operation::Shown;
use super::store::{self, IndexValues, Row, ScopeFilter};
use crate::access::{AccessControl, Action, Decision, FieldMask, Scope};
use crate::audit::{Agent, purpose};
use crate::auth::principal::Principal;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::crypto::store::micros;
use crate::crypto::{BlindIndexer, FieldAad, FieldCipher};
use crate::error::{AppError, AppResult};
use crate::fhir::bundle::{self, HistoryEntry, HistoryMethod};
use crate::fhir::search::{self, Handling, IndexValue, SearchRequest};
use crate::fhir::{FhirValidator, PatientLink, ResourceDecl, decl};
use crate::monitor::{Subject as AlertSubject, rules};
use crate::role::Role;
use crate::store::{AnyConnection, Db};
use serde_json::{Map, Value, json};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

/// Prefix of every stored ciphertext (see `crypto::cipher`).
const CIPHERTEXT: &str = "cv1:";
/// Identifier systems stored apart from the rest of `identifier`, under their own ciphertext, so that a reader
/// whose mask hides them (every role but billing and admin, for the SSN) never has them decrypted.
pub const RESTRICTED_SYSTEMS: &[&str] = &[crate::access::SSN_SYSTEM];
/// The stored element holding a resource's restricted identifiers as `[[position, identifier], …]` (position in
/// the original `identifier` array). Not a FHIR element name (`#` cannot occur in one), so no client can send it.
pub const RESTRICTED_IDENTIFIERS: &str = "identifier#restricted";

/// Moves the identifiers of [`RESTRICTED_SYSTEMS`] (by class: [`crate::access::is_ssn`]) out of `resource.identifier` (removing the element when
/// nothing else is left) and returns them as the [`RESTRICTED_IDENTIFIERS`] value; `None` when there are none.
pub fn split_restricted(resource: &mut Map<String, Value>) -> Option<Value> {
    let Some(Value::Array(ids)) = resource.get_mut("identifier") else { return None };
    // By class: every spelling of the SSN system, and identifiers typed `SS`.
    let restricted = |id: &Value| crate::access::is_ssn(id);
    if !ids.iter().any(restricted) {
        return None;
    }
    let mut kept = Vec::with_capacity(ids.len());
    let mut moved = Vec::new();
    for (position, id) in std::mem::take(ids).into_iter().enumerate() {
        if restricted(&id) {
            moved.push(json!([position, id]));
        } else {
            kept.push(id);
        }
    }
    if kept.is_empty() {
        resource.remove("identifier");
    } else {
        resource.insert("identifier".into(), Value::Array(kept));
    }
    Some(Value::Array(moved))
}

/// The inverse of [`split_restricted`]: puts each restricted identifier back at its position.
pub fn join_restricted(resource: &mut Map<String, Value>, restricted: Value) -> AppResult<()> {
    let bad = || AppError::internal("malformed restricted identifiers");
    let Value::Array(entries) = restricted else { return Err(bad()) };
    let ids = resource.entry("identifier").or_insert_with(|| Value::Array(vec![]));
    let ids = ids.as_array_mut().ok_or_else(bad)?;
    for entry in entries {
        let Value::Array(mut pair) = entry else { return Err(bad()) };
        let (Some(id), Some(position)) = (pair.pop(), pair.first().and_then(Value::as_u64)) else { return Err(bad()) };
        let position = usize::try_from(position).map_err(|_| bad())?.min(ids.len());
        ids.insert(position, id);
    }
    Ok(())
}

/// Whether a reader under `mask` may see restricted identifiers (then they are decrypted, else never).
pub(super) fn restricted_readable(mask: &FieldMask) -> bool {
    mask.allows("identifier") && !RESTRICTED_SYSTEMS.iter().any(|s| mask.hides_system(s))
}

/// What of a client's `meta` is stored: `profile` and `tag` (less the server's SUBSETTED tag); `None` when
/// nothing is left.
pub(super) fn client_meta(meta: &Value) -> Option<Value> {
    let mut kept = Map::new();
    if let Some(profile) = meta.get("profile").filter(|p| p.as_array().is_some_and(|a| !a.is_empty())) {
        kept.insert("profile".into(), profile.clone());
    }
    if let Some(tags) = meta.get("tag").and_then(Value::as_array) {
        let tags: Vec<Value> = tags
            .iter()
            .filter(|t| {
                !(t.get("system").and_then(Value::as_str) == Some(crate::access::SUBSETTED_SYSTEM)
                    && t.get("code").and_then(Value::as_str) == Some(crate::access::SUBSETTED_CODE))
            })
            .cloned()
            .collect();
        if !tags.is_empty() {
            kept.insert("tag".into(), Value::Array(tags));
        }
    }
    (!kept.is_empty()).then_some(Value::Object(kept))
}

/// The resource's `meta`: the stored client part (profile, tag) with the server's versionId and lastUpdated.
pub(super) fn with_server_meta(obj: &mut Map<String, Value>, version: i64, when: String) {
    let mut meta = match obj.remove("meta") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    meta.insert("versionId".into(), Value::String(version.to_string()));
    meta.insert("lastUpdated".into(), Value::String(when));
    obj.insert("meta".into(), Value::Object(meta));
}

/// A search's parameters as received: (name, value) pairs.
type SearchPairs = Vec<(String, String)>;
/// How long a search link (`self`, `next`) stays usable.
const CURSOR_TTL_SECS: i64 = 3600;
/// The "resource type" of a sealed search cursor's associated data (no resource type has this name).
const CURSOR_AAD: &str = "$search-cursor";
/// Most rows a date search (decrypt-and-filter) may examine before it must be narrowed.
const MAX_SCAN: usize = 5000;

/// Who is asking, from where.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub ip: Option<IpAddr>,
}

impl Caller {
    pub(super) fn agent(&self) -> Agent {
        let p = &self.principal;
        let mut agent = Agent::user(p.subject.clone(), p.username.clone(), p.roles.first().copied());
        if let Some(c) = &p.client_id {
            agent = agent.with_client(c.clone());
        }
        match self.ip {
            Some(ip) => agent.with_address(ip),
            None => agent,
        }
    }

    /// The purpose of use the caller's role implies (break-glass access overrides it with BTG).
    pub(super) fn purpose(&self) -> &'static str {
        match self.principal.roles.first() {
            Some(Role::Clinician | Role::Nurse) => purpose::TREAT,
            Some(Role::Billing) => purpose::HPAYMT,
            Some(Role::FrontDesk) => purpose::HOPERAT,
            Some(Role::Patient) => purpose::PATRQT,
            Some(Role::Auditor) => purpose::HCOMPL,
            Some(Role::Admin) | None => purpose::HSYSADMIN,
        }
    }
}

/// One stored version, as the decoder needs it.
#[derive(Debug, Clone, Copy)]
pub struct Version<'a> {
    pub id: &'a str,
    pub version: i64,
    pub updated: i64,
    pub content: &'a str,
}

impl Row {
    pub(super) fn view(&self) -> Version<'_> {
        Version { id: &self.id, version: self.version_id, updated: self.last_updated, content: &self.content }
    }
}

impl store::HistoryRow {
    fn view(&self) -> Version<'_> {
        Version { id: &self.id, version: self.version_id, updated: self.last_updated, content: &self.content }
    }
}

/// What a write stored, for its audit event.
pub(super) struct Written<'a> {
    pub(super) d: &'a ResourceDecl,
    pub(super) id: &'a str,
    pub(super) version: i64,
    pub(super) patient: Option<&'a str>,
}

/// What `resolve_scope` found: the SQL scope plus the patients reachable only through break-glass.
/// A search ready to run: the parsed request, its SQL part, and whether candidates need decrypt-and-filter.
pub(super) struct SearchPlan {
    pub(super) req: SearchRequest,
    pub(super) query: store::IndexQuery,
    pub(super) needs_filter: bool,
}

pub(super) struct Reach {
    pub(super) filter: ScopeFilter,
    pub(super) break_glass: Vec<String>,
}

pub struct Records {
    pub(super) db: Db,
    pub(super) cipher: FieldCipher,
    access: Arc<AccessControl>,
    validator: Arc<FhirValidator>,
    pub(super) audit: crate::audit::store::Auditor,
    pub(super) clock: SharedClock,
    pub(super) base: String,
    /// The server's settings (alerts, break-glass length); without them a decrypt failure is only logged and
    /// break-glass grants last 60 minutes (see [`Records::with_config`]).
    pub(super) config: Option<Arc<Config>>,
    /// When (Unix micros) this process last asked for a decrypt-failure alert; shared by every handle.
    decrypt_alarm: Arc<AtomicI64>,
    /// In-flight expensive operations per account (`limits.max_concurrent_per_account`); shared by every handle.
    pub(super) concurrency: super::concurrency::Limiter,
    /// Benchmark builds only: see [`Records::with_benchmark_switches`].
    #[cfg(feature = "benchmark")]
    bench: Bench,
}

/// The safeguards a benchmark switched off here: encryption, and access (as a prebuilt permit-all decision).
#[cfg(feature = "benchmark")]
#[derive(Debug, Clone, Default)]
struct Bench {
    encryption_off: bool,
    permit_all: Option<Decision>,
}

/// A decrypt failure asks for an alert at most this often per process (the alert itself is deduplicated per
/// window under the chain lock; this only keeps a flood of failing reads from queueing a transaction each).
const DECRYPT_ALARM_EVERY_MICROS: i64 = 10_000_000;

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records").finish_non_exhaustive()
    }
}

pub(super) fn from_micros(m: i64) -> OffsetDateTime {
    crate::auth::service::from_micros(m)
}

pub(super) fn parse_id(id: &str) -> AppResult<Uuid> {
    Uuid::parse_str(id).map_err(|_| AppError::NotFound)
}

pub(super) fn decl_of(rtype: &str) -> AppResult<&'static ResourceDecl> {
    decl::decl(rtype).ok_or(AppError::NotFound)
}

impl Records {
    pub fn new(
        db: Db,
        cipher: FieldCipher,
        access: Arc<AccessControl>,
        validator: Arc<FhirValidator>,
        audit: crate::audit::store::Auditor,
        clock: SharedClock,
        base: String,
    ) -> Self {
        let decrypt_alarm = Arc::new(AtomicI64::new(0));
        Self {
            db,
            cipher,
            access,
            validator,
            audit,
            clock,
            base,
            config: None,
            decrypt_alarm,
            concurrency: super::concurrency::Limiter::default(),
            #[cfg(feature = "benchmark")]
            bench: Bench::default(),
        }
    }

    /// Benchmark only (the configuration refuses this in production): `encryption_off` stores PHI elements as
    /// plaintext JSON (reads pass non-ciphertext through); `access_off` replaces every decision with permit-all
    /// (scope all, every element). The audit switch lives in the [`Auditor`](crate::audit::store::Auditor).
    #[cfg(feature = "benchmark")]
    pub fn with_benchmark_switches(mut self, s: crate::config::BenchmarkSwitches) -> Self {
        let everything = Arc::new(FieldMask::everything());
        self.bench = Bench {
            encryption_off: s.encryption_off,
            permit_all: s.access_off.then(|| Decision {
                allowed: true,
                scope: Some(Scope::All),
                read_mask: everything.clone(),
                write_mask: everything,
                rule: Arc::from("benchmark: access control off"),
                narrowing: None,
            }),
        };
        self
    }

    /// The access decision (permit-all when a benchmark switched access control off).
    /// The caller's roles decide, the token's scopes narrow ([`crate::access::narrow`]).
    pub(super) fn decision(&self, principal: &Principal, rtype: &str, action: Action) -> Decision {
        #[cfg(feature = "benchmark")]
        if let Some(d) = &self.bench.permit_all {
            return d.clone();
        }
        self.access.decide_for(principal, rtype, action)
    }

    /// The server's settings: the `decrypt-failure` alert is raised with them when a stored element fails to
    /// decrypt, and break-glass grants last `access.break_glass_minutes`.
    pub fn with_config(mut self, config: Arc<Config>) -> Self {
        self.config = Some(config);
        self
    }

    /// A stored element failed to decrypt (tampering, a moved ciphertext, a lost key): raise the critical
    /// `decrypt-failure` alert. Runs in the background, since the caller may hold the chain lock in a transaction.
    fn decrypt_failed(&self) {
        let now = self.clock.now();
        let last = self.decrypt_alarm.load(Ordering::Acquire);
        if micros(now).saturating_sub(last) < DECRYPT_ALARM_EVERY_MICROS
            || self.decrypt_alarm.compare_exchange(last, micros(now), Ordering::AcqRel, Ordering::Acquire).is_err()
        {
            return;
        }
        let (Ok(runtime), Some(config)) = (tokio::runtime::Handle::try_current(), self.config.clone()) else {
            tracing::error!("cannot raise the decrypt-failure alert here (no runtime or no alert settings)");
            return;
        };
        let (db, sealer) = (self.db.clone(), self.audit.sealer_arc().clone());
        runtime.spawn(async move {
            let subject = AlertSubject::System("field-cipher");
            if let Err(e) = crate::monitor::raise(&db, &sealer, &config, rules::DECRYPT_FAILURE, subject, 1, now).await
            {
                tracing::error!(error.kind = %e, "cannot raise the decrypt-failure alert");
            }
        });
    }

    /// The version of the index key new index values use.
    pub fn index_version(&self) -> u32 {
        self.cipher.ring().index_version()
    }

    pub fn validator(&self) -> &FhirValidator {
        &self.validator
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Turns the decision's scope into SQL, reading care teams and break-glass grants now (a change takes
    /// effect on the next request). A care-team role without a linked Practitioner reaches nothing.
    pub(super) fn resolve_scope(&self, conn: &mut AnyConnection, caller: &Caller, d: &Decision) -> AppResult<Reach> {
        let reach = self.resolve_role_scope(conn, caller, d)?;
        // A `patient/` scope: only the launch patient's compartment, within what the role reaches.
        Ok(match d.narrowing.as_ref().and_then(|n| n.patient) {
            None => reach,
            Some(patient) => {
                let patient = patient.to_string();
                Reach {
                    break_glass: reach.break_glass.into_iter().filter(|g| *g == patient).collect(),
                    filter: ScopeFilter::Confined(Box::new(reach.filter), patient),
                }
            }
        })
    }

    /// Whether `row` satisfies the granular scope restrictions of `d` (always, when there are none), judged on
    /// the elements the caller may read.
    pub(super) fn within_narrowing(&self, d: &'static ResourceDecl, row: &Row, dec: &Decision) -> AppResult<bool> {
        let Some(n) = dec.narrowing.as_deref().filter(|n| !n.params.is_empty()) else { return Ok(true) };
        let req = search::parse(d, &n.params, Handling::Strict)?;
        self.matches(d, row, &dec.read_mask, &req)
    }

    /// A write under a narrowed decision stays inside it: the launch patient's compartment, and resources that
    /// satisfy the granular restrictions (403 otherwise: the caller's own data, nothing revealed).
    pub(super) fn check_write_narrowing(
        d: &'static ResourceDecl,
        value: &Value,
        patient: Option<&str>,
        dec: &Decision,
    ) -> AppResult<()> {
        let Some(n) = dec.narrowing.as_deref() else { return Ok(()) };
        if let Some(p) = n.patient
            && patient != Some(p.to_string().as_str())
        {
            return Err(AppError::Forbidden);
        }
        if !n.params.is_empty() {
            let req = search::parse(d, &n.params, Handling::Strict)?;
            let entries = search::extract_index(d, value);
            let ok = req.clauses.iter().all(|c| {
                c.values
                    .iter()
                    .any(|v| entries.iter().filter(|e| e.param == c.param.name).any(|e| v.matches(c.param, &e.value)))
            });
            if !ok {
                return Err(AppError::Forbidden);
            }
        }
        Ok(())
    }

    fn resolve_role_scope(&self, conn: &mut AnyConnection, caller: &Caller, d: &Decision) -> AppResult<Reach> {
        let p = &caller.principal;
        Ok(match d.scope {
            Some(Scope::All) => Reach { filter: ScopeFilter::All, break_glass: vec![] },
            Some(Scope::Own) => match p.patient {
                Some(id) => Reach { filter: ScopeFilter::Patients(vec![id.to_string()]), break_glass: vec![] },
                None => Reach { filter: ScopeFilter::Nothing, break_glass: vec![] },
            },
            Some(Scope::CareTeam) => match p.practitioner {
                Some(pr) => {
                    let grants = store::active_grants(conn, &p.subject, micros(self.clock.now()))?;
                    Reach {
                        filter: ScopeFilter::CareTeam {
                            practitioner_id: pr.to_string(),
                            extra_patients: grants.clone(),
                        },
                        break_glass: grants,
                    }
                }
                None => Reach { filter: ScopeFilter::Nothing, break_glass: vec![] },
            },
            None => Reach { filter: ScopeFilter::Nothing, break_glass: vec![] },
        })
    }

    /// The current row of `id` when the caller may reach it (404, exactly like a missing id, otherwise) and the
    /// purpose of use of this access.
    fn reach_row(
        &self,
        conn: &mut AnyConnection,
        caller: &Caller,
        d: &Decision,
        rtype: &str,
        id: &str,
    ) -> AppResult<(Row, &'static str)> {
        let reach = self.resolve_scope(conn, caller, d)?;
        let row = store::current(conn, rtype, id, &reach.filter)?.ok_or(AppError::NotFound)?;
        let purpose = self.purpose_for(conn, caller, &reach, row.patient_id.as_deref())?;
        Ok((row, purpose))
    }

    /// BTG when the patient is reached only through a break-glass grant.
    pub(super) fn purpose_for(
        &self,
        conn: &mut AnyConnection,
        caller: &Caller,
        reach: &Reach,
        patient: Option<&str>,
    ) -> AppResult<&'static str> {
        self.purpose_for_all(conn, caller, reach, std::iter::once(patient))
    }

    /// BTG when any of the patients a response discloses is reached only through a break-glass grant (the
    /// break-glass rule must see every such access); otherwise the purpose the caller's role implies.
    fn purpose_for_all<'a>(
        &self,
        conn: &mut AnyConnection,
        caller: &Caller,
        reach: &Reach,
        patients: impl IntoIterator<Item = Option<&'a str>>,
    ) -> AppResult<&'static str> {
        let Some(pr) = caller.principal.practitioner else { return Ok(caller.purpose()) };
        if reach.break_glass.is_empty() {
            return Ok(caller.purpose());
        }
        let granted: std::collections::BTreeSet<&str> =
            patients.into_iter().flatten().filter(|p| reach.break_glass.iter().any(|g| g == p)).collect();
        let practitioner = pr.to_string();
        for patient in granted {
            if !store::in_care_team(conn, &practitioner, patient)? {
                return Ok(purpose::BTG);
            }
        }
        Ok(caller.purpose())
    }

    // ---- encoding: plaintext FHIR ⇄ stored document -------------------------------------------------------

    /// Encrypts every PHI element on its own (AAD: type, id, element). `keep` holds stored ciphertexts the
    /// caller could not see, carried over unchanged (valid: same row, same element).
    pub(super) fn encode(
        &self,
        d: &ResourceDecl,
        id: &str,
        resource: &Map<String, Value>,
        keep: &Map<String, Value>,
    ) -> AppResult<(String, i32)> {
        let mut out = Map::new();
        let mut min_version = i32::try_from(self.cipher.active_version()).unwrap_or(i32::MAX);
        let mut resource = resource.clone();
        if let Some(restricted) = split_restricted(&mut resource) {
            if keep.contains_key(RESTRICTED_IDENTIFIERS) {
                // Writing identifiers the caller could not see (merge_hidden refuses this before).
                return Err(AppError::Forbidden);
            }
            resource.insert(RESTRICTED_IDENTIFIERS.into(), restricted);
        }
        if let Some(meta) = resource.remove("meta")
            && let Some(kept) = client_meta(&meta)
        {
            resource.insert("meta".into(), kept);
        }
        for (k, v) in &resource {
            if d.is_phi(k) {
                #[cfg(feature = "benchmark")]
                if self.bench.encryption_off {
                    out.insert(k.clone(), v.clone());
                    continue;
                }
                if let Some(Value::String(ct)) = keep.get(k)
                    && v.as_str() == Some(ct.as_str())
                {
                    if let Some(ver) = FieldCipher::version_of(ct) {
                        min_version = min_version.min(i32::try_from(ver).unwrap_or(i32::MAX));
                    }
                    out.insert(k.clone(), v.clone());
                    continue;
                }
                let ct = self.cipher.encrypt_json(&FieldAad::new(d.name, id, k), v).map_err(AppError::internal)?;
                out.insert(k.clone(), Value::String(ct));
            } else {
                out.insert(k.clone(), v.clone());
            }
        }
        Ok((Value::Object(out).to_string(), min_version))
    }

    /// Decrypts only the elements `mask` allows; the rest are never decrypted. Returns the resource (with
    /// server meta) and whether anything was withheld.
    pub(super) fn decode(
        &self,
        d: &ResourceDecl,
        v: Version<'_>,
        mask: &FieldMask,
    ) -> AppResult<(Map<String, Value>, bool)> {
        let Version { id, version, updated, content } = v;
        let stored: Map<String, Value> = serde_json::from_str(content).map_err(AppError::internal)?;
        let mut out = Map::new();
        out.insert("resourceType".into(), Value::String(d.name.to_owned()));
        out.insert("id".into(), Value::String(id.to_owned()));
        let mut withheld = false;
        let mut restricted = None;
        for (k, v) in stored {
            if k == "resourceType" || k == "id" {
                continue;
            }
            let readable = if k == RESTRICTED_IDENTIFIERS { restricted_readable(mask) } else { mask.allows(&k) };
            if !readable {
                withheld = true;
                continue;
            }
            let value = match &v {
                Value::String(ct) if d.is_phi(&k) && ct.starts_with(CIPHERTEXT) => {
                    self.cipher.decrypt_json(&FieldAad::new(d.name, id, &k), ct).map_err(|e| {
                        tracing::error!(integrity.kind = "decrypt", resource.type_ = d.name, error.kind = %e, "stored element failed to decrypt");
                        self.decrypt_failed();
                        AppError::internal("decryption failed")
                    })?
                }
                _ => v,
            };
            if k == RESTRICTED_IDENTIFIERS {
                restricted = Some(value);
            } else {
                out.insert(k, value);
            }
        }
        if let Some(r) = restricted {
            join_restricted(&mut out, r)?;
        }
        let when = from_micros(updated).format(&Rfc3339).map_err(AppError::internal)?;
        with_server_meta(&mut out, version, when);
        Ok((out, withheld))
    }

    /// The current row decoded under `mask` (operator jobs: see `maintenance`).
    pub(super) fn decode_row(&self, d: &ResourceDecl, row: &Row, mask: &FieldMask) -> AppResult<Map<String, Value>> {
        self.decode(d, row.view(), mask).map(|(obj, _)| obj)
    }

    /// decode + shape (mask ∩ `_elements`), tagging SUBSETTED when anything was removed.
    pub(super) fn show(
        &self,
        d: &ResourceDecl,
        v: Version<'_>,
        mask: &FieldMask,
        elements: Option<&[String]>,
    ) -> AppResult<Value> {
        let (obj, withheld) = self.decode(d, v, mask)?;
        let mut value = Value::Object(obj);
        let shaped = mask.shape(&mut value, elements);
        if withheld
            && !shaped
            && let Some(obj) = value.as_object_mut()
        {
            crate::access::add_subsetted_tag(obj);
        }
        Ok(value)
    }

    /// The search-index rows of a resource: blind indexes for PHI parameters, plain keys otherwise. Dates of
    /// PHI parameters are not indexed at all (searched by decrypt-and-filter within a bounded candidate set).
    /// Returns them with the version of the index key used (recorded on the row for `keys reindex`).
    pub(super) fn index_values(&self, d: &'static ResourceDecl, resource: &Value) -> (IndexValues, i32) {
        let ring = self.cipher.ring();
        let blind = ring.blind_indexer();
        let version = i32::try_from(ring.index_version()).unwrap_or(i32::MAX);
        let values = search::extract_index(d, resource)
            .into_iter()
            .filter_map(|e| {
                let param = d.param(e.param).filter(|p| p.indexed)?;
                let key = match e.value {
                    IndexValue::Text(k) | IndexValue::Token(k) | IndexValue::Reference(k) => k,
                    IndexValue::Date { .. } => return None,
                };
                let value = if param.phi { blind.index(d.name, param.name, &key) } else { key };
                Some((e.param.to_owned(), value))
            })
            .collect();
        (values, version)
    }

    /// `keys reindex`: the search index of a stored current row recomputed under the newest index key held, with
    /// that key's version. Decrypts every element of the row (an operator job, not a request); a row that does not
    /// decrypt is an error, never a partial index.
    pub fn rebuilt_index(&self, row: &Row) -> AppResult<(IndexValues, i32)> {
        if row.deleted {
            return Ok((vec![], i32::try_from(self.cipher.ring().index_version()).unwrap_or(i32::MAX)));
        }
        let d = decl_of(&row.resource_type)?;
        let (obj, _) = self.decode(d, row.view(), &FieldMask::everything())?;
        Ok(self.index_values(d, &Value::Object(obj)))
    }

    /// Every reference must point at an existing, live resource of an allowed type (and, for the patient
    /// link, at a patient the caller may reach: otherwise it looks exactly like a missing one).
    pub(super) fn check_references(
        &self,
        conn: &mut AnyConnection,
        d: &ResourceDecl,
        resource: &Value,
        reach: &ScopeFilter,
    ) -> AppResult<()> {
        for (path, targets) in d.references {
            for node in values_at(resource, path) {
                let Some(reference) = node.get("reference").and_then(Value::as_str) else { continue };
                if reference.starts_with('#') {
                    continue;
                }
                let bad = || {
                    AppError::invalid(
                        format!("{}.{path}", d.name),
                        "The reference does not resolve to a resource of an allowed type.",
                    )
                };
                let (rtype, id) = reference.split_once('/').ok_or_else(bad)?;
                if !targets.contains(&rtype) || Uuid::parse_str(id).is_err() {
                    return Err(bad());
                }
                let is_link = matches!(d.patient_link, PatientLink::Element(e) if e == *path);
                let scope = if is_link && rtype == "Patient" { reach.clone() } else { ScopeFilter::All };
                match store::current(conn, rtype, id, &scope)? {
                    Some(row) if !row.deleted => {}
                    _ => return Err(bad()),
                }
            }
        }
        Ok(())
    }

    pub(super) fn compartment(d: &ResourceDecl, id: &str, resource: &Value) -> AppResult<Option<String>> {
        Ok(match d.patient_link {
            PatientLink::Itself => Some(id.to_owned()),
            PatientLink::Element(e) => Some(crate::fhir::patient_of_reference(resource.get(e)).ok_or_else(|| {
                AppError::invalid(format!("{}.{e}", d.name), "A reference to the Patient is required.")
            })?),
            PatientLink::None => None,
        })
    }

    /// Parses and validates a client body for `rtype`; removes server-owned elements.
    pub fn parse_body(&self, rtype: &str, body: &[u8]) -> AppResult<Map<String, Value>> {
        self.parse_body_and_id(rtype, body).map(|(obj, _)| obj)
    }

    /// [`Self::parse_body`], and the `id` the body carried (the server's own ids replace it).
    pub(super) fn parse_body_and_id(&self, rtype: &str, body: &[u8]) -> AppResult<(Map<String, Value>, Option<Value>)> {
        let value: Value =
            serde_json::from_slice(body).map_err(|_| AppError::invalid(rtype, "The body is not valid JSON."))?;
        // JSON can escape a NUL (`\u0000`); no FHIR string holds one, and PostgreSQL text cannot store one.
        if has_nul(&value) {
            return Err(AppError::invalid(rtype, "The body holds a NUL character."));
        }
        self.validator.validate(rtype, &value)?;
        let Value::Object(mut obj) = value else {
            return Err(AppError::invalid(rtype, "The body must be a JSON object."));
        };
        if obj.get("meta").and_then(|m| m.get("security")).is_some() {
            return Err(AppError::invalid(format!("{rtype}.meta.security"), "Security labels are set by the server."));
        }
        // The client's profile claims and tags are kept; versionId, lastUpdated and SUBSETTED are the server's.
        if let Some(kept) = obj.remove("meta").as_ref().and_then(client_meta) {
            obj.insert("meta".into(), kept);
        }
        let id = obj.remove("id");
        Ok((obj, id))
    }

    // ---- interactions -------------------------------------------------------------------------------------

    /// The body returned by create and update: shaped by the caller's *read* mask (no decryption needed).
    pub(super) fn shape_plain(
        &self,
        d: &ResourceDecl,
        id: &str,
        version: i64,
        updated: i64,
        mut obj: Map<String, Value>,
        read: &Decision,
    ) -> AppResult<Shown> {
        let when = from_micros(updated);
        obj.insert("resourceType".into(), Value::String(d.name.to_owned()));
        obj.insert("id".into(), Value::String(id.to_owned()));
        with_server_meta(&mut obj, version, when.format(&Rfc3339).map_err(AppError::internal)?);
        let mut value = Value::Object(obj);
        if read.allowed {
            read.read_mask.shape(&mut value, None);
        } else {
            // A role that may write but not read gets the server-owned facts only.
            let mut minimal = Map::new();
            for k in ["resourceType", "id", "meta"] {
                if let Some(v) = value.get(k) {
                    minimal.insert(k.to_owned(), v.clone());
                }
            }
            crate::access::add_subsetted_tag(&mut minimal);
            value = Value::Object(minimal);
        }
        Ok(Shown { resource: value, version_id: version, last_updated: when })
    }

    /// A cheap handle for closures that run on the blocking pool.
    pub(super) fn clone_parts(&self) -> Arc<Records> {
        Arc::new(Records {
            db: self.db.clone(),
            cipher: self.cipher.clone(),
            access: self.access.clone(),
            validator: self.validator.clone(),
            audit: self.audit.clone(),
            clock: self.clock.clone(),
            base: self.base.clone(),
            config: self.config.clone(),
            decrypt_alarm: self.decrypt_alarm.clone(),
            concurrency: self.concurrency.clone(),
            #[cfg(feature = "benchmark")]
            bench: self.bench.clone(),
        })
    }

    pub(super) async fn read(
        &self,
        caller: &Caller,
        decision: Decision,
        rtype: &str,
        id: &str,
        elements: Option<&[String]>,
        trail: &mut Disclosure,
    ) -> AppResult<Shown> {
        let d = decl_of(rtype)?;
        parse_id(id)?;
        let this = self.clone_parts();
        let (caller2, id2, dec2) = (caller.clone(), id.to_owned(), decision.clone());
        let (row, purpose) = self.db.run(move |conn| this.reach_row(conn, &caller2, &dec2, d.name, &id2)).await?;
        if !row.deleted && !self.within_narrowing(d, &row, &decision)? {
            return Err(AppError::NotFound);
        }
        trail.resource(d, id, row.version_id);
        trail.purpose(purpose);
        if row.deleted {
            return Err(AppError::Gone);
        }
        let resource = self.show(d, row.view(), &decision.read_mask, elements)?;
        trail.patient(row.patient_id.as_deref());
        Ok(Shown { resource, version_id: row.version_id, last_updated: from_micros(row.last_updated) })
    }

    pub(super) async fn vread(
        &self,
        caller: &Caller,
        decision: Decision,
        rtype: &str,
        id: &str,
        vid: &str,
        trail: &mut Disclosure,
    ) -> AppResult<Shown> {
        let d = decl_of(rtype)?;
        parse_id(id)?;
        let vid: i64 = vid.parse().map_err(|_| AppError::NotFound)?;
        let this = self.clone_parts();
        let (caller2, id2) = (caller.clone(), id.to_owned());
        let dec2 = decision.clone();
        let (current, version, purpose) = self
            .db
            .run(move |conn| {
                let (current, purpose) = this.reach_row(conn, &caller2, &dec2, d.name, &id2)?;
                if !current.deleted && !this.within_narrowing(d, &current, &dec2)? {
                    return Err(AppError::NotFound);
                }
                let version = store::version(conn, d.name, &id2, vid)?.ok_or(AppError::NotFound)?;
                Ok((current, version, purpose))
            })
            .await?;
        trail.resource(d, id, version.version_id);
        trail.purpose(purpose);
        if version.deleted {
            return Err(AppError::Gone);
        }
        let resource = self.show(d, version.view(), &decision.read_mask, None)?;
        trail.patient(current.patient_id.as_deref());
        Ok(Shown { resource, version_id: version.version_id, last_updated: from_micros(version.last_updated) })
    }

    pub(super) async fn history(
        &self,
        caller: &Caller,
        decision: Decision,
        rtype: &str,
        id: &str,
        trail: &mut Disclosure,
    ) -> AppResult<Value> {
        let d = decl_of(rtype)?;
        parse_id(id)?;
        let this = self.clone_parts();
        let (caller2, id2) = (caller.clone(), id.to_owned());
        let dec2 = decision.clone();
        let (current, versions, purpose) = self
            .db
            .run(move |conn| {
                let (current, purpose) = this.reach_row(conn, &caller2, &dec2, d.name, &id2)?;
                if !current.deleted && !this.within_narrowing(d, &current, &dec2)? {
                    return Err(AppError::NotFound);
                }
                let versions = store::history(conn, d.name, &id2, 100)?;
                Ok((current, versions, purpose))
            })
            .await?;
        let mut entries = Vec::with_capacity(versions.len());
        for v in &versions {
            let method = if v.deleted {
                HistoryMethod::Delete
            } else if v.version_id == 1 {
                HistoryMethod::Create
            } else {
                HistoryMethod::Update
            };
            let resource = if v.deleted { None } else { Some(self.show(d, v.view(), &decision.read_mask, None)?) };
            entries.push(HistoryEntry {
                resource_type: d.name.to_owned(),
                id: id.to_owned(),
                version_id: u64::try_from(v.version_id).unwrap_or(0),
                last_updated: from_micros(v.last_updated),
                method,
                resource,
            });
        }
        let total = u64::try_from(entries.len()).unwrap_or(0);
        let self_link = format!("{}/{}/{}/_history", self.base, d.name, id);
        let out = bundle::history(entries, &self.base, &self_link, None, Some(total));
        trail.resource(d, id, current.version_id);
        trail.purpose(purpose);
        trail.patient(current.patient_id.as_deref());
        Ok(out)
    }

    /// Search: index clauses in SQL within scope; exact matching (and dates) by decrypt-and-filter on the
    /// candidates, using only elements the caller may read. Keyset paging over ids; never OFFSET.
    pub(super) async fn search(
        &self,
        caller: &Caller,
        decision: Decision,
        rtype: &str,
        pairs: Vec<(String, String)>,
        handling: Handling,
        trail: &mut Disclosure,
    ) -> AppResult<Value> {
        let d = decl_of(rtype)?;
        let (pairs, after) = self.open_cursor(caller, d, pairs)?;
        let self_link = self.cursor_link(caller, d, &pairs, after.as_deref())?;
        let SearchPlan { req, query, needs_filter } = self.plan_search(d, &decision, &pairs, handling)?;
        let page = usize::try_from(req.count).unwrap_or(20);
        let this = self.clone_parts();
        let caller2 = caller.clone();
        let dec2 = decision.clone();
        let req2 = req.clone();
        let (rows, more, purpose) = self
            .db
            .run(move |conn| {
                let reach = this.resolve_scope(conn, &caller2, &dec2)?;
                let (rows, more) = this.scan(conn, d, &query, &reach, &dec2, &req2, after, page, needs_filter)?;
                let purpose =
                    this.purpose_for_all(conn, &caller2, &reach, rows.iter().map(|r| r.patient_id.as_deref()))?;
                Ok((rows, more, purpose))
            })
            .await?;
        trail.purpose(purpose);
        // The patient a search names is disclosed by its answer, even an empty one (what that patient has or not).
        if let Some(p) = single_patient(&req) {
            trail.patient_id(p);
        }
        if req.summary_count {
            let total = u64::try_from(rows.len()).unwrap_or(0);
            return Ok(bundle::searchset(vec![], &self.base, &self_link, None, Some(total)));
        }
        let mut entries = Vec::with_capacity(rows.len());
        for row in &rows {
            entries.push(self.show(d, row.view(), &decision.read_mask, req.elements.as_deref())?);
        }
        for row in &rows {
            trail.patient(row.patient_id.as_deref());
        }
        let next = match rows.last() {
            Some(last) if more => Some(self.cursor_link(caller, d, &pairs, Some(&last.id))?),
            _ => None,
        };
        Ok(bundle::searchset(entries, &self.base, &self_link, next, None))
    }

    /// A search as the caller may run it: parsed (the caller's granular-scope clauses ANDed in), refused when it
    /// filters by anything the caller may not read (the answer would reveal hidden values), and its SQL part.
    pub(super) fn plan_search(
        &self,
        d: &'static ResourceDecl,
        decision: &Decision,
        pairs: &[(String, String)],
        handling: Handling,
    ) -> AppResult<SearchPlan> {
        let req = match decision.narrowing.as_deref().filter(|n| !n.params.is_empty()) {
            None => search::parse(d, pairs, handling)?,
            // Granular scopes: their clauses are ANDed to the query (the links keep the client's own).
            Some(n) => search::parse(d, &[pairs.to_vec(), n.params.clone()].concat(), handling)?,
        };
        // A role may search only by what it may read (else the result would reveal hidden values).
        for clause in &req.clauses {
            for path in clause.param.paths {
                let top = path.split('.').next().unwrap_or(path);
                if top != "id" && top != "meta" && !decision.read_mask.allows(top) {
                    return Err(AppError::Forbidden);
                }
            }
            if clause.param.name == "identifier" && !decision.read_mask.hidden_identifier_systems().is_empty() {
                for v in &clause.values {
                    if let search::SearchValue::Token { system: Some(s), .. } = v
                        && decision.read_mask.hides_system(s)
                    {
                        return Err(AppError::Forbidden);
                    }
                }
            }
        }
        let query = index_query(d, &req, &self.cipher.ring().blind_indexers());
        let needs_filter = req.clauses.iter().any(|c| c.param.phi || c.param.kind == crate::fhir::ParamKind::Date);
        Ok(SearchPlan { req, query, needs_filter })
    }

    /// The rows of one search page within the caller's reach: index clauses in SQL, then (for PHI parameters and
    /// dates) decrypt-and-filter on the candidates. Returns the page and whether more rows match.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn scan(
        &self,
        conn: &mut AnyConnection,
        d: &'static ResourceDecl,
        query: &store::IndexQuery,
        reach: &Reach,
        decision: &Decision,
        req: &SearchRequest,
        after: Option<String>,
        page: usize,
        needs_filter: bool,
    ) -> AppResult<(Vec<Row>, bool)> {
        let mut out = Vec::new();
        let mut cursor = after;
        let mut scanned = 0usize;
        let want = if req.summary_count { usize::MAX } else { page };
        loop {
            let batch = store::search(conn, d.name, query, &reach.filter, cursor.as_deref(), 200)?;
            let exhausted = batch.len() < 200;
            for row in batch {
                cursor = Some(row.id.clone());
                scanned += 1;
                if needs_filter && !self.matches(d, &row, &decision.read_mask, req)? {
                    continue;
                }
                if out.len() == want {
                    return Ok((out, true));
                }
                out.push(row);
            }
            if exhausted {
                return Ok((out, false));
            }
            if needs_filter && scanned > MAX_SCAN {
                return Err(AppError::invalid(
                    "search",
                    "The search is too broad to filter (over 5,000 candidates); narrow it, for example by patient.",
                ));
            }
        }
    }

    /// A search's `self` or `next` link: `{base}/{type}?_cursor=…`, where the cursor seals the query and the keyset
    /// position under the active data key, bound to the caller and the resource type, for [`CURSOR_TTL_SECS`].
    /// Links never carry the searched values (which may be PHI) in clear, so proxies and access logs see none.
    fn cursor_link(
        &self,
        caller: &Caller,
        d: &ResourceDecl,
        pairs: &[(String, String)],
        after: Option<&str>,
    ) -> AppResult<String> {
        let expires = self.clock.now().unix_timestamp() + CURSOR_TTL_SECS;
        let sealed = self
            .cipher
            .encrypt_json(
                &FieldAad::new(CURSOR_AAD, &caller.principal.subject, d.name),
                &json!({ "q": pairs, "after": after, "exp": expires }),
            )
            .map_err(AppError::internal)?;
        let query = encode_pairs(&[(search::CURSOR_PARAM.to_owned(), sealed)]);
        Ok(format!("{}/{}?{query}", self.base, d.name))
    }

    /// The query and keyset position sealed in a `_cursor` (when the request has one), else the request's own
    /// parameters. A cursor stands alone, and one that is not this caller's, not this type's, expired or damaged
    /// is a 400 that names no value.
    fn open_cursor(
        &self,
        caller: &Caller,
        d: &ResourceDecl,
        pairs: Vec<(String, String)>,
    ) -> AppResult<(SearchPairs, Option<String>)> {
        let Some((_, sealed)) = pairs.iter().find(|(k, _)| k == search::CURSOR_PARAM) else {
            return Ok((pairs, None));
        };
        if pairs.len() != 1 {
            return Err(AppError::invalid(
                search::CURSOR_PARAM,
                "A paging cursor stands alone: follow the link as given, without other parameters.",
            ));
        }
        let invalid =
            || AppError::invalid(search::CURSOR_PARAM, "The paging cursor is invalid or has expired; search again.");
        let opened = self
            .cipher
            .decrypt_json(&FieldAad::new(CURSOR_AAD, &caller.principal.subject, d.name), sealed)
            .map_err(|_| invalid())?;
        if opened["exp"].as_i64().is_none_or(|exp| self.clock.now().unix_timestamp() > exp) {
            return Err(invalid());
        }
        let query: SearchPairs = serde_json::from_value(opened["q"].clone()).map_err(|_| invalid())?;
        if query.iter().any(|(k, _)| k == search::CURSOR_PARAM) {
            return Err(invalid());
        }
        let after = match &opened["after"] {
            Value::Null => None,
            Value::String(id) => Some(id.clone()),
            _ => return Err(invalid()),
        };
        Ok((query, after))
    }

    /// Whether a candidate satisfies every clause, judged on the elements the caller may read.
    pub(super) fn matches(
        &self,
        d: &'static ResourceDecl,
        row: &Row,
        mask: &FieldMask,
        req: &SearchRequest,
    ) -> AppResult<bool> {
        let (obj, _) = self.decode(d, row.view(), mask)?;
        let value = Value::Object(obj);
        let entries = search::extract_index(d, &value);
        Ok(req.clauses.iter().all(|c| {
            c.values
                .iter()
                .any(|v| entries.iter().filter(|e| e.param == c.param.name).any(|e| v.matches(c.param, &e.value)))
        }))
    }

    /// `Patient/{id}/$everything`: the patient's compartment, each type shaped for the caller.
    pub(super) async fn everything(
        &self,
        caller: &Caller,
        decision: Decision,
        id: &str,
        trail: &mut Disclosure,
    ) -> AppResult<Value> {
        parse_id(id)?;
        let this = self.clone_parts();
        let (caller2, id2) = (caller.clone(), id.to_owned());
        let principal = caller.principal.clone();
        let (rows, purpose) = self
            .db
            .run(move |conn| {
                let reach = this.resolve_scope(conn, &caller2, &decision)?;
                let patient = store::current(conn, "Patient", &id2, &reach.filter)?.ok_or(AppError::NotFound)?;
                if patient.deleted {
                    return Err(AppError::Gone);
                }
                let mut rows = vec![patient];
                for d in decl::all() {
                    if !matches!(d.patient_link, PatientLink::Element(_)) {
                        continue;
                    }
                    let dec = this.decision(&principal, d.name, Action::Read);
                    if !dec.allowed {
                        continue;
                    }
                    for row in store::compartment(conn, d.name, &id2, 1000)? {
                        if this.within_narrowing(d, &row, &dec)? {
                            rows.push(row);
                        }
                    }
                }
                let purpose = this.purpose_for(conn, &caller2, &reach, Some(&id2))?;
                Ok((rows, purpose))
            })
            .await?;
        let mut entries = Vec::with_capacity(rows.len());
        for row in &rows {
            let d = decl_of(&row.resource_type)?;
            let dec = if d.name == "Patient" {
                self.decision(&caller.principal, "Patient", Action::Everything)
            } else {
                self.decision(&caller.principal, d.name, Action::Read)
            };
            entries.push(self.show(d, row.view(), &dec.read_mask, None)?);
        }
        let self_link = format!("{}/Patient/{}/$everything", self.base, id);
        trail.purpose(purpose);
        trail.patient(Some(id));
        let total = u64::try_from(entries.len()).unwrap_or(0);
        Ok(bundle::searchset(entries, &self.base, &self_link, None, Some(total)))
    }
}

/// A parameter name the server defines for `d` (modifiers allowed); anything else is client text and is
/// recorded as unrecognised.
pub(crate) fn is_known_param(d: &ResourceDecl, name: &str) -> bool {
    let base = name.split(':').next().unwrap_or(name);
    d.param(base).is_some() || ["_count", "_elements", "_summary", search::CURSOR_PARAM].contains(&base)
}

fn single_patient(req: &SearchRequest) -> Option<Uuid> {
    let clause = req.clauses.iter().find(|c| {
        c.param.name == "patient" || (c.param.name == "subject" && c.param.kind == crate::fhir::ParamKind::Reference)
    })?;
    match clause.values.as_slice() {
        [search::SearchValue::Reference { id, .. }] => Uuid::parse_str(id).ok(),
        _ => None,
    }
}

/// The SQL part of a search: index lookups (blind for PHI parameters, under every index key held, so rows not
/// yet rebuilt after an index-key rotation are still found); dates are left to the filter.
fn index_query(d: &ResourceDecl, req: &SearchRequest, blind: &[BlindIndexer]) -> store::IndexQuery {
    let mut q = store::IndexQuery::default();
    for c in &req.clauses {
        if c.param.kind == crate::fhir::ParamKind::Date || !c.param.indexed {
            continue;
        }
        if c.param.name == "_id" {
            let ids: Vec<String> = c.values.iter().flat_map(|v| v.keys(c.param)).collect();
            q.ids = Some(match q.ids.take() {
                Some(prev) => prev.into_iter().filter(|i| ids.contains(i)).collect(),
                None => ids,
            });
            continue;
        }
        let keys: Vec<String> = c
            .values
            .iter()
            .flat_map(|v| v.keys(c.param))
            .flat_map(|k| {
                if c.param.phi {
                    blind.iter().map(|b| b.index(d.name, c.param.name, &k)).collect::<Vec<_>>()
                } else {
                    vec![k]
                }
            })
            .collect();
        q.clauses.push((c.param.name.to_owned(), keys));
    }
    q
}

pub(super) fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn encode_pairs(pairs: &[(String, String)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

/// Nodes at a simple dotted path (arrays flatten).
pub(super) fn values_at<'a>(v: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut nodes = vec![v];
    for part in path.split('.') {
        let mut next = Vec::new();
        for n in nodes {
            match n.get(part) {
                Some(Value::Array(a)) => next.extend(a.iter()),
                Some(x) => next.push(x),
                None => {}
            }
        }
        nodes = next;
    }
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn restricted_identifiers_split_off_and_join_back_in_place() {
        let ssn = json!({"system": crate::access::SSN_SYSTEM, "value": "123-45-6789"});
        let original = obj(json!({"identifier": [{"value": "A"}, ssn.clone(), {"system": "urn:x", "value": "B"}]}));
        let mut split = original.clone();
        let restricted = split_restricted(&mut split).unwrap();
        assert_eq!(split["identifier"], json!([{"value": "A"}, {"system": "urn:x", "value": "B"}]));
        assert_eq!(restricted, json!([[1, ssn.clone()]]));
        join_restricted(&mut split, restricted).unwrap();
        assert_eq!(split, original);

        // Only restricted ones: `identifier` disappears (FHIR has no empty arrays) and comes back.
        let only = obj(json!({"identifier": [ssn.clone()]}));
        let mut split = only.clone();
        let restricted = split_restricted(&mut split).unwrap();
        assert!(split.get("identifier").is_none());
        join_restricted(&mut split, restricted).unwrap();
        assert_eq!(split, only);

        // Nothing restricted, or no identifier array: untouched.
        let mut plain = obj(json!({"identifier": [{"value": "A"}], "name": []}));
        assert!(split_restricted(&mut plain).is_none());
        assert_eq!(plain["identifier"], json!([{"value": "A"}]));
        assert!(split_restricted(&mut obj(json!({"identifier": "cv1:1:x"}))).is_none());
        assert!(join_restricted(&mut Map::new(), json!({"not": "pairs"})).is_err());
    }
}
