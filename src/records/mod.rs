//! The records service: the one place where access, storage, crypto, shaping and audit meet.

pub mod audit_api;
pub mod reindex;
pub mod service;
pub mod store;

pub use service::{Caller, Records, Shown};
