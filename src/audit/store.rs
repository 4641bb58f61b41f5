//! The durable audit trail: events appended to one hash chain, in the database.
//!
//! Every append locks the single `audit_head` row first (an `UPDATE`, which takes the row lock on PostgreSQL and
//! the write lock on SQLite), so the chain has one order across concurrent writers and replicas. Writes of PHI
//! append their event inside the data transaction ([`append_locked`]); reads go through the [`Auditor`], which
//! group-commits many events in one transaction and answers each caller only after the commit: a response
//! carrying PHI leaves only once its event is durable. When the audit store fails, callers get 503.

use super::chain::{ChainLink, Verifier, hash_from_hex, to_hex};
use super::event::AuditEvent;
use super::seal::Sealer;
use crate::crypto::store::micros;
use crate::error::{AppError, AppResult};
use crate::store::schema::{audit_events, audit_head, audit_patients};
use crate::store::{AnyConnection, Db};
use diesel::prelude::*;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Most events committed in one transaction by the group-commit appender.
const MAX_BATCH: usize = 512;

/// Takes the chain lock for the rest of the caller's transaction and returns the head.
pub fn lock_head(conn: &mut AnyConnection) -> AppResult<Option<ChainLink>> {
    diesel::update(audit_head::table.filter(audit_head::id.eq(1)))
        .set(audit_head::seq.eq(audit_head::seq))
        .execute(conn)?;
    let (seq, hash): (i64, String) =
        audit_head::table.filter(audit_head::id.eq(1)).select((audit_head::seq, audit_head::hash)).first(conn)?;
    if seq == 0 {
        return Ok(None);
    }
    let hash = hash_from_hex(&hash).ok_or_else(|| AppError::internal("audit head hash is malformed"))?;
    Ok(Some(ChainLink { seq, prev_hash: [0; 32], hash }))
}

/// Appends events after `head` (from [`lock_head`] in the same transaction) and moves the head.
/// The last row of the batch carries the seal ([`super::seal`]): one HMAC per batch.
pub fn append_locked(
    conn: &mut AnyConnection,
    sealer: &Sealer,
    head: Option<ChainLink>,
    events: &[AuditEvent],
) -> AppResult<Option<ChainLink>> {
    let mut prev = head;
    let mut rows = Vec::with_capacity(events.len());
    let mut named = Vec::new();
    for e in events {
        let canonical = e.canonical_bytes().map_err(AppError::internal)?;
        let link = ChainLink::next(prev.as_ref(), &canonical);
        rows.push(EventRow {
            seq: link.seq,
            id: e.id.to_string(),
            recorded: micros(e.recorded),
            kind: e.kind.as_str().to_owned(),
            action: e.action.as_str(),
            agent: e.agent.user.clone(),
            patient_id: e.patient.map(|p| p.to_string()),
            body: String::from_utf8(canonical).map_err(AppError::internal)?,
            prev_hash: to_hex(&link.prev_hash),
            hash: to_hex(&link.hash),
            seal: None,
        });
        named.extend(e.disclosed().iter().map(|p| PatientRow {
            patient_id: p.to_string(),
            seq: link.seq,
            recorded: micros(e.recorded),
        }));
        prev = Some(link);
    }
    if let (Some(last), Some(row)) = (prev.as_ref(), rows.last_mut()) {
        row.seal = Some(sealer.seal(last.seq, &last.hash));
    }
    // One multi-row INSERT per batch (the group commit's round trips), through the concrete connection, since
    // diesel's MultiConnection has no batch insert.
    for chunk in rows.chunks(200) {
        match conn {
            AnyConnection::Postgresql(c) => diesel::insert_into(audit_events::table).values(chunk).execute(c)?,
            AnyConnection::Sqlite(c) => diesel::insert_into(audit_events::table).values(chunk).execute(c)?,
        };
    }
    for chunk in named.chunks(500) {
        match conn {
            AnyConnection::Postgresql(c) => diesel::insert_into(audit_patients::table).values(chunk).execute(c)?,
            AnyConnection::Sqlite(c) => diesel::insert_into(audit_patients::table).values(chunk).execute(c)?,
        };
    }
    if let Some(last) = prev {
        diesel::update(audit_head::table.filter(audit_head::id.eq(1)))
            .set((audit_head::seq.eq(last.seq), audit_head::hash.eq(to_hex(&last.hash))))
            .execute(conn)?;
    }
    Ok(prev)
}

