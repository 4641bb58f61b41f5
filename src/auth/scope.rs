//! SMART App Launch scopes (v2, with the v1 forms mapped to v2): what a token's `scope` grants, and nothing
//! more. Pure: parsing and lookup only; the intersection with the role policy is [`crate::access`]'s.
//!
//! Grammar (SMART 2.0 §3): `(patient|user|system)/(Type|*).(c?r?u?d?s?)[?param=value]`, v1 `.read` = `rs`,
//! `.write` = `cud`, `.*` = `cruds`; plus `openid`, `fhirUser`, `profile`, `launch`, `launch/patient`,
//! `offline_access`, `online_access`. Guarantees:
//! - a scope only ever narrows: [`ScopeSet::permit`] answers `None` (deny) for any type or interaction no scope
//!   names, and a `patient/` grant confines to the launch patient's compartment;
//! - granular scopes (`?category=…`, `?code=…`) become search clauses ANDed to every query and checked on every
//!   resource read; alternatives for one type are ORed when they name the same parameter, and a type whose
//!   alternatives name different parameters is denied (fail closed, no OR across parameters in one clause);
//! - unknown or malformed scopes are dropped by [`ScopeSet::parse`] (RFC 6749: the server may grant less), and the
//!   granted set is what the token carries.

use crate::access::Action;

/// Longest `scope` string accepted.
pub const MAX_SCOPE_LEN: usize = 2048;
/// Most scopes in one request.
pub const MAX_SCOPES: usize = 64;

/// Whose data a resource scope is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Context {
    /// The patient in the launch context only.
    Patient,
    /// Whatever the signed-in user may reach.
    User,
    /// A backend service: whatever its service account may reach.
    System,
}

impl Context {
    fn as_str(self) -> &'static str {
        match self {
            Context::Patient => "patient",
            Context::User => "user",
            Context::System => "system",
        }
    }
}

/// The SMART v2 permission letters, as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms(u8);

impl Perms {
    pub const C: u8 = 1;
    pub const R: u8 = 2;
    pub const U: u8 = 4;
    pub const D: u8 = 8;
    pub const S: u8 = 16;

    fn parse_v2(s: &str) -> Option<Perms> {
        // Letters in the order c r u d s, each at most once, at least one.
        let mut bits = 0u8;
        let mut last = 0usize;
        for ch in s.chars() {
            let (pos, bit) = match ch {
                'c' => (1, Self::C),
                'r' => (2, Self::R),
                'u' => (3, Self::U),
                'd' => (4, Self::D),
                's' => (5, Self::S),
                _ => return None,
            };
            if pos <= last {
                return None;
            }
            last = pos;
            bits |= bit;
        }
        (bits != 0).then_some(Perms(bits))
    }

    fn parse(s: &str) -> Option<Perms> {
        match s {
            "read" => Some(Perms(Self::R | Self::S)),
            "write" => Some(Perms(Self::C | Self::U | Self::D)),
            "*" => Some(Perms(Self::C | Self::R | Self::U | Self::D | Self::S)),
            other => Self::parse_v2(other),
        }
    }

    pub fn has(self, bit: u8) -> bool {
        self.0 & bit == bit
    }

    fn letters(self) -> String {
        [(Self::C, 'c'), (Self::R, 'r'), (Self::U, 'u'), (Self::D, 'd'), (Self::S, 's')]
            .iter()
            .filter(|(b, _)| self.has(*b))
            .map(|(_, c)| *c)
            .collect()
    }
}

/// The permission letter an interaction needs.
pub fn letter_for(action: Action) -> u8 {
    match action {
        Action::Create => Perms::C,
        Action::Read | Action::Vread | Action::History | Action::Everything | Action::AccessReport => Perms::R,
        Action::Update => Perms::U,
        Action::Delete => Perms::D,
        Action::Search => Perms::S,
    }
}

/// One resource scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceScope {
    pub context: Context,
    /// `None` is `*`.
    pub rtype: Option<&'static str>,
    pub perms: Perms,
    /// A granular restriction (`?category=laboratory`): one search parameter and its value.
    pub param: Option<(String, String)>,
}

impl ResourceScope {
    fn covers(&self, rtype: &str) -> bool {
        self.rtype.is_none_or(|t| t == rtype)
    }

    fn render(&self) -> String {
        let mut s = format!("{}/{}.{}", self.context.as_str(), self.rtype.unwrap_or("*"), self.perms.letters());
        if let Some((k, v)) = &self.param {
            s.push('?');
            s.push_str(&serde_urlencoded::to_string([(k, v)]).unwrap_or_default());
        }
        s
    }
}

