//! Typed settings (CONTRACT §1, §10): a TOML file (`--config`) overridden by `CAREVAULT_*` environment variables
//! (`__` between levels). Unknown keys are an error. Every secret can come from a file (`…_file`) and lives in a
//! `secrecy` type whose `Debug` prints nothing. The production profile refuses every development convenience and
//! names the setting that is missing.

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Environment variables with the `CAREVAULT_` prefix that are not configuration keys.
const NON_CONFIG_ENV: &[&str] =
    &["TEST_POSTGRES_URL", "TEST_CLIENTS_VENV", "FUZZ_SEED", "FUZZ_CASES", "BLESS", "DATA_DIR", "CONFIG", "LOG"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Invalid(String),
    #[error("production profile: `{setting}` must be set ({why})")]
    Production { setting: &'static str, why: &'static str },
    #[error("production profile refuses `{setting}` ({why})")]
    Refused { setting: &'static str, why: &'static str },
    #[error("configuration: cannot read the file named by `{setting}`")]
    Unreadable { setting: &'static str },
    /// The configuration file is not valid TOML: where, and the parser's reason (never the text around it).
    #[error("configuration: {file} line {line}, column {column}: {reason}")]
    Syntax { file: String, line: usize, column: usize, reason: String },
    /// The production profile refuses a policy directory the service could rewrite.
    #[error(
        "production profile refuses `access.policy_dir`: {dir} (or a file in it) is writable by the user running carevault or by others; make it read-only for the service (e.g. owned by root, mode 0755/0644) or unset the setting to use the built-in policy"
    )]
    WritablePolicyDir { dir: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    Development,
    /// Development conveniences plus demo seeding on every start (`docker compose up`, CONTRACT §5c); the
    /// production profile refuses demo seeding.
    Demo,
    Production,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Development => "development",
            Profile::Demo => "demo",
            Profile::Production => "production",
        }
    }
}

/// Where the access policy comes from (`access.policy_dir`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// The policy built into the binary (the default).
    Builtin,
    /// A directory holding `model.conf`, `policy.csv` and `fields.toml`, watched for changes.
    Dir(PathBuf),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub profile: Profile,
    /// `sqlite://PATH` or `postgres://…`; default `sqlite://DATA_DIR/carevault.db`.
    #[serde(default)]
    database_url: Option<SecretString>,
    #[serde(default)]
    database_url_file: Option<PathBuf>,
    /// Demo seeding: the demo accounts' passwords, one `username password` per line, as `carevault deploy init`
    /// writes them (so `docker compose logs init` can print the logins); unset: generated at seeding.
    #[serde(default)]
    pub demo_passwords_file: Option<PathBuf>,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Public base URL used in links (`Location`, Bundle links); default `https://{listen}`.
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub keys: KeysConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub access: AccessConfig,
    #[serde(default)]
    pub monitor: MonitorConfig,
    #[serde(default)]
    pub alerts: AlertsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub fhir: FhirConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    /// Prometheus `/metrics` (off unless `metrics.listen` is set).
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub network: NetworkConfig,
    #[serde(default)]
    pub cors: CorsConfig,
    /// Safeguards switched off to measure their cost (`docs/benchmarks.md`); refused in production.
    #[serde(default)]
    pub benchmark: BenchmarkConfig,
    /// Set from the command line only.
    #[serde(skip)]
    pub data_dir: PathBuf,
    /// Set from the command line only (`--insecure-http-behind-proxy`).
    #[serde(skip)]
    pub insecure_http: bool,
    /// Set from the command line only (`--demo`).
    #[serde(skip)]
    pub demo: bool,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    pub master_key_file: Option<PathBuf>,
    /// The master key itself (base64); prefer `master_key_file`.
    pub master_key: Option<SecretString>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub access_token_ttl_secs: u64,
    pub session_idle_secs: u64,
    pub session_max_secs: u64,
    /// `iss` of own tokens; default the base URL.
    pub issuer: Option<String>,
    pub oidc: Option<OidcConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { access_token_ttl_secs: 300, session_idle_secs: 900, session_max_secs: 43_200, issuer: None, oidc: None }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub client_secret_file: Option<PathBuf>,
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    #[serde(default = "default_link_claim")]
    pub link_claim: String,
    /// Expected `aud` of the provider's access tokens (resource-server mode); default `client_id`.
    pub audience: Option<String>,
    /// Where the provider sends the browser back; default `{base_url}/auth/oidc/callback`.
    pub redirect_url: Option<String>,
}

