//! Writes: create, update, patch and delete, plain and conditional. Each is a *step* that runs inside a database
//! transaction its owner holds — a single request (its own transaction) or a transaction Bundle (one for every
//! entry) — and fills its [`Disclosure`]; the owner appends the audit events just before it commits, so a write
//! and its event commit together or not at all.
//!
//! Every step decides scope, checks references and granular scopes, applies the write mask (hidden elements are
//! carried over as stored ciphertext, never decrypted for the caller) and encrypts element by element, exactly as
//! the one-resource interactions always did: a Bundle entry and the same request alone take the same steps.

use super::execute::Disclosure;
use super::operation::{Done, Shown};
use super::service::{
    Caller, RESTRICTED_IDENTIFIERS, Records, Written, client_meta, decl_of, parse_id, restricted_readable,
    sends_write_only,
};
use super::store::{self, Row, WriteExtras};
use crate::access::{Action, Decision, FieldMask};
use crate::api::error::{operation_outcome, outcome_of};
use crate::audit::Outcome;
use crate::crypto::store::micros;
use crate::error::{AppError, AppResult};
use crate::fhir::search::Handling;
use crate::fhir::{PatientLink, ResourceDecl};
use crate::store::AnyConnection;
use diesel::Connection;
use serde_json::{Map, Value};
use std::sync::Arc;
use time::OffsetDateTime;
use uuid::Uuid;

/// What a conditional interaction's search found within the caller's reach (what it cannot reach is not
/// counted: a match out of scope must not change the answer's shape).
pub(super) enum Matched {
    None,
    One(Box<Row>),
    Many,
}

/// The outcome of a create step: a new resource, or (conditional create) the one that already matched.
pub(super) enum Created {
    New(Map<String, Value>),
    Existing(Box<Row>),
}

impl Records {
    /// Whether `fhir.require_if_match` holds (the default, and without settings).
    pub(super) fn require_if_match(&self) -> bool {
        self.config.as_ref().is_none_or(|c| c.fhir.require_if_match)
    }

    /// The `If-Match` an update or patch runs under: the client's version, or none when the deployment allows
    /// updates without one (428 otherwise).
    pub(super) fn expected_version(&self, if_match: Option<i64>) -> AppResult<Option<i64>> {
        match if_match {
            Some(v) => Ok(Some(v)),
            None if self.require_if_match() => Err(AppError::PreconditionRequired),
            None => Ok(None),
        }
    }

    /// A create body parsed, validated and checked against the caller's write mask (no storage touched).
    pub(super) fn prepare_create(
        &self,
        decision: &Decision,
        rtype: &str,
        body: &[u8],
    ) -> AppResult<Map<String, Value>> {
        let obj = self.parse_body(rtype, body)?;
        let mut incoming = Value::Object(obj);
        decision.merge_hidden(None, &mut incoming).map_err(|e| e.at(rtype))?;
        match incoming {
            Value::Object(o) => Ok(o),
            _ => Err(AppError::internal("merge produced a non-object")),
        }
    }

    /// The resources a conditional interaction's search matches, within the caller's reach. The caller must be
    /// allowed to search the type, by parameters it may read (as a search would be refused otherwise).
    pub(super) fn conditional_match(
        &self,
        conn: &mut AnyConnection,
        caller: &Caller,
        d: &'static ResourceDecl,
        params: &[(String, String)],
    ) -> AppResult<Matched> {
        if params.is_empty() {
            return Err(AppError::invalid(d.name, "A conditional interaction needs search parameters."));
        }
        if params.iter().any(|(k, _)| k.starts_with("_count") || k.starts_with("_summary") || k == "_cursor") {
            return Err(AppError::invalid(d.name, "A conditional interaction's search takes no paging parameters."));
        }
        let dec = self.decision(&caller.principal, d.name, Action::Search);
        if !dec.allowed {
            return Err(AppError::Forbidden);
        }
        let plan = self.plan_search(d, &dec, params, Handling::Strict)?;
        // Check-then-act: two conditional writes of the same search must not both find nothing and both create.
        // Every caller is inside a write transaction; holding the audit chain head (which every write locks to
        // append, and which SQLite's writers already hold from the start) from the match to the commit orders
        // them, and the second one's search then sees the first one's row.
        self.audit.lock_head(conn)?;
        let reach = self.resolve_scope(conn, caller, &dec)?;
        let (mut rows, _) = self.scan(conn, d, &plan.query, &reach, &dec, &plan.req, None, 2, plan.needs_filter)?;
        Ok(match rows.len() {
            0 => Matched::None,
            1 => Matched::One(Box::new(rows.remove(0))),
            _ => Matched::Many,
        })
    }

