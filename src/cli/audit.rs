//! `carevault audit verify | export | checkpoint` (CONTRACT §7).
//!
//! - `verify [--anchor FILE] [--json]`: checks the signature of the latest stored checkpoint (and of an exported
//!   one given with `--anchor`), then walks the whole hash chain against them and the head. Exit 0 when intact,
//!   printing the count and the rate; otherwise non-zero, naming the first bad record by its `seq` and how it is
//!   broken (edited, missing, inserted, reordered, unlinked, truncated, does not match the checkpoint).
//! - `export --since T [--until T] [--output F]`: the events recorded in `[since, until)` as NDJSON FHIR R4
//!   `AuditEvent`s (oldest first). `T` is RFC 3339 or a date (`2026-03-01` = that day's start, UTC; as `--until`
//!   a date includes that whole day).
//! - `checkpoint`: appends its own admin record, signs the new head with the checkpoint key and stores it;
//!   prints `{"checkpoint": {...}, "public_key": "..."}` for off-site anchoring, and ships it to every configured
//!   anchor sink (`audit.anchor_dir`, `audit.anchor_webhook_url`) as the server does (non-zero exit when a sink did
//!   not take it).
//!
//! Output holds sequence numbers, hashes, counts and FHIR AuditEvents (ids and codes, no PHI payload). Each
//! command is recorded in the audit trail after it ran.

