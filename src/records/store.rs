//! Resource storage: current version, full history, search index, care relationships. Each write is one
//! transaction; reads are one indexed query; search is narrowed by scope *in SQL*, so counts and paging never
//! see rows the caller may not.

use crate::error::{AppError, AppResult};
use crate::store::schema::{break_glass, care_relationships, resource_history, resources, search_index};
use crate::store::{AnyConnection, db_err};
use diesel::prelude::*;

/// One stored version of a resource. `content` is the stored document (PHI elements opaque).
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = resources)]
pub struct Row {
    pub resource_type: String,
    pub id: String,
    pub version_id: i64,
    pub last_updated: i64,
    pub deleted: bool,
    pub patient_id: Option<String>,
    pub key_version: i32,
    pub content: String,
    /// The blind-index key version its `search_index` rows were computed with.
    pub index_version: i32,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = resource_history)]
pub struct HistoryRow {
    pub resource_type: String,
    pub id: String,
    pub version_id: i64,
    pub last_updated: i64,
    pub deleted: bool,
    pub key_version: i32,
    pub content: String,
}

impl From<&Row> for HistoryRow {
    fn from(r: &Row) -> Self {
        HistoryRow {
            resource_type: r.resource_type.clone(),
            id: r.id.clone(),
            version_id: r.version_id,
            last_updated: r.last_updated,
            deleted: r.deleted,
            key_version: r.key_version,
            content: r.content.clone(),
        }
    }
}

/// Which rows a caller may reach, expressed as SQL (never filtered after fetching).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeFilter {
    /// Every row of the type.
    All,
    /// Rows in these patients' compartments only (own compartment, or a fixed set).
    Patients(Vec<String>),
    /// Rows of patients in the practitioner's active care teams, plus the extra patients (break-glass grants).
    CareTeam { practitioner_id: String, extra_patients: Vec<String> },
    /// Nothing at all.
    Nothing,
    /// What the inner filter reaches, within this one patient's compartment (a SMART `patient/` scope).
    Confined(Box<ScopeFilter>, String),
}

/// The search index values of one resource: (parameter, value) pairs.
pub type IndexValues = Vec<(String, String)>;

/// A care relationship derived from a CareTeam: (patient, practitioner).
pub type CarePairs = Vec<(String, String)>;

/// Side effects of a write beyond the resource row.
#[derive(Debug, Default, Clone)]
pub struct WriteExtras {
    pub index: IndexValues,
    /// For CareTeam writes: the relationships to store (empty when the team is not active).
    pub care: Option<CarePairs>,
}

/// Replaces the search-index rows of one resource with `index` (none at all when `deleted`).
fn replace_index(
    conn: &mut AnyConnection,
    rtype: &str,
    id: &str,
    deleted: bool,
    index: &IndexValues,
) -> QueryResult<()> {
    diesel::delete(search_index::table.filter(search_index::resource_type.eq(rtype)).filter(search_index::id.eq(id)))
        .execute(conn)?;
    if deleted || index.is_empty() {
        return Ok(());
    }
    let mut seen = std::collections::BTreeSet::new();
    let rows: Vec<IndexRow<'_>> = index
        .iter()
        .filter(|(p, v)| seen.insert((p.as_str(), v.as_str())))
        .map(|(param, value)| IndexRow { resource_type: rtype, id, param, value })
        .collect();
    // One multi-row INSERT (one round trip), through the concrete connection: diesel's MultiConnection has no
    // batch insert. 200 rows × 4 parameters stays far below either backend's bind-parameter limit.
    for chunk in rows.chunks(200) {
        match conn {
            AnyConnection::Postgresql(c) => diesel::insert_into(search_index::table).values(chunk).execute(c)?,
            AnyConnection::Sqlite(c) => diesel::insert_into(search_index::table).values(chunk).execute(c)?,
        };
    }
    Ok(())
}

/// One row of `search_index`.
#[derive(Insertable)]
#[diesel(table_name = search_index)]
struct IndexRow<'a> {
    resource_type: &'a str,
    id: &'a str,
    param: &'a str,
    value: &'a str,
}

