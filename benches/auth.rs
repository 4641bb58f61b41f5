//! Costs on the login and request paths: access-token verify (every request; goal < 50 µs), issue (login,
//! refresh) and one argon2id hash with the production parameters (login).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use carevault::access::Action;
use carevault::auth::Principal;
use carevault::auth::password::{hash_password, verify_password};
use carevault::auth::scope::ScopeSet;
use carevault::auth::token::{DEFAULT_TTL, SigningKey, TokenKeys};
use carevault::role::Role;
use criterion::{Criterion, criterion_group, criterion_main};
use secrecy::SecretString;
use time::macros::datetime;
use uuid::Uuid;

fn tokens(c: &mut Criterion) {
    let now = datetime!(2026-01-01 08:00 UTC);
    let keys = TokenKeys::new("https://carevault.test", "carevault", vec![SigningKey::generate(now).unwrap()]).unwrap();
    let principal = Principal {
        subject: "user-1".into(),
        username: None,
        roles: vec![Role::Clinician],
        practitioner: Some(Uuid::new_v4()),
        patient: None,
        session_id: Some(Uuid::new_v4()),
        issuer: "https://carevault.test".into(),
        client_id: None,
        scopes: None,
        context_patient: None,
    };
    let (token, _) = keys.issue(&principal, now, DEFAULT_TTL).unwrap();
    // Warm: the token was seen before (its signature check remembered, only the time checks run).
    c.bench_function("token verify", |b| b.iter(|| keys.verify(black_box(&token), now).unwrap()));
    // Cold: a token never seen (Ed25519 verification, claims parsed).
    c.bench_function("token verify, first sight", |b| {
        b.iter_batched(
            || keys.issue(&principal, now, DEFAULT_TTL).unwrap().0,
            |t| keys.verify(black_box(&t), now).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("token issue", |b| b.iter(|| keys.issue(black_box(&principal), now, DEFAULT_TTL).unwrap()));
    // A SMART token: scopes parsed into the principal, then the scope check of one interaction.
    let scoped = Principal {
        scopes: Some(std::sync::Arc::new(ScopeSet::parse(
            "launch/patient openid fhirUser offline_access patient/Patient.rs patient/Observation.rs \
             patient/Condition.rs?category=problem-list-item user/Practitioner.rs",
        ))),
        context_patient: Some(Uuid::new_v4()),
        client_id: Some("app-0123456789abcdef".into()),
        ..principal.clone()
    };
    let (token, _) = keys.issue(&scoped, now, DEFAULT_TTL).unwrap();
    c.bench_function("token verify with SMART scopes, first sight", |b| {
        b.iter_batched(
            || keys.issue(&scoped, now, DEFAULT_TTL).unwrap().0,
            |t| {
                let p = keys.verify(black_box(&t), now).unwrap().into_principal();
                black_box(p.scopes.as_deref().unwrap().permit("Observation", Action::Search, true))
            },
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("token verify with SMART scopes", |b| {
        b.iter(|| {
            let p = keys.verify(black_box(&token), now).unwrap().into_principal();
            let scopes = p.scopes.as_deref().unwrap();
            black_box(scopes.permit("Observation", Action::Search, p.context_patient.is_some()))
        })
    });
}

fn passwords(c: &mut Criterion) {
    let pw = SecretString::from("correct horse battery staple".to_owned());
    let phc = hash_password(&pw).unwrap();
    let mut g = c.benchmark_group("argon2id m=19456 t=2 p=1");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    g.bench_function("hash", |b| b.iter(|| hash_password(black_box(&pw)).unwrap()));
    g.bench_function("verify (known user)", |b| b.iter(|| verify_password(Some(&phc), black_box(&pw))));
    g.bench_function("verify (unknown user, dummy)", |b| b.iter(|| verify_password(None, black_box(&pw))));
    g.finish();
}

criterion_group!(benches, tokens, passwords);
criterion_main!(benches);
