//! `GET /openapi.json` (CONTRACT §5b): an OpenAPI 3.1 document of every route, built with utoipa's builder API
//! from [`ROUTES`] (the same table [`super::routes`] registers; a test reads `routes()` and fails on any route
//! not in it) and from the served types' declarations ([`crate::fhir::decl::all`]): each FHIR interaction is
//! expanded per type, writes only for types clients may write, search parameters from the declaration.
//!
//! Responses are what the handlers really answer (statuses from [`crate::api::error::status_of`], the OAuth
//! errors of `/auth/token`, the HTML of the authorize pages). Resource bodies are schema-light (`type: object`
//! with `resourceType`): the FHIR schema proper is the validator's job. No PHI and no secret here; served
//! without authentication. schemathesis runs against this document (tests/schemathesis/run.sh).

use crate::app::AppState;
use crate::fhir::decl::{self, ParamKind, ResourceDecl};
use actix_web::{HttpResponse, web};
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{AdditionalProperties, ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{
    AuthorizationCode, Flow, HttpAuthScheme, HttpBuilder, OAuth2, Scopes, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{
    ComponentsBuilder, InfoBuilder, OpenApi, OpenApiBuilder, PathsBuilder, Ref, RefOr, Required, ServerBuilder,
};

/// An HTTP method of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Post => "post",
            Self::Put => "put",
            Self::Patch => "patch",
            Self::Delete => "delete",
        }
    }

    fn http(self) -> HttpMethod {
        match self {
            Self::Get => HttpMethod::Get,
            Self::Post => HttpMethod::Post,
            Self::Put => HttpMethod::Put,
            Self::Patch => HttpMethod::Patch,
            Self::Delete => HttpMethod::Delete,
        }
    }
}

use Method::{Delete, Get, Patch, Post, Put};

/// Every route of [`super::routes`], as actix templates: the one list the document is built from. The test
/// `every_registered_route_is_documented` reads `routes()` and fails on a route missing here (or here only).
pub const ROUTES: &[(Method, &str)] = &[
    (Get, "/health/live"),
    (Get, "/health/ready"),
    (Get, "/openapi.json"),
    (Get, "/.well-known/jwks.json"),
    (Get, "/.well-known/smart-configuration"),
    (Get, "/fhir/.well-known/smart-configuration"),
    (Get, "/auth/authorize"),
    (Post, "/auth/authorize/login"),
    (Post, "/auth/authorize/oidc"),
    (Post, "/auth/authorize/consent"),
    (Post, "/auth/introspect"),
    (Post, "/auth/login"),
    (Post, "/auth/token"),
    (Post, "/auth/revoke"),
    (Post, "/auth/logout"),
    (Post, "/auth/break-glass"),
    (Get, "/fhir/metadata"),
    (Get, "/fhir/Patient/{id}/$everything"),
    (Get, "/fhir/Patient/{id}/$access-report"),
    (Post, "/fhir"),
    (Post, "/fhir/"),
    (Post, "/fhir/{type}/_search"),
    (Post, "/fhir/{type}/$validate"),
    (Get, "/fhir/{type}/{id}/_history/{vid}"),
    (Get, "/fhir/{type}/{id}/_history"),
    (Get, "/fhir/{type}/{id}"),
    (Put, "/fhir/{type}/{id}"),
    (Patch, "/fhir/{type}/{id}"),
    (Delete, "/fhir/{type}/{id}"),
    (Get, "/fhir/{type}"),
    (Post, "/fhir/{type}"),
    (Put, "/fhir/{type}"),
    (Delete, "/fhir/{type}"),
    (Get, "/auth/session"),
    (Get, "/auth/oidc/login"),
    (Get, "/auth/oidc/callback"),
    (Get, "/admin/alerts"),
    (Post, "/admin/alerts/{id}/ack"),
];

const FHIR_JSON: &str = crate::api::error::FHIR_JSON;
const JSON: &str = "application/json";
const HTML: &str = "text/html";
const FORM: &str = "application/x-www-form-urlencoded";
const BEARER: &str = "bearer";
const SMART: &str = "smart";

/// `GET /openapi.json`: the document for this server's base URL. No authentication, no PHI.
pub async fn serve(state: web::Data<AppState>) -> HttpResponse {
    match document(&state.config.base_url()).to_json() {
        Ok(body) => HttpResponse::Ok().content_type(JSON).body(body),
        Err(_) => actix_web::ResponseError::error_response(&crate::error::AppError::internal(
            "cannot serialise the OpenAPI document",
        )),
    }
}

/// The whole document; `server` is the base URL (`https://host:port`), the only host-dependent part.
pub fn document(server: &str) -> OpenApi {
    let mut paths = PathsBuilder::new();
    let mut ordered: Vec<(String, Method, utoipa::openapi::path::Operation)> = Vec::new();
    for &(method, template) in ROUTES {
        for (path, op) in operations(method, template) {
            ordered.push((path, method, op));
        }
    }
    // Group by path, keeping first-seen order (a PathItem holds every method of one path).
    let mut seen: Vec<String> = Vec::new();
    for (path, _, _) in &ordered {
        if !seen.contains(path) {
            seen.push(path.clone());
        }
    }
    for path in seen {
        let mut item: Option<PathItem> = None;
        for (p, method, op) in ordered.iter().filter(|(p, _, _)| *p == path) {
            let _ = p;
            item = Some(match item {
                None => PathItem::new(method.http(), op.clone()),
                Some(mut existing) => {
                    existing.merge_operations(PathItem::new(method.http(), op.clone()));
                    existing
                }
            });
        }
        if let Some(item) = item {
            paths = paths.path(path, item);
        }
    }
    OpenApiBuilder::new()
        .info(InfoBuilder::new().title("carevault").version(env!("CARGO_PKG_VERSION")).description(Some(
            "FHIR R4 patient-records API: first-party sign-in, SMART App Launch 2.0, FHIR interactions \
                     per served type, administration. Errors are FHIR OperationOutcomes (OAuth endpoints: RFC \
                     6749 error objects); no response echoes a value the client sent.",
        )))
        .servers(Some([ServerBuilder::new().url(server).build()]))
        .paths(paths.build())
        .components(Some(components(server)))
        .build()
}

