//! Demo and synthetic data (CONTRACT §1).
//!
//! `serve --demo` seeds, on its first start only, one account per role (plus a second clinician, so care-team
//! isolation can be tried with two logins), each with a generated password that passes the password policy, and
//! synthetic patients with their records. `carevault seed` adds synthetic patients for load tests. Everything
//! clinical is written through the records service as a front-desk or clinician caller, so it is validated,
//! encrypted, indexed and audited like any other write. Both refuse the production profile. Passwords go only to
//! `DATA_DIR/demo-credentials.txt` (mode 0600): never to a log, an error or standard output.

pub mod synthetic;

use crate::app::AppState;
use crate::audit::{Agent, AuditEvent, AuditKind, Outcome};
use crate::auth::principal::Principal;
use crate::auth::service::{AccountError, NewAccount, create_account};
use crate::config::{Config, Profile};
use crate::error::{AppError, AppResult};
use crate::records::{Caller, Done, Interaction, Operation, Records};
use crate::role::Role;
use crate::store::schema::accounts;
use diesel::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use std::path::{Path, PathBuf};
use time::OffsetDateTime;
use uuid::Uuid;

/// The credentials file, in the data directory.
pub const CREDENTIALS_FILE: &str = "demo-credentials.txt";
/// Synthetic patients seeded by `serve --demo`.
pub const DEMO_PATIENTS: usize = 25;

/// The demo accounts in creation order; `demo-admin` comes last, so its presence means seeding finished.
pub const ACCOUNTS: [(&str, Role); 8] = [
    ("demo-front-desk", Role::FrontDesk),
    ("demo-clinician", Role::Clinician),
    ("demo-nurse", Role::Nurse),
    ("demo-clinician-2", Role::Clinician),
    ("demo-patient", Role::Patient),
    ("demo-billing", Role::Billing),
    ("demo-auditor", Role::Auditor),
    ("demo-admin", Role::Admin),
];

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("synthetic data is refused in the production profile")]
    Production,
    #[error(
        "an earlier demo seed was interrupted (some demo accounts exist, not all): remove the data directory and start again"
    )]
    Interrupted,
    #[error("cannot create a demo account: {0}")]
    Account(#[from] AccountError),
    #[error("cannot write the demo data: {0}")]
    Records(#[from] AppError),
    #[error("cannot write the demo credentials file")]
    Credentials,
    #[error(
        "the demo passwords file (`demo_passwords_file`) cannot be read, lacks a demo account, or holds a password the policy refuses"
    )]
    Passwords,
}

/// The demo accounts' passwords from `path` (`username password` lines, `#` comments), in [`ACCOUNTS`] order;
/// every one must be present and pass the password policy.
pub fn read_passwords(path: &Path) -> Result<Vec<SecretString>, SeedError> {
    let text = std::fs::read_to_string(path).map_err(|_| SeedError::Passwords)?;
    let pairs: Vec<(&str, &str)> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once(char::is_whitespace))
        .map(|(u, p)| (u.trim(), p.trim()))
        .collect();
    ACCOUNTS
        .iter()
        .map(|(name, _)| {
            let password = pairs.iter().find(|(u, _)| u == name).map(|(_, p)| SecretString::from(*p));
            match password {
                Some(p) if crate::auth::password::check_policy(&p, name).is_ok() => Ok(p),
                _ => Err(SeedError::Passwords),
            }
        })
        .collect()
}

/// The text of a demo passwords file (what `deploy init` writes and [`read_passwords`] reads).
pub fn passwords_text(passwords: &[(String, String)]) -> String {
    let mut text = String::from("# carevault demo accounts (synthetic demo only): username password\n");
    for (u, p) in passwords {
        text.push_str(&format!("{u} {p}\n"));
    }
    text
}

/// What [`seed_demo`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DemoOutcome {
    Seeded {
        credentials: PathBuf,
        patients: usize,
    },
    /// The demo accounts existed already: nothing was changed.
    AlreadySeeded {
        credentials: PathBuf,
    },
}

impl DemoOutcome {
    pub fn credentials(&self) -> &Path {
        match self {
            DemoOutcome::Seeded { credentials, .. } | DemoOutcome::AlreadySeeded { credentials } => credentials,
        }
    }
}

/// Who writes a group of patients' clinical records: a clinician caller, and the Practitioners their care team
/// names (the writer's own Practitioner among them).
#[derive(Debug, Clone)]
pub struct Team {
    pub writer: Caller,
    pub members: Vec<String>,
}

