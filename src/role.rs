//! The fixed set of roles (CONTRACT §4). Names are part of the contract: clients, policies and tests rely on them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Clinician,
    Nurse,
    FrontDesk,
    Billing,
    Patient,
    Auditor,
}

impl Role {
    pub const ALL: [Role; 7] =
        [Role::Admin, Role::Clinician, Role::Nurse, Role::FrontDesk, Role::Billing, Role::Patient, Role::Auditor];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Clinician => "clinician",
            Role::Nurse => "nurse",
            Role::FrontDesk => "front_desk",
            Role::Billing => "billing",
            Role::Patient => "patient",
            Role::Auditor => "auditor",
        }
    }

    /// Roles whose accounts link to a Practitioner and reach patients through care teams.
    pub fn is_care_provider(self) -> bool {
        matches!(self, Role::Clinician | Role::Nurse)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown role")]
pub struct UnknownRole;

impl std::str::FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or(UnknownRole)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("root".parse::<Role>().is_err());
    }
}
