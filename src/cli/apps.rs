//! `carevault apps add | list | remove`: SMART apps (CONTRACT §5b).

use super::{Cli, CliError, Context};
use crate::audit::Target;
use crate::auth::service::{Account, AppKind, NewApp, find_account, list_apps, register_app, remove_app};
use crate::role::Role;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// A browser or native app (PKCE, no secret).
    Public,
    /// A server-side app with a secret (`client_secret_basic`), generated and shown once.
    Confidential,
    /// A backend service (`client_credentials` with a signed JWT; `system/` scopes; acts in `--role`).
    Backend,
}

#[derive(Debug, clap::Subcommand)]
pub enum AppsCommand {
    /// Register an app; prints its client id (and a confidential app's secret, once).
    Add {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        kind: Kind,
        /// An exact redirect URI (repeatable): https, or http on 127.0.0.1/localhost.
        #[arg(long = "redirect-uri")]
        redirect_uris: Vec<String>,
        /// The scopes the app may be granted, e.g. "launch/patient openid fhirUser patient/*.rs".
        #[arg(long)]
        scopes: String,
        /// Backend services: a file holding the app's public JWKS.
        #[arg(long)]
        jwks_file: Option<std::path::PathBuf>,
        /// Backend services: the https URL of the app's public JWKS.
        #[arg(long)]
        jwks_url: Option<String>,
        /// Backend services: the role its service account acts in (admin, auditor, billing, front-desk).
        #[arg(long)]
        role: Option<Role>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List registered apps (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove an app: ends every session it opened at once; a backend service's account is disabled.
    Remove { client_id: String },
}

pub fn run(cli: &Cli, cmd: &AppsCommand) -> Result<(), CliError> {
    let state = super::open_state(cli)?;
    let now = state.clock.now();
    let mut conn = super::connect(&state)?;
    match cmd {
        AppsCommand::Add { name, kind, redirect_uris, scopes, jwks_file, jwks_url, role, json } => {
            let jwks = match jwks_file {
                Some(p) => Some(std::fs::read_to_string(p).context("cannot read --jwks-file")?),
                None => None,
            };
            let kind = match kind {
                Kind::Public => AppKind::Public,
                Kind::Confidential => AppKind::Confidential,
                Kind::Backend => AppKind::Backend,
            };
            let new = NewApp {
                name: name.clone(),
                kind,
                redirect_uris: redirect_uris.clone(),
                scopes: scopes.clone(),
                jwks,
                jwks_url: jwks_url.clone(),
                role: *role,
            };
            let (app, secret) = register_app(&mut conn, new, now).map_err(CliError::from)?;
            // A backend service's account is named by its client id.
            let account = match kind {
                AppKind::Backend => find_account(&mut conn, &app.client_id).context("cannot read the app's account")?,
                AppKind::Public | AppKind::Confidential => None,
            };
            super::audit_account_change(&state, &mut conn, "app-registered", app_target(&app.client_id, account))?;
            if *json {
                let out = serde_json::json!({ "client_id": app.client_id, "client_secret": secret, "app": app });
                println!("{out}");
            } else {
                println!("registered {} ({}) client_id {}", app.name, app.kind, app.client_id);
                println!("scopes: {}", app.scopes);
                if let Some(s) = secret {
                    println!("client_secret (shown once, store it now): {s}");
                }
            }
            Ok(())
        }
        AppsCommand::List { json } => {
            let apps = list_apps(&mut conn)?;
            if *json {
                println!("{}", serde_json::to_string(&apps).context("cannot render the list")?);
            } else {
                for a in &apps {
                    println!("{}\t{}\t{}\t{}", a.client_id, a.kind, a.name, a.scopes);
                }
            }
            Ok(())
        }
        AppsCommand::Remove { client_id } => match remove_app(&mut conn, client_id, now)? {
            Some((n, account)) => {
                super::audit_account_change(&state, &mut conn, "app-removed", app_target(client_id, account))?;
                println!("removed {client_id}; {n} session(s) ended");
                Ok(())
            }
            None => Err("no such app".into()),
        },
    }
}

/// The audit target of an app change: the app's client id, and its service account (id, username, role) when
/// it has one.
fn app_target(client_id: &str, account: Option<Account>) -> Target {
    match account {
        Some(a) => Target::account(&a.id, &a.username, a.role()).with_client(client_id),
        None => Target::default().with_client(client_id),
    }
}
