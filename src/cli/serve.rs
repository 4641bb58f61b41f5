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
    let telemetry = crate::telemetry::init(&cfg);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async {
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
            if app.state().config.profile == crate::config::Profile::Demo {
                print_demo_logins(outcome.credentials());
            }
        }
        let metrics = match (app.state().config.metrics.listen, telemetry.prometheus()) {
            (Some(addr), Some(registry)) => {
                let (server, bound) = crate::telemetry::metrics_server(addr, registry)
                    .context(format!("cannot listen on {addr} (`metrics.listen`)"))?;
                tracing::info!(metrics.listen = %bound, "Prometheus metrics at /metrics");
                println!("metrics on http://{bound}/metrics");
                let handle = server.handle();
                tokio::spawn(server);
                Some(handle)
            }
            _ => None,
        };
        let addr = format!("{scheme}://{}:{}", app.state().config.listen.ip(), app.port());
        tracing::info!(listen = %addr, "carevault is serving");
        println!("carevault is serving on {addr}");
        let handle = app.handle();
        let state = app.state().clone();
        tokio::spawn(async move {
            let Some(first) = shutdown_signal().await else { return };
            tracing::info!(process.signal = first, "shutdown requested: no new connections, draining requests in flight");
            let graceful = handle.clone();
            tokio::spawn(async move { graceful.stop(true).await });
            // A second signal while draining: stop at once (the audit trail stays consistent: each event
            // is committed before its response, never after).
            if let Some(second) = shutdown_signal().await {
                tracing::warn!(process.signal = second, "second signal: stopping without waiting for requests");
                handle.stop(false).await;
            }
        });
        app.run_until_stopped().await.context("the server stopped with an error")?;
        if let Some(m) = metrics {
            m.stop(true).await;
        }
        // Every response waited for its audit record; flush anyway, so nothing queued is left behind.
        state.audit.flush().await.context("cannot flush the audit trail on shutdown")?;
        tracing::info!("carevault stopped");
        println!("carevault stopped");
        Ok::<(), CliError>(())
    })?;
    // Flushes and shuts down the trace and metric exporters.
    drop(telemetry);
    Ok(())
}

/// The demo profile prints its accounts (synthetic data, a throwaway deployment: `docker compose logs api`).
fn print_demo_logins(credentials: &std::path::Path) {
    let Ok(text) = std::fs::read_to_string(credentials) else { return };
    println!("Demo logins (demo profile: synthetic data only; username, role, password, link):");
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        println!("  {line}");
    }
}

/// Waits for SIGTERM (`docker stop`, Kubernetes, systemd) or SIGINT (Ctrl-C); returns its name. Handlers are
/// installed explicitly, so this also works as PID 1 in a container, where the default action is ignored.
async fn shutdown_signal() -> Option<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::warn!("cannot install the signal handlers; stop the server with SIGKILL");
            return None;
        };
        tokio::select! {
            _ = term.recv() => Some("SIGTERM"),
            _ = int.recv() => Some("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.ok().map(|()| "ctrl-c")
    }
}