/// One row of `audit_events`.
#[derive(Insertable)]
#[diesel(table_name = audit_events)]
struct EventRow {
    seq: i64,
    id: String,
    recorded: i64,
    kind: String,
    action: &'static str,
    agent: Option<String>,
    patient_id: Option<String>,
    body: String,
    prev_hash: String,
    hash: String,
    seal: Option<String>,
}

/// One row of `audit_patients`: a patient an event names.
#[derive(Insertable)]
#[diesel(table_name = audit_patients)]
struct PatientRow {
    patient_id: String,
    seq: i64,
    recorded: i64,
}

/// Appends events in their own transaction.
pub fn append(conn: &mut AnyConnection, sealer: &Sealer, events: &[AuditEvent]) -> AppResult<()> {
    conn.transaction(|c| {
        let head = lock_head(c)?;
        append_locked(c, sealer, head, events).map(|_| ())
    })
}

/// An event to append, or `None`: a flush marker, answered once everything queued before it is committed.
type Job = (Option<AuditEvent>, oneshot::Sender<AppResult<()>>);

/// The group-commit appender: one background thread per process.
#[derive(Debug, Clone)]
pub struct Auditor {
    tx: mpsc::Sender<Job>,
    sealer: Arc<Sealer>,
    /// Benchmark builds only (`benchmark.disable = ["audit"]`, refused in production): record nothing.
    #[cfg(feature = "benchmark")]
    off: bool,
}

