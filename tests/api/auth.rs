//! Authentication without an external provider: login, tokens, refresh rotation and reuse, logout, revocation,
//! idle and absolute timeouts on the injected clock, throttling, client credentials.

use crate::helpers::{PASSWORD, TestApp};
use crate::{both_backends, both_backends_with};
use carevault::clock::Clock;
use carevault::role::Role;
use serde_json::json;
use time::Duration;

async fn whoami(app: &TestApp, token: &str) -> u16 {
    // Any authenticated route will do; logout would end the session, so use jwks-protected metadata instead.
    app.client.get(app.url("/fhir/Practitioner")).bearer_auth(token).send().await.unwrap().status().as_u16()
}

both_backends!(login_issues_short_lived_tokens, |app: TestApp| async move {
    app.add_user("alice", Role::Admin, None, None);
    let resp = app
        .client
        .post(app.url("/auth/login"))
        .json(&json!({"username":"alice","password":PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 300);
    let token = body["access_token"].as_str().unwrap();
    let header = token.split('.').next().unwrap();
    use base64::Engine;
    let header: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    assert_eq!(header["alg"], "EdDSA");
    let jwks: serde_json::Value =
        app.client.get(app.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    assert!(jwks["keys"].as_array().unwrap().iter().any(|k| k["kid"] == header["kid"]));
});

both_backends!(failed_logins_are_generic_and_audited, |app: TestApp| async move {
    app.add_user("bob", Role::Billing, None, None);
    let before = app.audit_count().await;
    let mut bodies = Vec::new();
    for (u, p) in [("bob", "wrong password CANARY-PW-1"), ("nobody-CANARY-U", PASSWORD)] {
        let resp =
            app.client.post(app.url("/auth/login")).json(&json!({"username":u,"password":p})).send().await.unwrap();
        assert_eq!(resp.status(), 401);
        assert!(resp.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
        let text = resp.text().await.unwrap();
        assert!(!text.contains("CANARY"));
        bodies.push(text);
    }
    assert_eq!(bodies[0], bodies[1], "same answer whether or not the user exists");
    // Garbage in every field is the same 401.
    let resp = app.client.post(app.url("/auth/login")).body("{not json").send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(app.audit_count().await, before + 2, "each failure is audited");
});

both_backends!(refresh_rotates_and_reuse_revokes_the_session, |app: TestApp| async move {
    let s = app.user("carol", Role::FrontDesk, None).await;
    let refresh = |token: String| {
        let app = &app;
        async move {
            app.client
                .post(app.url("/auth/token"))
                .form(&[("grant_type", "refresh_token"), ("refresh_token", token.as_str())])
                .send()
                .await
                .unwrap()
        }
    };
    let r1 = refresh(s.refresh.clone()).await;
    assert_eq!(r1.status(), 200);
    let b1: serde_json::Value = r1.json().await.unwrap();
    let new_refresh = b1["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(new_refresh, s.refresh, "rotated");
    let new_access = b1["access_token"].as_str().unwrap().to_owned();
    assert_eq!(whoami(&app, &new_access).await, 200);
    // Presenting the spent token again: theft signal, the whole session ends.
    let reuse = refresh(s.refresh.clone()).await;
    assert_eq!(reuse.status(), 400);
    assert_eq!(reuse.json::<serde_json::Value>().await.unwrap()["error"], "invalid_grant");
    app.clock.advance(Duration::seconds(6)); // past the per-replica session cache
    assert_eq!(whoami(&app, &new_access).await, 401, "access token of the revoked session is refused");
    assert_eq!(refresh(new_refresh).await.status(), 400, "the newest refresh token died with the session");
    let unknown = app.client.post(app.url("/auth/token")).form(&[("grant_type", "password")]).send().await.unwrap();
    assert_eq!(unknown.json::<serde_json::Value>().await.unwrap()["error"], "unsupported_grant_type");
});

both_backends!(logout_and_revoke_end_sessions, |app: TestApp| async move {
    let s = app.user("dave", Role::Auditor, None).await;
    assert_eq!(whoami(&app, &s.access).await, 200);
    let out = app.client.post(app.url("/auth/logout")).bearer_auth(&s.access).send().await.unwrap();
    assert_eq!(out.status(), 204);
    assert_eq!(whoami(&app, &s.access).await, 401);
    let s2 = app.login_as("dave").await;
    let rv = app.client.post(app.url("/auth/revoke")).form(&[("token", s2.refresh.as_str())]).send().await.unwrap();
    assert_eq!(rv.status(), 200);
    app.clock.advance(Duration::seconds(6));
    assert_eq!(whoami(&app, &s2.access).await, 401);
});

both_backends!(expiry_idle_and_absolute_timeouts_follow_the_clock, |app: TestApp| async move {
    let s = app.user("erin", Role::Admin, None).await;
    assert_eq!(whoami(&app, &s.access).await, 200);
    app.clock.advance(Duration::seconds(301 + 30));
    assert_eq!(whoami(&app, &s.access).await, 401, "access token expired after 5 minutes");
    // Idle: refresh works within 15 minutes of the last use, not after.
    let s2 = app.login_as("erin").await;
    app.clock.advance(Duration::minutes(16));
    let r = app
        .client
        .post(app.url("/auth/token"))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", s2.refresh.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "idle session is over");
    // Absolute: keep the session busy, it still ends after 12 hours.
    let mut s3 = app.login_as("erin").await;
    let mut ok_until = 0;
    for i in 0..60 {
        app.clock.advance(Duration::minutes(14));
        let r = app
            .client
            .post(app.url("/auth/token"))
            .form(&[("grant_type", "refresh_token"), ("refresh_token", s3.refresh.as_str())])
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            break;
        }
        let b: serde_json::Value = r.json().await.unwrap();
        s3.refresh = b["refresh_token"].as_str().unwrap().to_owned();
        ok_until = i + 1;
    }
    assert!((50..=51).contains(&ok_until), "refreshes stop at 12 h: {ok_until}");
});

both_backends!(repeated_failures_are_throttled, |app: TestApp| async move {
    app.add_user("frank", Role::Nurse, Some("6f1c1d7a-7a53-4d1e-9a51-7f3f0b7a0c11"), None);
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let r = app
            .client
            .post(app.url("/auth/login"))
            .json(&json!({"username":"frank","password":"nope nope nope"}))
            .send()
            .await
            .unwrap();
        statuses.push((r.status().as_u16(), r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned())));
    }
    assert!(statuses[..5].iter().all(|(s, _)| *s == 401), "{statuses:?}");
    let (status, retry) = &statuses[6];
    assert_eq!(*status, 429);
    assert!(retry.as_deref().unwrap().parse::<u64>().unwrap() >= 1);
    // Even the right password waits until the backoff has passed...
    let r = app
        .client
        .post(app.url("/auth/login"))
        .json(&json!({"username":"frank","password":PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    app.clock.advance(Duration::minutes(16));
    // ...then works.
    let r = app
        .client
        .post(app.url("/auth/login"))
        .json(&json!({"username":"frank","password":PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
});

both_backends!(bad_bearer_tokens_are_401, |app: TestApp| async move {
    for bad in ["", "garbage", "a.b.c", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."] {
        let r = app
            .client
            .get(app.url("/fhir/Practitioner"))
            .header("authorization", format!("Bearer {bad}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{bad}");
        assert!(r.headers().contains_key("www-authenticate"));
    }
    let r = app.client.get(app.url("/fhir/Practitioner")).send().await.unwrap();
    assert_eq!(r.status(), 401);
});

both_backends!(client_credentials_for_service_clients, |app: TestApp| async move {
    use carevault::auth::service::{NewAccount, create_account};
    {
        let mut conn = app.state.db.conn().unwrap();
        let new = NewAccount {
            username: "lab-feed".into(),
            kind: "service",
            role: Role::Auditor,
            practitioner: None,
            patient: None,
        };
        create_account(
            &mut conn,
            &new,
            &secrecy::SecretString::from("s3cret-service-key-0123456789".to_owned()),
            crate::helpers::start_time(),
        )
        .unwrap();
    }
    let ok = app
        .client
        .post(app.url("/auth/token"))
        .basic_auth("lab-feed", Some("s3cret-service-key-0123456789"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let body: serde_json::Value = ok.json().await.unwrap();
    assert!(body.get("refresh_token").is_none());
    assert_eq!(whoami(&app, body["access_token"].as_str().unwrap()).await, 200);
    let bad = app
        .client
        .post(app.url("/auth/token"))
        .form(&[("grant_type", "client_credentials"), ("client_id", "lab-feed"), ("client_secret", "wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    assert_eq!(bad.json::<serde_json::Value>().await.unwrap()["error"], "invalid_client");
});

both_backends!(totp_second_factor_is_required_once_enrolled_and_single_use, |app: TestApp| async move {
    app.add_user("gina", Role::Admin, None, None);
    let url = {
        let mut conn = app.state.db.conn().unwrap();
        carevault::auth::service::enroll_totp(&mut conn, app.state.keys.as_ref(), "gina", "carevault").unwrap().unwrap()
    };
    let secret = url.split("secret=").nth(1).unwrap().split('&').next().unwrap();
    let secret = data_encoding::BASE32_NOPAD.decode(secret.as_bytes()).unwrap();
    let step = u64::try_from(carevault::auth::totp::step_of(app.clock.now())).unwrap();
    let code = format!("{:06}", carevault::auth::totp::hotp(&secret, step, 6));
    let login = |totp: Option<&str>| {
        let app = &app;
        let mut body = json!({"username":"gina","password":PASSWORD});
        if let Some(t) = totp {
            body["totp"] = json!(t);
        }
        async move { app.client.post(app.url("/auth/login")).json(&body).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(login(None).await, 401, "password alone is not enough");
    assert_eq!(login(Some("000000")).await, 401);
    assert_eq!(login(Some(&code)).await, 200);
    assert_eq!(login(Some(&code)).await, 401, "a code is accepted once");
    app.clock.advance(Duration::seconds(30));
    let code = format!("{:06}", carevault::auth::totp::hotp(&secret, step + 1, 6));
    assert_eq!(login(Some(&code)).await, 200);
});

both_backends_with!(
    short_idle_limit_keeps_an_active_session_open,
    "[auth]\nsession_idle_secs = 20\nsession_max_secs = 3600\n",
    |app: TestApp| async move {
        // Used every 6 s (past the session cache each time), the session must stay open: the last_seen touch
        // has to come more often than the 20 s idle limit.
        let s = app.user("ivy", Role::Admin, None).await;
        for i in 0..8 {
            app.clock.advance(Duration::seconds(6));
            assert_eq!(whoami(&app, &s.access).await, 200, "active session ended after {} s", (i + 1) * 6);
        }
        // Unused for 20 s, it is over.
        app.clock.advance(Duration::seconds(21));
        assert_eq!(whoami(&app, &s.access).await, 401, "idle session is over");
    }
);

both_backends!(own_access_token_is_refused_at_exp, |app: TestApp| async move {
    let s = app.user("jules", Role::Admin, None).await;
    app.clock.advance(Duration::seconds(299));
    assert_eq!(whoami(&app, &s.access).await, 200);
    app.clock.advance(Duration::seconds(1));
    assert_eq!(whoami(&app, &s.access).await, 401, "an own token is not accepted past its exp");
});

// The per-replica session cache is bounded by the sessions seen within its 5 seconds: 4,200 sessions checked
// once each, then 6 seconds later one more, leave the cache holding only what is fresh (before: every session
// ever checked stayed, found by the soak's review).
both_backends!(session_cache_is_bounded, |app: TestApp| async move {
    app.add_user("cachy", Role::FrontDesk, None, None);
    let account = {
        let mut conn = app.state.db.conn().unwrap();
        carevault::auth::service::find_account(&mut conn, "cachy").unwrap().unwrap()
    };
    let now = app.clock.now();
    for _ in 0..4200 {
        let (tokens, _) = app.state.auth.open_session(&account, now).await.unwrap();
        app.state.auth.authenticate(&tokens.access_token).await.unwrap();
    }
    assert!(app.state.auth.cached_sessions() >= 4096);
    app.clock.advance(Duration::seconds(6));
    let (tokens, _) = app.state.auth.open_session(&account, app.clock.now()).await.unwrap();
    app.state.auth.authenticate(&tokens.access_token).await.unwrap();
    assert!(app.state.auth.cached_sessions() < 200, "{}", app.state.auth.cached_sessions());
});