    /// Stores a new resource under `id` (already checked against the write mask by [`Self::prepare_create`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create_in(
        &self,
        conn: &mut AnyConnection,
        caller: &Caller,
        decision: &Decision,
        d: &'static ResourceDecl,
        mut obj: Map<String, Value>,
        id: &str,
        now: OffsetDateTime,
        seed: &mut Disclosure,
    ) -> AppResult<Map<String, Value>> {
        obj.insert("id".into(), Value::String(id.to_owned()));
        let value = Value::Object(obj);
        let reach = self.resolve_scope(conn, caller, decision)?;
        self.check_references(conn, d, &value, &reach.filter)?;
        let patient = Self::compartment(d, id, &value)?;
        Self::check_write_narrowing(d, &value, patient.as_deref(), decision)?;
        let (index, index_version) = self.index_values(d, &value);
        let care = d.care_relationships(&value);
        let Value::Object(obj) = value else { return Err(AppError::internal("resource is not an object")) };
        let (content, key_version) = self.encode(d, id, &obj, &Map::new())?;
        let row = Row {
            resource_type: d.name.to_owned(),
            id: id.to_owned(),
            version_id: 1,
            last_updated: micros(now),
            deleted: false,
            patient_id: patient.clone(),
            key_version,
            content,
            index_version,
        };
        store::insert(conn, &row, &WriteExtras { index, care })?;
        self.note_write(conn, seed, caller, &reach, Written { d, id, version: 1, patient: patient.as_deref() })?;
        Ok(obj)
    }

    /// Create, or with `if_none_exist` a conditional create: no match creates, one match answers with it
    /// (nothing written), more than one is 412.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create_step(
        &self,
        conn: &mut AnyConnection,
        caller: &Caller,
        decision: &Decision,
        d: &'static ResourceDecl,
        obj: Map<String, Value>,
        if_none_exist: Option<&[(String, String)]>,
        id: &str,
        now: OffsetDateTime,
        seed: &mut Disclosure,
    ) -> AppResult<Created> {
        if let Some(params) = if_none_exist {
            match self.conditional_match(conn, caller, d, params)? {
                Matched::None => {}
                Matched::One(row) => return Ok(Created::Existing(row)),
                Matched::Many => return Err(AppError::PreconditionFailed),
            }
        }
        self.create_in(conn, caller, decision, d, obj, id, now, seed).map(Created::New)
    }

    /// Replaces the current version of `id` with `obj` (the client's body, server meta removed). `expected`:
    /// the `If-Match` version (`None`: whatever is current, when the deployment allows that). Elements the caller
    /// cannot see are carried over as stored; the merged resource is checked like a create. Returns the new
    /// version and the resource as stored, without the elements the caller could not see.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn update_in(
        &self,
        conn: &mut AnyConnection,
        caller: &Caller,
        decision: &Decision,
        read: &Decision,
        d: &'static ResourceDecl,
        id: &str,
        expected: Option<i64>,
        mut obj: Map<String, Value>,
        now: OffsetDateTime,
        seed: &mut Disclosure,
    ) -> AppResult<(i64, Map<String, Value>)> {
        let reach = self.resolve_scope(conn, caller, decision)?;
        let current = store::current(conn, d.name, id, &reach.filter)?.ok_or(AppError::NotFound)?;
        if current.deleted {
            return Err(AppError::Gone);
        }
        if expected.is_some_and(|v| v != current.version_id) {
            return Err(AppError::PreconditionFailed);
        }
        // What the caller could see is decrypted; what it could not is carried over as ciphertext.
        let visible_mask = if read.allowed { read.read_mask.clone() } else { Arc::new(FieldMask::nothing()) };
        let stored: Map<String, Value> = serde_json::from_str(&current.content).map_err(AppError::internal)?;
        let (mut view, _) = self.decode(d, current.view(), &visible_mask)?;
        view.remove("meta");
        let mut keep = Map::new();
        for (k, v) in &stored {
            if k == "meta" {
                continue; // the client's meta is replaced by what this update sends
            }
            if k == RESTRICTED_IDENTIFIERS && restricted_readable(&visible_mask) {
                continue; // decrypted into `identifier` above
            }
            if !view.contains_key(k) {
                view.insert(k.clone(), v.clone());
                keep.insert(k.clone(), v.clone());
            }
        }
        let mut incoming = Value::Object(std::mem::take(&mut obj));
        decision.merge_hidden(Some(&Value::Object(view)), &mut incoming).map_err(|e| e.at(d.name))?;
        let Value::Object(mut merged) = incoming else {
            return Err(AppError::internal("merge produced a non-object"));
        };
        merged.insert("id".into(), Value::String(id.to_owned()));
        if let Some(ct) = keep.get(RESTRICTED_IDENTIFIERS) {
            merged.insert(RESTRICTED_IDENTIFIERS.into(), ct.clone());
        }
        // Write-only identifiers (the front desk's SSN) the body sends replace the stored ones, whose ciphertext is
        // dropped without ever being decrypted; a body sending none keeps them.
        if keep.contains_key(RESTRICTED_IDENTIFIERS) && sends_write_only(decision, &merged) {
            keep.remove(RESTRICTED_IDENTIFIERS);
            merged.remove(RESTRICTED_IDENTIFIERS);
        }
        // The merged resource (with hidden elements restored) must still be valid FHIR.
        let mut check = merged.clone();
        for k in keep.keys() {
            check.remove(k);
        }
        let value = Value::Object(merged.clone());
        self.check_references(conn, d, &value, &reach.filter)?;
        let link = match d.patient_link {
            PatientLink::Element(e) => e,
            _ => "",
        };
        let patient = Self::compartment(d, id, &value).or_else(|e| {
            // A hidden link element (kept as ciphertext) keeps the stored compartment.
            if keep.contains_key(link) { Ok(current.patient_id.clone()) } else { Err(e) }
        })?;
        Self::check_write_narrowing(d, &value, patient.as_deref(), decision)?;
        if d.patient_link != PatientLink::Itself && patient != current.patient_id && current.patient_id.is_some() {
            // Moving a record to another patient's compartment is not an update.
            let element = if link.is_empty() { "subject" } else { link };
            return Err(AppError::invalid(format!("{}.{element}", d.name), "The patient of a record cannot change."));
        }
        let (content, key_version) = self.encode(d, id, &merged, &keep)?;
        let (index, index_version) = self.index_values(d, &Value::Object(check));
        let care = d.care_relationships(&value);
        let version = current.version_id + 1;
        let row = Row {
            resource_type: d.name.to_owned(),
            id: id.to_owned(),
            version_id: version,
            last_updated: micros(now),
            deleted: false,
            patient_id: patient.clone(),
            key_version,
            content,
            index_version,
        };
        store::replace(conn, &row, current.version_id, &WriteExtras { index, care })?;
        self.note_write(conn, seed, caller, &reach, Written { d, id, version, patient: patient.as_deref() })?;
        for k in keep.keys() {
            merged.remove(k);
        }
        Ok((version, merged))
    }

    /// Conditional update (`PUT {type}?search`): no match creates (under a new server id: a body id is refused,
    /// carevault does not create under client ids), one match updates it (`If-Match`, when sent, must name its
    /// current version; the match and the write are one transaction), more than one is 412. Returns whether it
    /// created, and the version and stored resource (as [`Self::update_in`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn conditional_update_in(
        &self,
        conn: &mut AnyConnection,
        caller: &Caller,
        decision: &Decision,
        read: &Decision,
        d: &'static ResourceDecl,
        params: &[(String, String)],
        if_match: Option<i64>,
        (obj, body_id): (Map<String, Value>, Option<Value>),
        new_id: &str,
        now: OffsetDateTime,
        seed: &mut Disclosure,
    ) -> AppResult<(bool, String, i64, Map<String, Value>)> {
        match self.conditional_match(conn, caller, d, params)? {
            Matched::Many => Err(AppError::PreconditionFailed),
            Matched::None => {
                if body_id.is_some() {
                    return Err(AppError::invalid(
                        format!("{}.id", d.name),
                        "No resource matches and carevault does not create resources under a client's id.",
                    ));
                }
                let mut incoming = Value::Object(obj);
                decision.merge_hidden(None, &mut incoming).map_err(|e| e.at(d.name))?;
                let Value::Object(obj) = incoming else {
                    return Err(AppError::internal("merge produced a non-object"));
                };
                let stored = self.create_in(conn, caller, decision, d, obj, new_id, now, seed)?;
                seed.kind(crate::audit::AuditKind::Create);
                Ok((true, new_id.to_owned(), 1, stored))
            }
            Matched::One(row) => {
                if body_id.is_some_and(|v| v.as_str() != Some(row.id.as_str())) {
                    return Err(AppError::invalid(
                        format!("{}.id", d.name),
                        "The resource id does not match the resource the search found.",
                    ));
                }
                let expected = Some(if_match.unwrap_or(row.version_id));
                let (version, stored) =
                    self.update_in(conn, caller, decision, read, d, &row.id, expected, obj, now, seed)?;
                Ok((false, row.id, version, stored))
            }
        }
    }

    /// JSON Patch (RFC 6902) applied to what the caller sees of the current version, then stored as an update
    /// under the same masks and `If-Match` rules as `PUT`. An operation on an element the caller may not see is
    /// 403 naming the element; one on an element it may see but not write is refused by the write mask (403).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn patch_in(
        &self,
        conn: &mut AnyConnection,
        caller: &Caller,
        decision: &Decision,
        read: &Decision,
        d: &'static ResourceDecl,
        id: &str,
        expected: Option<i64>,
        patch: &PatchDoc,
        now: OffsetDateTime,
        seed: &mut Disclosure,
    ) -> AppResult<(i64, Map<String, Value>)> {
        let visible_mask = if read.allowed { read.read_mask.clone() } else { Arc::new(FieldMask::nothing()) };
        for element in patch.touched_elements() {
            if element == "id" || element == "resourceType" {
                continue; // checked on the result: the patched resource must keep both
            }
            let known = d.elements().find(|e| *e == element);
            match known {
                None => {
                    return Err(AppError::invalid(
                        d.name,
                        "The patch names an element the resource type does not have.",
                    ));
                }
                // A known element the caller may not see: refused, naming the (server-defined) path only.
                Some(e) if e != "meta" && !visible_mask.allows(e) => {
                    return Err(AppError::forbidden_element(format!("{}.{e}", d.name)));
                }
                Some(_) => {}
            }
        }
        let reach = self.resolve_scope(conn, caller, decision)?;
        let current = store::current(conn, d.name, id, &reach.filter)?.ok_or(AppError::NotFound)?;
        if current.deleted {
            return Err(AppError::Gone);
        }
        if expected.is_some_and(|v| v != current.version_id) {
            return Err(AppError::PreconditionFailed);
        }
        let (mut view, _) = self.decode(d, current.view(), &visible_mask)?;
        match view.remove("meta").as_ref().and_then(client_meta) {
            Some(meta) => view.insert("meta".into(), meta),
            None => None,
        };
        crate::access::FieldMask::strip_subsetted_tag(&mut view);
        let mut doc = Value::Object(view);
        patch.apply(&mut doc).map_err(|()| {
            AppError::invalid(d.name, "The patch does not apply to the current version (a path or test failed).")
        })?;
        let body = serde_json::to_vec(&doc).map_err(AppError::internal)?;
        let (obj, body_id) = self.parse_body_and_id(d.name, &body)?;
        if body_id.is_none_or(|v| v.as_str() != Some(id)) {
            return Err(AppError::invalid(format!("{}.id", d.name), "The patch may not change this element."));
        }
        self.update_in(conn, caller, decision, read, d, id, Some(current.version_id), obj, now, seed)
    }

    /// Deletes `id` (a new, deleted version; history is kept). `Ok(false)`: it was already deleted, nothing
    /// written.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn delete_in(
        &self,
        conn: &mut AnyConnection,
        caller: &Caller,
        decision: &Decision,
        d: &'static ResourceDecl,
        id: &str,
        now: OffsetDateTime,
        seed: &mut Disclosure,
    ) -> AppResult<bool> {
        let reach = self.resolve_scope(conn, caller, decision)?;
        let current = store::current(conn, d.name, id, &reach.filter)?.ok_or(AppError::NotFound)?;
        if current.deleted {
            return Ok(false);
        }
        let version = current.version_id + 1;
        let row = Row {
            resource_type: d.name.to_owned(),
            id: id.to_owned(),
            version_id: version,
            last_updated: micros(now),
            deleted: true,
            patient_id: current.patient_id.clone(),
            key_version: i32::try_from(self.cipher.active_version()).unwrap_or(i32::MAX),
            content: "{}".into(),
            index_version: i32::try_from(self.cipher.ring().index_version()).unwrap_or(i32::MAX),
        };
        let care = d.has_care_relationships().then(Vec::new);
        store::replace(conn, &row, current.version_id, &WriteExtras { index: vec![], care })?;
        let written = Written { d, id, version, patient: current.patient_id.as_deref() };
        self.note_write(conn, seed, caller, &reach, written)?;
        Ok(true)
    }

    /// Conditional delete (`DELETE {type}?search`): no match is a success that changes nothing, one match is
    /// deleted, more than one is 412. `Ok(false)`: nothing written.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn conditional_delete_in(
        &self,
        conn: &mut AnyConnection,
        caller: &Caller,
        decision: &Decision,
        d: &'static ResourceDecl,
        params: &[(String, String)],
        now: OffsetDateTime,
        seed: &mut Disclosure,
    ) -> AppResult<bool> {
        match self.conditional_match(conn, caller, d, params)? {
            Matched::None => Ok(false),
            Matched::Many => Err(AppError::PreconditionFailed),
            Matched::One(row) => self.delete_in(conn, caller, decision, d, &row.id, now, seed),
        }
    }

    /// Fills a write's audit seed: the resource written, its patient, and the purpose (BTG when only a
    /// break-glass grant reached it). The owner of the transaction appends the event.
    pub(super) fn note_write(
        &self,
        conn: &mut AnyConnection,
        seed: &mut Disclosure,
        caller: &Caller,
        reach: &super::service::Reach,
        written: Written<'_>,
    ) -> AppResult<()> {
        seed.resource(written.d, written.id, written.version);
        seed.patient(written.patient);
        seed.purpose(self.purpose_for(conn, caller, reach, written.patient)?);
        Ok(())
    }

    /// Runs one write step in its own transaction; when the step wrote something (its `bool`), appends its
    /// audit event before the commit and marks the trail durable. When it wrote nothing (a conditional create
    /// that matched, a delete of a deleted resource), `execute` records the event after the step, as for a read.
    async fn alone<T: Send + 'static>(
        &self,
        caller: &Caller,
        trail: &mut Disclosure,
        now: OffsetDateTime,
        step: impl FnOnce(&Records, &mut AnyConnection, &mut Disclosure) -> AppResult<(T, bool)> + Send + 'static,
    ) -> AppResult<T> {
        let this = self.clone_parts();
        let caller = caller.clone();
        let mut seed = trail.clone();
        let (out, wrote, seed) = self
            .db
            .run(move |conn| {
                conn.transaction(|conn| {
                    let early = this.audit.lock_early(conn)?;
                    let (out, wrote) = step(&this, conn, &mut seed)?;
                    if wrote {
                        let head = this.audit.lock_late(conn, early)?;
                        this.audit.append_locked(conn, head, &[seed.event(&caller, Outcome::Success, now)])?;
                    }
                    Ok((out, wrote, seed))
                })
            })
            .await?;
        if wrote {
            *trail = seed;
            trail.durable();
        }
        Ok(out)
    }

    /// `POST {type}` (with `If-None-Exist`: conditional create).
    pub(super) async fn create(
        &self,
        caller: &Caller,
        decision: Decision,
        rtype: &str,
        body: &[u8],
        if_none_exist: Option<&[(String, String)]>,
        trail: &mut Disclosure,
    ) -> AppResult<Done> {
        let d = decl_of(rtype)?;
        let obj = self.prepare_create(&decision, rtype, body)?;
        let now = self.clock.now();
        let id = Uuid::new_v4().to_string();
        let (caller2, id2) = (caller.clone(), id.clone());
        let cond = if_none_exist.map(<[_]>::to_vec);
        let created = self
            .alone(caller, trail, now, move |this, conn, seed| {
                let created = this.create_step(conn, &caller2, &decision, d, obj, cond.as_deref(), &id2, now, seed)?;
                let wrote = matches!(created, Created::New(_));
                Ok((created, wrote))
            })
            .await?;
        let read = self.decision(&caller.principal, rtype, Action::Read);
        match created {
            Created::New(obj) => self.shape_plain(d, &id, 1, micros(now), obj, &read).map(Done::Created),
            Created::Existing(row) => self.show_match(d, &row, &read, trail).map(Done::Resource),
        }
    }

    /// The resource a conditional create matched, shown as a read by the caller would show it.
    fn show_match(
        &self,
        d: &'static ResourceDecl,
        row: &Row,
        read: &Decision,
        trail: &mut Disclosure,
    ) -> AppResult<Shown> {
        trail.resource(d, &row.id, row.version_id);
        trail.patient(row.patient_id.as_deref());
        trail.detail("conditional-match");
        let resource = if read.allowed {
            self.show(d, row.view(), &read.read_mask, None)?
        } else {
            self.shape_plain(d, &row.id, row.version_id, row.last_updated, Map::new(), read)?.resource
        };
        Ok(Shown { resource, version_id: row.version_id, last_updated: super::service::from_micros(row.last_updated) })
    }

    /// `PUT {type}/{id}`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn update(
        &self,
        caller: &Caller,
        decision: Decision,
        rtype: &str,
        id: &str,
        if_match: Option<i64>,
        body: &[u8],
        trail: &mut Disclosure,
    ) -> AppResult<Shown> {
        let d = decl_of(rtype)?;
        parse_id(id)?;
        let (obj, body_id) = self.parse_body_and_id(rtype, body)?;
        // FHIR R4 update: the body's id, when present, is the URL's (a mismatch is 400, not a silent rename).
        if body_id.is_some_and(|v| v.as_str() != Some(id)) {
            return Err(AppError::invalid(format!("{rtype}.id"), "The resource id does not match the id in the URL."));
        }
        let expected = self.expected_version(if_match)?;
        let now = self.clock.now();
        let read = self.decision(&caller.principal, rtype, Action::Read);
        let (caller2, id2, read2) = (caller.clone(), id.to_owned(), read.clone());
        let (version, stored) = self
            .alone(caller, trail, now, move |this, conn, seed| {
                Ok((this.update_in(conn, &caller2, &decision, &read2, d, &id2, expected, obj, now, seed)?, true))
            })
            .await?;
        self.shape_plain(d, id, version, micros(now), stored, &read)
    }

    /// `PUT {type}?search`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn conditional_update(
        &self,
        caller: &Caller,
        decision: Decision,
        rtype: &str,
        params: &[(String, String)],
        if_match: Option<i64>,
        body: &[u8],
        trail: &mut Disclosure,
    ) -> AppResult<Done> {
        let d = decl_of(rtype)?;
        let parsed = self.parse_body_and_id(rtype, body)?;
        let now = self.clock.now();
        let read = self.decision(&caller.principal, rtype, Action::Read);
        let new_id = Uuid::new_v4().to_string();
        let (caller2, read2, params) = (caller.clone(), read.clone(), params.to_vec());
        let (created, id, version, stored) = self
            .alone(caller, trail, now, move |this, conn, seed| {
                this.conditional_update_in(
                    conn, &caller2, &decision, &read2, d, &params, if_match, parsed, &new_id, now, seed,
                )
                .map(|out| (out, true))
            })
            .await?;
        let shown = self.shape_plain(d, &id, version, micros(now), stored, &read)?;
        Ok(if created { Done::Created(shown) } else { Done::Resource(shown) })
    }

    /// `PATCH {type}/{id}` with a JSON Patch body.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn patch(
        &self,
        caller: &Caller,
        decision: Decision,
        rtype: &str,
        id: &str,
        if_match: Option<i64>,
        body: &[u8],
        trail: &mut Disclosure,
    ) -> AppResult<Shown> {
        let d = decl_of(rtype)?;
        parse_id(id)?;
        let patch = parse_patch(rtype, body)?;
        let expected = self.expected_version(if_match)?;
        let now = self.clock.now();
        let read = self.decision(&caller.principal, rtype, Action::Read);
        let (caller2, id2, read2) = (caller.clone(), id.to_owned(), read.clone());
        let (version, stored) = self
            .alone(caller, trail, now, move |this, conn, seed| {
                Ok((this.patch_in(conn, &caller2, &decision, &read2, d, &id2, expected, &patch, now, seed)?, true))
            })
            .await?;
        self.shape_plain(d, id, version, micros(now), stored, &read)
    }

    /// `DELETE {type}/{id}`.
    pub(super) async fn delete(
        &self,
        caller: &Caller,
        decision: Decision,
        rtype: &str,
        id: &str,
        trail: &mut Disclosure,
    ) -> AppResult<()> {
        let d = decl_of(rtype)?;
        parse_id(id)?;
        let now = self.clock.now();
        let (caller2, id2) = (caller.clone(), id.to_owned());
        self.alone(caller, trail, now, move |this, conn, seed| {
            Ok(((), this.delete_in(conn, &caller2, &decision, d, &id2, now, seed)?))
        })
        .await?;
        Ok(())
    }

    /// `DELETE {type}?search`.
    pub(super) async fn conditional_delete(
        &self,
        caller: &Caller,
        decision: Decision,
        rtype: &str,
        params: &[(String, String)],
        trail: &mut Disclosure,
    ) -> AppResult<()> {
        let d = decl_of(rtype)?;
        let now = self.clock.now();
        let (caller2, params) = (caller.clone(), params.to_vec());
        self.alone(caller, trail, now, move |this, conn, seed| {
            Ok(((), this.conditional_delete_in(conn, &caller2, &decision, d, &params, now, seed)?))
        })
        .await?;
        Ok(())
    }

    /// `POST {type}/$validate`: the body checked as this caller's create would check it — FHIR R4 schema,
    /// required elements, the write mask, the patient link and references within the caller's reach — and
    /// nothing stored. Answers an OperationOutcome: `information` when it would be accepted; otherwise the one
    /// error a create would answer (its code and the element path, never a value).
    pub(super) async fn validate(
        &self,
        caller: &Caller,
        decision: Decision,
        rtype: &str,
        body: &[u8],
    ) -> AppResult<Value> {
        let d = decl_of(rtype)?;
        let checked = match self.prepare_create(&decision, rtype, body) {
            Ok(mut obj) => {
                let this = self.clone_parts();
                let caller2 = caller.clone();
                self.db
                    .run(move |conn| {
                        let id = Uuid::nil().to_string();
                        obj.insert("id".into(), Value::String(id.clone()));
                        let value = Value::Object(obj);
                        let reach = this.resolve_scope(conn, &caller2, &decision)?;
                        this.check_references(conn, d, &value, &reach.filter)?;
                        let patient = Self::compartment(d, &id, &value)?;
                        Self::check_write_narrowing(d, &value, patient.as_deref(), &decision)
                    })
                    .await
            }
            Err(e) => Err(e),
        };
        match checked {
            Ok(()) => Ok(operation_outcome("information", "informational", "The resource is valid.", None)),
            Err(e) if !e.is_server_error() && !matches!(e, AppError::NotFound) => Ok(outcome_of(&e)),
            Err(e) => Err(e),
        }
    }
}

