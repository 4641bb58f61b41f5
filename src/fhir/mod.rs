//! FHIR R4: the declaration of each served resource type and everything pure driven by it — the model of the
//! embedded official schema, validation, search parsing and index extraction, reference parsing, Bundles and
//! the CapabilityStatement. No database, no HTTP.

pub mod bundle;
pub mod capability;
pub mod decl;
pub mod normalize;
pub mod reference;
pub mod schema;
pub mod search;
pub mod validate;

pub use decl::{ParamKind, PatientLink, ResourceDecl, SearchParamDecl, WriteHook};
pub use reference::{care_pairs, local_id, patient_of_reference};
pub use validate::FhirValidator;

#[cfg(test)]
mod tests;
