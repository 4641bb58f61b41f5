//! Authentication building blocks without I/O: the authenticated caller ([`Principal`]), password hashing
//! and policy, signed access tokens and their key ring, session and refresh-token rules, login throttling.
//!
//! Persistence and HTTP live elsewhere; every type here that must be stored says which fields to store.

pub mod attempts;
pub mod oidc;
pub mod password;
pub mod principal;
pub mod scope;
pub mod service;
pub mod session;
pub mod throttle;
pub mod token;
pub mod totp;

pub use principal::Principal;