impl Auditor {
    pub fn start(db: Db, sealer: Arc<Sealer>) -> Auditor {
        let seals = sealer.clone();
        let (tx, mut rx) = mpsc::channel::<Job>(8192);
        std::thread::Builder::new()
            .name("audit-appender".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    let events: Vec<AuditEvent> = batch.iter().filter_map(|(e, _)| e.clone()).collect();
                    let started = std::time::Instant::now();
                    let result = if events.is_empty() {
                        Ok(())
                    } else {
                        db.conn().and_then(|mut c| append(&mut c, &seals, &events))
                    };
                    match &result {
                        Ok(()) if events.is_empty() => {}
                        Ok(()) => crate::telemetry::metrics::audit_append(events.len(), started.elapsed()),
                        Err(e) => tracing::error!(audit.batch = events.len(), error.kind = %e, "audit append failed"),
                    }
                    for (_, done) in batch {
                        let _ = done.send(match &result {
                            Ok(()) => Ok(()),
                            Err(_) => Err(AppError::unavailable("audit store unavailable")),
                        });
                    }
                }
            })
            .map_or_else(|_| tracing::error!("cannot start the audit appender"), |_| ());
        Auditor {
            tx,
            sealer,
            #[cfg(feature = "benchmark")]
            off: false,
        }
    }

    /// Benchmark only: an auditor that records nothing, to measure what auditing costs. The configuration
    /// refuses this in the production profile.
    #[cfg(feature = "benchmark")]
    pub fn benchmark_off(self) -> Auditor {
        Auditor { off: true, ..self }
    }

    /// The sealing key this process appends with (for appends outside the group commit).
    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// [`Auditor::sealer`], shared.
    pub fn sealer_arc(&self) -> &Arc<Sealer> {
        &self.sealer
    }

    /// [`lock_head`] for a write's own transaction (no lock, `None`, when switched off for a benchmark).
    pub fn lock_head(&self, conn: &mut AnyConnection) -> AppResult<Option<ChainLink>> {
        if self.off() { Ok(None) } else { lock_head(conn) }
    }

    /// Whether a benchmark switched auditing off (never, in a build without the `benchmark` feature).
    fn off(&self) -> bool {
        #[cfg(feature = "benchmark")]
        return self.off;
        #[cfg(not(feature = "benchmark"))]
        false
    }

    /// A write takes the chain lock as late as it can, so concurrent writes overlap except for the append: on
    /// PostgreSQL just before appending ([`Auditor::lock_late`]); on SQLite first, because a transaction that read
    /// before taking the write lock could not upgrade it. Returns the head when the lock was taken now.
    pub fn lock_early(&self, conn: &mut AnyConnection) -> AppResult<Option<Option<ChainLink>>> {
        match conn.backend() {
            crate::store::Backend::Sqlite => self.lock_head(conn).map(Some),
            crate::store::Backend::Postgres => Ok(None),
        }
    }

    /// The head for the append: the one [`Auditor::lock_early`] locked, or locked now.
    pub fn lock_late(
        &self,
        conn: &mut AnyConnection,
        early: Option<Option<ChainLink>>,
    ) -> AppResult<Option<ChainLink>> {
        match early {
            Some(head) => Ok(head),
            None => self.lock_head(conn),
        }
    }

    /// [`append_locked`] inside a write's transaction (nothing, when switched off for a benchmark).
    pub fn append_locked(
        &self,
        conn: &mut AnyConnection,
        head: Option<ChainLink>,
        events: &[AuditEvent],
    ) -> AppResult<Option<ChainLink>> {
        if self.off() { Ok(head) } else { append_locked(conn, &self.sealer, head, events) }
    }

    /// Returns once every event queued before this call is committed (the appender works in order): the last
    /// step of a graceful shutdown. An error means the appender has stopped or its last batch failed.
    pub async fn flush(&self) -> AppResult<()> {
        let (done, wait) = oneshot::channel();
        self.tx.send((None, done)).await.map_err(|_| AppError::unavailable("audit appender stopped"))?;
        wait.await.map_err(|_| AppError::unavailable("audit appender stopped"))?
    }

    /// Records one event and returns once it is committed. Fails closed (503) when it cannot be.
    pub async fn record(&self, event: AuditEvent) -> AppResult<()> {
        if self.off() {
            return Ok(());
        }
        use tracing::Instrument;
        let span = tracing::info_span!(target: "carevault::audit", "audit");
        async move {
            let (done, wait) = oneshot::channel();
            self.tx.send((Some(event), done)).await.map_err(|_| AppError::unavailable("audit appender stopped"))?;
            wait.await.map_err(|_| AppError::unavailable("audit appender stopped"))?
        }
        .instrument(span)
        .await
    }
}

/// How a walk treats seals.
#[derive(Debug, Clone, Copy)]
pub enum Seals<'a> {
    /// An unkeyed walk (chain and columns only): seals are not looked at.
    Skip,
    /// The database's sealing key: every seal must verify and the trail must end in one from its transition
    /// point on.
    With(&'a Sealer),
    /// The database has no sealing key: a seal found anyway means the key row was removed.
    NoKey,
}

/// Walks the whole trail in order; returns the number of events, or the first bad record. Unkeyed: the chain
/// and every column only (see [`verify_sealed`] for the seals).
pub fn verify(conn: &mut AnyConnection, progress: impl FnMut(u64)) -> AppResult<Result<u64, super::ChainError>> {
    verify_sealed(conn, Seals::Skip, None, &[], progress)
}

/// [`verify`], also requiring the chain to pass through each `(seq, hash)` of `anchors` (signature-checked
/// checkpoints): a rewritten history fails at the checkpoint, and a trail ending before one is truncated.
pub fn verify_anchored(
    conn: &mut AnyConnection,
    start: Option<(i64, super::Hash)>,
    anchors: &[(i64, super::Hash)],
    progress: impl FnMut(u64),
) -> AppResult<Result<u64, super::ChainError>> {
    verify_sealed(conn, Seals::Skip, start, anchors, progress)
}