impl OidcConfig {
    /// The expected `aud` of the provider's access tokens.
    pub fn audience(&self) -> &str {
        self.audience.as_deref().unwrap_or(&self.client_id)
    }

    /// The issuer must be `https://`; plain `http://` only on loopback and only in the development profile
    /// (the test provider). The claim names and the client id must not be empty.
    fn check(&self, profile: Profile) -> Result<(), ConfigError> {
        let bad = |what: &str| Err(ConfigError::Invalid(format!("`auth.oidc.{what}")));
        if !url_allowed(&self.issuer, profile) {
            return bad("issuer` must be an https:// URL (http:// only for 127.0.0.1 or localhost in development)");
        }
        if let Some(r) = &self.redirect_url
            && !url_allowed(r, profile)
        {
            return bad("redirect_url` must be an https:// URL");
        }
        if self.client_id.is_empty() || self.roles_claim.is_empty() || self.link_claim.is_empty() {
            return bad("client_id`, `roles_claim` and `link_claim` must not be empty");
        }
        if self.audience.as_deref() == Some("") {
            return bad("audience` must not be empty");
        }
        Ok(())
    }
}

/// An absolute URL without credentials, query or fragment: `https://`, or `http://` to a loopback host in
/// development.
fn url_allowed(text: &str, profile: Profile) -> bool {
    let Ok(url) = openidconnect::url::Url::parse(text) else { return false };
    let plain =
        url.username().is_empty() && url.password().is_none() && url.query().is_none() && url.fragment().is_none();
    let loopback = matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    plain
        && url.host_str().is_some_and(|h| !h.is_empty())
        && match url.scheme() {
            "https" => true,
            "http" => loopback && profile == Profile::Development,
            _ => false,
        }
}

fn default_roles_claim() -> String {
    "carevault_roles".into()
}
fn default_link_claim() -> String {
    "fhirUser".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    pub break_glass_minutes: u64,
    /// At most this many break-glass grants per user in any 24 hours (further requests: 429, audited, alerted).
    pub break_glass_per_day: u64,
    /// Folder with the casbin model, policy and field rules; default: the policy built into the binary.
    pub policy_dir: Option<PathBuf>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self { break_glass_minutes: 60, break_glass_per_day: 10, policy_dir: None }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    pub failed_logins_threshold: u32,
    pub bulk_access_patients: u32,
    pub bulk_access_window_secs: u64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self { failed_logins_threshold: 10, bulk_access_patients: 50, bulk_access_window_secs: 600 }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<SecretString>,
    pub webhook_secret_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_body_bytes: usize,
    pub requests_per_second: u64,
    pub burst: u32,
    /// Expensive operations (searches, history, `$everything`, `$access-report`) one account may have in
    /// flight at once in this process; more answer 429 with `Retry-After`.
    pub max_concurrent_per_account: usize,
    /// The body limit of `POST /fhir` (batch and transaction Bundles) only; every other body keeps
    /// `max_body_bytes`.
    pub max_bundle_bytes: usize,
    /// At most this many entries in one Bundle.
    pub max_bundle_entries: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1_048_576,
            requests_per_second: 1000,
            burst: 2000,
            max_concurrent_per_account: 8,
            max_bundle_bytes: 16 * 1_048_576,
            max_bundle_entries: 20_000,
        }
    }
}

/// `[fhir]`: FHIR interaction rules a deployment may relax for clients that cannot follow them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FhirConfig {
    /// Updates and patches need `If-Match` (428 without it, 412 when stale). `false` lets clients that
    /// cannot send it update whatever version is current.
    pub require_if_match: bool,
}

impl Default for FhirConfig {
    fn default() -> Self {
        Self { require_if_match: true }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub retention_days: u32,
    /// How often a running server signs a checkpoint of the chain head and ships it to the anchors; `audit
    /// verify` fails when the newest checkpoint is older than twice this before the newest record.
    pub checkpoint_interval_secs: u64,
    /// Append-only anchor sink: a directory (on another volume) where every checkpoint is appended to
    /// `carevault-checkpoints.ndjson` and fsynced; `audit verify` checks the trail against it.
    pub anchor_dir: Option<PathBuf>,
    /// Anchor sink: every checkpoint is POSTed as JSON to this URL (https; http only in development), retried.
    pub anchor_webhook_url: Option<String>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { retention_days: 6 * 365, checkpoint_interval_secs: 600, anchor_dir: None, anchor_webhook_url: None }
    }
}

/// `[metrics]`: the Prometheus scrape endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the plain-HTTP `/metrics` listener (no PHI is ever in a metric; bind it to an internal
    /// interface). Unset: no listener.
    pub listen: Option<SocketAddr>,
}

