//! Issue 18, part 3: the per-account concurrency limit on expensive operations (`limits.max_concurrent_per_account`),
//! over real HTTPS on both backends.

use crate::both_backends_with;
use crate::helpers::TestApp;
use carevault::role::Role;
use carevault::store::schema::audit_events;
use diesel::prelude::*;
use futures_util::future::join_all;
use serde_json::{Value, json};

const LIMIT_2: &str = "[limits]\nmax_concurrent_per_account = 2\n";
const PARALLEL: usize = 12;

fn refusals_audited(app: &TestApp) -> usize {
    let mut conn = app.state.db.conn().unwrap();
    let bodies: Vec<String> =
        audit_events::table.filter(audit_events::kind.eq("search")).select(audit_events::body).load(&mut conn).unwrap();
    bodies.iter().filter(|b| serde_json::from_str::<Value>(b).unwrap()["detail"] == "concurrency-limit").count()
}

both_backends_with!(parallel_searches_of_one_account_are_limited, LIMIT_2, |app: TestApp| async move {
    let front = app.user("front", Role::FrontDesk, None).await;
    let billing = app.user("bill", Role::Billing, None).await;
    for i in 0..40 {
        app.create(
            &front,
            json!({ "resourceType": "Patient", "name": [{ "family": format!("Limit{i}"), "given": ["Ann", "Bea"] }],
                    "birthDate": "1970-01-01", "gender": "female",
                    "address": [{ "line": ["1 Main St"], "city": "Springfield" }] }),
        )
        .await;
    }
    let mut limited = 0;
    let mut rounds = 0;
    // The searches race: retry a few rounds until at least one was refused (one round is enough in practice).
    while limited == 0 && rounds < 5 {
        rounds += 1;
        let searches = join_all((0..PARALLEL).map(|_| async {
            let r = app.get(&front, "/fhir/Patient?_count=100").await;
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, retry, body)
        }));
        // Another account at the same time is unaffected.
        let other = async {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            app.get_json(&billing, "/fhir/Patient?_count=100").await
        };
        let (results, (other_status, other_body)) = tokio::join!(searches, other);
        assert_eq!(other_status, 200, "another account is not limited: {other_body}");
        let statuses: Vec<u16> = results.iter().map(|r| r.0).collect();
        assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "only 200 and 429, never 5xx: {statuses:?}");
        assert!(statuses.contains(&200), "some searches run: {statuses:?}");
        for (status, retry, body) in results.iter().filter(|r| r.0 == 429) {
            assert_eq!(retry.as_deref(), Some("1"), "{status}: Retry-After");
            assert_eq!(body["resourceType"], "OperationOutcome");
            let text = body["issue"][0]["diagnostics"].as_str().unwrap();
            assert!(text.contains("limits.max_concurrent_per_account"), "names the limit: {text}");
        }
        limited += statuses.iter().filter(|s| **s == 429).count();
        eprintln!(
            "FIGURE concurrency backend={:?} round={rounds} parallel={PARALLEL} limit=2 statuses={statuses:?}",
            app.backend
        );
    }
    assert!(limited > 0, "some of {PARALLEL} parallel searches were refused with limit 2");
    assert_eq!(refusals_audited(&app), limited, "every refusal is audited as a failed search");
    // Every permit was given back: the account searches again, up to the limit.
    let (status, _) = app.get_json(&front, "/fhir/Patient?_count=1").await;
    assert_eq!(status, 200);
});