/// The concrete paths and operations of one route.
fn operations(method: Method, template: &str) -> Vec<(String, utoipa::openapi::path::Operation)> {
    let one = |op: OperationBuilder| vec![(template.to_owned(), op.build())];
    let per_type = |writes: bool, f: &dyn Fn(&'static ResourceDecl) -> OperationBuilder| {
        decl::all()
            .iter()
            .filter(|d| !writes || !d.read_only)
            .map(|d| (template.replace("{type}", d.name), f(d).build()))
            .collect::<Vec<_>>()
    };
    match (method, template) {
        (Get, "/health/live") => one(op("health.live", "health", "The process is up.")
            .response("200", json_response("Live.", schema_ref("Health")))
            .response("429", too_many())),
        (Get, "/health/ready") => {
            one(op("health.ready", "health", "The database answers and every migration has run.")
                .response("200", json_response("Ready.", schema_ref("Health")))
                .response("429", too_many())
                .response("503", json_response("Not ready.", schema_ref("Health"))))
        }
        (Get, "/openapi.json") => one(op("openapi", "discovery", "This document.")
            .response("200", json_response("The OpenAPI 3.1 document.", object("An OpenAPI document.")))
            .response("429", too_many())),
        (Get, "/.well-known/jwks.json") => {
            one(op("jwks", "discovery", "The public keys that verify this server's tokens.")
                .response(
                    "200",
                    ResponseBuilder::new()
                        .description("A JWK set.")
                        .content("application/jwk-set+json", content(schema_ref("Jwks")))
                        .build(),
                )
                .response("429", too_many()))
        }
        (Get, "/.well-known/smart-configuration") | (Get, "/fhir/.well-known/smart-configuration") => one(op(
            if template.starts_with("/fhir") { "smart.configuration.fhir" } else { "smart.configuration" },
            "discovery",
            "SMART App Launch 2.0 discovery.",
        )
        .response("200", json_response("The SMART configuration.", schema_ref("SmartConfiguration")))
        .response("429", too_many())),
        (Get, "/auth/authorize") => {
            one(op("auth.authorize", "smart", "SMART authorization request: answers the sign-in page (HTML).")
                .parameters(Some(
                    [
                        ("response_type", true, "`code`."),
                        ("client_id", true, "The registered app."),
                        ("redirect_uri", true, "Exactly as registered."),
                        ("scope", true, "SMART v2 scopes, e.g. `launch/patient patient/Observation.rs openid`."),
                        ("state", true, "Opaque value returned to the app."),
                        ("aud", true, "This server's FHIR base URL."),
                        ("code_challenge", true, "PKCE S256 challenge."),
                        ("code_challenge_method", true, "`S256`."),
                        ("nonce", false, "OpenID Connect nonce."),
                        ("launch", false, "EHR launch context (not supported: standalone launch only)."),
                    ]
                    .into_iter()
                    .map(|(n, r, d)| query_param(n, r, d, string())),
                ))
                .response("200", html("The sign-in page."))
                .response("302", redirect("Back to the app's redirect URI with an OAuth error."))
                .response("400", html("The request is malformed or the app or redirect URI is not registered."))
                .response("429", too_many()))
        }
        (Post, "/auth/authorize/login") => {
            one(op("auth.authorize.login", "smart", "The sign-in form of the authorize page.")
                .request_body(Some(form_body(&[
                    ("flow", true),
                    ("username", true),
                    ("password", true),
                    ("totp", false),
                ])))
                .response("200", html("The consent page, or the sign-in page again after a failed sign-in."))
                .response("400", html("The sign-in expired or was already used."))
                .response("403", html("No patient this app could be opened for."))
                .response("413", outcome_response("The body is too large."))
                .response("429", too_many_or_page()))
        }
        (Post, "/auth/authorize/oidc") => {
            one(op("auth.authorize.oidc", "smart", "The authorize page's sign-in at the OpenID Connect provider.")
                .request_body(Some(form_body(&[("flow", true)])))
                .response("303", redirect("To the provider; its callback continues to the consent page."))
                .response("400", html("The sign-in expired or was already used."))
                .response("404", outcome_response("No OpenID Connect provider is configured."))
                .response("413", outcome_response("The body is too large."))
                .response("429", too_many())
                .response("503", outcome_response("The provider is unreachable.")))
        }
        (Post, "/auth/authorize/consent") => {
            one(op("auth.authorize.consent", "smart", "The consent form: approve (a code back to the app) or deny.")
                .request_body(Some(form_body(&[
                    ("flow", true),
                    ("consent", true),
                    ("decision", true),
                    ("patient", false),
                ])))
                .response("303", redirect("To the app's redirect URI with `code` and `state` (or `error`)."))
                .response("400", html("The consent expired, was already used, or names no patient."))
                .response("403", html("The user may not open the app for that patient."))
                .response("413", outcome_response("The body is too large."))
                .response("429", too_many()))
        }
        (Post, "/auth/introspect") => {
            one(op("auth.introspect", "auth", "RFC 7662 token introspection, for confidential clients (Basic auth).")
                .request_body(Some(form_body(&[("token", true), ("token_type_hint", false)])))
                .security(SecurityRequirement::new("client", Vec::<String>::new()))
                .response("200", json_response("The token's state.", schema_ref("Introspection")))
                .response("400", oauth_error("No token given."))
                .response("401", oauth_error("The client did not authenticate."))
                .response("413", outcome_response("The body is too large."))
                .response("429", too_many()))
        }
        (Post, "/auth/login") => {
            one(op("auth.login", "auth", "First-party sign-in with a username, password and (if enrolled) TOTP code.")
                .request_body(Some(
                    RequestBodyBuilder::new()
                        .required(Some(Required::True))
                        .content(JSON, content(schema_ref("LoginRequest")))
                        .build(),
                ))
                .response("200", json_response("Signed in.", schema_ref("TokenResponse")))
                .response("401", outcome_response("Refused (one generic answer for every reason)."))
                .response("413", outcome_response("The body is too large."))
                .response("429", too_many()))
        }
        (Post, "/auth/token") => one(op(
            "auth.token",
            "auth",
            "OAuth 2 token endpoint: `refresh_token` (rotation, reuse revokes the session), \
                 `authorization_code` (SMART, PKCE S256), `client_credentials` (service clients with \
                 `client_secret_basic`, SMART Backend Services with a `private_key_jwt` client assertion).",
        )
        .request_body(Some(form_body(&[
            ("grant_type", true),
            ("refresh_token", false),
            ("code", false),
            ("redirect_uri", false),
            ("code_verifier", false),
            ("client_id", false),
            ("client_secret", false),
            ("client_assertion_type", false),
            ("client_assertion", false),
            ("scope", false),
        ])))
        .response("200", json_response("Tokens.", schema_ref("TokenResponse")))
        .response(
            "400",
            oauth_error("`invalid_request`, `invalid_grant`, `invalid_scope` or `unsupported_grant_type`."),
        )
        .response("401", oauth_error("`invalid_client`."))
        .response("413", outcome_response("The body is too large."))
        .response("429", too_many())),
        (Post, "/auth/revoke") => one(op(
            "auth.revoke",
            "auth",
            "RFC 7009 revocation of a refresh or access token: 200 whether known or not.",
        )
        .request_body(Some(form_body(&[("token", true), ("token_type_hint", false)])))
        .response("200", ResponseBuilder::new().description("Revoked (or unknown).").build())
        .response("400", oauth_error("No token given."))
        .response("413", outcome_response("The body is too large."))
        .response("429", too_many())),
        (Post, "/auth/logout") => one(authenticated(op("auth.logout", "auth", "Ends the caller's session at once."))
            .response("204", ResponseBuilder::new().description("Signed out.").build())),
        (Get, "/auth/session") => {
            one(authenticated(op("auth.session", "auth", "Who the caller is and when the presented token expires."))
                .response("200", json_response("The caller.", schema_ref("Session"))))
        }
        (Get, "/auth/oidc/login") => one(op(
            "auth.oidc.login",
            "auth",
            "Starts the OpenID Connect sign-in (404 when no provider is configured).",
        )
        .response("302", redirect("To the provider's authorization endpoint."))
        .response("404", outcome_response("No OpenID Connect provider is configured."))
        .response("429", too_many())
        .response("503", outcome_response("The provider is unreachable."))),
        (Get, "/auth/oidc/callback") => one(op(
            "auth.oidc.callback",
            "auth",
            "The provider's redirect back: the same tokens as /auth/login, or (a sign-in started from the \
                 SMART authorize page) that flow's consent page.",
        )
        .parameters(Some(
            [("code", "Authorization code."), ("state", "The login's state."), ("error", "Provider error.")]
                .into_iter()
                .map(|(n, d)| query_param(n, false, d, string())),
        ))
        .response(
            "200",
            ResponseBuilder::new()
                .description("Signed in: tokens, or the consent page of a SMART authorization.")
                .content(JSON, content(schema_ref("TokenResponse")))
                .content(HTML, ContentBuilder::new().schema(Some(string())).build())
                .build(),
        )
        .response(
            "400",
            ResponseBuilder::new()
                .description("The callback is malformed, or the SMART authorization it continues expired.")
                .content(FHIR_JSON, content(schema_ref("OperationOutcome")))
                .content(HTML, ContentBuilder::new().schema(Some(string())).build())
                .build(),
        )
        .response("401", outcome_response("Refused."))
        .response("403", outcome_response("The provider vouched for someone without a usable role."))
        .response("404", outcome_response("No OpenID Connect provider is configured."))
        .response("429", too_many())
        .response("503", outcome_response("The provider is unreachable."))),
        (Post, "/auth/break-glass") => one(authenticated(op(
            "auth.breakGlass",
            "auth",
            "Emergency access: a clinician or nurse opens one patient's record for a limited time (audited).",
        ))
        .request_body(Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content(JSON, content(schema_ref("BreakGlassRequest")))
                .build(),
        ))
        .response("201", json_response("The grant.", object("A break-glass grant.")))
        .response("400", outcome_response("The body must name the patient and a reason."))
        .response("403", outcome_response("Not permitted."))
        .response("404", outcome_response("No such patient."))
        .response("413", outcome_response("The body is too large."))),
        (Get, "/fhir/metadata") => one(op("fhir.metadata", "fhir", "The CapabilityStatement.")
            .response("200", fhir_response("The CapabilityStatement.", schema_ref("Resource")))
            .response("429", too_many())),
        (Get, "/fhir/Patient/{id}/$everything") => {
            one(fhir_op("Patient.everything", "Everything in one patient's compartment the caller may see.")
                .parameter(id_param())
                .response("200", fhir_response("A searchset Bundle.", schema_ref("Bundle")))
                .response("400", outcome_response("Invalid id."))
                .response("404", outcome_response("Not found (or not the caller's to see)."))
                .response("410", outcome_response("The patient was deleted.")))
        }
        (Get, "/fhir/Patient/{id}/$access-report") => one(fhir_op(
            "Patient.accessReport",
            "Who accessed this patient's record (HIPAA accounting of disclosures).",
        )
        .parameter(id_param())
        .response("200", fhir_response("A Bundle of AuditEvents.", schema_ref("Bundle")))
        .response("400", outcome_response("Invalid id or parameters."))
        .response("404", outcome_response("Not found (or not the caller's to see)."))
        .response("410", outcome_response("The patient was deleted."))),
        (Post, "/fhir/{type}/_search") => per_type(false, &|d| {
            fhir_op(&format!("{}.searchPost", d.name), &format!("Search {} with a form body.", d.name))
                .request_body(Some(search_form(d)))
                .response("200", fhir_response("A searchset Bundle.", schema_ref("Bundle")))
                .response("400", outcome_response("An unknown or malformed parameter."))
                .response("413", outcome_response("The body is too large."))
                .response("415", outcome_response("Not a form body."))
        }),
        (Get, "/fhir/{type}/{id}/_history/{vid}") => per_type(false, &|d| {
            fhir_op(&format!("{}.vread", d.name), &format!("One version of a {}.", d.name))
                .parameter(id_param())
                .parameter(path_param("vid", "The version id."))
                .response("200", resource_response(d, "The version."))
                .response("400", outcome_response("Invalid id."))
                .response("404", outcome_response("Not found (or not the caller's to see)."))
                .response("410", outcome_response("That version is a deletion."))
        }),
        (Get, "/fhir/{type}/{id}/_history") => per_type(false, &|d| {
            fhir_op(&format!("{}.history", d.name), &format!("Every version of a {}.", d.name))
                .parameter(id_param())
                .response("200", fhir_response("A history Bundle.", schema_ref("Bundle")))
                .response("400", outcome_response("Invalid id."))
                .response("404", outcome_response("Not found (or not the caller's to see)."))
                .response("410", outcome_response("Deleted."))
        }),
        (Get, "/fhir/{type}/{id}") => per_type(false, &|d| {
            fhir_op(&format!("{}.read", d.name), &format!("Read a {}.", d.name))
                .parameter(id_param())
                .parameter(query_param("_elements", false, "Comma-separated top-level elements to return.", string()))
                .response("200", resource_response(d, "The resource (masked for the caller)."))
                .response("400", outcome_response("Invalid id or parameter."))
                .response("404", outcome_response("Not found (or not the caller's to see)."))
                .response("410", outcome_response("Deleted."))
        }),
        (Put, "/fhir/{type}/{id}") => per_type(true, &|d| {
            fhir_op(
                &format!("{}.update", d.name),
                &format!(
                    "Update a {}. `If-Match: W/\"<versionId>\"` is required (428 without, 412 when stale). \
                     `Prefer: return=minimal` answers without a body.",
                    d.name
                ),
            )
            .parameter(id_param())
            .parameter(
                ParameterBuilder::new()
                    .name("If-Match")
                    .parameter_in(ParameterIn::Header)
                    .required(Required::True)
                    .description(Some("The current version, as its ETag: `W/\"3\"`."))
                    .schema(Some(string())),
            )
            .request_body(Some(resource_body(d)))
            .response("200", resource_response(d, "The new version."))
            .response("400", outcome_response("The body is not a valid resource of this type."))
            .response("404", outcome_response("Not found (or not the caller's to see)."))
            .response("409", outcome_response("Conflicts with the current state."))
            .response("410", outcome_response("Deleted."))
            .response("412", outcome_response("The version does not match the current version."))
            .response("413", outcome_response("The body is too large."))
            .response("415", outcome_response("Not FHIR JSON."))
            .response("428", outcome_response("No If-Match header."))
        }),
        (Delete, "/fhir/{type}/{id}") => per_type(true, &|d| {
            fhir_op(&format!("{}.delete", d.name), &format!("Delete a {}.", d.name))
                .parameter(id_param())
                .response("204", ResponseBuilder::new().description("Deleted.").build())
                .response("400", outcome_response("Invalid id."))
                .response("404", outcome_response("Not found (or not the caller's to see)."))
                .response("409", outcome_response("Other resources still reference it."))
                .response("410", outcome_response("Already deleted."))
        }),
        (Get, "/fhir/{type}") => per_type(false, &|d| {
            fhir_op(
                &format!("{}.search", d.name),
                &format!("Search {}. Pages follow the Bundle's `next` link.", d.name),
            )
            .parameters(Some(search_params(d)))
            .response("200", fhir_response("A searchset Bundle.", schema_ref("Bundle")))
            .response("400", outcome_response("An unknown or malformed parameter."))
        }),
        (Post, "/fhir/{type}") => per_type(true, &|d| {
            fhir_op(
                &format!("{}.create", d.name),
                &format!("Create a {}. `Prefer: return=minimal` answers without a body.", d.name),
            )
            .request_body(Some(resource_body(d)))
            .response(
                "201",
                ResponseBuilder::new()
                    .description("Created; `Location` names the new version.")
                    .content(FHIR_JSON, content(resource_schema(d)))
                    .header("Location", HeaderBuilder::new().schema(Some(string())).build())
                    .header("ETag", HeaderBuilder::new().schema(Some(string())).build())
                    .build(),
            )
            .parameter(
                ParameterBuilder::new()
                    .name("If-None-Exist")
                    .parameter_in(ParameterIn::Header)
                    .required(Required::False)
                    .description(Some("Conditional create: a search; one match within the caller's reach answers 200 with it and creates nothing, several are 412."))
                    .schema(Some(string())),
            )
            .response("200", resource_response(d, "Conditional create: the one existing match (nothing created)."))
            .response("400", outcome_response("The body is not a valid resource of this type."))
            .response("409", outcome_response("Conflicts with the current state."))
            .response("412", outcome_response("Conditional create: more than one match."))
            .response("413", outcome_response("The body is too large."))
            .response("415", outcome_response("Not FHIR JSON."))
        }),
        (Post, "/fhir" | "/fhir/") => one(fhir_op(
            "bundle",
            "A batch or transaction Bundle (up to `limits.max_bundle_bytes`). A transaction is all or nothing: \
             `urn:uuid:` fullUrls and conditional references are resolved, entries run in FHIR's order in one \
             database transaction; a failed entry rolls back all and answers its error naming `Bundle.entry[i]`. \
             A batch runs each entry on its own. Every entry is decided, masked and audited as the same request \
             alone.",
        )
        .request_body(Some(
            RequestBodyBuilder::new()
                .content(FHIR_JSON, content(schema_ref("Bundle")))
                .required(Some(Required::True))
                .build(),
        ))
        .response("200", fhir_response("A transaction-response or batch-response Bundle.", schema_ref("Bundle")))
        .response("400", outcome_response("Not a batch or transaction Bundle, or an entry is invalid (named)."))
        .response("403", outcome_response("A transaction entry is not permitted (named)."))
        .response("404", outcome_response("A transaction entry's target was not found (named)."))
        .response("409", outcome_response("A transaction entry conflicts with the current state (named)."))
        .response("410", outcome_response("A transaction entry's target was deleted (named)."))
        .response("412", outcome_response("A transaction entry's version or condition failed (named)."))
        .response("428", outcome_response("A transaction entry's update or patch has no ifMatch (named)."))
        .response("413", outcome_response("The body is larger than limits.max_bundle_bytes."))
        .response("415", outcome_response("Not FHIR JSON."))),
        (Post, "/fhir/{type}/$validate") => per_type(true, &|d| {
            fhir_op(
                &format!("{}.validate", d.name),
                &format!(
                    "Check a {} as the caller's create would (schema, write mask, references); nothing is stored.",
                    d.name
                ),
            )
            .request_body(Some(resource_body(d)))
            .response(
                "200",
                fhir_response(
                    "An OperationOutcome: information when valid, else the error.",
                    schema_ref("OperationOutcome"),
                ),
            )
            .response("403", outcome_response("The caller may not create this type."))
            .response("413", outcome_response("The body is too large."))
            .response("415", outcome_response("Not FHIR JSON."))
        }),
        (Patch, "/fhir/{type}/{id}") => {
            per_type(true, &|d| {
                fhir_op(
                &format!("{}.patch", d.name),
                &format!(
                    "Patch a {} with JSON Patch (`application/json-patch+json`) or JSON Merge Patch \
                     (`application/merge-patch+json`), applied to what the caller sees, under PUT's write masks and \
                     `If-Match` rules. An operation on an element the caller may not see is 403 naming the element.",
                    d.name
                ),
            )
            .parameter(id_param())
            .parameter(
                ParameterBuilder::new()
                    .name("If-Match")
                    .parameter_in(ParameterIn::Header)
                    .required(Required::False)
                    .description(Some("The current version, as its ETag: `W/\"3\"` (required unless fhir.require_if_match = false)."))
                    .schema(Some(string())),
            )
            .request_body(Some(
                RequestBodyBuilder::new()
                    .content("application/json-patch+json", content(ArrayBuilder::new().items(object("A JSON Patch operation.")).into()))
                    .content("application/merge-patch+json", content(object("A JSON Merge Patch.")))
                    .required(Some(Required::True))
                    .build(),
            ))
            .response("200", resource_response(d, "The new version."))
            .response("400", outcome_response("Not a patch, or the patch does not apply."))
            .response("403", outcome_response("The patch touches an element the caller may not see or change (named)."))
            .response("404", outcome_response("Not found (or not the caller's to see)."))
            .response("409", outcome_response("Conflicts with the current state."))
            .response("410", outcome_response("Deleted."))
            .response("412", outcome_response("The version does not match the current version."))
            .response("413", outcome_response("The body is too large."))
            .response("415", outcome_response("Not a patch media type."))
            .response("428", outcome_response("No If-Match header."))
            })
        }
        (Put, "/fhir/{type}") => per_type(true, &|d| {
            fhir_op(
                &format!("{}.conditionalUpdate", d.name),
                &format!(
                    "Conditional update of a {}: the query is a search within the caller's reach; no match creates \
                     (201), one match is updated (200; `If-Match` optional), more than one is 412.",
                    d.name
                ),
            )
            .parameters(Some(search_params(d)))
            .request_body(Some(resource_body(d)))
            .response("200", resource_response(d, "The new version of the one match."))
            .response("201", resource_response(d, "Created: nothing matched."))
            .response("400", outcome_response("The body or query is invalid."))
            .response("409", outcome_response("Conflicts with the current state."))
            .response("412", outcome_response("More than one match, or a stale If-Match."))
            .response("413", outcome_response("The body is too large."))
            .response("415", outcome_response("Not FHIR JSON."))
        }),
        (Delete, "/fhir/{type}") => per_type(true, &|d| {
            fhir_op(
                &format!("{}.conditionalDelete", d.name),
                &format!(
                    "Conditional delete of a {}: the one match within the caller's reach (none: nothing changes).",
                    d.name
                ),
            )
            .parameters(Some(search_params(d)))
            .response("204", ResponseBuilder::new().description("Deleted, or nothing matched.").build())
            .response("400", outcome_response("The query is invalid."))
            .response("409", outcome_response("Conflicts with the current state."))
            .response("412", outcome_response("More than one match."))
        }),
        (Get, "/admin/alerts") => {
            one(authenticated(op("admin.alerts", "admin", "Stored alerts, newest first (admin and auditor)."))
                .parameters(Some([
                    query_param("rule", false, "Filter by rule.", string()),
                    query_param("severity", false, "Filter by severity.", string()),
                    query_param("since", false, "RFC 3339 lower bound.", string()),
                    query_param("until", false, "RFC 3339 upper bound.", string()),
                    query_param("_count", false, "Page size.", integer()),
                ]))
                .response("200", json_response("The alerts.", object("Alerts.")))
                .response("400", outcome_response("A filter value is not one of the accepted ones."))
                .response("403", outcome_response("Admin and auditor only.")))
        }
        (Post, "/admin/alerts/{id}/ack") => {
            one(authenticated(op("admin.alerts.ack", "admin", "Acknowledge an alert with a note."))
                .parameter(path_param("id", "The alert id."))
                .request_body(Some(
                    RequestBodyBuilder::new()
                        .content(
                            JSON,
                            content(
                                ObjectBuilder::new()
                                    .property("note", string())
                                    .required("note")
                                    .additional_properties(Some(AdditionalProperties::FreeForm(false)))
                                    .into(),
                            ),
                        )
                        .build(),
                ))
                .response("200", json_response("The acknowledged alert.", object("An alert.")))
                .response("400", outcome_response("Invalid id or note."))
                .response("403", outcome_response("Admin and auditor only."))
                .response("404", outcome_response("No such alert."))
                .response("409", outcome_response("Already acknowledged."))
                .response("413", outcome_response("The body is too large.")))
        }
        _ => vec![],
    }
}

