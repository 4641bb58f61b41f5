//! The rule table: every detection rule in one place. A rule names the audit kinds it looks at, which events
//! count and under which subject (an account id or a client address, never a name or PHI), what it counts
//! (events or distinct patients), its threshold and its window. Adding a rule is one entry in [`RULES`].

use crate::audit::{AuditEvent, AuditKind, Outcome, purpose};
use crate::config::Config;
use serde::Serialize;
use std::fmt;
use std::net::IpAddr;

pub const FAILED_LOGINS_ACCOUNT: &str = "failed-logins-account";
pub const FAILED_LOGINS_ADDRESS: &str = "failed-logins-address";
pub const BULK_ACCESS: &str = "bulk-access";
pub const BREAK_GLASS: &str = "break-glass";
pub const BREAK_GLASS_REFUSED: &str = "break-glass-refused";
pub const REFRESH_TOKEN_REUSE: &str = "refresh-token-reuse";
pub const DISABLED_ACCOUNT_TOKEN: &str = "disabled-account-token";
pub const DECRYPT_FAILURE: &str = "decrypt-failure";
pub const AUDIT_CHAIN_FAILURE: &str = "audit-chain-failure";

/// The audit `detail` code recorded when a token of a disabled account is presented.
pub const DETAIL_DISABLED_ACCOUNT_TOKEN: &str = "disabled-account-token";
/// The audit `detail` code of a spent refresh token presented again.
pub const DETAIL_REFRESH_TOKEN_REUSE: &str = "refresh-token-reuse";

/// Failed logins are counted over the same hour the login throttle uses.
pub const FAILED_LOGIN_WINDOW_SECS: i64 = 3600;
/// Window of the one-shot rules: one open alert per subject per hour.
pub const ONE_SHOT_WINDOW_SECS: i64 = 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 4] = [Severity::Low, Severity::Medium, Severity::High, Severity::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Severity> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Whom an alert is about. The type admits only identifiers, so no name or PHI can become a subject.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    /// An account id (or the subject of an external token).
    Account(String),
    /// A client address.
    Address(IpAddr),
    /// A component of the service itself (integrity failures), a fixed code.
    System(&'static str),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Account(a) => f.write_str(a),
            Subject::Address(ip) => write!(f, "{ip}"),
            Subject::System(s) => f.write_str(s),
        }
    }
}

/// What a rule counts inside its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counting {
    /// Matching events.
    Events,
    /// Distinct patients among the matching events.
    DistinctPatients,
}

/// One detection rule.
#[derive(Debug)]
pub struct Rule {
    pub name: &'static str,
    pub severity: Severity,
    /// Audit kinds the rule looks at; empty for rules raised only directly ([`super::raise`]).
    pub kinds: &'static [AuditKind],
    /// Whether an event counts, and under which subject.
    pub subject: fn(&AuditEvent) -> Option<Subject>,
    pub counting: Counting,
    /// The count at which the rule fires (at least 1).
    pub threshold: fn(&Config) -> u64,
    pub window_secs: fn(&Config) -> i64,
}

impl Rule {
    pub fn threshold_for(&self, cfg: &Config) -> u64 {
        (self.threshold)(cfg).max(1)
    }

    pub fn window_for(&self, cfg: &Config) -> i64 {
        (self.window_secs)(cfg).max(1)
    }
}

const REST: &[AuditKind] = &[
    AuditKind::Read,
    AuditKind::Vread,
    AuditKind::Search,
    AuditKind::History,
    AuditKind::Create,
    AuditKind::Update,
    AuditKind::Patch,
    AuditKind::Delete,
    AuditKind::Everything,
];

fn account(e: &AuditEvent) -> Option<Subject> {
    e.agent.user.clone().map(Subject::Account)
}

fn address(e: &AuditEvent) -> Option<Subject> {
    e.agent.address.as_deref().and_then(|a| a.parse().ok()).map(Subject::Address)
}

fn has_detail(e: &AuditEvent, code: &str) -> bool {
    e.detail.as_deref() == Some(code)
}

/// A failed sign-in (a disabled account's token has its own rule).
fn failed_login(e: &AuditEvent) -> bool {
    e.kind == AuditKind::LoginFailure && !has_detail(e, DETAIL_DISABLED_ACCOUNT_TOKEN)
}

