//! `carevault seed --patients N`: synthetic patients for load tests and benchmarks, with a progress bar. Works on
//! any configured database; refused in production.

use super::{Cli, CliError, Context};
use crate::config::Profile;

#[derive(Debug, clap::Args)]
pub struct SeedArgs {
    /// How many synthetic patients to add (each with a care team and clinical records).
    #[arg(long)]
    pub patients: usize,
}

pub fn run(cli: &Cli, args: &SeedArgs) -> Result<(), CliError> {
    let cfg = cli.load_config(|_| {})?;
    if cfg.profile == Profile::Production {
        return Err("seeding synthetic data is refused in the production profile".into());
    }
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let state =
            crate::app::AppState::open(cfg, crate::clock::system()).context("cannot open the database and keys")?;
        let bar = indicatif::ProgressBar::new(u64::try_from(args.patients).unwrap_or(u64::MAX));
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} patients ({per_sec}, eta {eta})")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message("seeding");
        let report = crate::demo::seed_synthetic(&state, args.patients, || bar.inc(1))
            .await
            .context("cannot seed the patients")?;
        bar.finish();
        println!(
            "{} synthetic patient(s) added; their care team is Practitioner/{} (link a clinician to it with \
             `carevault users add --username NAME --role clinician --practitioner {} --password-stdin`)",
            report.patients.len(),
            report.practitioner,
            report.practitioner
        );
        Ok(())
    })
}
