//! `POST /fhir`: batch and transaction Bundles. Every entry becomes the [`Interaction`] the same request alone
//! would be, gated by the same decision and run by the same steps (scope, masks, encryption, audit):
//!
//! - **transaction**: all or nothing. Every write runs in one database transaction, in FHIR's order (DELETE,
//!   POST, PUT/PATCH), after `urn:uuid:` fullUrls (and conditional references `Type?search`) are resolved to
//!   the ids the server assigns or finds; each entry's audit event and the transaction's own are appended just
//!   before the commit, so they commit with the data or not at all. A failed entry rolls everything back and the
//!   answer is that entry's error, naming `Bundle.entry[i]`; its failure is audited. GET entries run after the
//!   commit, each as a read on its own.
//! - **batch**: every entry on its own, exactly as a separate request (its own transaction and audit); the
//!   response carries each entry's status or OperationOutcome.
//!
//! Memory is bounded by the body limit (`limits.max_body_bytes` for Bundles is `limits.max_bundle_bytes`): the
//! Bundle is read with each resource kept as raw JSON text, and a resource becomes a JSON tree only while its
//! own entry is processed.

use super::execute::{Disclosure, Gate};
use super::operation::{Done, Interaction, Operation, Shown};
use super::service::{Caller, Records, from_micros};
use super::write::{Created, Matched};
use crate::access::{Action, Decision};
use crate::api::error::{outcome_of, status_of};
use crate::audit::Outcome;
use crate::crypto::store::micros;
use crate::error::{AppError, AppResult};
use crate::fhir::{ResourceDecl, decl};
use crate::store::AnyConnection;
use diesel::Connection;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

/// Whether a Bundle body declares `"type": "transaction"`, read without building the entries (a streaming pass
/// that skips every other member). Anything unreadable is not a transaction.
pub fn is_transaction(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Envelope<'_>>(body).is_ok_and(|e| e.kind.as_deref() == Some("transaction"))
}

#[derive(Deserialize)]
struct RawBundle<'a> {
    #[serde(rename = "resourceType")]
    resource_type: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "type")]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    entry: Vec<RawEntry<'a>>,
}

#[derive(Deserialize)]
struct RawEntry<'a> {
    #[serde(rename = "fullUrl")]
    full_url: Option<String>,
    #[serde(borrow)]
    resource: Option<&'a RawValue>,
    request: Option<RawRequest>,
}

#[derive(Deserialize)]
struct RawRequest {
    method: String,
    url: String,
    #[serde(rename = "ifNoneExist")]
    if_none_exist: Option<String>,
    #[serde(rename = "ifMatch")]
    if_match: Option<String>,
}

/// What an entry asks, in the terms of the one-resource interactions.
#[derive(Debug, Clone)]
enum Request {
    Create { rtype: String, if_none_exist: Option<Vec<(String, String)>> },
    Update { rtype: String, id: String, if_match: Option<i64> },
    ConditionalUpdate { rtype: String, params: Vec<(String, String)>, if_match: Option<i64> },
    Patch { rtype: String, id: String, if_match: Option<i64> },
    Delete { rtype: String, id: String },
    ConditionalDelete { rtype: String, params: Vec<(String, String)> },
    Get(Interaction),
}

/// One entry, owned (the raw resource text copied out of the body).
#[derive(Debug, Clone)]
struct Entry {
    index: usize,
    full_url: Option<String>,
    resource: Option<String>,
    request: Request,
}

impl Entry {
    /// The interaction this entry is, with `body` as its body (for the gate, the audit seed and batch runs).
    fn interaction(&self, body: bytes::Bytes) -> Interaction {
        match self.request.clone() {
            Request::Create { rtype, if_none_exist } => Interaction::Create { rtype, body, if_none_exist },
            Request::Update { rtype, id, if_match } => Interaction::Update { rtype, id, if_match, body },
            Request::ConditionalUpdate { rtype, params, if_match } => {
                Interaction::ConditionalUpdate { rtype, params, if_match, body }
            }
            Request::Patch { rtype, id, if_match } => Interaction::Patch { rtype, id, if_match, body },
            Request::Delete { rtype, id } => Interaction::Delete { rtype, id },
            Request::ConditionalDelete { rtype, params } => Interaction::ConditionalDelete { rtype, params },
            Request::Get(i) => i,
        }
    }

