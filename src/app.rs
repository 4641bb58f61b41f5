//! Builds the actix application and server from a [`Config`]: the one place where middleware order is set.
//! Tests build it with port 0 and ask for the port.

use crate::access::{AccessControl, R4Catalog};
use crate::api;
use crate::audit::store::Auditor;
use crate::auth::oidc::{OidcService, OidcSettings};
use crate::auth::service::{AuthService, load_signing_keys};
use crate::auth::session::SessionPolicy;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::crypto::{FieldCipher, KeyProvider};
use crate::error::AppResult;
use crate::fhir::FhirValidator;
use crate::records::Records;
use crate::store::{Db, StoreError};
use crate::tls::{self, TlsError};
use actix_web::dev::Server;
use actix_web::middleware::{Condition, ErrorHandlers, from_fn};
use actix_web::{App, HttpServer, web};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::OnceLock;

/// What every handler can reach. Cheap to clone (everything inside is shared).
#[derive(Debug, Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Db,
    pub clock: SharedClock,
    pub keys: Arc<dyn KeyProvider>,
    pub cipher: FieldCipher,
    pub auth: Arc<AuthService>,
    pub audit: Auditor,
    pub access: Arc<AccessControl>,
    pub records: Arc<Records>,
    /// The alert rule engine's handle (started by [`Application::build`]).
    pub monitor: crate::monitor::Monitor,
    /// The general per-address rate limit of every route.
    pub limits: Arc<crate::api::limit::RateLimit>,
}

/// The FHIR validator compiles the official schema once per process (about 0.3 s).
fn validator() -> Result<Arc<FhirValidator>, StartError> {
    static VALIDATOR: OnceLock<Arc<FhirValidator>> = OnceLock::new();
    if let Some(v) = VALIDATOR.get() {
        return Ok(v.clone());
    }
    let v = Arc::new(FhirValidator::new().map_err(|e| StartError::failed("cannot compile the FHIR schema", e))?);
    Ok(VALIDATOR.get_or_init(|| v).clone())
}

