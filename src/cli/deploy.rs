//! `carevault deploy init --dir DIR`: everything a compose (or any) deployment needs that must not be written by
//! hand: an internal CA, certificates for the API and for Keycloak signed by it, the master key, the database,
//! OIDC-client, webhook and Keycloak-admin secrets, the demo users' passwords, and the Keycloak realm rendered from
//! its template with those secrets. Idempotent: a file that exists is kept (so a re-run never rotates anything;
//! `docs/operations.md` says how to rotate each), missing ones are made. Every secret is written owner-only
//! (0600) inside a directory per consumer (0700), owned by that consumer's uid when run as root:
//!
//! ```text
//! DIR/ca.pem                     the internal CA certificate (public, 0644)
//! DIR/ca-key.pem                 its key (0600, root): only `deploy init` uses it
//! DIR/demo-logins.txt            the Keycloak demo users and passwords (0600, root)
//! DIR/api/                       uid --api-uid: tls_cert.pem (leaf + CA), tls_key.pem, master_key, database_url,
//!                                oidc_client_secret, webhook_secret, ca.pem
//! DIR/keycloak/                  uid --keycloak-uid: tls_cert.pem, tls_key.pem, admin_password,
//!                                oidc_client_secret, import/carevault-realm.json
//! DIR/postgres/                  uid --postgres-uid: password
//! ```

use super::{Cli, CliError, Context};
use base64::Engine as _;
use rand::RngCore;
use secrecy::ExposeSecret;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Subcommand)]
pub enum DeployCommand {
    /// Make every missing secret, the internal CA and the certificates into DIR (idempotent).
    Init(InitArgs),
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Where to write (a volume shared with the services).
    #[arg(long)]
    pub dir: PathBuf,
    /// Names (DNS or IP) the API certificate is valid for.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1,api")]
    pub api_names: Vec<String>,
    /// Names the Keycloak certificate is valid for.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1,keycloak")]
    pub keycloak_names: Vec<String>,
    /// PostgreSQL host and port written into `api/database_url`.
    #[arg(long, default_value = "postgres:5432")]
    pub postgres_address: String,
    /// The realm template whose `${CAREVAULT_OIDC_CLIENT_SECRET}` and `${CAREVAULT_DEMO_PASSWORD_<user>}`
    /// placeholders are filled in (written to `keycloak/import/`); none: no realm is written.
    #[arg(long)]
    pub realm_template: Option<PathBuf>,
    /// Owner of `api/` (the carevault image runs as 10001).
    #[arg(long, default_value_t = 10001)]
    pub api_uid: u32,
    /// Owner of `keycloak/` (the Keycloak image runs as 1000).
    #[arg(long, default_value_t = 1000)]
    pub keycloak_uid: u32,
    /// Owner of `postgres/` (the Debian PostgreSQL image runs as 999).
    #[arg(long, default_value_t = 999)]
    pub postgres_uid: u32,
    /// URLs to print for people (after the secrets): `NAME=URL`, repeatable.
    #[arg(long = "url")]
    pub urls: Vec<String>,
}

pub fn run(_cli: &Cli, cmd: &DeployCommand) -> Result<(), CliError> {
    match cmd {
        DeployCommand::Init(args) => init(args),
    }
}

/// What `init` did, for the summary.
#[derive(Debug, Default)]
struct Made {
    made: Vec<String>,
    kept: usize,
}

