//! The command line (CONTRACT §1): one module per subcommand group. Every subcommand takes `--data-dir`
//! (before or after it) and reads the same configuration as the server.

pub mod audit;
pub mod incident;
pub mod keys;
pub mod policy;
pub mod seed;
pub mod serve;
pub mod users;

use crate::config::{Config, ConfigError, Overrides};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

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
        Some(Command::Incident(cmd)) => incident::run(&cli, cmd),
        Some(Command::Keys(cmd)) => keys::run(&cli, cmd),
        Some(Command::Audit(cmd)) => audit::run(&cli, cmd),
        Some(Command::Policy(cmd)) => policy::run(&cli, cmd),
        Some(Command::Seed(args)) => seed::run(&cli, args),
    };
    match result {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("carevault: {message}");
            1
        }
    }
}

fn migrate(cli: &Cli) -> Result<(), String> {
    let cfg = cli.load_config(|_| {}).map_err(|e| e.to_string())?;
    let db = crate::store::Db::connect(&cfg.database().map_err(|e| e.to_string())?, 1).map_err(|e| e.to_string())?;
    let n = db.migrate().map_err(|e| e.to_string())?;
    println!("{n} migration(s) applied");
    Ok(())
}

/// Opens the same database and keys the server uses (the server may be running).
pub fn open_state(cli: &Cli) -> Result<crate::app::AppState, String> {
    let cfg = cli.load_config(|_| {}).map_err(|e| e.to_string())?;
    crate::app::AppState::open(cfg, crate::clock::system()).map_err(|e| e.to_string())
}

/// Records an administrative action in the audit trail (durably, before the command reports success).
pub fn audit_admin(
    state: &crate::app::AppState,
    conn: &mut crate::store::AnyConnection,
    detail: &'static str,
) -> Result<(), String> {
    let event = admin_event(state.clock.now(), detail);
    crate::audit::store::append(conn, &[event]).map_err(|_| "cannot write the audit trail".to_owned())
}

/// The audit record of an administrative action by the operator running this command (`cli:$USER`, letters and
/// digits only), with a fixed `detail` code.
pub fn admin_event(now: time::OffsetDateTime, detail: &'static str) -> crate::audit::AuditEvent {
    use crate::audit::{Agent, AuditEvent, AuditKind, Outcome};
    let operator = std::env::var("USER").unwrap_or_else(|_| "operator".into());
    let agent = Agent {
        user: Some(format!("cli:{}", operator.chars().filter(char::is_ascii_alphanumeric).collect::<String>())),
        ..Agent::default()
    };
    AuditEvent::new(AuditKind::Admin, now, Outcome::Success, agent).with_detail(detail)
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
