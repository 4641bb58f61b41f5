#!/usr/bin/env python3
"""Static check of the realm import against Keycloak's representation classes (no Keycloak needed).

Every key used in carevault-realm.json must be a field of the Keycloak representation it belongs to
(org.keycloak.representations.idm.*: RealmRepresentation, ClientRepresentation, ProtocolMapperRepresentation,
UserRepresentation, CredentialRepresentation, RolesRepresentation/RoleRepresentation, ScopeMappingRepresentation,
ComponentExportRepresentation; field names as in Keycloak 26), so a typo is not silently ignored at import. Also
checks what the demo relies on: one user per carevault role, each with a password placeholder; the client secret
placeholder; and a declared `fhirUser` attribute in the declarative user profile (Keycloak >= 24 drops
undeclared attributes)."""
import json
import re
import sys

FIELDS = {
    "realm": {
        "id", "realm", "displayName", "displayNameHtml", "enabled", "sslRequired", "bruteForceProtected",
        "permanentLockout", "maxFailureWaitSeconds", "failureFactor", "accessTokenLifespan", "ssoSessionIdleTimeout",
        "ssoSessionMaxLifespan", "offlineSessionIdleTimeout", "roles", "groups", "defaultRole", "defaultGroups",
        "passwordPolicy", "users", "scopeMappings", "clientScopeMappings", "clients", "clientScopes",
        "defaultDefaultClientScopes", "defaultOptionalClientScopes", "components", "attributes", "loginTheme",
        "registrationAllowed", "resetPasswordAllowed", "verifyEmail", "loginWithEmailAllowed", "eventsEnabled",
        "adminEventsEnabled", "otpPolicyType", "requiredActions", "internationalizationEnabled", "revokeRefreshToken",
    },
    "roles": {"realm", "client"},
    "role": {"id", "name", "description", "composite", "composites", "clientRole", "containerId", "attributes"},
    "client": {
        "id", "clientId", "name", "description", "rootUrl", "adminUrl", "baseUrl", "enabled", "protocol",
        "publicClient", "clientAuthenticatorType", "secret", "standardFlowEnabled", "implicitFlowEnabled",
        "directAccessGrantsEnabled", "serviceAccountsEnabled", "redirectUris", "webOrigins", "fullScopeAllowed",
        "attributes", "protocolMappers", "defaultClientScopes", "optionalClientScopes", "bearerOnly", "consentRequired",
        "frontchannelLogout", "alwaysDisplayInConsole", "notBefore", "surrogateAuthRequired",
    },
    "mapper": {"id", "name", "protocol", "protocolMapper", "consentRequired", "config"},
    "user": {
        "id", "username", "enabled", "emailVerified", "firstName", "lastName", "email", "attributes", "credentials",
        "requiredActions", "realmRoles", "clientRoles", "groups", "totp", "federationLink", "serviceAccountClientId",
    },
    "credential": {"id", "type", "userLabel", "value", "temporary", "secretData", "credentialData", "priority"},
    "scopeMapping": {"self", "client", "clientTemplate", "clientScope", "roles"},
    "component": {"id", "name", "providerId", "subType", "subComponents", "config"},
}
ROLES = {"admin", "clinician", "nurse", "front_desk", "billing", "patient", "auditor"}


def check(kind, obj, where, problems):
    for key in obj:
        if key not in FIELDS[kind]:
            problems.append(f"{where}: `{key}` is not a field of Keycloak's {kind} representation")


def main(path):
    text = open(path, encoding="utf-8").read()
    realm = json.loads(text)
    problems = []
    check("realm", realm, "realm", problems)
    check("roles", realm.get("roles", {}), "roles", problems)
    for r in realm.get("roles", {}).get("realm", []):
        check("role", r, f"role {r.get('name')}", problems)
    for c in realm.get("clients", []):
        check("client", c, f"client {c.get('clientId')}", problems)
        for m in c.get("protocolMappers", []):
            check("mapper", m, f"mapper {m.get('name')}", problems)
    for s in realm.get("scopeMappings", []):
        check("scopeMapping", s, "scopeMapping", problems)
    seen = set()
    for u in realm.get("users", []):
        check("user", u, f"user {u.get('username')}", problems)
        for cred in u.get("credentials", []):
            check("credential", cred, f"credential of {u.get('username')}", problems)
            if not re.fullmatch(r"\$\{CAREVAULT_DEMO_PASSWORD_[A-Za-z0-9_-]+\}", cred.get("value", "")):
                problems.append(f"user {u.get('username')}: the password must be a CAREVAULT_DEMO_PASSWORD_ placeholder")
        seen.update(u.get("realmRoles", []))
    if seen != ROLES:
        problems.append(f"users cover roles {sorted(seen)}, want one per role {sorted(ROLES)}")
    if "${CAREVAULT_OIDC_CLIENT_SECRET}" not in text:
        problems.append("the client secret placeholder is missing")
    declared = []
    for comp in realm.get("components", {}).get("org.keycloak.userprofile.UserProfileProvider", []):
        check("component", comp, "user profile component", problems)
        for cfg in comp.get("config", {}).get("kc.user.profile.config", []):
            declared += [a["name"] for a in json.loads(cfg).get("attributes", [])]
    if "fhirUser" not in declared:
        problems.append("`fhirUser` is not declared in the user profile (kc.user.profile.config)")
    for p in problems:
        print(f"{path}: {p}", file=sys.stderr)
    if not problems:
        print(f"{path}: ok ({len(realm.get('users', []))} users, user profile declares {', '.join(declared)})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "deploy/keycloak/carevault-realm.json"))
