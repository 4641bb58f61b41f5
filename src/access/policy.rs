//! Loading `policies/`: validation, one casbin evaluation of every (role, type, interaction), and the
//! precomputed decision table.
//!
//! Guarantees: a [`PolicySet`] exists only if all three files parsed and agree with each other and with the
//! known roles, types, interactions and elements; casbin is the evaluator (a grant comes from
//! `Enforcer::enforce`), and every grant is traced back to the policy line that made it. Any casbin error fails
//! the load.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use casbin::{CoreApi, DefaultModel, Enforcer, StringAdapter};
use serde::Deserialize;

use super::catalog::{ElementCatalog, RESOURCE_TYPES};
use super::mask::{FieldMask, canonical_system};
use super::{Action, Decision, Scope};
use crate::role::Role;

pub const MODEL_FILE: &str = "model.conf";
pub const POLICY_FILE: &str = "policy.csv";
pub const FIELDS_FILE: &str = "fields.toml";

/// The built-in policy: `policies/` as it was when this binary was built.
pub const BUILTIN_MODEL: &str = include_str!("../../policies/model.conf");
pub const BUILTIN_POLICY: &str = include_str!("../../policies/policy.csv");
pub const BUILTIN_FIELDS: &str = include_str!("../../policies/fields.toml");

const ROLES: usize = Role::ALL.len();
const TYPES: usize = RESOURCE_TYPES.len();
const ACTIONS: usize = Action::ALL.len();

