//! The authenticated caller: one type whichever way the caller signed in (local password, refresh, OIDC
//! bearer token, client credentials). Authorization decisions look only at this.

use std::sync::Arc;
use uuid::Uuid;

use super::scope::ScopeSet;
use crate::role::Role;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Stable account id at the issuer (`sub`).
    pub subject: String,
    /// Login name, when known (local accounts); for display and audit, never for decisions.
    pub username: Option<String>,
    pub roles: Vec<Role>,
    /// Linked Practitioner id (clinician, nurse).
    pub practitioner: Option<Uuid>,
    /// Linked Patient id (patient).
    pub patient: Option<Uuid>,
    /// The session this caller acts in; `None` for client credentials and external bearer tokens.
    pub session_id: Option<Uuid>,
    /// Who vouched for the caller (`iss`): this server or the configured OIDC provider.
    pub issuer: String,
    /// The OAuth client: a service client (client credentials) or the SMART app the token was issued to.
    pub client_id: Option<String>,
    /// The token's SMART scopes; `None` for first-party sign-ins (login, OIDC), which the role alone decides.
    pub scopes: Option<Arc<ScopeSet>>,
    /// The patient in the SMART launch context (`launch/patient`), which `patient/` scopes confine to.
    pub context_patient: Option<Uuid>,
}

impl Principal {
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    pub fn has_any_role(&self, roles: &[Role]) -> bool {
        roles.iter().any(|r| self.has_role(*r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles() {
        let p = Principal {
            subject: "u1".into(),
            username: Some("jdoe".into()),
            roles: vec![Role::Nurse],
            practitioner: Some(Uuid::nil()),
            patient: None,
            session_id: None,
            issuer: "https://carevault.test".into(),
            client_id: None,
            scopes: None,
            context_patient: None,
        };
        assert!(p.has_role(Role::Nurse));
        assert!(!p.has_role(Role::Clinician));
        assert!(p.has_any_role(&[Role::Clinician, Role::Nurse]));
        assert!(!p.has_any_role(&[Role::Admin, Role::Auditor]));
        assert!(!p.has_any_role(&[]));
    }
}