/// A strong random password: 4 groups of 5 letters and digits (about 119 bits), shell- and JSON-safe.
pub fn generate_password(rng: &mut impl Rng, username: &str) -> SecretString {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    loop {
        let groups: Vec<String> =
            (0..4).map(|_| (0..5).map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())])).collect()).collect();
        let password = SecretString::from(groups.join("-"));
        if crate::auth::password::check_policy(&password, username).is_ok() {
            return password;
        }
    }
}

fn caller(state: &AppState, subject: String, username: &str, role: Role, practitioner: Option<Uuid>) -> Caller {
    Caller {
        principal: Principal {
            subject,
            username: Some(username.to_owned()),
            roles: vec![role],
            practitioner,
            patient: None,
            session_id: None,
            issuer: state.auth.issuer().to_owned(),
            client_id: None,
            scopes: None,
            context_patient: None,
        },
        ip: None,
    }
}

/// Creates a resource through the records service and returns its id.
async fn create(records: &Records, caller: &Caller, resource: Value) -> AppResult<String> {
    let rtype = resource["resourceType"].as_str().unwrap_or_default().to_owned();
    let body = bytes::Bytes::from(resource.to_string());
    let op = Operation::new(caller.clone(), Interaction::Create { rtype, body, if_none_exist: None });
    let Done::Created(shown) = records.execute(op).await? else {
        return Err(AppError::internal("create answered without a resource"));
    };
    shown.resource["id"].as_str().map(str::to_owned).ok_or_else(|| AppError::internal("created resource has no id"))
}

fn uuid(id: &str) -> AppResult<Uuid> {
    Uuid::parse_str(id).map_err(|_| AppError::internal("created resource id is not a uuid"))
}

/// Seeds `count` synthetic patients: the front desk registers each and assigns a care team (patients take the
/// teams in turn); the team's clinician records 1–3 check-ups with vital signs, and at the first one conditions,
/// prescriptions and maybe an allergy. `progress` is called once per patient. Returns the patient ids in order.
pub async fn seed_patients(
    records: &Records,
    front_desk: &Caller,
    teams: &[Team],
    count: usize,
    now: OffsetDateTime,
    rng: &mut StdRng,
    mut progress: impl FnMut(),
) -> AppResult<Vec<String>> {
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let team = teams.get(i % teams.len().max(1)).ok_or_else(|| AppError::internal("no care team to seed"))?;
        let practitioner = team
            .writer
            .principal
            .practitioner
            .ok_or_else(|| AppError::internal("the team writer has no Practitioner"))?
            .to_string();
        let patient = create(records, front_desk, synthetic::patient(rng, now)).await?;
        create(records, front_desk, synthetic::care_team(&patient, &team.members)).await?;
        for (visit, at) in synthetic::visit_times(rng, now).into_iter().enumerate() {
            let encounter = create(records, &team.writer, synthetic::encounter(&patient, &practitioner, at)).await?;
            let mut resources = synthetic::vital_signs(rng, &patient, &encounter, &practitioner, at);
            if visit == 0 {
                resources.extend(synthetic::findings(rng, &patient, &encounter, &practitioner, at));
            }
            for r in resources {
                create(records, &team.writer, r).await?;
            }
        }
        ids.push(patient);
        progress();
    }
    Ok(ids)
}

async fn add_account(
    state: &AppState,
    username: &str,
    role: Role,
    link: Option<Uuid>,
    password: &SecretString,
) -> Result<String, SeedError> {
    let new = NewAccount {
        username: username.to_owned(),
        kind: "user",
        role,
        practitioner: link.filter(|_| role.is_care_provider()),
        patient: link.filter(|_| role == Role::Patient),
    };
    let (password, now) = (password.clone(), state.clock.now());
    Ok(state.db.run(move |c| Ok(create_account(c, &new, &password, now))).await??)
}

/// Records an administrative audit event for a seeding run (no data in it: the creates are audited one by one).
async fn audit_seed(state: &AppState, subject: &str, detail: &'static str) -> AppResult<()> {
    let event =
        AuditEvent::new(AuditKind::Admin, state.clock.now(), Outcome::Success, Agent::user(subject, None, None))
            .with_detail(detail);
    let sealer = state.audit.clone();
    state.db.run(move |c| crate::audit::store::append(c, sealer.sealer(), &[event])).await
}