/// Why a policy did not load. Names files, lines and policy terms only (policies hold no PHI).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {file}: {source}")]
    Io { file: &'static str, source: std::io::Error },
    #[error("{file} line {line}: {reason}")]
    Line { file: &'static str, line: usize, reason: String },
    #[error("{file}: {reason}")]
    Invalid { file: &'static str, reason: String },
    #[error("casbin: {0}")]
    Casbin(String),
}

fn invalid(file: &'static str, reason: impl Into<String>) -> PolicyError {
    PolicyError::Invalid { file, reason: reason.into() }
}

/// Group name → member roles (`g` lines).
type Groups = BTreeMap<String, BTreeSet<Role>>;

/// One `p` line of policy.csv.
#[derive(Debug, Clone)]
struct Rule {
    line: usize,
    subject: String,
    resource_type: String,
    action: Action,
    scope: Scope,
}

impl Rule {
    fn text(&self) -> String {
        format!(
            "{POLICY_FILE} line {}: p, {}, {}, {}, {}",
            self.line, self.subject, self.resource_type, self.action, self.scope
        )
    }
}

/// One `[role.Type]` section of fields.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldRule {
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
    #[serde(default)]
    hide_identifier_systems: Vec<String>,
    /// Identifier systems the role may write but never see (the front desk's SSN).
    #[serde(default)]
    write_only_identifier_systems: Vec<String>,
}

#[derive(Debug, Clone)]
struct Grant {
    scope: Option<Scope>,
    rule: Arc<str>,
}

/// A loaded, validated policy, evaluated into a table: deciding is indexing.
#[derive(Debug)]
pub struct PolicySet {
    /// `[role][type][action]`.
    grants: Vec<Grant>,
    /// `[role][type]`: (read, write).
    masks: Vec<(Arc<FieldMask>, Arc<FieldMask>)>,
    nothing: Arc<FieldMask>,
    denied_unknown_type: Arc<str>,
}

fn grant_index(role: Role, type_ix: usize, action: Action) -> usize {
    (role as usize * TYPES + type_ix) * ACTIONS + action as usize
}

fn type_index(resource_type: &str) -> Option<usize> {
    RESOURCE_TYPES.iter().position(|t| *t == resource_type)
}

impl PolicySet {
    /// Denies everything: the state before any policy has loaded.
    pub fn deny_all() -> Self {
        let nothing = Arc::new(FieldMask::nothing());
        let rule: Arc<str> = Arc::from("no access policy is loaded: everything is denied");
        Self {
            grants: vec![Grant { scope: None, rule: Arc::clone(&rule) }; ROLES * TYPES * ACTIONS],
            masks: vec![(Arc::clone(&nothing), Arc::clone(&nothing)); ROLES * TYPES],
            nothing,
            denied_unknown_type: rule,
        }
    }

    /// The policy built into the binary (the repository's `policies/` at build time): the default when
    /// `access.policy_dir` is not set, so the server runs from any working directory.
    pub fn builtin(catalog: &dyn ElementCatalog) -> Result<Self, PolicyError> {
        Self::from_sources(BUILTIN_MODEL, BUILTIN_POLICY, BUILTIN_FIELDS, catalog)
    }

    /// Reads and validates the three files of `dir`.
    pub fn load_dir(dir: &Path, catalog: &dyn ElementCatalog) -> Result<Self, PolicyError> {
        let read = |file: &'static str| {
            std::fs::read_to_string(dir.join(file)).map_err(|source| PolicyError::Io { file, source })
        };
        Self::from_sources(&read(MODEL_FILE)?, &read(POLICY_FILE)?, &read(FIELDS_FILE)?, catalog)
    }

    /// Validates and evaluates a policy given as text.
    pub fn from_sources(
        model: &str,
        policy: &str,
        fields: &str,
        catalog: &dyn ElementCatalog,
    ) -> Result<Self, PolicyError> {
        let (rules, groups) = parse_policy(policy)?;
        let table = evaluate(model, policy, &rules, &groups)?;
        let masks = build_masks(fields, &table, catalog)?;
        let nothing = Arc::new(FieldMask::nothing());
        let mut grants = Vec::with_capacity(ROLES * TYPES * ACTIONS);
        for role in Role::ALL {
            for (t, type_name) in RESOURCE_TYPES.iter().enumerate() {
                for action in Action::ALL {
                    let grant = match &table[grant_index(role, t, action)] {
                        Some((scope, rule)) => Grant { scope: Some(*scope), rule: Arc::from(rule.text()) },
                        None => Grant {
                            scope: None,
                            rule: Arc::from(format!(
                                "denied: no line of {POLICY_FILE} grants {role} {action} on {type_name}"
                            )),
                        },
                    };
                    grants.push(grant);
                }
            }
        }
        let masks = masks
            .into_iter()
            .map(|m| {
                m.map_or_else(|| (Arc::clone(&nothing), Arc::clone(&nothing)), |(r, w)| (Arc::new(r), Arc::new(w)))
            })
            .collect();
        Ok(Self {
            grants,
            masks,
            nothing,
            denied_unknown_type: Arc::from("denied: the resource type is not covered by the policy"),
        })
    }

    /// The decision for one role.
    pub fn decide_role(&self, role: Role, resource_type: &str, action: Action) -> Decision {
        let Some(t) = type_index(resource_type) else {
            return self.denied(Arc::clone(&self.denied_unknown_type));
        };
        let grant = &self.grants[grant_index(role, t, action)];
        match grant.scope {
            None => self.denied(Arc::clone(&grant.rule)),
            Some(scope) => {
                let (read, write) = &self.masks[role as usize * TYPES + t];
                Decision {
                    allowed: true,
                    scope: Some(scope),
                    read_mask: Arc::clone(read),
                    write_mask: Arc::clone(write),
                    rule: Arc::clone(&grant.rule),
                    narrowing: None,
                }
            }
        }
    }

    /// The decision for a principal holding `roles`: the broadest scope granted wins; the masks of the roles
    /// granting that scope are united (see the module doc of `access`).
    pub fn decide(&self, roles: &[Role], resource_type: &str, action: Action) -> Decision {
        let mut decisions = roles.iter().map(|r| self.decide_role(*r, resource_type, action));
        let Some(first) = decisions.next() else {
            return self.denied(Arc::from("denied: the principal has no role"));
        };
        decisions.fold(first, |best, next| match (best.scope, next.scope) {
            (_, None) => best,
            (None, Some(_)) => next,
            (Some(a), Some(b)) if b > a => next,
            (Some(a), Some(b)) if b < a => best,
            _ => Decision {
                allowed: true,
                scope: best.scope,
                read_mask: Arc::new(best.read_mask.union(&next.read_mask)),
                write_mask: Arc::new(best.write_mask.union(&next.write_mask)),
                rule: Arc::from(format!("{} | {}", best.rule, next.rule)),
                narrowing: None,
            },
        })
    }

    fn denied(&self, rule: Arc<str>) -> Decision {
        Decision {
            allowed: false,
            scope: None,
            read_mask: Arc::clone(&self.nothing),
            write_mask: Arc::clone(&self.nothing),
            rule,
            narrowing: None,
        }
    }

    /// The decision and the rule that made it, in plain text.
    pub fn explain(&self, role: Role, resource_type: &str, action: Action) -> String {
        let d = self.decide_role(role, resource_type, action);
        let mut out = String::new();
        match d.scope {
            Some(scope) => {
                let _ = writeln!(out, "{role} {action} {resource_type}: ALLOWED, scope {scope}");
            }
            None => {
                let _ = writeln!(out, "{role} {action} {resource_type}: DENIED");
            }
        }
        let _ = writeln!(out, "rule: {}", d.rule);
        if d.allowed {
            let _ = writeln!(out, "sees: {}", d.read_mask);
            let _ = writeln!(out, "writes: {}", d.write_mask);
        }
        out
    }
}