/// A patch body: JSON Patch (RFC 6902, an array of operations) or JSON Merge Patch (RFC 7386, an object: what
/// fhirpy's `patch()` sends). Anything else is 400, naming nothing the client sent.
pub(super) enum PatchDoc {
    Json(json_patch::Patch),
    Merge(Value),
}

pub(super) fn parse_patch(rtype: &str, body: &[u8]) -> AppResult<PatchDoc> {
    let bad = || AppError::invalid(rtype, "The body is not a JSON Patch or JSON Merge Patch document.");
    match serde_json::from_slice::<Value>(body).map_err(|_| bad())? {
        v @ Value::Array(_) => serde_json::from_value(v).map(PatchDoc::Json).map_err(|_| bad()),
        v @ Value::Object(_) => Ok(PatchDoc::Merge(v)),
        _ => Err(bad()),
    }
}

impl PatchDoc {
    /// The top-level elements the patch reads or changes: the first segment of every `path` and `from` (JSON
    /// Patch), or every member (merge patch).
    fn touched_elements(&self) -> Vec<String> {
        use json_patch::PatchOperation as Op;
        let mut out = Vec::new();
        let patch = match self {
            Self::Merge(v) => return v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default(),
            Self::Json(p) => p,
        };
        let mut add = |pointer: &str| {
            let first = pointer.strip_prefix('/').unwrap_or(pointer).split('/').next().unwrap_or_default();
            let element = first.replace("~1", "/").replace("~0", "~");
            if !out.contains(&element) {
                out.push(element);
            }
        };
        for op in &patch.0 {
            match op {
                Op::Add(o) => add(o.path.as_str()),
                Op::Remove(o) => add(o.path.as_str()),
                Op::Replace(o) => add(o.path.as_str()),
                Op::Test(o) => add(o.path.as_str()),
                Op::Move(o) => {
                    add(o.from.as_str());
                    add(o.path.as_str());
                }
                Op::Copy(o) => {
                    add(o.from.as_str());
                    add(o.path.as_str());
                }
            }
        }
        out
    }

    fn apply(&self, doc: &mut Value) -> Result<(), ()> {
        match self {
            Self::Json(p) => json_patch::patch(doc, p).map_err(|_| ()),
            Self::Merge(m) => {
                json_patch::merge(doc, m);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_touches_the_first_segment_of_every_path_and_from() {
        let patch = parse_patch(
            "Observation",
            serde_json::json!([
                {"op": "replace", "path": "/status", "value": "final"},
                {"op": "add", "path": "/note/0", "value": {"text": "x"}},
                {"op": "move", "from": "/identifier/1", "path": "/identifier/0"},
                {"op": "copy", "from": "/a~1b", "path": "/c"},
            ])
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(patch.touched_elements(), ["status", "note", "identifier", "a/b", "c"]);
        let merge = parse_patch("Observation", br#"{"status": "final", "note": null}"#).unwrap();
        let mut touched = merge.touched_elements();
        touched.sort();
        assert_eq!(touched, ["note", "status"]);
    }

    #[test]
    fn a_body_that_is_not_json_patch_is_refused_without_echo() {
        let e = parse_patch("Patient", br#""replace""#).err().unwrap();
        assert!(matches!(e, AppError::Invalid { .. }));
        assert!(!format!("{e:?}").contains("replace"));
    }
}
