//! Storage: diesel over PostgreSQL and SQLite through one code path (`AnyConnection`), pooled with r2d2.
//!
//! Migrations are embedded, one folder per backend with identical names (`migrations/{postgres,sqlite}`), and run
//! at start and by `carevault migrate`. SQLite runs in WAL mode with foreign keys on, a busy timeout, and
//! `synchronous = FULL` so a commit (an audit record above all) is durable when it returns.

pub mod schema;

use crate::config::DatabaseTarget;
use crate::error::{AppError, BoxError};
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::{self, ManageConnection, Pool, PooledConnection};
use diesel::sqlite::SqliteConnection;
use diesel::{Connection, MultiConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use secrecy::ExposeSecret;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
pub const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// One connection type over both backends.
#[derive(MultiConnection)]
pub enum AnyConnection {
    Postgresql(PgConnection),
    Sqlite(SqliteConnection),
}

impl AnyConnection {
    pub fn backend(&self) -> Backend {
        match self {
            AnyConnection::Postgresql(_) => Backend::Postgres,
            AnyConnection::Sqlite(_) => Backend::Sqlite,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// What can go wrong in storage, with the underlying error as the cause. Diesel's query errors are kept as a
/// fixed description of their kind only (a database message can quote row values, even client input); connection
/// and migration errors keep the driver's text, which names hosts, files and SQL of ours, never data.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: cannot connect (check `database_url`)")]
    Connect(#[source] r2d2::PoolError),
    /// The first connection failed for a reason told apart (server down, database missing, credentials); the
    /// driver's own text, on one line, is the cause.
    #[error("database: {why}")]
    Unreachable {
        why: &'static str,
        #[source]
        source: DriverMessage,
    },
    #[error("database: cannot create the directory for the SQLite file")]
    Directory(#[source] std::io::Error),
    #[error("database: cannot make the SQLite file private (mode 0600)")]
    FileMode(#[source] std::io::Error),
    #[error("database: migrations failed")]
    Migration(#[source] BoxError),
    #[error("database: no connection available")]
    Pool(#[source] r2d2::PoolError),
    #[error("database: connection closed")]
    Closed,
    /// A query failed; the text is the kind of failure only.
    #[error("database: {0}")]
    Query(&'static str),
    #[error("database: the blocking task did not complete")]
    Task(#[source] tokio::task::JoinError),
}

impl StoreError {
    /// The value-free form of a diesel error.
    pub fn query(e: &diesel::result::Error) -> Self {
        match e {
            diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::ClosedConnection, _) => {
                StoreError::Closed
            }
            other => StoreError::Query(kind_of(other)),
        }
    }

    /// True when the database could not be reached (503, fail closed) rather than a query failing (500).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Connect(_) | StoreError::Pool(_) | StoreError::Closed | StoreError::Unreachable { .. }
        )
    }
}

/// A driver's connection error flattened to one line (libpq spreads it over several).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DriverMessage(String);

impl DriverMessage {
    fn of(e: &r2d2::Error) -> Self {
        let text = e.to_string();
        DriverMessage(text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; "))
    }
}

/// What a failed first connection means, in the operator's terms.
fn unreachable_reason(driver: &str) -> &'static str {
    let d = driver.to_ascii_lowercase();
    if d.contains("connection refused") {
        "PostgreSQL refused the connection: no server is listening at the address in `database_url` (is it running?)"
    } else if d.contains("database") && d.contains("does not exist") {
        "the PostgreSQL server answered, but the database named in `database_url` does not exist (create it first)"
    } else if d.contains("password authentication failed") || d.contains("no password supplied") {
        "PostgreSQL rejected the user or password in `database_url`"
    } else if d.contains("could not translate host name") || d.contains("name or service not known") {
        "the PostgreSQL host in `database_url` cannot be resolved"
    } else if d.contains("timeout") || d.contains("timed out") {
        "PostgreSQL did not answer in time at the address in `database_url`"
    } else {
        "cannot connect (check `database_url`)"
    }
}

/// r2d2's error handler: instead of one ERROR line per failed attempt (dozens a second while the database is
/// down), one concise warning at most every 30 seconds.
#[derive(Debug, Default)]
struct QuietErrors {
    last: std::sync::Mutex<Option<std::time::Instant>>,
    /// Set when opening a connection fails; cleared by the next successful checkout ([`Db::conn`]).
    unreachable: Arc<AtomicBool>,
}

impl r2d2::HandleError<r2d2::Error> for QuietErrors {
    fn handle_error(&self, error: r2d2::Error) {
        self.unreachable.store(true, Ordering::SeqCst);
        let Ok(mut last) = self.last.lock() else { return };
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(30)) {
            return;
        }
        *last = Some(std::time::Instant::now());
        let driver = DriverMessage::of(&error);
        tracing::warn!(
            error.kind = unreachable_reason(&driver.0),
            "database connection failed (repeats are not logged for 30 s)"
        );
    }
}

/// Value-free: only the kind of the failure is kept.
impl From<diesel::result::Error> for StoreError {
    fn from(e: diesel::result::Error) -> Self {
        StoreError::query(&e)
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            AppError::unavailable_from("database", e)
        } else {
            AppError::internal_from("database", e)
        }
    }
}

/// Opens connections for the pool; SQLite connections get their pragmas here.
#[derive(Debug, Clone)]
pub struct Manager {
    target: DatabaseTarget,
}

impl ManageConnection for Manager {
    type Connection = AnyConnection;
    type Error = r2d2::Error;

    fn connect(&self) -> Result<AnyConnection, r2d2::Error> {
        match &self.target {
            DatabaseTarget::Postgres(url) => PgConnection::establish(url.0.expose_secret())
                .map(AnyConnection::Postgresql)
                .map_err(r2d2::Error::ConnectionError),
            DatabaseTarget::Sqlite(path) => {
                let mut conn =
                    SqliteConnection::establish(&path.to_string_lossy()).map_err(r2d2::Error::ConnectionError)?;
                conn.batch_execute(
                    "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                     PRAGMA foreign_keys = ON;",
                )
                .map_err(r2d2::Error::QueryError)?;
                Ok(AnyConnection::Sqlite(conn))
            }
        }
    }

    fn is_valid(&self, conn: &mut AnyConnection) -> Result<(), r2d2::Error> {
        conn.batch_execute("SELECT 1").map_err(r2d2::Error::QueryError)
    }

    fn has_broken(&self, _conn: &mut AnyConnection) -> bool {
        false
    }
}

pub type DbPool = Pool<Manager>;
pub type DbConn = PooledConnection<Manager>;

/// The database handle shared by the service: a pool plus which backend it is.
#[derive(Clone)]
pub struct Db {
    pool: DbPool,
    backend: Backend,
    /// The pool failed to open a connection since the last successful checkout: the database is down.
    unreachable: Arc<AtomicBool>,
}

/// How long one checkout attempt waits before [`Db::conn`] looks again whether the database is down.
const CHECKOUT_SLICE: Duration = Duration::from_millis(200);

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("backend", &self.backend).finish()
    }
}

impl Db {
    /// Connects (creating the SQLite file's directory, never a file for an unknown scheme) and builds the pool.
    pub fn connect(target: &DatabaseTarget, max_size: u32) -> Result<Db, StoreError> {
        let backend = match target {
            DatabaseTarget::Postgres(_) => Backend::Postgres,
            DatabaseTarget::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    crate::fsutil::private_dir(dir).map_err(StoreError::Directory)?;
                }
                // The file holds ciphertext, blind indexes and the audit trail's metadata: owner only. SQLite gives
                // its -wal and -shm files the mode of the database file.
                crate::fsutil::private_file(path).map_err(StoreError::FileMode)?;
                Backend::Sqlite
            }
        };
        let manager = Manager { target: target.clone() };
        // One attempt first, so an unreachable database is one clear error at once, not a pool timeout.
        if let Err(e) = manager.connect() {
            let source = DriverMessage::of(&e);
            return Err(StoreError::Unreachable { why: unreachable_reason(&source.0), source });
        }
        let unreachable = Arc::new(AtomicBool::new(false));
        let pool = Pool::builder()
            .max_size(max_size)
            .connection_timeout(Duration::from_secs(10))
            .error_handler(Box::new(QuietErrors { unreachable: unreachable.clone(), ..Default::default() }))
            .build(manager)
            .map_err(StoreError::Connect)?;
        Ok(Db { pool, backend, unreachable })
    }

    /// Whether the database holds carevault's schema (at least one migration applied). Maintenance commands
    /// refuse a database without it rather than create one.
    pub fn holds_carevault_schema(&self) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().map_err(StoreError::Connect)?;
        let applied = match &mut *conn {
            AnyConnection::Postgresql(c) => c.applied_migrations().map(|v| v.len()),
            AnyConnection::Sqlite(c) => c.applied_migrations().map(|v| v.len()),
        };
        // No migrations table at all reads as an error here: no carevault data either.
        Ok(applied.is_ok_and(|n| n > 0))
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A pooled connection, or 503 (fail closed) when the database cannot be reached.
    ///
    /// A busy pool is waited for (up to the pool's 10 s); a database that cannot be reached is not: once the
    /// pool has failed to open a connection, a checkout that finds none within [`CHECKOUT_SLICE`] answers 503 at
    /// once instead of holding the request for the whole timeout (PostgreSQL restarting, a network cut).
    pub fn conn(&self) -> Result<DbConn, AppError> {
        self.checkout().map_err(AppError::from)
    }

    /// [`Db::conn`]'s checkout, in the store's own error type.
    fn checkout(&self) -> Result<DbConn, StoreError> {
        let deadline = std::time::Instant::now() + self.pool.connection_timeout();
        loop {
            match self.pool.get_timeout(CHECKOUT_SLICE) {
                Ok(conn) => {
                    self.unreachable.store(false, Ordering::SeqCst);
                    return Ok(conn);
                }
                Err(e) => {
                    if self.unreachable.load(Ordering::SeqCst) || std::time::Instant::now() >= deadline {
                        return Err(StoreError::Pool(e));
                    }
                }
            }
        }
    }

    /// Connections open, of which idle, and the pool's maximum size (for the pool gauges).
    pub fn pool_state(&self) -> (u32, u32, u32) {
        let state = self.pool.state();
        (state.connections, state.idle_connections, self.pool.max_size())
    }

    /// Runs pending migrations; returns how many ran.
    pub fn migrate(&self) -> Result<usize, StoreError> {
        let mut conn = self.pool.get().map_err(StoreError::Connect)?;
        run_migrations(&mut conn)
    }

    /// True when the database answers and no migration is pending.
    pub fn ready(&self) -> bool {
        let Ok(mut conn) = self.checkout() else { return false };
        let pending = match &mut *conn {
            AnyConnection::Postgresql(c) => c.has_pending_migration(PG_MIGRATIONS),
            AnyConnection::Sqlite(c) => c.has_pending_migration(SQLITE_MIGRATIONS),
        };
        matches!(pending, Ok(false))
    }

    /// Runs blocking database work off the async executor.
    pub async fn run<T, F>(&self, f: F) -> Result<T, AppError>
    where
        T: Send + 'static,
        F: FnOnce(&mut AnyConnection) -> Result<T, AppError> + Send + 'static,
    {
        use tracing::Instrument;
        let system = match self.backend {
            Backend::Postgres => "postgresql",
            Backend::Sqlite => "sqlite",
        };
        let span = tracing::info_span!(target: "carevault::store", "store", db.system.name = system);
        let db = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = db.checkout()?;
            f(&mut conn)
        })
        .instrument(span)
        .await
        .map_err(StoreError::Task)?
    }
}