    /// FHIR's transaction order: DELETE, POST, PUT/PATCH, GET.
    fn order(&self) -> u8 {
        match self.request {
            Request::Delete { .. } | Request::ConditionalDelete { .. } => 0,
            Request::Create { .. } => 1,
            Request::Update { .. } | Request::ConditionalUpdate { .. } | Request::Patch { .. } => 2,
            Request::Get(_) => 3,
        }
    }

    /// The body the one-resource interaction would get: the resource, or for PATCH the JSON Patch a `Binary`
    /// resource carries (base64 `data`, `contentType` `application/json-patch+json`).
    fn body(&self) -> AppResult<bytes::Bytes> {
        let at = |p: &str| format!("Bundle.entry[{}].{p}", self.index);
        let Some(raw) = &self.resource else {
            return match self.request {
                Request::Create { .. }
                | Request::Update { .. }
                | Request::ConditionalUpdate { .. }
                | Request::Patch { .. } => Err(AppError::invalid(at("resource"), "This entry needs a resource.")),
                _ => Ok(bytes::Bytes::new()),
            };
        };
        if !matches!(self.request, Request::Patch { .. }) {
            return Ok(bytes::Bytes::from(raw.clone().into_bytes()));
        }
        #[derive(Deserialize)]
        struct Binary {
            #[serde(rename = "resourceType")]
            resource_type: String,
            #[serde(rename = "contentType")]
            content_type: String,
            data: String,
        }
        let bad = || AppError::invalid(at("resource"), "A PATCH entry carries a Binary with a JSON Patch.");
        let b: Binary = serde_json::from_str(raw).map_err(|_| bad())?;
        if b.resource_type != "Binary" || b.content_type.split(';').next().map(str::trim) != Some(JSON_PATCH) {
            return Err(bad());
        }
        data_encoding::BASE64.decode(b.data.as_bytes()).map(bytes::Bytes::from).map_err(|_| bad())
    }
}

const JSON_PATCH: &str = "application/json-patch+json";

/// An entry's answer: the `response` element (and resource, or OperationOutcome) of the response Bundle.
struct Answer {
    status: u16,
    location: Option<String>,
    shown: Option<Shown>,
    outcome: Option<Value>,
}

impl Answer {
    fn of_error(e: &AppError) -> Self {
        Self { status: status_of(e).as_u16(), location: None, shown: None, outcome: Some(outcome_of(e)) }
    }

    fn of_done(done: Done, base_type: Option<&str>) -> Self {
        match done {
            Done::Created(shown) => {
                let location = location(&shown, base_type);
                Self { status: 201, location, shown: Some(shown), outcome: None }
            }
            Done::Resource(shown) => {
                let location = location(&shown, base_type);
                Self { status: 200, location, shown: Some(shown), outcome: None }
            }
            Done::Bundle(v) | Done::Document(v) => Self {
                status: 200,
                location: None,
                shown: Some(Shown { resource: v, version_id: 0, last_updated: OffsetDateTime::UNIX_EPOCH }),
                outcome: None,
            },
            Done::Deleted => Self { status: 204, location: None, shown: None, outcome: None },
        }
    }

    fn to_entry(&self) -> Value {
        let text = match self.status {
            200 => "200 OK",
            201 => "201 Created",
            204 => "204 No Content",
            _ => "",
        };
        let status = if text.is_empty() { self.status.to_string() } else { text.to_owned() };
        let mut response = json!({ "status": status });
        if let Some(l) = &self.location {
            response["location"] = json!(l);
        }
        let mut entry = Map::new();
        if let Some(shown) = &self.shown {
            if shown.version_id > 0 {
                response["etag"] = json!(format!("W/\"{}\"", shown.version_id));
                if let Ok(when) = shown.last_updated.format(&Rfc3339) {
                    response["lastModified"] = json!(when);
                }
            }
            entry.insert("resource".into(), shown.resource.clone());
        }
        if let Some(outcome) = &self.outcome {
            response["outcome"] = outcome.clone();
        }
        entry.insert("response".into(), response);
        Value::Object(entry)
    }
}

fn location(shown: &Shown, rtype: Option<&str>) -> Option<String> {
    let rtype = shown.resource.get("resourceType").and_then(Value::as_str).or(rtype)?;
    let id = shown.resource.get("id").and_then(Value::as_str)?;
    Some(format!("{rtype}/{id}/_history/{}", shown.version_id))
}

