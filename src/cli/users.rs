//! `carevault users add | disable | list`.

use super::{Cli, CliError, Context};
use crate::audit::Target;
use crate::auth::service::{NewAccount, create_account, disable_account, find_account, list_accounts};
use crate::role::Role;
use secrecy::SecretString;
use std::io::Read;
use uuid::Uuid;

#[derive(Debug, clap::Subcommand)]
pub enum UsersCommand {
    /// Create a local account; the password is read from standard input.
    Add {
        #[arg(long)]
        username: String,
        #[arg(long)]
        role: Role,
        /// The Practitioner a clinician or nurse account acts as.
        #[arg(long)]
        practitioner: Option<Uuid>,
        /// The Patient a patient account belongs to.
        #[arg(long)]
        patient: Option<Uuid>,
        #[arg(long)]
        password_stdin: bool,
        /// Create a service client (for `client_credentials`) instead of a person's account; its secret is
        /// generated (256 bits) and printed once.
        #[arg(long)]
        service: bool,
    },
    /// Enroll a TOTP second factor (prints the otpauth:// URL once; required for admins in production).
    TotpEnroll {
        #[arg(long)]
        username: String,
    },
    /// Disable an account and end its sessions at once.
    Disable { username: String },
    /// List accounts.
    List {
        #[arg(long)]
        json: bool,
    },
}

impl clap::ValueEnum for Role {
    fn value_variants<'a>() -> &'a [Self] {
        &Role::ALL
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

pub fn run(cli: &Cli, cmd: &UsersCommand) -> Result<(), CliError> {
    let state = super::open_state(cli)?;
    let now = state.clock.now();
    let mut conn = super::connect(&state)?;
    match cmd {
        UsersCommand::Add { username, role, practitioner, patient, password_stdin, service } => {
            // A service client's secret is made here (256 random bits, shown once), never chosen by a person.
            let generated = service.then(crate::auth::service::new_client_secret);
            let password = match (&generated, password_stdin) {
                (Some(_), true) => {
                    return Err("a service client's secret is generated: drop --password-stdin".into());
                }
                (Some(secret), false) => SecretString::from(secret.clone()),
                (None, false) => {
                    return Err("the password is read from standard input: pass --password-stdin".into());
                }
                (None, true) => {
                    let mut password = String::new();
                    std::io::stdin().read_to_string(&mut password).context("cannot read standard input")?;
                    SecretString::from(password.trim_end_matches(['\r', '\n']).to_owned())
                }
            };
            let new = NewAccount {
                username: username.clone(),
                kind: if *service { "service" } else { "user" },
                role: *role,
                practitioner: *practitioner,
                patient: *patient,
            };
            let id = create_account(&mut conn, &new, &password, now)?;
            let target = Target::account(&id, &new.username, Some(*role));
            super::audit_account_change(&state, &mut conn, "user-created", target)?;
            println!("created {} ({role}) id {id}", new.username);
            if let Some(secret) = generated {
                println!("client_secret (shown once, store it now): {secret}");
            }
            Ok(())
        }
        UsersCommand::TotpEnroll { username } => {
            let issuer = "carevault";
            let url = crate::auth::service::enroll_totp(&mut conn, state.keys.as_ref(), username, issuer)
                .context("cannot enroll the second factor")?
                .ok_or("no such account")?;
            let account =
                find_account(&mut conn, username).context("cannot read the account")?.ok_or("no such account")?;
            let target = Target::account(&account.id, &account.username, account.role());
            super::audit_account_change(&state, &mut conn, "totp-enrolled", target)?;
            println!("{url}");
            Ok(())
        }
        UsersCommand::Disable { username } => {
            let (account, sessions) = disable_account(&mut conn, username, now)
                .context("cannot disable the account")?
                .ok_or("no such account")?;
            let target = Target::account(&account.id, &account.username, account.role());
            super::audit_account_change(&state, &mut conn, "user-disabled", target)?;
            println!("disabled; {sessions} session(s) ended");
            Ok(())
        }
        UsersCommand::List { json } => {
            let accounts = list_accounts(&mut conn).context("cannot list the accounts")?;
            if *json {
                let rows: Vec<_> = accounts
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "id": a.id, "username": a.username, "kind": a.kind, "role": a.role,
                            "practitioner": a.practitioner_id, "patient": a.patient_id, "disabled": a.disabled,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                for a in accounts {
                    let state = if a.disabled { "disabled" } else { "active" };
                    println!("{:<24} {:<11} {:<8} {}", a.username, a.role, a.kind, state);
                }
            }
            Ok(())
        }
    }
}
