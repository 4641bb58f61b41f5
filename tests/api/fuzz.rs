//! A property-based fuzzer over every route (issue 18 part 6), against the real binary over HTTPS: proptest
//! generates the method, the path (known templates with real, random, unicode, huge and hostile segments), the
//! query (known parameters, modifiers and prefixes with mutated values), headers and bodies (valid-ish FHIR
//! resources with values of the wrong type, huge, deeply nested or unicode values, unknown elements, broken
//! JSON). Canary strings go only where echoing them would be a leak (unknown element names and values, values
//! that cannot be valid, query values, headers, path segments), so the property is: no 5xx, and the canary in
//! no response status line, header or body, and in no line the server logs.
//!
//! `CAREVAULT_FUZZ_CASES` (default 1500 per backend, about 40 s each in CI) sets the case count; a
//! deeper run: `CAREVAULT_FUZZ_CASES=20000 cargo test --test api fuzz:: -- --nocapture`.
//! `CAREVAULT_FUZZ_SEED` (64 hex digits) replays a run; the seed used is printed.

use crate::helpers::PgDatabase;
use crate::process::{DataDir, Served};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{Value, json};
use std::sync::Mutex;

const CANARY: &str = "Qzx7Canary";

const TYPES: &[&str] = &[
    "Patient",
    "Practitioner",
    "CareTeam",
    "Encounter",
    "Observation",
    "Condition",
    "AllergyIntolerance",
    "MedicationRequest",
    "AuditEvent",
];

const PARAMS: &[&str] = &[
    "_id",
    "identifier",
    "name",
    "family",
    "given",
    "birthdate",
    "gender",
    "patient",
    "subject",
    "code",
    "date",
    "status",
    "clinical-status",
    "category",
    "participant",
    "agent",
    "action",
    "_count",
    "_elements",
    "_summary",
    "_sort",
    "_include",
    "_revinclude",
    "_total",
    "_lastUpdated",
    "_since",
    "_type",
    "_format",
    "_cursor",
];

const MODIFIERS: &[&str] = &["", "", "", ":exact", ":contains", ":missing", ":not", ":text", ":above", ":"];

/// One generated request.
#[derive(Debug, Clone)]
struct Case {
    method: &'static str,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
    /// 0: front desk, 1: clinician, 2: no token, 3: a forged token carrying the canary.
    who: usize,
}

fn pct(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~$".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unicode() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("Ñoño Zoë 山田 太郎 Müller".to_owned()),
        Just("\u{202e}evil\u{200b}\u{feff}".to_owned()),
        Just("e\u{301}\u{1F600}\u{10FFFF}".to_owned()),
        proptest::collection::vec(any::<char>(), 1..40).prop_map(|c| c.into_iter().collect()),
    ]
}

/// A value that is never stored or echoed legitimately.
fn canary_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(CANARY.to_owned()),
        Just(format!("ge{CANARY}")),
        Just(format!("http://x.example/{CANARY}|{CANARY}")),
        Just(format!("{CANARY}'; DROP TABLE resources; --")),
        Just(format!("Patient/{CANARY}")),
        unicode().prop_map(|u| format!("{u}{CANARY}{u}")),
        (1usize..4000).prop_map(|n| format!("{}{CANARY}", "x".repeat(n))),
    ]
}

fn segment(patient: String) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(patient),
        2 => Just("00000000-0000-4000-8000-000000000000".to_owned()),
        1 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string()),
        2 => canary_value(),
        1 => Just("../../../etc/passwd".to_owned()),
        1 => unicode(),
        1 => Just("".to_owned()),
        1 => (1usize..9000).prop_map(|n| "a".repeat(n)),
        1 => Just("1".to_owned()),
        1 => Just("-1".to_owned()),
    ]
}

/// The methods each path template answers (the others are tried too, less often).
fn methods_of(k: usize) -> &'static [&'static str] {
    match k {
        0..=2 => &["GET", "POST"],
        3..=5 => &["GET", "PUT", "DELETE"],
        8 | 12 | 14 => &["POST"],
        13 => &["POST", "GET"],
        _ => &["GET"],
    }
}

const ALL_METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];

