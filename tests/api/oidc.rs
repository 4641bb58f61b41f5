//! OpenID Connect against a real provider (`tests/oidc/server.mjs`, oidc-provider): the code + PKCE login ending in
//! our own tokens, role and link mapping, state binding / replay / expiry, the provider's access tokens as bearer
//! tokens (aud, iss, exp, tampering, `alg: none`, HMAC confusion, ID token as access token), key rotation with a
//! rate-limited refetch, and a provider that is down or answers garbage.
//!
//! Each test starts the fixture on port 0 (`node`; with `CI=true` a missing node or fixture fails, otherwise the
//! test is skipped with a message) and a carevault server whose clock starts at the wall-clock time (the provider
//! signs with the real time) and then moves only when the test says.

use crate::helpers::{Backend, PgDatabase, client_trusting, free_port, policy_dir};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use carevault::app::{AppState, Application};
use carevault::clock::{Clock, ManualClock};
use carevault::config::{Config, Overrides};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use tempfile::TempDir;
use time::Duration;

const SECRET: &str = "fixture-client-secret-0123456789";
const PRACTITIONER: &str = "6f1c0a52-4a3e-4b8e-9a55-2f1d8d1c7e01";
const PATIENT: &str = "0b7a4f6e-2d1c-4f3a-8e5b-9c0d1e2f3a4b";

fn accounts() -> String {
    json!([
        {"sub": "u1", "roles": ["clinician"], "fhirUser": format!("Practitioner/{PRACTITIONER}")},
        {"sub": "adm", "roles": ["admin"]},
        {"sub": "pat", "roles": ["patient"], "fhirUser": format!("Patient/{PATIENT}")},
        {"sub": "root", "roles": ["root"]},
        {"sub": "two", "roles": ["admin", "auditor"]},
        {"sub": "nolink", "roles": ["nurse"]},
        {"sub": "desk", "roles": ["front_desk"]}
    ])
    .to_string()
}

/// The OIDC provider fixture; killed on drop.
pub struct Provider {
    child: Child,
    pub issuer: String,
    pub http: reqwest::Client,
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn skip_or_fail(why: &str) -> Option<Provider> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but the OIDC fixture cannot run: {why}");
    }
    eprintln!("skipping an OIDC test: {why} (install with `cd tests/oidc && npm ci`)");
    None
}

