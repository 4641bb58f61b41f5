//! The load driver of `benches/load/run.sh` (method and results: `docs/benchmarks.md`).
//!
//! `load setup` signs in as a front-desk user and creates a Practitioner, `--patients` Patients and one active
//! CareTeam per patient linking them, then prints `{"practitioner": ID, "patients": [IDS]}`.
//! `load run` signs in as a clinician of that practitioner and, for `--secs` seconds each after one second of
//! warm-up, keeps `--concurrency` HTTPS connections busy with (1) `POST /fhir/Observation` for random patients of
//! the care team, then (2) `GET /fhir/Observation/{id}` of random observations created in (1). It prints one JSON
//! line per phase: requests, errors, requests/s, p50 and p99 latency. The TLS client trusts only `--ca` (the
//! server's certificate); verification stays on.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a measurement tool, not service code

use clap::{Parser, Subcommand};
use rand::Rng;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// `https://127.0.0.1:PORT`
    #[arg(long)]
    base: String,
    /// PEM certificate the server presents.
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    user: String,
    /// File holding the password (one line).
    #[arg(long)]
    password_file: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Setup {
        #[arg(long, default_value_t = 200)]
        patients: usize,
    },
    Run {
        /// The JSON printed by `setup`.
        #[arg(long)]
        setup: PathBuf,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// A label copied into the output lines.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// A fixed mixed load for `--minutes`: per cycle one create, two reads and one search of Observations, at
    /// `--rate` requests per second in all from `--concurrency` tasks. Prints one JSON line per minute (requests,
    /// errors, p50/p99, the server's RSS read from `/proc/PID/status`) and a summary line; exits 1 on any error.
    Soak {
        #[arg(long)]
        setup: PathBuf,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Seconds per sample (60 for the documented soak; shorter for a quick check).
        #[arg(long, default_value_t = 60)]
        sample_secs: u64,
        /// The server's process id (its RSS is sampled).
        #[arg(long)]
        pid: u32,
    },
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: std::sync::RwLock<String>,
    refresh: std::sync::Mutex<String>,
}

impl Api {
    async fn login(args: &Args) -> Api {
        let pem = std::fs::read(&args.ca).expect("read --ca");
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("PEM certificate"))
            .tls_built_in_root_certs(false)
            .pool_max_idle_per_host(1024)
            .build()
            .unwrap();
        let password = std::fs::read_to_string(&args.password_file).expect("read --password-file");
        let resp = http
            .post(format!("{}/auth/login", args.base))
            .json(&json!({ "username": args.user, "password": password.trim_end() }))
            .send()
            .await
            .expect("login request");
        assert_eq!(resp.status(), 200, "login of {}", args.user);
        let body: Value = resp.json().await.unwrap();
        Api {
            http,
            base: args.base.clone(),
            token: std::sync::RwLock::new(body["access_token"].as_str().unwrap().to_owned()),
            refresh: std::sync::Mutex::new(body["refresh_token"].as_str().unwrap_or_default().to_owned()),
        }
    }

    fn token(&self) -> String {
        self.token.read().unwrap().clone()
    }

    /// Rotates the refresh token and takes the new access token (access tokens live 5 minutes by default).
    async fn refresh(&self) {
        let refresh = self.refresh.lock().unwrap().clone();
        let resp = self
            .http
            .post(format!("{}/auth/token", self.base))
            .form(&[("grant_type", "refresh_token"), ("refresh_token", refresh.as_str())])
            .send()
            .await
            .expect("refresh request");
        assert_eq!(resp.status(), 200, "token refresh");
        let body: Value = resp.json().await.unwrap();
        *self.token.write().unwrap() = body["access_token"].as_str().unwrap().to_owned();
        *self.refresh.lock().unwrap() = body["refresh_token"].as_str().unwrap().to_owned();
    }

    async fn create(&self, rtype: &str, body: &Value) -> Result<String, u16> {
        let resp = self
            .http
            .post(format!("{}/fhir/{rtype}", self.base))
            .bearer_auth(self.token())
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|_| 0u16)?;
        if resp.status() != 201 {
            return Err(resp.status().as_u16());
        }
        let v: Value = resp.json().await.map_err(|_| 1u16)?;
        Ok(v["id"].as_str().unwrap_or_default().to_owned())
    }

    async fn search(&self, rtype: &str, query: &str) -> Result<(), u16> {
        let resp = self
            .http
            .get(format!("{}/fhir/{rtype}?{query}", self.base))
            .bearer_auth(self.token())
            .send()
            .await
            .map_err(|_| 0u16)?;
        let status = resp.status().as_u16();
        resp.bytes().await.map_err(|_| 1u16)?;
        if status == 200 { Ok(()) } else { Err(status) }
    }

    async fn read(&self, rtype: &str, id: &str) -> Result<(), u16> {
        let resp = self
            .http
            .get(format!("{}/fhir/{rtype}/{id}", self.base))
            .bearer_auth(self.token())
            .send()
            .await
            .map_err(|_| 0u16)?;
        let ok = resp.status() == 200;
        let status = resp.status().as_u16();
        resp.bytes().await.map_err(|_| 1u16)?;
        if ok { Ok(()) } else { Err(status) }
    }
}

