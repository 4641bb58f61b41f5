#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! Every integration test lives in this one binary. Each test starts the real server on port 0 over HTTPS with
//! its own fresh database: a temporary SQLite file and, when `CAREVAULT_TEST_POSTGRES_URL` is set, the same test
//! on a fresh PostgreSQL database created for it and dropped after.

mod helpers;

mod access;
mod attacks;
mod audit;
mod auth;
mod cli;
mod clients;
mod cors;
mod demo;
mod disclosure;
mod encryption;
mod faults;
mod fhir;
mod fidelity;
mod foundation;
mod fuzz;
mod ingest;
mod limits;
mod monitor;
mod oidc;
mod openapi;
mod ops;
mod owasp;
mod process;
mod retention;
mod smart;
mod tamper;
mod telemetry;
mod types;
mod world;
mod writes;