/// Parses the Bundle: a `batch` or `transaction`, at most `max_entries` entries, each with a request this
/// server supports. Errors name the entry, never a value.
fn parse(body: &[u8], base: &str, max_entries: usize) -> AppResult<(bool, Vec<Entry>)> {
    let raw: RawBundle<'_> =
        serde_json::from_slice(body).map_err(|_| AppError::invalid("Bundle", "The body is not a valid Bundle."))?;
    if raw.resource_type.as_deref() != Some("Bundle") {
        return Err(AppError::invalid("Bundle.resourceType", "POST /fhir takes a Bundle."));
    }
    let transaction = match raw.kind.as_deref() {
        Some("transaction") => true,
        Some("batch") => false,
        _ => return Err(AppError::invalid("Bundle.type", "POST /fhir takes a batch or transaction Bundle.")),
    };
    if raw.entry.len() > max_entries {
        return Err(AppError::invalid("Bundle.entry", "The Bundle has more entries than limits.max_bundle_entries."));
    }
    let mut entries = Vec::with_capacity(raw.entry.len());
    for (index, e) in raw.entry.into_iter().enumerate() {
        let at = |p: &str| format!("Bundle.entry[{index}].{p}");
        let req = e.request.ok_or_else(|| AppError::invalid(at("request"), "Every entry needs a request."))?;
        let request = parse_request(&req, base).map_err(|reason| AppError::invalid(at("request"), reason))?;
        if let Some(u) = &e.full_url
            && u.contains('\0')
        {
            return Err(AppError::invalid(at("fullUrl"), "The fullUrl is malformed."));
        }
        entries.push(Entry { index, full_url: e.full_url, resource: e.resource.map(|r| r.get().to_owned()), request });
    }
    Ok((transaction, entries))
}

fn parse_query(q: &str) -> Result<Vec<(String, String)>, &'static str> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q).map_err(|_| "The query is malformed.")?;
    if pairs.iter().any(|(k, v)| k.contains('\0') || v.contains('\0')) {
        return Err("The query is malformed.");
    }
    Ok(pairs)
}

fn parse_if_match(v: Option<&str>) -> Result<Option<i64>, &'static str> {
    let Some(text) = v.map(str::trim) else { return Ok(None) };
    let inner = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    inner.parse().map(Some).map_err(|_| "ifMatch is not a version (W/\"n\").")
}

/// An entry's `request` as one of the supported interactions. The URL is relative to the base (an absolute URL
/// under this server's base is accepted too).
fn parse_request(r: &RawRequest, base: &str) -> Result<Request, &'static str> {
    let url = r.url.strip_prefix(base.trim_end_matches('/')).map(|u| u.trim_start_matches('/')).unwrap_or(&r.url);
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (url, None),
    };
    let parts: Vec<&str> = path.trim_matches('/').split('/').filter(|p| !p.is_empty()).collect();
    let if_match = parse_if_match(r.if_match.as_deref())?;
    let unsupported = "The entry's method and URL are not an interaction this server supports in a Bundle.";
    let owned = |s: &str| s.to_owned();
    Ok(match (r.method.as_str(), parts.as_slice(), query) {
        ("POST", [t], None) => Request::Create {
            rtype: owned(t),
            if_none_exist: r.if_none_exist.as_deref().map(|q| parse_query(q.trim_start_matches('?'))).transpose()?,
        },
        ("PUT", [t, id], None) => Request::Update { rtype: owned(t), id: owned(id), if_match },
        ("PUT", [t], Some(q)) => Request::ConditionalUpdate { rtype: owned(t), params: parse_query(q)?, if_match },
        ("PATCH", [t, id], None) => Request::Patch { rtype: owned(t), id: owned(id), if_match },
        ("DELETE", [t, id], None) => Request::Delete { rtype: owned(t), id: owned(id) },
        ("DELETE", [t], Some(q)) => Request::ConditionalDelete { rtype: owned(t), params: parse_query(q)? },
        ("GET", [t, id], None) => Request::Get(Interaction::Read { rtype: owned(t), id: owned(id), elements: None }),
        ("GET", [t, id, "_history", v], None) => {
            Request::Get(Interaction::Vread { rtype: owned(t), id: owned(id), version: owned(v) })
        }
        ("GET", [t, id, "_history"], None) => Request::Get(Interaction::History { rtype: owned(t), id: owned(id) }),
        ("GET", ["Patient", id, "$everything"], None) => Request::Get(Interaction::Everything { patient: owned(id) }),
        ("GET", [t], q) if !t.starts_with('$') && !t.starts_with('_') => Request::Get(Interaction::Search {
            rtype: owned(t),
            params: parse_query(q.unwrap_or_default())?,
            handling: crate::fhir::search::Handling::Strict,
        }),
        _ => return Err(unsupported),
    })
}