/// `[cors]`: browser apps on other origins (CONTRACT §5b).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins (`scheme://host[:port]`, exact) whose pages may call the API. Empty (the default): none, and no
    /// response carries CORS headers. Production: https origins only.
    #[serde(default, deserialize_with = "deserialize_origins")]
    pub allowed_origins: Vec<String>,
}

fn deserialize_origins<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let items = Vec::<String>::deserialize(d)?;
    for (i, s) in items.iter().enumerate() {
        if !is_origin(s) {
            return Err(serde::de::Error::custom(format!(
                "cors.allowed_origins[{i}]: not an origin (scheme://host[:port], http or https, nothing after)"
            )));
        }
    }
    Ok(items)
}

/// `scheme://host[:port]` and nothing more (the form browsers send in `Origin`).
fn is_origin(s: &str) -> bool {
    match url::Url::parse(s) {
        Ok(u) => {
            matches!(u.scheme(), "http" | "https")
                && u.host_str().is_some()
                && u.username().is_empty()
                && u.password().is_none()
                && u.query().is_none()
                && u.fragment().is_none()
                && u.path() == "/"
                && !s.ends_with('/')
        }
        Err(_) => false,
    }
}

/// `[network]`: where a request's client address comes from (audit records, throttling, rate limits).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Reverse proxies (addresses or CIDR ranges) whose `X-Forwarded-For` is believed. Empty (the default): the
    /// peer address is the client and the header is ignored.
    #[serde(default, deserialize_with = "deserialize_nets")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

fn deserialize_nets<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    let items = Vec::<String>::deserialize(d)?;
    items
        .iter()
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| serde::de::Error::custom("network.trusted_proxies: not an address or CIDR range"))
        })
        .collect()
}

/// A safeguard that the load benchmark can switch off to measure what it costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Safeguard {
    /// PHI elements stored as plaintext JSON (blind indexes are still computed).
    Encryption,
    /// No audit events: reads skip the group commit, writes skip the chain lock and the append.
    Audit,
    /// A permit-all decision (scope all, every element) in the records service.
    Access,
    /// No request span, request metric or request log line.
    Telemetry,
}

/// `[benchmark]`: for measurements only. Any entry in `disable` is refused in the production profile and
/// announced loudly at start.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchmarkConfig {
    #[serde(default)]
    pub disable: Vec<Safeguard>,
}

/// What [`BenchmarkConfig`] switches off, as flags (all `false` by default and always in production).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BenchmarkSwitches {
    pub encryption_off: bool,
    pub audit_off: bool,
    pub access_off: bool,
    pub telemetry_off: bool,
}

impl BenchmarkConfig {
    /// The switches asked for; always all off in a build without the `benchmark` feature.
    pub fn switches(&self) -> BenchmarkSwitches {
        let off = |s| cfg!(feature = "benchmark") && self.disable.contains(&s);
        BenchmarkSwitches {
            encryption_off: off(Safeguard::Encryption),
            audit_off: off(Safeguard::Audit),
            access_off: off(Safeguard::Access),
            telemetry_off: off(Safeguard::Telemetry),
        }
    }
}

/// Where the database lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseTarget {
    Sqlite(PathBuf),
    Postgres(SecretStringEq),
}

/// A secret URL that can be compared (tests) but never printed.
#[derive(Clone)]
pub struct SecretStringEq(pub SecretString);
impl PartialEq for SecretStringEq {
    fn eq(&self, other: &Self) -> bool {
        self.0.expose_secret() == other.0.expose_secret()
    }
}
impl Eq for SecretStringEq {}
impl std::fmt::Debug for SecretStringEq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// What the command line contributes.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub listen: Option<SocketAddr>,
    pub insecure_http: bool,
    pub demo: bool,
}

impl Config {
    /// Loads the file (if any), then the environment, then the command line.
    pub fn load(over: &Overrides) -> Result<Config, ConfigError> {
        let mut fig = Figment::new();
        if let Some(path) = &over.config_file {
            if !path.is_file() {
                return Err(ConfigError::Unreadable { setting: "--config" });
            }
            let text = std::fs::read_to_string(path).map_err(|_| ConfigError::Unreadable { setting: "--config" })?;
            check_syntax(&text, &path.display().to_string())?;
            fig = fig.merge(Toml::file(path));
        }
        fig = fig.merge(Env::prefixed("CAREVAULT_").ignore(NON_CONFIG_ENV).split("__"));
        Self::from_figment(fig, over)
    }

