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
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
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
        Api { http, base: args.base.clone(), token: body["access_token"].as_str().unwrap().to_owned() }
    }

    async fn create(&self, rtype: &str, body: &Value) -> Result<String, u16> {
        let resp = self
            .http
            .post(format!("{}/fhir/{rtype}", self.base))
            .bearer_auth(&self.token)
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

    async fn read(&self, rtype: &str, id: &str) -> Result<(), u16> {
        let resp = self
            .http
            .get(format!("{}/fhir/{rtype}/{id}", self.base))
            .bearer_auth(&self.token)
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
    }
}
