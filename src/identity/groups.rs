//! The groups a root client's certificate puts it in, for the root's RBAC: `tether cert client
//! --group ops` writes them into the certificate ([`GROUPS_EXTENSION`]), and a proxy hands
//! them, with the client's name, to the SubjectAccessReview that decides its dials.
//!
//! Kubernetes reserves the groups that start with `system:` (`system:masters` may do anything);
//! no certificate may name one, so holding the root CA does not make anyone a cluster
//! administrator. Issuing refuses them, and reading drops them (and any other malformed name)
//! from a certificate made elsewhere.

use russh::keys::ssh_key::Certificate;

/// The certificate extension naming a client's groups, comma-separated.
pub const GROUPS_EXTENSION: &str = "tether-groups@tether.dev";

/// The prefix of the groups Kubernetes reserves.
pub const RESERVED_PREFIX: &str = "system:";

/// Longest group name: Kubernetes' limit on a name in a RoleBinding subject.
const MAX_GROUP_LEN: usize = 253;

/// Why `group` cannot go into a certificate, if it cannot.
pub fn validate_group(group: &str) -> Result<(), &'static str> {
    if group.is_empty() {
        return Err("it is empty");
    }
    if group.len() > MAX_GROUP_LEN {
        return Err("it is longer than 253 bytes");
    }
    if group.starts_with(RESERVED_PREFIX) {
        return Err("groups starting with system: are Kubernetes' own");
    }
    if group
        .chars()
        .any(|c| c == ',' || c.is_whitespace() || c.is_control())
    {
        return Err("it holds a comma, a space or a control character");
    }
    Ok(())
}

/// The value of [`GROUPS_EXTENSION`] for `groups` (already validated).
pub fn encode(groups: &[String]) -> String {
    groups.join(",")
}

/// The groups `certificate` names; malformed and reserved ones are left out.
pub fn groups_of(certificate: &Certificate) -> Vec<String> {
    certificate
        .extensions()
        .get(GROUPS_EXTENSION)
        .map(|list| {
            list.split(',')
                .filter(|g| validate_group(g).is_ok())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_and_malformed_groups_are_refused() {
        assert_eq!(validate_group("ops"), Ok(()));
        assert_eq!(validate_group("team:payments"), Ok(()));
        for bad in ["", "system:masters", "a,b", "a b", "a\nb"] {
            assert!(validate_group(bad).is_err(), "{bad:?}");
        }
        assert!(validate_group(&"g".repeat(254)).is_err());
    }
}