    /// Builds a configuration from TOML text and the command line alone (no environment): for tests.
    pub fn from_toml(text: &str, over: &Overrides) -> Result<Config, ConfigError> {
        check_syntax(text, "(inline)")?;
        Self::from_figment(Figment::new().merge(Toml::string(text)), over)
    }

    fn from_figment(fig: Figment, over: &Overrides) -> Result<Config, ConfigError> {
        let fig = match over.listen {
            Some(addr) => fig.merge(Serialized::default("listen", addr.to_string())),
            None => fig,
        };
        let mut cfg: Config =
            fig.extract().map_err(|e| ConfigError::Invalid(describe(&e, over.config_file.as_deref())))?;
        cfg.data_dir = over.data_dir.clone();
        cfg.insecure_http = over.insecure_http;
        cfg.demo = over.demo || cfg.profile == Profile::Demo;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.auth.access_token_ttl_secs == 0 || self.auth.access_token_ttl_secs > 900 {
            return Err(ConfigError::Invalid("`auth.access_token_ttl_secs` must be between 1 and 900".into()));
        }
        if self.auth.session_idle_secs == 0 || self.auth.session_idle_secs > self.auth.session_max_secs {
            return Err(ConfigError::Invalid(
                "`auth.session_idle_secs` must be positive and at most `auth.session_max_secs`".into(),
            ));
        }
        if self.limits.max_body_bytes < 1024 {
            return Err(ConfigError::Invalid("`limits.max_body_bytes` must be at least 1024".into()));
        }
        if self.limits.max_bundle_bytes < self.limits.max_body_bytes {
            return Err(ConfigError::Invalid(
                "`limits.max_bundle_bytes` must be at least `limits.max_body_bytes`".into(),
            ));
        }
        if self.limits.max_bundle_entries == 0 {
            return Err(ConfigError::Invalid("`limits.max_bundle_entries` must be positive".into()));
        }
        if self.limits.max_concurrent_per_account == 0 {
            return Err(ConfigError::Invalid("`limits.max_concurrent_per_account` must be positive".into()));
        }
        if self.limits.requests_per_second == 0 {
            return Err(ConfigError::Invalid("`limits.requests_per_second` must be positive".into()));
        }
        if !self.benchmark.disable.is_empty() && !cfg!(feature = "benchmark") {
            return Err(ConfigError::Refused {
                setting: "benchmark.disable",
                why: "this build has no benchmark switches (only builds with the `benchmark` feature do)",
            });
        }
        self.database()?;
        if let Some(oidc) = &self.auth.oidc {
            oidc.check(self.profile)?;
        }
        if self.profile == Profile::Production {
            self.check_production()?;
        }
        Ok(())
    }

    /// The production profile refuses every development convenience, naming the missing setting.
    fn check_production(&self) -> Result<(), ConfigError> {
        let prod = |setting, why| Err(ConfigError::Production { setting, why });
        if self.cors.allowed_origins.iter().any(|o| !o.starts_with("https://")) {
            return prod("cors.allowed_origins", "browser apps on plain-http origins are for development only");
        }
        if !self.benchmark.disable.is_empty() {
            return Err(ConfigError::Refused {
                setting: "benchmark.disable",
                why: "safeguards cannot be switched off in production; remove the setting",
            });
        }
        if self.insecure_http {
            return prod("--insecure-http-behind-proxy", "plain HTTP is refused in production; remove the flag");
        }
        if self.demo {
            return prod("--demo", "demo seeding is refused in production; remove the flag");
        }
        if matches!(self.database()?, DatabaseTarget::Sqlite(_)) {
            return prod("database_url", "a postgres:// URL; SQLite is for development");
        }
        if self.tls.cert_file.is_none() {
            return prod("tls.cert_file", "a certificate file; self-signed generation is for development");
        }
        if self.tls.key_file.is_none() {
            return prod("tls.key_file", "the certificate's private key file");
        }
        if self.keys.master_key_file.is_none() && self.keys.master_key.is_none() {
            return prod("keys.master_key_file", "the master key; generated keys are for development");
        }
        // Paths are compared after resolving `..` and symbolic links, so the development key or certificate
        // cannot be named through another spelling of the same file.
        let dev_keys = crate::fsutil::resolved(&self.data_dir.join("keys"));
        let dev_tls = crate::fsutil::resolved(&self.data_dir.join("tls"));
        if let Some(file) = &self.keys.master_key_file {
            if crate::fsutil::resolved(file).starts_with(&dev_keys) {
                return prod("keys.master_key_file", "a key kept outside the data directory, not the generated one");
            }
            if crate::fsutil::readable_by_others(file) {
                return prod("keys.master_key_file", "a key file only its owner may read (chmod 0600)");
            }
        }
        for (setting, file) in [("tls.cert_file", &self.tls.cert_file), ("tls.key_file", &self.tls.key_file)] {
            if let Some(file) = file
                && crate::fsutil::resolved(file).starts_with(&dev_tls)
            {
                return prod(setting, "a certificate of the deployment, not the generated development one");
            }
        }
        if self.audit.anchor_dir.is_none() && self.audit.anchor_webhook_url.is_none() {
            return prod(
                "audit.anchor_dir",
                "an append-only anchor sink for the signed audit checkpoints (or `audit.anchor_webhook_url`)",
            );
        }
        Ok(())
    }

