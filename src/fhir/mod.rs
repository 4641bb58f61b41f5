//! FHIR R4: the declaration of each served resource type and everything pure driven by it — validation,
//! search parsing and index extraction, Bundles and the CapabilityStatement. No database, no HTTP.

pub mod bundle;
pub mod capability;
pub mod decl;
pub mod normalize;
pub mod search;
pub mod validate;

pub use decl::{ParamKind, PatientLink, ResourceDecl, SearchParamDecl};
pub use validate::FhirValidator;

#[cfg(test)]
mod tests;