pub fn run_migrations(conn: &mut AnyConnection) -> Result<usize, StoreError> {
    let ran = match conn {
        AnyConnection::Postgresql(c) => c.run_pending_migrations(PG_MIGRATIONS).map(|v| v.len()),
        AnyConnection::Sqlite(c) => c.run_pending_migrations(SQLITE_MIGRATIONS).map(|v| v.len()),
    };
    ran.map_err(StoreError::Migration)
}

/// Reverts every applied migration (tests check that each migration goes down and up again).
pub fn revert_all(conn: &mut AnyConnection) -> Result<usize, StoreError> {
    let reverted = match conn {
        AnyConnection::Postgresql(c) => c.revert_all_migrations(PG_MIGRATIONS).map(|v| v.len()),
        AnyConnection::Sqlite(c) => c.revert_all_migrations(SQLITE_MIGRATIONS).map(|v| v.len()),
    };
    reverted.map_err(StoreError::Migration)
}

/// Any diesel error on a request path: 404 for no row, 503 for a closed connection, else 500; the cause kept
/// is the error's kind only ([`StoreError::Query`]), so the log shows it without any value.
pub fn db_err(e: diesel::result::Error) -> AppError {
    match e {
        diesel::result::Error::NotFound => AppError::NotFound,
        other => StoreError::query(&other).into(),
    }
}

