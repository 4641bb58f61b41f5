//! The rule engine: a background task that follows the audit trail by `seq` (about once a second, or at once
//! when poked), and for each (rule, subject) seen in the new events counts matching events in the rule's window
//! ending at the latest such event. A count at or above the threshold raises an alert ([`super::raise_with`]).
//!
//! The cursor lives in memory and starts at the chain head when the server starts: every replica evaluates
//! every new event, and the alert dedupe (under the chain lock) keeps one alert per (rule, subject) per window.
//! When the database fails the cursor does not move, so no event is skipped.

use super::rules::{Counting, RULES, Rule, Subject};
use crate::audit::{AuditEvent, AuditKind};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::crypto::store::micros;
use crate::error::{AppResult, Chain};
use crate::store::schema::{audit_events, audit_head};
use crate::store::{AnyConnection, Db};
use diesel::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use time::OffsetDateTime;
use tokio::sync::Notify;

/// Most audit events read per poll.
const BATCH: i64 = 1000;
/// How often the engine and the webhook sender look for work.
pub const POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// A handle on the engine: its progress, and a way to wake it and the webhook sender.
#[derive(Debug, Clone, Default)]
pub struct Monitor {
    processed: Arc<AtomicI64>,
    wake: Arc<Notify>,
    wake_sink: Arc<Notify>,
}

impl Monitor {
    pub fn new() -> Self {
        Self::default()
    }

    /// The last audit `seq` the engine has evaluated.
    pub fn processed(&self) -> i64 {
        self.processed.load(Ordering::Acquire)
    }

    /// Asks the engine and the sender to look for work now instead of at the next poll.
    pub fn poke(&self) {
        self.wake.notify_one();
        self.wake_sink.notify_one();
    }

    /// Waits until the engine has evaluated every event up to `seq`; false on timeout.
    pub async fn wait_processed(&self, seq: i64, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.processed() < seq {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            self.wake.notify_one();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        true
    }

    pub(crate) fn sink_notified(&self) -> Arc<Notify> {
        self.wake_sink.clone()
    }

    /// Starts the engine and (when configured) the webhook sender on the current tokio runtime. The cursor is
    /// set to the chain head before this returns, so every event appended afterwards is evaluated.
    pub fn start(
        &self,
        db: &Db,
        config: &Arc<Config>,
        clock: &SharedClock,
        sealer: Arc<crate::audit::seal::Sealer>,
    ) -> AppResult<()> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| crate::error::AppError::internal_from("the monitor needs a tokio runtime", e))?;
        let mut conn = db.conn()?;
        let head: i64 = audit_head::table.filter(audit_head::id.eq(1)).select(audit_head::seq).first(&mut conn)?;
        drop(conn);
        self.processed.store(head, Ordering::Release);
        let sink = super::sink::Sender::from_config(config);
        let (me, db1, config) = (self.clone(), db.clone(), config.clone());
        runtime.spawn(async move { me.run(db1, config, sealer, head).await });
        if let Some(sender) = sink {
            let (me, db, clock) = (self.clone(), db.clone(), clock.clone());
            runtime.spawn(async move { sender.run(db, clock, me).await });
        }
        Ok(())
    }

    async fn run(self, db: Db, config: Arc<Config>, sealer: Arc<crate::audit::seal::Sealer>, mut cursor: i64) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = self.wake.notified() => {}
            }
            let (config, sealer) = (config.clone(), sealer.clone());
            let after = cursor;
            match db.run(move |c| evaluate_after(c, &config, &sealer, after)).await {
                Ok(Some((last, raised))) => {
                    cursor = last;
                    self.processed.store(last, Ordering::Release);
                    if raised > 0 {
                        self.wake_sink.notify_one();
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error.detail = %Chain(&e), "alert rules could not be evaluated; will retry"),
            }
        }
    }
}

/// Evaluates every rule over the events after `after`; returns the last `seq` read and how many alerts were
/// raised, or `None` when there was nothing new.
pub fn evaluate_after(
    conn: &mut AnyConnection,
    config: &Config,
    sealer: &crate::audit::seal::Sealer,
    after: i64,
) -> AppResult<Option<(i64, usize)>> {
    let rows: Vec<(i64, String)> = audit_events::table
        .filter(audit_events::seq.gt(after))
        .order(audit_events::seq.asc())
        .limit(BATCH)
        .select((audit_events::seq, audit_events::body))
        .load(conn)?;
    let Some(last) = rows.last().map(|r| r.0) else { return Ok(None) };
    // (rule index, subject) -> the latest time it was seen in this batch.
    let mut seen: BTreeMap<(usize, Subject), OffsetDateTime> = BTreeMap::new();
    for (seq, body) in &rows {
        let Ok(event) = serde_json::from_str::<AuditEvent>(body) else {
            tracing::error!(audit.seq = seq, "audit event does not parse; `audit verify` will name it");
            continue;
        };
        if event.kind == AuditKind::Alert {
            continue;
        }
        for (i, rule) in RULES.iter().enumerate() {
            if !rule.kinds.contains(&event.kind) {
                continue;
            }
            if let Some(subject) = (rule.subject)(&event) {
                let at = seen.entry((i, subject)).or_insert(event.recorded);
                *at = (*at).max(event.recorded);
            }
        }
    }
    let webhook = config.alerts.webhook_url.is_some();
    let mut raised = 0;
    for ((i, subject), at) in seen {
        let rule = &RULES[i];
        let window = rule.window_for(config);
        let count = count_in_window(conn, rule, &subject, at, window)?;
        if count >= rule.threshold_for(config) {
            let count = i64::try_from(count).unwrap_or(i64::MAX);
            // The alert is raised now; its window is the one that ended at the triggering event.
            let now = at;
            if super::raise_with(conn, sealer, rule, &subject, count, window, webhook, now)?.is_some() {
                raised += 1;
            }
        }
    }
    Ok(Some((last, raised)))
}

