//! The records service: the one place where access, storage, crypto, shaping and audit meet.

pub mod store;