fn path(patient: String) -> impl Strategy<Value = (usize, String)> {
    let t =
        prop_oneof![8 => proptest::sample::select(TYPES).prop_map(str::to_owned), 1 => canary_value(), 1 => unicode()];
    let id = segment(patient.clone());
    let vid = prop_oneof![Just("1".to_owned()), Just("2".to_owned()), Just("0".to_owned()), canary_value()];
    (0usize..16, t, id, vid).prop_map(|(k, t, id, vid)| {
        let (t, id, vid) = (pct(&t), pct(&id), pct(&vid));
        let p = match k {
            0..=2 => format!("/fhir/{t}"),
            3..=5 => format!("/fhir/{t}/{id}"),
            6 => format!("/fhir/{t}/{id}/_history"),
            7 => format!("/fhir/{t}/{id}/_history/{vid}"),
            8 => format!("/fhir/{t}/_search"),
            9 => format!("/fhir/Patient/{id}/$everything"),
            10 => format!("/fhir/Patient/{id}/$access-report"),
            11 => "/fhir/metadata".to_owned(),
            12 => "/auth/break-glass".to_owned(),
            13 => {
                ["/auth/login", "/auth/token", "/auth/revoke", "/auth/logout", "/auth/session"][id.len() % 5].to_owned()
            }
            14 => format!("/admin/alerts/{id}/ack"),
            _ => format!("/{t}/{id}"),
        };
        (k, p)
    })
}

fn query_value(patient: String) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => canary_value(),
        1 => Just(format!("Patient/{patient}")),
        1 => Just(patient),
        1 => proptest::sample::select(&["ge2020-01-01", "lt1900", "eq2026-13-45", "sa2020", "2020-01-01T25:61:00Z", "ap"][..]).prop_map(str::to_owned),
        1 => proptest::sample::select(&["0", "-1", "1", "100", "101", "99999999999999999999", "1e308", "NaN", "true", "count", "data"][..]).prop_map(str::to_owned),
        1 => (1usize..3000).prop_map(|n| vec!["a"; n].join(",")),
        1 => unicode(),
        1 => Just("%".to_owned()),
    ]
}

fn resource(canary_key: bool) -> impl Strategy<Value = Value> {
    let base = prop_oneof![
        Just(json!({"resourceType": "Patient", "name": [{"family": "Fuzz", "given": ["A"]}], "gender": "female",
            "birthDate": "1980-01-01", "identifier": [{"system": "urn:fuzz", "value": "1"}]})),
        Just(json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
            "valueQuantity": {"value": 120, "unit": "mmHg"}})),
        Just(json!({"resourceType": "CareTeam", "status": "active"})),
        Just(json!({"resourceType": "Practitioner", "name": [{"family": "Fuzz"}]})),
    ];
    let mutation = (0usize..14, canary_value(), unicode(), 1usize..300);
    (base, proptest::collection::vec(mutation, 1..4)).prop_map(move |(mut r, muts)| {
        for (m, canary, uni, n) in muts {
            let obj = r.as_object_mut().unwrap();
            match m {
                0 => {
                    let key = if canary_key { CANARY.to_owned() } else { format!("zz{}", n) };
                    obj.insert(key, json!(canary));
                }
                1 => match obj.get_mut("name").and_then(|n| n.get_mut(0)).and_then(Value::as_object_mut) {
                    Some(name) => {
                        name.insert(CANARY.to_owned(), json!(canary));
                    }
                    None => {
                        obj.insert(format!("{CANARY}Element"), json!({"value": canary}));
                    }
                },
                2 => {
                    obj.insert("gender".into(), json!(canary));
                }
                3 => {
                    obj.insert("birthDate".into(), json!(canary));
                }
                4 => {
                    obj.insert("resourceType".into(), json!(canary));
                }
                5 => {
                    obj.insert(
                        "name".into(),
                        [json!(5), json!("text"), json!({}), json!(null), json!([[[]]])][n % 5].clone(),
                    );
                }
                6 => {
                    obj.insert("status".into(), [json!(true), json!(canary), json!(1.5), json!([])][n % 4].clone());
                }
                7 => {
                    let mut deep = json!("x");
                    for _ in 0..n % 80 {
                        deep = json!({"extension": [{"url": "urn:x", "valueString": deep}]});
                    }
                    obj.insert("extension".into(), json!([{"url": "urn:deep", "extension": [deep]}]));
                }
                8 => {
                    obj.insert("name".into(), json!([{"family": "y".repeat(n * 3000)}]));
                }
                9 => {
                    obj.insert("name".into(), json!([{"family": uni, "given": [uni]}]));
                }
                10 => {
                    obj.insert("meta".into(), json!({"versionId": canary, "lastUpdated": canary}));
                }
                11 => {
                    obj.insert("valueQuantity".into(), json!({"value": canary}));
                }
                12 => {
                    obj.insert("subject".into(), json!({"reference": format!("{CANARY}/{canary}")}));
                }
                _ => {
                    obj.insert("id".into(), json!(canary));
                }
            }
        }
        r
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => resource(true).prop_map(|v| v.to_string().into_bytes()),
        1 => canary_value().prop_map(|c| format!("{{\"resourceType\": \"Patient\", \"name\": [{{\"family\": \"{c}").into_bytes()),
        1 => canary_value().prop_map(|c| format!("username={c}&password={c}&grant_type={c}&refresh_token={c}&token={c}").into_bytes()),
        1 => canary_value().prop_map(|c| json!({"username": c, "password": c}).to_string().into_bytes()),
        1 => canary_value().prop_map(|c| json!({"patient": format!("Patient/{c}"), "reason": c, "code": c}).to_string().into_bytes()),
        1 => (1usize..2000).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes()),
        1 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(|mut b| { b.extend_from_slice(CANARY.as_bytes()); b }),
    ]
}

