//! `carevault incident report --user U --since T [--until T] [--discovered D] [--json]` and
//! `carevault incident contain --user U [--json]` (docs/breach-response.md, steps 2 and 3).

use super::{Cli, CliError, Context, operator};
use crate::monitor::incident;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime};

#[derive(Debug, clap::Subcommand)]
pub enum IncidentCommand {
    /// Every patient an account touched in a window, with counts and the notification duties that follow.
    Report {
        /// Username or account id.
        #[arg(long)]
        user: String,
        /// Start of the window: RFC 3339 (2026-03-01T00:00:00Z) or a date (2026-03-01, midnight UTC).
        #[arg(long, value_parser = parse_time)]
        since: OffsetDateTime,
        /// End of the window (exclusive); default now.
        #[arg(long, value_parser = parse_time)]
        until: Option<OffsetDateTime>,
        /// Date of discovery (the 60-day limits run from it); default today.
        #[arg(long, value_parser = parse_date)]
        discovered: Option<Date>,
        #[arg(long)]
        json: bool,
    },
    /// Disable an account and end its sessions, refresh tokens and break-glass grants at once.
    Contain {
        /// Username or account id.
        #[arg(long)]
        user: String,
        #[arg(long)]
        json: bool,
    },
}

fn parse_date(s: &str) -> Result<Date, String> {
    Date::parse(s, format_description!("[year]-[month]-[day]")).map_err(|_| "expected a date like 2026-03-01".into())
}

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339)
        .or_else(|_| parse_date(s).map(|d| d.midnight().assume_utc()))
        .map_err(|_| "expected an RFC 3339 time like 2026-03-01T00:00:00Z or a date".into())
}

pub fn run(cli: &Cli, cmd: &IncidentCommand) -> Result<(), CliError> {
    let state = super::open_state(cli)?;
    let now = state.clock.now();
    let mut conn = super::connect(&state)?;
    match cmd {
        IncidentCommand::Report { user, since, until, discovered, json } => {
            let until = until.unwrap_or(now);
            if until <= *since {
                return Err("--until must be after --since".into());
            }
            let discovered = discovered.unwrap_or(now.date());
            let report = incident::report(&state, &mut conn, user, *since, until, discovered, operator())
                .context("cannot build the report")?
                .ok_or("no such account")?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&report).context("cannot render the report")?);
            } else {
                print!("{}", report.summary());
            }
            Ok(())
        }
        IncidentCommand::Contain { user, json } => {
            let done = incident::contain(&mut conn, state.audit.sealer(), user, operator(), now)
                .context("cannot contain the account")?
                .ok_or("no such account")?;
            if *json {
                println!("{}", serde_json::to_string(&done).context("cannot render the result")?);
            } else {
                println!(
                    "{} disabled; {} session(s) with their refresh tokens and {} break-glass grant(s) ended; \
                     every replica refuses its tokens within 5 seconds",
                    done.username, done.sessions, done.break_glass_grants
                );
            }
            Ok(())
        }
    }
}