/// What a token's scopes grant.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScopeSet {
    pub resources: Vec<ResourceScope>,
    pub openid: bool,
    pub fhir_user: bool,
    pub profile: bool,
    pub launch_patient: bool,
    pub offline_access: bool,
    pub online_access: bool,
}

/// What a scope set allows for one type and interaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    /// Confined to the launch patient's compartment (granted by `patient/` scopes only).
    pub confined: bool,
    /// Search clauses every query of this type must also satisfy (granular scopes); empty when none.
    pub params: Vec<(String, String)>,
}

/// The resource types a scope may name (the served FHIR types).
fn known_type(name: &str) -> Option<&'static str> {
    crate::fhir::decl::decl(name).map(|d| d.name)
}

impl ScopeSet {
    /// Parses a space-separated `scope` string; unknown, malformed and duplicate scopes are dropped.
    pub fn parse(scope: &str) -> ScopeSet {
        let mut set = ScopeSet::default();
        if scope.len() > MAX_SCOPE_LEN {
            return set;
        }
        for s in scope.split(' ').filter(|s| !s.is_empty()).take(MAX_SCOPES) {
            match s {
                "openid" => set.openid = true,
                "fhirUser" => set.fhir_user = true,
                "profile" => set.profile = true,
                "launch/patient" => set.launch_patient = true,
                "offline_access" => set.offline_access = true,
                "online_access" => set.online_access = true,
                other => {
                    if let Some(r) = parse_resource(other)
                        && !set.resources.contains(&r)
                    {
                        set.resources.push(r);
                    }
                }
            }
        }
        set
    }

    /// The canonical scope string (what a token carries and a token response reports).
    pub fn render(&self) -> String {
        let mut out: Vec<String> = Vec::new();
        for (on, name) in [
            (self.launch_patient, "launch/patient"),
            (self.openid, "openid"),
            (self.fhir_user, "fhirUser"),
            (self.profile, "profile"),
            (self.offline_access, "offline_access"),
            (self.online_access, "online_access"),
        ] {
            if on {
                out.push(name.to_owned());
            }
        }
        out.extend(self.resources.iter().map(ResourceScope::render));
        out.join(" ")
    }

    /// The part of `self` that `allowed` (an app's registered scopes) permits: a requested resource scope is
    /// kept when one allowed scope of the same context covers its type, every letter and its restriction.
    pub fn within(&self, allowed: &ScopeSet) -> ScopeSet {
        let resources = self
            .resources
            .iter()
            .filter(|r| {
                allowed.resources.iter().any(|a| {
                    a.context == r.context
                        && a.rtype.is_none_or(|t| Some(t) == r.rtype)
                        && a.perms.0 & r.perms.0 == r.perms.0
                        && (a.param.is_none() || a.param == r.param)
                })
            })
            .cloned()
            .collect();
        ScopeSet {
            resources,
            openid: self.openid && allowed.openid,
            fhir_user: self.fhir_user && allowed.fhir_user,
            profile: self.profile && allowed.profile,
            launch_patient: self.launch_patient && allowed.launch_patient,
            offline_access: self.offline_access && allowed.offline_access,
            online_access: self.online_access && allowed.online_access,
        }
    }

    /// Keeps only scopes of the given contexts (a user-facing app gets no `system/`, a backend service only
    /// `system/`).
    pub fn only(mut self, contexts: &[Context]) -> ScopeSet {
        self.resources.retain(|r| contexts.contains(&r.context));
        self
    }

    pub fn has_resource_scopes(&self) -> bool {
        !self.resources.is_empty()
    }

    /// Whether any `patient/` scope is present (the token then needs a patient in context).
    pub fn needs_patient(&self) -> bool {
        self.resources.iter().any(|r| r.context == Context::Patient)
    }