/// Parses policy.csv strictly: `p, SUBJECT, TYPE, ACTION, SCOPE` and `g, ROLE, GROUP`; comments on their own
/// lines. Returns the `p` rules and the groups (group → member roles).
fn parse_policy(text: &str) -> Result<(Vec<Rule>, Groups), PolicyError> {
    let err = |line: usize, reason: &str| PolicyError::Line { file: POLICY_FILE, line, reason: reason.to_owned() };
    let mut groups = Groups::new();
    let mut raw_rules = Vec::new();
    let mut seen = HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if trimmed.contains(['#', '"']) {
            return Err(err(line, "comments go on their own line; quotes are not allowed"));
        }
        let fields: Vec<&str> = trimmed.split(',').map(str::trim).collect();
        if !seen.insert(fields.join(",")) {
            return Err(err(line, "duplicate line"));
        }
        match fields.as_slice() {
            ["g", role, group] => {
                let role: Role = role.parse().map_err(|_| err(line, "unknown role"))?;
                if group.parse::<Role>().is_ok() {
                    return Err(err(line, "a group may not be named like a role"));
                }
                if group.is_empty() || !group.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    return Err(err(line, "a group name is lower-case letters and underscores"));
                }
                groups.entry((*group).to_owned()).or_default().insert(role);
            }
            ["p", subject, resource_type, action, scope] => {
                raw_rules.push((line, *subject, *resource_type, *action, *scope))
            }
            ["p", ..] => return Err(err(line, "a p line is: p, ROLE, TYPE, ACTION, SCOPE")),
            ["g", ..] => return Err(err(line, "a g line is: g, ROLE, GROUP")),
            _ => return Err(err(line, "a line starts with p or g")),
        }
    }
    let mut rules = Vec::with_capacity(raw_rules.len());
    for (line, subject, resource_type, action, scope) in raw_rules {
        let members: Vec<Role> = match subject.parse::<Role>() {
            Ok(role) => vec![role],
            Err(_) => groups
                .get(subject)
                .map(|m| m.iter().copied().collect())
                .ok_or_else(|| err(line, "unknown role or group"))?,
        };
        if type_index(resource_type).is_none() {
            return Err(err(line, "unknown resource type"));
        }
        let action =
            Action::ALL.into_iter().find(|a| a.as_str() == action).ok_or_else(|| err(line, "unknown action"))?;
        let scope = Scope::parse(scope).ok_or_else(|| err(line, "unknown scope (all, careteam, own)"))?;
        if !members.iter().all(|r| scope_fits(scope, *r)) {
            return Err(err(line, "scope careteam is for clinician and nurse, own for patient"));
        }
        rules.push(Rule { line, subject: subject.to_owned(), resource_type: resource_type.to_owned(), action, scope });
    }
    Ok((rules, groups))
}

/// `careteam` needs a Practitioner link (clinician, nurse); `own` a Patient link (patient). Casbin is never
/// asked about other pairs, so even a faulty model cannot grant them.
fn scope_fits(scope: Scope, role: Role) -> bool {
    match scope {
        Scope::All => true,
        Scope::CareTeam => role.is_care_provider(),
        Scope::Own => role == Role::Patient,
    }
}

type Table = Vec<Option<(Scope, Rule)>>;

