//! The records service: the one place where access, storage, crypto, shaping and audit meet.
//!
//! Its whole surface is [`Records::execute`] taking an [`Operation`] and answering a [`Done`] (plus the
//! operator jobs in [`maintenance`]). The stages are private rooms of this module: `execute` (gate, audit),
//! `service` (the FHIR interactions: scope, store, codec, shape), `trail` (the audit trail and security
//! operations), `store` (the only code that names the resource tables). Nothing outside can skip a step.

mod bundle;
mod concurrency;
mod execute;
pub mod maintenance;
mod operation;
mod reindex;
mod rekey;
mod service;
mod store;
mod trail;
mod write;

pub use operation::{Done, Interaction, Operation, Shown};
pub use reindex::Reindexed;
pub use service::{Caller, Records};
/// The stored form of restricted identifiers (the SSN apart from the rest of `identifier`).
pub use service::{RESTRICTED_IDENTIFIERS, join_restricted, split_restricted};

/// Raw row writes for the integration tests' fault injection (concurrent writers during key maintenance). Debug
/// builds only: a release build has no way to write a resource row except through [`Records::execute`].
#[cfg(debug_assertions)]
#[doc(hidden)]
pub mod fault_injection {
    pub use super::store::{Row, WriteExtras, insert, replace};
}

#[cfg(test)]
mod boundary {
    //! The boundary is structural: outside this module (and the schema that declares them) no source file
    //! names the resource tables or the break-glass grants, so no other code can read or write them.

    const TABLES: [&str; 4] = ["resources::", "resource_history::", "search_index::", "break_glass::"];

    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn no_module_outside_records_names_the_resource_tables() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&root, &mut files);
        assert!(files.len() > 50, "the source tree was found");
        let allowed = [root.join("records"), root.join("store").join("schema.rs")];
        let mut offenders = Vec::new();
        for file in files.iter().filter(|f| !allowed.iter().any(|a| f.starts_with(a))) {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                let names_table = TABLES.iter().any(|t| {
                    code.match_indices(t)
                        .any(|(i, _)| i == 0 || !code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
                });
                let imports_table = code.contains("schema::")
                    && TABLES.iter().any(|t| {
                        let name = t.trim_end_matches("::");
                        code.split(|c: char| !(c.is_alphanumeric() || c == '_')).any(|w| w == name)
                    });
                if names_table || imports_table {
                    offenders.push(format!("{}:{}", file.display(), n + 1));
                }
            }
        }
        assert!(offenders.is_empty(), "resource tables named outside src/records: {offenders:#?}");
    }
}