fn patient(i: usize) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{ "system": "urn:carevault:bench:mrn", "value": format!("MRN{i:06}") }],
        "name": [{ "family": format!("Bench{i}"), "given": ["Load", "Test"] }],
        "telecom": [{ "system": "phone", "value": "555-0100", "use": "home" }],
        "gender": if i.is_multiple_of(2) { "female" } else { "male" },
        "birthDate": format!("19{:02}-0{}-1{}", 40 + i % 60, 1 + i % 9, i % 10),
        "address": [{ "line": [format!("{i} Benchmark Way")], "city": "Springfield", "postalCode": "99999" }]
    })
}

/// A blood-pressure-like Observation: about 0.8 KB of JSON, 8 PHI elements.
fn observation(patient: &str, n: u64) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs" }] }],
        "code": { "coding": [{ "system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel" }] },
        "subject": { "reference": format!("Patient/{patient}") },
        "effectiveDateTime": "2026-11-28T09:30:00Z",
        "component": [
            { "code": { "coding": [{ "system": "http://loinc.org", "code": "8480-6" }] },
              "valueQuantity": { "value": 100 + n % 60, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]" } },
            { "code": { "coding": [{ "system": "http://loinc.org", "code": "8462-4" }] },
              "valueQuantity": { "value": 60 + n % 40, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]" } }
        ],
        "note": [{ "text": "Seated, left arm, after five minutes of rest." }]
    })
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    statuses: Vec<u16>,
    ids: Vec<String>,
}

/// Runs `op` from `concurrency` tasks until `warmup + secs` has passed; counts only what finished after warm-up.
async fn phase<F, Fut>(concurrency: usize, warmup: Duration, secs: u64, op: F) -> (Tally, f64)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Option<String>, u16>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut n = t as u64;
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let result = op(n).await;
                let done = Instant::now();
                n += concurrency as u64;
                if let Ok(Some(id)) = &result {
                    tally.ids.push(id.clone());
                }
                if began < measure_from || done > end {
                    continue;
                }
                match result {
                    Ok(_) => tally.latencies_us.push(u32::try_from((done - began).as_micros()).unwrap_or(u32::MAX)),
                    Err(status) => {
                        tally.errors += 1;
                        tally.statuses.push(status);
                    }
                }
            }
            tally
        }));
    }
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await.unwrap();
        all.latencies_us.extend(t.latencies_us);
        all.errors += t.errors;
        all.statuses.extend(t.statuses);
        all.ids.extend(t.ids);
    }
    all.latencies_us.sort_unstable();
    (all, secs as f64)
}

fn report(label: &str, op: &str, concurrency: usize, tally: &Tally, secs: f64) {
    let pct = |p: f64| {
        let l = &tally.latencies_us;
        if l.is_empty() {
            return 0.0;
        }
        let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
        f64::from(l[i]) / 1000.0
    };
    let mut statuses = tally.statuses.clone();
    statuses.sort_unstable();
    statuses.dedup();
    println!(
        "{}",
        json!({
            "label": label, "op": op, "concurrency": concurrency, "secs": secs,
            "ok": tally.latencies_us.len(), "errors": tally.errors, "error_statuses": statuses,
            "rps": tally.latencies_us.len() as f64 / secs,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99),
        })
    );
}

