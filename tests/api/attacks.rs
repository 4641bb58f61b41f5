//! Issue 18, part 2: races and throttling under attack, over real HTTPS on both backends.
//! - concurrent refreshes with one refresh token: exactly one wins, the others are reuse (session revoked);
//! - parallel wrong passwords and client secrets: at most one argon2 check in flight per account, so a burst
//!   gets no more real checks than the free failures before backoff;
//! - throttled attempts are audited and fire the failed-login alert;
//! - throttle keys are keyed hashes (no attempted name at rest);
//! - `X-Forwarded-For` is believed only from `network.trusted_proxies`;
//! - failures from elsewhere do not lock an account out of an address it signed in from.
//!
//! The figures these tests print (`FIGURE …`) are quoted in docs/security-testing.md.

use crate::both_backends_with;
use crate::helpers::{PASSWORD, TestApp};
use carevault::monitor::rules;
use carevault::role::Role;
use carevault::store::schema::{audit_events, login_failures};
use diesel::prelude::*;
use futures_util::future::join_all;
use serde_json::{Value, json};
use time::Duration;

const PROXY: &str = "[network]\ntrusted_proxies = [\"127.0.0.1\"]\n";
const ALERT_10: &str = "[monitor]\nfailed_logins_threshold = 10\n";

async fn login_status(app: &TestApp, username: &str, password: &str, from: Option<&str>) -> u16 {
    let mut req = app.client.post(app.url("/auth/login")).json(&json!({"username": username, "password": password}));
    if let Some(ip) = from {
        req = req.header("x-forwarded-for", ip);
    }
    req.send().await.unwrap().status().as_u16()
}