fn op(id: &str, tag: &str, summary: &str) -> OperationBuilder {
    OperationBuilder::new().operation_id(Some(id)).tag(tag).summary(Some(summary))
}

/// An operation that needs a bearer token (first-party or SMART): 401 without one, 429 when throttled.
fn authenticated(b: OperationBuilder) -> OperationBuilder {
    b.securities(Some([
        SecurityRequirement::new(BEARER, Vec::<String>::new()),
        SecurityRequirement::new(SMART, Vec::<String>::new()),
    ]))
    .response("401", Ref::from_response_name("Unauthorized"))
    .response("429", too_many())
}

fn fhir_op(id: &str, summary: &str) -> OperationBuilder {
    authenticated(op(id, "fhir", summary)).response("403", outcome_response("Not permitted."))
}

fn too_many() -> RefOr<utoipa::openapi::Response> {
    Ref::from_response_name("TooManyRequests").into()
}

/// 429 from the general limit (an OperationOutcome) or from the sign-in throttle (the page, in HTML).
fn too_many_or_page() -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description("Too many requests; `Retry-After` says when to retry.")
        .header("Retry-After", HeaderBuilder::new().schema(Some(integer())).build())
        .content(FHIR_JSON, content(schema_ref("OperationOutcome")))
        .content(HTML, ContentBuilder::new().schema(Some(string())).build())
        .build()
}

