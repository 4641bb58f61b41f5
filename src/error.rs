//! The service's error type: what went wrong, by kind, with the underlying cause kept as a `source`.
//!
//! No HTTP here: the one mapping to an HTTP status and a FHIR OperationOutcome is [`crate::api::error`]. Modules
//! below the API have their own error types with sources (`StoreError`, `CryptoError`, `KeyStoreError`,
//! `MonitorError`, ...), converted into [`AppError`] by `From` so `?` works on the request path.
//!
//! Rules for every error (here and in the module errors): the text is ours. It may name an element *path* (which
//! the server defines), a key version, a setting or a file the operator configured, but never a value a client
//! sent and never decrypted data, so a whole cause chain is safe to log. Outward text (the HTTP body) is generic
//! and fixed per kind; the cause chain goes to the log once, where the error is rendered ([`Chain`]).

use std::fmt;

/// A boxed cause: any error, shareable across threads.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Kept here for callers written before the mapping moved to [`crate::api::error`].
pub use crate::api::error::{FHIR_JSON, operation_outcome};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Input failed validation. `path` names the element (server-defined names only), `reason` is a fixed text.
    #[error("invalid input")]
    Invalid { path: Option<String>, reason: &'static str },
    /// Missing, or outside the caller's scope: the two look the same on purpose.
    #[error("not found")]
    NotFound,
    #[error("gone")]
    Gone,
    #[error("unauthenticated")]
    Unauthenticated,
    #[error("forbidden")]
    Forbidden,
    /// Refused because of one element the caller may not see or change: `path` names it (a server-defined
    /// name, never a value).
    #[error("forbidden element")]
    ForbiddenElement { path: String },
    /// An entry of a Bundle failed: `source` is its error, `index` its position in `Bundle.entry`.
    #[error("Bundle entry {index} failed")]
    InEntry {
        index: usize,
        #[source]
        source: Box<AppError>,
    },
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("conflict")]
    Conflict,
    #[error("precondition failed")]
    PreconditionFailed,
    #[error("precondition required")]
    PreconditionRequired,
    #[error("payload too large")]
    PayloadTooLarge,
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("too many requests")]
    TooManyRequests { retry_after_secs: u64 },
    /// The account already has as many expensive operations in flight as `setting` allows.
    #[error("too many concurrent requests ({setting})")]
    ConcurrencyLimit { setting: &'static str, retry_after_secs: u64 },
    /// A dependency (database, audit store, identity provider) is unavailable: fail closed. The text is ours.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// A dependency is unavailable, with the error that says why.
    #[error("service unavailable: {context}")]
    UnavailableFrom {
        context: &'static str,
        #[source]
        source: BoxError,
    },
    /// Anything else, described by a text of ours (to the log, never to the client).
    #[error("internal error: {0}")]
    Internal(String),
    /// Anything else, with the error that caused it (to the log, never to the client).
    #[error("internal error: {context}")]
    InternalFrom {
        context: &'static str,
        #[source]
        source: BoxError,
    },
}

impl AppError {
    pub fn invalid(path: impl Into<String>, reason: &'static str) -> Self {
        Self::Invalid { path: Some(path.into()), reason }
    }

    /// A 403 naming the element (`Patient.communication`) that made the write impossible.
    pub fn forbidden_element(path: impl Into<String>) -> Self {
        Self::ForbiddenElement { path: path.into() }
    }

    /// An internal error described by a text of ours. Prefer [`AppError::internal_from`] when there is an error
    /// to keep as the cause.
    pub fn internal(detail: impl fmt::Display) -> Self {
        Self::Internal(detail.to_string())
    }

    /// A dependency is unavailable, described by a text of ours. Prefer [`AppError::unavailable_from`].
    pub fn unavailable(detail: impl fmt::Display) -> Self {
        Self::Unavailable(detail.to_string())
    }

    /// An internal error: `context` says what was being done, `source` is kept as the cause.
    pub fn internal_from(context: &'static str, source: impl Into<BoxError>) -> Self {
        Self::InternalFrom { context, source: source.into() }
    }

    /// A dependency is unavailable: `context` says which, `source` is kept as the cause.
    pub fn unavailable_from(context: &'static str, source: impl Into<BoxError>) -> Self {
        Self::UnavailableFrom { context, source: source.into() }
    }

    /// True for the kinds that are the server's fault or a dependency's (5xx), whose cause belongs in the log.
    pub fn is_server_error(&self) -> bool {
        if let Self::InEntry { source, .. } = self {
            return source.is_server_error();
        }
        matches!(
            self,
            Self::Internal(_) | Self::InternalFrom { .. } | Self::Unavailable(_) | Self::UnavailableFrom { .. }
        )
    }
}

pub type AppResult<T> = Result<T, AppError>;

/// Displays an error with its whole cause chain: `top: caused by next: caused by last`. Use it where an error
/// is finally handled (logged once, or printed by the CLI); `{:#}` prints one cause per line instead.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            if f.alternate() {
                write!(f, "\n  caused by: {c}")?;
            } else {
                write!(f, ": caused by {c}")?;
            }
            cause = c.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A cause that is only a fixed text of ours (e.g. a sanitised description of a library error whose own
/// message may quote data).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("{0}")]
pub struct Cause(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading the key table")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_prints_every_source() {
        let inner = Outer(std::io::Error::other("disk on fire"));
        let e = AppError::internal_from("cannot load the keys", inner);
        assert_eq!(
            Chain(&e).to_string(),
            "internal error: cannot load the keys: caused by reading the key table: caused by disk on fire"
        );
        assert_eq!(
            format!("{:#}", Chain(&e)),
            "internal error: cannot load the keys\n  caused by: reading the key table\n  caused by: disk on fire"
        );
    }

    #[test]
    fn only_failures_of_ours_or_a_dependency_are_server_errors() {
        assert!(AppError::internal("x").is_server_error());
        assert!(AppError::unavailable_from("database", Cause("pool timed out")).is_server_error());
        assert!(!AppError::NotFound.is_server_error());
        assert!(!AppError::invalid("Patient.birthDate", "bad").is_server_error());
    }
}