impl AppState {
    /// Connects, migrates and loads keys: everything a server or a CLI command needs.
    pub fn open(config: Config, clock: SharedClock) -> Result<AppState, StartError> {
        let db = Db::connect(&config.database()?, 16)?;
        db.migrate()?;
        let keys = crate::crypto::store::master_provider(&config)?;
        let now = clock.now();
        let mut conn = db.conn().map_err(|e| StartError::failed("cannot get a database connection", e))?;
        let cipher = crate::crypto::store::cipher(&mut conn, keys.as_ref(), now)?;
        crate::crypto::store::install_reloader(&cipher, db.clone(), keys.clone());
        let issuer = config.auth.issuer.clone().unwrap_or_else(|| config.base_url());
        let token_keys = load_signing_keys(&mut conn, keys.as_ref(), now, &issuer, &issuer)
            .map_err(|e| StartError::failed("cannot load the token signing keys", e))?;
        drop(conn);
        let sessions = SessionPolicy::from_secs(
            u32::try_from(config.auth.session_idle_secs).unwrap_or(u32::MAX),
            u32::try_from(config.auth.session_max_secs).unwrap_or(u32::MAX),
        )
        .map_err(|_| StartError::Other("invalid session timeouts".into()))?;
        let ttl = time::Duration::seconds(i64::try_from(config.auth.access_token_ttl_secs).unwrap_or(300));
        let oidc = match OidcSettings::from_config(&config)? {
            Some(settings) if settings.issuer == issuer => {
                return Err(StartError::Other("`auth.oidc.issuer` must differ from this server's issuer".into()));
            }
            Some(settings) => Some(Arc::new(
                OidcService::new(settings, db.clone(), clock.clone(), cipher.clone())
                    .map_err(|e| StartError::failed("invalid `auth.oidc` settings", e))?,
            )),
            None => None,
        };
        let auth = Arc::new(
            AuthService::new(db.clone(), clock.clone(), keys.clone(), token_keys, sessions, ttl, issuer)
                .with_oidc(oidc)
                .requiring_admin_totp(config.profile == crate::config::Profile::Production)
                .with_throttle_keyer(crate::auth::attempts::ThrottleKeyer::new(
                    cipher
                        .ring()
                        .derived_key(crate::auth::attempts::THROTTLE_KEY_LABEL)
                        .map_err(|e| StartError::failed("cannot derive the throttle key", e))?,
                )),
        );
        let sealer = {
            let mut conn = db.conn().map_err(|e| StartError::failed("cannot get a database connection", e))?;
            crate::audit::seal::load_or_create(&mut conn, keys.as_ref(), now)
                .map_err(|e| StartError::failed("cannot load the audit seal key", e))?
        };
        let audit = Auditor::start(db.clone(), Arc::new(sealer));
        config.check_policy_dir()?;
        let access = Arc::new(
            AccessControl::from_source(&config.policy_source(), Arc::new(R4Catalog))
                .map_err(|e| StartError::failed("cannot load the access policy (`access.policy_dir`)", e))?,
        );
        let base = format!("{}/fhir", config.base_url());
        #[cfg(feature = "benchmark")]
        let bench = config.benchmark.switches();
        // The benchmark's alternate implementations, chosen here and compiled only with the `benchmark` feature.
        #[cfg(feature = "benchmark")]
        let audit = if bench.audit_off { audit.benchmark_off() } else { audit };
        let records =
            Records::new(db.clone(), cipher.clone(), access.clone(), validator()?, audit.clone(), clock.clone(), base)
                .with_config(Arc::new(config.clone()));
        #[cfg(feature = "benchmark")]
        let records = records.with_benchmark_switches(bench);
        let records = Arc::new(records);
        let monitor = crate::monitor::Monitor::new();
        let limits =
            Arc::new(crate::api::limit::RateLimit::new(config.limits.requests_per_second, config.limits.burst));
        Ok(AppState {
            config: Arc::new(config),
            db,
            clock,
            keys,
            cipher,
            auth,
            audit,
            access,
            records,
            monitor,
            limits,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The master key (its text says which setting and file).
    #[error(transparent)]
    MasterKey(#[from] crate::crypto::CryptoError),
    /// The stored keys (wrong master key, tampered key, database).
    #[error(transparent)]
    Keys(#[from] crate::crypto::store::KeyStoreError),
    #[error("cannot listen on {address} (`listen`)")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// `context` (what could not be started) failed because of `source`.
    #[error("{context}")]
    Failed {
        context: &'static str,
        #[source]
        source: crate::error::BoxError,
    },
    #[error("{0}")]
    Other(String),
}

impl StartError {
    pub fn failed(context: &'static str, source: impl Into<crate::error::BoxError>) -> Self {
        StartError::Failed { context, source: source.into() }
    }

    fn bind(address: SocketAddr) -> impl FnOnce(std::io::Error) -> Self {
        move |source| StartError::Bind { address, source }
    }
}

/// A built, bound, not yet running server.
pub struct Application {
    port: u16,
    server: Server,
    state: AppState,
}

impl Application {
    /// Connects the database, runs migrations, prepares TLS and binds the listener.
    pub fn build(mut config: Config, clock: SharedClock) -> Result<Application, StartError> {
        // Bind first, so a port of 0 (tests) is known before links and issuers are derived from it.
        let listener = TcpListener::bind(config.listen).map_err(StartError::bind(config.listen))?;
        config.listen = listener.local_addr().map_err(StartError::bind(config.listen))?;
        if !config.insecure_http {
            // Refuse a bad certificate or key before anything else starts.
            let (cert, key) = tls::cert_paths(&config)?;
            tls::server_config(&cert, &key, config.profile)?;
        }
        Self::serve(AppState::open(config, clock)?, listener)
    }

    fn serve(state: AppState, listener: TcpListener) -> Result<Application, StartError> {
        let cfg = state.config.clone();
        if tokio::runtime::Handle::try_current().is_ok() {
            let limits = state.limits.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    limits.sweep();
                }
            });
            // A policy directory is watched for changes; the built-in policy changes only with the binary.
            if let crate::config::PolicySource::Dir(dir) = cfg.policy_source() {
                crate::access::spawn_policy_watcher(state.access.clone(), dir, crate::access::POLICY_POLL_INTERVAL);
            }
        }
        let port = cfg.listen.port();
        let bench = cfg.benchmark.switches();
        announce_benchmark_mode(bench);
        let data = web::Data::new(state.clone());
        // Every body extractor (`web::Bytes`) takes its limit from here; actix's default (256 KiB) would otherwise
        // win over `limits.max_body_bytes`.
        let max_body = cfg.limits.max_body_bytes;
        let origins = cfg.cors.allowed_origins.clone();
        let factory = move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(max_body))
                .wrap(ErrorHandlers::new().default_handler(api::outcome_for_plain_errors))
                .wrap(from_fn(api::body_limit))
                .wrap(from_fn(api::limit::rate_limit))
                .wrap(api::security_headers())
                .wrap(api::cors::layer(&origins))
                .wrap(Condition::new(!bench.telemetry_off, from_fn(crate::telemetry::request_log)))
                .configure(api::routes)
                .default_service(web::to(api::not_found))
        };
        // Signals are handled by `carevault serve` (SIGTERM and SIGINT both drain; actix's own SIGINT is a
        // forced stop), which calls `ServerHandle::stop(true)`: no new connections, requests in flight finish.
        let server = HttpServer::new(factory)
            .workers(worker_count())
            .disable_signals()
            .shutdown_timeout(DRAIN_TIMEOUT.as_secs());
        let server = if cfg.insecure_http {
            server.listen(listener).map_err(StartError::bind(cfg.listen))?
        } else {
            let (cert, key) = tls::cert_paths(&cfg)?;
            let tls_config = tls::server_config(&cert, &key, cfg.profile)?;
            server.listen_rustls_0_23(listener, tls_config).map_err(StartError::bind(cfg.listen))?
        };
        let server = server.run();
        state
            .monitor
            .start(&state.db, &state.config, &state.clock, state.audit.sealer_arc().clone())
            .map_err(|e| StartError::failed("cannot start the alert monitor", e))?;
        spawn_key_watcher(&state);
        spawn_checkpointer(&state);
        Ok(Application { port, server, state })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// A handle that can stop the server (tests, signals).
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

/// How long a graceful stop waits for requests in flight: under the 10 s `docker stop` and Kubernetes give
/// before SIGKILL, with room for the audit flush and telemetry shutdown.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(7);

/// How often a server looks for keys rotated by another process (`carevault keys rotate | reindex | rotate-signing`).
pub const KEY_POLL: std::time::Duration = std::time::Duration::from_secs(5);

/// Benchmark mode is impossible to miss: one warning per safeguard switched off, in the log and on stderr.
fn announce_benchmark_mode(s: crate::config::BenchmarkSwitches) {
    let off = [
        (s.encryption_off, "BENCHMARK MODE: encryption at rest is OFF (PHI stored as plaintext)"),
        (s.audit_off, "BENCHMARK MODE: the audit trail is OFF (no access is recorded)"),
        (s.access_off, "BENCHMARK MODE: access control is OFF (every caller may do everything)"),
        (s.telemetry_off, "BENCHMARK MODE: request telemetry is OFF (no request span, metric or log line)"),
    ];
    for (_, text) in off.iter().filter(|(on, _)| *on) {
        tracing::warn!("{text}");
        eprintln!("carevault: WARNING: {text}; never use this configuration with real data");
    }
}

/// How often a running server signs the audit chain head by default (`audit.checkpoint_interval_secs`).
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Signs the audit head every `audit.checkpoint_interval_secs` (the same operation as `carevault audit
/// checkpoint`) and ships each checkpoint to the configured anchors (`audit.anchor_*`, [`crate::audit::anchor`]).
fn spawn_checkpointer(state: &AppState) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    let state = state.clone();
    let every = std::time::Duration::from_secs(state.config.audit.checkpoint_interval_secs.max(1));
    let shipper = crate::audit::anchor::Shipper::from_config(&state.config);
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let (keys, now) = (state.keys.clone(), state.clock.now());
            let signed = state
                .db
                .run(move |c| {
                    let event = crate::cli::admin_event(now, "audit-checkpoint");
                    crate::audit::checkpoints::checkpoint(c, keys.as_ref(), event, now)
                })
                .await;
            match signed {
                Ok((cp, public_key)) => {
                    tracing::info!(audit.checkpoint_seq = cp.seq, "audit checkpoint signed");
                    if !shipper.is_empty() {
                        let sealed_from = Some(state.audit.sealer().first_seq());
                        let line = crate::audit::anchor::line(&cp, &public_key, sealed_from);
                        if shipper.ship(&line).await {
                            tracing::info!(audit.checkpoint_seq = cp.seq, "audit checkpoint shipped");
                        }
                    }
                }
                Err(_) => tracing::warn!("audit checkpoint could not be signed"),
            }
        }
    });
}

