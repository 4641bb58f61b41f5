//! Operator jobs on stored records (`keys reindex|status|reencrypt`, `incident report|contain`): they run
//! outside any request, so they are not operations, but they still reach the resource tables only through this
//! module, and read or write encrypted elements only through the records codec.

use super::Records;
use super::store;
use crate::access::FieldMask;
use crate::error::AppResult;
use crate::store::AnyConnection;
use serde_json::Value;
use std::collections::BTreeSet;

pub use super::reindex::{below, reindex};
pub use super::rekey::{Reencrypted, key_version_counts, reencrypt, reencrypt_content, sealed_text_below};
pub use super::store::rows_by_index_version;

/// The current `address` of a patient for `incident report` (the State of residence decides notification
/// duties). Only that element is decrypted; `None` when the patient or the element is absent, or when it does
/// not decrypt (which raises the decrypt-failure alert): the report then counts the patient under "unknown".
pub fn patient_address(records: &Records, conn: &mut AnyConnection, patient: &str) -> AppResult<Option<Value>> {
    let Some(row) = store::current_unscoped(conn, "Patient", patient)? else { return Ok(None) };
    if row.deleted {
        return Ok(None);
    }
    let Some(d) = crate::fhir::decl::decl("Patient") else { return Ok(None) };
    let only_address = FieldMask::new(Some(BTreeSet::from(["address".to_owned()])), vec![], &[], vec![]);
    Ok(records.decode_row(d, &row, &only_address).ok().and_then(|mut obj| obj.remove("address")))
}

/// Ends every open break-glass grant of an account at `now` (Unix micros), for `incident contain`, inside the
/// caller's transaction. Returns how many grants it ended.
pub fn revoke_grants(conn: &mut AnyConnection, account_id: &str, now: i64) -> AppResult<usize> {
    store::revoke_grants(conn, account_id, now)
}