/// Resident set size of a process in KiB (`VmRSS`), 0 when it cannot be read.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Default)]
struct Sample {
    latencies_us: Vec<u32>,
    errors: u64,
    statuses: Vec<u16>,
    behind: u64,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

async fn soak(
    api: Arc<Api>,
    patients: Arc<Vec<String>>,
    concurrency: usize,
    rate: f64,
    minutes: u64,
    sample_secs: u64,
    pid: u32,
) -> bool {
    use std::sync::Mutex;
    let samples = u64::max(1, minutes * 60 / sample_secs);
    let current = Arc::new(Mutex::new(Sample::default()));
    let start = Instant::now();
    let end = start + Duration::from_secs(samples * sample_secs);
    let period = Duration::from_secs_f64(concurrency as f64 / rate);
    let refresher = {
        let api = api.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(120)).await;
                api.refresh().await;
            }
        })
    };
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (api, patients, current) = (api.clone(), patients.clone(), current.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut mine: Vec<String> = Vec::new();
            let mut n = t as u64;
            let mut last = Instant::now();
            loop {
                tick.tick().await;
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let late = began.duration_since(last) > period * 2;
                last = began;
                let p = &patients[rand::thread_rng().gen_range(0..patients.len())];
                let result = match n % 4 {
                    0 => api.create("Observation", &observation(p, n)).await.map(|id| mine.push(id)),
                    1 | 2 if !mine.is_empty() => {
                        let id = &mine[rand::thread_rng().gen_range(0..mine.len())];
                        api.read("Observation", id).await
                    }
                    _ => api.search("Observation", &format!("patient={p}&_count=10")).await,
                };
                n += 1;
                let micros = u32::try_from(began.elapsed().as_micros()).unwrap_or(u32::MAX);
                let mut s = current.lock().unwrap();
                if late {
                    s.behind += 1;
                }
                match result {
                    Ok(()) => s.latencies_us.push(micros),
                    Err(status) => {
                        s.errors += 1;
                        s.statuses.push(status);
                    }
                }
            }
        }));
    }
    let (mut total, mut errors) = (0usize, 0u64);
    let (mut rss, mut p99s) = (Vec::new(), Vec::new());
    for i in 1..=samples {
        tokio::time::sleep_until((start + Duration::from_secs(i * sample_secs)).into()).await;
        let mut s = std::mem::take(&mut *current.lock().unwrap());
        s.latencies_us.sort_unstable();
        s.statuses.sort_unstable();
        s.statuses.dedup();
        let r = rss_kib(pid);
        let (p50, p99) = (percentile(&s.latencies_us, 0.50), percentile(&s.latencies_us, 0.99));
        total += s.latencies_us.len();
        errors += s.errors;
        rss.push(r);
        p99s.push(p99);
        println!(
            "{}",
            json!({
                "sample": i, "secs": sample_secs, "ok": s.latencies_us.len(), "errors": s.errors,
                "error_statuses": s.statuses, "late_ticks": s.behind, "rps": s.latencies_us.len() as f64 / sample_secs as f64,
                "p50_ms": p50, "p99_ms": p99, "rss_kib": r,
            })
        );
    }
    for t in tasks {
        t.await.unwrap();
    }
    refresher.abort();
    let min_rss = rss.iter().copied().min().unwrap_or(0);
    let max_rss = rss.iter().copied().max().unwrap_or(0);
    println!(
        "{}",
        json!({
            "summary": true, "samples": samples, "ok": total, "errors": errors,
            "rss_first_kib": rss.first(), "rss_last_kib": rss.last(), "rss_min_kib": min_rss, "rss_max_kib": max_rss,
            "p99_first_ms": p99s.first(), "p99_last_ms": p99s.last(),
            "p99_max_ms": p99s.iter().copied().fold(0.0_f64, f64::max),
        })
    );
    errors == 0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let api = Arc::new(Api::login(&args).await);
    match &args.command {
        Cmd::Setup { patients } => {
            let pr = json!({ "resourceType": "Practitioner", "name": [{ "family": "Bench", "given": ["Clinician"] }] });
            let practitioner = api.create("Practitioner", &pr).await.expect("create Practitioner");
            let mut ids = Vec::with_capacity(*patients);
            for i in 0..*patients {
                let id = api.create("Patient", &patient(i)).await.expect("create Patient");
                let team = json!({
                    "resourceType": "CareTeam", "status": "active",
                    "subject": { "reference": format!("Patient/{id}") },
                    "participant": [{ "member": { "reference": format!("Practitioner/{practitioner}") } }]
                });
                api.create("CareTeam", &team).await.expect("create CareTeam");
                ids.push(id);
            }
            println!("{}", json!({ "practitioner": practitioner, "patients": ids }));
        }
        Cmd::Run { setup, concurrency, secs, label } => {
            let setup: Value = serde_json::from_slice(&std::fs::read(setup).expect("read --setup")).unwrap();
            let patients: Arc<Vec<String>> = Arc::new(
                setup["patients"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_owned()).collect(),
            );
            let warmup = Duration::from_secs(1);
            let (api2, pats) = (api.clone(), patients.clone());
            let (created, s) = phase(*concurrency, warmup, *secs, move |n| {
                let (api, pats) = (api2.clone(), pats.clone());
                async move {
                    let p = &pats[rand::thread_rng().gen_range(0..pats.len())];
                    api.create("Observation", &observation(p, n)).await.map(Some)
                }
            })
            .await;
            report(label, "create", *concurrency, &created, s);
            assert!(!created.ids.is_empty(), "no Observation was created: nothing to read");
            let ids = Arc::new(created.ids);
            let (tally, s) = phase(*concurrency, warmup, *secs, move |_| {
                let (api, ids) = (api.clone(), ids.clone());
                async move {
                    let id = &ids[rand::thread_rng().gen_range(0..ids.len())];
                    api.read("Observation", id).await.map(|()| None)
                }
            })
            .await;
            report(label, "read", *concurrency, &tally, s);
        }
        Cmd::Soak { setup, concurrency, rate, minutes, sample_secs, pid } => {
            let setup: Value = serde_json::from_slice(&std::fs::read(setup).expect("read --setup")).unwrap();
            let patients: Arc<Vec<String>> = Arc::new(
                setup["patients"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_owned()).collect(),
            );
            if !soak(api, patients, *concurrency, *rate, *minutes, *sample_secs, *pid).await {
                std::process::exit(1);
            }
        }
    }
}