fn init(args: &InitArgs) -> Result<(), CliError> {
    let root = &args.dir;
    std::fs::create_dir_all(root).context(format!("cannot create {}", root.display()))?;
    let (api, kc, pg) = (root.join("api"), root.join("keycloak"), root.join("postgres"));
    for dir in [&api, &kc, &kc.join("import"), &pg] {
        private_dir(dir)?;
    }
    let mut made = Made::default();

    // The internal CA and the two server certificates.
    let ca_key = ensure_key(&root.join("ca-key.pem"), &mut made)?;
    let ca_pem = root.join("ca.pem");
    if !ca_pem.is_file() {
        let cert = ca_params()?.self_signed(&ca_key).context("cannot sign the CA certificate")?;
        write_file(&ca_pem, cert.pem().as_bytes(), 0o644)?;
        made.made.push(ca_pem.display().to_string());
    } else {
        made.kept += 1;
    }
    let ca_text = std::fs::read_to_string(&ca_pem).context("cannot read ca.pem")?;
    let issuer = rcgen::Issuer::new(ca_params()?, ca_key);
    for (dir, names) in [(&api, &args.api_names), (&kc, &args.keycloak_names)] {
        let key = ensure_key(&dir.join("tls_key.pem"), &mut made)?;
        let cert_file = dir.join("tls_cert.pem");
        if cert_file.is_file() {
            made.kept += 1;
            continue;
        }
        let mut params = rcgen::CertificateParams::new(names.clone()).context("invalid certificate name")?;
        params.distinguished_name.push(rcgen::DnType::CommonName, names.first().cloned().unwrap_or_default());
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        let cert = params.signed_by(&key, &issuer).context("cannot sign a server certificate")?;
        // The chain (leaf, then CA), so a client given only this file can verify it too.
        write_file(&cert_file, format!("{}{ca_text}", cert.pem()).as_bytes(), 0o600)?;
        made.made.push(cert_file.display().to_string());
    }
    write_file(&api.join("ca.pem"), ca_text.as_bytes(), 0o644)?;

    // Secrets: random, base64 or URL-safe text, one line.
    let master = ensure_secret(&api.join("master_key"), 32, Alphabet::Base64, &mut made)?;
    drop(master);
    let pg_password = ensure_secret(&pg.join("password"), 24, Alphabet::UrlSafe, &mut made)?;
    let url = format!("postgres://carevault:{pg_password}@{}/carevault\n", args.postgres_address);
    ensure_file(&api.join("database_url"), url.as_bytes(), &mut made)?;
    let client_secret = ensure_secret(&api.join("oidc_client_secret"), 32, Alphabet::UrlSafe, &mut made)?;
    ensure_file(&kc.join("oidc_client_secret"), format!("{client_secret}\n").as_bytes(), &mut made)?;
    ensure_secret(&api.join("webhook_secret"), 32, Alphabet::Base64, &mut made)?;
    let admin_password = ensure_secret(&kc.join("admin_password"), 18, Alphabet::UrlSafe, &mut made)?;

    // carevault's own demo accounts: their passwords are made here so that this log names every login; the api's
    // demo seeding reads the file (`demo_passwords_file`).
    let demo_file = api.join("demo_passwords");
    let mut accounts = read_logins(&demo_file);
    let before = accounts.len();
    for (name, _) in crate::demo::ACCOUNTS {
        if !accounts.iter().any(|(u, _)| u == name) {
            let password = crate::demo::generate_password(&mut rand::thread_rng(), name);
            accounts.push((name.to_owned(), password.expose_secret().to_owned()));
        }
    }
    if accounts.len() == before {
        made.kept += 1;
    } else {
        write_file(&demo_file, crate::demo::passwords_text(&accounts).as_bytes(), 0o600)?;
        made.made.push(demo_file.display().to_string());
    }

    // The realm, with the client secret and one generated password per demo user.
    let mut logins = read_logins(&root.join("demo-logins.txt"));
    if let Some(template) = &args.realm_template {
        let text = std::fs::read_to_string(template)
            .context(format!("cannot read the realm template {}", template.display()))?;
        let placeholder =
            regex::Regex::new(r"\$\{CAREVAULT_DEMO_PASSWORD_([A-Za-z0-9_-]+)\}").context("placeholder pattern")?;
        for cap in placeholder.captures_iter(&text) {
            let user = cap[1].to_owned();
            if !logins.iter().any(|(u, _)| *u == user) {
                logins.push((user, random_text(15, Alphabet::UrlSafe)));
            }
        }
        let rendered = placeholder.replace_all(&text, |cap: &regex::Captures<'_>| {
            logins.iter().find(|(u, _)| *u == cap[1]).map(|(_, p)| p.clone()).unwrap_or_default()
        });
        let rendered = rendered.replace("${CAREVAULT_OIDC_CLIENT_SECRET}", &client_secret);
        serde_json::from_str::<serde_json::Value>(&rendered).context("the rendered realm is not JSON")?;
        write_file(&kc.join("import").join("carevault-realm.json"), rendered.as_bytes(), 0o600)?;
    }
    let mut text = String::from("# Keycloak demo users (realm carevault): username password\n");
    for (u, p) in &logins {
        text.push_str(&format!("{u} {p}\n"));
    }
    write_file(&root.join("demo-logins.txt"), text.as_bytes(), 0o600)?;

    chown_all(args, root)?;
    println!("deploy init: {} file(s) made, {} kept, in {}", made.made.len(), made.kept, root.display());
    for f in &made.made {
        println!("  made {f}");
    }
    println!("Internal CA (trust it to reach the services over TLS): {}", ca_pem.display());
    for u in &args.urls {
        println!("  {}", u.replacen('=', ": ", 1));
    }
    if !logins.is_empty() {
        println!("Keycloak demo users (realm carevault; synthetic demo only):");
        for (u, p) in &logins {
            println!("  {u:<14} {p}");
        }
        println!("Keycloak admin console: user admin, password {admin_password}");
    }
    println!("carevault demo accounts (synthetic demo only; sign in at the API's /auth/login):");
    for (u, p) in &accounts {
        println!("  {u:<18} {p}");
    }
    Ok(())
}

