//! `carevault serve [--listen ADDR:PORT] [--demo] [--insecure-http-behind-proxy]`.

use super::{Cli, CliError, Context};
use crate::app::Application;
use std::net::SocketAddr;

#[derive(Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (default from `listen`, 127.0.0.1:8443).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Seed demo accounts and synthetic patients (development profile only).
    #[arg(long)]
    pub demo: bool,
    /// Serve plain HTTP behind a TLS-terminating proxy (refused in production).
    #[arg(long)]
    pub insecure_http_behind_proxy: bool,
}

pub fn run(cli: &Cli, args: &ServeArgs) -> Result<(), CliError> {
    let cfg = cli.load_config(|o| {
        o.listen = args.listen;
        o.demo = args.demo;
        o.insecure_http = args.insecure_http_behind_proxy;
    })?;
    let _telemetry = crate::telemetry::init(&cfg);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let scheme = if cfg.insecure_http { "http" } else { "https" };
        let app = Application::build(cfg, crate::clock::system()).context("cannot start the server")?;
        crate::telemetry::metrics::observe_pool(&app.state().db);
        if app.state().config.demo {
            let outcome = crate::demo::seed_demo(app.state(), crate::demo::DEMO_PATIENTS).await.context("cannot seed the demo data")?;
            match &outcome {
                crate::demo::DemoOutcome::Seeded { patients, .. } => {
                    println!("Demo data seeded: {} accounts, {patients} synthetic patients.", crate::demo::ACCOUNTS.len())
                }
                crate::demo::DemoOutcome::AlreadySeeded { credentials } if !credentials.is_file() => {
                    println!("Demo accounts exist, but their credentials file is gone; remove the data directory to seed afresh.")
                }
                crate::demo::DemoOutcome::AlreadySeeded { .. } => println!("Demo data already seeded."),
            }
            println!("{}", crate::demo::login_hint(&app.state().config, outcome.credentials()));
        }
        let addr = format!("{scheme}://{}:{}", app.state().config.listen.ip(), app.port());
        tracing::info!(listen = %addr, "carevault is serving");
        println!("carevault is serving on {addr}");
        let handle = app.handle();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                handle.stop(true).await;
            }
        });
        app.run_until_stopped().await.context("the server stopped with an error")
    })
}
