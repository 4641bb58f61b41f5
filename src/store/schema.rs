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
        index_version -> Integer,
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

diesel::table! {
    crypto_keys (purpose, version) {
        purpose -> Text,
        version -> Integer,
        wrapped -> Text,
        state -> Text,
        master_id -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    signing_keys (kid) {
        kid -> Text,
        wrapped -> Text,
        public_key -> Text,
        created_at -> BigInt,
        retired_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    accounts (id) {
        id -> Text,
        username -> Text,
        kind -> Text,
        role -> Text,
        practitioner_id -> Nullable<Text>,
        patient_id -> Nullable<Text>,
        password_hash -> Nullable<Text>,
        totp_secret -> Nullable<Text>,
        totp_last_step -> Nullable<BigInt>,
        disabled -> Bool,
        created_at -> BigInt,
    }
}

diesel::table! {
    sessions (id) {
        id -> Text,
        account_id -> Text,
        created_at -> BigInt,
        last_seen -> BigInt,
        revoked_at -> Nullable<BigInt>,
        client_id -> Nullable<Text>,
        scope -> Nullable<Text>,
        launch_patient -> Nullable<Text>,
    }
}

diesel::table! {
    refresh_tokens (hash) {
        hash -> Text,
        session_id -> Text,
        created_at -> BigInt,
        spent_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    login_failures (id) {
        id -> Text,
        key -> Text,
        at -> BigInt,
    }
}

diesel::table! {
    login_reservations (key) {
        key -> Text,
        holder -> Text,
        until -> BigInt,
    }
}

diesel::table! {
    login_known_addresses (key) {
        key -> Text,
        last_success -> BigInt,
    }
}

diesel::table! {
    break_glass (id) {
        id -> Text,
        account_id -> Text,
        patient_id -> Text,
        reason -> Text,
        created_at -> BigInt,
        expires_at -> BigInt,
        revoked_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    audit_events (seq) {
        seq -> BigInt,
        id -> Text,
        recorded -> BigInt,
        kind -> Text,
        agent -> Nullable<Text>,
        patient_id -> Nullable<Text>,
        body -> Text,
        prev_hash -> Text,
        hash -> Text,
        action -> Text,
        seal -> Nullable<Text>,
    }
}

diesel::table! {
    audit_seal_keys (key_id) {
        key_id -> Text,
        wrapped -> Text,
        first_seq -> BigInt,
        created_at -> BigInt,
    }
}

diesel::table! {
    audit_patients (patient_id, seq) {
        patient_id -> Text,
        seq -> BigInt,
        recorded -> BigInt,
    }
}

diesel::table! {
    audit_head (id) {
        id -> Integer,
        seq -> BigInt,
        hash -> Text,
    }
}

diesel::table! {
    audit_checkpoints (seq) {
        seq -> BigInt,
        hash -> Text,
        at -> BigInt,
        signature -> Text,
        key_id -> Text,
    }
}

diesel::table! {
    audit_signing_keys (key_id) {
        key_id -> Text,
        wrapped -> Text,
        public_key -> Text,
        created_at -> BigInt,
        retired_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    alerts (id) {
        id -> Text,
        rule -> Text,
        severity -> Text,
        subject -> Text,
        count -> BigInt,
        window_secs -> BigInt,
        raised_at -> BigInt,
        acknowledged_at -> Nullable<BigInt>,
        ack_note -> Nullable<Text>,
        delivery -> Text,
        attempts -> Integer,
        next_attempt -> Nullable<BigInt>,
    }
}

diesel::table! {
    oidc_logins (state_hash) {
        state_hash -> Text,
        binding_hash -> Text,
        pkce_verifier -> Text,
        nonce -> Text,
        created_at -> BigInt,
        expires_at -> BigInt,
        smart_flow -> Nullable<Text>,
    }
}

diesel::table! {
    apps (client_id) {
        client_id -> Text,
        name -> Text,
        kind -> Text,
        secret_hash -> Nullable<Text>,
        redirect_uris -> Text,
        scopes -> Text,
        jwks -> Nullable<Text>,
        jwks_url -> Nullable<Text>,
        account_id -> Nullable<Text>,
        created_at -> BigInt,
        disabled -> Bool,
    }
}

diesel::table! {
    smart_authorizations (flow_hash) {
        flow_hash -> Text,
        client_id -> Text,
        redirect_uri -> Text,
        scope -> Text,
        state -> Text,
        nonce -> Nullable<Text>,
        code_challenge -> Text,
        account_id -> Nullable<Text>,
        consent_hash -> Nullable<Text>,
        code_hash -> Nullable<Text>,
        granted_scope -> Nullable<Text>,
        patient_id -> Nullable<Text>,
        session_id -> Nullable<Text>,
        created_at -> BigInt,
        expires_at -> BigInt,
        used_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    client_assertions (jti_hash) {
        jti_hash -> Text,
        expires_at -> BigInt,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    resources,
    resource_history,
    search_index,
    care_relationships,
    crypto_keys,
    signing_keys,
    accounts,
    sessions,
    refresh_tokens,
    login_failures,
    login_reservations,
    login_known_addresses,
    break_glass,
    audit_events,
    audit_patients,
    audit_head,
    audit_checkpoints,
    audit_signing_keys,
    audit_seal_keys,
    alerts,
    oidc_logins,
    apps,
    smart_authorizations,
    client_assertions,
);

diesel::joinable!(sessions -> accounts (account_id));
diesel::joinable!(refresh_tokens -> sessions (session_id));
