//! Audit chain micro-benchmarks: `cargo bench --bench audit` (events/s = throughput × elements).

use carevault::audit::seal::Sealer;
use carevault::audit::{Agent, AuditEvent, AuditKind, ChainLink, Outcome, Verifier};
use carevault::role::Role;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use time::macros::datetime;
use uuid::Uuid;

const N: usize = 10_000;

fn event(i: usize) -> AuditEvent {
    let agent = Agent::user(format!("acct-{}", i % 50), Some("dr.house".into()), Some(Role::Clinician))
        .with_address("192.0.2.10".parse().unwrap_or(std::net::IpAddr::from([0, 0, 0, 0])));
    AuditEvent::new(AuditKind::Search, datetime!(2026-03-04 05:06:07 UTC), Outcome::Success, agent)
        .with_patient(Uuid::from_u128(i as u128))
        .with_resource("Observation", None, None)
        .with_query_params(["patient", "code", "date"], |_| true)
}

/// A stored row: (seq, event JSON, prev_hash, hash).
type Row = (i64, Vec<u8>, [u8; 32], [u8; 32]);

fn rows() -> Vec<Row> {
    let mut last: Option<ChainLink> = None;
    (0..N)
        .map(|i| {
            let e = event(i);
            let l = ChainLink::next(last.as_ref(), &e.canonical_bytes().unwrap_or_default());
            last = Some(l);
            (l.seq, serde_json::to_vec(&e).unwrap_or_default(), l.prev_hash, l.hash)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let rows = rows();
    let mut g = c.benchmark_group("audit_verify");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("chain_only", |b| {
        let canon: Vec<Vec<u8>> = rows
            .iter()
            .map(|r| {
                serde_json::from_slice::<AuditEvent>(&r.1)
                    .ok()
                    .and_then(|e| e.canonical_bytes().ok())
                    .unwrap_or_default()
            })
            .collect();
        b.iter(|| {
            let mut v = Verifier::new();
            for (r, c) in rows.iter().zip(&canon) {
                let _ = v.push(r.0, c, &r.2, &r.3);
            }
            black_box(v.finish(None))
        })
    });
    g.bench_function("parse_canonicalize_chain", |b| {
        b.iter(|| {
            let mut v = Verifier::new();
            for r in &rows {
                let _ = v.push_stored(r.0, &r.1, &r.2, &r.3);
            }
            black_box(v.finish(None))
        })
    });
    g.finish();

    // The append path of one group-commit batch (512 events, the appender's largest): canonical bytes and a
    // chain link per event, with and without the batch's seal (one HMAC-SHA256, issue 18).
    const BATCH: usize = 512;
    let events: Vec<AuditEvent> = (0..BATCH).map(event).collect();
    let sealer = Sealer::from_parts("bench", [7; 32], 1);
    let mut g = c.benchmark_group("audit_append");
    g.throughput(Throughput::Elements(BATCH as u64));
    let link_batch = |events: &[AuditEvent]| {
        let mut last: Option<ChainLink> = None;
        for e in events {
            last = Some(ChainLink::next(last.as_ref(), &e.canonical_bytes().unwrap_or_default()));
        }
        last
    };
    g.bench_function("batch_512_unsealed", |b| b.iter(|| black_box(link_batch(&events))));
    g.bench_function("batch_512_sealed", |b| {
        b.iter(|| {
            let last = link_batch(&events);
            black_box(last.map(|l| sealer.seal(l.seq, &l.hash)))
        })
    });
    g.bench_function("seal_only", |b| b.iter(|| black_box(sealer.seal(black_box(512), &[9; 32]))));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
