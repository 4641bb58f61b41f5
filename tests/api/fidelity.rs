//! Fidelity of what is written (issue 14 part 4): decimals come back exactly as sent. Both backends.

use crate::both_backends;
use crate::helpers::TestApp;
use serde_json::{Value, json};

// Decimals are kept exactly as the client wrote them (CONTRACT §5): `5.10` stays `5.10`, digits past f64 and
// exponents survive, on every path that returns the resource. Checked in the raw response text, never through
// a parsed number.
both_backends!(decimals_are_returned_exactly_as_sent, |app: TestApp| async move {
    let w = app.world().await;
    // As sent, and as returned: the digits exactly; an exponent is written `e` with its sign (serde_json).
    const SENT: [(&str, &str); 7] = [
        ("5.10", "5.10"),
        ("0.1000000000000000055511151231257827", "0.1000000000000000055511151231257827"),
        ("12345678901234567890.5", "12345678901234567890.5"),
        ("1e2", "1e+2"),
        ("1.0", "1.0"),
        ("-0.000", "-0.000"),
        ("6.02214076E23", "6.02214076e+23"),
    ];
    const DECIMALS: [&str; 7] = {
        let mut out = [""; 7];
        let mut i = 0;
        while i < 7 {
            out[i] = SENT[i].1;
            i += 1;
        }
        out
    };
    let body = format!(
        r#"{{"resourceType":"Observation","status":"final",
            "code":{{"coding":[{{"system":"http://loinc.org","code":"85354-9"}}]}},
            "subject":{{"reference":"Patient/{alice}"}},"effectiveDateTime":"2024-05-01T10:00:00Z",
            "valueQuantity":{{"value":{d0},"unit":"mmol/L"}},
            "component":[{{"code":{{"text":"a"}},"valueQuantity":{{"value":{d1}}}}},
                         {{"code":{{"text":"b"}},"valueQuantity":{{"value":{d2}}}}},
                         {{"code":{{"text":"c"}},"valueQuantity":{{"value":{d6}}}}}],
            "referenceRange":[{{"low":{{"value":{d3}}},"high":{{"value":{d4}}}}},{{"low":{{"value":{d5}}}}}]}}"#,
        alice = w.alice,
        d0 = SENT[0].0,
        d1 = SENT[1].0,
        d2 = SENT[2].0,
        d3 = SENT[3].0,
        d4 = SENT[4].0,
        d5 = SENT[5].0,
        d6 = SENT[6].0,
    );
    let r = app
        .client
        .post(app.url("/fhir/Observation"))
        .bearer_auth(&w.doc.access)
        .header("content-type", "application/fhir+json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let created = r.text().await.unwrap();
    assert_eq!(status, 201, "{created}");
    let id = serde_json::from_str::<Value>(&created).unwrap()["id"].as_str().unwrap().to_owned();
    let exact = |what: &str, text: &str| {
        for d in DECIMALS {
            assert!(
                text.contains(&format!("\"value\":{d}}}")) || text.contains(&format!("\"value\":{d},")),
                "{what}: {d} not returned as sent: {text}"
            );
        }
        app.assert_valid(&serde_json::from_str(text).unwrap());
    };
    exact("create", &created);
    let raw = |path: String| {
        let app = &app;
        let s = &w.doc;
        async move {
            let r = app.get(s, &path).await;
            assert_eq!(r.status(), 200, "{path}");
            r.text().await.unwrap()
        }
    };
    exact("read", &raw(format!("/fhir/Observation/{id}")).await);
    exact("vread", &raw(format!("/fhir/Observation/{id}/_history/1")).await);
    exact("search", &raw(format!("/fhir/Observation?patient={}", w.alice)).await);
    exact("history", &raw(format!("/fhir/Observation/{id}/_history")).await);
    exact("$everything", &raw(format!("/fhir/Patient/{}/$everything", w.alice)).await);
    // An update keeps what it sends, and the first version keeps what it had.
    let read = raw(format!("/fhir/Observation/{id}")).await;
    let updated = read.replacen("\"value\":5.10", "\"value\":5.100", 1);
    assert_ne!(read, updated);
    let r = app
        .client
        .put(app.url(&format!("/fhir/Observation/{id}")))
        .bearer_auth(&w.doc.access)
        .header("content-type", "application/fhir+json")
        .header("if-match", "W/\"1\"")
        .body(updated)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(raw(format!("/fhir/Observation/{id}")).await.contains("\"value\":5.100}"));
    assert!(raw(format!("/fhir/Observation/{id}/_history/1")).await.contains("\"value\":5.10}"));
    // An integer element takes an integer: `1.0` or `1e2` is a decimal (the schema cannot tell, the text can).
    for bad in ["1.0", "1e2", "2147483648"] {
        let body = format!(
            r#"{{"resourceType":"Observation","status":"final","code":{{"text":"count"}},
                "subject":{{"reference":"Patient/{}"}},"valueInteger":{bad}}}"#,
            w.alice
        );
        let r = app
            .client
            .post(app.url("/fhir/Observation"))
            .bearer_auth(&w.doc.access)
            .header("content-type", "application/fhir+json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "valueInteger {bad}");
        let text = r.text().await.unwrap();
        assert!(text.contains("Observation.valueInteger") && !text.contains(bad), "{text}");
    }
    let ok = json!({"resourceType":"Observation","status":"final","code":{"text":"count"},
                    "subject":{"reference":format!("Patient/{}", w.alice)},"valueInteger":-7});
    assert_eq!(app.post(&w.doc, "/fhir/Observation", &ok).await.status(), 201);
});
