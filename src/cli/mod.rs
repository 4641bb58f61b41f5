//! The command line (CONTRACT §1): one module per subcommand group. Every subcommand takes `--data-dir`
//! (before or after it) and reads the same configuration as the server.

pub mod apps;
pub mod audit;
pub mod deploy;
pub mod healthcheck;
pub mod import;
pub mod incident;
pub mod keys;
pub mod policy;
pub mod seed;
pub mod serve;
pub mod users;

use crate::config::{Config, ConfigError, Overrides};
use crate::error::{BoxError, Chain};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// A command's failure: what could not be done, with every cause kept. [`run`] prints it whole
/// (`carevault: error: …: caused by …`), so an operator sees why, not only that.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A refusal or a finding that is itself the whole message (no underlying error).
    #[error("{0}")]
    Message(String),
    /// `context` (what the command was doing) failed because of `source`.
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: BoxError,
    },
    /// A module error that already says what failed; shown as it is, with its own causes.
    #[error(transparent)]
    Source(BoxError),
}

impl From<String> for CliError {
    fn from(message: String) -> Self {
        CliError::Message(message)
    }
}

impl From<&str> for CliError {
    fn from(message: &str) -> Self {
        CliError::Message(message.to_owned())
    }
}

/// Module errors that `?` turns into a [`CliError`] as they are (their text names what failed).
macro_rules! cli_sources {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for CliError {
            fn from(e: $t) -> Self {
                CliError::Source(Box::new(e))
            }
        }
    )*};
}

cli_sources!(
    ConfigError,
    crate::app::StartError,
    crate::error::AppError,
    crate::store::StoreError,
    crate::crypto::CryptoError,
    crate::crypto::store::KeyStoreError,
    crate::auth::service::AccountError,
    crate::access::PolicyError,
);

/// A diesel error keeps only its kind (a database message can quote row values).
impl From<diesel::result::Error> for CliError {
    fn from(e: diesel::result::Error) -> Self {
        CliError::Source(Box::new(crate::store::StoreError::query(&e)))
    }
}

/// Adds what the command was doing to an error, keeping the error as the cause.
pub trait Context<T> {
    fn context(self, what: impl Into<String>) -> Result<T, CliError>;
}

impl<T, E: Into<BoxError>> Context<T> for Result<T, E> {
    fn context(self, what: impl Into<String>) -> Result<T, CliError> {
        self.map_err(|e| CliError::Context { context: what.into(), source: e.into() })
    }
}

/// The line printed for a failed command: the error and every cause.
pub fn report(e: &CliError) -> String {
    format!("carevault: error: {}", Chain(e))
}

#[derive(Debug, Parser)]
#[command(name = "carevault", version, about = "A HIPAA-grade FHIR R4 patient-records API")]
pub struct Cli {
    /// Data directory (database, generated certificate and keys in development).
    #[arg(long, global = true, env = "CAREVAULT_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// TOML configuration file; `CAREVAULT_*` environment variables override it.
    #[arg(long, global = true, env = "CAREVAULT_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTPS server.
    Serve(serve::ServeArgs),
    /// Run pending database migrations and exit.
    Migrate,
    /// Manage local accounts and service clients.
    #[command(subcommand)]
    Users(users::UsersCommand),
    /// SMART apps: register, list, remove.
    #[command(subcommand)]
    Apps(apps::AppsCommand),
    /// Incident response: scope a user's access, contain an account.
    #[command(subcommand)]
    Incident(incident::IncidentCommand),
    /// Key management: status, data-key rotation and re-encryption, master-key rewrap, token-signing key.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// The audit trail: verify the hash chain, export FHIR AuditEvents, sign checkpoints.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// The access policy: explain a decision.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Add synthetic patients (load tests, benchmarks; refused in production).
    Seed(seed::SeedArgs),
    /// Load NDJSON files and FHIR Bundles through the records pipeline as an account (resumable).
    Import(import::ImportArgs),
    /// Ask a running server whether it is ready; exit 0 when it is (container healthchecks).
    Healthcheck(healthcheck::HealthcheckArgs),
    /// Deployment helpers: `deploy init` makes every secret and certificate a deployment needs.
    #[command(subcommand)]
    Deploy(deploy::DeployCommand),
}

