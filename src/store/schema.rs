//! Table definitions shared by both backends (types chosen so one schema serves PostgreSQL and SQLite).

diesel::table! {
    resources (resource_type, id) {
        resource_type -> Text,
        id -> Text,
        version_id -> BigInt,
        last_updated -> BigInt,
        deleted -> Bool,
        patient_id -> Nullable<Text>,
        key_version -> Integer,
        content -> Text,
    }
}

diesel::table! {
    resource_history (resource_type, id, version_id) {
        resource_type -> Text,
        id -> Text,
        version_id -> BigInt,
        last_updated -> BigInt,
        deleted -> Bool,
        key_version -> Integer,
        content -> Text,
    }
}

diesel::table! {
    search_index (resource_type, param, value, id) {
        resource_type -> Text,
        id -> Text,
        param -> Text,
        value -> Text,
    }
}


diesel::table! {
    care_relationships (careteam_id, practitioner_id, patient_id) {
        careteam_id -> Text,
        patient_id -> Text,
        practitioner_id -> Text,
    }
}

diesel::allow_tables_to_appear_in_same_query!(resources, resource_history, search_index, care_relationships);
