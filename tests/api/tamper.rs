//! Issue 18, part 1: the audit chain keyed outside the database. Each test tampers with the tables the way an
//! attacker with database write access (but not the master key) could, and `audit verify` must fail:
//! one byte of a non-body column; a record rewritten and everything after it re-hashed (with the head moved);
//! seals stripped; the seal key row deleted (with a shipped anchor naming the transition); the newest rows
//! deleted and the head moved (caught by the anchor shipped to `audit.anchor_dir`); `DELETE FROM
//! audit_checkpoints` while `audit-checkpoint` records name them; a newest checkpoint older than twice the
//! interval. Plus: checkpoints are shipped to a directory and to a webhook (through a 500) automatically, and a
//! trail written before seals verifies up to its transition point.

use crate::both_backends_with;
use crate::helpers::TestApp;
use carevault::audit::{Agent, AuditEvent, AuditKind, ChainLink, Outcome, checkpoints};
use carevault::cli::audit::{Broken, verify_with};
use carevault::clock::Clock;
use carevault::config::AuditConfig;
use carevault::store::schema::{audit_checkpoints, audit_events, audit_head, audit_seal_keys};
use diesel::prelude::*;
use std::time::Duration as StdDuration;
use time::Duration;

fn append(app: &TestApp, n: usize, batches: usize) {
    let at = app.clock.now();
    let mut conn = app.state.db.conn().unwrap();
    for b in 0..batches {
        let events: Vec<AuditEvent> = (0..n)
            .map(|i| {
                let t = at + Duration::seconds(i64::try_from(b * n + i).unwrap());
                AuditEvent::new(AuditKind::Login, t, Outcome::Success, Agent::user("acct-1", None, None))
            })
            .collect();
        carevault::audit::store::append(&mut conn, app.state.audit.sealer(), &events).unwrap();
    }
}

fn verify(app: &TestApp, settings: &AuditConfig) -> Result<u64, Broken> {
    let mut conn = app.state.db.conn().unwrap();
    verify_with(&mut conn, app.state.keys.as_ref(), None, settings).unwrap().map(|ok| ok.records)
}

fn assert_fails(app: &TestApp, settings: &AuditConfig, problem: &str) -> Broken {
    let bad = verify(app, settings).expect_err("tampering went unnoticed");
    assert!(bad.message.contains(problem), "expected {problem:?}, got {}", bad.message);
    bad
}

/// Rewrites record `seq` (a different event) and re-hashes it and every record after it, moving the head:
/// what anyone with write access could do to an unkeyed chain.
fn rewrite_and_rehash(app: &TestApp, seq: i64) {
    let mut conn = app.state.db.conn().unwrap();
    let rows: Vec<(i64, String, String)> = audit_events::table
        .filter(audit_events::seq.ge(seq - 1))
        .order(audit_events::seq.asc())
        .select((audit_events::seq, audit_events::body, audit_events::hash))
        .load(&mut conn)
        .unwrap();
    let mut prev = ChainLink {
        seq: rows[0].0,
        prev_hash: [0; 32],
        hash: carevault::audit::chain::hash_from_hex(&rows[0].2).unwrap(),
    };
    for (s, body, _) in &rows[1..] {
        let mut event: AuditEvent = serde_json::from_str(body).unwrap();
        if *s == seq {
            event.outcome = Outcome::SeriousFailure;
        }
        let canonical = event.canonical_bytes().unwrap();
        let link = ChainLink::next(Some(&prev), &canonical);
        diesel::update(audit_events::table.filter(audit_events::seq.eq(*s)))
            .set((
                audit_events::body.eq(String::from_utf8(canonical).unwrap()),
                audit_events::prev_hash.eq(carevault::audit::chain::to_hex(&link.prev_hash)),
                audit_events::hash.eq(carevault::audit::chain::to_hex(&link.hash)),
            ))
            .execute(&mut conn)
            .unwrap();
        prev = link;
    }
    diesel::update(audit_head::table)
        .set((audit_head::seq.eq(prev.seq), audit_head::hash.eq(carevault::audit::chain::to_hex(&prev.hash))))
        .execute(&mut conn)
        .unwrap();
}

both_backends_with!(one_byte_of_the_id_column_is_detected, "", |app: TestApp| async move {
    append(&app, 5, 2);
    let settings = AuditConfig::default();
    assert_eq!(verify(&app, &settings).unwrap(), 10);
    let mut conn = app.state.db.conn().unwrap();
    let id: String =
        audit_events::table.filter(audit_events::seq.eq(3)).select(audit_events::id).first(&mut conn).unwrap();
    let mut bytes = id.into_bytes();
    bytes[0] = if bytes[0] == b'a' { b'b' } else { b'a' };
    diesel::update(audit_events::table.filter(audit_events::seq.eq(3)))
        .set(audit_events::id.eq(String::from_utf8(bytes).unwrap()))
        .execute(&mut conn)
        .unwrap();
    let bad = assert_fails(&app, &settings, "audit record 3: edited");
    assert_eq!(bad.seq, 3);
});