fn headers() -> impl Strategy<Value = Vec<(&'static str, String)>> {
    let one = prop_oneof![
        (
            Just("if-match"),
            prop_oneof![
                Just("W/\"1\"".to_owned()),
                Just("W/\"2\"".to_owned()),
                canary_value().prop_map(|c| format!("W/\"{c}\""))
            ]
        ),
        (Just("if-none-exist"), canary_value().prop_map(|c| format!("identifier={c}"))),
        (
            Just("content-type"),
            proptest::sample::select(
                &[
                    "application/fhir+json",
                    "application/json",
                    "application/x-www-form-urlencoded",
                    "text/plain",
                    "application/fhir+json; charset=latin1",
                    "multipart/form-data; boundary=Qzx7Canary"
                ][..]
            )
            .prop_map(str::to_owned)
        ),
        (Just("accept"), prop_oneof![Just("application/fhir+xml".to_owned()), canary_value()]),
        (Just("prefer"), canary_value()),
        (Just("x-forwarded-for"), prop_oneof![canary_value(), Just("10.0.0.1, 127.0.0.1".to_owned())]),
        (Just("cookie"), canary_value().prop_map(|c| format!("session={c}"))),
        (Just("x-request-id"), canary_value()),
        (Just("origin"), canary_value().prop_map(|c| format!("https://{c}.example"))),
    ];
    proptest::collection::vec(one, 0..4)
}

fn case(patient: String) -> impl Strategy<Value = Case> {
    let method = (0usize..10, 0usize..ALL_METHODS.len());
    let query = proptest::collection::vec(
        (
            proptest::sample::select(PARAMS),
            proptest::sample::select(MODIFIERS),
            query_value(patient.clone()),
            0usize..12,
        ),
        0..5,
    )
    .prop_map(|qs| {
        qs.into_iter()
            .map(|(p, m, v, k)| if k == 0 { (format!("{CANARY}{m}"), v) } else { (format!("{p}{m}"), v) })
            .collect::<Vec<_>>()
    });
    (method, path(patient), query, headers(), proptest::option::weighted(0.7, body()), 0usize..10).prop_map(
        |((valid, m), (k, path), query, headers, body, who)| Case {
            method: if valid < 9 { methods_of(k)[m % methods_of(k).len()] } else { ALL_METHODS[m] },
            path,
            query,
            headers,
            body,
            who: match who {
                0..=4 => 0,
                5..=7 => 1,
                8 => 2,
                _ => 3,
            },
        },
    )
}

/// What the run saw, for the FIGURE line.
#[derive(Debug, Default)]
struct Tally {
    cases: usize,
    statuses: std::collections::BTreeMap<u16, usize>,
    with_canary: usize,
}