    /// What the scopes allow for `rtype` and `action`: `None` denies. `has_patient` says whether the token has
    /// a patient in context (without one, `patient/` scopes grant nothing).
    ///
    /// An unconfined grant (`user/` or `system/`) wins over a confined one; among grants of the same kind,
    /// one without a restriction wins; otherwise the restrictions are ORed (same parameter) or the type is
    /// denied (different parameters).
    pub fn permit(&self, rtype: &str, action: Action, has_patient: bool) -> Option<Permit> {
        let bit = letter_for(action);
        let matching = self
            .resources
            .iter()
            .filter(|r| r.covers(rtype) && r.perms.has(bit) && (r.context != Context::Patient || has_patient));
        let (mut unconfined, mut confined): (Vec<&ResourceScope>, Vec<&ResourceScope>) =
            matching.partition(|r| r.context != Context::Patient);
        for (group, is_confined) in [(&mut unconfined, false), (&mut confined, true)] {
            if group.is_empty() {
                continue;
            }
            if group.iter().any(|r| r.param.is_none()) {
                return Some(Permit { confined: is_confined, params: vec![] });
            }
            group.sort_by(|a, b| a.param.cmp(&b.param));
            let name = group.first().and_then(|r| r.param.as_ref()).map(|(k, _)| k.clone())?;
            if group.iter().any(|r| r.param.as_ref().is_none_or(|(k, _)| *k != name)) {
                // Alternatives over different parameters: not expressible as one clause; this group grants
                // nothing (a confined group may still follow).
                continue;
            }
            let values: Vec<&str> = group.iter().filter_map(|r| r.param.as_ref().map(|(_, v)| v.as_str())).collect();
            return Some(Permit { confined: is_confined, params: vec![(name, values.join(","))] });
        }
        None
    }

    /// Plain words for the consent page, one line per scope.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.launch_patient {
            out.push("Know which patient you chose for this app".to_owned());
        }
        if self.openid || self.fhir_user {
            out.push("Know who you are (your user identity)".to_owned());
        }
        if self.offline_access {
            out.push("Keep access after you close the app, until you sign out or it is revoked".to_owned());
        }
        for r in &self.resources {
            let mut verbs = Vec::new();
            for (bit, word) in [
                (Perms::R, "read"),
                (Perms::S, "search"),
                (Perms::C, "create"),
                (Perms::U, "update"),
                (Perms::D, "delete"),
            ] {
                if r.perms.has(bit) {
                    verbs.push(word);
                }
            }
            let what = match r.rtype {
                Some(t) => format!("{t} records"),
                None => "all record types".to_owned(),
            };
            let whose = match r.context {
                Context::Patient => "of the selected patient",
                Context::User => "you have access to",
                Context::System => "the service has access to",
            };
            let mut line = format!("{} {what} {whose}", capitalise(&verbs.join(", ")));
            if let Some((k, v)) = &r.param {
                line.push_str(&format!(" (only where {k} is {v})"));
            }
            out.push(line);
        }
        out
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Granular restrictions a scope may carry: these search parameters, on any type that declares them.
const GRANULAR_PARAMS: [&str; 3] = ["category", "code", "type"];