/// Rows one query of [`count_in_window`] reads. A window can hold tens of thousands of events (one clinician at
/// 100 requests a second fills the default 10-minute bulk-access window with 60,000), and the count used to load
/// every body in the window at once, every second: the server's memory grew with the window (issue 18, the soak's
/// 2 KiB per request). Paging by `(recorded, seq)` bounds what one evaluation holds, whatever the rate or window.
const WINDOW_PAGE: i64 = 500;

/// Matching events (or distinct patients) for `subject` in `[at - window, at]`.
pub fn count_in_window(
    conn: &mut AnyConnection,
    rule: &Rule,
    subject: &Subject,
    at: OffsetDateTime,
    window_secs: i64,
) -> AppResult<u64> {
    count_paged(conn, rule, subject, at, window_secs, WINDOW_PAGE).map(|(count, _)| count)
}

/// [`count_in_window`], `page` rows per query; also answers the most rows one query returned.
fn count_paged(
    conn: &mut AnyConnection,
    rule: &Rule,
    subject: &Subject,
    at: OffsetDateTime,
    window_secs: i64,
    page: i64,
) -> AppResult<(u64, usize)> {
    let to = micros(at);
    let from = to.saturating_sub(window_secs.saturating_mul(1_000_000));
    let kinds: Vec<&str> = rule.kinds.iter().map(|k| k.as_str()).collect();
    let mut events = 0u64;
    let mut patients = BTreeSet::new();
    let mut largest = 0;
    // Keyset: rows after (recorded, seq) of the last row read.
    let mut after: Option<(i64, i64)> = None;
    loop {
        let mut q = audit_events::table
            .filter(audit_events::kind.eq_any(kinds.clone()))
            .filter(audit_events::recorded.ge(from))
            .filter(audit_events::recorded.le(to))
            .order((audit_events::recorded.asc(), audit_events::seq.asc()))
            .limit(page)
            .select((audit_events::recorded, audit_events::seq, audit_events::body))
            .into_boxed();
        if let Subject::Account(id) = subject {
            q = q.filter(audit_events::agent.eq(id.clone()));
        }
        if let Some((r, s)) = after {
            q = q.filter(audit_events::recorded.gt(r).or(audit_events::recorded.eq(r).and(audit_events::seq.gt(s))));
        }
        let rows: Vec<(i64, i64, String)> = q.load(conn)?;
        largest = largest.max(rows.len());
        for (_, _, body) in &rows {
            let Ok(e) = serde_json::from_str::<AuditEvent>(body) else { continue };
            if (rule.subject)(&e).as_ref() == Some(subject) {
                events += 1;
                patients.extend(e.disclosed().iter().copied());
            }
        }
        match rows.last() {
            Some((r, s, _)) if i64::try_from(rows.len()).is_ok_and(|n| n >= page) => after = Some((*r, *s)),
            _ => break,
        }
    }
    let count = match rule.counting {
        Counting::Events => events,
        Counting::DistinctPatients => u64::try_from(patients.len()).unwrap_or(u64::MAX),
    };
    Ok((count, largest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Agent, Outcome};
    use crate::config::DatabaseTarget;
    use crate::monitor::rules::{BULK_ACCESS, rule};
    use time::macros::datetime;
    use uuid::Uuid;

    /// Issue 18: the count reads the window a page at a time (memory bounded by the page, not by the window) and
    /// still counts every matching event, across page boundaries and ties on `recorded`.
    #[test]
    fn the_window_is_read_in_bounded_pages_and_counted_whole() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&DatabaseTarget::Sqlite(dir.path().join("t.db")), 1).unwrap();
        db.migrate().unwrap();
        let mut conn = db.conn().unwrap();
        let sealer = crate::audit::seal::Sealer::from_parts("test", [7; 32], 1);
        let t0 = datetime!(2026-03-01 09:00 UTC);
        let patients: Vec<Uuid> = (0..37).map(|_| Uuid::new_v4()).collect();
        // 1,234 reads by one account, 3 per microsecond-tick (ties on `recorded`), 37 distinct patients; and
        // reads by another account that must not count.
        let events: Vec<AuditEvent> = (0..1234usize)
            .flat_map(|i| {
                let at = t0 + time::Duration::milliseconds(i64::try_from(i / 3).unwrap());
                let mine = AuditEvent::new(AuditKind::Read, at, Outcome::Success, Agent::user("acct-1", None, None))
                    .with_patient(patients[i % patients.len()]);
                let other = AuditEvent::new(AuditKind::Read, at, Outcome::Success, Agent::user("acct-2", None, None))
                    .with_patient(Uuid::new_v4());
                [mine, other]
            })
            .collect();
        crate::audit::store::append(&mut conn, &sealer, &events).unwrap();
        let bulk = rule(BULK_ACCESS).unwrap();
        let who = Subject::Account("acct-1".into());
        let end = t0 + time::Duration::seconds(10);
        for page in [7, 100, 500, 5000] {
            let (count, largest) = count_paged(&mut conn, bulk, &who, end, 60, page).unwrap();
            assert_eq!(count, 37, "page {page}");
            assert!(i64::try_from(largest).unwrap() <= page.min(1234), "page {page}: {largest} rows held at once");
        }
        let events_rule = Rule { counting: Counting::Events, ..*bulk };
        assert_eq!(count_paged(&mut conn, &events_rule, &who, end, 60, 7).unwrap().0, 1234);
        // The window's start is respected: the last second holds none of them.
        assert_eq!(count_paged(&mut conn, &events_rule, &who, end, 1, 7).unwrap().0, 0);
    }
}