fn content(schema: RefOr<Schema>) -> utoipa::openapi::Content {
    ContentBuilder::new().schema(Some(schema)).build()
}

fn schema_ref(name: &str) -> RefOr<Schema> {
    Ref::from_schema_name(name).into()
}

fn string() -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::String).into()
}

fn integer() -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::Integer).into()
}

fn object(description: &str) -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::Object).description(Some(description)).into()
}

fn json_response(description: &str, schema: RefOr<Schema>) -> utoipa::openapi::Response {
    ResponseBuilder::new().description(description).content(JSON, content(schema)).build()
}

fn fhir_response(description: &str, schema: RefOr<Schema>) -> utoipa::openapi::Response {
    ResponseBuilder::new().description(description).content(FHIR_JSON, content(schema)).build()
}

fn outcome_response(description: &str) -> utoipa::openapi::Response {
    fhir_response(description, schema_ref("OperationOutcome"))
}

fn oauth_error(description: &str) -> utoipa::openapi::Response {
    json_response(description, schema_ref("OAuthError"))
}

fn html(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(HTML, ContentBuilder::new().schema(Some(string())).build())
        .build()
}

fn redirect(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .header("Location", HeaderBuilder::new().schema(Some(string())).build())
        .build()
}

/// The schema of one type's resources: an object whose `resourceType` is the type's name.
fn resource_schema(d: &ResourceDecl) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("resourceType", ObjectBuilder::new().schema_type(Type::String).enum_values(Some([d.name])))
        .property("id", string())
        .required("resourceType")
        .into()
}