type WalkRow =
    (i64, String, i64, String, String, Option<String>, Option<String>, String, String, String, Option<String>);

/// The full walk. Checks, for every record: the hash chain (edited, missing, inserted, reordered, unlinked),
/// that every other column (`id`, `recorded`, `kind`, `action`, `agent`, `patient_id`, and `body` byte for
/// byte) is what the hashed event says (else edited), and each seal under `sealer`; then that the trail from
/// the sealer's transition point on ends in a valid seal (else unsealed), and that every `audit-checkpoint`
/// record still has its stored checkpoint (else checkpoint missing). A seal present without a sealing key
/// fails too (the key row was removed to pass the trail off as one from before seals).
///
/// Safe while servers append: the walk goes up to the head read at its start, then follows the head until it
/// stops moving; a row beyond the head (never legitimate: rows and head commit together) counts as inserted.
///
/// `start` is the signed anchor of a retention purge: the walk resumes after it instead of at the first record.
pub fn verify_sealed(
    conn: &mut AnyConnection,
    seals: Seals<'_>,
    start: Option<(i64, super::Hash)>,
    anchors: &[(i64, super::Hash)],
    mut progress: impl FnMut(u64),
) -> AppResult<Result<u64, super::ChainError>> {
    use super::{BreakKind, ChainError};
    let sealer = match seals {
        Seals::With(k) => Some(k),
        Seals::Skip | Seals::NoKey => None,
    };
    let first = start.map_or_else(Verifier::new, |(seq, hash)| Verifier::resume(seq, hash));
    let mut verifier = anchors
        .iter()
        .filter(|(seq, _)| start.is_none_or(|(s, _)| *seq > s))
        .fold(first, |v, (seq, hash)| v.anchored(*seq, *hash));
    let mut after = start.map_or(0, |(seq, _)| seq);
    let mut n = 0u64;
    // The first column or seal problem; the chain's own errors come first unless this one is earlier.
    let mut problem: Option<ChainError> = None;
    let mut last_sealed = 0i64;
    let mut checkpoint_events = Vec::new();
    let earliest = |chain: ChainError, other: Option<ChainError>| match other {
        Some(o) if o.seq < chain.seq => o,
        _ => chain,
    };
    let mut head = read_head(conn)?;
    loop {
        let upto = head.map_or(0, |(seq, _)| seq);
        loop {
            let rows: Vec<WalkRow> = audit_events::table
                .filter(audit_events::seq.gt(after))
                .filter(audit_events::seq.le(upto))
                .order(audit_events::seq.asc())
                .limit(5000)
                .select((
                    audit_events::seq,
                    audit_events::id,
                    audit_events::recorded,
                    audit_events::kind,
                    audit_events::action,
                    audit_events::agent,
                    audit_events::patient_id,
                    audit_events::body,
                    audit_events::prev_hash,
                    audit_events::hash,
                    audit_events::seal,
                ))
                .load(conn)?;
            let Some(last) = rows.last() else { break };
            after = last.0;
            for (seq, id, recorded, kind, action, agent, patient_id, body, prev, hash, seal) in rows {
                let prev = hash_from_hex(&prev).unwrap_or([0; 32]);
                let hash = hash_from_hex(&hash).unwrap_or([0; 32]);
                let event = serde_json::from_slice::<AuditEvent>(body.as_bytes()).ok();
                let canonical = event.as_ref().and_then(|e| e.canonical_bytes().ok());
                if let Err(e) = verifier.push_canonical(seq, canonical.as_deref(), &prev, &hash) {
                    return Ok(Err(earliest(e, problem)));
                }
                if let (Some(e), Some(c)) = (&event, &canonical) {
                    let columns_match = c.as_slice() == body.as_bytes()
                        && e.id.to_string() == id
                        && micros(e.recorded) == recorded
                        && e.kind.as_str() == kind
                        && e.action.as_str() == action
                        && e.agent.user == agent
                        && e.patient.map(|p| p.to_string()) == patient_id;
                    if !columns_match && problem.is_none() {
                        problem = Some(ChainError { seq, kind: BreakKind::Edited });
                    }
                    if e.kind == super::AuditKind::Admin && e.detail.as_deref() == Some("audit-checkpoint") {
                        checkpoint_events.push(seq);
                    }
                }
                if let Some(stored) = seal.as_ref().filter(|_| !matches!(seals, Seals::Skip)) {
                    if sealer.is_some_and(|k| k.check(seq, &hash, stored)) {
                        last_sealed = seq;
                    } else if problem.is_none() {
                        problem = Some(ChainError { seq, kind: BreakKind::BadSeal });
                    }
                }
                n += 1;
            }
            progress(n);
        }
        let now = read_head(conn)?;
        if now.map_or(0, |(seq, _)| seq) <= upto {
            head = now;
            break;
        }
        head = now;
    }
    // One statement, so a concurrent append (rows and head in one commit) cannot look like an insertion.
    let beyond: i64 = audit_events::table
        .filter(
            audit_events::seq
                .nullable()
                .gt(audit_head::table.filter(audit_head::id.eq(1)).select(audit_head::seq).single_value()),
        )
        .count()
        .get_result(conn)?;
    if beyond > 0 {
        let seq = head.map_or(0, |(seq, _)| seq) + 1;
        return Ok(Err(earliest(ChainError { seq, kind: BreakKind::Inserted }, problem)));
    }
    if let Err(e) = verifier.finish(head) {
        return Ok(Err(earliest(e, problem)));
    }
    if let Some(p) = problem {
        return Ok(Err(p));
    }
    let head_seq = head.map_or(0, |(seq, _)| seq);
    if let Some(k) = sealer
        && head_seq >= k.first_seq()
        && last_sealed < head_seq
    {
        let seq = (last_sealed + 1).max(k.first_seq()).max(start.map_or(0, |(s, _)| s + 1));
        return Ok(Err(ChainError { seq, kind: BreakKind::Unsealed }));
    }
    for chunk in checkpoint_events.chunks(500) {
        let stored: Vec<i64> = crate::store::schema::audit_checkpoints::table
            .filter(crate::store::schema::audit_checkpoints::seq.eq_any(chunk))
            .select(crate::store::schema::audit_checkpoints::seq)
            .load(conn)?;
        if let Some(seq) = chunk.iter().find(|s| !stored.contains(s)) {
            return Ok(Err(ChainError { seq: *seq, kind: BreakKind::CheckpointMissing }));
        }
    }
    Ok(Ok(n))
}

/// The stored head, `None` for an empty trail; a malformed hash never matches anything.
fn read_head(conn: &mut AnyConnection) -> AppResult<Option<(i64, super::Hash)>> {
    let (seq, hash): (i64, String) =
        audit_head::table.filter(audit_head::id.eq(1)).select((audit_head::seq, audit_head::hash)).first(conn)?;
    Ok((seq != 0).then(|| (seq, hash_from_hex(&hash).unwrap_or([0; 32]))))
}

/// Events that name one patient (alone or among the patients a response disclosed), oldest first, since
/// `since` (Unix micros).
pub fn for_patient(conn: &mut AnyConnection, patient: &str, since: i64) -> AppResult<Vec<AuditEvent>> {
    let named = audit_patients::table
        .filter(audit_patients::patient_id.eq(patient.to_owned()))
        .filter(audit_patients::recorded.ge(since))
        .select(audit_patients::seq);
    let bodies: Vec<String> = audit_events::table
        .filter(audit_events::seq.eq_any(named))
        .order(audit_events::seq.asc())
        .select(audit_events::body)
        .load(conn)?;
    bodies.iter().map(|b| serde_json::from_str(b).map_err(AppError::internal)).collect()
}
