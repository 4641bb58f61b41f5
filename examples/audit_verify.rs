//! Times `audit::store::verify` (the walk behind `carevault audit verify`) over an existing trail:
//! `audit_verify postgres://…/db` prints `{"events", "seconds", "events_per_s"}` (best of three walks).
//! Used by `benches/load/run.sh`; results in `docs/benchmarks.md`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a measurement tool, not service code

use carevault::config::parse_database_url;
use carevault::store::Db;
use std::time::Instant;

fn main() {
    let url = std::env::args().nth(1).expect("usage: audit_verify DATABASE_URL");
    let db = Db::connect(&parse_database_url(&url).expect("database URL"), 1).expect("connect");
    let mut conn = db.conn().expect("connection");
    let mut best: Option<(u64, f64)> = None;
    for _ in 0..3 {
        let started = Instant::now();
        let events = carevault::audit::store::verify(&mut conn, |_| {}).expect("read the trail");
        let Ok(events) = events else {
            eprintln!("the audit chain is broken: {:?}", events.err());
            std::process::exit(1);
        };
        let secs = started.elapsed().as_secs_f64();
        if best.is_none_or(|(_, b)| secs < b) {
            best = Some((events, secs));
        }
    }
    let (events, secs) = best.unwrap();
    println!("{}", serde_json::json!({ "events": events, "seconds": secs, "events_per_s": events as f64 / secs }));
}
