//! Who a root caller becomes in the leaf: the leaf's own mapping from root users and groups to
//! leaf groups (a TrustedCluster's `spec.access`, or `tether agent --kube-access FILE`).
//!
//! The leaf keeps the last word. The agent asks its API server to impersonate
//! `tether:ROOT:USER` (so the leaf's audit log names the person and the root they came through)
//! in the leaf groups the mapping gives, never in the root's groups: a root group means
//! nothing in the leaf until the leaf says what it means. A caller no rule names is refused
//! in the leaf, before any request reaches its API server.
//!
//! ```yaml
//! - groups: ["platform"]          # root group
//!   leafGroups: ["tether:admins"] # bound to a ClusterRole in the leaf
//! - users: ["system:serviceaccount:ci:deployer"]
//!   leafGroups: ["tether:deployers"]
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::protocol::ClusterName;
use crate::protocol::kube::Caller;

/// The prefix of every impersonated user name: `tether:ROOT:` names the root a request came from.
pub const USER_PREFIX: &str = "tether";

/// One rule of the mapping: root callers it names, and the leaf groups they get.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessRule {
    /// Root users this rule maps, by exact name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Root groups this rule maps: a caller in any of them matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Leaf groups a matching caller acts in (bind leaf Roles to them).
    pub leaf_groups: Vec<String>,
}

/// Why a mapping file or field cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessRuleError {
    #[error("access rule {0} names no root user and no root group: it would match nobody")]
    MatchesNobody(usize),
    #[error(
        "access rule {index} maps to the leaf group {group:?}: system: groups are the API server's own, and granting them from the root is refused"
    )]
    SystemGroup { index: usize, group: String },
}

/// A leaf's mapping of root callers, for one root cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeAccess {
    /// The root the agent dials: impersonated names carry it, and only its callers come here.
    root: ClusterName,
    /// The rules, in order; a caller gets the union of the leaf groups of every rule it matches.
    rules: Vec<AccessRule>,
}

/// What the agent asks its API server to impersonate for one caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Impersonation {
    /// `tether:ROOT:USER`.
    pub user: String,
    /// The leaf groups of the matching rules.
    pub groups: Vec<String>,
}

impl KubeAccess {
    /// Checks the rules: each must match someone, and none may grant a `system:` group (the
    /// way to cluster-admin, `system:masters`, must not come from another cluster).
    pub fn new(root: ClusterName, rules: Vec<AccessRule>) -> Result<Self, AccessRuleError> {
        for (index, rule) in rules.iter().enumerate() {
            if rule.users.is_empty() && rule.groups.is_empty() {
                return Err(AccessRuleError::MatchesNobody(index));
            }
            if let Some(group) = rule.leaf_groups.iter().find(|g| g.starts_with("system:")) {
                return Err(AccessRuleError::SystemGroup {
                    index,
                    group: group.clone(),
                });
            }
        }
        Ok(Self { root, rules })
    }

    /// The root these rules are for.
    pub fn root(&self) -> &ClusterName {
        &self.root
    }

    /// Who `caller` is in the leaf, or why it is nobody there.
    pub fn map(&self, caller: &Caller) -> Result<Impersonation, String> {
        let mut groups: Vec<String> = Vec::new();
        let mut matched = false;
        for rule in &self.rules {
            let names_user = rule.users.contains(&caller.user);
            let names_group = rule.groups.iter().any(|g| caller.groups.contains(g));
            if names_user || names_group {
                matched = true;
                for group in &rule.leaf_groups {
                    if !groups.contains(group) {
                        groups.push(group.clone());
                    }
                }
            }
        }
        if !matched {
            return Err(format!(
                "user {:?} of root cluster {} is not mapped to this cluster: no rule of its access mapping (TrustedCluster spec.access) names the user or one of its groups",
                caller.user, self.root
            ));
        }
        Ok(Impersonation {
            user: format!("{USER_PREFIX}:{}:{}", self.root, caller.user),
            groups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(users: &[&str], groups: &[&str], leaf: &[&str]) -> AccessRule {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        AccessRule {
            users: owned(users),
            groups: owned(groups),
            leaf_groups: owned(leaf),
        }
    }

    fn caller(user: &str, groups: &[&str]) -> Caller {
        Caller {
            user: user.into(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_caller_gets_the_leaf_groups_of_every_rule_it_matches_and_never_its_root_groups() {
        let root = ClusterName::new("root").expect("name");
        let access = KubeAccess::new(
            root,
            vec![
                rule(&[], &["platform"], &["tether:admins"]),
                rule(&["alice"], &[], &["tether:viewers", "tether:admins"]),
            ],
        )
        .expect("rules");
        let who = access
            .map(&caller("alice", &["platform", "system:masters"]))
            .expect("mapped");
        assert_eq!(who.user, "tether:root:alice");
        assert_eq!(who.groups, ["tether:admins", "tether:viewers"]);
        let refused = access.map(&caller("mallory", &["system:masters"]));
        assert!(refused.expect_err("unmapped").contains("not mapped"));
    }

    #[test]
    fn rules_that_match_nobody_or_grant_system_groups_are_refused() {
        let root = ClusterName::new("root").expect("name");
        assert!(KubeAccess::new(root.clone(), vec![rule(&[], &[], &["g"])]).is_err());
        let err = KubeAccess::new(root, vec![rule(&["a"], &[], &["system:masters"])])
            .expect_err("system group");
        assert!(err.to_string().contains("system:masters"), "{err}");
    }
}