/// Asks casbin about every (role, type, action) once per scope that fits the role. Every grant must come from exactly one scope and
/// trace back to a policy line; every policy line must be honoured by the model.
fn evaluate(model: &str, policy: &str, rules: &[Rule], groups: &Groups) -> Result<Table, PolicyError> {
    let casbin_err = |e: casbin::Error| PolicyError::Casbin(e.to_string());
    let enforcer = run_ready(async {
        let model = DefaultModel::from_str(model).await?;
        Enforcer::new(model, StringAdapter::new(policy)).await
    })?
    .map_err(casbin_err)?;

    let covers = |rule: &Rule, role: Role| {
        rule.subject == role.as_str() || groups.get(&rule.subject).is_some_and(|m| m.contains(&role))
    };
    let mut table: Table = vec![None; ROLES * TYPES * ACTIONS];
    for role in Role::ALL {
        for (t, type_name) in RESOURCE_TYPES.iter().enumerate() {
            for action in Action::ALL {
                let mut granted = Vec::new();
                for scope in Scope::ALL.into_iter().filter(|s| scope_fits(*s, role)) {
                    let request = (role.as_str(), *type_name, action.as_str(), scope.as_str());
                    if enforcer.enforce(request).map_err(casbin_err)? {
                        granted.push(scope);
                    }
                }
                let Some(&scope) = granted.first() else {
                    continue;
                };
                if granted.len() > 1 {
                    return Err(invalid(
                        POLICY_FILE,
                        format!("{role} {action} on {type_name} is granted with more than one scope"),
                    ));
                }
                let rule = rules
                    .iter()
                    .find(|r| {
                        r.resource_type == *type_name && r.action == action && r.scope == scope && covers(r, role)
                    })
                    .ok_or_else(|| {
                        invalid(MODEL_FILE, format!("grants {role} {action} on {type_name} without a policy line"))
                    })?;
                table[grant_index(role, t, action)] = Some((scope, rule.clone()));
            }
        }
    }
    for rule in rules {
        let Some(t) = type_index(&rule.resource_type) else {
            continue;
        };
        for role in Role::ALL.into_iter().filter(|r| covers(rule, *r)) {
            if table[grant_index(role, t, rule.action)].as_ref().map(|(s, _)| *s) != Some(rule.scope) {
                return Err(invalid(MODEL_FILE, format!("does not honour {POLICY_FILE} line {}", rule.line)));
            }
        }
    }
    Ok(table)
}

type MaskPair = Option<(FieldMask, FieldMask)>;