use super::{Cli, CliError, Context};
use crate::audit::checkpoints::{self, CheckpointInvalid};
use crate::audit::{AuditEvent, ChainError, to_fhir};
use crate::crypto::store::micros;
use crate::store::StoreError;
use crate::store::schema::{audit_events, audit_head};
use diesel::prelude::*;
use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use time::format_description::well_known::Rfc3339;
use time::{Date, Duration, OffsetDateTime};

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Walk the hash chain; exit 0 when intact, non-zero naming the first bad record otherwise.
    Verify {
        /// An exported checkpoint (output of `audit checkpoint`) the trail must still contain.
        #[arg(long)]
        anchor: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Write the events of a period as NDJSON FHIR AuditEvents.
    Export {
        /// Start (inclusive): RFC 3339 or YYYY-MM-DD.
        #[arg(long)]
        since: String,
        /// End (exclusive; a date includes that day): RFC 3339 or YYYY-MM-DD. Default: now.
        #[arg(long)]
        until: Option<String>,
        /// Write to this file (created with mode 0600) instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Sign the current head of the trail and store it; prints the checkpoint as JSON for off-site anchoring.
    Checkpoint,
    /// Remove records older than the retention period (`audit.retention_days`), re-anchoring the chain.
    Purge {
        /// Remove records recorded before this instant (RFC 3339 or YYYY-MM-DD); must be past the retention period.
        #[arg(long)]
        before: String,
    },
}

pub fn run(cli: &Cli, cmd: &AuditCommand) -> Result<(), CliError> {
    let state = super::open_state(cli)?;
    let mut conn = super::connect(&state)?;
    match cmd {
        AuditCommand::Verify { anchor, json } => {
            let result = verify_with(&mut conn, state.keys.as_ref(), anchor.as_deref(), &state.config.audit);
            let detail = if matches!(result, Ok(Ok(_))) { "audit-verified" } else { "audit-verify-failed" };
            let logged = super::audit_admin(&state, &mut conn, detail);
            let outcome = result?;
            match outcome {
                Ok(ok) => {
                    if *json {
                        println!("{}", ok.to_json());
                    } else {
                        println!("{}", ok.text());
                    }
                    logged
                }
                Err(bad) => {
                    if *json {
                        println!("{}", json!({"intact": false, "first_bad_record": bad.seq, "problem": bad.problem}));
                    }
                    if logged.is_err() {
                        eprintln!("carevault: also: cannot record this verification in the audit trail");
                    }
                    Err(bad.message.into())
                }
            }
        }
        AuditCommand::Export { since, until, output } => {
            let since = parse_time(since, false).ok_or("--since: expected RFC 3339 or YYYY-MM-DD")?;
            let until = match until {
                Some(u) => parse_time(u, true).ok_or("--until: expected RFC 3339 or YYYY-MM-DD")?,
                None => state.clock.now() + Duration::microseconds(1),
            };
            let server = state.config.base_url();
            let mut out: Box<dyn Write> = match output {
                Some(path) => Box::new(private_file(path)?),
                None => Box::new(std::io::stdout().lock()),
            };
            let n = export(&mut conn, since, until, &server, &mut out)?;
            out.flush().context("cannot write the export")?;
            drop(out);
            super::audit_admin(&state, &mut conn, "audit-exported")?;
            eprintln!("exported {n} audit event(s)");
            Ok(())
        }
        AuditCommand::Purge { before } => {
            let now = state.clock.now();
            let cutoff = parse_time(before, false).ok_or("--before: expected RFC 3339 or YYYY-MM-DD")?;
            if !purge_allowed(cutoff, now, state.config.audit.retention_days) {
                return Err(format!(
                    "--before must be at least `audit.retention_days` ({} days) in the past",
                    state.config.audit.retention_days
                )
                .into());
            }
            let event = super::admin_event(now, "audit-purged");
            let purged = checkpoints::purge(&mut conn, state.keys.as_ref(), cutoff, event, now)?;
            match purged {
                Some(seq) => {
                    println!("purged audit records up to {seq}; the chain is re-anchored by a signed checkpoint")
                }
                None => println!("no audit record is older than the cutoff"),
            }
            Ok(())
        }
        AuditCommand::Checkpoint => {
            let now = state.clock.now();
            let event = super::admin_event(now, "audit-checkpoint");
            let (cp, public_key) = checkpoints::checkpoint(&mut conn, state.keys.as_ref(), event, now)?;
            println!("{}", json!({"checkpoint": cp, "public_key": public_key}));
            // Shipped to every configured sink (`audit.anchor_dir`, `audit.anchor_webhook_url`) exactly as the
            // server's checkpointer ships its own: the same line, the same retries. A sink that did not take it
            // fails the command (the checkpoint itself is stored).
            let shipper = crate::audit::anchor::Shipper::from_config(&state.config);
            if !shipper.is_empty() {
                let line = crate::audit::anchor::line(&cp, &public_key, Some(state.audit.sealer().first_seq()));
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start the runtime that ships the checkpoint")?;
                if !runtime.block_on(shipper.ship(&line)) {
                    return Err(format!(
                        "checkpoint at audit record {} is stored but was not shipped to every anchor sink \
                         (`audit.anchor_dir`, `audit.anchor_webhook_url`); run `audit checkpoint` again",
                        cp.seq
                    )
                    .into());
                }
            }
            Ok(())
        }
    }
}

/// A verified trail.
#[derive(Debug)]
pub struct Intact {
    pub records: u64,
    pub seconds: f64,
    pub checkpoint: Option<i64>,
}

impl Intact {
    fn rate(&self) -> f64 {
        if self.seconds > 0.0 { self.records as f64 / self.seconds } else { self.records as f64 }
    }

    fn to_json(&self) -> Value {
        json!({"intact": true, "records": self.records, "seconds": self.seconds,
               "events_per_second": self.rate().round(), "checkpoint_seq": self.checkpoint})
    }

    fn text(&self) -> String {
        let cp = self.checkpoint.map_or_else(
            || "no signed checkpoint yet (run `carevault audit checkpoint`)".to_owned(),
            |s| format!("signed checkpoint at record {s} verified"),
        );
        format!(
            "audit trail intact: {} record(s) verified in {:.2}s ({:.0} events/s); {cp}",
            self.records,
            self.seconds,
            self.rate()
        )
    }
}

/// Why the trail is not intact: the first bad record and a message naming it.
#[derive(Debug)]
pub struct Broken {
    pub seq: i64,
    pub problem: &'static str,
    pub message: String,
}

impl From<ChainError> for Broken {
    fn from(e: ChainError) -> Self {
        Broken { seq: e.seq, problem: e.kind.as_str(), message: e.to_string() }
    }
}

impl From<CheckpointInvalid> for Broken {
    fn from(e: CheckpointInvalid) -> Self {
        let seq = match e {
            CheckpointInvalid::UnknownKey(s) | CheckpointInvalid::BadSignature(s) | CheckpointInvalid::Malformed(s) => {
                s
            }
        };
        Broken { seq, problem: "checkpoint not authentic", message: e.to_string() }
    }
}

/// Whether records before `cutoff` are past the retention period.
pub fn purge_allowed(cutoff: OffsetDateTime, now: OffsetDateTime, retention_days: u32) -> bool {
    cutoff <= now - Duration::days(i64::from(retention_days))
}

/// [`verify_with`] with the default audit settings (no anchor directory, the default checkpoint interval).
pub fn verify(
    conn: &mut crate::store::AnyConnection,
    keys: &dyn crate::crypto::KeyProvider,
    anchor: Option<&std::path::Path>,
) -> Result<Result<Intact, Broken>, CliError> {
    verify_with(conn, keys, anchor, &crate::config::AuditConfig::default())
}

fn broken(seq: i64, kind: crate::audit::BreakKind) -> Broken {
    ChainError { seq, kind }.into()
}

/// Checks the checkpoints' signatures (stored, `--anchor`, and every one shipped to `audit.anchor_dir`),
/// then walks the chain through them with the seal key (`crate::audit::store::verify_sealed`), and finally
/// that the newest checkpoint is no older than twice `audit.checkpoint_interval_secs` before the newest record.
pub fn verify_with(
    conn: &mut crate::store::AnyConnection,
    keys: &dyn crate::crypto::KeyProvider,
    anchor: Option<&std::path::Path>,
    settings: &crate::config::AuditConfig,
) -> Result<Result<Intact, Broken>, CliError> {
    use crate::audit::BreakKind;
    let mut anchors = Vec::new();
    let mut latest = None;
    let mut newest_at: Option<OffsetDateTime> = None;
    let sealer = crate::audit::seal::load(conn, keys)?;
    if let Some(stored) = checkpoints::latest(conn)? {
        let cp = match stored {
            Ok(cp) => cp,
            Err(e) => return Ok(Err(e.into())),
        };
        if let Err(e) = checkpoints::check(conn, keys, &cp)? {
            return Ok(Err(e.into()));
        }
        anchors.push((cp.seq, cp.hash));
        latest = Some(cp.seq);
        newest_at = newest_at.max(Some(cp.at));
    }
    let mut shipped = Vec::new();
    if let Some(path) = anchor {
        shipped.push(read_anchor(path)?);
    }
    if let Some(dir) = &settings.anchor_dir {
        match crate::audit::anchor::all_in_dir(dir) {
            Ok(all) => shipped.extend(all),
            Err(message) => return Ok(Err(Broken { seq: 0, problem: "anchor unreadable", message })),
        }
    }
    for a in shipped {
        let cp = a.checkpoint;
        if let Err(e) = checkpoints::check(conn, keys, &cp)? {
            return Ok(Err(e.into()));
        }
        // The seal transition point the anchor names must still be the database's.
        if let Some(from) = a.sealed_from
            && sealer.as_ref().is_none_or(|s| s.first_seq() != from)
        {
            return Ok(Err(broken(from, BreakKind::BadSeal)));
        }
        anchors.push((cp.seq, cp.hash));
        latest = latest.max(Some(cp.seq));
        newest_at = newest_at.max(Some(cp.at));
    }
    // After a retention purge the trail starts later: it must resume from the signed anchor the purge left.
    let first: Option<i64> = crate::store::schema::audit_events::table
        .select(diesel::dsl::min(crate::store::schema::audit_events::seq))
        .first(conn)?;
    let mut resume = None;
    if let Some(first) = first.filter(|f| *f > 1) {
        match checkpoints::at_seq(conn, first - 1)? {
            Some(Ok(cp)) => {
                if let Err(e) = checkpoints::check(conn, keys, &cp)? {
                    return Ok(Err(e.into()));
                }
                resume = Some((cp.seq, cp.hash));
            }
            Some(Err(e)) => return Ok(Err(e.into())),
            None => {
                return Ok(Err(Broken {
                    seq: 1,
                    problem: "missing",
                    message: format!(
                        "audit records 1 to {} are missing and no signed purge anchor covers them",
                        first - 1
                    ),
                }));
            }
        }
    }
    let total: i64 = audit_head::table.filter(audit_head::id.eq(1)).select(audit_head::seq).first(conn)?;
    let bar = super::progress(u64::try_from(total).unwrap_or(0), "verifying");
    let start = std::time::Instant::now();
    let seals = match &sealer {
        Some(k) => crate::audit::store::Seals::With(k),
        None => crate::audit::store::Seals::NoKey,
    };
    let walked = crate::audit::store::verify_sealed(conn, seals, resume, &anchors, |n| bar.set_position(n))?;
    bar.finish_and_clear();
    let records = match walked {
        Ok(records) => records,
        Err(e) => return Ok(Err(e.into())),
    };
    // Checkpoints are made every interval while records are written: a newest checkpoint much older than the
    // newest record means checkpointing stopped, or the newest checkpoints were removed.
    if let Some(at) = newest_at {
        let newest: Option<(i64, i64)> = audit_events::table
            .order(audit_events::seq.desc())
            .select((audit_events::seq, audit_events::recorded))
            .first(conn)
            .optional()?;
        let limit = i64::try_from(settings.checkpoint_interval_secs.max(1)).unwrap_or(i64::MAX / 4).saturating_mul(2);
        if let Some((seq, recorded)) = newest
            && recorded - micros(at) > limit.saturating_mul(1_000_000)
        {
            return Ok(Err(broken(seq, BreakKind::StaleCheckpoint)));
        }
    }
    Ok(Ok(Intact { records, seconds: start.elapsed().as_secs_f64(), checkpoint: latest }))
}

/// An exported checkpoint: the output of `audit checkpoint`, an anchor line, or the bare checkpoint object.
fn read_anchor(path: &std::path::Path) -> Result<crate::audit::anchor::Shipped, CliError> {
    let bad = || format!("--anchor {}: not a checkpoint exported by `carevault audit checkpoint`", path.display());
    let text = std::fs::read_to_string(path).context(bad())?;
    Ok(crate::audit::anchor::parse(&text).ok_or_else(bad)?)
}

/// RFC 3339, or a date (start of that day, UTC; with `end_of_day`, the start of the next day).
pub fn parse_time(text: &str, end_of_day: bool) -> Option<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(t);
    }
    let date = Date::parse(text, time::macros::format_description!("[year]-[month]-[day]")).ok()?;
    let date = if end_of_day { date.next_day()? } else { date };
    Some(date.midnight().assume_utc())
}

