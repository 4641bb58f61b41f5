//! `keys reindex`, the rebuild half: recomputes the blind indexes of every current resource under the newest
//! index key after an index-key rotation (`crate::crypto::store::begin_index_rotation`).
//!
//! Guarantees: online and resumable. Each resource records the index-key version its `search_index` rows were
//! computed with (`resources.index_version`); the job rebuilds whatever is below the newest version, batch by
//! batch, one transaction per batch, so an interrupted run simply continues where rows are still old. A row is
//! rebuilt only if its `version_id` is unchanged since it was read; a concurrent write rebuilds the index itself
//! (under the newest key once its server has reloaded, else the row stays old for the next pass). While the job
//! runs, searches look under every index key held, and candidates are always decrypted and filtered, so results
//! stay exact throughout. A row that does not decrypt is reported (type, id, version: never content) and left.

use super::Records;
use super::store::{self, Row};
use crate::error::{AppError, AppResult};
use crate::store::schema::resources;
use crate::store::{AnyConnection, db_err};
use diesel::prelude::*;

/// What a reindex run did.
#[derive(Debug, Default)]
pub struct Reindexed {
    /// The index-key version every rebuilt row now uses.
    pub index_version: u32,
    pub rebuilt: u64,
    /// Rows changed by another writer between read and rebuild (left to that write, or to the next pass).
    pub conflicts: u64,
    /// Rows that could not be rebuilt (`Type/id/_history/version`).
    pub failed: Vec<String>,
    /// Current rows still below `index_version` at the end.
    pub remaining: i64,
}

/// Current rows whose index uses a key older than `version`.
pub fn below(conn: &mut AnyConnection, version: i32) -> AppResult<i64> {
    resources::table.filter(resources::index_version.lt(version)).count().get_result(conn).map_err(db_err)
}

/// Most passes of one run (see `crate::cli::keys` for why a run is bounded).
const MAX_PASSES: usize = 5;

/// Rebuilds every current row below the newest index key of `records`' cipher, `batch` rows per transaction.
/// Passes repeat while they make progress, so rows a not-yet-reloaded server wrote under the old key meanwhile
/// are picked up too. `progress` is told how many rows each batch handled.
pub fn reindex(
    records: &Records,
    conn: &mut AnyConnection,
    batch: i64,
    progress: &dyn Fn(u64),
) -> AppResult<Reindexed> {
    let version_u = records.index_version();
    let version = i32::try_from(version_u).map_err(AppError::internal)?;
    let mut report = Reindexed { index_version: version_u, ..Default::default() };
    for _ in 0..MAX_PASSES {
        report.failed.clear();
        let before = report.rebuilt;
        let mut cursor = (String::new(), String::new());
        loop {
            let rows = store::below_index_version(conn, version, (&cursor.0, &cursor.1), batch)?;
            let Some(last) = rows.last() else { break };
            cursor = (last.resource_type.clone(), last.id.clone());
            let handled = u64::try_from(rows.len()).unwrap_or(0);
            let mut ready: Vec<(Row, store::IndexValues)> = Vec::with_capacity(rows.len());
            for row in rows {
                match records.rebuilt_index(&row) {
                    Ok((index, v)) if v == version => ready.push((row, index)),
                    Ok(_) => return Err(AppError::internal("the index key changed during the run")),
                    Err(_) => {
                        report.failed.push(format!("{}/{}/_history/{}", row.resource_type, row.id, row.version_id))
                    }
                }
            }
            let rebuilt = conn
                .transaction(|c| {
                    let mut n = 0u64;
                    for (row, index) in &ready {
                        n += u64::from(store::rebuild_index(c, row, version, index)?);
                    }
                    Ok::<_, diesel::result::Error>(n)
                })
                .map_err(db_err)?;
            report.conflicts += u64::try_from(ready.len()).unwrap_or(0).saturating_sub(rebuilt);
            report.rebuilt += rebuilt;
            progress(handled);
        }
        report.remaining = below(conn, version)?;
        if report.remaining == 0 || report.rebuilt == before {
            break;
        }
    }
    Ok(report)
}