    /// In production, a policy directory must not be writable by the service user or by others: a compromised
    /// process must not be able to widen its own access. Checked when the server or `policy explain` loads it.
    pub fn check_policy_dir(&self) -> Result<(), ConfigError> {
        let PolicySource::Dir(dir) = self.policy_source() else { return Ok(()) };
        if self.profile != Profile::Production {
            return Ok(());
        }
        let paths = [dir.clone(), dir.join("model.conf"), dir.join("policy.csv"), dir.join("fields.toml")];
        if paths.iter().any(|p| crate::fsutil::writable_by_us_or_others(p)) {
            return Err(ConfigError::WritablePolicyDir { dir: dir.display().to_string() });
        }
        Ok(())
    }

    /// Parses `database_url` (or `database_url_file`); any scheme but `sqlite://` and `postgres://` is an error.
    pub fn database(&self) -> Result<DatabaseTarget, ConfigError> {
        let url = match (&self.database_url, &self.database_url_file) {
            (Some(u), _) => u.expose_secret().trim().to_owned(),
            (None, Some(f)) => read_secret_file(f, "database_url_file")?.expose_secret().trim().to_owned(),
            (None, None) => return Ok(DatabaseTarget::Sqlite(self.data_dir.join("carevault.db"))),
        };
        parse_database_url(&url)
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.data_dir.join("tls")
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.data_dir.join("keys")
    }

    /// Where the access policy comes from: `access.policy_dir`, or the policy built into the binary.
    pub fn policy_source(&self) -> PolicySource {
        match &self.access.policy_dir {
            Some(dir) => PolicySource::Dir(dir.clone()),
            None => PolicySource::Builtin,
        }
    }

    /// `base_url`, else `https://{listen}`; a wildcard listen address (`0.0.0.0`, `::`) is no address a client can
    /// use, so it becomes `localhost` (set `base_url` for anything else).
    pub fn base_url(&self) -> String {
        self.base_url.clone().unwrap_or_else(|| {
            if self.listen.ip().is_unspecified() {
                format!("https://localhost:{}", self.listen.port())
            } else {
                format!("https://{}", self.listen)
            }
        })
    }

    pub fn oidc_client_secret(&self) -> Result<Option<SecretString>, ConfigError> {
        match &self.auth.oidc {
            None => Ok(None),
            Some(o) => secret_from(&o.client_secret, &o.client_secret_file, "auth.oidc.client_secret_file"),
        }
    }

    pub fn webhook_secret(&self) -> Result<Option<SecretString>, ConfigError> {
        secret_from(&self.alerts.webhook_secret, &self.alerts.webhook_secret_file, "alerts.webhook_secret_file")
    }
}

pub fn parse_database_url(url: &str) -> Result<DatabaseTarget, ConfigError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(ConfigError::Invalid("`database_url` names no SQLite file".into()));
        }
        Ok(DatabaseTarget::Sqlite(PathBuf::from(path)))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(DatabaseTarget::Postgres(SecretStringEq(SecretString::from(url.to_owned()))))
    } else {
        Err(ConfigError::Invalid("`database_url` must start with sqlite:// or postgres://".into()))
    }
}

fn secret_from(
    value: &Option<SecretString>,
    file: &Option<PathBuf>,
    setting: &'static str,
) -> Result<Option<SecretString>, ConfigError> {
    match (value, file) {
        (Some(v), _) => Ok(Some(v.clone())),
        (None, Some(f)) => read_secret_file(f, setting).map(Some),
        (None, None) => Ok(None),
    }
}

/// Reads a one-line secret from a file; the error names the setting, never the content.
pub fn read_secret_file(path: &Path, setting: &'static str) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|_| ConfigError::Unreadable { setting })?;
    Ok(SecretString::from(text.trim().to_owned()))
}