async fn send(
    client: &reqwest::Client,
    server: &Served,
    tokens: &[String; 2],
    c: &Case,
) -> Result<(u16, String), String> {
    let mut url = server.url(&c.path);
    if !c.query.is_empty() {
        url.push('?');
        url.push_str(&serde_urlencoded::to_string(&c.query).unwrap());
    }
    let method = reqwest::Method::from_bytes(c.method.as_bytes()).unwrap();
    let mut req = client.request(method, &url).timeout(std::time::Duration::from_secs(60));
    match c.who {
        0 | 1 => req = req.bearer_auth(&tokens[c.who]),
        3 => req = req.header("authorization", format!("Bearer eyJhbGciOiJFZERTQSJ9.{CANARY}.{CANARY}")),
        _ => {}
    }
    let mut typed = false;
    for (k, v) in &c.headers {
        typed |= *k == "content-type";
        if let Ok(v) = reqwest::header::HeaderValue::from_str(v) {
            req = req.header(*k, v);
        }
    }
    if let Some(b) = &c.body {
        if !typed {
            req = req.header("content-type", "application/fhir+json");
        }
        req = req.body(b.clone());
    }
    let resp = req.send().await.map_err(|e| format!("no answer: {e}"))?;
    let status = resp.status().as_u16();
    let mut seen = format!("{status} {}\n", resp.status().canonical_reason().unwrap_or(""));
    for (k, v) in resp.headers() {
        seen.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    let bytes = resp.bytes().await.map_err(|e| format!("body: {e}"))?;
    seen.push_str(&String::from_utf8_lossy(&bytes));
    Ok((status, seen))
}

fn seed() -> [u8; 32] {
    if let Ok(hex) = std::env::var("CAREVAULT_FUZZ_SEED") {
        let bytes =
            data_encoding::HEXLOWER_PERMISSIVE.decode(hex.as_bytes()).expect("CAREVAULT_FUZZ_SEED: 64 hex digits");
        return bytes.try_into().expect("CAREVAULT_FUZZ_SEED: 64 hex digits");
    }
    rand::random()
}

async fn fuzz(database_url: String) {
    let cases: u32 = std::env::var("CAREVAULT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1500);
    let tmp = tempfile::tempdir().unwrap();
    let data = DataDir::new(tmp.path(), &database_url, "");
    let server = data.serve();
    let client = data.client();
    data.add_user("fuzz-desk", "front_desk", None);
    let desk = server.login(&client, "fuzz-desk").await;
    let created = |body: Value| {
        let (client, desk, url) =
            (client.clone(), desk.clone(), server.url(&format!("/fhir/{}", body["resourceType"].as_str().unwrap())));
        async move {
            let r = client
                .post(url)
                .bearer_auth(&desk)
                .header("content-type", "application/fhir+json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
        }
    };
    let patient = created(json!({"resourceType": "Patient", "name": [{"family": "Seed"}]})).await;
    let practitioner = created(json!({"resourceType": "Practitioner", "name": [{"family": "Seed"}]})).await;
    created(
        json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": format!("Patient/{patient}")},
        "participant": [{"member": {"reference": format!("Practitioner/{practitioner}")}}]}),
    )
    .await;
    data.add_user("fuzz-clinician", "clinician", Some(("--practitioner", &practitioner)));
    let tokens = Mutex::new([desk, server.login(&client, "fuzz-clinician").await]);

    let seed = seed();
    eprintln!("fuzz seed (CAREVAULT_FUZZ_SEED): {}", data_encoding::HEXLOWER.encode(&seed));
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 64, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    let tally = Mutex::new(Tally::default());
    let handle = tokio::runtime::Handle::current();
    let started = std::time::Instant::now();
    let result = tokio::task::block_in_place(|| {
        // The failure (with the shrunk case) is printed whole below.
        runner
            .run(&case(patient.clone()), |c| {
                let now = tokens.lock().unwrap().clone();
                let (status, seen) = handle.block_on(send(&client, &server, &now, &c)).map_err(TestCaseError::fail)?;
                // A generated logout or revocation may have ended a session: sign in again.
                if c.who < 2 && (c.path.starts_with("/auth/logout") || c.path.starts_with("/auth/revoke")) {
                    let user = ["fuzz-desk", "fuzz-clinician"][c.who];
                    tokens.lock().unwrap()[c.who] = handle.block_on(server.login(&client, user));
                }
                {
                    let mut t = tally.lock().unwrap();
                    t.cases += 1;
                    *t.statuses.entry(status).or_default() += 1;
                    let sent = format!(
                        "{} {:?} {:?} {} {}",
                        c.path,
                        c.query,
                        c.headers,
                        String::from_utf8_lossy(c.body.as_deref().unwrap_or_default()),
                        c.who
                    );
                    if sent.contains(CANARY) || c.who == 3 {
                        t.with_canary += 1;
                    }
                }
                prop_assert!(status < 500, "{status} for {c:?}:\n{seen}");
                prop_assert!(
                    !seen.to_lowercase().contains(&CANARY.to_lowercase()),
                    "echoed the canary for {c:?}:\n{seen}"
                );
                Ok(())
            })
            .map_err(|e| e.to_string())
    });
    let elapsed = started.elapsed();
    if let Err(e) = result {
        panic!("{e}");
    }
    let lines = server.output();
    let leaked: Vec<&String> = lines.iter().filter(|l| l.to_lowercase().contains(&CANARY.to_lowercase())).collect();
    assert!(leaked.is_empty(), "log lines carry the canary: {leaked:#?}");
    let t = tally.lock().unwrap();
    eprintln!(
        "FIGURE fuzz ({}): {} bad inputs tried in {:.0} s ({} carrying the canary), statuses {:?}, 0 5xx, 0 echoes, \
         {} log lines without the canary",
        if database_url.starts_with("sqlite") { "sqlite" } else { "postgres" },
        t.cases,
        elapsed.as_secs_f64(),
        t.with_canary,
        t.statuses,
        lines.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_survives_generated_input_without_5xx_or_echo_sqlite() {
    let tmp = tempfile::tempdir().unwrap();
    fuzz(format!("sqlite://{}", tmp.path().join("fuzz.db").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_survives_generated_input_without_5xx_or_echo_postgres() {
    let Some(pg) = PgDatabase::create() else { return };
    fuzz(pg.url.clone()).await;
}