/// A description of a diesel error that carries no values (messages can quote data).
fn kind_of(e: &diesel::result::Error) -> &'static str {
    use diesel::result::{DatabaseErrorKind as K, Error as E};
    match e {
        E::DatabaseError(K::UniqueViolation, _) => "unique violation",
        E::DatabaseError(K::ForeignKeyViolation, _) => "foreign key violation",
        E::DatabaseError(K::SerializationFailure, _) => "serialization failure",
        E::DatabaseError(K::NotNullViolation, _) => "not null violation",
        E::DatabaseError(_, _) => "database error",
        E::DeserializationError(_) => "deserialization error",
        E::SerializationError(_) => "serialization error",
        E::RollbackTransaction => "rollback",
        _ => "query error",
    }
}

/// The default SQLite location under a data directory.
pub fn default_sqlite(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("carevault.db")
}

impl From<diesel::result::Error> for AppError {
    fn from(e: diesel::result::Error) -> Self {
        db_err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Chain;

    #[test]
    fn a_query_error_keeps_its_kind_and_never_the_database_message() {
        let message = "duplicate key value (family)=(Doe) violates unique constraint".to_owned();
        let e = db_err(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::UniqueViolation,
            Box::new(message),
        ));
        let text = Chain(&e).to_string();
        assert_eq!(text, "internal error: database: caused by database: unique violation");
        assert!(!text.contains("Doe"), "{text}");
    }

    #[test]
    fn a_closed_connection_is_unavailable() {
        let e = db_err(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::ClosedConnection,
            Box::new(String::new()),
        ));
        assert!(matches!(e, AppError::UnavailableFrom { .. }), "{e:?}");
    }
}
