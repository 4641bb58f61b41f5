//! carevault: a HIPAA-grade FHIR R4 patient-records API.
//!
//! See `docs/architecture.md` for how a request flows through these modules.

pub mod access;
pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod demo;
pub mod error;
pub mod fhir;
pub mod fsutil;
pub mod monitor;
pub mod records;
pub mod role;
pub mod store;
pub mod telemetry;
pub mod tls;