/// A TOML syntax error as file, line, column and the parser's reason (first line only: the parser's later lines
/// quote the offending text, which may be a secret).
fn check_syntax(text: &str, file: &str) -> Result<(), ConfigError> {
    let Err(e) = toml::from_str::<toml::Table>(text) else { return Ok(()) };
    let (line, column) = e.span().map_or((1, 1), |span| line_column(text, span.start));
    let reason = e.message().lines().next().unwrap_or("invalid TOML").trim().to_owned();
    Err(ConfigError::Syntax { file: file.to_owned(), line, column, reason })
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Where `key` (dotted) is set in the configuration file `path`: " (FILE line L, column C)", or "" when it cannot
/// be found there (an environment variable, or no file).
fn position_of(path: &Path, key: &str) -> String {
    let Ok(text) = std::fs::read_to_string(path) else { return String::new() };
    let Ok(doc) = text.parse::<toml_edit::ImDocument<String>>() else { return String::new() };
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut found = None;
    let segments: Vec<&str> = key.split('.').filter(|s| !s.is_empty()).collect();
    for (i, seg) in segments.iter().enumerate() {
        let Some((k, item)) = table.get_key_value(seg) else { break };
        found = k.span();
        if i + 1 == segments.len() {
            break;
        }
        match item.as_table_like() {
            Some(t) => table = t,
            None => break,
        }
    }
    match found {
        Some(span) => {
            let (line, column) = line_column(&text, span.start);
            format!(" ({} line {line}, column {column})", path.display())
        }
        None => String::new(),
    }
}

/// figment's messages name the key and expected type; keep that, drop any value it quotes.
fn describe(e: &figment::Error, file: Option<&Path>) -> String {
    let mut out = Vec::new();
    for err in e.clone() {
        let key = err.path.join(".");
        let from_file = err.metadata.as_ref().and_then(|m| m.source.as_ref()).and_then(|s| s.file_path()).is_some();
        let at = |k: &str| match file {
            Some(f) if from_file => position_of(f, k),
            _ => String::new(),
        };
        let what = match &err.kind {
            figment::error::Kind::UnknownField(f, _) => {
                let full = if key.is_empty() || key.ends_with(f.as_str()) { key.clone() } else { format!("{key}.{f}") };
                let full = if full.is_empty() { f.clone() } else { full };
                format!("unknown key `{full}`{}", at(&full))
            }
            figment::error::Kind::MissingField(f) => format!("missing key `{f}`"),
            figment::error::Kind::InvalidType(_, exp) => format!("`{key}` must be {exp}{}", at(&key)),
            figment::error::Kind::InvalidValue(_, exp) => format!("`{key}` must be {exp}{}", at(&key)),
            figment::error::Kind::UnknownVariant(_, exp) => {
                format!("`{key}` must be one of {}{}", exp.join(", "), at(&key))
            }
            _ if key.is_empty() => "the configuration is invalid".to_owned(),
            _ => format!("`{key}` is invalid{}", at(&key)),
        };
        out.push(what);
    }
    out.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn over() -> Overrides {
        Overrides { data_dir: PathBuf::from("/tmp/cv-data"), ..Default::default() }
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = Config::from_toml("", &over()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8443");
        assert_eq!(c.auth.access_token_ttl_secs, 300);
        assert_eq!(c.auth.session_idle_secs, 900);
        assert_eq!(c.auth.session_max_secs, 43_200);
        assert_eq!(c.access.break_glass_minutes, 60);
        assert_eq!(c.limits.max_body_bytes, 1_048_576);
        assert_eq!(c.limits.max_concurrent_per_account, 8);
        assert_eq!((c.monitor.failed_logins_threshold, c.monitor.bulk_access_patients), (10, 50));
        assert_eq!(c.database().unwrap(), DatabaseTarget::Sqlite(PathBuf::from("/tmp/cv-data/carevault.db")));
    }

    #[test]
    fn a_wildcard_listen_address_is_not_the_default_base_url() {
        let c = Config::from_toml("listen = \"0.0.0.0:8443\"\n", &over()).unwrap();
        assert_eq!(c.base_url(), "https://localhost:8443");
        let c = Config::from_toml("listen = \"127.0.0.1:9443\"\n", &over()).unwrap();
        assert_eq!(c.base_url(), "https://127.0.0.1:9443");
        let c =
            Config::from_toml("base_url = \"https://cv.example.org\"\nlisten = \"0.0.0.0:8443\"\n", &over()).unwrap();
        assert_eq!(c.base_url(), "https://cv.example.org");
    }

    #[test]
    fn demo_profile_seeds_and_production_stays_strict() {
        let c = Config::from_toml("profile = \"demo\"\n", &over()).unwrap();
        assert!(c.demo, "the demo profile seeds demo data");
        assert_eq!(c.profile.as_str(), "demo");
    }

    #[test]
    fn syntax_errors_name_line_and_column_without_the_text() {
        let e = Config::from_toml("listen = \"127.0.0.1:0\"\n[auth\nsecret = \"hunter2\"\n", &over()).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("(inline) line 2, column"), "{text}");
        assert!(!text.contains("hunter2") && !text.contains("[auth"), "{text}");
    }

    #[test]
    fn unknown_keys_are_errors_and_named() {
        let e = Config::from_toml("[auth]\naccess_token_ttl = 5\n", &over()).unwrap_err().to_string();
        assert!(e.contains("unknown key `auth.access_token_ttl`"), "{e}");
    }

    #[test]
    fn ttl_above_fifteen_minutes_is_refused() {
        assert!(Config::from_toml("[auth]\naccess_token_ttl_secs = 901\n", &over()).is_err());
    }

    #[test]
    fn database_scheme_is_checked_without_echoing_the_url() {
        let e = Config::from_toml("database_url = \"mysql://u:hunter2@h/db\"\n", &over()).unwrap_err().to_string();
        assert!(e.contains("database_url") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config::from_toml("[keys]\nmaster_key = \"c2VjcmV0LW1hc3Rlci1rZXk=\"\n", &over()).unwrap();
        assert!(!format!("{c:?}").contains("c2VjcmV0"));
    }

    #[test]
    fn production_names_each_missing_setting() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        let cases = [
            ("profile = \"production\"\n", "database_url"),
            ("profile = \"production\"\ndatabase_url = \"postgres://db/x\"\n", "tls.cert_file"),
            (
                "profile = \"production\"\ndatabase_url = \"postgres://db/x\"\n[tls]\ncert_file = \"c.pem\"\n",
                "tls.key_file",
            ),
            (
                "profile = \"production\"\ndatabase_url = \"postgres://db/x\"\n[tls]\ncert_file = \"c\"\nkey_file = \"k\"\n",
                "keys.master_key_file",
            ),
        ];
        for (toml, setting) in cases {
            let e = Config::from_toml(toml, &over()).unwrap_err().to_string();
            assert!(e.contains(setting), "{toml}: {e}");
        }
        let ok = format!(
            "profile = \"production\"\ndatabase_url = \"postgres://db/x\"\n[tls]\ncert_file = \"c\"\nkey_file = \"k\"\n[keys]\nmaster_key_file = \"{}\"\n",
            key.display()
        );
        // Without an anchor sink production is refused, naming the setting; either sink is enough.
        let e = Config::from_toml(&ok, &over()).unwrap_err().to_string();
        assert!(e.contains("audit.anchor_dir") && e.contains("audit.anchor_webhook_url"), "{e}");
        let hook = format!("{ok}[audit]\nanchor_webhook_url = \"https://anchors.example.org/cv\"\n");
        assert!(Config::from_toml(&hook, &over()).is_ok());
        let ok = format!("{ok}[audit]\nanchor_dir = \"/var/lib/anchors\"\n");
        assert!(Config::from_toml(&ok, &over()).is_ok());
        let demo = Overrides { demo: true, ..over() };
        assert!(Config::from_toml(&ok, &demo).unwrap_err().to_string().contains("--demo"));
        let http = Overrides { insecure_http: true, ..over() };
        assert!(Config::from_toml(&ok, &http).unwrap_err().to_string().contains("insecure-http"));
    }

    #[cfg(unix)]
    #[test]
    fn production_refuses_a_loose_master_key_and_development_files_under_any_spelling() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir_all(data.join("keys")).unwrap();
        std::fs::create_dir_all(data.join("tls")).unwrap();
        std::fs::create_dir_all(data.join("other")).unwrap();
        let dev_key = data.join("keys/master.key");
        crate::fsutil::write_private(&dev_key, b"k").unwrap();
        std::fs::write(data.join("tls/cert.pem"), b"c").unwrap();
        let outside = root.path().join("secrets");
        std::fs::create_dir_all(&outside).unwrap();
        let good_key = outside.join("master.key");
        crate::fsutil::write_private(&good_key, b"k").unwrap();
        let loose_key = outside.join("loose.key");
        std::fs::write(&loose_key, b"k").unwrap();
        std::fs::set_permissions(&loose_key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let link = outside.join("link.key");
        std::os::unix::fs::symlink(&dev_key, &link).unwrap();
        let cert_link = outside.join("cert.pem");
        std::os::unix::fs::symlink(data.join("tls/cert.pem"), &cert_link).unwrap();
        let over = Overrides { data_dir: data.clone(), ..Default::default() };
        let conf = |cert: &Path, key: &Path| {
            format!(
                "profile = \"production\"\ndatabase_url = \"postgres://db/x\"\n[tls]\ncert_file = \"{}\"\nkey_file = \"k\"\n[keys]\nmaster_key_file = \"{}\"\n[audit]\nanchor_dir = \"/var/lib/anchors\"\n",
                cert.display(),
                key.display()
            )
        };
        let c = Path::new("/etc/carevault/cert.pem");
        assert!(Config::from_toml(&conf(c, &good_key), &over).is_ok());
        for (key, why) in [
            (loose_key.clone(), "only its owner may read"),
            (data.join("other/../keys/master.key"), "outside the data directory"),
            (link.clone(), "outside the data directory"),
        ] {
            let e = Config::from_toml(&conf(c, &key), &over).unwrap_err().to_string();
            assert!(e.contains("keys.master_key_file") && e.contains(why), "{}: {e}", key.display());
        }
        for cert in [data.join("other/../tls/cert.pem"), cert_link] {
            let e = Config::from_toml(&conf(&cert, &good_key), &over).unwrap_err().to_string();
            assert!(e.contains("tls.cert_file"), "{}: {e}", cert.display());
        }
    }

    #[test]
    fn benchmark_switches_default_off_and_are_refused_in_production() {
        let c = Config::from_toml("", &over()).unwrap();
        assert_eq!(c.benchmark.switches(), BenchmarkSwitches::default());
        let asked = Config::from_toml("[benchmark]\ndisable = [\"audit\", \"encryption\"]\n", &over());
        if cfg!(feature = "benchmark") {
            let s = asked.unwrap().benchmark.switches();
            assert!(s.audit_off && s.encryption_off && !s.access_off && !s.telemetry_off);
        } else {
            // A build without the feature has no switch to turn: the request is refused, naming the setting.
            let e = asked.unwrap_err();
            assert!(e.to_string().contains("benchmark.disable"), "{e}");
        }
        assert!(Config::from_toml("[benchmark]\ndisable = [\"tls\"]\n", &over()).is_err());
        let dir = tempfile::tempdir().unwrap();
        let prod = format!(
            "profile = \"production\"\ndatabase_url = \"postgres://db/x\"\n[tls]\ncert_file = \"c\"\nkey_file = \"k\"\n[keys]\nmaster_key_file = \"{}\"\n[audit]\nanchor_dir = \"/var/lib/anchors\"\n",
            dir.path().join("master.key").display()
        );
        assert!(Config::from_toml(&format!("{prod}[benchmark]\ndisable = []\n"), &over()).is_ok());
        let e = Config::from_toml(&format!("{prod}[benchmark]\ndisable = [\"access\"]\n"), &over()).unwrap_err();
        assert!(e.to_string().contains("benchmark.disable"), "{e}");
    }

    #[test]
    fn oidc_issuer_must_be_https_except_loopback_in_development() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        let prod = format!(
            "profile = \"production\"\ndatabase_url = \"postgres://db/x\"\n[tls]\ncert_file = \"c\"\nkey_file = \"k\"\n[keys]\nmaster_key_file = \"{}\"\n[audit]\nanchor_dir = \"/var/lib/anchors\"\n",
            key.display()
        );
        let oidc = |issuer: &str| format!("[auth.oidc]\nissuer = \"{issuer}\"\nclient_id = \"carevault\"\n");
        let dev = |issuer: &str| Config::from_toml(&oidc(issuer), &over());
        let production = |issuer: &str| Config::from_toml(&format!("{prod}{}", oidc(issuer)), &over());
        assert!(dev("http://127.0.0.1:4000").is_ok());
        assert!(dev("http://localhost:4000/realms/x").is_ok());
        assert!(dev("https://idp.example.org/realms/x").is_ok());
        for bad in [
            "http://idp.example.org",
            "ftp://127.0.0.1",
            "not a url",
            "https://u:p@idp.example.org",
            "https://idp.example.org/?a=b",
        ] {
            assert!(dev(bad).unwrap_err().to_string().contains("auth.oidc.issuer"), "{bad}");
        }
        assert!(production("https://idp.example.org/realms/x").is_ok());
        assert!(production("http://127.0.0.1:4000").unwrap_err().to_string().contains("auth.oidc.issuer"));
        let c = dev("https://idp.example.org").unwrap();
        assert_eq!(c.auth.oidc.unwrap().audience(), "carevault", "audience defaults to the client id");
    }
}