impl Provider {
    /// Starts the fixture with a redirect URI for carevault on `api_port`; `None` (skip) when node is missing.
    pub fn start(api_port: u16, env: &[(&str, &str)]) -> Option<Provider> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oidc");
        if !dir.join("node_modules/oidc-provider").is_dir() {
            return skip_or_fail("tests/oidc/node_modules is missing");
        }
        let mut cmd = Command::new("node");
        cmd.arg(dir.join("server.mjs"))
            .arg("0")
            .env("OIDC_CLIENT_SECRET", SECRET)
            .env("OIDC_REDIRECT_URI", format!("https://localhost:{api_port}/auth/oidc/callback"))
            .env("OIDC_ACCOUNTS", accounts())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(_) => return skip_or_fail("`node` is not installed"),
        };
        let stdout = child.stdout.take().unwrap();
        let mut provider = Provider { child, issuer: String::new(), http: reqwest::Client::new() };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let ready: Value = serde_json::from_str(&line).expect("fixture ready line");
        provider.issuer = ready["issuer"].as_str().unwrap().to_owned();
        Some(provider)
    }

    /// Plays the browser at the provider: the callback URL it redirects to for `sub`.
    pub async fn authorize(&self, url: &str, sub: &str) -> String {
        let resp = self
            .http
            .post(format!("{}/__authorize", self.issuer))
            .json(&json!({"url": url, "sub": sub}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json::<Value>().await.unwrap()["location"].as_str().unwrap().to_owned()
    }

    /// A code flow run directly against the provider (as another client of the same API would): its token
    /// response (`access_token`, `id_token`, ...).
    pub async fn tokens(&self, sub: &str, redirect_uri: &str) -> Value {
        let verifier = URL_SAFE_NO_PAD.encode(rand_bytes());
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        let discovery: Value = self
            .http
            .get(format!("{}/.well-known/openid-configuration", self.issuer))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut url = reqwest::Url::parse(discovery["authorization_endpoint"].as_str().unwrap()).unwrap();
        url.query_pairs_mut()
            .append_pair("client_id", "carevault")
            .append_pair("response_type", "code")
            .append_pair("scope", "openid")
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("state", "direct-state")
            .append_pair("nonce", "direct-nonce")
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        let back = reqwest::Url::parse(&self.authorize(url.as_str(), sub).await).unwrap();
        let code = back.query_pairs().find(|(k, _)| k == "code").unwrap().1.into_owned();
        let resp = self
            .http
            .post(discovery["token_endpoint"].as_str().unwrap())
            .basic_auth("carevault", Some(SECRET))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("code_verifier", verifier.as_str()),
                ("redirect_uri", redirect_uri),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    pub async fn rotate(&self) {
        let resp = self.http.post(format!("{}/__rotate", self.issuer)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }

    pub async fn shutdown(&mut self) {
        let _ = self.http.post(format!("{}/__shutdown", self.issuer)).send().await;
        let _ = self.child.wait();
    }
}

fn rand_bytes() -> [u8; 32] {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

/// A carevault server configured for one OIDC provider.
pub struct OidcApp {
    pub port: u16,
    pub client: reqwest::Client,
    pub state: AppState,
    pub clock: ManualClock,
    handle: actix_web::dev::ServerHandle,
    _dir: TempDir,
    _pg: Option<PgDatabase>,
}

impl Drop for OidcApp {
    fn drop(&mut self) {
        drop(self.handle.stop(false));
    }
}

/// The provider signs with the wall clock, so carevault's manual clock starts there.
#[allow(clippy::disallowed_methods)]
fn wall_clock() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

impl OidcApp {
    pub async fn spawn(backend: Backend, port: u16, issuer: &str, extra_oidc: &str) -> Option<OidcApp> {
        let dir = tempfile::tempdir().unwrap();
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(PgDatabase::create()?),
        };
        let db_url = match &pg {
            Some(p) => p.url.clone(),
            None => format!("sqlite://{}", dir.path().join("carevault.db").display()),
        };
        let secret_file = dir.path().join("oidc_client_secret");
        std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
        let toml = format!(
            "database_url = \"{db_url}\"\nlisten = \"127.0.0.1:{port}\"\nbase_url = \"https://localhost:{port}\"\n\
             [access]\npolicy_dir = \"{}\"\n\
             [auth.oidc]\nissuer = \"{issuer}\"\nclient_id = \"carevault\"\nclient_secret_file = \"{}\"\n\
             roles_claim = \"carevault_roles\"\nlink_claim = \"fhirUser\"\n{extra_oidc}",
            policy_dir().display(),
            secret_file.display()
        );
        let over = Overrides { data_dir: dir.path().to_path_buf(), ..Default::default() };
        let config = Config::from_toml(&toml, &over).expect("test config");
        let clock = ManualClock::new(wall_clock());
        let app = Application::build(config, Arc::new(clock.clone())).expect("server starts");
        let state = app.state().clone();
        let handle = app.handle();
        tokio::spawn(app.run_until_stopped());
        let client = client_trusting(&std::fs::read(dir.path().join("tls/cert.pem")).unwrap());
        Some(OidcApp { port, client, state, clock, handle, _dir: dir, _pg: pg })
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    pub fn redirect_uri(&self) -> String {
        self.url("/auth/oidc/callback")
    }

    /// `GET /auth/oidc/login`: (authorization URL, binding cookie `name=value`).
    pub async fn start_login(&self) -> (String, String) {
        let resp = self.client.get(self.url("/auth/oidc/login")).send().await.unwrap();
        assert_eq!(resp.status(), 302);
        let location = resp.headers()["location"].to_str().unwrap().to_owned();
        let set_cookie = resp.headers()["set-cookie"].to_str().unwrap();
        assert!(
            set_cookie.contains("HttpOnly") && set_cookie.contains("Secure") && set_cookie.contains("SameSite=Lax")
        );
        // The login state at rest: the verifier and nonce sealed, the nonce sent to the provider nowhere in clear.
        use carevault::store::schema::oidc_logins;
        use diesel::prelude::*;
        let nonce =
            reqwest::Url::parse(&location).unwrap().query_pairs().find(|(k, _)| k == "nonce").unwrap().1.into_owned();
        let mut conn = self.state.db.conn().unwrap();
        let stored: Vec<(String, String)> =
            oidc_logins::table.select((oidc_logins::pkce_verifier, oidc_logins::nonce)).load(&mut conn).unwrap();
        assert!(!stored.is_empty());
        for (verifier, sealed_nonce) in stored {
            assert!(verifier.starts_with("cv1:") && sealed_nonce.starts_with("cv1:"));
            assert!(!verifier.contains(&nonce) && !sealed_nonce.contains(&nonce));
        }
        (location, set_cookie.split(';').next().unwrap().to_owned())
    }

    pub async fn callback(&self, url: &str, cookie: Option<&str>) -> reqwest::Response {
        assert!(url.starts_with(&self.redirect_uri()), "redirected to our callback");
        let mut req = self.client.get(url);
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        req.send().await.unwrap()
    }

    /// The whole browser login for `sub`; the callback's response.
    pub async fn login(&self, provider: &Provider, sub: &str) -> reqwest::Response {
        let (authorization, cookie) = self.start_login().await;
        assert!(authorization.starts_with(&provider.issuer));
        let back = provider.authorize(&authorization, sub).await;
        self.callback(&back, Some(&cookie)).await
    }

    pub async fn session(&self, token: &str) -> reqwest::Response {
        self.client.get(self.url("/auth/session")).bearer_auth(token).send().await.unwrap()
    }

    /// Audit events of `kind` (`login`, `login-failure`): their JSON bodies.
    pub fn audit(&self, kind: &str) -> Vec<Value> {
        use carevault::store::schema::audit_events;
        use diesel::prelude::*;
        let mut conn = self.state.db.conn().unwrap();
        let bodies: Vec<String> =
            audit_events::table.filter(audit_events::kind.eq(kind)).select(audit_events::body).load(&mut conn).unwrap();
        bodies.iter().map(|b| serde_json::from_str(b).unwrap()).collect()
    }

    pub fn account(&self, username_suffix: &str) -> Option<carevault::auth::service::Account> {
        use carevault::store::schema::accounts;
        use diesel::prelude::*;
        let mut conn = self.state.db.conn().unwrap();
        let all: Vec<carevault::auth::service::Account> =
            accounts::table.select(carevault::auth::service::Account::as_select()).load(&mut conn).unwrap();
        all.into_iter().find(|a| a.username.starts_with("oidc:") && a.username.ends_with(username_suffix))
    }
}

/// A provider and a carevault configured for it; `None` when the fixture or the backend is unavailable.
pub async fn setup(backend: Backend, provider_env: &[(&str, &str)], extra_oidc: &str) -> Option<(Provider, OidcApp)> {
    let port = free_port();
    let provider = Provider::start(port, provider_env)?;
    let app = OidcApp::spawn(backend, port, &provider.issuer, extra_oidc).await?;
    Some((provider, app))
}

/// One test per backend, with a provider and a carevault server.
macro_rules! oidc_test {
    ($name:ident, |$p:ident, $app:ident| $body:block) => {
        mod $name {
            use super::*;
            async fn run(backend: Backend) {
                let Some((mut $p, $app)) = setup(backend, &[], "").await else { return };
                let _ = &mut $p;
                $body
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                run(Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                run(Backend::Postgres).await;
            }
        }
    };
}

fn claims_of(token: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap()
}

fn header_of(token: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap()).unwrap()
}

async fn assert_generic_401(resp: reqwest::Response) -> String {
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
    resp.text().await.unwrap()
}

oidc_test!(code_flow_login_issues_our_own_tokens, |provider, app| {
    let resp = app.login(&provider, "u1").await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"), "binding cookie cleared");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 300);
    let access = body["access_token"].as_str().unwrap();
    let refresh = body["refresh_token"].as_str().unwrap();
    assert_eq!(header_of(access)["alg"], "EdDSA", "our own token, not the provider's");

    let who: Value = app.session(access).await.json().await.unwrap();
    assert_eq!(who["roles"], json!(["clinician"]));
    assert_eq!(who["practitioner"], PRACTITIONER);
    assert_eq!(who["session"], true);
    assert_eq!(who["issuer"], format!("https://localhost:{}", app.port));
    assert!(who["expires_at"].as_i64().unwrap() > app.clock.now().unix_timestamp());

    let account = app.account(":u1").expect("an oidc account");
    assert_eq!((account.kind.as_str(), account.role.as_str()), ("oidc", "clinician"));
    assert_eq!(account.practitioner_id.as_deref(), Some(PRACTITIONER));
    assert!(account.password_hash.is_none());
    assert_eq!(who["subject"], account.id);

    let logins = app.audit("login");
    assert_eq!(logins.len(), 1);
    assert_eq!(logins[0]["detail"], "oidc");
    assert_eq!(logins[0]["outcome"], "0");

    // Sessions work unchanged: refresh rotates, logout ends it.
    let refreshed = app
        .client
        .post(app.url("/auth/token"))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", refresh)])
        .send()
        .await
        .unwrap();
    assert_eq!(refreshed.status(), 200);
    let logout = app.client.post(app.url("/auth/logout")).bearer_auth(access).send().await.unwrap();
    assert_eq!(logout.status(), 204);
    assert_generic_401(app.session(access).await).await;

    // A second login of the same subject reuses the account.
    assert_eq!(app.login(&provider, "u1").await.status(), 200);
    assert_eq!(app.account(":u1").unwrap().id, account.id);
});

oidc_test!(roles_and_links_come_from_the_configured_claims, |provider, app| {
    let token = |resp: reqwest::Response| async move {
        assert_eq!(resp.status(), 200);
        resp.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned()
    };
    let admin: Value = app.session(&token(app.login(&provider, "adm").await).await).await.json().await.unwrap();
    assert_eq!((admin["roles"].clone(), admin["practitioner"].clone()), (json!(["admin"]), Value::Null));
    let patient: Value = app.session(&token(app.login(&provider, "pat").await).await).await.json().await.unwrap();
    assert_eq!((patient["roles"].clone(), patient["patient"].clone()), (json!(["patient"]), json!(PATIENT)));

    // Unknown role, two roles, a nurse without her Practitioner: the provider vouched, we refuse (403).
    for sub in ["root", "two", "nolink"] {
        let resp = app.login(&provider, sub).await;
        assert_eq!(resp.status(), 403, "{sub}");
        assert!(app.account(&format!(":{sub}")).is_none(), "no account for {sub}");
    }
    // Unknown at the provider: it redirects back with error=access_denied.
    assert_generic_401(app.login(&provider, "nobody").await).await;
    let failures = app.audit("login-failure");
    let details: Vec<&str> = failures.iter().map(|f| f["detail"].as_str().unwrap()).collect();
    assert_eq!(details.iter().filter(|d| **d == "oidc-role").count(), 3);
    assert!(details.contains(&"oidc-provider-refused"), "{details:?}");

    // A locally disabled OIDC account cannot log in again.
    carevault::auth::service::disable_account(
        &mut app.state.db.conn().unwrap(),
        &app.account(":adm").unwrap().username,
        app.clock.now(),
    )
    .unwrap();
    assert_generic_401(app.login(&provider, "adm").await).await;
    assert!(app.audit("login-failure").iter().any(|f| f["detail"] == "oidc-disabled"));
});

oidc_test!(state_is_bound_single_use_and_short_lived, |provider, app| {
    // Tampered state.
    let (authorization, cookie) = app.start_login().await;
    let back = provider.authorize(&authorization, "u1").await;
    let mut url = reqwest::Url::parse(&back).unwrap();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "state" { format!("{v}x") } else { v.into_owned() };
            (k.into_owned(), v)
        })
        .collect();
    url.query_pairs_mut().clear().extend_pairs(pairs);
    let tampered = assert_generic_401(app.callback(url.as_str(), Some(&cookie)).await).await;
    // Without the browser-binding cookie, or with another browser's: refused, and the login is not spent.
    let (_, other_cookie) = app.start_login().await;
    let no_cookie = assert_generic_401(app.callback(&back, None).await).await;
    assert_generic_401(app.callback(&back, Some(&other_cookie)).await).await;
    assert_eq!(tampered, no_cookie, "one generic answer");
    let ok = app.callback(&back, Some(&cookie)).await;
    assert_eq!(ok.status(), 200);
    // Replay of a consumed callback.
    assert_generic_401(app.callback(&back, Some(&cookie)).await).await;

    // Expired: finished more than 10 minutes after it started.
    let (authorization, cookie) = app.start_login().await;
    let back = provider.authorize(&authorization, "u1").await;
    app.clock.advance(Duration::minutes(10) + Duration::seconds(1));
    assert_generic_401(app.callback(&back, Some(&cookie)).await).await;
    let states = app.audit("login-failure").iter().filter(|f| f["detail"] == "oidc-state").count();
    assert_eq!(states, 5);
});

mod provider_tokens {
    use super::*;

    async fn setup_sqlite(env: &[(&str, &str)], extra: &str) -> Option<(Provider, OidcApp)> {
        setup(Backend::Sqlite, env, extra).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn access_tokens_are_accepted_directly() {
        let Some((provider, app)) = setup_sqlite(&[], "").await else { return };
        let tokens = provider.tokens("u1", &app.redirect_uri()).await;
        let access = tokens["access_token"].as_str().unwrap();
        assert_eq!(header_of(access)["typ"], "at+jwt");
        let resp = app.session(access).await;
        assert_eq!(resp.status(), 200);
        let who: Value = resp.json().await.unwrap();
        assert_eq!(who["subject"], app.account(":u1").expect("created on first sight").id);
        assert_eq!(who["issuer"], provider.issuer);
        assert_eq!(who["roles"], json!(["clinician"]));
        assert_eq!(who["practitioner"], PRACTITIONER);
        assert_eq!(who["session"], false);

        // The ID token (aud = client id too) is not an access token.
        assert_generic_401(app.session(tokens["id_token"].as_str().unwrap()).await).await;
        // A locally disabled provider identity is shut out.
        assert_eq!(app.login(&provider, "u1").await.status(), 200);
        let username = app.account(":u1").unwrap().username;
        carevault::auth::service::disable_account(&mut app.state.db.conn().unwrap(), &username, app.clock.now())
            .unwrap();
        assert_generic_401(app.session(access).await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn eddsa_id_tokens_verify_too() {
        let Some((provider, app)) = setup_sqlite(&[("OIDC_ID_TOKEN_ALG", "EdDSA")], "").await else { return };
        let id_token = provider.tokens("adm", &app.redirect_uri()).await["id_token"].as_str().unwrap().to_owned();
        assert_eq!(header_of(&id_token)["alg"], "EdDSA");
        assert_eq!(app.login(&provider, "adm").await.status(), 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_tokens_are_refused_with_one_generic_answer() {
        let Some((provider, app)) = setup_sqlite(&[], "").await else { return };
        let tokens = provider.tokens("u1", &app.redirect_uri()).await;
        let access = tokens["access_token"].as_str().unwrap().to_owned();
        assert_eq!(app.session(&access).await.status(), 200, "keys fetched, token good");
        let [h, p, s]: [&str; 3] = access.split('.').collect::<Vec<_>>().try_into().unwrap();

        let mut bodies = Vec::new();
        // Tampered payload: promoted to admin.
        let mut claims = claims_of(&access);
        claims["carevault_roles"] = json!(["admin"]);
        let forged = URL_SAFE_NO_PAD.encode(claims.to_string());
        bodies.push(assert_generic_401(app.session(&format!("{h}.{forged}.{s}")).await).await);
        // Tampered signature.
        let mut sig = URL_SAFE_NO_PAD.decode(s).unwrap();
        sig[10] ^= 1;
        bodies.push(assert_generic_401(app.session(&format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(sig))).await).await);
        // alg: none, with and without a signature.
        let mut header = header_of(&access);
        header["alg"] = json!("none");
        let none = URL_SAFE_NO_PAD.encode(header.to_string());
        bodies.push(assert_generic_401(app.session(&format!("{none}.{p}.")).await).await);
        bodies.push(assert_generic_401(app.session(&format!("{none}.{p}.{s}")).await).await);
        // HMAC keyed with the provider's public RSA key (key confusion).
        let jwks: Value =
            provider.http.get(format!("{}/jwks", provider.issuer)).send().await.unwrap().json().await.unwrap();
        let rsa = jwks["keys"].as_array().unwrap().iter().find(|k| k["kty"] == "RSA").unwrap();
        for key_bytes in [rsa.to_string().into_bytes(), URL_SAFE_NO_PAD.decode(rsa["n"].as_str().unwrap()).unwrap()] {
            use hmac::{Hmac, Mac};
            let mut header = header_of(&access);
            header["alg"] = json!("HS256");
            let hs = URL_SAFE_NO_PAD.encode(header.to_string());
            let mut mac = Hmac::<Sha256>::new_from_slice(&key_bytes).unwrap();
            mac.update(format!("{hs}.{p}").as_bytes());
            let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
            bodies.push(assert_generic_401(app.session(&format!("{hs}.{p}.{tag}")).await).await);
        }
        // The RSA signature presented under the Ed25519 key's kid (algorithm the key does not declare).
        let ed = jwks["keys"].as_array().unwrap().iter().find(|k| k["kty"] == "OKP").unwrap();
        let mut header = header_of(&access);
        header["kid"] = ed["kid"].clone();
        let swapped = URL_SAFE_NO_PAD.encode(header.to_string());
        bodies.push(assert_generic_401(app.session(&format!("{swapped}.{p}.{s}")).await).await);
        // Garbage.
        bodies.push(assert_generic_401(app.session("not.a.jwt").await).await);

        // Expired: past exp (+5 s leeway for the provider's clock) on carevault's clock.
        let exp = claims_of(&access)["exp"].as_i64().unwrap();
        app.clock.advance(Duration::seconds(exp - app.clock.now().unix_timestamp() + 31));
        bodies.push(assert_generic_401(app.session(&access).await).await);
        assert!(bodies.windows(2).all(|w| w[0] == w[1]), "one generic message");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_audience_and_wrong_issuer_are_refused() {
        // The provider issues tokens for another API.
        let Some((provider, app)) = setup_sqlite(&[("OIDC_AUDIENCE", "another-api")], "").await else { return };
        let tokens = provider.tokens("u1", &app.redirect_uri()).await;
        assert_eq!(claims_of(tokens["access_token"].as_str().unwrap())["aud"], "another-api");
        assert_generic_401(app.session(tokens["access_token"].as_str().unwrap()).await).await;

        // Configured for that audience, the same kind of token is accepted.
        let Some((provider, app)) =
            setup_sqlite(&[("OIDC_AUDIENCE", "another-api")], "audience = \"another-api\"\n").await
        else {
            return;
        };
        let tokens = provider.tokens("u1", &app.redirect_uri()).await;
        assert_eq!(app.session(tokens["access_token"].as_str().unwrap()).await.status(), 200);

        // A token from another provider (another issuer) is not accepted.
        let Some(other) = Provider::start(app.port, &[]) else { return };
        let foreign = other.tokens("u1", &app.redirect_uri()).await;
        assert_ne!(other.issuer, provider.issuer);
        assert_generic_401(app.session(foreign["access_token"].as_str().unwrap()).await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotated_keys_are_refetched_at_most_every_30_seconds() {
        let Some((provider, app)) = setup_sqlite(&[], "").await else { return };
        let old = provider.tokens("u1", &app.redirect_uri()).await["access_token"].as_str().unwrap().to_owned();
        assert_eq!(app.session(&old).await.status(), 200);
        provider.rotate().await;
        let new = provider.tokens("u1", &app.redirect_uri()).await["access_token"].as_str().unwrap().to_owned();
        assert_ne!(header_of(&old)["kid"], header_of(&new)["kid"]);
        // Unknown kid right after a fetch: no refetch yet.
        assert_generic_401(app.session(&new).await).await;
        app.clock.advance(Duration::seconds(31));
        assert_eq!(app.session(&new).await.status(), 200, "refetched on the unknown kid");
        // The old key left the provider's JWKS, so its tokens no longer verify.
        assert_generic_401(app.session(&old).await).await;
        // A login after the rotation verifies its ID token with the new keys.
        assert_eq!(app.login(&provider, "u1").await.status(), 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provider_down_login_fails_closed_and_cached_keys_keep_validating() {
        let Some((mut provider, app)) = setup_sqlite(&[], "").await else { return };
        let access = provider.tokens("u1", &app.redirect_uri()).await["access_token"].as_str().unwrap().to_owned();
        assert_eq!(app.session(&access).await.status(), 200);
        // A login in flight when the provider goes away.
        let (authorization, cookie) = app.start_login().await;
        let back = provider.authorize(&authorization, "u1").await;
        provider.shutdown().await;

        let resp = app.client.get(app.url("/auth/oidc/login")).send().await.unwrap();
        assert_eq!(resp.status(), 503);
        assert!(resp.headers().get("location").is_none());
        assert_eq!(app.callback(&back, Some(&cookie)).await.status(), 503);
        assert!(app.audit("login-failure").iter().any(|f| f["detail"] == "oidc-provider-unavailable"));
        // Validation goes on with the cached keys, even after the refetch interval.
        app.clock.advance(Duration::seconds(45));
        assert_eq!(app.session(&access).await.status(), 200);
        // An unknown kid cannot be resolved now: refused.
        let mut header = header_of(&access);
        header["kid"] = json!("unknown-kid");
        let rest = access.split_once('.').unwrap().1;
        let unknown = format!("{}.{rest}", URL_SAFE_NO_PAD.encode(header.to_string()));
        assert_generic_401(app.session(&unknown).await).await;
        assert_eq!(app.session(&access).await.status(), 200, "cached keys survive the failed refetch");
    }

    /// An issuer that answers every request with the given HTTP response.
    async fn garbage_issuer(response: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            }
        });
        format!("http://127.0.0.1:{port}")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_from_the_provider_fails_closed() {
        let responses = [
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9\r\nconnection: close\r\n\r\n{garbage!",
            "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 6\r\nconnection: close\r\n\r\n<html>",
            "HTTP/1.1 302 Found\r\nlocation: http://169.254.169.254/\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            "not http at all\r\n\r\n",
        ];
        for response in responses {
            let issuer = garbage_issuer(response).await;
            let app = OidcApp::spawn(Backend::Sqlite, free_port(), &issuer, "").await.unwrap();
            let resp = app.client.get(app.url("/auth/oidc/login")).send().await.unwrap();
            assert_eq!(resp.status(), 503, "{response}");
            let text = resp.text().await.unwrap();
            assert!(!text.contains("garbage") && !text.contains("html") && !text.contains("169.254"), "{text}");
        }
    }
}

// A SMART app's standalone launch whose user signs in at the OpenID Connect provider from the authorize page:
// the provider's callback continues to the consent page (no token reaches the browser), and the app gets a
// code that the token endpoint exchanges (PKCE) for tokens of the same local `oidc` account.
oidc_test!(smart_authorize_page_signs_in_at_the_provider, |provider, app| {
    use crate::smart::hidden;
    use carevault::auth::service::{AppKind, NewApp, register_app};
    const REDIRECT: &str = "http://127.0.0.1:9/callback";
    let new = NewApp {
        name: "Chart".into(),
        kind: AppKind::Public,
        redirect_uris: vec![REDIRECT.into()],
        scopes: "openid fhirUser launch/patient patient/*.rs".into(),
        jwks: None,
        jwks_url: None,
        role: None,
    };
    let (registered, _) = register_app(&mut app.state.db.conn().unwrap(), new, app.clock.now()).unwrap();
    let verifier = URL_SAFE_NO_PAD.encode(rand_bytes());
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    let aud = app.state.records.base().to_owned();
    let query = serde_urlencoded::to_string([
        ("response_type", "code"),
        ("client_id", registered.client_id.as_str()),
        ("redirect_uri", REDIRECT),
        ("scope", "openid fhirUser launch/patient patient/*.rs"),
        ("state", "st-7"),
        ("aud", aud.as_str()),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ])
    .unwrap();
    let authorize = app.url(&format!("/auth/authorize?{query}"));
    let sign_in = |flow: String| {
        let (client, url) = (app.client.clone(), app.url("/auth/authorize/oidc"));
        async move { client.post(url).form(&[("flow", flow)]).send().await.unwrap() }
    };
    let html = app.client.get(&authorize).send().await.unwrap().text().await.unwrap();
    assert!(html.contains("form id=\"oidc\"") && html.contains("form id=\"login\""), "both sign-ins offered");
    let flow = hidden(&html, "flow").expect("flow");

    // An unknown flow never reaches the provider.
    let unknown = sign_in("not-a-flow".into()).await;
    assert_eq!(unknown.status(), 400);
    assert!(unknown.headers().get("location").is_none());

    let to_provider = sign_in(flow.clone()).await;
    assert_eq!(to_provider.status(), 303);
    let location = to_provider.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&provider.issuer), "{location}");
    assert!(!location.contains(&flow), "the flow handle stays out of URLs");
    let cookie = to_provider.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    // The flow handle is sealed at rest, like the verifier and nonce.
    {
        use carevault::store::schema::oidc_logins;
        use diesel::prelude::*;
        let sealed: Vec<Option<String>> =
            oidc_logins::table.select(oidc_logins::smart_flow).load(&mut app.state.db.conn().unwrap()).unwrap();
        assert!(sealed.iter().flatten().all(|s| s.starts_with("cv1:") && !s.contains(&flow)), "{sealed:?}");
        assert_eq!(sealed.iter().flatten().count(), 1);
    }
    let back = provider.authorize(&location, "pat").await;
    let consent_page = app.callback(&back, Some(&cookie)).await;
    assert_eq!(consent_page.status(), 200);
    assert!(consent_page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(consent_page.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"), "binding cookie cleared");
    let html = consent_page.text().await.unwrap();
    assert!(html.contains("form id=\"consent\""), "{html}");
    assert!(!html.contains("access_token") && !html.contains("eyJ"), "no token in the browser");
    assert!(!html.contains("name=\"patient\""), "a patient opens the app for herself: no picker");
    let account = app.account(":pat").expect("the provider identity's local account");
    assert!(app.audit("login").iter().any(|e| e["detail"] == "smart-authorize-oidc"));

    let approved = app
        .client
        .post(app.url("/auth/authorize/consent"))
        .form(&[
            ("flow", hidden(&html, "flow").unwrap()),
            ("consent", hidden(&html, "consent").unwrap()),
            ("decision", "approve".into()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status(), 303);
    let to_app = reqwest::Url::parse(approved.headers()["location"].to_str().unwrap()).unwrap();
    let param = |k: &str| to_app.query_pairs().find(|(n, _)| n == k).map(|(_, v)| v.into_owned());
    assert_eq!(param("state").as_deref(), Some("st-7"));
    let code = param("code").expect("code");
    let tokens: Value = app
        .client
        .post(app.url("/auth/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", REDIRECT),
            ("client_id", registered.client_id.as_str()),
            ("code_verifier", verifier.as_str()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tokens["patient"], PATIENT, "{tokens}");
    let fhir_user = claims_of(tokens["id_token"].as_str().unwrap())["fhirUser"].as_str().unwrap().to_owned();
    assert!(fhir_user.ends_with(&format!("/Patient/{PATIENT}")), "{fhir_user}");
    let who: Value = app.session(tokens["access_token"].as_str().unwrap()).await.json().await.unwrap();
    assert_eq!(who["subject"], account.id);
    assert_eq!(who["roles"], json!(["patient"]));

    // The same flow cannot be signed in to again, at the provider or locally.
    let again = sign_in(flow).await;
    assert_eq!(again.status(), 400);
});

// Provider bearer tokens act as the subject's local account: a token used before any browser login creates it;
// `incident contain` shuts the token out; `incident report` finds what it did.
oidc_test!(provider_bearer_identities_are_local_accounts, |provider, app| {
    let tokens = provider.tokens("desk", &app.redirect_uri()).await;
    let access = tokens["access_token"].as_str().unwrap();
    let who: Value = app.session(access).await.json().await.unwrap();
    let account = app.account(":desk").expect("an account on first sight");
    assert_eq!(who["subject"], account.id, "the local account, not the provider's sub");
    let patient = json!({"resourceType": "Patient", "name": [{"family": "Okafor", "given": ["Ada"]}]});
    let created = app
        .client
        .post(app.url("/fhir/Patient"))
        .bearer_auth(access)
        .header("content-type", "application/fhir+json")
        .json(&patient)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    // A browser login of the same subject is the same account.
    assert_eq!(app.login(&provider, "desk").await.status(), 200);
    assert_eq!(app.account(":desk").unwrap().id, account.id);

    let mut conn = app.state.db.conn().unwrap();
    let agent = carevault::audit::Agent::default();
    let now = app.clock.now();
    let report = carevault::monitor::incident::report(
        &app.state,
        &mut conn,
        &account.username,
        now - Duration::hours(1),
        now + Duration::minutes(1),
        now.date(),
        agent.clone(),
    )
    .unwrap()
    .expect("the account is found by its username");
    assert_eq!(report.account, account.id);
    assert_eq!(report.total_patients, 1, "what the bearer token did is on the account's record");
    assert_eq!(report.patients[0].patient, id);
    let done =
        carevault::monitor::incident::contain(&mut conn, app.state.audit.sealer(), &account.username, agent, now)
            .unwrap()
            .expect("contained");
    assert_eq!(done.username, account.username);
    assert_generic_401(app.session(access).await).await;
});
