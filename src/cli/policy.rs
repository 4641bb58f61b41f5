//! `carevault policy explain --role R --type T --action A [--json]`: the decision the server would make for
//! one role, resource type and interaction, with the policy rule that made it and the field masks.
//!
//! Reads only the policy files (`access.policy_dir`): no database, no keys, no PHI, so it is not an audited
//! action. An invalid policy is an error naming the file and line, as when the server loads it.

use super::{Cli, CliError};
use crate::access::{AccessControl, Action, R4Catalog};
use crate::role::Role;
use std::sync::Arc;

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Print the decision for one role, resource type and interaction, and the rule that made it.
    Explain {
        #[arg(long)]
        role: Role,
        /// FHIR resource type, e.g. `Observation`.
        #[arg(long = "type")]
        resource_type: String,
        /// read, vread, search, history, create, update, delete, everything, access-report.
        #[arg(long)]
        action: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cli: &Cli, cmd: &PolicyCommand) -> Result<(), CliError> {
    let PolicyCommand::Explain { role, resource_type, action, json } = cmd;
    let action: Action = action.parse().map_err(|_| {
        let names: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
        format!("unknown --action; one of: {}", names.join(", "))
    })?;
    let cfg = cli.load_config(|_| {})?;
    cfg.check_policy_dir()?;
    let access = AccessControl::from_source(&cfg.policy_source(), Arc::new(R4Catalog))?;
    if *json {
        let d = access.current().decide_role(*role, resource_type, action);
        let out = serde_json::json!({
            "role": role.as_str(),
            "type": resource_type,
            "action": action.as_str(),
            "allowed": d.allowed,
            "scope": d.scope.map(|s| s.as_str()),
            "rule": &*d.rule,
            "sees": d.allowed.then(|| d.read_mask.to_string()),
            "writes": d.allowed.then(|| d.write_mask.to_string()),
        });
        println!("{out}");
    } else {
        print!("{}", access.explain(*role, resource_type, action));
    }
    Ok(())
}