fn failed_login_account(e: &AuditEvent) -> Option<Subject> {
    failed_login(e).then(|| account(e)).flatten()
}

fn failed_login_address(e: &AuditEvent) -> Option<Subject> {
    failed_login(e).then(|| address(e)).flatten()
}

fn patient_access(e: &AuditEvent) -> Option<Subject> {
    (REST.contains(&e.kind) && !e.disclosed().is_empty()).then(|| account(e)).flatten()
}

fn break_glass(e: &AuditEvent) -> Option<Subject> {
    let grant = e.kind == AuditKind::BreakGlass && e.outcome == Outcome::Success;
    let emergency_access = e.kind.is_rest() && e.purpose_of_use.as_deref() == Some(purpose::BTG);
    (grant || emergency_access).then(|| account(e)).flatten()
}

/// A refused break-glass request (wrong role, no reason, over the daily cap, unknown patient): every one alerts.
fn break_glass_refused(e: &AuditEvent) -> Option<Subject> {
    (e.kind == AuditKind::BreakGlass && e.outcome != Outcome::Success).then(|| account(e)).flatten()
}

fn refresh_reuse(e: &AuditEvent) -> Option<Subject> {
    has_detail(e, DETAIL_REFRESH_TOKEN_REUSE).then(|| account(e).or_else(|| address(e))).flatten()
}

fn disabled_token(e: &AuditEvent) -> Option<Subject> {
    has_detail(e, DETAIL_DISABLED_ACCOUNT_TOKEN).then(|| account(e)).flatten()
}

fn never(_: &AuditEvent) -> Option<Subject> {
    None
}

fn one(_: &Config) -> u64 {
    1
}

fn hour(_: &Config) -> i64 {
    ONE_SHOT_WINDOW_SECS
}

/// Every rule of the service.
pub static RULES: &[Rule] = &[
    Rule {
        name: FAILED_LOGINS_ACCOUNT,
        severity: Severity::Medium,
        kinds: &[AuditKind::LoginFailure],
        subject: failed_login_account,
        counting: Counting::Events,
        threshold: |c| u64::from(c.monitor.failed_logins_threshold),
        window_secs: |_| FAILED_LOGIN_WINDOW_SECS,
    },
    Rule {
        name: FAILED_LOGINS_ADDRESS,
        severity: Severity::Medium,
        kinds: &[AuditKind::LoginFailure],
        subject: failed_login_address,
        counting: Counting::Events,
        threshold: |c| u64::from(c.monitor.failed_logins_threshold),
        window_secs: |_| FAILED_LOGIN_WINDOW_SECS,
    },
    Rule {
        name: BULK_ACCESS,
        severity: Severity::High,
        kinds: REST,
        subject: patient_access,
        counting: Counting::DistinctPatients,
        threshold: |c| u64::from(c.monitor.bulk_access_patients),
        window_secs: |c| i64::try_from(c.monitor.bulk_access_window_secs).unwrap_or(i64::MAX / 2_000_000),
    },
    Rule {
        name: BREAK_GLASS,
        severity: Severity::High,
        kinds: &[
            AuditKind::BreakGlass,
            AuditKind::Read,
            AuditKind::Vread,
            AuditKind::Search,
            AuditKind::History,
            AuditKind::Create,
            AuditKind::Update,
            AuditKind::Patch,
            AuditKind::Delete,
            AuditKind::Everything,
            AuditKind::AccessReport,
            AuditKind::Transaction,
            AuditKind::Batch,
            AuditKind::Validate,
        ],
        subject: break_glass,
        counting: Counting::Events,
        threshold: one,
        window_secs: |c| i64::try_from(c.access.break_glass_minutes.saturating_mul(60)).unwrap_or(ONE_SHOT_WINDOW_SECS),
    },
    Rule {
        name: BREAK_GLASS_REFUSED,
        severity: Severity::Medium,
        kinds: &[AuditKind::BreakGlass],
        subject: break_glass_refused,
        counting: Counting::Events,
        threshold: one,
        window_secs: hour,
    },
    Rule {
        name: REFRESH_TOKEN_REUSE,
        severity: Severity::High,
        kinds: &[AuditKind::Refresh],
        subject: refresh_reuse,
        counting: Counting::Events,
        threshold: one,
        window_secs: hour,
    },
    Rule {
        name: DISABLED_ACCOUNT_TOKEN,
        severity: Severity::High,
        kinds: &[AuditKind::LoginFailure],
        subject: disabled_token,
        counting: Counting::Events,
        threshold: one,
        window_secs: hour,
    },
    Rule {
        name: DECRYPT_FAILURE,
        severity: Severity::Critical,
        kinds: &[],
        subject: never,
        counting: Counting::Events,
        threshold: one,
        window_secs: hour,
    },
    Rule {
        name: AUDIT_CHAIN_FAILURE,
        severity: Severity::Critical,
        kinds: &[],
        subject: never,
        counting: Counting::Events,
        threshold: one,
        window_secs: hour,
    },
];