/// Seeds the demo on its first run; on later runs finds the accounts and changes nothing.
pub async fn seed_demo(state: &AppState, patients: usize) -> Result<DemoOutcome, SeedError> {
    if state.config.profile == Profile::Production {
        return Err(SeedError::Production);
    }
    let credentials = state.config.data_dir.join(CREDENTIALS_FILE);
    let names: Vec<&'static str> = ACCOUNTS.iter().map(|(n, _)| *n).collect();
    let existing: i64 = state
        .db
        .run(move |c| Ok(accounts::table.filter(accounts::username.eq_any(names)).count().get_result(c)?))
        .await?;
    if existing == ACCOUNTS.len() as i64 {
        return Ok(DemoOutcome::AlreadySeeded { credentials });
    }
    if existing > 0 {
        return Err(SeedError::Interrupted);
    }
    let mut rng = StdRng::from_entropy();
    let passwords: Vec<SecretString> = match &state.config.demo_passwords_file {
        Some(file) => read_passwords(file)?,
        None => ACCOUNTS.iter().map(|(n, _)| generate_password(&mut rng, n)).collect(),
    };
    let mut links: Vec<Option<String>> = vec![None; ACCOUNTS.len()];
    let records = &state.records;

    let front_id = add_account(state, ACCOUNTS[0].0, Role::FrontDesk, None, &passwords[0]).await?;
    let front = caller(state, front_id, ACCOUNTS[0].0, Role::FrontDesk, None);
    let mut callers = Vec::new();
    for (i, given, family) in
        [(1, "Avery", "Demo-Clinician"), (2, "Blake", "Demo-Nurse"), (3, "Casey", "Demo-Colleague")]
    {
        let (username, role) = ACCOUNTS[i];
        let pr = create(records, &front, synthetic::practitioner(given, family)).await?;
        let id = add_account(state, username, role, Some(uuid(&pr)?), &passwords[i]).await?;
        callers.push(caller(state, id, username, role, Some(uuid(&pr)?)));
        links[i] = Some(format!("Practitioner/{pr}"));
    }
    let member = |i: usize| callers[i].principal.practitioner.map(|p| p.to_string()).unwrap_or_default();
    let teams = [
        Team { writer: callers[0].clone(), members: vec![member(0), member(1)] },
        Team { writer: callers[2].clone(), members: vec![member(2)] },
    ];
    let now = state.clock.now();
    let ids = seed_patients(records, &front, &teams, patients.max(1), now, &mut rng, || {}).await?;
    add_account(state, ACCOUNTS[4].0, Role::Patient, Some(uuid(&ids[0])?), &passwords[4]).await?;
    links[4] = Some(format!("Patient/{}", ids[0]));
    for (i, (username, role)) in ACCOUNTS.iter().enumerate().skip(5) {
        add_account(state, username, *role, None, &passwords[i]).await?;
    }
    audit_seed(state, "system:demo-seed", "demo-seeded").await?;

    let mut text = String::from(
        "# carevault demo accounts: development profile only, synthetic data. Keep this file private.\n\
         # username          role        password                 link\n",
    );
    for (i, (username, role)) in ACCOUNTS.iter().enumerate() {
        let link = links[i].as_deref().unwrap_or("-");
        text.push_str(&format!("{username:<19} {:<11} {} {link}\n", role.as_str(), passwords[i].expose_secret()));
    }
    // A file left from an earlier database names accounts that no longer exist.
    if credentials.exists() {
        std::fs::remove_file(&credentials).map_err(|_| SeedError::Credentials)?;
    }
    crate::fsutil::write_private(&credentials, text.as_bytes()).map_err(|_| SeedError::Credentials)?;
    tracing::info!("demo data seeded");
    Ok(DemoOutcome::Seeded { credentials, patients: ids.len() })
}

/// What [`seed_synthetic`] created.
#[derive(Debug, Clone)]
pub struct SyntheticReport {
    /// The Practitioner on every new patient's care team (link a clinician account to it to reach them).
    pub practitioner: String,
    pub patients: Vec<String>,
}