fn resource_response(d: &ResourceDecl, description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(FHIR_JSON, content(resource_schema(d)))
        .header("ETag", HeaderBuilder::new().schema(Some(string())).description(Some("`W/\"<versionId>\"`")).build())
        .build()
}

fn resource_body(d: &ResourceDecl) -> utoipa::openapi::request_body::RequestBody {
    RequestBodyBuilder::new()
        .required(Some(Required::True))
        .content(FHIR_JSON, content(resource_schema(d)))
        .content(JSON, content(resource_schema(d)))
        .build()
}

fn query_param(
    name: &str,
    required: bool,
    description: &str,
    schema: RefOr<Schema>,
) -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(if required { Required::True } else { Required::False })
        .description(Some(description))
        .schema(Some(schema))
        .build()
}

fn path_param(name: &str, description: &str) -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .description(Some(description))
        .schema(Some(string()))
        .build()
}

fn id_param() -> utoipa::openapi::path::Parameter {
    path_param("id", "The logical id.")
}

fn param_description(kind: ParamKind) -> &'static str {
    match kind {
        ParamKind::String => "string search (prefix match; `:exact`, `:contains` modifiers)",
        ParamKind::Token => "token search (`system|code`, or `code`)",
        ParamKind::Date => "date search (`eq`, `lt`, `le`, `gt`, `ge` prefixes)",
        ParamKind::Reference => "reference search (`Type/id` or `id`)",
    }
}