/// A write entry of a transaction, gated and ready for its step.
struct Planned {
    entry: Entry,
    decision: Decision,
    seed: Disclosure,
    d: &'static ResourceDecl,
    /// The id a create gets (or, after a conditional create matched, the one it found).
    new_id: String,
}

/// What a write step did, for the entry's answer (shaped after the commit).
enum Stepped {
    Created { d: &'static ResourceDecl, id: String, version: i64, obj: Map<String, Value> },
    Updated { d: &'static ResourceDecl, id: String, version: i64, obj: Map<String, Value> },
    Matched { d: &'static ResourceDecl, row: Box<super::store::Row> },
    Deleted,
}

impl Records {
    /// `POST /fhir`.
    pub(super) async fn bundle(&self, op: &Operation, trail: &mut Disclosure) -> AppResult<Done> {
        let Interaction::Bundle { body } = &op.interaction else { return Err(AppError::internal("not a Bundle")) };
        let max = self
            .config
            .as_ref()
            .map_or(crate::config::LimitsConfig::default().max_bundle_entries, |c| c.limits.max_bundle_entries);
        let (transaction, entries) = parse(body, self.base(), max)?;
        if transaction {
            self.transaction(&op.caller, entries, trail).await
        } else {
            self.batch(&op.caller, entries).await
        }
    }

    /// Runs one entry as its own operation (batch entries; GET entries of a transaction). Boxed: `execute` is
    /// what called us.
    fn execute_boxed<'a>(&'a self, op: Operation) -> Pin<Box<dyn Future<Output = AppResult<Done>> + Send + 'a>> {
        Box::pin(self.execute(op))
    }

    async fn batch(&self, caller: &Caller, entries: Vec<Entry>) -> AppResult<Done> {
        let mut answers = Vec::with_capacity(entries.len());
        for e in &entries {
            let answer = match e.body() {
                Err(err) => Answer::of_error(&err),
                Ok(body) => {
                    let interaction = e.interaction(body);
                    let rtype = interaction.rtype().to_owned();
                    match self.execute_boxed(Operation::new(caller.clone(), interaction)).await {
                        Ok(done) => Answer::of_done(done, Some(&rtype)),
                        Err(err) => Answer::of_error(&err),
                    }
                }
            };
            answers.push(answer);
        }
        Ok(Done::Bundle(response_bundle("batch-response", &answers)))
    }

    async fn transaction(&self, caller: &Caller, entries: Vec<Entry>, trail: &mut Disclosure) -> AppResult<Done> {
        let count = entries.len();
        let (writes, gets): (Vec<Entry>, Vec<Entry>) = entries.into_iter().partition(|e| e.order() < 3);
        // Gate every write entry first: a refusal anywhere fails the whole transaction before any storage.
        let mut planned = Vec::with_capacity(writes.len());
        for entry in writes {
            let op = Operation::new(caller.clone(), entry.interaction(bytes::Bytes::new()));
            let seed = Disclosure::start(&op);
            let gated = match self.gate(&op) {
                Ok(Gate::Policy(decision)) => {
                    decl::decl(op.interaction.rtype()).map(|d| (decision, d)).ok_or(AppError::NotFound)
                }
                Ok(_) => Err(AppError::Forbidden),
                Err(e) => Err(e),
            };
            let (decision, d) = match gated {
                Ok(g) => g,
                Err(e) => return self.entry_failed(caller, entry.index, seed, e).await,
            };
            planned.push(Planned { entry, decision, seed, d, new_id: Uuid::new_v4().to_string() });
        }
        planned.sort_by_key(|p| (p.entry.order(), p.entry.index));
        let planned = creates_before_their_referrers(planned);
        let now = self.clock.now();
        let this = self.clone_parts();
        let caller2 = caller.clone();
        let tx_seed = trail.clone();
        // The seed of the entry that failed, for its failure event (the transaction is rolled back).
        let failed = std::sync::Arc::new(std::sync::Mutex::new(None::<(usize, Disclosure)>));
        let failed2 = failed.clone();
        let result = self
            .db
            .run(move |conn| {
                conn.transaction(|conn| {
                    let early = this.audit.lock_early(conn)?;
                    let out = this.transaction_steps(conn, &caller2, planned, now, &failed2)?;
                    let mut events: Vec<_> =
                        out.iter().map(|(_, seed, _)| seed.event(&caller2, Outcome::Success, now)).collect();
                    events.push(tx_seed.event(&caller2, Outcome::Success, now));
                    let head = this.audit.lock_late(conn, early)?;
                    this.audit.append_locked(conn, head, &events)?;
                    Ok(out)
                })
            })
            .await;
        let steps = match result {
            Ok(steps) => steps,
            Err(e) => {
                let failed = failed.lock().ok().and_then(|mut f| f.take());
                return match failed {
                    Some((index, seed)) => self.entry_failed(caller, index, seed, e).await,
                    None => Err(e),
                };
            }
        };
        trail.durable();
        // Answers in the Bundle's order: writes shaped for the caller (as a create or update body), then reads.
        let mut answers: Vec<Option<Answer>> = (0..count).map(|_| None).collect();
        for (index, _, stepped) in steps {
            let answer = match stepped {
                Stepped::Created { d, id, version, obj } | Stepped::Updated { d, id, version, obj } => {
                    let created = version == 1;
                    let read = self.decision(&caller.principal, d.name, Action::Read);
                    let shown = self.shape_plain(d, &id, version, micros(now), obj, &read)?;
                    Answer::of_done(if created { Done::Created(shown) } else { Done::Resource(shown) }, Some(d.name))
                }
                Stepped::Matched { d, row } => {
                    let read = self.decision(&caller.principal, d.name, Action::Read);
                    let resource = if read.allowed {
                        self.show(d, row.view(), &read.read_mask, None)?
                    } else {
                        self.shape_plain(d, &row.id, row.version_id, row.last_updated, Map::new(), &read)?.resource
                    };
                    let shown =
                        Shown { resource, version_id: row.version_id, last_updated: from_micros(row.last_updated) };
                    Answer::of_done(Done::Resource(shown), Some(d.name))
                }
                Stepped::Deleted => Answer::of_done(Done::Deleted, None),
            };
            if let Some(slot) = answers.get_mut(index) {
                *slot = Some(answer);
            }
        }
        for e in gets {
            let interaction = e.interaction(bytes::Bytes::new());
            let rtype = interaction.rtype().to_owned();
            let answer = match self.execute_boxed(Operation::new(caller.clone(), interaction)).await {
                Ok(done) => Answer::of_done(done, Some(&rtype)),
                Err(err) => Answer::of_error(&err),
            };
            if let Some(slot) = answers.get_mut(e.index) {
                *slot = Some(answer);
            }
        }
        let answers: Vec<Answer> = answers.into_iter().flatten().collect();
        Ok(Done::Bundle(response_bundle("transaction-response", &answers)))
    }

    /// The failure of one entry: audited as that entry's own failure (the transaction's event follows in
    /// `execute`), answered as the entry's error naming `Bundle.entry[i]`.
    async fn entry_failed(&self, caller: &Caller, index: usize, seed: Disclosure, e: AppError) -> AppResult<Done> {
        let outcome = if e.is_server_error() { Outcome::SeriousFailure } else { Outcome::MinorFailure };
        self.audit.record(seed.event(caller, outcome, self.clock.now())).await?;
        Err(AppError::InEntry { index, source: Box::new(e) })
    }

    /// The write steps of a transaction inside its database transaction: conditional creates matched first
    /// (against the state before the transaction), every `urn:uuid:` fullUrl mapped to its server id, then
    /// each entry in FHIR's order with its references rewritten. The first failure stops (and rolls back) all.
    fn transaction_steps(
        &self,
        conn: &mut AnyConnection,
        caller: &Caller,
        mut planned: Vec<Planned>,
        now: OffsetDateTime,
        failed: &std::sync::Mutex<Option<(usize, Disclosure)>>,
    ) -> AppResult<Vec<(usize, Disclosure, Stepped)>> {
        let fail = |index: usize, seed: &Disclosure, e: AppError| {
            if let Ok(mut f) = failed.lock() {
                *f = Some((index, seed.clone()));
            }
            e
        };
        let mut ids: HashMap<String, String> = HashMap::new();
        let mut matched: HashMap<usize, Box<super::store::Row>> = HashMap::new();
        for p in &mut planned {
            let Request::Create { if_none_exist, .. } = &p.entry.request else { continue };
            if let Some(params) = if_none_exist {
                match self.conditional_match(conn, caller, p.d, params).map_err(|e| fail(p.entry.index, &p.seed, e))? {
                    Matched::None => {}
                    Matched::One(row) => {
                        p.new_id = row.id.clone();
                        matched.insert(p.entry.index, row);
                    }
                    Matched::Many => return Err(fail(p.entry.index, &p.seed, AppError::PreconditionFailed)),
                }
            }
            if let Some(url) = &p.entry.full_url {
                ids.insert(url.clone(), format!("{}/{}", p.d.name, p.new_id));
            }
        }
        for p in &planned {
            // Updates' fullUrls (`{base}/Type/id`) name their own resource; references to them stay as they are.
            if let (Some(url), Request::Update { id, .. }) = (&p.entry.full_url, &p.entry.request) {
                ids.entry(url.clone()).or_insert_with(|| format!("{}/{id}", p.d.name));
            }
        }
        let mut out = Vec::with_capacity(planned.len());
        for mut p in planned {
            let index = p.entry.index;
            let stepped = self
                .transaction_step(conn, caller, &mut p, &ids, matched.remove(&index), now)
                .map_err(|e| fail(index, &p.seed, e))?;
            out.push((index, p.seed, stepped));
        }
        Ok(out)
    }

    fn transaction_step(
        &self,
        conn: &mut AnyConnection,
        caller: &Caller,
        p: &mut Planned,
        ids: &HashMap<String, String>,
        matched: Option<Box<super::store::Row>>,
        now: OffsetDateTime,
    ) -> AppResult<Stepped> {
        let d = p.d;
        if let Some(row) = matched {
            p.seed.resource(d, &row.id, row.version_id);
            p.seed.patient(row.patient_id.as_deref());
            p.seed.detail("conditional-match");
            return Ok(Stepped::Matched { d, row });
        }
        let body = match p.entry.body()? {
            b if b.is_empty() || matches!(p.entry.request, Request::Patch { .. }) => b,
            b => self.resolve_references(conn, caller, &b, ids)?,
        };
        let read = self.decision(&caller.principal, d.name, Action::Read);
        let decision = &p.decision;
        let seed = &mut p.seed;
        Ok(match &p.entry.request {
            Request::Create { .. } => {
                let obj = self.prepare_create(decision, d.name, &body)?;
                match self.create_step(conn, caller, decision, d, obj, None, &p.new_id, now, seed)? {
                    Created::New(obj) => Stepped::Created { d, id: p.new_id.clone(), version: 1, obj },
                    Created::Existing(row) => Stepped::Matched { d, row },
                }
            }
            Request::Update { id, if_match, .. } => {
                super::service::parse_id(id)?;
                let (obj, body_id) = self.parse_body_and_id(d.name, &body)?;
                if body_id.is_some_and(|v| v.as_str() != Some(id.as_str())) {
                    return Err(AppError::invalid(
                        format!("{}.id", d.name),
                        "The resource id does not match the id in the URL.",
                    ));
                }
                let expected = self.expected_version(*if_match)?;
                let (version, obj) = self.update_in(conn, caller, decision, &read, d, id, expected, obj, now, seed)?;
                Stepped::Updated { d, id: id.clone(), version, obj }
            }
            Request::ConditionalUpdate { params, if_match, .. } => {
                let parsed = self.parse_body_and_id(d.name, &body)?;
                let (created, id, version, obj) = self.conditional_update_in(
                    conn, caller, decision, &read, d, params, *if_match, parsed, &p.new_id, now, seed,
                )?;
                if created {
                    Stepped::Created { d, id, version, obj }
                } else {
                    Stepped::Updated { d, id, version, obj }
                }
            }
            Request::Patch { id, if_match, .. } => {
                super::service::parse_id(id)?;
                let patch = super::write::parse_patch(d.name, &body)?;
                let expected = self.expected_version(*if_match)?;
                let (version, obj) =
                    self.patch_in(conn, caller, decision, &read, d, id, expected, &patch, now, seed)?;
                Stepped::Updated { d, id: id.clone(), version, obj }
            }
            Request::Delete { id, .. } => {
                super::service::parse_id(id)?;
                self.delete_in(conn, caller, decision, d, id, now, seed)?;
                Stepped::Deleted
            }
            Request::ConditionalDelete { params, .. } => {
                self.conditional_delete_in(conn, caller, decision, d, params, now, seed)?;
                Stepped::Deleted
            }
            Request::Get(_) => return Err(AppError::internal("a GET entry among the writes")),
        })
    }

    /// The resource text with every `reference` that names another entry's fullUrl replaced by the server id it
    /// got, and every conditional reference (`Type?search`) replaced by the one resource it matches within the
    /// caller's reach (none or several: 400, as a missing target). Other references are left to the reference
    /// checks of the step.
    fn resolve_references(
        &self,
        conn: &mut AnyConnection,
        caller: &Caller,
        body: &[u8],
        ids: &HashMap<String, String>,
    ) -> AppResult<bytes::Bytes> {
        let mut value: Value = serde_json::from_slice(body)
            .map_err(|_| AppError::invalid("Bundle.entry", "The resource is not valid JSON."))?;
        let mut conditional = Vec::new();
        rewrite(&mut value, ids, &mut conditional);
        if !conditional.is_empty() {
            let mut found: HashMap<String, String> = HashMap::new();
            for reference in conditional {
                let bad = || {
                    AppError::invalid("reference", "The reference does not resolve to a resource of an allowed type.")
                };
                let (rtype, query) = reference.split_once('?').ok_or_else(bad)?;
                let d = decl::decl(rtype).ok_or_else(bad)?;
                let params = parse_query(query).map_err(|_| bad())?;
                match self.conditional_match(conn, caller, d, &params) {
                    Ok(Matched::One(row)) => {
                        found.insert(reference, format!("{}/{}", d.name, row.id));
                    }
                    Ok(_) | Err(AppError::Forbidden | AppError::Invalid { .. }) => return Err(bad()),
                    Err(e) => return Err(e),
                }
            }
            rewrite(&mut value, &found, &mut Vec::new());
        }
        serde_json::to_vec(&value).map(bytes::Bytes::from).map_err(AppError::internal)
    }
}

/// The planned writes with every create moved after the creates it references by fullUrl (a stable topological
/// order: references between entries do not depend on the order a client listed them in). A cycle keeps the
/// client's order for the entries in it (the reference check then names the entry that points ahead).
fn creates_before_their_referrers(planned: Vec<Planned>) -> Vec<Planned> {
    let by_url: HashMap<&str, usize> = planned
        .iter()
        .enumerate()
        .filter(|(_, p)| matches!(p.entry.request, Request::Create { .. }))
        .filter_map(|(i, p)| p.entry.full_url.as_deref().map(|u| (u, i)))
        .collect();
    if by_url.is_empty() {
        return planned;
    }
    let deps: Vec<Vec<usize>> = planned
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if !matches!(p.entry.request, Request::Create { .. }) {
                return vec![];
            }
            let mut refs = Vec::new();
            if let Some(v) = p.entry.resource.as_deref().and_then(|r| serde_json::from_str::<Value>(r).ok()) {
                collect_references(&v, &mut refs);
            }
            refs.iter().filter_map(|r| by_url.get(r.as_str()).copied()).filter(|&j| j != i).collect()
        })
        .collect();
    let mut placed = vec![false; planned.len()];
    let mut order = Vec::with_capacity(planned.len());
    fn visit(i: usize, deps: &[Vec<usize>], placed: &mut [bool], visiting: &mut Vec<usize>, order: &mut Vec<usize>) {
        if placed[i] || visiting.contains(&i) {
            return;
        }
        visiting.push(i);
        for &j in &deps[i] {
            visit(j, deps, placed, visiting, order);
        }
        visiting.pop();
        placed[i] = true;
        order.push(i);
    }
    for i in 0..planned.len() {
        // Deletes come first and updates after every create: only creates are reordered among themselves.
        visit(i, &deps, &mut placed, &mut Vec::new(), &mut order);
    }
    let mut slots: Vec<Option<Planned>> = planned.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots.get_mut(i).and_then(Option::take)).collect()
}

