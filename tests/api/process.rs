//! The real binary as a child process for the fault, fuzz and OWASP suites: a data directory with a config file,
//! `serve` on port 0 with every output line collected, maintenance commands on the same directory, and a client
//! that trusts the generated certificate (verification on).

use crate::helpers::{PASSWORD, client_trusting, policy_dir};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn bin() -> String {
    std::env::var("CAREVAULT_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_carevault").to_owned())
}

/// A data directory and the config file every command of one test reads.
pub struct DataDir {
    pub dir: PathBuf,
}

impl DataDir {
    /// `database_url` plus `extra` TOML, the test policy directory.
    pub fn new(dir: &Path, database_url: &str, extra: &str) -> DataDir {
        std::fs::write(
            dir.join("carevault.toml"),
            format!(
                "database_url = \"{database_url}\"\n{extra}\n[access]\npolicy_dir = \"{}\"\n",
                policy_dir().display()
            ),
        )
        .unwrap();
        DataDir { dir: dir.to_path_buf() }
    }

    /// `carevault --data-dir DIR --config DIR/carevault.toml`, without the test's own `CAREVAULT_*`/`OTEL_*`.
    pub fn command(&self) -> Command {
        let mut c = Command::new(bin());
        c.arg("--data-dir").arg(&self.dir).arg("--config").arg(self.dir.join("carevault.toml"));
        for (k, _) in std::env::vars() {
            if k.starts_with("CAREVAULT_") || k.starts_with("OTEL_") || k == "RUST_LOG" {
                c.env_remove(k);
            }
        }
        c
    }

    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = self
            .command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        tokio::task::block_in_place(|| child.wait_with_output().unwrap())
    }

    /// `users add` with the test password; the server must have run once (it creates the keys and schema).
    pub fn add_user(&self, username: &str, role: &str, link: Option<(&str, &str)>) {
        let mut args = vec!["users", "add", "--username", username, "--role", role, "--password-stdin"];
        if let Some((flag, id)) = link {
            args.extend([flag, id]);
        }
        let out = self.run(&args, Some(PASSWORD));
        assert!(out.status.success(), "users add: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `audit verify --json`: exit status and output.
    pub fn audit_verify(&self) -> (bool, String) {
        let out = self.run(&["audit", "verify"], None);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    pub fn client(&self) -> reqwest::Client {
        client_trusting(&std::fs::read(self.dir.join("tls/cert.pem")).unwrap())
    }

    /// Starts `serve --listen 127.0.0.1:0` and waits until it says where it serves.
    pub fn serve(&self) -> Served {
        self.serve_with(|_| {})
    }

    pub fn serve_with(&self, f: impl FnOnce(&mut Command)) -> Served {
        let mut cmd = self.command();
        cmd.args(["serve", "--listen", "127.0.0.1:0"]);
        f(&mut cmd);
        Served::start(cmd)
    }
}

/// The server as a child process, its output collected line by line; killed when dropped.
pub struct Served {
    pub child: Child,
    pub base: String,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Served {
    fn start(mut cmd: Command) -> Served {
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let started = Instant::now();
        let port = loop {
            let found = lines.lock().unwrap().iter().find_map(|l| {
                l.strip_prefix("carevault is serving on https://127.0.0.1:").map(|p| p.trim().parse::<u16>().unwrap())
            });
            if let Some(port) = found {
                break port;
            }
            if started.elapsed() > Duration::from_secs(90) || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                panic!("server did not start: {:#?}", lines.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Served { child, base: format!("https://localhost:{port}"), lines }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGKILL: no drain, no flush.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub async fn login(&self, client: &reqwest::Client, username: &str) -> String {
        let r = client
            .post(self.url("/auth/login"))
            .json(&json!({"username": username, "password": PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "login of {username}");
        r.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tool the suite needs: present, or the test fails under `CI=true` and is skipped (with a line) otherwise.
pub fn require(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but {what} is not available: this test cannot be skipped");
    }
    eprintln!("skipping: {what} is not available");
    false
}