impl Cli {
    /// Loads the configuration shared by every subcommand.
    pub fn load_config(&self, extra: impl FnOnce(&mut Overrides)) -> Result<Config, ConfigError> {
        let mut over =
            Overrides { config_file: self.config.clone(), data_dir: self.data_dir.clone(), ..Default::default() };
        extra(&mut over);
        Config::load(&over)
    }
}

/// Runs the parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    let result = match &cli.command {
        None => serve::run(&cli, &serve::ServeArgs { demo: true, ..Default::default() }),
        Some(Command::Serve(args)) => serve::run(&cli, args),
        Some(Command::Migrate) => migrate(&cli),
        Some(Command::Users(cmd)) => users::run(&cli, cmd),
        Some(Command::Apps(cmd)) => apps::run(&cli, cmd),
        Some(Command::Incident(cmd)) => incident::run(&cli, cmd),
        Some(Command::Keys(cmd)) => keys::run(&cli, cmd),
        Some(Command::Audit(cmd)) => audit::run(&cli, cmd),
        Some(Command::Policy(cmd)) => policy::run(&cli, cmd),
        Some(Command::Seed(args)) => seed::run(&cli, args),
        Some(Command::Import(args)) => import::run(&cli, args),
        Some(Command::Healthcheck(args)) => healthcheck::run(&cli, args),
        Some(Command::Deploy(cmd)) => deploy::run(&cli, cmd),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{}", report(&e));
            1
        }
    }
}

fn migrate(cli: &Cli) -> Result<(), CliError> {
    let cfg = cli.load_config(|_| {})?;
    let db = crate::store::Db::connect(&cfg.database()?, 1)?;
    let n = db.migrate()?;
    println!("{n} migration(s) applied");
    Ok(())
}

/// Opens the same database and keys the server uses (the server may be running). Maintenance commands (`keys`,
/// `audit`, `users`, `incident`) never create data: a data directory or database without carevault's data is
/// refused ([`require_existing_data`]), so a mistyped `--data-dir` is an error, not a fresh empty install.
pub fn open_state(cli: &Cli) -> Result<crate::app::AppState, CliError> {
    let cfg = cli.load_config(|_| {})?;
    require_existing_data(&cfg)?;
    crate::app::AppState::open(cfg, crate::clock::system()).context("cannot open the database and keys")
}

/// Refuses a configuration whose database or generated master key does not exist yet: the SQLite file must be
/// there, the database must hold carevault's schema, and without `keys.master_key_file` the generated key must be
/// in `DATA_DIR/keys/`.
pub fn require_existing_data(cfg: &Config) -> Result<(), CliError> {
    let hint = "check `--data-dir` (CAREVAULT_DATA_DIR) and `database_url`; maintenance commands never create data \
                (start the server or run `carevault migrate` first)";
    let target = cfg.database()?;
    if let crate::config::DatabaseTarget::Sqlite(path) = &target
        && !path.exists()
    {
        return Err(CliError::Message(format!("no carevault database at {}: {hint}", path.display())));
    }
    let db = crate::store::Db::connect(&target, 1).context("cannot open the database and keys")?;
    if !db.holds_carevault_schema().context("cannot open the database and keys")? {
        return Err(CliError::Message(format!("the database holds no carevault data: {hint}")));
    }
    let key = cfg.keys_dir().join("master.key");
    if cfg.keys.master_key.is_none() && cfg.keys.master_key_file.is_none() && !key.is_file() {
        return Err(CliError::Message(format!(
            "no master key at {} and no `keys.master_key_file`: {hint}",
            key.display()
        )));
    }
    Ok(())
}

/// A connection from the state's pool.
pub fn connect(state: &crate::app::AppState) -> Result<crate::store::DbConn, CliError> {
    state.db.conn().context("cannot get a database connection")
}

/// Records an administrative action in the audit trail (durably, before the command reports success).
pub fn audit_admin(
    state: &crate::app::AppState,
    conn: &mut crate::store::AnyConnection,
    detail: &'static str,
) -> Result<(), CliError> {
    let event = admin_event(state.clock.now(), detail);
    crate::audit::store::append(conn, state.audit.sealer(), &[event]).context("cannot write the audit trail")
}