/// Every [`KEY_POLL`], compares the stored data, index and signing keys with the ones in memory and reloads on a
/// change, so rotations made by the CLI (or another replica) take effect without a restart. A failed reload
/// (e.g. after `keys rotate-master`, until this process restarts with the new master key) keeps the keys in
/// memory and is logged. Needs a Tokio runtime; without one (no server) nothing is started.
fn spawn_key_watcher(state: &AppState) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    let state = state.clone();
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(KEY_POLL);
        let mut signing: Option<(i64, i64, i64)> = None;
        loop {
            tick.tick().await;
            let Ok((data, stored_signing)) = state.db.run(|c| Ok((data_stamp(c)?, signing_stamp(c)?))).await else {
                continue;
            };
            let ring = state.cipher.ring();
            if data != ring.stamp() {
                let keys = state.keys.clone();
                match state.db.run(move |c| Ok(crate::crypto::store::load(c, keys.as_ref())?)).await {
                    Ok(ring) => {
                        tracing::info!(
                            key.active = ring.active_version(),
                            key.index = ring.index_version(),
                            "data and index keys reloaded"
                        );
                        state.cipher.replace_ring(ring);
                    }
                    Err(_) => {
                        tracing::warn!("stored data keys changed but cannot be loaded; keeping the keys in memory")
                    }
                }
            }
            if signing.is_some_and(|s| s != stored_signing) {
                if state.auth.reload_keys().await.is_err() {
                    tracing::warn!("stored signing keys changed but cannot be loaded; keeping the keys in memory");
                    continue;
                }
                tracing::info!("token signing keys reloaded");
            }
            signing = Some(stored_signing);
        }
    });
}

fn data_stamp(c: &mut crate::store::AnyConnection) -> AppResult<(u32, usize, Vec<u32>)> {
    Ok(crate::crypto::store::key_stamp(c)?)
}

/// (keys, retired keys, newest creation time) of the token signing keys.
fn signing_stamp(c: &mut crate::store::AnyConnection) -> AppResult<(i64, i64, i64)> {
    use crate::store::schema::signing_keys;
    use diesel::prelude::*;
    let rows: Vec<(i64, Option<i64>)> = signing_keys::table
        .select((signing_keys::created_at, signing_keys::retired_at))
        .load(c)
        .map_err(crate::store::db_err)?;
    let retired = rows.iter().filter(|(_, r)| r.is_some()).count();
    let newest = rows.iter().map(|(c, _)| *c).max().unwrap_or(0);
    Ok((i64::try_from(rows.len()).unwrap_or(i64::MAX), i64::try_from(retired).unwrap_or(i64::MAX), newest))
}

fn worker_count() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}