fn replace_extras(conn: &mut AnyConnection, row: &Row, extras: &WriteExtras) -> QueryResult<()> {
    replace_index(conn, &row.resource_type, &row.id, row.deleted, &extras.index)?;
    if let Some(pairs) = &extras.care {
        diesel::delete(care_relationships::table.filter(care_relationships::careteam_id.eq(&row.id))).execute(conn)?;
        if !row.deleted {
            let mut seen = std::collections::BTreeSet::new();
            for (patient, practitioner) in pairs.iter().filter(|p| seen.insert((*p).clone())) {
                diesel::insert_into(care_relationships::table)
                    .values((
                        care_relationships::careteam_id.eq(&row.id),
                        care_relationships::patient_id.eq(patient),
                        care_relationships::practitioner_id.eq(practitioner),
                    ))
                    .execute(conn)?;
            }
        }
    }
    Ok(())
}

/// Inserts version 1 of a new resource, its history row and its index, in the caller's transaction.
pub fn insert(conn: &mut AnyConnection, row: &Row, extras: &WriteExtras) -> AppResult<()> {
    diesel::insert_into(resources::table).values(row).execute(conn).map_err(db_err)?;
    diesel::insert_into(resource_history::table).values(HistoryRow::from(row)).execute(conn).map_err(db_err)?;
    replace_extras(conn, row, extras).map_err(db_err)
}

/// Replaces the current version when it is still `expected_version` (optimistic concurrency, no lost update).
/// Returns `PreconditionFailed` when another writer got there first.
pub fn replace(conn: &mut AnyConnection, row: &Row, expected_version: i64, extras: &WriteExtras) -> AppResult<()> {
    let n = diesel::update(
        resources::table
            .filter(resources::resource_type.eq(&row.resource_type))
            .filter(resources::id.eq(&row.id))
            .filter(resources::version_id.eq(expected_version)),
    )
    .set((
        resources::version_id.eq(row.version_id),
        resources::last_updated.eq(row.last_updated),
        resources::deleted.eq(row.deleted),
        resources::patient_id.eq(&row.patient_id),
        resources::key_version.eq(row.key_version),
        resources::content.eq(&row.content),
        resources::index_version.eq(row.index_version),
    ))
    .execute(conn)
    .map_err(db_err)?;
    if n != 1 {
        return Err(AppError::PreconditionFailed);
    }
    diesel::insert_into(resource_history::table).values(HistoryRow::from(row)).execute(conn).map_err(db_err)?;
    replace_extras(conn, row, extras).map_err(db_err)
}

/// `keys reindex`: replaces the search index of a current resource with `index` (computed under index key
/// `index_version`) if the resource is still at `version_id`, in the caller's transaction. False when another
/// writer changed it meanwhile (its own write rebuilt the index).
pub fn rebuild_index(
    conn: &mut AnyConnection,
    row: &Row,
    index_version: i32,
    index: &IndexValues,
) -> QueryResult<bool> {
    let n = diesel::update(
        resources::table
            .filter(resources::resource_type.eq(&row.resource_type))
            .filter(resources::id.eq(&row.id))
            .filter(resources::version_id.eq(row.version_id)),
    )
    .set(resources::index_version.eq(index_version))
    .execute(conn)?;
    if n != 1 {
        return Ok(false);
    }
    replace_index(conn, &row.resource_type, &row.id, row.deleted, index)?;
    Ok(true)
}

/// Current resources whose index was computed under an index key older than `index_version`, in (type, id)
/// order after `after` (exclusive): the next batch of `keys reindex`.
pub fn below_index_version(
    conn: &mut AnyConnection,
    index_version: i32,
    after: (&str, &str),
    limit: i64,
) -> AppResult<Vec<Row>> {
    use resources::dsl as r;
    let (t, i) = (after.0.to_owned(), after.1.to_owned());
    r::resources
        .filter(r::index_version.lt(index_version))
        .filter(r::resource_type.gt(t.clone()).or(r::resource_type.eq(t).and(r::id.gt(i))))
        .order((r::resource_type.asc(), r::id.asc()))
        .limit(limit)
        .select(Row::as_select())
        .load(conn)
        .map_err(db_err)
}

