//! carevault: a HIPAA-grade FHIR R4 patient-records API.
//!
//! See `docs/architecture.md` for how a request flows through these modules.

pub mod clock;
pub mod error;
pub mod fhir;
pub mod role;