fn parse_resource(s: &str) -> Option<ResourceScope> {
    let (context, rest) = s.split_once('/')?;
    let context = match context {
        "patient" => Context::Patient,
        "user" => Context::User,
        "system" => Context::System,
        _ => return None,
    };
    let (body, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (rtype, perms) = body.split_once('.')?;
    let rtype = match rtype {
        "*" => None,
        t => Some(known_type(t)?),
    };
    let perms = Perms::parse(perms)?;
    let param = match query {
        None => None,
        Some(q) => {
            let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q).ok()?;
            let [(k, v)] = pairs.as_slice() else { return None };
            // v1 forms carry no restrictions; a restriction needs a concrete type that declares the parameter.
            let t = rtype?;
            if !GRANULAR_PARAMS.contains(&k.as_str()) || v.is_empty() || v.len() > 256 {
                return None;
            }
            crate::fhir::decl::decl(t)?.param(k)?;
            Some((k.clone(), v.clone()))
        }
    };
    Some(ResourceScope { context, rtype, perms, param })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_and_v1_forms() {
        let s = ScopeSet::parse("patient/Observation.rs user/*.cruds patient/Patient.read system/Encounter.write");
        assert_eq!(s.resources.len(), 4);
        assert_eq!(s.render(), "patient/Observation.rs user/*.cruds patient/Patient.rs system/Encounter.cud");
        // Letters out of order, repeated, unknown, empty: dropped.
        let bad = ScopeSet::parse("patient/Observation.sr user/Patient.rr user/Patient.x user/Patient. user/Nope.r");
        assert!(bad.resources.is_empty(), "{bad:?}");
        assert!(ScopeSet::parse("admin/Patient.r patient/Patient").resources.is_empty());
    }

    #[test]
    fn specials() {
        let s = ScopeSet::parse("openid fhirUser launch/patient offline_access profile online_access unknown");
        assert!(s.openid && s.fhir_user && s.launch_patient && s.offline_access && s.profile && s.online_access);
        assert!(!s.has_resource_scopes());
        assert_eq!(s.render(), "launch/patient openid fhirUser profile offline_access online_access");
    }

    #[test]
    fn permit_narrows_by_type_letter_and_context() {
        let s = ScopeSet::parse("patient/Observation.rs user/Patient.r");
        assert_eq!(s.permit("Observation", Action::Read, true), Some(Permit { confined: true, params: vec![] }));
        assert_eq!(s.permit("Observation", Action::Search, true).map(|p| p.confined), Some(true));
        assert_eq!(s.permit("Observation", Action::Create, true), None, "no c");
        assert_eq!(s.permit("Observation", Action::Read, false), None, "patient/ needs a patient in context");
        assert_eq!(s.permit("Patient", Action::Read, false), Some(Permit { confined: false, params: vec![] }));
        assert_eq!(s.permit("Patient", Action::Search, false), None, "user/Patient.r has no s");
        assert_eq!(s.permit("Encounter", Action::Read, true), None, "type not named");
        assert_eq!(s.permit("Patient", Action::Everything, false).map(|p| p.confined), Some(false));
    }

    #[test]
    fn unconfined_wins_over_confined() {
        let s = ScopeSet::parse("patient/*.rs user/Observation.rs");
        assert_eq!(s.permit("Observation", Action::Read, true).map(|p| p.confined), Some(false));
        assert_eq!(s.permit("Condition", Action::Read, true).map(|p| p.confined), Some(true));
    }

    #[test]
    fn granular_scopes() {
        let s = ScopeSet::parse(
            "patient/Observation.rs?category=laboratory patient/Observation.rs?category=vital-signs \
             user/Condition.rs?code=http%3A%2F%2Fsnomed.info%2Fsct%7C44054006 user/Patient.rs?bogus=1",
        );
        assert_eq!(s.resources.len(), 3, "a restriction on an undeclared/unsupported parameter is dropped");
        let p = s.permit("Observation", Action::Search, true).expect("granted");
        assert_eq!(p.params, vec![("category".to_owned(), "laboratory,vital-signs".to_owned())]);
        let c = s.permit("Condition", Action::Read, true).expect("granted");
        assert_eq!(c.params, vec![("code".to_owned(), "http://snomed.info/sct|44054006".to_owned())]);
        assert!(s.render().contains("user/Condition.rs?code=http%3A%2F%2Fsnomed.info%2Fsct%7C44054006"));
        // An unrestricted grant of the same kind lifts the restriction.
        let both = ScopeSet::parse("patient/Observation.rs?category=laboratory patient/Observation.rs");
        assert!(both.permit("Observation", Action::Read, true).expect("granted").params.is_empty());
        // Alternatives over different parameters: denied, not widened.
        let mixed = ScopeSet::parse("patient/Observation.rs?category=laboratory patient/Observation.rs?code=x");
        assert_eq!(mixed.permit("Observation", Action::Read, true), None);
        // A restriction needs a concrete type.
        assert!(ScopeSet::parse("patient/*.rs?category=laboratory").resources.is_empty());
    }

    #[test]
    fn within_an_apps_registration() {
        let allowed = ScopeSet::parse("launch/patient openid fhirUser patient/*.rs user/Patient.r");
        let asked = ScopeSet::parse(
            "launch/patient openid offline_access patient/Observation.rs patient/Observation.cruds user/Patient.rs \
             user/Patient.r system/Patient.r",
        );
        let got = asked.within(&allowed);
        assert_eq!(got.render(), "launch/patient openid patient/Observation.rs user/Patient.r");
        let user_only = got.only(&[Context::Patient, Context::User]);
        assert_eq!(user_only.resources.len(), 2);
    }

    #[test]
    fn limits_and_descriptions() {
        assert_eq!(ScopeSet::parse(&"a ".repeat(2000)), ScopeSet::default());
        let many: String = (0..100).map(|_| "patient/Patient.r ").collect();
        assert_eq!(ScopeSet::parse(&many).resources.len(), 1, "deduplicated");
        let d = ScopeSet::parse("launch/patient patient/Observation.rs?category=laboratory").describe();
        assert_eq!(d[0], "Know which patient you chose for this app");
        assert_eq!(
            d[1],
            "Read, search Observation records of the selected patient (only where category is laboratory)"
        );
    }
}