/// Current resources per index-key version (for `keys status`).
pub fn rows_by_index_version(conn: &mut AnyConnection) -> AppResult<Vec<(i32, i64)>> {
    resources::table
        .group_by(resources::index_version)
        .select((resources::index_version, diesel::dsl::count_star()))
        .order(resources::index_version.asc())
        .load(conn)
        .map_err(db_err)
}

/// The current row of a resource (deleted or not), without any scope: for internal checks only.
pub fn current_unscoped(conn: &mut AnyConnection, rtype: &str, id: &str) -> AppResult<Option<Row>> {
    resources::table
        .filter(resources::resource_type.eq(rtype))
        .filter(resources::id.eq(id))
        .select(Row::as_select())
        .first(conn)
        .optional()
        .map_err(db_err)
}

/// The current row, only when it is within `scope` (one indexed query).
pub fn current(conn: &mut AnyConnection, rtype: &str, id: &str, scope: &ScopeFilter) -> AppResult<Option<Row>> {
    let mut q = resources::table
        .filter(resources::resource_type.eq(rtype))
        .filter(resources::id.eq(id))
        .select(Row::as_select())
        .into_boxed();
    q = apply_scope(q, scope);
    q.first(conn).optional().map_err(db_err)
}

/// One version from the history (the caller has checked scope on the current row).
pub fn version(conn: &mut AnyConnection, rtype: &str, id: &str, vid: i64) -> AppResult<Option<HistoryRow>> {
    resource_history::table
        .filter(resource_history::resource_type.eq(rtype))
        .filter(resource_history::id.eq(id))
        .filter(resource_history::version_id.eq(vid))
        .select(HistoryRow::as_select())
        .first(conn)
        .optional()
        .map_err(db_err)
}

/// Every version, newest first.
pub fn history(conn: &mut AnyConnection, rtype: &str, id: &str, limit: i64) -> AppResult<Vec<HistoryRow>> {
    resource_history::table
        .filter(resource_history::resource_type.eq(rtype))
        .filter(resource_history::id.eq(id))
        .order(resource_history::version_id.desc())
        .limit(limit)
        .select(HistoryRow::as_select())
        .load(conn)
        .map_err(db_err)
}

type BoxedRows<'a> = diesel::internal::table_macro::BoxedSelectStatement<
    'a,
    diesel::dsl::AsSelect<Row, crate::store::MultiBackend>,
    diesel::internal::table_macro::FromClause<resources::table>,
    crate::store::MultiBackend,
>;

fn apply_scope<'a>(q: BoxedRows<'a>, scope: &ScopeFilter) -> BoxedRows<'a> {
    match scope {
        ScopeFilter::Confined(inner, patient) => {
            apply_scope(q, inner).filter(resources::patient_id.eq(Some(patient.clone())))
        }
        ScopeFilter::All => q,
        ScopeFilter::Nothing => q.filter(resources::id.eq("").and(resources::id.ne(""))),
        ScopeFilter::Patients(ids) => q.filter(resources::patient_id.eq_any(ids.clone())),
        ScopeFilter::CareTeam { practitioner_id, extra_patients } => {
            let team = care_relationships::table
                .filter(care_relationships::practitioner_id.eq(practitioner_id.clone()))
                .select(care_relationships::patient_id.nullable());
            q.filter(resources::patient_id.eq_any(team).or(resources::patient_id.eq_any(extra_patients.clone())))
        }
    }
}

/// A search: AND over clauses, each an OR over index values of one parameter.
#[derive(Debug, Clone, Default)]
pub struct IndexQuery {
    pub clauses: Vec<(String, Vec<String>)>,
    /// Restrict to these ids (the `_id` parameter), OR-ed.
    pub ids: Option<Vec<String>>,
    /// Restrict to these compartments (the `patient` parameter when it is a plain column match).
    pub patients: Option<Vec<String>>,
}

/// Live rows matching `query` within `scope`, ordered by id, after the keyset `after` (exclusive).
pub fn search(
    conn: &mut AnyConnection,
    rtype: &str,
    query: &IndexQuery,
    scope: &ScopeFilter,
    after: Option<&str>,
    limit: i64,
) -> AppResult<Vec<Row>> {
    let mut q = base_search(rtype, query, scope);
    if let Some(after) = after {
        q = q.filter(resources::id.gt(after.to_owned()));
    }
    q.order(resources::id.asc()).limit(limit).load(conn).map_err(db_err)
}

