//! `carevault healthcheck [--url URL] [--ca-file PEM] [--live]`: asks a running server whether it is ready
//! (`/health/ready`: the database answers and every migration has run) and exits 0 when it is, 1 otherwise. For
//! container healthchecks (`HEALTHCHECK`, compose, Kubernetes `exec` probes): the image has no curl.
//!
//! By default it reads the same configuration as the server and asks `https://127.0.0.1:PORT` (the port of
//! `listen`), trusting the certificates in `--ca-file`, else the server's own `tls.cert_file` (a chain file
//! that ends with its CA works), else the generated development certificate. Verification is never switched off.

use super::{Cli, CliError, Context};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Default, clap::Args)]
pub struct HealthcheckArgs {
    /// The URL to ask (default `https://127.0.0.1:PORT/health/ready`, PORT from `listen`).
    #[arg(long)]
    pub url: Option<String>,
    /// PEM file of the certificates to trust (default: `tls.cert_file`, else the generated certificate).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Ask `/health/live` (the process answers) instead of `/health/ready`.
    #[arg(long)]
    pub live: bool,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5)]
    pub timeout_secs: u64,
}

pub fn run(cli: &Cli, args: &HealthcheckArgs) -> Result<(), CliError> {
    let cfg = cli.load_config(|_| {})?;
    let path = if args.live { "/health/live" } else { "/health/ready" };
    let scheme = if cfg.insecure_http { "http" } else { "https" };
    let url = args.url.clone().unwrap_or_else(|| format!("{scheme}://127.0.0.1:{}{path}", cfg.listen.port()));
    let ca =
        args.ca_file.clone().or_else(|| cfg.tls.cert_file.clone()).unwrap_or_else(|| cfg.tls_dir().join("cert.pem"));
    let pem = std::fs::read(&ca).context(format!("cannot read the certificates to trust ({})", ca.display()))?;
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(args.timeout_secs.max(1)));
    let certs = reqwest::Certificate::from_pem_bundle(&pem).context("the certificate file is not PEM")?;
    if certs.is_empty() {
        return Err(CliError::Message(format!("no certificate in {}", ca.display())));
    }
    for cert in certs {
        builder = builder.add_root_certificate(cert);
    }
    let client = builder.build().context("cannot build the HTTPS client")?;
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    let status = runtime
        .block_on(async { client.get(&url).send().await.map(|r| r.status()) })
        .context(format!("no answer from {url}"))?;
    if status.is_success() {
        println!("ok: {url} answered {}", status.as_u16());
        Ok(())
    } else {
        Err(CliError::Message(format!("not ready: {url} answered {}", status.as_u16())))
    }
}