/// The CA's parameters: the same every time, so an issuer rebuilt from the stored key names the CA exactly as
/// its certificate does.
fn ca_params() -> Result<rcgen::CertificateParams, CliError> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "carevault deployment");
    params.distinguished_name.push(rcgen::DnType::CommonName, "carevault internal CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn ensure_key(path: &Path, made: &mut Made) -> Result<rcgen::KeyPair, CliError> {
    if path.is_file() {
        made.kept += 1;
        let pem = std::fs::read_to_string(path).context(format!("cannot read {}", path.display()))?;
        return rcgen::KeyPair::from_pem(&pem).context(format!("{} is not a PEM private key", path.display()));
    }
    let key = rcgen::KeyPair::generate().context("cannot generate a key")?;
    write_file(path, key.serialize_pem().as_bytes(), 0o600)?;
    made.made.push(path.display().to_string());
    Ok(key)
}

#[derive(Clone, Copy)]
enum Alphabet {
    Base64,
    UrlSafe,
}

fn random_text(bytes: usize, alphabet: Alphabet) -> String {
    let mut raw = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    match alphabet {
        Alphabet::Base64 => base64::engine::general_purpose::STANDARD.encode(&raw),
        Alphabet::UrlSafe => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw),
    }
}

/// The secret in `path` (made when missing), trimmed.
fn ensure_secret(path: &Path, bytes: usize, alphabet: Alphabet, made: &mut Made) -> Result<String, CliError> {
    if path.is_file() {
        made.kept += 1;
        return Ok(std::fs::read_to_string(path).context(format!("cannot read {}", path.display()))?.trim().to_owned());
    }
    let value = random_text(bytes, alphabet);
    write_file(path, format!("{value}\n").as_bytes(), 0o600)?;
    made.made.push(path.display().to_string());
    Ok(value)
}

fn ensure_file(path: &Path, content: &[u8], made: &mut Made) -> Result<(), CliError> {
    if path.is_file() {
        made.kept += 1;
        return Ok(());
    }
    write_file(path, content, 0o600)?;
    made.made.push(path.display().to_string());
    Ok(())
}

fn read_logins(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' ').map(|(u, p)| (u.to_owned(), p.trim().to_owned())))
        .collect()
}

/// Writes `content` with `mode` (replacing the file: the mode is set on creation, before any byte is written).
fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<(), CliError> {
    let failed = || format!("cannot write {}", path.display());
    #[cfg(unix)]
    {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).context(failed())?;
        f.write_all(content).context(failed())?;
        f.sync_all().context(failed())?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).context(failed())?;
        std::fs::rename(&tmp, path).context(failed())?;
    }
    #[cfg(not(unix))]
    {
        let _ = mode;
        std::fs::write(path, content).context(failed())?;
    }
    Ok(())
}

fn private_dir(dir: &Path) -> Result<(), CliError> {
    crate::fsutil::private_dir(dir).context(format!("cannot create {}", dir.display()))
}

/// As root, gives each consumer's directory (and everything in it) to its uid; otherwise leaves owners as they
/// are (the files are the invoking user's, which is right when one user runs everything).
fn chown_all(args: &InitArgs, root: &Path) -> Result<(), CliError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let root_user = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        if !root_user {
            return Ok(());
        }
        for (sub, uid) in [("api", args.api_uid), ("keycloak", args.keycloak_uid), ("postgres", args.postgres_uid)] {
            chown_tree(&root.join(sub), uid)?;
        }
    }
    #[cfg(not(unix))]
    let _ = (args, root);
    Ok(())
}

#[cfg(unix)]
fn chown_tree(path: &Path, uid: u32) -> Result<(), CliError> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).context(format!("cannot chown {}", path.display()))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path).context(format!("cannot list {}", path.display()))? {
            let entry = entry.context(format!("cannot list {}", path.display()))?;
            chown_tree(&entry.path(), uid)?;
        }
    }
    Ok(())
}