fn base_search<'a>(rtype: &str, query: &IndexQuery, scope: &ScopeFilter) -> BoxedRows<'a> {
    let mut q = resources::table
        .filter(resources::resource_type.eq(rtype.to_owned()))
        .filter(resources::deleted.eq(false))
        .select(Row::as_select())
        .into_boxed();
    q = apply_scope(q, scope);
    if let Some(ids) = &query.ids {
        q = q.filter(resources::id.eq_any(ids.clone()));
    }
    if let Some(p) = &query.patients {
        q = q.filter(resources::patient_id.eq_any(p.clone()));
    }
    for (param, values) in &query.clauses {
        let matching = search_index::table
            .filter(search_index::resource_type.eq(rtype.to_owned()))
            .filter(search_index::param.eq(param.clone()))
            .filter(search_index::value.eq_any(values.clone()))
            .select(search_index::id);
        q = q.filter(resources::id.eq_any(matching));
    }
    q
}

/// Whether a practitioner is in an active care team of the patient.
pub fn in_care_team(conn: &mut AnyConnection, practitioner_id: &str, patient_id: &str) -> AppResult<bool> {
    let n: i64 = care_relationships::table
        .filter(care_relationships::practitioner_id.eq(practitioner_id))
        .filter(care_relationships::patient_id.eq(patient_id))
        .count()
        .get_result(conn)
        .map_err(db_err)?;
    Ok(n > 0)
}

/// Live rows of a patient's compartment of one type, ordered by id (for `$everything`).
pub fn compartment(conn: &mut AnyConnection, rtype: &str, patient_id: &str, limit: i64) -> AppResult<Vec<Row>> {
    resources::table
        .filter(resources::resource_type.eq(rtype))
        .filter(resources::patient_id.eq(patient_id))
        .filter(resources::deleted.eq(false))
        .order(resources::id.asc())
        .limit(limit)
        .select(Row::as_select())
        .load(conn)
        .map_err(db_err)
}

/// A break-glass grant as stored (`reason` is the sealed free text).
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = break_glass)]
pub struct Grant {
    pub id: String,
    pub account_id: String,
    pub patient_id: String,
    pub reason: String,
    pub created_at: i64,
    pub expires_at: i64,
}

pub fn grant_break_glass(conn: &mut AnyConnection, grant: &Grant) -> AppResult<()> {
    diesel::insert_into(break_glass::table).values(grant).execute(conn).map_err(db_err)?;
    Ok(())
}

/// How many break-glass grants an account was given since `since` (Unix micros), revoked ones included.
pub fn grants_since(conn: &mut AnyConnection, account_id: &str, since: i64) -> AppResult<u64> {
    let n: i64 = break_glass::table
        .filter(break_glass::account_id.eq(account_id))
        .filter(break_glass::created_at.ge(since))
        .count()
        .get_result(conn)
        .map_err(db_err)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The patients an account holds an unexpired, unrevoked break-glass grant for at `now` (Unix micros).
pub fn active_grants(conn: &mut AnyConnection, account_id: &str, now: i64) -> AppResult<Vec<String>> {
    break_glass::table
        .filter(break_glass::account_id.eq(account_id))
        .filter(break_glass::expires_at.gt(now))
        .filter(break_glass::revoked_at.is_null())
        .select(break_glass::patient_id)
        .load(conn)
        .map_err(db_err)
}

/// Revokes every open break-glass grant of an account at `now` (incident containment); returns how many.
pub fn revoke_grants(conn: &mut AnyConnection, account_id: &str, now: i64) -> AppResult<usize> {
    diesel::update(
        break_glass::table
            .filter(break_glass::account_id.eq(account_id))
            .filter(break_glass::revoked_at.is_null())
            .filter(break_glass::expires_at.gt(now)),
    )
    .set(break_glass::revoked_at.eq(Some(now)))
    .execute(conn)
    .map_err(db_err)
}