/// The rule with this name.
pub fn rule(name: &str) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Agent;
    use time::macros::datetime;
    use uuid::Uuid;

    fn event(kind: AuditKind, outcome: Outcome) -> AuditEvent {
        let agent = Agent::user("acct-1", None, None).with_address("192.0.2.7".parse().unwrap());
        AuditEvent::new(kind, datetime!(2026-03-01 09:00 UTC), outcome, agent)
    }

    #[test]
    fn names_are_unique_and_kinds_cover_their_matches() {
        let mut names: Vec<_> = RULES.iter().map(|r| r.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), RULES.len());
        for kind in AuditKind::ALL {
            let e = event(kind, Outcome::Success).with_patient(Uuid::nil()).with_purpose(purpose::BTG);
            for r in RULES {
                if (r.subject)(&e).is_some() {
                    assert!(r.kinds.contains(&kind), "{} matches {kind:?} outside its kinds", r.name);
                }
            }
        }
    }

    #[test]
    fn subjects_are_ids_and_addresses() {
        let fail = event(AuditKind::LoginFailure, Outcome::MinorFailure);
        assert_eq!(failed_login_account(&fail), Some(Subject::Account("acct-1".into())));
        assert_eq!(failed_login_address(&fail).unwrap().to_string(), "192.0.2.7");
        let read = event(AuditKind::Read, Outcome::Success);
        assert_eq!(patient_access(&read), None, "no patient, no count");
        assert!(patient_access(&read.clone().with_patient(Uuid::nil())).is_some());
        assert_eq!(break_glass(&read), None);
        assert!(break_glass(&read.with_purpose(purpose::BTG)).is_some());
        let denied = event(AuditKind::BreakGlass, Outcome::MinorFailure);
        assert_eq!(break_glass(&denied), None);
        assert!(break_glass_refused(&denied).is_some());
        assert_eq!(break_glass_refused(&event(AuditKind::BreakGlass, Outcome::Success)), None);
        let reuse = event(AuditKind::Refresh, Outcome::SeriousFailure).with_detail(DETAIL_REFRESH_TOKEN_REUSE);
        assert!(refresh_reuse(&reuse).is_some());
        let disabled = fail.clone().with_detail(DETAIL_DISABLED_ACCOUNT_TOKEN);
        assert!(disabled_token(&disabled).is_some());
        assert_eq!(failed_login_account(&disabled), None, "counted by its own rule only");
        assert_eq!(refresh_reuse(&event(AuditKind::Refresh, Outcome::Success)), None);
    }

    #[test]
    fn thresholds_come_from_configuration() {
        let over = crate::config::Overrides::default();
        let cfg = Config::from_toml(
            "[monitor]\nfailed_logins_threshold = 3\nbulk_access_patients = 7\nbulk_access_window_secs = 60\n",
            &over,
        )
        .unwrap();
        assert_eq!(rule(FAILED_LOGINS_ACCOUNT).unwrap().threshold_for(&cfg), 3);
        assert_eq!(rule(BULK_ACCESS).unwrap().threshold_for(&cfg), 7);
        assert_eq!(rule(BULK_ACCESS).unwrap().window_for(&cfg), 60);
        assert_eq!(rule(BREAK_GLASS).unwrap().window_for(&cfg), 3600);
        assert_eq!(rule(DECRYPT_FAILURE).unwrap().severity, Severity::Critical);
    }
}