/// `carevault seed`: `count` more synthetic patients, written as the `cli:seed` operator (front desk, then a
/// clinician acting as a new Practitioner that is on every new patient's care team).
pub async fn seed_synthetic(
    state: &AppState,
    count: usize,
    progress: impl FnMut(),
) -> Result<SyntheticReport, SeedError> {
    if state.config.profile == Profile::Production {
        return Err(SeedError::Production);
    }
    const SUBJECT: &str = "cli:seed";
    let front = caller(state, SUBJECT.into(), "seed", Role::FrontDesk, None);
    let practitioner = create(&state.records, &front, synthetic::practitioner("Seed", "Demo-Loadtest")).await?;
    let writer = caller(state, SUBJECT.into(), "seed", Role::Clinician, Some(uuid(&practitioner)?));
    let teams = [Team { writer, members: vec![practitioner.clone()] }];
    let mut rng = StdRng::from_entropy();
    let now = state.clock.now();
    let patients = seed_patients(&state.records, &front, &teams, count, now, &mut rng, progress).await?;
    audit_seed(state, SUBJECT, "synthetic-seeded").await?;
    Ok(SyntheticReport { practitioner, patients })
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// The lines printed after a demo start: where the credentials are and a ready login command (which reads the
/// password from the file, so it never appears on the terminal).
pub fn login_hint(config: &Config, credentials: &Path) -> String {
    let host =
        if config.listen.ip().is_unspecified() { "127.0.0.1".to_owned() } else { config.listen.ip().to_string() };
    let (scheme, cacert) = if config.insecure_http {
        ("http", String::new())
    } else {
        let cert = config.tls.cert_file.clone().unwrap_or_else(|| config.tls_dir().join("cert.pem"));
        ("https", format!("--cacert {} ", shell_quote(&cert)))
    };
    let file = shell_quote(credentials);
    format!(
        "Demo accounts (username, role, password): {file} (mode 0600)\n\
         Sign in as the demo clinician:\n  \
         PASSWORD=\"$(awk '$1 == \"demo-clinician\" {{print $3}}' {file})\"\n  \
         curl {cacert}-X POST {scheme}://{host}:{port}/auth/login -H 'content-type: application/json' \
         -d \"{{\\\"username\\\":\\\"demo-clinician\\\",\\\"password\\\":\\\"$PASSWORD\\\"}}\"",
        port = config.listen.port(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passwords_file_must_name_every_account_with_a_policy_password() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let all: Vec<(String, String)> = ACCOUNTS
            .iter()
            .map(|(n, _)| ((*n).to_owned(), generate_password(&mut rng, n).expose_secret().to_owned()))
            .collect();
        let write = |pairs: &[(String, String)]| {
            let path = dir.path().join(format!("p{}", pairs.len()));
            std::fs::write(&path, passwords_text(pairs)).unwrap();
            path
        };
        let read = read_passwords(&write(&all)).unwrap();
        assert!(read.iter().zip(&all).all(|(r, (_, p))| r.expose_secret() == p), "in ACCOUNTS order");
        assert!(matches!(read_passwords(&write(&all[1..])), Err(SeedError::Passwords)), "an account is missing");
        let mut weak = all.clone();
        weak[0].1 = "password".into();
        let path = dir.path().join("weak");
        std::fs::write(&path, passwords_text(&weak)).unwrap();
        assert!(matches!(read_passwords(&path), Err(SeedError::Passwords)), "the policy applies");
        assert!(matches!(read_passwords(&dir.path().join("none")), Err(SeedError::Passwords)));
    }

    #[test]
    fn generated_passwords_pass_the_policy_and_differ() {
        let mut rng = StdRng::seed_from_u64(3);
        let a = generate_password(&mut rng, "demo-admin");
        let b = generate_password(&mut rng, "demo-admin");
        assert!(crate::auth::password::check_policy(&a, "demo-admin").is_ok());
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_eq!(a.expose_secret().len(), 23);
        assert!(a.expose_secret().chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }

    #[test]
    fn login_hint_reads_the_password_from_the_file() {
        let over = crate::config::Overrides { data_dir: PathBuf::from("./data"), ..Default::default() };
        let cfg = Config::from_toml("", &over).unwrap();
        let hint = login_hint(&cfg, &cfg.data_dir.join(CREDENTIALS_FILE));
        assert!(hint.contains("--cacert './data/tls/cert.pem'"), "{hint}");
        assert!(hint.contains("https://127.0.0.1:8443/auth/login"), "{hint}");
        assert!(hint.contains("awk '$1 == \"demo-clinician\" {print $3}' './data/demo-credentials.txt'"), "{hint}");
        assert!(hint.contains(r#""{\"username\":\"demo-clinician\",\"password\":\"$PASSWORD\"}""#), "{hint}");
    }
}