both_backends_with!(rewrite_and_rehash_is_detected_by_the_seals, "", |app: TestApp| async move {
    append(&app, 5, 4);
    let settings = AuditConfig::default();
    assert_eq!(verify(&app, &settings).unwrap(), 20);
    rewrite_and_rehash(&app, 7);
    // The first seal after the rewrite (the end of the batch holding record 7) no longer verifies.
    assert_fails(&app, &settings, "audit record 10: seal does not verify");
    // Removing the seals does not help: the trail no longer ends in one.
    let mut conn = app.state.db.conn().unwrap();
    diesel::update(audit_events::table).set(audit_events::seal.eq(None::<String>)).execute(&mut conn).unwrap();
    assert_fails(&app, &settings, "not covered by a seal");
});

both_backends_with!(deleting_referenced_checkpoints_is_detected, "", |app: TestApp| async move {
    append(&app, 5, 1);
    let now = app.clock.now();
    let mut conn = app.state.db.conn().unwrap();
    let event = carevault::cli::admin_event(now, "audit-checkpoint");
    let (cp, _) = checkpoints::checkpoint(&mut conn, app.state.keys.as_ref(), event, now).unwrap();
    let settings = AuditConfig::default();
    assert!(verify(&app, &settings).is_ok());
    diesel::delete(audit_checkpoints::table).execute(&mut conn).unwrap();
    let bad = assert_fails(&app, &settings, "its checkpoint is missing");
    assert_eq!(bad.seq, cp.seq);
});

both_backends_with!(a_stale_checkpoint_is_detected, "", |app: TestApp| async move {
    let now = app.clock.now();
    let mut conn = app.state.db.conn().unwrap();
    let event = carevault::cli::admin_event(now, "audit-checkpoint");
    checkpoints::checkpoint(&mut conn, app.state.keys.as_ref(), event, now).unwrap();
    let settings = AuditConfig { checkpoint_interval_secs: 600, ..AuditConfig::default() };
    app.clock.advance(Duration::minutes(19));
    append(&app, 1, 1);
    assert!(verify(&app, &settings).is_ok(), "within twice the interval");
    app.clock.advance(Duration::minutes(2));
    append(&app, 1, 1);
    assert_fails(&app, &settings, "older than twice the checkpoint interval");
});

