//! Retention: only an explicit purge past the retention period removes audit records; the purge is itself
//! audited and leaves a signed anchor from which `audit verify` resumes the chain.

use crate::both_backends;
use crate::helpers::TestApp;
use carevault::audit::checkpoints;
use carevault::audit::{Agent, AuditEvent, AuditKind, Outcome};
use carevault::cli::audit::{purge_allowed, verify};
use carevault::clock::Clock;
use carevault::store::schema::{audit_checkpoints, audit_events};
use diesel::prelude::*;
use time::Duration;

both_backends!(purge_past_retention_re_anchors_the_chain, |app: TestApp| async move {
    let now = app.clock.now();
    let old = now - Duration::days(7 * 365);
    let mut conn = app.state.db.conn().unwrap();
    let events: Vec<AuditEvent> = (0..10)
        .map(|i| AuditEvent::new(AuditKind::Login, old + Duration::minutes(i), Outcome::Success, Agent::default()))
        .collect();
    carevault::audit::store::append(&mut conn, app.state.audit.sealer(), &events).unwrap();
    drop(conn);
    app.user("recent", carevault::role::Role::Auditor, None).await;
    let mut conn = app.state.db.conn().unwrap();
    let before: i64 = audit_events::table.count().get_result(&mut conn).unwrap();
    let retention = app.state.config.audit.retention_days;
    assert!(!purge_allowed(now - Duration::days(i64::from(retention) - 1), now, retention), "younger records are kept");
    let cutoff = now - Duration::days(i64::from(retention) + 1);
    assert!(purge_allowed(cutoff, now, retention));
    let event = carevault::cli::admin_event(now, "audit-purged");
    let last = checkpoints::purge(&mut conn, app.state.keys.as_ref(), cutoff, event, now).unwrap();
    assert_eq!(last, Some(10), "exactly the ten old records");
    let after: i64 = audit_events::table.count().get_result(&mut conn).unwrap();
    assert_eq!(after, before - 10 + 1, "old records gone, the purge itself recorded");
    let intact = verify(&mut conn, app.state.keys.as_ref(), None).unwrap();
    assert!(intact.is_ok(), "the chain verifies from the signed anchor");
    // Without the anchor, the missing start is detected and named.
    diesel::delete(audit_checkpoints::table.filter(audit_checkpoints::seq.eq(10))).execute(&mut conn).unwrap();
    let broken = verify(&mut conn, app.state.keys.as_ref(), None).unwrap().unwrap_err();
    assert_eq!(broken.seq, 1);
});