/// The type's declared search parameters and the result parameters every search takes.
fn search_params(d: &ResourceDecl) -> Vec<utoipa::openapi::path::Parameter> {
    let mut out: Vec<_> =
        d.search.iter().map(|p| query_param(p.name, false, param_description(p.kind), string())).collect();
    out.push(query_param("_count", false, "Page size.", integer()));
    out.push(query_param("_elements", false, "Comma-separated top-level elements to return.", string()));
    out.push(query_param("_summary", false, "`count`: the total only.", string()));
    out
}

fn search_form(d: &ResourceDecl) -> utoipa::openapi::request_body::RequestBody {
    let mut schema = ObjectBuilder::new().schema_type(Type::Object);
    for p in d.search {
        schema = schema.property(p.name, ObjectBuilder::new().schema_type(Type::String));
    }
    schema = schema.property("_count", ObjectBuilder::new().schema_type(Type::Integer));
    RequestBodyBuilder::new().required(Some(Required::True)).content(FORM, content(schema.into())).build()
}

fn form_body(fields: &[(&str, bool)]) -> utoipa::openapi::request_body::RequestBody {
    let mut schema = ObjectBuilder::new().schema_type(Type::Object);
    for (name, required) in fields {
        schema = schema.property(*name, ObjectBuilder::new().schema_type(Type::String));
        if *required {
            schema = schema.required(*name);
        }
    }
    RequestBodyBuilder::new().required(Some(Required::True)).content(FORM, content(schema.into())).build()
}

