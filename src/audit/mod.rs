//! The audit trail, pure parts: the event record, its canonical bytes, the hash chain and signed checkpoints,
//! the FHIR `AuditEvent` form, and the patient access report. Persistence (the table, the durable group-commit
//! appender, `audit verify` / `audit export`) builds on these; see [`chain`] for how appends must be ordered.

pub mod anchor;
pub mod chain;
pub mod checkpoints;
pub mod event;
pub mod fhir;
pub mod report;
pub mod seal;
pub mod store;

pub use chain::{
    BreakKind, ChainError, ChainHead, ChainLink, Checkpoint, CheckpointError, CheckpointSigner, GENESIS, Hash,
    Verifier, link,
};
pub use event::{Action, Agent, AuditEvent, AuditKind, Outcome, Target, purpose};
pub use fhir::to_fhir;
pub use report::access_report;