/// Waits until the server's checkpointer has shipped at least `n` anchors to `dir`.
async fn shipped(dir: &std::path::Path, n: usize) -> Vec<String> {
    for _ in 0..200 {
        let lines: Vec<String> = std::fs::read_to_string(dir.join(carevault::audit::anchor::ANCHOR_FILE))
            .map(|t| t.lines().map(str::to_owned).collect())
            .unwrap_or_default();
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    panic!("no anchor shipped");
}

fn anchor_toml(dir: &std::path::Path) -> String {
    format!("[audit]\ncheckpoint_interval_secs = 1\nanchor_dir = \"{}\"\n", dir.display())
}

async fn truncation(backend: crate::helpers::Backend) {
    let anchors = tempfile::tempdir().unwrap();
    let Some(app) = TestApp::spawn_with(backend, &anchor_toml(anchors.path())).await else { return };
    append(&app, 5, 2);
    // The server's checkpointer signs and ships a checkpoint every second; wait for one covering our records.
    let anchor = loop {
        let lines = shipped(anchors.path(), 1).await;
        let a = carevault::audit::anchor::parse(lines.last().unwrap()).unwrap();
        if a.checkpoint.seq > 10 {
            break a;
        }
        tokio::time::sleep(StdDuration::from_millis(200)).await;
    };
    assert_eq!(anchor.sealed_from, Some(app.state.audit.sealer().first_seq()));
    let settings = AuditConfig { anchor_dir: Some(anchors.path().to_path_buf()), ..AuditConfig::default() };
    assert!(verify(&app, &settings).is_ok());
    // Delete the newest rows down to a sealed record and their checkpoints, and move the head back, in one
    // transaction holding the chain lock (the running checkpointer waits, then appends to the cut trail).
    let mut conn = app.state.db.conn().unwrap();
    let keep = 5i64;
    conn.transaction::<_, carevault::error::AppError, _>(|c| {
        carevault::audit::store::lock_head(c)?;
        let hash: String =
            audit_events::table.filter(audit_events::seq.eq(keep)).select(audit_events::hash).first(c)?;
        diesel::delete(audit_events::table.filter(audit_events::seq.gt(keep))).execute(c)?;
        diesel::delete(audit_checkpoints::table).execute(c)?;
        diesel::update(audit_head::table).set((audit_head::seq.eq(keep), audit_head::hash.eq(hash))).execute(c)?;
        Ok(())
    })
    .unwrap();
    assert!(verify(&app, &AuditConfig::default()).is_ok(), "inside the database nothing shows");
    let bad = verify(&app, &settings).expect_err("the shipped anchors catch the truncation");
    assert!(
        bad.message.contains("truncated") || bad.message.contains("does not match the signed checkpoint"),
        "{}",
        bad.message
    );
    // Passing the trail off as one from before seals: the shipped anchors name the transition point.
    diesel::update(audit_events::table).set(audit_events::seal.eq(None::<String>)).execute(&mut conn).unwrap();
    diesel::delete(audit_seal_keys::table).execute(&mut conn).unwrap();
    assert_fails(&app, &settings, "seal does not verify");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_with_the_head_moved_is_caught_by_the_shipped_anchors_sqlite() {
    truncation(crate::helpers::Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_with_the_head_moved_is_caught_by_the_shipped_anchors_postgres() {
    truncation(crate::helpers::Backend::Postgres).await;
}

both_backends_with!(a_trail_from_before_seals_verifies_up_to_the_transition_point, "", |app: TestApp| async move {
    // A trail written before seals existed: its rows carry none and the key's transition point is after them.
    append(&app, 5, 2);
    let mut conn = app.state.db.conn().unwrap();
    diesel::update(audit_events::table).set(audit_events::seal.eq(None::<String>)).execute(&mut conn).unwrap();
    diesel::update(audit_seal_keys::table).set(audit_seal_keys::first_seq.eq(11)).execute(&mut conn).unwrap();
    drop(conn);
    // A server started on it (same key, transition at 11) appends sealed batches.
    let state = {
        let mut conn = app.state.db.conn().unwrap();
        carevault::audit::seal::load(&mut conn, app.state.keys.as_ref()).unwrap().unwrap()
    };
    assert_eq!(state.first_seq(), 11);
    {
        let mut conn = app.state.db.conn().unwrap();
        let e = AuditEvent::new(AuditKind::Login, app.clock.now(), Outcome::Success, Agent::default());
        carevault::audit::store::append(&mut conn, &state, &[e]).unwrap();
    }
    let settings = AuditConfig::default();
    assert_eq!(verify(&app, &settings).unwrap(), 11, "legacy records verified the old way, then sealed");
    // A legacy record rewritten and re-hashed: the seal after the transition catches it.
    rewrite_and_rehash(&app, 4);
    assert_fails(&app, &settings, "audit record 11: seal does not verify");
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_posted_to_the_anchor_webhook_through_an_outage() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/anchors", listener.local_addr().unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u16, String)>();
    tokio::spawn(async move {
        let mut answers = [500u16, 200].into_iter();
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(i) = text.find("\r\n\r\n") {
                    let len = text[..i]
                        .to_lowercase()
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                        .unwrap_or(0);
                    if buf.len() >= i + 4 + len {
                        let status = answers.next().unwrap_or(200);
                        let _ = tx.send((status, text[i + 4..i + 4 + len].to_owned()));
                        let reply = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                        let _ = sock.write_all(reply.as_bytes()).await;
                        break;
                    }
                }
            }
        }
    });
    let toml = format!("[audit]\ncheckpoint_interval_secs = 1\nanchor_webhook_url = \"{url}\"\n");
    let app = TestApp::spawn_with(crate::helpers::Backend::Sqlite, &toml).await.unwrap();
    let (first_status, first) = tokio::time::timeout(StdDuration::from_secs(30), rx.recv()).await.unwrap().unwrap();
    let (second_status, second) = tokio::time::timeout(StdDuration::from_secs(30), rx.recv()).await.unwrap().unwrap();
    assert_eq!((first_status, second_status), (500, 200));
    assert_eq!(first, second, "the refused checkpoint is retried, byte for byte");
    let anchor = carevault::audit::anchor::parse(&second).expect("an anchor line");
    let mut conn = app.state.db.conn().unwrap();
    assert_eq!(checkpoints::check(&mut conn, app.state.keys.as_ref(), &anchor.checkpoint).unwrap(), Ok(()));
    app.stop().await;
}