/// Parses fields.toml and builds the (read, write) masks per `[role][type]`, checking them against the grants.
fn build_masks(text: &str, table: &Table, catalog: &dyn ElementCatalog) -> Result<Vec<MaskPair>, PolicyError> {
    let file: BTreeMap<String, BTreeMap<String, FieldRule>> =
        toml::from_str(text).map_err(|e| invalid(FIELDS_FILE, e.message().to_owned()))?;
    let mut masks: Vec<MaskPair> = vec![None; ROLES * TYPES];
    for (role_name, types) in &file {
        let role: Role = role_name.parse().map_err(|_| invalid(FIELDS_FILE, format!("unknown role [{role_name}]")))?;
        for (type_name, rule) in types {
            let at = format!("[{role_name}.{type_name}]");
            let t =
                type_index(type_name).ok_or_else(|| invalid(FIELDS_FILE, format!("{at}: unknown resource type")))?;
            let known = catalog
                .elements(type_name)
                .ok_or_else(|| invalid(FIELDS_FILE, format!("{at}: the element catalog does not know this type")))?;
            let read = element_list(&rule.read, &known, &at, "read")?;
            let write = element_list(&rule.write, &known, &at, "write")?;
            match (&read, &write) {
                (_, Some(w)) if w.is_empty() => {}
                (None, _) => {}
                (Some(_), None) => {
                    return Err(invalid(FIELDS_FILE, format!("{at}: write \"*\" needs read \"*\"")));
                }
                (Some(r), Some(w)) => {
                    if let Some(e) = w.difference(r).next() {
                        return Err(invalid(FIELDS_FILE, format!("{at}: writes {e} which it cannot read")));
                    }
                }
            }
            let (hide, write_only) = (&rule.hide_identifier_systems, &rule.write_only_identifier_systems);
            if hide.iter().chain(write_only).any(|s| s.trim().is_empty()) {
                return Err(invalid(FIELDS_FILE, format!("{at}: empty identifier system")));
            }
            if (!hide.is_empty() || !write_only.is_empty())
                && let Some(r) = &read
                && (r.contains("text") || r.contains("contained"))
            {
                return Err(invalid(FIELDS_FILE, format!("{at}: text and contained are hidden with identifiers")));
            }
            if write_only.iter().any(|w| hide.iter().any(|h| canonical_system(h) == canonical_system(w))) {
                return Err(invalid(
                    FIELDS_FILE,
                    format!("{at}: an identifier system is either hidden or write-only, not both"),
                ));
            }
            if !write_only.is_empty() && write.as_ref().is_some_and(|w| !w.contains("identifier")) {
                return Err(invalid(
                    FIELDS_FILE,
                    format!("{at}: write-only identifiers need write to include identifier"),
                ));
            }

            let grants = |pred: fn(Action) -> bool| {
                Action::ALL.into_iter().any(|a| pred(a) && table[grant_index(role, t, a)].is_some())
            };
            let (may_read, may_write) = (grants(Action::reads), grants(Action::writes));
            let has_read = read.as_ref().is_none_or(|r| !r.is_empty());
            let has_write = write.as_ref().is_none_or(|w| !w.is_empty());
            if has_read != may_read {
                let reason = if may_read {
                    "read is empty but policy.csv grants reading"
                } else {
                    "read is set but policy.csv grants no reading"
                };
                return Err(invalid(FIELDS_FILE, format!("{at}: {reason}")));
            }
            if has_write != may_write {
                let reason = if may_write {
                    "write is empty but policy.csv grants create or update"
                } else {
                    "write is set but policy.csv grants no create or update"
                };
                return Err(invalid(FIELDS_FILE, format!("{at}: {reason}")));
            }
            let mandatory = catalog.mandatory(type_name);
            // Write-only systems are hidden from reading (never shown, never decrypted) but not from writing.
            let hidden = rule.hide_identifier_systems.clone();
            let unreadable: Vec<String> = hidden.iter().chain(write_only).cloned().collect();
            masks[role as usize * TYPES + t] = Some((
                FieldMask::new(read, unreadable, &known, mandatory.clone())
                    .with_write_only_identifier_systems(write_only.clone()),
                FieldMask::new(write, hidden, &known, mandatory).with_write_only_identifier_systems(write_only.clone()),
            ));
        }
    }
    for role in Role::ALL {
        for (t, type_name) in RESOURCE_TYPES.iter().enumerate() {
            let needs =
                Action::ALL.into_iter().any(|a| (a.reads() || a.writes()) && table[grant_index(role, t, a)].is_some());
            if needs && masks[role as usize * TYPES + t].is_none() {
                return Err(invalid(FIELDS_FILE, format!("[{role}.{type_name}] is missing: policy.csv grants access")));
            }
        }
    }
    Ok(masks)
}

/// `["*"]` → `None` (all); otherwise the set of names, each known to the catalog.
fn element_list(
    names: &[String],
    known: &[String],
    at: &str,
    key: &str,
) -> Result<Option<BTreeSet<String>>, PolicyError> {
    if names.iter().any(|n| n == "*") {
        return if names.len() == 1 {
            Ok(None)
        } else {
            Err(invalid(FIELDS_FILE, format!("{at}: {key} \"*\" stands alone")))
        };
    }
    let mut set = BTreeSet::new();
    for name in names {
        if matches!(name.as_str(), "resourceType" | "id" | "meta") {
            return Err(invalid(FIELDS_FILE, format!("{at}: {key} names {name}, which is always kept")));
        }
        if !known.iter().any(|k| k == name) {
            return Err(invalid(FIELDS_FILE, format!("{at}: {key} names unknown element {name}")));
        }
        if !set.insert(name.clone()) {
            return Err(invalid(FIELDS_FILE, format!("{at}: {key} names {name} twice")));
        }
    }
    Ok(Some(set))
}

/// Drives a future that needs no I/O (casbin building an enforcer from strings) to completion without a runtime,
/// so loading works the same from the CLI, tests and a blocking task. Fails closed if it ever waits.
fn run_ready<F: Future>(fut: F) -> Result<F::Output, PolicyError> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1024 {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Ok(out);
        }
    }
    Err(PolicyError::Casbin("the enforcer did not build without waiting".to_owned()))
}