fn collect_references(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, child) in o {
                match (k.as_str(), child) {
                    ("reference", Value::String(s)) => out.push(s.clone()),
                    _ => collect_references(child, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|c| collect_references(c, out)),
        _ => {}
    }
}

/// Replaces `reference` strings found in `map`; collects conditional references (`Type?…`) it cannot map.
fn rewrite(v: &mut Value, map: &HashMap<String, String>, conditional: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, child) in o.iter_mut() {
                if k == "reference"
                    && let Value::String(s) = child
                {
                    if let Some(to) = map.get(s.as_str()) {
                        *s = to.clone();
                    } else if is_conditional(s) && !conditional.contains(s) {
                        conditional.push(s.clone());
                    }
                    continue;
                }
                rewrite(child, map, conditional);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| rewrite(c, map, conditional)),
        _ => {}
    }
}

/// `Type?search`: a conditional reference (FHIR transactions).
fn is_conditional(reference: &str) -> bool {
    reference.split_once('?').is_some_and(|(t, q)| !t.contains('/') && !t.is_empty() && !q.is_empty())
}

fn response_bundle(kind: &str, answers: &[Answer]) -> Value {
    json!({
        "resourceType": "Bundle",
        "type": kind,
        "entry": answers.iter().map(Answer::to_entry).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, url: &str) -> RawRequest {
        RawRequest { method: method.into(), url: url.into(), if_none_exist: None, if_match: None }
    }

    #[test]
    fn entry_requests_map_to_the_one_resource_interactions() {
        let base = "https://h/fhir";
        assert!(matches!(parse_request(&req("POST", "Patient"), base), Ok(Request::Create { .. })));
        assert!(matches!(parse_request(&req("PUT", "Patient/1"), base), Ok(Request::Update { .. })));
        assert!(matches!(
            parse_request(&req("PUT", "Patient?identifier=a|b"), base),
            Ok(Request::ConditionalUpdate { params, .. }) if params == [("identifier".to_owned(), "a|b".to_owned())]
        ));
        assert!(matches!(parse_request(&req("DELETE", "https://h/fhir/Patient/1"), base), Ok(Request::Delete { .. })));
        assert!(matches!(
            parse_request(&req("GET", "Patient/1/_history/2"), base),
            Ok(Request::Get(Interaction::Vread { .. }))
        ));
        assert!(matches!(
            parse_request(&req("GET", "Observation?code=x"), base),
            Ok(Request::Get(Interaction::Search { .. }))
        ));
        assert!(parse_request(&req("POST", "Patient/1"), base).is_err());
        assert!(parse_request(&req("TRACE", "Patient"), base).is_err());
        assert!(parse_request(&req("GET", "$export"), base).is_err());
        let mut r = req("PUT", "Patient/1");
        r.if_match = Some("W/\"3\"".into());
        assert!(matches!(parse_request(&r, base), Ok(Request::Update { if_match: Some(3), .. })));
        r.if_match = Some("junk".into());
        assert!(parse_request(&r, base).is_err());
    }

    #[test]
    fn references_to_entries_are_rewritten_and_conditional_ones_collected() {
        let mut v = json!({"subject": {"reference": "urn:uuid:1"}, "performer": [{"reference": "Practitioner?identifier=x|1"}], "other": {"reference": "Patient/abc"}});
        let map = HashMap::from([("urn:uuid:1".to_owned(), "Patient/p1".to_owned())]);
        let mut conditional = Vec::new();
        rewrite(&mut v, &map, &mut conditional);
        assert_eq!(v["subject"]["reference"], "Patient/p1");
        assert_eq!(v["other"]["reference"], "Patient/abc");
        assert_eq!(conditional, ["Practitioner?identifier=x|1"]);
    }

    #[test]
    fn only_batch_and_transaction_bundles_are_taken() {
        let t = br#"{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"GET","url":"Patient/1"}}]}"#;
        let (transaction, entries) = parse(t, "https://h/fhir", 10).unwrap();
        assert!(transaction && entries.len() == 1);
        assert!(is_transaction(t));
        assert!(parse(br#"{"resourceType":"Bundle","type":"collection"}"#, "", 10).is_err());
        assert!(parse(br#"{"resourceType":"Patient","type":"batch"}"#, "", 10).is_err());
        let e = parse(br#"{"resourceType":"Bundle","type":"batch","entry":[{"resource":{}}]}"#, "", 10).unwrap_err();
        assert!(matches!(e, AppError::Invalid { path: Some(p), .. } if p == "Bundle.entry[0].request"));
        let many = br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"GET","url":"Patient/1"}},{"request":{"method":"GET","url":"Patient/2"}}]}"#;
        assert!(parse(many, "", 1).is_err());
    }
}
