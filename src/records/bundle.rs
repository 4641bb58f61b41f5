//! `POST /fhir`: batch and transaction Bundles. Every entry becomes the [`Operation`](super::Operation) the same
//! request alone would be and goes through the same pipeline (decide, scope, masks, encryption, audit).

use serde::Deserialize;

/// Whether a Bundle body declares `"type": "transaction"`, read without building the entries (a streaming pass
/// that skips every other member). Anything unreadable is not a transaction.
pub fn is_transaction(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Envelope<'_>>(body).is_ok_and(|e| e.kind.as_deref() == Some("transaction"))
}
