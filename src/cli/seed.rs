//! `carevault seed --patients N`: synthetic patients for load tests and benchmarks, with a progress bar. Works on
//! any configured database; refused in production.

use super::Cli;
use crate::config::Profile;

#[derive(Debug, clap::Args)]
pub struct SeedArgs {
    /// How many synthetic patients to add (each with a care team and clinical records).
    #[arg(long)]
    pub patients: usize,
}

pub fn run(cli: &Cli, args: &SeedArgs) -> Result<(), String> {
    let cfg = cli.load_config(|_| {}).map_err(|e| e.to_string())?;
    if cfg.profile == Profile::Production {
        return Err("seeding synthetic data is refused in the production profile".into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let state = crate::app::AppState::open(cfg, crate::clock::system()).map_err(|e| e.to_string())?;
        let bar = indicatif::ProgressBar::new(u64::try_from(args.patients).unwrap_or(u64::MAX));
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} patients ({per_sec}, eta {eta})")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message("seeding");
        let report =
            crate::demo::seed_synthetic(&state, args.patients, || bar.inc(1)).await.map_err(|e| e.to_string())?;
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