async fn refresh(app: &TestApp, token: &str) -> (u16, Value) {
    let r = app
        .client
        .post(app.url("/auth/token"))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", token)])
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn count_failures(app: &TestApp, detail: Option<&str>) -> usize {
    let mut conn = app.state.db.conn().unwrap();
    let bodies: Vec<String> = audit_events::table
        .filter(audit_events::kind.eq("login-failure"))
        .select(audit_events::body)
        .load(&mut conn)
        .unwrap();
    bodies.iter().filter(|b| detail.is_none_or(|d| serde_json::from_str::<Value>(b).unwrap()["detail"] == d)).count()
}

both_backends_with!(concurrent_refreshes_exactly_one_wins, "", |app: TestApp| async move {
    app.add_user("carol", Role::FrontDesk, None, None);
    const ROUNDS: usize = 5;
    const PARALLEL: usize = 8;
    for round in 0..ROUNDS {
        let s = app.login_as("carol").await;
        let results = join_all((0..PARALLEL).map(|_| refresh(&app, &s.refresh))).await;
        let statuses: Vec<u16> = results.iter().map(|(s, _)| *s).collect();
        let winners: Vec<&Value> = results.iter().filter(|(s, _)| *s == 200).map(|(_, b)| b).collect();
        assert_eq!(winners.len(), 1, "round {round}: exactly one refresh wins: {statuses:?}");
        for (status, body) in results.iter().filter(|(s, _)| *s != 200) {
            assert_eq!(*status, 400, "round {round}: the others are refused, not 500: {statuses:?}");
            assert_eq!(body["error"], "invalid_grant");
        }
        // The losers presented a spent token: reuse, so the whole session (the winner's too) is over.
        let winner = winners[0];
        let (status, _) = refresh(&app, winner["refresh_token"].as_str().unwrap()).await;
        assert_eq!(status, 400, "round {round}: the winner's new refresh token died with the session");
        app.clock.advance(Duration::seconds(6));
        let r = app
            .client
            .get(app.url("/fhir/Practitioner"))
            .bearer_auth(winner["access_token"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "round {round}: the session is revoked");
    }
    let mut conn = app.state.db.conn().unwrap();
    let reuse: i64 = audit_events::table
        .filter(audit_events::kind.eq("refresh"))
        .filter(audit_events::body.like("%refresh-token-reuse%"))
        .count()
        .get_result(&mut conn)
        .unwrap();
    assert!(reuse >= i64::try_from(ROUNDS).unwrap(), "each round audited as reuse: {reuse}");
    eprintln!("FIGURE refresh-race backend={:?} rounds={ROUNDS} parallel={PARALLEL} winners_per_round=1", app.backend);
});

both_backends_with!(parallel_wrong_passwords_get_at_most_five_argon2_checks, "", |app: TestApp| async move {
    app.add_user("frank", Role::Billing, None, None);
    const PARALLEL: usize = 150;
    let before_checks = app.state.auth.password_checks();
    let before_failures = count_failures(&app, None);
    let statuses = join_all((0..PARALLEL).map(|i| {
        let app = &app;
        async move { login_status(app, "frank", &format!("wrong password {i}"), None).await }
    }))
    .await;
    let checks = app.state.auth.password_checks() - before_checks;
    let unauthorized = statuses.iter().filter(|s| **s == 401).count();
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    eprintln!(
        "FIGURE login-burst backend={:?} parallel={PARALLEL} argon2={checks} 401={unauthorized} 429={throttled}",
        app.backend
    );
    assert_eq!(unauthorized + throttled, PARALLEL, "only 401 and 429: {statuses:?}");
    assert!(checks <= 5, "{checks} argon2 checks for {PARALLEL} parallel wrong passwords");
    assert_eq!(usize::try_from(checks).unwrap(), unauthorized);
    assert_eq!(count_failures(&app, None) - before_failures, PARALLEL, "every attempt audited, throttled ones too");
    // Sequential wrong passwords until the backoff starts (a burst may end before 5 were verified): still
    // no more than 5 real checks in all.
    let mut n = 0;
    while login_status(&app, "frank", "still wrong", None).await == 401 {
        n += 1;
        assert!(n <= 5, "throttling never started");
    }
    assert!(app.state.auth.password_checks() - before_checks <= 5);
    // The right password waits out the backoff, then works.
    assert_eq!(login_status(&app, "frank", PASSWORD, None).await, 429);
    app.clock.advance(Duration::minutes(16));
    assert_eq!(login_status(&app, "frank", PASSWORD, None).await, 200);
});

both_backends_with!(parallel_wrong_client_secrets_get_at_most_five_argon2_checks, "", |app: TestApp| async move {
    use carevault::auth::service::{NewAccount, create_account};
    {
        let mut conn = app.state.db.conn().unwrap();
        let new = NewAccount {
            username: "svc-lab".into(),
            kind: "service",
            role: Role::Admin,
            practitioner: None,
            patient: None,
        };
        create_account(
            &mut conn,
            &new,
            &secrecy::SecretString::from("s3cret-s3cret-s3cret".to_owned()),
            crate::helpers::start_time(),
        )
        .unwrap();
    }
    const PARALLEL: usize = 60;
    let before = app.state.auth.password_checks();
    let statuses = join_all((0..PARALLEL).map(|i| {
        let app = &app;
        async move {
            let secret = format!("wrong-{i}");
            let form =
                [("grant_type", "client_credentials"), ("client_id", "svc-lab"), ("client_secret", secret.as_str())];
            app.client.post(app.url("/auth/token")).form(&form).send().await.unwrap().status().as_u16()
        }
    }))
    .await;
    let checks = app.state.auth.password_checks() - before;
    eprintln!("FIGURE client-burst backend={:?} parallel={PARALLEL} argon2={checks}", app.backend);
    assert!(statuses.iter().all(|s| *s == 401 || *s == 429), "{statuses:?}");
    assert!(checks <= 5, "{checks} argon2 checks for {PARALLEL} parallel wrong client secrets");
    assert_eq!(count_failures(&app, None), PARALLEL, "every attempt audited");
});

both_backends_with!(throttled_attempts_fire_the_failed_login_alert, ALERT_10, |app: TestApp| async move {
    app.add_user("dave", Role::Nurse, Some("6f1c1d7a-7a53-4d1e-9a51-7f3f0b7a0c11"), None);
    let mut statuses = Vec::new();
    for i in 0..20 {
        statuses.push(login_status(&app, "dave", &format!("guess {i}"), None).await);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 401).count(), 5, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 15, "{statuses:?}");
    assert_eq!(count_failures(&app, Some("throttled")), 15, "throttled attempts are audited");
    app.settle_monitor().await;
    let account = app.alerts(rules::FAILED_LOGINS_ACCOUNT);
    assert_eq!(account.len(), 1, "20 attempts, threshold 10: the account rule fires");
    assert_eq!(account[0].count, 20);
    let address = app.alerts(rules::FAILED_LOGINS_ADDRESS);
    assert_eq!((address.len(), address[0].count), (1, 20));
});

both_backends_with!(throttle_keys_are_keyed_hashes, "", |app: TestApp| async move {
    for name in ["CANARY-jane.doe", "CANARY pw typed as name"] {
        assert_eq!(login_status(&app, name, "whatever CANARY", None).await, 401);
    }
    let mut conn = app.state.db.conn().unwrap();
    let keys: Vec<String> = login_failures::table.select(login_failures::key).load(&mut conn).unwrap();
    assert!(!keys.is_empty());
    for key in &keys {
        assert!(key.len() == 64 && key.chars().all(|c| c.is_ascii_hexdigit()), "not a keyed hash: {key}");
        assert!(!key.contains("CANARY") && !key.contains("127.0.0.1") && !key.contains(':'), "{key}");
    }
});

both_backends_with!(forwarded_for_is_believed_only_from_trusted_proxies, PROXY, |app: TestApp| async move {
    assert_eq!(login_status(&app, "nobody", "x", Some("203.0.113.7")).await, 401);
    let mut conn = app.state.db.conn().unwrap();
    let bodies: Vec<String> = audit_events::table
        .filter(audit_events::kind.eq("login-failure"))
        .select(audit_events::body)
        .load(&mut conn)
        .unwrap();
    assert!(bodies.iter().any(|b| b.contains("\"address\":\"203.0.113.7\"")), "{bodies:?}");
    // Each forwarded client is throttled on its own: 20 free failures per address, so the 21st from one
    // address waits while another address is unaffected.
    for i in 0..21 {
        login_status(&app, &format!("n{i}"), "x", Some("203.0.113.8")).await;
    }
    assert_eq!(login_status(&app, "n-last", "x", Some("203.0.113.8")).await, 429);
    assert_eq!(login_status(&app, "n-last", "x", Some("203.0.113.9")).await, 401);
});

both_backends_with!(forwarded_for_from_an_untrusted_peer_is_ignored, "", |app: TestApp| async move {
    assert_eq!(login_status(&app, "nobody", "x", Some("203.0.113.7")).await, 401);
    let mut conn = app.state.db.conn().unwrap();
    let bodies: Vec<String> = audit_events::table
        .filter(audit_events::kind.eq("login-failure"))
        .select(audit_events::body)
        .load(&mut conn)
        .unwrap();
    assert!(bodies.iter().all(|b| !b.contains("203.0.113.7")), "{bodies:?}");
    assert!(bodies.iter().any(|b| b.contains("\"address\":\"127.0.0.1\"")));
});

both_backends_with!(failures_from_elsewhere_do_not_lock_a_known_address, PROXY, |app: TestApp| async move {
    app.add_user("erin", Role::Clinician, Some("6f1c1d7a-7a53-4d1e-9a51-7f3f0b7a0c11"), None);
    let home = "198.51.100.10";
    let attacker = "203.0.113.66";
    assert_eq!(login_status(&app, "erin", PASSWORD, Some(home)).await, 200, "erin signs in from her workstation");
    let mut statuses = Vec::new();
    for i in 0..12 {
        statuses.push(login_status(&app, "erin", &format!("guess {i}"), Some(attacker)).await);
    }
    assert!(statuses.ends_with(&[429, 429]), "the attacker is throttled: {statuses:?}");
    assert_eq!(login_status(&app, "erin", PASSWORD, Some(attacker)).await, 429, "even with the right password");
    assert_eq!(login_status(&app, "erin", PASSWORD, Some("192.0.2.44")).await, 429, "a new address waits too");
    // ...but erin's own address has its own budget.
    assert_eq!(login_status(&app, "erin", PASSWORD, Some(home)).await, 200, "not locked out from home");
    // And the account's backoff is capped: after 15 minutes a new address may try again.
    app.clock.advance(Duration::minutes(16));
    assert_eq!(login_status(&app, "erin", PASSWORD, Some("192.0.2.44")).await, 200);
});