/// Records an administrative action that changed an account or an app, naming it and the role affected
/// ([`crate::audit::Target`]).
pub fn audit_account_change(
    state: &crate::app::AppState,
    conn: &mut crate::store::AnyConnection,
    detail: &'static str,
    target: crate::audit::Target,
) -> Result<(), CliError> {
    let event = admin_event(state.clock.now(), detail).with_target(target);
    crate::audit::store::append(conn, state.audit.sealer(), &[event]).context("cannot write the audit trail")
}

/// The audit record of an administrative action by the operator running this command ([`operator`]), with a
/// fixed `detail` code.
pub fn admin_event(now: time::OffsetDateTime, detail: &'static str) -> crate::audit::AuditEvent {
    use crate::audit::{AuditEvent, AuditKind, Outcome};
    AuditEvent::new(AuditKind::Admin, now, Outcome::Success, operator()).with_detail(detail)
}

/// The operator as the audit trail names them: `cli:NAME` for the account of the process's uid (from
/// `/etc/passwd`; letters, digits, `-`, `_` and `.` only), `cli:uid-N` when it has no entry. Never `$USER`, which
/// whoever runs the command can set to anything.
pub fn operator() -> crate::audit::Agent {
    crate::audit::Agent { user: Some(format!("cli:{}", operator_name())), ..crate::audit::Agent::default() }
}

fn operator_name() -> String {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // /proc/self belongs to the process's own uid; no libc call (and no unsafe) needed.
        let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
            return "unknown".into();
        };
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let name = passwd.lines().find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            (f.nth(1)?.parse::<u32>().ok()? == uid).then_some(name)
        });
        match name {
            Some(n) if !n.is_empty() => {
                n.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).collect()
            }
            _ => format!("uid-{uid}"),
        }
    }
    #[cfg(not(unix))]
    {
        "unknown".into()
    }
}

/// A progress bar on standard error (hidden when it is not a terminal).
pub fn progress(len: u64, what: &'static str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style);
    }
    bar.set_message(what);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maintenance_commands_refuse_a_data_dir_without_carevault_data_and_create_nothing() {
        let dir = std::env::temp_dir().join(format!("carevault-cli-{}", uuid::Uuid::new_v4()));
        let cli = Cli { data_dir: dir.clone(), config: None, command: None };
        let cfg = cli.load_config(|_| {}).unwrap();
        let line = report(&require_existing_data(&cfg).unwrap_err());
        assert!(line.contains("no carevault database at") && line.contains("--data-dir"), "{line}");
        assert!(!dir.exists(), "the refusal created {}", dir.display());
    }

    #[test]
    fn a_keys_command_on_a_database_that_cannot_be_opened_prints_the_underlying_cause() {
        let dir = std::env::temp_dir().join(format!("carevault-cli-{}", uuid::Uuid::new_v4()));
        // A directory where the SQLite file should be: something is there, so the data-dir refusal lets it through
        // to the driver, which cannot open it.
        std::fs::create_dir_all(crate::store::default_sqlite(&dir)).unwrap();
        let cli = Cli {
            data_dir: dir.clone(),
            config: None,
            command: Some(Command::Keys(keys::KeysCommand::Status { json: true })),
        };
        let Some(Command::Keys(cmd)) = &cli.command else { unreachable!() };
        let err = keys::run(&cli, cmd).unwrap_err();
        let line = report(&err);
        assert!(line.starts_with("carevault: error: cannot open the database and keys: caused by "), "{line}");
        assert!(line.contains("database: cannot connect (check `database_url`): caused by "), "{line}");
        assert!(line.to_lowercase().contains("unable to open the database file"), "the driver's own reason: {line}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn context_keeps_the_error_as_the_cause() {
        let failed: Result<(), std::io::Error> = Err(std::io::Error::other("disk full"));
        let err = failed.context("cannot write the export").unwrap_err();
        assert_eq!(report(&err), "carevault: error: cannot write the export: caused by disk full");
        let refused: CliError = "no such account".into();
        assert_eq!(report(&refused), "carevault: error: no such account");
    }
}