fn components(server: &str) -> utoipa::openapi::Components {
    let str_prop = || ObjectBuilder::new().schema_type(Type::String);
    let outcome = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some("A FHIR OperationOutcome; its text is generic and never quotes input."))
        .property("resourceType", str_prop().enum_values(Some(["OperationOutcome"])))
        .property(
            "issue",
            ArrayBuilder::new().items(
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .property("severity", str_prop())
                    .property("code", str_prop())
                    .property("diagnostics", str_prop())
                    .property("expression", ArrayBuilder::new().items(str_prop()))
                    .required("severity")
                    .required("code"),
            ),
        )
        .required("resourceType")
        .required("issue");
    let bundle = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some("A FHIR Bundle (searchset or history); `link` with relation `next` pages on."))
        .property("resourceType", str_prop().enum_values(Some(["Bundle"])))
        .property("type", str_prop())
        .property("total", ObjectBuilder::new().schema_type(Type::Integer))
        .property(
            "link",
            ArrayBuilder::new().items(
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .property("relation", str_prop())
                    .property("url", str_prop())
                    .required("relation")
                    .required("url"),
            ),
        )
        .property(
            "entry",
            ArrayBuilder::new().items(
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .property("fullUrl", str_prop())
                    .property("resource", Ref::from_schema_name("Resource")),
            ),
        )
        .required("resourceType")
        .required("type");
    let resource = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some("Any FHIR resource (schema-light)."))
        .property("resourceType", str_prop())
        .required("resourceType");
    let tokens = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("access_token", str_prop())
        .property("token_type", str_prop())
        .property("expires_in", ObjectBuilder::new().schema_type(Type::Integer))
        .property("refresh_token", str_prop())
        .property("scope", str_prop())
        .property("patient", str_prop())
        .property("id_token", str_prop())
        .required("access_token")
        .required("token_type")
        .required("expires_in");
    let oauth = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some("An RFC 6749 §5.2 error."))
        .property("error", str_prop())
        .required("error");
    let login = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("username", str_prop())
        .property("password", str_prop())
        .property("totp", str_prop())
        .required("username")
        .required("password")
        .additional_properties(Some(AdditionalProperties::FreeForm(false)));
    let break_glass = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("patient", str_prop())
        .property("reason", str_prop())
        .property("code", str_prop())
        .required("patient")
        .required("reason")
        .additional_properties(Some(AdditionalProperties::FreeForm(false)));
    let smart = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("issuer", str_prop())
        .property("jwks_uri", str_prop())
        .property("authorization_endpoint", str_prop())
        .property("token_endpoint", str_prop())
        .property("introspection_endpoint", str_prop())
        .property("revocation_endpoint", str_prop())
        .property("capabilities", ArrayBuilder::new().items(str_prop()))
        .property("scopes_supported", ArrayBuilder::new().items(str_prop()))
        .required("authorization_endpoint")
        .required("token_endpoint")
        .required("capabilities");
    let session = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("subject", str_prop())
        .property("issuer", str_prop())
        .property("roles", ArrayBuilder::new().items(str_prop()))
        .required("subject")
        .required("roles");
    let health = ObjectBuilder::new().schema_type(Type::Object).property("status", str_prop()).required("status");
    let introspection = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("active", ObjectBuilder::new().schema_type(Type::Boolean))
        .required("active");
    let jwks = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("keys", ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::Object)))
        .required("keys");
    let smart_scopes: Scopes = [
        ("openid", "OpenID Connect id token"),
        ("fhirUser", "The user's FHIR resource in the id token"),
        ("launch/patient", "Choose a patient at launch (standalone)"),
        ("offline_access", "A refresh token"),
        ("online_access", "A refresh token for the session"),
        ("patient/*.rs", "Read and search the launch patient's records"),
        ("patient/*.cruds", "Full access to the launch patient's records"),
        ("user/*.rs", "Read and search what the user may see"),
        ("user/*.cruds", "Full access within the user's permissions"),
    ]
    .into_iter()
    .collect();
    ComponentsBuilder::new()
        .schema("OperationOutcome", outcome)
        .schema("Bundle", bundle)
        .schema("Resource", resource)
        .schema("TokenResponse", tokens)
        .schema("OAuthError", oauth)
        .schema("LoginRequest", login)
        .schema("BreakGlassRequest", break_glass)
        .schema("SmartConfiguration", smart)
        .schema("Session", session)
        .schema("Health", health)
        .schema("Introspection", introspection)
        .schema("Jwks", jwks)
        .response(
            "Unauthorized",
            ResponseBuilder::new()
                .description("No valid bearer token.")
                .header("WWW-Authenticate", HeaderBuilder::new().schema(Some(string())).build())
                .content(FHIR_JSON, content(schema_ref("OperationOutcome")))
                .build(),
        )
        .response(
            "TooManyRequests",
            ResponseBuilder::new()
                .description("Too many requests; `Retry-After` says when to retry.")
                .header("Retry-After", HeaderBuilder::new().schema(Some(integer())).build())
                .content(FHIR_JSON, content(schema_ref("OperationOutcome")))
                .build(),
        )
        .security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("An access token from /auth/login, /auth/token or /auth/oidc/callback."))
                    .build(),
            ),
        )
        .security_scheme(
            SMART,
            SecurityScheme::OAuth2(OAuth2::with_description(
                [Flow::AuthorizationCode(AuthorizationCode::with_refresh_url(
                    format!("{server}/auth/authorize"),
                    format!("{server}/auth/token"),
                    smart_scopes,
                    format!("{server}/auth/token"),
                ))],
                "SMART App Launch 2.0: authorization code with PKCE S256 (scopes v2, e.g. patient/Observation.rs).",
            )),
        )
        .security_scheme("client", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Basic).build()))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The (method, path) pairs `routes()` registers, read from its source: `web::resource("PATH")` followed
    /// by its `.route(web::METHOD()` calls.
    fn registered() -> Vec<(String, String)> {
        let src = include_str!("mod.rs");
        let start = src.find("pub fn routes(").unwrap();
        let body = &src[start..];
        let end = body.find("\n}\n").unwrap();
        let body = &body[..end];
        let resource = regex::Regex::new(r#"web::resource\("([^"]+)"\)"#).unwrap();
        let method = regex::Regex::new(r"web::(get|post|put|delete|patch|head)\(\)").unwrap();
        let starts: Vec<(usize, String)> =
            resource.captures_iter(body).map(|c| (c.get(0).unwrap().start(), c[1].to_owned())).collect();
        let mut out = vec![];
        for (i, (at, path)) in starts.iter().enumerate() {
            let until = starts.get(i + 1).map_or(body.len(), |(n, _)| *n);
            for m in method.captures_iter(&body[*at..until]) {
                out.push((m[1].to_owned(), path.clone()));
            }
        }
        out
    }

    #[test]
    fn every_registered_route_is_documented() {
        let registered = registered();
        assert!(registered.len() > 25, "{registered:?}");
        let table: Vec<(String, String)> =
            ROUTES.iter().map(|(m, p)| (m.as_str().to_owned(), (*p).to_owned())).collect();
        for r in &registered {
            assert!(table.contains(r), "route {r:?} is registered in routes() but not in openapi::ROUTES");
        }
        for r in &table {
            assert!(registered.contains(r), "{r:?} is in openapi::ROUTES but routes() does not register it");
        }
        for (m, p) in ROUTES {
            assert!(!operations(*m, p).is_empty(), "{m:?} {p} has no OpenAPI operation");
        }
    }

    #[test]
    fn the_document_is_openapi_3_1_with_writes_only_for_writable_types() {
        let doc: serde_json::Value = serde_json::from_str(&document("https://h:1").to_json().unwrap()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        for d in decl::all() {
            let item = &paths[&format!("/fhir/{}/{{id}}", d.name)];
            assert!(item["get"].is_object(), "{}", d.name);
            assert_eq!(item["put"].is_object(), !d.read_only, "{}", d.name);
            assert_eq!(item["delete"].is_object(), !d.read_only, "{}", d.name);
            assert_eq!(paths[&format!("/fhir/{}", d.name)]["post"].is_object(), !d.read_only, "{}", d.name);
        }
        let update = &paths["/fhir/Patient/{id}"]["put"];
        assert!(update["responses"]["428"].is_object());
        let if_match = update["parameters"].as_array().unwrap().iter().find(|p| p["name"] == "If-Match").unwrap();
        assert_eq!(if_match["required"], true);
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["bearer"]["scheme"], "bearer");
        assert_eq!(schemes["smart"]["flows"]["authorizationCode"]["authorizationUrl"], "https://h:1/auth/authorize");
    }
}