fn private_file(path: &std::path::Path) -> Result<std::fs::File, CliError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).context(format!("cannot create {}", path.display()))
}

/// Writes the events recorded in `[since, until)` as NDJSON; returns how many.
pub fn export(
    conn: &mut crate::store::AnyConnection,
    since: OffsetDateTime,
    until: OffsetDateTime,
    server: &str,
    out: &mut dyn Write,
) -> Result<u64, CliError> {
    let (since, until) = (micros(since), micros(until));
    let total: i64 = audit_events::table
        .filter(audit_events::recorded.ge(since))
        .filter(audit_events::recorded.lt(until))
        .count()
        .get_result(conn)
        .map_err(StoreError::from)
        .context("cannot count the audit records")?;
    let bar = super::progress(u64::try_from(total).unwrap_or(0), "exporting");
    let mut after = 0i64;
    let mut n = 0u64;
    loop {
        let rows: Vec<(i64, String)> = audit_events::table
            .filter(audit_events::recorded.ge(since))
            .filter(audit_events::recorded.lt(until))
            .filter(audit_events::seq.gt(after))
            .order(audit_events::seq.asc())
            .limit(1000)
            .select((audit_events::seq, audit_events::body))
            .load(conn)
            .map_err(StoreError::from)
            .context("cannot read the audit records")?;
        let Some(last) = rows.last() else { break };
        after = last.0;
        for (seq, body) in rows {
            let event: AuditEvent = serde_json::from_str(&body)
                .map_err(|_| format!("audit record {seq} is not a valid event; run `carevault audit verify`"))?;
            let line =
                serde_json::to_string(&to_fhir(&event, server)).map_err(|_| "cannot render an event".to_owned())?;
            writeln!(out, "{line}").context("cannot write the export")?;
            n += 1;
        }
        bar.set_position(n);
    }
    bar.finish_and_clear();
    Ok(n)
}
